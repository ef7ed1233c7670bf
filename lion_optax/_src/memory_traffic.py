r"""What a compiled step costs in memory traffic: bytes each kernel moves, and kernels.

A memory-bound step (Lion's) runs as fast as its kernels move bytes through
the accelerator's main memory (HBM). The model: each kernel of the compiled
program's entry computation (a fusion, a copy, a custom call such as a Pallas
kernel, a collective) reads each operand and writes each result once.
:func:`memory_traffic` counts those bytes two ways:

- ``bytes``: only arrays that live in main memory. On TPU, XLA's memory-space
  assignment places some arrays in on-chip memory (layouts marked ``S(1)``,
  VMEM); reading those costs no HBM bandwidth, and the asynchronous copy that
  brings an array on chip (``copy-start``) counts once, for its HBM side.
- ``naive_bytes``: every operand and result, wherever it lives (the model of
  ``../shared/checks/accelerator_aot.py``), an upper bound.

On GPU both agree. Instructions that move less than 4 KiB in all (scalar
bookkeeping) are neither traffic nor kernels. Compiled figures, not timings.
"""

import re
from typing import Any, NamedTuple

from lion_optax._src.hlo import arrays, compiled_text

# Instructions that launch no kernel of their own.
_FREE_OPS = frozenset({
    'parameter', 'tuple', 'get-tuple-element', 'bitcast', 'constant', 'copy-done',
    'after-all', 'opt-barrier', 'partition-id', 'replica-id', 'add-dependency',
    'all-reduce-done', 'all-gather-done', 'collective-permute-done', 'async-done',
    'slice-done', 'send-done', 'recv-done',
})
_SMALL = 4096  # bytes: below this an instruction is bookkeeping, not a kernel
_INSTRUCTION = re.compile(r'^\s*(?:ROOT )?%?([\w.\-]+) = (.*?) ([a-z][\w\-]*)\((.*)$')
_ON_CHIP = re.compile(r'S\(([1-9]\d*)\)')


class Traffic(NamedTuple):
    """Memory traffic of a compiled program's entry computation.

    Attributes:
      bytes: bytes moved through main memory (HBM), by the model above.
      naive_bytes: bytes moved counting on-chip arrays too.
      kernels: kernels launched (instructions that move at least 4 KiB).
    """

    bytes: float
    naive_bytes: float
    kernels: int


def _arrays(type_text: str) -> list[tuple[float, bool]]:
    """``[(bytes, in_main_memory), ...]`` of every array in an HLO type."""
    return [(size, not _ON_CHIP.search(layout)) for size, layout in arrays(type_text)]


def _split_top_level(type_text: str) -> list[str]:
    """The elements of a tuple type ``(a, (b, c), d)`` at the top level."""
    text = type_text.strip()
    if not text.startswith('('):
        return [text]
    parts, depth, start = [], 0, 1
    for i, ch in enumerate(text):
        if ch in '({':
            depth += 1
        elif ch in ')}':
            depth -= 1
        if ch == ',' and depth == 1:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:-1])
    return [p.strip() for p in parts if p.strip()]


def memory_traffic(compiled: Any) -> Traffic:
    """Bytes moved and kernels launched by a compiled program (see the module docstring).

    Args:
      compiled: a compiled program (``jax.jit(f).lower(...).compile()``), a
        lowered one (it is compiled), or its compiled HLO text.

    Returns:
      A :class:`Traffic`.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from lion_optax.hlo import memory_traffic
      >>> x = jnp.zeros(1 << 20)
      >>> memory_traffic(jax.jit(lambda x: x * 2).lower(x).compile())  # read 4 MiB, write 4 MiB
      Traffic(bytes=8388608.0, naive_bytes=8388608.0, kernels=1)
    """
    text = compiled_text(compiled)
    entry = text[text.index('\nENTRY'):]
    values: dict[str, list[tuple[float, bool]]] = {}
    total = naive = 0.0
    kernels = 0
    for line in entry.splitlines()[1:]:
        match = _INSTRUCTION.match(line)
        if not match:
            continue
        name, type_text, op, rest = match.groups()
        result = _arrays(type_text)
        values[name] = result
        if op in _FREE_OPS:
            continue
        operand_names = re.findall(r'%([\w.\-]+)', rest.split('), ')[0])
        operands = [a for o in operand_names for a in values.get(o, [])]
        everything = sum(size for size, _ in operands + result)
        if everything < _SMALL:
            continue
        if op in ('copy-start', 'slice-start'):
            # The result tuple echoes the source; count the source once and the
            # destination (copy: first element; slice: second).
            elements = _split_top_level(type_text)
            result = _arrays(elements[0] if op == 'copy-start' else elements[1])
        kernels += 1
        naive += everything
        total += sum(size for size, in_memory in operands + result if in_memory)
    return Traffic(total, naive, kernels)
