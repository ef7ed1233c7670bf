"""The int8 TPU kernel against the XLA formulation, in Pallas' interpret mode on CPU.

The kernel (``lion_optax._src.int8_kernel``) computes int8 momentum's step in the
transposed domain of each tile; here it runs through Pallas' interpreter and is
compared with :func:`lion_leaf_step`'s XLA form: the same arithmetic in the
same order. XLA:CPU contracts multiply-adds into FMAs depending on how it fuses
each program, so the interpreted kernel and the XLA step can differ in the last
bit of a value: the scales agree to an ulp, a code by at most one step where the
value sits on a rounding boundary, and the direction wherever c is not within an
ulp of 0. What the TPU compiler makes of the kernel is pinned in
tests/test_formulation_aot.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lion_optax._src import direction, int8_kernel, momentum_storage, rounding

SHAPES = [(256, 1024), (384, 768), (300, 512)]  # 300: a partial last tile of rows


def _problem(shape, seed=0):
    rng = np.random.default_rng(seed)
    g = jnp.asarray(rng.normal(size=shape).astype(np.float32))
    g = g.at[0, 0].set(jnp.nan).at[5, 7].set(jnp.inf)
    codes, scales = momentum_storage.quantize_blockwise(
        jnp.asarray(rng.normal(size=shape).astype(np.float32) * 0.1), 32
    )
    word = rounding.step_word(3, rounding.MOMENTUM_STREAM, jnp.int32(7))
    return g, codes, scales, word


def _both(shape, stochastic, valid, b1, b2):
    g, codes, scales, word = _problem(shape)
    storage = momentum_storage.LeafStorage(jnp.dtype(jnp.int8), 32, stochastic)
    ok = jnp.asarray(valid)

    def xla(b1, b2):
        return direction.lion_leaf_step(g, codes, scales, word, ok, b1=b1, b2=b2,
                                        storage=storage, nonfinite='zero')

    def kernel(b1, b2):
        return int8_kernel.int8_leaf_step(g, codes, scales, word, ok, b1=b1, b2=b2,
                                          storage=storage, nonfinite='zero', interpret=True)

    return jax.jit(xla)(b1, b2), jax.jit(kernel)(b1, b2)


def _assert_same_step(kernel, ours):
    np.testing.assert_allclose(kernel.scales, ours.scales, rtol=2**-22, atol=0)
    codes = np.abs(np.asarray(kernel.stored, np.int32) - np.asarray(ours.stored, np.int32))
    assert codes.max() <= 1 and np.mean(codes != 0) < 1e-3, (codes.max(), np.mean(codes != 0))
    sign = np.sign(np.asarray(ours.interpolation))
    differ = np.asarray(kernel.interpolation) != sign
    assert np.all(np.abs(np.asarray(ours.interpolation))[differ] < 1e-6)
    np.testing.assert_array_equal(kernel.gradient, ours.gradient)


@pytest.mark.parametrize('shape', SHAPES)
@pytest.mark.parametrize('stochastic', [True, False])
@pytest.mark.parametrize('traced', [True, False])
def test_the_kernel_computes_the_xla_step(shape, stochastic, traced):
    betas = (jnp.float32(0.9), jnp.float32(0.99)) if traced else (0.9, 0.99)
    g, codes, scales, word = _problem(shape)
    storage = momentum_storage.LeafStorage(jnp.dtype(jnp.int8), 32, stochastic)
    step = dict(storage=storage, nonfinite='zero')
    ours = jax.jit(lambda b1, b2: direction.lion_leaf_step(
        g, codes, scales, word, None, b1=b1, b2=b2, **step), static_argnums=() if traced else (0, 1))
    kernel = jax.jit(lambda b1, b2: int8_kernel.int8_leaf_step(
        g, codes, scales, word, None, b1=b1, b2=b2, interpret=True, **step),
        static_argnums=() if traced else (0, 1))
    _assert_same_step(kernel(*betas), ours(*betas))


def test_an_invalid_step_keeps_the_momentum_in_the_kernel_too():
    ours, kernel = _both((256, 1024), True, False, jnp.float32(0.9), jnp.float32(0.99))
    _assert_same_step(kernel, ours)
    g, codes, scales, _ = _problem((256, 1024))
    # The momentum is kept bit for bit, codes and scales (stochastic rounding of the
    # kept momentum, or its block maxima, would move them).
    for step in (kernel, ours):
        np.testing.assert_array_equal(step.stored, codes)
        np.testing.assert_array_equal(step.scales, scales)


@pytest.mark.parametrize('shape, block, expected', [
    ((1024, 4096), 32, True),
    ((1024, 768), 32, True),
    ((64, 4096), 32, False),     # fewer rows than a tile of 128
    ((1024, 1000), 32, False),   # the last axis is not whole blocks
    ((1024, 4096), 4, False),    # a block shorter than 8 sublanes
    ((4, 1024, 768), 32, False),  # not two-dimensional
])
def test_the_kernel_applies_where_its_tiles_fit(shape, block, expected):
    storage = momentum_storage.LeafStorage(jnp.dtype(jnp.int8), block, True)
    g = jax.ShapeDtypeStruct(shape, jnp.float32)
    assert int8_kernel.applies(g, storage, sign=True, nonfinite='zero') is expected
    assert not int8_kernel.applies(g, storage, sign=False, nonfinite='zero')
    assert not int8_kernel.applies(g, storage, sign=True, nonfinite='propagate')
