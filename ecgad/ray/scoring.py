"""The one batch scoring pipeline, for archive scoring (`ecgad.ray.archive`) and evaluation (``jobs.evaluate``)::

    chunk rows (ecgad.ray.data: a chunk of paths each)
    read, validate, prepare   CPU tasks, one chunk per call           -> the chunk's prepared rows (ecgad.rows)
    score                     an autoscaling pool of `ScorerActor`s    -> the chunk's results and anomaly maps
                              holding the model (GPU when asked)          (ecgad.results)

What comes out is one row per chunk (`ecgad.results.SCORED_CHUNK_SCHEMA`): the archive commits each to its own
files, evaluation reads them (`iter_scored`). Every per-record step is wrapped: a `Rejection` becomes status
``rejected`` with its reason, anything else status ``error`` with the exception type, so one bad file or one record
that breaks the model never fails a task, a block or the job.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import torch
from ray.data import ActorPoolStrategy, Dataset

from ecgad.config import PrepConfig
from ecgad.limits import LIMITS
from ecgad.ray.data import prepare_chunks, prepare_memory
from ecgad.results import (SCORED_CHUNK_SCHEMA, SCORED_MAP_SCHEMA, RESULT_SCHEMA, map_row, result_row,
                           scored_chunks, table_from_ipc, table_to_ipc)
from ecgad.rows import row_to_prepared
from ecgad.scoring import Scorer, score_isolated
from ecgad.types import Scores


class ScorerActor:
    """Holds one model (on a GPU when given one) and scores prepared chunks: the ``map_batches`` class of the pool.

    Records are scored ``batch_size`` at a time. If a batch raises, its records are retried one by one, so a record
    that breaks the model costs only itself (status ``error``), never its batch neighbours.
    """

    def __init__(self, checkpoint: str, mode: str, device: str, with_maps: bool, batch_size: int,
                 threads: int, diagnose: bool = False) -> None:
        if device == "cpu":
            torch.set_num_threads(max(1, threads))
        self.diagnoser = None
        if diagnose:   # the diagnosis network beside the detector, which scores exactly as without it
            from ecgad.diagnose import Diagnoser

            self.diagnoser = Diagnoser(checkpoint, device=device, mode=mode)
        self.scorer = (self.diagnoser.scorer if self.diagnoser is not None
                       else Scorer.from_checkpoint(checkpoint, device=device, mode=mode))
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
        """A chunk's prepared rows -> its `ecgad.results.RESULT_SCHEMA` rows (one each) and float32 map rows."""
        rows = prepared_rows.to_pylist()
        outcomes: list[Scores | Exception | None] = [None] * len(rows)   # None: a status row, never scored
        todo = []
        for i, row in enumerate(rows):
            if row["status"] == "ok":
                try:
                    todo.append((i, row_to_prepared(row)))
                except Exception as exc:
                    outcomes[i] = exc
        for start in range(0, len(todo), self.batch_size):
            part = todo[start:start + self.batch_size]
            for (i, _), outcome in zip(part, score_isolated(self.scorer, [p for _, p in part], self.with_maps)):
                outcomes[i] = outcome
        version = self.scorer.model_version
        diagnoses: list = [None] * len(rows)
        if self.diagnoser is not None:
            scored = [(i, p) for i, p in todo if isinstance(outcomes[i], Scores)]
            for (i, _), diagnosis in zip(scored, self.diagnoser.diagnoses([p for _, p in scored])):
                diagnoses[i] = diagnosis
        results = [result_row(row, outcome, version, diagnosis)
                   for row, outcome, diagnosis in zip(rows, outcomes, diagnoses)]
        maps = [map_row(row, outcome) for row, outcome in zip(rows, outcomes)
                if isinstance(outcome, Scores) and outcome.anomaly_map is not None]
        return (pa.Table.from_pylist(results, schema=RESULT_SCHEMA),
                pa.Table.from_pylist(maps, schema=SCORED_MAP_SCHEMA))


def scoring_pipeline(chunks: Dataset, checkpoint: Path | str, prep_config: PrepConfig, *, chunk_size: int, maps: bool,
                     batch_size: int, num_scorers: int, min_scorers: int = 1, use_gpu: bool = False,
                     mode: str = "full", scorer_cpus: float = 1.0, scorer_threads: int | None = None,
                     default_fs: float | None = None, diagnose: bool = False) -> Dataset:
    """Chunk rows (of at most ``chunk_size`` records) -> scored chunk rows: prepare in CPU tasks, score in an
    autoscaling pool of ``min_scorers``..``num_scorers`` model actors, each ``scorer_cpus`` CPUs (torch threads:
    ``scorer_threads``, default ``scorer_cpus`` rounded down, at least 1) and a GPU with ``use_gpu``. Records are
    read within this process's input limits (`ecgad.limits.LIMITS`), passed to the prepare tasks, so a job's
    workers apply the limits of the environment the job was started in, wherever they run."""
    return (
        chunks.repartition(target_num_rows_per_block=1)   # one chunk per block, so chunks spread over tasks
        .map_batches(prepare_chunks, batch_size=1, batch_format="pyarrow",
                     fn_kwargs={"cfg": prep_config, "default_fs": default_fs, "limits": LIMITS},
                     num_cpus=1, memory=prepare_memory(chunk_size))
        .map_batches(ScorerActor, batch_size=1, batch_format="pyarrow",
                     compute=ActorPoolStrategy(min_size=min_scorers, max_size=num_scorers),
                     num_cpus=scorer_cpus, num_gpus=1 if use_gpu else 0,
                     fn_constructor_kwargs={"checkpoint": str(checkpoint), "mode": mode,
                                            "device": "cuda" if use_gpu else "cpu", "with_maps": maps,
                                            "batch_size": batch_size, "diagnose": diagnose,
                                            "threads": scorer_threads or max(1, math.floor(scorer_cpus))}))


def iter_scored(scored: Dataset) -> Iterator[tuple[pa.Table, pa.Table]]:
    """Stream ``(results, maps)`` of each scored chunk to the driver, as the pipeline produces them."""
    for batch in scored.iter_batches(batch_size=None, batch_format="pyarrow"):
        for _, results, maps in scored_chunks(batch):
            yield results, maps
