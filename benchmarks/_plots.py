"""The main job's figures, drawn from ``results.json``'s dictionaries.

Figures are built without pyplot (``matplotlib.figure.Figure``), so no global backend
state is touched. Every optimizer has its own colour, line style and marker; curves
that coincide (``optax.lion`` and ``lion_optax.lion`` compute the same numbers) are
drawn once, labelled with both names. Log axes carry plain tick labels (0.2, 0.5, 1).
"""

from __future__ import annotations

from typing import Any

import _optimizers
import numpy as np

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


def plot_curves(result: dict[str, Any]) -> Any:
    """Validation loss against steps per task: seed mean with a min-max band per optimizer."""
    from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top

    tasks = result['tasks']
    fig = Figure(figsize=(5.5 * len(tasks), 4.5), layout='constrained')
    for ax, task in zip(fig.subplots(1, len(tasks), squeeze=False)[0], tasks):
        curves, bands = {}, {}
        for s in task['summaries']:
            steps = s['runs'][0]['steps']
            # Diverged runs stop early; the band covers the runs that finished.
            finished = np.array(
                [r['val_loss'] for r in s['runs'] if len(r['val_loss']) == len(steps)]
            )
            if len(finished):
                curves[s['optimizer']] = finished.mean(0)
                bands[s['optimizer']] = (np.array(steps), finished.min(0), finished.max(0))
        values = np.concatenate([b[1:] for b in bands.values()], axis=None)
        for group in _groups(curves):
            name = group[0]
            steps, low, high = bands[name]
            style = STYLES.get(name, {})
            ax.plot(
                steps,
                curves[name],
                label=' = '.join(group),
                markevery=max(1, len(steps) // 8),
                markersize=5,
                **style,
            )
            ax.fill_between(steps, low, high, alpha=0.15, color=style.get('color'))
        _plain_log_y(ax, float(values.min()), float(values.max()))
        ax.set_title(task['name'])
        ax.set_xlabel('step')
        ax.set_ylabel('validation loss (log scale)')
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(
        f'Validation loss, mean and min-max over {result["budget"]["seeds"]} seeds '
        '(curves that coincide are drawn once, labelled with every name)'
    )
    return fig


def plot_sweep(result: dict[str, Any]) -> Any:
    """Per sweep task: test loss against batch size, and Lion minus AdamW per seed."""
    from matplotlib import ticker  # pylint: disable=g-import-not-at-top
    from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top

    sweeps = result['batch_sweeps']
    fig = Figure(figsize=(5.5 * len(sweeps), 7), layout='constrained')
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
