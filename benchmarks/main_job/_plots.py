"""The main job's figures, drawn from ``results.json``'s dictionaries.

Figures are built without pyplot (``matplotlib.figure.Figure``), so no global backend
state is touched. Every optimizer has its own colour, line style and marker; curves
that are the same numbers (``optax.lion`` and ``lion_optax.lion``) are drawn once,
labelled with both names, and curves that nearly coincide (int8 momentum and Lion)
have staggered markers, so that none hides another. Log axes carry plain tick labels
(0.2, 0.5, 1).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from . import _optimizers

STYLES = {
    _optimizers.ADAMW.label: dict(color='black', linestyle='-', marker='s'),
    _optimizers.OPTAX_LION.label: dict(color='tab:cyan', linestyle='--', marker='x'),
    _optimizers.LION.label: dict(color='tab:blue', linestyle='-', marker='o'),
    _optimizers.CAUTIOUS_LION.label: dict(color='tab:orange', linestyle='-.', marker='^'),
    _optimizers.INT8_LION.label: dict(color='tab:green', linestyle=':', marker='v'),
}


def _plain_log_y(ax: Any, low: float, high: float) -> None:
    """Log y scale with ticks at 1, 2, 5 (finer within a decade) written as plain numbers."""
    from matplotlib import ticker  # pylint: disable=g-import-not-at-top

    ax.set_yscale('log')
    axis = ax.yaxis
    subs = (1.0, 2.0, 5.0) if high / low > 10 else (1.0, 1.2, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 7.0)
    axis.set_major_locator(ticker.LogLocator(base=10, subs=subs))
    axis.set_major_formatter(ticker.FormatStrFormatter('%g'))
    axis.set_minor_locator(ticker.NullLocator())


def _groups(curves: dict[str, np.ndarray]) -> list[list[str]]:
    """Optimizers whose curves are the same numbers, in order of first appearance."""
    groups: list[list[str]] = []
    for name, curve in curves.items():
        for group in groups:
            first = curves[group[0]]
            if first.shape == curve.shape and np.allclose(first, curve, rtol=1e-6, atol=0):
                group.append(name)
                break
        else:
            groups.append([name])
    return groups


# The comparisons, one row of panels each: the headline (AdamW against Lion, with their
# min-max bands), then Lion against its variants (no bands: four bands over the same curves
# hid each other). lion_optax.lion is in both rows, the reference of each.
COMPARISONS = (
    ('AdamW against Lion', (_optimizers.ADAMW.label, _optimizers.LION.label), True),
    (
        'Lion and its variants',
        (
            _optimizers.LION.label,
            _optimizers.OPTAX_LION.label,
            _optimizers.CAUTIOUS_LION.label,
            _optimizers.INT8_LION.label,
        ),
        False,
    ),
)
MARKS_PER_CURVE = 8


def curve_marks(position: int, count: int, points: int) -> tuple[int, int]:
    """``markevery=(start, every)`` for the ``position``-th of ``count`` curves in a panel.

    Each curve gets at most about ``MARKS_PER_CURVE`` markers, and no two curves of
    the panel mark the same point (curve k marks points k, k + every, ...; every is at
    least ``count``), so that curves drawn over each other still show every one's
    markers: one curve cannot hide another.
    """
    every = max(count, math.ceil(points / MARKS_PER_CURVE))
    return (position * every) // count, every


def _task_curves(task: dict[str, Any]) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """``({optimizer: mean curve}, {optimizer: (steps, min, max)})`` over finished runs."""
    curves, bands = {}, {}
    for s in task['summaries']:
        steps = s['runs'][0]['steps']
        # Diverged runs stop early; the curve and band cover the runs that finished.
        finished = np.array([r['val_loss'] for r in s['runs'] if len(r['val_loss']) == len(steps)])
        if len(finished):
            curves[s['optimizer']] = finished.mean(0)
            bands[s['optimizer']] = (np.array(steps), finished.min(0), finished.max(0))
    return curves, bands


def plot_curves(result: dict[str, Any]) -> Any:
    """Validation loss against steps, one column per task and one row per comparison.

    Top row: AdamW against ``lion_optax.lion``, seed mean with a min-max band each.
    Bottom row: ``lion_optax.lion`` with ``optax.lion``, cautious and int8-momentum Lion,
    seed means only. Curves that are the same numbers are drawn once, labelled with every
    name; curves that nearly coincide are told apart by staggered markers
    (:func:`curve_marks`) and by line widths that shrink with each curve drawn on top.
    """
    from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top

    tasks = result['tasks']
    fig = Figure(figsize=(5.5 * len(tasks), 8.5), dpi=110, layout='constrained')
    axes = fig.subplots(len(COMPARISONS), len(tasks), squeeze=False)
    for column, task in enumerate(tasks):
        curves, bands = _task_curves(task)
        values = np.concatenate([b[1:] for b in bands.values()], axis=None)
        for row, (title, names, with_bands) in enumerate(COMPARISONS):
            ax = axes[row, column]
            shown = {name: curves[name] for name in names if name in curves}
            groups = _groups(shown)
            for position, group in enumerate(groups):
                name = group[0]
                steps, low, high = bands[name]
                style = STYLES.get(name, {})
                ax.plot(
                    steps,
                    curves[name],
                    label=' = '.join(group),
                    markevery=curve_marks(position, len(groups), len(steps)),
                    markersize=6 if position == 0 else 5,
                    linewidth=2.6 - 0.5 * position,
                    zorder=2 + position,
                    **style,
                )
                if with_bands:
                    ax.fill_between(
                        steps, low, high, alpha=0.15, color=style.get('color'), linewidth=0
                    )
            _plain_log_y(ax, float(values.min()), float(values.max()))
            ax.set_title(f'{task["name"]}: {title}', fontsize=10)
            ax.set_xlabel('step')
            ax.set_ylabel('validation loss (log scale)')
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.suptitle(
        f'Validation loss, mean over {result["budget"]["seeds"]} seeds (top: with the min-max '
        'band; curves that are the same numbers are drawn once, labelled with every name)'
    )
    return fig


def plot_sweep(result: dict[str, Any]) -> Any:
    """Per sweep task: test loss against batch size, and Lion minus AdamW per seed."""
    from matplotlib import ticker  # pylint: disable=g-import-not-at-top
    from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top

    sweeps = result['batch_sweeps']
    fig = Figure(figsize=(5.5 * len(sweeps), 7), dpi=110, layout='constrained')
    axes = fig.subplots(2, len(sweeps), squeeze=False)
    lion = _optimizers.LION.label
    for column, sweep in enumerate(sweeps):
        top, bottom = axes[0, column], axes[1, column]
        sizes = [p['batch_size'] for p in sweep['points']]
        for i, name in enumerate((_optimizers.ADAMW.label, lion)):
            mean = [p['summaries'][i]['test_loss_mean'] for p in sweep['points']]
            std = [p['summaries'][i]['test_loss_std'] for p in sweep['points']]
            top.errorbar(sizes, mean, yerr=std, capsize=3, label=name, **STYLES[name])
        for p in sweep['points']:
            diffs = [d['test_loss'] for d in p['paired_differences'][lion]['per_seed']]
            bottom.plot([p['batch_size']] * len(diffs), diffs, 'o', color='tab:blue', alpha=0.5)
        means = [p['paired_differences'][lion]['mean'] for p in sweep['points']]
        bottom.plot(sizes, means, '-', color='tab:blue', label='mean over seeds')
        bottom.axhline(0.0, color='black', linewidth=0.8)
        top.set_title(f'{sweep["task"]}, {sweep["epochs"]:g} epochs')
        top.set_ylabel('test loss, mean ± std over seeds')
        bottom.set_ylabel('Lion - AdamW test loss per seed\n(below 0: Lion better)')
        for ax in (top, bottom):
            ax.set_xscale('log', base=2)
            ax.set_xticks(sizes)
            ax.xaxis.set_major_formatter(ticker.FormatStrFormatter('%d'))
            ax.xaxis.set_minor_locator(ticker.NullLocator())
            ax.set_xlabel('batch size (fixed epochs, lr re-tuned per size)')
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.suptitle('Batch-size sweeps: AdamW and lion_optax.lion')
    return fig
