"""A folder tree as the listing sees it: one directory at a time, through one small interface (`FolderTree`).

Why an interface of its own: listing millions of files must read each directory once and nothing per file
beyond what the directory read gives (no ``stat``, no per-ancestor walks), and the same listing must later run on
object storage. `LocalTree` reads a directory with ``os.scandir``, whose entries carry the file type (``d_type``), so
telling files from folders costs no ``stat`` on local disks; `ArrowTree` reads a folder of a filesystem URI
(`ecgad.storage`: S3, GCS, Azure, ...) with one ``FileSelector(recursive=False)`` listing (on object stores, one
paged LIST request per 1000 keys); `tree_of` picks the one for a location.

Symlinks never lead out of the root: a link to a file is listed only where its target lies inside the root, and a
link to a folder is never followed (one outside the root would leak foreign files in; one inside it points at a
folder that is listed anyway, under its real path, so following it would list the same records twice, and a link
to an ancestor would never end).

Folders are named by their path relative to the root in POSIX form, ``"."`` for the root itself.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import NamedTuple, Protocol

import pyarrow.fs as pafs

from ecgad.storage import filesystem, is_uri, normalize

#: The root folder's relative name.
ROOT = "."


class Entry(NamedTuple):
    """One direct child of a folder: its name and whether it is a folder (else a file)."""

    name: str
    is_dir: bool


class FolderTree(Protocol):
    """What the listing needs of a tree of files (module docstring)."""

    def entries(self, folder: str) -> Iterator[Entry]:
        """The direct children of ``folder``, streamed, in no particular order (symlink rule: module docstring)."""

    def path(self, folder: str, name: str | None = None) -> str:
        """The full path (or URI) of ``folder``, or of its child ``name``."""

    def signature(self, folder: str, name: str) -> tuple[int, int]:
        """``(size, modification time in ns)`` of the file ``name`` in ``folder``."""


def child(folder: str, name: str) -> str:
    """The relative name of ``folder``'s child ``name``."""
    return name if folder == ROOT else f"{folder}/{name}"


@dataclass(frozen=True)
class LocalTree:
    """A tree on a local (or mounted: NFS, EFS, Lustre) file system under ``root``, an absolute, resolved path."""

    root: str

    def path(self, folder: str, name: str | None = None) -> str:
        base = self.root if folder == ROOT else f"{self.root}/{folder}"
        return base if name is None else f"{base}/{name}"

    def entries(self, folder: str) -> Iterator[Entry]:
        with os.scandir(self.path(folder)) as scan:
            for entry in scan:
                if entry.is_symlink():
                    if self._links_to_a_file_inside(entry.path):
                        yield Entry(entry.name, False)
                elif entry.is_dir(follow_symlinks=False):
                    yield Entry(entry.name, True)
                elif entry.is_file(follow_symlinks=False):
                    yield Entry(entry.name, False)

    def signature(self, folder: str, name: str) -> tuple[int, int]:
        stat = os.stat(self.path(folder, name))
        return stat.st_size, stat.st_mtime_ns

    def _links_to_a_file_inside(self, link: str) -> bool:
        """Whether the symlink ``link`` resolves to a file inside the root (costs a few syscalls, links only)."""
        target = os.path.realpath(link)
        return target.startswith(self.root + os.sep) and os.path.isfile(target)


@dataclass(frozen=True)
class ArrowTree:
    """A tree under the URI ``root`` (`ecgad.storage.filesystem`). Object stores have no symbolic links, so the
    symlink rule has nothing to do; a "folder" is a key prefix."""

    root: str

    def path(self, folder: str, name: str | None = None) -> str:
        base = self.root if folder == ROOT else f"{self.root}/{folder}"
        return base if name is None else f"{base}/{name}"

    def entries(self, folder: str) -> Iterator[Entry]:
        fs, path = filesystem(self.path(folder))
        for info in fs.get_file_info(pafs.FileSelector(path, recursive=False)):
            if info.type in (pafs.FileType.File, pafs.FileType.Directory):
                yield Entry(info.base_name, info.type == pafs.FileType.Directory)

    def signature(self, folder: str, name: str) -> tuple[int, int]:
        fs, path = filesystem(self.path(folder, name))
        info = fs.get_file_info(path)
        return int(info.size or 0), int(info.mtime_ns or 0)


def tree_of(location: str) -> FolderTree:
    """The tree rooted at ``location``: an `ArrowTree` for a URI, a `LocalTree` (resolved root) for a local path."""
    return ArrowTree(normalize(location)) if is_uri(location) else LocalTree(normalize(location))


# -- what a folder holds, as a digest --------------------------------------------------------------------------

def folder_digest(tree: FolderTree, folder: str) -> tuple[list[str], str | None]:
    """``folder``'s subfolders (relative names, sorted) and a digest of the name, size and modification time of
    each of its files (None where it holds no file): one ``stat`` per file, which is what a digest of file
    signatures costs, done wherever this runs (in listing tasks, `ecgad.ray.listing.tree_digest`)."""
    subfolders, files = [], []
    for entry in tree.entries(folder):
        (subfolders if entry.is_dir else files).append(entry.name)
    if not files:
        return sorted(child(folder, name) for name in subfolders), None
    digest = hashlib.sha256()
    for name in sorted(files):
        size, mtime_ns = tree.signature(folder, name)
        digest.update(f"{name}\0{size}\0{mtime_ns}\n".encode())
    return sorted(child(folder, name) for name in subfolders), digest.hexdigest()


def combine_digests(digests: Iterable[tuple[str, str]]) -> str:
    """One digest of a tree from its ``(folder, folder_digest)`` pairs, in any order: any file added, removed,
    resized or touched anywhere changes it."""
    combined = hashlib.sha256()
    for folder, digest in sorted(digests):
        combined.update(f"{folder}\0{digest}\n".encode())
    return combined.hexdigest()
