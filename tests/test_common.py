"""One compatibility suite that every Lion variant passes.

Each entry of ``VARIANTS`` is a factory of keyword hyperparameters (at least
``learning_rate``) returning a Lion optimizer: ``lion`` with its options,
``scale_by_lion`` alone in a hand-made chain, ``distributed_lion`` on one worker,
and every wrapper (``skip_nonfinite``, ``monitor_signs``,
``shard_optimizer_state``, ``round_updates_to_params``, diagnostics). Every
check below runs on every variant: optax pipelines, inject_hyperparams,
MultiSteps, lax.scan, lax.cond, jit with donation, dtype stability in float16,
bfloat16, float32 and float64, schedules, map_params, re-tracing, one
compilation, and convergence to a known optimum. New variants (new kappa,
precision or distribution options) add a line here.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lion_optax


def _scale_by_lion_alone(learning_rate, b1, b2, weight_decay):
    """The direction alone, chained by hand as lion() does."""
    return optax.chain(
        lion_optax.scale_by_lion(b1, b2),
        lion_optax.add_decoupled_weight_decay(weight_decay),
        optax.scale_by_learning_rate(learning_rate),
    )


def _one_worker(learning_rate, b1, b2, weight_decay):
    """distributed_lion on one worker: jax.vmap over a leading worker axis of size 1."""
    tx = lion_optax.distributed_lion(learning_rate, b1, b2, weight_decay=weight_decay,
                                     axis_name='data')

    def add_worker(tree):
        return jax.tree.map(lambda x: x[None], tree)

    def init(params):  # jitted, as distributed_init builds the state
        return jax.jit(jax.vmap(tx.init))(add_worker(params))

    def update(updates, state, params=None, **extra_args):
        step = jax.vmap(functools.partial(tx.update, **extra_args), axis_name='data')
        new_updates, state = step(add_worker(updates), state, add_worker(params))
        return jax.tree.map(lambda x: x[0], new_updates), state

    return optax.GradientTransformationExtraArgs(init, update)


def _skip_nonfinite(learning_rate, b1, b2, weight_decay):
    return lion_optax.skip_nonfinite(lion_optax.lion(learning_rate, b1, b2,
                                                     weight_decay=weight_decay))


def _monitored(learning_rate, b1, b2, weight_decay):
    return optax.chain(
        lion_optax.monitor_signs(lion_optax.scale_by_lion(b1, b2)),
        lion_optax.add_decoupled_weight_decay(weight_decay),
        optax.scale_by_learning_rate(learning_rate),
    )


def _zero_sharded(learning_rate, b1, b2, weight_decay):
    mesh = jax.make_mesh((1,), ('data',), axis_types=(jax.sharding.AxisType.Auto,))
    inner = lion_optax.lion(learning_rate, b1, b2, weight_decay=weight_decay)
    return lion_optax.shard_optimizer_state(inner, 'data', mesh=mesh)


def _rounding_last(learning_rate, b1, b2, weight_decay):
    return optax.chain(
        lion_optax.lion(learning_rate, b1, b2, weight_decay=weight_decay,
                        rounding=lion_optax.Rounding(params='nearest')),
        lion_optax.round_updates_to_params(seed=1),
    )


VARIANTS = {
    'lion': lion_optax.lion,
    'lion_skip_step': functools.partial(lion_optax.lion, nonfinite='skip_step'),
    'lion_propagate': functools.partial(lion_optax.lion, nonfinite='propagate'),
    'lion_bf16_momentum': functools.partial(lion_optax.lion, mu_dtype=jnp.bfloat16),
    'lion_bf16_momentum_nearest': functools.partial(
        lion_optax.lion, mu_dtype=jnp.bfloat16, rounding=lion_optax.Rounding(momentum='nearest')
    ),
    'lion_int8_momentum': functools.partial(
        lion_optax.lion, mu_dtype=lion_optax.Int8Momentum(block_size=2, min_quantized_size=0)
    ),
    'lion_fully_decoupled': functools.partial(
        lion_optax.lion,
        weight_decay_convention=lion_optax.FullyDecoupled(reference_learning_rate=1e-2),
    ),
    'lion_masked': functools.partial(lion_optax.lion, mask=lambda p: {'w': True, 'b': False}),
    'lion_cautious': functools.partial(lion_optax.lion, cautious=True),
    'lion_clip': functools.partial(lion_optax.lion, kappa='clip'),
    'lion_tanh': functools.partial(lion_optax.lion, kappa=lion_optax.tanh_kappa(2.0)),
    'lion_l2_leaf': functools.partial(lion_optax.lion, kappa='l2'),
    'lion_l2_global': functools.partial(lion_optax.lion, kappa='l2_global'),
    'lion_lp': functools.partial(lion_optax.lion, kappa=lion_optax.lp_kappa(1.5)),
    'lion_diagnostics': functools.partial(lion_optax.lion, diagnostics=True),
    'scale_by_lion_alone': _scale_by_lion_alone,
    'distributed_lion_one_worker': _one_worker,
    'skip_nonfinite_wrapper': _skip_nonfinite,
    'monitor_signs_wrapper': _monitored,
    'shard_optimizer_state_wrapper': _zero_sharded,
    'round_updates_to_params_wrapper': _rounding_last,
}
HYPERPARAMS = dict(learning_rate=1e-2, b1=0.9, b2=0.99, weight_decay=0.1)


def _problem(dtype=jnp.float32):
    params = {'w': jnp.array([[1.0, -2.0], [0.5, 3.0]], dtype), 'b': jnp.array([0.1, -0.1], dtype)}

    def loss(p):
        return sum(jnp.sum(jnp.square(x.astype(jnp.float32) - 0.3)) for x in jax.tree.leaves(p))

    return params, loss


def _dtypes(tree):
    return jax.tree.map(lambda x: jnp.asarray(x).dtype, tree)


# `pytest -m "not slow"` (the quick loop) runs every check on these; CI runs all.
QUICK_LOOP_VARIANTS = ('lion', 'lion_int8_momentum', 'scale_by_lion_alone')
variants = pytest.mark.parametrize('name', [
    pytest.param(name, marks=() if name in QUICK_LOOP_VARIANTS else pytest.mark.slow)
    for name in sorted(VARIANTS)
])


@variants
def test_trains_inside_an_optax_chain(name):
    params, loss = _problem()
    tx = optax.chain(optax.clip_by_global_norm(1.0), VARIANTS[name](**HYPERPARAMS))
    state = tx.init(params)
    start = loss(params)
    for _ in range(10):  # eagerly, op by op: each step dispatches every op
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


@pytest.mark.optax_promotion  # optax's MultiSteps mixes int32 and float32
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
@pytest.mark.optax_promotion  # optax's apply_updates adds bf16 and float32
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
    if name == 'distributed_lion_one_worker':
        pytest.skip('per-worker state has a leading worker axis: map_params does not apply '
                    '(worker_state_specs gives its PartitionSpecs instead)')
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


@pytest.mark.optax_promotion  # optax's schedules: 0.1 * count, count int32
@variants
def test_converges_to_the_known_optimum(name):
    """sum((x - 0.3)**2) from afar, no decay, a cosine schedule to 0: x ends at 0.3.

    b2 = 0.99 gives the momentum a memory of ~100 steps, so the iterate circles
    the optimum for a few hundred steps before the schedule settles it; the
    smooth kappas (clip, tanh, norms) and cautious masking take the longest.
    1000 steps settle every variant to ~1e-3 (300 steps leave tanh and the
    norms 0.25 away), so the tolerance below is 10x that, not a loose bound.
    """
    params, loss = _problem()
    steps = 1000
    schedule = optax.schedules.cosine_decay_schedule(0.05, steps)
    tx = VARIANTS[name](learning_rate=schedule, b1=0.9, b2=0.99, weight_decay=0.0)

    def step(carry, _):
        params, state = carry
        updates, state = tx.update(jax.grad(loss)(params), state, params)
        return (optax.apply_updates(params, updates), state), None

    (params, _), _ = jax.jit(lambda c: jax.lax.scan(step, c, length=steps))((params, tx.init(params)))
    for leaf in jax.tree.leaves(params):
        np.testing.assert_allclose(np.asarray(leaf), 0.3, atol=0.01)


@variants
@pytest.mark.parametrize('dtype', ['float16', 'bfloat16', 'float32', 'float64'])
def test_is_stable_in_every_float_dtype(name, dtype):
    """Parameters and gradients in dtype: finite, dtypes kept, the loss goes down."""
    with jax.enable_x64(dtype == 'float64'):
        params, loss = _problem(jnp.dtype(dtype))
        tx = VARIANTS[name](**HYPERPARAMS)
        state = tx.init(params)
        before = _dtypes(state)

        def step(carry, _):
            params, state = carry
            grads = jax.tree.map(lambda g, p: g.astype(p.dtype), jax.grad(loss)(params), params)
            updates, state = tx.update(grads, state, params)
            return (optax.apply_updates(params, updates), state), loss(params)

        (new_params, state), losses = jax.jit(
            lambda c: jax.lax.scan(step, c, length=20))((params, state))
        assert _dtypes(state) == before and _dtypes(new_params) == _dtypes(params)
        assert all(np.isfinite(np.asarray(x, np.float64)).all()
                   for x in jax.tree.leaves((new_params, state)))
        assert float(losses[-1]) < float(losses[0])
