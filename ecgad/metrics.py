"""Detection and localization metrics, with record-level bootstrap confidence intervals.

Conventions (docs/method.md §4.5): label 1 = abnormal = the positive class; a higher score means more anomalous; a
record is called anomalous when ``score > threshold`` (the rule ``Scores.pred_label`` uses).

Point level, the paper reports **one pooled AUROC over all points x leads x records** (``test.py:225``), not a mean
of per-record AUROCs; ``pooled_point_auroc`` does exactly that. Dice and IoU are not in the paper (its follow-up
reports Dice); they are per-record overlaps of the thresholded map with the mask, averaged over records.

Degenerate inputs: a metric that is undefined on its input (an AUROC when only one class is present, a sensitivity
with no abnormal record, a Dice over records without annotated points) is **NaN**, never an exception raised from
inside scikit-learn, because a bootstrap resample or a small validation fold may legitimately lack a class.
Malformed inputs (mismatched lengths, non-finite scores, non-binary labels) raise ``ValueError`` with the problem.
``evaluate_scores`` turns NaN into ``None`` (JSON has no NaN) and says why in ``warnings``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score

#: Confidence level of every interval ecgad reports.
CI_LEVEL = 0.95


# -- input checks -------------------------------------------------------------------------------------------------

def _labels_scores(labels, scores) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(labels)
    s = np.asarray(scores, dtype=np.float64)
    if y.ndim != 1 or s.ndim != 1 or y.shape != s.shape:
        raise ValueError(f"labels and scores must be 1-D and of equal length, got {y.shape} and {s.shape}")
    if not np.isin(y, (0, 1)).all():
        raise ValueError(f"labels must be 0 (normal) or 1 (abnormal), got values {np.unique(y)[:10]}")
    if not np.isfinite(s).all():
        raise ValueError(f"{int((~np.isfinite(s)).sum())} scores are NaN or infinite")
    return y.astype(np.int8), s


def _maps_masks(maps: Sequence[np.ndarray], masks: Sequence[np.ndarray]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per-record float maps and boolean masks of equal shapes (records may differ in length)."""
    if len(maps) != len(masks):
        raise ValueError(f"{len(maps)} maps but {len(masks)} masks")
    out_maps, out_masks = [], []
    for i, (m, k) in enumerate(zip(maps, masks)):
        m = np.asarray(m, dtype=np.float64)
        k = np.asarray(k)
        if m.shape != k.shape:
            raise ValueError(f"record {i}: map shape {m.shape} != mask shape {k.shape}")
        if not np.isfinite(m).all():
            raise ValueError(f"record {i}: the anomaly map has NaN or infinite values")
        out_maps.append(m)
        out_masks.append(k.astype(bool))
    return out_maps, out_masks


def _two_classes(y: np.ndarray) -> bool:
    return 0 < int(y.sum()) < y.size


# -- record level ---------------------------------------------------------------------------------------------------

def record_auroc(labels, scores) -> float:
    """Detection AUROC over records; NaN when only one class is present."""
    y, s = _labels_scores(labels, scores)
    return float(roc_auc_score(y, s)) if _two_classes(y) else math.nan


def record_auprc(labels, scores) -> float:
    """Detection AUPRC (average precision, abnormal = positive); NaN when only one class is present."""
    y, s = _labels_scores(labels, scores)
    return float(average_precision_score(y, s)) if _two_classes(y) else math.nan


def sensitivity_specificity(labels, scores, threshold: float) -> tuple[float, float]:
    """``(sensitivity, specificity)`` of the rule ``score > threshold``; each NaN when its class is absent."""
    y, s = _labels_scores(labels, scores)
    called = [(s > threshold)[y == 1], (s <= threshold)[y == 0]]   # abnormal called abnormal, normal called normal
    return tuple(float(right.mean()) if right.size else math.nan for right in called)


def calibrate_threshold(normal_scores, quantile: float = 0.95) -> float:
    """The decision threshold: the ``quantile`` of scores of held-out *normal* records.

    Calibrating on normals only is what an anomaly detector can do without labelled anomalies: at 0.95 about 5 %
    of normal records are flagged (the specificity target), whatever the anomalies look like.
    """
    s = np.asarray(normal_scores, dtype=np.float64).ravel()
    if s.size == 0:
        raise ValueError("cannot calibrate a threshold without normal scores")
    if not np.isfinite(s).all():
        raise ValueError(f"{int((~np.isfinite(s)).sum())} normal scores are NaN or infinite")
    if not 0.0 < quantile < 1.0:
        raise ValueError(f"quantile must lie in (0, 1), got {quantile}")
    return float(np.quantile(s, quantile))


# -- point level ----------------------------------------------------------------------------------------------------

def pooled_point_auroc(maps: Sequence[np.ndarray], masks: Sequence[np.ndarray]) -> float:
    """The paper's localization AUROC: one ROC over every point of every lead of every record, pooled.

    ``maps[i]`` and ``masks[i]`` are ``(leads, samples)`` for record ``i`` (records may differ in length). Crop
    them to where the model scores (the paper uses samples 100..4900) before calling. NaN when the pooled points
    hold only one class.
    """
    maps, masks = _maps_masks(maps, masks)
    y = np.concatenate([k.ravel() for k in masks])
    if not _two_classes(y):
        return math.nan
    return float(roc_auc_score(y, np.concatenate([m.ravel() for m in maps])))


def dice_iou(anomaly_map: np.ndarray, mask: np.ndarray, threshold: float) -> tuple[float, float]:
    """Overlap of ``anomaly_map > threshold`` with a boolean ``mask`` of one record: ``(Dice, IoU)``.

    When both the prediction and the mask are empty the overlap is perfect (1, 1): there was nothing to find and
    nothing was flagged.
    """
    (m,), (k,) = _maps_masks([anomaly_map], [mask])
    pred = m > threshold
    inter = int((pred & k).sum())
    total = int(pred.sum() + k.sum())
    if total == 0:
        return 1.0, 1.0
    return 2.0 * inter / total, inter / (total - inter)


def localization_dice_iou(maps: Sequence[np.ndarray], masks: Sequence[np.ndarray],
                          threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Per-record Dice and IoU at ``threshold``, for the records whose mask marks at least one point.

    Records without annotated points are left out: their overlap only measures false alarms, which specificity
    and the pooled AUROC already cover, and averaging their trivial 0-or-1 values in would hide the quality of
    the localization of real anomalies.
    """
    maps, masks = _maps_masks(maps, masks)
    pairs = [dice_iou(m, k, threshold) for m, k in zip(maps, masks) if k.any()]
    arr = np.asarray(pairs, dtype=np.float64).reshape(-1, 2)
    return arr[:, 0], arr[:, 1]


class _PooledAUROCBootstrap:
    """The pooled point AUROC of a resample of records, without re-sorting millions of points per resample.

    With ``A[r, s]`` = the number of (positive point of record r, negative point of record s) pairs ranked
    correctly (ties count 1/2), a resample that draws record r ``c[r]`` times has pooled AUROC
    ``c.A.c / ((c.P)(c.N))`` (P, N: positive and negative point counts per record). ``A`` is built once by one
    ``searchsorted`` of all positive points per record; each resample then costs O(records^2).
    """

    def __init__(self, maps: list[np.ndarray], masks: list[np.ndarray]) -> None:
        n = len(maps)
        pos_vals = [m[k] for m, k in zip(maps, masks)]
        pos_all = np.concatenate(pos_vals)
        pos_rec = np.repeat(np.arange(n), [v.size for v in pos_vals])
        self.pos = np.array([v.size for v in pos_vals], dtype=np.float64)
        self.neg = np.array([(~k).sum() for k in masks], dtype=np.float64)
        self.pairs = np.zeros((n, n))
        for s, (m, k) in enumerate(zip(maps, masks)):
            neg_sorted = np.sort(m[~k])
            below = np.searchsorted(neg_sorted, pos_all, side="left")
            below_or_tied = np.searchsorted(neg_sorted, pos_all, side="right")
            self.pairs[:, s] = np.bincount(pos_rec, weights=0.5 * (below + below_or_tied), minlength=n)

    def __call__(self, idx: np.ndarray) -> float:
        c = np.bincount(idx, minlength=self.pos.size).astype(np.float64)
        denom = float(c @ self.pos) * float(c @ self.neg)
        return float(c @ self.pairs @ c / denom) if denom > 0 else math.nan


# -- bootstrap ------------------------------------------------------------------------------------------------------

def bootstrap_ci(statistic: Callable[[np.ndarray], float], n_records: int, *, n_boot: int = 1000, seed: int = 0,
                 level: float = CI_LEVEL) -> tuple[float, float]:
    """Percentile bootstrap interval of ``statistic(indices)`` over resamples of records (with replacement).

    Resampling *records* (not points) respects that points of one record are not independent. Resamples on which
    the statistic is undefined (NaN, e.g. a resample with one class only) are dropped; the interval is
    ``(nan, nan)`` when fewer than half of them are usable. Seeded, so a report is reproducible.
    """
    if n_records < 1:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    values = np.array([statistic(rng.integers(0, n_records, n_records)) for _ in range(n_boot)], dtype=np.float64)
    values = values[np.isfinite(values)]
    if values.size < max(1, n_boot // 2):
        return math.nan, math.nan
    tail = (1.0 - level) / 2.0
    lo, hi = np.quantile(values, [tail, 1.0 - tail])
    return float(lo), float(hi)


# -- everything at once ----------------------------------------------------------------------------------------------

def _json_number(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def _entry(value: float, ci: tuple[float, float]) -> dict:
    return {"value": _json_number(value), "ci95": [_json_number(ci[0]), _json_number(ci[1])]}


def evaluate_scores(labels, scores, threshold: float, maps: Sequence[np.ndarray] | None = None,
                    masks: Sequence[np.ndarray] | None = None, *, map_threshold: float | None = None,
                    quantile: float = 0.95, n_boot: int = 1000, seed: int = 0) -> dict:
    """All detection (and, given maps and masks, localization) metrics with bootstrap 95 % CIs, JSON-ready.

    ``labels``/``scores`` are per record; ``maps``/``masks`` per record too, aligned with them, ``(leads, samples)``
    and cropped to where the model scores. Dice/IoU need a point threshold: ``map_threshold``, or else the
    ``quantile`` of the map values of the normal records (calibrated on normals like the record threshold). Every
    metric is ``{"value", "ci95": [lo, hi]}``; undefined values are ``None`` with the reason in ``warnings``.
    """
    y, s = _labels_scores(labels, scores)
    n = int(y.size)
    warnings: list[str] = []
    if not _two_classes(y):
        warnings.append(f"only one class among {n} records: AUROC and AUPRC are undefined")

    def ci(stat: Callable[[np.ndarray], float]) -> tuple[float, float]:
        return bootstrap_ci(stat, n, n_boot=n_boot, seed=seed)

    sens, spec = sensitivity_specificity(y, s, threshold)
    result: dict = {
        "n_records": n, "n_abnormal": int(y.sum()), "n_normal": int(n - y.sum()),
        "threshold": _json_number(threshold),
        "record_auroc": _entry(record_auroc(y, s), ci(lambda i: record_auroc(y[i], s[i]))),
        "record_auprc": _entry(record_auprc(y, s), ci(lambda i: record_auprc(y[i], s[i]))),
        "sensitivity": _entry(sens, ci(lambda i: sensitivity_specificity(y[i], s[i], threshold)[0])),
        "specificity": _entry(spec, ci(lambda i: sensitivity_specificity(y[i], s[i], threshold)[1])),
    }
    if maps is not None and masks is not None:
        result.update(_localization(y, maps, masks, map_threshold, quantile, ci, warnings))
    elif maps is not None or masks is not None:
        raise ValueError("localization metrics need both maps and masks")
    result["bootstrap"] = {"n_boot": n_boot, "seed": seed, "level": CI_LEVEL,
                           "method": "percentile; records resampled with replacement"}
    result["warnings"] = warnings
    return result


def _localization(y: np.ndarray, maps, masks, map_threshold: float | None, quantile: float,
                  ci: Callable, warnings: list[str]) -> dict:
    maps, masks = _maps_masks(maps, masks)
    if len(maps) != y.size:
        raise ValueError(f"{len(maps)} maps for {y.size} records")
    point_auroc = pooled_point_auroc(maps, masks)
    if not math.isfinite(point_auroc):
        warnings.append("the masks hold only one class of points: the pooled point AUROC is undefined")
    out = {"point_auroc": _entry(point_auroc, ci(_PooledAUROCBootstrap(maps, masks)))}

    if map_threshold is None:
        normal_maps = [m.ravel() for m, label in zip(maps, y) if label == 0]
        if normal_maps:
            map_threshold = calibrate_threshold(np.concatenate(normal_maps), quantile)
        else:
            warnings.append("no map threshold given and no normal record to calibrate one: Dice/IoU undefined")
    annotated = np.array([k.any() for k in masks], dtype=bool)
    out["map_threshold"] = _json_number(map_threshold)
    out["n_annotated"] = int(annotated.sum())
    if not annotated.any():
        warnings.append("no record has annotated points: Dice/IoU undefined")
    if map_threshold is None or not annotated.any():
        out["dice"] = out["iou"] = _entry(math.nan, (math.nan, math.nan))
        return out
    dice, iou = localization_dice_iou(maps, masks, map_threshold)
    # Bootstrap over the annotated records only: map each resample of all records onto their Dice values.
    position = np.cumsum(annotated) - 1

    for name, values in (("dice", dice), ("iou", iou)):
        def stat(idx: np.ndarray, values: np.ndarray = values) -> float:
            chosen = idx[annotated[idx]]
            return float(values[position[chosen]].mean()) if chosen.size else math.nan
        out[name] = _entry(float(values.mean()), ci(stat))
    return out
