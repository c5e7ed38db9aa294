"""``jobs.preprocess``: a data root -> Parquet shards whose rows decode to exactly the in-process ``prepare`` output,
with folds and labels from the index, rejected records listed with their reasons, and idempotent reruns."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from ecgad.io import read_record
from ecgad.preprocess import prepare
from ecgad.ptbxl import load_ptbxl_index
from ecgad.rows import row_to_prepared
from ecgad.shards import SHARD_SCHEMA, ShardLayout
from ecgad.synth_dataset import write_dataset
from ecgad.types import Rejection
from ecgad.validate import validate
from jobs.preprocess import main

pytestmark = pytest.mark.cluster  # starts Ray (see pyproject.toml's markers)

N_RECORDS = 24


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> tuple[Path, str, str]:
    """A synthetic PTB-XL root with one record's signal file truncated; its record id and the in-process reason."""
    root = write_dataset(tmp_path_factory.mktemp("data") / "synth", N_RECORDS, seed=3)
    broken = load_ptbxl_index(root)["record_path"].iloc[5]
    dat = root / f"{broken}.dat"
    dat.write_bytes(dat.read_bytes()[:2000])
    with pytest.raises(Rejection) as expected:
        validate(read_record(root / broken))
    return root, broken, expected.value.reason


@pytest.fixture(scope="module")
def shards(ray_session, data_root, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("out") / "shards"
    assert main(["--data", str(data_root[0]), "--out", str(out)]) == 0
    return out


def _rows(out: Path) -> dict[str, dict]:
    return {row["record_id"]: row for row in pads.dataset(ShardLayout(out).records).to_table().to_pylist()}


def test_rows_decode_to_the_in_process_preparation(shards, data_root):
    root, broken, _ = data_root
    rows = _rows(shards)
    index = load_ptbxl_index(root).set_index("record_path")
    assert set(rows) == set(index.index)
    assert pads.dataset(ShardLayout(shards).records).schema.remove_metadata() == SHARD_SCHEMA
    for record_id, row in rows.items():
        assert row["strat_fold"] == index.loc[record_id, "strat_fold"]
        assert row["label"] == index.loc[record_id, "label"] and row["is_normal"] == index.loc[record_id, "is_normal"]
        assert row["ecg_id"] == index.loc[record_id, "ecg_id"]
        assert row["mask_path"] == index.loc[record_id, "mask_path"]
        if record_id == broken:
            continue
        got, want = row_to_prepared(row), prepare(validate(read_record(root / record_id)))
        assert row["status"] == "ok" and len(got.windows) == len(want.windows)
        for g, w in zip(got.windows, want.windows):   # float32 storage: bit-exact, not merely close
            assert np.array_equal(g.signal, w.signal) and np.array_equal(g.beats, w.beats)
            assert np.array_equal(g.beat_peaks, w.beat_peaks) and np.array_equal(g.peaks, w.peaks)


def test_rejections_are_listed_with_their_reason(shards, data_root):
    _, broken, reason = data_root
    manifest = ShardLayout(shards).require_manifest()
    assert manifest["counts"]["records"] == N_RECORDS and manifest["counts"]["rejected"] == 1
    assert manifest["counts"]["rejected_by_reason"] == {reason.split(":")[0]: 1}
    rejections = pq.read_table(ShardLayout(shards).rejections).to_pylist()
    assert [(r["record_id"], r["status"], r["reason"]) for r in rejections] == [(broken, "rejected", reason)]
    assert _rows(shards)[broken]["status"] == "rejected"


def test_rerun_is_a_no_op_and_changed_inputs_rebuild(shards, data_root, capsys):
    root = data_root[0]
    before = {p.name: p.stat().st_mtime_ns for p in ShardLayout(shards).records.iterdir()}
    stale = shards.parent / f".{shards.name}.tmp-killed"
    stale.mkdir()                                   # what a killed run leaves behind
    capsys.readouterr()
    assert main(["--data", str(root), "--out", str(shards)]) == 0
    assert "up to date" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in ShardLayout(shards).records.iterdir()} == before

    csv = root / "ptbxl_database.csv"
    os.utime(csv, ns=(csv.stat().st_atime_ns, csv.stat().st_mtime_ns + 10**9))
    assert main(["--data", str(root), "--out", str(shards)]) == 0
    after = {p.name for p in ShardLayout(shards).records.iterdir()}
    assert after.isdisjoint(before)                 # replaced whole, not appended to
    assert len(_rows(shards)) == N_RECORDS
    assert not stale.exists() and not list(shards.parent.glob(f".{shards.name}.*"))
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["counts"]["records"] == N_RECORDS


def test_a_plain_folder_has_no_folds(ray_session, data_root, tmp_path):
    root = data_root[0]
    folder = tmp_path / "plain"
    folder.mkdir()
    for record_path in load_ptbxl_index(root)["record_path"].iloc[:2]:
        for suffix in (".hea", ".dat"):
            (folder / f"{Path(record_path).name}{suffix}").write_bytes((root / f"{record_path}{suffix}").read_bytes())
    out = tmp_path / "shards"
    assert main(["--data", str(folder), "--out", str(out)]) == 0
    rows = _rows(out)
    assert len(rows) == 2 and all(r["strat_fold"] is None and r["label"] is None for r in rows.values())
    assert main(["--data", str(folder), "--out", str(folder / "inside")]) == 2


def _one_row_per_file(shards: Path, target: Path) -> Path:
    """A copy of ``shards`` whose records are one row per Parquet file, so the file order is the row order."""
    shutil.copytree(shards, target)
    records = ShardLayout(target).records
    table = pads.dataset(records).to_table()
    shutil.rmtree(records)
    records.mkdir()
    for i in range(table.num_rows):
        pq.write_table(table.slice(i, 1), records / f"part-{i:03d}.parquet")
    return target


def test_training_reads_the_shard_files_in_a_new_seeded_order_every_epoch(ray_session, shards, tmp_path):
    from ray.data import DataContext

    from ecgad.ray.data import read_shards

    copy = _one_row_per_file(shards, tmp_path / "shards")
    context = DataContext.get_current()
    preserve_order = context.execution_options.preserve_order
    context.execution_options.preserve_order = True   # the order is then the file order, not task timing
    try:
        def epochs(seed: int | None, n: int = 3) -> list[list[str]]:
            dataset = read_shards(copy, ["record_id"], list(range(1, 11)), shuffle_seed=seed)
            return [[row["record_id"] for row in dataset.iter_rows()] for _ in range(n)]

        first, again, unshuffled = epochs(0), epochs(0), epochs(None, 2)
    finally:
        context.execution_options.preserve_order = preserve_order
    assert len(first[0]) == N_RECORDS - 1   # the broken record is not a prepared row
    assert all(sorted(epoch) == sorted(first[0]) for epoch in first + unshuffled)
    assert first[0] != first[1] and first[1] != first[2] and first[0] != first[2]
    assert first == again                    # seeded: a rerun reads the same orders
    assert unshuffled[0] == unshuffled[1]
