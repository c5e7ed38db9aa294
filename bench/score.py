"""Scoring throughput: the published protocol (oracle) against the `Scorer`, full and fast, on the same records.

Real 10 s 12-lead records from the sample data (`ecgad.settings.sample_data_dir`), read and prepared once (not
timed); the paper-config model with seeded random weights (eval mode, BatchNorm statistics randomized so eval-mode
BN does real work). Every scorer produces scores *and* anomaly maps. The oracle scores ``--oracle-records`` records
one forward pass at a time (as the reference); the scorers score the same records in one call (ratios are taken on
these), then all prepared records in one call (throughput at scale). Each figure is the best of ``--repeats`` runs
(per record for the oracle), the usual way to read a timing on a shared machine. The last line is one JSON object.

    python bench/score.py [--device cuda] [--oracle-records 8] [--repeats 3] [--max-batch N]
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Callable

import torch

from ecgad.inputs import list_record_files
from ecgad.io import read_record
from ecgad.model import MCF, MCFConfig
from ecgad.oracle import oracle_score_window
from ecgad.preprocess import prepare
from ecgad.scoring import Scorer
from ecgad.settings import sample_data_dir
from ecgad.types import Rejection
from _timing import best_seconds


def _ten_second_records(limit: int | None = None) -> list:
    prepared = []
    for path in list_record_files(sample_data_dir()):
        try:
            record = prepare(read_record(path))
        except Rejection:
            continue
        if len(record.windows) == 1:
            prepared.append(record)
        if limit and len(prepared) == limit:
            break
    return prepared


def _random_model(seed: int, device: torch.device) -> MCF:
    torch.manual_seed(seed)
    model = MCF(MCFConfig.paper())
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm1d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    return model.to(device).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--oracle-records", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-batch", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    device = torch.device(args.device)

    records = _ten_second_records()
    subset = records[:args.oracle_records]
    n_beats = sum(r.n_beats for r in subset)
    model = _random_model(args.seed, device)
    full = Scorer(model, device=device, mode="full", max_batch=args.max_batch)
    fast = Scorer(model, device=device, mode="fast", max_batch=args.max_batch)
    print(f"device {device}, torch threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.2f}, "
          f"max_batch {full.max_batch}; "
          f"{len(records)} prepared 10 s records, {len(subset)} ({n_beats} beats) for the ratios")

    def synchronized(run: Callable[[], object]) -> Callable[[], None]:
        def timed() -> None:
            run()
            if device.type == "cuda":
                torch.cuda.synchronize()
        return timed

    def oracle(window) -> Callable[[], None]:
        return synchronized(lambda: oracle_score_window(model, window.signal, window.beat_peaks))

    full.score_prepared(subset[:1])  # warm-up (allocator, kernel selection)
    fast.score_prepared(subset[:1])
    oracle(subset[0].windows[0])()
    oracle_s = sum(best_seconds(oracle(w), args.repeats) for record in subset for w in record.windows)
    full_s = best_seconds(synchronized(lambda: full.score_prepared(subset)), args.repeats)
    fast_s = best_seconds(synchronized(lambda: fast.score_prepared(subset)), args.repeats)
    full_all_s = best_seconds(synchronized(lambda: full.score_prepared(records)), 1)
    fast_all_s = best_seconds(synchronized(lambda: fast.score_prepared(records)), 1)

    result = {
        "device": str(device),
        "records": len(subset),
        "beats": n_beats,
        "oracle_ecg_per_s": len(subset) / oracle_s,
        "scorer_ecg_per_s": len(subset) / full_s,
        "fast_ecg_per_s": len(subset) / fast_s,
        "ratio_scorer_vs_oracle": oracle_s / full_s,
        "ratio_fast_vs_oracle": oracle_s / fast_s,
        "all_records": len(records),
        "scorer_ecg_per_s_all": len(records) / full_all_s,
        "fast_ecg_per_s_all": len(records) / fast_all_s,
        "max_batch": full.max_batch,
    }
    for name in ("oracle", "scorer", "fast"):
        print(f"{name:>7}: {result[f'{name}_ecg_per_s']:8.2f} ECG/s")
    print(f"scorer {result['ratio_scorer_vs_oracle']:.2f}x, fast {result['ratio_fast_vs_oracle']:.2f}x the oracle; "
          f"all {len(records)} records: scorer {result['scorer_ecg_per_s_all']:.2f}, "
          f"fast {result['fast_ecg_per_s_all']:.2f} ECG/s")
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()}))


if __name__ == "__main__":
    main()
