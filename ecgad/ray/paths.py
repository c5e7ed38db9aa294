"""Local paths on a cluster of several nodes, checked from every node before a job starts.

A local path means the same file on every node only where it is shared storage mounted at the same place (NFS,
EFS, Lustre). Given on a multi-node cluster, a driver-only path fails late or quietly: training after worker-group
retries, preprocessing and archive scoring by writing on the nodes where the tasks ran, where the driver never looks.
So, as Ray Train does with its storage path, every job checks its local paths up front: one tiny task pinned to
each alive node looks for every input, and for a probe file the driver has just written into every output folder,
and the job refuses with the nodes that did not see them. URIs (`ecgad.storage`) need no check: every node reaches
the same bucket. On one node there is nothing to check.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterable
from pathlib import Path

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from ecgad.storage import is_uri

#: The probe written into each local output folder (and deleted after the check).
PROBE_PREFIX = ".ecgad-shared-probe-"


class SharedPathError(RuntimeError):
    """A local path that some node of the cluster cannot see."""


@ray.remote(num_cpus=0, max_retries=0)
def _missing(paths: list[str]) -> list[str]:
    return [path for path in paths if not os.path.exists(path)]


def refusal(missing_by_node: dict[str, list[str]], nodes: int) -> str | None:
    """Why the job cannot run, from what each node (by address) did not see, or None when every node saw all."""
    unseen = {node: paths for node, paths in missing_by_node.items() if paths}
    if not unseen:
        return None
    lines = [f"node {node} does not see {', '.join(sorted(paths))}" for node, paths in sorted(unseen.items())]
    return (f"local paths on a cluster of {nodes} nodes must be shared storage mounted at the same path on every "
            "node (NFS, EFS), or URIs such as s3://bucket/path: " + "; ".join(lines)
            + f" ({PROBE_PREFIX}* is a file this driver just wrote into an output folder)")


def require_shared(inputs: Iterable[str | Path] = (), outputs: Iterable[str | Path] = ()) -> None:
    """Raise `SharedPathError` unless every alive node of the connected cluster sees every local path of
    ``inputs`` and every local folder of ``outputs`` (created here if missing) as the driver does (module
    docstring)."""
    local_inputs = [str(path) for path in inputs if not is_uri(path)]
    local_outputs = [Path(path) for path in outputs if not is_uri(path)]
    if not ray.is_initialized():   # Ray Data will start a local, one-node cluster
        return
    nodes = [node for node in ray.nodes() if node["Alive"]]
    if len(nodes) < 2 or not (local_inputs or local_outputs):
        return
    probes = []
    for folder in local_outputs:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f"{PROBE_PREFIX}{uuid.uuid4().hex[:12]}"
        probe.write_bytes(b"")
        probes.append(str(probe))
    try:
        pending = {node["NodeManagerAddress"] + f" ({node['NodeID'][:8]})": _missing.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)).remote(
                local_inputs + probes) for node in nodes}
        missing = {node: ray.get(ref) for node, ref in pending.items()}
    finally:
        for probe in probes:
            Path(probe).unlink(missing_ok=True)
    problem = refusal(missing, len(nodes))
    if problem:
        raise SharedPathError(problem)
