"""The one guard around lion's chain: bad steps skipped, said once, counted in appended state.

An invalid run-time hyperparameter warns the first time (a host callback that a
good step never runs: the compiled program's entry has no host transfer), raises
in ``'raise'`` mode, and never moves the parameters; ``diagnostics`` appends its
counters after optax.lion's three states, so ``state[0].mu`` keeps working.
Every way a bad value can enter after construction (a schedule that turns
invalid, an injected hyperparameter, a NaN micro-step inside MultiSteps) is
tested against what optax.lion does with it; the README's "Numerics and bad
input" section summarises them. Build-time refusals are in ``test_validation.py``.
"""

import re
import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lion_optax

from _helpers import all_finite

PARAMS = {'w': jnp.linspace(-1.0, 1.0, 8), 'b': jnp.zeros(3)}
GRADS = jax.tree.map(lambda p: jnp.cos(3 * p) + 0.1, PARAMS)
# Three and two elements: small enough to read every value in a failure.
SMALL_PARAMS = {'w': jnp.array([1.0, -2.0, 0.5]), 'b': jnp.array([0.1, -0.1])}
SMALL_GRADS = {'w': jnp.array([0.3, -0.2, 0.1]), 'b': jnp.array([0.5, 0.5])}


def _injected(value=None, name='b1', **options):
    tx = optax.inject_hyperparams(lion_optax.lion)(learning_rate=0.1, **options)
    state = tx.init(PARAMS)
    if value is not None:
        state.hyperparams[name] = jnp.asarray(value, jnp.float32)
    return tx, state


def test_a_good_step_transfers_nothing_to_the_host():
    """The warning's callback lives only in the false branch of a conditional."""
    tx, state = _injected()
    text = jax.jit(tx.update).lower(GRADS, state, PARAMS).compile().as_text()
    entry = text[text.index('\nENTRY'):]
    assert 'custom-call' not in entry  # no callback (or any host call) on the step's path
    callbacks = re.findall(r'custom_call_target="([^"]*callback[^"]*)"', text)
    assert callbacks, 'the bad branch holds the callback'
    assert re.search(r'conditional\(', entry)


def test_the_first_invalid_step_warns_once_and_changes_nothing():
    tx, state = _injected(2.0)  # b1 = 2 set mid-run: every step is invalid
    update = jax.jit(tx.update)
    with pytest.warns(RuntimeWarning, match=r'Invalid hyperparameter at step 0: b1=2\.0') as caught:
        for _ in range(3):
            updates, state = update(GRADS, state, PARAMS)
            chex.assert_trees_all_equal(updates, jax.tree.map(jnp.zeros_like, PARAMS))
        jax.block_until_ready(state)
    assert len([w for w in caught if issubclass(w.category, RuntimeWarning)]) == 1
    assert int(state.inner_state[0].count) == 3  # the counts advance
    chex.assert_trees_all_equal(state.inner_state[0].mu, jax.tree.map(jnp.zeros_like, PARAMS))


def test_two_optimizers_each_warn_for_themselves():
    for _ in range(2):
        tx, state = _injected(-1.0, name='learning_rate')
        with pytest.warns(RuntimeWarning, match='learning_rate=-1.0'):
            jax.block_until_ready(jax.jit(tx.update)(GRADS, state, PARAMS))


def test_raise_mode_raises_naming_the_value_and_the_step():
    tx, state = _injected(float('nan'), invalid_hyperparameters='raise')
    with pytest.raises(Exception, match=r'Invalid hyperparameter at step 0: b1=nan'):
        jax.block_until_ready(jax.jit(tx.update)(GRADS, state, PARAMS))


@pytest.mark.optax_promotion  # optax's schedules: 0.1 * count, count int32
def test_valid_steps_under_vmap_do_not_warn():
    """Under vmap the cond becomes a select that runs the callback: it must check."""
    schedule = optax.schedules.cosine_decay_schedule(0.1, 10)
    tx = lion_optax.lion(schedule)

    def run(scale):
        state = tx.init(PARAMS)
        updates, _ = tx.update(jax.tree.map(lambda g: scale * g, GRADS), state, PARAMS)
        return updates

    with warnings.catch_warnings():
        warnings.simplefilter('error')
        jax.block_until_ready(jax.jit(jax.vmap(run))(jnp.arange(3.0)))


def test_diagnostics_keep_optax_lions_state_first_and_append_the_counters():
    tx = lion_optax.lion(0.1, diagnostics=True)
    state = tx.init(PARAMS)
    reference = optax.lion(0.1).init(PARAMS)
    assert isinstance(state, lion_optax.LionDiagnosticsState) and isinstance(state, tuple)
    assert jax.tree.structure(tuple(state[:3])) == jax.tree.structure(reference)
    chex.assert_trees_all_equal(state[0].mu, reference[0].mu)
    bad = {'w': GRADS['w'].at[2].set(jnp.nan), 'b': GRADS['b']}
    _, state = jax.jit(tx.update)(bad, state, PARAMS)
    assert int(state.nonfinite_gradient_steps) == 1 and int(state[-3]) == 1
    assert bool(jnp.isfinite(state[0].mu['w']).all())


def test_the_old_inner_state_attribute_warns_and_still_reads():
    state = lion_optax.lion(0.1, diagnostics=True).init(PARAMS)
    with pytest.warns(DeprecationWarning, match=r'state\[0\]\.mu'):
        inner = state.inner_state
    chex.assert_trees_all_equal(inner[0].mu, state[0].mu)


def test_skip_step_keeps_every_count_and_the_momentum():
    tx = lion_optax.lion(optax.schedules.linear_schedule(0.1, 0.0, 10),
                         weight_decay=optax.schedules.constant_schedule(0.1), nonfinite='skip_step')
    state = tx.init(PARAMS)
    _, state = jax.jit(tx.update)(GRADS, state, PARAMS)
    bad = {'w': GRADS['w'].at[0].set(jnp.inf), 'b': GRADS['b']}
    updates, after = jax.jit(tx.update)(bad, state, PARAMS)
    chex.assert_trees_all_equal(updates, jax.tree.map(jnp.zeros_like, PARAMS))
    chex.assert_trees_all_equal(after, state)


@pytest.mark.parametrize('options', [{}, dict(mu_dtype=jnp.bfloat16), dict(mu_dtype='int8'),
                                     dict(cautious=True), dict(nonfinite='skip_step'),
                                     dict(diagnostics=True), dict(kappa='l2')],
                         ids=['default', 'bf16', 'int8', 'cautious', 'skip_step', 'diagnostics',
                              'l2'])
def test_python_scalar_and_numpy_parameters_work_as_under_jit(options):
    """Every stage takes what jit takes: a Python float or a NumPy array (optax.lion does)."""
    params, grads = {'s': 1.0, 'a': np.ones(3, np.float32)}, {'s': 2.0, 'a': np.ones(3, np.float32)}
    tx = lion_optax.lion(0.1, **options)
    eager, _ = tx.update(grads, tx.init(params), params)
    jitted, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    chex.assert_trees_all_close(eager, jitted)
    theirs, _ = optax.lion(0.1).update(grads, optax.lion(0.1).init(params), params)
    if not options:
        chex.assert_trees_all_close(eager, theirs)


@pytest.mark.parametrize('make', [
    lambda: lion_optax.scale_by_lion(),
    lambda: lion_optax.add_decoupled_weight_decay(0.1),
    lambda: lion_optax.round_updates_to_params(),
    lambda: lion_optax.skip_nonfinite(lion_optax.lion(0.1)),
    lambda: lion_optax.monitor_signs(lion_optax.scale_by_lion()),
], ids=['scale_by_lion', 'add_decoupled_weight_decay', 'round_updates_to_params',
        'skip_nonfinite', 'monitor_signs'])
def test_every_public_stage_takes_python_scalars_outside_jit(make):
    params, grads = {'s': 1.0, 'a': np.ones(3, np.float32)}, {'s': 2.0, 'a': np.ones(3, np.float32)}
    tx = make()
    eager, _ = tx.update(grads, tx.init(params), params)
    jitted, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    chex.assert_trees_all_close(eager, jitted)


# --- hyperparameters that bypass construction checks (against optax.lion) ---------


def _steps(tx, count, params=SMALL_PARAMS, grads=SMALL_GRADS, jit=True):
    update = jax.jit(tx.update) if jit else tx.update
    state = tx.init(params)
    for _ in range(count):
        updates, state = update(grads, state, params)
        params = optax.apply_updates(params, updates)
    return params, state


@pytest.mark.parametrize('bad', [jnp.nan, jnp.inf, -0.1])
@pytest.mark.parametrize('which', ['learning_rate', 'weight_decay'])
def test_a_schedule_that_turns_invalid_never_changes_params_or_momentum(which, bad):
    good = {'learning_rate': 0.1, 'weight_decay': 0.2}[which]
    schedule = lambda count: jnp.where(count == 1, bad, good)  # noqa: E731
    kwargs = {'learning_rate': 0.1, 'weight_decay': 0.2, which: schedule}
    tx = lion_optax.lion(**kwargs)
    state = tx.init(SMALL_PARAMS)
    update = jax.jit(tx.update)
    updates, state = update(SMALL_GRADS, state, SMALL_PARAMS)
    params = optax.apply_updates(SMALL_PARAMS, updates)
    before = (params, optax.tree.get(state, 'mu'))
    with pytest.warns(RuntimeWarning, match=f'Invalid hyperparameter at step 1: {which}='):
        updates, state = update(SMALL_GRADS, state, params)  # the schedule is invalid at count 1
        jax.block_until_ready((updates, state))
    params = optax.apply_updates(params, updates)
    jax.tree.map(np.testing.assert_array_equal, (params, optax.tree.get(state, 'mu')), before)
    # The counts advance: the next step uses the schedule's valid value again.
    updates, state = update(SMALL_GRADS, state, params)
    assert all_finite(updates) and float(jnp.abs(updates['w']).max()) > 0
    # optax.lion applies the bad value: NaN/Inf in the parameters, or ascent.
    theirs = optax.lion(**kwargs)
    their_params, _ = _steps(theirs, 2)
    if np.isfinite(bad):
        assert not np.allclose(np.asarray(their_params['w']), np.asarray(params['w']))
    else:
        assert not all_finite(their_params)


@pytest.mark.parametrize('name, value', [
    ('b1', 1.5), ('b2', -1.0), ('b1', jnp.nan),
    ('learning_rate', -0.1), ('learning_rate', jnp.nan), ('weight_decay', jnp.inf),
])
def test_injected_hyperparameters_are_checked_in_the_step(name, value):
    tx = optax.inject_hyperparams(lion_optax.lion)(learning_rate=0.1, weight_decay=0.1)
    state = tx.init(SMALL_PARAMS)
    state.hyperparams[name] = jnp.asarray(value, jnp.float32)
    with pytest.warns(RuntimeWarning, match=f'Invalid hyperparameter at step 0: .*{name}='):
        updates, new_state = jax.jit(tx.update)(SMALL_GRADS, state, SMALL_PARAMS)
        jax.block_until_ready((updates, new_state))
    jax.tree.map(np.testing.assert_array_equal, updates, jax.tree.map(jnp.zeros_like, SMALL_PARAMS))
    jax.tree.map(
        np.testing.assert_array_equal,
        optax.tree.get(new_state.inner_state, 'mu'),
        optax.tree.get(state.inner_state, 'mu'),
    )
    # optax.lion takes the same injected value and moves the parameters.
    theirs = optax.inject_hyperparams(optax.lion)(learning_rate=0.1, weight_decay=0.1)
    their_state = theirs.init(SMALL_PARAMS)
    their_state.hyperparams[name] = jnp.asarray(value, jnp.float32)
    their_updates, _ = jax.jit(theirs.update)(SMALL_GRADS, their_state, SMALL_PARAMS)
    assert not np.array_equal(np.asarray(their_updates['w']), np.zeros(3))


def test_raise_mode_names_the_value_and_the_step():
    schedule = lambda count: jnp.where(count == 2, jnp.nan, 0.1)  # noqa: E731
    tx = lion_optax.lion(schedule, invalid_hyperparameters='raise')
    state = tx.init(SMALL_PARAMS)
    update = jax.jit(tx.update)
    for _ in range(2):
        updates, state = update(SMALL_GRADS, state, SMALL_PARAMS)
    with pytest.raises(Exception, match=r'Invalid hyperparameter at step 2: learning_rate=nan'):
        updates, state = update(SMALL_GRADS, state, SMALL_PARAMS)
        jax.block_until_ready(updates)


def test_only_schedules_and_traced_values_are_checked_in_the_step():
    """Constants are checked once, at construction: they cost the step nothing."""
    from lion_optax._src.guard import runtime_checks

    constants = runtime_checks({'b1': 0.9, 'b2': 0.99}, {'learning_rate': 0.1, 'weight_decay': 0})
    assert constants == []
    schedule = optax.linear_schedule(0.1, 0.0, 10)
    checks = runtime_checks({'b1': 0.9, 'b2': 0.99}, {'learning_rate': schedule,
                                                       'weight_decay': 0.0})
    assert [c.name for c in checks] == ['learning_rate']

    names = []
    jax.jit(lambda b1: names.extend(runtime_checks({'b1': b1}, {})) or b1)(0.9)
    assert [c.name for c in names] == ['b1']


# --- no silent stall -------------------------------------------------------------


def _accumulate(tx, grads):
    state = tx.init(SMALL_PARAMS)
    params = SMALL_PARAMS
    update = jax.jit(tx.update)
    history = []
    for g in grads:
        updates, state = update(g, state, params)
        params = optax.apply_updates(params, updates)
        history.append(params)
    return history


@pytest.mark.optax_promotion  # optax's MultiSteps mixes int32 and float32
def test_multisteps_with_skip_not_finite_loses_only_the_bad_micro_step():
    """The documented recipe: MultiSteps(lion, k, should_skip_update_fn=optax.skip_not_finite).

    Plain MultiSteps accumulates the NaN and resets its accumulator with
    (1 - emit) * acc = 0 * NaN: every later macro step would see NaN there."""
    bad = {'w': SMALL_GRADS['w'].at[1].set(jnp.nan), 'b': SMALL_GRADS['b']}
    grads = [SMALL_GRADS, bad] + [SMALL_GRADS] * 9
    guarded = optax.MultiSteps(lion_optax.lion(0.1), every_k_schedule=2,
                               should_skip_update_fn=optax.skip_not_finite)
    history = _accumulate(guarded, grads)
    # The bad micro-step is dropped: the remaining 10 good ones make 5 macro steps,
    # and the coordinate that saw the NaN keeps moving.
    moves = [not np.array_equal(np.asarray(a['w']), np.asarray(b['w']))
             for a, b in zip(history, history[1:])]
    assert sum(moves) == 5
    assert float(history[-1]['w'][1]) != float(SMALL_PARAMS['w'][1])
    plain = optax.MultiSteps(lion_optax.lion(0.1), every_k_schedule=2)
    stalled = _accumulate(plain, grads)
    # Without the guard the poisoned coordinate only decays from then on.
    late = [float(p['w'][1]) for p in stalled[3:]]
    assert all(np.isfinite(late)) and np.ptp(np.diff(late[::2])) < 1e-6


def test_diagnostics_count_bad_steps_and_a_long_run_of_them_raises():
    schedule = lambda count: jnp.where((count >= 2) & (count < 4), jnp.nan, 0.1)  # noqa: E731
    tx = lion_optax.lion(
        schedule, diagnostics=lion_optax.Diagnostics(max_consecutive_bad_steps=3))
    state = tx.init(SMALL_PARAMS)
    assert isinstance(state, lion_optax.LionDiagnosticsState)
    update = jax.jit(tx.update)
    nan_grads = {'w': SMALL_GRADS['w'].at[0].set(jnp.nan), 'b': SMALL_GRADS['b']}
    with pytest.warns(RuntimeWarning, match='Invalid hyperparameter at step 2'):
        for grads in [SMALL_GRADS, nan_grads, SMALL_GRADS, SMALL_GRADS, SMALL_GRADS]:
            _, state = update(grads, state, SMALL_PARAMS)
        jax.block_until_ready(state)
    assert int(state.nonfinite_gradient_steps) == 1
    assert int(state.invalid_hyperparameter_steps) == 2
    assert int(state.consecutive_bad_steps) == 0
    with pytest.raises(Exception, match='bad steps in a row'):
        for _ in range(4):
            _, state = update(nan_grads, state, SMALL_PARAMS)
        jax.block_until_ready(state)


def test_the_deprecated_max_consecutive_bad_steps_still_needs_diagnostics():
    with pytest.warns(DeprecationWarning, match='Diagnostics'):
        with pytest.raises(ValueError, match='Diagnostics\\(max_consecutive_bad_steps=3\\)'):
            lion_optax.lion(0.1, max_consecutive_bad_steps=3)
