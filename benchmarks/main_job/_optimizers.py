"""The contestants: each optimizer is a small typed value, built from typed hyperparameters.

An :class:`Optimizer` names a factory with optax's signature (``learning_rate``, ``b1``,
``b2``, ``weight_decay``, ``mask``) and the ``(b1, b2)`` pairs its tuning tries; a
:class:`Hyperparameters` holds one point of its search space. :meth:`Optimizer.build`
gives every optimizer the same schedule shape and the same weight-decay mask, so the
only differences between contestants are the update rule and the tuned numbers.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import optax

import lion_optax

Betas = tuple[float, float]


def schedule_shape(total_steps: int) -> optax.Schedule:
    """The shared schedule with a peak of 1: linear warmup over 5% of the steps, then
    a cosine decay to 10% of the peak, as the Lion paper recommends for both optimizers.

    Multiply it by a (possibly traced) peak learning rate.
    """
    return optax.schedules.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=1.0,
        warmup_steps=int(round(0.05 * total_steps)),
        decay_steps=total_steps,
        end_value=0.1,
    )


@dataclasses.dataclass(frozen=True)
class Hyperparameters:
    """One point of a search space.

    ``learning_rate`` is the peak of the shared warmup-cosine schedule. Inside a
    compiled step ``learning_rate`` and ``weight_decay`` may be traced scalars (one
    compilation serves a whole grid); ``b1`` and ``b2`` stay Python floats, because
    ``lion_optax.lion`` picks its fast formulation from concrete betas.
    """

    learning_rate: Any
    weight_decay: Any
    b1: float
    b2: float

    @property
    def betas(self) -> Betas:
        return (self.b1, self.b2)


@dataclasses.dataclass(frozen=True, eq=False)  # compared and hashed by identity
class Optimizer:
    """One contestant.

    Attributes:
      label: the name in tables, plots and ``results.json``.
      factory: builds the transformation; called with ``learning_rate``, ``b1``,
        ``b2``, ``weight_decay`` and ``mask`` as keywords (optax's names).
      betas: the ``(b1, b2)`` pairs tried when this optimizer is tuned.
      tuned_as: None when the optimizer is tuned on its own; otherwise the optimizer
        whose tuned hyperparameters it reuses (same update rule, e.g. ``optax.lion``).
    """

    label: str
    factory: Callable[..., optax.GradientTransformation]
    betas: tuple[Betas, ...]
    tuned_as: Optimizer | None = None

    def build(
        self, hyperparameters: Hyperparameters, total_steps: int, mask: Any
    ) -> optax.GradientTransformation:
        """The transformation with the shared schedule shape and weight-decay mask.

        The schedule is :func:`schedule_shape` scaled by the peak learning rate.
        """
        shape = schedule_shape(total_steps)
        peak = hyperparameters.learning_rate
        return self.factory(
            learning_rate=lambda count: peak * shape(count),
            b1=hyperparameters.b1,
            b2=hyperparameters.b2,
            weight_decay=hyperparameters.weight_decay,
            mask=mask,
        )

    def __repr__(self) -> str:
        return f'Optimizer({self.label!r})'


# AdamW's usual b2 and the lower one common for short runs and language models;
# Lion's default and the paper's choice for language models (and against instability).
ADAMW_BETAS: tuple[Betas, ...] = ((0.9, 0.999), (0.9, 0.95))
LION_BETAS: tuple[Betas, ...] = ((0.9, 0.99), (0.95, 0.98))

ADAMW = Optimizer('optax.adamw', optax.adamw, ADAMW_BETAS)
LION = Optimizer('lion_optax.lion', lion_optax.lion, LION_BETAS)
CAUTIOUS_LION = Optimizer(
    'lion_optax.lion(cautious)', functools.partial(lion_optax.lion, cautious=True), LION_BETAS
)
# The same update rule as lion_optax.lion, so they reuse its tuned hyperparameters.
OPTAX_LION = Optimizer('optax.lion', optax.lion, LION_BETAS, tuned_as=LION)
INT8_LION = Optimizer(
    'lion_optax.lion(int8 momentum)',
    functools.partial(lion_optax.lion, mu_dtype='int8'),
    LION_BETAS,
    tuned_as=LION,
)
# Block-wise int8 momentum, when this version of lion_optax has it.
HAS_INT8 = hasattr(lion_optax, 'Int8Momentum')

# Every contestant, AdamW (the baseline of every comparison) first.
OPTIMIZERS: tuple[Optimizer, ...] = (ADAMW, OPTAX_LION, LION, CAUTIOUS_LION) + (
    (INT8_LION,) if HAS_INT8 else ()
)
TUNED: tuple[Optimizer, ...] = tuple(o for o in OPTIMIZERS if o.tuned_as is None)
