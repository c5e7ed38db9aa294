"""R-peaks exactly as HeartPy finds them, without the rest of ``heartpy.process``.

The reference takes its beats around ``heartpy.process(lead II, 500.0)[0]["peaklist"]`` (docs/method.md
§1.5). ``process`` spends most of its time on heart-rate-variability measures (RR cleaning, Poincaré, breathing
spectrum) that never touch that list. Only three steps do, and this module re-does exactly those, with the same
numpy operations in the same order so every comparison sees the same bits (one exception, the moving average, is
computed faster where that provably cannot change a comparison; see ``_above_thresholds``):

1. baseline shift: if the 0.1th percentile of the signal is negative, add its absolute value;
2. moving average over ``int(0.75 * fs)`` samples (``heartpy.datautils.rolling_mean``), its ends padded with the
   first/last full-window mean;
3. ``fit_peaks``: for each ``ma_perc`` in HeartPy's grid, the threshold is that moving average plus
   ``ma_perc`` % of its mean; every stretch above the threshold yields one peak (its first maximum); a first peak
   within 150 ms of the start is dropped (``calc_rr``). The grid value whose peak list has the smallest RR standard
   deviation, among those with ``rrsd > 0.1`` ms and a rate within [40, 180] bpm, wins (the first one on ties).
   No valid value: HeartPy raises ``BadSignalWarning``, and the reference drops the record.

After ``fit_peaks``, ``process`` runs ``calc_rr`` once more, which drops the (new) first peak if it too lies within
150 ms of the start. Nothing else in ``process`` changes ``peaklist`` or can raise (the later measures turn empty
inputs into NaN with a RuntimeWarning, and the breathing estimate sits in a bare ``try``), so "``process`` raised"
is exactly "``fit_peaks`` found no valid grid value".

Two HeartPy quirks are reproduced on purpose because they decide which sample is the peak:
- ``detect_peaks`` cuts the above-threshold samples at ``np.where(np.diff(peaksx) > 1)[0]``, the index of the
  *last* sample of each stretch, so each search segment is one sample late: it holds the previous stretch's last
  sample and lacks its own last one (the final segment keeps it). A segment that ends up empty gives no peak.
- the first-maximum rule (``list.index(max(...))``) on ties.

The 18 grid values are evaluated at once on an ``(18, samples)`` mask instead of 18 Python passes.
"""

from __future__ import annotations

import numpy as np

#: HeartPy ``process`` defaults, which the reference relies on.
MA_WINDOW_S = 0.75
BPM_MIN = 40
BPM_MAX = 180
MA_PERC_GRID = (5, 10, 15, 20, 25, 30, 40, 50, 60, 70, 80, 90, 100, 110, 120, 150, 200, 300)
#: ``calc_rr`` drops a first peak at or before this time (ms).
EARLY_PEAK_MS = 150.0
#: ``fit_peaks`` accepts a grid value only if its RR standard deviation exceeds this (ms).
MIN_RRSD_MS = 0.1

_EMPTY = np.zeros(0, dtype=np.int64)


def _baseline_shift(x: np.ndarray) -> np.ndarray:
    """HeartPy's moving-average detector wants a positive baseline; it lifts the signal by its 0.1th percentile."""
    bl_val = np.percentile(x, 0.1)
    return x + abs(bl_val) if bl_val < 0 else x


def _pad_ends(core: np.ndarray, n: int) -> np.ndarray:
    """``rolling_mean``'s padding of the full-window means back to ``n`` samples."""
    n_pad = int(abs(n - len(core)) / 2)
    rol_mean = np.concatenate((np.full(n_pad, core[0]), core, np.full(n_pad, core[-1])))
    if len(rol_mean) < n:
        # An even width leaves one sample short; HeartPy appends an int 0, which also promotes float32 to float64.
        rol_mean = np.append(rol_mean, 0)
    return rol_mean


def _rolling_mean(x: np.ndarray, width: int) -> np.ndarray:
    """``heartpy.datautils.rolling_mean`` bit for bit: the same strided view reduced by the same ``np.mean``."""
    return _pad_ends(np.mean(np.lib.stride_tricks.sliding_window_view(x, width), axis=1), len(x))


def _thresholds(rol_mean: np.ndarray) -> np.ndarray:
    """``detect_peaks``' threshold for every grid value, ``(grid, samples)``, with its exact scalar operations."""
    mean_perc = np.mean(rol_mean / 100)
    return rol_mean + np.array([mean_perc * p for p in MA_PERC_GRID])[:, None]


def _above_thresholds(x: np.ndarray, width: int) -> np.ndarray:
    """``x > threshold`` for every grid value, as ``(grid, samples + 1)`` with a False pad column.

    HeartPy's moving average is ``np.mean`` over a strided ``(samples, width)`` view: pairwise sums, half the cost
    of the whole detector. For float64 a running sum gives the same means to within
    ``samples**2 * eps * max|x| / width`` (the textbook bound for recursive summation); the thresholds move by at
    most 4x that (the mean offset adds up to 3x). If every sample clears every threshold by twice that much, no
    comparison can differ from HeartPy's and the fast mask is exact; otherwise (rare, or float32) the exact means
    are computed.
    """
    n = len(x)
    above = np.zeros((len(MA_PERC_GRID), n + 1), dtype=bool)
    if x.dtype == np.float64:
        csum = np.concatenate(([0.0], np.cumsum(x)))
        diff = x - _thresholds(_pad_ends((csum[width:] - csum[:-width]) / width, n))
        bound = 8 * n * n * np.finfo(np.float64).eps * np.max(np.abs(x)) / width
        if np.min(np.abs(diff)) > bound:
            np.greater(diff, 0, out=above[:, :n])
            return above
    np.greater(x, _thresholds(_rolling_mean(x, width)), out=above[:, :n])
    return above


def _run_starts(a: np.ndarray) -> np.ndarray:
    """Where each run of equal values in ``a`` begins."""
    return np.concatenate(([True], a[1:] != a[:-1]))[:len(a)]


def _run_ends(a: np.ndarray) -> np.ndarray:
    """Where each run of equal values in ``a`` ends."""
    return np.concatenate((a[1:] != a[:-1], [True]))[:len(a)]


def _grid_peaks(x: np.ndarray, above: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Peaks of every grid threshold at once, as ``(grid row, sample)`` pairs sorted by row then sample.

    ``above`` rows are laid end to end with a False pad column after each, so runs of above-threshold samples never
    cross a row and one ``flatnonzero`` serves all 18 thresholds.
    """
    width = above.shape[1]
    flat = np.flatnonzero(above)
    if flat.size == 0:
        return _EMPTY, _EMPTY
    row = flat // width
    gap = np.diff(flat) > 1                               # a stretch ends where the next index is not adjacent
    stretch = np.cumsum(np.concatenate(([True], gap)))
    # HeartPy's one-sample-late segments: a stretch's last sample belongs to the next segment of its row.
    segment = stretch + (_run_ends(stretch) & ~_run_ends(row))
    seg_start = np.flatnonzero(_run_starts(segment))
    values = x[flat % width]
    seg_max = np.maximum.reduceat(values, seg_start)
    at_max = np.flatnonzero(values == np.repeat(seg_max, np.diff(seg_start, append=flat.size)))
    first = at_max[_run_starts(segment[at_max])]
    return row[first], flat[first] % width


def _early(peaks: np.ndarray, first: np.ndarray, fs: float) -> np.ndarray:
    """``calc_rr``: a row's first peak within 150 ms may be the tail of a beat cut by the record's start."""
    return first & (peaks <= (fs / 1000.0) * EARLY_PEAK_MS)


def _rrsd(peaks: np.ndarray, fs: float) -> float:
    rr = (np.diff(peaks) / fs) * 1000.0
    return np.std(rr) if len(rr) > 0 else np.inf


def find_r_peaks(lead_ii_normalized: np.ndarray, fs: float = 500) -> np.ndarray:
    """R-peak sample indices of one lead, identical to ``heartpy.process(lead, fs)[0]["peaklist"]``.

    ``lead_ii_normalized``: ``(samples,)`` float, the filtered lead II after per-lead min-max to [-1, 1] (the
    reference's input; any float dtype works and is kept, as in HeartPy, so float32 and float64 inputs each match
    HeartPy on the same array). Returns int64 indices, ascending; empty where HeartPy would raise
    (``BadSignalWarning``: no grid value gives a plausible, irregular-enough rhythm), because the reference then
    drops the record and our callers turn an empty list into ``no_beats``. The list still holds the peaks HeartPy
    later marks as rejected, since the reference uses them too.
    """
    x = np.array(lead_ii_normalized)  # a contiguous copy, as rolling_mean makes one
    width = int(MA_WINDOW_S * fs)
    if x.ndim != 1 or len(x) < width:
        return _EMPTY
    x = _baseline_shift(x)
    rows, peaks = _grid_peaks(x, _above_thresholds(x, width))
    keep = ~_early(peaks, _run_starts(rows), fs)
    rows, peaks = rows[keep], peaks[keep]
    bpm = (np.bincount(rows, minlength=len(MA_PERC_GRID)) / (len(x) / fs)) * 60
    bounds = np.searchsorted(rows, np.arange(len(MA_PERC_GRID) + 1))
    rrsd_of: dict[bytes, float] = {}
    best, best_rrsd = None, np.inf
    for row in np.flatnonzero((BPM_MIN <= bpm) & (bpm <= BPM_MAX)):  # in grid order: the first minimum wins
        candidate = peaks[bounds[row]:bounds[row + 1]]
        key = candidate.tobytes()
        if key not in rrsd_of:  # many grid values give the same list
            rrsd_of[key] = _rrsd(candidate, fs)
        if rrsd_of[key] > MIN_RRSD_MS and (best is None or rrsd_of[key] < best_rrsd):
            best, best_rrsd = candidate, rrsd_of[key]
    if best is None:
        return _EMPTY
    # process() runs calc_rr once more on the chosen list.
    return best[~_early(best, np.arange(len(best)) == 0, fs)].astype(np.int64)
