"""The hot path's formulation: its compiled structure and its numerics (no timing here).

Lion is memory bound. On XLA:CPU the reference order (c from the old momentum,
then the momentum updated in place) compiles to two loops that both read the old
momentum plus a full copy of it, because XLA cannot prove the reader runs before
the in-place writer. ``scale_by_lion`` computes c from the *new* momentum
instead (see its Numerics): two loops, no copy, 28 bytes per float32 parameter
instead of 36 plus the copy's allocation; with bfloat16 momentum 22 instead of
26. These tests pin that structure, for the default non-finite guard too, and
the error bound of the reordering.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lion_optax
from lion_optax._src.formulation import momentum_first_coefficients

N, LEAVES = 4096, 3


def _compiled_entry(tx, dtype=jnp.float32):
    params = [jnp.zeros(N + 64 * i, dtype) for i in range(LEAVES)]
    state = tx.init(params)

    def step(params, grads, state):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    compiled = jax.jit(step, donate_argnums=(0, 2)).lower(params, params, state).compile()
    return compiled.as_text().split('ENTRY', 1)[1]


def _copies(entry):
    return re.findall(r'= (\S+) copy\(', entry)


def _array_fusions(entry):
    """Loop fusions whose result is a parameter-sized float array."""
    return [s for s in re.findall(r'= (\S+) fusion\(', entry) if re.match(r'f32\[\d{4,}\]', s)]


@pytest.mark.parametrize('nonfinite', ['zero', 'propagate'])
def test_lion_step_is_two_loops_per_leaf_and_no_copy(nonfinite):
    """The default element-wise guard costs no loop and no copy."""
    entry = _compiled_entry(lion_optax.lion(1e-4, nonfinite=nonfinite))
    assert _copies(entry) == []
    assert len(_array_fusions(entry)) == 2 * LEAVES


def test_bfloat16_momentum_is_two_loops_per_leaf_and_no_copy():
    """The stochastically rounded momentum is computed once and read back (no copy)."""
    entry = _compiled_entry(lion_optax.lion(1e-4, mu_dtype=jnp.bfloat16))
    assert [c for c in _copies(entry) if re.match(r'(bf16|f32)\[', c)] == []
    stored = [s for s in re.findall(r'= (\S+) fusion\(', entry) if re.match(r'bf16\[\d{4,}\]', s)]
    assert len(stored) == LEAVES and len(_array_fusions(entry)) == LEAVES


def test_the_structure_check_detects_the_reference_order_copy():
    """b1 > b2 falls back to the reference order, which XLA:CPU compiles with a
    copy of the momentum: the tests above would catch a regression."""
    entry = _compiled_entry(lion_optax.lion(1e-4, b1=0.99, b2=0.9))
    assert len([c for c in _copies(entry) if c.startswith('f32[')]) == LEAVES


@pytest.mark.parametrize('b1, b2', [(0.9, 0.99), (0.95, 0.98), (0.0, 0.99), (0.9, 0.9), (0.5, 1.0)])
def test_reordered_interpolation_error_bound(b1, b2):
    """|c_fast - c_ref| <= 9 u (b1 |m| + (1 - b1) |g|), u = 2**-24 (float32)."""
    rng = np.random.default_rng(0)
    n = 200_000
    scale = np.exp(rng.uniform(-20, 20, n)).astype(np.float32)
    m = (rng.normal(size=n) * scale).astype(np.float32)
    g = (rng.normal(size=n) * scale * np.exp(rng.uniform(-3, 3, n))).astype(np.float32)
    m, g = jnp.asarray(m), jnp.asarray(g)
    k1, k2 = momentum_first_coefficients(b1, b2)
    m_new = (1.0 - b2) * g + b2 * m
    c_fast = k2 * g + k1 * m_new
    c_ref = (1.0 - b1) * g + b1 * m
    exact = b1 * np.asarray(m, np.float64) + (1 - b1) * np.asarray(g, np.float64)
    size = b1 * np.abs(np.asarray(m, np.float64)) + (1 - b1) * np.abs(np.asarray(g, np.float64))
    u = 2.0**-24
    assert np.all(np.abs(np.asarray(c_fast, np.float64) - exact) <= 6 * u * size)
    assert np.all(
        np.abs(np.asarray(c_fast, np.float64) - np.asarray(c_ref, np.float64)) <= 9 * u * size
    )
    # The sign can only differ where c is within the bound of zero.
    differs = np.sign(np.asarray(c_fast)) != np.sign(np.asarray(c_ref))
    assert np.all(np.abs(exact[differs]) <= 9 * u * size[differs])


def test_coefficients_only_where_the_bound_holds():
    assert momentum_first_coefficients(0.9, 0.99) == pytest.approx((0.9 / 0.99, 0.09 / 0.99))
    assert momentum_first_coefficients(0.99, 0.9) is None  # b1 > b2
    assert momentum_first_coefficients(0.9, 0.0) is None  # m_{t-1} not recoverable
    assert momentum_first_coefficients(jnp.array(0.9), 0.99) == pytest.approx(
        (0.9 / 0.99, 0.09 / 0.99)
    )

    @jax.jit
    def traced(b1):
        assert momentum_first_coefficients(b1, 0.99) is None
        return b1

    traced(0.9)


def test_momentum_is_bit_identical_and_steps_match_the_reference_order():
    """The momentum is computed exactly as before; the parameters follow optax.lion."""
    rng = np.random.default_rng(3)
    params = {'a': jnp.asarray(rng.normal(size=3000), jnp.float32)}
    ours, theirs = lion_optax.lion(1e-3, weight_decay=0.1), optax.lion(1e-3, weight_decay=0.1)
    s_ours, s_theirs = ours.init(params), theirs.init(params)
    p_ours = p_theirs = params
    update_ours, update_theirs = jax.jit(ours.update), jax.jit(theirs.update)
    for t in range(30):
        g = {'a': jnp.asarray(rng.normal(size=3000) + np.sin(t), jnp.float32)}
        u, s_ours = update_ours(g, s_ours, p_ours)
        p_ours = optax.apply_updates(p_ours, u)
        u, s_theirs = update_theirs(g, s_theirs, p_theirs)
        p_theirs = optax.apply_updates(p_theirs, u)
    np.testing.assert_array_equal(optax.tree.get(s_ours, 'mu')['a'], s_theirs[0].mu['a'])
    np.testing.assert_array_equal(p_ours['a'], p_theirs['a'])
