"""The main job: data, the tuning protocol, the report, plus one tiny end-to-end run.

The protocol and report tests use a fake trainer (no JAX compilation). The end-to-end
run uses ``--size tiny`` (every code path, meaningless numbers) in a child process
with XLA's backend optimisations off, which halves compile time; what it checks is
structural or exact (every trial recorded with its fields, equal trial counts,
``optax.lion`` equal to ``lion_optax.lion``), never speed.
"""

import dataclasses
import json
import math
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from benchmarks.main_job import _data, _optimizers, _protocol, _report, job

from _helpers import child_env

ROOT = pathlib.Path(__file__).resolve().parent.parent

TRIAL_FIELDS = {'optimizer', 'learning_rate', 'weight_decay', 'b1', 'b2', 'seed', 'val_loss'}


def test_char_corpus_splits_and_unknown_characters():
    corpus = _data.char_corpus('abcabcabca' + 'xyz' * 10)
    assert len(corpus.train) + len(corpus.val) + len(corpus.test) == 40
    assert corpus.vocab[0] == '\0'
    assert set(corpus.vocab) == {'\0', 'a', 'b', 'c', 'x', 'y', 'z'}
    # Characters never seen in training map to index 0.
    held_out = _data.char_corpus('aaaaaaaa' + 'bq')
    assert held_out.test.tolist() == [0]


def test_lm_windows_targets_are_next_characters():
    tokens = np.arange(23, dtype=np.int32)
    x, y = _data.lm_windows(tokens, context=5)
    assert x.shape == y.shape == (4, 5)
    np.testing.assert_array_equal(y, x + 1)
    np.testing.assert_array_equal(x.ravel(), tokens[:20])


def test_real_data_ships_with_the_packages():
    text = _data.load_pydoc_text()
    assert len(text) > 100_000 and 'the' in text
    splits = _data.load_digits_splits()
    sizes = {k: len(v[1]) for k, v in splits.items()}
    assert sum(sizes.values()) == 1797 and sizes['val'] == sizes['test'] == 359
    train, test = set(map(bytes, splits['train'][0])), set(map(bytes, splits['test'][0]))
    assert len(train & test) < 5  # disjoint except for duplicate images in the data


# ---------------------------------------------------------------------------
# The protocol, with a fake trainer.
# ---------------------------------------------------------------------------


@dataclasses.dataclass
class _FakeRun:
    val_loss: list
    val_accuracy: list
    diverged: bool = False

    @property
    def final_val_loss(self):
        return math.inf if self.diverged else self.val_loss[-1]


class _FakeRunner:
    """Scores a configuration by a bowl in log(lr), log(wd) whose minimum depends on betas."""

    def __init__(self, best_lr, best_wd):
        self.best_lr, self.best_wd = best_lr, best_wd
        self.calls = []

    def run(self, task, optimizer, config, seed, **kwargs):
        self.calls.append((optimizer, config, seed, kwargs))
        loss = (
            math.log10(config.learning_rate / self.best_lr) ** 2
            + 0.1 * math.log10(config.weight_decay / self.best_wd) ** 2
            + 0.01 * config.b1
            + 1e-3 * seed
        )
        return _FakeRun([loss], [0.5])


def test_neighbours_extend_past_an_edge_and_halve_inside():
    assert _protocol.neighbours(1.0, [1.0, 10.0], 10.0) == pytest.approx((0.1, math.sqrt(10.0)))
    assert _protocol.neighbours(10.0, [1.0, 10.0], 10.0) == pytest.approx((math.sqrt(10), 100))
    assert _protocol.neighbours(3.0, [3.0], 2.0) == pytest.approx((1.5, 6.0))
    lower, upper = _protocol.neighbours(1.0, [0.01, 1.0, 100.0], 10.0)
    assert (lower, upper) == pytest.approx((0.1, 10.0))


def _space(optimizer, rounds=2):
    return _protocol.SearchSpace((1e-3, 1e-2), (0.1, 1.0), optimizer.betas, rounds)


def test_tune_gives_every_optimizer_the_same_trials_and_records_each():
    runner = _FakeRunner(best_lr=1e-2, best_wd=0.1)  # lr optimum on the grid's upper edge
    seeds = [1000, 1001]
    tunings = [_protocol.tune(runner, None, o, _space(o), seeds) for o in _optimizers.TUNED]
    counts = {len(t.trials) for t in tunings}
    assert counts == {_space(_optimizers.ADAMW).configs * len(seeds)} == {(8 + 2 * 4) * 2}
    for tuning in tunings:
        assert {t['seed'] for t in tuning.trials} == set(seeds)
        for trial in tuning.trials:
            assert TRIAL_FIELDS <= set(trial)
            assert trial['optimizer'] == tuning.optimizer.label
            assert (trial['b1'], trial['b2']) in tuning.optimizer.betas
        # The edge-extension rule tried a learning rate past the grid's edge.
        assert max(t['learning_rate'] for t in tuning.trials) > 1e-2
        assert tuning.chosen.learning_rate == pytest.approx(1e-2)
        assert tuning.chosen.weight_decay == pytest.approx(0.1)
        assert tuning.chosen.b1 == min(b1 for b1, _ in tuning.optimizer.betas)


def test_tune_refines_between_tried_values():
    runner = _FakeRunner(best_lr=3e-3, best_wd=0.3)
    tuning = _protocol.tune(runner, None, _optimizers.LION, _space(_optimizers.LION, 1), [0])
    refined = [t for t in tuning.trials if t['stage'] == 'refinement 1']
    assert len(refined) == 4
    # The grid's best (lr 1e-3, wd 0.1) is on the low edge of both: one value past
    # the edge, one halfway to the neighbour, for each.
    lrs = sorted(t['learning_rate'] for t in refined if t['weight_decay'] == 0.1)
    wds = sorted(t['weight_decay'] for t in refined if t['learning_rate'] == 1e-3)
    assert lrs == pytest.approx([10**-3.5, 10**-2.5])
    assert wds == pytest.approx([0.01, 10**-0.5])
    assert tuning.chosen.learning_rate == pytest.approx(10**-2.5)


def test_sweep_steps_keep_epochs_fixed():
    budget = job.SIZES['full']
    plan = budget.plans['digits-mlp']

    class Task:
        data = {'train': (np.zeros((1000, 8, 8, 1)), None)}
        is_lm = False

    steps = _protocol.sweep_steps(Task, plan.sweep)
    for batch_size, n in zip(plan.sweep.batch_sizes, steps):
        assert n % 10 == 0
        assert abs(n * batch_size / 1000 - plan.sweep.epochs) <= 0.1 * plan.sweep.epochs + 1


# ---------------------------------------------------------------------------
# The report.
# ---------------------------------------------------------------------------


def _summary(name, losses):
    runs = [{'test_loss': v, 'test_accuracy': 1.0 - v} for v in losses]
    return {'optimizer': name, 'runs': runs}


def test_paired_differences_one_entry_per_seed_and_win_counts():
    summaries = [
        _summary(_report.ADAMW, [1.0, 1.0, 1.0]),
        _summary('a', [0.9, 1.1, 0.8]),
        _summary('b', [1.0, 1.2, 1.3]),
    ]
    differences = _report.paired_differences(summaries, [0, 1, 2])
    assert list(differences) == ['a', 'b']
    a, b = differences['a'], differences['b']
    assert [d['seed'] for d in a['per_seed']] == [0, 1, 2]
    assert [d['test_loss'] for d in a['per_seed']] == pytest.approx([-0.1, 0.1, -0.2])
    assert (a['lion_wins'], a['adamw_wins'], a['ties']) == (2, 1, 0)
    assert (b['lion_wins'], b['adamw_wins'], b['ties']) == (0, 2, 1)
    assert a['mean'] == pytest.approx(-0.2 / 3)


def test_findings_name_wins_ties_and_losses():
    def difference(values):
        mean, std = _report.mean_std(values)
        per_seed = [{'seed': i, 'test_loss': v} for i, v in enumerate(values)]
        return dict(
            per_seed=per_seed,
            mean=mean,
            std=std,
            se=std / math.sqrt(len(values)),
            lion_wins=sum(v < 0 for v in values),
            adamw_wins=sum(v > 0 for v in values),
        )

    differences = {
        'a': difference([-0.10, -0.11, -0.09]),
        'b': difference([-0.1, 0.1, 0.02]),
        'c': difference([0.2, 0.21, 0.19]),
    }
    verdicts = [line.split(' AdamW')[0] for line in _report.findings(differences)]
    assert verdicts == ['a beats', 'b ties with', 'c loses to']


def test_sweep_finding_reports_the_trend():
    def point(bs, gap):
        return {'batch_size': bs, 'paired_differences': {_optimizers.LION.label: {'mean': gap}}}

    growing = {'task': 't', 'points': [point(16, 0.1), point(64, 0.0), point(256, -0.2)]}
    assert 'advantage grows with batch size' in _report.sweep_finding(growing)
    mixed = {'task': 't', 'points': [point(16, -0.1), point(64, 0.0), point(256, -0.2)]}
    assert 'does not change monotonically' in _report.sweep_finding(mixed)


def test_rule_check_measures_ratios_against_three_to_ten():
    def tuning(lr, wd, edges):
        return {'chosen': {'learning_rate': lr, 'weight_decay': wd}, 'chosen_at_edge': edges}

    check = _report.rule_check(
        tuning(1e-3, 0.1, {'learning_rate': None, 'weight_decay': None}),
        tuning(1e-4, 0.3, {'learning_rate': 'lower', 'weight_decay': None}),
    )
    assert check['lr_ratio'] == pytest.approx(10) and check['wd_ratio'] == pytest.approx(3)
    assert check['lr_in_rule'] and check['wd_in_rule']
    assert check['decay_strength_ratio'] == pytest.approx(0.3)
    assert check['at_edge'] == ['Lion learning rate (lower)']


def test_a_choice_past_every_extension_is_flagged_as_an_edge():
    runner = _FakeRunner(best_lr=10.0, best_wd=0.1)  # far above every lr tried
    tuning = _protocol.tune(runner, None, _optimizers.ADAMW, _space(_optimizers.ADAMW), [0, 1])
    assert tuning.edges() == {'learning_rate': 'upper', 'weight_decay': None}
    assert tuning.as_dict()['chosen_at_edge']['learning_rate'] == 'upper'


def test_every_size_plans_equal_tuning_for_every_optimizer():
    for budget in job.SIZES.values():
        assert budget.tuning_seeds >= 2
        for optimizer in _optimizers.TUNED:
            assert len(optimizer.betas) >= 2
        for name in budget.plans:
            task = type('Task', (), {'name': name})
            spaces = [_protocol.main_space(budget, task, o) for o in _optimizers.TUNED]
            assert len({s.configs for s in spaces}) == 1


# ---------------------------------------------------------------------------
# One tiny end-to-end run.
# ---------------------------------------------------------------------------


@pytest.fixture(scope='module')
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp('main_job')
    env = child_env(XLA_FLAGS='--xla_backend_optimization_level=0')
    completed = subprocess.run(
        [sys.executable, '-m', 'benchmarks.main_job', '--size', 'tiny', '--out', str(out)],
        check=True,
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    return out, completed


def test_tiny_run_writes_every_output(tiny_run):
    out, completed = tiny_run
    for name in ('report.md', 'results.json', 'curves.png', 'batch_sweep.png'):
        assert (out / name).stat().st_size > 0, name
    for name in ('curves.png', 'batch_sweep.png'):
        assert (out / name).read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    lines = completed.stdout.splitlines()
    assert str(out) in lines[-1]
    assert 'training steps planned' in lines[0]
    assert 'step/s' in completed.stderr or 'it/s' in completed.stderr  # the progress bar
    report = (out / 'report.md').read_text()
    for heading in ('## Protocol', '## Time per step', '## Batch-size sweeps', 'adamw_to_lion'):
        assert heading in report
    for name in job.SIZES['tiny'].plans:
        assert f'## {name}' in report


def test_tiny_run_records_every_trial_with_equal_counts(tiny_run):
    out, _ = tiny_run
    result = json.loads((out / 'results.json').read_text())
    budget = job.SIZES['tiny']
    assert result['size'] == 'tiny'
    assert result['progress_steps'] == result['planned_steps']  # the bar ends at its total
    assert [t['name'] for t in result['tasks']] == list(budget.plans)
    tuned = [o.label for o in _optimizers.TUNED]
    for task in result['tasks']:
        assert [t['optimizer'] for t in task['tuning']] == tuned
        runs = {t['optimizer']: t['runs'] for t in task['tuning']}
        configs = {t['configs'] for t in task['tuning']}
        assert len(configs) == 1 and len(set(runs.values())) == 1
        for name in tuned:
            trials = [t for t in task['trials'] if t['optimizer'] == name]
            assert len(trials) == runs[name] == configs.pop() * budget.tuning_seeds
            configs.add(len(trials) // budget.tuning_seeds)
            assert {t['seed'] for t in trials} == set(result['tuning_seeds'])
            assert {(t['b1'], t['b2']) for t in trials} == {
                tuple(b) for b in next(x for x in task['tuning'] if x['optimizer'] == name)['betas']
            }
        for trial in task['trials']:
            assert TRIAL_FIELDS <= set(trial)
        # Tuning seeds are never evaluation seeds.
        assert not set(result['tuning_seeds']) & set(range(budget.seeds))


def test_tiny_run_compares_on_paired_seeds(tiny_run):
    out, _ = tiny_run
    result = json.loads((out / 'results.json').read_text())
    budget = job.SIZES['tiny']
    labels = [o.label for o in _optimizers.OPTIMIZERS]
    for task in result['tasks']:
        summaries = {s['optimizer']: s for s in task['summaries']}
        assert list(summaries) == labels
        differences = task['paired_differences']
        assert list(differences) == labels[1:]
        for d in differences.values():
            assert [p['seed'] for p in d['per_seed']] == list(range(budget.seeds))
            assert d['lion_wins'] + d['adamw_wins'] + d['ties'] == budget.seeds
        adamw, lion = summaries[_optimizers.ADAMW.label], summaries[_optimizers.LION.label]
        # optax.lion runs lion_optax.lion's hyperparameters and, with finite
        # gradients, the same update: the same numbers on the same data.
        optax_lion = summaries[_optimizers.OPTAX_LION.label]
        for key in ('learning_rate', 'weight_decay', 'b1', 'b2'):
            assert optax_lion[key] == lion[key]
        for mine, theirs in zip(lion['runs'], optax_lion['runs']):
            np.testing.assert_allclose(mine['val_loss'], theirs['val_loss'], rtol=1e-5)
            assert mine['test_loss'] == pytest.approx(theirs['test_loss'], rel=1e-5)
        # One momentum buffer against AdamW's two; int8 momentum never grows it.
        assert adamw['opt_state_bytes'] > 1.9 * lion['opt_state_bytes']
        if _optimizers.HAS_INT8:
            int8 = summaries[_optimizers.INT8_LION.label]
            assert int8['learning_rate'] == lion['learning_rate']
            assert int8['opt_state_bytes'] <= lion['opt_state_bytes']
        for s in summaries.values():
            assert len(s['runs']) == budget.seeds
            assert math.isfinite(s['test_loss_mean'])
            assert s['ms_per_step_q25'] <= s['ms_per_step_median'] <= s['ms_per_step_q75']
        for name, check in task['adamw_to_lion'].items():
            assert check['lr_ratio'] == pytest.approx(
                adamw['learning_rate'] / summaries[name]['learning_rate']
            )


def test_tiny_run_sweeps_every_planned_batch_size(tiny_run):
    out, _ = tiny_run
    result = json.loads((out / 'results.json').read_text())
    budget = job.SIZES['tiny']
    planned = {name: plan.sweep for name, plan in budget.plans.items() if plan.sweep}
    assert [s['task'] for s in result['batch_sweeps']] == list(planned)
    for sweep in result['batch_sweeps']:
        points = sweep['points']
        assert [p['batch_size'] for p in points] == list(planned[sweep['task']].batch_sizes)
        for p in points:
            assert len({t['runs'] for t in p['tuning']}) == 1  # AdamW and Lion alike
            lion = p['paired_differences'][_optimizers.LION.label]
            assert len(lion['per_seed']) == budget.seeds
        assert 'Lion minus AdamW test loss' in sweep['finding']
