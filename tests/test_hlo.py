"""Tests of lion_optax.hlo: reading compiled programs (lion_optax/_src/hlo.py, memory_traffic.py).

On known HLO text: the collectives and the bytes each device sends, the memory
traffic and kernels of an entry computation (main memory against on-chip
arrays, asynchronous copies, bookkeeping that is no kernel); on programs XLA:CPU
compiles here: ``tree_bytes`` and ``memory_traffic`` of a one-kernel step. The
ahead-of-time compiles for TPU and H100 (``compile_step``) are tested in
``test_formulation_aot.py``; ``sign_layout`` in ``test_sign_aggregation.py``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lion_optax import hlo
from lion_optax._src.hlo import compiled_text

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
    found = hlo.collectives(HLO)
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
    assert hlo.bytes_sent_per_device(HLO) == pytest.approx(sum(s[3] for s in summary))


def test_hlo_collectives_accepts_compiled_and_lowered_programs():
    lowered = jax.jit(lambda x: x * 2).lower(jnp.ones(3))
    assert hlo.collectives(lowered) == []
    assert hlo.bytes_sent_per_device(lowered.compile()) == 0.0
    # A lowered program is read as XLA compiles it, not as its StableHLO text.
    assert compiled_text(lowered) == lowered.compile().as_text()


def test_tree_bytes_counts_per_device_and_global():
    tree = {'a': jnp.zeros((4, 2)), 'b': jnp.zeros(3, jnp.bfloat16), 'n': np.zeros(2, np.float64)}
    assert hlo.tree_bytes(tree) == 32 + 6 + 16
    assert hlo.tree_bytes(tree, per_device=False) == 32 + 6 + 16
    with pytest.raises(ValueError):
        hlo.tree_bytes(tree, per_device='yes')


# --- memory traffic -------------------------------------------------------------

# An entry computation as XLA prints it: a fusion reads two 1 MiB arrays and writes
# one; a 16-byte scalar instruction is bookkeeping; on TPU an S(1) layout is on chip.
TRAFFIC_HLO = """HloModule m

%fused (a: f32[262144], b: f32[262144]) -> f32[262144] {
  ROOT %x = f32[262144]{0} add(%a, %b)
}

ENTRY %main (p0: f32[262144], p1: f32[262144], s: f32[4]) -> (f32[262144], f32[4]) {
  %p0 = f32[262144]{0} parameter(0)
  %p1 = f32[262144]{0} parameter(1)
  %s = f32[4]{0} parameter(2)
  %bc = f32[512,512]{1,0} bitcast(%p0)
  %fusion = f32[262144]{0} fusion(%p0, %p1), kind=kLoop, calls=%fused
  %small = f32[4]{0} add(%s, %s)
  ROOT %t = (f32[262144]{0}, f32[4]{0}) tuple(%fusion, %small)
}
"""
MIB = float(1 << 20)


def test_memory_traffic_counts_each_kernels_operands_and_results_once():
    traffic = hlo.memory_traffic(TRAFFIC_HLO)
    # parameter, bitcast and tuple launch nothing; the 48-byte add is bookkeeping.
    assert traffic == hlo.Traffic(bytes=3 * MIB, naive_bytes=3 * MIB, kernels=1)


def test_memory_traffic_does_not_charge_on_chip_arrays_to_main_memory():
    on_chip = TRAFFIC_HLO.replace(
        '%fusion = f32[262144]{0} fusion(%p0, %p1)', '%fusion = f32[262144]{0:S(1)} fusion(%p0, %p1)'
    )
    traffic = hlo.memory_traffic(on_chip)
    assert traffic.bytes == 2 * MIB  # the two reads; the result stays in VMEM
    assert traffic.naive_bytes == 3 * MIB and traffic.kernels == 1


def test_an_asynchronous_copy_counts_once_for_its_source_and_destination():
    copy = TRAFFIC_HLO.replace(
        '  %small = f32[4]{0} add(%s, %s)\n',
        '  %small = f32[4]{0} add(%s, %s)\n'
        '  %cs = (f32[262144]{0:S(1)}, f32[262144]{0}, u32[]) copy-start(%p1)\n'
        '  %cd = f32[262144]{0:S(1)} copy-done(%cs)\n',
    )
    traffic = hlo.memory_traffic(copy)
    # The copy reads 1 MiB from HBM and writes 1 MiB on chip; copy-done is free.
    assert traffic.kernels == 2
    assert traffic.bytes == 3 * MIB + 1 * MIB
    # The naive model counts the operand and the whole result tuple as printed.
    assert traffic.naive_bytes == 3 * MIB + (1 * MIB + 2 * MIB + 4)


def test_memory_traffic_of_a_compiled_step_is_its_ideal_bytes():
    """``p - lr * g`` in one XLA:CPU kernel: reads 8 B and writes 4 B per float32."""
    p = g = jnp.zeros(1 << 18)
    compiled = jax.jit(lambda p, g: p - 0.1 * g).lower(p, g).compile()
    assert hlo.memory_traffic(compiled) == hlo.Traffic(12 * 2**18, 12 * 2**18, 1)
    # A lowered program is compiled first; the text gives the same answer.
    lowered = jax.jit(lambda p, g: p - 0.1 * g).lower(p, g)
    assert hlo.memory_traffic(lowered) == hlo.memory_traffic(compiled.as_text())
