r"""How each compiler gets Lion's step: the same numbers, written for the backend.

Lion is memory bound: a float32 step has to read the parameter, the gradient
and the momentum and write the parameter and the momentum, 20 bytes per
parameter, and its speed is how close the compiled program comes to that.
The compilers need the step written differently to get there:

- **TPU and GPU** (XLA with multi-output fusion): optax's own order,
  :math:`c_t = \beta_1 m_{t-1} + (1-\beta_1) g_t` from the *old* momentum.
  XLA fuses the whole parameter's step (weight decay, learning rate and
  ``optax.apply_updates`` included) into one kernel that reads and writes
  each array once: 20 bytes, the ideal. Reading the interpolation back from
  the new momentum (below) costs these compilers a second kernel (28 bytes
  on H100, 40-42 on TPU v5e).
- **XLA:CPU** (no multi-output fusion: every array written is its own loop):
  with optax's order the parameter's loop reads the old momentum after the
  momentum's loop has updated it in place, so XLA copies the momentum every
  step (36 bytes and a temporary the size of the momentum). Reading the
  interpolation back from the stored new momentum,
  :math:`c_t = (\beta_1/\beta_2)\,\tilde m_t + ((\beta_2-\beta_1)/\beta_2)\, g_t`
  (:func:`momentum_first_coefficients`), with an optimisation barrier after
  the store, makes it two loops and no copy (28 bytes).

:func:`per_platform` puts both in the one jitted function with
``jax.lax.platform_dependent``: the lowering platform picks the branch, so the
same ``lion(...)`` is right on every backend and an ahead-of-time compile for a
TPU or GPU gets the accelerator's form. The tests that pin each form are
``tests/test_formulation.py`` (XLA:CPU's loops and copies, and the TPU and GPU
compilers' kernels and bytes, compiled ahead of time).
"""

from collections.abc import Callable
from typing import Any, TypeVar

import jax

from lion_optax._src import validation

T = TypeVar('T')


def momentum_first_coefficients(b1: Any, b2: Any) -> tuple[float, float] | None:
    r"""``(k1, k2)`` with :math:`c_t = k_1 m_t + k_2 g_t`, or None when not applicable.

    :math:`c_t = \beta_1 m_{t-1} + (1-\beta_1) g_t` and
    :math:`m_t = \beta_2 m_{t-1} + (1-\beta_2) g_t` give
    :math:`c_t = (\beta_1/\beta_2)\, m_t + ((\beta_2-\beta_1)/\beta_2)\, g_t`.
    Used (on XLA:CPU) only for concrete ``0 < b2`` and ``b1 <= b2`` (the
    defaults and the paper's settings): then both coefficients are in [0, 1],
    nothing can overflow that the reference does not, and :math:`c_t` is
    within :math:`9u\,(\beta_1|m_{t-1}| + (1-\beta_1)|g_t|)`, :math:`u =
    2^{-24}`, of the reference's float32 value (tests/test_formulation.py),
    so :math:`\mathrm{sign}(c_t)` can differ only where momentum and gradient
    cancel to 7 significant digits.

    Example:
      >>> from lion_optax._src.formulation import momentum_first_coefficients
      >>> [round(k, 4) for k in momentum_first_coefficients(0.9, 0.99)]
      [0.9091, 0.0909]
      >>> momentum_first_coefficients(0.99, 0.9) is None  # b1 > b2
      True
    """
    b1, b2 = validation.concrete_float(b1), validation.concrete_float(b2)
    if b1 is None or b2 is None or not 0.0 < b2 or b1 > b2:
        return None
    return b1 / b2, (b2 - b1) / b2


def interpolation_from_new_momentum(
    m_new: jax.Array, g: jax.Array, coefficients: tuple[float, float]
) -> jax.Array:
    r""":math:`c_t = k_1 m_t + k_2 g_t` (:func:`momentum_first_coefficients`)."""
    k1, k2 = coefficients
    if k1 == 0.0:
        return g
    if k2 == 0.0:
        return k1 * m_new
    return k2 * g + k1 * m_new


def per_platform(
    *args: Any,
    cpu: Callable[..., T],
    accelerator: Callable[..., T],
    tpu: Callable[..., T] | None = None,
) -> T:
    """``cpu(*args)`` on XLA:CPU, ``tpu(*args)`` on TPU (if given), else ``accelerator(*args)``.

    Every branch is traced (into one ``jax.lax.platform_dependent``); the
    compiler only ever sees the branch of the platform it compiles for.
    Outside ``jit`` only the default backend's branch runs.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from lion_optax._src.formulation import per_platform
      >>> jax.jit(lambda x: per_platform(x, cpu=lambda x: x + 1, accelerator=lambda x: x))(
      ...     jnp.zeros(()))
      Array(1., dtype=float32)
    """
    branches = {'cpu': cpu} if tpu is None else {'cpu': cpu, 'tpu': tpu}
    return jax.lax.platform_dependent(*args, default=accelerator, **branches)
