"""The scoring service over real HTTP on 127.0.0.1: one Serve application for the whole module, started from
``serve/config.yaml`` through `run_local` (one fixed replica per deployment, small queues, a required token).

What it shows: the three body formats give the in-process `Scorer`'s score and a map on the input's own axis; every
corrupted record of `tests.corrupt` gets its typed 422 and the service keeps serving; limits (413, 401, 415, 503 on
overload) hold; a killed model replica is replaced and requests succeed again. Tests run in file order; the
destructive ones (overload, replica kill) come last.
"""

from __future__ import annotations

import asyncio
import io
import json
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from ecgad.io import read_record
from ecgad.types import LEADS, REJECTION_CODES
from ecgad.validate import validate
from serve import bodies
from serve.testing import local_config, local_service, random_checkpoint, token_client
from tests.corrupt import CORRUPTIONS

pytestmark = pytest.mark.cluster  # starts Ray (see pyproject.toml's markers)

TOKEN = "test-token"
MAX_BODY_MB = 16
#: Small queues so that a modest burst overflows them (the overload test), one fixed replica per deployment.
INGRESS = {"max_ongoing_requests": 6, "max_queued_requests": 6}
MODEL = {"max_ongoing_requests": 2, "max_queued_requests": 2,
         "user_config": {"max_batch_size": 2, "batch_wait_timeout_s": 0.01}}
RECORDS = {
    "ptbxl_100hz": "ptbxl/records100/00000/00001_lr",
    "ptbxl_500hz": "ptbxl/records500/06000/06000_hr",
    "cinc_mat": "other_12lead/cinc2021_georgia/E07501",
    "ptbdb_1000hz_15ch_38s": "other_12lead/ptbdb/s0010_re",
}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return random_checkpoint(tmp_path_factory.mktemp("serve") / "checkpoint", seed=0)


@pytest.fixture(scope="module")
def service(ray_session, checkpoint):
    config = local_config(args={"mode": "fast", "max_body_mb": MAX_BODY_MB, "cpu_threads": 2}, ingress=INGRESS,
                          model=MODEL, token=TOKEN, http={"request_timeout_s": 60})
    with local_service(checkpoint, config) as url:
        yield url


@pytest.fixture(scope="module")
def client(service):
    with token_client(service, TOKEN) as c:
        yield c


@pytest.fixture(scope="module")
def scorer(checkpoint):
    """The in-process reference: the same checkpoint and mode as the service."""
    from ecgad.scoring import Scorer

    return Scorer.from_checkpoint(checkpoint, device="cpu", mode="fast")


def _npy(signal: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.asarray(signal, dtype=np.float32))
    return buffer.getvalue()


def _wfdb_files(base: Path) -> list[tuple[str, tuple[str, bytes]]]:
    """Every file of a WFDB record (header, signal files, PTB's .xyz), as multipart ``files`` parts."""
    return [("files", (p.name, p.read_bytes())) for p in sorted(base.parent.glob(base.name + ".*"))]


def _good_request(client: httpx.Client, sample_data: Path) -> httpx.Response:
    record = read_record(sample_data / RECORDS["ptbxl_500hz"])
    return client.post("/v1/score", params={"fs": record.fs, "map": "none"}, content=_npy(record.signal),
                       headers={"Content-Type": bodies.NPY_TYPE})


# --- probes, metadata, docs ---------------------------------------------------------------------------------------

def test_probes_model_info_and_docs(service, client):
    assert httpx.get(f"{service}/healthz").json() == {"status": "ok"}
    ready = httpx.get(f"{service}/readyz", timeout=60)
    assert ready.status_code == 200 and ready.json()["status"] == "ready"
    info = client.get("/v1/model").json()
    assert info["mode"] == "fast" and info["threshold"] == 1.0 and info["git_commit"]
    assert info["model_version"] == ready.json()["model_version"]
    assert info["batching"] == MODEL["user_config"]
    assert info["device"] == "cpu" and info["cpu_threads"] == 2   # the app's cpu_threads, not Ray's 1 thread
    assert httpx.get(f"{service}/docs").status_code == 200
    spec = httpx.get(f"{service}/openapi.json").json()
    body_types = spec["paths"]["/v1/score"]["post"]["requestBody"]["content"]
    assert set(body_types) == {bodies.JSON_TYPE, bodies.NPY_TYPE, bodies.MULTIPART_TYPE}
    viewer = httpx.get(f"{service}/")
    assert viewer.status_code == 200 and "v1/score/plot" in httpx.get(f"{service}/static/app.js").text


def test_token_required(service, client):
    assert httpx.get(f"{service}/v1/model").status_code == 401
    wrong = httpx.post(f"{service}/v1/score", json={}, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and wrong.headers["www-authenticate"] == "Bearer"
    assert client.get("/v1/model").status_code == 200


# --- scoring: three body formats, same numbers as in process ----------------------------------------------------

@pytest.mark.parametrize("body", ["json", "npy", "multipart"])
@pytest.mark.parametrize("name", list(RECORDS))
def test_scores_match_in_process(client, scorer, sample_data, name, body):
    base = sample_data / RECORDS[name]
    record = validate(read_record(base))
    (expected,) = scorer.score_records([record])
    if body == "json":
        response = client.post("/v1/score", json={"signal": record.signal.tolist(), "fs": record.fs,
                                                  "lead_names": list(record.lead_names), "record_id": name})
    elif body == "npy":
        response = client.post("/v1/score", content=_npy(record.signal), params={"record_id": name},
                               headers={"Content-Type": bodies.NPY_TYPE, "X-ECG-FS": str(record.fs),
                                        "X-ECG-Leads": ",".join(record.lead_names)})
    else:
        response = client.post("/v1/score", files=_wfdb_files(base))
    assert response.status_code == 200, response.text
    result = response.json()
    assert result["pred_score"] == pytest.approx(expected.pred_score, rel=1e-5)
    assert result["pred_label"] == expected.pred_label
    anomaly_map = np.asarray(result["anomaly_map"], dtype=np.float32)
    assert anomaly_map.shape == (len(LEADS), record.n_samples) == expected.anomaly_map.shape
    np.testing.assert_allclose(anomaly_map, expected.anomaly_map, rtol=1e-4, atol=1e-6 * expected.anomaly_map.max())
    assert result["r_peaks"] == expected.r_peaks.tolist()
    assert result["beats_used"] == expected.beats_used and result["windows_scored"] == expected.windows_scored
    assert result["map_step"] == 1 and result["threshold"] == 1.0 and result["model_version"]


def test_map_options(client, sample_data):
    record = read_record(sample_data / RECORDS["ptbxl_500hz"])
    headers = {"Content-Type": bodies.NPY_TYPE}
    full = client.post("/v1/score", params={"fs": 500}, content=_npy(record.signal), headers=headers).json()
    none = client.post("/v1/score", params={"fs": 500, "map": "none"}, content=_npy(record.signal),
                       headers=headers).json()
    down = client.post("/v1/score", params={"fs": 500, "map": "downsample=7"}, content=_npy(record.signal),
                       headers=headers).json()
    assert none["anomaly_map"] is None and none["map_step"] is None
    assert none["pred_score"] == pytest.approx(full["pred_score"], rel=1e-5)
    assert np.shape(down["anomaly_map"]) == (12, -(-5000 // 7)) and down["map_step"] == 7
    np.testing.assert_allclose(down["anomaly_map"], bodies.shape_map(np.asarray(full["anomaly_map"]), 7), rtol=1e-5)
    assert client.post("/v1/score", params={"map": "half"}, json={}).status_code == 400


def test_plot(client, sample_data):
    response = client.post("/v1/score/plot", files=_wfdb_files(sample_data / RECORDS["ptbxl_100hz"]))
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    assert response.content.startswith(b"\x89PNG\r\n\x1a\n")
    assert response.headers["x-ecg-label"] in ("normal", "anomalous") and float(response.headers["x-ecg-score"]) > 0


# --- rejections and limits --------------------------------------------------------------------------------------

def test_every_corruption_gets_its_422(client, sample_data, tmp_path):
    source = sample_data / RECORDS["ptbxl_500hz"]
    for name, case in CORRUPTIONS.items():
        path = case.write(source, tmp_path / name)
        response = client.post("/v1/score", files=[("files", (p.name, p.read_bytes()))
                                                   for p in sorted(path.parent.iterdir())])
        assert response.status_code == 422, (name, response.text)
        detail = response.json()["detail"]
        assert detail["reason"] == case.reason, name
        assert detail["code"] in REJECTION_CODES and detail["message"]
    assert _good_request(client, sample_data).status_code == 200


def test_body_level_rejections(client, sample_data):
    signal = read_record(sample_data / RECORDS["ptbxl_500hz"]).signal
    npy = {"Content-Type": bodies.NPY_TYPE}
    cases = {
        "bad_file": client.post("/v1/score", content=b"{not json", headers={"Content-Type": bodies.JSON_TYPE}),
        "bad_fs": client.post("/v1/score", json={"signal": signal[:, :10].tolist()}),
        "bad_shape": client.post("/v1/score", json={"signal": [[0.0, 1.0], [2.0]], "fs": 500}),
        "nan": client.post("/v1/score", headers={"Content-Type": bodies.JSON_TYPE},
                           content=json.dumps({"signal": np.where(np.arange(5000) == 9, np.nan, signal).tolist(),
                                               "fs": 500}).encode()),
        "too_short": client.post("/v1/score", params={"fs": 500}, content=_npy(signal[:, :2500]), headers=npy),
        "unknown_lead": client.post("/v1/score", params={"fs": 500, "lead_names": ",".join([*LEADS[:11], "foo"])},
                                    content=_npy(signal), headers=npy),
    }
    for code, response in cases.items():
        assert response.status_code == 422 and response.json()["detail"]["code"] == code, (code, response.text)
    missing_fs = client.post("/v1/score", content=_npy(signal), headers=npy)
    assert missing_fs.json()["detail"]["reason"] == "bad_fs:missing"
    not_npy = client.post("/v1/score", params={"fs": 500}, content=b"\x93NUMPY garbage", headers=npy)
    assert not_npy.json()["detail"]["reason"] == "bad_file:npy"
    two_records = client.post("/v1/score", files=[("files", ("a.csv", b"1")), ("files", ("b.csv", b"2"))])
    assert two_records.json()["detail"]["reason"] == "bad_file:upload"
    script = client.post("/v1/score", files=[("files", ("run.sh", b"#!/bin/sh"))])
    assert script.json()["detail"]["reason"] == "bad_file:upload"
    no_boundary = client.post("/v1/score", content=b"--x\r\n", headers={"Content-Type": "multipart/form-data"})
    assert no_boundary.json()["detail"]["reason"] == "bad_file:multipart", no_boundary.text
    assert client.post("/v1/score", content=b"a,b", headers={"Content-Type": "text/csv"}).status_code == 415


def test_oversize_body_413(client):
    limit = MAX_BODY_MB * 2**20
    announced = client.post("/v1/score", content=b"0" * (limit + 1), headers={"Content-Type": bodies.NPY_TYPE})
    assert announced.status_code == 413

    def chunks():   # no Content-Length: the limit must hold while reading
        for _ in range(MAX_BODY_MB + 1):
            yield b"0" * 2**20

    streamed = client.post("/v1/score", content=chunks(), headers={"Content-Type": bodies.NPY_TYPE})
    assert streamed.status_code == 413
    assert client.get("/v1/model").status_code == 200


def test_check_health_fails_when_the_model_cannot_score(checkpoint):
    """The replica's health check, in process: passes with a working model, fails once scoring yields NaN."""
    from serve.app import ECGModel

    replica = ECGModel.func_or_class(checkpoint=str(checkpoint), mode="fast", device="cpu")
    asyncio.run(replica.check_health())
    for parameter in replica.scorer.model.parameters():
        parameter.data.fill_(float("nan"))
    with pytest.raises(RuntimeError, match="canned ECG"):
        asyncio.run(replica.check_health())


# --- overload and replica failure (destructive: last) -------------------------------------------------------------

async def _burst(url: str, body: bytes, n: int) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=n)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits,
                                 headers={"Authorization": f"Bearer {TOKEN}"}) as c:
        async def one() -> httpx.Response:
            return await c.post("/v1/score", params={"fs": 500, "map": "none"}, content=body,
                                headers={"Content-Type": bodies.NPY_TYPE})
        return await asyncio.gather(*(one() for _ in range(n)))


def test_overload_gets_503_not_hangs(service, client, sample_data):
    signal = read_record(sample_data / RECORDS["ptbxl_500hz"]).signal
    started = time.monotonic()
    responses = asyncio.run(_burst(service, _npy(signal), 48))
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 503}, statuses
    assert statuses.count(200) > 0, statuses
    # Both queues overflow: the ingress's (Serve's proxy answers) and the model's (the ingress answers, with
    # Retry-After, instead of letting the handle's BackPressureError become a 500).
    rejected = [r for r in responses if r.status_code == 503]
    by_model = [r for r in rejected if r.headers.get("content-type") == bodies.JSON_TYPE]
    assert by_model and all(r.headers["retry-after"] == "1" for r in by_model), [r.text for r in rejected]
    assert len(by_model) < len(rejected), [r.text for r in rejected]
    assert time.monotonic() - started < 60
    assert _good_request(client, sample_data).status_code == 200


def _model_replicas(ray) -> set[str]:
    return {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
            if a["name"].startswith("SERVE_REPLICA::ecgad#ECGModel#")}


def test_killed_model_replica_is_replaced(ray_session, client, sample_data):
    ray = ray_session
    (victim,) = _model_replicas(ray)
    ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
    deadline = time.monotonic() + 120
    seen = []
    while time.monotonic() < deadline:
        response = _good_request(client, sample_data)
        seen.append(response.status_code)
        if response.status_code == 200:
            break
        time.sleep(1)
    assert seen[-1] == 200, seen
    assert set(seen) <= {200, 503}, seen
    (replacement,) = _model_replicas(ray)
    assert replacement != victim
