"""A NaN or Inf gradient never reaches the momentum or the parameters.

Three documented modes of ``lion(nonfinite=...)``: ``'zero'`` (default, each
non-finite element counts as 0), ``'skip_step'`` (the whole step is skipped) and
``'propagate'`` (optax.lion's behaviour); ``skip_nonfinite`` counts skipped steps.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lion_optax

BAD = [jnp.nan, jnp.inf, -jnp.inf]


def _one_good_step(tx, params):
    state = tx.init(params)
    good = {'a': jnp.ones(4), 'b': jnp.ones(2)}
    updates, state = tx.update(good, state, params)
    return optax.apply_updates(params, updates), state


@pytest.mark.parametrize('bad', BAD)
@pytest.mark.parametrize('jit', [False, True])
def test_default_counts_a_bad_element_as_zero_and_steps_the_others(bad, jit):
    tx = lion_optax.lion(0.1, weight_decay=0.5)
    update = jax.jit(tx.update) if jit else tx.update
    params = {'a': jnp.ones(4), 'b': jnp.full(2, -1.0)}
    params, state = _one_good_step(tx, params)
    # The same step with the bad element replaced by 0 is what must happen.
    grads = {'a': jnp.array([1.0, -1.0, bad, 1.0]), 'b': jnp.array([1.0, -2.0])}
    zeroed = {'a': jnp.array([1.0, -1.0, 0.0, 1.0]), 'b': grads['b']}

    updates, new_state = update(grads, state, params)
    expected_updates, expected_state = update(zeroed, state, params)

    assert all(np.isfinite(x).all() for x in jax.tree.leaves((updates, new_state)))
    jax.tree.map(np.testing.assert_array_equal, updates, expected_updates)
    jax.tree.map(np.testing.assert_array_equal, new_state, expected_state)
    # The bad coordinate's momentum decays by b2; the step count advances.
    mu_before = optax.tree.get(state, 'mu')['a'][2]
    np.testing.assert_allclose(optax.tree.get(new_state, 'mu')['a'][2], 0.99 * mu_before)
    assert int(optax.tree.get(new_state, 'count')) == 2


def test_default_state_is_optax_lions_even_with_nan_gradients():
    params = {'w': jnp.ones((2, 3))}
    ours, theirs = lion_optax.lion(1e-3), optax.lion(1e-3)
    state = ours.init(params)
    _, state = ours.update({'w': jnp.full((2, 3), jnp.nan)}, state, params)
    assert jax.tree.structure(state) == jax.tree.structure(theirs.init(params))


@pytest.mark.parametrize('bad', BAD)
@pytest.mark.parametrize('jit', [False, True])
def test_skip_step_skips_the_whole_step(bad, jit):
    tx = lion_optax.lion(0.1, weight_decay=0.5, nonfinite='skip_step')
    update = jax.jit(tx.update) if jit else tx.update
    params = {'a': jnp.ones(4), 'b': jnp.full(2, -1.0)}
    params, state = _one_good_step(tx, params)
    before_params, before_state = params, state

    grads = {'a': jnp.ones(4).at[2].set(bad), 'b': jnp.ones(2)}
    updates, state = update(grads, state, params)
    params = optax.apply_updates(params, updates)

    jax.tree.map(np.testing.assert_array_equal, params, before_params)
    jax.tree.map(np.testing.assert_array_equal, state, before_state)
    assert int(optax.tree.get(state, 'count')) == 1  # schedules do not advance
    assert jax.tree.structure(state) == jax.tree.structure(optax.lion(0.1).init(params))


def test_skip_step_trajectory_is_the_one_without_that_step():
    """After a skipped Inf step the trajectory is the one without that step."""
    tx = lion_optax.lion(0.01, weight_decay=0.0, nonfinite='skip_step')
    grads = [jnp.array([1.0, -1.0]), jnp.array([jnp.inf, -1.0]),
             jnp.array([-1.0, 1.0]), jnp.array([-1.0, 1.0])]
    params = jnp.zeros(2)
    state = tx.init(params)
    for g in grads:
        updates, state = tx.update(g, state, params)
        params = optax.apply_updates(params, updates)

    clean_params = jnp.zeros(2)
    clean_state = tx.init(clean_params)
    for g in [grads[0], grads[2], grads[3]]:
        updates, clean_state = tx.update(g, clean_state, clean_params)
        clean_params = optax.apply_updates(clean_params, updates)
    np.testing.assert_array_equal(params, clean_params)
    # The coordinate really moved after the Inf: it is not frozen.
    assert float(params[0]) != -0.01


def test_propagate_lets_a_nan_through_as_optax_does():
    tx = lion_optax.lion(0.1, nonfinite='propagate')
    theirs = optax.lion(0.1)
    grads = jnp.array([jnp.nan, 1.0])
    updates, state = tx.update(grads, tx.init(jnp.ones(2)), jnp.ones(2))
    expected, expected_state = theirs.update(grads, theirs.init(jnp.ones(2)), jnp.ones(2))
    assert np.isnan(updates[0]) and np.isfinite(updates[1])
    np.testing.assert_array_equal(updates, expected)
    jax.tree.map(np.testing.assert_array_equal, state, expected_state)


@pytest.mark.parametrize('mu_dtype', [None, jnp.bfloat16, 'int8'])
def test_zero_mode_protects_every_momentum_storage(mu_dtype):
    tx = lion_optax.lion(0.1, mu_dtype=mu_dtype, weight_decay=0.1)
    params = {'w': jnp.ones((64, 128))}
    state = tx.init(params)
    grads = {'w': jnp.ones((64, 128)).at[3, 5].set(jnp.nan).at[7].set(jnp.inf)}
    updates, state = tx.update(grads, state, params)
    assert all(np.isfinite(np.asarray(x, np.float32)).all() for x in jax.tree.leaves((updates, state)))


@pytest.mark.optax_promotion  # optax's adam: bias correction mixes int32 and float32
def test_skip_nonfinite_wraps_any_transformation_and_never_lets_nan_through():
    tx = lion_optax.skip_nonfinite(optax.adam(0.1))
    params = jnp.ones(3)
    state = tx.init(params)
    for _ in range(10):  # optax.apply_if_finite would let it through after max errors
        updates, state = tx.update(jnp.full(3, jnp.nan), state, params)
        params = optax.apply_updates(params, updates)
    np.testing.assert_array_equal(params, jnp.ones(3))
    assert int(state.nonfinite_gradient_steps) == 10


def test_skip_nonfinite_around_lion_counts_skipped_steps():
    tx = lion_optax.skip_nonfinite(lion_optax.lion(0.1))
    params = jnp.ones(2)
    state = tx.init(params)
    for g in [jnp.ones(2), jnp.array([jnp.nan, 1.0]), jnp.ones(2)]:
        updates, state = tx.update(g, state, params)
        params = optax.apply_updates(params, updates)
    assert int(state.nonfinite_gradient_steps) == 1
    assert int(optax.tree.get(state.inner_state, 'count')) == 2


def test_all_finite_on_empty_tree():
    from lion_optax._src.nonfinite import all_finite

    assert bool(all_finite({}))
    assert not bool(all_finite({'x': jnp.array([1.0, jnp.nan])}))


def test_the_deprecated_skipped_steps_name_still_reads_the_count():
    tx = lion_optax.skip_nonfinite(optax.sgd(0.1))
    params = jnp.ones(2)
    _, state = tx.update(jnp.full(2, jnp.nan), tx.init(params), params)
    with pytest.warns(DeprecationWarning, match='state.nonfinite_gradient_steps'):
        assert int(state.skipped_steps) == 1
