"""Cautious Lion (Liang et al. 2024): reference parity and the masking rule.

u = kappa(c); phi = 1[u * g > 0]; the direction is phi * u / (mean(phi) + eps),
mean over each array, eps = cautious_eps (1e-3 by default).
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from absl.testing import parameterized

import lion_optax
from lion_optax._src.reference import lion_reference

from _helpers import (
    from_leaves,
    random_grads,
    random_params,
    rounding_for,
    run_trajectory,
    to_leaves,
)

STEPS = 20
LR, WD = 1e-2, 0.1


class CautiousReferenceTest(chex.TestCase):

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(
        ('sign', 'sign', dict(kappa='sign')),
        ('l2_global', 'l2_global', dict(kappa='lp', kappa_p=2.0, kappa_scope='global')),
    )
    def test_float32_trajectory_equals_reference(self, kappa, reference_kwargs):
        """20 free-running steps; float32 vs float64 rounding only (see test_kappa).
        The mask acts on kappa(c) whatever kappa is: a global one shown here."""
        tx = lion_optax.lion(LR, weight_decay=WD, kappa=kappa, cautious=True)
        params, grads = random_params(0), random_grads(1, STEPS)
        history, state = run_trajectory(tx, params, grads, update_fn=self.variant(tx.update))
        reference = lion_reference(to_leaves(params), [to_leaves(g) for g in grads],
                                   learning_rate=LR, weight_decay=WD, cautious=True,
                                   **reference_kwargs)
        for t in (0, 1, STEPS - 1):
            chex.assert_trees_all_close(history[t], from_leaves(reference[t].params, params),
                                        rtol=1e-5, atol=1e-6)
        chex.assert_trees_all_close(optax.tree.get(state, 'mu'),
                                    from_leaves(reference[-1].momentum, params),
                                    rtol=1e-5, atol=1e-6)

    def test_bfloat16_steps_equal_reference(self):
        """bf16 state, step by step from the implementation's own state (bound as in
        test_kappa: one ulp of the parameter plus the rounding of the step). The
        cautious rescale makes the direction up to 1 / (mean(phi) + eps) long, so
        |d| <= 1 / (mean(phi) + eps) + wd |p|; where c is zero up to rounding the
        sign (and so the mask and the mean) may differ: that array's step may
        differ by its whole size."""
        tx = lion_optax.lion(LR, weight_decay=WD, cautious=True)
        update = jax.jit(tx.update)
        params = random_params(0, jnp.bfloat16)
        state = tx.init(params)
        for t, g in enumerate(random_grads(1, 10, jnp.bfloat16)):
            momentum = optax.tree.get(state, 'mu')
            expected = lion_reference(
                to_leaves(params), [to_leaves(g)], learning_rate=LR, weight_decay=WD,
                cautious=True, rounding=rounding_for(jnp.bfloat16),
                initial_momentum=to_leaves(momentum), first_step=t)[0]
            before = {k: np.abs(np.asarray(v, np.float64)) for k, v in params.items()}
            updates, state = update(g, state, params)
            params = optax.apply_updates(params, updates)
            want = from_leaves(expected.params, params)
            for name, value in params.items():
                m64 = np.asarray(momentum[name], np.float64)
                g64 = np.asarray(g[name], np.float64)
                c = 0.9 * m64 + 0.1 * g64
                phi = np.mean(np.sign(c) * np.sign(g64) > 0)
                d_max = 1.0 / (phi + 1e-3) + WD * before[name]
                bound = 2.0**-7 * np.abs(want[name]) + LR * 3 * 2.0**-7 * d_max + 1e-12
                if np.any(np.abs(c) <= 1e-6 * (np.abs(m64) + np.abs(g64))):
                    bound = bound + 2 * LR * d_max
                np.testing.assert_array_less(np.abs(np.asarray(value, np.float64) - want[name]),
                                             bound)


def _direction(grads_sequence, **kwargs):
    tx = lion_optax.scale_by_lion(**kwargs)
    update = jax.jit(tx.update)
    state = tx.init(grads_sequence[0])
    for g in grads_sequence:
        direction, state = update(g, state)
    return direction, state


def test_mask_and_normaliser_by_hand():
    """Second step: c = 0.9 m + 0.1 g with m = 0.01 g1."""
    g1 = {'w': jnp.array([1.0, 1.0, -1.0, 1.0, 2.0])}
    g2 = {'w': jnp.array([1.0, -1.0, 1.0, 0.0, -0.01])}
    # c = [.109, -.091, .091, .009, .017]: signs [+, -, +, +, +]
    # u * g > 0 at 0, 1, 2 (not at 3: g = 0; not at 4: disagree) -> mean(phi) = 0.6
    direction, _ = _direction([g1, g2], cautious=True)
    expected = jnp.array([1.0, -1.0, 1.0, 0.0, 0.0]) / (0.6 + 1e-3)
    chex.assert_trees_all_close(direction['w'], expected, rtol=1e-6)
    direction, _ = _direction([g1, g2], cautious=lion_optax.Cautious(eps=0.4))
    chex.assert_trees_all_close(direction['w'], jnp.array([1.0, -1.0, 1.0, 0.0, 0.0]), rtol=1e-6)


def test_full_agreement_is_lion_shrunk_by_one_plus_eps_and_none_is_zero():
    g = {'w': jnp.array([0.5, -2.0, 3.0])}
    direction, _ = _direction([g], cautious=True)  # first step: c = 0.1 g agrees everywhere
    chex.assert_trees_all_close(direction['w'], jnp.sign(g['w']) / (1.0 + 1e-3), rtol=1e-7)
    # Momentum against a new gradient everywhere: nothing is kept, and nothing is NaN.
    g_back = {'w': -0.01 * g['w']}
    direction, _ = _direction([g, g_back], cautious=True)
    chex.assert_trees_all_equal(direction['w'], jnp.zeros(3))


def test_rescale_is_per_array_and_capped_by_eps():
    g1 = {'a': jnp.ones(1000), 'b': jnp.ones(4)}
    # 'a': one coordinate of 1000 keeps agreeing; 'b': two of four.
    flip_a = jnp.full(1000, -0.01).at[0].set(1.0)
    g2 = {'a': flip_a, 'b': jnp.array([1.0, 1.0, -0.01, -0.01])}
    direction, _ = _direction([g1, g2], cautious=True)
    np.testing.assert_allclose(float(direction['a'][0]), 1.0 / (1e-3 + 1e-3), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(direction['b']), [1 / 0.501, 1 / 0.501, 0, 0],
                               rtol=1e-6)


def test_cautious_keeps_the_momentum_of_plain_lion():
    grads = random_grads(3, 6)
    _, plain = _direction(grads)
    _, cautious = _direction(grads, cautious=True)
    chex.assert_trees_all_equal(plain.mu, cautious.mu)


def test_decay_still_applies_to_masked_coordinates():
    """The mask acts on the direction only: weight decay shrinks every weight."""
    tx = lion_optax.lion(0.1, weight_decay=0.5, cautious=True)
    params = {'w': jnp.array([2.0, 2.0])}
    state = tx.init(params)
    _, state = tx.update({'w': jnp.array([1.0, 1.0])}, state, params)
    updates, _ = tx.update({'w': jnp.array([1.0, -0.01])}, state, params)
    # Coordinate 1: c = 0.009 - 0.001 > 0 disagrees with g < 0: only decay, -lr * wd * p.
    np.testing.assert_allclose(float(updates['w'][1]), -0.1 * 0.5 * 2.0, rtol=1e-6)
    np.testing.assert_allclose(float(updates['w'][0]), -0.1 * (1 / 0.501 + 0.5 * 2.0), rtol=1e-6)


@pytest.mark.optax_promotion  # optax's schedules: 0.1 * count, count int32
def test_alias_equals_hand_built_chain():
    lr = optax.schedules.cosine_decay_schedule(1e-2, 10)
    alias = lion_optax.lion(lr, weight_decay=0.2, cautious=True)
    chained = optax.chain(lion_optax.scale_by_lion(cautious=True),
                          lion_optax.add_decoupled_weight_decay(0.2),
                          optax.scale_by_learning_rate(lr))
    params, grads = random_params(5), random_grads(6, 10)
    chex.assert_trees_all_equal(run_trajectory(alias, params, grads, update_fn=jax.jit(alias.update))[0],
                                run_trajectory(chained, params, grads, update_fn=jax.jit(chained.update))[0])


@pytest.mark.parametrize('kwargs,error', [
    (dict(cautious='yes'), TypeError), (dict(cautious=1), TypeError),
    (dict(cautious=lion_optax.Cautious(eps=0.0)), ValueError),
    (dict(cautious=lion_optax.Cautious(eps=-1e-3)), ValueError),
    (dict(cautious=lion_optax.Cautious(eps=float('nan'))), ValueError),
    (dict(cautious=lion_optax.Cautious(eps='0.1')), TypeError),
])
def test_invalid_cautious_options_are_refused_when_built(kwargs, error):
    with pytest.raises(error, match='(?i)cautious'):
        lion_optax.scale_by_lion(**kwargs)


def test_alias_passes_the_cautious_eps_through():
    params = {'w': jnp.zeros(4)}
    grads = {'w': jnp.array([1.0, -1.0, 1.0, -1.0])}
    for eps in (1e-3, 0.5):
        tx = lion_optax.lion(1.0, weight_decay=0.0, cautious=lion_optax.Cautious(eps=eps))
        updates, _ = tx.update(grads, tx.init(params), params)
        new = optax.apply_updates(params, updates)
        # every coordinate agrees, so mean(phi) = 1 and each step is 1 / (1 + eps)
        assert float(jnp.abs(new['w'][0])) == pytest.approx(1.0 / (1.0 + eps), rel=1e-6)


def test_tiny_agreeing_values_are_not_masked_by_underflow():
    tx = lion_optax.scale_by_lion(b1=0.0, kappa='clip', cautious=True)
    g = jnp.array([1e-30, -1e-30])
    direction, _ = tx.update(g, tx.init(jnp.zeros(2)))
    assert bool(jnp.all(direction != 0))  # 1e-30 * 1e-30 underflows; signs do not
