"""Node loss on a simulated multi-node cluster: training, archive scoring and the service each lose a worker node
mid-run and recover.

One ``ray.cluster_utils.Cluster`` for the module: a head without CPUs (it runs the driver, Ray Train's controller
and Serve's controller and proxy, as a cluster's head does) and two worker nodes of two logical CPUs, each its own
raylet. A node is killed abruptly (``remove_node(allow_graceful=False)``: its raylet and every worker process get
SIGKILL, nothing is drained), and a spare node joins afterwards, as an autoscaler replaces a lost node, so every test
starts and ends with two worker nodes. Tests run in file order and share the cluster.

- Training (``jobs.train``, two workers ``STRICT_SPREAD`` over the two nodes, a checkpoint every epoch) loses a node
  after its first checkpoint and finishes from its last one: every epoch once in the history, the epochs before the
  restart carried over unchanged, the optimizer state restored (its step count covers every epoch).
- Archive scoring (``jobs.score_archive``) loses the node of a model actor after its first commits and finishes:
  every input exactly once, every committed chunk a whole one.
- The service (``serve/config.yaml``, one model replica on each worker node) loses one of them: requests succeed again
  once Serve has replaced the replica; the errors clients saw meanwhile are counted and reported.
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import httpx
import pyarrow.dataset as pads
import pytest
import torch

from ecgad.archive import ArchiveLayout
from ecgad.synth import generate_ecg
from serve import bodies
from serve.testing import local_config, local_service, random_checkpoint, token_client
from tests.clusters import private_cluster, synthetic_shards
from tests.test_jobs_train import RESUME_LINE, TRAIN_ARGS, _epochs, _latest_checkpoint
from tests.test_serve import _npy

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

#: Every worker node: two logical CPUs (a training worker or a model actor, and one for Ray Data's tasks) and one
#: ``model_slot``, which pins one service model replica per node.
WORKER_NODE = {"num_cpus": 2, "object_store_memory": 200 * 2**20, "resources": {"model_slot": 1}}
#: The head: no CPUs, so no training worker, Ray Data task or model actor lands there; an ``ingress_slot`` keeps the
#: service's ingress on it (beside Serve's proxy), so the node kill hits model replicas only.
HEAD_NODE = {"num_cpus": 0, "object_store_memory": 200 * 2**20, "resources": {"ingress_slot": 1}}
N_RECORDS = 40
TOKEN = "multinode-token"


@pytest.fixture(scope="module")
def cluster():
    with private_cluster(HEAD_NODE, WORKER_NODE, WORKER_NODE) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def dataset(cluster, tmp_path_factory) -> tuple[Path, Path]:
    """A synthetic PTB-XL root and its shards (made by jobs.preprocess on the worker nodes)."""
    return synthetic_shards(tmp_path_factory, N_RECORDS)


def _alive_actors(cluster, class_part: str) -> list:
    """Alive actors of ``cluster`` whose class name contains ``class_part`` (Ray's state API: each with its
    ``node_id``). The address is explicit: without it, the state API picks the latest Ray instance on the machine."""
    from ray.util.state import list_actors

    return [a for a in list_actors(address=cluster.address, filters=[("state", "=", "ALIVE")], limit=10_000)
            if class_part in a.class_name]


def _kill_node(cluster, node_id: str) -> None:
    """Kill the worker node ``node_id`` abruptly, then let a spare node join (an autoscaler's replacement)."""
    (node,) = [n for n in cluster.worker_nodes if n.node_id == node_id]
    cluster.remove_node(node, allow_graceful=False)
    cluster.add_node(**WORKER_NODE)


def _kill_during(cluster, run: Future, victim) -> None:
    """Once ``victim()`` names a node (polled while ``run``, the job in a background thread, is still going), kill it
    (`_kill_node`). Nodes are added from the main thread: a new node registers signal handlers."""
    deadline = time.monotonic() + 600
    while not (node_id := victim()):
        assert not run.done(), f"the job ended before the node kill: {run.result()}"
        assert time.monotonic() < deadline, "the job never reached the point of the node kill"
        time.sleep(0.5)
    _kill_node(cluster, node_id)


# -- training ------------------------------------------------------------------------------------------------------

def test_training_loses_a_node_and_finishes_from_its_last_checkpoint(cluster, dataset, tmp_path, capfd):
    from jobs.train import main

    out, epochs = tmp_path / "run", 3
    at_kill: dict[str, dict] = {}

    def first_checkpoint_committed() -> str | None:
        latest = _latest_checkpoint(out / "train")
        if latest is None:
            return None
        at_kill["config"] = json.loads((out / "train" / latest / "config.json").read_text())
        workers = sorted(a.node_id for a in _alive_actors(cluster, "RayTrainWorker"))
        return workers[-1] if workers else None

    with ThreadPoolExecutor(1) as background:
        run = background.submit(main, ["--data", str(dataset[1]), "--out", str(out), "--epochs", str(epochs),
                                       "--max-failures", "2", "--cpus-per-worker", "1", *TRAIN_ARGS])
        _kill_during(cluster, run, first_checkpoint_committed)
        assert run.result() == 0
    output = capfd.readouterr().out
    # TRAIN_ARGS: two workers, STRICT_SPREAD, so each ran on its own worker node, before and after the loss.
    summary = json.loads((out / "metrics.json").read_text())
    history = summary["epochs"]
    assert [e["epoch"] for e in history] == list(range(epochs))           # no epoch lost, none twice
    assert all(e["nodes"] == 2 and e["workers"] == 2 for e in history)

    # The restart resumed after the last checkpoint committed when the node died (or a later one, when the
    # controller registered it before noticing the loss), and trained only the epochs after it.
    (resumed,) = [int(m) for m in RESUME_LINE.findall(output)]
    before_kill = at_kill["config"]["metadata"]["epoch"]
    assert before_kill <= resumed < epochs - 1
    restart = RESUME_LINE.search(output).start()
    assert _epochs(output[restart:])[0] == list(range(resumed + 1, epochs))
    # The epochs up to the checkpoint were carried over, not redone: their entries, timings included, are the ones
    # that checkpoint recorded.
    carried = at_kill["config"]["metadata"]["history"]
    assert [e["epoch"] for e in carried] == list(range(before_kill + 1))
    assert history[:before_kill + 1] == carried
    # ... and so was the optimizer state: AdamW's step count on rank 0 covers every epoch's batches.
    state = torch.load(out / "train" / f"epoch-{epochs - 1:04d}" / "train_state.pt", weights_only=True)
    steps = sum(math.ceil(e["train_samples"] / e["workers"] / 4) for e in history)    # TRAIN_ARGS: batch size 4
    assert {int(s["step"]) for s in state["optimizer"]["state"].values()} == {steps}
    print(f"training: node lost during epoch {before_kill + 1}, resumed after epoch {resumed}")


# -- archive scoring -----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return random_checkpoint(tmp_path_factory.mktemp("model") / "checkpoint", seed=0)


def test_archive_run_loses_a_node_and_scores_every_input_once(cluster, dataset, checkpoint, tmp_path):
    from jobs.score_archive import main

    root, out = dataset[0], tmp_path / "scores"
    layout = ArchiveLayout(out)

    committed_at_kill = []

    def scorer_node_after_first_commits() -> str | None:
        committed = len(layout.committed_chunks())
        scorers = [a.node_id for a in _alive_actors(cluster, "ScorerActor")] if committed >= 2 else []
        committed_at_kill.append(committed)
        return scorers[0] if scorers else None

    with ThreadPoolExecutor(1) as background:
        run = background.submit(main, ["--input", str(root), "--checkpoint", str(checkpoint), "--out", str(out),
                                       "--chunk-size", "2", "--num-scorers", "2", "--scorer-cpus", "1",
                                       "--mode", "fast"])
        _kill_during(cluster, run, scorer_node_after_first_commits)
        assert run.result() == 0

    table = pads.dataset(out / "records", format="parquet").to_table()
    paths, ids = table.column("path").to_pylist(), table.column("record_id").to_pylist()
    assert len(paths) == len(set(paths)) == len(set(ids)) == N_RECORDS      # every input exactly once
    assert set(table.column("status").to_pylist()) == {"ok"}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["complete"] and summary["records"] == summary["inputs"] == N_RECORDS
    # Every planned chunk committed whole (records file = commit marker, written atomically); no temporaries left.
    assert summary["chunks"]["planned"] == len(layout.committed_chunks()) == N_RECORDS // 2
    assert committed_at_kill[-1] < N_RECORDS // 2                          # the node died mid-run
    assert not list(layout.records.glob(".*"))


# -- the service ---------------------------------------------------------------------------------------------------

def _replicas(cluster) -> dict[str, str]:
    """The alive model replicas: actor name -> node id."""
    return {a.name: a.node_id for a in _alive_actors(cluster, "ServeReplica:ecgad:ECGModel")}


def test_service_loses_a_model_replica_node_and_recovers(cluster, checkpoint, record_property):
    config = local_config(
        args={"mode": "fast"}, token=TOKEN, http={"request_timeout_s": 60},
        ingress={"ray_actor_options": {"num_cpus": 0, "resources": {"ingress_slot": 1}}},
        model={"num_replicas": 2, "ray_actor_options": {"num_cpus": 0.5, "resources": {"model_slot": 1}}})
    body = _npy(generate_ecg(0).signal)
    with local_service(checkpoint, config) as url, token_client(url, TOKEN) as client:
        before = _replicas(cluster)
        assert len(set(before.values())) == 2                     # one model replica on each worker node

        def request() -> str:
            try:
                response = client.post("/v1/score", params={"fs": 500, "map": "none"}, content=body,
                                       headers={"Content-Type": bodies.NPY_TYPE})
            except httpx.HTTPError as err:
                return type(err).__name__
            return str(response.status_code)

        assert request() == "200"
        victim = sorted(before.items())[0]
        outcomes: list[tuple[float, str]] = []
        stop = threading.Event()

        def load() -> None:
            while not stop.is_set():
                outcomes.append((time.monotonic(), request()))

        with ThreadPoolExecutor(2) as clients:
            runs = [clients.submit(load) for _ in range(2)]
            time.sleep(2)
            killed_at = time.monotonic()
            _kill_node(cluster, victim[1])
            # Recovered: Serve runs two replicas again, the replacement on the spare node, and requests succeed.
            deadline = time.monotonic() + 300
            while not (len(after := _replicas(cluster)) == 2 and victim[0] not in after
                       and all(o == "200" for _, o in outcomes[-10:]) and outcomes[-1][0] > killed_at):
                assert time.monotonic() < deadline, (after, Counter(o for _, o in outcomes))
                time.sleep(1)
            recovered_at = time.monotonic()
            stop.set()
            for run in runs:
                run.result()
        assert set(after.values()) - set(before.values())          # the replacement runs on the new node
        assert request() == "200"

    during = Counter(o for t, o in outcomes if killed_at <= t <= recovered_at)
    errors = sum(n for o, n in during.items() if o != "200")
    print(f"service: {errors} failed of {sum(during.values())} requests while a model replica's node was lost and "
          f"replaced ({recovered_at - killed_at:.0f} s): {dict(during)}")
    record_property("errors_during_node_loss", errors)
    assert set(during) <= {"200", "503"}                           # failures are the documented, retryable 503
    assert all(o == "200" for t, o in outcomes if t < killed_at)
