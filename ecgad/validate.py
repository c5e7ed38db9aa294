"""Signal-quality gate between reading and preparation: refuse, with a typed reason, what the model cannot score.

Every record of an archive passes through `validate`, so each check is one vectorized numpy pass over the
``(leads, samples)`` array, cheapest first (rate and length before any per-sample work). The preparation step
divides by each lead's range and looks for heartbeats in a 10 s window; these checks make sure it never meets a
NaN, a zero range or a record too short for one window (docs/method.md §1.7, D5).
"""

from __future__ import annotations

import math
import numbers

import numpy as np

from ecgad.types import Rejection, Record

#: Plausible sampling rates (Hz). Below 50 Hz the QRS complex (10-40 Hz content) is lost; above 10 kHz no ECG
#: device records, so such a value is a unit or parsing error (e.g. a period in µs).
FS_MIN_HZ: float = 50.0
FS_MAX_HZ: float = 10_000.0

#: A lead whose peak-to-peak amplitude is below this (mV) is flat: an unplugged or zeroed channel. The smallest
#: peak-to-peak in the real sample data is 0.24 mV (a low-voltage lead III), twenty times above this;
#: 0.01 mV is ten steps of PTB-XL's 1 µV resolution, so a constant lead with a little quantization noise is
#: still caught.
FLAT_PTP_MV: float = 0.01

#: A lead with more than this fraction of its samples exactly at its minimum or maximum is clipped at an amplifier
#: rail. An unclipped ECG touches its extremes at only a handful of samples (at most 1.1 % in the real sample data,
#: a 500 Hz PTB-XL record); clipping flattens whole QRS complexes, so the fraction jumps well above this.
SATURATION_FRACTION: float = 0.10


def check_fs(fs: object) -> float:
    """``fs`` as a float in Hz, or ``Rejection("bad_fs", ...)`` if it is missing, not a number, or implausible.

    Readers call this as soon as they know the rate, so a bad rate is reported as such and not as a later symptom.
    """
    if isinstance(fs, bool) or not isinstance(fs, numbers.Real):
        raise Rejection("bad_fs", "missing" if fs is None else "non_numeric", f"sampling rate {fs!r} is not a number")
    value = float(fs)
    if not (math.isfinite(value) and FS_MIN_HZ <= value <= FS_MAX_HZ):
        raise Rejection("bad_fs", "out_of_range", f"sampling rate {value:g} Hz outside {FS_MIN_HZ:g}..{FS_MAX_HZ:g} Hz")
    return value


def validate(record: Record, *, min_duration_s: float = 10.0) -> Record:
    """Return ``record`` unchanged if it can be scored, else raise the first `Rejection` found.

    ``record.signal`` is ``(leads, samples)`` float32 in mV. Checks, in order: ``bad_fs``; ``bad_shape`` (not 2-D, or
    the lead count disagrees with ``lead_names``); ``too_short`` (under ``min_duration_s``, the model's 10 s window);
    ``nan`` (NaN or ±Inf anywhere); ``flat_lead:<lead>`` (peak-to-peak < `FLAT_PTP_MV`);
    ``saturated_lead:<lead>`` (more than `SATURATION_FRACTION` of the samples at the lead's min or max).
    """
    check_fs(record.fs)
    signal = record.signal
    if signal.ndim != 2 or signal.shape[0] != len(record.lead_names):
        raise Rejection("bad_shape", "leads", f"signal shape {signal.shape} for {len(record.lead_names)} lead names")
    if record.duration_s < min_duration_s - 1e-9:
        raise Rejection("too_short", "", f"{record.duration_s:.2f} s < {min_duration_s:g} s")
    if not np.isfinite(signal).all():
        raise Rejection("nan")

    low = signal.min(axis=1, keepdims=True)
    high = signal.max(axis=1, keepdims=True)
    flat = (high - low)[:, 0] < FLAT_PTP_MV
    if flat.any():
        raise Rejection("flat_lead", record.lead_names[int(np.argmax(flat))])
    at_rail = ((signal == low) | (signal == high)).mean(axis=1)
    saturated = at_rail > SATURATION_FRACTION
    if saturated.any():
        lead = int(np.argmax(saturated))
        raise Rejection("saturated_lead", record.lead_names[lead],
                        f"{at_rail[lead]:.0%} of lead {record.lead_names[lead]} at its min or max")
    return record
