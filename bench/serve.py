"""Loopback load on the scoring service: req/s and p50/p99 latency at 1, 8 and 32 concurrent clients, with batching
on (``max_batch_size`` 32) and off (1), for binary (``application/x-npy``) and JSON bodies.

One Ray Serve application, started from ``serve/config.yaml`` like ``ecgad serve`` (one replica per deployment, queues
large enough that nothing is refused); batching is switched by redeploying with only the model's ``user_config``
changed, so both settings run the same configuration otherwise. Each client sends one real 10 s, 500 Hz PTB-XL
record, waits for the answer and sends again (closed loop) for ``--seconds`` of steady state (`_load`: after every
client had an answer); every answer must be 200. ``map=none`` by default, so the comparison is about request bodies
and batching, not about serializing the 60 000-value map.
On a shared machine the load of other processes drifts, so the batched and unbatched runs of each cell are taken
back to back, the whole grid is run ``--repeats`` times, and each cell reports its best run (highest req/s).

The model is a randomly initialized MCF of the paper's size (``--size``) unless ``--checkpoint`` is given: scores are
meaningless, costs are real. The baseline is the in-process `Scorer` with the model replica's torch thread count,
timed in the same run: at batch 1 and 32 at the start (on a CPU the forward passes are compute-bound, so that ratio
bounds what batching can win in the service), and right before each cell at that cell's batch (``min(clients,
batch)``). **Efficiency** at N clients is the service's req/s over those in-process records/s: 1.0 means the
service delivers all its model can do; the rest is per-request overhead (HTTP, parsing, preparation, hops) and the
CPU that clients, proxy and ingress take from the model on the same machine. Ratios: ``batched_over_unbatched``
(same body, same clients), ``binary_over_json`` (batched), ``efficiency`` (batched) per body. The last line is one
JSON object, with ``efficiency_1``, ``efficiency_8``, ``efficiency_32`` (batched, binary bodies) at top level.

    python bench/serve.py [--seconds 4] [--repeats 2] [--clients 1 8 32] [--size paper|small] [--mode fast|full]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# This script shares its name with the package it measures: keep its own folder off the import path, so that
# ``import serve`` below finds the package and not this file.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import httpx  # noqa: E402
import numpy as np  # noqa: E402

from ecgad.io import read_record  # noqa: E402
from ecgad.settings import sample_data_dir  # noqa: E402
from ecgad.validate import validate  # noqa: E402
from serve.testing import free_port, local_config, random_checkpoint  # noqa: E402

RECORD = "ptbxl/records500/06000/06000_hr"
BATCHED, UNBATCHED = 32, 1
WARMUP_S = 1.0


def _bodies(signal: np.ndarray, fs: float) -> dict[str, tuple[bytes, dict[str, str], dict[str, Any]]]:
    """The same record as each body format: (content, headers, query parameters)."""
    npy = io.BytesIO()
    np.save(npy, signal.astype(np.float32))
    as_json = json.dumps({"signal": signal.tolist(), "fs": fs}).encode()
    return {"binary": (npy.getvalue(), {"Content-Type": "application/x-npy"}, {"fs": fs}),
            "json": (as_json, {"Content-Type": "application/json"}, {})}


async def _load(url: str, body: tuple[bytes, dict[str, str], dict[str, Any]], clients: int, seconds: float,
                map_spec: str) -> dict[str, float]:
    """``clients`` closed-loop clients; throughput and latency percentiles over ``seconds`` of steady state.

    The window opens once every client has had an answer and ``WARMUP_S`` has passed: at 32 clients one round of
    answers takes seconds, and a window opened at a fixed time after the start would measure the ramp-up (the
    queue filling), not the service. Requests sent in the window count.
    """
    content, headers, params = body
    params = {**params, "map": map_spec}
    latencies: list[float] = []
    failures: list[str] = []
    answered: set[int] = set()
    window: dict[str, float] = {}
    start = time.perf_counter()
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=httpx.Limits(max_connections=clients)) as c:
        async def client(me: int) -> None:
            while "stop" not in window or time.perf_counter() < window["stop"]:
                now = time.perf_counter()
                response = await c.post("/v1/score", content=content, headers=headers, params=params)
                if response.status_code != 200:
                    failures.append(f"{response.status_code} {response.text[:200]}")
                elif "open" in window and now >= window["open"]:
                    latencies.append(time.perf_counter() - now)
                answered.add(me)
                if len(answered) == clients and "open" not in window:
                    window["open"] = max(time.perf_counter(), start + WARMUP_S)
                    window["stop"] = window["open"] + seconds

        await asyncio.gather(*(client(i) for i in range(clients)))
    if failures:
        raise RuntimeError(f"{len(failures)} requests failed under load, e.g. {failures[0]}")
    p50, p99 = np.percentile(latencies, [50, 99]) * 1000
    return {"req_s": round(len(latencies) / seconds, 2), "p50_ms": round(float(p50), 1),
            "p99_ms": round(float(p99), 1), "n": len(latencies)}


class InProcess:
    """The baseline: the `Scorer` in this process with the model replica's torch thread count, on one prepared
    record. Timed right before each service cell it is compared with, so both see the same machine load."""

    def __init__(self, checkpoint: Path, mode: str, prepared, threads: int) -> None:
        import torch

        from ecgad.scoring import Scorer

        torch.set_num_threads(threads)
        self.scorer = Scorer.from_checkpoint(checkpoint, device="cpu", mode=mode)
        self.prepared = prepared
        self.scorer.score_prepared([prepared], with_maps=False)

    def ms_per_record(self, batch: int, seconds: float = 3.0) -> float:
        """Milliseconds per record, scoring batches of ``batch`` copies for ``seconds``."""
        start, n = time.perf_counter(), 0
        while time.perf_counter() - start < seconds:
            self.scorer.score_prepared([self.prepared] * batch, with_maps=False)
            n += batch
        return (time.perf_counter() - start) / n * 1000


def _set_batch_size(url: str, deploy, size: int) -> None:
    """Redeploy with a new ``max_batch_size`` and wait until the model replica reports it."""
    deploy({"max_batch_size": size, "batch_wait_timeout_s": 0.005})
    deadline = time.monotonic() + 60
    while httpx.get(f"{url}/v1/model", timeout=30).json()["batching"]["max_batch_size"] != size:
        if time.monotonic() > deadline:
            raise TimeoutError(f"max_batch_size {size} not applied after 60 s")
        time.sleep(0.5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, default=None, help="default: a random-init model of --size")
    parser.add_argument("--size", choices=["paper", "small"], default="paper")
    parser.add_argument("--mode", choices=["fast", "full"], default="fast")
    parser.add_argument("--seconds", type=float, default=8.0, help="measured seconds per run of a cell")
    parser.add_argument("--repeats", type=int, default=2, help="runs of the whole grid; each cell keeps its best")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--map", default="none", help="map query parameter: none, full or downsample=N")
    parser.add_argument("--model-threads", type=int, default=None,
                        help="torch threads of the model replica (the app's cpu_threads; default: Ray's, here 1)")
    args = parser.parse_args()

    import logging

    import ray
    from ray import serve

    logging.getLogger("ray.serve").setLevel(logging.WARNING)   # no per-redeploy INFO lines between the figures

    from ecgad.preprocess import prepare
    from serve.app import run_local

    record = validate(read_record(sample_data_dir() / RECORD))
    bodies = _bodies(record.signal, record.fs)
    with tempfile.TemporaryDirectory(prefix="ecgad-bench-") as tmp:
        checkpoint = args.checkpoint or random_checkpoint(Path(tmp) / "checkpoint", size=args.size)
        prepared = prepare(record)
        threads = args.model_threads or 1   # what the replica gets: its num_cpus in local_config, rounded up
        baseline = InProcess(checkpoint, args.mode, prepared, threads)
        scorer_ms = {batch: baseline.ms_per_record(batch) for batch in (UNBATCHED, BATCHED)}
        print(f"in-process Scorer ({args.mode}, {threads} torch threads): {scorer_ms[UNBATCHED]:.1f} ms/record at "
              f"batch 1, {scorer_ms[BATCHED]:.1f} at batch 32 (x{scorer_ms[UNBATCHED] / scorer_ms[BATCHED]:.2f})",
              flush=True)

        ray.init(address="local", num_cpus=os.cpu_count() or 2, include_dashboard=False, log_to_driver=False)
        port = free_port()
        queues = {"max_ongoing_requests": 64, "max_queued_requests": 1024}

        def deploy(user_config: dict[str, Any]) -> str:
            config = local_config(args={"mode": args.mode, "cpu_threads": args.model_threads}, ingress=queues,
                                  model={**queues, "user_config": user_config})
            return run_local(checkpoint, port=port, config=config, blocking=False)

        url = deploy({"max_batch_size": BATCHED, "batch_wait_timeout_s": 0.005})
        results: dict[str, dict[str, dict[str, Any]]] = {}
        try:
            print(f"{'run':>3} {'batch':>5} {'body':>6} {'clients':>7} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} "
                  f"{'in-proc rec/s':>13} {'efficiency':>10}", flush=True)
            for run in range(args.repeats):
                for body in ("binary", "json"):
                    for clients in args.clients:
                        for batch in (BATCHED, UNBATCHED):
                            _set_batch_size(url, deploy, batch)
                            in_process = 1000 / baseline.ms_per_record(min(clients, batch))
                            cell = asyncio.run(_load(url, bodies[body], clients, args.seconds, args.map))
                            cell.update(in_process_records_s=round(in_process, 2),
                                        efficiency=round(cell["req_s"] / in_process, 2))
                            print(f"{run:>3} {batch:>5} {body:>6} {clients:>7} {cell['req_s']:>8.2f} "
                                  f"{cell['p50_ms']:>8.1f} {cell['p99_ms']:>8.1f} {in_process:>13.2f} "
                                  f"{cell['efficiency']:>10.2f}", flush=True)
                            best = results.setdefault(f"batch{batch}", {}).setdefault(body, {})
                            if cell["req_s"] > best.get(str(clients), {"req_s": -1.0})["req_s"]:
                                best[str(clients)] = cell
        finally:
            serve.shutdown()
            ray.shutdown()

    rps = {b: {body: {c: cell["req_s"] for c, cell in cells.items()} for body, cells in by_body.items()}
           for b, by_body in results.items()}
    batched, unbatched = rps[f"batch{BATCHED}"], rps[f"batch{UNBATCHED}"]
    ratios = {
        "batched_over_unbatched": {body: {c: round(batched[body][c] / unbatched[body][c], 2) for c in batched[body]}
                                   for body in batched},
        "binary_over_json": {c: round(batched["binary"][c] / batched["json"][c], 2) for c in batched["binary"]},
        "efficiency": {body: {c: cell["efficiency"] for c, cell in cells.items()}
                       for body, cells in results[f"batch{BATCHED}"].items()},
    }
    for name, value in ratios.items():
        print(f"{name}: {json.dumps(value)}")
    summary = {"bench": "serve", "mode": args.mode, "size": args.size if args.checkpoint is None else "checkpoint",
               "map": args.map, "seconds": args.seconds, "repeats": args.repeats, "cpus": os.cpu_count(),
               "scorer_ms_per_record": {str(k): round(v, 2) for k, v in scorer_ms.items()},
               "results": results, "ratios": ratios,
               **{f"efficiency_{c}": e for c, e in ratios["efficiency"]["binary"].items()}}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
