r"""Distributed Lion: data parallelism that sends signs, not gradients.

Liu et al. (2024) observe that Lion's update is a sign, so data-parallel
workers need not all-reduce their gradients: each worker ``i`` keeps its own
momentum, computes its own Lion direction ``sign(c_i)`` from its local
gradient, and only these signs are combined:

.. math::

  \text{vote:}\ \Delta = \mathrm{sign}\Bigl(\sum_i \mathrm{sign}(c_i)\Bigr),
  \qquad
  \text{average:}\ \Delta = \frac{1}{N}\sum_i \mathrm{sign}(c_i).

Here this is the optax transformation :func:`aggregate_signs`, run inside
``jax.shard_map`` over the data axis, and the alias :func:`distributed_lion`.

How the signs travel (per device, for ``P`` parameters and ``N`` workers):

1. Each sign is a ternary digit (``sign(0) = 0`` is kept exact); 20 of them
   are packed into one ``uint32`` (``3**20 < 2**32``): 1.6 bits per
   parameter. A 1-bit code would send 37% less but would have to move
   every coordinate whose direction is exactly 0 (an embedding row that
   never gets a gradient, a masked parameter), which plain Lion leaves still.
2. An ``all_to_all`` sends worker ``j`` the packed signs of the ``j``-th
   ``1/N`` slice of the parameters, from every worker: ``(N-1)/N * 0.2 P``
   bytes sent per device.
3. Each worker counts the votes of its slice (exact integers in ``[-N, N]``)
   and packs the result: the vote again as ternary digits (1.6 bits), the
   average as digits of base ``2N+1`` (``floor(32 / log2(2N+1))`` per word,
   4.6 bits for ``N = 8``, 10.7 bits for ``N = 256``).
4. An ``all_gather`` of the packed results: ``(N-1)/N`` of their size.

Per-device traffic is therefore flat in ``N`` for the vote: ``(N-1)/N * 0.4 P``
bytes against ``(N-1)/N * 8 P`` for a float32 ring all-reduce, 1/20 at any
``N``. The average grows only like ``log N``, since the result itself needs
``log2(2N+1)`` bits: 1/10.4 of the all-reduce at ``N = 8``, 1/5.2 at
``N = 256``. Gathering every worker's 1-bit signs instead (an ``all_gather``)
costs ``(N-1) P / 8`` bytes per device: 1/8 of the all-reduce at ``N = 8``
but 4x more than it at ``N = 256``. :func:`sign_layout` gives the exact
numbers (padding included) for any model and ``N``.
"""

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec as P

from lion_optax._src import kappa as kappa_lib
from lion_optax._src import nonfinite as nonfinite_lib
from lion_optax._src import validation
from lion_optax._src.alias import NONFINITE_MODES, Nonfinite
from lion_optax._src.direction import scale_by_lion
from lion_optax._src.weight_decay import WeightDecayConvention, weight_decay_for_learning_rate

METHODS = ('vote', 'average')

# ---------------------------------------------------------------------------
# Packing small integers into uint32 words.


def digits_per_word(base: int) -> int:
    """How many digits of ``base`` fit in one ``uint32`` (``base**k <= 2**32``)."""
    k = 0
    while base ** (k + 1) <= 2**32:
        k += 1
    return k


def pack_digits(digits: jax.Array, base: int) -> jax.Array:
    """Packs the last axis of ``digits`` (uint32 values in ``[0, base)``) into one uint32.

    Digit ``j`` has weight ``base**j``; the last axis must be at most
    :func:`digits_per_word` long, so the packed value never overflows.
    """
    word = jnp.zeros(digits.shape[:-1], jnp.uint32)
    for j in reversed(range(digits.shape[-1])):
        word = word * jnp.uint32(base) + digits[..., j]
    return word


def unpack_digits(words: jax.Array, base: int, count: int) -> jax.Array:
    """Inverse of :func:`pack_digits`: a new last axis of ``count`` digits."""
    digits = []
    for _ in range(count):
        digits.append(words % jnp.uint32(base))
        words = words // jnp.uint32(base)
    return jnp.stack(digits, axis=-1)


# ---------------------------------------------------------------------------
# The aggregation.


class SignLayout(NamedTuple):
    """How :func:`aggregate_signs` lays ``num_params`` signs out for ``num_workers``.

    Attributes:
      num_params: signs per worker (the parameters' total size).
      num_workers: the size of the data axis.
      method: ``'vote'`` or ``'average'``.
      shard_digits: signs in each worker's slice (padded).
      in_base, in_per_word: digit base and digits per uint32 of the signs sent.
      out_base, out_per_word: the same for the aggregated result.
    """

    num_params: int
    num_workers: int
    method: str
    shard_digits: int
    in_base: int
    in_per_word: int
    out_base: int
    out_per_word: int

    @property
    def bytes_sent_per_device(self) -> float:
        """Bytes one device sends per step (all_to_all + all_gather), ring model."""
        n = self.num_workers
        words = (
            n * self.shard_digits // self.in_per_word + n * self.shard_digits // self.out_per_word
        )
        return (n - 1) / n * 4.0 * words

    @property
    def fp32_allreduce_bytes(self) -> float:
        """Bytes one device sends in a float32 ring all-reduce of the same parameters."""
        n = self.num_workers
        return 2.0 * (n - 1) / n * 4.0 * self.num_params


def sign_layout(num_params: int, num_workers: int, method: str = 'vote') -> SignLayout:
    """The packing and traffic of :func:`aggregate_signs` for a model and a worker count.

    Args:
      num_params: the parameters' total number of elements.
      num_workers: the size of the data axis.
      method: ``'vote'`` or ``'average'``.

    Returns:
      A :class:`SignLayout`, whose ``bytes_sent_per_device`` and
      ``fp32_allreduce_bytes`` give the traffic analysis for any scale.

    Example:
      >>> from lion_optax import sign_layout
      >>> layout = sign_layout(10**9, 256, 'vote')
      >>> round(layout.fp32_allreduce_bytes / layout.bytes_sent_per_device, 1)
      20.0
    """
    validation.check_choice('method', method, METHODS)
    for name, value in (('num_params', num_params), ('num_workers', num_workers)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f'{name} must be a positive int, got {value!r}.')
    in_base = 3
    out_base = 3 if method == 'vote' else 2 * num_workers + 1
    in_per_word, out_per_word = digits_per_word(in_base), digits_per_word(out_base)
    block = math.lcm(in_per_word, out_per_word)
    shard = -(-num_params // (num_workers * block)) * block
    return SignLayout(
        num_params, num_workers, method, shard, in_base, in_per_word, out_base, out_per_word
    )


def _ternary(u: jax.Array) -> jax.Array:
    """``sign(u)`` as int8, with NaN -> 0 (a worker with a NaN abstains)."""
    return jnp.where(u > 0, 1, jnp.where(u < 0, -1, 0)).astype(jnp.int8)


def _manual(axis_name: str) -> bool:
    """True inside ``shard_map`` over ``axis_name`` (False under ``vmap``)."""
    mesh = jax.sharding.get_abstract_mesh()
    return not mesh.empty and axis_name in getattr(mesh, 'manual_axes', ())


def _varying(x: jax.Array, axis_name: str) -> bool:
    mat = getattr(jax.typeof(x), 'mat', None)
    return mat is not None and axis_name in mat.varying


def _combine(signs: jax.Array, axis_name: str, layout: SignLayout) -> jax.Array:
    """The two collectives: ``(num_params,)`` int8 signs -> aggregated int32 values."""
    n = layout.num_workers
    padded = jnp.pad(signs, (0, n * layout.shard_digits - layout.num_params))
    digits = (padded.astype(jnp.int32) + 1).astype(jnp.uint32)
    words = pack_digits(
        digits.reshape(n, layout.shard_digits // layout.in_per_word, layout.in_per_word),
        layout.in_base,
    )
    manual = _manual(axis_name)
    if manual and not _varying(words, axis_name):
        words = jax.lax.pcast(words, axis_name, to='varying')
    # Row j of `received` holds worker j's signs for this worker's slice.
    received = jax.lax.all_to_all(words, axis_name, 0, 0, tiled=True)
    votes = unpack_digits(received, layout.in_base, layout.in_per_word).astype(jnp.int32) - 1
    counts = jnp.sum(votes, axis=0).reshape(layout.shard_digits)  # in [-n, n]
    result = jnp.sign(counts) + 1 if layout.method == 'vote' else counts + n
    packed = pack_digits(
        result.astype(jnp.uint32).reshape(-1, layout.out_per_word), layout.out_base
    )
    gathered = jax.lax.all_gather(
        packed, axis_name, tiled=True, to='invarying' if manual else 'varying'
    )
    values = unpack_digits(gathered, layout.out_base, layout.out_per_word).reshape(-1)
    offset = 1 if layout.method == 'vote' else n
    return values[: layout.num_params].astype(jnp.int32) - offset


def aggregate_signs(
    axis_name: str = 'data', *, method: str = 'vote'
) -> optax.GradientTransformation:
    r"""Combines the workers' sign directions by majority vote or by averaging.

    Place it right after :func:`scale_by_lion` (whose per-worker output is
    :math:`\mathrm{sign}(c_i)`) and before weight decay and the learning
    rate, inside ``jax.shard_map`` (or ``jax.vmap``) over ``axis_name``:

    .. math::

      \text{vote:}\ \Delta = \mathrm{sign}\Bigl(\sum_{i=1}^N s_i\Bigr),
      \qquad
      \text{average:}\ \Delta = \frac{1}{N}\sum_{i=1}^N s_i,
      \qquad s_i = \mathrm{sign}(u_i) \in \{-1, 0, 1\}.

    The input is reduced to its sign (NaN counts as 0: that worker abstains),
    so anything but a sign direction loses information here. Ties in the vote
    (as many +1 as -1, possible with an even ``N`` or abstentions) give 0: no
    step on that coordinate except weight decay, the ``sign(0) = 0``
    convention of every Lion implementation. The result is identical on every
    worker (typed invariant over ``axis_name`` inside ``shard_map``), in each
    update's dtype.

    Communication, per step and device: the signs as packed ternary digits
    (1.6 bits each) in one ``all_to_all``, and the aggregated values packed
    (1.6 bits for the vote, ``log2(2N+1)`` rounded to fit a uint32 word for
    the average) in one ``all_gather``; see :func:`sign_layout` for the
    bytes. All leaves travel together in one pair of collectives.

    Args:
      axis_name: the data axis (a ``shard_map`` mesh axis or ``vmap`` axis name).
      method: ``'vote'`` (majority vote) or ``'average'`` (mean of signs).

    Returns:
      A stateless ``optax.GradientTransformation``.

    Example:
      >>> import functools, jax, jax.numpy as jnp
      >>> import lion_optax
      >>> tx = lion_optax.aggregate_signs('workers', method='vote')
      >>> def combine(u):  # one worker's direction
      ...   return tx.update(u, tx.init(u))[0]
      >>> directions = jnp.array([[1.0, -1.0, 1.0], [1.0, 1.0, -1.0], [-1.0, 1.0, 0.0]])
      >>> jax.vmap(combine, axis_name='workers')(directions)[0]
      Array([1., 1., 0.], dtype=float32)

    References:
      Liu et al., `Communication Efficient Distributed Training with
      Distributed Lion <https://arxiv.org/abs/2404.00438>`_, 2024.
    """
    if not isinstance(axis_name, str):
        raise TypeError(
            f'axis_name must be the name of one axis (a str), got {axis_name!r}. '
            'Flatten several data axes into one mesh axis for Distributed Lion.'
        )
    validation.check_choice('method', method, METHODS)

    def init_fn(params: optax.Params) -> optax.EmptyState:
        del params
        return optax.EmptyState()

    def update_fn(
        updates: optax.Updates, state: optax.EmptyState, params: optax.Params | None = None
    ) -> tuple[optax.Updates, optax.EmptyState]:
        del params
        leaves, treedef = jax.tree.flatten(updates)
        if not leaves:
            return updates, state
        sizes = [math.prod(jnp.shape(leaf)) for leaf in leaves]
        layout = sign_layout(max(sum(sizes), 1), jax.lax.axis_size(axis_name), method)
        signs = jnp.concatenate([_ternary(leaf).reshape(-1) for leaf in leaves])
        if signs.size == 0:
            return updates, state
        values = _combine(signs, axis_name, layout)
        out, start = [], 0
        for leaf, size in zip(leaves, sizes):
            part = values[start : start + size].reshape(jnp.shape(leaf))
            start += size
            if method == 'vote':
                out.append(part.astype(leaf.dtype))
            else:
                out.append((part.astype(jnp.float32) / layout.num_workers).astype(leaf.dtype))
        return jax.tree.unflatten(treedef, out), state

    return optax.GradientTransformation(init_fn, update_fn)


# ---------------------------------------------------------------------------
# Skipping a step on every worker when any worker's gradient is not finite.


def _skip_step_on_any_worker(
    inner: optax.GradientTransformation, axis_name: str
) -> optax.GradientTransformationExtraArgs:
    """A whole-step skip with the decision agreed by all workers (one 4-byte pmin).

    A worker-local decision would let the other workers step, so the replicas
    of the parameters would drift apart (and the step counts would differ).
    """

    def agree(finite: jax.Array) -> jax.Array:
        local = finite.astype(jnp.int32)
        if _manual(axis_name) and not _varying(local, axis_name):
            local = jax.lax.pcast(local, axis_name, to='varying')
        return jax.lax.pmin(local, axis_name) > 0

    return nonfinite_lib.skip_step_if_nonfinite(inner, combine_across_workers=agree)


def _check_local_gradients(axis_name: str) -> optax.GradientTransformation:
    """Refuses gradients that JAX already all-reduced (invariant over the data axis)."""

    def update_fn(updates, state, params=None):
        del params
        try:
            jax.lax.axis_size(axis_name)
        except NameError as error:
            mesh = jax.sharding.get_abstract_mesh()
            bound = tuple(mesh.axis_names) if not mesh.empty else ()
            raise ValueError(
                f'distributed_lion(axis_name={axis_name!r}): no axis of that name is bound '
                f'here (mesh axes: {bound or "none"}). Call update inside '
                'jax.shard_map over the data axis (or jax.vmap with axis_name=...), and '
                'pass that axis\'s name, e.g. '
                f'distributed_lion(..., axis_name={bound[0] if bound else "data"!r}).'
            ) from error
        if _manual(axis_name):
            for path, leaf in jax.tree_util.tree_leaves_with_path(updates):
                if not _varying(leaf, axis_name):
                    raise ValueError(
                        f'distributed_lion: the gradient {jax.tree_util.keystr(path)} is '
                        f'the same on every worker of {axis_name!r} (its type is '
                        'invariant), so JAX has already summed it across workers with '
                        'a float32 all-reduce, the traffic Distributed Lion exists to '
                        'avoid. Differentiate with respect to '
                        f'jax.lax.pcast(params, {axis_name!r}, to="varying") to get '
                        "each worker's local gradient."
                    )
        return updates, state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def distributed_lion(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.99,
    mu_dtype: Any = None,
    weight_decay: optax.ScalarOrSchedule = 1e-3,
    mask: Any | Callable[[optax.Params], Any] | None = None,
    *,
    axis_name: str = 'data',
    method: str = 'vote',
    kappa: str | kappa_lib.Kappa = 'sign',
    weight_decay_convention: WeightDecayConvention = 'paper',
    reference_learning_rate: float | None = None,
    nonfinite: Nonfinite = 'zero',
) -> optax.GradientTransformationExtraArgs:
    r"""Distributed Lion (Liu et al. 2024): per-worker momentum, signs on the wire.

    For use inside ``jax.shard_map`` over the data axis ``axis_name``, with
    each worker's *local* gradient (see the example). Worker :math:`i`:

    .. math::

      s_i &= \mathrm{sign}\bigl(\beta_1 m_i + (1 - \beta_1) g_i\bigr), \qquad
      m_i \leftarrow \beta_2 m_i + (1 - \beta_2) g_i \\
      \Delta &= \mathrm{sign}\Bigl(\sum_i s_i\Bigr)\ \text{(vote)}
        \quad\text{or}\quad \frac{1}{N}\sum_i s_i\ \text{(average)} \\
      \theta &\leftarrow \theta - \eta_t\,(\Delta + \lambda_t \theta)

    The chain, top to bottom: :func:`scale_by_lion` (per worker),
    :func:`aggregate_signs`, :func:`add_decoupled_weight_decay`,
    ``optax.scale_by_learning_rate``. Non-finite gradients: with
    ``nonfinite='zero'`` (default) each worker counts its own non-finite
    gradient elements as 0 (no communication; every worker still applies the
    same voted update); with ``'skip_step'`` a step is skipped on every
    worker when any worker's gradient has a NaN or Inf (one 4-byte all-reduce
    decides it). Schedules, masks, both weight-decay conventions and
    ``mu_dtype`` (float or int8) compose as in :func:`lion`; Cautious Lion and
    the stochastic rounding of bf16 parameters do not (the vote replaces the
    direction, and the parameters are replicated). Only the sign
    kappa does: other kappas give real-valued directions that cannot travel
    as signs. With one worker, or identical gradients on every worker, the
    result is :func:`lion`'s.

    The state holds one momentum per worker: create it with
    :func:`distributed_init`, which also returns the ``PartitionSpec`` tree
    to give ``shard_map`` for it.

    Args:
      learning_rate: :math:`\eta_t`, a float >= 0 or a schedule.
      b1: interpolation rate for the update, in [0, 1].
      b2: momentum decay rate, in [0, 1].
      mu_dtype: storage of the momentum (a float dtype, ``'int8'`` or
        :class:`Int8Momentum`); None follows the parameters.
      weight_decay: :math:`\lambda_t`, a float >= 0 or a schedule.
      mask: which leaves get weight decay (see :func:`lion`).
      axis_name: the ``shard_map`` mesh axis the workers run along.
      method: ``'vote'`` (majority vote) or ``'average'``.
      kappa: ``'sign'`` (or optax's name ``'hard'``); others are refused.
      weight_decay_convention: ``'paper'`` or ``'fully_decoupled'``.
      reference_learning_rate: :math:`\eta_{\mathrm{ref}}` for ``'fully_decoupled'``.
      nonfinite: ``'zero'``, ``'skip_step'`` (on every worker) or
        ``'propagate'``: what a NaN or Inf gradient does (see :func:`lion`).

    Returns:
      An ``optax.GradientTransformationExtraArgs``.

    Example:
      >>> import functools, jax, jax.numpy as jnp, optax
      >>> from jax.sharding import PartitionSpec as P
      >>> import lion_optax
      >>> mesh = jax.make_mesh((jax.device_count(),), ('data',))
      >>> tx = lion_optax.distributed_lion(1e-2, axis_name='data', method='vote')
      >>> params = {'w': jnp.ones(4)}
      >>> state, state_specs = lion_optax.distributed_init(tx, params, mesh)
      >>> @jax.jit
      ... @functools.partial(jax.shard_map, mesh=mesh,
      ...     in_specs=(P(), state_specs, P('data')), out_specs=(P(), state_specs))
      ... def step(params, state, x):
      ...   local = jax.lax.pcast(params, 'data', to='varying')  # no gradient all-reduce
      ...   grads = jax.grad(lambda p: jnp.sum((x @ p['w']) ** 2))(local)
      ...   updates, state = tx.update(grads, state, params)
      ...   return optax.apply_updates(params, updates), state
      >>> x = jax.device_put(jnp.ones((jax.device_count(), 4)), jax.NamedSharding(mesh, P('data')))
      >>> params, state = step(params, state, x)
      >>> params['w']
      Array([0.98999, 0.98999, 0.98999, 0.98999], dtype=float32)

    References:
      Liu et al., `Communication Efficient Distributed Training with
      Distributed Lion <https://arxiv.org/abs/2404.00438>`_, 2024.
    """
    validation.check_nonnegative('learning_rate', learning_rate)
    validation.check_choice('method', method, METHODS)
    resolved = kappa_lib.resolve_kappa(kappa)
    if not kappa_lib.is_sign(resolved):
        raise ValueError(
            f'distributed_lion: kappa={kappa!r} ({resolved.name}) is not a sign. '
            "Distributed Lion sends each worker's direction as signs, so only "
            "kappa='sign' (or 'hard') keeps the algorithm; for another kappa, "
            'all-reduce the gradients and use lion_optax.lion.'
        )
    validation.check_choice('nonfinite', nonfinite, NONFINITE_MODES)
    transformation = optax.chain(
        _check_local_gradients(axis_name),
        scale_by_lion(
            b1=b1,
            b2=b2,
            mu_dtype=mu_dtype,
            kappa='sign',
            nonfinite='propagate' if nonfinite == 'propagate' else 'zero',
        ),
        aggregate_signs(axis_name, method=method),
        weight_decay_for_learning_rate(
            weight_decay,
            learning_rate,
            convention=weight_decay_convention,
            reference_learning_rate=reference_learning_rate,
            mask=mask,
        ),
        optax.scale_by_learning_rate(learning_rate),
    )
    if nonfinite == 'skip_step':
        return _skip_step_on_any_worker(transformation, axis_name)
    return optax.with_extra_args_support(transformation)


# ---------------------------------------------------------------------------
# Per-worker state.


def worker_state_specs(state: Any, axis_name: str = 'data') -> Any:
    """The ``shard_map`` specs of a per-worker optimizer state.

    Every array with at least one dimension (each worker's momentum) is
    ``P(axis_name)``: ``shard_map`` stacks the workers' copies along the first
    dimension, so the global array is ``N`` times longer there and each
    device holds only its own worker's momentum. Scalars (step counts, the
    same on every worker) are ``P()``.

    Args:
      state: the state, or its shapes (``jax.eval_shape(tx.init, params)``).
      axis_name: the data axis.

    Returns:
      A pytree of ``PartitionSpec`` with ``state``'s structure.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> import lion_optax
      >>> tx = lion_optax.scale_by_lion()
      >>> lion_optax.worker_state_specs(jax.eval_shape(tx.init, {'w': jnp.ones(3)}))
      ScaleByLionState(count=P(), mu={'w': P('data',)})
    """
    return jax.tree.map(lambda leaf: P(axis_name) if jnp.ndim(leaf) else P(), state)


def distributed_init(
    tx: optax.GradientTransformation,
    params: optax.Params,
    mesh: jax.sharding.Mesh,
    axis_name: str = 'data',
) -> tuple[Any, Any]:
    """Creates a per-worker optimizer state for use inside ``shard_map``.

    Runs ``tx.init`` on every worker (inside ``shard_map`` over ``mesh``, the
    parameters replicated) and returns the state with the specs to pass to
    ``shard_map`` for it (:func:`worker_state_specs`).

    Args:
      tx: the optimizer, e.g. :func:`distributed_lion`.
      params: the (replicated) parameters; every leaf needs at least one
        dimension, since each worker's momentum is stacked along the first.
      mesh: the device mesh.
      axis_name: the data axis of ``mesh``.

    Returns:
      ``(state, state_specs)``.

    Example:
      >>> import jax, jax.numpy as jnp, lion_optax
      >>> mesh = jax.make_mesh((jax.device_count(),), ('data',))
      >>> tx = lion_optax.distributed_lion(1e-3, axis_name='data')
      >>> state, specs = lion_optax.distributed_init(tx, {'w': jnp.ones(4)}, mesh)
      >>> jax.tree.leaves(state)[1].shape  # one momentum per worker, stacked
      (4,)
    """
    if axis_name not in mesh.axis_names:
        raise ValueError(f'axis_name={axis_name!r} is not an axis of the mesh {mesh.axis_names}.')
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        if jnp.ndim(leaf) == 0:
            raise ValueError(
                f'distributed_init: parameter {jax.tree_util.keystr(path)} is a scalar. '
                "Each worker's momentum is stacked along the first dimension, which "
                'a scalar does not have: store it with shape (1,).'
            )
    specs = worker_state_specs(jax.eval_shape(tx.init, params), axis_name)
    param_specs = jax.tree.map(lambda _: P(), params)
    init = jax.jit(jax.shard_map(tx.init, mesh=mesh, in_specs=(param_specs,), out_specs=specs))
    return init(params), specs
