"""Ray job: evaluate a checkpoint on one fold of a PTB-XL root (default fold 10, the test fold), with Ray Data.

    python -m jobs.evaluate --checkpoint RUNDIR/best --data ROOT [--fold 10] --out DIR [--mode full|fast]
        [--num-scorers N] [--use-gpu]
    ray job submit --working-dir . -- python -m jobs.evaluate --checkpoint /mnt/efs/runs/mcf/best \\
        --data /mnt/efs/ptbxl --out /mnt/efs/eval/mcf --num-scorers 2 --use-gpu

The fold's records flow through the batch scoring pipeline that archive scoring uses (`ecgad.ray.scoring`): read,
validated and prepared in CPU tasks, scored by an actor pool (each actor loads the model once, on a GPU with
``--use-gpu``); the scored rows come back to the driver. Writes to ``--out`` (each file atomically):

    metrics.json   record AUROC, AUPRC, sensitivity and specificity at the checkpoint's threshold, each with a
                   bootstrap 95 % CI (`ecgad.metrics.evaluate_scores`); with synthetic data (a ``mask_path`` column:
                   per-point ground truth) also the pooled point AUROC, Dice and IoU, on the samples the model scores
    scores.csv     one row per record: record_id, label, status, reason, pred_score, pred_label
    roc.png        the ROC curve
    maps/          the 12-lead plot with the anomaly map of the ``--plots`` highest- and lowest-scored records

Every path may be a URI (``s3://bucket/eval/mcf``; `ecgad.storage`): each output file is then one upload. On a
cluster of several nodes a local path must be shared storage, checked from every node before scoring starts.

When the checkpoint has a diagnosis head (``jobs.finetune``), metrics.json also has ``diagnosis``: per class AUROC,
AUPRC, and sensitivity and specificity at the thresholds set on fold 9, and the macro AUROC over all, head and tail
classes with bootstrap 95 % CIs (`ecgad.diagnosis.diagnosis_metrics`), over the fold's prepared records that carry a
class at the checkpoint's label level; the network runs in this process (`ecgad.diagnose.Diagnoser`).

The last line on stdout is metrics.json as one JSON object. Exit codes: 0 done, 2 bad usage.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.csv as pcsv

from ecgad.atomic import atomic_file, write_json
from ecgad.checkpoint import CheckpointError, load_checkpoint, resolve_checkpoint
from ecgad.inputs import is_ptbxl_root, list_inputs
from ecgad.log import get_logger
from ecgad.metrics import evaluate_scores
from ecgad.plot import plot_ecg
from ecgad.preprocess import prepare
from ecgad.ptbxl import TEST_FOLD
from ecgad.results import anomaly_map_of
from ecgad.rows import read_file
from ecgad.scoring import Scorer
from ecgad.storage import join, location, read_bytes
from ecgad.storage import name as base_name
from ecgad.validate import validate

log = get_logger("jobs.evaluate")  # not __name__, which is "__main__" under `python -m`


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


def scored_span(n_samples: int, cfg) -> slice:
    """The samples of a record's 500 Hz axis that some window's global input covers (100..4900 for a 10 s
    record, as the paper crops its localization benchmark); outside it the map is only extrapolated."""
    return slice(cfg.global_start, n_samples - (cfg.window - cfg.global_end))


def plot_roc(labels: np.ndarray, scores: np.ndarray, auroc: float | None, out: Path | str) -> None:
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
    with atomic_file(out) as fh:
        fig.savefig(fh, format="png", dpi=120)


def plot_extremes(results: list[dict[str, Any]], k: int, checkpoint: Path | str, mode: str,
                  out: Path | str) -> list[str]:
    """Plot the ``k`` highest- and lowest-scored records with their anomaly maps, scored again in process (a
    handful of records; the batch run keeps no maps unless localization metrics need them)."""
    ranked = sorted(results, key=lambda r: r["pred_score"])
    picks = [("highest", i + 1, r) for i, r in enumerate(ranked[::-1][:k])]
    picks += [("lowest", i + 1, r) for i, r in enumerate(ranked[:k]) if r not in ranked[::-1][:k]]
    scorer = Scorer.from_checkpoint(checkpoint, mode=mode)
    written = []
    for end, rank, row in picks:
        record = validate(read_file(row["path"]))
        (scores,) = scorer.score_prepared([prepare(record, scorer.prep_config)])
        name = f"{end}-{rank}_{row['record_id'].replace('/', '_')}.png"
        title = (f"{row['record_id']} ({row['label']}): score {scores.pred_score:.4g}, threshold "
                 f"{scorer.threshold:.4g} -> {'anomalous' if scores.pred_label else 'normal'}")
        plot_ecg(record.signal, record.fs, scores.anomaly_map, title=title, out=join(out, name))
        written.append(f"{base_name(str(out))}/{name}")
    return written


def _load_mask(root: Path | str, mask_path: str) -> np.ndarray:
    """A synthetic record's point mask, ``mask_path`` relative to the data root (a local path or a URI)."""
    return np.load(io.BytesIO(read_bytes(join(root, mask_path))))


def diagnosis_section(checkpoint: Path | str, root: Path | str, ok: list[dict[str, Any]],
                      n_boot: int) -> dict[str, Any]:
    """Diagnosis metrics of the checkpoint's head over the scored records ``ok`` that carry a class at its level."""
    from ecgad.diagnose import Diagnoser
    from ecgad.diagnosis import diagnosis_metrics
    from ecgad.labels import level_classes, multi_hot, parse_codes, read_statements

    diagnoser = Diagnoser(checkpoint)
    statements = read_statements(root)
    codes = [parse_codes(r["scp_codes"]) for r in ok]
    labelled = [(r, c) for r, c in zip(ok, codes) if level_classes(c, statements, diagnoser.level)]
    prepared = [prepare(validate(read_file(r["path"])), diagnoser.scorer.prep_config) for r, _ in labelled]
    targets = multi_hot([c for _, c in labelled], statements, diagnoser.level, diagnoser.classes)
    probs = diagnoser.probabilities(prepared) if prepared else np.zeros((0, len(diagnoser.classes)))
    entry = diagnoser.checkpoint.diagnosis
    metrics = diagnosis_metrics(targets, probs, diagnoser.thresholds, diagnoser.classes, entry["split"],
                                n_boot=n_boot)
    return {"level": entry["level"], "init": entry.get("init"), "freeze_encoders": entry.get("freeze_encoders"),
            "thresholds_from": entry.get("threshold_rule"), **metrics}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    root, out = location(args.data), location(args.out)
    try:
        checkpoint = resolve_checkpoint(args.checkpoint)   # RUNDIR/best -> its version, once, for every actor
        loaded = load_checkpoint(checkpoint)   # fail fast, and the preparation config and threshold to use
    except CheckpointError as err:
        print(f"evaluate: error: {err}", file=sys.stderr)
        return 2
    if not is_ptbxl_root(root):
        print(f"evaluate: error: {root} is not a PTB-XL root: evaluation needs folds and labels", file=sys.stderr)
        return 2
    inputs = list_inputs(root, folds=[args.fold])
    if inputs.num_rows == 0:
        print(f"evaluate: error: fold {args.fold} of {root} has no records", file=sys.stderr)
        return 2
    with_maps = inputs.column("mask_path").null_count < inputs.num_rows

    import ray

    from ecgad.ray.data import RECORDS_PER_TASK, chunks_dataset
    from ecgad.ray.paths import SharedPathError, require_shared
    from ecgad.ray.scoring import iter_scored, scoring_pipeline

    if not ray.is_initialized():
        ray.init()  # under `ray job submit` (RAY_ADDRESS set) this joins the cluster; otherwise starts a local one
    try:
        require_shared(inputs=[root, checkpoint], outputs=[out])
    except SharedPathError as err:
        print(f"evaluate: error: {err}", file=sys.stderr)
        return 2

    started = time.perf_counter()
    log.info(f"scoring fold {args.fold} of {root}: {inputs.num_rows} records, mode {args.mode}, "
             f"model version {loaded.model_version} ({checkpoint})" + (", with anomaly maps (masks present)" if with_maps else ""))
    scored = scoring_pipeline(chunks_dataset(inputs, RECORDS_PER_TASK), checkpoint, loaded.prep_config,
                              chunk_size=RECORDS_PER_TASK, maps=with_maps, batch_size=args.batch_size,
                              num_scorers=args.num_scorers, use_gpu=args.use_gpu, mode=args.mode,
                              scorer_cpus=args.scorer_cpus)
    index = {row["record_id"]: row for row in inputs.to_pylist()}
    results, maps, masks = [], [], []
    warnings: list[str] = []
    for chunk_results, chunk_maps in iter_scored(scored):
        results += [{**index[r["record_id"]], **r} for r in chunk_results.to_pylist()]
        for row in chunk_maps.to_pylist():
            anomaly_map, mask = anomaly_map_of(row), _load_mask(root, index[row["record_id"]]["mask_path"])
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

    if loaded.diagnosis is not None:
        metrics["diagnosis"] = diagnosis_section(checkpoint, root, ok, args.n_boot)
    plot_roc(labels, scores, metrics["record_auroc"]["value"], join(out, "roc.png"))
    plots = plot_extremes(ok, args.plots, checkpoint, args.mode, join(out, "maps")) if ok else []
    columns = ["record_id", "label", "status", "reason", "pred_score", "pred_label"]
    with atomic_file(join(out, "scores.csv")) as fh:
        pcsv.write_csv(pa.Table.from_pylist([{c: r[c] for c in columns}
                                             for r in sorted(results, key=lambda r: r["record_id"])]), fh)
    summary = {
        "checkpoint": str(checkpoint), "model_version": loaded.model_version, "data": str(root), "fold": args.fold,
        "mode": args.mode, "records": len(results), "by_status": dict(Counter(r["status"] for r in results)),
        "not_scored": {r["record_id"]: r["reason"] for r in results if r["status"] != "ok"},
        "metrics": metrics, "warnings": warnings, "plots": ["roc.png", *plots],
        "wall_s": round(wall, 3), "records_per_s": round(len(results) / wall, 3),
    }
    write_json(join(out, "metrics.json"), summary, sort_keys=False)
    auroc = metrics["record_auroc"]
    log.info(f"done in {wall:.1f} s: {len(ok)}/{len(results)} scored; record AUROC {auroc['value']} "
             f"CI {auroc['ci95']}")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
