"""Low-precision momentum that loses nothing on average (lion_optax/_src/momentum_storage.py)."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lion_optax
from lion_optax._src import momentum_storage


def _bits(seed, shape):
    return jax.random.bits(jax.random.key(seed), shape, jnp.uint32)


# ---------------------------------------------------------------------------
# Low-precision momentum


def _momentum_after(tx, steps, grad, params):
    """The momentum after ``steps`` updates with a constant gradient (one compile)."""
    state = tx.init(params)

    def body(state, _):
        _, state = tx.update(grad, state, params)
        return state, None

    state, _ = jax.lax.scan(body, state, None, length=steps)
    return state


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
    stochastic = run(lion_optax.scale_by_lion(b2=0.999, mu_dtype=mu_dtype)).mu['w']
    nearest = run(lion_optax.scale_by_lion(
        b2=0.999, mu_dtype=mu_dtype, rounding=lion_optax.Rounding(momentum='nearest'))).mu['w']
    assert stochastic.dtype == nearest.dtype == mu_dtype
    mean = float(np.mean(np.asarray(stochastic, np.float32)))
    assert abs(mean - target) < 0.01, mean
    # Round to nearest stalls far below (the failure the option fixes): at
    # about 0.5 in bfloat16, 0.76 in float16.
    assert float(np.max(np.asarray(nearest, np.float32))) < target - 0.2


def test_int8_momentum_tracks_values_much_smaller_than_the_block_max():
    """One element per block at 1, the rest at 0.003: a step is 1/127 of the max."""
    n, steps, block = 4096, 600, 32
    g = np.full(n, 0.003, np.float32)
    g[::block] = 1.0
    params, grad = {'w': jnp.zeros(n)}, {'w': jnp.asarray(g)}
    target = 0.003 * (1.0 - 0.99**steps)
    run = jax.jit(
        functools.partial(_momentum_after, steps=steps, grad=grad, params=params), static_argnums=0
    )
    small = np.ones(n, bool)
    small[::block] = False
    for rounding, ok in [('stochastic', True), ('nearest', False)]:
        state = run(lion_optax.scale_by_lion(
            mu_dtype='int8', rounding=lion_optax.Rounding(momentum=rounding)))
        assert isinstance(state, lion_optax.ScaleByLionInt8State)
        assert state.mu['w'].dtype == jnp.int8 and state.mu['w'].shape == (n,)
        assert state.mu_scales['w'].shape == (n // block,)
        m = np.asarray(momentum_storage.dequantize_blockwise(state.mu['w'], state.mu_scales['w'], block))
        np.testing.assert_allclose(m[~small], 1.0 - 0.99**steps, rtol=1e-5)
        close = abs(m[small].mean() - target) < 0.1 * target
        assert close == ok, (rounding, m[small].mean(), target)


@pytest.mark.parametrize('shape', [(1024,), (4097,), (8, 100), (3, 5, 64)])
@pytest.mark.parametrize('stochastic', [False, True])
def test_quantize_blockwise_error_bound(shape, stochastic):
    size = int(np.prod(shape))
    x = jax.random.normal(jax.random.key(size), shape) * jnp.linspace(0.01, 10.0, size).reshape(shape)
    block = 32

    @jax.jit
    def roundtrip(x):
        codes, scales = momentum_storage.quantize_blockwise(
            x, block, _bits(1, shape) if stochastic else None
        )
        return codes, scales, momentum_storage.dequantize_blockwise(codes, scales, block)

    codes, scales, y = roundtrip(x)
    # Codes keep the parameter's shape; scales divide its last axis into blocks.
    assert codes.dtype == jnp.int8 and codes.shape == shape
    assert scales.shape == (*shape[:-1], -(-shape[-1] // block))
    step = np.repeat(np.asarray(scales), block, axis=-1)[..., : shape[-1]] / 127
    error = np.abs(np.asarray(y) - np.asarray(x))
    assert np.all(error <= step * (1.0 if stochastic else 0.5) * (1 + 1e-5) + 1e-30)
    # Each block's largest element is exact (up to float32 rounding).
    pad = [(0, 0)] * (len(shape) - 1) + [(0, scales.shape[-1] * block - shape[-1])]
    blocks = np.pad(np.asarray(x), pad).reshape(*shape[:-1], -1, block)
    np.testing.assert_allclose(np.asarray(scales), np.abs(blocks).max(-1), rtol=1e-6)


def test_quantize_blockwise_zero_block_and_nan():
    codes, scales = momentum_storage.quantize_blockwise(jnp.zeros(8), 4)
    np.testing.assert_array_equal(momentum_storage.dequantize_blockwise(codes, scales, 4), np.zeros(8))
    codes, scales = momentum_storage.quantize_blockwise(jnp.array([1.0, jnp.nan, 2.0, 3.0]), 2)
    assert np.isnan(np.asarray(scales[0])) and float(scales[1]) == 3.0


def test_a_last_axis_shorter_than_the_block_is_one_block():
    codes, scales = momentum_storage.quantize_blockwise(jnp.ones((50, 3)), 32)
    assert codes.shape == (50, 3) and scales.shape == (50, 1)


def test_state_bytes_per_parameter():
    params = {'w': jnp.zeros((64, 256)), 'b': jnp.zeros(64)}  # 16384 + 64 parameters
    n = 16384 + 64

    def state_bytes(tx):
        state = tx.init(params)
        return sum(x.nbytes for key in ('mu', 'mu_scales') for x in
                   jax.tree.leaves(optax.tree.get(state, key, default=None)))

    assert state_bytes(lion_optax.lion(1e-4)) == 4 * n
    assert state_bytes(lion_optax.lion(1e-4, mu_dtype=jnp.bfloat16)) == 2 * n
    int8 = state_bytes(lion_optax.lion(1e-4, mu_dtype='int8'))
    assert int8 == 16384 * (1 + 4 / 32) + 4 * 64  # the small bias stays float32
    assert int8 / n < 1.15
    bitsandbytes_blocks = state_bytes(lion_optax.lion(1e-4, mu_dtype=lion_optax.Int8Momentum(256)))
    assert bitsandbytes_blocks / n < 1.05
    adam = optax.adamw(1e-3).init(params)
    assert sum(x.nbytes for x in jax.tree.leaves(adam) if x.size > 1) == 8 * n


@pytest.mark.parametrize('mu_dtype', [jnp.bfloat16, 'int8'])
def test_low_precision_momentum_inside_lion_skips_nonfinite_steps(mu_dtype):
    tx = lion_optax.lion(1e-3, mu_dtype=mu_dtype, nonfinite='skip_step')
    params = {'w': jnp.ones(8192), 'b': jnp.ones(3)}
    state = tx.init(params)
    update = jax.jit(tx.update)
    grads = jax.tree.map(lambda p: 0.5 * p, params)
    _, state = update(grads, state, params)
    bad = {'w': grads['w'].at[5].set(jnp.nan), 'b': grads['b']}
    updates, new_state = update(bad, state, params)
    chex.assert_trees_all_equal(new_state, state)
    chex.assert_trees_all_equal(updates, jax.tree.map(jnp.zeros_like, params))


def test_int8_momentum_trains_and_works_with_inject_hyperparams():
    params = {'w': jnp.linspace(-1.0, 1.0, 4096).reshape(64, 64)}

    def loss(p):
        return jnp.sum((p['w'] - 0.3) ** 2)

    spec = lion_optax.Int8Momentum(block_size=128, min_quantized_size=1024)
    tx = optax.inject_hyperparams(lion_optax.lion)(learning_rate=5e-2, mu_dtype=spec)
    state = tx.init(params)
    assert optax.tree.get(state, 'mu')['w'].shape == (64, 64)
    assert optax.tree.get(state, 'mu_scales')['w'].shape == (64, 1)

    @jax.jit
    def step(params, state):
        updates, state = tx.update(jax.grad(loss)(params), state, params)
        return optax.apply_updates(params, updates), state

    start = loss(params)
    for _ in range(40):
        params, state = step(params, state)
    assert loss(params) < 0.1 * start


# ---------------------------------------------------------------------------
# Options are checked when the optimizer is built


@pytest.mark.parametrize(
    'kwargs, error',
    [
        (dict(rounding=lion_optax.Rounding(momentum='up')), ValueError),
        (dict(rounding=lion_optax.Rounding(params='floor')), ValueError),
        (dict(rounding=lion_optax.Rounding(seed='0')), TypeError),
        (dict(rounding=lion_optax.Rounding(seed=1.5)), TypeError),
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
        state = lion_optax.scale_by_lion(mu_dtype=spelling).init(params)
        assert state.mu['w'].shape == (5000,) and state.mu['w'].dtype == jnp.int8
        assert state.mu_scales['w'].shape == (157,)  # ceil(5000 / 32)
