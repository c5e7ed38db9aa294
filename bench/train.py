"""Training throughput: the Ray Train pipeline (Ray Data streaming Parquet shards to DDP workers) against a plain
torch loop over the same samples held in memory, in one run.

A synthetic PTB-XL-layout data set is written and prepared into shards once (``jobs.preprocess``, not timed). Then:

- **baseline**: one process, one torch thread (what a Ray Train worker gets), the fold 1-8 normals decoded from the
  shards into memory up front, then `ecgad.train.train_epoch` over shuffled batches — no Ray, no data loading cost;
- **ray, 1 worker**: ``ecgad.ray.train.fit`` (what ``python -m jobs.train`` runs) with one worker, the rows streamed
  from Parquet by Ray Data every epoch, the beat draw in the collate function;
- **ray, 2 workers**: the same with two DDP workers (on a 2-core machine they share the cores with Ray Data).

Throughput is training samples per second of training time: Ray Train's figure is the epoch's samples over its
slowest worker's time in the training loop (validation excluded, as it is excluded from the baseline), taken as the
median over the epochs after the first (warm-up: worker start, first reads). Both use the same model config, batch
size and number of epochs. Ratios: ``ratio_ray_vs_plain`` (goal >= 0.9) and ``ratio_2_vs_1_workers``. The last
line is one JSON object.

    python bench/train.py [--records 600] [--epochs 3] [--config paper|small] [--batch-size 32] [--use-gpu]

Measured on a 2-core CPU (paper config, 600 records = 336 training normals, 3 epochs), two full runs: plain 17.3 and
19.8 samples/s, Ray Train 1 worker 15.6 and 18.4 (ratio 0.90 and 0.93; 0.93 in a third, 1-worker run), 2 workers
19.6 and 27.7 (1.26x and 1.50x one worker). Before ``ecgad.ray.data.read_shards`` moved to Ray Data's first Parquet
datasource the ratio was 0.62-0.78: Ray 2.60's default one lists the shard files again at every epoch on 32 newly
started footer-reading actors and packs the rows into three large blocks, so each epoch's first batch waited
~6.5 s. It now waits ~1.5-2 s (printed per epoch below, from the ``train_data_wait_s`` and ``train_first_batch_s``
metrics), the per-epoch cost of a streaming read, which longer epochs amortize (a PTB-XL epoch has ~7,000 normals).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads
import torch

from ecgad.config import PrepConfig
from ecgad.model import MCF, MCFConfig
from ecgad.ptbxl import TRAIN_FOLDS
from ecgad.ray.train import TrainSettings, ready_batch
from ecgad.shards import TRAINING_COLUMNS, ShardLayout
from ecgad.synth_dataset import write_dataset
from ecgad.train import lr_for_epoch, make_optimizer, set_lr, set_seed, train_epoch
from jobs.train import automatic_cpus_per_worker


def _in_memory_training_set(shards: Path) -> dict[str, np.ndarray]:
    """The fold 1-8 normals of the shards, every training column decoded into numpy arrays."""
    table = pads.dataset(ShardLayout(shards).records, format="parquet").to_table(
        columns=TRAINING_COLUMNS,
        filter=(pads.field("status") == "ok") & pads.field("strat_fold").isin(list(TRAIN_FOLDS))
        & (pads.field("is_normal") == True))  # noqa: E712 (an expression, not a test)
    return {name: table.column(name).to_numpy(zero_copy_only=False) for name in table.column_names}


def plain_loop(rows: dict[str, np.ndarray], config: MCFConfig, epochs: int, batch_size: int, device: str,
               seed: int) -> list[float]:
    """Samples/s of each epoch of a plain single-process loop over in-memory samples (one torch thread on CPU)."""
    generator = set_seed(seed)
    model = MCF(config).to(device)
    optimizer = make_optimizer(model)
    rng = np.random.default_rng(seed)
    n = len(rows["record_id"])
    rates = []
    for epoch in range(epochs):
        set_lr(optimizer, lr_for_epoch(epoch, epochs))
        order = rng.permutation(n)
        # Every batch is a full one (Ray's equal split and local shuffle also drop at most a few rows per epoch).
        batches = [order[i:i + batch_size] for i in range(0, n - batch_size + 1, batch_size)] or [order]
        # Decoded and beats drawn per batch, inside the timed loop, as the Ray Train workers' collate does.
        ready = (ready_batch({k: v[idx] for k, v in rows.items()}, PrepConfig(), seed, epoch) for idx in batches)
        stats = train_epoch(model, optimizer, ready, generator)   # loss.item() every step: GPU work is waited for
        rates.append(stats.samples / stats.seconds)
    return rates


def ray_train(shards: Path, out: Path, config: MCFConfig, epochs: int, batch_size: int, workers: int,
              use_gpu: bool, seed: int) -> list[float]:
    """Samples/s of each epoch of ``ecgad.ray.train.fit`` (the training loop's time, validation excluded)."""
    from ecgad.ray.train import fit

    settings = TrainSettings(model_config=config.to_dict(), epochs=epochs, batch_size=batch_size, seed=seed,
                             select_by="val_loss", val_mode="fast")
    # Leave Ray Data a whole CPU to read with, as jobs.train does on a local cluster: 2 workers on 2 cores get half
    # a CPU each.
    cpus = automatic_cpus_per_worker(workers, os.cpu_count())
    summary = fit(shards, out, settings, num_workers=workers, use_gpu=use_gpu, cpus_per_worker=cpus,
                  name=f"bench-{workers}w")
    for e in summary["epochs"]:
        print(f"ray {workers} worker(s), epoch {e['epoch']}: {e['train_samples_per_s']:.1f} samples/s, waited "
              f"{e['train_data_wait_s']:.2f} s for data ({e['train_first_batch_s']:.2f} s for the first batch)",
              flush=True)
    return [e["train_samples_per_s"] for e in summary["epochs"]]


def _steady(rates: list[float]) -> float:
    """The median epoch after the first (the first pays for worker start-up and cold reads)."""
    return statistics.median(rates[1:] if len(rates) > 1 else rates)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=600, help="synthetic records (about 60%% are training normals)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--config", choices=["small", "paper"], default="paper")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--use-gpu", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-two-workers", action="store_true")
    args = parser.parse_args()
    config = MCFConfig.paper() if args.config == "paper" else MCFConfig.small()
    device = "cuda" if args.use_gpu else "cpu"

    import ray

    from jobs.preprocess import main as preprocess

    with tempfile.TemporaryDirectory(prefix="ecgad-bench-train-") as tmp:
        tmp = Path(tmp)
        root = write_dataset(tmp / "synthetic", args.records, seed=args.seed)
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
        try:
            if preprocess(["--data", str(root), "--out", str(tmp / "shards")]) != 0:
                raise RuntimeError("jobs.preprocess failed")
            rows = _in_memory_training_set(tmp / "shards")
            print(f"{len(rows['record_id'])} training normals, {args.config} config, batch {args.batch_size}, "
                  f"{args.epochs} epochs, device {device}, load average {os.getloadavg()[0]:.2f}", flush=True)

            threads = torch.get_num_threads()
            torch.set_num_threads(1)   # what each Ray Train worker runs with (ecgad.ray.train)
            plain = plain_loop(rows, config, args.epochs, args.batch_size, device, args.seed)
            torch.set_num_threads(threads)
            one = ray_train(tmp / "shards", tmp / "run1", config, args.epochs, args.batch_size, 1, args.use_gpu,
                            args.seed)
            two = (None if args.skip_two_workers else
                   ray_train(tmp / "shards", tmp / "run2", config, args.epochs, args.batch_size, 2, args.use_gpu,
                             args.seed))
        finally:
            ray.shutdown()

    result = {
        "config": args.config, "device": device, "training_samples": len(rows["record_id"]),
        "batch_size": args.batch_size, "epochs": args.epochs,
        "plain_samples_per_s": _steady(plain),
        "ray_1w_samples_per_s": _steady(one),
        "ratio_ray_vs_plain": _steady(one) / _steady(plain),
    }
    if two is not None:
        result["ray_2w_samples_per_s"] = _steady(two)
        result["ratio_2_vs_1_workers"] = _steady(two) / _steady(one)
    print("per-epoch samples/s: plain " + ", ".join(f"{r:.1f}" for r in plain)
          + "; ray 1 worker " + ", ".join(f"{r:.1f}" for r in one)
          + ("; ray 2 workers " + ", ".join(f"{r:.1f}" for r in two) if two else ""))
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
