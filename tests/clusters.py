"""Simulated multi-node Ray clusters for tests: ``ray.cluster_utils.Cluster`` (each node its own raylet) on this
machine, in a private temp dir, with this process connected as the driver."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ecgad.synth_dataset import write_dataset
from serve.testing import free_port


@contextmanager
def private_cluster(head: dict[str, Any], *nodes: dict[str, Any]) -> Iterator[Any]:
    """A head started with ``head`` (Ray node arguments) plus one node per ``nodes``; yields the ``Cluster``.

    Ray's ``Cluster`` records its address as "the current cluster" in Ray's temp dir, where every later
    ``ray.init()`` on the machine would connect to it; a private ``RAY_TMPDIR`` (short: it holds socket paths) keeps
    other sessions, and other test modules, off this one. The head runs the dashboard (on a free port): it serves
    the state API that Ray Train's placement-group cleaner polls and that tests use to find actors' nodes.
    """
    import ray
    from ray.cluster_utils import Cluster

    previous = os.environ.get("RAY_TMPDIR")
    os.environ["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="ecgad-ray-", dir="/tmp")
    cluster = Cluster(initialize_head=True, head_node_args={"include_dashboard": True, "dashboard_port": free_port(),
                                                            **head})
    try:
        for node in nodes:
            cluster.add_node(**node)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address)
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()
        shutil.rmtree(os.environ["RAY_TMPDIR"], ignore_errors=True)
        if previous is None:
            del os.environ["RAY_TMPDIR"]
        else:
            os.environ["RAY_TMPDIR"] = previous


def synthetic_shards(tmp_path_factory: Any, n_records: int) -> tuple[Path, Path]:
    """A synthetic PTB-XL root of ``n_records`` and its shards, made by ``jobs.preprocess`` on the connected cluster."""
    from jobs.preprocess import main as preprocess

    root = write_dataset(tmp_path_factory.mktemp("data") / "synth", n_records, seed=1)
    shards = tmp_path_factory.mktemp("shards") / "shards"
    assert preprocess(["--data", str(root), "--out", str(shards)]) == 0
    return root, shards
