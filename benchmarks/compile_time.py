"""Compile time of the jitted Lion step on real models' trees, against optax.

Real models have 150-600 parameter leaves. XLA compiles a step per leaf, so a
step that is a few instructions heavier per leaf, or whose size grows faster
than its leaves, compiles for minutes where optax.lion takes a second. This
benchmark compiles ``update`` + ``optax.apply_updates`` (jitted, not donated)
for GPT-shaped trees of 12, 24 and 48 blocks (148, 292, 580 leaves) and a
ViT-shaped tree of 12 blocks (154 leaves), width 64 so that compiling
dominates, for ``optax.lion``, ``optax.adamw`` and lion_optax's configurations.

Times are the compiling process's CPU seconds (``time.process_time``, which a
busy machine inflates less than wall time), medians over interleaved rounds
(every configuration once per round), with the 25-75 % spread; ratios to
optax.lion are taken round by round, then the median.

Usage::

    python -m benchmarks.compile_time            # full (about 10 min on 2 cores)
    python -m benchmarks.compile_time --quick    # 12 and 24 blocks, 1 round (< 2 min)

Writes ``compile_time.json``, ``compile_time.md`` and ``compile_time.png`` to ``--out``.
"""

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lion_optax

from . import _output
from ._model_trees import gpt_tree, vit_tree

LR, WD = 1e-4, 0.1


def configurations(quick: bool) -> dict[str, Callable[[], optax.GradientTransformation]]:
    """The optimizers compiled, by name."""
    table = {
        'optax.lion': lambda: optax.lion(LR, weight_decay=WD),
        'optax.adamw': lambda: optax.adamw(LR, weight_decay=WD),
        'lion (default)': lambda: lion_optax.lion(LR, weight_decay=WD),
        'lion bf16 momentum': lambda: lion_optax.lion(LR, weight_decay=WD, mu_dtype=jnp.bfloat16),
        'lion int8 momentum': lambda: lion_optax.lion(LR, weight_decay=WD, mu_dtype='int8'),
        'lion cautious': lambda: lion_optax.lion(LR, weight_decay=WD, cautious=True),
        "lion nonfinite='skip_step'": lambda: lion_optax.lion(
            LR, weight_decay=WD, nonfinite='skip_step'
        ),
    }
    if not quick:
        table.update({
            "lion kappa='clip'": lambda: lion_optax.lion(LR, weight_decay=WD, kappa='clip'),
            "lion kappa='tanh'": lambda: lion_optax.lion(LR, weight_decay=WD, kappa='tanh'),
            "lion kappa='l2'": lambda: lion_optax.lion(LR, weight_decay=WD, kappa='l2'),
            "lion kappa='l2_global'": lambda: lion_optax.lion(
                LR, weight_decay=WD, kappa='l2_global'
            ),
            'lion lp_kappa(1.5)': lambda: lion_optax.lion(
                LR, weight_decay=WD, kappa=lion_optax.lp_kappa(1.5)
            ),
        })
    return table


def trees(quick: bool) -> dict[str, Any]:
    blocks = (12, 24) if quick else (12, 24, 48)
    out = {f'GPT, {b} blocks': gpt_tree(b) for b in blocks}
    out['ViT, 12 blocks'] = vit_tree(12)
    return out


def compile_seconds(tx: optax.GradientTransformation, params: Any) -> tuple[float, float, int]:
    """(CPU seconds, wall seconds, optimised HLO lines) to compile one step."""

    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    lowered = jax.jit(step).lower(params, tx.init(params), params)
    cpu, wall = time.process_time(), time.perf_counter()
    compiled = lowered.compile()
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    return cpu, wall, compiled.as_text().count('\n')


def bench_tree(params: Any, table: dict, rounds: int) -> dict[str, Any]:
    samples: dict[str, list] = {name: [] for name in table}
    for _ in range(rounds):
        for name, make in table.items():
            samples[name].append(compile_seconds(make(), params))
    reference = np.asarray([s[0] for s in samples['optax.lion']])
    results = {}
    for name, values in samples.items():
        cpu = np.asarray([v[0] for v in values])
        results[name] = {
            **_output.spread(cpu, 'cpu_s_{}'),
            'wall_s_median': float(np.median([v[1] for v in values])),
            **_output.spread(cpu / reference, 'vs_optax_lion_{}'),
            'hlo_lines': int(values[0][2]),
        }
    return {'leaves': len(jax.tree.leaves(params)), 'rounds': rounds, 'configurations': results}


def markdown(report: dict[str, Any]) -> str:
    blocks = [
        '# Compile time of the jitted Lion step',
        _output.machine_line(report['machine']),
        'CPU seconds to compile update + apply_updates (median over interleaved rounds '
        '[25-75 %]); ratio to optax.lion per round, then the median; optimised HLO lines.',
    ]
    header = ['configuration', 'CPU s [25-75 %]', 'vs optax.lion', 'HLO lines']
    for tree_name, tree in report['trees'].items():
        rows = [
            [
                name,
                f'{c["cpu_s_median"]:.2f} [{c["cpu_s_p25"]:.2f}-{c["cpu_s_p75"]:.2f}]',
                f'{c["vs_optax_lion_median"]:.2f} [{c["vs_optax_lion_p25"]:.2f}-'
                f'{c["vs_optax_lion_p75"]:.2f}]',
                c['hlo_lines'],
            ]
            for name, c in tree['configurations'].items()
        ]
        blocks += [
            f'## {tree_name} ({tree["leaves"]} leaves, {tree["rounds"]} rounds)',
            _output.markdown_table(header, rows),
        ]
    return _output.document(*blocks)


def plot(report: dict[str, Any]) -> Any:
    from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel
    from matplotlib.ticker import ScalarFormatter  # pylint: disable=import-outside-toplevel

    gpt = sorted(
        (t for name, t in report['trees'].items() if name.startswith('GPT')),
        key=lambda t: t['leaves'],
    )
    x = [t['leaves'] for t in gpt]
    fig = Figure(figsize=(7.5, 4.8), dpi=120, layout='tight')
    ax = fig.subplots()
    markers = 'osD^v<>phX*P'
    for i, name in enumerate(gpt[0]['configurations']):
        med = [t['configurations'][name]['cpu_s_median'] for t in gpt]
        lo = [t['configurations'][name]['cpu_s_p25'] for t in gpt]
        hi = [t['configurations'][name]['cpu_s_p75'] for t in gpt]
        style = '-' if name.startswith('optax') else '--'
        ax.errorbar(x, med, yerr=[np.subtract(med, lo), np.subtract(hi, med)],
                    fmt=markers[i % len(markers)] + style, capsize=3, label=name,
                    linewidth=2.5 if name.startswith('optax') else 1.2)
    ax.set_xscale('log')
    ax.set_yscale('log')
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_formatter(ScalarFormatter())
    ax.set_xticks(x)
    ax.set_xlabel('parameter leaves (GPT-shaped tree, 12 / 24 / 48 blocks)')
    ax.set_ylabel('compile CPU seconds (median, 25-75 %)')
    ax.set_title(f'Compiling one Lion step, {report["machine"]["cpu_model"]}', fontsize=9)
    ax.grid(True, which='both', alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    return fig


def main(argv: list[str] | None = None) -> Path:
    parser = _output.parser('compile_time', __doc__, out='results/compile_time/')
    parser.add_argument('--quick', action='store_true', help='12 and 24 blocks, 1 round')
    parser.add_argument('--rounds', type=int, default=None, help='interleaved rounds')
    args = parser.parse_args(argv)
    rounds = args.rounds or (1 if args.quick else 3)
    table = configurations(args.quick)
    report = _output.measure_trees(
        trees(args.quick), lambda params: bench_tree(params, table, rounds), args.quick
    )
    _output.write_report(args.out, 'compile_time', report, markdown, plot)
    return args.out


if __name__ == '__main__':
    main()
