"""Tests of lion_optax/_src/alias.py: ``lion``, a drop-in for ``optax.lion``.

Same positional signature, same state tree (types, shapes, dtypes), same
numbers bit for bit in float32, with and without jit, with schedules and masks;
the hand-chained pieces equal the alias; one trace per jitted step. The
pure-Python reference is in ``test_reference_parity.py``; the option values in
``test_options.py``.
"""

import inspect

import chex
import jax
import jax.numpy as jnp
import optax
import pytest
from absl.testing import parameterized

import lion_optax

from _helpers import random_grads, random_params, run_trajectory

STEPS = 120
SCHEDULE = optax.schedules.warmup_cosine_decay_schedule(0.0, 1e-2, 10, STEPS, 1e-3)
DECAY_MASK = {'w': True, 'b': False, 'scale': False}


def test_positional_signature_is_optax_lions():
    ours = list(inspect.signature(lion_optax.lion).parameters.values())
    theirs = list(inspect.signature(optax.lion).parameters.values())
    assert [(p.name, p.kind) for p in ours[: len(theirs)]] == [(p.name, p.kind) for p in theirs]
    for mine, optax_parameter in zip(ours, theirs):
        assert mine.default == optax_parameter.default, mine.name


@pytest.mark.parametrize(
    'kwargs',
    [{}, dict(weight_decay=0.1), dict(mu_dtype=jnp.bfloat16), dict(weight_decay=0.1, mask=DECAY_MASK)],
    ids=['defaults', 'decay', 'bf16_momentum', 'mask'],
)
def test_state_tree_is_optax_lions(kwargs):
    """A checkpoint of optax.lion's state restores into lion's and back."""
    params = random_params(0)
    ours = lion_optax.lion(1e-3, **kwargs).init(params)
    theirs = optax.lion(1e-3, **kwargs).init(params)
    assert jax.tree.structure(ours) == jax.tree.structure(theirs)
    assert [type(s) for s in ours] == [type(s) for s in theirs]
    chex.assert_trees_all_equal_shapes_and_dtypes(ours, theirs)
    chex.assert_trees_all_equal(ours, theirs)


@pytest.mark.optax_promotion  # optax's schedules: 0.1 * count, count int32
class OptaxParityTest(chex.TestCase):

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(
        ('defaults', {}),
        ('betas_decay', dict(b1=0.95, b2=0.98, weight_decay=0.3)),
        ('schedule_mask', dict(weight_decay=0.1, mask=DECAY_MASK)),
    )
    def test_equals_optax_lion(self, kwargs):
        """Same arguments, same numbers as optax.lion (bit for bit in float32).

        Not for ``mu_dtype=bfloat16``: optax multiplies the bf16 momentum by the
        Python-float b1 in bf16 (weak typing) before adding the float32 term;
        we compute the whole step in float32 and round once.
        """
        lr = kwargs.pop('learning_rate', SCHEDULE)
        ours, theirs = lion_optax.lion(lr, **kwargs), optax.lion(lr, **kwargs)
        params, grads = random_params(2), random_grads(3, 50)
        ours_history, _ = run_trajectory(ours, params, grads, update_fn=self.variant(ours.update))
        theirs_history, _ = run_trajectory(theirs, params, grads, update_fn=self.variant(theirs.update))
        chex.assert_trees_all_close(ours_history, theirs_history, rtol=0, atol=0)

    def test_hand_chained_pieces_equal_the_alias(self):
        lr, wd = SCHEDULE, 0.2
        chained = optax.chain(
            lion_optax.scale_by_lion(b1=0.9, b2=0.99),
            lion_optax.add_decoupled_weight_decay(wd, mask=DECAY_MASK),
            optax.scale_by_learning_rate(lr),
        )
        alias = lion_optax.lion(lr, weight_decay=wd, mask=DECAY_MASK)
        params, grads = random_params(4), random_grads(5, 30)
        chex.assert_trees_all_equal(
            run_trajectory(chained, params, grads)[0], run_trajectory(alias, params, grads)[0]
        )

    def test_differs_from_signum_when_betas_differ(self):
        """The article's formula sign(m_t) (Signum) is not Lion when b1 != b2."""
        params, grads = {'x': jnp.zeros(1)}, [{'x': jnp.array([1.0])}, {'x': jnp.array([-1.0])}]
        history, _ = run_trajectory(lion_optax.lion(1.0, weight_decay=0.0), params, grads)
        # Lion: c2 = 0.9 * 0.01 + 0.1 * (-1) < 0 -> step +1; Signum would use
        # m2 = 0.99 * 0.01 - 0.01 < 0 too, so use the first step's c = 0.1 g.
        self.assertEqual(float(history[0]['x'][0]), -1.0)
        self.assertEqual(float(history[1]['x'][0]), 0.0)


@pytest.mark.optax_promotion  # optax's schedules: 0.1 * count, count int32
def test_jit_and_no_jit_trace_once():
    tx = lion_optax.lion(SCHEDULE, weight_decay=0.1)
    update = jax.jit(chex.assert_max_traces(tx.update, n=1))
    params = random_params(0)
    state = tx.init(params)
    for g in random_grads(1, 3):
        updates, state = update(g, state, params)
        params = optax.apply_updates(params, updates)
