"""The whole chain on a real S3 API, locally: every path an ``s3://`` URI.

A module-scoped fixture starts moto's standalone S3 server on 127.0.0.1 (a free port) and points the standard AWS
variables at it (``AWS_ENDPOINT_URL``, keys, region) before Ray starts, so the Ray workers read them too. Then:
``ecgad synth`` -> upload -> ``jobs.preprocess`` -> ``jobs.train`` (Ray Train's storage on S3, 2 workers, 1 epoch)
-> ``jobs.evaluate`` -> ``jobs.score_archive`` (input and output on S3; the first run killed with SIGKILL once a
chunk is committed, the rerun resumes: every input exactly once) -> ``ecgad score`` and the service (Ray Serve)
loading their checkpoint from S3 (``RUN/best``, a pointer file there). Scores are compared with the local-path run
of the same checkpoint.
"""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pytest

from ecgad import storage
from ecgad.checkpoint import MODELS_DIR, POINTER, load_checkpoint
from ecgad.cli import main as cli_main
from ecgad.inputs import Source, input_kind, list_inputs, list_source
from ecgad.rows import read_file
from ecgad.scoring import Scorer
from ecgad.settings import REPO_ROOT
from ecgad.validate import validate
from ecgad.preprocess import prepare
from serve.testing import free_port
from tests.conftest import RAY_TEST_INIT

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

BUCKET = "ecgad-chain"
N_RECORDS = 20
#: Variables the fixture sets for the test and the Ray workers it starts.
AWS_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def _wait_until_up(url: str, server: subprocess.Popen, limit_s: float = 60.0) -> None:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"moto server exited with {server.returncode}")
        try:
            httpx.get(url, timeout=2.0)
            return
        except httpx.HTTPError:
            time.sleep(0.2)
    raise RuntimeError(f"moto server not answering at {url}")


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """moto's S3 server, the AWS variables pointing at it, a bucket, and a private checkpoint cache; a Ray session
    started after the variables are set. Yields the bucket's URI."""
    import ray

    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    variables = {**AWS_ENV, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
                 "ECGAD_CACHE_DIR": str(tmp_path_factory.mktemp("cache"))}
    previous = {name: os.environ.get(name) for name in variables}
    os.environ.update(variables)
    try:
        _wait_until_up(variables["AWS_ENDPOINT_URL"], server)
        import boto3   # comes with moto

        boto3.client("s3").create_bucket(Bucket=BUCKET)   # reads the same variables
        ray.init(**RAY_TEST_INIT)
        yield f"s3://{BUCKET}"
    finally:
        ray.shutdown()
        server.terminate()
        server.wait(timeout=30)
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@pytest.fixture(scope="module")
def chain(s3, tmp_path_factory):
    """The local synthetic root, uploaded; shards, run and evaluation on S3. Returns the locations."""
    from jobs.evaluate import main as evaluate
    from jobs.preprocess import main as preprocess
    from jobs.train import main as train

    local = tmp_path_factory.mktemp("local") / "synth"
    assert cli_main(["synth", "--out", str(local), "--n", str(N_RECORDS), "--seed", "2"]) == 0
    fs, data_path = storage.filesystem(f"{s3}/synth")
    pafs.copy_files(str(local), data_path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)

    data, shards, run, evaluation = (f"{s3}/{name}" for name in ("synth", "shards", "runs/mcf", "eval"))
    assert preprocess(["--data", data, "--out", shards]) == 0
    assert train(["--data", shards, "--out", run, "--num-workers", "2", "--cpus-per-worker", "0.5",
                  "--config", "small", "--epochs", "1", "--batch-size", "4"]) == 0
    assert evaluate(["--checkpoint", f"{run}/{POINTER}", "--data", data, "--out", evaluation, "--mode", "fast",
                     "--plots", "1", "--n-boot", "10"]) == 0
    return {"local": local, "data": data, "shards": shards, "run": run, "eval": evaluation}


def _local_copy_of_version(run: str, tmp: Path) -> tuple[str, Path]:
    """The version ``RUN/best`` names on S3, and a plain local copy of its folder (the local-path run's input)."""
    version = storage.read_text(f"{run}/{POINTER}").strip().split("/")[-1]
    fs, path = storage.filesystem(f"{run}/{MODELS_DIR}/{version}")
    (tmp / version).mkdir(parents=True, exist_ok=True)
    pafs.copy_files(path, str(tmp / version), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    return version, tmp / version


def test_preprocess_and_train_write_only_to_s3(chain):
    manifest = json.loads(storage.read_text(f"{chain['shards']}/_SUCCESS.json"))
    assert manifest["counts"]["records"] == N_RECORDS and manifest["data"] == chain["data"]
    metrics = json.loads(storage.read_text(f"{chain['run']}/metrics.json"))
    version = metrics["best"]["model_version"]
    assert metrics["best"]["checkpoint"] == f"{chain['run']}/{MODELS_DIR}/{version}"
    assert storage.read_text(f"{chain['run']}/{POINTER}") == f"{MODELS_DIR}/{version}\n"   # a pointer file
    assert metrics["run"]["path"].endswith("/runs/mcf/train") and metrics["epochs"][0]["workers"] == 2
    # Ray Train kept its run (checkpoints, state) in the bucket too.
    fs, path = storage.filesystem(f"{chain['run']}/train")
    assert any(info.base_name.startswith("checkpoint_") or info.base_name.startswith("epoch-")
               for info in fs.get_file_info(pafs.FileSelector(path)))


def test_evaluate_reads_and_writes_s3_with_the_local_scores(chain, tmp_path):
    evaluated = json.loads(storage.read_text(f"{chain['eval']}/metrics.json"))
    version, local_checkpoint = _local_copy_of_version(chain["run"], tmp_path)
    assert evaluated["model_version"] == version
    assert evaluated["checkpoint"] == f"{chain['run']}/{MODELS_DIR}/{version}"
    assert "point_auroc" in json.dumps(evaluated["metrics"])   # the masks were read from S3
    assert storage.is_file(f"{chain['eval']}/roc.png")
    rows = list(csv.DictReader(io.StringIO(storage.read_text(f"{chain['eval']}/scores.csv"))))
    scorer = Scorer.from_checkpoint(local_checkpoint, mode="fast")
    local_ids = {row["record_id"]: row["path"] for row in list_inputs(chain["local"]).to_pylist()}
    scored = [row for row in rows if row["status"] == "ok"]
    assert scored
    for row in scored:
        (expected,) = scorer.score_prepared([prepare(validate(read_file(local_ids[row["record_id"]])),
                                                     scorer.prep_config)], with_maps=False)
        assert float(row["pred_score"]) == pytest.approx(expected.pred_score, rel=1e-5)


def test_archive_on_s3_killed_and_rerun_scores_every_input_once(chain, s3, tmp_path):
    archive_input, out = f"{chain['data']}/records500", f"{s3}/archive"
    command = [sys.executable, "-m", "jobs.score_archive", "--input", archive_input,
               "--checkpoint", f"{chain['run']}/{POINTER}", "--out", out, "--chunk-size", "1", "--batch-size", "1"]
    import ray

    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    first = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    records = f"{out}/records"
    try:
        deadline = time.monotonic() + 300
        while not storage.list_names(records) and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        first.send_signal(signal.SIGKILL)
    finally:
        first.wait(timeout=60)
    committed_at_kill = len(storage.list_names(records))
    assert 0 < committed_at_kill < N_RECORDS, "the kill must land mid-run"

    second = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    summary = json.loads(storage.read_text(f"{out}/summary.json"))   # stdout also carries the workers' logs
    assert summary["complete"] and summary["chunks"]["skipped"] == committed_at_kill
    assert summary["chunks"]["written"] == N_RECORDS - committed_at_kill

    fs, path = storage.filesystem(records)
    table = pads.dataset(path, filesystem=fs, format="parquet").to_table()
    paths = table.column("path").to_pylist()
    expected = [f"{archive_input}/{row['path'].split('/records500/', 1)[1]}"
                for row in list_inputs(chain["local"] / "records500").to_pylist()]
    assert len(paths) == len(set(paths)) and sorted(paths) == sorted(expected)   # every input exactly once

    _, local_checkpoint = _local_copy_of_version(chain["run"], tmp_path)
    scorer = Scorer.from_checkpoint(local_checkpoint)
    local_root = chain["local"] / "records500"
    for row in table.to_pylist():
        local_path = local_root / row["path"][len(archive_input) + 1:]
        (reference,) = scorer.score_prepared([prepare(validate(read_file(local_path)), scorer.prep_config)],
                                             with_maps=False)
        assert row["status"] == "ok" and row["pred_score"] == pytest.approx(reference.pred_score, rel=1e-5)


def test_score_loads_its_checkpoint_from_s3_like_the_local_copy(chain, tmp_path, capsys):
    version, local_checkpoint = _local_copy_of_version(chain["run"], tmp_path)
    record = str(chain["local"] / "records500" / "00000" / "00001_hr.hea")
    answers = {}
    for name, checkpoint in (("s3", f"{chain['run']}/{POINTER}"), ("local", str(local_checkpoint))):
        assert cli_main(["score", record, "--checkpoint", checkpoint, "--json"]) == 0
        captured = capsys.readouterr()
        (answers[name],) = [json.loads(line) for line in captured.out.splitlines()]
        assert f"model version {version}" in captured.err
    assert answers["s3"]["model_version"] == answers["local"]["model_version"] == version
    assert answers["s3"]["pred_score"] == pytest.approx(answers["local"]["pred_score"], rel=1e-5)
    cached = Path(os.environ["ECGAD_CACHE_DIR"]) / "checkpoints" / version
    assert load_checkpoint(cached).model_version == version   # the one local copy, under its version


def test_the_service_loads_its_checkpoint_from_s3_and_scores_like_the_local_copy(chain, tmp_path):
    from serve.testing import local_config, local_service

    version, local_checkpoint = _local_copy_of_version(chain["run"], tmp_path)
    record = read_file(chain["local"] / "records500" / "00000" / "00002_hr.hea")
    body = {"signal": record.signal.tolist(), "fs": record.fs, "record_id": "r2"}
    with local_service(f"{chain['run']}/{POINTER}", local_config(args={"mode": "fast"})) as url:
        with httpx.Client(base_url=url, timeout=120) as client:
            answer = client.post("/v1/score?map=none", json=body)
            model = client.get("/v1/model").json()
    assert answer.status_code == 200, answer.text
    assert answer.json()["model_version"] == model["model_version"] == version
    scorer = Scorer.from_checkpoint(local_checkpoint, mode="fast")
    (expected,) = scorer.score_prepared([prepare(validate(record), scorer.prep_config)], with_maps=False)
    assert answer.json()["pred_score"] == pytest.approx(expected.pred_score, rel=1e-5)


def test_a_manifest_on_s3_names_records_relative_to_it_or_by_uri(s3):
    manifest = f"{s3}/manifests/archive.csv"
    storage.put(manifest, b"path,record_id\nrecs/a.npy,\ns3://other-bucket/b.npy,bee\n./recs/c.npy,\n")
    assert input_kind(manifest) == "manifest"
    _, slices = list_source(Source("manifest", manifest), chunk_size=4)
    (listed,) = [row for table in slices for row in table.to_pylist()]
    assert listed["paths"] == [f"{s3}/manifests/recs/a.npy", "s3://other-bucket/b.npy", f"{s3}/manifests/recs/c.npy"]
    assert listed["record_ids"] == ["recs/a", "bee", "recs/c"]
