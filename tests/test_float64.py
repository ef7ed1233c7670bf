"""Float64 (jax_enable_x64), kept in its own module: x64 changes dtypes globally."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lion_optax
from lion_optax._src.reference import lion_reference

from _helpers import from_leaves, random_grads, random_params, to_leaves


@pytest.mark.optax_promotion  # optax's schedules: 0.1 * count, count int32
def test_float64_trajectory_equals_reference_to_float64_rounding():
    with jax.enable_x64(True):
        schedule = optax.schedules.cosine_decay_schedule(1e-2, 150)
        tx = lion_optax.lion(schedule, weight_decay=0.1, mu_dtype=jnp.float64)
        params = random_params(0, jnp.float64)
        grads = random_grads(1, 150, jnp.float64)
        update = jax.jit(tx.update)
        state = tx.init(params)
        for g in grads:
            updates, state = update(g, state, params)
            params = optax.apply_updates(params, updates)
        assert all(x.dtype == jnp.float64 for x in jax.tree.leaves(params))
        assert all(x.dtype == jnp.float64 for x in jax.tree.leaves(optax.tree.get(state, 'mu')))
        reference = lion_reference(
            to_leaves(random_params(0, jnp.float64)), [to_leaves(g) for g in grads],
            learning_rate=lambda t: float(schedule(t)), weight_decay=0.1,
        )[-1]
        expected = from_leaves(reference.params, params)
        for name in params:
            # float64 rounding over 150 steps: far below float32's 1e-7.
            np.testing.assert_allclose(np.asarray(params[name]), expected[name], rtol=1e-12, atol=1e-13)
