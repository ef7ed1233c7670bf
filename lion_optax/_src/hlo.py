"""Reading compiled programs: the collectives a step runs and the bytes it moves.

Tools for tests and benchmarks (``lion_optax.hlo``): :func:`collectives`
lists the collectives of a compiled program with the bytes each device sends,
:func:`bytes_sent_per_device` sums them, and :func:`tree_bytes` counts the
bytes a pytree occupies on one device.
"""

import math
import re
from typing import Any, NamedTuple

import jax
import numpy as np

from lion_optax._src import validation

_DTYPE_BITS = {
    'pred': 8,
    's2': 2,
    'u2': 2,
    's4': 4,
    'u4': 4,
    's8': 8,
    'u8': 8,
    's16': 16,
    'u16': 16,
    's32': 32,
    'u32': 32,
    's64': 64,
    'u64': 64,
    'f16': 16,
    'bf16': 16,
    'f32': 32,
    'f64': 64,
    'c64': 64,
    'c128': 128,
}
_KINDS = ('all-reduce', 'all-gather', 'reduce-scatter', 'all-to-all', 'collective-permute')
_OP = re.compile(
    r'^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(?P<shape>.+?)\s+'
    r'(?P<op>all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute)'
    r'(?P<start>-start)?\('
)
# An array in an HLO type: element type, dimensions, layout (``{1,0}``, ``{0:S(1)}``).
_ARRAY = re.compile(r'\b([a-z]+\d*(?:e\d+m\d+\w*)?)\[([\d,]*)\](\{[^}]*\})?')


class Collective(NamedTuple):
    """One collective of a compiled program, as :func:`collectives` reads it.

    Attributes:
      kind: ``'all-reduce'``, ``'all-gather'``, ``'reduce-scatter'``,
        ``'all-to-all'`` or ``'collective-permute'``.
      buffer_bytes: the bytes of the whole buffer the collective works on, per
        device: the operand of an all-reduce or all-to-all, the (gathered)
        result of an all-gather, the (unscattered) input of a reduce-scatter.
      group_size: the number of devices that take part together.
      bytes_sent: the bytes one device sends, by the bandwidth-optimal
        (ring or direct) algorithm: ``2 (n-1)/n`` of the buffer for an
        all-reduce, ``(n-1)/n`` for the other three, the whole buffer for a
        collective-permute.
      hlo: the HLO instruction, for reading.
    """

    kind: str
    buffer_bytes: float
    group_size: int
    bytes_sent: float
    hlo: str


def compiled_text(hlo: Any) -> str:
    """The optimised HLO text of a compiled or lowered program (or the text itself)."""
    if isinstance(hlo, str):
        return hlo
    if isinstance(hlo, jax.stages.Lowered):
        hlo = hlo.compile()  # a lowered program's own text is StableHLO, not XLA's
    return hlo.as_text()


def dtype_bits(name: str) -> int:
    """Bits per element of an HLO element type (``'f32'``, ``'bf16'``, ``'s8'``, ``'f8e4m3fn'``...)."""
    if name in _DTYPE_BITS:
        return _DTYPE_BITS[name]
    match = re.match(r'[a-z]+?(\d+)', name)  # f8e4m3fn and other narrow floats
    if match is None:
        raise ValueError(f'Unknown HLO element type {name!r}.')
    return int(match.group(1))


def arrays(type_text: str) -> list[tuple[float, str]]:
    """``[(bytes, layout), ...]`` of every array in an HLO type, in order.

    Non-array types (``token[]``) are skipped; ``layout`` is the text of the
    layout annotation (``'{1,0}'``, ``'{0:S(1)}'``), or ``''`` where none is printed.
    """
    found = []
    for dtype, dims, layout in _ARRAY.findall(type_text):
        try:
            bits = dtype_bits(dtype)
        except ValueError:
            continue
        count = math.prod(int(d) for d in dims.split(',') if d)
        found.append((count * bits / 8, layout))
    return found


def _group_size(line: str, total_devices: int) -> int:
    # replica_groups=mesh['axis_0'=2,'axis_1'=4] {'axis_1'}: the named axes' sizes.
    named = re.search(r'replica_groups=mesh\[([^\]]*)\][^{]*\{([^}]*)\}', line)
    if named:
        sizes = dict(re.findall(r"'([^']+)'=(\d+)", named.group(1)))
        axes = re.findall(r"'([^']+)'", named.group(2))
        if not axes:
            return total_devices
        return math.prod(int(sizes[a]) for a in axes)
    iota = re.search(r'replica_groups=\[([\d,]+)\]<=', line)
    if iota:
        return int(iota.group(1).split(',')[-1])
    listed = re.search(r'replica_groups=\{\{([\d,\s]*)\}', line)
    if listed:
        return len([d for d in listed.group(1).split(',') if d.strip()])
    return total_devices


def collectives(hlo: Any) -> list[Collective]:
    """Lists the collectives of a compiled program and the bytes each device sends.

    Args:
      hlo: a compiled program (``jax.jit(f).lower(...).compile()``), a lowered
        one (it is compiled), or the compiled HLO text.

    Returns:
      One :class:`Collective` per collective instruction of the optimised
      program, in program order (asynchronous pairs are counted once, at their
      ``-start``).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from lion_optax.hlo import collectives
      >>> collectives(jax.jit(jnp.sin).lower(jnp.ones(3)).compile())
      []
    """
    text = compiled_text(hlo)
    partitions = re.search(r'num_partitions=(\d+)', text)
    replicas = re.search(r'replica_count=(\d+)', text)
    total = (int(partitions.group(1)) if partitions else 1) * (
        int(replicas.group(1)) if replicas else 1
    )
    found = []
    for line in text.splitlines():
        match = _OP.match(line)
        if match is None:
            continue
        kind = match.group('op')
        sizes = [size for size, _ in arrays(match.group('shape'))]
        if match.group('start') and kind == 'all-gather':
            sizes = sizes[len(sizes) // 2 :]  # (operands, results): keep the results
        elif match.group('start') and kind == 'collective-permute':
            sizes = sizes[:1]
        n = _group_size(line, total)
        buffer = float(sum(sizes))
        if kind == 'reduce-scatter':
            buffer *= n  # the shape printed is the scattered result
        if n <= 1:
            sent = 0.0
        elif kind == 'all-reduce':
            sent = 2.0 * (n - 1) / n * buffer
        elif kind == 'collective-permute':
            sent = buffer
        else:
            sent = (n - 1) / n * buffer
        found.append(Collective(kind, buffer, n, sent, line.strip()))
    return found


def bytes_sent_per_device(hlo: Any) -> float:
    """Total bytes one device sends in the collectives of a compiled program.

    The sum of :attr:`Collective.bytes_sent` over :func:`collectives`;
    see there for the cost model.

    Args:
      hlo: a compiled or lowered program, or its compiled HLO text.

    Returns:
      Bytes per device per call, as a float.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from lion_optax.hlo import bytes_sent_per_device
      >>> bytes_sent_per_device(jax.jit(jnp.cos).lower(jnp.ones(3)).compile())
      0.0
    """
    return float(sum(c.bytes_sent for c in collectives(hlo)))


def _nbytes(x: Any) -> int:
    return int(x.nbytes) if hasattr(x, 'nbytes') else int(np.asarray(x).nbytes)


def tree_bytes(tree: Any, *, per_device: bool = True) -> int:
    """Bytes a pytree of arrays takes on one device (or in all, when not ``per_device``).

    Args:
      tree: a pytree of ``jax.Array`` (or NumPy arrays).
      per_device: count only the largest per-device footprint (the shards on
        one device); False counts the global (logical) size.

    Returns:
      The number of bytes.

    Example:
      >>> import jax.numpy as jnp
      >>> from lion_optax.hlo import tree_bytes
      >>> tree_bytes({'a': jnp.zeros(4), 'b': jnp.zeros((2, 2), jnp.bfloat16)})
      24
    """
    validation.check_choice('per_device', per_device, (True, False))
    leaves = jax.tree.leaves(tree)
    if not per_device:
        return int(sum(_nbytes(x) for x in leaves))
    everywhere = 0  # arrays without shards (NumPy) count on every device
    by_device: dict[Any, int] = {}
    for leaf in leaves:
        shards = getattr(leaf, 'addressable_shards', None)
        if not shards:
            everywhere += _nbytes(leaf)
            continue
        for shard in shards:
            by_device[shard.device] = by_device.get(shard.device, 0) + shard.data.nbytes
    return int(everywhere + max(by_device.values(), default=0))
