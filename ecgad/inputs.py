"""The one input lister: which records a PTB-XL root, a folder tree or a manifest holds, for every batch job.

Three kinds of input (`input_kind`):

- a **PTB-XL root** (real, or synthetic from `ecgad.synth_dataset`), listed through its index
  (`ecgad.ptbxl.load_ptbxl_index`): one file per ECG (the 500 Hz one where both rates are on disk, so the two rates
  of one ECG are never both listed), record id PTB-XL's ``records500/00000/00001_hr`` path, and the index columns
  (fold, label, mask), so it can be trained and evaluated on;
- a **folder tree** of ECG files: every record file under it (`is_record_file`, the one rule of what is an ECG),
  record id its path relative to the root without extension; no folds or labels, so it can be prepared and scored,
  not trained on;
- a **manifest**: a CSV or Parquet table with a ``path`` column (relative to the manifest's folder, or absolute) and
  optionally ``record_id`` (default: the path as listed, without extension), streamed, never loaded whole.

Jobs that hold the list on the driver (preprocessing, evaluation) take a root as one table (`list_inputs`). Archive
scoring lists inputs of any size: `listing_sources` names the sources on the driver (only folder names are walked),
and `source_chunks` lists one source's records, in a task, as chunks.

A chunk is ``chunk_size`` consecutive records of one source, the unit that flows through the scoring pipeline
(`ecgad.ray.scoring`). Its id is a hash of its source, position and member paths, so archive scoring only ever
skips a chunk when exactly the same paths were committed. Chunks never span sources, so a chunk's members depend on
nothing but its own source.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq

from ecgad.formats import is_hospital_ecg_file
from ecgad.io import RECORD_SUFFIXES
from ecgad.ptbxl import MASK_DIR, load_ptbxl_index
from ecgad.shards import INDEX_FIELDS

#: Manifest files (a table with a ``path`` column, optionally ``record_id``).
MANIFEST_SUFFIXES = (".csv", ".parquet", ".pq")

#: Metadata tables at the top of a PTB-XL root and label tables next to record sets: never ECGs themselves.
_METADATA_TABLES = frozenset({"ptbxl_database.csv", "scp_statements.csv", "labels.csv"})

#: The columns of `list_inputs`: where a record is, its id, and the index columns (nulls outside a PTB-XL root).
INPUT_SCHEMA = pa.schema([pa.field("path", pa.string()), pa.field("record_id", pa.string()),
                          *(pa.field(*f) for f in INDEX_FIELDS[1:])])


class InputError(ValueError):
    """The input cannot be listed as asked (no such path, a file that is not a manifest, a manifest without a
    ``path`` column, folds asked of a root that has none)."""


def is_ptbxl_root(root: str | Path) -> bool:
    return (Path(root) / "ptbxl_database.csv").is_file()


def input_kind(path: Path) -> str:
    """``manifest`` (a CSV/Parquet table with a ``path`` column), ``ptbxl`` (a PTB-XL root) or ``directory``."""
    if path.is_file():
        if path.suffix.lower() not in MANIFEST_SUFFIXES:
            raise InputError(f"{path}: an input file must be a manifest ({', '.join(MANIFEST_SUFFIXES)}) "
                             "with a 'path' column")
        return "manifest"
    if not path.is_dir():
        raise InputError(f"{path}: no such file or directory")
    return "ptbxl" if is_ptbxl_root(path) else "directory"


# -- what is a record ----------------------------------------------------------------------------------------------

def is_record_file(path: Path, root: Path) -> bool:
    """Whether the file ``path`` under ``root`` is an ECG record: a format `ecgad.io.read_record` reads (a WFDB
    record counts once, by its ``.hea`` header; a hospital format as `ecgad.formats.is_hospital_ecg_file` says), but
    none of the known metadata tables (``ptbxl_database.csv``, ``scp_statements.csv``, ``labels.csv``) and nothing
    in a ``masks/`` folder (where `ecgad.synth_dataset` keeps the ground-truth point masks: ``.npy`` arrays, not
    ECGs), so a PTB-XL root, a synthetic root or the sample data can be listed as a plain folder too."""
    return ((path.suffix.lower() in RECORD_SUFFIXES or is_hospital_ecg_file(path))
            and path.name.lower() not in _METADATA_TABLES and MASK_DIR not in path.relative_to(root).parts[:-1])


def list_record_files(root: str | Path) -> list[Path]:
    """Every ECG file under ``root`` (any depth, `is_record_file`), sorted."""
    root = Path(root)
    return sorted(path for path in root.rglob("*") if is_record_file(path, root) and path.is_file())


def record_id_of(path: Path, root: Path) -> str:
    """A record's id in a folder tree: its path relative to the root, without the extension (unique within a tree as
    long as one record is not stored twice under the same stem)."""
    return path.relative_to(root).with_suffix("").as_posix()


# -- a root as one table -------------------------------------------------------------------------------------------

def list_inputs(root: str | Path, folds: list[int] | None = None) -> pa.Table:
    """The records under ``root`` as an `INPUT_SCHEMA` table, in a stable order (index order, or sorted paths).

    ``folds`` keeps only those ``strat_fold`` values (an `InputError` for a root without folds).
    """
    root = Path(root).resolve()
    if is_ptbxl_root(root):
        index = load_ptbxl_index(root)
        if folds is not None:
            index = index[index["strat_fold"].isin(folds)]
        columns: dict[str, Any] = {
            "path": [str(root / f"{rel}.hea") for rel in index["record_path"]],
            "record_id": [str(rel) for rel in index["record_path"]],
        }
        for name in INPUT_SCHEMA.names[2:]:
            if name in index.columns:
                columns[name] = [None if isinstance(v, float) and math.isnan(v) else v for v in index[name].tolist()]
    else:
        if folds is not None:
            raise InputError(f"{root} is not a PTB-XL root (no ptbxl_database.csv): it has no folds to select")
        files = list_record_files(root)
        columns = {"path": [str(p) for p in files], "record_id": [record_id_of(p, root) for p in files]}
    n = len(columns["path"])
    return pa.Table.from_arrays([pa.array(columns.get(f.name, [None] * n), f.type) for f in INPUT_SCHEMA],
                                schema=INPUT_SCHEMA)


def entries(inputs: pa.Table) -> Iterator[tuple[str, str]]:
    """``(path, record_id)`` of every row of an input table."""
    return zip(inputs.column("path").to_pylist(), inputs.column("record_id").to_pylist())


# -- inputs of any size, as chunks ---------------------------------------------------------------------------------

def chunk_id(source: str, index: int, paths: list[str]) -> str:
    digest = hashlib.sha256(f"{source}\n{index}\n".encode())
    for p in paths:
        digest.update(p.encode() + b"\n")
    return digest.hexdigest()[:20]


def chunk_rows(source: str, pairs: Iterable[tuple[str, str]], chunk_size: int) -> Iterator[dict[str, Any]]:
    """Group ``(path, record_id)`` pairs, in order, into chunk rows ``{chunk, n_paths, paths, record_ids}``."""
    pairs = iter(pairs)
    for index in itertools.count():
        batch = list(itertools.islice(pairs, chunk_size))
        if not batch:
            return
        paths = [p for p, _ in batch]
        yield {"chunk": chunk_id(source, index, paths), "n_paths": len(paths), "paths": paths,
               "record_ids": [r for _, r in batch]}


def listing_sources(path: Path) -> list[dict[str, str]]:
    """What to list, one `source_chunks` call each: a PTB-XL root (its index) or a manifest is one source; a folder
    tree is one source per folder that directly holds files, and only folder names are walked here."""
    kind = input_kind(path)
    if kind != "directory":
        return [{"kind": kind, "location": str(path), "root": str(path)}]
    folders = []
    for folder, subdirs, files in os.walk(path):
        subdirs.sort()
        if files:
            folders.append(folder)
    return [{"kind": kind, "location": folder, "root": str(path)} for folder in sorted(folders)]


def source_chunks(source: dict[str, str], chunk_size: int) -> Iterator[dict[str, Any]]:
    """One source's records as `chunk_rows`: a PTB-XL root's index, a manifest streamed, or the record files
    directly in one folder (its subfolders are sources of their own)."""
    location = Path(source["location"])
    if source["kind"] == "ptbxl":
        yield from chunk_rows("ptbxl", entries(list_inputs(location)), chunk_size)
    elif source["kind"] == "manifest":
        yield from chunk_rows(location.name, _manifest_entries(location), chunk_size)
    else:
        root = Path(source["root"])
        files = sorted(p for p in location.iterdir() if is_record_file(p, root) and p.is_file())
        yield from chunk_rows(location.relative_to(root).as_posix(),
                              ((str(p), record_id_of(p, root)) for p in files), chunk_size)


def _manifest_entries(manifest: Path) -> Iterator[tuple[str, str]]:
    """Stream ``(path, record_id)`` from a manifest in record batches, never loading it whole."""
    if manifest.suffix.lower() == ".csv":
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
        raise InputError(f"{manifest}: a manifest needs a 'path' column")
    base = manifest.parent
    for batch in batches:
        paths = batch.column("path").to_pylist()
        ids = batch.column("record_id").to_pylist() if "record_id" in columns else [None] * len(paths)
        for listed, record_id in zip(paths, ids):
            yield str(base / listed), record_id or Path(listed).with_suffix("").as_posix()
