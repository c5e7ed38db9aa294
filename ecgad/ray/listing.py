"""Listing inputs of any size in Ray tasks, with nothing but folder names and object refs on the driver.

A walk (`_walk`) starts one task on the input; each task first reports what to list next (its folders'
subfolders), which the driver starts at once as further tasks (`FOLDERS_PER_TASK` folders each), then streams its
own results as separate objects (a Ray streaming generator: the driver owns them and Ray can rebuild them, but they
stay in the shared object store, never in the driver, as long as each is over Ray's ~100 kB inline limit, which
`ecgad.inputs.list_sources` sees to). So every folder is read once, by one task, the tree's folders are read in
parallel, and the driver holds folder names and object refs, never the files in them.

Two walks use it: `list_slices` (the records of any input, as `ecgad.inputs` slices, for archive scoring) and
`tree_digest` (a digest of every file's name, size and modification time, for `jobs.preprocess`'s idempotent
reruns: the one ``stat`` per file it needs happens in the folder tasks, not on the driver).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import ray
from ray import ObjectRef, ObjectRefGenerator

from ecgad.inputs import Source, input_kind, list_sources
from ecgad.tree import ROOT, FolderTree, combine_digests, folder_digest, tree_of


#: Folders listed per task: enough that a tree of small folders leaves each task in a few objects of several
#: hundred kB (`ecgad.inputs.list_sources`) and costs a task start per thousands of files, few enough that the folders
#: of a tree still spread over every CPU of a cluster.
FOLDERS_PER_TASK = 16


@ray.remote
def _list_sources(sources: list[Source], chunk_size: int) -> Iterator[Any]:
    """Yields the sources to list next, then the sources' slices (`ecgad.inputs.list_sources`), one object each."""
    next_sources, source_slices = list_sources(sources, chunk_size)
    yield next_sources, None
    yield from source_slices


@ray.remote
def _digest_folders(folders: list[str], tree: FolderTree) -> Iterator[tuple[list[str], list[tuple[str, str]]]]:
    """Yields the folders' subfolders and their digests (`ecgad.tree.folder_digest`), its only object."""
    subfolders, digests = [], []
    for folder in folders:
        folder_subfolders, digest = folder_digest(tree, folder)
        subfolders += folder_subfolders
        digests += [(folder, digest)] if digest is not None else []
    yield subfolders, digests


def _walk(task: Any, first: Any, *args: Any) -> list[tuple[Any, Any, ObjectRefGenerator]]:
    """Run the remote generator ``task`` on ``[first]``, then on every item each run names next (its first object:
    ``(next items, payload)``), `FOLDERS_PER_TASK` at a time, until none is left; returns ``(first item, payload,
    generator)`` of every run, the generator positioned after its first object."""
    running = {task.remote([first], *args): first}
    finished = []
    while running:
        ray.wait(list(running), num_returns=1)
        ready, _ = ray.wait(list(running), num_returns=len(running), timeout=0)
        for generator in ready:
            item = running.pop(generator)
            next_items, payload = ray.get(next(generator))
            for start in range(0, len(next_items), FOLDERS_PER_TASK):
                batch = next_items[start:start + FOLDERS_PER_TASK]
                running[task.remote(batch, *args)] = batch[0]
            finished.append((item, payload, generator))
    return finished


def list_slices(input_path: str, chunk_size: int) -> list[ObjectRef[pa.Table]]:
    """The records of any input (`ecgad.inputs.input_kind`; ``input_path`` a URI or an absolute, resolved path:
    `ecgad.storage.normalize`) as refs to `ecgad.inputs.SLICE_SCHEMA` tables, in a deterministic order (by folder,
    then position)."""
    finished = _walk(_list_sources, Source(input_kind(input_path), str(input_path)), chunk_size)
    return [ref for _, _, generator in sorted(finished, key=_folder_of) for ref in generator]


def _folder_of(run: tuple[Source, Any, Any]) -> str:
    return run[0].folder


def tree_digest(root: str) -> str:
    """A digest of every file under the folder ``root`` (a URI, or absolute and resolved): name, size and
    modification time (`ecgad.tree.folder_digest`), each folder digested in a task of its own and combined on the
    driver."""
    finished = _walk(_digest_folders, ROOT, tree_of(str(root)))
    return combine_digests(pair for _, digests, _ in finished for pair in digests)

