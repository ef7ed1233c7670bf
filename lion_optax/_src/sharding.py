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

from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental.shard_alike import shard_alike
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

# ---------------------------------------------------------------------------
# Zeros with the parameter's sharding.


def mesh_axis_types(x: Any) -> tuple[Any, ...]:
    """The axis types of the mesh ``x``'s abstract value lives on (() if none)."""
    sharding = getattr(jax.typeof(x), 'sharding', None)
    mesh = getattr(sharding, 'mesh', None)
    if mesh is None or mesh.empty:
        return ()
    return tuple(mesh.axis_types)


def as_jit_returns(sharding: Any, ndim: int) -> Any:
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
      >>> from lion_optax._src.sharding import zeros_like_sharded
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
        return jnp.zeros(x.shape, dtype, device=as_jit_returns(x.sharding, x.ndim) if x.committed else None)
    if not isinstance(x, jax.Array):  # NumPy arrays, Python scalars
        return jnp.zeros(jnp.shape(x), dtype)
    axis_types = mesh_axis_types(x)
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
# Inside shard_map: which axes are manual, which values vary over them.


def is_manual(axis_name: str) -> bool:
    """True inside ``shard_map`` over ``axis_name`` (False under ``vmap``)."""
    mesh = jax.sharding.get_abstract_mesh()
    return not mesh.empty and axis_name in getattr(mesh, 'manual_axes', ())


def is_varying(x: jax.Array, axis_name: str) -> bool:
    """True when ``x`` (inside ``shard_map``) may differ between the workers of ``axis_name``."""
    mat = getattr(jax.typeof(x), 'mat', None)
    return mat is not None and axis_name in mat.varying
