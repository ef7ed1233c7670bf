"""Tests of lion_optax/_src/sharding.py: Lion on a device mesh.

In this process (one device): ``zeros_like_sharded``. In a subprocess with
eight CPU devices (``_multidevice_sharding.py``, the ``sharding_on_eight_devices``
fixture of conftest.py): sharded Lion on a (data=2, model=4) mesh with Auto and
Explicit axes, its compiled collectives, every momentum storage (float32,
bfloat16, float16, int8) under FSDP, tensor-parallel, 2-D and replicated
layouts, the kappa variants that need a norm. The HLO readers are tested in
``test_hlo.py``, the ZeRO-style wrapper in ``test_zero.py``.
"""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lion_optax._src import sharding

# --- zeros_like_sharded ------------------------------------------------------


@pytest.mark.parametrize('jit', [False, True])
def test_zeros_like_sharded_is_exact_zeros_even_for_nonfinite_input(jit):
    x = jnp.array([[1.0, jnp.nan], [jnp.inf, -2.0]], jnp.float32)
    fn = (
        jax.jit(sharding.zeros_like_sharded, static_argnums=1)
        if jit
        else sharding.zeros_like_sharded
    )
    z = fn(x, jnp.bfloat16)
    assert z.dtype == jnp.bfloat16 and z.shape == (2, 2)
    np.testing.assert_array_equal(np.asarray(z, np.float32), 0.0)
    assert not np.signbit(np.asarray(z, np.float32)).any()
    assert z.sharding == x.sharding
    assert fn(x, None).dtype == jnp.float32


def test_zeros_like_sharded_under_vmap_and_for_numpy_input():
    batched = jax.vmap(lambda a: sharding.zeros_like_sharded(a, jnp.float16))(jnp.ones((3, 2)))
    assert batched.shape == (3, 2) and batched.dtype == jnp.float16
    from_numpy = sharding.zeros_like_sharded(np.ones((4,), np.float64), jnp.float32)
    assert from_numpy.shape == (4,) and from_numpy.dtype == jnp.float32


def test_zeros_like_sharded_inside_shard_map():
    mesh = jax.make_mesh((1,), ('data',))
    x = jax.device_put(jnp.ones((2, 3)), jax.NamedSharding(mesh, jax.P('data')))
    fn = jax.jit(
        jax.shard_map(
            sharding.zeros_like_sharded,
            mesh=mesh,
            in_specs=jax.P('data'),
            out_specs=jax.P('data'),
        )
    )
    np.testing.assert_array_equal(fn(x), np.zeros((2, 3)))


# --- eight devices in a subprocess ---------------------------------------------


MESHES = ['auto', 'explicit', 'explicit_set_mesh']


@pytest.mark.parametrize('mesh', MESHES)
def test_state_has_the_params_sharding_after_init_and_every_update(sharding_on_eight_devices, mesh):
    d = sharding_on_eight_devices[mesh]
    assert d['param_specs'] == {
        'w': "P('data', 'model')",
        'emb': "P(None, 'model')",
        'b': "P('model',)",
        'r': 'P()',
    }
    assert all(d['eager_init_same'].values()), d['eager_init_same']
    assert all(d['jit_init_same'].values()), d['jit_init_specs']
    assert d['steps_state_same'] == [True, True, True]
    assert d['steps_params_same'] == [True, True, True]


@pytest.mark.parametrize('mesh', MESHES)
def test_sharded_update_compiles_without_collectives(sharding_on_eight_devices, mesh):
    d = sharding_on_eight_devices[mesh]
    # The default non-finite guard is element-wise: nothing to agree on.
    assert d['update_collectives'] == []
    # nonfinite='skip_step' must agree across shards whether the gradient is
    # finite: a few scalars all-reduced (the finiteness check sums x - x per leaf
    # in float32), nothing of the parameters' size.
    assert d['update_collectives_skip_step']
    for kind, _, _, shape in d['update_collectives_skip_step']:
        scalars = re.findall(r'(\w+)\[([^\]]*)\]', shape)
        assert kind == 'all-reduce' and scalars, shape
        assert all(dtype in ('pred', 'f32') and dims == '' for dtype, dims in scalars), shape
    # At most two 4-byte scalars per parameter leaf (4 leaves here); the scalar-only
    # check above is what rules out anything of a parameter's size.
    assert sum(c[1] for c in d['update_collectives_skip_step']) <= 8 * len(d['param_specs'])


@pytest.mark.parametrize('mesh', MESHES)
def test_sharded_step_compiles_once_after_eager_or_jitted_init(sharding_on_eight_devices, mesh):
    assert sharding_on_eight_devices[mesh]['compilations_eager_init'] == 1
    assert sharding_on_eight_devices[mesh]['compilations_jit_init'] == 1


@pytest.mark.parametrize('mesh', MESHES)
def test_sharded_lion_equals_the_single_device_run(sharding_on_eight_devices, mesh):
    assert sharding_on_eight_devices[mesh]['max_diff_vs_single_device'] <= 1e-6


@pytest.mark.parametrize('variant', ['l2_global', 'l2_leaf', 'cautious'])
def test_norm_variants_communicate_only_scalars(sharding_on_eight_devices, variant):
    """A norm or a kept fraction over a sharded array combines one scalar (or one
    (max, scaled sum) pair: the one-pass norm's partial results, all-gathered, as
    its combiner is not a sum) per device and leaf: O(leaves x devices) bytes per
    step, whatever the parameters' size."""
    d = sharding_on_eight_devices['variants']
    collectives = d[variant]
    assert collectives, 'a norm over a sharded array needs a collective'
    for kind, _, _, shape in collectives:
        assert kind in ('all-reduce', 'all-gather'), kind
        if kind == 'all-reduce':
            assert set(shape.replace('/*index=5*/', '')) <= set('f32[](), '), shape
        else:  # one value per device, for the devices the leaf is split over
            dims = re.fullmatch(r'f32\[([\d,]*)\](\{[\d,]*\})?', shape)
            assert dims, shape
            assert math.prod(int(n) for n in dims.group(1).split(',') if n) <= 8, shape
    leaves, values_per_leaf, devices = len(sharding_on_eight_devices['auto']['param_specs']), 2, 8
    assert sum(c[1] for c in collectives) <= 4 * leaves * values_per_leaf * devices
    assert d[f'{variant}_max_diff'] <= 1e-6


STORAGES = ['float32', 'bfloat16', 'float16', 'int8']
LAYOUTS = ['fsdp', 'tensor_parallel', '2d', 'replicated']


@pytest.mark.parametrize('layout', LAYOUTS)
@pytest.mark.parametrize('storage', STORAGES)
def test_every_momentum_storage_shards_like_the_parameter(sharding_on_eight_devices, storage, layout):
    """Each device holds its share of the momentum (int8: codes and scales together)
    after an eager init, a jitted init and every update; the update sends nothing;
    the parameters equal the one-device run's."""
    d = sharding_on_eight_devices['storages'][f'{storage}/{layout}']
    share = 1.0 / d['devices_holding_w']
    assert len(d['fractions']) == 2 + 3
    assert all(share <= f <= 1.1 * share for f in d['fractions']), d['fractions']
    assert d['collectives'] == []
    assert d['param_sharding_kept']
    assert d['max_diff_vs_single_device'] <= 1e-6


@pytest.mark.parametrize('target', ['mesh_8', 'mesh_2x4', 'one_device'])
@pytest.mark.parametrize('storage', ['bfloat16', 'int8'])
def test_low_precision_checkpoints_restore_across_meshes(sharding_on_eight_devices, storage, target):
    """Saved from an (8,) FSDP mesh; restored onto (8,), (2, 4) and one device with
    the target's shardings; the run then continues bit for bit."""
    d = sharding_on_eight_devices['checkpoints'][f'{storage}/{target}']
    assert d['shardings_as_target']
    assert d['max_diff'] == 0.0


@pytest.mark.parametrize('storage', ['bfloat16', 'int8'])
def test_a_checkpoint_with_another_momentum_storage_is_refused(sharding_on_eight_devices, storage):
    message = sharding_on_eight_devices['checkpoints'][f'{storage}/mismatch_error']
    assert 'does not match the restore target' in message and 'mu' in message


@pytest.mark.parametrize('optimizer', ['optax.adamw', 'lion, float32 momentum',
                                       'lion, bfloat16 momentum', 'lion, int8 momentum'])
def test_memory_at_scale_script_predicts_what_devices_hold(sharding_on_eight_devices, optimizer):
    """benchmarks/memory_at_scale.py computes per-device bytes from shapes alone; on
    8 devices it must equal the bytes a device really holds after a jitted init."""
    d = sharding_on_eight_devices['memory_script'][optimizer]
    assert d['predicted'] == d['held'], d
