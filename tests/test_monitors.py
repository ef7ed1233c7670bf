"""Sign-flip fraction and sign agreement: pure functions and the opt-in wrapper."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lion_optax

from _helpers import random_grads, random_params


def test_flip_fraction_counts_reversals_only():
    previous = {'a': jnp.array([1.0, -1.0, 1.0, 0.0]), 'b': jnp.array([2.0, -3.0])}
    current = {'a': jnp.array([1.0, 1.0, -1.0, -1.0]), 'b': jnp.array([0.0, 5.0])}
    # 'a': two reversals of four (a zero is no flip); 'b': one of two.
    assert float(lion_optax.sign_flip_fraction(previous, current)) == 3 / 6
    chex.assert_trees_all_close(
        lion_optax.sign_flip_fraction(previous, current, per_leaf=True), {'a': 0.5, 'b': 0.5})


def test_agreement_counts_strictly_same_signs_even_for_tiny_values():
    direction = {'w': jnp.array([1e-30, -1e-30, 1.0, 1.0, 0.0])}
    grads = {'w': jnp.array([1e-30, -1e-30, -1.0, 0.0, 1.0])}
    # The products 1e-60 underflow to 0 in float32; signs do not.
    assert float(lion_optax.sign_agreement(direction, grads)) == pytest.approx(2 / 5)
    # A zero never agrees.
    assert float(lion_optax.sign_agreement(grads, grads)) == pytest.approx(4 / 5)


def test_mismatched_trees_and_empty_trees():
    with pytest.raises(ValueError, match='does not match'):
        lion_optax.sign_agreement({'a': jnp.ones(2)}, {'b': jnp.ones(2)})
    with pytest.raises(ValueError, match='shape'):
        lion_optax.sign_flip_fraction(jnp.ones(2), jnp.ones(3))
    assert float(lion_optax.sign_flip_fraction({}, {})) == 0.0
    assert float(lion_optax.sign_agreement(jnp.zeros(0), jnp.zeros(0))) == 0.0


def test_agreement_of_c_is_the_cautious_kept_fraction():
    tx = lion_optax.scale_by_lion(cautious=True)

    @jax.jit
    def check(state, g):
        c = jax.tree.map(lambda m, g: 0.9 * m + 0.1 * g, state.mu, g)
        direction, state = tx.update(g, state)
        kept = jax.tree.map(lambda u: jnp.mean(u != 0), direction)
        return state, kept, lion_optax.sign_agreement(c, g, per_leaf=True)

    grads = random_grads(0, 4)
    state = tx.init(grads[0])
    partial = []
    for g in grads:
        state, kept, agreement = check(state, g)
        chex.assert_trees_all_close(agreement, kept)
        partial += [0.0 < float(v) < 1.0 for v in jax.tree.leaves(kept)]
    assert any(partial)  # some arrays were partly masked


def test_wrapper_leaves_updates_alone_and_records_the_statistics():
    inner = lion_optax.scale_by_lion(b1=0.95, b2=0.98)
    monitored = lion_optax.monitor_signs(inner)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(g, state, plain_state):
        direction, state = monitored.update(g, state)
        plain, new_plain_state = inner.update(g, plain_state)
        flips = lion_optax.sign_flip_fraction(
            jax.tree.map(jnp.sign, optax.tree.get(plain_state, 'mu')), plain)
        return direction, state, plain, new_plain_state, flips, lion_optax.sign_agreement(plain, g)

    params = random_params(1)
    state, plain_state = monitored.init(params), inner.init(params)
    assert float(state.flip_fraction) == 0.0 and state.previous_sign['w'].dtype == jnp.int8
    previous = None
    for g in random_grads(2, 4):
        direction, state, plain, plain_state, _, agreement = step(g, state, plain_state)
        chex.assert_trees_all_equal(direction, plain)
        chex.assert_trees_all_equal(state.inner_state, plain_state)
        expected_flips = 0.0 if previous is None else np.mean(np.concatenate(
            [(np.sign(previous[k]) * np.sign(plain[k]) < 0).ravel() for k in plain]))
        np.testing.assert_allclose(float(state.flip_fraction), expected_flips, rtol=1e-6)
        np.testing.assert_allclose(float(state.agreement), float(agreement))
        chex.assert_trees_all_equal(state.previous_sign,
                                    jax.tree.map(lambda u: jnp.sign(u).astype(jnp.int8), plain))
        previous = plain
    assert 0.0 < float(state.flip_fraction) < 1.0


def test_noise_flips_about_half_the_signs_and_a_steady_gradient_none():
    """The failure mode the monitor is for: with pure-noise gradients and no
    momentum in the update (b1 = 0) about half the signs flip every step; a
    steady gradient flips none."""
    params = {'w': jnp.zeros(4000)}
    monitored = lion_optax.monitor_signs(lion_optax.scale_by_lion(b1=0.0))
    update = jax.jit(monitored.update)
    state = monitored.init(params)
    key = jax.random.key(0)
    flips = []
    for _ in range(4):
        key, sub = jax.random.split(key)
        _, state = update({'w': jax.random.normal(sub, (4000,))}, state)
        flips.append(float(state.flip_fraction))
    # Binomial(4000, 1/2) / 4000 has standard deviation 0.008: 0.5 +- 0.05 is 6 sigma.
    np.testing.assert_allclose(flips[1:], 0.5, atol=0.05)
    steady = monitored.init(params)
    for _ in range(3):
        _, steady = update({'w': jnp.linspace(0.1, 1.0, 4000)}, steady)
    assert float(steady.flip_fraction) == 0.0 and float(steady.agreement) == 1.0


def test_wrapper_in_a_lion_chain_with_skipping_and_extra_args():
    opt = lion_optax.skip_nonfinite(optax.chain(
        lion_optax.monitor_signs(lion_optax.scale_by_lion()),
        lion_optax.add_decoupled_weight_decay(0.1),
        optax.scale_by_learning_rate(1e-3),
    ))
    params = {'w': jnp.ones(3)}
    state = opt.init(params)
    _, state = opt.update({'w': jnp.array([1.0, -1.0, 1.0])}, state, params, loss=1.0)
    recorded = optax.tree.get(state, 'agreement')
    _, state = opt.update({'w': jnp.array([jnp.nan, 1.0, 1.0])}, state, params)
    assert int(state.nonfinite_gradient_steps) == 1
    chex.assert_trees_all_equal(optax.tree.get(state, 'agreement'), recorded)
