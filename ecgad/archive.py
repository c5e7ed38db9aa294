"""Score an archive of ECG files with Ray Data: resumable, idempotent, one output row per input file.

The pipeline (``score_archive``)::

    list   ──► chunks of K paths (a small dataset: paths only, listed in tasks, never the signals)
    read, validate, prepare   CPU tasks, one chunk per call   -> the chunk's rows (ecgad.rows), rejections as rows
    score  actor pool holding the model (GPU when asked)      -> the chunk's result rows (+ anomaly maps)
    commit ``ChunkSink``, a Ray Data datasink                 -> records/chunk-<id>.parquet (+ maps/...), atomically

Why chunks are the unit that flows: resuming needs a unit of work that is either wholly on disk or wholly absent.
Ray Data re-blocks and re-batches rows as it likes, so a record-level row cannot tell a writer "your chunk is
complete". A chunk travels as *one* row (its records nested as an Arrow IPC table), so each writer call holds whole
chunks and commits each as one Parquet file, written under a hidden temporary name and renamed into place. On a
rerun, a chunk whose file exists is skipped; a killed run leaves at most hidden temporaries, which are deleted and
which no Parquet reader lists (pyarrow and Ray skip names starting with ``.``). So every input appears exactly once.

A chunk's id is a hash of its source, position and member paths, so a chunk is only ever skipped when exactly the
same paths were committed. If the input changed between runs, committed chunks no longer match any planned chunk
and the job refuses to mix the two (``ArchiveError``), rather than silently duplicating or dropping records.

Output layout under ``out``::

    _job.json                      what the run scores with (model version, mode, chunk size, input); a rerun with
                                   different settings is refused, so one output never mixes two models
    records/chunk-<id>.parquet     record_id, path, status (ok/rejected/error), reason, pred_score, pred_label,
                                   n_beats, windows_scored, model_version
    maps/chunk-<id>.parquet        with --maps: record_id, fs, n_leads, n_samples, anomaly_map (zstd)
    summary.json                   counts by status and reason, records/s, wall time

Fault isolation: every per-record step (read, validate, prepare, decode, score) is wrapped; a ``Rejection`` becomes
status ``rejected`` with its reason, anything else status ``error`` with the exception type in the reason. One bad
file never fails a task, a block or the job.
"""

from __future__ import annotations

import gc
import hashlib
import json
import math
import os
import sys
import time
import traceback
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
from ray.data import Datasink
from ray.data.block import BlockAccessor
from ray.data.expressions import col

from ecgad.config import PrepConfig
from ecgad.ray_data import failure_fields, prepare_path
from ecgad.rows import row_to_prepared
from ecgad.types import Prepared

#: Records per committed chunk: the unit of resumption (work lost to a kill) and of output files. 128 records make
#: files of ~10 kB of results (~1.5 MB of maps), few enough files for 10^6 records, and a prepared chunk of ~60 MB.
DEFAULT_CHUNK_SIZE = 128

#: Manifest files (a table with a ``path`` column, optionally ``record_id``).
MANIFEST_SUFFIXES = (".csv", ".parquet", ".pq")

#: Memory (bytes) to reserve per prepare task: a worker with numpy/scipy loaded (~250 MB) plus the chunk's raw
#: signals, intermediates (float64) and prepared rows, ~3 MB per 10 s record. Besides keeping Ray from packing too
#: many tasks on a node, it makes the prepare stage's remote arguments differ from the scorer's, so Ray Data does not
#: fuse preparation into the model actors: the actors (GPUs) score, CPU tasks prepare.
PREPARE_BASE_MEMORY = 256 * 2**20
PREPARE_MEMORY_PER_RECORD = 3 * 2**20

RESULT_SCHEMA = pa.schema([
    ("record_id", pa.string()),
    ("path", pa.string()),
    ("status", pa.string()),          # ok | rejected | error
    ("reason", pa.string()),          # "" when ok; a rejection reason; "<ExceptionType>: message" for errors
    ("pred_score", pa.float64()),
    ("pred_label", pa.bool_()),
    ("n_beats", pa.int32()),
    ("windows_scored", pa.int32()),
    ("model_version", pa.string()),
])

#: Anomaly maps are stored as float16: a map is a reconstruction error of [-1, 1]-normalized signals (values of
#: order 1e-3..10), used to rank and draw where a record is abnormal; float16's 3 significant digits are far finer
#: than that needs, and it halves the largest output of the job (12 x 5000 samples per 10 s record; zstd gains
#: little on float mantissas). Values beyond float16's range (65504) are clipped to it rather than becoming inf.
MAP_DTYPE = np.float16
MAP_SCHEMA = pa.schema([
    ("record_id", pa.string()),
    ("fs", pa.float64()),             # the record's own rate: the map is on the input's time axis
    ("n_leads", pa.int32()),
    ("n_samples", pa.int32()),
    ("anomaly_map", pa.list_(pa.float16())),   # row-major (n_leads, n_samples)
])

#: The rows that flow between stages, one per chunk. Nested record tables travel as Arrow IPC bytes: their schema
#: (``ecgad.rows``' columns) stays the codec's business, and Ray never re-blocks a chunk's records apart.
PREPARED_CHUNK_SCHEMA = pa.schema([("chunk", pa.string()), ("prepared", pa.large_binary())])
SCORED_CHUNK_SCHEMA = pa.schema([("chunk", pa.string()), ("results", pa.large_binary()),
                                 ("maps", pa.large_binary())])


class ArchiveError(Exception):
    """The job cannot run as asked (bad input, or an output directory written with other settings or input)."""


class InjectedFailure(RuntimeError):
    """Raised on purpose by ``--fail-after-chunks``, to test that a killed run resumes cleanly."""


def _log(message: str) -> None:
    """One progress line on stdout. Ray forwards worker stdout to the driver, so these lines appear in the job's
    console and in ``ray job logs`` next to Ray Data's progress bars."""
    print(f"{time.strftime('%H:%M:%S')} ecgad.archive: {message}", file=sys.stdout, flush=True)


# -- Arrow helpers -----------------------------------------------------------------------------------------------

def table_to_ipc(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def table_from_ipc(blob: bytes | pa.Scalar) -> pa.Table:
    buffer = blob.as_buffer() if isinstance(blob, pa.Scalar) else pa.py_buffer(blob)
    return pa.ipc.open_stream(buffer).read_all()


# -- output layout -----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ArchiveLayout:
    """Where everything lives under the output directory, and the atomic commit of one file."""

    root: Path

    @property
    def records(self) -> Path:
        return self.root / "records"

    @property
    def maps(self) -> Path:
        return self.root / "maps"

    @property
    def job_file(self) -> Path:
        return self.root / "_job.json"

    @property
    def summary_file(self) -> Path:
        return self.root / "summary.json"

    @staticmethod
    def chunk_name(chunk: str) -> str:
        return f"chunk-{chunk}.parquet"

    def committed_chunks(self) -> set[str]:
        """Ids of the chunks whose records file is in place (the records file is the commit marker)."""
        if not self.records.is_dir():
            return set()
        return {name[len("chunk-"):-len(".parquet")] for name in os.listdir(self.records)
                if name.startswith("chunk-") and name.endswith(".parquet")}

    def remove_partial_files(self) -> int:
        """Delete temporaries a killed run left behind; returns how many. Only safe with one job per output."""
        removed = 0
        for folder in (self.records, self.maps):
            if folder.is_dir():
                for name in os.listdir(folder):
                    if name.startswith(".") and name.endswith(".tmp"):
                        (folder / name).unlink(missing_ok=True)
                        removed += 1
        return removed

    @staticmethod
    def commit(table: pa.Table, final: Path) -> None:
        """Write ``table`` as ``final`` atomically: a hidden temporary in the same folder, fsync, rename.

        A rename within one folder is atomic on POSIX file systems, so a reader (or a rerun) sees either no file
        or the complete one; the temporary's name starts with ``.`` so no Parquet reader ever lists it.
        """
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.with_name(f".{final.name}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            with open(tmp, "wb") as fh:
                pq.write_table(table, fh, compression="zstd")
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, final)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def write_json(self, path: Path, obj: dict[str, Any]) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, path)

    def check_or_write_job(self, job: dict[str, Any]) -> bool:
        """Record the run's settings on the first run; on a rerun refuse different ones. True when resuming."""
        if self.job_file.is_file():
            stored = json.loads(self.job_file.read_text())
            diff = {k: (stored.get(k), v) for k, v in job.items() if stored.get(k) != v}
            if diff:
                raise ArchiveError(f"{self.root} holds a run with other settings ("
                                   + "; ".join(f"{k}: {a!r} there, {b!r} now" for k, (a, b) in diff.items())
                                   + "); use another --out, or the same settings to resume")
            return True
        self.write_json(self.job_file, job)
        return False


# -- listing -----------------------------------------------------------------------------------------------------

def input_kind(path: Path) -> str:
    """``manifest`` (a CSV/Parquet table with a ``path`` column), ``ptbxl`` (a PTB-XL root) or ``directory``."""
    if path.is_file():
        if path.suffix.lower() not in MANIFEST_SUFFIXES:
            raise ArchiveError(f"{path}: an input file must be a manifest ({', '.join(MANIFEST_SUFFIXES)}) "
                               "with a 'path' column")
        return "manifest"
    if not path.is_dir():
        raise ArchiveError(f"{path}: no such file or directory")
    return "ptbxl" if (path / "ptbxl_database.csv").is_file() else "directory"


def _chunk_id(source: str, index: int, paths: list[str]) -> str:
    digest = hashlib.sha256(f"{source}\n{index}\n".encode())
    for p in paths:
        digest.update(p.encode() + b"\n")
    return digest.hexdigest()[:20]


def _chunk_rows(source: str, entries: Iterable[tuple[str, str]], chunk_size: int) -> Iterator[dict[str, Any]]:
    """Group ``(path, record_id)`` pairs, in order, into chunk rows of ``chunk_size``."""
    batch: list[tuple[str, str]] = []
    index = 0
    for entry in entries:
        batch.append(entry)
        if len(batch) == chunk_size:
            yield _chunk_row(source, index, batch)
            batch, index = [], index + 1
    if batch:
        yield _chunk_row(source, index, batch)


def _chunk_row(source: str, index: int, batch: list[tuple[str, str]]) -> dict[str, Any]:
    paths = [p for p, _ in batch]
    return {"chunk": _chunk_id(source, index, paths), "n_paths": len(paths), "paths": paths,
            "record_ids": [r for _, r in batch]}


def _record_id(path: Path, root: Path) -> str:
    """A record's id: its path relative to the input root, without the extension (unique within a folder tree as
    long as one record is not stored twice under the same stem)."""
    return path.relative_to(root).with_suffix("").as_posix()


def _walk_dirs(root: Path) -> list[str]:
    """Every folder under ``root`` (itself included) that directly holds files, sorted. Only folder names reach the
    driver; the files of each folder are listed by a task."""
    found = []
    for folder, subdirs, files in os.walk(root):
        subdirs.sort()
        if files:
            found.append(folder)
    return sorted(found)


def _expand_directory(folder: str, root: str, chunk_size: int) -> Iterator[dict[str, Any]]:
    """The record files directly in ``folder`` (``ecgad.ptbxl.list_record_files`` decides what is a record file;
    its subfolders are other tasks' sources), as chunk rows."""
    from ecgad.ptbxl import list_record_files

    folder_path, root_path = Path(folder), Path(root)
    files = [p for p in list_record_files(folder_path) if p.parent == folder_path]
    yield from _chunk_rows(folder_path.relative_to(root_path).as_posix(),
                           ((str(p), _record_id(p, root_path)) for p in files), chunk_size)


def _manifest_entries(manifest: Path) -> Iterator[tuple[str, str]]:
    """Stream ``(path, record_id)`` from a manifest without loading it whole. Relative paths are relative to the
    manifest's folder; a missing ``record_id`` column means "the path as listed, without its extension"."""
    if manifest.suffix.lower() == ".csv":
        import pyarrow.csv as pcsv

        header = pcsv.open_csv(manifest, read_options=pcsv.ReadOptions(block_size=1 << 16)).schema.names
        columns = [c for c in ("path", "record_id") if c in header]
        batches: Iterable[pa.RecordBatch] = pcsv.open_csv(
            manifest, convert_options=pcsv.ConvertOptions(include_columns=columns,
                                                          column_types={c: pa.string() for c in columns}))
    else:
        parquet = pq.ParquetFile(manifest)
        columns = [c for c in ("path", "record_id") if c in parquet.schema_arrow.names]
        batches = parquet.iter_batches(columns=columns, batch_size=65536)
    if "path" not in columns:
        raise ArchiveError(f"{manifest}: a manifest needs a 'path' column")
    base = manifest.parent
    for batch in batches:
        paths = batch.column("path").to_pylist()
        ids = batch.column("record_id").to_pylist() if "record_id" in columns else [None] * len(paths)
        for listed, record_id in zip(paths, ids):
            yield str(base / listed), record_id or Path(listed).with_suffix("").as_posix()


def _expand_manifest(manifest: str, chunk_size: int) -> Iterator[dict[str, Any]]:
    yield from _chunk_rows(Path(manifest).name, _manifest_entries(Path(manifest)), chunk_size)


def _ptbxl_entries(root: Path) -> list[tuple[str, str]]:
    """One file per PTB-XL record on disk (``load_ptbxl_index`` prefers the 500 Hz one), so the two rates of one ECG
    are never both scored. The index is PTB-XL's metadata table (at most ~22k rows), read on the driver as every
    PTB-XL tool does; record ids are PTB-XL's ``records500/00000/00001_hr`` paths."""
    from ecgad.ptbxl import load_ptbxl_index

    return [(str(root / f"{rel}.hea"), rel) for rel in load_ptbxl_index(root)["record_path"]]


def _expand_source(row: dict[str, Any], chunk_size: int) -> Iterator[dict[str, Any]]:
    """One listing task: a folder (its own files only) or a manifest file -> chunk rows."""
    if row["kind"] == "directory":
        yield from _expand_directory(row["location"], row["root"], chunk_size)
    else:
        yield from _expand_manifest(row["location"], chunk_size)


def list_chunks(input_path: Path, chunk_size: int):
    """The input as a Ray dataset of chunk rows ``{chunk, paths, record_ids}``, listed in Ray tasks.

    A folder tree becomes one listing task per folder (the driver only walks folder names); a manifest one task that
    streams it; a PTB-XL root its index's records, which the driver already holds. Chunks never span folders or
    manifests, so a chunk's members depend on nothing but its own source.
    """
    input_path = input_path.resolve()
    kind = input_kind(input_path)
    if kind == "ptbxl":
        return ray.data.from_items(list(_chunk_rows("ptbxl", _ptbxl_entries(input_path), chunk_size)))
    if kind == "manifest":
        sources = [{"kind": "manifest", "location": str(input_path), "root": str(input_path.parent)}]
    else:
        sources = [{"kind": "directory", "location": d, "root": str(input_path)} for d in _walk_dirs(input_path)]
    return ray.data.from_items(sources).flat_map(_expand_source, fn_kwargs={"chunk_size": chunk_size})


# -- read, validate, prepare (CPU tasks) -------------------------------------------------------------------------

def prepare_chunks(batch: pa.Table, cfg: PrepConfig, default_fs: float | None) -> pa.Table:
    """Ray Data map_batches function: chunk rows -> prepared chunk rows (the records as one nested table)."""
    prepared = []
    for paths, record_ids in zip(batch.column("paths").to_pylist(), batch.column("record_ids").to_pylist()):
        rows = [prepare_path(p, r, cfg, default_fs) for p, r in zip(paths, record_ids)]
        prepared.append(table_to_ipc(pa.Table.from_pylist(rows)))
    return pa.table({"chunk": batch.column("chunk"), "prepared": pa.array(prepared, pa.large_binary())},
                    schema=PREPARED_CHUNK_SCHEMA)


# -- scoring (actor pool) ----------------------------------------------------------------------------------------

def _result_row(row: dict[str, Any], model_version: str) -> dict[str, Any]:
    return {"record_id": row["record_id"], "path": row["path"], "status": row["status"], "reason": row["reason"],
            "pred_score": None, "pred_label": None, "n_beats": None, "windows_scored": None,
            "model_version": model_version}


def _map_row(record_id: str, prepared: Prepared, anomaly_map: np.ndarray) -> dict[str, Any]:
    limit = float(np.finfo(MAP_DTYPE).max)
    values = np.clip(np.asarray(anomaly_map, dtype=np.float32), -limit, limit).astype(MAP_DTYPE)
    return {"record_id": record_id, "fs": float(prepared.source_fs), "n_leads": int(values.shape[0]),
            "n_samples": int(values.shape[1]), "anomaly_map": values.ravel()}


class ScorerActor:
    """Holds one model (on a GPU when given one) and scores prepared chunks; the map_batches class of the pool.

    Records are scored ``batch_size`` at a time. If a batch raises, its records are retried one by one, so a record
    that breaks the model costs only itself (status ``error``), never its batch neighbours.
    """

    def __init__(self, checkpoint: str, mode: str, device: str, with_maps: bool, batch_size: int,
                 threads: int) -> None:
        import torch

        from ecgad.scoring import Scorer

        if device == "cpu":
            torch.set_num_threads(max(1, threads))
        self.scorer = Scorer.from_checkpoint(Path(checkpoint), device=device, mode=mode)
        self.with_maps = with_maps
        self.batch_size = batch_size

    def __call__(self, batch: pa.Table) -> pa.Table:
        results, maps = [], []
        for blob in batch.column("prepared"):
            chunk_results, chunk_maps = self.score_chunk(table_from_ipc(blob))
            results.append(table_to_ipc(chunk_results))
            maps.append(table_to_ipc(chunk_maps))
        return pa.table({"chunk": batch.column("chunk"), "results": pa.array(results, pa.large_binary()),
                         "maps": pa.array(maps, pa.large_binary())}, schema=SCORED_CHUNK_SCHEMA)

    def score_chunk(self, prepared_rows: pa.Table) -> tuple[pa.Table, pa.Table]:
        from ecgad.scoring import score_isolated

        version = self.scorer.model_version
        results, todo = [], []
        for row in prepared_rows.to_pylist():
            results.append(_result_row(row, version))
            if row["status"] == "ok":
                try:
                    todo.append((results[-1], row_to_prepared(row)))
                except Exception as exc:
                    results[-1].update(failure_fields(exc))
        maps = []
        for start in range(0, len(todo), self.batch_size):
            part = todo[start:start + self.batch_size]
            outcomes = score_isolated(self.scorer, [p for _, p in part], self.with_maps)
            for (result, prepared), outcome in zip(part, outcomes):
                if isinstance(outcome, BaseException):
                    result.update(failure_fields(outcome))
                    continue
                result.update(pred_score=float(outcome.pred_score), pred_label=bool(outcome.pred_label),
                              n_beats=int(prepared.n_beats), windows_scored=int(outcome.windows_scored))
                if self.with_maps and outcome.anomaly_map is not None:
                    maps.append(_map_row(result["record_id"], prepared, outcome.anomaly_map))
        return (pa.Table.from_pylist(results, schema=RESULT_SCHEMA),
                pa.Table.from_pylist(maps, schema=MAP_SCHEMA))


# -- commit (datasink) -------------------------------------------------------------------------------------------

def _counts(results: pa.Table) -> dict[str, int]:
    return dict(Counter(results.column("status").to_pylist()))


class ChunkSink(Datasink):
    """A Ray Data datasink committing each scored chunk as its own Parquet file(s), atomically (module docstring).

    Maps are committed before records: the records file is the commit marker, so a chunk with a records file always
    has its maps file; a maps file without one is rewritten (same content) when the chunk is redone.
    """

    def __init__(self, layout: ArchiveLayout, with_maps: bool, fail_after_chunks: int | None = None) -> None:
        self.layout = layout
        self.with_maps = with_maps
        self.fail_after_chunks = fail_after_chunks
        self.committed_before = len(layout.committed_chunks())
        self.stats: list[dict[str, Any]] = []

    def write(self, blocks: Iterable[Any], ctx: Any) -> list[dict[str, Any]]:
        stats = []
        for block in blocks:
            table = BlockAccessor.for_block(block).to_arrow()
            for chunk, results, maps in zip(table.column("chunk").to_pylist(), table.column("results"),
                                            table.column("maps")):
                name = self.layout.chunk_name(chunk)
                results = table_from_ipc(results)
                if self.with_maps:
                    self.layout.commit(table_from_ipc(maps), self.layout.maps / name)
                self.layout.commit(results, self.layout.records / name)
                counts = _counts(results)
                stats.append({"chunk": chunk, "records": results.num_rows, **counts})
                _log(f"committed {name}: {results.num_rows} records ("
                     + ", ".join(f"{n} {status}" for status, n in sorted(counts.items())) + ")")
                self._maybe_fail()
        return stats

    def _maybe_fail(self) -> None:
        if self.fail_after_chunks is None:
            return
        done = len(self.layout.committed_chunks()) - self.committed_before
        if done >= self.fail_after_chunks:
            raise InjectedFailure(f"--fail-after-chunks {self.fail_after_chunks}: stopping after {done} chunks")

    def on_write_complete(self, write_result: Any) -> None:
        self.stats = [s for returned in write_result.write_returns for s in returned]


# -- the job -----------------------------------------------------------------------------------------------------

def summarize(layout: ArchiveLayout) -> dict[str, Any]:
    """Counts over everything committed (this run and earlier ones), scanning only the status and reason columns in
    record batches, so it needs no memory in proportion to the archive."""
    import pyarrow.dataset as pads

    by_status: Counter[str] = Counter()
    by_reason: Counter[str] = Counter()
    if layout.records.is_dir():
        dataset = pads.dataset(layout.records, format="parquet", schema=RESULT_SCHEMA)
        for batch in dataset.to_batches(columns=["status", "reason"]):
            for status, reason in zip(batch.column("status").to_pylist(), batch.column("reason").to_pylist()):
                by_status[status] += 1
                if status != "ok":
                    by_reason[f"{status}:{reason.split(':')[0]}"] += 1
    return {"records": sum(by_status.values()), "by_status": dict(sorted(by_status.items())),
            "by_reason": dict(sorted(by_reason.items()))}


def scoring_pipeline(chunks: ray.data.Dataset, checkpoint: Path, prep_config: PrepConfig, *, maps: bool,
                     batch_size: int, chunk_size: int, num_scorers: int, min_scorers: int, use_gpu: bool, mode: str,
                     scorer_cpus: float, default_fs: float | None,
                     scorer_threads: int | None = None) -> ray.data.Dataset:
    """Chunk rows -> scored chunk rows: prepare in CPU tasks, score in an autoscaling pool of model actors."""
    return (
        chunks.repartition(target_num_rows_per_block=1)   # one chunk per block, so chunks spread over tasks
        .map_batches(prepare_chunks, batch_size=1, batch_format="pyarrow",
                     fn_kwargs={"cfg": prep_config, "default_fs": default_fs},
                     num_cpus=1, memory=PREPARE_BASE_MEMORY + PREPARE_MEMORY_PER_RECORD * chunk_size)
        .map_batches(ScorerActor, batch_size=1, batch_format="pyarrow",
                     compute=ray.data.ActorPoolStrategy(min_size=min_scorers, max_size=num_scorers),
                     num_cpus=scorer_cpus, num_gpus=1 if use_gpu else 0,
                     fn_constructor_kwargs={"checkpoint": str(checkpoint), "mode": mode,
                                            "device": "cuda" if use_gpu else "cpu", "with_maps": maps,
                                            "batch_size": batch_size,
                                            "threads": scorer_threads or max(1, math.floor(scorer_cpus))}))


class ArchiveJobFailed(Exception):
    """The pipeline stopped (a worker died, a bug, ``--fail-after-chunks``); committed chunks stay valid, and
    rerunning the same command resumes after them."""


def _execute(pipeline: ray.data.Dataset, sink: ChunkSink) -> None:
    """Run the pipeline into the sink; on failure, release its Ray resources before raising `ArchiveJobFailed`.

    Why not just let the exception propagate: a failed Ray Data execution's actor pool stays referenced from the
    exception's traceback frames, so the model actors keep their CPUs and GPUs until Python's cycle collector runs;
    a driver that lives on (a notebook, a retry loop) would wait for those resources on its next run. Clearing the
    frames and collecting frees them at once (measured outside pytest: the CPUs are free again within a second).
    One holder is out of reach: a logging handler that keeps Ray Data's own log record of the failure, with its
    traceback (pytest's log capture does), keeps the actors until it drops the record. A job that fails exits
    (``jobs.score_archive`` returns 1), which releases everything, so tests run failing jobs as processes.
    """
    try:
        pipeline.write_datasink(sink)
        return
    except Exception as exc:
        message = f"{type(exc).__name__}: {exc}"
        traceback.clear_frames(exc.__traceback__)   # drop what our frames of the failure hold
    del pipeline
    gc.collect()
    raise ArchiveJobFailed(message)


def score_archive(input_path: str | Path, checkpoint: str | Path, out: str | Path, *, maps: bool = False,
                  batch_size: int = 32, chunk_size: int = DEFAULT_CHUNK_SIZE, num_scorers: int = 1,
                  min_scorers: int = 1, use_gpu: bool = False, mode: str = "full", scorer_cpus: float = 1.0,
                  scorer_threads: int | None = None,
                  default_fs: float | None = None, fail_after_chunks: int | None = None) -> dict[str, Any]:
    """Score every record under ``input_path`` into ``out`` (module docstring); returns the summary it writes.

    Runs on the Ray cluster this process is connected to (``ray.init`` first; Ray Data starts a local one if not).
    Rerunning with the same arguments after a kill or an `ArchiveJobFailed` resumes: committed chunks are skipped.
    """
    from ecgad.checkpoint import load_checkpoint

    started = time.perf_counter()
    input_path, out, checkpoint = Path(input_path).resolve(), Path(out).resolve(), Path(checkpoint).resolve()
    if chunk_size < 1 or batch_size < 1 or not 1 <= min_scorers <= num_scorers:
        raise ArchiveError("need chunk_size >= 1, batch_size >= 1 and 1 <= min_scorers <= num_scorers")
    loaded = load_checkpoint(checkpoint)  # fail fast on a bad checkpoint; gives the preparation config
    prep_config, model_version = loaded.prep_config, loaded.model_version
    del loaded

    layout = ArchiveLayout(out)
    job = {"input": str(input_path), "input_kind": input_kind(input_path), "chunk_size": chunk_size,
           "model_version": model_version, "mode": mode, "maps": maps, "default_fs": default_fs}
    resuming = layout.check_or_write_job(job)
    removed = layout.remove_partial_files()

    chunks = list_chunks(input_path, chunk_size).materialize()  # paths only, held in the object store
    sizes = {row["chunk"]: row["n_paths"] for row in chunks.select_columns(["chunk", "n_paths"]).iter_rows()}
    planned, n_inputs = set(sizes), sum(sizes.values())
    committed = layout.committed_chunks()
    if committed - planned:
        raise ArchiveError(f"{out} holds {len(committed - planned)} committed chunks that match no chunk of "
                           f"{input_path} (the input changed since the first run); use another --out")
    todo = planned - committed
    _log(f"{'resuming' if resuming else 'starting'}: {n_inputs} records in {len(planned)} chunks, "
         f"{len(committed)} already committed, {len(todo)} to do"
         + (f", {removed} partial files removed" if removed else ""))

    sink = ChunkSink(layout, with_maps=maps, fail_after_chunks=fail_after_chunks)
    if todo:
        if committed:
            chunks = chunks.filter(expr=col("chunk").not_in(sorted(committed)))
        _execute(scoring_pipeline(chunks, checkpoint, prep_config, maps=maps, batch_size=batch_size,
                                  chunk_size=chunk_size, num_scorers=num_scorers, min_scorers=min_scorers,
                                  use_gpu=use_gpu, mode=mode, scorer_cpus=scorer_cpus, default_fs=default_fs,
                                  scorer_threads=scorer_threads),
                 sink)

    wall = time.perf_counter() - started
    scored_now = sum(s["records"] for s in sink.stats)
    totals = summarize(layout)
    summary = {
        **totals, "inputs": n_inputs,
        "complete": totals["records"] == n_inputs and not planned - layout.committed_chunks(),
        "chunks": {"planned": len(planned), "skipped": len(committed), "written": len(sink.stats)},
        "records_this_run": scored_now, "wall_s": round(wall, 3),
        "records_per_s": round(scored_now / wall, 3) if wall > 0 else None,
        "model_version": model_version, "mode": mode, "maps": maps, "input": str(input_path), "out": str(out),
    }
    layout.write_json(layout.summary_file, summary)
    _log(f"done: {totals['records']}/{n_inputs} records written ({scored_now} this run) in {wall:.1f} s; "
         f"{totals['by_status']}")
    return summary
