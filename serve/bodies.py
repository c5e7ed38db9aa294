"""Request bodies -> `Record`, and `Scores` -> response bodies: the service's pure, Ray-free half.

Everything here runs in the ingress replicas, never in the model replica, so that turning bytes into arrays (and
reading uploaded files) scales with the ingress replicas and never holds up a batch on the model. The functions are
plain Python over bytes and numpy, unit-testable without a cluster.

Three body formats reach the same `ecgad.io` readers the CLI and the batch jobs use, so a record scored online is
read exactly as it is read offline:

- ``application/json``: `serve.schemas.ScoreRequest`, parsed with ``json.loads`` (not pydantic; see schemas);
- ``application/x-npy``: one ``.npy`` array ``(leads, samples)`` (float32 recommended); ``fs`` and ``lead_names``
  as query parameters or ``X-ECG-FS`` / ``X-ECG-Leads`` headers. No text to parse: the cheapest format;
- ``multipart/form-data``: the files of one record, a WFDB ``.hea`` with its signal files (``.dat``, ``.mat``), or
  one ``.csv`` / ``.npy`` file, written to a private temporary folder and read with `ecgad.io.read_record`.

Every body is hostile until shown otherwise: sizes are checked against `ecgad.limits.LIMITS` (the limits the CLI and
the batch jobs use, checked by the same `ecgad.io` code) from what the body declares, before anything is allocated
(an NPY header's shape, an upload's headers; a JSON signal's shape once parsed, within the body-size limit); every
parser error, deep JSON's `RecursionError` included, becomes a typed `Rejection`; upload names
that no file system takes (NUL, control characters, over 255 bytes) are refused before they reach one. What goes
back is bounded too: a long record's map is downsampled (`map_step`) and its plot cut (`PLOT_MAX_SECONDS`).
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import re
import tempfile
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from pydantic import ValidationError

from ecgad.formats import SNIFF_BYTES, sniff_bytes, SUFFIXES as FORMAT_SUFFIXES
from ecgad.io import RECORD_SUFFIXES, read_npy_array, read_record, record_from_array
from ecgad.limits import LIMITS
from ecgad.log import get_logger
from ecgad.plot import plot_ecg, verdict_title
from ecgad.types import Record, Rejection, Scores
from ecgad.validate import validate
from serve.schemas import ScoreRequest

logger = get_logger(__name__)
T = TypeVar("T")

JSON_TYPE = "application/json"
NPY_TYPE = "application/x-npy"
MULTIPART_TYPE = "multipart/form-data"
#: Content types a single hospital-format file may come as (DICOM, HL7 aECG / MUSE / Philips XML, SCP-ECG, EDF):
#: the type only says "a file"; which format it is comes from the content (`ecgad.formats.sniff_bytes`).
FILE_TYPES = frozenset({"application/octet-stream", "application/dicom", "application/xml", "text/xml",
                        "application/hl7-v3+xml", "application/edf", "application/scp-ecg"})

#: Upload suffixes written to disk for `read_record`; anything else in a multipart body is refused, so a client
#: cannot make the service write arbitrary files.
_FORMAT_SUFFIXES = frozenset(FORMAT_SUFFIXES.values())
UPLOAD_SUFFIXES = RECORD_SUFFIXES | {".dat", ".mat", ".xyz"} | _FORMAT_SUFFIXES
#: Files that are a record on their own (WFDB signal files need their ``.hea``).
_RECORD_SUFFIXES = tuple(RECORD_SUFFIXES | _FORMAT_SUFFIXES)
#: Files per multipart body (a WFDB record has a header and one or a few signal files).
MAX_UPLOAD_FILES = 16

#: The longest upload name most file systems accept, in bytes.
MAX_NAME_BYTES = 255

_MAP_SPEC = re.compile(r"^(auto|none|full|downsample=([1-9][0-9]{0,5}))$")
MAP_SPEC_PATTERN = _MAP_SPEC.pattern
#: ``map=auto`` (the default) answers the full-resolution map up to this many columns (a 60 s record at 1 kHz) and
#: downsamples longer records to fit; ``map=full`` asks for full resolution whatever the length.
AUTO_MAP_COLUMNS = 60_000
#: No answer carries a map wider than this, ``map=full`` included (12 x 150,000 floats are ~20 MB of JSON: a
#: 300 s record at 500 Hz); a wider one is downsampled to fit and the answer's ``warnings`` say so.
MAX_MAP_COLUMNS = 150_000
#: ``map=auto``, as `parse_map_spec` returns it.
AUTO_MAP = 0
#: ``/v1/score/plot`` draws at most this many seconds: at the paper's 25 mm/s the width grows with the duration.
PLOT_MAX_SECONDS = 60.0


class BodyTooLarge(Exception):
    """The request body exceeds the configured limit (HTTP 413)."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"request body larger than the limit of {limit} bytes")


class UnsupportedMediaType(Exception):
    """The body is none of the accepted formats (HTTP 415)."""


async def read_limited(content_length: str | None, chunks: AsyncIterator[bytes], limit: int) -> bytes:
    """The whole body, refusing it as soon as it is known to exceed ``limit`` bytes.

    ``Content-Length`` is checked first, so an honest oversize request is refused before a byte is read; the running
    count catches chunked bodies and clients whose header lies.
    """
    with contextlib.suppress(ValueError):          # a malformed header announces nothing; the count still holds
        if content_length is not None and int(content_length) > limit:
            raise BodyTooLarge(limit)
    parts: list[bytes] = []
    size = 0
    async for chunk in chunks:
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(limit)
        parts.append(chunk)
    return b"".join(parts)


def media_type(content_type: str | None) -> str:
    """``multipart/form-data; boundary=...`` -> ``multipart/form-data``; missing -> JSON (curl's ``-d`` default
    is form-urlencoded, which no ECG is, so only an absent header falls back)."""
    return (content_type or JSON_TYPE).split(";", 1)[0].strip().lower()


def _json_rejection(err: ValidationError) -> Rejection:
    """A schema error on the envelope, in the rejection vocabulary (the field decides the code)."""
    first = err.errors()[0]
    field = str(first["loc"][0]) if first["loc"] else ""
    code = {"fs": "bad_fs", "lead_names": "unknown_lead", "signal": "bad_shape"}.get(field, "bad_file")
    where = ".".join(str(part) for part in first["loc"])
    return Rejection(code, where or "body", f"{where or 'body'}: {first['msg']}")


def record_from_json(body: bytes) -> Record:
    """A `ScoreRequest` body -> validated `Record`; the signal goes to numpy, the rest through the schema.

    `ecgad.io.record_from_array` checks the signal's shape against `LIMITS` (what ``json`` and numpy decode before
    that is bounded by the body-size limit); JSON nested
    deeper than the parser's recursion limit is a ``bad_file`` rejection like any other malformed body."""
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError) as err:
        raise Rejection("bad_file", "json", f"the body is not valid JSON: {err}") from None
    if not isinstance(payload, dict):
        raise Rejection("bad_file", "json", "the body must be a JSON object with signal, fs and lead_names")
    if not isinstance(signal := payload.get("signal"), list):
        raise Rejection("bad_shape", "signal", "signal must be a list of lists (leads x samples)")
    try:
        envelope = ScoreRequest.model_validate({**payload, "signal": []})
    except ValidationError as err:
        raise _json_rejection(err) from None
    return validate(record_from_array(signal, envelope.fs, envelope.lead_names, record_id=envelope.record_id))


def parse_fs(value: str | None) -> float | None:
    """A rate from a query parameter or header; text that is not a number is a ``bad_fs`` rejection, not a 500."""
    if value is None or value == "":
        return None
    try:
        return float(value)
    except ValueError:
        raise Rejection("bad_fs", f"not a number: {value!r}") from None


def parse_lead_names(value: str | None) -> tuple[str, ...] | None:
    """``I,II,III,...`` (commas, optional spaces) from a query parameter or header."""
    if value is None or not value.strip():
        return None
    return tuple(name.strip() for name in value.split(","))


def record_from_npy(body: bytes, fs: float | None, lead_names: Sequence[str] | None, record_id: str = "") -> Record:
    """An ``.npy`` body (never pickles) -> validated `Record`, read as the NPY reader reads a file: the header's
    shape is checked against `LIMITS` and the body's length before anything is allocated (a 1 KiB body may declare
    a (12, 10^12) array)."""
    try:
        array = read_npy_array(io.BytesIO(body), len(body), "body", "signal", LIMITS)
    except Rejection as rejection:
        if rejection.code != "bad_file":
            raise
        raise Rejection("bad_file", "npy", f"the body is not an .npy array: {rejection.message}") from None
    except (ValueError, OSError, EOFError) as err:
        raise Rejection("bad_file", "npy", f"the body is not an .npy array: {err}") from None
    if fs is None:
        raise Rejection("bad_fs", "missing", "give fs as a query parameter or an X-ECG-FS header")
    return validate(record_from_array(array, fs, lead_names, record_id=record_id))


def _pick_record_file(names: Sequence[str]) -> str:
    """The one file that names the record: the ``.hea`` of a WFDB upload, else a single CSV/NPY/NPZ."""
    headers = [n for n in names if n.lower().endswith(".hea")]
    candidates = headers or [n for n in names if n.lower().endswith(_RECORD_SUFFIXES)]
    if len(candidates) != 1:
        found = ", ".join(names) or "no files"
        raise Rejection("bad_file", "upload", "upload the files of exactly one record (a .hea with its .dat/.mat, "
                                              f"or one .csv/.npy), got: {found}")
    return candidates[0]


def upload_name(filename: str, content: bytes = b"") -> str:
    """An upload's file name without any directory part, or a ``bad_file:upload`` rejection if no file system would
    take it safely (NUL or other control characters, over `MAX_NAME_BYTES` bytes, a hidden or unknown suffix).

    A file whose ``content`` is a hospital ECG format is named with that format's suffix whatever it was called
    (devices and archives export ``.ecg``, ``.bin`` or no suffix at all): the format comes from the content."""
    name = Path(filename.replace("\\", "/")).name
    fmt = sniff_bytes(content[:SNIFF_BYTES]) if content else None
    if fmt is not None and Path(name).suffix.lower() != FORMAT_SUFFIXES[fmt] and not name.startswith("."):
        name = f"{Path(name).stem or 'upload'}{FORMAT_SUFFIXES[fmt]}"
    # Lone surrogates (a mis-decoded header) pass the length count and are refused as unprintable.
    if len(name.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES or not name.isprintable():
        raise Rejection("bad_file", "upload", f"upload names must be printable and at most {MAX_NAME_BYTES} bytes, "
                                              f"got {ascii(filename[:80])}")
    if not name or name.startswith(".") or Path(name).suffix.lower() not in UPLOAD_SUFFIXES:
        raise Rejection("bad_file", "upload", f"unsupported upload {filename!r}; accepted: "
                                              + " ".join(sorted(UPLOAD_SUFFIXES)))
    return name


def record_from_files(files: Sequence[tuple[str, bytes]], fs: float | None,
                      lead_names: Sequence[str] | None) -> Record:
    """Uploaded ``(filename, content)`` pairs of one record -> validated `Record`.

    The files keep their names (a WFDB header names its signal files) but lose any directory part (`upload_name`),
    and are written to a fresh temporary folder that is removed afterwards; `read_record` checks what they declare
    against `LIMITS` before decoding them.
    """
    named = {upload_name(filename, content): content for filename, content in files}
    main = _pick_record_file(list(named))
    with tempfile.TemporaryDirectory(prefix="ecgad-upload-") as tmp:
        for name, content in named.items():
            (Path(tmp) / name).write_bytes(content)
        record = read_record(Path(tmp) / main, fs=fs, lead_names=lead_names)
    record.metadata.pop("path", None)           # a temporary path means nothing to the client
    return validate(record)


def record_from_file_body(body: bytes, fs: float | None, lead_names: Sequence[str] | None,
                          record_id: str = "") -> Record:
    """A raw body holding one hospital-format file -> validated `Record`, read as an upload of that file; a body
    whose content is none of those formats is ``bad_file:unknown_format``."""
    fmt = sniff_bytes(body[:SNIFF_BYTES])
    if fmt is None:
        raise Rejection("bad_file", "unknown_format", "the body is not a DICOM, HL7 aECG, GE MUSE, Philips, "
                                                      "SCP-ECG or EDF file")
    return record_from_files([(f"{record_id or 'upload'}{FORMAT_SUFFIXES[fmt]}", body)], fs, lead_names)


def parse_map_spec(spec: str) -> int | None:
    """``none`` -> None (no map), ``auto`` -> `AUTO_MAP`, ``full`` -> 1, ``downsample=N`` -> N (input samples per
    map column)."""
    match = _MAP_SPEC.match(spec)
    if match is None:
        raise ValueError(f"map must be auto, none, full or downsample=N, got {spec!r}")
    return int(match.group(2)) if match.group(2) else {"none": None, "auto": AUTO_MAP, "full": 1}[match.group(1)]


def bounded_map_step(step: int, n_columns: int) -> int:
    """The step a map of ``n_columns`` is answered with: ``map=auto`` keeps full resolution up to `AUTO_MAP_COLUMNS`
    and downsamples beyond; any step is raised where needed so that no answer is wider than `MAX_MAP_COLUMNS`."""
    if step == AUTO_MAP:
        step = max(1, math.ceil(n_columns / AUTO_MAP_COLUMNS))
    return max(step, math.ceil(n_columns / MAX_MAP_COLUMNS))


def shape_map(anomaly_map: np.ndarray, step: int) -> np.ndarray:
    """Downsample ``(leads, samples)`` by ``step`` with a block *maximum*: averaging would dilute a short anomaly
    (one beat's ST segment) into its neighbourhood, and the maximum is what a viewer needs to draw it."""
    if step == 1:
        return anomaly_map
    leads, samples = anomaly_map.shape
    padded = np.pad(anomaly_map, ((0, 0), (0, (-samples) % step)), mode="edge")
    return padded.reshape(leads, -1, step).max(axis=2)


def score_body(scores: Scores, model_version: str, step: int | None) -> dict[str, Any]:
    """The `serve.schemas.ScoreResponse` of one record, as a dict ready for ``json.dumps``; ``step`` as
    `parse_map_spec` gives it, bounded here (`bounded_map_step`)."""
    anomaly_map = None
    warnings = list(scores.warnings)
    if step is not None and scores.anomaly_map is not None:
        full_map = np.asarray(scores.anomaly_map, dtype=np.float32)
        asked, step = step, bounded_map_step(step, full_map.shape[1])
        if asked not in (AUTO_MAP, step):
            warnings.append(f"map downsampled to every {step} samples: {full_map.shape[1]} columns exceed the "
                            f"limit of {MAX_MAP_COLUMNS}")
        anomaly_map = shape_map(full_map, step).tolist()
    return {"record_id": scores.record_id, "pred_score": float(scores.pred_score),
            "pred_label": bool(scores.pred_label),
            "threshold": float(scores.threshold) if math.isfinite(scores.threshold) else None,
            "anomaly_map": anomaly_map, "map_step": step if anomaly_map is not None else None,
            "r_peaks": [int(r) for r in scores.r_peaks], "beats_used": int(scores.beats_used),
            "windows_scored": int(scores.windows_scored), "warnings": warnings, "model_version": model_version}


def plot_png(record: Record, scores: Scores, dpi: int = 100) -> bytes:
    """The clinical 12-lead plot of ``record`` with its anomaly map and verdict, as PNG bytes (at most the first
    `PLOT_MAX_SECONDS`, so its size is bounded whatever the duration)."""
    figure = plot_ecg(record.signal, record.fs, anomaly_map=scores.anomaly_map,
                      title=verdict_title(record.record_id or "ECG", scores), lead_names=record.lead_names,
                      max_seconds=PLOT_MAX_SECONDS)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


def error_body(reason: str, code: str, message: str) -> dict[str, Any]:
    """A 422 body (`serve.schemas.RejectionBody`)."""
    return {"detail": {"reason": reason, "code": code, "message": message}}


def rejection_body(rejection: Rejection) -> dict[str, Any]:
    """The 422 body of a `Rejection`."""
    return error_body(rejection.reason, rejection.code, rejection.message)


def typed_errors(fn: Callable[[], T]) -> T:
    """``fn()`` (reading a body, preparing its record), with any exception that is not already a `Rejection` turned
    into one: input nobody foresaw must get a typed 422, not a 500. A `MemoryError` is ``too_large``; anything else
    is ``bad_file:unreadable`` for the client (its type only) and a logged traceback here (a reader to fix)."""
    try:
        return fn()
    except Rejection:
        raise
    except MemoryError:
        raise Rejection("too_large", "memory", "the record needs more memory than the service gives one request") \
            from None
    except Exception as err:
        logger.exception("reading a request body raised %s", type(err).__name__)
        raise Rejection("bad_file", "unreadable", f"the body could not be read ({type(err).__name__})") from None
