"""Ray job: evaluate a checkpoint on one fold of a PTB-XL root (default fold 10, the test fold), with Ray Data.

    python -m jobs.evaluate --checkpoint RUNDIR/best --data ROOT [--fold 10] --out DIR [--mode full|fast]
        [--num-scorers N] [--use-gpu]
    ray job submit --working-dir . -- python -m jobs.evaluate --checkpoint /mnt/efs/runs/mcf/best \\
        --data /mnt/efs/ptbxl --out /mnt/efs/eval/mcf --num-scorers 2 --use-gpu

The fold's records are read, validated and prepared in CPU tasks (`ecgad.ray_data.prepare_rows`) and scored by an
actor pool of `ecgad.ray_data.RowScorer`s (``map_batches`` with ``ActorPoolStrategy``; each actor loads the model
once, on a GPU with ``--use-gpu``). Writes to ``--out``:

    metrics.json   record AUROC, AUPRC, sensitivity and specificity at the checkpoint's threshold, each with a
                   bootstrap 95 % CI (`ecgad.metrics.evaluate_scores`); with synthetic data (a ``mask_path`` column:
                   per-point ground truth) also the pooled point AUROC, Dice and IoU, on the samples the model scores
    scores.csv     one row per record: record_id, label, status, reason, pred_score, pred_label
    roc.png        the ROC curve
    maps/          the 12-lead plot with the anomaly map of the ``--plots`` highest- and lowest-scored records

The last line on stdout is metrics.json as one JSON object. Exit codes: 0 done, 2 bad usage.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ecgad.ptbxl import TEST_FOLD


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m jobs.evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="an ecgad checkpoint directory (e.g. RUNDIR/best)")
    parser.add_argument("--data", required=True, help="a PTB-XL root (real or synthetic)")
    parser.add_argument("--fold", type=int, default=TEST_FOLD, help="the strat_fold to evaluate on")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--mode", choices=["full", "fast"], default="full", help="Scorer mode")
    parser.add_argument("--num-scorers", type=int, default=1, help="most scoring actors (the pool grows to it)")
    parser.add_argument("--scorer-cpus", type=float, default=1.0, help="CPUs (torch threads) per scoring actor")
    parser.add_argument("--use-gpu", action="store_true", help="one GPU per scoring actor")
    parser.add_argument("--batch-size", type=int, default=16, help="records per scoring call")
    parser.add_argument("--plots", type=int, default=3, help="records plotted at each end of the score range")
    parser.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples for the CIs")
    return parser


def _log(message: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} jobs.evaluate: {message}", flush=True)


def scored_span(n_samples: int, cfg) -> slice:
    """The samples of a record's 500 Hz axis that some window's global input covers (100..4900 for a 10 s
    record, as the paper crops its localization benchmark); outside it the map is only extrapolated."""
    return slice(cfg.global_start, n_samples - (cfg.window - cfg.global_end))


def plot_roc(labels: np.ndarray, scores: np.ndarray, auroc: float | None, out: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from sklearn.metrics import roc_curve

    fig = Figure(figsize=(4.5, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if 0 < labels.sum() < labels.size:
        fpr, tpr, _ = roc_curve(labels, scores)
        ax.plot(fpr, tpr, color="C3", label=f"MCF (AUROC {auroc:.3f})" if auroc is not None else "MCF")
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=0.8, label="chance")
    ax.set(xlabel="false positive rate (1 - specificity)", ylabel="true positive rate (sensitivity)",
           xlim=(0, 1), ylim=(0, 1), title=f"ROC, {int(labels.sum())} abnormal / {int((1 - labels).sum())} normal")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def plot_extremes(results: list[dict[str, Any]], k: int, checkpoint: Path, mode: str, out: Path) -> list[str]:
    """Plot the ``k`` highest- and lowest-scored records with their anomaly maps, scored again in process (a
    handful of records; the batch run keeps no maps unless localization metrics need them)."""
    from ecgad.plot import plot_ecg
    from ecgad.preprocess import prepare
    from ecgad.ray_data import read_file
    from ecgad.scoring import Scorer
    from ecgad.validate import validate

    ranked = sorted(results, key=lambda r: r["pred_score"])
    picks = [("highest", i + 1, r) for i, r in enumerate(ranked[::-1][:k])]
    picks += [("lowest", i + 1, r) for i, r in enumerate(ranked[:k]) if r not in ranked[::-1][:k]]
    scorer = Scorer.from_checkpoint(checkpoint, mode=mode)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for end, rank, row in picks:
        record = validate(read_file(row["path"]))
        (scores,) = scorer.score_prepared([prepare(record, scorer.prep_config)])
        name = f"{end}-{rank}_{row['record_id'].replace('/', '_')}.png"
        title = (f"{row['record_id']} ({row['label']}): score {scores.pred_score:.4g}, threshold "
                 f"{scorer.threshold:.4g} -> {'anomalous' if scores.pred_label else 'normal'}")
        plot_ecg(record.signal, record.fs, scores.anomaly_map, title=title, out=out / name)
        written.append(f"{out.name}/{name}")
    return written


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from ecgad.checkpoint import CheckpointError, load_checkpoint
    from ecgad.ray_data import is_ptbxl_root

    root, out, checkpoint = Path(args.data).resolve(), Path(args.out).resolve(), Path(args.checkpoint).resolve()
    try:
        loaded = load_checkpoint(checkpoint)   # fail fast, and the preparation config and threshold to use
    except CheckpointError as err:
        print(f"evaluate: error: {err}", file=sys.stderr)
        return 2
    if not is_ptbxl_root(root):
        print(f"evaluate: error: {root} is not a PTB-XL root: evaluation needs folds and labels", file=sys.stderr)
        return 2

    import pyarrow as pa
    import pyarrow.csv as pcsv
    import ray

    from ecgad.metrics import evaluate_scores
    from ecgad.ray_data import (PREPARE_TASK_MEMORY, RowScorer, inputs_dataset, list_inputs, prepare_rows,
                                score_map)

    inputs = list_inputs(root, folds=[args.fold])
    if inputs.num_rows == 0:
        print(f"evaluate: error: fold {args.fold} of {root} has no records", file=sys.stderr)
        return 2
    with_maps = inputs.column("mask_path").null_count < inputs.num_rows
    if not ray.is_initialized():
        ray.init()  # under `ray job submit` (RAY_ADDRESS set) this joins the cluster; otherwise starts a local one

    started = time.perf_counter()
    _log(f"scoring fold {args.fold} of {root}: {inputs.num_rows} records, mode {args.mode}, "
         f"model {loaded.model_version}" + (", with anomaly maps (masks present)" if with_maps else ""))
    scored = (inputs_dataset(inputs)
              .map_batches(prepare_rows, batch_format="pyarrow", batch_size=None,
                           fn_kwargs={"cfg": loaded.prep_config}, num_cpus=1, memory=PREPARE_TASK_MEMORY)
              .map_batches(RowScorer, batch_format="pyarrow", batch_size=args.batch_size,
                           compute=ray.data.ActorPoolStrategy(min_size=1, max_size=args.num_scorers),
                           num_cpus=args.scorer_cpus, num_gpus=1 if args.use_gpu else 0,
                           fn_constructor_kwargs={"checkpoint": str(checkpoint), "mode": args.mode,
                                                  "device": "cuda" if args.use_gpu else "cpu",
                                                  "with_maps": with_maps,
                                                  "threads": max(1, math.floor(args.scorer_cpus))}))
    results, maps, masks = [], [], []
    warnings: list[str] = []
    for row in scored.iter_rows():
        anomaly_map = score_map(row)
        results.append({k: v for k, v in row.items() if k not in ("anomaly_map", "map_samples")})
        if row["status"] == "ok" and anomaly_map is not None:
            mask = np.load(root / row["mask_path"])
            if mask.shape != anomaly_map.shape:   # maps are on the source axis, masks on the 500 Hz one
                warnings.append(f"{row['record_id']}: map {anomaly_map.shape} and mask {mask.shape} differ; "
                                "left out of the localization metrics")
                continue
            span = scored_span(mask.shape[1], loaded.prep_config)
            maps.append(anomaly_map[:, span].copy())
            masks.append(mask[:, span])
    wall = time.perf_counter() - started
    ok = [r for r in results if r["status"] == "ok"]
    ok.sort(key=lambda r: r["record_id"])
    labels = np.array([0 if r["is_normal"] else 1 for r in ok], dtype=np.int8)
    scores = np.array([r["pred_score"] for r in ok], dtype=np.float64)
    metrics = evaluate_scores(labels, scores, loaded.threshold, maps=maps if with_maps and maps else None,
                              masks=masks if with_maps and maps else None, n_boot=args.n_boot)

    out.mkdir(parents=True, exist_ok=True)
    plot_roc(labels, scores, metrics["record_auroc"]["value"], out / "roc.png")
    plots = plot_extremes(ok, args.plots, checkpoint, args.mode, out / "maps") if ok else []
    columns = ["record_id", "label", "status", "reason", "pred_score", "pred_label"]
    pcsv.write_csv(pa.Table.from_pylist([{c: r[c] for c in columns} for r in sorted(results, key=lambda r: r["record_id"])]),
                   out / "scores.csv")
    by_status: dict[str, int] = {}
    for r in results:
        by_status[r["status"]] = by_status.get(r["status"], 0) + 1
    summary = {
        "checkpoint": str(checkpoint), "model_version": loaded.model_version, "data": str(root), "fold": args.fold,
        "mode": args.mode, "records": len(results), "by_status": by_status,
        "not_scored": {r["record_id"]: r["reason"] for r in results if r["status"] != "ok"},
        "metrics": metrics, "warnings": warnings, "plots": ["roc.png", *plots],
        "wall_s": round(wall, 3), "records_per_s": round(len(results) / wall, 3),
    }
    (out / "metrics.json").write_text(json.dumps(summary, indent=2) + "\n")
    auroc = metrics["record_auroc"]
    _log(f"done in {wall:.1f} s: {len(ok)}/{len(results)} scored; record AUROC {auroc['value']} CI {auroc['ci95']}")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
