"""Ray Data datasets of the batch jobs: inputs (`ecgad.inputs`) as datasets, preparation (`ecgad.rows.prepare_path`)
as ``map_batches`` functions, and training shards (`ecgad.shards`) read back.

Two forms of the input, for two kinds of job:

- **record rows** (`inputs_dataset`, `prepare_shard_rows`): one row per record with the index columns carried along,
  for preprocessing, which writes one shard row per record;
- **chunk rows** (`list_chunks`, `plan_chunks`, `chunks_dataset`, `prepare_chunks`): one row per chunk of records,
  for scoring (`ecgad.ray.scoring`), whose writer must hold whole chunks (`ecgad.results`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa
import ray
from ray.data import Dataset, FileShuffleConfig
from ray.data.dataset import MaterializedDataset
from ray.data.expressions import col

from ecgad.config import PrepConfig
from ecgad.inputs import SLICE_SCHEMA, entries, slice_chunks, slices
from ecgad.ray.listing import list_slices
from ecgad.results import PREPARED_CHUNK_SCHEMA, table_to_ipc
from ecgad.rows import prepare_path
from ecgad.shards import ShardLayout, conform, rows_table

#: Records per prepare task where no unit of resumption sets it (preprocessing's blocks, evaluation's chunks):
#: enough to amortize a task's start (~ms) over the ~50 ms each record takes to prepare, few enough that a small data
#: set still spreads over every CPU.
RECORDS_PER_TASK = 16

#: Slices (`ecgad.inputs.CHUNKS_PER_SLICE` chunks each) per task that turns slices into chunk rows: a tree of small
#: folders gives one slice per folder, and hashing one costs well under a task's start.
SLICES_PER_TASK = 16

#: Memory (bytes) to reserve per prepare task: a worker with numpy/scipy loaded (~250 MB) plus its records' raw
#: signals, intermediates (float64) and prepared rows, ~3 MB per 10 s record (`prepare_memory`). Besides keeping
#: Ray from packing more tasks on a node than its memory holds, it makes the prepare stage's remote arguments differ
#: from the scorers', so Ray Data does not fuse preparation into the model actors: the actors (GPUs) score, CPU tasks
#: prepare.
PREPARE_BASE_MEMORY = 256 * 2**20
PREPARE_MEMORY_PER_RECORD = 3 * 2**20


def prepare_memory(records: int) -> int:
    """The memory to reserve for a task preparing ``records`` records."""
    return PREPARE_BASE_MEMORY + PREPARE_MEMORY_PER_RECORD * records


# -- record rows (preprocessing) -----------------------------------------------------------------------------------

def inputs_dataset(inputs: pa.Table, rows_per_block: int = RECORDS_PER_TASK) -> Dataset:
    """A dataset of an `ecgad.inputs.list_inputs` table, ``rows_per_block`` rows per block so preparation spreads
    over tasks."""
    blocks = [inputs.slice(start, rows_per_block) for start in range(0, inputs.num_rows, rows_per_block)]
    return ray.data.from_arrow(blocks or [inputs])


def prepare_shard_rows(batch: pa.Table, cfg: PrepConfig = PrepConfig()) -> pa.Table:
    """``map_batches`` (``batch_format="pyarrow"``): input rows -> one prepared or status row each
    (`ecgad.rows.prepare_path`), with the inputs' index columns, in exactly the shard columns
    (`ecgad.shards.SHARD_SCHEMA`)."""
    return conform(rows_table([prepare_path(path, record_id, cfg) for path, record_id in entries(batch)],
                              extra=batch))


# -- chunk rows (scoring) ------------------------------------------------------------------------------------------

def list_chunks(input_path: Path, chunk_size: int) -> Dataset:
    """Any input (`ecgad.inputs.input_kind`) as a dataset of chunk rows ``{chunk, n_paths, paths, record_ids}``,
    listed in Ray tasks (`ecgad.ray.listing.list_slices`: one per folder of a folder tree, one that streams a
    manifest, one that reads a PTB-XL root's index), the driver holding only object refs."""
    return _chunk_rows(ray.data.from_arrow_refs(list_slices(Path(input_path).resolve(), chunk_size)
                                                or [ray.put(SLICE_SCHEMA.empty_table())]), chunk_size)


def plan_chunks(input_path: Path, chunk_size: int) -> tuple[MaterializedDataset, dict[str, int]]:
    """What archive scoring plans to do (`ecgad.ray.archive`): the chunk rows of ``input_path``, held in the object
    store, and each chunk's number of records, the only part of the listing the driver holds."""
    chunks = list_chunks(input_path, chunk_size).materialize()
    sizes = {row["chunk"]: row["n_paths"] for row in chunks.select_columns(["chunk", "n_paths"]).iter_rows()}
    return chunks, sizes


def chunks_dataset(inputs: pa.Table, chunk_size: int) -> Dataset:
    """A list of inputs the driver already holds (`ecgad.inputs.list_inputs`) as a dataset of chunk rows."""
    return _chunk_rows(ray.data.from_arrow(list(slices("inputs", [inputs], chunk_size))
                                           or SLICE_SCHEMA.empty_table()), chunk_size)


def _chunk_rows(slices_dataset: Dataset, chunk_size: int) -> Dataset:
    """Slice rows -> chunk rows (`ecgad.inputs.slice_chunks`), `SLICES_PER_TASK` slices per task."""
    return slices_dataset.map_batches(slice_chunks, batch_size=SLICES_PER_TASK, batch_format="pyarrow",
                                      fn_kwargs={"chunk_size": chunk_size})


def prepare_chunks(batch: pa.Table, cfg: PrepConfig, default_fs: float | None) -> pa.Table:
    """``map_batches`` (``batch_format="pyarrow"``): chunk rows -> prepared chunk rows, each chunk's records
    (`ecgad.rows.prepare_path`, one row per input, never raising) as one nested table."""
    prepared = [table_to_ipc(rows_table([prepare_path(p, r, cfg, default_fs) for p, r in zip(paths, record_ids)]))
                for paths, record_ids in zip(batch.column("paths").to_pylist(), batch.column("record_ids").to_pylist())]
    return pa.table({"chunk": batch.column("chunk"), "prepared": pa.array(prepared, pa.large_binary())},
                    schema=PREPARED_CHUNK_SCHEMA)


# -- shards --------------------------------------------------------------------------------------------------------

def shard_filter(folds: tuple[int, ...] | list[int], only_normal: bool = False) -> Any:
    """The row filter of a training or validation read: prepared rows of ``folds`` (normals only if asked)."""
    expr = (col("status") == "ok") & col("strat_fold").is_in(list(folds))
    return expr & (col("is_normal") == True) if only_normal else expr  # noqa: E712 (an expression, not a test)


def read_shards(root: str | Path, columns: list[str], folds: tuple[int, ...] | list[int], only_normal: bool = False,
                shuffle_seed: int | None = None) -> Dataset:
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
