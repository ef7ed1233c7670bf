"""Optimizer-state bytes per device for a 1B-parameter GPT, FSDP over 8 and 256 devices.

Nothing of that size is allocated: the optimizer state's shapes come from
``jax.eval_shape(tx.init, params)`` on abstract parameters, each state array is
given the sharding its parameter has (``optax.tree.map_params``: the momentum,
and for int8 its codes and per-block scales, take the parameter's spec; step
counts are replicated), and the bytes a device holds are summed from
``NamedSharding(AbstractMesh, spec).shard_shape``. FSDP shards each parameter
along its first axis that the device count divides (the second if the first
does not, replicated if none does).

``tests/test_sharding.py`` checks these numbers against the bytes the devices
really hold on an 8-device CPU mesh.

Usage::

    python -m benchmarks.memory_at_scale [--out DIR]

Writes ``memory_at_scale.json`` and ``memory_at_scale.md``.
"""

import math
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import AbstractMesh, AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import lion_optax

from . import _output
from ._model_trees import abstract_gpt

# GPT-shaped, about 1.11e9 parameters: width 2048, 20 blocks, the GPT-2 vocabulary
# padded to a multiple of 256 (50432; unpadded, 256 devices would shard the
# embedding along its width, 8 columns a device, fewer than an int8 block).
GPT_1B = dict(blocks=20, width=2048, vocab=50432, context=2048)
DEVICE_COUNTS = (8, 256)


def optimizers() -> dict[str, optax.GradientTransformation]:
    return {
        'optax.adamw': optax.adamw(1e-4, weight_decay=0.1),
        'lion, float32 momentum': lion_optax.lion(1e-4, weight_decay=0.1),
        'lion, bfloat16 momentum': lion_optax.lion(1e-4, weight_decay=0.1, mu_dtype=jnp.bfloat16),
        'lion, int8 momentum': lion_optax.lion(1e-4, weight_decay=0.1, mu_dtype='int8'),
    }


def fsdp_spec(shape: tuple[int, ...], devices: int, axis: str = 'data') -> P:
    """``axis`` on the first dimension ``devices`` divides, else replicated."""
    for dim, size in enumerate(shape):
        if size >= devices and size % devices == 0:
            return P(*([None] * dim), axis)
    return P()


def state_specs(tx: optax.GradientTransformation, params: Any, devices: int) -> tuple[Any, Any]:
    """``(abstract state, PartitionSpec tree)``: every state array sharded like its parameter."""
    state = jax.eval_shape(tx.init, params)
    param_specs = jax.tree.map(lambda p: fsdp_spec(p.shape, devices), params)

    def like_parameter(leaf, spec):
        # A state array with the parameter's rank takes its spec (int8 scales
        # too, if the device count divides their sharded axis).
        if len(leaf.shape) == 0 or any(
            name is not None and leaf.shape[i] % devices for i, name in enumerate(spec)
        ):
            return P()
        return spec

    specs = optax.tree.map_params(
        tx, like_parameter, state, param_specs, transform_non_params=lambda _: P()
    )
    return state, specs


def bytes_per_device(state: Any, specs: Any, devices: int) -> int:
    """Bytes of ``state`` one device holds with these specs on a 1-D mesh of ``devices``."""
    mesh = AbstractMesh((devices,), ('data',), axis_types=(AxisType.Explicit,))
    total = 0
    for leaf, spec in zip(jax.tree.leaves(state), jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P))):
        shard = NamedSharding(mesh, spec).shard_shape(leaf.shape)
        total += math.prod(shard) * jnp.dtype(leaf.dtype).itemsize
    return total


def table(sizes: dict[str, int], device_counts=DEVICE_COUNTS) -> dict[str, Any]:
    params = abstract_gpt(**sizes)
    num_params = sum(math.prod(p.shape) for p in jax.tree.leaves(params))
    rows = {}
    for name, tx in optimizers().items():
        row = {}
        for devices in device_counts:
            state, specs = state_specs(tx, params, devices)
            row[str(devices)] = bytes_per_device(state, specs, devices)
        state, _ = state_specs(tx, params, device_counts[0])
        row['total'] = sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize
                           for x in jax.tree.leaves(state))
        rows[name] = row
    return {'model': sizes, 'num_params': num_params, 'leaves': len(jax.tree.leaves(params)),
            'bytes_per_device': rows}


def markdown(result: dict[str, Any]) -> str:
    counts = [c for c in result['bytes_per_device']['optax.adamw'] if c != 'total']
    header = ['optimizer', 'state, total', *(f'per device, {c} devices' for c in counts), 'B/param']
    rows = [
        [
            name,
            f'{row["total"] / 2**30:.2f} GiB',
            *(f'{row[c] / 2**20:,.0f} MiB' for c in counts),
            f'{row["total"] / result["num_params"]:.3f}',
        ]
        for name, row in result['bytes_per_device'].items()
    ]
    return _output.document(
        f'Optimizer state of a GPT-shaped model, {result["num_params"] / 1e9:.2f}B parameters '
        f'({result["leaves"]} leaves), FSDP (each array sharded along its first divisible axis):',
        _output.markdown_table(header, rows),
    )


def main(argv: list[str] | None = None) -> Path:
    parser = _output.parser('memory_at_scale', __doc__, out='results/memory_at_scale/')
    args = parser.parse_args(argv)
    _output.write_report(args.out, 'memory_at_scale', table(GPT_1B), markdown)
    return args.out


if __name__ == '__main__':
    main()
