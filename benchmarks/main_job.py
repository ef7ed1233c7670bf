"""The main job: Lion against its peers on real tasks, with honest comparisons.

Run it with::

    python benchmarks/main_job.py            # full run (< 30 min on 2 CPU cores)
    python benchmarks/main_job.py --quick    # smaller run (< 3 min on 2 CPU cores)

Tasks (all data ships with Python or scikit-learn; nothing is downloaded):

1. an MLP and a small CNN on scikit-learn's handwritten digits;
2. a character-level Transformer language model on the standard library's
   ``pydoc_data`` documentation text, with held-out validation and test text.

Optimizers: ``optax.adamw``, ``optax.lion``, ``lion_optax.lion``,
``lion_optax.lion(cautious=True)`` and, when this lion_optax has it,
``lion_optax.lion(mu_dtype='int8')`` (block-wise int8 momentum).

Protocol (the same for every task and for the batch-size sweep):

* AdamW is tuned on a grid of (learning rate, weight decay) on the validation split
  with a tuning seed that is not an evaluation seed.
* Lion's (learning rate, weight decay) are derived from the best AdamW pair with
  ``lion_optax.adamw_to_lion`` for each factor in the grid (the paper's 3-10x rule),
  and the best factor is picked on the validation split, separately for Lion and
  cautious Lion. ``optax.lion`` and int8 momentum use ``lion_optax.lion``'s pick
  (the same update rule; int8 only stores the momentum differently).
* Every optimizer uses the same warmup-cosine schedule shape, the same weight-decay
  mask (no decay on biases and norm scales), the same initialisations and the same
  batches (both depend only on the seed).
* The chosen configurations are then trained from evaluation seeds 0..n-1, with
  optimizers interleaved within each seed so machine noise is shared, and reported
  on the test split: loss/accuracy mean and standard deviation over seeds; steps and
  training seconds to reach a validation target; median time per step; bytes of
  optimizer state.
* Batch-size sweep: the digits MLP at a fixed number of epochs, re-tuned at each
  batch size with the same protocol, comparing AdamW and ``lion_optax.lion``.

Outputs: ``report.md``, ``results.json``, ``curves.png`` and ``batch_sweep.png`` in
the output folder, whose path is printed at the end.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import pathlib
import platform
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _tasks  # noqa: E402  pylint: disable=g-import-not-at-top
import jax  # noqa: E402
import optax  # noqa: E402

import lion_optax  # noqa: E402

TUNING_SEED = 1000  # never used as an evaluation seed


@dataclasses.dataclass(frozen=True)
class Budget:
    """Sizes of one main-job configuration."""

    seeds: int
    digits_steps: int
    digits_eval_every: int
    lm_steps: int
    lm_eval_every: int
    lm: dict[str, Any]  # keyword arguments of _tasks.char_lm_task
    adamw_lrs: tuple[float, ...]
    adamw_wds: tuple[float, ...]
    lm_adamw_lrs: tuple[float, ...]
    lm_adamw_wds: tuple[float, ...]
    lion_factors: tuple[float, ...]
    extensions: int  # tries past a grid edge allowed per tuned optimizer
    sweep_batch_sizes: tuple[int, ...]
    sweep_epochs: int
    sweep_adamw_lrs: tuple[float, ...]


SIZES = {
    'full': Budget(
        seeds=3,
        digits_steps=600,
        digits_eval_every=30,
        lm_steps=400,
        lm_eval_every=40,
        lm=dict(dim=64, layers=2, context=64, batch_size=32, target_loss=2.2),
        adamw_lrs=(1e-3, 3e-3, 1e-2),
        adamw_wds=(0.01, 0.1),
        lm_adamw_lrs=(1e-3, 3e-3, 1e-2),
        lm_adamw_wds=(0.1,),
        lion_factors=(3.0, 10.0),
        extensions=2,
        sweep_batch_sizes=(16, 64, 256, 1024),
        sweep_epochs=30,
        sweep_adamw_lrs=(1e-3, 3e-3, 1e-2),
    ),
    'quick': Budget(
        seeds=3,
        digits_steps=160,
        digits_eval_every=20,
        lm_steps=120,
        lm_eval_every=20,
        lm=dict(dim=48, layers=2, context=32, batch_size=16, target_loss=2.8, eval_windows=128),
        adamw_lrs=(3e-3, 1e-2),
        adamw_wds=(0.1,),
        lm_adamw_lrs=(3e-3, 1e-2),
        lm_adamw_wds=(0.1,),
        lion_factors=(3.0, 10.0),
        extensions=1,
        sweep_batch_sizes=(16, 128, 1024),
        sweep_epochs=6,
        sweep_adamw_lrs=(3e-3, 1e-2),
    ),
    # A smoke configuration for the test suite and the notebooks: every code path,
    # nothing meaningful.
    'tiny': Budget(
        seeds=2,
        digits_steps=20,
        digits_eval_every=10,
        lm_steps=10,
        lm_eval_every=5,
        lm=dict(
            dim=16,
            layers=1,
            context=16,
            batch_size=4,
            target_loss=4.0,
            max_chars=4000,
            eval_windows=8,
        ),
        adamw_lrs=(3e-3,),
        adamw_wds=(0.1,),
        lm_adamw_lrs=(3e-3,),
        lm_adamw_wds=(0.1,),
        lion_factors=(3.0,),
        extensions=1,
        sweep_batch_sizes=(16, 256),
        sweep_epochs=1,
        sweep_adamw_lrs=(3e-3,),
    ),
}


# ---------------------------------------------------------------------------
# Protocol.
# ---------------------------------------------------------------------------


class Runner:
    """Runs configs and caches one trainer per (task, optimizer, steps, batch size).

    ``bar`` is the progress bar (a ``tqdm``): advanced after every block of steps,
    and its total grows when the tuning extends a grid past an edge.
    """

    def __init__(self, bar: Any):
        self.bar = bar
        self.progress_steps = 0
        self._trainers: dict[Any, _tasks.Trainer] = {}

    def on_chunk(self, steps: int) -> None:
        self.progress_steps += steps
        self.bar.update(steps)

    def run(
        self, task, configs, seeds, steps=None, batch_size=None, *, unplanned=False
    ) -> dict[_tasks.OptConfig, list[_tasks.RunResult]]:
        """Runs configs x seeds, interleaving configs within each seed.

        A custom ``steps`` (the batch-size sweep) evaluates 10 times per run.
        ``unplanned`` runs were not counted in the bar's initial total.
        """
        if unplanned:
            self.bar.total += (steps or task.steps) * len(configs) * len(seeds)
            self.bar.refresh()
        results = {c: [] for c in configs}
        for seed in seeds:
            for config in configs:
                key = (task, config.name, steps, batch_size)
                if key not in self._trainers:
                    self._trainers[key] = _tasks.Trainer(
                        task,
                        config.name,
                        steps=steps,
                        batch_size=batch_size,
                        eval_every=steps // 10 if steps else None,
                    )
                results[config].append(self._trainers[key].run(config, seed, self.on_chunk))
        return results


def _final_val_loss(run: _tasks.RunResult) -> float:
    return math.inf if run.diverged else run.val_loss[-1]


def beyond_edge(best: float, tried: Sequence[float], low: float, high: float) -> float | None:
    """The next value (x3 or /3) past ``best`` when it is the edge of ``tried``, else None.

    Keeps a tuned value from sitting on the edge of its grid, where the true optimum
    could lie outside; ``low`` and ``high`` bound the search.
    """
    if best == max(tried) and best * 3 <= high * (1 + 1e-9):
        return best * 3
    if best == min(tried) and best / 3 >= low * (1 - 1e-9):
        return best / 3
    return None


def tune(
    runner: Runner,
    task: _tasks.Task,
    budget: Budget,
    adamw_grid: Sequence[tuple[float, float]],
    lion_names: Sequence[str],
    steps=None,
    batch_size=None,
) -> tuple[dict[str, _tasks.OptConfig], list[dict[str, Any]]]:
    """Tunes AdamW on a grid, then Lion variants via ``adamw_to_lion`` factors.

    Selection is by final validation loss of one run from ``TUNING_SEED``. When the
    best AdamW learning rate (or the best Lion factor) is at the edge of what was
    tried, up to ``budget.extensions`` more values are tried past that edge (x3 or
    /3; Lion factors stay in [1, 100], ``adamw_to_lion``'s range).

    Returns:
      ``({optimizer name: chosen config}, trial rows)``.
    """
    trials = []
    scores: dict[_tasks.OptConfig, float] = {}
    factors: dict[_tasks.OptConfig, float] = {}

    def score(configs, unplanned=False):
        results = runner.run(task, configs, [TUNING_SEED], steps, batch_size, unplanned=unplanned)
        for config, (run,) in results.items():
            scores[config] = _final_val_loss(run)
            trials.append(
                dict(
                    optimizer=config.name,
                    factor=factors.get(config),
                    learning_rate=config.learning_rate,
                    weight_decay=config.weight_decay,
                    val_loss=scores[config],
                    val_accuracy=run.val_accuracy[-1],
                    extension=unplanned,
                )
            )

    def best(name):
        return min((c for c in scores if c.name == name), key=scores.get)

    score([_tasks.OptConfig(_tasks.ADAMW, lr, wd) for lr, wd in adamw_grid])
    for _ in range(budget.extensions):
        adamw = best(_tasks.ADAMW)
        tried = [c.learning_rate for c in scores if c.name == _tasks.ADAMW]
        lr = beyond_edge(adamw.learning_rate, tried, 0.0, math.inf)
        if lr is None:
            break
        score([dataclasses.replace(adamw, learning_rate=lr)], unplanned=True)
    adamw = best(_tasks.ADAMW)
    chosen = {_tasks.ADAMW: adamw}

    for name in lion_names:

        def derived(factor, name=name):
            lr, wd = lion_optax.adamw_to_lion(
                adamw.learning_rate, adamw.weight_decay, factor=factor
            )
            config = _tasks.OptConfig(name, float(lr), float(wd))
            factors[config] = factor
            return config

        score([derived(f) for f in budget.lion_factors])
        for _ in range(budget.extensions):
            tried = [f for c, f in factors.items() if c.name == name]
            factor = beyond_edge(factors[best(name)], tried, 1.0, 100.0)
            if factor is None:
                break
            score([derived(factor)], unplanned=True)
        chosen[name] = best(name)
    return chosen, trials


# Lion variants that pick their own adamw_to_lion factor; the others (optax.lion and
# int8 momentum) reuse lion_optax.lion's pick.
TUNED_LIONS = [_tasks.LION, _tasks.CAUTIOUS_LION]


def adamw_grid(budget: Budget, task: _tasks.Task) -> list[tuple[float, float]]:
    """AdamW's (learning rate, weight decay) tuning grid for ``task``."""
    if task.is_lm:
        return [(lr, wd) for lr in budget.lm_adamw_lrs for wd in budget.lm_adamw_wds]
    return [(lr, wd) for lr in budget.adamw_lrs for wd in budget.adamw_wds]


def final_configs(chosen: dict[str, _tasks.OptConfig]) -> list[_tasks.OptConfig]:
    """Every optimizer of the comparison, with the tuned (or inherited) hyperparameters."""
    lion = chosen[_tasks.LION]
    return [
        chosen.get(name) or _tasks.OptConfig(name, lion.learning_rate, lion.weight_decay)
        for name in _tasks.OPTIMIZERS
    ]


def planned_steps(budget: Budget, tasks: Sequence[_tasks.Task], sweep_steps: Sequence[int]) -> int:
    """Training steps of the whole job before any grid extension, for the progress bar."""
    total = 0
    for task in tasks:
        tuning_runs = len(adamw_grid(budget, task)) + len(TUNED_LIONS) * len(budget.lion_factors)
        total += task.steps * (tuning_runs + len(_tasks.OPTIMIZERS) * budget.seeds)
    for steps in sweep_steps:
        total += steps * (len(budget.sweep_adamw_lrs) + len(budget.lion_factors) + 2 * budget.seeds)
    return total


def sweep_steps_for(budget: Budget, n_train: int) -> list[int]:
    """Steps for a fixed number of epochs at each sweep batch size (multiple of 10)."""
    return [
        max(10, int(round(budget.sweep_epochs * n_train / bs / 10)) * 10)
        for bs in budget.sweep_batch_sizes
    ]


# ---------------------------------------------------------------------------
# Summaries.
# ---------------------------------------------------------------------------


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    values = np.asarray(values, dtype=np.float64)
    std = float(values.std(ddof=1)) if len(values) > 1 else 0.0
    return float(values.mean()), std


def summarize(
    task: _tasks.Task, config: _tasks.OptConfig, runs: Sequence[_tasks.RunResult]
) -> dict[str, Any]:
    """Seed statistics of one optimizer on one task."""
    reached = [r.reached(task.target) for r in runs]
    hit = [(s, t) for s, t in reached if s is not None]
    step_times = [r.time_per_step() for r in runs]
    loss_mean, loss_std = _mean_std([r.test_loss for r in runs])
    acc_mean, acc_std = _mean_std([r.test_accuracy for r in runs])
    return dict(
        optimizer=config.name,
        learning_rate=config.learning_rate,
        weight_decay=config.weight_decay,
        test_loss_mean=loss_mean,
        test_loss_std=loss_std,
        test_accuracy_mean=acc_mean,
        test_accuracy_std=acc_std,
        reached_target=len(hit),
        seeds=len(runs),
        steps_to_target_median=float(np.median([s for s, _ in hit])) if hit else None,
        seconds_to_target_median=float(np.median([t for _, t in hit])) if hit else None,
        ms_per_step_median=1e3 * float(np.median(step_times)),
        ms_per_step_min=1e3 * float(np.min(step_times)),
        ms_per_step_max=1e3 * float(np.max(step_times)),
        opt_state_bytes=runs[0].opt_state_bytes,
        param_bytes=runs[0].param_bytes,
        diverged=sum(r.diverged for r in runs),
        runs=[dataclasses.asdict(r) for r in runs],
    )


def _fmt_target(s: dict[str, Any]) -> str:
    if s['steps_to_target_median'] is None:
        return f'not reached (0/{s["seeds"]})'
    return (
        f'{s["steps_to_target_median"]:.0f} steps, '
        f'{s["seconds_to_target_median"]:.1f} s ({s["reached_target"]}/{s["seeds"]})'
    )


def task_table(task_result: dict[str, Any]) -> str:
    """Markdown table of one task's results."""
    metric, threshold = task_result['target']
    op = '>=' if metric == 'accuracy' else '<='
    rows = [
        f'| optimizer | lr | wd | test loss | test acc | to val {metric} {op} '
        f'{threshold} (median) | ms/step median [min-max] | opt state |',
        '|---|---|---|---|---|---|---|---|',
    ]
    base = task_result['summaries'][0]['ms_per_step_median']
    for s in task_result['summaries']:
        rows.append(
            f'| {s["optimizer"]} | {s["learning_rate"]:.3g} | {s["weight_decay"]:.3g} | '
            f'{s["test_loss_mean"]:.4f} ± {s["test_loss_std"]:.4f} | '
            f'{100 * s["test_accuracy_mean"]:.2f} ± {100 * s["test_accuracy_std"]:.2f}% | '
            f'{_fmt_target(s)} | {s["ms_per_step_median"]:.2f} '
            f'[{s["ms_per_step_min"]:.2f}-{s["ms_per_step_max"]:.2f}] '
            f'(x{s["ms_per_step_median"] / base:.2f}) | '
            f'{s["opt_state_bytes"] / 1024:.0f} KiB |'
        )
    return '\n'.join(rows)


def findings(task_result: dict[str, Any]) -> list[str]:
    """Plain statements comparing each Lion variant with AdamW on test loss."""
    out = []
    summaries = task_result['summaries']
    adamw = summaries[0]
    for s in summaries[1:]:
        diff = s['test_loss_mean'] - adamw['test_loss_mean']
        noise = math.hypot(s['test_loss_std'], adamw['test_loss_std'])
        if abs(diff) <= noise:
            verdict = 'ties with'
        else:
            verdict = 'beats' if diff < 0 else 'loses to'
        out.append(
            f'{s["optimizer"]} {verdict} AdamW on test loss '
            f'({s["test_loss_mean"]:.4f} vs {adamw["test_loss_mean"]:.4f}, '
            f'difference {diff:+.4f}, seed noise ±{noise:.4f}).'
        )
    return out


def sweep_table(sweep: list[dict[str, Any]]) -> str:
    rows = [
        '| batch size | steps | AdamW lr | AdamW test loss | AdamW test acc | '
        'Lion lr | Lion test loss | Lion test acc | Lion - AdamW loss |',
        '|---|---|---|---|---|---|---|---|---|',
    ]
    for point in sweep:
        a, lion = point['summaries']
        rows.append(
            f'| {point["batch_size"]} | {point["steps"]} | {a["learning_rate"]:.3g} | '
            f'{a["test_loss_mean"]:.4f} ± {a["test_loss_std"]:.4f} | '
            f'{100 * a["test_accuracy_mean"]:.2f}% | {lion["learning_rate"]:.3g} | '
            f'{lion["test_loss_mean"]:.4f} ± {lion["test_loss_std"]:.4f} | '
            f'{100 * lion["test_accuracy_mean"]:.2f}% | '
            f'{lion["test_loss_mean"] - a["test_loss_mean"]:+.4f} |'
        )
    return '\n'.join(rows)


# ---------------------------------------------------------------------------
# Outputs.
# ---------------------------------------------------------------------------


def plot_curves(result: dict[str, Any]) -> Any:
    """Validation loss against steps: seed mean with a min-max band per optimizer.

    Returns a ``matplotlib.figure.Figure`` (built without pyplot, so no global backend
    state is touched).
    """
    from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top

    tasks = result['tasks']
    fig = Figure(figsize=(5 * len(tasks), 4), layout='tight')
    for ax, task in zip(fig.subplots(1, len(tasks), squeeze=False)[0], tasks):
        for s in task['summaries']:
            steps = s['runs'][0]['steps']
            # Diverged runs stop early; the band covers the runs that finished.
            curves = np.array(
                [r['val_loss'] for r in s['runs'] if len(r['val_loss']) == len(steps)]
            )
            (line,) = ax.plot(steps, curves.mean(0), label=s['optimizer'])
            ax.fill_between(steps, curves.min(0), curves.max(0), alpha=0.2, color=line.get_color())
        ax.set_title(task['name'])
        ax.set_xlabel('step')
        ax.set_ylabel('validation loss')
        ax.set_yscale('log')
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f'Validation loss, mean and min-max over {result["budget"]["seeds"]} seeds')
    return fig


def plot_sweep(result: dict[str, Any]) -> Any:
    """Test loss and accuracy against batch size (fixed epochs), AdamW vs Lion."""
    from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top

    sweep = result['batch_sweep']
    sizes = [p['batch_size'] for p in sweep]
    fig = Figure(figsize=(10, 4), layout='tight')
    axes = fig.subplots(1, 2)
    for i, name in enumerate((_tasks.ADAMW, _tasks.LION)):
        for ax, key, scale in ((axes[0], 'test_loss', 1.0), (axes[1], 'test_accuracy', 100)):
            mean = [scale * p['summaries'][i][f'{key}_mean'] for p in sweep]
            std = [scale * p['summaries'][i][f'{key}_std'] for p in sweep]
            ax.errorbar(sizes, mean, yerr=std, marker='o', capsize=3, label=name)
    for ax, label in zip(axes, ('test loss', 'test accuracy (%)')):
        ax.set_xscale('log', base=2)
        ax.set_xlabel('batch size (fixed epochs, re-tuned per size)')
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(
        f'Batch-size sweep: {result["batch_sweep_task"]}, '
        f'{result["budget"]["sweep_epochs"]} epochs, '
        f'mean ± std over {result["budget"]["seeds"]} seeds'
    )
    return fig


def machine_description() -> str:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
    device = jax.devices()[0]
    return (
        f'{platform.system()} {platform.machine()}, {cores} CPU cores available, '
        f'JAX device {device.platform}:{device.device_kind}'
    )


def write_report(result: dict[str, Any], out: pathlib.Path) -> str:
    """Writes report.md and returns its text."""
    lines = [
        '# lion_optax main job',
        '',
        f'Measured {result["date"]} on {result["machine"]}; size `{result["size"]}`; '
        f'total wall time {result["wall_seconds"] / 60:.1f} min.',
        f'Versions: {result["versions"]}.',
        '',
        'Test-split numbers are mean ± standard deviation over '
        f'{result["budget"]["seeds"]} seeds (same inits and batches for every '
        'optimizer). Hyperparameters were chosen on the validation split with a '
        "separate tuning seed: AdamW on a grid; Lion from AdamW's best pair via "
        '`lion_optax.adamw_to_lion` with factor in '
        f"{list(result['budget']['lion_factors'])} (the paper's 3-10x), each chosen "
        'value tried up to '
        f'{result["budget"]["extensions"]} more steps of 3x past its grid edge when it '
        "landed on one. `optax.lion` and int8 momentum reuse `lion_optax.lion`'s "
        "choice. Time per step is the median over seeds of each run's median block "
        'time (interleaved runs, so machine noise is shared); ratios are to AdamW in '
        'this run.',
        '',
    ]
    for task in result['tasks']:
        lines += [f'## {task["name"]}', '', task['description'], '', task_table(task), '']
        lines += [f'- {f}' for f in task['findings']] + ['']
    lines += [
        '## Batch-size sweep',
        '',
        f'{result["batch_sweep_task"]}, fixed {result["budget"]["sweep_epochs"]} '
        'epochs (so larger batches take fewer steps), AdamW and `lion_optax.lion` '
        're-tuned at every batch size with the same protocol.',
        '',
        sweep_table(result['batch_sweep']),
        '',
        f'- {result["sweep_finding"]}',
        '',
        '![validation curves](curves.png)',
        '',
        '![batch sweep](batch_sweep.png)',
        '',
    ]
    text = '\n'.join(lines)
    (out / 'report.md').write_text(text)
    return text


def sweep_finding(sweep: list[dict[str, Any]]) -> str:
    gaps = [
        (p['batch_size'], p['summaries'][1]['test_loss_mean'] - p['summaries'][0]['test_loss_mean'])
        for p in sweep
    ]
    gap_text = ', '.join(f'{bs}: {g:+.4f}' for bs, g in gaps)
    # "Grows" here means Lion's loss advantage (AdamW - Lion) increases monotonically.
    advantage = [-g for _, g in gaps]
    trend = (
        'grows with batch size'
        if all(b > a for a, b in zip(advantage, advantage[1:]))
        else 'does not grow monotonically with batch size'
    )
    return (
        f'Lion minus AdamW test loss by batch size ({gap_text}); negative means '
        f"Lion is better. Lion's advantage {trend} in this sweep."
    )


# ---------------------------------------------------------------------------
# Main.
# ---------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument(
        '--quick',
        action='store_const',
        const='quick',
        dest='size',
        help='smaller run, under 3 minutes on 2 CPU cores',
    )
    parser.add_argument(
        '--size', choices=sorted(SIZES), help="run size (default: full; 'tiny' is a smoke test)"
    )
    parser.set_defaults(size='full')
    parser.add_argument(
        '--out',
        type=pathlib.Path,
        default=None,
        help='output folder (default: results/main_job-<size>-<time>)',
    )
    parser.add_argument('--no-progress', action='store_true', help='hide the progress bar')
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> pathlib.Path:
    """Runs the main job and returns the output folder."""
    args = parse_args(argv)
    budget = SIZES[args.size]
    start = time.perf_counter()
    stamp = datetime.datetime.now()
    out = args.out or pathlib.Path('results') / f'main_job-{args.size}-{stamp:%Y%m%d-%H%M%S}'
    out.mkdir(parents=True, exist_ok=True)

    tasks = _tasks.digits_tasks(budget.digits_steps, budget.digits_eval_every)
    tasks.append(_tasks.char_lm_task(budget.lm_steps, budget.lm_eval_every, **budget.lm))
    sweep_task = tasks[0]
    sweep_steps = sweep_steps_for(budget, len(sweep_task.data['train'][1]))

    from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top

    total = planned_steps(budget, tasks, sweep_steps)
    with tqdm(total=total, unit='step', disable=args.no_progress, smoothing=0.05) as bar:
        runner = Runner(bar)
        seeds = list(range(budget.seeds))
        task_results = []
        for task in tasks:
            bar.set_description(f'{task.name}: tuning')
            chosen, trials = tune(runner, task, budget, adamw_grid(budget, task), TUNED_LIONS)
            configs = final_configs(chosen)
            bar.set_description(f'{task.name}: {len(seeds)} seeds')
            runs = runner.run(task, configs, seeds)
            task_result = dict(
                name=task.name,
                description=task.description,
                target=list(task.target),
                steps=task.steps,
                batch_size=task.batch_size,
                tuning=trials,
                summaries=[summarize(task, c, runs[c]) for c in configs],
            )
            task_result['findings'] = findings(task_result)
            task_results.append(task_result)

        sweep = []
        # AdamW's weight decay stays at the value tuned for the sweep task above.
        sweep_wd = task_results[0]['summaries'][0]['weight_decay']
        for batch_size, steps in zip(budget.sweep_batch_sizes, sweep_steps):
            bar.set_description(f'batch sweep: {batch_size}')
            chosen, trials = tune(
                runner,
                sweep_task,
                budget,
                [(lr, sweep_wd) for lr in budget.sweep_adamw_lrs],
                [_tasks.LION],
                steps,
                batch_size,
            )
            configs = [chosen[_tasks.ADAMW], chosen[_tasks.LION]]
            runs = runner.run(sweep_task, configs, seeds, steps, batch_size)
            sweep.append(
                dict(
                    batch_size=batch_size,
                    steps=steps,
                    tuning=trials,
                    summaries=[summarize(sweep_task, c, runs[c]) for c in configs],
                )
            )

    result = dict(
        date=stamp.strftime('%Y-%m-%d %H:%M'),
        machine=machine_description(),
        size=args.size,
        command=' '.join(
            ['python', 'benchmarks/main_job.py', *(argv if argv is not None else sys.argv[1:])]
        ),
        versions=(
            f'python {platform.python_version()}, jax {jax.__version__}, optax {optax.__version__}'
        ),
        budget=dataclasses.asdict(budget),
        tasks=task_results,
        batch_sweep_task=sweep_task.description,
        batch_sweep=sweep,
        sweep_finding=sweep_finding(sweep),
        planned_steps=bar.total,
        progress_steps=runner.progress_steps,
        wall_seconds=time.perf_counter() - start,
    )
    (out / 'results.json').write_text(json.dumps(result, indent=1, default=float))
    plot_curves(result).savefig(out / 'curves.png', dpi=110)
    plot_sweep(result).savefig(out / 'batch_sweep.png', dpi=110)
    print(write_report(result, out))
    print(f'\nWrote report.md, results.json, curves.png and batch_sweep.png to {out}')
    return out


if __name__ == '__main__':
    main()
