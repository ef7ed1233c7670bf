"""Sharding: optimizer state that lives where the parameters live.

Lion's state is one momentum per parameter, and its step is element-wise, so a
sharded model needs no communication in the optimizer at all: the momentum
only has to be created with the parameter's sharding. This module holds the
helper ``scale_by_lion`` uses for that (:func:`zeros_like_sharded`, which also
works under ``jit``, where ``jnp.zeros_like`` loses the sharding), the
placement that keeps an eagerly built state from recompiling the step
(:func:`place_like_params`), and a ZeRO-style wrapper that shards the state of
replicated parameters along the data axis (:func:`shard_optimizer_state`).
"""

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.experimental.shard_alike import shard_alike
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

# ---------------------------------------------------------------------------
# Zeros with the parameter's sharding.


def _mesh_axis_types(x: Any) -> tuple[Any, ...]:
    """The axis types of the mesh ``x``'s abstract value lives on (() if none)."""
    sharding = getattr(jax.typeof(x), 'sharding', None)
    mesh = getattr(sharding, 'mesh', None)
    if mesh is None or mesh.empty:
        return ()
    return tuple(mesh.axis_types)


def _as_jit_returns(sharding: Any, ndim: int) -> Any:
    """A NamedSharding's spec written as a jitted step returns it.

    ``P('data')``, ``P('data', None)`` and (for a matrix) ``P()`` and
    ``P(None, None)`` shard alike, but ``jit`` compiles again for a spec
    written differently. Its outputs carry the spec padded with None to full
    rank on an Explicit mesh, and without trailing Nones on an Auto mesh.
    """
    if not isinstance(sharding, NamedSharding):
        return sharding
    spec = list(sharding.spec)
    if AxisType.Explicit in sharding.mesh.axis_types:
        spec += [None] * (ndim - len(spec))
    else:
        while spec and spec[-1] is None:
            spec.pop()
    return NamedSharding(sharding.mesh, P(*spec), memory_kind=sharding.memory_kind)


def zeros_like_sharded(x: Any, dtype: Any = None) -> jax.Array:
    """Zeros with ``x``'s shape and sharding, in ``dtype`` (default ``x``'s).

    ``jnp.zeros_like`` under ``jit`` makes a constant that does not depend on
    ``x``, so on a mesh with ``Auto`` axes XLA gives it no sharding and the
    momentum of a sharded parameter ends up whole on one device (this is what
    ``optax.scale_by_lion``'s ``init`` does under ``jit``). This helper keeps
    the sharding in every context:

    - a concrete ``jax.Array`` (eager ``init``): the zeros are created directly
      with ``x.sharding`` (committed when ``x`` is, uncommitted otherwise);
    - under ``jit`` on a mesh with ``Auto`` axes: the zeros are tied to ``x`` by
      ``jax.experimental.shard_alike``, so sharding propagation gives them
      ``x``'s sharding, whatever it turns out to be;
    - under ``jit`` on an ``Explicit`` mesh (with or without ``jax.set_mesh``)
      or on one device: the sharding is part of ``x``'s type and the zeros
      take it; an optimisation barrier keeps ``x`` an input of the
      computation so that ``jit`` knows its devices and returns the zeros
      committed like the parameters;
    - inside ``shard_map`` (``Manual`` axes), or for NumPy inputs: plain
      zeros, which is already right there.

    It reads nothing of ``x``'s values (NaN or Inf parameters still give
    exact zeros) and costs nothing in the compiled program.

    Args:
      x: an array (or anything with ``shape`` and ``dtype``).
      dtype: the zeros' dtype; None keeps ``x``'s.

    Returns:
      An array of zeros of ``x``'s shape, in ``dtype``, sharded like ``x``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from lion_optax import zeros_like_sharded
      >>> x = jnp.ones((2, 3))
      >>> z = jax.jit(lambda p: zeros_like_sharded(p, jnp.bfloat16))(x)
      >>> z.dtype, z.shape, z.sharding == x.sharding
      (dtype(bfloat16), (2, 3), True)
    """
    dtype = jnp.result_type(x) if dtype is None else dtype
    if isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer):
        # Committed like x: an uncommitted parameter gets uncommitted zeros, so
        # that the state's arrays look like the step's outputs and the jitted
        # step compiles once.
        return jnp.zeros(x.shape, dtype, device=_as_jit_returns(x.sharding, x.ndim) if x.committed else None)
    if not isinstance(x, jax.Array):  # NumPy arrays, Python scalars
        return jnp.zeros(jnp.shape(x), dtype)
    axis_types = _mesh_axis_types(x)
    zeros = jnp.zeros_like(x, dtype=dtype)  # takes explicit axes from x's type
    if AxisType.Manual in axis_types:
        return zeros
    if AxisType.Auto not in axis_types:
        # Keeps x an input of the computation: jit then knows x's devices and
        # returns the zeros committed to them like every later step's outputs
        # (else the step compiles once more when the state comes back committed).
        zeros = jax.lax.optimization_barrier((x, zeros))[1]
    else:
        zeros = shard_alike(x, zeros)[1]
    return zeros


def place_like_params(state: Any, params: Any) -> Any:
    """Commits the uncommitted arrays of an eagerly built ``state`` where ``params`` live.

    A state whose momentum is committed to the parameters' devices but whose
    step counts are not makes the jitted step compile twice: once for the
    mixture, once more when every output comes back committed. When the
    parameters are committed concrete arrays, every uncommitted array of
    ``state`` is put on their devices (replicated over their mesh); otherwise
    (uncommitted parameters, tracers under ``jit``) ``state`` is returned as is.

    Args:
      state: an optimizer state built by ``init``.
      params: the parameters given to ``init``.

    Returns:
      ``state``, with the same values.

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> from lion_optax._src.sharding import place_like_params
      >>> params = jax.device_put(jnp.ones(3), jax.devices()[0])
      >>> state = place_like_params(optax.lion(1e-3).init(params), params)
      >>> state[0].count.committed, state[0].mu.committed
      (True, True)
    """
    committed = [
        leaf
        for leaf in jax.tree.leaves(params)
        if isinstance(leaf, jax.Array) and not isinstance(leaf, jax.core.Tracer) and leaf.committed
    ]
    if not committed:
        return state
    sharding = committed[0].sharding
    if isinstance(sharding, NamedSharding):
        replicated: jax.sharding.Sharding = NamedSharding(sharding.mesh, P())
    else:
        replicated = jax.sharding.SingleDeviceSharding(next(iter(sharding.device_set)))

    def place(leaf: Any) -> Any:
        if isinstance(leaf, jax.Array) and not isinstance(leaf, jax.core.Tracer):
            if not leaf.committed:
                return jax.device_put(leaf, replicated)
        return leaf

    return jax.tree.map(place, state)


# ---------------------------------------------------------------------------
# ZeRO-style state sharding for replicated parameters.


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
                target = _as_jit_returns(NamedSharding(resolved, spec), jnp.ndim(leaf))
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
            if isinstance(update, jax.core.Tracer) and AxisType.Auto in _mesh_axis_types(update):
                return shard_alike(reference, update)[1]
            return update

        return jax.tree.map(gather, like, updates), constrain(state)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
