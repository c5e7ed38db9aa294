"""Listing archive inputs at scale: entries/s and the driver's peak memory, for folder trees and manifests of growing size.

For each size N of ``--sizes`` (default 10^5 and 10^6), a tree of N empty record files (``--per-folder`` files per
folder, ``.npy`` and ``.hea`` names alternating) and an N-row Parquet manifest are written in a temporary folder (not
timed: creating 10^6 files takes minutes and as many inodes; check ``df -i`` first), then listed through the very
call the archive job makes (`ecgad.ray.data.plan_chunks`: Ray tasks list the folders or stream the manifest, chunk
rows are built and held in the object store, the driver keeps each chunk's id and size) inside a local Ray session.
While each listing runs, a sampler thread reads the driver's resident memory (RSS) every 20 ms.

Reported per input and size: entries/s (records listed per second of wall time, the whole plan) and the driver's
peak RSS. ``driver_rss_growth`` is the driver's peak RSS listing the largest tree over that listing the smallest
(goal < 2: the driver holds folder names and object refs, never the listing); goal for entries/s: >= 20,000 on
local disk. The last line is one JSON object.

    python bench/listing.py [--sizes 1e5,1e6] [--per-folder 1000] [--chunk-size 128] [--tmp DIR]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import psutil
import pyarrow as pa
import pyarrow.parquet as pq

from ecgad.archive import DEFAULT_CHUNK_SIZE

MiB = 2**20
SUFFIXES = (".npy", ".hea")


def size_label(n: int) -> str:
    """``100000`` -> ``1e5`` (powers of ten), else the number."""
    exponent = len(str(n)) - 1
    return f"1e{exponent}" if n == 10**exponent else str(n)


def write_tree(root: Path, n: int, per_folder: int) -> None:
    """``n`` empty record files, ``per_folder`` to a folder."""
    for start in range(0, n, per_folder):
        folder = root / f"f{start // per_folder:05d}"
        folder.mkdir(parents=True)
        for i in range(start, min(n, start + per_folder)):
            os.close(os.open(folder / f"r{i:07d}{SUFFIXES[i % 2]}", os.O_CREAT | os.O_WRONLY, 0o644))


def write_manifest(path: Path, n: int, rows_per_group: int = 100_000) -> None:
    """An ``n``-row manifest (a ``path`` column), written a row group at a time."""
    schema = pa.schema([pa.field("path", pa.string())])
    with pq.ParquetWriter(path, schema) as writer:
        for start in range(0, n, rows_per_group):
            writer.write_table(pa.table({"path": [f"d{i // 1000:05d}/r{i:07d}.npy"
                                                  for i in range(start, min(n, start + rows_per_group))]},
                                        schema=schema))


def write_inputs(tree: Path, manifest: Path, n: int, per_folder: int) -> None:
    write_tree(tree, n, per_folder)
    write_manifest(manifest, n)


class PeakRSS:
    """The largest RSS of this process seen while the block runs, sampled every ``interval`` s."""

    def __init__(self, interval: float = 0.02) -> None:
        self.interval, self.peak = interval, 0
        self._stop = threading.Event()
        self._process = psutil.Process()

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._process.memory_info().rss)
            self._stop.wait(self.interval)

    def __enter__(self) -> "PeakRSS":
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._process.memory_info().rss)


def measure(path: Path, expected: int, chunk_size: int) -> dict[str, float]:
    """List ``path`` as the archive job does; entries/s, wall time and the driver's peak RSS."""
    from ecgad.ray.data import plan_chunks

    with PeakRSS() as rss:
        started = time.perf_counter()
        chunks, sizes = plan_chunks(path, chunk_size)
        wall = time.perf_counter() - started
    listed = sum(sizes.values())
    if listed != expected:
        raise SystemExit(f"{path}: listed {listed} entries, expected {expected}")
    del chunks
    return {"entries": listed, "chunks": len(sizes), "wall_s": round(wall, 2),
            "entries_per_s": round(listed / wall), "driver_peak_rss_mib": round(rss.peak / MiB, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1e5,1e6", help="comma-separated numbers of entries (1e5 style allowed)")
    parser.add_argument("--per-folder", type=int, default=1000, help="files per folder of the trees")
    parser.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE)
    parser.add_argument("--tmp", default=None, help="where to create the inputs (default: the system's temp dir)")
    args = parser.parse_args()
    sizes = sorted(int(float(s)) for s in args.sizes.split(","))

    import ray

    ray.init(object_store_memory=2 * 1024 * MiB, include_dashboard=False)
    results: dict[str, float] = {"cpus": os.cpu_count() or 0, "load_avg_1m_at_start": round(os.getloadavg()[0], 1)}
    peaks: dict[str, dict[str, float]] = {"tree": {}, "manifest": {}}
    with tempfile.TemporaryDirectory(dir=args.tmp, prefix="ecgad-listing-") as tmp:
        warm = Path(tmp, "warm")                  # start the workers before anything is timed
        write_tree(warm, 10, 10)
        measure(warm, 10, args.chunk_size)
        for n in sizes:
            label = size_label(n)
            started = time.perf_counter()
            tree, manifest = Path(tmp, f"tree-{label}"), Path(tmp, f"manifest-{label}.parquet")
            with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as creator:
                # in a process of its own, so that building the inputs leaves no trace in the driver's RSS
                creator.submit(write_inputs, tree, manifest, n, args.per_folder).result()
            results[f"create_s_{label}"] = round(time.perf_counter() - started, 1)
            for kind, path in (("tree", tree), ("manifest", manifest)):
                measured = measure(path, n, args.chunk_size)
                print(f"{kind} {label}: {json.dumps(measured)}", flush=True)
                results[f"{kind}_entries_per_s_{label}"] = measured["entries_per_s"]
                results[f"{kind}_wall_s_{label}"] = measured["wall_s"]
                results[f"{kind}_driver_peak_rss_mib_{label}"] = measured["driver_peak_rss_mib"]
                peaks[kind][label] = measured["driver_peak_rss_mib"]
        ray.shutdown()
    smallest, largest = size_label(sizes[0]), size_label(sizes[-1])
    results["driver_rss_growth"] = round(peaks["tree"][largest] / peaks["tree"][smallest], 3)
    results["manifest_driver_rss_growth"] = round(peaks["manifest"][largest] / peaks["manifest"][smallest], 3)
    results["load_avg_1m_at_end"] = round(os.getloadavg()[0], 1)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
