"""Readers: every supported ECG source becomes a `Record` (``(12, samples)`` float32 mV in `LEADS` order), or a
typed `Rejection`.

All entry points (training, archive scoring, the web service, the CLI) read through `read_record` or
`record_from_array`, so a file is interpreted the same way everywhere. A reader never raises anything but
`Rejection` for bad input: an archive job turns it into a status row, the service into a 422 body.

Formats (chosen by `read_record` from the path, then from the content):

- **WFDB**: a ``.hea`` header with its signal files (``.dat``, CinC-style ``.mat``, PTB ``.xyz``, ...), read with
  ``wfdb``. The path may name the header, any of its signal files, or the extension-less record. Physical units
  come from the header (``mV``, ``uV``/``µV``, ``V``; none given means mV, as the WFDB spec says), so PTB's
  ``s0010_re`` (gain 2000 adu/mV, no unit) comes out in mV like everything else. Before ``wfdb`` reads the samples,
  the signal-file sizes are checked against the header (a header announcing more samples than the file holds would
  otherwise make ``wfdb`` allocate or misread), and after, the per-channel checksums. Multi-segment records and
  FLAC-compressed formats are not supported.
- **CSV** (``.csv``): one column per lead, one row per sample. The first row is a header of lead names if any of
  its cells is not a number; without one, pass ``lead_names`` (or give exactly 12 columns/rows, taken as `LEADS`),
  and the orientation (samples x leads or leads x samples) follows from which axis matches the lead count. An
  unnamed first header cell marks a pandas index column, which is dropped. Delimiter: ``,`` ``;`` tab, or
  whitespace. Values in mV. The rate comes from ``fs=`` or a comment line ``# fs=500`` (also ``sampling_rate`` /
  ``sampling_rate_hz``, ``=`` or ``:``); ``#`` lines are otherwise ignored.
- **Hospital formats** (DICOM waveform, HL7 aECG, GE MUSE XML, Philips XML, SCP-ECG, EDF/EDF+): any other file
  whose *content* `ecgad.formats.sniff_format` recognizes (magic bytes or XML root element), whatever its name;
  decoded by the format's module in `ecgad.formats` (docs/formats.md). The rate is the file's; what the file says
  that matters for scoring (pacemaker spikes, several rhythm series) is in ``metadata["warnings"]``.
- **NPY** (``.npy``): a 2-D array in mV; ``fs`` required, lead names and orientation as for header-less CSV.
  **NPZ** (``.npz``): keys ``signal`` (required), ``fs`` and ``lead_names`` (each may instead be given as an
  argument).

Limits (`ecgad.limits`, passed as ``limits=``): each reader checks what the file declares before decoding it, an
NPY header's shape x item size (against the limits and against the bytes the file holds), an NPZ member's
uncompressed size and compression ratio, a WFDB header's ``sig_len`` x channels (or, without ``sig_len``, the
length its signal file implies), a CSV's cells as they stream in (reading stops at the limit), the counts in
DICOM, EDF, SCP-ECG and HL7 aECG files; `_assemble` checks the decoded shape and duration once more for every
reader, at the file's own rate, before anything is resampled. Over a limit: ``too_long``, ``too_many_channels``,
``too_large``. Messages name a file, never its folder.

Rates: a rate given as ``fs=`` fills in for a file that carries none; if the file carries one too, the two must
agree (``bad_fs`` otherwise), because silently preferring either would time-stretch the record.

Rejection mapping (the hospital formats add their own ``bad_file:<detail>``, e.g. ``median_beat_only`` and
``xml_entities``: docs/formats.md): unreadable, empty, unknown-format or random-byte files, missing signal
files, unsupported WFDB formats -> ``bad_file``; a signal file shorter than its header announces ->
``truncated``; a signal file sized for a different channel count, a checksum mismatch, or samples ``wfdb`` cannot
lay out as the header describes -> ``header_mismatch``; missing, non-numeric, conflicting or implausible rate ->
``bad_fs``; an array that is not 2-D or whose axes do not match the lead names -> ``bad_shape``; lead problems ->
see `ecgad.leads`.
A file cut exactly at a whole number of channels is indistinguishable from a channel-count mismatch and is
reported as ``header_mismatch``.
"""

from __future__ import annotations

import csv
import itertools
import math
import re
import stat
import struct
import tokenize
import zipfile
import zlib
from array import array
from collections.abc import Callable, Iterator, Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import wfdb

from ecgad.formats import decode, sniff_format
from ecgad.formats.common import unit_to_mv
from ecgad.leads import standardize_leads
from ecgad.limits import LIMITS, InputLimits
from ecgad.types import LEADS, Record, Rejection
from ecgad.validate import check_fs

#: Exceptions ``wfdb`` raises on malformed headers or signal files (found by fuzzing real headers; its header
#: parser raises ``HeaderSyntaxError``, a ValueError, and its readers assorted Index/Key/Type errors).
_WFDB_ERRORS = (ValueError, IndexError, KeyError, TypeError, OSError, EOFError)
#: Exceptions of NPY/NPZ parsing (``zipfile``: encrypted members raise RuntimeError, unknown compression methods
#: NotImplementedError, damaged deflate streams zlib.error; ``struct.error`` for cut headers; NumPy tokenizes an NPY
#: header before evaluating it: TokenError for an unterminated one).
_NUMPY_ERRORS = (ValueError, OSError, EOFError, zipfile.BadZipFile, RuntimeError, NotImplementedError, zlib.error,
                 struct.error, tokenize.TokenError)
#: The NPY versions NumPy writes (3.0 only differs from 2.0 by a UTF-8 header).
_NPY_VERSIONS = frozenset({(1, 0), (2, 0), (3, 0)})
_ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")          # a zip's first entry, or an empty zip's end record
#: Directories in an exception's text (``wfdb`` and ``open`` name the full path of a missing file).
_FOLDERS = re.compile(r"(?<![\w.])/(?:[^/\s'\"]+/)+")

#: Bits per stored sample of the uncompressed WFDB formats (310 and 311 pack 3 samples in 32 bits).
_WFDB_BITS: dict[str, Fraction] = {
    "8": Fraction(8), "16": Fraction(16), "24": Fraction(24), "32": Fraction(32), "61": Fraction(16),
    "80": Fraction(8), "160": Fraction(16), "212": Fraction(12), "310": Fraction(32, 3), "311": Fraction(32, 3),
}

_FS_HINT = re.compile(r"^#\s*(?:fs|sampling_rate|sampling_rate_hz)\s*[=:]\s*(\S+)\s*$", re.IGNORECASE)

#: The files `read_record` takes as one record each (a WFDB record by its header, whatever its signal files): what a
#: folder listing (`ecgad.inputs.is_record_file`) counts as ECGs. A new format adds its suffix here.
RECORD_SUFFIXES = frozenset({".hea", ".csv", ".npy", ".npz"})


def read_record(path: str | Path, *, fs: float | None = None, lead_names: Sequence[str] | None = None,
                limits: InputLimits = LIMITS) -> Record:
    """Read one ECG file (WFDB, CSV, NPY, NPZ or a hospital format; see the module docstring) into a `Record`.

    ``fs`` (Hz) is needed where the file carries no rate; ``lead_names`` replaces the file's own names (needed
    where it has none). The result's signal is ``(12, samples)`` float32 in mV, `LEADS` order; ``record_id`` is
    the file stem; ``metadata`` holds the path, source format, original lead names, derived leads and what
    else the file carried (units, header comments). ``limits`` bound the record's duration, channels and decoded
    size, checked from what the file declares before its samples are decoded (``too_long``, ``too_many_channels``,
    ``too_large``). Raises `Rejection` on any bad input, nothing else; its messages name the file, never its
    folder (a service's temporary path is nobody's business).
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if Path(f"{path}.hea").is_file():          # an extension-less record name (dots allowed in it)
        reader, file = _read_wfdb, Path(f"{path}.hea")
    elif suffix == ".hea":
        reader, file = _read_wfdb, path
    elif suffix == ".csv":
        reader, file = _read_csv, path
    elif suffix in (".npy", ".npz"):
        reader, file = _read_numpy, path
    elif path.with_suffix(".hea").is_file():   # a WFDB signal file (.dat, .mat, .xyz, ...)
        reader, file = _read_wfdb, path.with_suffix(".hea")
    elif (fmt := sniff_format(path)) is not None:      # by content: DICOM, SCP-ECG, EDF, the ECG XML formats
        reader, file = _hospital_reader(fmt), path
    elif path.is_file() and path.stat().st_size == 0:
        raise Rejection("bad_file", "empty", f"{path.name} is empty")
    else:
        raise Rejection("bad_file", "unknown_format" if path.exists() else "no_such_file",
                        f"cannot read {path.name}")
    try:
        size = file.stat().st_size
    except OSError:
        raise Rejection("bad_file", "no_such_file", f"{file.name} not found") from None
    if size == 0:
        raise Rejection("bad_file", "empty", f"{file.name} is empty")
    return reader(file, fs, lead_names, limits)


def companion_files(name: str, content: bytes) -> list[str]:
    """The files a record file ``name`` needs beside it to be read: a WFDB header's signal files (plain names from
    its signal lines; anything else is left for `read_record` to reject), nothing for other formats. For copying a
    record from object storage to a local folder (`ecgad.storage.local_copy`) before reading it."""
    if not name.lower().endswith(".hea"):
        return []
    lines = [line for line in content.decode("utf-8", errors="replace").splitlines()
             if line.strip() and not line.lstrip().startswith("#")]
    return sorted({line.split()[0] for line in lines[1:]} - {name})


def record_from_array(signal: Any, fs: float, lead_names: Sequence[str] | None = None, record_id: str = "",
                      metadata: dict[str, Any] | None = None, limits: InputLimits = LIMITS) -> Record:
    """A `Record` from an in-memory array in mV (a JSON or NPY request body, a decoded upload).

    ``signal`` is preferably ``(leads, samples)``; ``(samples, leads)`` is accepted and transposed when only that
    axis matches ``len(lead_names)``. Without ``lead_names``, an axis of length 12 is taken as `LEADS` order.
    Returns ``(12, samples)`` float32 mV in `LEADS` order. Raises ``bad_fs``, ``bad_shape``, ``bad_file``
    (non-numeric values), a lead rejection, or a ``limits`` rejection (before any float conversion).
    """
    fs = check_fs(fs)
    try:
        array = np.asarray(signal)
    except (ValueError, TypeError) as exc:   # ragged nested lists
        raise Rejection("bad_shape", "ragged", f"signal is not a rectangular array: {exc}") from None
    if array.dtype.kind not in "biuf":
        raise Rejection("bad_file", "non_numeric", f"signal values are {array.dtype}, not numbers")
    if array.ndim != 2:
        raise Rejection("bad_shape", "ndim", f"signal must be 2-D (leads, samples), got shape {array.shape}")
    names = tuple(lead_names) if lead_names is not None else LEADS
    if array.shape[0] != len(names) and array.shape[1] == len(names):
        array = array.T
    return _assemble(array, fs, names, record_id, metadata or {}, limits)


def _assemble(signal: np.ndarray, fs: float, lead_names: Sequence[str | None], record_id: str,
              metadata: dict[str, Any], limits: InputLimits) -> Record:
    """The one place a reader's ``(channels, samples)`` array in mV becomes a canonical `Record` (``fs`` checked).

    The limits are checked here once more for every reader: the readers check what a file declares before
    decoding, and this catches what only the decoded shape tells (a CSV's orientation, a hospital file's rate),
    before lead derivation and, later, resampling multiply the record.
    """
    if signal.ndim != 2 or signal.shape[0] != len(lead_names):
        raise Rejection("bad_shape", "leads",
                        f"signal shape {tuple(signal.shape)} does not match {len(lead_names)} lead names")
    limits.check_declared(signal.shape[0], signal.shape[1], fs)
    standard, derived = standardize_leads(signal, lead_names)
    meta = {**metadata, "source_lead_names": list(lead_names), "derived_leads": list(derived)}
    return Record(signal=standard, fs=float(fs), lead_names=LEADS, record_id=record_id, metadata=meta)


def _resolve_fs(file_fs: object, fs: object) -> float:
    """The record's rate: the file's, else the caller's; both present must agree."""
    if file_fs is None:
        return check_fs(fs)
    file_fs = check_fs(file_fs)
    if fs is not None and not math.isclose(check_fs(fs), file_fs):
        raise Rejection("bad_fs", "conflict", f"the file says {file_fs:g} Hz, the caller {fs:g} Hz")
    return file_fs


# --- WFDB -------------------------------------------------------------------------------------------------------

def _read_wfdb(header_path: Path, fs: float | None, lead_names: Sequence[str] | None,
               limits: InputLimits) -> Record:
    base = header_path.with_suffix("")
    limits.check_bytes(header_path.stat().st_size, "header")     # wfdb reads the header whole
    try:
        header = wfdb.rdheader(str(base))
    except _WFDB_ERRORS as exc:
        raise Rejection("bad_file", "header",
                        f"unreadable WFDB header {header_path.name}: {_without_folders(exc)}") from None
    if isinstance(header, wfdb.MultiRecord):
        raise Rejection("bad_file", "multi_segment", "multi-segment WFDB records are not supported")
    rate = _resolve_fs(_header_fs(header_path), fs)
    if not header.n_sig:
        raise Rejection("bad_file", "no_signals", "the header declares no signals")
    # wfdb parses the signal lines present, whatever the record line says (and none at all leaves ``file_name`` None)
    if header.n_sig != len(header.file_name or ()):
        raise Rejection("header_mismatch", "channels", f"the record line declares {header.n_sig} signals, the "
                                                       f"signal lines {len(header.file_name or ())}")
    limits.check_channels(header.n_sig)
    values_per_sample = sum(spf or 1 for spf in header.samps_per_frame or [])
    if header.sig_len:                        # what the header declares is refused before the files are looked at
        _check_wfdb_size(header.sig_len, values_per_sample, rate, limits)
        _check_signal_files(base.parent, header)
    else:                                     # without a length, what wfdb will infer from the signal file
        _check_wfdb_size(_check_signal_files(base.parent, header), values_per_sample, rate, limits)
    try:
        rec = wfdb.rdrecord(str(base), physical=False, return_res=64)
        physical = rec.dac(return_res=64)
    except _WFDB_ERRORS as exc:
        raise Rejection("header_mismatch", "layout", "wfdb cannot read the samples as the header describes: "
                                                     f"{_without_folders(exc)}") from None
    _check_checksums(rec)
    scale = np.array([unit_to_mv(unit or "mV") for unit in rec.units])   # WFDB: no unit means mV
    metadata = {"path": str(header_path), "format": "wfdb", "units": list(rec.units), "comments": list(rec.comments)}
    names = lead_names if lead_names is not None else rec.sig_name
    return _assemble((physical * scale).T, rate, names, base.name, metadata, limits)


def _header_fs(header_path: Path) -> float | None:
    """The rate written on the header's record line (``name nsig fs[/counter...] ...``), or None if absent.

    Parsed here because ``wfdb`` silently substitutes 250 Hz for a missing or unparseable rate, which would
    time-stretch the record instead of rejecting it. Called after ``wfdb`` has parsed the header.
    """
    lines = header_path.read_text(encoding="utf-8", errors="replace").splitlines()
    tokens = next(line for line in lines if line.strip() and not line.lstrip().startswith("#")).split()
    if len(tokens) < 3:
        return None
    rate = tokens[2].split("/")[0]
    try:
        return float(rate)
    except ValueError:
        raise Rejection("bad_fs", "non_numeric", f"header rate {rate!r} is not a number") from None


def _check_wfdb_size(sig_len: int, values_per_sample: int, rate: float, limits: InputLimits) -> None:
    """The limits for ``sig_len`` samples of ``values_per_sample`` values each (the channels' samples per frame)."""
    limits.check_bytes(sig_len * values_per_sample * 8)
    limits.check_duration(sig_len, rate)


def _check_signal_files(directory: Path, header: wfdb.Record) -> int:
    """Compare each signal file's size with what the header announces, before any sample is read.

    Returns the record's length in samples: the header's ``sig_len``, or without one what ``wfdb`` will infer from
    the first signal file's size.
    """
    files: dict[str, tuple[str, int, int]] = {}    # file -> (format, samples per frame, byte offset)
    for name, fmt, spf, offset in zip(header.file_name, header.fmt, header.samps_per_frame, header.byte_offset):
        if fmt not in _WFDB_BITS:
            raise Rejection("bad_file", "format", f"unsupported WFDB signal format {fmt!r}")
        known_fmt, frame, known_offset = files.get(name, (fmt, 0, offset or 0))
        if known_fmt != fmt:
            raise Rejection("header_mismatch", "format", f"{name} is declared with formats {known_fmt} and {fmt}")
        files[name] = (fmt, frame + (spf or 1), known_offset)
    sizes = {name: _signal_file_size(directory, name) for name in files}
    if not header.sig_len:                     # no length announced: wfdb infers it from the first file's size
        name, (fmt, frame, offset) = next(iter(files.items()))
        return int(max(sizes[name] - offset, 0) * 8 / (_WFDB_BITS[fmt] * frame))
    for name, (fmt, frame, offset) in files.items():
        size = sizes[name]
        data_bits = max(size - offset, 0) * 8
        channel_bits = header.sig_len * _WFDB_BITS[fmt]          # one channel's samples, in bits
        channels_held = data_bits / channel_bits
        if data_bits and channels_held.denominator == 1 and channels_held != frame:
            raise Rejection("header_mismatch", "channels", f"{name} holds {channels_held} channels of "
                                                           f"{header.sig_len} samples; the header declares {frame}")
        needed = offset + math.floor(channel_bits * frame / 8)
        if size < needed:
            raise Rejection("truncated", "", f"{name} has {size} bytes, the header announces {needed}")
    return header.sig_len


def _signal_file_size(directory: Path, name: str) -> int:
    """The size of a header's signal file, which must be a plain file name next to the header: a name with a
    folder in it (``../x``, ``/dev/zero``) would let a header read any file of the machine, a device or a FIFO."""
    if not name or Path(name).name != name or "\\" in name or name in (".", ".."):
        raise Rejection("bad_file", "signal_file_name", f"signal file name {Path(name).name!r} is not a plain name")
    try:
        status = (directory / name).stat()
    except OSError:
        raise Rejection("bad_file", "missing_signal_file", f"signal file {name} not found") from None
    if not stat.S_ISREG(status.st_mode):
        raise Rejection("bad_file", "missing_signal_file", f"signal file {name} is not a regular file")
    return status.st_size


def _check_checksums(rec: wfdb.Record) -> None:
    """Header checksums are 16-bit sums of each channel's stored samples; they catch a wrong format or layout."""
    if any((spf or 1) != 1 for spf in rec.samps_per_frame):   # wfdb averages multi-sample frames: no raw sums
        return
    sums = rec.d_signal.sum(axis=0)
    for name, expected, actual in zip(rec.sig_name, rec.checksum, sums):
        if expected is not None and (int(actual) - int(expected)) % 65536:
            raise Rejection("header_mismatch", "checksum", f"checksum of channel {name} disagrees with the header")


# --- hospital formats --------------------------------------------------------------------------------------------

def _hospital_reader(fmt: str) -> Callable[[Path, float | None, Sequence[str] | None], Record]:
    """A reader for one of `ecgad.formats` (``fmt`` from `sniff_format`), with the other readers' signature."""
    def read(path: Path, fs: float | None, lead_names: Sequence[str] | None, limits: InputLimits) -> Record:
        limits.check_bytes(path.stat().st_size, "file")   # the readers parse the file whole
        decoded = decode(path, fmt, limits)
        rate = _resolve_fs(decoded.fs, fs)
        metadata = {"path": str(path), **decoded.metadata, "warnings": list(decoded.warnings)}
        names = lead_names if lead_names is not None else decoded.lead_names
        return _assemble(np.asarray(decoded.signal, dtype=np.float64), rate, names, path.stem, metadata, limits)
    return read


# --- CSV --------------------------------------------------------------------------------------------------------

def _read_csv(path: Path, fs: float | None, lead_names: Sequence[str] | None, limits: InputLimits) -> Record:
    try:
        with open(path, encoding="utf-8-sig") as file:
            file_fs, header, table = _parse_csv(_bounded_lines(file, limits, path.name), path.name, limits)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise Rejection("bad_file", "unreadable",
                        f"cannot read {path.name} as text: {_without_folders(exc)}") from None
    rate = _resolve_fs(file_fs, fs)
    metadata = {"path": str(path), "format": "csv"}
    if header is None:
        return record_from_array(table, rate, lead_names, path.stem, metadata, limits)
    if header and header[0] == "" and table.shape[1] == len(header):     # pandas index column
        header, table = header[1:], table[:, 1:]
    if len(header) != table.shape[1]:
        raise Rejection("bad_shape", "header", f"{len(header)} column names for {table.shape[1]} columns")
    return _assemble(table.T, rate, lead_names if lead_names is not None else header, path.stem, metadata, limits)


def _parse_csv(lines: Iterator[str], name: str, limits: InputLimits
               ) -> tuple[float | None, list[str] | None, np.ndarray]:
    """The rate hint, the header row (None if the first row is all numbers) and the ``(rows, columns)`` table.

    Streamed: cells become 8-byte floats row by row, and reading stops at the first row past the decoded-size
    limit, so a file of millions of rows costs no more than the limit (a list of Python strings would cost ~60
    bytes a cell).
    """
    hints: list[str] = []

    def data_lines() -> Iterator[str]:
        for line in lines:
            if match := _FS_HINT.match(line):
                hints.append(match.group(1))
            elif line.strip() and not line.lstrip().startswith("#"):
                yield line

    rows = _csv_rows(data_lines())
    first = next(rows, None)
    if first is None:
        raise Rejection("bad_file", "empty", f"{name} holds no data")
    header = None if all(_is_number(cell) for cell in first) else [cell.strip() for cell in first]
    values, width, n_rows = array("d"), None, 0
    for row in rows if header is not None else itertools.chain([first], rows):
        if width is not None and len(row) != width:
            raise Rejection("bad_shape", "ragged", f"{name} has rows of different lengths")
        width, n_rows = len(row), n_rows + 1
        try:
            values.extend(map(float, row))
        except ValueError:
            raise Rejection("bad_file", "non_numeric", f"{name} has non-numeric cells") from None
        limits.check_bytes(len(values) * values.itemsize)
    if not n_rows:
        raise Rejection("bad_file", "empty", f"{name} holds no samples")
    file_fs = None
    if hints:
        try:
            file_fs = float(hints[0])
        except ValueError:
            raise Rejection("bad_fs", "non_numeric", f"rate hint {hints[0]!r} is not a number") from None
    return file_fs, header, np.frombuffer(values, dtype=np.float64).reshape(n_rows, width)


def _bounded_lines(file, limits: InputLimits, name: str) -> Iterator[str]:
    """The lines of a text file, refusing (``too_large``) one longer than ``limits.max_decoded_bytes / 8``
    characters: a line is split into Python strings at once, so its length bounds what one line can cost."""
    max_chars = limits.max_decoded_bytes // 8
    while line := file.readline(max_chars + 1):
        if len(line) > max_chars:
            raise Rejection("too_large", "line", f"{name} has a line over {max_chars} characters")
        yield line


def _csv_rows(lines: Iterator[str]) -> Iterator[list[str]]:
    """Cells of each data line; the delimiter is the first of ``,`` ``;`` tab found in the first line."""
    first = next(lines, None)
    if first is None:
        return iter(())
    lines = itertools.chain([first], lines)
    delimiter = next((d for d in ",;\t" if d in first), None)
    if delimiter is None:
        return (line.split() for line in lines)
    return csv.reader(lines, delimiter=delimiter)


def _is_number(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return False
    return True


# --- NPY / NPZ --------------------------------------------------------------------------------------------------

def _read_numpy(path: Path, fs: float | None, lead_names: Sequence[str] | None, limits: InputLimits) -> Record:
    """NPY or NPZ, told apart by content as `numpy.load` does; arrays are read by `read_npy_array`, which checks
    the declared size first (``np.load`` would allocate whatever a header declares: a MemoryError, not an answer)."""
    file_fs = file_names = None
    try:
        with open(path, "rb") as file:
            if file.read(4) in _ZIP_MAGICS:
                file.seek(0)
                signal, stored_fs, stored_names = _read_npz(file, path.name, limits)
                if stored_fs is not None:
                    file_fs = stored_fs.item() if stored_fs.size == 1 else stored_fs
                if stored_names is not None:
                    file_names = [str(name) for name in stored_names.ravel()]
            else:
                file.seek(0)
                signal = read_npy_array(file, path.stat().st_size, path.name, "signal", limits)
    except _NUMPY_ERRORS as exc:
        raise Rejection("bad_file", "unreadable",
                        f"cannot read {path.name} as NumPy data: {_without_folders(exc)}") from None
    rate = _resolve_fs(file_fs, fs)
    names = lead_names if lead_names is not None else file_names
    return record_from_array(signal, rate, names, path.stem, {"path": str(path), "format": path.suffix.lower()[1:]},
                             limits)


def _read_npz(file, name: str, limits: InputLimits) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """The ``signal``, ``fs`` and ``lead_names`` arrays of an NPZ (the last two None if absent).

    Each member's uncompressed size (from the zip directory, which `zipfile` also holds the inflated stream to)
    and compression ratio are checked before it is inflated, so an NPZ bomb is a ``too_large`` rejection.
    """
    with zipfile.ZipFile(file) as archive:
        members = {info.filename.removesuffix(".npy"): info for info in archive.infolist()}
        if "signal" not in members:
            raise Rejection("bad_file", "no_signal", f"{name} has no 'signal' array")
        arrays = {}
        for key in ("signal", "fs", "lead_names"):
            if (info := members.get(key)) is not None:
                limits.check_bytes(info.file_size, key)
                limits.check_compression(info.file_size, info.compress_size, key)
                with archive.open(info) as member:
                    arrays[key] = read_npy_array(member, info.file_size, f"{name}:{key}", key, limits)
    return arrays["signal"], arrays.get("fs"), arrays.get("lead_names")


def read_npy_array(stream, available: int, what: str, key: str, limits: InputLimits) -> np.ndarray:
    """One NPY array (``what``, the ``key`` array of the file) from ``stream`` holding ``available`` bytes: its
    header's shape x item size checked against
    the limits (as float64, what the readers widen to) and against ``available`` (a header declaring more than
    the file holds is ``truncated``) before the data is read. Pickled (object) arrays are refused."""
    version = np.lib.format.read_magic(stream)
    if version not in _NPY_VERSIONS:
        raise Rejection("bad_file", "unreadable", f"{what}: NPY format version {version} is not supported")
    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran_order, dtype = read_header(stream)
    if dtype.hasobject:
        raise Rejection("bad_file", "unreadable", f"{what} holds Python objects; pickles are refused")
    count = math.prod(shape)
    limits.check_bytes(count * max(dtype.itemsize, 8), key)
    n_bytes = count * dtype.itemsize
    data = stream.read(n_bytes) if n_bytes <= available else b""
    if len(data) < n_bytes:
        raise Rejection("truncated", "", f"{what}: the NPY header declares {shape} of {dtype} ({n_bytes} bytes), "
                                         f"the file holds {available} bytes")
    return np.frombuffer(data, dtype=dtype, count=count).reshape(shape, order="F" if fortran_order else "C")


def _without_folders(error: BaseException) -> str:
    """An exception's text with the folders of any path it names removed, keeping the file name."""
    return _FOLDERS.sub("", str(error))
