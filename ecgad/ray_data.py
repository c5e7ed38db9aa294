"""Ray Data adapters shared by the batch jobs: list inputs, read + validate + prepare in tasks, read shards, score.

Every job sends its records down the one data path (DESIGN.md): ``read_record`` -> ``validate`` -> ``prepare`` ->
`ecgad.rows` row. The functions here wrap that path for Ray Data without changing it:

- `list_inputs` turns a data root into an Arrow table of inputs (``path``, ``record_id`` and the index columns of
  `ecgad.shards.INDEX_FIELDS`): a PTB-XL root (real, or synthetic from `ecgad.synth_dataset`) through its index, so
  every record carries its fold and label; any other folder through ``list_record_files``, with null index columns.
- `prepare_path` is the per-record step and `prepare_rows` its ``map_batches`` form. **Contract** (other jobs, such as
  archive scoring, build on it): input rows need ``path`` and ``record_id``; every other input column is carried to
  the output unchanged; each input yields exactly one output row, an ok row (`ecgad.rows.prepared_to_row`) or a
  status row (``status`` ``rejected`` with the `Rejection` reason, or ``error`` with the exception type for anything
  unexpected). It never raises for a bad record, so one bad file never fails a task, a block or the job.
- `read_shards` streams a shards directory (`ecgad.shards`) with the row filter pushed down to the Parquet read.
- `RowScorer` is the ``map_batches`` callable class (run in an actor pool) that scores prepared rows with a `Scorer`.

Only this module and `ecgad.ray_train` import Ray; the functions they wrap stay Ray-free and unit-testable.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from ecgad.config import PrepConfig
from ecgad.rows import prepared_to_row, rejection_to_row, row_to_prepared
from ecgad.shards import INDEX_FIELDS, ROW_FIELDS, conform, rows_table
from ecgad.types import Record, Rejection

#: Records per block of the input listing, i.e. per prepare task: enough to amortize a task's start (~ms) over the
#: ~50 ms each record takes to prepare, few enough that a small data set still spreads over every CPU.
ROWS_PER_BLOCK = 16

#: Memory to reserve per prepare task: a worker with numpy/scipy loaded plus ~3 MB per record of float64
#: intermediates and rows. It keeps Ray from packing more tasks on a node than its memory holds.
PREPARE_TASK_MEMORY = 256 * 2**20 + ROWS_PER_BLOCK * 3 * 2**20


# -- listing ------------------------------------------------------------------------------------------------------

def is_ptbxl_root(root: str | Path) -> bool:
    return (Path(root) / "ptbxl_database.csv").is_file()


def list_inputs(root: str | Path, folds: list[int] | None = None) -> pa.Table:
    """The records under ``root`` as a table with ``path``, ``record_id`` and every `ecgad.shards.INDEX_FIELDS`
    column, in a stable order (index order, or sorted paths).

    A PTB-XL root is listed through ``load_ptbxl_index`` (one file per ECG, the 500 Hz one where both exist; its
    record id is PTB-XL's ``records500/00000/00001_hr`` path, as in archive scoring). Any other folder is every ECG
    file under it (``list_record_files``), the record id its relative path without extension, and the index columns
    null: such data has no folds or labels, so it can be scored and evaluated but not trained on. ``folds`` keeps
    only those ``strat_fold`` values (an error for a root without folds).
    """
    root = Path(root).resolve()
    if is_ptbxl_root(root):
        from ecgad.ptbxl import load_ptbxl_index

        index = load_ptbxl_index(root)
        if folds is not None:
            index = index[index["strat_fold"].isin(folds)]
        columns: dict[str, Any] = {
            "path": [str(root / f"{rel}.hea") for rel in index["record_path"]],
            "record_id": [str(rel) for rel in index["record_path"]],
        }
        for name, _ in INDEX_FIELDS[1:]:
            if name in index.columns:
                values = index[name].tolist()
                columns[name] = [None if isinstance(v, float) and math.isnan(v) else v for v in values]
    else:
        if folds is not None:
            raise ValueError(f"{root} is not a PTB-XL root (no ptbxl_database.csv): it has no folds to select")
        from ecgad.ptbxl import list_record_files

        files = list_record_files(root)
        columns = {"path": [str(p) for p in files],
                   "record_id": [p.relative_to(root).with_suffix("").as_posix() for p in files]}
    n = len(columns["path"])
    fields = [pa.field("path", pa.string()), pa.field("record_id", pa.string()), *(pa.field(*f) for f in INDEX_FIELDS[1:])]
    return pa.Table.from_arrays([pa.array(columns.get(f.name, [None] * n), f.type) for f in fields],
                                schema=pa.schema(fields))


def inputs_dataset(inputs: pa.Table, rows_per_block: int = ROWS_PER_BLOCK):
    """A Ray dataset of the input table, ``rows_per_block`` rows per block so preparation spreads over tasks."""
    import ray

    blocks = [inputs.slice(start, rows_per_block) for start in range(0, inputs.num_rows, rows_per_block)]
    return ray.data.from_arrow(blocks or [inputs])


# -- read, validate, prepare --------------------------------------------------------------------------------------

def failure_fields(exc: BaseException) -> dict[str, str]:
    """The status and reason for a record whose processing raised: a rejection keeps its typed reason; anything
    else is an ``error`` naming the exception type, so an unexpected failure is visible and countable by type."""
    if isinstance(exc, Rejection):
        return {"status": "rejected", "reason": exc.reason}
    message = " ".join(str(exc).split())[:300]
    return {"status": "error", "reason": f"{type(exc).__name__}: {message}" if message else type(exc).__name__}


def read_file(path: str | Path, default_fs: float | None = None) -> Record:
    """``read_record``, with ``default_fs`` as the rate of files that carry none (NPY, CSV without ``# fs=``).

    ``read_record(fs=...)`` rejects a file whose own rate differs, so the default cannot simply be passed for every
    file of a mixed folder (100 Hz and 500 Hz WFDB next to NPY); it fills in only where the rate is missing.
    """
    from ecgad.io import read_record

    try:
        return read_record(path)
    except Rejection as rejection:
        if default_fs is None or rejection.reason != "bad_fs:missing":
            raise
    return read_record(path, fs=default_fs)


def prepare_path(path: str, record_id: str, cfg: PrepConfig = PrepConfig(),
                 default_fs: float | None = None) -> dict[str, Any]:
    """Read, validate and prepare one file into an `ecgad.rows` row plus its ``path``; never raises (module
    docstring: a rejection becomes a ``rejected`` row, anything else an ``error`` row)."""
    from ecgad.preprocess import prepare
    from ecgad.validate import validate

    try:
        prepared = prepare(validate(read_file(path, default_fs)), cfg)
        prepared.record_id = record_id
        row = prepared_to_row(prepared)
    except Exception as exc:  # fault isolation: one file never fails its task
        row = {**rejection_to_row(record_id, Rejection("bad_file")), **failure_fields(exc)}
    return {**row, "path": str(path)}


def prepare_rows(batch: pa.Table, cfg: PrepConfig = PrepConfig(), default_fs: float | None = None) -> pa.Table:
    """``map_batches`` (``batch_format="pyarrow"``): input rows -> one prepared or status row each (module
    docstring), in `ecgad.shards.ROW_SCHEMA` types, with the batch's other columns carried along."""
    rows = [prepare_path(path, record_id, cfg, default_fs)
            for path, record_id in zip(batch.column("path").to_pylist(), batch.column("record_id").to_pylist())]
    return rows_table(rows, extra=batch)


def prepare_shard_rows(batch: pa.Table, cfg: PrepConfig = PrepConfig()) -> pa.Table:
    """`prepare_rows` with exactly the shard columns (`ecgad.shards.SHARD_SCHEMA`), for ``write_parquet``."""
    return conform(prepare_rows(batch, cfg))


# -- shards -------------------------------------------------------------------------------------------------------

def shard_filter(folds: tuple[int, ...] | list[int], only_normal: bool = False):
    """The row filter of a training or validation read: prepared rows of ``folds`` (normals only if asked)."""
    from ray.data.expressions import col

    expr = (col("status") == "ok") & col("strat_fold").is_in(list(folds))
    return expr & (col("is_normal") == True) if only_normal else expr  # noqa: E712 (an expression, not a test)


def read_shards(root: str | Path, columns: list[str], folds: tuple[int, ...] | list[int], only_normal: bool = False,
                shuffle_seed: int | None = None):
    """Stream the prepared rows of ``folds`` from a shards directory with only ``columns``. Ray Data pushes the
    filter and the projection down into the Parquet read, so other folds and columns are never decoded.

    ``shuffle_seed``: read the shard files in a new order at every execution (every epoch), seeded, so a run is
    repeatable. Shard files hold a few dozen records each, so this plus a small local shuffle buffer in the
    consumer mixes an epoch well without a global shuffle (which would materialize the data set).

    Read with Ray Data's first Parquet datasource, not the default one of Ray 2.60 (``use_datasource_v2``): the
    default lists the files *at every execution*, i.e. every training epoch, on a pool of 32 footer-reading
    actors (32 worker processes started, then killed), and packs the rows into a few large blocks. On a 2-core
    machine that cost ~3-6 s before each epoch's first batch and slowed the training step it ran beside;
    the first datasource plans its read tasks once, here, one per file, and the first batch arrives in ~0.5 s.
    """
    import ray
    from ray.data import FileShuffleConfig

    from ecgad.shards import ShardLayout

    layout = ShardLayout(Path(root))
    layout.require_manifest()
    context = ray.data.DataContext.get_current()
    default = context.use_datasource_v2
    context.use_datasource_v2 = False
    try:
        dataset = ray.data.read_parquet(
            str(layout.records),
            shuffle=None if shuffle_seed is None else FileShuffleConfig(seed=shuffle_seed, reseed_after_execution=True))
    finally:
        context.use_datasource_v2 = default
    return dataset.filter(expr=shard_filter(folds, only_normal)).select_columns(columns)


# -- scoring ------------------------------------------------------------------------------------------------------

SCORE_FIELDS = [
    ("record_id", pa.string()),
    ("status", pa.string()),
    ("reason", pa.string()),
    ("pred_score", pa.float64()),
    ("pred_label", pa.bool_()),
    ("beats_used", pa.int64()),
    ("anomaly_map", pa.large_binary()),   # float32 (12, source_samples) bytes when maps were asked for, else null
    ("map_samples", pa.int64()),
]


class RowScorer:
    """``map_batches`` callable class: prepared rows -> one score row each (`SCORE_FIELDS` plus the batch's other
    non-payload columns), so a pool of actors each loads the model once.

    Status rows pass through with their reason and no score. A record whose scoring raises gets status ``error``
    (scored alone after its batch failed), so one record that breaks the model never costs its neighbours.
    """

    #: The row payload, dropped from the output: the scores are what flows on.
    PAYLOAD = {name for name, _ in ROW_FIELDS} - {"record_id", "status", "reason"}

    def __init__(self, checkpoint: str, mode: str = "full", device: str = "cpu", with_maps: bool = False,
                 threads: int = 1) -> None:
        import torch

        from ecgad.scoring import Scorer

        if device == "cpu":
            torch.set_num_threads(max(1, threads))
        self.scorer = Scorer.from_checkpoint(Path(checkpoint), device=device, mode=mode)
        self.with_maps = with_maps

    def __call__(self, batch: pa.Table) -> pa.Table:
        from ecgad.scoring import score_isolated

        rows = batch.to_pylist()
        out = [{"record_id": r["record_id"], "status": r["status"], "reason": r["reason"], "pred_score": None,
                "pred_label": None, "beats_used": None, "anomaly_map": None, "map_samples": None} for r in rows]
        todo = []
        for result, row in zip(out, rows):
            if row["status"] == "ok":
                try:
                    todo.append((result, row_to_prepared(row)))
                except Exception as exc:
                    result.update(failure_fields(exc))
        outcomes = score_isolated(self.scorer, [p for _, p in todo], self.with_maps)
        for result, outcome in zip((r for r, _ in todo), outcomes):
            if isinstance(outcome, BaseException):
                result.update(failure_fields(outcome))
                continue
            result.update(pred_score=float(outcome.pred_score), pred_label=bool(outcome.pred_label),
                          beats_used=int(outcome.beats_used))
            if outcome.anomaly_map is not None:
                result.update(anomaly_map=np.ascontiguousarray(outcome.anomaly_map, dtype="<f4").tobytes(),
                              map_samples=int(outcome.anomaly_map.shape[1]))
        table = pa.Table.from_pylist(out, schema=pa.schema(SCORE_FIELDS))
        for name in batch.column_names:
            if name not in table.column_names and name not in self.PAYLOAD:
                table = table.append_column(name, batch.column(name))
        return table


def score_map(row: dict[str, Any], n_leads: int = 12) -> np.ndarray | None:
    """The ``(12, samples)`` float32 anomaly map of a `RowScorer` output row, or None."""
    blob = row.get("anomaly_map")
    if blob is None:
        return None
    return np.frombuffer(blob, dtype="<f4").reshape(n_leads, int(row["map_samples"]))

