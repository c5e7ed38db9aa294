"""Scoring throughput: the published protocol (oracle) against the `Scorer`, full and fast, on the same records.

Real 10 s 12-lead records from the sample data (`ecgad.settings.sample_data_dir`), read and prepared once (not
timed); the paper-config model with seeded random weights (eval mode, BatchNorm statistics randomized so eval-mode
BN does real work). Every scorer produces scores *and* anomaly maps. The oracle scores ``--oracle-records`` records
one forward pass at a time (as the reference); the scorers score the same records in one call (ratios are taken on
these), then all prepared records in one call (throughput at scale). Each figure is the best of ``--repeats`` runs
(per record for the oracle), the usual way to read a timing on a shared machine. The last line is one JSON object.

How close to the hardware: the floating-point work of each path is counted once with
``torch.utils.flop_counter.FlopCounterMode`` (matrix products and convolutions) and divided by its best time, giving
achieved GFLOP/s (``oracle_gflops``, ``full_gflops``, ``fast_gflops``); the machine's roof (``roof_gflops``) is a
large matrix product in the scoring precision on the same device and threads, measured in the same run, before and
after the scorers (the best of both), so that the fractions ``*_roof_fraction`` compare readings taken under the same
load. ``--backend`` picks the `Scorer` backend; ``--precision bf16|fp16`` scores under ``torch.autocast``.
``--exported onnx|torchscript`` also exports the model (`ecgad.export`) and times `ecgad.export.ExportedScorer` on the
same records (ONNX Runtime or TorchScript running the whole restoration pass per beat, the oracle's work, batched per
window; ``exported_*`` keys, CPU only). ``--profile`` also prints torch.profiler's per-operator table of one full and one fast call. ``--device cuda`` on a
machine without CUDA prints one JSON line with ``skipped`` and its reason, and exits 0.

    python bench/score.py [--device cuda] [--precision fp32|bf16|fp16] [--backend eager|compile]
                          [--oracle-records 8] [--repeats 3] [--max-batch N] [--profile] [--exported onnx]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from ecgad.backends import BACKENDS
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


PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
ROOF_SIZE = {"cpu": 2048, "cuda": 8192}


def _unavailable(device: torch.device, precision: str) -> str | None:
    """Why this device and precision cannot be measured here, or None."""
    if device.type == "cuda" and not torch.cuda.is_available():
        return "CUDA is not available on this machine (torch.cuda.is_available() is False)"
    if device.type == "cuda" and precision == "bf16" and not torch.cuda.is_bf16_supported():
        return "this GPU does not support bf16"
    return None


def _precision(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Autocast to ``precision`` on ``device``'s type (nothing for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=PRECISIONS[precision])


def _gflop(run: Callable[[], object]) -> float:
    """The matrix-product and convolution work of one ``run()``, in GFLOP (what ``FlopCounterMode`` counts)."""
    with FlopCounterMode(display=False) as counter:
        run()
    return counter.get_total_flops() / 1e9


def _roof_gflops(device: torch.device, precision: str, repeats: int,
                 synchronized: Callable[[Callable[[], object]], Callable[[], None]]) -> float:
    """The machine's roof: GFLOP/s of one large square matrix product on the same device and threads."""
    n = ROOF_SIZE[device.type]
    a, b = (torch.randn(n, n, device=device, dtype=PRECISIONS[precision]) for _ in range(2))
    product = synchronized(lambda: a @ b)
    product()
    return 2 * n ** 3 / best_seconds(product, max(repeats, 3)) / 1e9


def _drift_vs_fp32(scorer: Scorer, records: list, device: torch.device, precision: str) -> dict[str, float]:
    """How far scoring under ``precision`` moves each record from fp32: the largest relative score difference, and
    the largest map difference over that map's largest value."""
    reference = scorer.score_prepared(records)
    with _precision(device, precision):
        lowered = scorer.score_prepared(records)
    pairs = list(zip(lowered, reference, strict=True))
    return {"max_rel_score_diff_vs_fp32": max(abs(a.pred_score / b.pred_score - 1) for a, b in pairs),
            "max_rel_map_diff_vs_fp32": max(float(np.abs(a.anomaly_map - b.anomaly_map).max()
                                                  / np.abs(b.anomaly_map).max()) for a, b in pairs)}


def _exported_path(model: MCF, subset: list, fmt: str, oracle_gflop: float, oracle_s: float, repeats: int
                   ) -> dict[str, float]:
    """ECG/s and GFLOP/s of `ExportedScorer` on ``subset`` (it does the oracle's matrix work: every beat, every
    pass, the whole model), and its largest relative record-score difference from the eager `Scorer`."""
    from ecgad.export import ExportedScorer, export_model

    with tempfile.TemporaryDirectory(prefix="ecgad-bench-export-") as tmp:
        exported = ExportedScorer(export_model(model, Path(tmp) / f"model.{fmt}", fmt))
        exported.score_prepared(subset[:1])
        seconds = best_seconds(lambda: exported.score_prepared(subset), repeats)
        scores = exported.score_prepared(subset)
    reference = [s.pred_score for s in Scorer(model, mode="full").score_prepared(subset, with_maps=False)]
    return {"exported_format": fmt, "exported_ecg_per_s": len(subset) / seconds, "exported_gflops": oracle_gflop / seconds,
            "ratio_exported_vs_oracle": oracle_s / seconds,
            "exported_max_rel_score_diff": max(abs(a / b - 1) for a, b in zip(scores, reference, strict=True))}


def _print_profile(name: str, run: Callable[[], object], device: torch.device) -> None:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        run()
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(f"-- {name}: operators by self time\n{prof.key_averages().table(sort_by=sort, row_limit=15)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", choices=sorted(PRECISIONS), default="fp32")
    parser.add_argument("--backend", choices=BACKENDS, default="eager")
    parser.add_argument("--oracle-records", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-batch", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--profile", action="store_true", help="print the per-operator profile of full and fast")
    parser.add_argument("--exported", choices=["onnx", "torchscript"], default=None,
                        help="also time the exported restoration pass (CPU)")
    args = parser.parse_args()
    device = torch.device(args.device)
    reason = _unavailable(device, args.precision)
    if reason:
        print(json.dumps({"benchmark": "score", "device": str(device), "precision": args.precision,
                          "skipped": reason}))
        return

    records = _ten_second_records()
    subset = records[:args.oracle_records]
    n_beats = sum(r.n_beats for r in subset)
    model = _random_model(args.seed, device)
    full = Scorer(model, device=device, mode="full", max_batch=args.max_batch, backend=args.backend)
    fast = Scorer(model, device=device, mode="fast", max_batch=args.max_batch, backend=args.backend)
    print(f"device {device}, precision {args.precision}, backend {args.backend}, torch threads "
          f"{torch.get_num_threads()}, load average {os.getloadavg()[0]:.2f}, max_batch {full.max_batch}; "
          f"{len(records)} prepared 10 s records, {len(subset)} ({n_beats} beats) for the ratios")

    def synchronized(run: Callable[[], object]) -> Callable[[], None]:
        def timed() -> None:
            with _precision(device, args.precision):
                run()
            if device.type == "cuda":
                torch.cuda.synchronize()
        return timed

    def oracle(window) -> Callable[[], None]:
        return synchronized(lambda: oracle_score_window(model, window.signal, window.beat_peaks))

    def on_subset(scorer: Scorer) -> Callable[[], None]:
        return synchronized(lambda: scorer.score_prepared(subset))

    roof_before = _roof_gflops(device, args.precision, args.repeats, synchronized)
    on_subset(full)()  # warm-up (allocator, kernel selection, compilation)
    on_subset(fast)()
    oracle(subset[0].windows[0])()
    if args.profile:
        _print_profile("full", on_subset(full), device)
        _print_profile("fast", on_subset(fast), device)
    oracle_gflop = sum(_gflop(oracle(w)) for record in subset for w in record.windows)
    full_gflop, fast_gflop = _gflop(on_subset(full)), _gflop(on_subset(fast))
    oracle_s = sum(best_seconds(oracle(w), args.repeats) for record in subset for w in record.windows)
    full_s = best_seconds(on_subset(full), args.repeats)
    fast_s = best_seconds(on_subset(fast), args.repeats)
    full_all_s = best_seconds(synchronized(lambda: full.score_prepared(records)), 1)
    fast_all_s = best_seconds(synchronized(lambda: fast.score_prepared(records)), 1)
    roof = max(roof_before, _roof_gflops(device, args.precision, args.repeats, synchronized))

    result = {
        "benchmark": "score",
        "device": str(device),
        "precision": args.precision,
        "backend": args.backend,
        "threads": torch.get_num_threads(),
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
        "oracle_gflop_per_ecg": oracle_gflop / len(subset),
        "full_gflop_per_ecg": full_gflop / len(subset),
        "fast_gflop_per_ecg": fast_gflop / len(subset),
        "roof_gflops": roof,
        "oracle_gflops": oracle_gflop / oracle_s,
        "full_gflops": full_gflop / full_s,
        "fast_gflops": fast_gflop / fast_s,
        "full_roof_fraction": full_gflop / full_s / roof,
        "fast_roof_fraction": fast_gflop / fast_s / roof,
    }
    if args.exported and device.type == "cpu":
        result.update(_exported_path(model, subset, args.exported, oracle_gflop, oracle_s, args.repeats))
    if args.precision != "fp32":
        result.update(_drift_vs_fp32(full, records, device, args.precision))
    for name in ("oracle", "scorer", "fast"):
        print(f"{name:>7}: {result[f'{name}_ecg_per_s']:8.2f} ECG/s")
    print(f"scorer {result['ratio_scorer_vs_oracle']:.2f}x, fast {result['ratio_fast_vs_oracle']:.2f}x the oracle; "
          f"all {len(records)} records: scorer {result['scorer_ecg_per_s_all']:.2f}, "
          f"fast {result['fast_ecg_per_s_all']:.2f} ECG/s")
    print(f"roof {roof:.1f} GFLOP/s; oracle {result['oracle_gflops']:.1f}, full {result['full_gflops']:.1f} "
          f"({result['full_roof_fraction']:.0%}), fast {result['fast_gflops']:.1f} ({result['fast_roof_fraction']:.0%})")
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()}))


if __name__ == "__main__":
    main()
