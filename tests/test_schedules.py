"""adamw_to_lion, and the deprecated warmup_cosine_schedule (a thin wrapper over optax)."""

import numpy as np
import optax
import pytest

import lion_optax
from lion_optax._src import schedules


def test_paper_vit_pair():
    hp = lion_optax.adamw_to_lion(1e-3, 1.0, factor=10)
    assert hp.learning_rate == pytest.approx(1e-4) and hp.weight_decay == pytest.approx(10.0)
    assert hp.learning_rate * hp.weight_decay == pytest.approx(1e-3 * 1.0)


def test_default_factor_is_three_and_builds_lion():
    hp = lion_optax.adamw_to_lion(3e-4, 0.1)
    assert hp.learning_rate == pytest.approx(1e-4) and hp.weight_decay == pytest.approx(0.3)
    lion_optax.lion(**hp._asdict())


@pytest.mark.optax_promotion  # optax's schedules: 0.1 * count, count int32
def test_schedule_keeps_its_shape():
    adamw = optax.schedules.warmup_cosine_decay_schedule(1e-5, 1e-3, 10, 100, 1e-4)
    lion = lion_optax.adamw_to_lion(adamw, 0.1, factor=5).learning_rate
    steps = np.arange(0, 101, 7)
    np.testing.assert_allclose([lion(t) for t in steps], [adamw(t) / 5 for t in steps], rtol=1e-6)


@pytest.mark.parametrize('factor', [0.5, 1000.0, -3.0])
def test_factor_outside_range_is_refused(factor):
    with pytest.raises(ValueError, match='factor='):
        lion_optax.adamw_to_lion(1e-3, 0.1, factor=factor)


def test_warmup_cosine_values_and_its_deprecation():
    with pytest.warns(DeprecationWarning, match='optax.schedules.warmup_cosine_decay_schedule'):
        make = lion_optax.warmup_cosine_schedule
    schedule = make(1e-4, 200, warmup_fraction=0.1, final_fraction=0.1)
    assert float(schedule(0)) == 0.0
    assert float(schedule(10)) == pytest.approx(0.5e-4)
    assert float(schedule(20)) == pytest.approx(1e-4)
    assert float(schedule(200)) == pytest.approx(1e-5)
    values = [float(schedule(t)) for t in range(20, 201)]
    assert all(a >= b for a, b in zip(values, values[1:]))  # decays monotonically


@pytest.mark.parametrize(
    'kwargs, message',
    [
        (dict(peak_learning_rate=0.0, total_steps=10), 'peak_learning_rate=0.0'),
        (dict(peak_learning_rate=1e-4, total_steps=0), 'total_steps must be a positive int'),
        (dict(peak_learning_rate=1e-4, total_steps=10, warmup_fraction=1.0), 'leaves no steps'),
        (dict(peak_learning_rate=1e-4, total_steps=10, final_fraction=2.0), 'final_fraction=2.0'),
    ],
)
def test_warmup_cosine_refuses_bad_input(kwargs, message):
    with pytest.raises(ValueError, match=message):
        schedules.warmup_cosine_schedule(**kwargs)
