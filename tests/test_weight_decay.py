"""The two weight-decay conventions, schedules and masks."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lion_optax


def _run(tx, params, steps):
    state = tx.init(params)
    for _ in range(steps):
        grads = jax.tree.map(jnp.zeros_like, params)  # sign(0) = 0: pure decay
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
    return params


def test_paper_convention_decays_by_lr_times_wd():
    params = _run(lion_optax.lion(0.1, weight_decay=0.5), jnp.ones(2), steps=3)
    np.testing.assert_allclose(params, (1 - 0.1 * 0.5) ** 3 * np.ones(2), rtol=1e-6)


def test_fully_decoupled_with_constant_lr_decays_by_wd_alone():
    tx = lion_optax.lion(1e-4, weight_decay=0.01, weight_decay_convention='fully_decoupled')
    params = _run(tx, jnp.ones(2), steps=5)
    np.testing.assert_allclose(params, 0.99**5 * np.ones(2), rtol=1e-6)


def test_fully_decoupled_follows_the_schedule_shape():
    schedule = optax.schedules.linear_schedule(1e-3, 0.0, 4)
    tx = lion_optax.lion(
        schedule, weight_decay=0.1,
        weight_decay_convention=lion_optax.FullyDecoupled(reference_learning_rate=1e-3),
    )
    params = _run(tx, jnp.ones(1), steps=4)
    expected = np.prod([1 - float(schedule(t)) / 1e-3 * 0.1 for t in range(4)])
    np.testing.assert_allclose(params, [expected], rtol=1e-6)


@pytest.mark.optax_promotion  # optax's schedules: 0.1 * count, count int32
def test_weight_decay_schedule_is_followed():
    wd = optax.schedules.piecewise_constant_schedule(0.5, {2: 0.0})
    params = _run(lion_optax.lion(0.1, weight_decay=wd), jnp.ones(1), steps=4)
    np.testing.assert_allclose(params, [(1 - 0.05) ** 2], rtol=1e-6)


@pytest.mark.parametrize('as_callable', [False, True])
def test_mask_excludes_leaves(as_callable):
    params = {'kernel': jnp.ones(2), 'bias': jnp.ones(2)}
    mask = {'kernel': True, 'bias': False}
    tx = lion_optax.lion(0.1, weight_decay=0.5, mask=(lambda p: mask) if as_callable else mask)
    out = _run(tx, params, steps=2)
    np.testing.assert_allclose(out['kernel'], 0.95**2 * np.ones(2), rtol=1e-6)
    np.testing.assert_array_equal(out['bias'], np.ones(2))


def test_decay_uses_theta_before_the_step():
    """theta_1 = theta_0 - lr (sign(c) + wd theta_0), not theta_0 (1 - lr wd) - lr sign(c) after."""
    tx = lion_optax.lion(0.5, weight_decay=0.5)
    params = jnp.array([2.0])
    updates, _ = tx.update(jnp.array([1.0]), tx.init(params), params)
    np.testing.assert_allclose(optax.apply_updates(params, updates), [2.0 - 0.5 * (1 + 0.5 * 2.0)])


def test_empty_mask_tree_is_refused():
    with pytest.raises(ValueError, match='mask is an empty tree'):
        lion_optax.add_decoupled_weight_decay(0.1, mask={})
