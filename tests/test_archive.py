"""Archive scoring (``jobs.score_archive`` / ``ecgad.ray.archive``): every input exactly once with the right status,
scores equal to the in-process `Scorer`'s, fault isolation, and resuming after a failure without duplicates or gaps.

The archive mixes real records (PTB-XL at 500 and 100 Hz, CinC ``.mat``, a 38 s PTB record at 1000 Hz), synthetic
NPY and CSV files, and corrupted copies; expected outcomes come from the in-process path (io -> validate ->
prepare -> Scorer) and, for corrupted files, from ``tests/corrupt.py``'s reasons.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
import torch

from ecgad.archive import ArchiveLayout
from ecgad.checkpoint import save_checkpoint
from ecgad.config import PrepConfig
from ecgad.io import read_record
from ecgad.model import MCF, MCFConfig
from ecgad.preprocess import prepare
from ecgad.inputs import list_record_files
from ecgad.ray.data import list_chunks, prepare_chunks
from ecgad.ray.scoring import ScorerActor
from ecgad.results import MAP_SCHEMA, RESULT_SCHEMA, table_from_ipc
from ecgad.rows import failure_fields, prepare_path
from ecgad.scoring import Scorer
from ecgad.settings import REPO_ROOT
from ecgad.synth import generate_ecg
from ecgad.types import LEADS, Rejection
from ecgad.validate import validate
from jobs.score_archive import main
from tests.corrupt import CORRUPTIONS, random_bytes

pytestmark = pytest.mark.cluster  # starts Ray (see pyproject.toml's markers)

SAMPLE_RECORDS = ("ptbxl/records500/06000/06000_hr", "ptbxl/records100/00000/00001_lr",
                  "other_12lead/cinc2021_georgia/E07503", "other_12lead/cinc2021_chapman_ningbo/JS20000",
                  "other_12lead/ptbdb/s0010_re")
CORRUPT = ("nan", "flat_lead", "truncated_dat", "extra_channel_in_header", "single_lead", "short_record",
           "non_numeric_fs", "empty_file")
NPY_FS = 500.0


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    config = MCFConfig.small()
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "small", MCF(config), config, PrepConfig(), 0.5)


def _write_csv(path: Path, signal: np.ndarray, fs: float) -> None:
    with open(path, "w") as fh:
        fh.write(f"# fs={fs:g}\n{','.join(LEADS)}\n")
        np.savetxt(fh, signal.T, delimiter=",", fmt="%.5f")


@pytest.fixture(scope="module")
def archive(tmp_path_factory, sample_data) -> tuple[Path, dict[str, str]]:
    """A mixed folder tree, and the expected rejection reason of each corrupted file (by path)."""
    root = tmp_path_factory.mktemp("archive")
    for rel in SAMPLE_RECORDS:
        (root / "real" / rel).parent.mkdir(parents=True, exist_ok=True)
        for file in (sample_data / rel).parent.glob(f"{Path(rel).name}.*"):
            shutil.copy(file, root / "real" / Path(rel).parent / file.name)
    synth = root / "synth"
    synth.mkdir()
    for seed, anomaly in ((1, None), (2, "pvc")):
        np.save(synth / f"npy_{seed}.npy", generate_ecg(seed, anomaly).signal)
    for seed, anomaly in ((3, None), (4, "st_elevation")):
        ecg = generate_ecg(seed, anomaly, fs=250.0, duration_s=12.0)
        _write_csv(synth / f"csv_{seed}.csv", ecg.signal, ecg.fs)
    source = sample_data / "ptbxl/records500/06000/06000_hr"
    expected = {}
    for name in CORRUPT:
        path = CORRUPTIONS[name].write(source, root / "corrupt" / name)
        expected[str(list_record_files(path.parent)[0])] = CORRUPTIONS[name].reason
    expected[str(random_bytes(source, root / "corrupt" / "random_npy", ".npy"))] = "bad_file:unreadable"
    return root, expected


def _in_process(path: str, scorer: Scorer, with_maps: bool = True):
    """The reference outcome of one file: ``(reason, Scores | None)``."""
    try:
        record = read_record(path, fs=NPY_FS if path.endswith(".npy") else None)
        prepared = prepare(validate(record), scorer.prep_config)
    except Rejection as rejection:
        return rejection.reason, None
    return "", scorer.score_prepared([prepared], with_maps=with_maps)[0]


def _records(out: Path) -> pa.Table:
    return pads.dataset(out / "records", format="parquet").to_table()


def _assert_exactly_once(table: pa.Table, inputs: list[str]) -> None:
    paths = table.column("path").to_pylist()
    assert len(paths) == len(set(paths)), "duplicated records"
    assert sorted(paths) == sorted(inputs), "missing or unexpected records"
    assert len(set(table.column("record_id").to_pylist())) == len(paths), "record ids not unique"


def test_mixed_archive_every_input_once_scores_match_in_process(ray_session, archive, checkpoint, tmp_path):
    root, corrupt_reasons = archive
    out = tmp_path / "out"
    assert main(["--input", str(root), "--checkpoint", str(checkpoint), "--out", str(out), "--maps",
                 "--chunk-size", "4", "--batch-size", "3", "--fs", str(NPY_FS)]) == 0

    table = _records(out)
    assert table.schema.equals(RESULT_SCHEMA)
    inputs = [str(p) for p in list_record_files(root)]
    _assert_exactly_once(table, inputs)

    scorer = Scorer.from_checkpoint(checkpoint)
    maps = {row["record_id"]: row for row in pads.dataset(out / "maps", format="parquet").to_table().to_pylist()}
    n_ok = 0
    for row in table.to_pylist():
        reason, scores = _in_process(row["path"], scorer)
        assert row["model_version"] == scorer.model_version
        if row["path"] in corrupt_reasons:
            assert (row["status"], row["reason"]) == ("rejected", corrupt_reasons[row["path"]]), row["path"]
        if scores is None:
            assert (row["status"], row["reason"]) == ("rejected", reason), row["path"]
            assert row["pred_score"] is None and row["record_id"] not in maps
            continue
        n_ok += 1
        assert (row["status"], row["reason"]) == ("ok", ""), row["path"]
        assert row["pred_score"] == pytest.approx(scores.pred_score, rel=1e-5)
        assert row["pred_label"] == scores.pred_label
        assert (row["beats_used"], row["windows_scored"]) == (scores.beats_used, scores.windows_scored)
        stored = maps[row["record_id"]]
        anomaly_map = np.asarray(stored["anomaly_map"], np.float32).reshape(stored["n_leads"], stored["n_samples"])
        assert anomaly_map.shape == scores.anomaly_map.shape      # the record's own time axis
        np.testing.assert_allclose(anomaly_map, scores.anomaly_map, rtol=2e-3, atol=1e-4)  # float16 storage
    assert n_ok == len(SAMPLE_RECORDS) + 4 and len(maps) == n_ok

    assert pq.read_schema(next((out / "maps").glob("*.parquet"))).equals(MAP_SCHEMA)
    assert pq.ParquetFile(next((out / "maps").glob("*.parquet"))).metadata.row_group(0).column(4).compression \
        == "ZSTD"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["complete"] and summary["records"] == summary["inputs"] == len(inputs)
    assert summary["by_status"] == {"ok": n_ok, "rejected": len(inputs) - n_ok}
    assert summary["by_reason"]["rejected:flat_lead"] == 1 and summary["records_per_s"] > 0

    # A rerun of a finished job does nothing; one with other settings is refused rather than mixing outputs.
    assert main(["--input", str(root), "--checkpoint", str(checkpoint), "--out", str(out), "--maps",
                 "--chunk-size", "4", "--batch-size", "3", "--fs", str(NPY_FS)]) == 0
    assert json.loads((out / "summary.json").read_text())["chunks"]["written"] == 0
    assert main(["--input", str(root), "--checkpoint", str(checkpoint), "--out", str(out), "--maps",
                 "--chunk-size", "4", "--mode", "fast", "--fs", str(NPY_FS)]) == 2


def test_failed_run_resumes_without_duplicates_or_gaps(ray_session, archive, checkpoint, tmp_path):
    root, _ = archive
    out = tmp_path / "out"
    args = ["--input", str(root), "--checkpoint", str(checkpoint), "--out", str(out), "--maps", "--mode", "fast",
            "--chunk-size", "2", "--fs", str(NPY_FS)]
    # The failing run is a job process of its own on this module's cluster, as a failed job is (see
    # ``ecgad.ray.archive._execute`` on why an in-process failure under pytest's log capture would hold its actors).
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    failed = subprocess.run([sys.executable, "-m", "jobs.score_archive", *args, "--fail-after-chunks", "2"],
                            cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert failed.returncode == 1 and "InjectedFailure" in failed.stderr, failed.stderr[-3000:]
    layout = ArchiveLayout(out)
    committed = layout.committed_chunks()
    planned = len(list_chunks(root, 2).take_all())
    assert 2 <= len(committed) < planned
    # What a kill leaves behind: a half-written temporary, and a chunk whose maps were committed but not its records.
    (layout.records / ".chunk-0000.parquet.deadbeef.tmp").write_bytes(b"PAR1 half a file")
    redo = sorted(committed)[0]
    (layout.records / layout.chunk_name(redo)).unlink()

    assert main(args) == 0
    table = _records(out)
    _assert_exactly_once(table, [str(p) for p in list_record_files(root)])
    assert not list(layout.records.glob(".*.tmp"))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["complete"] and summary["chunks"]["skipped"] == len(committed) - 1
    assert summary["chunks"]["written"] == planned - len(committed) + 1
    map_ids = pads.dataset(out / "maps", format="parquet").to_table(columns=["record_id"]).column(0).to_pylist()
    ok_ids = table.filter(pa.compute.equal(table.column("status"), "ok")).column("record_id").to_pylist()
    assert sorted(map_ids) == sorted(ok_ids)


def test_manifest_input(ray_session, archive, checkpoint, tmp_path, sample_data):
    root, _ = archive
    listed = ["synth/npy_1.npy", "synth/csv_3.csv", "corrupt/flat_lead/corrupt.hea", "synth/missing.npy"]
    absolute = str(sample_data / "ptbxl/records500/06000/06002_hr.hea")
    manifest = root / "manifest.parquet"
    pq.write_table(pa.table({"path": listed + [absolute], "record_id": [f"m{i}" for i in range(5)]}), manifest)
    out = tmp_path / "out"
    assert main(["--input", str(manifest), "--checkpoint", str(checkpoint), "--out", str(out), "--mode", "fast",
                 "--fs", str(NPY_FS)]) == 0
    rows = {row["record_id"]: row for row in _records(out).to_pylist()}
    assert sorted(rows) == ["m0", "m1", "m2", "m3", "m4"]
    assert [rows[f"m{i}"]["path"] for i in range(4)] == [str(root / p) for p in listed]
    assert [rows[f"m{i}"]["status"] for i in range(5)] == ["ok", "ok", "rejected", "rejected", "ok"]
    assert rows["m2"]["reason"] == "flat_lead:V3" and rows["m3"]["reason"].startswith("bad_file")
    scorer = Scorer.from_checkpoint(checkpoint, mode="fast")
    assert rows["m4"]["pred_score"] == pytest.approx(_in_process(absolute, scorer, False)[1].pred_score, rel=1e-5)


def test_csv_manifest_and_ptbxl_root_listing(ray_session, archive, sample_data):
    root, _ = archive
    manifest = root / "manifest.csv"
    manifest.write_text("path,label\nsynth/npy_1.npy,a\nsynth/csv_3.csv,b\nsynth/npy_2.npy,c\n")
    chunks = list_chunks(manifest, 2).take_all()
    assert [list(c["record_ids"]) for c in chunks] == [["synth/npy_1", "synth/csv_3"], ["synth/npy_2"]]
    assert chunks == list_chunks(manifest, 2).take_all()   # chunk ids are deterministic
    # A PTB-XL root scores one file per ECG (its index's choice of rate), never both rates of one record.
    ptbxl = list_chunks(sample_data / "ptbxl", 16).take_all()
    ids = [r for c in ptbxl for r in c["record_ids"]]
    assert len(ids) == len(set(ids)) == 55 and all(i.startswith("records") for i in ids)


# -- fault isolation and commits, in process ---------------------------------------------------------------------

def test_failure_fields_keep_rejections_typed_and_name_unexpected_errors():
    assert failure_fields(Rejection("flat_lead", "V3")) == {"status": "rejected", "reason": "flat_lead:V3"}
    assert failure_fields(ZeroDivisionError("division by zero")) == {
        "status": "error", "reason": "ZeroDivisionError: division by zero"}


def test_unexpected_exception_in_a_record_becomes_an_error_row(monkeypatch, sample_data):
    def broken_reader(path, default_fs, limits):
        raise KeyError("boom")

    monkeypatch.setattr("ecgad.rows.read_file", broken_reader)
    row = prepare_path("x.hea", "x", PrepConfig())
    assert (row["status"], row["reason"], row["path"]) == ("error", "KeyError: 'boom'", "x.hea")


def test_a_record_that_breaks_the_model_costs_only_itself(ray_session, checkpoint, sample_data):
    paths = [str(sample_data / f"ptbxl/records500/06000/{i}_hr.hea") for i in ("06000", "06002", "06004")]
    batch = pa.table({"chunk": ["c"], "paths": [paths], "record_ids": [["a", "bad", "c"]]})
    prepared = table_from_ipc(prepare_chunks(batch, PrepConfig(), None).column("prepared")[0])
    actor = ScorerActor(str(checkpoint), mode="fast", device="cpu", with_maps=False, batch_size=3,
                        threads=torch.get_num_threads())
    score = actor.scorer.score_prepared

    def fragile(records, with_maps=True):
        if any(r.record_id == "bad" for r in records):
            raise FloatingPointError("model blew up")
        return score(records, with_maps)

    actor.scorer.score_prepared = fragile
    results, _ = actor.score_chunk(prepared)
    rows = results.to_pylist()
    assert [r["status"] for r in rows] == ["ok", "error", "ok"]
    assert rows[1]["reason"] == "FloatingPointError: model blew up"
    assert rows[0]["pred_score"] == pytest.approx(
        _in_process(paths[0], Scorer.from_checkpoint(checkpoint, mode="fast"), False)[1].pred_score, rel=1e-5)


def test_commit_is_atomic_and_temporaries_are_never_read(tmp_path):
    layout = ArchiveLayout(tmp_path)
    layout.commit(pa.table({"x": [1, 2]}), layout.records / layout.chunk_name("a"))
    (layout.records / ".chunk-b.parquet.1234abcd.tmp").write_bytes(b"half")
    assert layout.committed_chunks() == {"a"}
    assert pads.dataset(layout.records, format="parquet").to_table().num_rows == 2
    assert layout.remove_partial_files() == 1 and layout.committed_chunks() == {"a"}
