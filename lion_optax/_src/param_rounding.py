r"""Updates that land on bfloat16/float16 parameters, by stochastic rounding.

``optax.apply_updates`` rounds ``p + u`` to the parameter's dtype to nearest, so
an update smaller than half an ulp of ``p`` is lost (a bf16 weight of 1.0 with
``lr=1e-4`` never moves). Placed last, the rounding here returns, for each
low-precision parameter,

.. math::

  u' = \mathrm{SR}(p + u) - p, \qquad\text{so that}\qquad
  \texttt{apply\_updates}(p, u') = \mathrm{SR}(p + u),
  \quad \mathbb{E}[p_{t+1}] = p_t + u_t.

Two forms: :func:`round_updates_to_params`, a transformation with its own step
counter for any optax chain, and :func:`with_param_rounding`, which adds no
state and takes its step count from the state it wraps (what :func:`lion` uses,
so that its state stays ``optax.lion``'s).
"""

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from lion_optax._src import rounding as rounding_lib
from lion_optax._src import sharding, validation


def round_update_to_param(u: Any, p: Any, word: jax.Array) -> Any:
    """``SR(p + u) - p`` for a bfloat16/float16 ``p`` (``u`` unchanged for wider ``p``).

    ``u'`` is exact in the update's dtype whenever the step changes ``p`` by
    less than a factor of 2 (Sterbenz), so ``apply_updates`` reproduces
    :math:`\\mathrm{SR}(p + u)` exactly. The random bits are salted with the
    parameter's own bits (see :mod:`lion_optax._src.rounding`).
    """
    p_dtype = jnp.result_type(p)
    if u is None or not rounding_lib.is_narrower_float(p_dtype):
        return u
    p32 = jnp.asarray(p).astype(jnp.float32)
    bits = rounding_lib.random_bits(word, p32.shape, salt=p)
    target = rounding_lib.stochastic_round(p32 + u.astype(jnp.float32), p_dtype, bits)
    return (target.astype(jnp.float32) - p32).astype(u.dtype)


def _round_tree(updates: Any, params: Any, word: jax.Array, who: str) -> Any:
    if params is None:
        raise ValueError(
            f'{who} needs the parameters to round p + u: call update(grads, state, params).'
        )
    return jax.tree.map(
        lambda u, p: round_update_to_param(u, p, word),
        updates,
        params,
        is_leaf=lambda x: x is None,
    )


def _has_narrow_floats(params: Any) -> bool:
    return any(rounding_lib.is_narrower_float(jnp.result_type(p)) for p in jax.tree.leaves(params))


class RoundUpdatesToParamsState(NamedTuple):
    """State of :func:`round_updates_to_params`.

    Attributes:
      rounding_step: steps taken so far (int32 scalar); it seeds each step's
        rounding. (Not called ``count``, so that ``optax.tree.get(state,
        'count')`` still finds the one schedule count of a chain.)
    """

    rounding_step: jax.Array


def round_updates_to_params(
    rounding: rounding_lib.RoundingMode = 'stochastic', *, seed: int | jax.Array = 0
) -> optax.GradientTransformation:
    r"""Makes updates to bfloat16/float16 parameters land, by stochastic rounding.

    Placed last in a chain (after the learning rate), it returns for each
    low-precision parameter

    .. math::

      u' = \mathrm{SR}(p + u) - p, \qquad
      \texttt{apply\_updates}(p, u') = \mathrm{SR}(p + u),
      \quad \mathbb{E}[p_{t+1}] = p_t + u_t,

    with ``p + u`` computed in float32. float32 and wider parameters pass
    through untouched (no cost). The rounding is a pure function of ``seed``,
    the step count and the data. :func:`lion` does this by default without
    this transformation's state.

    Args:
      rounding: ``'stochastic'``, or ``'nearest'`` to pass updates through.
      seed: an integer seeding the rounding.

    Returns:
      An ``optax.GradientTransformation``; ``update`` needs ``params``.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> from lion_optax import round_updates_to_params
      >>> params = jnp.ones(4096, jnp.bfloat16)
      >>> tx = round_updates_to_params(seed=0)
      >>> state = tx.init(params)
      >>> for _ in range(50):
      ...   updates, state = tx.update(jnp.full(4096, -1e-4, jnp.bfloat16), state, params)
      ...   params = optax.apply_updates(params, updates)
      >>> round(float(1.0 - params.astype(jnp.float32).mean()), 3)  # 50 * 1e-4
      0.005
    """
    validation.check_choice('rounding', rounding, rounding_lib.ROUNDING_MODES)
    seed = rounding_lib.check_seed(seed)

    def init_fn(params: optax.Params) -> RoundUpdatesToParamsState:
        state = RoundUpdatesToParamsState(rounding_step=jnp.zeros([], jnp.int32))
        return sharding.place_like_params(state, params)

    def update_fn(
        updates: optax.Updates,
        state: RoundUpdatesToParamsState,
        params: optax.Params | None = None,
    ) -> tuple[optax.Updates, RoundUpdatesToParamsState]:
        new_state = RoundUpdatesToParamsState(optax.safe_increment(state.rounding_step))
        if rounding == 'nearest':
            return updates, new_state
        word = rounding_lib.step_word(seed, rounding_lib.PARAM_STREAM, state.rounding_step)
        return _round_tree(updates, params, word, 'round_updates_to_params'), new_state

    return optax.GradientTransformation(init_fn, update_fn)


def with_param_rounding(
    inner: optax.GradientTransformation,
    *,
    seed: int | jax.Array,
    step_count: Callable[[Any], jax.Array],
) -> optax.GradientTransformationExtraArgs:
    """``inner``, then the rounding of :func:`round_updates_to_params`, with no state added.

    The random bits are seeded by ``step_count(state)``, a step count already
    in ``inner``'s state (e.g. ``lambda state: state[0].count`` for
    :func:`lion`'s chain), so the state is ``inner``'s own. Trees without
    bfloat16/float16 parameters are passed through at no cost.

    Args:
      inner: the optimizer, whose updates are final (learning rate applied).
      seed: an integer seeding the rounding.
      step_count: reads the step count from ``inner``'s state.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with ``inner``'s state.
    """
    seed = rounding_lib.check_seed(seed)
    inner = optax.with_extra_args_support(inner)

    def update_fn(
        updates: optax.Updates, state: Any, params: optax.Params | None = None, **extra: Any
    ) -> tuple[optax.Updates, Any]:
        new_updates, new_state = inner.update(updates, state, params, **extra)
        if params is None or not _has_narrow_floats(params):
            return new_updates, new_state
        word = rounding_lib.step_word(seed, rounding_lib.PARAM_STREAM, step_count(state))
        return _round_tree(new_updates, params, word, 'lion'), new_state

    return optax.GradientTransformationExtraArgs(inner.init, update_fn)
