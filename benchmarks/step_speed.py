"""Step speed and memory of Lion: ours, ``optax.lion``, ``optax.adamw`` and the roofline.

One jitted optimizer step plus ``optax.apply_updates`` with the parameters and the
optimizer state donated, on parameter trees of several sizes. Lion is memory
bound: per float32 parameter a step must read the parameter, the gradient and the
momentum and write the parameter and the momentum, 20 bytes (16 with a bf16
momentum, 14.25 with int8 codes and their scales), its roofline. The roofline is
measured in the same run, on the same buffers, by a bandwidth probe
``p <- p - lr * g`` (12 bytes per parameter): ``roofline = probe * bytes / 12``.
Trees: 16 equal leaves of 1M, 8M (and 64M) parameters, and a GPT-shaped tree
(12 blocks, width 256: 148 leaves of very different sizes).

Timing is interleaved (every method once per round, rounds repeated), so a load
change on the machine hits all methods alike; we report medians with the 25-75 %
spread, and ratios (ours / the peer's time in the same round, time / roofline)
computed round by round and then summarised, all from this one run.

Memory: the optimizer state's bytes per parameter, and the compiled step's
footprint from ``memory_analysis()`` (arguments, outputs, aliased and temporary
bytes). The compiled HLO is inspected too: loop fusions and copies per step.

Usage::

    python -m benchmarks.step_speed            # full: 1M, 8M, 64M params, GPT-shaped tree
    python -m benchmarks.step_speed --quick    # < 3 minutes on 2 CPU cores
    python -m benchmarks.step_speed --out results/step_speed/ --rounds 30

Writes ``step_speed.json``, ``step_speed.md`` and ``step_speed.png`` to ``--out``.
"""

import re
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
from ._model_trees import gpt_tree

LEARNING_RATE = 1e-4
WEIGHT_DECAY = 1e-3


def _probe() -> optax.GradientTransformation:
    """``u = -lr * g``: with apply_updates, the 12 B/param bandwidth probe."""
    return optax.scale(-LEARNING_RATE)


# name: (factory, bytes per parameter of the ideal step, peer for the speed ratio)
METHODS: dict[str, tuple[Callable[[], optax.GradientTransformation], float, str | None]] = {
    'probe (p -= lr*g)': (_probe, 12.0, None),
    'optax.lion': (lambda: optax.lion(LEARNING_RATE, weight_decay=WEIGHT_DECAY), 20.0, None),
    'optax.lion bf16 mu': (
        lambda: optax.lion(LEARNING_RATE, weight_decay=WEIGHT_DECAY, mu_dtype=jnp.bfloat16),
        16.0,
        None,
    ),
    'lion_optax.lion': (
        lambda: lion_optax.lion(LEARNING_RATE, weight_decay=WEIGHT_DECAY),
        20.0,
        'optax.lion',
    ),
    "lion_optax.lion nonfinite='skip_step'": (
        lambda: lion_optax.lion(LEARNING_RATE, weight_decay=WEIGHT_DECAY, nonfinite='skip_step'),
        20.0,
        'optax.lion',
    ),
    'lion_optax.lion bf16 mu': (
        lambda: lion_optax.lion(LEARNING_RATE, weight_decay=WEIGHT_DECAY, mu_dtype=jnp.bfloat16),
        16.0,
        'optax.lion bf16 mu',
    ),
    # p, g read, p written (12 B) + int8 codes read and written (2 B) + one f32
    # scale per 32 values read and written (0.25 B).
    'lion_optax.lion int8 mu': (
        lambda: lion_optax.lion(LEARNING_RATE, weight_decay=WEIGHT_DECAY, mu_dtype='int8'),
        14.25,
        'optax.lion',
    ),
    'optax.adamw': (lambda: optax.adamw(1e-3, weight_decay=1e-4), 28.0, None),
}


def trees(quick: bool) -> dict[str, list[tuple[int, ...]]]:
    """Parameter trees by name: lists of leaf shapes."""
    gpt = [tuple(x.shape) for x in jax.tree.leaves(gpt_tree(12, width=256, vocab=8192))]
    out = {
        '1M in 16 leaves': [(2**16,)] * 16,
        '8M in 16 leaves': [(2**19,)] * 16,
        f'GPT-shaped, 12 blocks, width 256 ({len(gpt)} leaves)': gpt,
    }
    if not quick:
        out['64M in 16 leaves'] = [(2**22,)] * 16
    return out


def _hlo_stats(compiled: Any) -> dict[str, int]:
    entry = compiled.as_text().split('ENTRY', 1)[1]
    return {
        'fusions': len(re.findall(r'\bfusion\(', entry)),
        'copies': len(re.findall(r'\bcopy\(', entry)),
    }


def _memory(compiled: Any) -> dict[str, int]:
    analysis = compiled.memory_analysis()
    if analysis is None:
        return {}
    keys = (
        'argument_size_in_bytes',
        'output_size_in_bytes',
        'alias_size_in_bytes',
        'temp_size_in_bytes',
        'generated_code_size_in_bytes',
    )
    return {k: int(getattr(analysis, k)) for k in keys if hasattr(analysis, k)}


class Runner:
    """One method on one tree: its buffers, its compiled step and its timings."""

    def __init__(self, name: str, tx: optax.GradientTransformation, shapes, grads):
        keys = jax.random.split(jax.random.key(1), len(shapes))
        self.params = [jax.random.normal(k, s, jnp.float32) for k, s in zip(keys, shapes)]
        self.grads = grads
        self.state = tx.init(self.params)
        self.state_bytes = sum(x.nbytes for x in jax.tree.leaves(self.state))
        self.num_params = sum(int(np.prod(s)) for s in shapes)

        def step(params, grads, state):
            updates, state = tx.update(grads, state, params)
            return optax.apply_updates(params, updates), state

        jitted = jax.jit(step, donate_argnums=(0, 2))
        start = time.perf_counter()
        compiled = jitted.lower(self.params, grads, self.state).compile()
        self.compile_s = time.perf_counter() - start
        self.hlo = _hlo_stats(compiled)
        self.memory = _memory(compiled)
        self.step = compiled
        self.name = name
        self.times: list[float] = []
        self.run(2)  # warm up (page in the buffers)

    def run(self, calls: int) -> float:
        start = time.perf_counter()
        for _ in range(calls):
            self.params, self.state = self.step(self.params, self.grads, self.state)
        jax.block_until_ready((self.params, self.state))
        return (time.perf_counter() - start) / calls


def bench_tree(shapes, table, rounds: int, target_s: float) -> dict[str, Any]:
    keys = jax.random.split(jax.random.key(2), len(shapes))
    grads = [jax.random.normal(k, s, jnp.float32) for k, s in zip(keys, shapes)]
    runners = {name: Runner(name, make(), shapes, grads) for name, (make, _, _) in table.items()}
    probe = runners['probe (p -= lr*g)']
    calls = max(1, int(target_s / max(probe.run(3) * 20 / 12, 1e-6)))
    for _ in range(rounds):
        for runner in runners.values():
            runner.times.append(runner.run(calls))
    n = probe.num_params
    probe_times = np.asarray(probe.times)
    roofline = probe_times * 20 / 12  # per round: Lion's 20 B/param at the probe's bandwidth
    results = {}
    for name, runner in runners.items():
        times = np.asarray(runner.times)
        ideal_bytes = table[name][1]
        per_round = times / (probe_times * ideal_bytes / 12)
        entry = {
            'ideal_bytes_per_param': ideal_bytes,
            **_output.spread(times, '{}_ms', scale=1e3),
            **_output.spread(per_round, 'x_roofline_{}'),
            'bytes_per_param_moved_equiv': float(np.median(per_round) * ideal_bytes),
            'state_bytes_per_param': runner.state_bytes / n,
            'hlo': runner.hlo,
            'memory_analysis': runner.memory,
            'calls_per_sample': calls,
            'compile_s': runner.compile_s,
        }
        results[name] = entry
    for name in results:
        peer = table[name][2]
        if peer is not None:
            paired = np.asarray(runners[name].times) / np.asarray(runners[peer].times)
            results[name]['peer'] = peer
            results[name].update(_output.spread(paired, 'vs_peer_{}'))
    del runners
    return {
        'num_params': n,
        'num_leaves': len(shapes),
        'rounds': rounds,
        'roofline_ms': float(np.median(roofline) * 1e3),
        'methods': results,
    }


def markdown(report: dict[str, Any]) -> str:
    blocks = [
        '# Lion step speed and memory',
        _output.machine_line(report['machine']),
        'One jitted step + `optax.apply_updates`, params and state donated. '
        "x own roofline = time / (probe time x the method's ideal bytes per parameter / 12): "
        'the probe (`p -= lr*g`) moves 12 B/param; Lion 20 (f32 momentum), 16 (bf16), '
        '14.25 (int8 + scales), AdamW 28. Medians over interleaved rounds [25-75 %]; ratios '
        'are per round, then the median; "vs peer" is the time over the peer\'s in the same '
        'round (optax.lion, or optax.lion with bf16 momentum for bf16).',
    ]
    header = ['method', 'ms/step [25-75 %]', 'ideal B/param', 'x own roofline', 'vs peer']
    header += ['state B/param', 'fusions', 'copies', 'temp MB']
    for tree_name, tree in report['trees'].items():
        rows = []
        for name, m in tree['methods'].items():
            vs = (
                f'{m["vs_peer_median"]:.2f} [{m["vs_peer_p25"]:.2f}-{m["vs_peer_p75"]:.2f}]'
                if 'vs_peer_median' in m
                else ''
            )
            temp = m['memory_analysis'].get('temp_size_in_bytes')
            rows.append([
                name,
                f'{m["median_ms"]:.3f} [{m["p25_ms"]:.3f}-{m["p75_ms"]:.3f}]',
                f'{m["ideal_bytes_per_param"]:g}',
                f'{m["x_roofline_median"]:.2f} [{m["x_roofline_p25"]:.2f}-'
                f'{m["x_roofline_p75"]:.2f}]',
                vs,
                f'{m["state_bytes_per_param"]:.3f}',
                m['hlo']['fusions'],
                m['hlo']['copies'],
                '' if temp is None else f'{temp / 2**20:.1f}',
            ])
        blocks += [
            f'## {tree_name}: {tree["num_params"]:,} params, {tree["num_leaves"]} leaves, '
            f'roofline {tree["roofline_ms"]:.3f} ms',
            _output.markdown_table(header, rows),
        ]
    return _output.document(*blocks)


def plot(report: dict[str, Any]) -> Any:
    from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel

    big = {k: v for k, v in report['trees'].items() if v['num_leaves'] == 16}
    sizes = sorted(big.values(), key=lambda t: t['num_params'])
    x = [t['num_params'] for t in sizes]
    fig = Figure(figsize=(7, 4.5), dpi=120, layout='tight')
    ax = fig.subplots()
    for name, style in [
        ('lion_optax.lion', 'o-'),
        ("lion_optax.lion nonfinite='skip_step'", 'D-'),
        ('lion_optax.lion bf16 mu', 'o--'),
        ('lion_optax.lion int8 mu', 'o:'),
        ('optax.lion', 's-'),
        ('optax.lion bf16 mu', 's--'),
        ('optax.adamw', '^-'),
    ]:
        if all(name in t['methods'] for t in sizes):
            med = [t['methods'][name]['median_ms'] for t in sizes]
            lo = [t['methods'][name]['p25_ms'] for t in sizes]
            hi = [t['methods'][name]['p75_ms'] for t in sizes]
            ax.errorbar(
                x,
                med,
                yerr=[np.subtract(med, lo), np.subtract(hi, med)],
                fmt=style,
                capsize=3,
                label=name,
            )
    ax.plot(x, [t['roofline_ms'] for t in sizes], 'k--', label='roofline (20 B/param)')
    ax.set_xscale('log')
    ax.set_yscale('log')
    ax.set_xlabel('parameters (16 float32 leaves)')
    ax.set_ylabel('ms per step (median, 25-75 %)')
    ax.set_title(
        f'One step + apply_updates, {report["machine"]["cpu_model"]} '
        f'({report["machine"]["cpu_count"]} cores)',
        fontsize=10,
    )
    ax.grid(True, which='both', alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def main(argv: list[str] | None = None) -> Path:
    parser = _output.parser('step_speed', __doc__, out='results/step_speed/')
    parser.add_argument('--quick', action='store_true', help='small sizes, few rounds (< 2 min)')
    parser.add_argument('--rounds', type=int, default=None, help='interleaved rounds per size')
    args = parser.parse_args(argv)
    rounds = args.rounds or (7 if args.quick else 25)
    target = 0.01 if args.quick else 0.05  # seconds per timing sample (several calls if short)
    report = _output.measure_trees(
        trees(args.quick), lambda shapes: bench_tree(shapes, METHODS, rounds, target), args.quick
    )
    _output.write_report(args.out, 'step_speed', report, markdown, plot)
    return args.out


if __name__ == '__main__':
    main()
