"""Multi-step trajectories of lion/scale_by_lion against the pure-Python reference.

Parity with optax.lion, the drop-in promise, is tested in ``test_alias.py``.
"""

import chex
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

STEPS = 120
SCHEDULE = optax.schedules.warmup_cosine_decay_schedule(0.0, 1e-2, 10, STEPS, 1e-3)
WD_SCHEDULE = optax.schedules.linear_schedule(0.2, 0.05, STEPS)
DECAY_MASK = {'w': True, 'b': False, 'scale': False}

CASES = [
    dict(name='constant', learning_rate=1e-2, weight_decay=0.1),
    dict(name='no_decay', learning_rate=3e-3, weight_decay=0.0, b1=0.95, b2=0.98),
    dict(name='schedules', learning_rate=SCHEDULE, weight_decay=WD_SCHEDULE),
    dict(name='masked', learning_rate=1e-2, weight_decay=0.5, mask=DECAY_MASK),
    dict(name='fully_decoupled', learning_rate=SCHEDULE, weight_decay=0.01,
         weight_decay_convention=lion_optax.FullyDecoupled(reference_learning_rate=1e-2)),
]


def _reference_kwargs(case):
    kwargs = {k: v for k, v in case.items() if k != 'name'}
    for key in ('learning_rate', 'weight_decay'):
        if callable(kwargs[key]):
            schedule = kwargs[key]
            kwargs[key] = lambda t, s=schedule: float(s(t))
    if 'mask' in kwargs:
        kwargs['decay_mask'] = kwargs.pop('mask')
    convention = kwargs.get('weight_decay_convention')
    if isinstance(convention, lion_optax.FullyDecoupled):
        kwargs['weight_decay_convention'] = 'fully_decoupled'
        kwargs['reference_learning_rate'] = convention.reference_learning_rate
    return kwargs


@pytest.mark.optax_promotion  # optax's schedules: 0.1 * count, count int32
class ReferenceParityTest(chex.TestCase):

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters((c['name'], c) for c in CASES)
    def test_float32_trajectory_equals_reference(self, case):
        """Every parameter after every one of 120 steps, to float32 rounding."""
        kwargs = {k: v for k, v in case.items() if k != 'name'}
        tx = lion_optax.lion(**kwargs)
        params, grads = random_params(0), random_grads(1, STEPS)
        history, state = run_trajectory(tx, params, grads, update_fn=self.variant(tx.update))
        reference = lion_reference(
            to_leaves(params), [to_leaves(g) for g in grads], **_reference_kwargs(case)
        )
        for t in (0, 1, STEPS // 2, STEPS - 1):
            chex.assert_trees_all_close(
                history[t], from_leaves(reference[t].params, params), rtol=1e-5, atol=1e-6
            )
        momentum = optax.tree.get(state, 'mu')
        chex.assert_trees_all_close(
            momentum, from_leaves(reference[-1].momentum, params), rtol=1e-5, atol=1e-6
        )

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters((c['name'], c) for c in CASES)
    def test_bfloat16_steps_equal_reference(self, case):
        """bf16 params, grads and momentum, checked step by step for 120 steps.

        Each step starts the reference from the implementation's own bf16 state
        and emulates bf16 storage. Both round each stored value once, the
        implementation from float32 (stochastically) and the reference from
        float64 (to nearest), so they may pick neighbouring bf16 values: at most
        one bf16 ulp apart, 2**-7 relative, for the momentum, and for the
        parameter one ulp of |p| plus one ulp of the step (at most lr_max * 1.5).
        A whole-trajectory comparison has no such bound: those one-ulp
        differences accumulate.

        The sign may differ from the reference's, by the whole step 2 lr but no
        more, only where c = b1 m + (1 - b1) g is within the implementation's
        own rounding of zero: with a lossy momentum the implementation reads c
        from the stored new momentum, c = (b1/b2) m~_t + ((b2 - b1)/b2) g, so c
        carries (b1/b2) times the rounding error of m~_t, at most one bf16 ulp
        of |m~_t| <= 2**-7 |m~_t| (scale_by_lion's docstring, Numerics).
        """
        kwargs = {k: v for k, v in case.items() if k != 'name'}
        tx = lion_optax.lion(**kwargs)
        update = self.variant(tx.update)
        params = random_params(0, jnp.bfloat16)
        grads = random_grads(1, STEPS, jnp.bfloat16)
        state = tx.init(params)
        reference_kwargs = _reference_kwargs(case)
        b1, b2 = case.get('b1', 0.9), case.get('b2', 0.99)
        ulp = 2.0**-7
        for t, g in enumerate(grads):
            momentum = {k: np.asarray(v, np.float64) for k, v in optax.tree.get(state, 'mu').items()}
            gradient = {k: np.asarray(v, np.float64) for k, v in g.items()}
            expected = lion_reference(
                to_leaves(params), [to_leaves(g)], rounding=rounding_for(jnp.bfloat16),
                initial_momentum=to_leaves(optax.tree.get(state, 'mu')), first_step=t,
                **reference_kwargs,
            )[0]
            updates, state = update(g, state, params)
            params = optax.apply_updates(params, updates)
            chex.assert_trees_all_equal_dtypes(params, random_params(0, jnp.bfloat16))
            new_momentum = optax.tree.get(state, 'mu')
            for name, value in params.items():
                c = b1 * momentum[name] + (1 - b1) * gradient[name]
                scale = np.abs(momentum[name]) + np.abs(gradient[name])
                storage_error = b1 / b2 * ulp * np.abs(np.asarray(new_momentum[name], np.float64))
                ambiguous = np.abs(c) <= storage_error + 1e-6 * scale
                got = np.asarray(value, np.float64)
                want = from_leaves(expected.params, params)[name]
                bound = ulp * np.abs(want) + ulp * 1e-2 * 1.5 + 1e-12
                bound = np.where(ambiguous, bound + 2 * 1e-2 * 1.51, bound)
                np.testing.assert_array_less(np.abs(got - want), bound)
            chex.assert_trees_all_close(
                new_momentum, from_leaves(expected.momentum, params), rtol=2.0**-7, atol=1e-6,
            )
