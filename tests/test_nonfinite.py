"""A NaN or Inf gradient never reaches the momentum or the parameters."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lion_optax


@pytest.mark.parametrize('bad', [jnp.nan, jnp.inf, -jnp.inf])
@pytest.mark.parametrize('jit', [False, True])
def test_one_bad_element_skips_the_whole_step(bad, jit):
    tx = lion_optax.lion(0.1, weight_decay=0.5)
    update = jax.jit(tx.update) if jit else tx.update
    params = {'a': jnp.ones(4), 'b': jnp.full(2, -1.0)}
    state = tx.init(params)
    good = {'a': jnp.ones(4), 'b': jnp.ones(2)}
    updates, state = update(good, state, params)
    params = optax.apply_updates(params, updates)
    before_params, before_mu = params, optax.tree.get(state, 'mu')

    grads = {'a': jnp.ones(4).at[2].set(bad), 'b': jnp.ones(2)}
    updates, state = update(grads, state, params)
    params = optax.apply_updates(params, updates)

    assert all(np.isfinite(x).all() for x in jax.tree.leaves((params, state)))
    jax.tree.map(np.testing.assert_array_equal, params, before_params)
    jax.tree.map(np.testing.assert_array_equal, optax.tree.get(state, 'mu'), before_mu)
    assert int(state.skipped_steps) == 1
    assert int(optax.tree.get(state, 'count')) == 1  # schedules do not advance


def test_coordinate_follows_the_next_gradients_after_an_inf():
    """After a skipped Inf step the trajectory is the one without that step."""
    tx = lion_optax.lion(0.01, weight_decay=0.0)
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


def test_without_skipping_a_nan_propagates_as_documented():
    tx = lion_optax.lion(0.1, skip_nonfinite=False)
    state = tx.init(jnp.ones(2))
    updates, _ = tx.update(jnp.array([jnp.nan, 1.0]), state, jnp.ones(2))
    assert np.isnan(updates[0]) and np.isfinite(updates[1])


def test_skip_nonfinite_wraps_any_transformation_and_never_lets_nan_through():
    tx = lion_optax.skip_nonfinite(optax.adam(0.1))
    params = jnp.ones(3)
    state = tx.init(params)
    for _ in range(10):  # optax.apply_if_finite would let it through after max errors
        updates, state = tx.update(jnp.full(3, jnp.nan), state, params)
        params = optax.apply_updates(params, updates)
    np.testing.assert_array_equal(params, jnp.ones(3))
    assert int(state.skipped_steps) == 10


def test_all_finite_on_empty_tree():
    from lion_optax._src.nonfinite import all_finite

    assert bool(all_finite({}))
    assert not bool(all_finite({'x': jnp.array([1.0, jnp.nan])}))
