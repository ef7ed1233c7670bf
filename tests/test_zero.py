"""Tests of lion_optax/_src/zero.py: ``shard_optimizer_state``, the ZeRO-style wrapper.

In this process (one device): the wrapper equals its inner optimizer, and its
validation. With eight CPU devices (``_multidevice_sharding.py``, shared with
``test_sharding.py``): the momentum, float32 or int8 codes and scales, split over
the data axis while the parameters stay replicated, and the one all-gather a
step that costs.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType

import lion_optax

# --- shard_optimizer_state in one process ---------------------------------------


def test_shard_optimizer_state_on_one_device_equals_the_inner_optimizer():
    mesh = jax.make_mesh((1,), ('data',), axis_types=(AxisType.Auto,))
    inner = lion_optax.lion(1e-2, weight_decay=0.1)
    tx = lion_optax.shard_optimizer_state(inner, 'data', mesh=mesh)
    params = {'w': jnp.arange(6.0).reshape(3, 2), 's': jnp.array(2.0)}
    grads = {'w': jnp.array([[1.0, -1.0], [0.5, 0.0], [-2.0, 3.0]]), 's': jnp.array(-1.0)}
    got, state = jax.jit(tx.update)(grads, jax.jit(tx.init)(params), params)
    expected, inner_state = inner.update(grads, inner.init(params), params)
    jax.tree.map(np.testing.assert_array_equal, got, expected)
    jax.tree.map(np.testing.assert_array_equal, state, inner_state)


def test_shard_optimizer_state_needs_a_mesh_with_that_axis():
    params = {'w': jnp.ones((4, 2))}
    with pytest.raises(ValueError, match='needs a mesh'):
        lion_optax.shard_optimizer_state(optax.sgd(0.1), 'data').init(params)
    mesh = jax.make_mesh((1,), ('batch',), axis_types=(AxisType.Auto,))
    with pytest.raises(ValueError, match='not an axis'):
        lion_optax.shard_optimizer_state(optax.sgd(0.1), 'data', mesh=mesh).init(params)
    with pytest.raises(TypeError, match='axis_name'):
        lion_optax.shard_optimizer_state(optax.sgd(0.1), ('data', 'model'))



# --- eight devices in a subprocess ---------------------------------------------


def test_zero_shards_int8_codes_and_scales(sharding_on_eight_devices):
    d = sharding_on_eight_devices['zero_int8']
    assert all(0.25 <= f <= 1.1 * 0.25 for f in d['fractions']), d['fractions']
    assert d['max_diff_vs_single_device'] <= 1e-6


def test_zero_shards_the_momentum_and_keeps_params_replicated(sharding_on_eight_devices):
    d = sharding_on_eight_devices['zero']
    assert d['mu_specs'] == {'w': "P('data',)", 'emb': "P('data',)", 'b': "P('data',)", 'r': 'P()'}
    # w, emb and b split 4 ways; r (3, 5) has no dimension 4 divides and stays whole.
    divisible = 4 * (16 * 8 + 12 * 8 + 8)
    expected = d['replicated_state_bytes'] - divisible + divisible // 4
    assert d['eager_state_bytes'] == d['jit_state_bytes'] == expected
    assert d['state_bytes_after_updates'] == expected
    assert expected < 0.35 * d['replicated_state_bytes']
    assert d['params_replicated'] == [True, True, True]
    assert d['max_diff_vs_single_device'] <= 1e-6
    assert d['compilations'] == d['compilations_eager_init'] == 1
    # The price: one all-gather of each sharded leaf's float32 update per step.
    assert sorted(c[0] for c in d['collectives']) == ['all-gather'] * 3
    assert sum(c[1] for c in d['collectives']) == divisible
    assert 'AxisType.Auto' in d['explicit_error']
