"""Anomaly maps: smoothing along time, stitching window maps into a record map, and the way back to the input's axis.

A window map covers samples 100..4900 of its 10 s window at the model's 500 Hz (docs/method.md §4.4); a record is
scored in overlapping windows (§1.6), at whatever rate it came in (D6), and its map is given on its own time axis,
so that it lies over the signal the user sent.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.ndimage import gaussian_filter1d

from ecgad.config import PrepConfig

#: Gaussian smoothing of the anomaly map along time, per lead (samples at 500 Hz; 30 ms).
MAP_SIGMA = 15.0


def smooth(maps: np.ndarray) -> np.ndarray:
    """Maps ``(..., leads, samples)`` smoothed along time by a Gaussian of sigma `MAP_SIGMA`, in one call: for each
    lead that is what the published protocol's per-lead ``scipy.ndimage.gaussian_filter`` computes (a 1-D input
    dispatches to ``gaussian_filter1d``)."""
    return gaussian_filter1d(maps, MAP_SIGMA, axis=-1)


def stitch_window_maps(maps: Sequence[np.ndarray], offsets: Sequence[int], n_samples: int,
                       cfg: PrepConfig = PrepConfig()) -> np.ndarray:
    """Window maps ``(12, 4800)`` -> one ``(12, n_samples)`` map on the record's 500 Hz axis.

    Window map sample ``i`` is record sample ``offset + 100 + i``. Where windows overlap their maps are averaged;
    samples no window scores (the first and last 100, and any gap left by a skipped window) take the value of the
    nearest scored sample at the ends and a linear blend of the two nearest inside.
    """
    total = np.zeros((maps[0].shape[0], n_samples))
    count = np.zeros(n_samples)
    for window_map, offset in zip(maps, offsets, strict=True):
        start = int(offset) + cfg.global_start
        total[:, start:start + window_map.shape[1]] += window_map
        count[start:start + window_map.shape[1]] += 1
    covered = np.flatnonzero(count)
    averaged = total[:, covered] / count[covered]
    every = np.arange(n_samples)
    return np.stack([np.interp(every, covered, lead) for lead in averaged]).astype(np.float32)


def to_source_axis(anomaly_map: np.ndarray, fs: float, source_fs: float, source_samples: int) -> np.ndarray:
    """A ``(12, n)`` map at ``fs`` (500 Hz) -> ``(12, source_samples)`` at ``source_fs``, by linear interpolation.

    Source sample ``i`` is at time ``i / source_fs``, i.e. at position ``i * fs / source_fs`` on the model axis
    (the resampling in `ecgad.preprocess` keeps sample 0 at time 0). Linear interpolation rather than a polyphase
    resampler because the map is non-negative and already smooth (Gaussian, sigma 30 ms): it never rings below
    zero, is exact at coinciding samples, and at 100 Hz and up its 30 ms detail is far above the Nyquist limit.
    """
    n = anomaly_map.shape[1]
    if source_samples == n and source_fs == fs:
        return anomaly_map.astype(np.float32, copy=False)
    positions = np.arange(source_samples) * (fs / source_fs)
    grid = np.arange(n)
    return np.stack([np.interp(positions, grid, lead) for lead in anomaly_map]).astype(np.float32)
