"""What a Lion step costs on TPU and GPU, compiled ahead of time on this machine.

XLA's TPU compiler (libtpu) and GPU compiler (the CUDA plugin, for an H100)
compile the donated, jitted ``update`` + ``optax.apply_updates`` with abstract
arrays; nothing runs on an accelerator (``lion_optax.hlo.compile_step``). For
each configuration, beside ``optax.lion`` and ``optax.adamw``:

- on one large float32 leaf (16M parameters per device; 64M on one H100 too):
  main-memory (HBM) bytes per parameter against the configuration's ideal
  (``lion_optax.hlo.memory_traffic``: each kernel reads its operands and writes
  its results once; arrays TPU keeps on chip cost no HBM traffic; the naive
  count of everything is reported beside it), kernels and temporaries;
- on a GPT-2 small tree (124M parameters, 148 leaves; and a 48-block one, 580
  leaves): kernels per step and compile seconds (after a warm-up compile,
  interleaved rounds, each a ratio to ``optax.lion`` compiled in the same round;
  medians and the 25-75 % spread).

These are compiler figures, not timings.

Usage::

    python -m benchmarks.accelerator_step            # full (about 10-15 min on 2 cores)
    python -m benchmarks.accelerator_step --quick    # the large leaf, GPT-2 on H100 (< 3 min)

Needs the compilers: ``pip install -e ".[accelerators,bench]"``. Writes
``accelerator_step.json``, ``accelerator_step.md`` and ``accelerator_step.png``
to ``--out``.
"""

import os

os.environ.setdefault('JAX_PLATFORMS', 'cpu')  # this machine runs nothing on an accelerator

import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import lion_optax  # noqa: E402
from lion_optax import hlo  # noqa: E402

from . import _output  # noqa: E402
from ._model_trees import abstract_gpt  # noqa: E402

LR, WD = 1e-4, 0.1
PER_DEVICE = (4096, 4096)


def _lion(**options: Any) -> Callable[[], optax.GradientTransformation]:
    return lambda: lion_optax.lion(LR, weight_decay=WD, **options)


# name: (optimizer, parameter dtype, ideal bytes per parameter, needs a reduction)
CONFIGURATIONS: dict[str, tuple[Callable[[], Any], Any, float, bool]] = {
    'optax.lion': (lambda: optax.lion(LR, weight_decay=WD), jnp.float32, 20, False),
    'optax.lion, bf16 momentum': (
        lambda: optax.lion(LR, weight_decay=WD, mu_dtype=jnp.bfloat16), jnp.float32, 16, False),
    'optax.adamw': (lambda: optax.adamw(LR, weight_decay=WD), jnp.float32, 28, False),
    'lion (default)': (_lion(), jnp.float32, 20, False),
    "nonfinite='propagate'": (_lion(nonfinite='propagate'), jnp.float32, 20, False),
    "nonfinite='skip_step'": (_lion(nonfinite='skip_step'), jnp.float32, 20, True),
    "kappa='clip'": (_lion(kappa='clip'), jnp.float32, 20, False),
    "kappa='tanh'": (_lion(kappa='tanh'), jnp.float32, 20, False),
    "kappa='l2'": (_lion(kappa='l2'), jnp.float32, 20, True),
    'lp_kappa(1.5)': (_lion(kappa=lion_optax.lp_kappa(1.5)), jnp.float32, 20, True),
    "kappa='l2_global'": (_lion(kappa='l2_global'), jnp.float32, 20, True),
    'cautious': (_lion(cautious=True), jnp.float32, 20, True),
    'bf16 momentum': (_lion(mu_dtype=jnp.bfloat16), jnp.float32, 16, False),
    'bf16 momentum, nearest': (
        _lion(mu_dtype=jnp.bfloat16, rounding=lion_optax.Rounding(momentum='nearest')),
        jnp.float32, 16, False),
    'fp16 momentum': (_lion(mu_dtype=jnp.float16), jnp.float32, 16, False),
    'int8 momentum': (_lion(mu_dtype='int8'), jnp.float32, 14.25, True),
    'int8 momentum, nearest': (
        _lion(mu_dtype='int8', rounding=lion_optax.Rounding(momentum='nearest')),
        jnp.float32, 14.25, True),
    'optax.lion, bf16 params': (lambda: optax.lion(LR, weight_decay=WD), jnp.bfloat16, 10, False),
    'bf16 params': (_lion(), jnp.bfloat16, 10, False),
    'fp16 params': (_lion(), jnp.float16, 10, False),
}
COMPILE_CONFIGURATIONS = [
    'optax.lion', 'optax.adamw', 'lion (default)', "nonfinite='skip_step'", "kappa='clip'",
    'cautious', 'bf16 momentum', 'bf16 momentum, nearest', 'int8 momentum', 'bf16 params',
]


def gpt_tree(layers: int = 12, width: int = 768, vocab: int = 50304) -> Any:
    """GPT-2's parameter shapes (12 layers: 124M parameters, 148 leaves), abstract."""
    return abstract_gpt(blocks=layers, width=width, vocab=vocab, context=1024)


def large_leaf(target: str, dtype: Any, per_device: bool = True) -> tuple[Any, int]:
    """``({'w': leaf}, parameters per device)``: 16M per device, or 64M in all."""
    devices = len(hlo.target_devices(target)) if per_device else 4
    rows = PER_DEVICE[0] * devices
    shape = (rows, PER_DEVICE[1])
    n_devices = len(hlo.target_devices(target))
    return {'w': jax.ShapeDtypeStruct(shape, dtype)}, rows * PER_DEVICE[1] // n_devices


def measure_leaf(target: str, name: str, axis_types: str = 'explicit',
                 per_device: bool = True) -> dict[str, Any]:
    make, dtype, ideal, reduction = CONFIGURATIONS[name]
    tree, local = large_leaf(target, dtype, per_device)
    start = time.perf_counter()
    compiled = hlo.compile_step(make(), tree, target, axis_types=axis_types)
    seconds = time.perf_counter() - start
    traffic = hlo.memory_traffic(compiled)
    memory = compiled.memory_analysis()
    per_parameter = traffic.bytes / local
    return {
        'bytes_per_parameter': per_parameter,
        'naive_bytes_per_parameter': traffic.naive_bytes / local,
        'ideal': ideal,
        'vs_ideal': per_parameter / ideal,
        'kernels': traffic.kernels,
        'temporaries_mib': memory.temp_size_in_bytes / 2**20,
        'temporaries_vs_parameters': memory.temp_size_in_bytes
        / (local * jnp.dtype(dtype).itemsize),
        'needs_a_reduction': reduction,
        'pallas_kernel': 'tpu_custom_call' in compiled.as_text(),
        'compile_s': seconds,
        'parameters_per_device': local,
    }


def measure_tree(target: str, tree: Any, names: list[str], rounds: int) -> dict[str, Any]:
    """Kernels and compile seconds per configuration, interleaved rounds after a warm-up."""
    hlo.compile_step(optax.lion(LR, weight_decay=WD), tree, target)  # the compiler's start-up
    samples: dict[str, list[float]] = {name: [] for name in names}
    kernels: dict[str, int] = {}
    for _ in range(rounds):
        for name in names:
            make = CONFIGURATIONS[name][0]
            start = time.perf_counter()
            compiled = hlo.compile_step(make(), tree, target)
            samples[name].append(time.perf_counter() - start)
            kernels[name] = hlo.memory_traffic(compiled).kernels
    reference = np.asarray(samples['optax.lion'])
    out = {}
    for name in names:
        seconds = np.asarray(samples[name])
        out[name] = {
            'kernels': kernels[name],
            'compile_s_median': float(np.median(seconds)),
            **_output.spread(seconds / reference, 'vs_optax_lion_{}'),
        }
    return {'leaves': len(jax.tree.leaves(tree)), 'rounds': rounds, 'configurations': out}


def markdown(report: dict[str, Any]) -> str:
    blocks = [
        '# The Lion step on the accelerators\' compilers (ahead of time)',
        _output.machine_line(report['machine']) + f' Compilers: {report["compilers"]}.',
        'Compiler figures, not timings: HBM bytes per parameter of the compiled update + '
        'apply_updates (donated), x its ideal; the naive count (every operand and result, '
        'on-chip too) in brackets; kernels; temporaries.',
    ]
    for size, leaf in report['large_leaf'].items():
        targets = list(leaf)
        rows = []
        for name in CONFIGURATIONS:
            cells = []
            for target in targets:
                r = leaf[target].get(name)
                if r is None:
                    cells.append('')
                    continue
                cell = (f'{r["bytes_per_parameter"]:.2f} = {r["vs_ideal"]:.2f}x '
                        f'({r["kernels"]} k')
                if abs(r['naive_bytes_per_parameter'] - r['bytes_per_parameter']) > 0.01:
                    cell += f', naive {r["naive_bytes_per_parameter"]:.2f}'
                if r['temporaries_mib'] >= 0.5:
                    cell += f', temp {r["temporaries_mib"]:.0f} MiB'
                cells.append(cell + ')')
            rows.append([name, f'{CONFIGURATIONS[name][2]:g}', *cells])
        blocks += [f'## One float32 leaf, {size}',
                   _output.markdown_table(['configuration', 'ideal B', *targets], rows)]
    if report.get('auto_mesh'):
        rows = [[target, f'{r["bytes_per_parameter"]:.2f} = {r["vs_ideal"]:.2f}x '
                 f'({r["kernels"]} kernels, {r["temporaries_mib"]:.0f} MiB)']
                for target, r in report['auto_mesh'].items()]
        header = ['target', 'B/param = x ideal (kernels, temporaries)']
        blocks += ['## int8 momentum with an Auto mesh (TPU: the XLA formulation)',
                   _output.markdown_table(header, rows)]
    header = ['configuration', 'kernels', 'compile s', 'vs optax.lion [25-75 %]']
    for tree_name, per_target in report['trees'].items():
        for target, tree in per_target.items():
            rows = [[name, c['kernels'], f'{c["compile_s_median"]:.2f}',
                     f'{c["vs_optax_lion_median"]:.2f} [{c["vs_optax_lion_p25"]:.2f}-'
                     f'{c["vs_optax_lion_p75"]:.2f}]']
                    for name, c in tree['configurations'].items()]
            blocks += [f'## {tree_name} ({tree["leaves"]} leaves), {target}, '
                       f'{tree["rounds"]} rounds', _output.markdown_table(header, rows)]
    return _output.document(*blocks)


def plot(report: dict[str, Any]) -> Any:
    from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel

    leaf = next(iter(report['large_leaf'].values()))
    targets = list(leaf)
    names = [n for n in CONFIGURATIONS if all(n in leaf[t] for t in targets)]
    fig = Figure(figsize=(11, 8.5), dpi=110, layout='tight')
    top, bottom = fig.subplots(2, 1)
    width = 0.8 / max(1, len(targets))
    x = np.arange(len(names))
    for i, target in enumerate(targets):
        ratios = [leaf[target][n]['vs_ideal'] for n in names]
        top.bar(x + i * width, ratios, width, label=target)
    top.axhline(1.0, color='k', linewidth=0.8)
    top.axhline(1.4, color='k', linewidth=0.6, linestyle=':')
    top.set_xticks(x + width * (len(targets) - 1) / 2, names, rotation=40, ha='right', fontsize=7)
    top.set_ylabel('HBM bytes / ideal')
    top.set_title('One large float32 leaf (16M parameters per device): bytes per parameter '
                  'against the ideal (1.4: the bound for steps that need a reduction)', fontsize=9)
    top.legend(fontsize=7)
    tree_name = next(iter(report['trees']), None)
    if tree_name:
        per_target = report['trees'][tree_name]
        compiled_names = list(next(iter(per_target.values()))['configurations'])
        x2 = np.arange(len(compiled_names))
        w2 = 0.8 / max(1, len(per_target))
        for i, (target, tree) in enumerate(per_target.items()):
            c = tree['configurations']
            med = [c[n]['vs_optax_lion_median'] for n in compiled_names]
            err = [[m - c[n]['vs_optax_lion_p25'] for m, n in zip(med, compiled_names)],
                   [c[n]['vs_optax_lion_p75'] - m for m, n in zip(med, compiled_names)]]
            bottom.bar(x2 + i * w2, med, w2, yerr=err, capsize=2, label=target)
        bottom.axhline(1.0, color='k', linewidth=0.8)
        bottom.set_xticks(x2 + w2 * (len(per_target) - 1) / 2, compiled_names, rotation=40,
                          ha='right', fontsize=7)
        bottom.set_ylabel('compile seconds / optax.lion')
        bottom.set_title(f'{tree_name}: compile time against optax.lion (median, 25-75 %)',
                         fontsize=9)
        bottom.legend(fontsize=7)
    return fig


def main(argv: list[str] | None = None) -> Path:
    parser = _output.parser('accelerator_step', __doc__, out='results/accelerator_step/')
    parser.add_argument('--quick', action='store_true',
                        help='the large leaf on every target; GPT-2 on H100 only, 1 round')
    parser.add_argument('--rounds', type=int, default=None, help='interleaved compile rounds')
    parser.add_argument('--targets', nargs='*', default=list(hlo.TARGETS))
    args = parser.parse_args(argv)
    targets = [t for t in args.targets if hlo.unavailable(t) is None]
    for t in set(args.targets) - set(targets):
        print(f'skipping {t}: {hlo.unavailable(t)}')
    if not targets:
        raise SystemExit('no accelerator compiler here: pip install -e ".[accelerators]"')
    rounds = args.rounds or (1 if args.quick else 3)
    import libtpu  # noqa: PLC0415  (versions for the report)

    report: dict[str, Any] = {
        'machine': _output.machine(), 'quick': args.quick,
        'compilers': f'jax {jax.__version__}, libtpu {getattr(libtpu, "__version__", "?")}',
        'large_leaf': {}, 'auto_mesh': {}, 'trees': {},
    }
    clock = _output.Clock()
    sizes = {'16M parameters per device': True}
    if 'gpu h100' in targets and not args.quick:
        sizes['64M parameters in all (4 devices\' worth)'] = False
    for size, per_device in sizes.items():
        report['large_leaf'][size] = {}
        for target in targets if per_device else ['gpu h100']:
            report['large_leaf'][size][target] = {
                name: measure_leaf(target, name, per_device=per_device) for name in CONFIGURATIONS
            }
            clock.done(f'{size}, {target}')
    for target in targets:
        if target.startswith('tpu'):
            report['auto_mesh'][target] = measure_leaf(target, 'int8 momentum', axis_types='auto')
    trees = {'GPT-2 small': gpt_tree()}
    if not args.quick:
        trees['GPT, 48 blocks of GPT-2 small'] = gpt_tree(layers=48)
    for tree_name, tree in trees.items():
        report['trees'][tree_name] = {}
        tree_targets = ['gpu h100'] if args.quick else [t for t in targets
                                                         if t in ('gpu h100', 'tpu v5e')]
        for target in [t for t in tree_targets if t in targets]:
            report['trees'][tree_name][target] = measure_tree(
                target, tree, COMPILE_CONFIGURATIONS, rounds)
            clock.done(f'{tree_name}, {target}')
    report['wall_seconds'] = clock.seconds
    _output.write_report(args.out, 'accelerator_step', report, markdown, plot)
    return args.out


if __name__ == '__main__':
    main()
