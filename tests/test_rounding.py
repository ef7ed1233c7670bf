"""Stochastic rounding and its random bits (lion_optax/_src/rounding.py)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lion_optax
from lion_optax._src import rounding


def _bits(seed, shape):
    return jax.random.bits(jax.random.key(seed), shape, jnp.uint32)


# ---------------------------------------------------------------------------
# stochastic_round


@pytest.mark.parametrize('dtype', [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize('value', [1.0 + 2.0**-9, -3.3, 1e-3, 2.5e-6, 70.123])
def test_stochastic_round_is_unbiased_and_picks_a_neighbour(dtype, value):
    n = 200_000
    x = jnp.full(n, value, jnp.float32)
    y = np.asarray(rounding.stochastic_round(x, dtype, _bits(0, (n,))).astype(jnp.float32))
    x32 = np.float32(value)
    nearest = np.asarray(x32).astype(dtype)
    toward = np.asarray(np.inf if float(nearest) < x32 else -np.inf).astype(dtype)
    other = np.nextafter(nearest, toward)
    lo, hi = sorted([float(nearest), float(other)])
    assert lo <= float(x32) <= hi
    assert set(np.unique(y).tolist()) <= {lo, hi}
    gap = hi - lo
    # Binomial standard error of the mean: gap * sqrt(p (1 - p) / n) <= gap / (2 sqrt(n)).
    assert abs(y.mean() - float(x32)) <= 5 * gap / (2 * np.sqrt(n)) + 1e-12


def test_round_to_nearest_would_be_biased_here():
    """The same input, rounded to nearest, is off by a quarter gap: the test above can fail."""
    x = jnp.full(8, 1.0 + 2.0**-9, jnp.float32)
    assert float(x.astype(jnp.bfloat16).astype(jnp.float32).mean()) == 1.0


@pytest.mark.parametrize('dtype', [jnp.bfloat16, jnp.float16])
def test_stochastic_round_keeps_special_and_representable_values(dtype):
    x = jnp.array([0.0, -0.0, 1.0, -2.0, 0.5, jnp.inf, -jnp.inf, jnp.nan], jnp.float32)
    for seed in range(5):
        y = rounding.stochastic_round(x, dtype, _bits(seed, x.shape))
        assert y.dtype == dtype
        np.testing.assert_array_equal(np.asarray(y[:7], np.float32), np.asarray(x[:7]))
        assert np.isnan(np.asarray(y[7], np.float32))
        assert np.signbit(np.asarray(y[1], np.float32))


def test_stochastic_round_to_float32_is_a_plain_cast():
    x = jnp.array([1.1, 2.2])
    chex.assert_trees_all_equal(rounding.stochastic_round(x, jnp.float32, _bits(0, (2,))), x)


def test_random_bits_are_uniform_and_change_every_step():
    word_a = rounding.step_word(0, rounding.MOMENTUM_STREAM, 0)
    word_b = rounding.step_word(0, rounding.MOMENTUM_STREAM, 1)
    a = np.asarray(rounding.random_bits(word_a, (4096,)) >> 16)
    b = np.asarray(rounding.random_bits(word_b, (4096,)) >> 16)
    counts, _ = np.histogram(a, bins=16, range=(0, 2**16))
    assert counts.min() > 4096 / 16 * 0.8  # well spread
    assert np.mean(a == b) < 0.01  # a new step, new bits
    assert int(rounding.step_word(1, 2, 3)) != int(rounding.step_word(1, 2, 4))
    assert int(rounding.step_word(1, 2, 3)) != int(rounding.step_word(1, 3, 3))  # streams


def test_salted_bits_are_uniform_for_any_salt():
    """The salt (data bits) decorrelates arrays; the step word keeps each element uniform."""
    salt = jnp.zeros(1024, jnp.float32).at[::2].set(0.25)  # a very regular salt
    top = np.stack([
        np.asarray(rounding.random_bits(rounding.step_word(0, 1, t), (1024,), salt=salt) >> 16)
        for t in range(64)
    ])
    # Each element over 64 steps, and each step over the elements: spread out.
    for values in (top[:, 5], top[:, 6], top[7]):
        counts, _ = np.histogram(values, bins=4, range=(0, 2**16))
        assert counts.min() > len(values) / 4 * 0.4
    other_salt = salt + 1.0
    same_word = rounding.step_word(0, 1, 0)
    a = rounding.random_bits(same_word, (1024,), salt=salt)
    b = rounding.random_bits(same_word, (1024,), salt=other_salt)
    assert np.mean(np.asarray(a) == np.asarray(b)) < 0.01  # other data, other bits




@pytest.mark.parametrize('mu_dtype', [jnp.bfloat16, 'int8'])
def test_the_step_word_is_computed_once_not_in_every_leaf(mu_dtype):
    """XLA copies cheap scalar arithmetic into each consumer's loop; the step
    word's hash must stay in one computation however many leaves use it."""
    # Large enough for int8 to quantize them (not kept in float32).
    params = {f'w{i}': jnp.zeros((64, 128 + 32 * i)) for i in range(5)}
    tx = lion_optax.lion(1e-3, mu_dtype=mu_dtype)

    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    text = jax.jit(step).lower(params, tx.init(params), params).compile().as_text()
    computations = text.split('\n\n')
    hash_constant = f'constant({int(np.uint32(0x846CA68B))})'  # the hash's last multiplier
    assert sum(hash_constant in c for c in computations) == 1
