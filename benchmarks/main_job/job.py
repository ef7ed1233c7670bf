"""The main job: Lion against AdamW on real tasks, every optimizer tuned by the same protocol.

Run it from the repository root with::

    python -m benchmarks.main_job            # full run (< 30 min on 2 CPU cores)
    python -m benchmarks.main_job --quick    # the same protocol, smaller (< 3 min)

Tasks (all data ships with Python or scikit-learn; nothing is downloaded): an MLP and
a small CNN on scikit-learn's handwritten digits, and a character-level Transformer
language model on the standard library's ``pydoc_data`` text.

Contestants: ``optax.adamw``, ``optax.lion``, ``lion_optax.lion``,
``lion_optax.lion(cautious=True)`` and, when this lion_optax has it,
``lion_optax.lion(mu_dtype='int8')``. AdamW, Lion and cautious Lion are each tuned
on their own grid of learning rate x weight decay x two ``(b1, b2)`` pairs with the
same number of trials, the same refinement and edge-extension rule and the same
tuning seeds, selected on the validation split; then every contestant trains from
the same evaluation seeds and is reported on the test split, with per-seed paired
differences to AdamW. Batch-size sweeps (digits MLP and char LM) re-tune the
learning rate at every size. ``_protocol``'s docstring states the protocol in full.

Outputs: ``report.md``, ``results.json``, ``curves.png`` and ``batch_sweep.png`` in
the output folder, whose path is printed at the end.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import pathlib
import platform
import sys
import time
from collections.abc import Sequence

import jax
import optax

from .. import _output
from . import _optimizers, _plots, _protocol, _report
from ._protocol import Budget, Plan, Sweep, log_grid

HALF_DECADE = _protocol.LEARNING_RATE_STEP
WEIGHT_DECAYS = (0.01, 0.1, 1.0)

SIZES = {
    'full': Budget(
        seeds=5,
        tuning_seeds=2,
        refinement_rounds=2,
        lm=dict(dim=32, layers=2, context=32, batch_size=16, target_loss=2.5),
        plans={
            'digits-mlp': Plan(
                400,
                20,
                log_grid(10**-4.5, 6, HALF_DECADE),
                WEIGHT_DECAYS,
                Sweep((16, 64, 256, 1024), 20, log_grid(1e-4, 5, HALF_DECADE)),
            ),
            'digits-cnn': Plan(300, 20, log_grid(10**-3.5, 4, HALF_DECADE), WEIGHT_DECAYS),
            'char-lm': Plan(
                400,
                20,
                log_grid(1e-3, 3, HALF_DECADE),
                (0.1, 1.0),
                Sweep((8, 32, 128), 0.25, log_grid(1e-3, 3, HALF_DECADE)),
            ),
        },
    ),
    'quick': Budget(
        seeds=3,
        tuning_seeds=2,
        refinement_rounds=1,
        lm=dict(dim=32, layers=2, context=32, batch_size=16, target_loss=2.9, eval_windows=64),
        plans={
            'digits-mlp': Plan(
                100, 10, (1e-3, 1e-2), (0.1,), Sweep((16, 128, 1024), 3, (1e-3, 1e-2))
            ),
            'digits-cnn': Plan(60, 10, (1e-3, 1e-2), (0.1,)),
            'char-lm': Plan(80, 10, (1e-3, 1e-2), (0.1,), Sweep((16, 64), 0.1, (1e-3, 1e-2))),
        },
    ),
    # A smoke configuration for the tests and the notebooks: every code path, nothing
    # meaningful. The CNN is left out: it adds compile time and no code path.
    'tiny': Budget(
        seeds=2,
        tuning_seeds=2,
        refinement_rounds=1,
        lm=dict(
            dim=16,
            layers=1,
            context=16,
            batch_size=4,
            target_loss=4.0,
            max_chars=4000,
            eval_windows=8,
        ),
        plans={
            'digits-mlp': Plan(10, 5, (3e-3,), (0.1,), Sweep((64, 256), 0.5, (3e-3,))),
            'char-lm': Plan(10, 5, (3e-3,), (0.1,), Sweep((4, 16), 0.5, (3e-3,))),
        },
    ),
}


def machine_description() -> str:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
    device = jax.devices()[0]
    return (
        f'{platform.system()} {platform.machine()}, {cores} CPU cores available, '
        f'JAX device {device.platform}:{device.device_kind}'
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = _output.parser(
        'main_job', __doc__, out=None, out_help='results/main_job-<size>-<time>'
    )
    parser.add_argument(
        '--quick',
        action='store_const',
        const='quick',
        dest='size',
        help='the same protocol, smaller: under 3 minutes on 2 CPU cores',
    )
    parser.add_argument(
        '--size', choices=sorted(SIZES), help="run size (default: full; 'tiny' is a smoke test)"
    )
    parser.set_defaults(size='full')
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
    tasks = _protocol.make_tasks(budget)
    total = _protocol.planned_steps(budget, tasks)
    print(f'main job, size {args.size!r}: {total:,} training steps planned', flush=True)
    for phase in _protocol.phases(budget, tasks):
        print(f'  {phase.describe()}', flush=True)
    load_at_start = _output.load_average()

    from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top

    seconds = {}  # wall time of each part, compilation included
    with tqdm(total=total, unit='step', disable=args.no_progress, smoothing=0.05) as bar:
        runner = _protocol.Runner(bar)
        task_results, sweep_results = [], []
        for task in tasks:
            t = time.perf_counter()
            contest = _protocol.contest(runner, task, budget, bar.set_description)
            task_results.append(_report.task_result(task, contest))
            seconds[f'{task.name} contest'] = time.perf_counter() - t
            sweep = budget.plans[task.name].sweep
            if sweep is not None:
                t = time.perf_counter()
                points = _protocol.batch_sweep(
                    runner, task, budget, contest['tunings'], bar.set_description
                )
                sweep_results.append(_report.sweep_result(task, points, sweep))
                seconds[f'{task.name} sweep'] = time.perf_counter() - t

    result = dict(
        date=stamp.strftime('%Y-%m-%d %H:%M'),
        machine=machine_description(),
        size=args.size,
        command=' '.join(
            ['python', '-m', 'benchmarks.main_job', *(argv if argv is not None else sys.argv[1:])]
        ),
        versions=(
            f'python {platform.python_version()}, jax {jax.__version__}, optax {optax.__version__}'
        ),
        budget=dataclasses.asdict(budget),
        optimizers=[o.label for o in _optimizers.OPTIMIZERS],
        tuning_seeds=_protocol.tuning_seeds(budget),
        tasks=task_results,
        batch_sweeps=sweep_results,
        plan=[dataclasses.asdict(phase) for phase in _protocol.phases(budget, tasks)],
        planned_steps=total,
        progress_steps=runner.progress_steps,
        part_seconds=seconds,
        wall_seconds=time.perf_counter() - start,
        load_average=dict(start=load_at_start, end=_output.load_average()),
    )
    files = {
        'results.json': result,
        'curves.png': lambda: _plots.plot_curves(result),
        'batch_sweep.png': lambda: _plots.plot_sweep(result),
        'report.md': lambda: _report.report_text(result),
    }
    _output.write(out, files, indent=1)
    return out


if __name__ == '__main__':
    main()
