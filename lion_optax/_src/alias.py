"""``lion``: the Lion optimizer as one chain, a drop-in for ``optax.lion``."""

from collections.abc import Callable
from typing import Any

import optax

from lion_optax._src import guard, options, sharding, validation
from lion_optax._src import kappa as kappa_lib
from lion_optax._src import param_rounding as param_rounding_lib
from lion_optax._src import rounding as rounding_lib
from lion_optax._src import weight_decay as weight_decay_lib
from lion_optax._src.direction import scale_by_lion
from lion_optax._src.options import Cautious, Diagnostics, InvalidHyperparameters, Nonfinite
from lion_optax._src.rounding import Rounding
from lion_optax._src.weight_decay import FullyDecoupled, WeightDecayConvention


def lion(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.99,
    mu_dtype: Any = None,
    weight_decay: optax.ScalarOrSchedule = 1e-3,
    mask: Any | Callable[[optax.Params], Any] | None = None,
    *,
    kappa: kappa_lib.KappaLike = 'sign',
    cautious: bool | Cautious = False,
    weight_decay_convention: WeightDecayConvention = 'paper',
    nonfinite: Nonfinite = 'zero',
    invalid_hyperparameters: InvalidHyperparameters = 'skip_step',
    diagnostics: bool | Diagnostics = False,
    rounding: Rounding = Rounding(),
    cautious_eps: float | None = None,
    reference_learning_rate: float | None = None,
    max_consecutive_bad_steps: int | None = None,
    mu_rounding: rounding_lib.RoundingMode | None = None,
    param_rounding: rounding_lib.RoundingMode | None = None,
    seed: int | None = None,
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
    same (bit for bit on TPU and GPU); an ``optax.lion`` state (a checkpoint)
    continues here and back. On every accelerator compiler the step of a
    float32 parameter is one kernel moving optax's 20 bytes per parameter.

    Non-finite gradients (``nonfinite``), what a NaN or Inf does to a step:

    - ``'zero'`` (default): each non-finite gradient *element* counts as 0:
      that coordinate's momentum decays by :math:`\beta_2` and it moves by
      :math:`\eta_t(\kappa(\beta_1 m) + \lambda\theta)`; all other
      coordinates step normally. Nothing non-finite reaches the parameters or
      the momentum. Free: no extra memory traffic, no state, no communication.
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
    at no cost in memory traffic, and the first such step warns
    (``RuntimeWarning``, from a host callback that a good step never runs);
    the step counts advance, so a schedule that is invalid at one step does
    not stall the run. ``invalid_hyperparameters='raise'`` raises
    ``FloatingPointError`` (inside a ``JaxRuntimeError``) naming the value
    and the step instead.

    Nothing is silent: ``diagnostics=True`` (opt-in, it reads the gradient
    once more) appends counters to the state, which becomes a
    :class:`LionDiagnosticsState`: ``optax.lion``'s three states
    (``state[0].mu`` is still the momentum), then the steps with a
    non-finite gradient element, the steps with an invalid hyperparameter
    and the current run of such steps.
    ``diagnostics=Diagnostics(max_consecutive_bad_steps=k)`` makes a run
    longer than ``k`` raise ``FloatingPointError``, so a run that stalls stops.

    Lion's learning rate is 3-10x smaller than AdamW's and its weight decay
    3-10x larger (:func:`adamw_to_lion`); ``b1=0.95, b2=0.98`` is the paper's
    choice for language models and against instability.

    Args:
      learning_rate: :math:`\eta_t`, a float >= 0 or a schedule.
      b1: interpolation rate for the update, in [0, 1].
      b2: momentum decay rate, in [0, 1].
      mu_dtype: storage of the momentum: a float dtype (``jnp.bfloat16``: 2
        bytes per parameter), ``'int8'`` or :class:`Int8Momentum` (block-wise
        quantised, about 1 byte), or None to follow the parameters (see
        :func:`scale_by_lion`).
      weight_decay: :math:`\lambda_t`, a float >= 0 or a schedule.
      mask: which leaves get weight decay: a pytree of booleans (or a prefix)
        or a callable returning one from the params.
      kappa: the function replacing ``sign`` (see :func:`scale_by_lion`).
      cautious: Cautious Lion: True, or :class:`Cautious` to set its epsilon.
      weight_decay_convention: ``'paper'`` (decay times :math:`\eta_t`, as in
        the paper and optax), ``'fully_decoupled'`` (decay times
        :math:`\eta_t/\eta_{\mathrm{ref}}`, as lion-pytorch's
        ``decoupled_weight_decay``, with :math:`\eta_{\mathrm{ref}}` the
        constant learning rate) or ``FullyDecoupled(reference_learning_rate)``
        (required with a schedule); see :func:`add_decoupled_weight_decay`.
      nonfinite: ``'zero'``, ``'skip_step'`` or ``'propagate'``: what a NaN or
        Inf gradient does (above).
      invalid_hyperparameters: ``'skip_step'`` (default: skip, and warn the
        first time) or ``'raise'``: what a step does with an invalid schedule
        or injected value (above).
      diagnostics: False, True or a :class:`Diagnostics`: counts of bad steps
        appended to the state (above).
      rounding: a :class:`Rounding`: stochastic (default) or nearest rounding
        of a momentum stored in bfloat16, float16 or int8 (``momentum``) and
        of bfloat16/float16 parameters (``params``; with ``'nearest'``, as
        ``optax.apply_updates`` alone, a bf16 weight of 1.0 never moves with
        ``learning_rate=1e-4``), and the ``seed`` of both.
      cautious_eps: deprecated: write ``cautious=Cautious(eps=...)``.
      reference_learning_rate: deprecated: write
        ``weight_decay_convention=FullyDecoupled(reference_learning_rate=...)``.
      max_consecutive_bad_steps: deprecated: write
        ``diagnostics=Diagnostics(max_consecutive_bad_steps=...)``.
      mu_rounding: deprecated: write ``rounding=Rounding(momentum=...)``.
      param_rounding: deprecated: write ``rounding=Rounding(params=...)``.
      seed: deprecated: write ``rounding=Rounding(seed=...)``.

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
    validation.check_choice('nonfinite', nonfinite, options.NONFINITE_MODES)
    validation.check_choice(
        'invalid_hyperparameters', invalid_hyperparameters, options.INVALID_HYPERPARAMETER_MODES
    )
    rounding = rounding_lib.with_deprecated(
        rounding, momentum=mu_rounding, params=param_rounding, seed=seed
    )
    cautious_spec = options.resolve_cautious(
        cautious, options.deprecated('cautious_eps', cautious_eps, 'cautious=Cautious(eps=...)')
    )
    diagnostics_spec = options.resolve_diagnostics(
        diagnostics,
        options.deprecated(
            'max_consecutive_bad_steps',
            max_consecutive_bad_steps,
            'diagnostics=Diagnostics(max_consecutive_bad_steps=...)',
        ),
    )
    options.deprecated(
        'reference_learning_rate',
        reference_learning_rate,
        'weight_decay_convention=FullyDecoupled(reference_learning_rate=...)',
    )
    chain = optax.chain(
        scale_by_lion(
            b1,
            b2,
            mu_dtype,
            kappa=kappa,
            cautious=cautious_spec or False,
            nonfinite='propagate' if nonfinite == 'propagate' else 'zero',
            rounding=rounding,
        ),
        *decay_and_learning_rate(
            weight_decay,
            learning_rate,
            convention=weight_decay_convention,
            reference_learning_rate=reference_learning_rate,
            mask=mask,
        ),
    )
    if rounding.params == 'stochastic':
        # bf16/fp16 parameters: seeded by the direction's step count, no state added.
        chain = param_rounding_lib.with_param_rounding(
            chain, seed=rounding.seed, step_count=lambda state: state[0].count
        )
    checks = guard.runtime_checks(
        {'b1': b1, 'b2': b2},
        {'learning_rate': learning_rate, 'weight_decay': weight_decay},
    )
    transformation: optax.GradientTransformationExtraArgs = optax.with_extra_args_support(chain)
    if checks or nonfinite == 'skip_step' or diagnostics_spec is not None:
        transformation = guard.guard_step(
            chain,
            checks=checks,
            step_count=lambda state: state[0].count,
            skip_nonfinite_steps=nonfinite == 'skip_step',
            invalid_hyperparameters=invalid_hyperparameters,
            diagnostics=diagnostics_spec,
        )
    return optax.GradientTransformationExtraArgs(
        lambda params: sharding.place_like_params(transformation.init(params), params),
        transformation.update,
    )


def decay_and_learning_rate(
    weight_decay: optax.ScalarOrSchedule,
    learning_rate: optax.ScalarOrSchedule,
    *,
    convention: Any,
    reference_learning_rate: float | None,
    mask: Any | Callable[[optax.Params], Any] | None,
) -> tuple[optax.GradientTransformation, optax.GradientTransformation]:
    """The two stages after the direction in :func:`lion` and :func:`distributed_lion`.

    ``(add_decoupled_weight_decay(...), optax.scale_by_learning_rate(lr))``, to
    be spliced into a flat ``optax.chain`` (so the state is optax.lion's). The
    convention is a name or a :class:`FullyDecoupled` (``reference_learning_rate``:
    lion_optax 0.2's keyword, already warned about by the caller); for
    ``'fully_decoupled'`` the reference learning rate defaults to a constant
    ``learning_rate``, and with a schedule it must be given.
    """
    name, reference = weight_decay_lib.resolve_convention(convention, reference_learning_rate)
    if name == 'fully_decoupled' and reference is None:
        if callable(learning_rate):
            raise ValueError(
                "weight_decay_convention='fully_decoupled' with a learning-rate "
                'schedule needs the reference learning rate (the lr_ref in '
                "lr_t / lr_ref, usually the schedule's peak): pass "
                'weight_decay_convention=FullyDecoupled(reference_learning_rate=lr_ref).'
            )
        reference = learning_rate
    decay = weight_decay_lib.add_decoupled_weight_decay(
        weight_decay,
        weight_decay_convention=FullyDecoupled(reference) if name == 'fully_decoupled' else 'paper',
        mask=mask,
    )
    return decay, optax.scale_by_learning_rate(learning_rate)
