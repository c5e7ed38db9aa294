"""Hostile input at the archive job (issue 13): a record that kills its worker gets finite tries and an ``error``
row while its chunk commits (finding 3), and the generated fuzz corpus (`tests.fuzz_corpus`) scored as an archive
by ``python -m jobs.score_archive`` gets exactly one typed row per input, without a crash ("must show" c).

One Ray session for the module, started with the prepare stage's kill hook armed for one file name
(`ecgad.ray.data.KILL_ON_FILE_ENV`: Ray workers take their environment from the session), and jobs run as processes
of their own on it, each with a timeout: before the fix, the killing record was retried forever.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pytest
import torch

from ecgad.checkpoint import save_checkpoint
from ecgad.config import PrepConfig
from ecgad.inputs import list_record_files
from ecgad.model import MCF, MCFConfig
from ecgad.ray.data import KILL_ON_FILE_ENV
from ecgad.settings import REPO_ROOT
from ecgad.synth import generate_ecg
from ecgad.types import REJECTION_CODES
from tests.conftest import RAY_TEST_INIT
from tests.fuzz_corpus import corpus, hospital_seed_files

pytestmark = pytest.mark.cluster  # starts Ray and job processes (see pyproject.toml's markers)

KILLER = "kill-me.npy"
JOB_TIMEOUT_S = 600


@pytest.fixture(scope="module")
def ray_address():
    import ray

    with pytest.MonkeyPatch.context() as env:
        env.setenv(KILL_ON_FILE_ENV, KILLER)
        ray.init(**RAY_TEST_INIT)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    config = MCFConfig.small()
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "small", MCF(config), config, PrepConfig(), 0.5)


def _score_archive(address: str, root: Path, checkpoint: Path, out: Path, *extra: str) -> dict:
    """Run the job as its own process on the module's cluster; returns its summary (asserting it succeeded)."""
    env = {**os.environ, "RAY_ADDRESS": address}
    job = subprocess.run([sys.executable, "-m", "jobs.score_archive", "--input", str(root), "--checkpoint",
                          str(checkpoint), "--out", str(out), "--mode", "fast", "--fs", "500", *extra],
                         cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=JOB_TIMEOUT_S)
    assert job.returncode == 0, job.stderr[-4000:]
    return json.loads((out / "summary.json").read_text())


def _rows(out: Path) -> list[dict]:
    return pads.dataset(out / "records", format="parquet").to_table(
        columns=["path", "record_id", "status", "reason"]).to_pylist()


def test_a_record_that_kills_its_worker_gets_an_error_row_and_its_chunk_commits(ray_address, checkpoint,
                                                                                tmp_path):
    root = tmp_path / "in"
    root.mkdir()
    for seed in (1, 2, 3):
        np.save(root / f"good_{seed}.npy", generate_ecg(seed, None).signal)
    np.save(root / KILLER, generate_ecg(4, None).signal)
    summary = _score_archive(ray_address, root, checkpoint, tmp_path / "out", "--chunk-size", "8")
    assert summary["complete"] and summary["records"] == 4
    rows = {Path(row["path"]).name: row for row in _rows(tmp_path / "out")}
    assert rows[KILLER]["status"] == "error" and rows[KILLER]["reason"].startswith("worker_died"), rows[KILLER]
    assert all(rows[f"good_{seed}.npy"]["status"] == "ok" for seed in (1, 2, 3))


def test_the_fuzz_corpus_as_an_archive_gets_one_typed_row_per_input(ray_address, checkpoint, sample_data,
                                                                    tmp_path):
    root = tmp_path / "corpus"
    for i, case in enumerate(corpus(seed_files=hospital_seed_files(sample_data))):
        case.write(root / case.family, prefix=f"{i:03d}-")      # a folder per family: a few sources, few chunks
    inputs = sorted(str(path) for path in list_record_files(root))
    assert len(inputs) >= 250

    summary = _score_archive(ray_address, root, checkpoint, tmp_path / "out")
    rows = _rows(tmp_path / "out")
    assert summary["complete"] and summary["inputs"] == len(inputs) == len(rows)
    assert sorted(row["path"] for row in rows) == inputs, "missing, unexpected or duplicated records"
    untyped = [(row["path"], row["reason"]) for row in rows if row["status"] == "error"
               or (row["status"] == "rejected" and row["reason"].split(":")[0] not in REJECTION_CODES)]
    assert untyped == []
    statuses = pa.array([row["status"] for row in rows]).value_counts().to_pylist()
    assert {entry["values"] for entry in statuses} <= {"ok", "rejected"}
