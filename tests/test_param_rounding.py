"""bf16/fp16 parameters that still learn (lion_optax/_src/param_rounding.py)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lion_optax

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
        lion_optax.lion(lr, weight_decay=0.0, rounding=lion_optax.Rounding(params='nearest')),
        params, grad, steps,
    )
    assert stochastic.dtype == nearest.dtype == dtype
    moved = 1.0 - float(jnp.mean(stochastic.astype(jnp.float32)))
    assert abs(moved - steps * lr) < 1.5e-3, moved
    if dtype == jnp.bfloat16:  # round to nearest swallows every step
        assert float(jnp.mean(nearest.astype(jnp.float32))) == 1.0


def test_param_rounding_is_deterministic_given_the_seed():
    params = jnp.ones(512, jnp.bfloat16)
    grad = jnp.linspace(-1.0, 1.0, 512).astype(jnp.bfloat16)
    a = _mean_after(lion_optax.lion(1e-4, rounding=lion_optax.Rounding(seed=1)), params, grad, 20)
    b = _mean_after(lion_optax.lion(1e-4, rounding=lion_optax.Rounding(seed=1)), params, grad, 20)
    c = _mean_after(lion_optax.lion(1e-4, rounding=lion_optax.Rounding(seed=2)), params, grad, 20)
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


