"""Low-precision storage that loses nothing on average (lion_optax/_src/precision.py)."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lion_optax
from lion_optax._src import precision


def _bits(seed, shape):
    return jax.random.bits(jax.random.key(seed), shape, jnp.uint32)


# ---------------------------------------------------------------------------
# stochastic_round


@pytest.mark.parametrize('dtype', [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize('value', [1.0 + 2.0**-9, -3.3, 1e-3, 2.5e-6, 70.123])
def test_stochastic_round_is_unbiased_and_picks_a_neighbour(dtype, value):
    n = 200_000
    x = jnp.full(n, value, jnp.float32)
    y = np.asarray(precision.stochastic_round(x, dtype, _bits(0, (n,))).astype(jnp.float32))
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
        y = precision.stochastic_round(x, dtype, _bits(seed, x.shape))
        assert y.dtype == dtype
        np.testing.assert_array_equal(np.asarray(y[:7], np.float32), np.asarray(x[:7]))
        assert np.isnan(np.asarray(y[7], np.float32))
        assert np.signbit(np.asarray(y[1], np.float32))


def test_stochastic_round_to_float32_is_a_plain_cast():
    x = jnp.array([1.1, 2.2])
    chex.assert_trees_all_equal(precision.stochastic_round(x, jnp.float32, _bits(0, (2,))), x)


def test_random_bits_are_uniform_and_change_every_step():
    word_a = precision.stream_word(0, precision.MOMENTUM_STREAM, 0, 0)
    word_b = precision.stream_word(0, precision.MOMENTUM_STREAM, 1, 0)
    a = np.asarray(precision.random_bits(word_a, (4096,)) >> 16)
    b = np.asarray(precision.random_bits(word_b, (4096,)) >> 16)
    counts, _ = np.histogram(a, bins=16, range=(0, 2**16))
    assert counts.min() > 4096 / 16 * 0.8  # well spread
    assert np.mean(a == b) < 0.01  # a new step, new bits
    assert int(precision.stream_word(1, 2, 3)) != int(precision.stream_word(1, 2, 4))


# ---------------------------------------------------------------------------
# Low-precision momentum


def _momentum_after(tx, steps, grad, params):
    """The momentum after ``steps`` updates with a constant gradient (one compile)."""
    state = tx.init(params)

    def body(state, _):
        _, state = tx.update(grad, state, params)
        return state, None

    state, _ = jax.lax.scan(body, state, None, length=steps)
    return state.mu


@pytest.mark.parametrize('mu_dtype', [jnp.bfloat16, jnp.float16])
def test_low_precision_momentum_keeps_tracking_a_slow_average(mu_dtype):
    """b2 = 0.999, gradient 1: the true momentum after 5000 steps is 1 - 0.999**5000."""
    params = {'w': jnp.zeros(2048)}
    grad = {'w': jnp.ones(2048)}
    steps = 5000
    target = 1.0 - 0.999**steps
    run = jax.jit(
        functools.partial(_momentum_after, steps=steps, grad=grad, params=params), static_argnums=0
    )
    stochastic = run(lion_optax.scale_by_lion(b2=0.999, mu_dtype=mu_dtype))['w']
    nearest = run(lion_optax.scale_by_lion(b2=0.999, mu_dtype=mu_dtype, mu_rounding='nearest'))['w']
    assert stochastic.dtype == nearest.dtype == mu_dtype
    mean = float(np.mean(np.asarray(stochastic, np.float32)))
    assert abs(mean - target) < 0.01, mean
    # Round to nearest stalls far below (the failure the option fixes): at
    # about 0.5 in bfloat16, 0.76 in float16.
    assert float(np.max(np.asarray(nearest, np.float32))) < target - 0.2


def test_int8_momentum_tracks_values_much_smaller_than_the_block_max():
    """One element per block at 1, the rest at 0.003: a step is 1/127 of the max."""
    n, steps = 4096, 600
    g = np.full(n, 0.003, np.float32)
    g[::256] = 1.0
    params, grad = {'w': jnp.zeros(n)}, {'w': jnp.asarray(g)}
    target = 0.003 * (1.0 - 0.99**steps)
    run = jax.jit(
        functools.partial(_momentum_after, steps=steps, grad=grad, params=params), static_argnums=0
    )
    small = np.ones(n, bool)
    small[::256] = False
    for rounding, ok in [('stochastic', True), ('nearest', False)]:
        mu = run(lion_optax.scale_by_lion(mu_dtype='int8', mu_rounding=rounding))['w']
        assert isinstance(mu, lion_optax.QuantizedMomentum)
        m = np.asarray(precision.dequantize_blockwise(mu, (n,)))
        np.testing.assert_allclose(m[~small], 1.0 - 0.99**steps, rtol=1e-5)
        close = abs(m[small].mean() - target) < 0.1 * target
        assert close == ok, (rounding, m[small].mean(), target)


@pytest.mark.parametrize('size', [1024, 4097])
@pytest.mark.parametrize('stochastic', [False, True])
def test_quantize_blockwise_error_bound(size, stochastic):
    x = jax.random.normal(jax.random.key(size), (size,)) * jnp.linspace(0.01, 10.0, size)

    @jax.jit
    def roundtrip(x):
        q = precision.quantize_blockwise(x, 256, _bits(1, (size,)) if stochastic else None)
        return q, precision.dequantize_blockwise(q, (size,))

    q, y = roundtrip(x)
    assert q.values.dtype == jnp.int8 and q.values.shape == (-(-size // 256), 256)
    step = np.repeat(np.asarray(q.scales), 256)[:size] / 127
    error = np.abs(np.asarray(y) - np.asarray(x))
    assert np.all(error <= step * (1.0 if stochastic else 0.5) * (1 + 1e-5) + 1e-30)
    # Each block's largest element is exact (up to float32 rounding).
    blocks = np.pad(np.asarray(x), (0, q.values.size - size)).reshape(-1, 256)
    np.testing.assert_allclose(np.asarray(q.scales), np.abs(blocks).max(1), rtol=1e-6)


def test_quantize_blockwise_zero_block_and_nan():
    q = precision.quantize_blockwise(jnp.zeros(8), 4)
    np.testing.assert_array_equal(precision.dequantize_blockwise(q, (8,)), np.zeros(8))
    q = precision.quantize_blockwise(jnp.array([1.0, jnp.nan, 2.0, 3.0]), 2)
    assert np.isnan(np.asarray(q.scales[0])) and float(q.scales[1]) == 3.0


def test_state_bytes_per_parameter():
    params = {'w': jnp.zeros((256, 64)), 'b': jnp.zeros(64)}  # 16384 + 64 parameters
    n = 16384 + 64

    def state_bytes(tx):
        return sum(x.nbytes for x in jax.tree.leaves(optax.tree.get(tx.init(params), 'mu')))

    assert state_bytes(lion_optax.lion(1e-4)) == 4 * n
    assert state_bytes(lion_optax.lion(1e-4, mu_dtype=jnp.bfloat16)) == 2 * n
    int8 = state_bytes(lion_optax.lion(1e-4, mu_dtype='int8'))
    assert int8 == 16384 * (1 + 4 / 256) + 4 * 64  # the small bias stays float32
    assert int8 / n < 1.05
    adam = optax.adamw(1e-3).init(params)
    assert sum(x.nbytes for x in jax.tree.leaves(adam) if x.size > 1) == 8 * n


@pytest.mark.parametrize('mu_dtype', [jnp.bfloat16, 'int8'])
def test_low_precision_momentum_inside_lion_skips_nonfinite_steps(mu_dtype):
    tx = lion_optax.lion(1e-3, mu_dtype=mu_dtype)
    params = {'w': jnp.ones(8192), 'b': jnp.ones(3)}
    state = tx.init(params)
    update = jax.jit(tx.update)
    grads = jax.tree.map(lambda p: 0.5 * p, params)
    _, state = update(grads, state, params)
    before = optax.tree.get(state, 'mu')
    bad = {'w': grads['w'].at[5].set(jnp.nan), 'b': grads['b']}
    updates, state = update(bad, state, params)
    chex.assert_trees_all_equal(optax.tree.get(state, 'mu'), before)
    chex.assert_trees_all_equal(updates, jax.tree.map(jnp.zeros_like, params))
    assert int(state.skipped_steps) == 1


def test_int8_momentum_trains_and_works_with_inject_hyperparams():
    params = {'w': jnp.linspace(-1.0, 1.0, 4096).reshape(64, 64)}

    def loss(p):
        return jnp.sum((p['w'] - 0.3) ** 2)

    spec = lion_optax.Int8Momentum(block_size=128, min_quantized_size=1024)
    tx = optax.inject_hyperparams(lion_optax.lion)(learning_rate=5e-2, mu_dtype=spec)
    state = tx.init(params)
    assert optax.tree.get(state, 'mu')['w'].values.shape == (32, 128)

    @jax.jit
    def step(params, state):
        updates, state = tx.update(jax.grad(loss)(params), state, params)
        return optax.apply_updates(params, updates), state

    start = loss(params)
    for _ in range(40):
        params, state = step(params, state)
    assert loss(params) < 0.1 * start


# ---------------------------------------------------------------------------
# Low-precision parameters


def _mean_after(tx, params, grad, steps):
    state = tx.init(params)

    def body(carry, _):
        params, state = carry
        updates, state = tx.update(grad, state, params)
        return (optax.apply_updates(params, updates), state), None

    (params, _), _ = jax.lax.scan(body, (params, state), None, length=steps)
    return params


@pytest.mark.parametrize('dtype', [jnp.bfloat16, jnp.float16])
def test_low_precision_params_move_by_the_learning_rate(dtype):
    """4096 params at 1.0, lr = 1e-4, 50 steps: the mean moves by 50 lr (within 1.5e-3)."""
    lr, steps = 1e-4, 50
    params = jnp.ones(4096, dtype)
    grad = jnp.full(4096, 0.25, dtype)  # sign +1: the parameters go down
    stochastic = jax.jit(_mean_after, static_argnums=(0, 3))(
        lion_optax.lion(lr, weight_decay=0.0), params, grad, steps
    )
    nearest = jax.jit(_mean_after, static_argnums=(0, 3))(
        lion_optax.lion(lr, weight_decay=0.0, param_rounding='nearest'), params, grad, steps
    )
    assert stochastic.dtype == nearest.dtype == dtype
    moved = 1.0 - float(jnp.mean(stochastic.astype(jnp.float32)))
    assert abs(moved - steps * lr) < 1.5e-3, moved
    if dtype == jnp.bfloat16:  # round to nearest swallows every step
        assert float(jnp.mean(nearest.astype(jnp.float32))) == 1.0


def test_param_rounding_is_deterministic_given_the_seed():
    params = jnp.ones(512, jnp.bfloat16)
    grad = jnp.linspace(-1.0, 1.0, 512).astype(jnp.bfloat16)
    a = _mean_after(lion_optax.lion(1e-4, seed=1), params, grad, 20)
    b = _mean_after(lion_optax.lion(1e-4, seed=1), params, grad, 20)
    c = _mean_after(lion_optax.lion(1e-4, seed=2), params, grad, 20)
    chex.assert_trees_all_equal(a, b)
    assert bool(jnp.any(a != c))


def test_round_updates_to_params_lands_exactly_and_leaves_float32_alone():
    tx = lion_optax.round_updates_to_params(seed=3)
    params = {'lo': jnp.linspace(0.5, 4.0, 1000).astype(jnp.bfloat16), 'hi': jnp.ones(4)}
    updates = {'lo': jnp.full(1000, -3e-3, jnp.bfloat16), 'hi': jnp.full(4, 1e-9)}
    rounded, _ = jax.jit(tx.update)(updates, tx.init(params), params)
    np.testing.assert_array_equal(rounded['hi'], updates['hi'])
    new = np.asarray(optax.apply_updates(params, rounded)['lo'], np.float32)
    old = np.asarray(params['lo'], np.float32)
    exact = old + np.asarray(updates['lo'], np.float32)
    # apply_updates reproduces the rounded target exactly: p + u' is the bf16
    # value picked, one of the two neighbours of the exact float32 sum.
    lo = np.asarray(exact.astype(jnp.bfloat16), np.float32)
    lo = np.where(
        lo > exact,
        np.asarray(
            np.nextafter(lo.astype(jnp.bfloat16), np.asarray(-np.inf, jnp.bfloat16)), np.float32
        ),
        lo,
    )
    hi = np.asarray(
        np.nextafter(lo.astype(jnp.bfloat16), np.asarray(np.inf, jnp.bfloat16)), np.float32
    )
    assert np.all((new == lo) | (new == hi))
    assert abs(float(np.mean(new - old)) + 3e-3) < 3e-4


# ---------------------------------------------------------------------------
# Options are checked when the optimizer is built


@pytest.mark.parametrize(
    'kwargs, error',
    [
        (dict(mu_rounding='up'), ValueError),
        (dict(param_rounding='floor'), ValueError),
        (dict(seed='0'), TypeError),
        (dict(seed=1.5), TypeError),
        (dict(mu_dtype=jnp.int32), TypeError),
        (dict(mu_dtype=jnp.int8), TypeError),
        (dict(mu_dtype=lion_optax.Int8Momentum(block_size=0)), ValueError),
        (dict(mu_dtype=lion_optax.Int8Momentum(min_quantized_size=-1)), ValueError),
    ],
)
def test_bad_precision_options_fail_at_construction(kwargs, error):
    with pytest.raises(error):
        lion_optax.lion(1e-4, **kwargs)


def test_mu_dtype_int8_spellings_agree():
    params = {'w': jnp.zeros(5000)}
    for spelling in ('int8', lion_optax.Int8Momentum()):
        mu = lion_optax.scale_by_lion(mu_dtype=spelling).init(params).mu['w']
        assert mu.values.shape == (20, 256) and mu.scales.shape == (20,)
