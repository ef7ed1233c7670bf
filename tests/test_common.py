"""One compatibility suite that every Lion variant passes.

Each entry of ``VARIANTS`` is a factory of keyword hyperparameters (at least
``learning_rate``) returning a Lion optimizer. Every check below runs on every
variant: optax pipelines, inject_hyperparams, MultiSteps, lax.scan, lax.cond,
jit with donation, dtype stability, schedules, map_params and re-tracing.
New variants (new kappa, precision or distribution options) add a line here.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lion_optax

VARIANTS = {
    'lion': lion_optax.lion,
    'lion_skip_step': functools.partial(lion_optax.lion, nonfinite='skip_step'),
    'lion_propagate': functools.partial(lion_optax.lion, nonfinite='propagate'),
    'lion_bf16_momentum': functools.partial(lion_optax.lion, mu_dtype=jnp.bfloat16),
    'lion_bf16_momentum_nearest': functools.partial(
        lion_optax.lion, mu_dtype=jnp.bfloat16, mu_rounding='nearest'
    ),
    'lion_int8_momentum': functools.partial(
        lion_optax.lion, mu_dtype=lion_optax.Int8Momentum(block_size=2, min_quantized_size=0)
    ),
    'lion_fully_decoupled': functools.partial(
        lion_optax.lion, weight_decay_convention='fully_decoupled', reference_learning_rate=1e-2
    ),
    'lion_masked': functools.partial(lion_optax.lion, mask=lambda p: {'w': True, 'b': False}),
    'lion_cautious': functools.partial(lion_optax.lion, cautious=True),
    'lion_clip': functools.partial(lion_optax.lion, kappa='clip'),
    'lion_tanh': functools.partial(lion_optax.lion, kappa=lion_optax.tanh_kappa(2.0)),
    'lion_l2_leaf': functools.partial(lion_optax.lion, kappa='l2'),
    'lion_l2_global': functools.partial(lion_optax.lion, kappa='l2_global'),
    'lion_lp': functools.partial(lion_optax.lion, kappa=lion_optax.lp_kappa(1.5)),
}
HYPERPARAMS = dict(learning_rate=1e-2, b1=0.9, b2=0.99, weight_decay=0.1)


def _problem(dtype=jnp.float32):
    params = {'w': jnp.array([[1.0, -2.0], [0.5, 3.0]], dtype), 'b': jnp.array([0.1, -0.1], dtype)}

    def loss(p):
        return sum(jnp.sum(jnp.square(x.astype(jnp.float32) - 0.3)) for x in jax.tree.leaves(p))

    return params, loss


def _dtypes(tree):
    return jax.tree.map(lambda x: jnp.asarray(x).dtype, tree)


variants = pytest.mark.parametrize('name', sorted(VARIANTS))


@variants
def test_trains_inside_an_optax_chain(name):
    params, loss = _problem()
    tx = optax.chain(optax.clip_by_global_norm(1.0), VARIANTS[name](**HYPERPARAMS))
    state = tx.init(params)
    start = loss(params)
    for _ in range(30):
        updates, state = tx.update(jax.grad(loss)(params), state, params)
        params = optax.apply_updates(params, updates)
    assert loss(params) < start


@variants
def test_accepts_extra_args_and_does_not_retrace(name):
    params, loss = _problem()
    tx = VARIANTS[name](**HYPERPARAMS)
    assert isinstance(tx, optax.GradientTransformationExtraArgs)
    chex.clear_trace_counter()  # the counter is keyed by code, shared across variants
    update = jax.jit(chex.assert_max_traces(tx.update, n=1))
    state = tx.init(params)
    for _ in range(3):
        updates, state = update(jax.grad(loss)(params), state, params, value=jnp.array(1.0))
        params = optax.apply_updates(params, updates)


@variants
def test_inject_hyperparams_gives_the_same_numbers(name):
    params, loss = _problem()
    plain = VARIANTS[name](**HYPERPARAMS)
    injected = optax.inject_hyperparams(VARIANTS[name])(**HYPERPARAMS)
    grads = jax.grad(loss)(params)
    updates, state = plain.update(grads, plain.init(params), params)
    injected_updates, injected_state = jax.jit(injected.update)(
        grads, jax.jit(injected.init)(params), params
    )
    # float32 hyperparameter arrays instead of Python floats: rounding only
    # (1e-6 relative, and 1e-6 of the learning rate absolute).
    chex.assert_trees_all_close(injected_updates, updates, rtol=1e-6, atol=1e-8)
    chex.assert_trees_all_close(injected_state.inner_state, state, rtol=1e-6, atol=1e-8)
    # Changing the injected learning rate takes effect without rebuilding.
    injected_state.hyperparams['learning_rate'] = jnp.array(0.0)
    zero_updates, _ = injected.update(grads, injected_state, params)
    chex.assert_trees_all_close(zero_updates, jax.tree.map(jnp.zeros_like, params))


@variants
def test_schedule_equals_constant(name):
    params, loss = _problem()
    constant = VARIANTS[name](**HYPERPARAMS)
    scheduled = VARIANTS[name](
        **dict(HYPERPARAMS, learning_rate=optax.constant_schedule(1e-2),
               weight_decay=optax.constant_schedule(0.1))
    )
    grads = jax.grad(loss)(params)
    a, _ = constant.update(grads, constant.init(params), params)
    b, _ = scheduled.update(grads, scheduled.init(params), params)
    chex.assert_trees_all_close(a, b, rtol=1e-6)


@variants
def test_multisteps_accumulates(name):
    params, loss = _problem()
    tx = optax.MultiSteps(VARIANTS[name](**HYPERPARAMS), every_k_schedule=3)
    state = tx.init(params)
    update = jax.jit(tx.update)
    start = params
    for step in range(6):
        updates, state = update(jax.grad(loss)(params), state, params)
        params = optax.apply_updates(params, updates)
        if step in (0, 1):  # nothing applied until the third micro-step
            chex.assert_trees_all_equal(params, start)
    assert loss(params) < loss(start)


@variants
@pytest.mark.parametrize('param_dtype, grad_dtype', [
    (jnp.bfloat16, jnp.bfloat16), (jnp.bfloat16, jnp.float32), (jnp.float32, jnp.bfloat16),
])
def test_scan_keeps_state_dtypes(name, param_dtype, grad_dtype):
    params, loss = _problem(param_dtype)
    tx = VARIANTS[name](**HYPERPARAMS)
    state = tx.init(params)
    before = _dtypes(state)

    def step(carry, _):
        params, state = carry
        grads = jax.tree.map(lambda g: g.astype(grad_dtype), jax.grad(loss)(params))
        updates, state = tx.update(grads, state, params)
        return (optax.apply_updates(params, updates), state), loss(params)

    (new_params, state), losses = jax.lax.scan(step, (params, state), length=20)
    assert _dtypes(state) == before
    assert _dtypes(new_params) == _dtypes(params)
    assert float(losses[-1]) < float(losses[0])


@variants
def test_state_is_stable_under_lax_cond(name):
    params, loss = _problem()
    tx = VARIANTS[name](**HYPERPARAMS)
    state = tx.init(params)
    grads = jax.grad(loss)(params)

    @jax.jit
    def maybe_update(flag, state):
        return jax.lax.cond(flag, lambda: tx.update(grads, state, params)[1], lambda: state)

    state = maybe_update(True, state)
    state = maybe_update(False, state)


@variants
def test_jit_with_donated_buffers(name):
    params, loss = _problem()
    tx = VARIANTS[name](**HYPERPARAMS)

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def train_step(params, state):
        updates, state = tx.update(jax.grad(loss)(params), state, params)
        return optax.apply_updates(params, updates), state

    expected_params, expected_state = params, tx.init(params)
    for _ in range(2):
        updates, expected_state = tx.update(jax.grad(loss)(expected_params), expected_state, expected_params)
        expected_params = optax.apply_updates(expected_params, updates)

    state = tx.init(params)
    params = jax.tree.map(jnp.copy, params)
    for _ in range(2):
        params, state = train_step(params, state)
    chex.assert_trees_all_close(params, expected_params, rtol=1e-6)


@variants
def test_map_params_reaches_the_momentum(name):
    params, _ = _problem()
    tx = VARIANTS[name](**HYPERPARAMS)
    state = tx.init(params)
    shapes = optax.tree.map_params(tx, lambda v: jnp.zeros(v.shape + (1,)), state)
    for key in ('mu', 'mu_scales'):  # int8 momentum: codes and scales both reached
        for _, tree in optax.tree.get_all_with_path(shapes, key):
            for leaf, stored in zip(jax.tree.leaves(tree), jax.tree.leaves(optax.tree.get(state, key))):
                assert leaf.shape == stored.shape + (1,)
    assert optax.tree.get_all_with_path(shapes, 'mu')


@variants
def test_updates_keep_the_gradient_dtype(name):
    params, loss = _problem(jnp.bfloat16)
    tx = VARIANTS[name](**HYPERPARAMS)
    grads = jax.tree.map(lambda g: g.astype(jnp.bfloat16), jax.grad(loss)(params))
    updates, _ = tx.update(grads, tx.init(params), params)
    assert _dtypes(updates) == _dtypes(params)
    assert all(np.isfinite(np.asarray(u, np.float32)).all() for u in jax.tree.leaves(updates))


@variants
@pytest.mark.parametrize('init', ['eager', 'jit'])
@pytest.mark.parametrize('committed', [False, True])
def test_the_jitted_step_compiles_once(name, init, committed):
    """Eager or jitted init, committed or uncommitted parameters: one compilation."""
    params, loss = _problem()
    if committed:
        params = jax.device_put(params, jax.devices()[0])
    tx = VARIANTS[name](**HYPERPARAMS)
    state = tx.init(params) if init == 'eager' else jax.jit(tx.init)(params)

    @jax.jit
    def step(params, state):
        updates, state = tx.update(jax.grad(loss)(params), state, params)
        return optax.apply_updates(params, updates), state

    for _ in range(3):
        params, state = step(params, state)
    assert step._cache_size() == 1
