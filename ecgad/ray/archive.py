"""Score an archive of ECG files with Ray Data: resumable, idempotent, one output row per input file.

The job (`score_archive`)::

    list   ──► chunks of K paths (ecgad.ray.data.plan_chunks: paths only, listed in tasks, never the signals)
    prepare, score            the scoring pipeline (ecgad.ray.scoring)   -> each chunk's results (+ anomaly maps)
    commit ``ChunkSink``, a Ray Data datasink                            -> records/chunk-<id>.parquet (+ maps/...)

Why chunks are the unit that flows: resuming needs a unit of work that is either wholly on disk or wholly absent.
Ray Data re-blocks and re-batches rows as it likes, so a record-level row cannot tell a writer "your chunk is
complete". A chunk travels as *one* row (`ecgad.results`), so each writer call holds whole chunks and commits each
as one Parquet file, atomically (`ecgad.archive.ArchiveLayout`). On a rerun, a chunk whose file exists is skipped; a
killed run leaves at most hidden temporaries, which are deleted and which no Parquet reader lists. So every input
appears exactly once.

A chunk's id is a hash of its source, position and member paths (`ecgad.inputs`), so a chunk is only ever skipped
when exactly the same paths were committed. If the input changed between runs, committed chunks no longer match any
planned chunk and the job refuses to mix the two (``ArchiveError``), rather than silently duplicating or dropping
records. The output layout: `ecgad.archive`.
"""

from __future__ import annotations

import gc
import time
import traceback
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ray.data import Dataset, Datasink
from ray.data.block import BlockAccessor
from ray.data.expressions import col

from ecgad.archive import DEFAULT_CHUNK_SIZE, ArchiveError, ArchiveLayout, summarize
from ecgad.atomic import write_json
from ecgad.checkpoint import load_checkpoint, resolve_checkpoint
from ecgad.inputs import input_kind
from ecgad.log import get_logger
from ecgad.ray import metrics as job_metrics
from ecgad.ray.data import plan_chunks
from ecgad.ray.paths import require_shared
from ecgad.ray.scoring import scoring_pipeline
from ecgad.results import scored_chunks, storable_maps
from ecgad.storage import join, location

log = get_logger(__name__)


class InjectedFailure(RuntimeError):
    """Raised on purpose by ``--fail-after-chunks``, to test that a killed run resumes cleanly."""


class ArchiveJobFailed(Exception):
    """The pipeline stopped (a worker died, a bug, ``--fail-after-chunks``); committed chunks stay valid, and
    rerunning the same command resumes after them."""


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
            for chunk, results, maps in scored_chunks(BlockAccessor.for_block(block).to_arrow()):
                name = self.layout.chunk_name(chunk)
                if self.with_maps:
                    self.layout.commit(storable_maps(maps), join(self.layout.maps, name))
                self.layout.commit(results, join(self.layout.records, name))
                counts = dict(Counter(results.column("status").to_pylist()))
                job_metrics.count("ecgad_archive_chunks_total")
                for status, n in counts.items():
                    job_metrics.count("ecgad_archive_records_total", n, {"status": status})
                stats.append({"chunk": chunk, "records": results.num_rows, **counts})
                log.info(f"committed {name}: {results.num_rows} records ("
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


def _execute(pipeline: Dataset, sink: ChunkSink) -> None:
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
                  default_fs: float | None = None, fail_after_chunks: int | None = None,
                  diagnose: bool = False) -> dict[str, Any]:
    """Score every record under ``input_path`` into ``out`` (module docstring); returns the summary it writes.

    Runs on the Ray cluster this process is connected to (``ray.init`` first; Ray Data starts a local one if not).
    Rerunning with the same arguments after a kill or an `ArchiveJobFailed` resumes: committed chunks are skipped.
    ``input_path``, ``checkpoint`` and ``out`` may be URIs (`ecgad.storage`); local ones must be seen by every node
    of a multi-node cluster (`ecgad.ray.paths.require_shared`, which raises before anything is written).
    """
    started = time.perf_counter()
    input_path, out = location(input_path), location(out)
    checkpoint = resolve_checkpoint(checkpoint)   # RUNDIR/best -> its version, once, for every scoring actor
    require_shared(inputs=[input_path, checkpoint], outputs=[out])
    if chunk_size < 1 or batch_size < 1 or not 1 <= min_scorers <= num_scorers:
        raise ArchiveError("need chunk_size >= 1, batch_size >= 1 and 1 <= min_scorers <= num_scorers")
    loaded = load_checkpoint(checkpoint)  # fail fast on a bad checkpoint; gives the preparation config
    prep_config, model_version = loaded.prep_config, loaded.model_version
    if diagnose and loaded.diagnosis is None:
        raise ArchiveError(f"{checkpoint} has no diagnosis head to --diagnose with (train one with jobs.finetune)")
    del loaded

    layout = ArchiveLayout(out)
    job = {"input": str(input_path), "input_kind": input_kind(input_path), "chunk_size": chunk_size,
           "model_version": model_version, "mode": mode, "maps": maps, "default_fs": default_fs,
           **({"diagnose": True} if diagnose else {})}
    resuming = layout.check_or_write_job(job)
    removed = layout.remove_partial_files()

    chunks, sizes = plan_chunks(input_path, chunk_size)  # paths only, held in the object store
    planned, n_inputs = set(sizes), sum(sizes.values())
    committed = layout.committed_chunks()
    if committed - planned:
        raise ArchiveError(f"{out} holds {len(committed - planned)} committed chunks that match no chunk of "
                           f"{input_path} (the input changed since the first run); use another --out")
    todo = planned - committed
    log.info(f"{'resuming' if resuming else 'starting'} with model version {model_version} ({checkpoint}): "
             f"{n_inputs} records in {len(planned)} chunks, "
             f"{len(committed)} already committed, {len(todo)} to do"
             + (f", {removed} partial files removed" if removed else ""))

    sink = ChunkSink(layout, with_maps=maps, fail_after_chunks=fail_after_chunks)
    if todo:
        if committed:
            chunks = chunks.filter(expr=col("chunk").not_in(sorted(committed)))
        _execute(scoring_pipeline(chunks, checkpoint, prep_config, chunk_size=chunk_size, maps=maps,
                                  batch_size=batch_size, num_scorers=num_scorers, min_scorers=min_scorers,
                                  use_gpu=use_gpu, mode=mode, scorer_cpus=scorer_cpus,
                                  scorer_threads=scorer_threads, default_fs=default_fs, diagnose=diagnose),
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
        "model_version": model_version, "checkpoint": str(checkpoint), "mode": mode, "maps": maps,
        "input": str(input_path), "out": str(out),
    }
    write_json(layout.summary_file, summary)
    log.info(f"done: {totals['records']}/{n_inputs} records written ({scored_now} this run) in {wall:.1f} s; "
             f"{totals['by_status']}")
    return summary
