"""Options as values: the typed options, the deprecated keywords they replace, static options.

Each deprecated keyword warns with what to write instead and gives the same
optimizer as its replacement; options that are not numbers to schedule (seeds,
modes, epsilons) are not hyperparameters of ``optax.inject_hyperparams``.
"""

import typing

import chex
import jax
import jax.numpy as jnp
import optax
import pytest

import lion_optax
from lion_optax._src import options, rounding, weight_decay

PARAMS = {'w': jnp.linspace(-1.0, 1.0, 24).reshape(4, 6), 'b': jnp.zeros(6)}
GRADS = [jax.tree.map(lambda p, k=k: jnp.cos(3 * p + k) + 0.1, PARAMS) for k in range(4)]


def _run(tx, params=PARAMS):
    state = tx.init(params)
    dtype = jnp.result_type(params['w'])
    for g in GRADS:
        updates, state = tx.update(jax.tree.map(lambda x: x.astype(dtype), g), state, params)
        params = optax.apply_updates(params, updates)
    return params, state


@pytest.mark.parametrize(
    'old, new, dtype',
    [
        (dict(cautious=True, cautious_eps=0.3), dict(cautious=lion_optax.Cautious(eps=0.3)), None),
        (dict(mu_dtype=jnp.bfloat16, mu_rounding='nearest'),
         dict(mu_dtype=jnp.bfloat16, rounding=lion_optax.Rounding(momentum='nearest')), None),
        (dict(param_rounding='nearest'), dict(rounding=lion_optax.Rounding(params='nearest')),
         jnp.bfloat16),
        (dict(seed=5), dict(rounding=lion_optax.Rounding(seed=5)), jnp.bfloat16),
        (dict(weight_decay=0.1, weight_decay_convention='fully_decoupled',
              reference_learning_rate=0.05),
         dict(weight_decay=0.1,
              weight_decay_convention=lion_optax.FullyDecoupled(reference_learning_rate=0.05)),
         None),
        (dict(diagnostics=True, max_consecutive_bad_steps=4),
         dict(diagnostics=lion_optax.Diagnostics(max_consecutive_bad_steps=4)), None),
    ],
)
def test_a_deprecated_keyword_warns_and_equals_its_replacement(old, new, dtype):
    params = jax.tree.map(lambda p: p.astype(dtype), PARAMS) if dtype else PARAMS
    with pytest.warns(DeprecationWarning, match='deprecated.*write') as caught:
        deprecated = lion_optax.lion(1e-2, **old)
    (name,) = {k for k in old if k not in new}
    assert any(name in str(w.message) for w in caught)
    chex.assert_trees_all_equal(_run(deprecated, params), _run(lion_optax.lion(1e-2, **new), params))


def test_a_value_and_its_deprecated_keyword_together_are_refused():
    with pytest.warns(DeprecationWarning), pytest.raises(ValueError, match='both set'):
        lion_optax.lion(1e-2, cautious=lion_optax.Cautious(), cautious_eps=0.1)
    with pytest.warns(DeprecationWarning), pytest.raises(ValueError, match='both set'):
        lion_optax.lion(1e-2, weight_decay_convention=lion_optax.FullyDecoupled(1e-2),
                        reference_learning_rate=1e-2)


def test_scale_by_lions_deprecated_keywords_warn_too():
    with pytest.warns(DeprecationWarning, match=r'Rounding\(momentum'):
        lion_optax.scale_by_lion(mu_dtype=jnp.bfloat16, mu_rounding='nearest')
    with pytest.warns(DeprecationWarning, match=r'Cautious\(eps'):
        lion_optax.scale_by_lion(cautious=True, cautious_eps=0.1)


def test_true_is_the_default_value():
    chex.assert_trees_all_equal(_run(lion_optax.lion(1e-2, cautious=True)),
                                _run(lion_optax.lion(1e-2, cautious=lion_optax.Cautious())))
    chex.assert_trees_all_equal(
        _run(lion_optax.lion(1e-2, diagnostics=True)),
        _run(lion_optax.lion(1e-2, diagnostics=lion_optax.Diagnostics())))


def test_accepted_strings_are_derived_from_their_literals():
    assert options.NONFINITE_MODES == typing.get_args(options.Nonfinite)
    assert options.NONFINITE_ELEMENTS == typing.get_args(options.NonfiniteElements)
    assert options.INVALID_HYPERPARAMETER_MODES == typing.get_args(options.InvalidHyperparameters)
    assert rounding.ROUNDING_MODES == typing.get_args(rounding.RoundingMode)
    assert weight_decay.WEIGHT_DECAY_CONVENTIONS == typing.get_args(
        weight_decay.WeightDecayConventionName)


def test_inject_hyperparams_sees_only_numbers_to_schedule():
    """Seeds, epsilons and modes are values, not hyperparameters (issue: seed showed as 0.0)."""
    tx = optax.inject_hyperparams(lion_optax.lion)(learning_rate=1e-2)
    state = tx.init(PARAMS)
    assert set(state.hyperparams) == {'learning_rate', 'b1', 'b2', 'weight_decay'}
    tx = optax.inject_hyperparams(lion_optax.lion)(
        learning_rate=1e-2, cautious=lion_optax.Cautious(eps=0.1),
        rounding=lion_optax.Rounding(seed=3))
    assert set(tx.init(PARAMS).hyperparams) == {'learning_rate', 'b1', 'b2', 'weight_decay'}


@pytest.mark.parametrize('seed', [2**40, -1, 2**32 + 5])
def test_any_integer_seed_is_folded_into_32_bits_when_built(seed):
    """seed=2**40 used to be accepted and overflow at the first step."""
    params = jax.tree.map(lambda p: p.astype(jnp.bfloat16), PARAMS)
    folded = lion_optax.lion(1e-2, rounding=lion_optax.Rounding(seed=seed % 2**32))
    chex.assert_trees_all_equal(
        _run(lion_optax.lion(1e-2, rounding=lion_optax.Rounding(seed=seed)), params),
        _run(folded, params))
    jax.jit(lion_optax.lion(1e-2, rounding=lion_optax.Rounding(seed=seed)).update)(
        GRADS[0], lion_optax.lion(1e-2).init(PARAMS), PARAMS)


def test_a_numpy_integer_seed_is_a_seed_too():
    import numpy as np

    tx = lion_optax.lion(1e-2, rounding=lion_optax.Rounding(seed=np.int64(2**40)))
    tx.update(GRADS[0], tx.init(PARAMS), PARAMS)
