"""The main job: data and helpers, plus one tiny end-to-end run of the whole command.

The end-to-end run uses ``--size tiny`` (every code path, meaningless numbers) in a
child process with XLA's backend optimisations off, which halves compile time; the
numbers it checks are structural or exact (Lion from AdamW by the paper's rule,
``optax.lion`` equal to ``lion_optax.lion``), never speed.
"""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

import lion_optax

BENCHMARKS = os.path.join(os.path.dirname(__file__), os.pardir, 'benchmarks')
sys.path.insert(0, BENCHMARKS)
import _data  # noqa: E402
import _tasks  # noqa: E402
import main_job  # noqa: E402


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


def test_sweep_steps_keep_epochs_fixed():
    budget = main_job.SIZES['full']
    steps = main_job.sweep_steps_for(budget, n_train=1000)
    for batch_size, n in zip(budget.sweep_batch_sizes, steps):
        assert n % 10 == 0
        assert abs(n * batch_size / 1000 - budget.sweep_epochs) <= 0.1 * budget.sweep_epochs + 1


def _summary(name, mean, std):
    return {'optimizer': name, 'test_loss_mean': mean, 'test_loss_std': std}


def test_findings_name_wins_ties_and_losses():
    result = {
        'summaries': [
            _summary('adamw', 1.0, 0.01),
            _summary('a', 0.9, 0.01),
            _summary('b', 1.01, 0.01),
            _summary('c', 1.2, 0.01),
        ]
    }
    verdicts = [line.split(' AdamW')[0] for line in main_job.findings(result)]
    assert verdicts == ['a beats', 'b ties with', 'c loses to']


def test_sweep_finding_reports_the_trend():
    def point(bs, adamw, lion):
        return {
            'batch_size': bs,
            'summaries': [_summary('adamw', adamw, 0), _summary('lion', lion, 0)],
        }

    growing = [point(16, 1.0, 1.1), point(64, 1.0, 1.0), point(256, 1.0, 0.8)]
    assert 'advantage grows with batch size' in main_job.sweep_finding(growing)
    mixed = [point(16, 1.0, 0.9), point(64, 1.0, 1.0), point(256, 1.0, 0.8)]
    assert 'does not grow monotonically' in main_job.sweep_finding(mixed)


@pytest.fixture(scope='module')
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp('main_job')
    # The child must import the same lion_optax as this process.
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(lion_optax.__file__)))
    pythonpath = os.pathsep.join(filter(None, [package_root, os.environ.get('PYTHONPATH')]))
    env = dict(
        os.environ,
        JAX_PLATFORMS='cpu',
        PYTHONPATH=pythonpath,
        XLA_FLAGS='--xla_backend_optimization_level=0',
    )
    completed = subprocess.run(
        [
            sys.executable,
            os.path.join(BENCHMARKS, 'main_job.py'),
            '--size',
            'tiny',
            '--out',
            str(out),
        ],
        check=True,
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
    assert str(out) in completed.stdout.splitlines()[-1]
    assert 'step/s' in completed.stderr or 'it/s' in completed.stderr  # the progress bar
    report = (out / 'report.md').read_text()
    for heading in ('## digits-mlp', '## digits-cnn', '## char-lm', '## Batch-size sweep'):
        assert heading in report


def test_tiny_run_results(tiny_run):
    out, _ = tiny_run
    result = json.loads((out / 'results.json').read_text())
    budget = main_job.SIZES['tiny']
    assert result['size'] == 'tiny'
    assert result['progress_steps'] == result['planned_steps']  # the bar ends at 100%
    assert [t['name'] for t in result['tasks']] == ['digits-mlp', 'digits-cnn', 'char-lm']
    for task in result['tasks']:
        summaries = {s['optimizer']: s for s in task['summaries']}
        assert list(summaries) == _tasks.OPTIMIZERS
        adamw, lion = summaries[_tasks.ADAMW], summaries[_tasks.LION]
        # Lion's hyperparameters come from AdamW's by the paper's rule.
        factor = adamw['learning_rate'] / lion['learning_rate']
        assert any(factor == pytest.approx(f) for f in budget.lion_factors)
        assert lion['weight_decay'] == pytest.approx(adamw['weight_decay'] * factor)
        # optax.lion runs lion_optax.lion's hyperparameters and, with finite
        # gradients, the same update: the same numbers on the same data.
        optax_lion = summaries[_tasks.OPTAX_LION]
        assert optax_lion['learning_rate'] == lion['learning_rate']
        assert optax_lion['test_loss_mean'] == pytest.approx(lion['test_loss_mean'], rel=1e-4)
        # One momentum buffer against AdamW's two; int8 momentum shrinks it further.
        assert adamw['opt_state_bytes'] > 1.9 * lion['opt_state_bytes']
        if _tasks.HAS_INT8:
            int8_bytes = summaries[_tasks.INT8_LION]['opt_state_bytes']
            # Leaves under Int8Momentum's min_quantized_size stay float32: the tiny
            # models have large enough leaves only in the MLP (64 x 256).
            assert int8_bytes < lion['opt_state_bytes'] or task['name'] != 'digits-mlp'
            assert int8_bytes <= lion['opt_state_bytes']
        for s in summaries.values():
            assert len(s['runs']) == budget.seeds
            assert math.isfinite(s['test_loss_mean']) and s['ms_per_step_median'] > 0
        planned = [t for t in task['tuning'] if not t['extension']]
        assert len(planned) == len(budget.adamw_lrs) * len(budget.adamw_wds) + 2 * len(
            budget.lion_factors
        )
        assert len(task['tuning']) - len(planned) <= 3 * budget.extensions
        for trial in task['tuning']:
            if trial['optimizer'] != _tasks.ADAMW:  # on the adamw_to_lion line
                assert trial['learning_rate'] * trial['factor'] == pytest.approx(
                    adamw['learning_rate']
                )
    assert [p['batch_size'] for p in result['batch_sweep']] == list(budget.sweep_batch_sizes)
    assert 'Lion minus AdamW test loss' in result['sweep_finding']
