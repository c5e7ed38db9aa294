"""Ray job: fine-tune a multi-label diagnosis head on an anomaly-detection checkpoint, with Ray Train.

    python -m jobs.finetune --data SHARDS --pretrained CKPT --labels LEVEL --out RUNDIR [--num-workers N]
        [--use-gpu] [--freeze-encoders] [--init pretrained|random] [--loss bce|balanced|focal] [--epochs E]
    ray job submit --working-dir . -- python -m jobs.finetune --data /mnt/efs/shards \\
        --pretrained /mnt/efs/runs/mcf/best --labels superdiag --out /mnt/efs/runs/diag --num-workers 4 --use-gpu

SHARDS from ``jobs.preprocess`` on a PTB-XL root (they carry each record's SCP statements and the statements table),
CKPT a detector from ``jobs.train``. LEVEL is one of ``all diag subdiag superdiag form rhythm`` (`ecgad.labels`).
Every record of folds 1-8 with a class at the level trains, fold 9 selects the epoch (macro AUROC) and sets each
class's threshold (Youden's J), fold 10 is never read (``jobs.evaluate`` measures it). The result is published as
``RUNDIR/models/<version>/`` with ``RUNDIR/best`` a link to it, holding the detector (unchanged, so it still scores)
and the diagnosis network (`ecgad.diagnosis`, `ecgad.ray.finetune`); the run's history is ``RUNDIR/metrics.json``.

The last line on stdout is the summary as one JSON object. Exit codes: 0 trained, 2 bad usage.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow.dataset as pads

from ecgad.checkpoint import CheckpointError, load_checkpoint, resolve_checkpoint
from ecgad.diagnosis import INITS, LOSSES
from ecgad.finetune import FINETUNE_LR
from ecgad.labels import LEVELS, code_map, head_and_tail, parse_codes, read_statements, targets_from_map
from ecgad.ptbxl import TRAIN_FOLDS
from ecgad.shards import ShardLayout


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m jobs.finetune", description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="a shards directory written by jobs.preprocess (PTB-XL root)")
    parser.add_argument("--pretrained", required=True, help="an anomaly-detection checkpoint (e.g. RUNDIR/best)")
    parser.add_argument("--labels", required=True, choices=LEVELS, help="the SCP label level")
    parser.add_argument("--out", required=True, help="run directory: models/<version>/, best, metrics.json")
    parser.add_argument("--num-workers", type=int, default=1)
    parser.add_argument("--use-gpu", action="store_true")
    parser.add_argument("--cpus-per-worker", type=float, default=None,
                        help="CPUs per worker (default as jobs.train: leave Ray Data a whole CPU on a local cluster)")
    parser.add_argument("--freeze-encoders", action="store_true", help="train the head only (a linear probe)")
    parser.add_argument("--init", choices=INITS, default="pretrained",
                        help="start from the detector's weights, or from random ones (the baseline)")
    parser.add_argument("--loss", choices=LOSSES, default="bce", help="imbalance handling (`ecgad.diagnosis`)")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=32, help="per worker")
    parser.add_argument("--lr", type=float, default=FINETUNE_LR)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", default="finetune", help="Ray run name")
    parser.add_argument("--storage-path", default=None, help="where Ray keeps the run (default: --out)")
    return parser


def training_targets(layout: ShardLayout, classes_of: dict, classes: list[str]) -> np.ndarray:
    """The targets of the prepared, labelled training-fold records, read from the shards' small columns."""
    table = pads.dataset(layout.records, format="parquet").to_table(columns=["status", "strat_fold", "scp_codes"])
    codes = [parse_codes(c) for s, f, c in zip(*(table.column(n).to_pylist() for n in table.column_names))
             if s == "ok" and f in TRAIN_FOLDS]
    targets = targets_from_map(codes, classes_of, classes)
    return targets[targets.any(axis=1)]


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    layout = ShardLayout(Path(args.data))
    try:
        manifest = layout.require_manifest()
        pretrained = resolve_checkpoint(args.pretrained)
        load_checkpoint(pretrained)   # fail fast on a broken detector
    except (FileNotFoundError, CheckpointError) as err:
        print(f"finetune: error: {err}", file=sys.stderr)
        return 2
    classes = manifest.get("labels", {}).get("classes", {}).get(args.labels)
    if not classes or not layout.statements.is_file():
        print(f"finetune: error: {layout.root} carries no SCP labels at level {args.labels!r} (preprocess a PTB-XL "
              "root with this version of jobs.preprocess)", file=sys.stderr)
        return 2
    classes_of = code_map(read_statements(layout.statements), args.labels)
    train_targets = training_targets(layout, classes_of, classes)
    if len(train_targets) < 2 * args.num_workers:
        print(f"finetune: error: {len(train_targets)} labelled training records for {args.num_workers} workers",
              file=sys.stderr)
        return 2

    from ecgad.ray.finetune import FinetuneSettings, fit
    from jobs.train import sized_workers

    settings = FinetuneSettings(
        pretrained=str(pretrained), level=args.labels, classes=list(classes), classes_of=classes_of,
        class_counts=[int(c) for c in train_targets.sum(axis=0)], split=head_and_tail(train_targets, classes),
        prep_config=manifest["prep_config"], init=args.init, freeze_encoders=args.freeze_encoders, loss=args.loss,
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed)
    cpus_per_worker, problem, local = sized_workers(args.num_workers, args.cpus_per_worker)
    if problem and local:
        print(f"finetune: error: {problem}", file=sys.stderr)
        return 2
    summary = fit(layout.root, Path(args.out), settings, num_workers=args.num_workers, use_gpu=args.use_gpu,
                  cpus_per_worker=cpus_per_worker, name=args.name, storage_path=args.storage_path)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
