"""PTB-XL index, labels and record stream on the sample root; folder listing for archive jobs."""

from __future__ import annotations

import ast
import logging
import shutil

import numpy as np
import pandas as pd
import pytest

from ecgad.inputs import list_record_files
from ecgad.ptbxl import iter_ptbxl_records, load_ptbxl_index
from ecgad.types import LEADS


@pytest.fixture(scope="module")
def labels(sample_data) -> pd.DataFrame:
    return pd.read_csv(sample_data / "ptbxl" / "labels.csv")


@pytest.fixture(scope="module")
def index(sample_data) -> pd.DataFrame:
    return load_ptbxl_index(sample_data / "ptbxl")


def test_index_reproduces_labels_csv(index, labels):
    assert index["ecg_id"].tolist() == labels["ecg_id"].tolist()
    for column in ("patient_id", "strat_fold", "sampling_rate_hz", "record_path", "label"):
        assert index[column].tolist() == labels[column].tolist(), column
    assert index["is_normal"].tolist() == (labels["norm_only"] == 1).tolist()
    joined = index["superclasses"].map(lambda classes: "|".join(classes) or np.nan)
    pd.testing.assert_series_equal(joined, labels["diagnostic_superclasses"], check_names=False)
    assert index["superclasses"].map(lambda classes: "NORM" in classes).tolist() == (labels["has_norm"] == 1).tolist()
    assert index["scp_codes"].tolist() == labels["scp_codes"].map(ast.literal_eval).tolist()


def test_counts(index, labels):
    counts = labels["label"].value_counts().to_dict()
    assert counts == {"normal": 42, "abnormal": 13}                  # the README's table: 38 + 4, 12 + 1
    assert index["label"].value_counts().to_dict() == counts
    assert index["sampling_rate_hz"].value_counts().to_dict() == {100: 50, 500: 5}
    assert index.groupby("sampling_rate_hz")["is_normal"].sum().to_dict() == {100: 38, 500: 4}


def test_label_rule_edge_cases(index):
    by_id = index.set_index("ecg_id")
    assert by_id.loc[17, "superclasses"] == () and by_id.loc[17, "label"] == "abnormal"   # rhythm statements only
    assert by_id.loc[6002, "superclasses"] == ("CD", "NORM") and not by_id.loc[6002, "is_normal"]
    assert by_id.loc[39, "superclasses"] == ("MI", "STTC")            # IMI at likelihood 15 still counts
    assert by_id.loc[1, "superclasses"] == ("NORM",) and by_id.loc[1, "label"] == "normal"


def test_every_record_streams_with_its_row(sample_data, index):
    records = list(iter_ptbxl_records(sample_data / "ptbxl"))
    assert len(records) == 55
    for record, (_, row) in zip(records, index.iterrows()):
        assert record.lead_names == LEADS and record.signal.dtype == np.float32
        assert record.fs == row["sampling_rate_hz"] and record.signal.shape == (12, 10 * record.fs)
        meta = record.metadata
        assert (meta["ecg_id"], meta["label"], meta["strat_fold"]) == (row["ecg_id"], row["label"], row["strat_fold"])
        assert meta["patient_id"] == row["patient_id"] and isinstance(meta["is_normal"], bool)
        assert record.record_id == row["record_path"].rsplit("/", 1)[1]


def test_fold_and_normal_filters(sample_data, index):
    folds = {9, 10}
    ids = [r.metadata["ecg_id"] for r in iter_ptbxl_records(sample_data / "ptbxl", folds=folds, only_normal=True)]
    assert ids == index.loc[index["strat_fold"].isin(folds) & index["is_normal"], "ecg_id"].tolist()
    assert ids


def _partial_root(sample_data, tmp_path, extra_column: bool = False):
    """A PTB-XL root with only the 500 Hz records on disk (and optionally an extra database column)."""
    root = tmp_path / "ptbxl"
    root.mkdir()
    shutil.copy(sample_data / "ptbxl" / "scp_statements.csv", root)
    (root / "records500").symlink_to(sample_data / "ptbxl" / "records500")
    db = pd.read_csv(sample_data / "ptbxl" / "ptbxl_database.csv")
    if extra_column:
        db["mask_path"] = [f"masks/{i}.npy" if i % 2 else np.nan for i in db["ecg_id"]]
    db.to_csv(root / "ptbxl_database.csv", index=False)
    return root


def test_rows_without_files_are_dropped_and_logged(sample_data, tmp_path, caplog):
    root = _partial_root(sample_data, tmp_path)
    with caplog.at_level(logging.WARNING, logger="ecgad.ptbxl"):
        index = load_ptbxl_index(root)
    assert index["ecg_id"].tolist() == [6000, 6002, 6004, 6006, 6009]
    assert "50 of 55 rows" in caplog.text


def test_extra_columns_pass_into_metadata(sample_data, tmp_path):
    root = _partial_root(sample_data, tmp_path, extra_column=True)
    masks = {r.metadata["ecg_id"]: r.metadata["mask_path"] for r in iter_ptbxl_records(root)}
    assert masks == {6000: None, 6002: None, 6004: None, 6006: None, 6009: "masks/6009.npy"}


def test_list_record_files(sample_data, tmp_path):
    found = [p for p in list_record_files(sample_data) if p.relative_to(sample_data).parts[0] != "formats"]
    assert len(found) == 77 and all(path.suffix == ".hea" for path in found)    # formats/: tests/test_formats.py
    assert found == sorted(found)
    (tmp_path / "a" / "b").mkdir(parents=True)
    for name in ("a/x.csv", "a/b/y.npy", "z.npz", "a/labels.csv", "a/b/notes.txt", "a/b/r.hea", "a/b/r.dat"):
        (tmp_path / name).write_text("")
    assert [p.relative_to(tmp_path).as_posix() for p in list_record_files(tmp_path)] == [
        "a/b/r.hea", "a/b/y.npy", "a/x.csv", "z.npz"]
