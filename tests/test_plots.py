"""The main job's curves figure (benchmarks/main_job/_plots.py): every curve visible, every name shown.

Issue 18: in curves.png, optax.lion = lion_optax.lion was hidden under the int8 curve,
and five min-max bands piled up on one panel. The figure now has one row per comparison
(bands only for AdamW against Lion), and curves in one panel never put a marker on the
same point, so a curve drawn over another still shows its own markers.
"""

import itertools
import json
import pathlib

import numpy as np
import pytest

from benchmarks.main_job import _optimizers, _plots

NAMES = [o.label for o in (_optimizers.ADAMW, _optimizers.OPTAX_LION, _optimizers.LION,
                           _optimizers.CAUTIOUS_LION, _optimizers.INT8_LION)]
REFERENCE = pathlib.Path(__file__).resolve().parent.parent / 'benchmarks' / 'reference' / 'results.json'


def _result(points=20, seeds=3):
    """Three tasks where optax.lion is lion_optax.lion exactly and int8 nearly: the hard case."""
    steps = list(range(20, 20 * points + 1, 20))
    base = np.geomspace(2.0, 0.2, points)
    curves = {NAMES[0]: base * 0.6, NAMES[1]: base, NAMES[2]: base,
              NAMES[3]: base * 0.9, NAMES[4]: base * (1 + 1e-4)}
    tasks = []
    for name in ('a', 'b', 'c'):
        summaries = [{'optimizer': o, 'runs': [
            {'steps': steps, 'val_loss': list(curve * (1 + 0.01 * seed))} for seed in range(seeds)]}
            for o, curve in curves.items()]
        tasks.append({'name': name, 'summaries': summaries})
    return {'tasks': tasks, 'budget': {'seeds': seeds}}


def _reference():
    with open(REFERENCE) as f:
        return json.load(f)


def _marked_steps(line):
    start, every = line.get_markevery()
    return set(np.asarray(line.get_xdata())[start::every].tolist())


@pytest.fixture(params=['synthetic', 'reference'])
def result(request):
    return _result() if request.param == 'synthetic' else _reference()


def test_every_optimizer_is_in_a_legend_of_every_task(result):
    fig = _plots.plot_curves(result)
    for task in result['tasks']:
        panels = [ax for ax in fig.axes if ax.get_title().split(':')[0] == task['name']]
        labels = [text.get_text() for ax in panels for text in ax.get_legend().get_texts()]
        shown = {name for label in labels for name in label.split(' = ')}
        assert shown == {s['optimizer'] for s in task['summaries']}, (task['name'], labels)
        for ax in panels:  # each legend entry is a curve drawn in that panel
            assert [t.get_text() for t in ax.get_legend().get_texts()] == \
                [line.get_label() for line in ax.get_lines()]


def test_no_two_curves_of_a_panel_mark_the_same_point(result):
    """The old figure gave every curve the same markevery: int8 hid Lion marker for marker."""
    for ax in _plots.plot_curves(result).axes:
        marks = [_marked_steps(line) for line in ax.get_lines()]
        assert all(len(m) >= 3 for m in marks), (ax.get_title(), marks)
        for (a, marks_a), (b, marks_b) in itertools.combinations(
                zip([line.get_label() for line in ax.get_lines()], marks), 2):
            assert not marks_a & marks_b, (ax.get_title(), a, b, sorted(marks_a & marks_b))


def test_the_same_numbers_are_drawn_once_with_both_names_and_bands_do_not_pile_up():
    fig = _plots.plot_curves(_result())
    top, bottom = np.asarray(fig.axes).reshape(len(_plots.COMPARISONS), -1)[:, 0]
    labels = [line.get_label() for line in bottom.get_lines()]
    assert f'{NAMES[2]} = {NAMES[1]}' in labels and NAMES[4] in labels  # int8: close, not equal
    assert len(top.collections) == 2 and not bottom.collections  # bands: AdamW and Lion only


@pytest.mark.parametrize('count', range(1, 6))
@pytest.mark.parametrize('points', [5, 15, 20, 21, 200])
def test_curve_marks_are_disjoint_and_few(count, points):
    marks = []
    for k in range(count):
        start, every = _plots.curve_marks(k, count, points)
        marks.append(set(range(start, points, every)))
    assert all(marks) and all(len(m) <= _plots.MARKS_PER_CURVE + 1 for m in marks), marks
    assert sum(map(len, marks)) == len(set().union(*marks)), marks
