"""Ray job: train MCF data-parallel with Ray Train on Parquet shards (from ``jobs.preprocess``).

    python -m jobs.train --data SHARDS --out RUNDIR --num-workers N [--use-gpu] [--config small|paper]
        [--epochs E] [--batch-size B] [--name RUN] [--seed S]
    ray job submit --working-dir . -- python -m jobs.train --data /mnt/efs/shards --out /mnt/efs/runs/mcf \\
        --num-workers 4 --use-gpu --config paper

Trains on the fold 1-8 normals, validates every epoch on fold 9 and ends with the selected checkpoint, its
threshold calibrated on the fold-9 normals, published once as ``RUNDIR/models/<version>/`` (never rewritten) with
``RUNDIR/best`` a link to it, and the run's history at ``RUNDIR/metrics.json`` (details: ``ecgad.ray.train``,
``ecgad.checkpoint``). The checkpoint is selected by the validation AUROC where fold 9 holds normal and
abnormal records, else by the validation loss (``--select-by`` overrides). Rerunning the same command (same
``--name`` and storage path) resumes after the last finished epoch; a finished run just re-exports its result
(the same version: ``best`` keeps pointing at it).

SHARDS, RUNDIR and ``--storage-path`` may be URIs (``s3://bucket/runs/mcf``; a custom S3 endpoint comes from
``AWS_ENDPOINT_URL``): there ``RUNDIR/best`` is a pointer file naming the version folder (``ecgad.checkpoint``).
On a cluster of several nodes a local path must be shared storage, checked from every node before training.

The last line on stdout is the summary as one JSON object. Exit codes: 0 trained, 2 bad usage.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import Sequence

from ecgad.model import MCFConfig
from ecgad.ptbxl import VALIDATION_FOLD
from ecgad.shards import ShardLayout
from ecgad.storage import join, location
from ecgad.train import BASE_LR, SELECTION_ORDER, selection_metric


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m jobs.train", description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="a shards directory written by jobs.preprocess")
    parser.add_argument("--out", required=True, help="run directory: models/<version>/, best (a link to the current version), metrics.json "
                        "(and Ray's run folder)")
    parser.add_argument("--num-workers", type=int, default=1, help="data-parallel workers (one GPU each with --use-gpu)")
    parser.add_argument("--use-gpu", action="store_true")
    parser.add_argument("--cpus-per-worker", type=float, default=None,
                        help="CPUs reserved per worker; leave some free on each node for Ray Data's reads (default: "
                             "on a local cluster min(1, (cluster CPUs - 1) / workers), so Ray Data keeps a whole "
                             "CPU; on a running cluster 1)")
    parser.add_argument("--placement-strategy", choices=["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"],
                        default="PACK", help="how workers are placed on nodes (Ray placement group strategy)")
    parser.add_argument("--config", choices=["small", "paper"], default="paper")
    parser.add_argument("--epochs", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=32, help="per worker")
    parser.add_argument("--lr", type=float, default=BASE_LR,
                        help="peak learning rate of the per-epoch cosine schedule (the paper's 1e-4)")
    parser.add_argument("--shuffle-buffer", type=int, default=None,
                        help="rows mixed in each worker's local shuffle buffer (default: two batches), on top of the "
                             "shard files read in a new order every epoch; larger mixes better, but each epoch's "
                             "first batch waits for it to fill")
    parser.add_argument("--name", default="train", help="Ray run name; the same name resumes that run")
    parser.add_argument("--storage-path", default=None,
                        help="where Ray keeps the run (default: --out); shared storage (EFS, s3://) on a cluster")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--select-by", choices=["auto", *SELECTION_ORDER], default="auto")
    parser.add_argument("--val-mode", choices=["full", "fast"], default="full",
                        help="scoring mode for validation scores and the threshold")
    parser.add_argument("--threshold-quantile", type=float, default=0.95)
    parser.add_argument("--max-failures", type=int, default=3, help="worker-group restarts from the last checkpoint")
    parser.add_argument("--keep", type=int, default=2, help="best checkpoints Ray keeps (the latest is always kept)")
    parser.add_argument("--fail-at-epoch", type=int, default=None,
                        help="testing: one worker exits abruptly during this epoch, once per run directory")
    return parser


def select_by(choice: str, manifest: dict) -> str:
    """``auto``: `ecgad.train.selection_metric` for the usable fold-9 records the shards hold."""
    if choice != "auto":
        return choice
    by_fold = manifest["counts"]["ok_by_fold_and_label"]
    return selection_metric(*(by_fold.get(f"{VALIDATION_FOLD}/{label}", 0) for label in ("normal", "abnormal")))


def automatic_cpus_per_worker(num_workers: int, cluster_cpus: float) -> float:
    """CPUs per worker that leave Ray Data a whole CPU on a local cluster: ``min(1, (cluster_cpus - 1) /
    num_workers)``, rounded down to Ray's resource precision (1e-4) so the reserve stays whole (2 workers on a
    2-CPU laptop get 0.5 each)."""
    return min(1.0, math.floor(max(cluster_cpus - 1, 0) / num_workers * 1e4) / 1e4)


def cpu_shortage(num_workers: int, cpus_per_worker: float, cluster_cpus: float) -> str | None:
    """Why training would wait forever on this cluster, or None: Ray Data's tasks that list and read the shards
    each need a whole CPU the workers have not reserved (on a 2-CPU laptop, 2 workers of 1 CPU leave none)."""
    spare = cluster_cpus - num_workers * cpus_per_worker
    if spare >= 1:
        return None
    return (f"{num_workers} workers of {cpus_per_worker:g} CPUs leave {max(spare, 0):g} of this cluster's "
            f"{cluster_cpus:g} CPUs free, and Ray Data needs a whole free CPU to read the shards: lower "
            f"--cpus-per-worker (e.g. {max(0.1, (cluster_cpus - 1) / num_workers):.2g}) or --num-workers")


def sized_workers(num_workers: int, requested: float | None) -> tuple[float, str | None, bool]:
    """Join the Ray cluster (under ``ray job submit``, RAY_ADDRESS set) or start a local one, and size the workers:
    ``(cpus_per_worker, why training would wait forever or None, whether the cluster is local)``. ``requested`` wins;
    else `automatic_cpus_per_worker` on a local cluster, 1 on a running one (`cpu_shortage` says what is wrong)."""
    import ray

    local = not ray.is_initialized() and not os.environ.get("RAY_ADDRESS")
    if not ray.is_initialized():
        ray.init()  # under `ray job submit` (RAY_ADDRESS set) this joins the cluster; otherwise starts a local one
    cluster_cpus = ray.cluster_resources().get("CPU", 0.0)
    cpus_per_worker = requested
    if cpus_per_worker is None:
        cpus_per_worker = automatic_cpus_per_worker(num_workers, cluster_cpus) if local else 1.0
    return cpus_per_worker, cpu_shortage(num_workers, cpus_per_worker, cluster_cpus), local


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        manifest = ShardLayout(location(args.data)).require_manifest()
    except FileNotFoundError as err:
        print(f"train: error: {err}", file=sys.stderr)
        return 2
    if manifest["counts"]["train_normals"] < args.num_workers:
        print(f"train: error: {manifest['counts']['train_normals']} training normals (folds 1-8) for "
              f"{args.num_workers} workers", file=sys.stderr)
        return 2

    from ecgad.ray.paths import SharedPathError, require_shared
    from ecgad.ray.train import TrainSettings, fit

    model_config = MCFConfig.paper() if args.config == "paper" else MCFConfig.small()
    out = location(args.out)
    settings = TrainSettings(
        model_config=model_config.to_dict(), prep_config=manifest["prep_config"], epochs=args.epochs,
        batch_size=args.batch_size, lr=args.lr, seed=args.seed, select_by=select_by(args.select_by, manifest),
        threshold_quantile=args.threshold_quantile, val_mode=args.val_mode, shuffle_buffer=args.shuffle_buffer,
        fail_at_epoch=args.fail_at_epoch,
        failure_marker=str(join(out, f".{args.name}.injected-failure")) if args.fail_at_epoch is not None else None)
    cpus_per_worker, problem, local = sized_workers(args.num_workers, args.cpus_per_worker)
    try:
        require_shared(inputs=[args.data], outputs=[out, *([args.storage_path] if args.storage_path else [])])
    except SharedPathError as err:
        print(f"train: error: {err}", file=sys.stderr)
        return 2
    if problem and local:
        print(f"train: error: {problem}", file=sys.stderr)
        return 2
    if problem:   # an autoscaling cluster may still add nodes
        print(f"train: warning: {problem}", file=sys.stderr)
    summary = fit(args.data, out, settings, num_workers=args.num_workers, use_gpu=args.use_gpu,
                  cpus_per_worker=cpus_per_worker, placement_strategy=args.placement_strategy, name=args.name,
                  storage_path=args.storage_path, max_failures=args.max_failures, num_to_keep=args.keep)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
