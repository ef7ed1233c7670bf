"""Tests of lion_optax/_src/direction.py: one parameter's step, in each platform's form.

``lion_leaf_step`` is a pure function of one leaf, written four ways (optax's
order or the interpolation read back from the new momentum; with or without the
barrier; the non-finite gradient zeroed first or selected between results; the
int8 block maximum in XLA:CPU's form or the accelerators'). Each form is checked
here on XLA:CPU against NumPy's float64 formulas: the same momentum, the same
sign of the interpolation, the same handling of non-finite elements and of a
step that must not happen. The compiled forms on TPU and H100 are checked in
``test_formulation_aot.py``; the whole transformation against the pure-Python
reference in ``test_reference_parity.py``.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lion_optax._src import direction, momentum_storage
from lion_optax._src.formulation import momentum_first_coefficients

B1, B2 = 0.9, 0.99
READ_BACK = momentum_first_coefficients(B1, B2)
WORD = jnp.uint32(12345)
FLOAT32 = momentum_storage.LeafStorage(jnp.dtype(jnp.float32), 0, False)
BF16_SR = momentum_storage.LeafStorage(jnp.dtype(jnp.bfloat16), 0, True)
FP16_SR = momentum_storage.LeafStorage(jnp.dtype(jnp.float16), 0, True)
INT8 = momentum_storage.LeafStorage(jnp.dtype(jnp.int8), 64, False)
INT8_SR = momentum_storage.LeafStorage(jnp.dtype(jnp.int8), 64, True)

# (read_back, barrier, cpu, zero_first): optax's order as on the accelerators,
# XLA:CPU's form, and the two in between.
FORMS = {
    'accelerator': dict(read_back=None, barrier=False, cpu=False, zero_first=True),
    'cpu': dict(read_back=READ_BACK, barrier=True, cpu=True, zero_first=False),
    'tpu_read_back': dict(read_back=READ_BACK, barrier=False, cpu=False, zero_first=True),
    'select_between_results': dict(read_back=None, barrier=False, cpu=False, zero_first=False),
}


def _leaf(seed=0, shape=(8, 128)):
    rng = np.random.default_rng(seed)
    g = rng.normal(size=shape).astype(np.float32)
    m = (0.3 * rng.normal(size=shape)).astype(np.float32)
    return g, m


def _step(g, m, form, storage=FLOAT32, step_is_valid=None, nonfinite='zero'):
    stored, scales = momentum_storage.zeros(storage, m, lambda x, dtype: jnp.zeros_like(x, dtype))
    if storage.quantized:
        stored, scales = momentum_storage.encode(storage, jnp.asarray(m), None)
    else:
        stored = jnp.asarray(m).astype(storage.dtype)
    step = jax.jit(
        lambda g, stored, scales, valid: direction.lion_leaf_step(
            g, stored, scales, WORD, valid, b1=B1, b2=B2, storage=storage,
            nonfinite=nonfinite, **FORMS[form],
        )
    )
    out = step(jnp.asarray(g), stored, scales, step_is_valid)
    m_old = np.asarray(momentum_storage.decode(storage, stored, scales, jnp.float32), np.float64)
    return out, m_old


@pytest.mark.parametrize('form', FORMS)
def test_every_form_is_lions_step_for_finite_gradients(form):
    g, m = _leaf()
    out, m_old = _step(g, m, form)
    g64 = g.astype(np.float64)
    c = B1 * m_old + (1 - B1) * g64
    np.testing.assert_allclose(np.asarray(out.stored), B2 * m_old + (1 - B2) * g64, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(np.asarray(out.interpolation), c, rtol=1e-5, atol=1e-6)
    # The sign can differ only where momentum and gradient cancel (the bound of
    # formulation.momentum_first_coefficients); these random leaves have no such element.
    np.testing.assert_array_equal(np.sign(np.asarray(out.interpolation)), np.sign(c))
    np.testing.assert_array_equal(np.asarray(out.gradient), g)


@pytest.mark.parametrize('form', FORMS)
def test_a_nonfinite_gradient_element_steps_as_a_zero_gradient_in_every_form(form):
    g, m = _leaf(1)
    g[0, :3] = [np.nan, np.inf, -np.inf]
    out, m_old = _step(g, m, form)
    stored, c = np.asarray(out.stored), np.asarray(out.interpolation)
    np.testing.assert_allclose(stored[0, :3], B2 * m_old[0, :3], rtol=1e-6)
    np.testing.assert_allclose(c[0, :3], B1 * m_old[0, :3], rtol=1e-5)
    assert np.isfinite(stored).all() and np.isfinite(c).all()
    np.testing.assert_array_equal(np.asarray(out.gradient)[0, :3], 0.0)  # as counted
    # The other elements do not notice.
    clean = g.copy()
    clean[0, :3] = 0.0
    expected, _ = _step(clean, m, form)
    np.testing.assert_array_equal(stored, np.asarray(expected.stored))


@pytest.mark.parametrize('form', FORMS)
def test_propagate_lets_nan_reach_the_momentum(form):
    g, m = _leaf(2)
    g[1, 5] = np.nan
    out, _ = _step(g, m, form, nonfinite='propagate')
    assert np.isnan(np.asarray(out.stored)[1, 5]) and np.isnan(np.asarray(out.interpolation)[1, 5])
    assert np.isfinite(np.delete(np.asarray(out.stored).ravel(), 1 * 128 + 5)).all()


@pytest.mark.parametrize(
    'storage', [FLOAT32, BF16_SR, FP16_SR, INT8, INT8_SR],
    ids=['f32', 'bf16_sr', 'fp16_sr', 'int8', 'int8_sr'],
)
@pytest.mark.parametrize('form', FORMS)
def test_a_step_that_must_not_happen_keeps_the_stored_momentum(form, storage):
    """Bit for bit, scales included: re-encoding the kept momentum would round it again."""
    g, m = _leaf(3)
    stored, scales = momentum_storage.encode(storage, jnp.asarray(m), None) if storage.quantized \
        else (jnp.asarray(m).astype(storage.dtype), None)
    out, _ = _step(g, m, form, storage=storage, step_is_valid=jnp.array(False))
    np.testing.assert_array_equal(np.asarray(out.stored), np.asarray(stored))
    if storage.quantized:
        np.testing.assert_array_equal(np.asarray(out.scales), np.asarray(scales))


def test_int8_forms_store_the_same_codes_and_scales():
    """XLA:CPU's block maximum (variadic) and the accelerators' (its own pass) agree.

    To the last bit of the momentum, which XLA:CPU's multiply-add contraction
    decides differently in each form: the scales to an ulp, a code by at most one
    step where its value sits on a rounding boundary.
    """
    g, m = _leaf(4, shape=(4, 256))
    outs = {form: _step(g, m, form, storage=INT8)[0] for form in FORMS}
    for a, b in itertools.combinations(outs.values(), 2):
        np.testing.assert_allclose(np.asarray(a.scales), np.asarray(b.scales), rtol=2**-22, atol=0)
        codes = np.abs(np.asarray(a.stored, np.int32) - np.asarray(b.stored, np.int32))
        assert codes.max() <= 1 and np.mean(codes != 0) < 1e-2
    assert all(out.stored.dtype == jnp.int8 for out in outs.values())


def test_stochastic_rounding_into_bf16_is_unbiased_and_draws_from_the_step_word():
    g, m = _leaf(5)
    out, m_old = _step(g, m, 'accelerator', storage=BF16_SR)
    exact = B2 * m_old + (1 - B2) * g.astype(np.float64)
    stored = np.asarray(out.stored, np.float64)
    assert out.stored.dtype == jnp.bfloat16
    # Each element is one of the two bf16 neighbours of the exact value ...
    assert np.all(np.abs(stored - exact) <= np.abs(exact) * 2.0**-7 + 1e-30)
    # ... and the rounding errors average out (nearest rounding would not on this leaf).
    assert abs(np.mean(stored - exact)) < 5e-4 * np.mean(np.abs(exact))


def test_kept_fractions_count_where_direction_and_gradient_agree():
    u = [jnp.array([1.0, -1.0, 1.0, 0.0]), jnp.array([[1.0, 1.0], [-1.0, -1.0]])]
    g = [jnp.array([2.0, -3.0, -1.0, 5.0]), jnp.array([[1e-30, jnp.nan], [-1e-30, 1.0]])]
    # 'propagate': NaN never agrees; tiny products that underflow still agree.
    np.testing.assert_allclose(direction.kept_fractions(u, g), [0.5, 0.5])
    np.testing.assert_allclose(direction.kept_fractions(u, g, nonfinite='zero'), [0.5, 0.5])


def test_cautious_mask_rescales_what_it_keeps_by_the_kept_fraction():
    u = jnp.array([1.0, -1.0, 1.0, -1.0])
    g = jnp.array([1e-30, 1e-30, -2.0, -2.0])  # u * g underflows in float32: signs decide
    masked = direction.cautious_mask(u, g, eps=0.0)
    np.testing.assert_array_equal(np.asarray(masked), [2.0, 0.0, 0.0, -2.0])
    np.testing.assert_array_equal(
        np.asarray(direction.cautious_mask(u, g, eps=0.0, mean=jnp.array(0.25))), [4.0, 0, 0, -4.0]
    )


def test_the_platform_dispatch_on_cpu_is_the_cpu_form():
    g, m = _leaf(6)
    config = direction.LeafConfig(FLOAT32, 'zero', True, (B1, B2), READ_BACK)
    got = direction.leaf_step_for_every_platform(
        jnp.asarray(g), jnp.asarray(m), None, WORD, None, None, config=config
    )
    expected, _ = _step(g, m, 'cpu')
    for a, b in zip(got, expected):
        if a is not None:
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
