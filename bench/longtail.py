"""Does anomaly-detection pretraining help the rare classes? The synthetic long-tail diagnosis benchmark.

    python bench/longtail.py [--n 600] [--seeds 0 1 2] [--pretrain-epochs 4] [--epochs 1] [--jobs 3] [--work DIR]

1. ``ecgad synth --long-tail``: ``--n`` records, half normal, the anomalous half spread over the generator's kinds
   and combinations by a power law (`ecgad.synth_dataset.LONG_TAIL_KINDS`), folds stratified by kind;
2. pretrain the detector (`ecgad.train.train_local`, small config) on the fold 1-8 normals;
3. choose the imbalance loss (`ecgad.diagnosis.LOSSES`) by fold-9 macro AUROC of the frozen probe (seed 0);
4. for every seed, three starting points with that loss: AD-pretrained full fine-tune, frozen probe on the
   pretrained encoders, random init (the baseline); each keeps its best fold-9 epoch and is measured on fold 10:
   macro AUROC over the head and the tail classes (tail: < 1 % of the training records, `ecgad.labels`).

Labels are the ``all`` level of the SCP statements the generator writes. Prints one line per run, the seed means
with their ranges and the differences to random init, and one JSON object on the last line (keys
``{tail,head}_auroc_{pretrained,probe,scratch}`` seed means and ``*_range`` [min, max]).
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from ecgad.checkpoint import load_checkpoint
from ecgad.diagnosis import LOSSES
from ecgad.finetune import finetune_local, load_labelled, probe_feature_folds
from ecgad.synth_dataset import write_dataset
from ecgad.train import train_local

VARIANTS = {"pretrained": ("pretrained", False), "probe": ("pretrained", True), "scratch": ("random", False)}

#: What every worker process shares, set once by `_init_worker`: the prepared data, the detector, the probe's
#: cached features, the settings.
_SHARED: dict = {}


def _init_worker(shared: dict) -> None:
    import torch

    torch.set_num_threads(1)    # one core per run: the runs themselves are the parallelism
    _SHARED.update(shared)


def _run(variant: str, seed: int, loss: str) -> tuple[str, int, str, dict]:
    """One fine-tuning run (in a worker process): its fold-9 and fold-10 macro AUROCs."""
    data, work, epochs = _SHARED["data"], _SHARED["work"], _SHARED["epochs"]
    init, freeze = VARIANTS[variant]
    summary = finetune_local(data, _SHARED["detector"], work / f"{variant}-{loss}-{seed}" / "best", init=init,
                             freeze_encoders=freeze, loss=loss, epochs=epochs, seed=seed, n_boot=100,
                             probe_features=dict(_SHARED["probe_features"]))
    macro = {part: summary[part]["macro_auroc"] for part in ("val", "test")}
    print(f"{variant:10s} loss {loss:8s} seed {seed}: fold-9 macro AUROC {macro['val']['all']['auroc']:.4f}; "
          f"fold 10 head {macro['test']['head']['auroc']:.4f} tail {macro['test']['tail']['auroc']}"
          f" ({summary['seconds']:.0f} s)", flush=True)
    return variant, seed, loss, macro


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=600)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--pretrain-epochs", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=1, help="fine-tuning epochs of every run")
    parser.add_argument("--level", default="all")
    parser.add_argument("--jobs", type=int, default=3, help="runs at a time, one process (one torch thread) each")
    parser.add_argument("--work", default="/tmp/ecgad-longtail")
    args = parser.parse_args(argv)
    work = Path(args.work)
    started = time.perf_counter()

    root = work / f"synth-{args.n}"
    if not (root / "ptbxl_database.csv").is_file():
        write_dataset(root, n=args.n, seed=0, anomaly_fraction=0.5, long_tail=True)
    detector = work / "ad" / "best"
    if not (detector / "config.json").is_file():   # a rerun on the same --work reuses the pretrained detector
        train_local(root, detector, config="small", epochs=args.pretrain_epochs, lr=1e-3)
    pretraining = load_checkpoint(detector).metadata["selection"]
    print(f"detector {detector.resolve()}: fold-9 anomaly AUROC {pretraining['best'].get('val_auroc')} "
          f"(epoch {pretraining['best_epoch']})", flush=True)
    data = load_labelled(root, args.level)
    print(f"{len(data.classes)} classes; head {data.split['head']}; tail {data.split['tail']} "
          f"({data.split['rule']}); records train/val/test {len(data.train.record_ids)}/{len(data.val.record_ids)}/"
          f"{len(data.test.record_ids)}", flush=True)
    probe_features = probe_feature_folds(data, detector)
    shared = {"data": data, "work": work, "epochs": args.epochs, "detector": detector,
              "probe_features": probe_features}

    with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn"), initializer=_init_worker,
                             initargs=(shared,)) as pool:
        losses = {loss: macro["val"]["all"]["auroc"] for _, _, loss, macro in
                  pool.map(_run, ["probe"] * len(LOSSES), [args.seeds[0]] * len(LOSSES), LOSSES)}
        loss = max(losses, key=lambda name: losses[name] if losses[name] is not None else -math.inf)
        print(f"loss chosen on fold 9 (probe, seed {args.seeds[0]}): {loss} {losses}", flush=True)
        runs = [(variant, seed) for variant in ("pretrained", "scratch", "probe") for seed in args.seeds]
        done = list(pool.map(_run, *zip(*runs), [loss] * len(runs)))
    results = {variant: [macro["test"] for v, _, _, macro in done if v == variant] for variant in VARIANTS}
    out: dict = {"n_records": args.n, "level": args.level, "seeds": args.seeds, "epochs": args.epochs,
                 "loss": loss, "loss_fold9": losses, "tail_classes": data.split["tail"],
                 "head_classes": data.split["head"]}
    for variant, runs in results.items():
        for part in ("head", "tail"):
            values = [r[part]["auroc"] for r in runs if r[part]["auroc"] is not None]
            out[f"{part}_auroc_{variant}"] = float(np.mean(values)) if values else None
            out[f"{part}_auroc_{variant}_range"] = [min(values), max(values)] if values else None
    for part in ("head", "tail"):
        for variant in ("pretrained", "probe"):
            a, b = out[f"{part}_auroc_{variant}"], out[f"{part}_auroc_scratch"]
            out[f"{part}_delta_{variant}_vs_scratch"] = None if a is None or b is None else a - b
        pre, scr = out[f"{part}_auroc_pretrained_range"], out[f"{part}_auroc_scratch_range"]
        out[f"{part}_ranges_overlap"] = None if pre is None or scr is None else not (pre[0] > scr[1] or scr[0] > pre[1])
    out["wall_s"] = round(time.perf_counter() - started, 1)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
