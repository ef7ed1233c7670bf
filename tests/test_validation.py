"""Bad input is refused, when the transformation is built or at the first step, naming the problem.

Options, betas and rates at construction; masks, gradients and parameters of the
wrong kind at ``init`` or ``update`` (static facts: shapes, dtypes, trees). Where
optax.lion 0.2.8 accepts the same input, the test says what it does with it.
Values that can only be checked in the step (schedules, injected or traced
hyperparameters, non-finite gradients) are tested in ``test_guard.py``;
checkpoint corruption and killed saves in ``test_checkpoint.py``.
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

from _helpers import all_finite

# Three and two elements: small enough to read every value in a failure.
SMALL_PARAMS = {'w': jnp.array([1.0, -2.0, 0.5]), 'b': jnp.array([0.1, -0.1])}
SMALL_GRADS = {'w': jnp.array([0.3, -0.2, 0.1]), 'b': jnp.array([0.5, 0.5])}


@pytest.mark.parametrize('name', ['b1', 'b2'])
@pytest.mark.parametrize('value', [-0.1, 1.5, float('nan')])
def test_betas_outside_unit_interval_are_refused_at_construction(name, value):
    with pytest.raises(ValueError, match=rf'{name}=.*outside the valid range \[0, 1\]'):
        lion_optax.lion(1e-4, **{name: value})
    with pytest.raises(ValueError, match=rf'{name}='):
        lion_optax.scale_by_lion(**{name: value})


@pytest.mark.parametrize('name', ['learning_rate', 'weight_decay'])
@pytest.mark.parametrize('value', [-1e-3, float('nan'), float('inf')])
def test_negative_or_nonfinite_rates_are_refused(name, value):
    kwargs = {'learning_rate': 1e-4, name: value}
    with pytest.raises(ValueError, match=rf'{name}=.*expected a finite number >= 0'):
        lion_optax.lion(**kwargs)


def test_array_learning_rate_of_wrong_rank_is_refused():
    with pytest.raises(ValueError, match='learning_rate must be a scalar or a schedule'):
        lion_optax.lion(jnp.ones(3))


@pytest.mark.parametrize('dtype', [jnp.int8, jnp.int32, bool, 'not-a-dtype', 'b16', 'BF16'])
def test_non_float_mu_dtype_is_refused(dtype):
    with pytest.raises(TypeError, match='mu_dtype='):
        lion_optax.lion(1e-4, mu_dtype=dtype)


def _mu_dtype_error(dtype):
    with pytest.raises(TypeError) as info:
        lion_optax.scale_by_lion(mu_dtype=dtype)
    return str(info.value)


@pytest.mark.parametrize('dtype', [jnp.int32, 'not-a-dtype', 'b16'])
def test_mu_dtype_error_lists_every_accepted_form_and_each_works(dtype):
    """Issue 18: the message listed float dtypes only, never 'int8' (which is valid)."""
    message = _mu_dtype_error(dtype)
    for form in ('None', 'jnp.float32', 'jnp.bfloat16', 'jnp.float16', 'NumPy', 'Int8Momentum('):
        assert form in message, form
    named = re.findall(r"'([^']+)'", message.split('Accepted:', 1)[1])
    assert set(named) >= {'int8', 'bfloat16', 'float16', 'float32', 'bf16', 'fp16', 'f16',
                          'fp32', 'f32'}, named
    params = {'w': jnp.ones(3)}
    for name in named:  # every form the message offers is accepted
        lion_optax.lion(1e-4, mu_dtype=name).init(params)
    lion_optax.lion(1e-4, mu_dtype=lion_optax.Int8Momentum(block_size=32, min_quantized_size=4096))


def test_int8_dtype_error_says_to_pass_the_string():
    assert "pass the string 'int8'" in _mu_dtype_error(jnp.int8)


@pytest.mark.parametrize('short, long', [('bf16', 'bfloat16'), ('fp16', 'float16'),
                                         ('f16', 'float16'), ('fp32', 'float32'),
                                         ('f32', 'float32')])
def test_short_float_dtype_names_are_the_dtypes_they_name(short, long):
    params = {'w': jnp.ones(3, jnp.float32)}
    grads = {'w': jnp.array([0.5, -1.0, 2.0])}
    ours, theirs = lion_optax.lion(1e-2, mu_dtype=short), lion_optax.lion(1e-2, mu_dtype=long)
    state, reference = ours.init(params), theirs.init(params)
    assert state[0].mu['w'].dtype == jnp.dtype(long)
    chex.assert_trees_all_equal(ours.update(grads, state, params), theirs.update(grads, reference, params))


@pytest.mark.parametrize(
    'kwargs, message',
    [
        (dict(kappa='signum'), "kappa='signum' is not a known kappa"),
        (dict(kappa=3), 'kappa=3 has type int'),
        (dict(weight_decay_convention='adamw'), 'weight_decay_convention=.* not a known option'),
        (dict(cautious='yes'), 'cautious must be True, False or lion_optax.Cautious'),
        (dict(nonfinite='skip'), "nonfinite='skip' is not a known option"),
        (dict(rounding=lion_optax.Rounding(momentum='up')), "Rounding\\(momentum='up'\\) is not a known"),
        (dict(rounding=lion_optax.Rounding(params=None)), 'Rounding\\(params=None\\) is not a known'),
        (dict(rounding='nearest'), 'rounding must be a lion_optax.Rounding'),
    ],
)
def test_unknown_options_are_refused(kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        lion_optax.lion(1e-4, **kwargs)


def test_unknown_keyword_is_refused():
    with pytest.raises(TypeError, match='unexpected keyword'):
        lion_optax.lion(1e-4, mode='hard')  # optax's scale_by_lion name, not the alias'


def test_fully_decoupled_with_schedule_needs_reference_learning_rate():
    schedule = optax.schedules.constant_schedule(1e-3)
    with pytest.raises(ValueError, match='needs the reference learning rate'):
        lion_optax.lion(schedule, weight_decay_convention='fully_decoupled')
    with pytest.raises(ValueError, match=r'FullyDecoupled\(reference_learning_rate=...\)=0'):
        lion_optax.add_decoupled_weight_decay(
            0.1, weight_decay_convention=lion_optax.FullyDecoupled(reference_learning_rate=0)
        )
    with pytest.raises(ValueError, match='needs lr_ref'):
        lion_optax.add_decoupled_weight_decay(0.1, weight_decay_convention='fully_decoupled')
    # lion_optax 0.2's keywords still work, with a warning saying what to write.
    with pytest.warns(DeprecationWarning, match='weight_decay_convention=FullyDecoupled'):
        with pytest.raises(ValueError, match="only used with weight_decay_convention='fully"):
            lion_optax.add_decoupled_weight_decay(0.1, reference_learning_rate=1e-3)
    with pytest.warns(DeprecationWarning, match=r'convention=\.\.\. is deprecated'):
        tx = lion_optax.add_decoupled_weight_decay(0.1, convention='paper')
    params = {'w': jnp.ones(2)}
    np.testing.assert_allclose(tx.update(params, tx.init(params), params)[0]['w'], [1.1, 1.1], rtol=1e-7)


def test_gradient_shape_mismatch_names_the_leaf_and_both_shapes():
    tx = lion_optax.lion(1e-3)
    params = {'dense': {'kernel': jnp.zeros((3, 4))}, 'bias': jnp.zeros(4)}
    state = tx.init(params)
    bad = {'dense': {'kernel': jnp.zeros((1, 4))}, 'bias': jnp.zeros(4)}
    message = r"\['dense'\]\['kernel'\] has shape \(1, 4\) but .* has shape \(3, 4\)"
    with pytest.raises(ValueError, match=message):
        tx.update(bad, state, params)
    with pytest.raises(ValueError, match=message):
        jax.jit(tx.update)(bad, state, params)


def test_scalar_gradient_for_vector_param_is_not_broadcast():
    tx = lion_optax.scale_by_lion()
    state = tx.init(jnp.zeros(5))
    with pytest.raises(ValueError, match=r'has shape \(\) but'):
        tx.update(jnp.ones(()), state)


def test_gradient_tree_mismatch_is_refused():
    tx = lion_optax.lion(1e-3)
    params = {'a': jnp.zeros(2), 'b': jnp.zeros(2)}
    state = tx.init(params)
    with pytest.raises(ValueError, match='gradient tree does not match'):
        tx.update({'a': jnp.zeros(2)}, state, params)


def test_weight_decay_needs_params():
    tx = lion_optax.lion(1e-3)
    state = tx.init(jnp.zeros(2))
    with pytest.raises(ValueError, match=r'needs the parameters: call update\(grads, state, params\)'):
        tx.update(jnp.zeros(2), state)


@pytest.mark.parametrize('dtype', [jnp.int32, jnp.uint8, jnp.bool_])
def test_integer_params_are_refused_at_init(dtype):
    with pytest.raises(TypeError, match=r"parameter \['step'\] has dtype .* cannot take a gradient step"):
        lion_optax.lion(1e-3).init({'w': jnp.zeros(2), 'step': jnp.zeros(2, dtype)})


def test_complex_params_are_refused_at_init():
    with pytest.raises(TypeError, match='is complex .* split the parameter into real and imaginary'):
        lion_optax.lion(1e-3).init({'z': jnp.zeros(2, jnp.complex64)})


def test_python_scalars_and_numpy_arrays_are_accepted_as_params():
    tx = lion_optax.lion(1e-3)
    state = tx.init({'a': np.zeros(3, np.float32)})
    updates, _ = tx.update({'a': np.ones(3, np.float32)}, state, {'a': np.zeros(3, np.float32)})
    assert updates['a'].shape == (3,)


# --- arrays where scalars belong -------------------------------------------------


@pytest.mark.parametrize('value', [jnp.array([1.5]), np.array([np.nan]), jnp.ones((2, 2))])
@pytest.mark.parametrize('name', ['b1', 'b2'])
def test_array_betas_are_refused_at_construction(name, value):
    with pytest.raises(ValueError, match=f'{name} must be a scalar'):
        lion_optax.lion(1e-3, **{name: value})


@pytest.mark.parametrize('name, value', [('b1', jnp.array(1.5)), ('b2', np.float32(np.nan))])
def test_scalar_array_betas_are_checked_at_construction(name, value):
    with pytest.raises(ValueError, match='outside the valid range'):
        lion_optax.lion(1e-3, **{name: value})


# --- masks, int8 options and gradients of the wrong kind ------------------------


@pytest.mark.parametrize('mask', [{'w': 'yes', 'b': True}, {'w': 1, 'b': True},
                                  lambda p: {'w': 'no', 'b': True}])
def test_a_mask_that_is_not_booleans_is_refused_naming_the_leaf(mask):
    with pytest.raises(TypeError, match=r"mask leaf \['w'\]"):
        tx = lion_optax.lion(0.1, mask=mask)
        tx.update(SMALL_GRADS, tx.init(SMALL_PARAMS), SMALL_PARAMS)


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
        lion_optax.lion(0.1, mask=mask).init(SMALL_PARAMS)
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
    assert all_finite(state[0].mu)


def test_python_float_gradients_are_accepted_for_scalar_params():
    params = {'s': jnp.array(1.0)}
    tx = lion_optax.lion(0.1, weight_decay=0.0)
    updates, _ = tx.update({'s': 0.5}, tx.init(params), params)
    np.testing.assert_allclose(updates['s'], -0.1)


def test_python_float_gradient_for_an_array_param_names_the_leaf_and_shapes():
    tx = lion_optax.lion(0.1)
    with pytest.raises(ValueError, match=r"gradient leaf \['w'\] has shape \(\)"):
        tx.update({'w': 0.5, 'b': SMALL_GRADS['b']}, tx.init(SMALL_PARAMS), SMALL_PARAMS)


@pytest.mark.parametrize('dtype', [jnp.int32, jnp.int8, jnp.bool_])
def test_integer_gradients_are_refused_naming_the_leaf(dtype):
    """optax.lion computes with them: 2.80 where 2.75 was expected."""
    tx = lion_optax.lion(0.1)
    grads = {'w': jnp.ones(3, dtype), 'b': SMALL_GRADS['b']}
    with pytest.raises(TypeError, match=r"gradient leaf \['w'\] has dtype"):
        tx.update(grads, tx.init(SMALL_PARAMS), SMALL_PARAMS)


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


