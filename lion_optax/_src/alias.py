"""``lion``: the Lion optimizer as one chain, a drop-in for ``optax.lion``."""

from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax

from lion_optax._src import kappa as kappa_lib
from lion_optax._src import nonfinite as nonfinite_lib
from lion_optax._src import param_rounding as param_rounding_lib
from lion_optax._src import sharding, validation
from lion_optax._src.direction import Rounding, scale_by_lion
from lion_optax._src.weight_decay import WeightDecayConvention, decay_and_learning_rate

Nonfinite = Literal['zero', 'skip_step', 'propagate']
NONFINITE_MODES = ('zero', 'skip_step', 'propagate')
InvalidHyperparameters = Literal['skip_step', 'raise']
INVALID_HYPERPARAMETER_MODES = ('skip_step', 'raise')


def lion(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.99,
    mu_dtype: Any = None,
    weight_decay: optax.ScalarOrSchedule = 1e-3,
    mask: Any | Callable[[optax.Params], Any] | None = None,
    *,
    kappa: str | kappa_lib.Kappa | Callable[..., Any] = 'sign',
    cautious: bool = False,
    cautious_eps: float = 1e-3,
    weight_decay_convention: WeightDecayConvention = 'paper',
    reference_learning_rate: float | None = None,
    nonfinite: Nonfinite = 'zero',
    invalid_hyperparameters: InvalidHyperparameters = 'skip_step',
    diagnostics: bool = False,
    max_consecutive_bad_steps: int | None = None,
    mu_rounding: Rounding = 'stochastic',
    param_rounding: Rounding = 'stochastic',
    seed: int = 0,
) -> optax.GradientTransformationExtraArgs:
    r"""The Lion optimizer (EvoLved Sign Momentum), a drop-in for ``optax.lion``.

    .. math::

      c_t &= \beta_1 m_{t-1} + (1 - \beta_1) g_t \\
      \theta_t &= \theta_{t-1} - \eta_t\,\bigl(\mathrm{sign}(c_t)
        + \lambda_t \theta_{t-1}\bigr) \\
      m_t &= \beta_2 m_{t-1} + (1 - \beta_2) g_t

    It chains, top to bottom: :func:`scale_by_lion` (the direction),
    :func:`add_decoupled_weight_decay` (the decay, masked) and
    ``optax.scale_by_learning_rate`` (the step); for bfloat16/float16
    parameters it then rounds the new parameters stochastically (see
    :func:`round_updates_to_params`), so that steps smaller than half an ulp
    still land. A drop-in for ``optax.lion``: with the same arguments the
    state is the same tree (``(ScaleByLionState, EmptyState, EmptyState)``
    for constants) and, for finite float32 gradients, the numbers are the
    same; an ``optax.lion`` state (a checkpoint) continues here and back.

    Non-finite gradients (``nonfinite``), what a NaN or Inf does to a step:

    - ``'zero'`` (default): each non-finite gradient *element* counts as 0:
      that coordinate's momentum decays by :math:`\beta_2` and it moves by
      :math:`\eta_t(\kappa(\beta_1 m) + \lambda\theta)`; all other
      coordinates step normally. Nothing non-finite reaches the parameters or
      the momentum. Free: no extra read, no state, no communication.
    - ``'skip_step'``: if any element anywhere is non-finite the whole step
      is skipped (no update, weight decay included; momentum and schedule
      counts unchanged). Reads the gradient once more and, under sharding,
      all-reduces one scalar. Wrap the optimizer in :func:`skip_nonfinite`
      instead to also count the skipped steps.
    - ``'propagate'``: as ``optax.lion``: NaN and Inf flow into the momentum
      and the parameters (to see a bug at once).

    Hyperparameters are checked when the optimizer is built (constants:
    ``b1``, ``b2`` in [0, 1]; ``learning_rate``, ``weight_decay`` finite and
    >= 0) and, for values only known when the step runs (schedules, and
    values set through ``optax.inject_hyperparams``), inside the step: a step
    with an invalid value leaves the parameters and the momentum unchanged,
    at no cost in memory traffic; the step counts advance, so a schedule that
    is invalid at one step does not stall the run.
    ``invalid_hyperparameters='raise'`` also raises ``FloatingPointError``
    (inside a ``JaxRuntimeError``) naming the value and the step, through
    ``jax.debug.callback``: a debug mode.

    Nothing is silent: ``diagnostics=True`` (opt-in, it reads the gradient
    once more) wraps the state in :class:`LionDiagnosticsState`, which counts
    the steps with a non-finite gradient element and with an invalid
    hyperparameter and the current run of such steps;
    ``max_consecutive_bad_steps=k`` makes a run longer than ``k`` raise
    ``FloatingPointError`` (through ``jax.debug.callback``), so a run that
    stalls stops instead.

    Lion's learning rate is 3-10x smaller than AdamW's and its weight decay
    3-10x larger (:func:`adamw_to_lion`); ``b1=0.95, b2=0.98`` is the paper's
    choice for language models and against instability.

    Args:
      learning_rate: :math:`\eta_t`, a float >= 0 or a schedule.
      b1: interpolation rate for the update, in [0, 1].
      b2: momentum decay rate, in [0, 1].
      mu_dtype: storage of the momentum: a float dtype (``jnp.bfloat16``: 2
        bytes per parameter), ``'int8'`` or :class:`Int8Momentum` (block-wise
        quantised, about 1 byte), or None to follow the parameters (see :func:`scale_by_lion`).
      weight_decay: :math:`\lambda_t`, a float >= 0 or a schedule.
      mask: which leaves get weight decay: a pytree of booleans (or a prefix)
        or a callable returning one from the params.
      kappa: the function replacing ``sign`` (see :func:`scale_by_lion`).
      cautious: Cautious Lion: keep only coordinates where the direction
        agrees with the gradient.
      cautious_eps: the epsilon of the cautious normaliser
        ``mean(phi) + eps`` (see :func:`scale_by_lion`).
      weight_decay_convention: ``'paper'`` (decay times :math:`\eta_t`, as in
        the paper and optax) or ``'fully_decoupled'`` (decay times
        :math:`\eta_t/\eta_{\mathrm{ref}}`, as lion-pytorch's
        ``decoupled_weight_decay``); see :func:`add_decoupled_weight_decay`.
      reference_learning_rate: :math:`\eta_{\mathrm{ref}}` for
        ``'fully_decoupled'``; defaults to ``learning_rate`` when that is a
        constant, and is required with a schedule.
      nonfinite: ``'zero'``, ``'skip_step'`` or ``'propagate'``: what a NaN or
        Inf gradient does (above).
      invalid_hyperparameters: ``'skip_step'`` (default) or ``'raise'``: what
        a step does with an invalid schedule or injected value (above).
      diagnostics: keep counts of bad steps in the state (above).
      max_consecutive_bad_steps: with ``diagnostics``, raise after more than
        this many bad steps in a row (None: never).
      mu_rounding: ``'stochastic'`` (default) or ``'nearest'``: rounding of a
        momentum stored in bfloat16, float16 or int8.
      param_rounding: ``'stochastic'`` (default) or ``'nearest'``: how the new
        value of a bfloat16/float16 parameter is rounded. With ``'nearest'``
        (``optax.apply_updates`` alone) a bf16 weight of 1.0 never moves with
        ``learning_rate=1e-4``. float32 parameters are not affected.
      seed: an integer seeding both stochastic roundings (reproducible runs).

    Returns:
      An ``optax.GradientTransformationExtraArgs``.

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> import lion_optax
      >>> params = {'w': jnp.ones(3)}
      >>> opt = optax.chain(optax.clip_by_global_norm(1.0), lion_optax.lion(1e-2))
      >>> state = opt.init(params)
      >>> grads = jax.grad(lambda p: jnp.sum(p['w'] ** 2))(params)
      >>> updates, state = opt.update(grads, state, params)
      >>> optax.apply_updates(params, updates)['w']
      Array([0.98999, 0.98999, 0.98999], dtype=float32)

    References:
      Chen et al., `Symbolic Discovery of Optimization Algorithms
      <https://arxiv.org/abs/2302.06675>`_, 2023.
    """
    validation.check_nonnegative('learning_rate', learning_rate)
    validation.check_choice('nonfinite', nonfinite, NONFINITE_MODES)
    validation.check_choice(
        'invalid_hyperparameters', invalid_hyperparameters, INVALID_HYPERPARAMETER_MODES
    )
    validation.check_choice('param_rounding', param_rounding, param_rounding_lib.ROUNDING_MODES)
    transformation = optax.chain(
        scale_by_lion(
            b1,
            b2,
            mu_dtype,
            kappa=kappa,
            cautious=cautious,
            cautious_eps=cautious_eps,
            nonfinite='propagate' if nonfinite == 'propagate' else 'zero',
            mu_rounding=mu_rounding,
            seed=seed,
        ),
        *decay_and_learning_rate(
            weight_decay,
            learning_rate,
            convention=weight_decay_convention,
            reference_learning_rate=reference_learning_rate,
            mask=mask,
        ),
    )
    checks = validation.runtime_checks(
        {'b1': b1, 'b2': b2},
        {'learning_rate': learning_rate, 'weight_decay': weight_decay},
    )
    if checks:
        transformation = _skip_invalid_hyperparameters(
            transformation, checks, raise_too=invalid_hyperparameters == 'raise'
        )
    validation.check_bool('diagnostics', diagnostics)
    if max_consecutive_bad_steps is not None:
        if not diagnostics:
            raise ValueError(
                'max_consecutive_bad_steps counts bad steps in the diagnostics state: pass '
                'diagnostics=True as well.'
            )
        if (
            isinstance(max_consecutive_bad_steps, bool)
            or not isinstance(max_consecutive_bad_steps, int)
            or max_consecutive_bad_steps < 1
        ):
            raise ValueError(
                f'max_consecutive_bad_steps={max_consecutive_bad_steps!r} is invalid: expected '
                'an int >= 1 (or None).'
            )
    if param_rounding == 'stochastic':
        # bf16/fp16 parameters: seeded by the direction's step count, no state added.
        transformation = param_rounding_lib.with_param_rounding(
            transformation, seed=seed, step_count=lambda state: state[0].count
        )
    if nonfinite == 'skip_step':
        transformation = nonfinite_lib.skip_step_if_nonfinite(transformation)
    if diagnostics:
        transformation = _with_diagnostics(transformation, checks, max_consecutive_bad_steps)
    transformation = optax.with_extra_args_support(transformation)
    return optax.GradientTransformationExtraArgs(
        lambda params: sharding.place_like_params(transformation.init(params), params),
        transformation.update,
    )


def _skip_invalid_hyperparameters(
    chain: optax.GradientTransformationExtraArgs,
    checks: list[validation.RuntimeCheck],
    *,
    raise_too: bool,
) -> optax.GradientTransformationExtraArgs:
    """lion's chain, skipping any step whose run-time hyperparameters are invalid.

    The direction (``scale_by_lion``, the chain's first stage) keeps its
    momentum and count itself (``step_is_valid``), inside the loops it runs
    anyway; the other stages' step counts and the updates are selected here
    (scalars, and a select fused into the parameters' update).
    """

    def update_fn(updates, state, params=None, **extra_args):
        valid, values = validation.runtime_values_valid(checks, state[0].count)
        assert valid is not None  # lion() wraps its chain only when there are checks
        if raise_too:
            jax.debug.callback(
                validation.raise_if_invalid,
                valid,
                state[0].count,
                tuple(name for name, _ in values),
                *(value for _, value in values),
            )
        new_updates, new_state = chain.update(
            updates, state, params, step_is_valid=valid, **extra_args
        )
        return jax.tree.map(lambda u: jnp.where(valid, u, 0), new_updates), new_state

    return optax.GradientTransformationExtraArgs(chain.init, update_fn)


class LionDiagnosticsState(NamedTuple):
    """State of :func:`lion` with ``diagnostics=True``.

    Attributes:
      inner_state: the optimizer's state (``optax.lion``'s tree without
        diagnostics).
      nonfinite_gradient_steps: steps whose gradient had a NaN or Inf element.
      invalid_hyperparameter_steps: steps skipped for an invalid run-time
        hyperparameter (a schedule's or an injected value).
      consecutive_bad_steps: the current run of such steps (0 after a good one).
    """

    inner_state: Any
    nonfinite_gradient_steps: jax.Array
    invalid_hyperparameter_steps: jax.Array
    consecutive_bad_steps: jax.Array


def _too_many_bad_steps(too_many: Any, run: Any, limit: int) -> None:
    if bool(too_many):
        raise FloatingPointError(
            f'{int(run)} bad steps in a row (non-finite gradients or invalid '
            f'hyperparameters), more than max_consecutive_bad_steps={limit}: the run is '
            'not learning. Look at the state\'s nonfinite_gradient_steps and '
            'invalid_hyperparameter_steps, the loss and the learning-rate schedule.'
        )


def _with_diagnostics(
    inner: optax.GradientTransformation,
    checks: list[validation.RuntimeCheck],
    max_consecutive: int | None,
) -> optax.GradientTransformationExtraArgs:
    """Counts bad steps (non-finite gradients, invalid hyperparameters) around lion."""
    inner = optax.with_extra_args_support(inner)

    def init_fn(params):
        # Three arrays, not one thrice: a donated state must not hold a buffer twice.
        counters = [jnp.zeros([], jnp.int32) for _ in range(3)]
        return LionDiagnosticsState(inner.init(params), *counters)

    def update_fn(updates, state, params=None, **extra_args):
        finite = nonfinite_lib.all_finite(updates)
        valid, _ = validation.runtime_values_valid(checks, state.inner_state[0].count)
        valid = jnp.array(True) if valid is None else valid
        new_updates, inner_state = inner.update(updates, state.inner_state, params, **extra_args)
        bad = ~finite | ~valid
        run = jnp.where(bad, optax.safe_increment(state.consecutive_bad_steps), 0)
        if max_consecutive is not None:
            jax.debug.callback(_too_many_bad_steps, run > max_consecutive, run, max_consecutive)
        return new_updates, LionDiagnosticsState(
            inner_state,
            state.nonfinite_gradient_steps + (~finite).astype(jnp.int32),
            state.invalid_hyperparameter_steps + (~valid).astype(jnp.int32),
            run,
        )

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
