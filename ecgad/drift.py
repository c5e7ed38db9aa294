"""Has the scored population moved away from the one the model was calibrated on?

At model selection the threshold is the 0.95 quantile of the kept model's scores on the fold-9 normal records
(docs/method.md §3.6). The same scores say what "normal input" looks like to that model: `Calibration` keeps their
quantiles and the share of them above the threshold, and is stored in the checkpoint. A service keeps the most
recent scores it gave (`DriftWindow`) and compares them with the calibration:

- the **share flagged** anomalous against the calibration's share (about 5 % by construction): a ward with more
  sick patients raises it, and so does a broken lead or a new device;
- the **Kolmogorov-Smirnov distance** between the window's scores and the calibration distribution: any shift of
  the score distribution, up or down, including ones that move few records across the threshold.

Why KS and its critical value rather than a fixed cut (PSI > 0.25, say): a window of a few dozen records has a
large distance by chance alone, a window of thousands a small one. The two-sample critical value at a small
``alpha`` (`ks_threshold`) is what chance alone exceeds with probability ``alpha``, for the window and calibration
sizes at hand, so one alarm rule holds from the first records of a new deployment to a full window.

Everything here is numpy on score arrays: no Ray, no model.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

#: Quantile levels stored in a calibration: every percentile, enough to draw the distribution and to compare a
#: window of any size with it.
QUANTILE_LEVELS = np.linspace(0.0, 1.0, 101)
#: Probability that chance alone (an unchanged population) raises the drift alarm on one reading.
DRIFT_ALPHA = 0.001
#: Scores a window holds by default (the most recent ones); older scores drop out.
DEFAULT_WINDOW = 1000
#: Fewer scores than this give no reading (the distance of a handful of records says nothing).
MIN_RECORDS = 10


@dataclass(frozen=True)
class Calibration:
    """The score distribution of the calibration set (fold-9 normals): ``quantiles`` at `QUANTILE_LEVELS`,
    ``flagged_share`` above the threshold, and ``n`` records."""

    quantiles: tuple[float, ...]
    flagged_share: float
    n: int

    @classmethod
    def from_scores(cls, scores: Iterable[float], threshold: float) -> Calibration:
        """The calibration of these normal-record scores against ``threshold`` (the rule ``score > threshold``)."""
        s = np.asarray(list(scores), dtype=np.float64)
        if s.size == 0 or not np.isfinite(s).all():
            raise ValueError("a calibration needs at least one score, all finite")
        flagged = float(np.mean(s > threshold)) if math.isfinite(threshold) else math.nan
        return cls(tuple(float(q) for q in np.quantile(s, QUANTILE_LEVELS)), flagged, int(s.size))

    def to_dict(self) -> dict[str, Any]:
        return {"quantile_levels": [round(float(q), 4) for q in QUANTILE_LEVELS], "quantiles": list(self.quantiles),
                "flagged_share": self.flagged_share if math.isfinite(self.flagged_share) else None, "n": self.n}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Calibration:
        if len(data["quantiles"]) != len(QUANTILE_LEVELS):
            raise ValueError(f"a calibration holds {len(QUANTILE_LEVELS)} quantiles, got {len(data['quantiles'])}")
        share = data.get("flagged_share")
        return cls(tuple(float(q) for q in data["quantiles"]), math.nan if share is None else float(share),
                   int(data["n"]))

    def cdf(self, scores: np.ndarray) -> np.ndarray:
        """The calibration's distribution function at ``scores`` (linear between stored quantiles; 0 below the
        lowest calibration score, 1 above the highest)."""
        return np.interp(scores, np.asarray(self.quantiles), QUANTILE_LEVELS, left=0.0, right=1.0)


def ks_distance(scores: np.ndarray, calibration: Calibration) -> float:
    """The largest gap between the empirical distribution of ``scores`` and the calibration's (0 to 1)."""
    s = np.sort(np.asarray(scores, dtype=np.float64))
    n = s.size
    reference = calibration.cdf(s)
    above = np.arange(1, n + 1) / n - reference
    below = reference - np.arange(0, n) / n
    return float(max(above.max(), below.max()))


def ks_threshold(n: int, n_calibration: int, alpha: float = DRIFT_ALPHA) -> float:
    """The two-sample KS critical value: chance alone exceeds it with probability ``alpha`` when ``n`` scores and
    the ``n_calibration`` calibration scores come from one distribution."""
    return math.sqrt(-0.5 * math.log(alpha / 2)) * math.sqrt((n + n_calibration) / (n * n_calibration))


@dataclass(frozen=True)
class DriftReading:
    """One comparison of a window with the calibration; ``drifted`` when the distance passes its threshold."""

    records: int
    ks: float
    ks_threshold: float
    flagged_share: float
    calibration_flagged_share: float

    @property
    def drifted(self) -> bool:
        return self.ks > self.ks_threshold


class DriftWindow:
    """The most recent ``size`` scores and labels of one model version, compared with its calibration."""

    def __init__(self, calibration: Calibration, size: int = DEFAULT_WINDOW, min_records: int = MIN_RECORDS) -> None:
        self.calibration = calibration
        self.min_records = min_records
        self._scores: deque[float] = deque(maxlen=size)
        self._flagged: deque[bool] = deque(maxlen=size)

    def add(self, scores: Iterable[float], flagged: Iterable[bool]) -> None:
        self._scores.extend(float(s) for s in scores)
        self._flagged.extend(bool(f) for f in flagged)

    def reading(self) -> DriftReading | None:
        """The window against the calibration; None while it holds fewer than ``min_records`` scores."""
        n = len(self._scores)
        if n < self.min_records:
            return None
        scores = np.fromiter(self._scores, dtype=np.float64, count=n)
        return DriftReading(n, ks_distance(scores, self.calibration), ks_threshold(n, self.calibration.n),
                            float(np.mean(np.fromiter(self._flagged, dtype=bool, count=n))),
                            self.calibration.flagged_share)
