"""The main job's numbers and words: summaries, paired differences, tables and report.md.

Everything here reads plain dictionaries (what ``results.json`` holds), so the
notebook can rebuild every table from a saved run.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from .._output import markdown_table, quartiles
from . import _optimizers, _protocol, _training

ADAMW = _optimizers.ADAMW.label
RULE = (3.0, 10.0)  # adamw_to_lion's factor range, from the paper


# ---------------------------------------------------------------------------
# Numbers.
# ---------------------------------------------------------------------------


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    values = np.asarray(values, dtype=np.float64)
    std = float(values.std(ddof=1)) if len(values) > 1 else 0.0
    return float(values.mean()), std


def step_time_stats(runs: Sequence[_training.RunResult]) -> dict[str, float]:
    """Median and spread (quartiles, extremes) in ms of every timed block's time per step."""
    ms = 1e3 * np.array([t for r in runs for t in r.seconds_per_step()])
    median, q25, q75 = quartiles(ms)
    return dict(
        ms_per_step_median=median,
        ms_per_step_q25=q25,
        ms_per_step_q75=q75,
        ms_per_step_min=float(ms.min()),
        ms_per_step_max=float(ms.max()),
        timed_blocks=len(ms),
    )


def summarize(
    target: tuple[str, float],
    optimizer: _optimizers.Optimizer,
    config: _optimizers.Hyperparameters,
    runs: Sequence[_training.RunResult],
) -> dict[str, Any]:
    """Seed statistics of one optimizer on one task (or one batch size)."""
    reached = [r.reached(target) for r in runs]
    hit = [(s, t) for s, t in reached if s is not None]
    loss_mean, loss_std = mean_std([r.test_loss for r in runs])
    acc_mean, acc_std = mean_std([r.test_accuracy for r in runs])
    return dict(
        optimizer=optimizer.label,
        tuned_as=optimizer.tuned_as.label if optimizer.tuned_as else None,
        **dataclasses.asdict(config),
        test_loss_mean=loss_mean,
        test_loss_std=loss_std,
        test_accuracy_mean=acc_mean,
        test_accuracy_std=acc_std,
        reached_target=len(hit),
        seeds=len(runs),
        steps_to_target_median=float(np.median([s for s, _ in hit])) if hit else None,
        seconds_to_target_median=float(np.median([t for _, t in hit])) if hit else None,
        **step_time_stats(runs),
        opt_state_bytes=runs[0].opt_state_bytes,
        param_bytes=runs[0].param_bytes,
        diverged=sum(r.diverged for r in runs),
        runs=[dataclasses.asdict(r) for r in runs],
    )


def paired_differences(summaries: Sequence[dict[str, Any]], seeds: Sequence[int]) -> dict:
    """Per seed, each Lion variant minus AdamW on the test split (same init and batches).

    Returns:
      ``{optimizer: dict(per_seed=[{seed, test_loss, test_accuracy}], mean, std, se,
      lion_wins, adamw_wins, ties)}``: differences are the variant minus AdamW, so a
      negative test loss difference is a win for the variant; wins count seeds by test
      loss.
    """
    by_name = {s['optimizer']: s for s in summaries}
    adamw = by_name[ADAMW]['runs']
    out = {}
    for name, summary in by_name.items():
        if name == ADAMW:
            continue
        per_seed = [
            dict(
                seed=seed,
                test_loss=run['test_loss'] - base['test_loss'],
                test_accuracy=run['test_accuracy'] - base['test_accuracy'],
            )
            for seed, run, base in zip(seeds, summary['runs'], adamw)
        ]
        diffs = [d['test_loss'] for d in per_seed]
        mean, std = mean_std(diffs)
        out[name] = dict(
            metric='test loss, variant minus AdamW (negative: the variant wins)',
            per_seed=per_seed,
            mean=mean,
            std=std,
            se=std / math.sqrt(len(diffs)) if len(diffs) > 1 else math.nan,
            lion_wins=sum(d < 0 for d in diffs),
            adamw_wins=sum(d > 0 for d in diffs),
            ties=sum(d == 0 for d in diffs),
        )
    return out


def verdict(difference: dict[str, Any]) -> str:
    """'beats', 'loses to' or 'ties with': the paired mean against 2 standard errors."""
    if not math.isfinite(difference['se']) or abs(difference['mean']) <= 2 * difference['se']:
        return 'ties with'
    return 'beats' if difference['mean'] < 0 else 'loses to'


def findings(differences: dict[str, dict[str, Any]]) -> list[str]:
    """Plain statements comparing each Lion variant with AdamW, seed by seed."""
    out = []
    for name, d in differences.items():
        n = len(d['per_seed'])
        out.append(
            f'{name} {verdict(d)} AdamW: test loss difference {d["mean"]:+.4f} '
            f'(mean of {n} paired seeds, std {d["std"]:.4f}, 2 se {2 * d["se"]:.4f}); '
            f'lower for Lion on {d["lion_wins"]}/{n} seeds, for AdamW on {d["adamw_wins"]}/{n}.'
        )
    return out


def rule_check(adamw: dict[str, Any], lion: dict[str, Any]) -> dict[str, Any]:
    """Two tunings' choices against ``adamw_to_lion``'s rule (lr / k, wd * k, 3 <= k <= 10).

    Args:
      adamw: AdamW's tuning (``Tuning.as_dict()``: ``chosen`` and ``chosen_at_edge``).
      lion: a Lion variant's tuning, likewise.

    Returns:
      The ratios, whether each is inside 3-10, and which chosen values sat at an edge of
      what was tried (a ratio involving one is a bound, not a measurement).
    """
    a, b = adamw['chosen'], lion['chosen']
    lr_ratio = a['learning_rate'] / b['learning_rate']
    wd_ratio = b['weight_decay'] / a['weight_decay']

    def in_rule(ratio: float) -> bool:  # with room for rounding: 0.3 / 0.1 < 3 in floats
        return RULE[0] * (1 - 1e-9) <= ratio <= RULE[1] * (1 + 1e-9)

    at_edge = [
        f'{who} {name.replace("_", " ")} ({side})'
        for who, tuning in (('AdamW', adamw), ('Lion', lion))
        for name, side in tuning.get('chosen_at_edge', {}).items()
        if side
    ]
    return dict(
        lr_ratio=lr_ratio,
        wd_ratio=wd_ratio,
        decay_strength_ratio=wd_ratio / lr_ratio,  # (lr * wd) of Lion over AdamW's
        lr_in_rule=in_rule(lr_ratio),
        wd_in_rule=in_rule(wd_ratio),
        at_edge=at_edge,
    )


def task_result(task, contest: dict[str, Any]) -> dict[str, Any]:
    """The JSON of one task: tuning, every trial, summaries and comparisons."""
    tunings = contest['tunings']
    configs = {o: _protocol.chosen_for(o, tunings) for o in contest['runs']}
    summaries = [summarize(task.target, o, configs[o], runs) for o, runs in contest['runs'].items()]
    tuning = {o.label: t.as_dict() for o, t in tunings.items()}
    differences = paired_differences(summaries, contest['seeds'])
    return dict(
        name=task.name,
        description=task.description,
        target=list(task.target),
        steps=task.steps,
        batch_size=task.batch_size,
        tuning=list(tuning.values()),
        trials=[trial for t in tunings.values() for trial in t.trials],
        summaries=summaries,
        paired_differences=differences,
        findings=findings(differences),
        adamw_to_lion={
            label: rule_check(tuning[ADAMW], t) for label, t in tuning.items() if label != ADAMW
        },
    )


def sweep_result(task, points: Sequence[dict[str, Any]], sweep: _protocol.Sweep) -> dict:
    """The JSON of one task's batch-size sweep."""
    out_points = []
    for point in points:
        tunings = point['tunings']
        summaries = [
            summarize(task.target, o, tunings[o].chosen, runs) for o, runs in point['runs'].items()
        ]
        adamw, lion = (tunings[o].as_dict() for o in _protocol.SWEEP_OPTIMIZERS)
        out_points.append(
            dict(
                batch_size=point['batch_size'],
                steps=point['steps'],
                tuning=[adamw, lion],
                trials=[trial for t in tunings.values() for trial in t.trials],
                summaries=summaries,
                paired_differences=paired_differences(summaries, point['seeds']),
                adamw_to_lion=rule_check(adamw, lion),
            )
        )
    result = dict(
        task=task.name,
        description=task.description,
        epochs=sweep.epochs,
        learning_rates=list(sweep.learning_rates),
        points=out_points,
    )
    result['finding'] = sweep_finding(result)
    return result


def sweep_finding(sweep: dict[str, Any]) -> str:
    """How Lion's paired advantage over AdamW moves with the batch size."""
    lion = _optimizers.LION.label
    gaps = [(p['batch_size'], p['paired_differences'][lion]['mean']) for p in sweep['points']]
    gap_text = ', '.join(f'{bs}: {g:+.4f}' for bs, g in gaps)
    advantage = [-g for _, g in gaps]  # AdamW - Lion: positive when Lion is better
    if all(b > a for a, b in zip(advantage, advantage[1:])):
        trend = 'grows with batch size'
    elif all(b < a for a, b in zip(advantage, advantage[1:])):
        trend = 'shrinks with batch size'
    else:
        trend = 'does not change monotonically with batch size'
    return (
        f'{sweep["task"]}: Lion minus AdamW test loss by batch size ({gap_text}); negative '
        f"means Lion is better. Lion's advantage {trend} in this sweep."
    )


# ---------------------------------------------------------------------------
# Words.
# ---------------------------------------------------------------------------


def _fmt_target(s: dict[str, Any]) -> str:
    if s['steps_to_target_median'] is None:
        return f'not reached (0/{s["seeds"]})'
    return (
        f'{s["steps_to_target_median"]:.0f} steps, '
        f'{s["seconds_to_target_median"]:.1f} s ({s["reached_target"]}/{s["seeds"]})'
    )


EDGE_NOTE = (
    '(edge: the lowest or highest value tried, even after refinement; the optimum may lie '
    'beyond, so read it as a bound.)'
)


def _fmt_chosen(tuning: dict[str, Any], name: str) -> str:
    side = tuning.get('chosen_at_edge', {}).get(name)
    return f'{tuning["chosen"][name]:.3g}' + (f' ({side} edge)' if side else '')


def _fmt_load(load: Sequence[float] | None) -> str:
    return 'unknown' if load is None else ', '.join(f'{v:.2f}' for v in load)


def _fmt_betas(s: dict[str, Any]) -> str:
    return f'({s["b1"]:g}, {s["b2"]:g})'


def _fmt_loss(s: dict[str, Any]) -> str:
    return f'{s["test_loss_mean"]:.4f} ± {s["test_loss_std"]:.4f}'


def task_table(task: dict[str, Any]) -> str:
    """Markdown table of one task's results."""
    metric, threshold = task['target']
    op = '>=' if metric == 'accuracy' else '<='
    header = ['optimizer', 'lr', 'wd', '(b1, b2)', 'test loss', 'test acc']
    header += [f'to val {metric} {op} {threshold} (median)', 'opt state']
    rows = [
        [
            s['optimizer'],
            f'{s["learning_rate"]:.3g}',
            f'{s["weight_decay"]:.3g}',
            _fmt_betas(s),
            _fmt_loss(s),
            f'{100 * s["test_accuracy_mean"]:.2f} ± {100 * s["test_accuracy_std"]:.2f}%',
            _fmt_target(s),
            f'{s["opt_state_bytes"] / 1024:.0f} KiB',
        ]
        for s in task['summaries']
    ]
    return markdown_table(header, rows)


def paired_table(differences: dict[str, dict[str, Any]]) -> str:
    """Markdown table of the per-seed paired differences (variant minus AdamW)."""
    seeds = [d['seed'] for d in next(iter(differences.values()))['per_seed']]
    header = ['optimizer', *(f'seed {s}' for s in seeds), 'mean ± std', 'seeds won (Lion / AdamW)']
    rows = [
        [
            name,
            *(f'{p["test_loss"]:+.4f}' for p in d['per_seed']),
            f'{d["mean"]:+.4f} ± {d["std"]:.4f}',
            f'{d["lion_wins"]} / {d["adamw_wins"]}',
        ]
        for name, d in differences.items()
    ]
    return markdown_table(header, rows)


def tuning_table(task: dict[str, Any]) -> str:
    """Markdown table: what each tuned optimizer searched, how much, and what it chose."""
    header = ['optimizer', '(b1, b2) tried', 'configs', 'runs', 'chosen lr', 'chosen wd']
    header += ['chosen (b1, b2)', 'val loss (mean over tuning seeds)']
    rows = [
        [
            t['optimizer'],
            ', '.join(f'({b1:g}, {b2:g})' for b1, b2 in t['betas']),
            t['configs'],
            t['runs'],
            _fmt_chosen(t, 'learning_rate'),
            _fmt_chosen(t, 'weight_decay'),
            _fmt_betas(t['chosen']),
            f'{t["chosen_val_loss"]:.4f}',
        ]
        for t in task['tuning']
    ]
    return markdown_table(header, rows) + f'\n\n{EDGE_NOTE}'


def step_time_table(tasks: Sequence[dict[str, Any]]) -> str:
    """Markdown table: median ms per step [quartiles] per optimizer and task."""

    def cell(task, name):
        s = next(s for s in task['summaries'] if s['optimizer'] == name)
        ratio = s['ms_per_step_median'] / task['summaries'][0]['ms_per_step_median']
        return (
            f'{s["ms_per_step_median"]:.2f} [{s["ms_per_step_q25"]:.2f}-'
            f'{s["ms_per_step_q75"]:.2f}] (x{ratio:.2f})'
        )

    names = [s['optimizer'] for s in tasks[0]['summaries']]
    rows = [[name, *(cell(t, name) for t in tasks)] for name in names]
    return markdown_table(['optimizer', *(t['name'] for t in tasks)], rows)


def rule_table(result: dict[str, Any]) -> str:
    """Markdown table: measured AdamW/Lion ratios at the tuned optima next to the rule."""

    def row(where, name, r, wd_note=''):
        return [
            where,
            name,
            f'{r["lr_ratio"]:.2g}',
            f'{r["wd_ratio"]:.2g}{wd_note}',
            f'{r["decay_strength_ratio"]:.2g}',
            ', '.join(r['at_edge']) or 'none',
        ]

    rows = [
        row(task['name'], name, r)
        for task in result['tasks']
        for name, r in task['adamw_to_lion'].items()
    ]
    rows += [
        row(
            f'{sweep["task"]}, batch {p["batch_size"]}',
            _optimizers.LION.label,
            p['adamw_to_lion'],
            ' (main)',
        )
        for sweep in result['batch_sweeps']
        for p in sweep['points']
    ]
    header = ['where', 'Lion variant', 'AdamW lr / Lion lr', 'Lion wd / AdamW wd']
    header += ['(lr·wd) Lion / AdamW', 'chosen at an edge']
    return markdown_table(header, rows)


def rule_finding(result: dict[str, Any]) -> str:
    """One sentence on how often the measured ratios fell inside the rule's 3-10x."""
    main = [r for t in result['tasks'] for r in t['adamw_to_lion'].values()]
    sweeps = [p['adamw_to_lion'] for s in result['batch_sweeps'] for p in s['points']]
    lr_ratios = sorted(r['lr_ratio'] for r in main + sweeps)
    bounds = sum(bool(r['at_edge']) for r in main + sweeps)
    return (
        f'AdamW lr / Lion lr ranged {lr_ratios[0]:.2g}-{lr_ratios[-1]:.2g} over '
        f'{len(lr_ratios)} tuned pairs, {sum(r["lr_in_rule"] for r in main + sweeps)} of them '
        f"inside the rule's {RULE[0]:g}-{RULE[1]:g}; Lion wd / AdamW wd was inside it for "
        f'{sum(r["wd_in_rule"] for r in main)} of the {len(main)} main-contest pairs (the '
        f'sweeps keep the main weight decays). {bounds} of the pairs involve a value chosen at '
        'the edge of what was tried (a bound, not a measurement). A ratio can only take values '
        'the grids allow (see the protocol table): read it as known to within a grid step.'
    )


def sweep_table(sweep: dict[str, Any]) -> str:
    """Markdown table of one batch-size sweep: chosen learning rates and paired results."""
    lion = _optimizers.LION.label
    rows = []
    for p in sweep['points']:
        adamw, lion_summary = p['summaries']
        adamw_tuning, lion_tuning = p['tuning']
        d = p['paired_differences'][lion]
        rows.append(
            [
                p['batch_size'],
                p['steps'],
                _fmt_chosen(adamw_tuning, 'learning_rate'),
                _fmt_chosen(lion_tuning, 'learning_rate'),
                _fmt_loss(adamw),
                _fmt_loss(lion_summary),
                f'{d["mean"]:+.4f} ± {d["std"]:.4f}',
                f'{d["lion_wins"]} / {d["adamw_wins"]}',
            ]
        )
    header = ['batch size', 'steps', 'AdamW lr', 'Lion lr', 'AdamW test loss']
    header += ['Lion test loss', 'Lion - AdamW (paired mean ± std)', 'seeds won (Lion / AdamW)']
    return markdown_table(header, rows) + f'\n\n{EDGE_NOTE}'


def protocol_text(result: dict[str, Any]) -> list[str]:
    """The declared protocol, with the grids and trial counts this run used."""
    budget = result['budget']
    lines = [
        '## Protocol',
        '',
        'Each of AdamW, `lion_optax.lion` and cautious Lion is tuned on its own, by the same '
        'rule: a grid of learning rate x weight decay x two (b1, b2) pairs (the learning '
        'rates and weight decays are the same numbers for all three; the (b1, b2) pairs '
        f"are each optimizer's own), then {budget['refinement_rounds']} refinement round(s) "
        'of four trials around the best point so far: one new learning rate and one new '
        'weight decay on each side, a full grid step past the best when it is the edge of '
        'what was tried (the edge-extension rule), else halfway to its nearest tried '
        'neighbour on a log scale. Every configuration runs on '
        f'{budget["tuning_seeds"]} tuning seeds ({", ".join(map(str, result["tuning_seeds"]))}'
        ', never evaluation seeds) and is scored by its final validation loss averaged over '
        'them (diverged: infinite). `optax.lion` and int8-momentum Lion reuse '
        "`lion_optax.lion`'s choice (the same update rule). Every optimizer has the same "
        'warmup-cosine schedule shape and the same weight-decay mask (no decay on biases and '
        'norm scales).',
        '',
        f'Evaluation: {budget["seeds"]} seeds (0..{budget["seeds"] - 1}); a seed fixes the '
        'initialisation and the batches, so the comparisons are paired; optimizers are '
        'interleaved within each seed so machine noise is shared; numbers are on the test '
        'split.',
        '',
    ]
    rows = []
    for task in result['tasks']:
        t = task['tuning'][0]
        rows.append(
            [
                task['name'],
                task['steps'],
                task['batch_size'],
                ', '.join(f'{v:.3g}' for v in t['learning_rates']),
                ', '.join(f'{v:.3g}' for v in t['weight_decays']),
                # One number each when the counts are equal, as the protocol promises.
                ' / '.join(sorted({str(x['configs']) for x in task['tuning']})),
                ' / '.join(sorted({str(x['runs']) for x in task['tuning']})),
            ]
        )
    header = ['task', 'steps', 'batch', 'learning rates', 'weight decays']
    header += ['configs per optimizer', 'runs per optimizer']
    lines.append(markdown_table(header, rows))
    betas = {t['optimizer']: t['betas'] for t in result['tasks'][0]['tuning']}
    lines += [
        '',
        '(b1, b2) pairs tried: '
        + '; '.join(
            f'{name}: ' + ', '.join(f'({b1:g}, {b2:g})' for b1, b2 in pairs)
            for name, pairs in betas.items()
        )
        + '.',
        '',
        'Batch-size sweeps: at a fixed number of epochs (a larger batch takes fewer steps), '
        'AdamW and `lion_optax.lion` re-tune their learning rate at each batch size by the '
        f'same rule (the grid below, then {budget["refinement_rounds"]} round(s) of one new '
        'value on each side), keeping the weight decay and (b1, b2) each chose in the main '
        'contest on that task.',
        '',
    ]
    for sweep in result['batch_sweeps']:
        t = sweep['points'][0]['tuning'][0]
        lines.append(
            f'- {sweep["task"]}: batch sizes {[p["batch_size"] for p in sweep["points"]]}, '
            f'{sweep["epochs"]:g} epochs, learning rates '
            f'{", ".join(f"{v:.3g}" for v in sweep["learning_rates"])}; '
            f'{t["configs"]} configs and {t["runs"]} runs per optimizer and batch size.'
        )
    lines.append('')
    return lines


def report_text(result: dict[str, Any]) -> str:
    """The whole report.md."""
    lines = [
        '# lion_optax main job',
        '',
        f'Measured {result["date"]} on {result["machine"]}; size `{result["size"]}`; '
        f'{result["planned_steps"]:,} training steps; total wall time '
        f'{result["wall_seconds"] / 60:.1f} min ('
        + ', '.join(f'{k} {v:.0f} s' for k, v in result['part_seconds'].items())
        + ').',
        f'Versions: {result["versions"]}. Load average (1, 5, 15 min) at start '
        f'{_fmt_load(result["load_average"]["start"])}, at end '
        f'{_fmt_load(result["load_average"]["end"])} (timings mean most on a quiet machine).',
        '',
        *protocol_text(result),
    ]
    for task in result['tasks']:
        lines += [
            f'## {task["name"]}',
            '',
            task['description'],
            '',
            'Tuning:',
            '',
            tuning_table(task),
            '',
            'Test split, mean ± std over seeds:',
            '',
            task_table(task),
            '',
            'Paired test-loss differences, variant minus AdamW, per seed:',
            '',
            paired_table(task['paired_differences']),
            '',
            *[f'- {f}' for f in task['findings']],
            '',
        ]
    lines += [
        '## Time per step',
        '',
        'Milliseconds per training step (gradient and update, one jitted call each), median '
        'and [quartiles] over every timed block of the evaluation runs (blocks of '
        'equal length, compilation excluded, optimizers interleaved), and the ratio of '
        "medians to AdamW's. On CPU the model's forward and backward pass dominates.",
        '',
        step_time_table(result['tasks']),
        '',
        '## Batch-size sweeps',
        '',
    ]
    for sweep in result['batch_sweeps']:
        lines += [
            f'### {sweep["task"]}',
            '',
            f'{sweep["description"]}, {sweep["epochs"]:g} epochs.',
            '',
            sweep_table(sweep),
            '',
            f'- {sweep["finding"]}',
            '',
        ]
    lines += [
        '## `adamw_to_lion` against the tuned optima',
        '',
        'The rule: Lion lr = AdamW lr / k and Lion wd = AdamW wd * k with k in 3-10, which '
        'keeps lr·wd constant.',
        '',
        rule_table(result),
        '',
        f'- {rule_finding(result)}',
        '',
        '![validation curves](curves.png)',
        '',
        '![batch sweeps](batch_sweep.png)',
        '',
    ]
    return '\n'.join(lines)
