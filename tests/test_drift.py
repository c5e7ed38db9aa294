"""The drift math of `ecgad.drift`: a calibration survives its round trip, chance stays under the alarm, shifts do
not, and the window forgets."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from ecgad.drift import Calibration, DriftWindow, ks_distance, ks_threshold


@pytest.fixture(scope="module")
def calibration() -> Calibration:
    scores = np.random.default_rng(0).lognormal(0.0, 0.3, size=2000)
    return Calibration.from_scores(scores, threshold=float(np.quantile(scores, 0.95)))


def test_calibration_round_trips_through_json(calibration):
    again = Calibration.from_dict(json.loads(json.dumps(calibration.to_dict())))
    assert again == calibration
    assert again.flagged_share == pytest.approx(0.05, abs=0.001)
    assert again.n == 2000


def test_uncalibrated_threshold_has_no_flagged_share():
    calibration = Calibration.from_scores([1.0, 2.0, 3.0], threshold=math.nan)
    assert math.isnan(Calibration.from_dict(json.loads(json.dumps(calibration.to_dict()))).flagged_share)


@pytest.mark.parametrize("bad", [[], [1.0, math.nan], [math.inf]])
def test_calibration_refuses_empty_or_non_finite_scores(bad):
    with pytest.raises(ValueError):
        Calibration.from_scores(bad, threshold=1.0)


def test_ks_distance_of_the_same_population_is_small_and_of_a_shifted_one_large(calibration):
    rng = np.random.default_rng(1)
    same = rng.lognormal(0.0, 0.3, size=500)
    shifted = rng.lognormal(0.3, 0.3, size=500)
    assert ks_distance(same, calibration) < ks_threshold(500, calibration.n)
    assert ks_distance(shifted, calibration) > ks_threshold(500, calibration.n)
    assert ks_distance(np.full(10, 100.0), calibration) == pytest.approx(1.0)   # all beyond the calibration


def test_ks_threshold_shrinks_with_the_window():
    assert ks_threshold(20, 2000) > ks_threshold(200, 2000) > ks_threshold(2000, 2000)
    assert ks_threshold(100, 100, alpha=0.05) == pytest.approx(1.358 * math.sqrt(2 / 100), rel=1e-3)


def test_chance_alone_rarely_raises_the_alarm(calibration):
    """200 windows of 50 records drawn from the calibration population: at alpha 0.001, (almost) none drift."""
    rng = np.random.default_rng(2)
    alarms = 0
    for _ in range(200):
        window = DriftWindow(calibration, size=50)
        scores = rng.lognormal(0.0, 0.3, size=50)
        window.add(scores, scores > 1.5)
        alarms += window.reading().drifted
    assert alarms <= 2


def test_window_reads_only_once_full_enough_and_forgets_old_scores(calibration):
    rng = np.random.default_rng(3)
    window = DriftWindow(calibration, size=100, min_records=10)
    window.add([1.0] * 9, [False] * 9)
    assert window.reading() is None
    noisy = rng.lognormal(1.0, 0.3, size=100)   # a shifted population, every record flagged
    window.add(noisy, [True] * 100)
    reading = window.reading()
    assert reading.drifted and reading.records == 100 and reading.flagged_share == 1.0
    assert reading.calibration_flagged_share == calibration.flagged_share
    normal = rng.lognormal(0.0, 0.3, size=100)
    window.add(normal, normal > 1.5)   # the shifted scores have left the window
    assert not window.reading().drifted
