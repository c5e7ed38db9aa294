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
  optionally ``record_id`` (default: the path as listed, without extension), streamed in record batches, never
  loaded whole: the way to give millions of records (no directory is read at all).

Jobs that hold the list on the driver (preprocessing, evaluation) take a root as one table (`list_inputs`). Archive
scoring lists inputs of any size without the driver ever holding the listing: each source (`Source`: a PTB-XL root,
a manifest, or one folder of a tree) is listed by `list_source`, in a Ray task (`ecgad.ray.listing`, a few folders
to a task: `list_sources`), which names the subfolders to list next and streams the source's records as slices. A
folder is read once (`ecgad.tree`: ``os.scandir``, or one listing on object storage; no ``stat`` per file), by one task; its subfolders are listed by
further tasks.

A chunk is ``chunk_size`` consecutive records of one source, the unit that flows through the scoring pipeline
(`ecgad.ray.scoring`). Its id is a hash of its source, position and member paths, so archive scoring only ever
skips a chunk when exactly the same paths were committed. Chunks never span sources, and a folder's records are
sorted by name, so a chunk's members depend on nothing but its own source: the same tree gives the same chunks
however its listing tasks are scheduled. A slice (`SLICE_SCHEMA`) is `CHUNKS_PER_SLICE` consecutive chunks of one
source, the unit a listing task emits, so that a folder of millions of files leaves its task in many pieces, which
separate tasks turn into chunk rows (`slice_chunks`).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import posixpath
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
from pyarrow.fs import FileType

from ecgad.formats import NAMED_SUFFIXES, sniff_format
from ecgad.io import RECORD_SUFFIXES
from ecgad.ptbxl import MASK_DIR, load_ptbxl_index
from ecgad.shards import INDEX_FIELDS
from ecgad.storage import file_type, is_file, is_uri, join, local_copy, normalize, open_input, parent
from ecgad.storage import name as base_name
from ecgad.tree import ROOT, FolderTree, child, tree_of

#: Manifest files (a table with a ``path`` column, optionally ``record_id``).
MANIFEST_SUFFIXES = (".csv", ".parquet", ".pq")

#: `ecgad.io.RECORD_SUFFIXES` as ``str.endswith`` takes them.
_RECORD_SUFFIXES = tuple(RECORD_SUFFIXES | NAMED_SUFFIXES)

#: Metadata tables at the top of a PTB-XL root and label tables next to record sets: never ECGs themselves.
_METADATA_TABLES = frozenset({"ptbxl_database.csv", "scp_statements.csv", "labels.csv"})

#: The columns of `list_inputs`: where a record is, its id, and the index columns (nulls outside a PTB-XL root).
INPUT_SCHEMA = pa.schema([pa.field("path", pa.string()), pa.field("record_id", pa.string()),
                          *(pa.field(*f) for f in INDEX_FIELDS[1:])])

#: Chunks per slice: a listing task emits a source's records this many chunks at a time (8192 records at the archive's
#: default chunk size), so no task hands over a folder's whole listing at once and chunk rows are built in parallel.
CHUNKS_PER_SLICE = 64

#: A slice: consecutive records of one source, from its chunk number ``first_chunk`` on (module docstring).
SLICE_SCHEMA = pa.schema([pa.field("source", pa.string()), pa.field("first_chunk", pa.int64()),
                          pa.field("paths", pa.list_(pa.string())), pa.field("record_ids", pa.list_(pa.string()))])

#: A chunk row, the unit the scoring pipeline takes: its id, size, member paths and record ids.
CHUNK_SCHEMA = pa.schema([pa.field("chunk", pa.string()), pa.field("n_paths", pa.int64()),
                          pa.field("paths", pa.list_(pa.string())), pa.field("record_ids", pa.list_(pa.string()))])

#: Names gathered per Arrow array while a folder is read: a folder of millions of files is held as compact Arrow
#: strings (~20 bytes a name), never as one Python list.
_NAMES_PER_BATCH = 65536


class InputError(ValueError):
    """The input cannot be listed as asked (no such path, a file that is not a manifest, a manifest without a
    ``path`` column, folds asked of a root that has none)."""


def is_ptbxl_root(root: str | Path) -> bool:
    return is_file(join(str(root), "ptbxl_database.csv"))


def input_kind(path: str | Path) -> str:
    """``manifest`` (a CSV/Parquet table with a ``path`` column), ``ptbxl`` (a PTB-XL root) or ``directory``;
    ``path`` is a local path or a URI (`ecgad.storage`)."""
    kind = file_type(path)
    if kind == FileType.File:
        if not str(path).lower().endswith(MANIFEST_SUFFIXES):
            raise InputError(f"{path}: an input file must be a manifest ({', '.join(MANIFEST_SUFFIXES)}) "
                             "with a 'path' column")
        return "manifest"
    if kind != FileType.Directory:
        raise InputError(f"{path}: no such file or directory")
    return "ptbxl" if is_ptbxl_root(path) else "directory"


# -- what is a record ----------------------------------------------------------------------------------------------

def is_record_name(name: str) -> bool:
    """Whether a file named ``name`` is an ECG record wherever it lies, from its name alone (`is_record_file` without
    the folder rule and the XML content check): a suffix of `ecgad.io.RECORD_SUFFIXES` or of a binary hospital format
    (as ``pathlib`` reads suffixes: ``.npy`` alone is a hidden file, not a record) and none of the known metadata
    tables."""
    lowered = name.lower()
    return (lowered.endswith(_RECORD_SUFFIXES) and lowered not in _RECORD_SUFFIXES
            and lowered not in _METADATA_TABLES)


def is_record_file(path: Path, root: Path) -> bool:
    """Whether the file ``path`` under ``root`` is an ECG record: a format `ecgad.io.read_record` reads (a WFDB
    record counts once, by its ``.hea`` header; a hospital format as `ecgad.formats.is_hospital_ecg_file` says), but
    none of the known metadata tables (``ptbxl_database.csv``, ``scp_statements.csv``, ``labels.csv``) and nothing
    in a ``masks/`` folder (where `ecgad.synth_dataset` keeps the ground-truth point masks: ``.npy`` arrays, not
    ECGs), so a PTB-XL root, a synthetic root or the sample data can be listed as a plain folder too. A folder
    listing applies the same rule folder by folder (`folder_records`)."""
    return ((is_record_name(path.name) or _is_ecg_xml(str(path), path.name))
            and MASK_DIR not in path.relative_to(root).parts[:-1])


def _is_ecg_xml(path: str, name: str) -> bool:
    """An ``.xml`` file is a record only if its root element is an ECG format's: a folder may hold other XML (on
    object storage, read from a local copy)."""
    if not name.lower().endswith(".xml"):
        return False
    with local_copy(path) as local:
        return sniff_format(local) is not None


def folder_records(tree: FolderTree, folder: str) -> tuple[list[str], pa.Array]:
    """One folder, read once: its subfolders to list next (sorted; ``masks/`` folders left out, see
    `is_record_file`) and the names of the record files directly in it, sorted (Arrow strings)."""
    subfolders, names, batches = [], [], []
    for entry in tree.entries(folder):
        if entry.is_dir:
            if entry.name != MASK_DIR:
                subfolders.append(child(folder, entry.name))
        elif is_record_name(entry.name) or _is_ecg_xml(tree.path(folder, entry.name), entry.name):
            names.append(entry.name)
            if len(names) == _NAMES_PER_BATCH:
                batches.append(pa.array(names, pa.string()))
                names = []
    found = pa.concat_arrays([*batches, pa.array(names, pa.string())])
    return sorted(subfolders), found.take(pc.array_sort_indices(found))


def list_record_files(root: str | Path) -> list[Path]:
    """Every ECG file under the local folder ``root`` (any depth, `is_record_file`; symlinks as `ecgad.tree`
    rules), sorted: the serial form of the listing, for inputs small enough to hold."""
    return [Path(root, relative) for relative in _relative_record_names(str(root))]


def _relative_record_names(root: str) -> list[str]:
    """The names, relative to the folder ``root`` (a local path or a URI), of every ECG file under it, sorted as
    paths sort (component by component)."""
    tree, found, folders = tree_of(root), [], [ROOT]
    while folders:
        folder = folders.pop()
        subfolders, names = folder_records(tree, folder)
        folders += subfolders
        found += [child(folder, name) for name in names.to_pylist()]
    return sorted(found, key=lambda relative: relative.split("/"))


def record_id_of(relative: str) -> str:
    """A record's id in a folder tree from its path relative to the root (POSIX form): that path without the
    extension (unique within a tree as long as one record is not stored twice under the same stem)."""
    return PurePosixPath(relative).with_suffix("").as_posix()


# -- a root as one table -------------------------------------------------------------------------------------------

def list_inputs(root: str | Path, folds: list[int] | None = None) -> pa.Table:
    """The records under ``root`` as an `INPUT_SCHEMA` table, in a stable order (index order, or sorted paths).

    ``folds`` keeps only those ``strat_fold`` values (an `InputError` for a root without folds).
    """
    root = normalize(root)
    if is_ptbxl_root(root):
        index = load_ptbxl_index(root)
        if folds is not None:
            index = index[index["strat_fold"].isin(folds)]
        columns: dict[str, Any] = {
            "path": [join(root, f"{rel}.hea") for rel in index["record_path"]],
            "record_id": [str(rel) for rel in index["record_path"]],
        }
        for name in INPUT_SCHEMA.names[2:]:
            if name in index.columns:
                columns[name] = [None if isinstance(v, float) and math.isnan(v) else json.dumps(v) if isinstance(v, dict)
                                 else v for v in index[name].tolist()]
    else:
        if folds is not None:
            raise InputError(f"{root} is not a PTB-XL root (no ptbxl_database.csv): it has no folds to select")
        relative = _relative_record_names(root)
        columns = {"path": [join(root, name) for name in relative],
                   "record_id": [record_id_of(name) for name in relative]}
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


def slices(source: str, tables: Iterable[pa.Table | pa.RecordBatch], chunk_size: int) -> Iterator[pa.Table]:
    """The records of one source, in order, as tables (or record batches) with ``path`` and ``record_id`` columns ->
    one-row `SLICE_SCHEMA` tables of `CHUNKS_PER_SLICE` chunks each (the last one shorter), holding no more than a
    slice and one input table at a time."""
    size, number = chunk_size * CHUNKS_PER_SLICE, 0
    held = pa.table({"path": pa.array([], pa.string()), "record_id": pa.array([], pa.string())})
    for table in tables:
        held = pa.concat_tables([held, pa.table({"path": table.column("path").cast(pa.string()),
                                                 "record_id": table.column("record_id").cast(pa.string())})])
        start = 0
        while held.num_rows - start >= size:
            yield _slice(source, number, held.slice(start, size))
            number, start = number + CHUNKS_PER_SLICE, start + size
        held = held.slice(start)
    if held.num_rows:
        yield _slice(source, number, held)


def _slice(source: str, first_chunk: int, records: pa.Table) -> pa.Table:
    def listed(column: str) -> pa.Array:
        return pa.ListArray.from_arrays(pa.array([0, records.num_rows], pa.int32()),
                                        records.column(column).combine_chunks())
    return pa.table([pa.array([source]), pa.array([first_chunk], pa.int64()), listed("path"), listed("record_id")],
                    schema=SLICE_SCHEMA)


def slice_chunks(batch: pa.Table, chunk_size: int) -> pa.Table:
    """``map_batches`` (``batch_format="pyarrow"``): `SLICE_SCHEMA` rows -> `CHUNK_SCHEMA` rows, ``chunk_size``
    records each, numbered on from each slice's ``first_chunk``."""
    rows: dict[str, list[Any]] = {name: [] for name in CHUNK_SCHEMA.names}
    for source, first, paths, record_ids in zip(*(batch.column(name).to_pylist() for name in SLICE_SCHEMA.names)):
        for number, start in enumerate(range(0, len(paths), chunk_size), start=first):
            members = paths[start:start + chunk_size]
            rows["chunk"].append(chunk_id(source, number, members))
            rows["n_paths"].append(len(members))
            rows["paths"].append(members)
            rows["record_ids"].append(record_ids[start:start + chunk_size])
    return pa.table(rows, schema=CHUNK_SCHEMA)


@dataclass(frozen=True)
class Source:
    """What one listing task lists (module docstring): a PTB-XL root or a manifest (``location``, whole), or the
    folder ``folder`` (relative, `ecgad.tree`) of the tree at ``location``."""

    kind: str
    location: str
    folder: str = ROOT


def list_source(source: Source, chunk_size: int) -> tuple[list[Source], Iterator[pa.Table]]:
    """The sources to list next (a folder's subfolders) and ``source``'s records as `slices`: a PTB-XL root's index,
    a manifest streamed, or the record files directly in one folder, sorted by name."""
    if source.kind == "ptbxl":
        return [], slices("ptbxl", [list_inputs(source.location)], chunk_size)
    if source.kind == "manifest":
        return [], slices(base_name(source.location), _manifest_tables(source.location), chunk_size)
    tree = tree_of(source.location)
    subfolders, names = folder_records(tree, source.folder)
    return ([Source(source.kind, source.location, f) for f in subfolders],
            slices(source.folder, _folder_tables(tree, source.folder, names), chunk_size))


def list_sources(sources: list[Source], chunk_size: int) -> tuple[list[Source], Iterator[pa.Table]]:
    """Several sources listed together (`list_source`): every one is read first (the sources to list next come
    before any record), then their slices stream out gathered into tables of at least a slice's worth of records,
    so a tree of small folders leaves its tasks in objects large enough for Ray's shared object store: objects
    under ~100 kB would be returned inline to the caller, the driver, which would then hold the listing."""
    listed = [list_source(source, chunk_size) for source in sources]
    return ([s for next_sources, _ in listed for s in next_sources],
            _gathered(itertools.chain.from_iterable(source_slices for _, source_slices in listed),
                      chunk_size * CHUNKS_PER_SLICE))


def _gathered(tables: Iterable[pa.Table], records: int) -> Iterator[pa.Table]:
    """`SLICE_SCHEMA` tables, concatenated in order until each holds at least ``records`` records (the last fewer)."""
    pending, held = [], 0
    for table in tables:
        pending.append(table)
        held += pc.sum(pc.list_value_length(table.column("paths"))).as_py() or 0
        if held >= records:
            yield pa.concat_tables(pending)
            pending, held = [], 0
    if pending:
        yield pa.concat_tables(pending)


def _folder_tables(tree: FolderTree, folder: str, names: pa.Array) -> Iterator[pa.Table]:
    """The ``path`` and ``record_id`` (`record_id_of`) of a folder's record files, from their sorted names, a batch at a
    time, built with Arrow kernels: a record name always ends in its suffix, which the id drops."""
    for start in range(0, len(names), _NAMES_PER_BATCH):
        batch = names.slice(start, _NAMES_PER_BATCH)
        stems = pc.replace_substring_regex(batch, pattern=r"\.[^.]*$", replacement="")
        yield pa.table({"path": _joined(tree.path(folder), batch),
                        "record_id": stems if folder == ROOT else _joined(folder, stems)})


def _joined(prefix: str, names: pa.Array) -> pa.Array:
    """``prefix/name`` for every name."""
    return pc.binary_join_element_wise(pa.scalar(prefix), names, "/")


#: Manifest paths that pathlib would normalize (``a//b``, ``./a``, ``a/./b``, ``a/``, ``""``): joined through
#: pathlib, one by one, so that a manifest means what it meant when it was read row by row; all others in Arrow.
_NEEDS_PATHLIB = r"//|(^|/)\.(/|$)|/$|^$"

#: A pathlib suffix at the end of a path: a dot, not leading its name, followed by at least one character.
_SUFFIX = r"([^/])\.[^./]+$"


def _manifest_tables(manifest: str) -> Iterator[pa.Table]:
    """Stream ``path`` (relative to the manifest's folder, or absolute: a local path or a URI) and ``record_id``
    (default: the path as listed, without extension) from a manifest (a local path or a URI), a record batch at a
    time, never loading it whole."""
    if manifest.lower().endswith(".csv"):
        with open_input(manifest) as head:
            header = pcsv.open_csv(head, read_options=pcsv.ReadOptions(block_size=1 << 16)).schema.names
        columns = [c for c in ("path", "record_id") if c in header]
        batches: Iterable[pa.RecordBatch] = pcsv.open_csv(
            open_input(manifest), convert_options=pcsv.ConvertOptions(include_columns=columns,
                                                                      column_types={c: pa.string() for c in columns}))
    else:
        parquet = pq.ParquetFile(open_input(manifest))
        columns = [c for c in ("path", "record_id") if c in parquet.schema_arrow.names]
        batches = parquet.iter_batches(columns=columns, batch_size=65536)
    if "path" not in columns:
        raise InputError(f"{manifest}: a manifest needs a 'path' column")
    for batch in batches:
        listed = batch.column("path").cast(pa.string())
        paths = pc.if_else(pc.starts_with(listed, "/"), listed, _joined(parent(manifest), listed))
        default_ids = pc.replace_substring_regex(listed, pattern=_SUFFIX, replacement=r"\1")
        paths, default_ids = _through_pathlib(parent(manifest), listed, paths, default_ids)
        given = batch.column("record_id").cast(pa.string()) if "record_id" in columns else None
        record_ids = default_ids if given is None else pc.if_else(
            pc.fill_null(pc.not_equal(given, ""), False), given, default_ids)
        yield pa.table({"path": paths, "record_id": record_ids})


def _through_pathlib(base: str, listed: pa.Array, paths: pa.Array,
                     default_ids: pa.Array) -> tuple[pa.Array, pa.Array]:
    """``paths`` and ``default_ids`` with the rows that pathlib would normalize (`_NEEDS_PATHLIB`) done by pathlib
    (by ``posixpath.normpath`` under a URI; a row that is a URI itself stays as it is)."""
    odd = pc.fill_null(pc.match_substring_regex(listed, _NEEDS_PATHLIB), True)
    if not pc.any(odd).as_py():
        return paths, default_ids
    paths_list, ids_list = paths.to_pylist(), default_ids.to_pylist()
    for i in pc.indices_nonzero(odd).to_pylist():
        text = listed[i].as_py()
        if is_uri(text):
            paths_list[i] = text
        elif is_uri(base) and not text.startswith("/"):
            paths_list[i] = join(base, posixpath.normpath(text))
        else:
            paths_list[i] = str(Path(base) / text)
        ids_list[i] = Path(listed[i].as_py()).with_suffix("").as_posix()
    return pa.array(paths_list, pa.string()), pa.array(ids_list, pa.string())
