"""A pure-Python reference of Lion, the test oracle.

Plain Python floats and lists, no JAX and no NumPy, written to be checked by
eye against Algorithm 2 of Chen et al. (2023):

    c      = b1 * m + (1 - b1) * g
    theta  = theta - lr_t * (kappa(c) + wd_t * theta)
    m      = b2 * m + (1 - b2) * g

Parameters are a dict of leaves, each leaf a list of floats. ``rounding``
(optional) rounds every value the implementation stores or returns (momentum,
update, parameters) to emulate a low-precision dtype.
"""

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

Leaves = dict[str, list[float]]


class ReferenceStep(NamedTuple):
    """The parameters and momentum after one step of the reference."""

    params: Leaves
    momentum: Leaves


def sign(x: float) -> float:
    """sign with sign(0) = 0 (and sign(nan) = nan)."""
    if x > 0:
        return 1.0
    if x < 0:
        return -1.0
    return x  # 0.0, -0.0 or nan


def _lp_directions(c: Leaves, p: float, scope: str) -> Leaves:
    """sign(c) |c|^(p-1) / ||c||_p^(p-1), per leaf or over all leaves."""

    def norm(values: list[float]) -> float:
        return sum(abs(v) ** p for v in values) ** (1.0 / p)

    global_norm = norm([v for values in c.values() for v in values])
    out = {}
    for name, values in c.items():
        n = global_norm if scope == 'global' else norm(values)
        out[name] = [0.0 if n == 0 else sign(v) * (abs(v) / n) ** (p - 1.0) for v in values]
    return out


def kappa_directions(
    c: Leaves,
    kappa: str | Callable[[float], float],
    *,
    beta: float = 1.0,
    p: float = 1.0,
    scope: str = 'leaf',
) -> Leaves:
    """The direction kappa(c) for the named kappa ('sign', 'clip', 'tanh', 'lp').

    A callable ``kappa`` (float -> float) is applied to every element, as
    ``custom_kappa`` does.
    """
    if callable(kappa):
        return {k: [float(kappa(v)) for v in vs] for k, vs in c.items()}
    if kappa == 'sign':
        return {k: [sign(v) for v in vs] for k, vs in c.items()}
    if kappa == 'clip':
        return {k: [min(1.0, max(-1.0, v)) for v in vs] for k, vs in c.items()}
    if kappa == 'tanh':
        return {k: [math.tanh(beta * v) for v in vs] for k, vs in c.items()}
    if kappa == 'lp':
        return _lp_directions(c, p, scope)
    raise ValueError(f'unknown reference kappa {kappa!r}')


def _cautious(direction: Leaves, grads: Leaves, eps: float) -> Leaves:
    """phi * u / (mean(phi) + eps) per leaf, phi = 1[u * g > 0]."""
    out = {}
    for name, values in direction.items():
        agree = [1.0 if u * g > 0 else 0.0 for u, g in zip(values, grads[name])]
        scale = sum(agree) / len(agree) + eps
        out[name] = [a * u / scale for a, u in zip(agree, values)]
    return out


def _value(schedule: float | Callable[[int], float], step: int) -> float:
    return float(schedule(step)) if callable(schedule) else float(schedule)


def lion_reference(
    params: Leaves,
    grads: Sequence[Leaves],
    *,
    learning_rate: float | Callable[[int], float],
    b1: float = 0.9,
    b2: float = 0.99,
    weight_decay: float | Callable[[int], float] = 0.0,
    weight_decay_convention: str = 'paper',
    reference_learning_rate: float | None = None,
    decay_mask: dict[str, bool] | None = None,
    kappa: str | Callable[[float], float] = 'sign',
    kappa_beta: float = 1.0,
    kappa_p: float = 1.0,
    kappa_scope: str = 'leaf',
    cautious: bool = False,
    cautious_eps: float = 1e-3,
    skip_nonfinite: bool = True,
    rounding: Callable[[float], float] | None = None,
    initial_momentum: Leaves | None = None,
    first_step: int = 0,
) -> list[ReferenceStep]:
    """Runs Lion for ``len(grads)`` steps and returns the state after each.

    Args:
      params: initial parameters, ``{name: [floats]}``.
      grads: one gradient per step, with the structure of ``params``.
      learning_rate: a float or a function of the step index (0, 1, ...).
      b1, b2: Lion's rates.
      weight_decay: a float or a function of the step index.
      weight_decay_convention: 'paper' (lr_t * wd) or 'fully_decoupled'
        (lr_t / reference_learning_rate * wd).
      reference_learning_rate: lr_ref for 'fully_decoupled'.
      decay_mask: ``{name: bool}``; False leaves get no weight decay.
      kappa, kappa_beta, kappa_p, kappa_scope: the direction (see
        :func:`kappa_directions`).
      cautious, cautious_eps: Cautious Lion.
      skip_nonfinite: skip steps whose gradient has a NaN or Inf.
      rounding: applied to every stored or returned value (momentum, update,
        parameters), to emulate a low-precision dtype.
      initial_momentum: the momentum to start from (default zeros), to
        continue from another implementation's state.
      first_step: the step index of the first gradient, for schedules.

    Returns:
      A list of :class:`ReferenceStep`, one per step.
    """
    keep = rounding or (lambda x: x)
    theta = {k: [keep(v) for v in vs] for k, vs in params.items()}
    if initial_momentum is None:
        m = {k: [0.0] * len(vs) for k, vs in params.items()}
    else:
        m = {k: list(vs) for k, vs in initial_momentum.items()}
    history = []
    step = first_step  # counts applied steps: skipped ones do not advance schedules
    for g in grads:
        if skip_nonfinite and not all(math.isfinite(v) for vs in g.values() for v in vs):
            history.append(
                ReferenceStep(
                    {k: list(v) for k, v in theta.items()}, {k: list(v) for k, v in m.items()}
                )
            )
            continue
        lr = _value(learning_rate, step)
        wd = _value(weight_decay, step)
        if weight_decay_convention == 'fully_decoupled':
            assert reference_learning_rate is not None  # required by 'fully_decoupled'
            wd = wd / reference_learning_rate
        c = {k: [b1 * mv + (1 - b1) * gv for mv, gv in zip(m[k], g[k])] for k in m}
        u = kappa_directions(c, kappa, beta=kappa_beta, p=kappa_p, scope=kappa_scope)
        if cautious:
            u = _cautious(u, g, cautious_eps)
        for k in theta:
            leaf_wd = wd if (decay_mask is None or decay_mask[k]) else 0.0
            # Low-precision emulation rounds where a stored or returned value
            # is rounded: the decayed direction, the scaled step, the param.
            step_k = [keep(lr * keep(uv + leaf_wd * t)) for t, uv in zip(theta[k], u[k])]
            theta[k] = [keep(t - s) for t, s in zip(theta[k], step_k)]
            m[k] = [keep(b2 * mv + (1 - b2) * gv) for mv, gv in zip(m[k], g[k])]
        history.append(
            ReferenceStep(
                {k: list(v) for k, v in theta.items()}, {k: list(v) for k, v in m.items()}
            )
        )
        step += 1
    return history
