"""The service's metrics as Prometheus scrapes them from Ray's endpoint: a known mix of requests (good, each kind of
bad, an overload burst) gives exactly the counts the clients saw, and the drift gauges move when the scored
population shifts (noisy records) but not for normal ones.

One Ray session with a fixed metrics port and a fast export interval (``metrics_report_interval_ms``: Ray's
processes push their metrics to the node's agent that often), one service. The model's checkpoint is calibrated
on synthetic normal ECGs (its threshold and drift calibration from their scores, as training does on fold-9
normals), so "normal" and "shifted" are meaningful to it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from ecgad.drift import Calibration
from ecgad.synth import generate_ecg
from ecgad.types import Record
from serve import app, bodies
from serve.metrics import exported_series
from serve.testing import free_port, local_config, local_service
from tests.conftest import RAY_TEST_INIT

pytestmark = pytest.mark.cluster

#: Records in the drift window; also how many normal and how many noisy records are sent.
WINDOW = 20
#: Gaussian noise (mV) that makes a record "shifted".
NOISE_MV = 0.2
EXPORT_INTERVAL_MS = 500
NPY = {"Content-Type": bodies.NPY_TYPE}


def _normal(seed: int) -> Record:
    return generate_ecg(seed=seed).to_record(f"normal-{seed}")


def _noisy(seed: int) -> Record:
    record = _normal(seed)
    noise = np.random.default_rng(seed).normal(0.0, NOISE_MV, record.signal.shape)
    return dataclasses.replace(record, record_id=f"noisy-{seed}", signal=(record.signal + noise).astype(np.float32))


def _npy(signal: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.asarray(signal, dtype=np.float32))
    return buffer.getvalue()


def calibrated_checkpoint(directory: Path, normals: list[Record], mode: str) -> Path:
    """A random small MCF whose threshold (0.95 quantile) and drift calibration come from its scores of
    ``normals``, the way training sets them from the fold-9 normals (docs/method.md §3.6)."""
    import torch

    from ecgad.checkpoint import save_checkpoint
    from ecgad.config import PrepConfig
    from ecgad.metrics import calibrate_threshold
    from ecgad.model import MCF, MCFConfig
    from ecgad.preprocess import prepare
    from ecgad.scoring import Scorer

    torch.manual_seed(0)
    config = MCFConfig.small()
    model = MCF(config).eval()
    scorer = Scorer(model, PrepConfig(), float("nan"), device="cpu", mode=mode)
    scores = [s.pred_score for s in scorer.score_prepared([prepare(r) for r in normals], with_maps=False)]
    threshold = calibrate_threshold(scores, 0.95)
    return save_checkpoint(directory, model, config, PrepConfig(), threshold,
                           calibration=Calibration.from_scores(scores, threshold).to_dict())


def scrape(url: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Our series on Ray's endpoint: name -> [(labels, value)], one entry per process and label set."""
    series: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(httpx.get(url, timeout=30).text):
        for sample in family.samples:
            if sample.name.startswith("ray_ecgad_"):
                series.setdefault(sample.name, []).append((sample.labels, sample.value))
    return series


def total(series, name: str, **labels: str) -> float:
    """The sum over processes of ``name`` where the labels match."""
    return sum(value for got, value in series.get(name, []) if all(got.get(k) == v for k, v in labels.items()))


def scrape_until(url: str, done, timeout_s: float = 120.0):
    """Scrape until ``done(series)``: Ray exports every ``EXPORT_INTERVAL_MS``, so a count can lag an answer."""
    deadline = time.monotonic() + timeout_s
    series = scrape(url)
    while not done(series) and time.monotonic() < deadline:
        time.sleep(EXPORT_INTERVAL_MS / 1000)
        series = scrape(url)
    return series


@pytest.fixture(scope="module")
def metrics_url():
    import ray

    port = free_port()
    ray.init(**RAY_TEST_INIT, _metrics_export_port=port,
             _system_config={"metrics_report_interval_ms": EXPORT_INTERVAL_MS})
    try:
        yield f"http://127.0.0.1:{port}/metrics"
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def service(metrics_url, tmp_path_factory):
    checkpoint = calibrated_checkpoint(tmp_path_factory.mktemp("metrics") / "checkpoint",
                                       [_normal(seed) for seed in range(40)], mode="fast")
    # One work slot and no wait for it: a burst of concurrent requests meets 503s at once. The model batches up
    # to 4 records. No token: 401 is the token tests' business (tests/test_serve.py).
    config = local_config(args={"mode": "fast", "max_body_mb": 1, "work_slots": 1, "work_wait_s": 0,
                                "drift_window": WINDOW, "cpu_threads": 1},
                          model={"user_config": {"max_batch_size": 4, "batch_wait_timeout_s": 0.05}},
                          http={"request_timeout_s": 120})
    with local_service(checkpoint, config) as url:
        yield url


@pytest.fixture(scope="module")
def client(service):
    with httpx.Client(base_url=service, timeout=120) as c:
        yield c


def _score(client: httpx.Client, record: Record) -> httpx.Response:
    return client.post("/v1/score", content=_npy(record.signal), headers=NPY,
                       params={"fs": record.fs, "map": "none", "record_id": record.record_id})


async def _burst(url: str, records: list[Record]) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=url, timeout=120) as c:
        return await asyncio.gather(*(c.post("/v1/score", content=_npy(r.signal), headers=NPY,
                                             params={"fs": r.fs, "map": "none"}) for r in records))


def test_every_metric_counts_exactly_what_the_clients_saw(service, client, metrics_url):
    answers: list[httpx.Response] = [_score(client, _normal(seed)) for seed in range(100, 100 + WINDOW)]
    flat = np.zeros((12, 5000), dtype=np.float32)
    answers += [
        client.post("/v1/score", content=b"not an array", headers=NPY, params={"fs": 500}),   # 422 bad_file
        client.post("/v1/score", content=_npy(flat), headers=NPY, params={"fs": 500}),        # 422 flat_lead
        client.post("/v1/score", content=_npy(_normal(1).signal[:, :2000]), headers=NPY,
                    params={"fs": 500}),                                                       # 422 too_short
        client.post("/v1/score", content=b"x" * (2 * 2**20), headers=NPY, params={"fs": 500}), # 413
        client.post("/v1/score", content=b"hello", headers={"Content-Type": "text/plain"}),    # 415
        client.post("/v1/score", content=b"", headers=NPY, params={"map": "half"}),            # 400
    ]
    answers += asyncio.run(_burst(service, [_normal(seed) for seed in range(200, 208)]))
    other = client.get("/no/such/page")
    codes = Counter(a.status_code for a in answers)
    assert codes[413] == codes[415] == codes[400] == 1 and codes[422] == 3
    assert codes[503] >= 1, "the burst must overload the single work slot"
    assert other.status_code == 404
    reasons = Counter(a.json()["detail"]["code"] for a in answers if a.status_code == 422)
    assert set(reasons) == {"bad_file", "flat_lead", "too_short"}
    ok = [a.json() for a in answers if a.status_code == 200]
    version = ok[0]["model_version"]
    anomalous = sum(body["pred_label"] for body in ok)

    assert app.metrics_url().endswith(metrics_url.removeprefix("http://127.0.0.1"))   # what `ecgad serve` prints
    series = scrape_until(metrics_url, lambda s: (
        total(s, "ray_ecgad_requests_total") == len(answers) + 1
        and total(s, "ray_ecgad_records_scored_total") == len(ok)
        and total(s, "ray_ecgad_drift_window_records", model_version=version) == WINDOW))
    assert set(exported_series()) <= set(series), "every metric the service declares is exported"
    for code, n in codes.items():
        assert total(series, "ray_ecgad_requests_total", route="/v1/score", code=str(code)) == n, code
    assert total(series, "ray_ecgad_requests_total", route="other", code="404") == 1
    assert total(series, "ray_ecgad_request_seconds_count", route="/v1/score") == len(answers)
    for reason, n in reasons.items():
        assert total(series, "ray_ecgad_rejections_total", reason=reason) == n
    # Preparation runs for every body that reached the parser: the scored and the rejected records.
    assert total(series, "ray_ecgad_preparation_seconds_count") == len(ok) + codes[422]
    # The model reports each batch once, each record's wait once. (Ray rebuilds a histogram's _sum from bucket
    # midpoints, so only counts and buckets are exact.)
    batches = total(series, "ray_ecgad_batch_size_count")
    assert 1 <= batches <= len(ok)
    assert total(series, "ray_ecgad_batch_size_bucket", le="+Inf") == batches
    assert total(series, "ray_ecgad_model_seconds_count") == batches
    assert total(series, "ray_ecgad_queue_wait_seconds_count") == len(ok)
    assert total(series, "ray_ecgad_score_count", model_version=version) == len(ok)
    assert total(series, "ray_ecgad_score_bucket", model_version=version, le="1.0") == sum(
        body["pred_score"] <= 1.0 for body in ok)
    assert total(series, "ray_ecgad_records_scored_total", model_version=version, label="anomalous") == anomalous
    assert total(series, "ray_ecgad_records_scored_total", model_version=version,
                 label="normal") == len(ok) - anomalous
    assert total(series, "ray_ecgad_model_queue_depth") == 0
    # The window holds normal records only: no drift.
    ks = total(series, "ray_ecgad_drift_ks", model_version=version)
    assert ks <= total(series, "ray_ecgad_drift_ks_threshold", model_version=version)
    assert 0 < total(series, "ray_ecgad_drift_calibration_flagged_share", model_version=version) < 0.2


def test_a_shifted_population_moves_the_drift_signal_past_its_threshold(service, client, metrics_url):
    before = total(scrape(metrics_url), "ray_ecgad_records_scored_total")
    answers = [_score(client, _noisy(seed)) for seed in range(300, 300 + WINDOW)]
    assert {a.status_code for a in answers} == {200}
    version = answers[0].json()["model_version"]

    # Once the count includes the noisy records, so do the gauges (set in the same batch, exported together).
    series = scrape_until(metrics_url, lambda s: total(s, "ray_ecgad_records_scored_total") == before + WINDOW)
    ks = total(series, "ray_ecgad_drift_ks", model_version=version)
    threshold = total(series, "ray_ecgad_drift_ks_threshold", model_version=version)
    assert ks > threshold, f"KS {ks:.3f} must pass its threshold {threshold:.3f} for noisy records"
