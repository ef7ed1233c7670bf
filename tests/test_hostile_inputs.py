"""Hostile inputs: every way a bad value can enter, one test each, against optax.lion too.

Each test states what optax.lion does with the same input where the comparison
makes sense; the README's "Numerics and bad input" section summarises them.
Checkpoint corruption and killed saves are tested in test_checkpoint.py.
"""

import functools
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import lion_optax

PARAMS = {'w': jnp.array([1.0, -2.0, 0.5]), 'b': jnp.array([0.1, -0.1])}
GRADS = {'w': jnp.array([0.3, -0.2, 0.1]), 'b': jnp.array([0.5, 0.5])}


def _steps(tx, count, params=PARAMS, grads=GRADS, jit=True):
    update = jax.jit(tx.update) if jit else tx.update
    state = tx.init(params)
    for _ in range(count):
        updates, state = update(grads, state, params)
        params = optax.apply_updates(params, updates)
    return params, state


def _finite(tree):
    return all(np.isfinite(np.asarray(x, np.float32)).all() for x in jax.tree.leaves(tree))


# --- hyperparameters that bypass construction checks ---------------------------


@pytest.mark.parametrize('bad', [jnp.nan, jnp.inf, -0.1])
@pytest.mark.parametrize('which', ['learning_rate', 'weight_decay'])
def test_a_schedule_that_turns_invalid_never_changes_params_or_momentum(which, bad):
    good = {'learning_rate': 0.1, 'weight_decay': 0.2}[which]
    schedule = lambda count: jnp.where(count == 1, bad, good)  # noqa: E731
    kwargs = {'learning_rate': 0.1, 'weight_decay': 0.2, which: schedule}
    tx = lion_optax.lion(**kwargs)
    state = tx.init(PARAMS)
    update = jax.jit(tx.update)
    updates, state = update(GRADS, state, PARAMS)
    params = optax.apply_updates(PARAMS, updates)
    before = (params, optax.tree.get(state, 'mu'))
    with pytest.warns(RuntimeWarning, match=f'Invalid hyperparameter at step 1: {which}='):
        updates, state = update(GRADS, state, params)  # the schedule is invalid at count 1
        jax.block_until_ready((updates, state))
    params = optax.apply_updates(params, updates)
    jax.tree.map(np.testing.assert_array_equal, (params, optax.tree.get(state, 'mu')), before)
    # The counts advance: the next step uses the schedule's valid value again.
    updates, state = update(GRADS, state, params)
    assert _finite(updates) and float(jnp.abs(updates['w']).max()) > 0
    # optax.lion applies the bad value: NaN/Inf in the parameters, or ascent.
    theirs = optax.lion(**kwargs)
    their_params, _ = _steps(theirs, 2)
    if np.isfinite(bad):
        assert not np.allclose(np.asarray(their_params['w']), np.asarray(params['w']))
    else:
        assert not _finite(their_params)


@pytest.mark.parametrize('value', [jnp.array([1.5]), np.array([np.nan]), jnp.ones((2, 2))])
@pytest.mark.parametrize('name', ['b1', 'b2'])
def test_array_betas_are_refused_at_construction(name, value):
    with pytest.raises(ValueError, match=f'{name} must be a scalar'):
        lion_optax.lion(1e-3, **{name: value})


@pytest.mark.parametrize('name, value', [('b1', jnp.array(1.5)), ('b2', np.float32(np.nan))])
def test_scalar_array_betas_are_checked_at_construction(name, value):
    with pytest.raises(ValueError, match='outside the valid range'):
        lion_optax.lion(1e-3, **{name: value})


@pytest.mark.parametrize('name, value', [
    ('b1', 1.5), ('b2', -1.0), ('b1', jnp.nan),
    ('learning_rate', -0.1), ('learning_rate', jnp.nan), ('weight_decay', jnp.inf),
])
def test_injected_hyperparameters_are_checked_in_the_step(name, value):
    tx = optax.inject_hyperparams(lion_optax.lion)(learning_rate=0.1, weight_decay=0.1)
    state = tx.init(PARAMS)
    state.hyperparams[name] = jnp.asarray(value, jnp.float32)
    with pytest.warns(RuntimeWarning, match=f'Invalid hyperparameter at step 0: .*{name}='):
        updates, new_state = jax.jit(tx.update)(GRADS, state, PARAMS)
        jax.block_until_ready((updates, new_state))
    jax.tree.map(np.testing.assert_array_equal, updates, jax.tree.map(jnp.zeros_like, PARAMS))
    jax.tree.map(
        np.testing.assert_array_equal,
        optax.tree.get(new_state.inner_state, 'mu'),
        optax.tree.get(state.inner_state, 'mu'),
    )
    # optax.lion takes the same injected value and moves the parameters.
    theirs = optax.inject_hyperparams(optax.lion)(learning_rate=0.1, weight_decay=0.1)
    their_state = theirs.init(PARAMS)
    their_state.hyperparams[name] = jnp.asarray(value, jnp.float32)
    their_updates, _ = jax.jit(theirs.update)(GRADS, their_state, PARAMS)
    assert not np.array_equal(np.asarray(their_updates['w']), np.zeros(3))


def test_raise_mode_names_the_value_and_the_step():
    schedule = lambda count: jnp.where(count == 2, jnp.nan, 0.1)  # noqa: E731
    tx = lion_optax.lion(schedule, invalid_hyperparameters='raise')
    state = tx.init(PARAMS)
    update = jax.jit(tx.update)
    for _ in range(2):
        updates, state = update(GRADS, state, PARAMS)
    with pytest.raises(Exception, match=r'Invalid hyperparameter at step 2: learning_rate=nan'):
        updates, state = update(GRADS, state, PARAMS)
        jax.block_until_ready(updates)


def test_only_schedules_and_traced_values_are_checked_in_the_step():
    """Constants are checked once, at construction: they cost the step nothing."""
    from lion_optax._src.validation import runtime_checks

    constants = runtime_checks({'b1': 0.9, 'b2': 0.99}, {'learning_rate': 0.1, 'weight_decay': 0})
    assert constants == []
    schedule = optax.linear_schedule(0.1, 0.0, 10)
    checks = runtime_checks({'b1': 0.9, 'b2': 0.99}, {'learning_rate': schedule,
                                                       'weight_decay': 0.0})
    assert [c.name for c in checks] == ['learning_rate']

    names = []
    jax.jit(lambda b1: names.extend(runtime_checks({'b1': b1}, {})) or b1)(0.9)
    assert [c.name for c in names] == ['b1']


# --- masks, int8 options and gradients of the wrong kind ------------------------


@pytest.mark.parametrize('mask', [{'w': 'yes', 'b': True}, {'w': 1, 'b': True},
                                  lambda p: {'w': 'no', 'b': True}])
def test_a_mask_that_is_not_booleans_is_refused_naming_the_leaf(mask):
    with pytest.raises(TypeError, match=r"mask leaf \['w'\]"):
        tx = lion_optax.lion(0.1, mask=mask)
        tx.update(GRADS, tx.init(PARAMS), PARAMS)


NESTED = {'encoder': {'w': jnp.ones((2, 3)), 'b': jnp.ones(3)}, 'head': {'w': jnp.ones((3, 1))}}
NESTED_GRADS = jax.tree.map(lambda p: jnp.full_like(p, 0.5), NESTED)


def _mask_error(make, mask, params):
    tx = make(mask)
    with pytest.raises(ValueError) as info:
        tx.update(jax.tree.map(jnp.ones_like, params), tx.init(params), params)
    return str(info.value)


@pytest.mark.parametrize('make', [lambda mask: lion_optax.lion(0.1, weight_decay=0.1, mask=mask),
                                  lambda mask: lion_optax.add_decoupled_weight_decay(0.1, mask=mask)],
                         ids=['lion', 'add_decoupled_weight_decay'])
@pytest.mark.parametrize('as_callable', [False, True])
@pytest.mark.parametrize('mask, difference', [
    ({'encoder': True}, r"the params have \['head'\]\['w'\], which the mask does not cover"),
    ({'encoder': True, 'head': False, 'tail': True}, r"the mask has \['tail'\], which the params lack"),
    ({'encoder': {'w': True, 'b': False, 'g': True}, 'head': True}, r"mask has \['encoder'\]\['g'\]"),
    ({'encoder': True, 'head': {'w': {'x': True}}}, r"mask has \['head'\]\['w'\]\['x'\]"),
    ((True, False), r'the mask has \[0\], \[1\], which the params lack'),
])
def test_a_mask_of_the_wrong_structure_names_mask_both_structures_and_the_fix(
        make, as_callable, mask, difference):
    """optax.lion gives JAX's raw pytree error, which never says 'mask'."""
    message = _mask_error(make, (lambda params: mask) if as_callable else mask, NESTED)
    assert message.startswith('add_decoupled_weight_decay: mask does not fit the params'), message
    assert re.search(difference, message), message
    assert f'\n  mask:   {jax.tree.structure(mask)}\n' in message
    assert f'\n  params: {jax.tree.structure(NESTED)}\n' in message
    assert 'a prefix of it' in message and 'callable params -> mask' in message
    with pytest.raises(ValueError) as theirs:
        optax.lion(0.1, weight_decay=0.1, mask=mask).init(NESTED)
    assert 'mask' not in str(theirs.value)


def test_a_mask_in_other_containers_says_so_and_never_prints_the_arrays():
    params = (jnp.arange(1000.0), jnp.ones(2))
    message = _mask_error(lambda mask: lion_optax.lion(0.1, mask=mask), [True, False], params)
    assert 'the containers differ (Expected list, got (*, *))' in message, message
    assert '999' not in message  # parameters appear as *, not as their values


@pytest.mark.parametrize('mask', ['w', 1.5, 0, b'w'])
def test_a_mask_that_is_not_a_tree_is_named_with_its_type(mask):
    """mask='w' used to say "mask leaf  is 'w'", with an empty path."""
    with pytest.raises(TypeError) as info:
        lion_optax.lion(0.1, mask=mask).init(PARAMS)
    message = str(info.value)
    assert f'mask is {mask!r} (a {type(mask).__name__})' in message, message
    assert 'mask leaf' not in message and 'callable params -> mask' in message


@pytest.mark.parametrize('prefix', [
    True,
    {'encoder': True, 'head': False},
    {'encoder': {'w': True, 'b': False}, 'head': True},
    lambda params: {'encoder': True, 'head': False},
])
def test_a_prefix_mask_is_still_accepted_and_equals_the_full_mask(prefix):
    tree = prefix(NESTED) if callable(prefix) else prefix
    full = jax.tree.map(lambda m, p: jax.tree.map(lambda _: m, p), tree, NESTED)
    ours, full_tx = (lion_optax.lion(0.1, weight_decay=0.5, mask=m) for m in (prefix, full))
    chex.assert_trees_all_equal(
        ours.update(NESTED_GRADS, ours.init(NESTED), NESTED)[0],
        full_tx.update(NESTED_GRADS, full_tx.init(NESTED), NESTED)[0],
    )


def test_a_block_larger_than_the_array_adds_no_padding():
    """A 4-element leaf with block_size=10**6 used to become 4 MB of state."""
    tx = lion_optax.lion(0.1, mu_dtype=lion_optax.Int8Momentum(10**6, min_quantized_size=0))
    state = tx.init({'w': jnp.ones(4)})
    assert lion_optax.hlo.tree_bytes(state) < 64
    _, state = tx.update({'w': jnp.ones(4)}, state, {'w': jnp.ones(4)})
    assert _finite(state[0].mu)


def test_python_float_gradients_are_accepted_for_scalar_params():
    params = {'s': jnp.array(1.0)}
    tx = lion_optax.lion(0.1, weight_decay=0.0)
    updates, _ = tx.update({'s': 0.5}, tx.init(params), params)
    np.testing.assert_allclose(updates['s'], -0.1)


def test_python_float_gradient_for_an_array_param_names_the_leaf_and_shapes():
    tx = lion_optax.lion(0.1)
    with pytest.raises(ValueError, match=r"gradient leaf \['w'\] has shape \(\)"):
        tx.update({'w': 0.5, 'b': GRADS['b']}, tx.init(PARAMS), PARAMS)


@pytest.mark.parametrize('dtype', [jnp.int32, jnp.int8, jnp.bool_])
def test_integer_gradients_are_refused_naming_the_leaf(dtype):
    """optax.lion computes with them: 2.80 where 2.75 was expected."""
    tx = lion_optax.lion(0.1)
    grads = {'w': jnp.ones(3, dtype), 'b': GRADS['b']}
    with pytest.raises(TypeError, match=r"gradient leaf \['w'\] has dtype"):
        tx.update(grads, tx.init(PARAMS), PARAMS)


def test_distributed_lion_with_an_unknown_axis_says_which_axes_exist():
    mesh = jax.make_mesh((1,), ('data',))
    tx = lion_optax.distributed_lion(1e-2, axis_name='batch')
    state, specs = lion_optax.distributed_init(tx, {'w': jnp.ones(4)}, mesh, axis_name='data')

    @jax.jit
    @functools.partial(jax.shard_map, mesh=mesh, in_specs=(P(), specs, P('data')),
                       out_specs=(P(), specs))
    def step(params, state, x):
        local = jax.lax.pcast(params, 'data', to='varying')
        grads = jax.grad(lambda p: jnp.sum((x @ p['w']) ** 2))(local)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    x = jax.device_put(jnp.ones((1, 4)), NamedSharding(mesh, P('data')))
    with pytest.raises(ValueError, match=r"axis_name='batch'.*mesh axes: \('data',\)"):
        step({'w': jnp.ones(4)}, state, x)


# --- no silent stall -------------------------------------------------------------


def _accumulate(tx, grads):
    state = tx.init(PARAMS)
    params = PARAMS
    update = jax.jit(tx.update)
    history = []
    for g in grads:
        updates, state = update(g, state, params)
        params = optax.apply_updates(params, updates)
        history.append(params)
    return history


@pytest.mark.optax_promotion  # optax's MultiSteps mixes int32 and float32
def test_multisteps_with_skip_not_finite_loses_only_the_bad_micro_step():
    """The documented recipe: MultiSteps(lion, k, should_skip_update_fn=optax.skip_not_finite).

    Plain MultiSteps accumulates the NaN and resets its accumulator with
    (1 - emit) * acc = 0 * NaN: every later macro step would see NaN there."""
    bad = {'w': GRADS['w'].at[1].set(jnp.nan), 'b': GRADS['b']}
    grads = [GRADS, bad] + [GRADS] * 9
    guarded = optax.MultiSteps(lion_optax.lion(0.1), every_k_schedule=2,
                               should_skip_update_fn=optax.skip_not_finite)
    history = _accumulate(guarded, grads)
    # The bad micro-step is dropped: the remaining 10 good ones make 5 macro steps,
    # and the coordinate that saw the NaN keeps moving.
    moves = [not np.array_equal(np.asarray(a['w']), np.asarray(b['w']))
             for a, b in zip(history, history[1:])]
    assert sum(moves) == 5
    assert float(history[-1]['w'][1]) != float(PARAMS['w'][1])
    plain = optax.MultiSteps(lion_optax.lion(0.1), every_k_schedule=2)
    stalled = _accumulate(plain, grads)
    # Without the guard the poisoned coordinate only decays from then on.
    late = [float(p['w'][1]) for p in stalled[3:]]
    assert all(np.isfinite(late)) and np.ptp(np.diff(late[::2])) < 1e-6


def test_diagnostics_count_bad_steps_and_a_long_run_of_them_raises():
    schedule = lambda count: jnp.where((count >= 2) & (count < 4), jnp.nan, 0.1)  # noqa: E731
    tx = lion_optax.lion(
        schedule, diagnostics=lion_optax.Diagnostics(max_consecutive_bad_steps=3))
    state = tx.init(PARAMS)
    assert isinstance(state, lion_optax.LionDiagnosticsState)
    update = jax.jit(tx.update)
    nan_grads = {'w': GRADS['w'].at[0].set(jnp.nan), 'b': GRADS['b']}
    with pytest.warns(RuntimeWarning, match='Invalid hyperparameter at step 2'):
        for grads in [GRADS, nan_grads, GRADS, GRADS, GRADS]:
            _, state = update(grads, state, PARAMS)
        jax.block_until_ready(state)
    assert int(state.nonfinite_gradient_steps) == 1
    assert int(state.invalid_hyperparameter_steps) == 2
    assert int(state.consecutive_bad_steps) == 0
    with pytest.raises(Exception, match='bad steps in a row'):
        for _ in range(4):
            _, state = update(nan_grads, state, PARAMS)
        jax.block_until_ready(state)


def test_the_deprecated_max_consecutive_bad_steps_still_needs_diagnostics():
    with pytest.warns(DeprecationWarning, match='Diagnostics'):
        with pytest.raises(ValueError, match='Diagnostics\\(max_consecutive_bad_steps=3\\)'):
            lion_optax.lion(0.1, max_consecutive_bad_steps=3)
