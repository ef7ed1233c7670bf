"""Hyperparameters for Lion from an AdamW baseline, and the recommended schedule."""

from typing import NamedTuple

import optax

from lion_optax._src import validation


class LionHyperparameters(NamedTuple):
    """A learning rate and a weight decay for :func:`lion`.

    ``lion(**hyperparameters._asdict())`` builds the optimizer.
    """

    learning_rate: optax.ScalarOrSchedule
    weight_decay: float


def adamw_to_lion(
    learning_rate: optax.ScalarOrSchedule,
    weight_decay: float,
    *,
    factor: float = 3.0,
) -> LionHyperparameters:
    r"""Turns an AdamW configuration into a Lion one by the paper's rule.

    .. math::

      \eta_{\text{Lion}} = \eta_{\text{AdamW}} / k, \qquad
      \lambda_{\text{Lion}} = k\,\lambda_{\text{AdamW}}, \qquad 3 \le k \le 10,

    so the decay strength :math:`\eta\lambda` is unchanged. A schedule keeps
    its shape: initial, peak and final values are all divided by :math:`k`.
    Lion's update (a sign) has a larger norm than AdamW's, hence the smaller
    step. Start at ``factor=3`` and try up to 10 (the paper's ViT-B/16 used
    10: AdamW ``1e-3, 1.0`` became Lion ``1e-4, 10``). Assumes both use the
    same weight-decay convention (``lr * wd``, optax's).

    A starting point, not a guarantee: in this project's main job (each
    optimizer tuned on its own), the tuned AdamW/Lion learning-rate ratio was
    5.6 on a character LM but 32-56 on digits at batch 64, and 1.3-1.8 at
    batch 256-1024; Lion's weight decay was 1.8-10x AdamW's. Tune around it,
    the learning rate first.

    Args:
      learning_rate: AdamW's learning rate, a float > 0 or a schedule.
      weight_decay: AdamW's decoupled weight decay (``optax.adamw``'s), >= 0.
      factor: :math:`k`, in [1, 100]; the paper recommends 3 to 10.

    Returns:
      :class:`LionHyperparameters`.

    Example:
      >>> from lion_optax import adamw_to_lion
      >>> adamw_to_lion(1e-3, 1.0, factor=10)
      LionHyperparameters(learning_rate=0.0001, weight_decay=10.0)
    """
    validation.check_nonnegative('learning_rate', learning_rate)
    validation.check_nonnegative('weight_decay', weight_decay)
    validation.check_positive('factor', factor)
    if not 1.0 <= float(factor) <= 100.0:
        raise ValueError(
            f'factor={factor!r} is outside [1, 100]; the paper divides the '
            'learning rate by 3 to 10. Pass a factor in that range.'
        )
    if callable(learning_rate):
        adamw_schedule = learning_rate

        def lion_schedule(count):
            return adamw_schedule(count) / factor

        new_learning_rate = lion_schedule
    else:
        new_learning_rate = learning_rate / factor
    return LionHyperparameters(new_learning_rate, weight_decay * factor)


def warmup_cosine_schedule(
    peak_learning_rate: float,
    total_steps: int,
    *,
    warmup_fraction: float = 0.05,
    final_fraction: float = 0.1,
) -> optax.Schedule:
    r"""Linear warmup then cosine decay: the schedule that worked best for Lion.

    .. math::

      \eta_t = \begin{cases}
        \eta_{\mathrm{peak}}\, t / T_w & t < T_w \\
        \eta_{\mathrm{end}} + \tfrac12(\eta_{\mathrm{peak}} - \eta_{\mathrm{end}})
          \bigl(1 + \cos(\pi \tfrac{t - T_w}{T - T_w})\bigr) & T_w \le t \le T
      \end{cases}

    with :math:`T_w` = ``warmup_fraction * total_steps`` and
    :math:`\eta_{\mathrm{end}}` = ``final_fraction * peak_learning_rate``.
    A thin wrapper over ``optax.schedules.warmup_cosine_decay_schedule``.

    Args:
      peak_learning_rate: :math:`\eta_{\mathrm{peak}}` > 0.
      total_steps: :math:`T`, the number of steps, > 0.
      warmup_fraction: share of steps for the warmup, in [0, 1).
      final_fraction: final learning rate as a share of the peak, in [0, 1].

    Returns:
      An ``optax.Schedule``.

    Example:
      >>> from lion_optax._src.schedules import warmup_cosine_schedule
      >>> schedule = warmup_cosine_schedule(1e-4, total_steps=1000)
      >>> round(float(schedule(50)), 8), round(float(schedule(1000)), 8)
      (0.0001, 1e-05)
    """
    validation.check_positive('peak_learning_rate', peak_learning_rate)
    if not isinstance(total_steps, int) or total_steps <= 0:
        raise ValueError(f'total_steps must be a positive int, got {total_steps!r}.')
    validation.check_probability('final_fraction', final_fraction)
    validation.check_probability('warmup_fraction', warmup_fraction)
    if warmup_fraction >= 1.0:
        raise ValueError(
            f'warmup_fraction={warmup_fraction!r} leaves no steps for the decay; '
            'pass a value below 1 (0.01-0.1 is usual).'
        )
    return optax.schedules.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=peak_learning_rate,
        warmup_steps=int(round(warmup_fraction * total_steps)),
        decay_steps=total_steps,
        end_value=final_fraction * peak_learning_rate,
    )
