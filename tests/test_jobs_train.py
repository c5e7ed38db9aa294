"""``jobs.train`` on a simulated two-node cluster: data-parallel training streamed from Parquet shards, the exported
checkpoint, and recovery from a killed worker and from a killed driver without repeating or skipping an epoch.

The whole module shares one ``ray.cluster_utils.Cluster`` of two nodes (instead of the usual one-node ``ray_session``):
every run here is multi-node, one 1-CPU worker per node. Each node has 2 logical CPUs, the second for Ray Data (its
file-listing task needs a whole CPU, so 1-CPU nodes would leave it none). Runs are tiny (small model, 2-4 epochs, 40
synthetic records).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import traceback
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from ecgad.checkpoint import load_checkpoint
from ecgad.drift import QUANTILE_LEVELS, Calibration
from ecgad.io import read_record
from ecgad.metrics import calibrate_threshold
from ecgad.preprocess import prepare
from ecgad.ptbxl import VALIDATION_FOLD, load_ptbxl_index
from ecgad.scoring import Scorer
from ecgad.settings import REPO_ROOT
from ecgad.validate import validate
from tests.clusters import private_cluster, synthetic_shards

pytestmark = pytest.mark.cluster  # starts Ray (see pyproject.toml's markers)

N_RECORDS = 40
TRAIN_ARGS = ["--config", "small", "--batch-size", "4", "--num-workers", "2", "--placement-strategy", "STRICT_SPREAD"]
EPOCH_LINE = re.compile(r"ecgad\.ray\.train: epoch (\d+) reported")
RESUME_LINE = re.compile(r"ecgad\.ray\.train: resuming after epoch (\d+)")
OURS = (str(REPO_ROOT / "ecgad"), str(REPO_ROOT / "jobs"))


@pytest.fixture(scope="module")
def cluster():
    """Two nodes of two logical CPUs each on this machine; the test process is the driver."""
    node = {"num_cpus": 2, "object_store_memory": 256 * 2**20}
    with private_cluster(node, node) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def data(cluster, tmp_path_factory) -> tuple[Path, Path]:
    """A synthetic PTB-XL root and its shards (made by jobs.preprocess on the cluster)."""
    return synthetic_shards(tmp_path_factory, N_RECORDS)


@contextmanager
def deprecations_from_our_calls():
    """Collect every deprecation warning raised while *our* code is on the stack, wherever it is attributed (Ray
    often warns from its own frames, so the warning's filename alone would not show that our call caused it)."""
    found: list[str] = []

    def record(message, category, filename, lineno, file=None, line=None):
        ours = [f for f in traceback.extract_stack() if f.filename.startswith(OURS)]
        if issubclass(category, (DeprecationWarning, PendingDeprecationWarning, FutureWarning)) and ours:
            found.append(f"{category.__name__}: {message} ({filename}:{lineno}, via {ours[-1].filename}:"
                         f"{ours[-1].lineno})")

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        yield found


def _latest_checkpoint(run: Path) -> str | None:
    """The name of a Ray Train run's latest committed checkpoint, read back through Ray's public Result API."""
    from ray.train import Result

    try:
        checkpoint = Result.from_path(run).checkpoint
    except (RuntimeError, ValueError, OSError):   # no snapshot yet, or one being written
        return None
    return Path(checkpoint.path).name if checkpoint else None


def _epochs(output: str) -> tuple[list[int], list[int]]:
    return ([int(m.group(1)) for m in EPOCH_LINE.finditer(output)],
            [int(m.group(1)) for m in RESUME_LINE.finditer(output)])


def test_two_workers_on_two_nodes_stream_shards_and_export_a_scorer_checkpoint(data, tmp_path, capfd):
    from jobs.train import main

    root, shards = data
    out = tmp_path / "run"
    with deprecations_from_our_calls() as deprecations:
        assert main(["--data", str(shards), "--out", str(out), "--epochs", "2", *TRAIN_ARGS]) == 0
    assert deprecations == []
    reported, _ = _epochs(capfd.readouterr().out)
    assert reported == [0, 1]

    summary = json.loads((out / "metrics.json").read_text())
    assert [e["epoch"] for e in summary["epochs"]] == [0, 1]
    assert all(e["nodes"] == 2 and e["workers"] == 2 for e in summary["epochs"])
    # Every training normal of folds 1-8 is seen once per epoch (the equal split drops at most workers - 1 rows).
    assert all(summary["data"]["counts"]["train_normals"] - 1 <= e["train_samples"] <= 22 for e in summary["epochs"])
    assert summary["best"]["selected_by"] == "val_auroc"   # fold 9 of the synthetic set has both classes
    best_epoch = summary["best"]["epoch"]
    assert summary["best"]["value"] == max(e["val_auroc"] for e in summary["epochs"])

    # The exported checkpoint scores like any other, and its threshold is the quantile of the fold-9 normals'
    # scores as the in-process path (read -> validate -> prepare -> Scorer) gives them: the shards are lossless.
    scorer = Scorer.from_checkpoint(out / "best")
    index = load_ptbxl_index(root)
    normals = index[(index["strat_fold"] == VALIDATION_FOLD) & index["is_normal"]]["record_path"]
    scores = scorer.score_prepared([prepare(validate(read_record(root / p))) for p in normals], with_maps=False)
    expected = calibrate_threshold([s.pred_score for s in scores], 0.95)
    assert scorer.threshold == pytest.approx(expected, rel=1e-5)
    assert summary["best"]["threshold"] == pytest.approx(expected, rel=1e-5)
    assert summary["epochs"][best_epoch]["val_normals"] == len(normals)
    # ... and its score calibration (the drift reference) is those scores' distribution.
    calibration = Calibration.from_dict(load_checkpoint(out / "best").calibration)
    assert calibration.n == len(normals)
    assert calibration.quantiles == pytest.approx(np.quantile([s.pred_score for s in scores], QUANTILE_LEVELS),
                                                  rel=1e-5)


def test_a_killed_worker_restarts_from_the_last_checkpoint(data, tmp_path, capfd):
    from jobs.train import main

    out = tmp_path / "run"
    assert main(["--data", str(data[1]), "--out", str(out), "--epochs", "3", "--fail-at-epoch", "1",
                 "--max-failures", "1", *TRAIN_ARGS]) == 0
    reported, resumed = _epochs(capfd.readouterr().out)
    assert (out / ".train.injected-failure").is_file()     # the failure did happen, once
    assert resumed == [0] and reported == [0, 1, 2]          # epoch 1 was redone from epoch 0's checkpoint, once
    summary = json.loads((out / "metrics.json").read_text())
    assert [e["epoch"] for e in summary["epochs"]] == [0, 1, 2]


def test_a_killed_driver_resumes_without_repeating_or_skipping_epochs(cluster, data, tmp_path):
    out = tmp_path / "run"
    command = [sys.executable, "-m", "jobs.train", "--data", str(data[1]), "--out", str(out), "--epochs", "4",
               *TRAIN_ARGS]
    env = {**os.environ, "RAY_ADDRESS": cluster.address}
    first = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True)
    lines: list[str] = []   # read as it comes: the workers' epoch lines reach the driver's stdout with some delay
    reader = threading.Thread(target=lambda: [lines.append(line) for line in first.stdout], daemon=True)
    reader.start()
    deadline = time.monotonic() + 240
    # Ray Train has committed epoch 1's checkpoint, and its epoch line has been forwarded to the driver
    while _latest_checkpoint(out / "train") != "epoch-0001" or 1 not in _epochs("".join(lines))[0]:
        assert first.poll() is None and time.monotonic() < deadline, "the first run ended before epoch 1"
        time.sleep(0.5)
    first.send_signal(signal.SIGKILL)
    first.wait()
    reader.join(timeout=30)
    first_out = "".join(lines)
    assert first.returncode == -signal.SIGKILL
    (tmp_path / "first.log").write_text(first_out)

    second = subprocess.run(command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, timeout=300)
    (tmp_path / "second.log").write_text(second.stdout)
    assert second.returncode == 0, second.stdout[-3000:]
    before, _ = _epochs(first_out)
    after, resumed = _epochs(second.stdout)
    assert set(resumed) == {1}                                  # from the last committed checkpoint
    assert after == [2, 3]                                      # nothing repeated, nothing skipped
    assert set(before) >= {0, 1}
    summary = json.loads((out / "metrics.json").read_text())
    assert [e["epoch"] for e in summary["epochs"]] == [0, 1, 2, 3]
    assert np.isfinite([e["train_loss"] for e in summary["epochs"]]).all()


def test_a_cluster_without_a_cpu_for_ray_data_is_refused_up_front():
    from jobs.train import cpu_shortage

    problem = cpu_shortage(2, 1.0, 2.0)            # two 1-CPU workers on a 2-CPU laptop: the reads would never run
    assert problem and "--cpus-per-worker (e.g. 0.5)" in problem
    assert cpu_shortage(2, 0.5, 2.0) is None and cpu_shortage(1, 1.0, 2.0) is None
    assert cpu_shortage(4, 4.0, 16.0) is not None and cpu_shortage(4, 3.0, 16.0) is None


def test_on_a_local_cluster_workers_are_sized_to_leave_ray_data_a_cpu():
    from jobs.train import automatic_cpus_per_worker, cpu_shortage

    assert automatic_cpus_per_worker(2, 2.0) == 0.5                 # the 2-CPU laptop: half a CPU each
    assert automatic_cpus_per_worker(1, 2.0) == 1.0 and automatic_cpus_per_worker(4, 16.0) == 1.0   # at most 1
    for workers in range(1, 9):
        for cpus in (2.0, 3.0, 4.0, 6.0, 16.0):
            per_worker = automatic_cpus_per_worker(workers, cpus)
            assert 0 < per_worker <= 1 and cpu_shortage(workers, per_worker, cpus) is None, (workers, cpus)
