"""Versioned, immutable models: training publishes each model once under its version, ``RUN/best`` points at the
current one, every consumer resolves it once and reports the version it uses, and the service rolls from one
version to the next under load without a failed request.

The rolling update starts one Serve application for the module (version A), keeps a few client threads posting a
small record throughout a redeploy with version B, and checks every answer: 2xx, tagged A or B, and only B after.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import httpx
import pytest

from ecgad.checkpoint import (MODELS_DIR, POINTER, CheckpointError, load_checkpoint, publish_checkpoint,
                              resolve_checkpoint)
from ecgad.cli import main as cli_main
from ecgad.synth import generate_ecg
from ecgad.synth_dataset import write_dataset
from serve.app import run_local
from serve.testing import free_port, local_config, random_checkpoint

#: Client threads during the update, and the most requests each sends (a bound in count besides the one in time).
CLIENTS = 3
MAX_REQUESTS_PER_CLIENT = 2000
LOAD_LIMIT_S = 300.0


def _tree(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def test_publishing_twice_keeps_both_versions_and_moves_the_pointer(tmp_path):
    run = tmp_path / "run"
    first = publish_checkpoint(random_checkpoint(tmp_path / "a", seed=0), run)
    before = _tree(first.path)
    second = publish_checkpoint(random_checkpoint(tmp_path / "b", seed=1), run)

    assert first.model_version != second.model_version
    assert sorted(p.name for p in (run / MODELS_DIR).iterdir()) == sorted([first.model_version,
                                                                            second.model_version])
    assert (first.path, second.path) == (run / MODELS_DIR / first.model_version, run / MODELS_DIR / second.model_version)
    assert _tree(first.path) == before                       # the first version is untouched, byte for byte
    link = run / POINTER
    assert link.is_symlink() and not Path(link.readlink()).is_absolute()   # relative: valid on any mount point
    assert resolve_checkpoint(link) == second.path
    assert load_checkpoint(link).model_version == second.model_version   # `best` still works as a checkpoint


def test_the_same_model_published_twice_is_one_version(tmp_path):
    run = tmp_path / "run"
    source = random_checkpoint(tmp_path / "a", seed=0)
    first = publish_checkpoint(source, run)
    written = first.path.stat().st_mtime_ns
    again = publish_checkpoint(random_checkpoint(tmp_path / "a_again", seed=0), run)   # saved later, same content
    assert again.model_version == first.model_version and again.path == first.path
    assert [p.name for p in (run / MODELS_DIR).iterdir()] == [first.model_version]
    assert first.path.stat().st_mtime_ns == written
    other_threshold = publish_checkpoint(random_checkpoint(tmp_path / "t", seed=0, threshold=2.0), run)
    assert other_threshold.model_version != first.model_version       # the threshold is part of the version
    assert other_threshold.model_version.split("-")[0] == first.model_version.split("-")[0]   # same weights


def test_a_pointer_that_is_still_a_checkpoint_directory_is_kept_as_a_version(tmp_path):
    run = tmp_path / "run"
    legacy = load_checkpoint(random_checkpoint(run / POINTER, seed=0))   # `best` written before versions existed
    published = publish_checkpoint(random_checkpoint(tmp_path / "b", seed=1), run)
    assert (run / POINTER).is_symlink() and resolve_checkpoint(run / POINTER) == published.path
    assert load_checkpoint(run / MODELS_DIR / legacy.model_version).model_version == legacy.model_version
    (run / "notes").mkdir()
    with pytest.raises(CheckpointError, match="neither a link nor a checkpoint"):
        publish_checkpoint(published.path, run, pointer="notes")


def test_resolving_a_missing_checkpoint_names_it(tmp_path):
    with pytest.raises(CheckpointError, match="not an ecgad checkpoint"):
        resolve_checkpoint(tmp_path / "nothing")


def test_score_reports_the_resolved_version(tmp_path, capsys, sample_data):
    run = tmp_path / "run"
    published = publish_checkpoint(random_checkpoint(tmp_path / "a", seed=0), run)
    record = sample_data / "ptbxl" / "records100" / "00000" / "00001_lr.hea"
    assert cli_main(["score", str(record), "--checkpoint", str(run / POINTER), "--mode", "fast", "--json"]) == 0
    captured = capsys.readouterr()
    (row,) = [json.loads(line) for line in captured.out.splitlines()]
    assert row["model_version"] == published.model_version
    assert f"model version {published.model_version} ({published.path})" in captured.err


# -- consumers on Ray, and the rolling update --------------------------------------------------------------------

@pytest.fixture(scope="module")
def versions(tmp_path_factory):
    """Two tiny random small-config models published in turn to one run directory: A, then B."""
    tmp = tmp_path_factory.mktemp("versions")
    run = tmp / "run"
    a = publish_checkpoint(random_checkpoint(tmp / "a", seed=0), run)
    b = publish_checkpoint(random_checkpoint(tmp / "b", seed=1), run)
    return run, a, b


@pytest.mark.cluster
def test_batch_jobs_resolve_best_once_and_report_the_version(ray_session, versions, tmp_path):
    from jobs.evaluate import main as evaluate
    from jobs.score_archive import main as score_archive

    run, _, b = versions
    data = write_dataset(tmp_path / "synth", 8, seed=3, anomaly_fraction=0.5)
    assert evaluate(["--checkpoint", str(run / POINTER), "--data", str(data), "--out", str(tmp_path / "eval"),
                     "--mode", "fast", "--plots", "0", "--n-boot", "10"]) == 0
    evaluated = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert (evaluated["model_version"], evaluated["checkpoint"]) == (b.model_version, str(b.path))

    assert score_archive(["--input", str(data), "--checkpoint", str(run / POINTER), "--out", str(tmp_path / "out"),
                          "--mode", "fast"]) == 0
    archived = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert (archived["model_version"], archived["checkpoint"]) == (b.model_version, str(b.path))


def _post_until(url: str, body: bytes, stop: threading.Event, answers: list[tuple[int, str | None]]) -> None:
    """Post the record until ``stop`` (or the count or time bound); record each answer's status and version."""
    deadline = time.monotonic() + LOAD_LIMIT_S
    with httpx.Client(base_url=url, timeout=60) as client:
        for _ in range(MAX_REQUESTS_PER_CLIENT):
            if stop.is_set() or time.monotonic() > deadline:
                return
            try:
                response = client.post("/v1/score?map=none", content=body,
                                       headers={"Content-Type": "application/json"})
            except httpx.HTTPError as err:   # a dropped connection is an answer that is not 2xx
                answers.append((0, type(err).__name__))
                continue
            version = response.json().get("model_version") if response.is_success else response.text[:200]
            answers.append((response.status_code, version))


@pytest.mark.cluster
def test_a_rolling_update_under_load_answers_every_request_with_a_or_b(ray_session, versions):
    from ray import serve

    run, a, b = versions
    config = local_config(args={"mode": "fast"})
    record = generate_ecg(seed=2).to_record("load")
    body = json.dumps({"signal": record.signal.tolist(), "fs": record.fs, "record_id": "load"}).encode()
    port = free_port()
    try:
        url = run_local(a.path, port=port, config=config, blocking=False)
        with httpx.Client(base_url=url, timeout=60) as client:
            assert client.get("/readyz").json()["model_version"] == a.model_version

        stop, answers = threading.Event(), []
        clients = [threading.Thread(target=_post_until, args=(url, body, stop, answers)) for _ in range(CLIENTS)]
        for thread in clients:
            thread.start()
        while len(answers) < 5 and any(t.is_alive() for t in clients):   # load is flowing on A
            time.sleep(0.1)
        run_local(run / POINTER, port=port, config=config, blocking=False)   # the redeploy: best is now B
        during = len(answers)
        stop.set()
        for thread in clients:
            thread.join()

        assert len(answers) > 5
        assert [answer for answer in answers if not 200 <= answer[0] < 300] == []
        assert {version for _, version in answers} <= {a.model_version, b.model_version}
        with httpx.Client(base_url=url, timeout=60) as client:
            after = [client.post("/v1/score?map=none", content=body,
                                 headers={"Content-Type": "application/json"}).json()["model_version"]
                     for _ in range(5)]
            info = client.get("/v1/model").json()
        assert after == [b.model_version] * 5 and info["model_version"] == b.model_version
        print(f"rolling update: {len(answers)} answers ({during} until the redeploy returned), "
              f"{sum(v == a.model_version for _, v in answers)} from A, "
              f"{sum(v == b.model_version for _, v in answers)} from B")
    finally:
        serve.shutdown()
