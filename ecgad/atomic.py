"""Atomic writes: a reader (or a rerun after a kill) sees the old complete file or the new complete one, never part.

Every writer of the project goes through here. A file is written under a hidden temporary name in its own folder
(``.NAME.<random>.tmp``: no Parquet reader lists names starting with ``.``, and `remove_temporaries` can find what
a killed run left), flushed and fsynced, then renamed over the final name; a rename within one folder is atomic on
POSIX file systems. A directory is assembled under a temporary sibling and swapped in whole (`replace_directory`).

A file given as a URI (object storage, `ecgad.storage`) is written in one upload instead: an object appears whole
or not at all, so there is no temporary to rename and none for `remove_temporaries` to find.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from ecgad.storage import is_uri, put

TMP_SUFFIX = ".tmp"


def temporary_name(final: Path) -> Path:
    """The hidden temporary beside ``final`` that an atomic write of it goes through."""
    return final.with_name(f".{final.name}.{uuid.uuid4().hex[:8]}{TMP_SUFFIX}")


@contextmanager
def atomic_file(final: str | Path, mode: str = "wb") -> Iterator[IO[Any]]:
    """Open a temporary for writing; on a clean exit fsync it and rename it to ``final``, else delete it. For a URI,
    an in-memory file uploaded as ``final`` on a clean exit (module docstring)."""
    if is_uri(final):
        buffer: IO[Any] = io.BytesIO() if "b" in mode else io.StringIO()
        yield buffer
        data = buffer.getvalue()
        put(str(final), data if isinstance(data, bytes) else data.encode("utf-8"))
        return
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(final)
    try:
        with open(tmp, mode) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_bytes(final: str | Path, data: bytes) -> None:
    with atomic_file(final, "wb") as fh:
        fh.write(data)


def write_text(final: str | Path, text: str) -> None:
    with atomic_file(final, "w") as fh:
        fh.write(text)


def write_json(final: str | Path, obj: Any, **dumps: Any) -> None:
    """``obj`` as indented, key-sorted JSON (``dumps`` overrides ``json.dumps`` options), atomically."""
    options = {"indent": 2, "sort_keys": True, **dumps}
    write_text(final, json.dumps(obj, **options) + "\n")


def write_parquet(final: str | Path, table: Any, compression: str = "zstd") -> None:
    """A pyarrow ``table`` as one Parquet file, atomically."""
    import pyarrow.parquet as pq

    with atomic_file(final, "wb") as fh:
        pq.write_table(table, fh, compression=compression)


def remove_temporaries(folder: str | Path) -> int:
    """Delete the temporaries a killed writer left in ``folder``; returns how many. Only safe when no other writer
    is working in that folder. Object storage (a URI) holds none (module docstring)."""
    if is_uri(folder):
        return 0
    temporaries = list(Path(folder).glob(f".*{TMP_SUFFIX}"))
    for path in temporaries:
        path.unlink(missing_ok=True)
    return len(temporaries)


def temporary_directory(final: str | Path) -> Path:
    """A fresh hidden sibling of ``final`` to assemble a directory in, for `replace_directory`."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))


def replace_directory(new: Path, final: Path) -> None:
    """Put the finished directory ``new`` at ``final`` (a sibling), replacing whatever is there, so a reader sees
    the old complete directory or the new complete one, never a mixture. Directories cannot be renamed over
    non-empty ones, so the old one is moved aside first and deleted last."""
    if final.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
        os.replace(final, old / final.name)
        os.replace(new, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(new, final)


def publish_directory(new: Path, final: Path) -> bool:
    """Put the finished directory ``new`` at ``final`` unless ``final`` already exists, for write-once content named
    by its own hash (an existing ``final`` holds the same bytes); returns whether ``new`` went in place (otherwise it
    is deleted). Renaming a directory onto a non-empty one fails, so of two writers racing, the first one wins and
    the second's rename fails, and nothing in place is ever replaced."""
    try:
        os.rename(new, final)
        return True
    except OSError:
        if not final.is_dir():
            raise
        shutil.rmtree(new, ignore_errors=True)
        return False


def replace_symlink(final: str | Path, target: str) -> None:
    """Point the symbolic link ``final`` at ``target`` (stored as given, e.g. relative to ``final``'s folder),
    atomically: the link is made under a temporary name and renamed over ``final``, so a reader resolves the old
    target or the new one, never nothing. A real directory at ``final`` (not a link) cannot be renamed over; it is
    moved aside first (`replace_directory`), which leaves a moment without ``final``."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(final)
    os.symlink(target, tmp)
    try:
        if final.is_dir() and not final.is_symlink():
            replace_directory(tmp, final)
        else:
            os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
