"""The slow-link benchmark's harness (``benchmarks.slow_link``), on a small run.

Two processes (one CPU device each, gloo over loopback) train a tiny MLP in a
private network namespace whose loopback is throttled to 4 Mbit/s, then
unthrottled, with the all-reduce Lion and Distributed Lion's vote. Checked:
the throttle takes effect (the bytes through the link over the step time are
within a factor of the rate), the link carries what the compiled steps send,
and every result equals the unthrottled run's bit for bit. Skips, saying why,
where a private network namespace cannot be made (no root or user
namespaces, no ``tc``).
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from benchmarks import slow_link

RATE = '4mbit'
METHODS = (slow_link.ALL_REDUCE_LION, slow_link.VOTE)


@pytest.fixture(scope='module')
def slow_link_run(tmp_path_factory):
    problem = slow_link.namespace_problem()
    if problem:
        pytest.skip(f'no private network namespace here: {problem}')
    config = slow_link.Config(
        models=(
            slow_link.ModelSpec(
                'tiny', hidden=128, steps=6, end_to_end=True, floor_steps=0, cap_seconds=60
            ),
        ),
        rates=(RATE, 'free'),
        methods=METHODS,
        eval_every=3,
        burst='16kb',  # a small bucket, so that a 0.2 MB step cannot pass in one burst
        progress=False,
    )
    raw = slow_link.run(config, tmp_path_factory.mktemp('slow_link') / 'raw.json', timeout=240)
    return raw, slow_link.summarize(raw)


def _rows(summary):
    return {(r['rate'], r['method']): r for r in summary['models'][0]['rows']}


@pytest.mark.slow
def test_the_throttle_takes_effect(slow_link_run):
    _, summary = slow_link_run
    rows = _rows(summary)
    limit = slow_link.rate_bits_per_second(RATE) / 1e6
    throttled = rows[(RATE, slow_link.ALL_REDUCE_LION)]['link_megabits_per_second']
    free = rows[('free', slow_link.ALL_REDUCE_LION)]['link_megabits_per_second']
    # The all-reduce step is almost all communication: its bytes over its time are the
    # rate (tbf lets a 16 KB burst through above it), and far below the free link's.
    assert limit / 2 <= throttled <= 1.1 * limit, (throttled, limit)
    assert free > 4 * limit, (free, limit)


@pytest.mark.slow
def test_the_link_carries_what_the_compiled_steps_send(slow_link_run):
    raw, summary = slow_link_run
    processes = raw['processes']
    for (rate, method), row in _rows(summary).items():
        hlo = processes * row['hlo_bytes_per_device']
        # TCP/IP headers (and acknowledgements) on top, at mtu 1500; a few control messages.
        assert hlo <= row['link_bytes_per_step'] <= 1.35 * hlo + 4000, (rate, method, row)
    free = {m: _rows(summary)[('free', m)]['link_bytes_per_step'] for m in METHODS}
    assert free[slow_link.VOTE] * 10 < free[slow_link.ALL_REDUCE_LION], free


@pytest.mark.slow
def test_throttled_results_equal_the_unthrottled_run_bit_for_bit(slow_link_run):
    raw, summary = slow_link_run
    cells = raw['models'][0]['cells']
    for method in METHODS:
        mine = {c['rate']: c for c in cells if c['method'] == method}
        assert not any(c['cut'] for c in mine.values())
        assert mine[RATE]['params_digest'] == mine['free']['params_digest'], method
        assert mine[RATE]['val_loss'] == mine['free']['val_loss'], method
        assert mine[RATE]['train_loss'] == mine['free']['train_loss'], method
        assert len(mine['free']['val_loss']) == 2  # evaluated at steps 3 and 6
        assert np.isfinite(mine['free']['val_loss']).all()
    # The two methods compute different numbers (the check above could not pass by accident).
    digests = {c['params_digest'] for c in cells}
    assert len(digests) == len(METHODS)
    assert all(summary['models'][0]['identical_across_rates'].values())


@pytest.mark.slow
def test_the_report_has_every_cell_and_a_markdown_table(slow_link_run, tmp_path):
    raw, summary = slow_link_run
    text = slow_link.markdown(raw, summary, 'python -m benchmarks.slow_link (test)')
    assert '| 4mbit | distributed lion (vote) |' in text
    assert '| unthrottled | distributed lion (vote) |' in text
    assert 'free link: the vote step no slower' in text  # the goals table
    slow_link.plot_step_time(raw, summary).savefig(tmp_path / 'steps.png')
    slow_link.plot_loss(raw, summary).savefig(tmp_path / 'loss.png')
    assert os.path.getsize(tmp_path / 'steps.png') > 1000
    assert os.path.getsize(tmp_path / 'loss.png') > 1000


def test_rates_are_parsed_and_bad_ones_refused():
    assert slow_link.rate_bits_per_second('100mbit') == 1e8
    assert slow_link.rate_bits_per_second('1gbit') == 1e9
    assert slow_link.rate_bits_per_second('free') is None
    with pytest.raises(ValueError, match='kbit, mbit or gbit'):
        slow_link.rate_bits_per_second('fast')


def test_the_config_travels_as_json():
    config = slow_link.full_config()
    assert slow_link.Config.from_json(config.to_json()) == config


def test_a_missing_namespace_is_explained(monkeypatch):
    """Where the tools are missing, the reason names them and how to get them (the
    fixture above skips with it)."""
    monkeypatch.setattr(slow_link.shutil, 'which', lambda tool: None)
    problem = slow_link.namespace_problem()
    assert problem and 'unshare' in problem and 'tc' in problem and 'apt-get' in problem
