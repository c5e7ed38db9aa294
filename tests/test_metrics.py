"""Metrics against hand-computed toy cases, degenerate inputs, and the bootstrap."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from ecgad.metrics import (
    _PooledAUROCBootstrap,
    bootstrap_ci,
    calibrate_threshold,
    dice_iou,
    evaluate_scores,
    localization_dice_iou,
    pooled_point_auroc,
    record_auprc,
    record_auroc,
    sensitivity_specificity,
)

LABELS = [0, 0, 1, 1]
SCORES = [0.1, 0.4, 0.35, 0.8]


def test_record_auroc_and_auprc_by_hand():
    # Pairs (abnormal, normal): (0.35 > 0.1), (0.35 < 0.4), (0.8 > 0.1), (0.8 > 0.4) -> 3/4.
    assert record_auroc(LABELS, SCORES) == pytest.approx(0.75)
    # Ranked 0.8(+), 0.4(-), 0.35(+), 0.1(-): AP = 1/2 * 1 + 1/2 * 2/3.
    assert record_auprc(LABELS, SCORES) == pytest.approx(0.5 + 1 / 3)


def test_sensitivity_specificity_uses_strictly_greater():
    assert sensitivity_specificity(LABELS, SCORES, 0.375) == (0.5, 0.5)
    # A score equal to the threshold is not flagged (Scores.pred_label is score > threshold).
    assert sensitivity_specificity(LABELS, SCORES, 0.8) == (0.0, 1.0)


def test_calibrate_threshold():
    assert calibrate_threshold(np.arange(101.0)) == pytest.approx(95.0)
    assert calibrate_threshold(np.arange(101.0), quantile=0.5) == pytest.approx(50.0)
    with pytest.raises(ValueError, match="without normal scores"):
        calibrate_threshold([])
    with pytest.raises(ValueError, match="NaN"):
        calibrate_threshold([1.0, math.nan])


def test_pooled_point_auroc_pools_every_point_of_every_record():
    maps = [np.array([[0.9, 0.2, 0.1]]), np.array([[0.3, 0.8, 0.2]])]
    masks = [np.array([[1, 0, 0]]), np.array([[0, 1, 1]])]
    # Positives 0.9, 0.8, 0.2 against negatives 0.2, 0.1, 0.3: 3 + 3 + (1 + 0.5 tie) = 7.5 of 9 pairs.
    assert pooled_point_auroc(maps, masks) == pytest.approx(7.5 / 9)
    # Not the mean of per-record AUROCs (1.0 and 0.75).
    assert pooled_point_auroc(maps, masks) != pytest.approx(0.875)


def test_dice_iou_by_hand():
    assert dice_iou(np.array([[0.9, 0.8, 0.1, 0.0]]), np.array([[0, 1, 1, 0]]), 0.5) == (0.5, pytest.approx(1 / 3))
    assert dice_iou(np.zeros((2, 3)), np.zeros((2, 3)), 0.5) == (1.0, 1.0)
    assert dice_iou(np.ones((2, 3)), np.zeros((2, 3)), 0.5) == (0.0, 0.0)
    dice, iou = localization_dice_iou([np.ones((1, 2)), np.array([[0.9, 0.1]])],
                                      [np.zeros((1, 2)), np.array([[1, 0]])], 0.5)
    np.testing.assert_allclose(dice, [1.0])          # the record without annotated points is left out
    np.testing.assert_allclose(iou, [1.0])


def test_one_class_gives_nan_not_an_sklearn_error():
    assert math.isnan(record_auroc([0, 0, 0], [0.1, 0.2, 0.3]))
    assert math.isnan(record_auprc([1, 1], [0.1, 0.2]))
    assert math.isnan(pooled_point_auroc([np.zeros((2, 3))], [np.zeros((2, 3))]))
    sens, spec = sensitivity_specificity([0, 0], [0.1, 0.9], 0.5)
    assert math.isnan(sens) and spec == 0.5


def test_malformed_inputs_raise_clearly():
    with pytest.raises(ValueError, match="equal length"):
        record_auroc([0, 1], [0.1])
    with pytest.raises(ValueError, match="0 \\(normal\\) or 1"):
        record_auroc([0, 2], [0.1, 0.2])
    with pytest.raises(ValueError, match="NaN or infinite"):
        record_auroc([0, 1], [0.1, math.nan])
    with pytest.raises(ValueError, match="map shape"):
        pooled_point_auroc([np.zeros((2, 3))], [np.zeros((2, 4))])


def test_pooled_bootstrap_matches_sklearn_on_a_resample():
    rng = np.random.default_rng(1)
    maps = [np.round(rng.random((2, n)), 1) for n in (5, 7, 4, 6)]       # rounding makes ties
    masks = [rng.random(m.shape) < 0.4 for m in maps]
    stat = _PooledAUROCBootstrap(maps, masks)
    idx = np.array([0, 0, 2, 3])
    expected = roc_auc_score(np.concatenate([masks[i].ravel() for i in idx]),
                             np.concatenate([maps[i].ravel() for i in idx]))
    assert stat(idx) == pytest.approx(expected)
    assert stat(np.arange(4)) == pytest.approx(pooled_point_auroc(maps, masks))


def test_bootstrap_is_seeded_and_brackets_the_estimate():
    rng = np.random.default_rng(0)
    y = np.r_[np.zeros(40), np.ones(40)].astype(int)
    s = rng.normal(size=80) + y
    stat = lambda i: record_auroc(y[i], s[i])  # noqa: E731
    ci = bootstrap_ci(stat, 80, n_boot=200, seed=3)
    assert ci == bootstrap_ci(stat, 80, n_boot=200, seed=3)
    assert ci[0] < record_auroc(y, s) < ci[1]
    assert all(math.isnan(v) for v in bootstrap_ci(lambda i: math.nan, 5, n_boot=10))


def test_evaluate_scores_is_json_ready_with_cis():
    rng = np.random.default_rng(0)
    labels = np.r_[np.zeros(10), np.ones(10)].astype(int)
    scores = rng.random(20) + labels
    maps = [rng.random((12, 50)) + (np.arange(50) >= 25) * label for label in labels]
    masks = [np.broadcast_to((np.arange(50) >= 25) & bool(label), (12, 50)) for label in labels]
    out = evaluate_scores(labels, scores, threshold=1.0, maps=maps, masks=masks, n_boot=50)
    json.dumps(out, allow_nan=False)
    assert out["n_abnormal"] == 10 and out["n_annotated"] == 10 and out["warnings"] == []
    for key in ("record_auroc", "record_auprc", "sensitivity", "specificity", "point_auroc", "dice", "iou"):
        lo, hi = out[key]["ci95"]
        assert lo <= out[key]["value"] <= hi, key
    assert out["record_auroc"]["value"] == pytest.approx(record_auroc(labels, scores))
    assert out["point_auroc"]["value"] == pytest.approx(pooled_point_auroc(maps, masks))
    # The map threshold is calibrated on the normal records' points.
    assert out["map_threshold"] == pytest.approx(np.quantile(np.concatenate([m.ravel() for m in maps[:10]]), 0.95))


def test_evaluate_scores_degenerate_gives_none_and_warnings():
    out = evaluate_scores([0, 0, 0], [0.1, 0.2, 0.3], threshold=0.25, n_boot=20)
    json.dumps(out, allow_nan=False)
    assert out["record_auroc"] == {"value": None, "ci95": [None, None]}
    assert out["sensitivity"]["value"] is None and out["specificity"]["value"] == pytest.approx(2 / 3)
    assert any("one class" in w for w in out["warnings"])
    with pytest.raises(ValueError, match="both maps and masks"):
        evaluate_scores([0, 1], [0.1, 0.2], 0.5, maps=[np.zeros((1, 2))] * 2)
