"""From a raw ``Record`` to what the model consumes: the reference's preparation chain, for any rate and length.

The chain (docs/method.md §1, and §5 D2 and D6):

1. resample to the model rate (500 Hz) with a polyphase filter;
2. band-pass the *whole* record with HeartPy's chain (1 Hz high-pass, 35 Hz notch, 25 Hz low-pass, each run
   forward and backward; the notch is an identity filter at 500 Hz), so window edges carry no filter transients;
3. cut 10 s windows (one for a 10 s record; overlapping ones, the last aligned to the end, for longer records);
4. per window: min-max each lead to [-1, 1] over the window, find R-peaks on lead II as ``heartpy.process`` does,
   and cut a 480-sample beat around every peak with ``200 < r < 4400``, itself min-maxed per lead.

For a 10 s record at 500 Hz this is exactly the reference's chain. Every step is vectorized over leads (and over
beats); the only Python loops run over windows and over HeartPy's 18 threshold candidates.

Signals are ``(leads, samples)`` in mV. The chain runs in float64, as the reference did on wfdb's float64 arrays, and
``prepare`` stores float32; the public steps return float32 for float32 input and float64 for float64 input.
"""

from __future__ import annotations

import math
from fractions import Fraction
from functools import lru_cache

import numpy as np
from scipy.signal import butter, filtfilt, iirnotch, resample_poly

from ecgad.config import PrepConfig
from ecgad.rpeaks import find_r_peaks
from ecgad.types import LEADS, MODEL_FS, Prepared, Record, Rejection, Window

__all__ = ["resample_ratio", "resample", "bandpass", "normalize_minmax", "find_r_peaks", "extract_beats",
           "window_starts", "prepare_window", "prepare"]

_DEFAULT = PrepConfig()
_LEAD_II = LEADS.index("II")

#: Largest resampling denominator. Every integer rate up to 1000 Hz (and many more: 1024, 2000, 44100 Hz) gets its
#: exact ratio; any other rate the closest fraction with this denominator, off by less than ``1 / (down * 1000)``.
#: It keeps the polyphase filter (``20 * max(up, down) + 1`` taps) small.
MAX_RESAMPLE_DENOMINATOR = 1000

#: A lead whose range is at most this is flat. Far above what filtering leaves of a constant lead (~1e-15 of its
#: level), far below any real ECG (PTB-XL's resolution is 1 uV = 1e-3 mV; a normalized beat spans ~1).
FLAT_RANGE = 1e-6

#: HeartPy's notch uses Q = 0.005.
HEARTPY_NOTCH_Q = 0.005


def _out_dtype(signal: np.ndarray) -> type:
    return np.float64 if signal.dtype == np.float64 else np.float32


def resample_ratio(fs: float, target_fs: float = MODEL_FS) -> Fraction:
    """The rational factor ``up/down`` that ``resample`` applies; map projection uses it to go back.

    A rate that is not a positive finite number is a ``Rejection("bad_fs")``.
    """
    try:
        rate = float(fs)
    except (TypeError, ValueError):
        raise Rejection("bad_fs", str(fs)) from None
    if not (math.isfinite(rate) and rate > 0):
        raise Rejection("bad_fs", str(fs))
    return (Fraction(target_fs) / Fraction(rate)).limit_denominator(MAX_RESAMPLE_DENOMINATOR)


def resample(signal: np.ndarray, fs: float, target_fs: float = MODEL_FS) -> np.ndarray:
    """``(leads, samples)`` mV at ``fs`` -> ``(leads, ceil(samples * up / down))`` at ``target_fs``.

    Polyphase FIR (``scipy.signal.resample_poly``, Kaiser window): anti-aliased when decimating and free of the
    wrap-around an FFT resampler puts at the record's ends. ``padtype="line"`` assumes the signal continues along
    the line through its first and last samples instead of dropping to 0 mV, so a baseline offset does not turn
    into a step at either end (a step the band-pass would ring on and min-max would then see). The output's sample
    ``i`` lies at time ``i / target_fs`` of the input. Identity (no copy) when the rates are equal.
    """
    ratio = resample_ratio(fs, target_fs)
    dtype = _out_dtype(signal)
    if ratio == 1:
        return np.asarray(signal, dtype=dtype)
    return resample_poly(signal, ratio.numerator, ratio.denominator, axis=-1, padtype="line").astype(dtype)


@lru_cache(maxsize=16)
def _filter_chain(fs: float, highpass_hz: float, notch_hz: float, lowpass_hz: float,
                  order: int) -> tuple[tuple[np.ndarray, np.ndarray], ...]:
    """``(b, a)`` of each stage, built with HeartPy's exact arguments (cut-off / Nyquist, ``iirnotch`` Q=0.005).

    A stage whose numerator equals its denominator is the identity filter and is left out. That is HeartPy's 35 Hz
    notch at 500 Hz: its bandwidth ``w0 / Q = 28`` (in units of Nyquist) puts ``tan(14 pi) ~ 0`` in its gain, so
    ``b == a`` to 5e-15, and running it would only add ~1e-12 of rounding for a third of the filtering cost. Other
    notch settings (say 36 Hz) are real filters and are applied.
    """
    nyq = 0.5 * fs
    stages = (butter(order, highpass_hz / nyq, btype="high", analog=False),
              iirnotch(notch_hz, Q=HEARTPY_NOTCH_Q, fs=fs),
              butter(order, lowpass_hz / nyq, btype="low", analog=False))
    return tuple((b, a) for b, a in stages if not np.allclose(b, a, rtol=0.0, atol=1e-12))


def bandpass(signal: np.ndarray, fs: float = MODEL_FS, cfg: PrepConfig = _DEFAULT) -> np.ndarray:
    """``(leads, samples)`` mV -> the same shape, filtered as the reference filters each lead.

    The reference calls ``heartpy.filter_signal`` per lead: high-pass, notch, low-pass, each ``filtfilt`` with
    scipy's defaults (odd padding of 3 * 3 samples). This runs the same ``filtfilt`` calls on all leads at once
    (``axis=-1``), so each lead gets the same arithmetic; zero-phase, so R-peaks do not move, and the pass-band is
    1-25 Hz with a gain of 0.5 at both corners (each Butterworth stage is applied twice). Needs more than 9 samples.
    """
    out = np.asarray(signal, dtype=np.float64)
    for b, a in _filter_chain(float(fs), cfg.highpass_hz, cfg.notch_hz, cfg.lowpass_hz, cfg.filter_order):
        out = filtfilt(b, a, out, axis=-1)
    return out.astype(_out_dtype(signal), copy=False)


def _unit_range(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Min-max over the last axis to [-1, 1]: ``2 (x - min) / (max - min) - 1``, and which rows are flat.

    Flat rows (range at most ``FLAT_RANGE``, or NaN) are divided by 1 instead of 0, so nothing turns into inf or NaN;
    callers decide what a flat row means. The operations run in place, in the formula's order.
    """
    lo = x.min(axis=-1, keepdims=True)
    span = x.max(axis=-1, keepdims=True) - lo
    flat = ~(span > FLAT_RANGE)
    scaled = x - lo
    scaled *= 2
    scaled /= np.where(flat, 1, span)
    scaled -= 1
    return scaled, flat[..., 0]


def normalize_minmax(signal: np.ndarray, lead_names: tuple[str, ...] = LEADS) -> np.ndarray:
    """``(leads, samples)`` -> per-lead min-max to exactly [-1, 1] (the consistent normalization, docs/method.md D2).

    A lead with no range cannot be scaled: ``Rejection("flat_lead", <lead name>)`` for the first such lead.
    """
    scaled, flat = _unit_range(np.asarray(signal))
    if flat.any():
        raise Rejection("flat_lead", lead_names[int(np.argmax(flat))])
    return scaled


def extract_beats(window: np.ndarray, peaks: np.ndarray, cfg: PrepConfig = _DEFAULT) -> tuple[np.ndarray, np.ndarray]:
    """Beats ``(n, leads, 480)`` around the R-peaks of a normalized window, and the peaks they belong to.

    A beat is ``window[:, r - 140 : r + 340]`` (the R-peak at index 140) for every ``200 < r < 4400`` (the
    reference's test rule), min-maxed per lead to [-1, 1] over its 480 samples. A beat in which some lead is flat
    (a clipped or dead stretch) has no shape to restore and would divide by zero: it is skipped, and its peak is
    left out of the returned peaks, so ``beats[i]`` always belongs to ``beat_peaks[i]``.
    """
    peaks = np.asarray(peaks, dtype=np.int64)
    fits = (peaks >= cfg.beat_before) & (peaks + cfg.beat_after <= window.shape[-1])  # only if cfg moves the bounds
    peaks = peaks[(peaks > cfg.peak_min) & (peaks < cfg.peak_max) & fits]
    # One gather of whole (leads, 480) blocks from a strided view: ~25x faster than fancy-indexing every sample.
    blocks = np.lib.stride_tricks.sliding_window_view(window, cfg.beat_len, axis=-1).swapaxes(0, 1)
    beats, flat = _unit_range(blocks[peaks - cfg.beat_before])
    keep = ~flat.any(axis=1)
    return beats[keep], peaks[keep]


def window_starts(n_samples: int, cfg: PrepConfig = _DEFAULT) -> list[int]:
    """Start samples of the 10 s windows of a record ``n_samples`` long (at ``cfg.fs``).

    Exactly one window: ``[0]``. Longer: every ``cfg.stride`` samples, plus a last window aligned to the end so the
    whole record is covered; windows overlap. Shorter than one window: ``Rejection("too_short")``.
    """
    last = n_samples - cfg.window
    if last < 0:
        raise Rejection("too_short", message=f"{n_samples} samples at {cfg.fs} Hz, need {cfg.window}")
    return list(range(0, last, cfg.stride)) + [last]


def prepare_window(normalized_window: np.ndarray, cfg: PrepConfig = _DEFAULT, offset: int = 0) -> Window:
    """R-peaks and beats of one filtered, min-maxed window ``(12, 5000)``.

    The conformance tests feed the reference's prepared records here directly. ``offset`` is where the window starts
    on the record's 500 Hz axis: window sample ``i`` is record sample ``offset + i``, i.e. time
    ``(offset + i) / 500`` s of the input, which is what stitching maps back together needs.
    """
    window = np.asarray(normalized_window)
    peaks = find_r_peaks(window[_LEAD_II], cfg.fs)
    beats, beat_peaks = extract_beats(window, peaks, cfg)
    return Window(signal=window.astype(np.float32), offset=int(offset), peaks=peaks, beat_peaks=beat_peaks,
                  beats=beats.astype(np.float32))


def prepare(record: Record, cfg: PrepConfig = _DEFAULT) -> Prepared:
    """A validated ``Record`` (12 leads in ``LEADS`` order, mV, any rate, at least 10 s) -> ``Prepared``.

    Windows that cannot be used (a lead flat over the window, no valid beat) are skipped with a line in
    ``metadata["warnings"]``, after the reader's own (``record.metadata["warnings"]``, e.g. pacemaker spikes); if
    none is left the record is rejected with the first window's reason (``flat_lead:<lead>`` or ``no_beats``), so a
    10 s record gets exactly its one window's verdict. Malformed input is rejected too (``bad_shape``, ``nan``,
    ``bad_fs``, ``too_short``), never turned into NaN.
    """
    signal = np.asarray(record.signal, dtype=np.float64)
    if signal.ndim != 2 or signal.shape[0] != len(LEADS):
        raise Rejection("bad_shape", message=f"signal shape {signal.shape}, expected ({len(LEADS)}, samples)")
    if not np.isfinite(signal).all():
        raise Rejection("nan")
    x = resample(signal, record.fs, cfg.fs)
    starts = window_starts(x.shape[1], cfg)
    x = bandpass(x, cfg.fs, cfg)
    windows: list[Window] = []
    rejections: list[Rejection] = []
    warnings: list[str] = []
    for start in starts:
        try:
            window = prepare_window(normalize_minmax(x[:, start:start + cfg.window], record.lead_names), cfg, start)
            if window.n_beats == 0:
                found = f"{len(window.peaks)} R-peaks, none usable" if len(window.peaks) else "HeartPy found no rhythm"
                raise Rejection("no_beats", message=f"{found} (beats need {cfg.peak_min} < r < {cfg.peak_max})")
            windows.append(window)
        except Rejection as rejection:
            rejections.append(rejection)
            warnings.append(f"window at {start / cfg.fs:g} s skipped: {rejection.reason} ({rejection.message})")
    if not windows:
        raise rejections[0]
    return Prepared(record_id=record.record_id, windows=windows, n_samples_model=int(x.shape[1]),
                    source_fs=float(record.fs), source_samples=record.n_samples,
                    metadata={"warnings": [*record.metadata.get("warnings", []), *warnings]})
