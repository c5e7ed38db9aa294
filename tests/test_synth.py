"""Synthetic ECGs: twins and masks, physiology, HeartPy on lead II, and the PTB-XL-layout writer."""

from __future__ import annotations

import ast
import warnings

import numpy as np
import pandas as pd
import pytest
import wfdb

from ecgad.synth import ANOMALY_TYPES, generate_ecg
from ecgad.synth_dataset import PTBXL_LEAD_NAMES, write_dataset
from ecgad.types import LEADS

FS = 500
#: A change smaller than WFDB's resolution (1 uV) is not a visible change.
VISIBLE_MV = 1e-3
#: Mask samples allowed beyond twice the visibly changed ones: 20 ms for the raised-cosine flanks of a region,
#: which stay under 1 uV for a few samples where a small wave starts and ends.
MASK_MARGIN = 10
TWIN_SEEDS = range(5)


@pytest.mark.parametrize("anomaly", ANOMALY_TYPES)
def test_twins_differ_only_inside_a_tight_mask(anomaly: str) -> None:
    for seed in TWIN_SEEDS:
        clean, ecg = generate_ecg(seed), generate_ecg(seed, anomaly)
        assert ecg.mask.shape == ecg.signal.shape == (12, 5000) and ecg.mask.dtype == bool
        assert not clean.mask.any()
        diff = np.abs(ecg.signal.astype(np.float64) - clean.signal)
        assert not (diff[~ecg.mask] > 0).any(), "a sample outside the mask changed"
        assert diff.max() > 0.2, "the anomaly must be clearly visible"
        changed = (diff > VISIBLE_MV).sum(axis=1)
        if anomaly == "af":     # the rhythm changes: documented whole-record mask
            assert ecg.mask.all() and (changed > 0.5 * ecg.signal.shape[1]).all()
        else:
            assert (ecg.mask.sum(axis=1) <= 2 * changed + MASK_MARGIN).all(), (seed, ecg.mask.sum(1), changed)


def test_deterministic_by_seed() -> None:
    a, b, other = generate_ecg(7, "pvc"), generate_ecg(7, "pvc"), generate_ecg(8, "pvc")
    np.testing.assert_array_equal(a.signal, b.signal)
    np.testing.assert_array_equal(a.mask, b.mask)
    np.testing.assert_array_equal(a.r_peaks, b.r_peaks)
    assert a.details == b.details
    assert not np.array_equal(a.signal, other.signal)


def test_unknown_anomaly_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown anomaly"):
        generate_ecg(0, "mi")


@pytest.mark.parametrize("anomaly", [None, *ANOMALY_TYPES])
def test_limb_leads_obey_einthoven_and_goldberger(anomaly: str | None) -> None:
    x = generate_ecg(3, anomaly).signal.astype(np.float64)
    lead = {name: x[i] for i, name in enumerate(LEADS)}
    for derived, expected in [("III", lead["II"] - lead["I"]), ("aVR", -(lead["I"] + lead["II"]) / 2),
                              ("aVL", lead["I"] - lead["II"] / 2), ("aVF", lead["II"] - lead["I"] / 2)]:
        np.testing.assert_allclose(lead[derived], expected, atol=1e-5, err_msg=derived)


def test_normals_are_physiological() -> None:
    for seed in range(20):
        ecg = generate_ecg(seed)
        assert ecg.signal.dtype == np.float32 and ecg.fs == FS and ecg.lead_names == LEADS
        assert set(ecg.beat_types) == {"N"}
        rr = np.diff(ecg.r_peaks) / FS
        assert 50 <= 60 / rr.mean() <= 100 and rr.std() > 0          # 55-95 bpm with sinus arrhythmia
        ii = ecg.signal[1]
        inner = ecg.r_peaks[(ecg.r_peaks > 125) & (ecg.r_peaks < 4775)]
        r_amp = [ii[r] - np.median(ii[r - 125:r + 225]) for r in inner]     # R height over the beat's baseline
        assert 0.5 <= min(r_amp) and max(r_amp) <= 2.5, (seed, min(r_amp), max(r_amp))
        assert np.abs(ecg.signal).max() < 5.0


def test_pvc_is_premature_with_compensatory_pause() -> None:
    for seed in range(5):
        ecg = generate_ecg(seed, "pvc")
        assert ecg.beat_types.count("V") == 1
        k = ecg.beat_types.index("V")
        rr = np.diff(ecg.r_peaks)
        sinus = np.median(rr)
        assert rr[k - 1] < 0.8 * sinus
        assert abs(rr[k - 1] + rr[k] - 2 * sinus) < 0.15 * 2 * sinus


def test_af_rhythm_is_irregular() -> None:
    def rr_cv(ecg) -> float:
        rr = np.diff(ecg.r_peaks)
        return float(rr.std() / rr.mean())

    for seed in range(5):
        assert rr_cv(generate_ecg(seed, "af")) > 2 * rr_cv(generate_ecg(seed))


def test_heartpy_finds_the_true_r_peaks_on_lead_ii() -> None:
    """The pipeline's chain (1-25 Hz band-pass, min-max) then ``heartpy.process`` on lead II, as on PTB-XL."""
    heartpy = pytest.importorskip("heartpy")
    from ecgad.preprocess import bandpass, normalize_minmax

    found = total = spurious = detected = 0
    for seed in range(12):
        ecg = generate_ecg(seed)
        ii = normalize_minmax(bandpass(ecg.signal.astype(np.float64)))[1]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            peaks = np.asarray(heartpy.process(ii, float(FS))[0]["peaklist"])
        truth = ecg.r_peaks[(ecg.r_peaks > 0.15 * FS) & (ecg.r_peaks < 4925)]   # HeartPy drops a peak < 150 ms
        dist = np.abs(truth[:, None] - peaks[None, :])
        found += int((dist.min(axis=1) <= 0.01 * FS).sum())
        total += len(truth)
        spurious += int((dist.min(axis=0) > 0.01 * FS).sum())
        detected += len(peaks)
    assert found >= 0.95 * total and spurious <= 0.05 * detected, (found, total, spurious, detected)


def test_write_dataset_is_a_ptbxl_root_with_ground_truth(tmp_path) -> None:
    root = write_dataset(tmp_path / "synth", n=20, seed=1, anomaly_fraction=0.3, lowres=True)
    db = pd.read_csv(root / "ptbxl_database.csv")
    labels = pd.read_csv(root / "labels.csv")
    assert len(db) == len(labels) == 20 and list(db["ecg_id"]) == list(range(1, 21))
    assert set(db["strat_fold"]) == set(range(1, 11))
    anomalous = db["anomaly"] != "none"
    assert anomalous.sum() == 6 and db.loc[anomalous, "anomaly"].nunique() == 6
    for fold in (9, 10):
        assert set(anomalous[db["strat_fold"] == fold]) == {True, False}, f"fold {fold} needs both classes"
    assert (labels["label"] == np.where(anomalous, "abnormal", "normal")).all()
    assert (pd.read_csv(root / "scp_statements.csv").columns[:3] == ["Unnamed: 0", "description", "diagnostic"]).all()

    for _, row in db.iterrows():
        rec = wfdb.rdrecord(str(root / row["filename_hr"]))
        assert rec.fs == FS and tuple(rec.sig_name) == PTBXL_LEAD_NAMES and rec.units == ["mV"] * 12
        ecg = generate_ecg(int(row["synth_seed"]), None if row["anomaly"] == "none" else row["anomaly"])
        np.testing.assert_allclose(rec.p_signal.T, ecg.signal, atol=5e-4 + 1e-6)     # 1 uV quantization
        mask = np.load(root / row["mask_path"])
        np.testing.assert_array_equal(mask, ecg.mask)
        assert mask.any() == (row["anomaly"] != "none")
        assert ast.literal_eval(row["scp_codes"]) == ast.literal_eval(labels.loc[_, "scp_codes"])
    lowres = wfdb.rdrecord(str(root / db["filename_lr"][0]))
    assert lowres.fs == 100 and lowres.p_signal.shape == (1000, 12)


def test_write_dataset_labels_agree_with_the_ptbxl_reader(tmp_path) -> None:
    ptbxl = pytest.importorskip("ecgad.ptbxl")
    root = write_dataset(tmp_path / "synth", n=len(ANOMALY_TYPES) + 3, seed=2,
                         anomaly_fraction=len(ANOMALY_TYPES) / (len(ANOMALY_TYPES) + 3))
    index = ptbxl.load_ptbxl_index(root)
    assert len(index) == len(ANOMALY_TYPES) + 3 and set(index["sampling_rate_hz"]) == {FS}
    assert set(index.loc[index["anomaly"] != "none", "anomaly"]) == set(ANOMALY_TYPES)
    assert (index["label"] == np.where(index["anomaly"] == "none", "normal", "abnormal")).all()
    record = ptbxl.read_ptbxl_record(root, index.iloc[0])
    assert record.signal.shape == (12, 5000) and record.metadata["mask_path"] == index["mask_path"][0]


def test_write_dataset_validates_its_arguments(tmp_path) -> None:
    with pytest.raises(ValueError, match="anomaly_types"):
        write_dataset(tmp_path, n=2, anomaly_types=("mi",))
    with pytest.raises(ValueError, match="anomaly_fraction"):
        write_dataset(tmp_path, n=2, anomaly_fraction=1.5)


def test_a_synthetic_record_goes_down_the_pipeline() -> None:
    from ecgad.preprocess import prepare

    prepared = prepare(generate_ecg(4, "st_elevation").to_record())
    assert prepared.n_samples_model == 5000 and prepared.n_beats >= 6
