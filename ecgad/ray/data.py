"""Ray Data datasets of the batch jobs: inputs (`ecgad.inputs`) as datasets, preparation (`ecgad.rows.prepare_path`)
as ``map_batches`` functions, and training shards (`ecgad.shards`) read back.

Two forms of the input, for two kinds of job:

- **record rows** (`inputs_dataset`, `prepare_shard_rows`): one row per record with the index columns carried along,
  for preprocessing, which writes one shard row per record;
- **chunk rows** (`list_chunks`, `plan_chunks`, `chunks_dataset`, `prepare_chunks`): one row per chunk of records,
  for scoring (`ecgad.ray.scoring`), whose writer must hold whole chunks (`ecgad.results`).

Both prepare their records through `prepare_isolated`: a record whose preparation kills its worker process (the
memory monitor or the kernel's OOM killer, a crash in a native library) gets a finite number of tries and then an
``error`` row with reason ``worker_died``, instead of Ray Data's default of retrying the task forever (which kept a
chunk from ever committing, and a rerun from getting past it).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import ray
from ray.data import Dataset, FileShuffleConfig
from ray.data.dataset import MaterializedDataset
from ray.data.expressions import col

from ecgad.config import PrepConfig
from ecgad.inputs import SLICE_SCHEMA, entries, slice_chunks, slices
from ecgad.limits import LIMITS, InputLimits
from ecgad.log import get_logger
from ecgad.ray.listing import list_slices
from ecgad.results import PREPARED_CHUNK_SCHEMA, table_to_ipc
from ecgad.rows import prepare_path, status_row
from ecgad.shards import ShardLayout, conform, rows_table
from ecgad.storage import for_ray, location, normalize

log = get_logger(__name__)

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


# -- preparation that survives a record killing its worker ---------------------------------------------------------

#: Tries of one record alone, once its batch's task died: the second absorbs a death caused by a neighbour's memory.
RECORD_ATTEMPTS = 2

#: What `ray.get` raises for a task whose worker process died (as opposed to a Python exception in it).
_WORKER_DEATHS = (ray.exceptions.WorkerCrashedError, ray.exceptions.OutOfMemoryError)

#: Test hook: a prepare worker exits (``os._exit``) on the file with this name, as a worker killed by the memory
#: monitor or a native crash does. A real kill cannot be provoked reliably on a test machine (Ray's memory monitor
#: acts on the node's memory, not a task's reservation), so tests/test_hostile_archive.py sets this variable.
KILL_ON_FILE_ENV = "ECGAD_TEST_KILL_PREPARE_ON"


@ray.remote(num_cpus=1)
def _prepare_task(batch: list[tuple[str, str]], cfg: PrepConfig, default_fs: float | None,
                  limits: InputLimits) -> list[dict[str, Any]]:
    rows = []
    for path, record_id in batch:
        if os.environ.get(KILL_ON_FILE_ENV) == Path(path).name:
            os._exit(1)
        rows.append(prepare_path(path, record_id, cfg, default_fs, limits))
    return rows


def prepare_isolated(batch: Sequence[tuple[str, str]], cfg: PrepConfig, default_fs: float | None = None,
                     limits: InputLimits = LIMITS) -> list[dict[str, Any]]:
    """``(path, record_id)`` pairs -> one row each (`ecgad.rows.prepare_path`), even if a record kills its worker.

    The batch is prepared in one child task, tried once. If its worker dies, each record is prepared alone in its
    own task, up to `RECORD_ATTEMPTS` times; a record whose worker still dies gets an ``error`` row with reason
    ``worker_died``, and the others their rows. Called from a ``map_batches`` task, which only waits (Ray lends its
    CPU to the children meanwhile), so that task itself never dies of a record and is never retried.
    """
    batch = list(batch)
    whole = _prepare_task.options(memory=prepare_memory(len(batch)), max_retries=0)
    try:
        return ray.get(whole.remote(batch, cfg, default_fs, limits))
    except _WORKER_DEATHS as death:
        log.warning(f"a prepare worker died ({type(death).__name__}) on a batch of {len(batch)} records; "
                    "preparing them one by one")
    alone = _prepare_task.options(memory=prepare_memory(1), max_retries=RECORD_ATTEMPTS - 1)
    pending = [alone.remote([entry], cfg, default_fs, limits) for entry in batch]
    rows = []
    for (path, record_id), ref in zip(batch, pending):
        try:
            rows += ray.get(ref)
        except _WORKER_DEATHS as death:
            log.warning(f"record {record_id!r} killed its worker {RECORD_ATTEMPTS} times; recorded as an error")
            rows.append(status_row(path, record_id, {
                "status": "error",
                "reason": f"worker_died: the process preparing it died {RECORD_ATTEMPTS} times "
                          f"({type(death).__name__}: killed for memory, or crashed)"}))
    return rows


# -- record rows (preprocessing) -----------------------------------------------------------------------------------

def inputs_dataset(inputs: pa.Table, rows_per_block: int = RECORDS_PER_TASK) -> Dataset:
    """A dataset of an `ecgad.inputs.list_inputs` table, ``rows_per_block`` rows per block so preparation spreads
    over tasks."""
    blocks = [inputs.slice(start, rows_per_block) for start in range(0, inputs.num_rows, rows_per_block)]
    return ray.data.from_arrow(blocks or [inputs])


def prepare_shard_rows(batch: pa.Table, cfg: PrepConfig = PrepConfig(), limits: InputLimits = LIMITS) -> pa.Table:
    """``map_batches`` (``batch_format="pyarrow"``): input rows -> one prepared or status row each
    (`ecgad.rows.prepare_path`), with the inputs' index columns, in exactly the shard columns
    (`ecgad.shards.SHARD_SCHEMA`)."""
    return conform(rows_table(prepare_isolated(list(entries(batch)), cfg, limits=limits), extra=batch))


# -- chunk rows (scoring) ------------------------------------------------------------------------------------------

def list_chunks(input_path: str | Path, chunk_size: int) -> Dataset:
    """Any input (`ecgad.inputs.input_kind`) as a dataset of chunk rows ``{chunk, n_paths, paths, record_ids}``,
    listed in Ray tasks (`ecgad.ray.listing.list_slices`: one per folder of a folder tree, one that streams a
    manifest, one that reads a PTB-XL root's index), the driver holding only object refs."""
    return _chunk_rows(ray.data.from_arrow_refs(list_slices(normalize(input_path), chunk_size)
                                                or [ray.put(SLICE_SCHEMA.empty_table())]), chunk_size)


def plan_chunks(input_path: str | Path, chunk_size: int) -> tuple[MaterializedDataset, dict[str, int]]:
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


def prepare_chunks(batch: pa.Table, cfg: PrepConfig, default_fs: float | None,
                   limits: InputLimits = LIMITS) -> pa.Table:
    """``map_batches`` (``batch_format="pyarrow"``): chunk rows -> prepared chunk rows, each chunk's records
    (`ecgad.rows.prepare_path`, one row per input, never raising, read within ``limits``) as one nested table."""
    prepared = [table_to_ipc(rows_table(prepare_isolated(list(zip(paths, record_ids)), cfg, default_fs, limits)))
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
    layout = ShardLayout(location(root))
    layout.require_manifest()
    records_path, records_fs = for_ray(layout.records)
    context = ray.data.DataContext.get_current()
    default = context.use_datasource_v2
    context.use_datasource_v2 = False
    try:
        dataset = ray.data.read_parquet(
            records_path, filesystem=records_fs,
            shuffle=None if shuffle_seed is None else FileShuffleConfig(seed=shuffle_seed, reseed_after_execution=True))
    finally:
        context.use_datasource_v2 = default
    return dataset.filter(expr=shard_filter(folds, only_normal)).select_columns(columns)
