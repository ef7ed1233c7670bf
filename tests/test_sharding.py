"""Tests of lion_optax/_src/sharding.py: Lion on a device mesh.

In this process (one device): ``zeros_like_sharded``, the HLO reader on known
text, ``tree_bytes`` and the validation of ``shard_optimizer_state``. In a
subprocess with eight CPU devices (``_multidevice_sharding.py``): sharded
Lion on a (data=2, model=4) mesh with Auto and Explicit axes, its compiled
collectives, every momentum storage (float32, bfloat16, float16, int8) under
FSDP, tensor-parallel, 2-D and replicated layouts, the kappa variants that need
a norm, and the ZeRO-style wrapper with float32 and int8 momentum.
"""

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType

import lion_optax

from _helpers import child_env

SCRIPT = Path(__file__).with_name('_multidevice_sharding.py')


# --- zeros_like_sharded ------------------------------------------------------


@pytest.mark.parametrize('jit', [False, True])
def test_zeros_like_sharded_is_exact_zeros_even_for_nonfinite_input(jit):
    x = jnp.array([[1.0, jnp.nan], [jnp.inf, -2.0]], jnp.float32)
    fn = (
        jax.jit(lion_optax.zeros_like_sharded, static_argnums=1)
        if jit
        else lion_optax.zeros_like_sharded
    )
    z = fn(x, jnp.bfloat16)
    assert z.dtype == jnp.bfloat16 and z.shape == (2, 2)
    np.testing.assert_array_equal(np.asarray(z, np.float32), 0.0)
    assert not np.signbit(np.asarray(z, np.float32)).any()
    assert z.sharding == x.sharding
    assert fn(x, None).dtype == jnp.float32


def test_zeros_like_sharded_under_vmap_and_for_numpy_input():
    batched = jax.vmap(lambda a: lion_optax.zeros_like_sharded(a, jnp.float16))(jnp.ones((3, 2)))
    assert batched.shape == (3, 2) and batched.dtype == jnp.float16
    from_numpy = lion_optax.zeros_like_sharded(np.ones((4,), np.float64), jnp.float32)
    assert from_numpy.shape == (4,) and from_numpy.dtype == jnp.float32


def test_zeros_like_sharded_inside_shard_map():
    mesh = jax.make_mesh((1,), ('data',))
    x = jax.device_put(jnp.ones((2, 3)), jax.NamedSharding(mesh, jax.P('data')))
    fn = jax.jit(
        jax.shard_map(
            lion_optax.zeros_like_sharded,
            mesh=mesh,
            in_specs=jax.P('data'),
            out_specs=jax.P('data'),
        )
    )
    np.testing.assert_array_equal(fn(x), np.zeros((2, 3)))


# --- reading collectives from HLO ---------------------------------------------

HLO = """HloModule m, num_partitions=8
%ar = f32[1024]{0} all-reduce(%x), channel_id=1, replica_groups={{0,1,2,3},{4,5,6,7}}, to_apply=%add
%ag = bf16[8,16]{1,0} all-gather(%y), channel_id=2, replica_groups=[2,4]<=[8], dimensions={0}
%rs = u8[4,4]{1,0} reduce-scatter(%z), channel_id=3, replica_groups={}, dimensions={0}
%a2a = (u32[1,24]{1,0}, u32[1,24]{1,0}) all-to-all(%p, %q), channel_id=4, replica_groups={{0,1}}
%cp = f32[10]{0} collective-permute(%w), channel_id=5, source_target_pairs={{0,1},{1,0}}
%ags = (f32[8]{0}, f32[64]{0}) all-gather-start(%v), channel_id=6, replica_groups=[1,8]<=[8], dimensions={0}
%agd = f32[64]{0} all-gather-done(%ags)
ROOT %m = pred[] all-reduce(%k), channel_id=7, replica_groups=mesh['axis_0'=2,'axis_1'=4] {'axis_1'}, to_apply=%and
%add.1 = f32[1024]{0} add(%ar, %ar)
"""


def test_hlo_collectives_reads_every_kind_and_replica_group_format():
    found = lion_optax.hlo.hlo_collectives(HLO)
    summary = [(c.kind, c.buffer_bytes, c.group_size, c.bytes_sent) for c in found]
    assert summary == [
        ('all-reduce', 4096.0, 4, 2 * 3 / 4 * 4096),  # ring: 2 (n-1)/n
        ('all-gather', 256.0, 4, 3 / 4 * 256),  # the gathered result
        ('reduce-scatter', 128.0, 8, 7 / 8 * 128),  # empty groups: every device
        ('all-to-all', 192.0, 2, 96.0),  # both tuple operands
        ('collective-permute', 40.0, 8, 40.0),
        ('all-gather', 256.0, 8, 7 / 8 * 256),  # async: counted once, its result
        ('all-reduce', 1.0, 4, 1.5),  # mesh-axis groups
    ]
    assert lion_optax.hlo.bytes_sent_per_device(HLO) == pytest.approx(sum(s[3] for s in summary))


def test_hlo_collectives_accepts_compiled_and_lowered_programs():
    lowered = jax.jit(lambda x: x * 2).lower(jnp.ones(3))
    assert lion_optax.hlo.hlo_collectives(lowered) == []
    assert lion_optax.hlo.bytes_sent_per_device(lowered.compile()) == 0.0


def test_tree_bytes_counts_per_device_and_global():
    tree = {'a': jnp.zeros((4, 2)), 'b': jnp.zeros(3, jnp.bfloat16), 'n': np.zeros(2, np.float64)}
    assert lion_optax.hlo.tree_bytes(tree) == 32 + 6 + 16
    assert lion_optax.hlo.tree_bytes(tree, per_device=False) == 32 + 6 + 16
    with pytest.raises(ValueError):
        lion_optax.hlo.tree_bytes(tree, per_device='yes')


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


@pytest.fixture(scope='module')
def eight_devices(tmp_path_factory):
    folder = tmp_path_factory.mktemp('sharding')
    out = folder / 'checks.json'
    result = subprocess.run(
        [sys.executable, str(SCRIPT), str(out), str(folder / 'checkpoints')],
        env=child_env(drop=('XLA_FLAGS',)),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads(out.read_text())


MESHES = ['auto', 'explicit', 'explicit_set_mesh']


@pytest.mark.parametrize('mesh', MESHES)
def test_state_has_the_params_sharding_after_init_and_every_update(eight_devices, mesh):
    d = eight_devices[mesh]
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
def test_sharded_update_compiles_without_collectives(eight_devices, mesh):
    d = eight_devices[mesh]
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
def test_sharded_step_compiles_once_after_eager_or_jitted_init(eight_devices, mesh):
    assert eight_devices[mesh]['compilations_eager_init'] == 1
    assert eight_devices[mesh]['compilations_jit_init'] == 1


@pytest.mark.parametrize('mesh', MESHES)
def test_sharded_lion_equals_the_single_device_run(eight_devices, mesh):
    assert eight_devices[mesh]['max_diff_vs_single_device'] <= 1e-6


@pytest.mark.parametrize('variant', ['l2_global', 'l2_leaf', 'cautious'])
def test_norm_variants_communicate_only_scalars(eight_devices, variant):
    """A norm or a kept fraction over a sharded array combines one scalar (or one
    (max, scaled sum) pair: the one-pass norm's partial results, all-gathered, as
    its combiner is not a sum) per device and leaf: O(leaves x devices) bytes per
    step, whatever the parameters' size."""
    d = eight_devices['variants']
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
    leaves, values_per_leaf, devices = len(eight_devices['auto']['param_specs']), 2, 8
    assert sum(c[1] for c in collectives) <= 4 * leaves * values_per_leaf * devices
    assert d[f'{variant}_max_diff'] <= 1e-6


STORAGES = ['float32', 'bfloat16', 'float16', 'int8']
LAYOUTS = ['fsdp', 'tensor_parallel', '2d', 'replicated']


@pytest.mark.parametrize('layout', LAYOUTS)
@pytest.mark.parametrize('storage', STORAGES)
def test_every_momentum_storage_shards_like_the_parameter(eight_devices, storage, layout):
    """Each device holds its share of the momentum (int8: codes and scales together)
    after an eager init, a jitted init and every update; the update sends nothing;
    the parameters equal the one-device run's."""
    d = eight_devices['storages'][f'{storage}/{layout}']
    share = 1.0 / d['devices_holding_w']
    assert len(d['fractions']) == 2 + 3
    assert all(share <= f <= 1.1 * share for f in d['fractions']), d['fractions']
    assert d['collectives'] == []
    assert d['param_sharding_kept']
    assert d['max_diff_vs_single_device'] <= 1e-6


@pytest.mark.parametrize('target', ['mesh_8', 'mesh_2x4', 'one_device'])
@pytest.mark.parametrize('storage', ['bfloat16', 'int8'])
def test_low_precision_checkpoints_restore_across_meshes(eight_devices, storage, target):
    """Saved from an (8,) FSDP mesh; restored onto (8,), (2, 4) and one device with
    the target's shardings; the run then continues bit for bit."""
    d = eight_devices['checkpoints'][f'{storage}/{target}']
    assert d['shardings_as_target']
    assert d['max_diff'] == 0.0


@pytest.mark.parametrize('storage', ['bfloat16', 'int8'])
def test_a_checkpoint_with_another_momentum_storage_is_refused(eight_devices, storage):
    message = eight_devices['checkpoints'][f'{storage}/mismatch_error']
    assert 'does not match the restore target' in message and 'mu' in message


@pytest.mark.parametrize('optimizer', ['optax.adamw', 'lion, float32 momentum',
                                       'lion, bfloat16 momentum', 'lion, int8 momentum'])
def test_memory_at_scale_script_predicts_what_devices_hold(eight_devices, optimizer):
    """benchmarks/memory_at_scale.py computes per-device bytes from shapes alone; on
    8 devices it must equal the bytes a device really holds after a jitted init."""
    d = eight_devices['memory_script'][optimizer]
    assert d['predicted'] == d['held'], d


def test_zero_shards_int8_codes_and_scales(eight_devices):
    d = eight_devices['zero_int8']
    assert all(0.25 <= f <= 1.1 * 0.25 for f in d['fractions']), d['fractions']
    assert d['max_diff_vs_single_device'] <= 1e-6


def test_zero_shards_the_momentum_and_keeps_params_replicated(eight_devices):
    d = eight_devices['zero']
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
