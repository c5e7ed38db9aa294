"""Accuracy on real ECGs, offline: train on DeepFake ECG normals only, test on real PTB-XL records.

1. ``N`` DeepFake ECG records are written as a PTB-XL root (``ecgad synth --source deepfake``; a fraction
   ``--anomaly-fraction`` carries inserted anomalies, so fold 9 selects the epoch by AUROC on DeepFake data, never on
   a real record) and `ecgad.train.train_local` trains on its fold 1-8 normals.
2. **real**: every PTB-XL record of ``$ECGAD_SAMPLE_DATA/ptbxl`` (default ``../shared/data``), normal vs abnormal by
   the project's label rule (`ecgad.ptbxl`), scored as a whole and per rate (100 Hz and 500 Hz files apart: a 100 Hz
   record reaches the model upsampled, which a 500 Hz-trained model may see as a shift).
3. **injected**: each real *normal* record, brought to 500 Hz, once clean and ``--twins`` times with an anomaly
   inserted by `ecgad.inject` (types taking turns, per-lead point masks): record AUROC, pooled point AUROC and Dice
   (`ecgad.metrics.evaluate_scores`, bootstrap 95 % CIs), per source rate too.

Record scores are compared across aggregations of the same model's output: ``mean`` (the protocol's: mean over
every beat, docs/method.md §4.1) and three read off the anomaly map (cropped to the scored span): ``map_p99`` (99th
percentile over all leads and samples), ``lead_max`` (the largest per-lead mean), ``lead_p99_max`` (the largest
per-lead 99th percentile). The baseline, scored in the same run, is the same architecture untrained (seeded
initialization; fast mode, to save time on a small CPU): the ratios say what training on DeepFake normals adds.
``--compare-modes`` also scores the trained model in the other mode (full vs fast, docs/method.md §4.2-§4.3).

Seeded: the same ``--seed`` (and arguments) gives the same figures on the same machine (CPU training is repeatable
bit for bit, `ecgad.train`). The last stdout line is one JSON object.

    python bench/accuracy.py [--n 2000] [--epochs 15] [--lr 1e-3] [--config small|paper] [--mode full|fast]
                             [--compare-modes] [--via-100hz F] [--twins 2] [--seed 0] [--out DIR]

Defaults: small config on the CPU, the paper config (``--config paper``) when CUDA is present.

Measured (2-core Intel CPU, quiet, seed 0, small config, lr 1e-3, 15-16 epochs; README "Accuracy on real ECGs" has
the table): real records, record AUROC (``mean``) 0.76 / 0.81 / 0.85 at ``--n`` 500 / 2000 / 10000 (untrained 0.27);
injected 0.59 / 0.82 / 0.86, pooled point 0.59 / 0.62 / 0.63; training 50 s / 3.3 min / 17.7 min.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from ecgad.checkpoint import load_checkpoint
from ecgad.config import PrepConfig
from ecgad.inject import inject
from ecgad.log import get_logger
from ecgad.metrics import bootstrap_ci, evaluate_scores, record_auroc
from ecgad.model import MCF, MCFConfig
from ecgad.preprocess import resample
from ecgad.io import read_record
from ecgad.ptbxl import TRAIN_FOLDS, iter_ptbxl_records, load_ptbxl_index
from ecgad.scoring import Scorer
from ecgad.synth import ANOMALY_TYPES
from ecgad.synth_dataset import FS_LR as LOW_FS
from ecgad.synth_dataset import _write_wfdb, write_dataset
from ecgad.train import set_seed, train_local
from ecgad.types import MODEL_FS, Record, Rejection
from ecgad.validate import validate
from jobs.evaluate import scored_span

logger = get_logger("bench.accuracy")

#: Record-score aggregations compared (module docstring); ``mean`` is the protocol's own score.
AGGREGATIONS = ("mean", "map_p99", "lead_max", "lead_p99_max")


@dataclass
class TestSet:
    """Records to score with their labels (1 = abnormal), source rates and, for injected sets, point masks."""

    records: list[Record] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    rates: list[int] = field(default_factory=list)
    masks: list[np.ndarray] | None = None


def real_set(ptbxl_root: Path) -> tuple[TestSet, TestSet]:
    """Every readable PTB-XL record of ``ptbxl_root`` (labels by the project's rule), and its normals alone."""
    real, normals = TestSet(), TestSet()
    for record in iter_ptbxl_records(ptbxl_root):
        try:
            validate(record)
        except Rejection as rejection:
            logger.warning("%s rejected: %s", record.record_id, rejection.reason)
            continue
        label = 0 if record.metadata["is_normal"] else 1
        for target in (real, normals) if label == 0 else (real,):
            target.records.append(record)
            target.labels.append(label)
            target.rates.append(int(round(record.fs)))
    return real, normals


def injected_set(normals: TestSet, twins: int, seed: int) -> TestSet:
    """Each normal at 500 Hz once clean and ``twins`` times anomalous (types taking turns), with point masks."""
    out = TestSet(masks=[])
    for i, (record, rate) in enumerate(zip(normals.records, normals.rates)):
        signal = resample(record.signal, record.fs, MODEL_FS).astype(np.float32)
        clean = replace(record, signal=signal, fs=float(MODEL_FS), record_id=f"{record.record_id}-clean")
        out.records.append(clean)
        out.labels.append(0)
        out.rates.append(rate)
        out.masks.append(np.zeros(signal.shape, dtype=bool))
        for j in range(twins):
            anomaly = ANOMALY_TYPES[(i * twins + j) % len(ANOMALY_TYPES)]
            try:
                twin = inject(signal, anomaly, int(np.random.SeedSequence([seed, i, j]).generate_state(1)[0]))
            except ValueError as exc:
                logger.warning("%s: no %s inserted: %s", record.record_id, anomaly, exc)
                continue
            out.records.append(replace(clean, signal=twin.signal, record_id=f"{record.record_id}-{anomaly}"))
            out.labels.append(1)
            out.rates.append(rate)
            out.masks.append(twin.mask)
    return out


def _crop(anomaly_map: np.ndarray, fs: float, cfg: PrepConfig) -> np.ndarray:
    """The part of a map on the input's axis that some window scores (`jobs.evaluate.scored_span`, at ``fs``)."""
    span = scored_span(round(anomaly_map.shape[1] * cfg.fs / fs), cfg)
    return anomaly_map[:, round(span.start * fs / cfg.fs):round(span.stop * fs / cfg.fs)]


def score_set(scorer: Scorer, test: TestSet) -> tuple[dict[str, np.ndarray], list[np.ndarray]]:
    """Record scores by every aggregation of `AGGREGATIONS`, and the cropped maps, for every record of ``test``."""
    scores = scorer.score_records(test.records, with_maps=True)
    failed = [s for s in scores if isinstance(s, Rejection)]
    if failed:
        raise RuntimeError(f"{len(failed)} test records could not be prepared: {failed[:3]}")
    maps = [_crop(s.anomaly_map, r.fs, scorer.prep_config) for s, r in zip(scores, test.records)]
    by = {
        "mean": np.array([s.pred_score for s in scores]),
        "map_p99": np.array([np.quantile(m, 0.99) for m in maps]),
        "lead_max": np.array([m.mean(axis=1).max() for m in maps]),
        "lead_p99_max": np.array([np.quantile(m, 0.99, axis=1).max() for m in maps]),
    }
    return by, maps


def _auroc_ci(labels: np.ndarray, scores: np.ndarray, n_boot: int, seed: int) -> dict:
    value = record_auroc(labels, scores)
    lo, hi = bootstrap_ci(lambda i: record_auroc(labels[i], scores[i]), labels.size, n_boot=n_boot, seed=seed)
    return {"value": _rounded(value), "ci95": [_rounded(lo), _rounded(hi)]}


def _rounded(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else round(float(x), 4)


def report(test: TestSet, by: dict[str, np.ndarray], maps: list[np.ndarray], threshold: float, n_boot: int,
           seed: int) -> dict:
    """Per rate (``all``, ``100``, ``500``): record AUROC with CI by aggregation; localization for injected sets."""
    labels, rates = np.asarray(test.labels), np.asarray(test.rates)
    out = {}
    for rate in ("all", 100, 500):
        keep = np.ones(labels.size, bool) if rate == "all" else rates == rate
        if not keep.any():
            continue
        y = labels[keep]
        entry = {"n_normal": int((y == 0).sum()), "n_abnormal": int(y.sum()),
                 "record_auroc": {name: _auroc_ci(y, s[keep], n_boot, seed) for name, s in by.items()}}
        if test.masks is not None:
            idx = np.flatnonzero(keep)
            full = evaluate_scores(y, by["mean"][keep], threshold, [maps[i] for i in idx],
                                   [_crop(test.masks[i], MODEL_FS, PrepConfig()) for i in idx],
                                   n_boot=n_boot, seed=seed)
            entry.update({k: {"value": _rounded(full[k]["value"]), "ci95": [_rounded(c) for c in full[k]["ci95"]]}
                          for k in ("point_auroc", "dice")})
        out[str(rate)] = entry
    return out


def pass_through_100hz(root: Path, fraction: float, seed: int) -> int:
    """Rewrite a random ``fraction`` of the training normals of a synthetic root as they would be after a trip to
    100 Hz and back (`ecgad.preprocess.resample` down, then up, as preparation upsamples a 100 Hz record): the
    augmentation that shows a 500 Hz-trained model what upsampled 100 Hz records look like. Returns how many."""
    index = load_ptbxl_index(root)
    rows = index[index["is_normal"] & index["strat_fold"].isin(TRAIN_FOLDS)]
    chosen = rows[np.random.default_rng(seed).random(len(rows)) < fraction]
    for _, row in chosen.iterrows():
        signal = read_record(root / row["record_path"]).signal
        _write_wfdb(root, row["record_path"], resample(resample(signal, MODEL_FS, LOW_FS), LOW_FS, MODEL_FS),
                    MODEL_FS)
    return len(chosen)


def main() -> int:
    default_data = Path(os.environ.get("ECGAD_SAMPLE_DATA", Path(__file__).resolve().parents[1] / "../shared/data"))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000, help="DeepFake ECG records to generate")
    parser.add_argument("--anomaly-fraction", type=float, default=0.1, help="of them, with inserted anomalies")
    parser.add_argument("--config", choices=("small", "paper"), default="paper" if torch.cuda.is_available()
                        else "small")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--mode", choices=("full", "fast"), default="full", help="scoring mode of the test sets")
    parser.add_argument("--via-100hz", type=float, default=0.0,
                        help="fraction of the training normals passed through 100 Hz and back (augmentation)")
    parser.add_argument("--compare-modes", action="store_true", help="also score the trained model in the other mode")
    parser.add_argument("--twins", type=int, default=2, help="anomalous twins per real normal")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-boot", type=int, default=1000)
    parser.add_argument("--data", type=Path, default=default_data, help="holds ptbxl/ (real PTB-XL records)")
    parser.add_argument("--out", type=Path, default=None, help="keep the data and checkpoint here (default: temp)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp)
        started = time.perf_counter()
        root = write_dataset(out / "deepfake", n=args.n, seed=args.seed, anomaly_fraction=args.anomaly_fraction,
                             source="deepfake")
        lowpassed = pass_through_100hz(root, args.via_100hz, args.seed) if args.via_100hz else 0
        generate_s = time.perf_counter() - started
        checkpoint = load_checkpoint(train_local(root, out / "run", config=args.config, epochs=args.epochs,
                                                 batch_size=args.batch_size, seed=args.seed, lr=args.lr,
                                                 score_mode="fast"))
        meta = checkpoint.metadata
        real, normals = real_set(args.data / "ptbxl")
        tests = {"real": real, "injected": injected_set(normals, args.twins, args.seed)}

        set_seed(args.seed)
        untrained = MCF(MCFConfig.small() if args.config == "small" else MCFConfig.paper())
        models = {"trained": Scorer(checkpoint.model, checkpoint.prep_config, checkpoint.threshold, mode=args.mode),
                  "untrained": Scorer(untrained, PrepConfig(), math.nan, mode="fast")}
        if args.compare_modes:
            other = "fast" if args.mode == "full" else "full"
            models[f"trained_{other}"] = Scorer(checkpoint.model, checkpoint.prep_config, checkpoint.threshold,
                                                mode=other)
        results: dict = {}
        score_started = time.perf_counter()
        for name, scorer in models.items():
            for set_name, test in tests.items():
                by, maps = score_set(scorer, test)
                results.setdefault(set_name, {})[name] = report(test, by, maps, scorer.threshold, args.n_boot,
                                                                args.seed)
                logger.info("%s on %s: record AUROC %s", name, set_name, {
                    k: v["value"] for k, v in results[set_name][name]["all"]["record_auroc"].items()})
        score_s = time.perf_counter() - score_started

    summary = {
        "bench": "accuracy", "seed": args.seed, "config": args.config, "n_generated": args.n,
        "train_normals": meta["data"]["train_records"], "via_100hz": args.via_100hz, "via_100hz_records": lowpassed, "epochs": args.epochs, "lr": args.lr,
        "batch_size": args.batch_size, "mode": args.mode, "twins": args.twins,
        "best_epoch": meta["selection"]["best_epoch"], "selection_metric": meta["selection"]["metric"],
        "generate_s": round(generate_s, 1), "train_s": round(meta["train_seconds"], 1), "score_s": round(score_s, 1),
        "load_average_1m": round(os.getloadavg()[0], 2), "cpus": os.cpu_count(), "torch_threads":
        torch.get_num_threads(),
        "ratios_trained_vs_untrained": {
            set_name: {agg: _ratio(results[set_name]["trained"]["all"]["record_auroc"][agg]["value"],
                                   results[set_name]["untrained"]["all"]["record_auroc"][agg]["value"])
                       for agg in AGGREGATIONS} for set_name in tests},
        "results": results,
    }
    print(json.dumps(summary))
    return 0


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else round(a / b, 3)


if __name__ == "__main__":
    raise SystemExit(main())
