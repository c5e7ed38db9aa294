"""What scoring a record yields, in one schema for every batch job, and how records travel through the pipeline.

A result row names each field once, as `ecgad.types.Scores` and the service's response do (``pred_score``,
``pred_label``, ``beats_used``, ``windows_scored``, ``model_version``), next to where the record came from and its
status: ``ok``, ``rejected`` (the reason is the `Rejection`'s) or ``error`` (the exception type and message).
`result_row` is the one place where a prepared row and its scoring outcome become a result row.

Anomaly maps travel as float32 (what the scorer computes, and what evaluation's localization metrics read) and
become float16 only where the archive stores them (`storable_maps`).

Between pipeline stages a chunk of records travels as *one* row whose records are a nested table in Arrow IPC bytes
(`table_to_ipc`): Ray Data re-blocks and re-batches rows as it likes, but never splits a chunk apart, so a writer
always holds whole chunks (why that matters: `ecgad.ray.archive`).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ecgad.rows import failure_fields
from ecgad.types import Scores

RESULT_SCHEMA = pa.schema([
    ("record_id", pa.string()),
    ("path", pa.string()),
    ("status", pa.string()),          # ok | rejected | error
    ("reason", pa.string()),          # "" when ok; a rejection reason; "<ExceptionType>: message" for errors
    ("pred_score", pa.float64()),
    ("pred_label", pa.bool_()),
    ("beats_used", pa.int32()),
    ("windows_scored", pa.int32()),
    ("model_version", pa.string()),
    ("diagnosis_labels", pa.list_(pa.string())),   # --diagnose: the positive labels at the fold-9 thresholds
    ("diagnosis_probabilities", pa.string()),      # --diagnose: {class: probability} as JSON
])


def _map_schema(dtype: pa.DataType) -> pa.Schema:
    return pa.schema([
        ("record_id", pa.string()),
        ("fs", pa.float64()),             # the record's own rate: the map is on the input's time axis
        ("n_leads", pa.int32()),
        ("n_samples", pa.int32()),
        ("anomaly_map", pa.list_(dtype)),   # row-major (n_leads, n_samples)
    ])


#: Maps as scored: float32, exactly the scorer's.
SCORED_MAP_SCHEMA = _map_schema(pa.float32())

#: Maps as the archive stores them: float16. A map is a reconstruction error of [-1, 1]-normalized signals (values
#: of order 1e-3..10), used to rank and draw where a record is abnormal; float16's 3 significant digits are far finer
#: than that needs, and it halves the largest output of the job (12 x 5000 samples per 10 s record; zstd gains
#: little on float mantissas). Values beyond float16's range (65504) are clipped to it rather than becoming inf.
MAP_DTYPE = np.float16
MAP_SCHEMA = _map_schema(pa.float16())

#: The rows that flow between pipeline stages, one per chunk (module docstring).
PREPARED_CHUNK_SCHEMA = pa.schema([("chunk", pa.string()), ("prepared", pa.large_binary())])
SCORED_CHUNK_SCHEMA = pa.schema([("chunk", pa.string()), ("results", pa.large_binary()),
                                 ("maps", pa.large_binary())])


def result_row(row: dict[str, Any], outcome: Scores | BaseException | None, model_version: str,
               diagnosis: Any = None) -> dict[str, Any]:
    """The result of a prepared row (`ecgad.rows.prepare_path`): its scores, the failure that took their place
    (`ecgad.rows.failure_fields`), or, for a row never scored (``outcome`` None: a status row), its own status;
    with its `ecgad.diagnose.Diagnosis` when the archive is diagnosed."""
    result = {"record_id": row["record_id"], "path": row["path"], "status": row["status"], "reason": row["reason"],
              "pred_score": None, "pred_label": None, "beats_used": None, "windows_scored": None,
              "model_version": model_version}
    if isinstance(outcome, BaseException):
        result.update(failure_fields(outcome))
    elif outcome is not None:
        result.update(pred_score=float(outcome.pred_score), pred_label=bool(outcome.pred_label),
                      beats_used=int(outcome.beats_used), windows_scored=int(outcome.windows_scored))
    if diagnosis is not None:
        result.update(diagnosis_labels=list(diagnosis.labels),
                      diagnosis_probabilities=json.dumps(diagnosis.probabilities))
    return result


def map_row(row: dict[str, Any], scores: Scores) -> dict[str, Any]:
    """A `SCORED_MAP_SCHEMA` row: the anomaly map of a prepared row's scores, on the record's own time axis."""
    anomaly_map = np.asarray(scores.anomaly_map, dtype=np.float32)
    return {"record_id": row["record_id"], "fs": float(row["source_fs"]), "n_leads": int(anomaly_map.shape[0]),
            "n_samples": int(anomaly_map.shape[1]), "anomaly_map": anomaly_map.ravel()}


def anomaly_map_of(row: dict[str, Any]) -> np.ndarray:
    """The ``(n_leads, n_samples)`` array of a map row."""
    return np.asarray(row["anomaly_map"], dtype=np.float32).reshape(row["n_leads"], row["n_samples"])


def storable_maps(maps: pa.Table) -> pa.Table:
    """`SCORED_MAP_SCHEMA` maps as the archive stores them (`MAP_SCHEMA`: float16, out-of-range values clipped)."""
    column = maps.column("anomaly_map").combine_chunks()
    limit = float(np.finfo(MAP_DTYPE).max)
    values = np.clip(column.flatten().to_numpy(), -limit, limit).astype(MAP_DTYPE)
    offsets = np.concatenate([[0], np.cumsum(pc.list_value_length(column).to_numpy())])
    stored = pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(values))
    return pa.Table.from_arrays([*maps.columns[:-1], stored], schema=MAP_SCHEMA)


# -- chunks between stages -----------------------------------------------------------------------------------------

def table_to_ipc(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def table_from_ipc(blob: bytes | pa.Scalar) -> pa.Table:
    buffer = blob.as_buffer() if isinstance(blob, pa.Scalar) else pa.py_buffer(blob)
    return pa.ipc.open_stream(buffer).read_all()


def scored_chunks(table: pa.Table) -> Iterator[tuple[str, pa.Table, pa.Table]]:
    """``(chunk id, results, maps)`` of every `SCORED_CHUNK_SCHEMA` row of ``table``."""
    for chunk, results, maps in zip(table.column("chunk").to_pylist(), table.column("results"),
                                    table.column("maps")):
        yield chunk, table_from_ipc(results), table_from_ipc(maps)
