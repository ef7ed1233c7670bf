"""Distributed Lion: per-worker momentum, signs on the wire (the alias and its state).

:func:`distributed_lion` chains :func:`scale_by_lion` (per worker),
:func:`aggregate_signs` (the vote or average, see
:mod:`lion_optax._src.sign_aggregation`), decoupled weight decay and the
learning rate; :func:`distributed_init` creates its per-worker state and the
``PartitionSpec`` tree that describes it for ``jax.shard_map``.
"""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec as P

from lion_optax._src import guard, options, validation
from lion_optax._src import kappa as kappa_lib
from lion_optax._src.alias import decay_and_learning_rate
from lion_optax._src.direction import scale_by_lion
from lion_optax._src.options import NONFINITE_MODES, Nonfinite
from lion_optax._src.sharding import is_manual, is_varying
from lion_optax._src.sign_aggregation import METHODS, Method, aggregate_signs
from lion_optax._src.weight_decay import WeightDecayConvention

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
        if is_manual(axis_name) and not is_varying(local, axis_name):
            local = jax.lax.pcast(local, axis_name, to='varying')
        return jax.lax.pmin(local, axis_name) > 0

    # The direction is the chain's second stage (after the local-gradient check).
    return guard.guard_step(
        inner,
        checks=[],
        step_count=lambda state: state[1].count,
        skip_nonfinite_steps=True,
        combine_across_workers=agree,
    )


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
        if is_manual(axis_name):
            for path, leaf in jax.tree_util.tree_leaves_with_path(updates):
                if not is_varying(leaf, axis_name):
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
    method: Method = 'vote',
    kappa: kappa_lib.KappaLike = 'sign',
    weight_decay_convention: WeightDecayConvention = 'paper',
    nonfinite: Nonfinite = 'zero',
    reference_learning_rate: float | None = None,
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
      weight_decay_convention: ``'paper'``, ``'fully_decoupled'`` or
        ``FullyDecoupled(reference_learning_rate)`` (see :func:`lion`).
      nonfinite: ``'zero'``, ``'skip_step'`` (on every worker) or
        ``'propagate'``: what a NaN or Inf gradient does (see :func:`lion`).
      reference_learning_rate: deprecated: write
        ``weight_decay_convention=FullyDecoupled(reference_learning_rate=...)``.

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
    options.deprecated(
        'reference_learning_rate',
        reference_learning_rate,
        'weight_decay_convention=FullyDecoupled(reference_learning_rate=...)',
    )
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
        *decay_and_learning_rate(
            weight_decay,
            learning_rate,
            convention=weight_decay_convention,
            reference_learning_rate=reference_learning_rate,
            mask=mask,
        ),
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
      >>> from lion_optax._src.distributed import worker_state_specs
      >>> tx = lion_optax.scale_by_lion()
      >>> worker_state_specs(jax.eval_shape(tx.init, {'w': jnp.ones(3)}))
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
    ``shard_map`` for it.

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
