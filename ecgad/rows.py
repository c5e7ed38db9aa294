"""Flat, Arrow-friendly rows for `Prepared` records, so Ray Data blocks and Parquet files can carry them, and the
per-record step every batch job runs to make one: `prepare_path`.

Ray Data moves rows between tasks and actors as Arrow tables; nested variable-shape numpy arrays are fragile there,
so a prepared record travels as plain columns: scalars, lists of ints and raw little-endian float32 bytes. Encoding
is lossless (float32 in, float32 out), so a record scored after a round trip gets exactly the score it gets in
process. Status rows for rejected records share the same columns, so one table holds every input.

`prepare_path` is the one data path of the batch jobs (preprocessing, evaluation, archive scoring): ``read_record``
-> ``validate`` -> ``prepare`` -> row. **Contract**: each input yields exactly one row, an ok row (`prepared_to_row`)
or a status row (``status`` ``rejected`` with the `Rejection` reason, or ``error`` naming the exception type for
anything unexpected, `failure_fields`). It never raises for a bad record, so one bad file never fails a task, a
block or a job.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from ecgad.config import PrepConfig
from ecgad.io import companion_files, read_record
from ecgad.limits import LIMITS, InputLimits
from ecgad.preprocess import prepare
from ecgad.storage import local_copy
from ecgad.types import Prepared, Record, Rejection, Window
from ecgad.validate import validate

_N_LEADS = 12


def _to_bytes(array: np.ndarray) -> bytes:
    return np.ascontiguousarray(array, dtype="<f4").tobytes()


def _from_bytes(blob: bytes, shape: tuple[int, ...]) -> np.ndarray:
    return np.frombuffer(blob, dtype="<f4").reshape(shape).astype(np.float32, copy=True)


def prepared_to_row(prepared: Prepared) -> dict[str, Any]:
    """Encode one prepared record (all its windows, peaks and beats) as a flat row with status ``ok``."""
    windows = prepared.windows
    return {
        "record_id": prepared.record_id, "status": "ok", "reason": "",
        "n_samples_model": int(prepared.n_samples_model), "source_fs": float(prepared.source_fs),
        "source_samples": int(prepared.source_samples),
        "window_offsets": [int(w.offset) for w in windows],
        "window_len": int(windows[0].signal.shape[1]) if windows else 0,
        "signals": _to_bytes(np.stack([w.signal for w in windows])) if windows else b"",
        "peak_counts": [int(len(w.peaks)) for w in windows], "peaks": [int(p) for w in windows for p in w.peaks],
        "beat_counts": [int(w.n_beats) for w in windows],
        "beat_peaks": [int(p) for w in windows for p in w.beat_peaks],
        "beat_len": int(windows[0].beats.shape[2]) if windows and windows[0].n_beats else 0,
        "beats": _to_bytes(np.concatenate([w.beats for w in windows])) if windows else b"",
        "metadata_json": json.dumps(prepared.metadata, default=str),
    }


def rejection_to_row(record_id: str, rejection: Rejection) -> dict[str, Any]:
    """A status row for a record that could not be prepared; same columns as `prepared_to_row`, empty payload."""
    empty = prepared_to_row(Prepared(record_id, windows=[], n_samples_model=0, source_fs=0.0, source_samples=0))
    return {**empty, "status": "rejected", "reason": rejection.reason}


def _split(values: np.ndarray, counts: list[int]) -> list[np.ndarray]:
    """``values`` cut along the first axis into consecutive parts of ``counts`` rows each."""
    return np.split(values, np.cumsum(counts)[:-1]) if counts else []


def row_to_prepared(row: dict[str, Any]) -> Prepared:
    """Decode a row written by `prepared_to_row` (a dict of Python values or numpy scalars/arrays)."""
    if row["status"] != "ok":
        raise ValueError(f"row {row['record_id']!r} has status {row['status']!r}; only 'ok' rows decode")
    offsets = [int(o) for o in row["window_offsets"]]
    n_windows, window_len = len(offsets), int(row["window_len"])
    signals = _from_bytes(row["signals"], (n_windows, _N_LEADS, window_len))
    beat_counts = [int(c) for c in row["beat_counts"]]
    beat_len = int(row["beat_len"])
    all_beats = _from_bytes(row["beats"], (sum(beat_counts), _N_LEADS, beat_len))
    peaks = _split(np.asarray(row["peaks"], dtype=np.int64), [int(c) for c in row["peak_counts"]])
    beat_peaks = _split(np.asarray(row["beat_peaks"], dtype=np.int64), beat_counts)
    windows = [Window(signal=signals[i], offset=offsets[i], peaks=peaks[i], beat_peaks=beat_peaks[i],
                      beats=beats) for i, beats in enumerate(_split(all_beats, beat_counts))]
    return Prepared(record_id=str(row["record_id"]), windows=windows, n_samples_model=int(row["n_samples_model"]),
                    source_fs=float(row["source_fs"]), source_samples=int(row["source_samples"]),
                    metadata=json.loads(row["metadata_json"]))


# -- the per-record step of the batch jobs -----------------------------------------------------------------------

def failure_fields(exc: BaseException) -> dict[str, str]:
    """The status and reason for a record whose processing raised: a rejection keeps its typed reason; anything
    else is an ``error`` naming the exception type, so an unexpected failure is visible and countable by type."""
    if isinstance(exc, Rejection):
        return {"status": "rejected", "reason": exc.reason}
    message = " ".join(str(exc).split())[:300]
    return {"status": "error", "reason": f"{type(exc).__name__}: {message}" if message else type(exc).__name__}


def read_file(path: str | Path, default_fs: float | None = None, limits: InputLimits = LIMITS) -> Record:
    """``read_record``, with ``default_fs`` as the rate of files that carry none (NPY, CSV without ``# fs=``).

    ``read_record(fs=...)`` rejects a file whose own rate differs, so the default cannot simply be passed for every
    file of a mixed folder (100 Hz and 500 Hz WFDB next to NPY); it fills in only where the rate is missing.
    ``path`` may be a URI (`ecgad.storage`): the file, and a WFDB header's signal files, are read from a local copy.
    """
    with local_copy(path, companion_files) as local:   # a record on object storage is read from a local copy
        try:
            return read_record(local, limits=limits)
        except Rejection as rejection:
            if default_fs is None or rejection.reason != "bad_fs:missing":
                raise
        return read_record(local, fs=default_fs, limits=limits)


def prepare_path(path: str, record_id: str, cfg: PrepConfig = PrepConfig(),
                 default_fs: float | None = None, limits: InputLimits = LIMITS) -> dict[str, Any]:
    """Read (within ``limits``), validate and prepare one file into a row plus its ``path``; never raises (module
    docstring: a rejection becomes a ``rejected`` row, anything else an ``error`` row)."""
    try:
        prepared = prepare(validate(read_file(path, default_fs, limits)), cfg)
        prepared.record_id = record_id
        row = prepared_to_row(prepared)
    except Exception as exc:  # fault isolation: one file never fails its task
        return status_row(path, record_id, failure_fields(exc))
    return {**row, "path": str(path)}


def status_row(path: str | Path, record_id: str, fields: dict[str, str]) -> dict[str, Any]:
    """The row of an input that yields no prepared record: no payload, ``fields`` (``status``, ``reason``: from
    `failure_fields`, or for a record whose preparation killed its worker, from `ecgad.ray.data`) and its path."""
    return {**rejection_to_row(record_id, Rejection("bad_file")), **fields, "path": str(path)}
