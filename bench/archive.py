"""Archive scoring at two sizes: records/s and peak memory of every Ray process, 1x against 10x, and the Ray Data
pipeline against a plain single-process loop, in one run.

A synthetic archive (WFDB records in PTB-XL layout, ``ecgad.synth_dataset``) of ``--records`` records and one ten
times larger are written once (not timed), and a checkpoint of a randomly initialized MCF (``--size``) is saved:
scores are meaningless, costs are real. Then:

- **plain loop**: one process, the 1x archive, read -> validate -> prepare -> `Scorer` record by record in batches of
  ``--batch-size`` (what a script without Ray would do), with all of this machine's cores for torch;
- **ray 1x / ray 10x**: ``ecgad.ray.archive.score_archive`` (what ``python -m jobs.score_archive`` runs): preparation
  in Ray tasks, scoring in the actor pool, Parquet commits. While each runs, a sampler thread reads the resident
  memory (RSS, and USS/PSS, `MemorySampler`) of this driver and every process under it (GCS, raylet, Ray Data's
  tasks and actors) every 0.2 s.

The pool is the CPU layout that suits this pipeline: one single-thread model actor per core, reserving together all
but one CPU, on which the preparation tasks run. Preparation costs ~11 ms of one core per record against ~90 ms of
single-thread scoring, so the cores are busy scoring nearly all the time, and single-thread actors waste nothing on
torch's thread synchronization (two threads score at 1.8x one, not 2x) or on a thread preempted by a preparation
task. Measured on 2 cores: one actor of 2 threads (``--num-scorers 1 --scorer-cpus 1 --scorer-threads 2``) 11.3
records/s at 10x; two single-thread actors 13.4.

Memory is "flat" when the largest worker's and the whole tree's peak stay about the same as the archive grows ten
times: nothing is collected on the driver, and blocks stream. Ratios: ``ratio_ray_vs_plain`` (records/s of the 10x Ray
run against the plain loop, so that the pool's start-up is amortized; goal >= 0.8 on a 2-core machine; the 1x run's
ratio is reported too) and ``peak_rss_ratio_10x_vs_1x`` (goal ~1), with the same ratios of the PSS total and of the
largest worker's RSS and USS. The last
line is one JSON object.

    python bench/archive.py [--records 48] [--size paper|small] [--mode fast|full] [--chunk-size 16]
                            [--num-scorers N] [--scorer-cpus C] [--scorer-threads T]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

import psutil

from ecgad.checkpoint import save_checkpoint
from ecgad.config import PrepConfig
from ecgad.model import MCF, MCFConfig
from ecgad.preprocess import prepare
from ecgad.inputs import list_record_files
from ecgad.rows import read_file
from ecgad.scoring import Scorer
from ecgad.synth_dataset import write_dataset
from ecgad.types import Rejection
from ecgad.validate import validate

MiB = 2**20


class MemorySampler:
    """Peak memory of this process and of every process under it, sampled on a thread until stopped.

    Two views: RSS, what the issue asks for, counts every page a process has mapped, so pages it shares (libraries,
    and the Ray object store, whose blocks every reader maps) count once per process that touched them; USS is the
    memory only that process holds, and PSS splits shared pages among their users, so the PSS total is the tree's
    real footprint. A leak shows in USS; a process reading more of the object store shows only in RSS. USS and PSS
    cost the kernel a walk of each process's page tables (Ray workers map the whole object store), so they are
    sampled every ``full_every``-th time only, not to slow down what is measured.
    """

    def __init__(self, interval_s: float = 0.2, full_every: int = 5) -> None:
        self.interval_s, self.full_every = interval_s, full_every
        self.peaks: dict[str, dict[tuple[int, str], int]] = {"rss": defaultdict(int), "uss": defaultdict(int)}
        self.peak_total = {"rss": 0, "pss": 0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = psutil.Process()
        for sample in itertools.count():
            if self._stop.is_set():
                return
            full = sample % self.full_every == 0
            kinds = ("rss", "uss", "pss") if full else ("rss",)
            total = dict.fromkeys(kinds, 0)
            for process in [me, *me.children(recursive=True)]:
                try:
                    memory = process.memory_full_info() if full else process.memory_info()
                    key = (process.pid, _role(process))
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
                for kind in kinds:
                    value = getattr(memory, kind)
                    total[kind] += value
                    if kind in self.peaks:
                        self.peaks[kind][key] = max(self.peaks[kind][key], value)
            for kind in self.peak_total.keys() & total.keys():
                self.peak_total[kind] = max(self.peak_total[kind], total[kind])
            self._stop.wait(self.interval_s)

    def __enter__(self) -> "MemorySampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def by_role(self, kind: str = "rss") -> dict[str, float]:
        """The largest peak (MiB) of ``kind`` (rss or uss) among the processes of each role."""
        roles: dict[str, int] = defaultdict(int)
        for (_, role), value in self.peaks[kind].items():
            roles[role] = max(roles[role], value)
        return {role: round(value / MiB, 1) for role, value in sorted(roles.items())}


def _role(process: psutil.Process) -> str:
    """What a process is to Ray: ``driver``, ``ray::<task or actor>``, or the executable (gcs_server, raylet...)."""
    if process.pid == os.getpid():
        return "driver"
    argv = process.cmdline() or [process.name()]
    if argv[0].startswith("ray::"):
        return argv[0].split()[0]
    script = next((a for a in argv[1:] if a.endswith(".py")), argv[0])
    return Path(script).name


def plain_loop(paths: list[Path], scorer: Scorer, batch_size: int) -> float:
    """Records/s of read -> validate -> prepare -> score in this process, batch by batch."""
    started = time.perf_counter()
    batch = []
    for path in paths:
        try:
            batch.append(prepare(validate(read_file(path)), scorer.prep_config))
        except Rejection:
            continue
        if len(batch) == batch_size:
            scorer.score_prepared(batch, with_maps=False)
            batch = []
    if batch:
        scorer.score_prepared(batch, with_maps=False)
    return len(paths) / (time.perf_counter() - started)


def ray_run(root: Path, checkpoint: Path, out: Path, args: argparse.Namespace) -> dict:
    from ecgad.ray.archive import score_archive

    with MemorySampler() as sampler:
        summary = score_archive(root, checkpoint, out, batch_size=args.batch_size, chunk_size=args.chunk_size,
                                num_scorers=args.num_scorers, min_scorers=args.num_scorers, mode=args.mode,
                                scorer_cpus=args.scorer_cpus, scorer_threads=args.scorer_threads)
    if not summary["complete"]:
        raise RuntimeError(f"the archive run did not complete: {summary}")
    return {"records": summary["records"], "records_per_s": summary["records_per_s"],
            "peak_rss_total_mib": round(sampler.peak_total["rss"] / MiB, 1),
            "peak_pss_total_mib": round(sampler.peak_total["pss"] / MiB, 1),
            "peak_rss_by_role_mib": sampler.by_role("rss"), "peak_uss_by_role_mib": sampler.by_role("uss")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=48, help="records of the 1x archive (10x has ten times more)")
    parser.add_argument("--size", choices=["small", "paper"], default="paper")
    parser.add_argument("--mode", choices=["full", "fast"], default="fast")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--chunk-size", type=int, default=16)
    cores = os.cpu_count() or 2
    parser.add_argument("--num-scorers", type=int, default=cores, help="model actors in the pool (one per core)")
    parser.add_argument("--scorer-cpus", type=float, default=(cores - 1) / cores,
                        help="CPUs each model actor reserves (together all but the one preparation runs on)")
    parser.add_argument("--scorer-threads", type=int, default=1, help="torch threads of each model actor")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import ray
    import torch

    with tempfile.TemporaryDirectory(prefix="ecgad-bench-archive-") as tmp:
        tmp = Path(tmp)
        small = write_dataset(tmp / "archive-1x", args.records, seed=args.seed)
        large = write_dataset(tmp / "archive-10x", 10 * args.records, seed=args.seed + 1)
        torch.manual_seed(args.seed)
        config = MCFConfig.paper() if args.size == "paper" else MCFConfig.small()
        checkpoint = save_checkpoint(tmp / "checkpoint", MCF(config).eval(), config, PrepConfig(), threshold=1.0)
        print(f"archives of {args.records} and {10 * args.records} synthetic records, {args.size} model, "
              f"{args.mode} mode, load average {os.getloadavg()[0]:.2f}", flush=True)

        plain = plain_loop(list_record_files(small), Scorer.from_checkpoint(checkpoint, mode=args.mode),
                           args.batch_size)
        print(f"plain loop: {plain:.2f} records/s", flush=True)
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
        try:
            one = ray_run(small, checkpoint, tmp / "out-1x", args)
            print(f"ray 1x: {json.dumps(one)}", flush=True)
            ten = ray_run(large, checkpoint, tmp / "out-10x", args)
            print(f"ray 10x: {json.dumps(ten)}", flush=True)
        finally:
            ray.shutdown()

    def worker_peak(run: dict, kind: str) -> float:
        return max(v for k, v in run[f"peak_{kind}_by_role_mib"].items() if k.startswith("ray::"))

    result = {
        "size": args.size, "mode": args.mode, "records_1x": one["records"], "records_10x": ten["records"],
        "plain_records_per_s": plain,
        "ray_1x_records_per_s": one["records_per_s"], "ray_10x_records_per_s": ten["records_per_s"],
        # Headline on the 10x run: the 1x one is short enough that starting the actor pool (model load) weighs in.
        "ratio_ray_vs_plain": ten["records_per_s"] / plain,
        "ratio_ray_1x_vs_plain": one["records_per_s"] / plain,
        "peak_rss_total_mib_1x": one["peak_rss_total_mib"], "peak_rss_total_mib_10x": ten["peak_rss_total_mib"],
        "peak_rss_ratio_10x_vs_1x": ten["peak_rss_total_mib"] / one["peak_rss_total_mib"],
        "peak_worker_rss_mib_1x": worker_peak(one, "rss"), "peak_worker_rss_mib_10x": worker_peak(ten, "rss"),
        "peak_worker_rss_ratio_10x_vs_1x": worker_peak(ten, "rss") / worker_peak(one, "rss"),
        "peak_pss_total_mib_1x": one["peak_pss_total_mib"], "peak_pss_total_mib_10x": ten["peak_pss_total_mib"],
        "peak_pss_ratio_10x_vs_1x": ten["peak_pss_total_mib"] / one["peak_pss_total_mib"],
        "peak_worker_uss_mib_1x": worker_peak(one, "uss"), "peak_worker_uss_mib_10x": worker_peak(ten, "uss"),
        "peak_worker_uss_ratio_10x_vs_1x": worker_peak(ten, "uss") / worker_peak(one, "uss"),
    }
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
