"""ecgad.preprocess and ecgad.rpeaks against the method (golden numbers), HeartPy itself and the reference fixture.

Records are read with wfdb directly (PTB-XL, CinC 2021 and PTB store the 12 standard leads in canonical order), so
these tests depend on nothing but the preparation code.
"""

from __future__ import annotations

import time
import warnings
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import wfdb
from scipy.signal import resample_poly

from ecgad.config import PrepConfig
from ecgad.preprocess import (bandpass, extract_beats, find_r_peaks, normalize_minmax, prepare, prepare_window,
                              resample, resample_ratio, window_starts)
from ecgad.types import LEADS, Record, Rejection

with warnings.catch_warnings():  # heartpy imports the deprecated pkg_resources
    warnings.simplefilter("ignore")
    import heartpy as hp

CFG = PrepConfig()


def _headers(root: Path) -> list[Path]:
    return sorted([*root.glob("ptbxl/records100/**/*.hea"), *root.glob("ptbxl/records500/**/*.hea"),
                   *root.glob("other_12lead/**/*.hea")])


def _read(header: Path) -> Record:
    """The first 12 channels (ptbdb adds 3 Frank leads) as a Record in mV."""
    rec = wfdb.rdrecord(str(header.with_suffix("")))
    return Record(signal=rec.p_signal[:, :12].T.astype(np.float32), fs=float(rec.fs), lead_names=LEADS,
                  record_id=header.stem)


@pytest.fixture(scope="module")
def records(sample_data) -> dict[str, Record]:
    found = {h.stem: _read(h) for h in _headers(sample_data)}
    assert len(found) == 77, sorted(found)
    return found


@pytest.fixture(scope="module")
def protocol(reference_mcf):
    return np.load(reference_mcf / "protocol.npz")


def _heartpy_chain(signal: np.ndarray, fs: float = 500.0, notch_hz: float = 35.0) -> np.ndarray:
    """The reference's per-lead HeartPy filtering, then per-lead min-max: the input of its R-peak detector."""
    out = []
    for lead in np.asarray(signal, dtype=np.float64):
        lead = hp.filter_signal(lead, cutoff=1, sample_rate=fs, order=2, filtertype="highpass")
        lead = hp.filter_signal(lead, cutoff=notch_hz, sample_rate=fs, filtertype="notch")
        out.append(hp.filter_signal(lead, cutoff=25, sample_rate=fs, order=2, filtertype="lowpass"))
    return np.array(out)


def _minmax(x: np.ndarray) -> np.ndarray:
    lo, hi = x.min(axis=-1, keepdims=True), x.max(axis=-1, keepdims=True)
    return 2 * (x - lo) / (hi - lo) - 1


def _heartpy_peaks(lead: np.ndarray, fs: float = 500.0) -> np.ndarray:
    """The reference's call; its HRV measures warn on short or odd rhythms, which the reference ignores too."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return np.asarray(hp.process(lead, fs)[0]["peaklist"], dtype=np.int64)
        except hp.exceptions.BadSignalWarning:
            return np.zeros(0, dtype=np.int64)


def _at_500(record: Record) -> np.ndarray:
    return resample(record.signal.astype(np.float64), record.fs)


# -- golden numbers -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("freq, gain, tol", [(1.0, 0.5, 0.025), (25.0, 0.5, 0.025), (10.0, 0.98, 0.01)])
def test_bandpass_gain(freq, gain, tol):
    """Two zero-phase 2nd-order Butterworth stages: |H|^2 = 0.5 at each corner, near 1 in between."""
    t = np.arange(60 * 500) / 500.0
    out = bandpass(np.sin(2 * np.pi * freq * t)[None])[0]
    core = slice(10 * 500, 50 * 500)  # away from the edges
    measured = 2 * np.hypot(np.mean(out[core] * np.sin(2 * np.pi * freq * t[core])),
                            np.mean(out[core] * np.cos(2 * np.pi * freq * t[core])))
    assert abs(measured - gain) <= tol, measured


def test_bandpass_equals_heartpy_per_lead(records):
    for name in ["06000_hr", "06002_hr", "E07501", "JS20000", "00001_lr"]:
        x = _at_500(records[name])
        assert np.abs(bandpass(x) - _heartpy_chain(x)).max() <= 1e-9 * np.abs(x).max(), name
        assert bandpass(x.astype(np.float32)).dtype == np.float32


def test_bandpass_applies_a_notch_that_is_not_a_no_op(records):
    """35 Hz at Q=0.005 is the identity and is skipped; 36 Hz is a real filter and must run as HeartPy runs it."""
    x = _at_500(records["06004_hr"])
    cfg = PrepConfig(notch_hz=36.0)
    assert np.abs(bandpass(x, cfg=cfg) - _heartpy_chain(x, notch_hz=36.0)).max() <= 1e-9 * np.abs(x).max()
    assert np.abs(bandpass(x, cfg=cfg) - bandpass(x)).max() > 1e-3


# -- resampling -------------------------------------------------------------------------------------------------------

def test_resample_ratio_and_shapes():
    assert resample_ratio(100) == 5 and resample_ratio(1000.0) == Fraction(1, 2)
    assert resample_ratio(257) == Fraction(500, 257) and resample_ratio(360) == Fraction(25, 18)
    x = np.random.default_rng(0).standard_normal((12, 1000)).astype(np.float32)
    assert resample(x, 500) is x
    assert resample(x, 100).shape == (12, 5000) and resample(x, 100).dtype == np.float32
    assert resample(x, 1000).shape == (12, 500)
    for bad in (0, -5, float("nan"), float("inf"), None, "fast"):
        with pytest.raises(Rejection) as err:
            resample(x, bad)
        assert err.value.code == "bad_fs"


def test_resampling_100_to_500_moves_r_peaks_at_most_2ms(records):
    """A 500 Hz record brought down to 100 Hz and back keeps every R-peak within one 500 Hz sample (2 ms)."""
    for name in ["06000_hr", "06002_hr", "06004_hr", "06006_hr", "06009_hr"]:
        original = records[name].signal.astype(np.float64)
        low = resample_poly(original, 1, 5, axis=-1, padtype="line")
        peaks = [prepare(Record(x, fs, LEADS)).windows[0].peaks for x, fs in ((original, 500), (low, 100))]
        assert len(peaks[0]) == len(peaks[1]) >= 7, name
        assert np.abs(peaks[0] - peaks[1]).max() <= 1, (name, peaks)


# -- normalization and beats ------------------------------------------------------------------------------------------

def test_normalize_minmax_is_exactly_minus_one_to_one(records):
    x = normalize_minmax(bandpass(_at_500(records["JS20001"])))
    assert (x.min(axis=1) == -1).all() and (x.max(axis=1) == 1).all()
    flat = np.random.default_rng(1).standard_normal((12, 5000))
    flat[8] = 0.7
    with pytest.raises(Rejection) as err:
        normalize_minmax(flat)
    assert err.value.reason == "flat_lead:V3"


def test_beats_are_centred_on_the_r_peak(protocol):
    """Beat index 140 is the R-peak: the local maximum of the normalized lead II window, re-normalized per beat."""
    for prepared in protocol["prepared"]:
        window = prepared.T
        result = prepare_window(window)
        assert result.beats.shape == (result.n_beats, 12, 480) and result.beats.dtype == np.float32
        for beat, r in zip(result.beats, result.beat_peaks):
            assert 200 < r < 4400
            np.testing.assert_array_equal(beat, _minmax(window[:, r - 140:r + 340]).astype(np.float32))
            assert window[1, r] == window[1, r - 25:r + 26].max()
            assert np.argmax(beat[1, 115:166]) == 25


def test_extract_beats_skips_a_beat_with_a_flat_lead(protocol):
    window = protocol["prepared"][0].T.copy()
    peaks = find_r_peaks(window[1])
    r = peaks[(peaks > 200) & (peaks < 4400)][2]
    window[4, r - 140:r + 340] = 0.25  # aVL clipped over that one beat
    beats, beat_peaks = extract_beats(window, peaks)
    assert r not in beat_peaks and len(beat_peaks) == protocol["valid_beats"][0] - 1
    assert np.isfinite(beats).all() and np.abs(beats).max() <= 1


def test_window_starts():
    assert window_starts(5000) == [0]
    assert window_starts(5001) == [0, 1]
    assert window_starts(7500) == [0, 2500]
    assert window_starts(19200) == [0, 2500, 5000, 7500, 10000, 12500, 14200]
    with pytest.raises(Rejection) as err:
        window_starts(4999)
    assert err.value.code == "too_short"


# -- R-peaks: identical to HeartPy --------------------------------------------------------------------------------

def test_r_peaks_identical_to_heartpy_process(records):
    """Every record at 500 Hz through the reference's chain, every 10 s window of the long one, both float widths,
    plus noisier copies (more candidate peaks, some records HeartPy rejects)."""
    rng = np.random.default_rng(2)
    leads = []
    for record in records.values():
        x = _at_500(record)
        leads += [_minmax(_heartpy_chain(x[:, s:s + 5000]))[1] for s in window_starts(x.shape[1])]
    leads += [lead + rng.normal(0, 0.25, lead.shape) for lead in leads[::4]] + [rng.normal(size=5000)]
    rejected = 0
    for lead in leads:
        for dtype in (np.float64, np.float32):
            expected = _heartpy_peaks(lead.astype(dtype))
            np.testing.assert_array_equal(find_r_peaks(lead.astype(dtype)), expected)
            rejected += len(expected) == 0
    assert rejected >= 2  # the failure path (HeartPy raises, we return nothing) is exercised


def test_r_peaks_identical_to_heartpy_at_other_rates(records):
    """An even moving-average width (0.75 * 360 = 270) takes HeartPy's odd padding path."""
    for fs in (360.0, 250.0):
        lead = _minmax(_heartpy_chain(resample(records["06006_hr"].signal.astype(np.float64), 500, fs), fs))[1]
        for dtype in (np.float64, np.float32):
            np.testing.assert_array_equal(find_r_peaks(lead.astype(dtype), fs), _heartpy_peaks(lead.astype(dtype), fs))


def test_protocol_peaks_and_beats_reproduced(protocol, reference_mcf):
    local = np.load(reference_mcf / "forward.npz")["local_ecg"]
    for i, prepared in enumerate(protocol["prepared"]):
        result = prepare_window(prepared.T)
        expected = protocol["peaks"][i]
        np.testing.assert_array_equal(result.peaks, expected[expected >= 0])
        assert result.n_beats == protocol["valid_beats"][i]
        if i < len(local):
            np.testing.assert_array_equal(result.beats[0], local[i].T)


def test_prepare_from_raw_file_matches_protocol(records, protocol):
    """Our whole chain from the wfdb file gives the reference's prepared record (to float32 rounding) and peaks."""
    for i, name in enumerate(protocol["record"]):
        window = prepare(records[str(name)]).windows[0]
        assert np.abs(window.signal - protocol["prepared"][i].T).max() < 1e-6
        expected = protocol["peaks"][i]
        np.testing.assert_array_equal(window.peaks, expected[expected >= 0])


# -- whole records --------------------------------------------------------------------------------------------------

def test_every_sample_record_prepares_or_is_rejected(records):
    outcome = {}
    with np.errstate(divide="raise", invalid="raise"):
        for name, record in records.items():
            try:
                prepared = prepare(record)
            except Rejection as rejection:
                outcome[name] = rejection.reason
                continue
            outcome[name] = "ok"
            assert prepared.windows and prepared.n_beats > 0
            assert prepared.n_samples_model == round(record.n_samples * 500 / record.fs)
            for window in prepared.windows:
                assert window.signal.shape == (12, 5000) and window.signal.dtype == np.float32
                assert (window.signal.min(axis=1) == -1).all() and (window.signal.max(axis=1) == 1).all()
                assert window.beats.shape == (len(window.beat_peaks), 12, 480)
                assert np.isfinite(window.beats).all() and np.abs(window.beats).max() <= 1
                assert ((window.beat_peaks > 200) & (window.beat_peaks < 4400)).all()
    assert set(outcome.values()) <= {"ok", "no_beats"}, outcome
    assert list(outcome.values()).count("ok") == 77, outcome  # all of them, today


def test_long_record_windows(records):
    """ptbdb s0010_re: 38.4 s at 1000 Hz -> 19 200 samples at 500 Hz -> 7 overlapping windows, the last at the end."""
    record = records["s0010_re"]
    prepared = prepare(record)
    assert (record.fs, record.n_samples) == (1000.0, 38400)
    assert prepared.n_samples_model == 19200 and prepared.source_samples == 38400
    assert [w.offset for w in prepared.windows] == [0, 2500, 5000, 7500, 10000, 12500, 14200]
    filtered = bandpass(_at_500(record))
    for window in prepared.windows:
        expected = normalize_minmax(filtered[:, window.offset:window.offset + 5000])
        assert np.abs(window.signal - expected).max() < 1e-6


def test_unusable_windows_are_skipped_with_a_warning(records):
    """A real 10 s ECG followed by 20 s of lead-off (0 mV): the late windows are skipped, the early ones kept."""
    ecg = records["06000_hr"].signal
    record = Record(np.concatenate([ecg, np.zeros((12, 10000), np.float32)], axis=1), 500, LEADS, "lead_off")
    prepared = prepare(record)
    assert prepared.windows[0].offset == 0 and prepared.n_beats >= 10
    warned = " ".join(prepared.metadata["warnings"])
    assert "flat_lead:I" in warned and "window at 20 s" in warned


@pytest.mark.parametrize("case, reason", [("flat_v3", "flat_lead:V3"), ("zeros", "flat_lead:I"),
                                          ("slow_wave", "no_beats"), ("nan", "nan"), ("short", "too_short"),
                                          ("eleven_leads", "bad_shape"), ("bad_fs", "bad_fs:0")])
def test_bad_input_is_a_typed_rejection_fast(records, case, reason):
    ecg = records["06000_hr"].signal.copy()
    t = np.arange(5000) / 500.0
    fs = 500
    if case == "flat_v3":
        ecg[8] = 0.3
    elif case == "zeros":
        ecg[:] = 0
    elif case == "slow_wave":  # one "beat" every 2 s: 30 bpm, below HeartPy's 40 bpm floor
        ecg[:] = np.sin(2 * np.pi * 0.5 * t)
    elif case == "nan":
        ecg[3, 100] = np.nan
    elif case == "short":
        ecg = ecg[:, :4990]
    elif case == "eleven_leads":
        ecg = ecg[:11]
    elif case == "bad_fs":
        fs = 0
    start = time.perf_counter()
    with pytest.raises(Rejection) as err:
        prepare(Record(ecg, fs, LEADS))
    assert err.value.reason == reason
    assert time.perf_counter() - start < 1.0
