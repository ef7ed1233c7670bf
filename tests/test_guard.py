"""The one guard around lion's chain: bad steps skipped, said once, counted in appended state.

An invalid run-time hyperparameter warns the first time (a host callback that a
good step never runs: the compiled program's entry has no host transfer), raises
in ``'raise'`` mode, and never moves the parameters; ``diagnostics`` appends its
counters after optax.lion's three states, so ``state[0].mu`` keeps working.
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

PARAMS = {'w': jnp.linspace(-1.0, 1.0, 8), 'b': jnp.zeros(3)}
GRADS = jax.tree.map(lambda p: jnp.cos(3 * p) + 0.1, PARAMS)


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
