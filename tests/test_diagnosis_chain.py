"""The diagnosis chain on the real PTB-XL sample (55 records: too few for metrics, enough for the plumbing):
``jobs.preprocess`` keeps the SCP labels -> ``jobs.finetune`` (Ray Train, 2 workers, 1 epoch, small model) ->
``jobs.evaluate`` reports diagnosis metrics -> ``ecgad diagnose`` -> ``POST /v1/diagnose``.

The detector the head starts from is a random small MCF: what is tested is that every stage carries the labels,
the head and the thresholds through, and that every consumer gives the in-process `Diagnoser`'s answer.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads
import pytest

from ecgad.checkpoint import load_checkpoint
from ecgad.diagnose import Diagnoser
from ecgad.diagnosis import load_diagnosis
from ecgad.io import read_record
from ecgad.labels import parse_codes
from ecgad.shards import ShardLayout
from ecgad.validate import validate
from serve import bodies
from serve.testing import local_config, local_service, random_checkpoint, token_client

pytestmark = [pytest.mark.cluster, pytest.mark.slow]   # starts Ray and Serve

LEVEL = "superdiag"
RECORD = "records500/06000/06000_hr"
TOKEN = "diagnosis-test-token"


@pytest.fixture(scope="module")
def chain(ray_session, sample_data, tmp_path_factory) -> dict[str, Path]:
    from jobs import finetune, preprocess

    tmp = tmp_path_factory.mktemp("diagnosis")
    paths = {"data": sample_data / "ptbxl", "shards": tmp / "shards", "run": tmp / "run",
             "detector": random_checkpoint(tmp / "detector")}
    assert preprocess.main(["--data", str(paths["data"]), "--out", str(paths["shards"])]) == 0
    assert finetune.main(["--data", str(paths["shards"]), "--pretrained", str(paths["detector"]), "--labels", LEVEL,
                          "--out", str(paths["run"]), "--num-workers", "2", "--cpus-per-worker", "0.5",
                          "--epochs", "1", "--batch-size", "8"]) == 0
    return paths


def test_shards_carry_the_statements(chain):
    layout = ShardLayout(chain["shards"])
    manifest = layout.require_manifest()
    assert manifest["labels"]["classes"][LEVEL] == ["CD", "HYP", "MI", "NORM", "STTC"]
    assert layout.statements.is_file()
    codes = pads.dataset(layout.records, format="parquet").to_table(columns=["scp_codes"]).column(0).to_pylist()
    assert len(codes) == 55 and all(parse_codes(c) for c in codes)


def test_finetune_publishes_detector_and_head(chain):
    checkpoint, net = load_diagnosis(chain["run"] / "best")
    entry = checkpoint.diagnosis
    assert entry["level"] == LEVEL and len(entry["thresholds"]) == len(entry["classes"]) == 5
    assert entry["pretrained"]["path"] == str(Path(chain["detector"]).resolve())
    detector = load_checkpoint(chain["detector"])   # weights.pt is the detector, unchanged: it still scores
    assert checkpoint.model_version.split("-")[0] == detector.model_version.split("-")[0]
    assert checkpoint.threshold == detector.threshold
    summary = json.loads((chain["run"] / "metrics.json").read_text())
    assert summary["best"]["model_version"] == checkpoint.model_version
    assert summary["settings"]["split"]["tail"] and summary["epochs"][0]["val_records"] > 0


def test_evaluate_diagnose_and_serve_agree(chain, tmp_path):
    from ecgad import cli
    from jobs import evaluate

    assert evaluate.main(["--checkpoint", str(chain["run"] / "best"), "--data", str(chain["data"]), "--fold", "9",
                          "--out", str(tmp_path / "eval"), "--n-boot", "20", "--plots", "0"]) == 0
    diagnosis = json.loads((tmp_path / "eval" / "metrics.json").read_text())["metrics"]["diagnosis"]
    assert diagnosis["level"] == LEVEL and set(diagnosis["per_class"]) == {"CD", "HYP", "MI", "NORM", "STTC"}
    assert set(diagnosis["macro_auroc"]) == {"all", "head", "tail"} and diagnosis["records"] > 0

    record = validate(read_record(chain["data"] / RECORD))
    (expected_scores, expected), = Diagnoser(chain["run"] / "best").diagnose_records([record])
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli.main(["diagnose", str(chain["data"] / f"{RECORD}.hea"), "--checkpoint",
                         str(chain["run"] / "best"), "--json"]) == 0
    answer = json.loads(out.getvalue().splitlines()[-1])
    assert answer["labels"] == expected.labels and answer["level"] == LEVEL
    assert answer["probabilities"] == pytest.approx(expected.probabilities, abs=1e-6)
    assert answer["pred_score"] == pytest.approx(expected_scores.pred_score, rel=1e-6)

    buffer = io.BytesIO()
    np.save(buffer, record.signal)
    with local_service(chain["run"] / "best", local_config(token=TOKEN)) as url, token_client(url, TOKEN) as client:
        response = client.post("/v1/diagnose", content=buffer.getvalue(), params={"fs": record.fs},
                               headers={"Content-Type": bodies.NPY_TYPE})
        info = client.get("/v1/model").json()   # what the viewer asks before it shows diagnoses
    assert info["diagnosis"] == {"level": LEVEL, "classes": ["CD", "HYP", "MI", "NORM", "STTC"]}
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["diagnosis"]["labels"] == expected.labels
    assert body["diagnosis"]["probabilities"] == pytest.approx(expected.probabilities, abs=1e-5)
    assert body["pred_score"] == pytest.approx(expected_scores.pred_score, rel=1e-5) and body["anomaly_map"]


def test_archive_rows_carry_the_diagnosis(chain, tmp_path):
    from jobs import score_archive

    best = chain["run"] / "best"
    assert score_archive.main(["--input", str(chain["data"] / "records500"), "--checkpoint", str(best),
                               "--out", str(tmp_path / "archive"), "--diagnose", "--chunk-size", "8"]) == 0
    rows = {r["record_id"]: r for r in pads.dataset(tmp_path / "archive" / "records", format="parquet")
            .to_table().to_pylist()}
    assert len(rows) == 5 and all(r["status"] == "ok" for r in rows.values())
    record = validate(read_record(chain["data"] / RECORD))
    (_, expected), = Diagnoser(best).diagnose_records([record], with_maps=False)
    row = next(r for r in rows.values() if r["record_id"].endswith("06000_hr"))
    assert row["diagnosis_labels"] == expected.labels
    assert json.loads(row["diagnosis_probabilities"]) == pytest.approx(expected.probabilities, abs=1e-6)
    assert score_archive.main(["--input", str(chain["data"] / "records500"), "--checkpoint",
                               str(chain["detector"]), "--out", str(tmp_path / "detector-only"), "--diagnose"]) == 2
