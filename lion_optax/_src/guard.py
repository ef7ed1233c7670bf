"""The one guard around Lion's chain: a step that must not happen, does not, and says so.

A step must not happen for two reasons, and :func:`guard_step` handles both
with one decision, ``step_ok``:

- a hyperparameter that is only known in the step (a schedule's value, or one
  set through ``optax.inject_hyperparams``) is invalid: the step is skipped,
  the step counts still advance (so a schedule that is bad at one step does
  not stall the run), and the user is told the first time (a warning from a
  host callback that runs only on a bad step), or the step raises
  (``invalid_hyperparameters='raise'``);
- with ``nonfinite='skip_step'``, the gradient holds a NaN or an Inf
  somewhere: the whole step is skipped and changes nothing, the step counts
  included.

``step_ok`` goes into the chain as the ``step_is_valid`` keyword, so
:func:`scale_by_lion` keeps its momentum inside the loop that writes it anyway
(no copy of the state, no extra memory traffic); the guard zeroes the updates
and keeps the scalar step counts. Like ``optax.apply_if_finite`` it is one
wrapper with one state, but its state is *appended* after the chain's, so
``state[0]`` stays the ``ScaleByLionState``: with diagnostics the state is a
:class:`LionDiagnosticsState`, ``optax.lion``'s three states followed by the
counters.
"""

import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lion_optax._src import nonfinite as nonfinite_lib
from lion_optax._src import validation
from lion_optax._src.options import Diagnostics, InvalidHyperparameters

# ---------------------------------------------------------------------------
# Hyperparameters that are only known when the step runs.


class RuntimeCheck(NamedTuple):
    """One hyperparameter to check inside the step.

    Attributes:
      name: its argument name, for messages.
      value: a schedule (a callable of the step count) or a traced/array value
        (as ``optax.inject_hyperparams`` passes them).
      kind: ``'probability'`` (in [0, 1]) or ``'nonnegative'`` (finite, >= 0).
    """

    name: str
    value: Any
    kind: str


def runtime_checks(probabilities: dict[str, Any], nonnegatives: dict[str, Any]) -> list[RuntimeCheck]:
    """The hyperparameters that construction could not check: schedules and traced values."""
    checks = []
    for kind, named in (('probability', probabilities), ('nonnegative', nonnegatives)):
        for name, value in named.items():
            if callable(value) or validation.concrete_float(value) is None:
                checks.append(RuntimeCheck(name, value, kind))
    return checks


def runtime_values_valid(
    checks: list[RuntimeCheck], count: jax.Array
) -> tuple[jax.Array | None, list[tuple[str, jax.Array]]]:
    """``(valid, [(name, value), ...])`` at step ``count``; ``(None, [])`` with no checks.

    ``valid`` is a bool scalar: every value in range and not NaN (and finite
    for ``'nonnegative'``). Schedules are evaluated at ``count``.
    """
    if not checks:
        return None, []
    valid = jnp.array(True)
    values = []
    for check in checks:
        value = check.value(count) if callable(check.value) else check.value
        value = jnp.asarray(value, jnp.float32)
        if check.kind == 'probability':
            ok = (value >= 0.0) & (value <= 1.0)
        else:
            ok = jnp.isfinite(value) & (value >= 0.0)
        valid = valid & jnp.all(ok)
        values.append((check.name, value))
    return valid, values


# ---------------------------------------------------------------------------
# The state.


class LionDiagnosticsState(NamedTuple):
    """State of :func:`lion` with ``diagnostics``: ``optax.lion``'s three states, then counters.

    ``state[0]`` is the ``ScaleByLionState`` (``state[0].mu`` is the momentum),
    as without diagnostics; the counters follow.

    Attributes:
      direction: the direction's state (``ScaleByLionState``, or
        ``ScaleByLionInt8State`` for int8 momentum).
      weight_decay: the weight decay's state (``optax.EmptyState`` for a constant).
      learning_rate: the learning rate's state (``optax.EmptyState`` for a constant).
      nonfinite_gradient_steps: steps whose gradient had a NaN or Inf element.
      invalid_hyperparameter_steps: steps skipped for an invalid run-time
        hyperparameter (a schedule's or an injected value).
      consecutive_bad_steps: the current run of such steps (0 after a good one).
    """

    direction: Any
    weight_decay: Any
    learning_rate: Any
    nonfinite_gradient_steps: jax.Array
    invalid_hyperparameter_steps: jax.Array
    consecutive_bad_steps: jax.Array

    @property
    def inner_state(self) -> tuple[Any, Any, Any]:
        """Deprecated: the state is ``optax.lion``'s with the counters appended."""
        warnings.warn(
            'LionDiagnosticsState.inner_state is deprecated: the diagnostics state is now '
            "optax.lion's three states followed by the counters, so write state[0].mu "
            '(was state.inner_state[0].mu) and state[:3] (was state.inner_state).',
            DeprecationWarning,
            stacklevel=2,
        )
        return (self.direction, self.weight_decay, self.learning_rate)


def _invalid_message(step: Any, names: tuple[str, ...], values: tuple[Any, ...]) -> str:
    shown = ', '.join(f'{name}={np.asarray(value).tolist()!r}' for name, value in zip(names, values))
    return (
        f'Invalid hyperparameter at step {int(step)}: {shown}. Expected b1 and b2 in [0, 1] '
        'and learning_rate, weight_decay finite and >= 0. The step was skipped (parameters and '
        'momentum unchanged). Check the schedule or the value set through '
        'optax.inject_hyperparams.'
    )


def _first_bad(good: Any, step: Any, values: tuple[Any, ...]) -> tuple[Any, tuple[Any, ...]] | None:
    """``(step, values)`` of the first bad one of possibly batched (vmapped) arguments."""
    good = np.asarray(good)
    if good.all():
        return None
    index = np.unravel_index(int(np.argmin(good.reshape(-1))), good.shape) if good.ndim else ()
    pick = lambda x: np.asarray(x)[index] if np.ndim(x) >= len(index) and np.ndim(x) else x  # noqa: E731
    return pick(step), tuple(pick(v) for v in values)


class _WarnOnce:
    """Host callback: warns the first time this optimizer meets an invalid hyperparameter."""

    def __init__(self, names: tuple[str, ...]) -> None:
        self.names = names
        self.warned = False

    def __call__(self, good: Any, step: Any, *values: Any) -> None:
        bad = _first_bad(good, step, values)
        if self.warned or bad is None:
            return
        step, values = bad
        self.warned = True
        warnings.warn(
            _invalid_message(step, self.names, values)
            + ' (Warned once per optimizer; invalid_hyperparameters=\'raise\' raises instead, '
            'and diagnostics=True counts every such step.)',
            RuntimeWarning,
            stacklevel=2,
        )


class _Raise:
    """Host callback: raises FloatingPointError naming the invalid values and the step."""

    def __init__(self, names: tuple[str, ...]) -> None:
        self.names = names

    def __call__(self, good: Any, step: Any, *values: Any) -> None:
        bad = _first_bad(good, step, values)
        if bad is not None:
            raise FloatingPointError(_invalid_message(bad[0], self.names, bad[1]))


def _too_many_bad_steps(limit: int) -> Callable[[Any, Any], None]:
    def report(good: Any, run: Any) -> None:
        if np.asarray(good).all():
            return
        run = np.asarray(run).max()
        raise FloatingPointError(
            f'{int(run)} bad steps in a row (non-finite gradients or invalid '
            f'hyperparameters), more than max_consecutive_bad_steps={limit}: the run is '
            "not learning. Look at the state's nonfinite_gradient_steps and "
            'invalid_hyperparameter_steps, the loss and the learning-rate schedule.'
        )

    return report


def on_bad_step(good: jax.Array, callback: Callable[..., None], *args: Any) -> None:
    """Runs the host ``callback(good, *args)`` only on a step where ``good`` is False.

    The callback sits in the false branch of a ``lax.cond``: a good step
    transfers nothing to the host (tests/test_guard.py reads the compiled
    program to check it). Under ``vmap`` with a batched ``good`` the cond
    becomes a select that runs the callback every step, so the callback gets
    ``good`` too and acts only on the bad elements.
    """

    def bad() -> None:
        jax.debug.callback(callback, good, *args)

    jax.lax.cond(good, lambda: None, bad)


def _keep_step_counts(keep_old: jax.Array, new_state: Any, old_state: Any) -> Any:
    """``new_state`` with its scalar leaves (the step counts) taken from ``old_state`` if ``keep_old``.

    The arrays (momentum) were already kept by the direction (``step_is_valid``).
    """
    return jax.tree.map(
        lambda new, old: jnp.where(keep_old, old, new) if jnp.ndim(new) == 0 else new,
        new_state,
        old_state,
    )


def _all(*flags: jax.Array | None) -> jax.Array | None:
    present = [f for f in flags if f is not None]
    if not present:
        return None
    out = present[0]
    for flag in present[1:]:
        out = out & flag
    return out


def guard_step(
    inner: optax.GradientTransformation,
    *,
    checks: list[RuntimeCheck],
    step_count: Callable[[Any], jax.Array],
    skip_nonfinite_steps: bool = False,
    invalid_hyperparameters: InvalidHyperparameters = 'skip_step',
    diagnostics: Diagnostics | None = None,
    combine_across_workers: Callable[[jax.Array], jax.Array] | None = None,
) -> optax.GradientTransformationExtraArgs:
    """``inner`` (Lion's chain), skipping the steps that must not happen (see the module docstring).

    Args:
      inner: the chain; its first stage takes the ``step_is_valid`` keyword
        (:func:`scale_by_lion`) and keeps its momentum when it is False.
      checks: the run-time hyperparameter checks (may be empty).
      step_count: reads the step count from ``inner``'s state (for schedules).
      skip_nonfinite_steps: skip a step whose gradient holds a NaN or an Inf.
      invalid_hyperparameters: ``'skip_step'`` (skip and warn the first time)
        or ``'raise'``.
      diagnostics: counters appended to the state (:class:`LionDiagnosticsState`),
        or None.
      combine_across_workers: inside ``shard_map``: maps this worker's "all
        finite" flag to the decision every worker shares (e.g. a ``pmin``).

    Returns:
      An ``optax.GradientTransformationExtraArgs``; its state is ``inner``'s,
      or a :class:`LionDiagnosticsState` with ``diagnostics``.
    """
    inner = optax.with_extra_args_support(inner)
    names = tuple(check.name for check in checks)
    report = _Raise(names) if invalid_hyperparameters == 'raise' else _WarnOnce(names)
    limit = diagnostics.max_consecutive_bad_steps if diagnostics is not None else None

    def init_fn(params: optax.Params) -> Any:
        state = inner.init(params)
        if diagnostics is None:
            return state
        # Three arrays, not one thrice: a donated state must not hold a buffer twice.
        counters = [jnp.zeros([], jnp.int32) for _ in range(3)]
        return LionDiagnosticsState(*state, *counters)

    def update_fn(
        updates: optax.Updates, state: Any, params: optax.Params | None = None, **extra_args: Any
    ) -> tuple[optax.Updates, Any]:
        inner_state = tuple(state[:3]) if diagnostics is not None else state
        count = step_count(inner_state)
        valid, values = runtime_values_valid(checks, count)
        finite = None
        if skip_nonfinite_steps or diagnostics is not None:
            finite = nonfinite_lib.all_finite(updates)
            if combine_across_workers is not None:
                finite = combine_across_workers(finite)
        if valid is not None:
            on_bad_step(valid, report, count, *(value for _, value in values))
        ok = _all(valid, finite if skip_nonfinite_steps else None)
        new_updates, new_inner = inner.update(
            updates, inner_state, params, step_is_valid=ok, **extra_args
        )
        if ok is not None:
            new_updates = jax.tree.map(lambda u: jnp.where(ok, u, jnp.zeros_like(u)), new_updates)
        if skip_nonfinite_steps:
            assert finite is not None
            new_inner = _keep_step_counts(~finite, new_inner, inner_state)
        if diagnostics is None:
            return new_updates, new_inner
        assert finite is not None
        valid_flag = jnp.array(True) if valid is None else valid
        bad = ~finite | ~valid_flag
        run = jnp.where(bad, optax.safe_increment(state.consecutive_bad_steps), 0)
        if limit is not None:
            on_bad_step(run <= limit, _too_many_bad_steps(limit), run)
        direction_state, decay_state, learning_rate_state = new_inner
        return new_updates, LionDiagnosticsState(
            direction_state,
            decay_state,
            learning_rate_state,
            state.nonfinite_gradient_steps + (~finite).astype(jnp.int32),
            state.invalid_hyperparameter_steps + (~valid_flag).astype(jnp.int32),
            run,
        )

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
