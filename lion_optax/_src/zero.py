"""ZeRO-style sharding of the optimizer state of replicated parameters.

With data parallelism the parameters are replicated, and so would be the
momentum; :func:`shard_optimizer_state` splits the state along the data axis
instead (1/N of its bytes on each device), at the price of one all-gather of
the update per step (ZeRO stage 1).
"""

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.experimental.shard_alike import shard_alike
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from lion_optax._src.sharding import as_jit_returns, mesh_axis_types, place_like_params


def _concrete_mesh(mesh: Any) -> jax.sharding.Mesh:
    if mesh is not None:
        return mesh
    current = jax.sharding.get_mesh()
    if current is None or current.empty:
        raise ValueError(
            'shard_optimizer_state needs a mesh: pass mesh=... or call it inside '
            '`with jax.set_mesh(mesh):`. No mesh was given and none is set.'
        )
    return current


def _zero_spec(shape: Sequence[int], axis_name: str, axis_size: int) -> P | None:
    """``axis_name`` on the first dimension it divides; other dims left to XLA."""
    for dim, size in enumerate(shape):
        if size % axis_size == 0 and size >= axis_size:
            rest = [P.UNCONSTRAINED] * (len(shape) - dim - 1)
            return P(*([P.UNCONSTRAINED] * dim), axis_name, *rest)
    return None


def shard_optimizer_state(
    inner: optax.GradientTransformation,
    axis_name: str = 'data',
    *,
    mesh: jax.sharding.Mesh | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""ZeRO-style: shards the optimizer state of replicated parameters along a mesh axis.

    With plain data parallelism every device holds the whole parameters and,
    by default, the whole optimizer state. Wrapping the optimizer in this
    transformation keeps each state array (Lion's momentum) split along
    ``axis_name``: the first dimension of each array that the axis size
    divides is sharded, the others are left for XLA to choose (so a
    ``model``-axis sharding of the parameter is kept). Arrays with no such
    dimension, and scalars, stay replicated. Per device, the state takes
    about ``1 / axis_size`` of its replicated size.

    Each device then computes the step for its slice of the momentum and the
    update is gathered back to the parameters' sharding: one all-gather of
    the update (in the parameters' dtype) per step, which ``jit`` inserts.
    Parameters, gradients and updates keep their own shardings.

    .. math::

      \text{state bytes per device} \approx
        \frac{\text{replicated state bytes}}{|\text{axis}|}, \qquad
      \text{traffic per step} \approx \frac{|\text{axis}| - 1}{|\text{axis}|}
        \,\text{bytes}(\text{update}).

    For meshes whose axes are ``Auto`` (``jax.sharding.Mesh(...)`` or
    ``jax.make_mesh(..., axis_types=(AxisType.Auto, ...))``); on an
    ``Explicit`` mesh the momentum and the gradient would carry different
    shardings in their types, which ``jit`` refuses, so this raises there.

    Args:
      inner: the optimizer, e.g. ``lion_optax.lion(1e-4)``.
      axis_name: the mesh axis to shard the state along (the data axis).
      mesh: the mesh; defaults to the one set with ``jax.set_mesh``.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with ``inner``'s state
      (same structure, sharded).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jax.sharding import AxisType
      >>> import lion_optax
      >>> mesh = jax.make_mesh((1,), ('data',), axis_types=(AxisType.Auto,))
      >>> tx = lion_optax.shard_optimizer_state(lion_optax.lion(1e-3), 'data', mesh=mesh)
      >>> params = {'w': jnp.zeros((4, 2))}
      >>> state = jax.jit(tx.init)(params)
      >>> updates, state = jax.jit(tx.update)(params, state, params)
      >>> lion_optax.hlo.tree_bytes(state[0].mu)  # 1 device: nothing to split
      32

    References:
      Rajbhandari et al., `ZeRO: Memory Optimizations Toward Training Trillion
      Parameter Models <https://arxiv.org/abs/1910.02054>`_, 2020.
    """
    if not isinstance(axis_name, str):
        raise TypeError(f'axis_name must be the name of one mesh axis (a str), got {axis_name!r}.')
    inner = optax.with_extra_args_support(inner)

    def constrain(tree: Any) -> Any:
        resolved = _concrete_mesh(mesh)
        if axis_name not in resolved.axis_names:
            raise ValueError(
                f'axis_name={axis_name!r} is not an axis of the mesh, whose axes are '
                f'{resolved.axis_names}. Pass one of those.'
            )
        axis_type = dict(zip(resolved.axis_names, resolved.axis_types))[axis_name]
        if axis_type != AxisType.Auto:
            raise ValueError(
                f'shard_optimizer_state needs the mesh axis {axis_name!r} to be of '
                f'type AxisType.Auto, but it is {axis_type}. '
                'Build the mesh with axis_types=(AxisType.Auto, ...), or on an '
                'Explicit mesh shard the parameters themselves (FSDP) instead.'
            )
        size = resolved.shape[axis_name]
        if size == 1:
            return tree  # nothing to split (and jit returns such arrays unconstrained)

        def one(leaf: Any) -> Any:
            spec = _zero_spec(jnp.shape(leaf), axis_name, size) if jnp.ndim(leaf) else None
            if spec is None:
                return leaf
            if not isinstance(leaf, jax.core.Tracer):
                # Eagerly, UNCONSTRAINED means "keep what you have": replicated here.
                spec = P(*(None if s is P.UNCONSTRAINED else s for s in spec))
                target = as_jit_returns(NamedSharding(resolved, spec), jnp.ndim(leaf))
                return jax.device_put(leaf, target)
            return jax.lax.with_sharding_constraint(leaf, NamedSharding(resolved, spec))

        return jax.tree.map(one, tree)

    def init_fn(params: optax.Params) -> Any:
        return place_like_params(constrain(inner.init(params)), params)

    def update_fn(
        updates: optax.Updates, state: Any, params: optax.Params | None = None, **extra: Any
    ) -> tuple[optax.Updates, Any]:
        grads = updates
        updates, state = inner.update(updates, state, params, **extra)
        like = params if params is not None else grads

        def gather(reference: Any, update: Any) -> Any:
            if isinstance(update, jax.core.Tracer) and AxisType.Auto in mesh_axis_types(update):
                return shard_alike(reference, update)[1]
            return update

        return jax.tree.map(gather, like, updates), constrain(state)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
