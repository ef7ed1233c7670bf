"""Bad input is refused with a message that names the problem (optax.lion 0.2.8 accepts it)."""

import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lion_optax


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
    with pytest.raises(ValueError, match='reference_learning_rate=0'):
        lion_optax.add_decoupled_weight_decay(
            0.1, convention='fully_decoupled', reference_learning_rate=0
        )
    with pytest.raises(ValueError, match="only used with convention='fully_decoupled'"):
        lion_optax.add_decoupled_weight_decay(0.1, reference_learning_rate=1e-3)


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
