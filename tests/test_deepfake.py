"""DeepFake ECG normals (`ecgad.deepfake`), anomalies inserted into given ECGs (`ecgad.inject`) and the PTB-XL root
``ecgad synth --source deepfake`` writes."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import wfdb

from ecgad.cli import main
from ecgad.config import PrepConfig
from ecgad.deepfake import generate, generate_batch
from ecgad.inject import inject
from ecgad.ptbxl import load_ptbxl_index
from ecgad.synth import ANOMALY_TYPES
from ecgad.synth_dataset import write_dataset
from ecgad.train import load_split
from ecgad.types import LEADS


@pytest.fixture(scope="module")
def normals() -> np.ndarray:
    return generate_batch([11, 12, 13, 14])


def test_seeded_and_batch_independent(normals) -> None:
    again = np.stack(list(generate([13, 11, 12, 14], batch=2)))
    np.testing.assert_allclose(again[[1, 2, 0, 3]], normals, atol=1e-4)   # order/batching: float rounding only
    np.testing.assert_array_equal(generate_batch([11, 12, 13, 14]), normals)
    assert np.abs(normals[0] - normals[1]).max() > 0.1


def test_shape_units_and_derived_limb_leads(normals) -> None:
    assert normals.shape == (4, 12, 5000) and normals.dtype == np.float32
    lead = {name: normals[:, i] for i, name in enumerate(LEADS)}
    np.testing.assert_allclose(lead["III"], lead["II"] - lead["I"], atol=1e-5)
    np.testing.assert_allclose(lead["aVR"], -(lead["I"] + lead["II"]) / 2, atol=1e-5)
    np.testing.assert_allclose(lead["aVF"], lead["II"] - lead["I"] / 2, atol=1e-5)
    # mV: a QRS of 0.4-4 mV peak to peak in lead II and V3, never tens of mV (uV) or thousandths (V).
    for name in ("II", "V3"):
        span = lead[name].max(axis=1) - lead[name].min(axis=1)
        assert ((span > 0.4) & (span < 4.0)).all(), (name, span)


@pytest.mark.parametrize("anomaly", ANOMALY_TYPES)
def test_inserted_anomaly_changes_the_record_only_inside_its_mask(normals, anomaly: str) -> None:
    twin = inject(normals[0], anomaly, seed=5)
    change = np.abs(twin.signal - normals[0])
    assert twin.signal.shape == twin.mask.shape == (12, 5000) and twin.anomaly == anomaly
    assert twin.mask.any() and change.max() > 0.05
    assert change[~twin.mask].max(initial=0.0) == 0.0
    np.testing.assert_array_equal(inject(normals[0], anomaly, seed=5).signal, twin.signal)
    lead = {name: twin.signal[i] for i, name in enumerate(LEADS)}
    np.testing.assert_allclose(lead["III"], lead["II"] - lead["I"], atol=1e-5)


def test_combined_anomalies_are_inserted_in_turn_with_the_union_of_their_masks(normals) -> None:
    twin = inject(normals[0], "st_elevation+pvc", seed=5)
    change = np.abs(twin.signal - normals[0])
    assert twin.anomaly == "st_elevation+pvc" and set(twin.details) >= {"st_elevation", "pvc"}
    assert change[~twin.mask].max(initial=0.0) == 0.0 and "V" in twin.beat_types
    alone = inject(normals[0], "st_elevation", seed=int(np.random.SeedSequence([5, 0]).generate_state(1)[0]))
    assert (twin.mask >= alone.mask).all() and twin.mask.sum() > alone.mask.sum()
    np.testing.assert_array_equal(inject(normals[0], "st_elevation+pvc", seed=5).signal, twin.signal)


def test_inject_refuses_what_it_cannot_do(normals) -> None:
    with pytest.raises(ValueError, match="unknown anomaly"):
        inject(normals[0], "flutter", seed=0)
    with pytest.raises(ValueError, match="R-peaks"):
        inject(np.zeros((12, 5000), np.float32) + np.linspace(0, 1, 5000, dtype=np.float32), "pvc", seed=0)


def test_deepfake_root_is_seeded_and_read_by_the_preparation_path(tmp_path) -> None:
    assert main(["synth", "--source", "deepfake", "--out", str(tmp_path / "a"), "--n", "24", "--seed", "7",
                 "--anomaly-fraction", "0.25"]) == 0
    write_dataset(tmp_path / "b", n=24, seed=7, anomaly_fraction=0.25, source="deepfake")
    db = pd.read_csv(tmp_path / "a" / "ptbxl_database.csv")
    assert (db["anomaly"] != "none").sum() == 6
    for _, row in db.iterrows():
        a, b = (wfdb.rdsamp(str(tmp_path / root / row["filename_hr"]))[0] for root in ("a", "b"))
        np.testing.assert_array_equal(a, b)
        mask = np.load(tmp_path / "a" / row["mask_path"])
        assert mask.shape == (12, 5000) and mask.any() == (row["anomaly"] != "none")
    index = load_ptbxl_index(tmp_path / "a")
    assert set(index.loc[index["anomaly"] == "none", "label"]) == {"normal"}
    assert set(index.loc[index["anomaly"] != "none", "label"]) == {"abnormal"}
    train, val, val_labels, rejections = load_split(tmp_path / "a", PrepConfig())
    assert not rejections and len(train) >= 10 and val_labels.sum() >= 1


def test_unknown_source_is_refused(tmp_path) -> None:
    with pytest.raises(ValueError, match="source"):
        write_dataset(tmp_path, n=2, source="gan")
    with pytest.raises(SystemExit):
        main(["synth", "--source", "gan", "--out", str(tmp_path), "--n", "2"])
