"""The quality gate: every real record passes, every corrupted copy is refused with its documented reason."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from ecgad.io import read_record
from ecgad.types import LEADS, Record, Rejection
from ecgad.validate import FLAT_PTP_MV, SATURATION_FRACTION, check_fs, validate
from tests.corrupt import CORRUPTIONS, copy_record, random_bytes

#: Sources for the corruptions: a PTB-XL record (format 16 .dat) and a CinC record (.mat signal file).
SOURCES = ("ptbxl/records500/06000/06000_hr", "other_12lead/cinc2021_georgia/E07501")


def _reason(record: Record, **kwargs) -> str:
    with pytest.raises(Rejection) as info:
        validate(record, **kwargs)
    return info.value.reason


def _record(signal: np.ndarray, fs: float = 500.0) -> Record:
    return Record(signal=signal.astype(np.float32), fs=fs, lead_names=LEADS)


@pytest.fixture()
def ecg() -> np.ndarray:
    """A 10 s, 500 Hz synthetic 12-lead trace in mV: distinct sines, no sample repeated at the extremes."""
    t = np.arange(5000) / 500.0
    return np.stack([(0.5 + 0.1 * i) * np.sin(2 * np.pi * (1.1 + 0.1 * i) * t + i) for i in range(12)])


def test_every_real_record_passes(sample_data):
    paths = [sample_data / "ptbxl" / p for p in pd.read_csv(sample_data / "ptbxl" / "labels.csv")["record_path"]]
    paths += [sample_data / "other_12lead" / p
              for p in pd.read_csv(sample_data / "other_12lead" / "labels.csv")["record_path"]]
    assert len(paths) == 77
    for path in paths:
        record = read_record(path)
        assert validate(record) is record
        # Margins, so the thresholds are not merely passed but far from the real data.
        assert np.ptp(record.signal, axis=1).min() > 10 * FLAT_PTP_MV
        signal = record.signal
        at_rail = ((signal == signal.min(1, keepdims=True)) | (signal == signal.max(1, keepdims=True))).mean(1)
        assert at_rail.max() < SATURATION_FRACTION / 5


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_corrupted_copies_give_their_rejection(sample_data, tmp_path, source, name):
    case = CORRUPTIONS[name]
    path = case.write(sample_data / source, tmp_path)
    with pytest.raises(Rejection) as info:                   # anything but a Rejection fails the test
        validate(read_record(path))
    assert info.value.reason == case.reason


@pytest.mark.parametrize("source", SOURCES)
def test_intact_copy_passes(sample_data, tmp_path, source):
    original = read_record(sample_data / source)
    copy = validate(read_record(copy_record(sample_data / source, tmp_path)))
    np.testing.assert_allclose(copy.signal, original.signal, atol=1e-6)


@pytest.mark.parametrize("suffix", [".csv", ".npy", ".npz", ".dat"])
def test_random_bytes_in_any_format(sample_data, tmp_path, suffix):
    with pytest.raises(Rejection) as info:
        read_record(random_bytes(sample_data / SOURCES[0], tmp_path, suffix), fs=500)
    assert info.value.code == "bad_file"


def test_synthetic_trace_passes(ecg):
    validate(_record(ecg))


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite(ecg, value):
    ecg[7, 123] = value
    assert _reason(_record(ecg)) == "nan"


def test_flat_threshold(ecg):
    ecg[4] *= 0.8 * FLAT_PTP_MV / np.ptp(ecg[4])          # peak-to-peak 0.8 x threshold
    assert _reason(_record(ecg)) == "flat_lead:aVL"
    ecg[4] *= 1.5                                          # 1.2 x threshold
    validate(_record(ecg))


def test_saturation_threshold(ecg):
    lead = ecg[9].copy()
    ecg[9] = np.minimum(lead, np.quantile(lead, 1 - SATURATION_FRACTION - 0.02))   # ~12 % at the upper rail
    assert _reason(_record(ecg)) == "saturated_lead:V4"
    ecg[9] = np.minimum(lead, np.quantile(lead, 1 - SATURATION_FRACTION + 0.03))   # ~7 %
    validate(_record(ecg))


def test_duration_boundary(ecg):
    validate(_record(ecg))                                            # exactly 10 s
    assert _reason(_record(ecg[:, :-1])) == "too_short"
    assert _reason(_record(ecg[:, :0])) == "too_short"                # empty: no min/max of nothing
    validate(_record(ecg[:, :2500]), min_duration_s=5.0)


def test_checks_run_cheapest_first(ecg):
    ecg[0] = 0.0
    ecg[1, 0] = np.nan
    assert _reason(_record(ecg[:, :100], fs=30)) == "bad_fs:out_of_range"
    assert _reason(_record(ecg[:, :100])) == "too_short"
    assert _reason(_record(ecg)) == "nan"


def test_shape_must_match_lead_names(ecg):
    assert _reason(Record(signal=ecg[:11].astype(np.float32), fs=500, lead_names=LEADS)) == "bad_shape:leads"


@pytest.mark.parametrize("fs, reason", [(None, "bad_fs:missing"), ("500", "bad_fs:non_numeric"),
                                        (True, "bad_fs:non_numeric"), (49.9, "bad_fs:out_of_range"),
                                        (10_001, "bad_fs:out_of_range"), (float("nan"), "bad_fs:out_of_range")])
def test_check_fs_rejects(fs, reason):
    with pytest.raises(Rejection) as info:
        check_fs(fs)
    assert info.value.reason == reason


@pytest.mark.parametrize("fs", [50, 100, np.float32(500.0), np.int64(1000), 10_000])
def test_check_fs_accepts(fs):
    assert check_fs(fs) == float(fs)
