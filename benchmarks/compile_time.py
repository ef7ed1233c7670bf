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

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lion_optax

from ._machine import machine, machine_line
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
        ratio = cpu / reference
        results[name] = {
            'cpu_s_median': float(np.median(cpu)),
            'cpu_s_p25': float(np.percentile(cpu, 25)),
            'cpu_s_p75': float(np.percentile(cpu, 75)),
            'wall_s_median': float(np.median([v[1] for v in values])),
            'vs_optax_lion_median': float(np.median(ratio)),
            'vs_optax_lion_p25': float(np.percentile(ratio, 25)),
            'vs_optax_lion_p75': float(np.percentile(ratio, 75)),
            'hlo_lines': int(values[0][2]),
        }
    return {'leaves': len(jax.tree.leaves(params)), 'rounds': rounds, 'configurations': results}


def markdown(report: dict[str, Any]) -> str:
    m = report['machine']
    lines = [
        '# Compile time of the jitted Lion step',
        '',
        machine_line(m),
        '',
        'CPU seconds to compile update + apply_updates (median over interleaved rounds '
        '[25-75 %]); ratio to optax.lion per round, then the median; optimised HLO lines.',
        '',
    ]
    for tree_name, tree in report['trees'].items():
        lines += [
            f'## {tree_name} ({tree["leaves"]} leaves, {tree["rounds"]} rounds)',
            '',
            '| configuration | CPU s [25-75 %] | vs optax.lion | HLO lines |',
            '|---|---|---|---|',
        ]
        for name, c in tree['configurations'].items():
            lines.append(
                f'| {name} | {c["cpu_s_median"]:.2f} [{c["cpu_s_p25"]:.2f}-{c["cpu_s_p75"]:.2f}] '
                f'| {c["vs_optax_lion_median"]:.2f} [{c["vs_optax_lion_p25"]:.2f}-'
                f'{c["vs_optax_lion_p75"]:.2f}] | {c["hlo_lines"]} |'
            )
        lines.append('')
    return '\n'.join(lines)


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib  # pylint: disable=import-outside-toplevel

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
    from matplotlib.ticker import ScalarFormatter  # pylint: disable=import-outside-toplevel

    gpt = sorted(
        (t for name, t in report['trees'].items() if name.startswith('GPT')),
        key=lambda t: t['leaves'],
    )
    x = [t['leaves'] for t in gpt]
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
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
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(
        prog='python -m benchmarks.compile_time', description=__doc__.split('\n\n')[0]
    )
    parser.add_argument('--quick', action='store_true', help='12 and 24 blocks, 1 round')
    parser.add_argument('--out', default='results/compile_time/', help='output folder')
    parser.add_argument('--rounds', type=int, default=None, help='interleaved rounds')
    args = parser.parse_args(argv)
    rounds = args.rounds or (1 if args.quick else 3)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {'machine': machine(), 'quick': args.quick, 'trees': {}}
    table = configurations(args.quick)
    start = time.perf_counter()
    for name, params in trees(args.quick).items():
        report['trees'][name] = bench_tree(params, table, rounds)
        print(f'{name}: done after {time.perf_counter() - start:.0f} s', flush=True)
    report['wall_seconds'] = time.perf_counter() - start
    (out / 'compile_time.json').write_text(json.dumps(report, indent=2))
    text = markdown(report)
    (out / 'compile_time.md').write_text(text)
    plot(report, out / 'compile_time.png')
    print(text)
    print(f'Wrote {out.resolve()} (compile_time.json, .md, .png) in {report["wall_seconds"]:.0f} s')
    return out


if __name__ == '__main__':
    main()
