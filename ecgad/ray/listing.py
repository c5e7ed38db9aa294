"""Listing inputs of any size in Ray tasks, with nothing but folder names and object refs on the driver.

A walk (`_walk`) starts one task on the input; each task first reports what to list next (a folder's subfolders),
which the driver starts at once as further tasks, then streams its own results as separate objects (a Ray streaming
generator: the driver owns them, Ray can rebuild them, and they never pass through the driver). So every folder is
read once, by one task, the tree's folders are read in parallel, and the driver holds, per folder, its name and its
task's object refs, never the files in it.

Two walks use it: `list_slices` (the records of any input, as `ecgad.inputs` slices, for archive scoring) and
`tree_digest` (a digest of every file's name, size and modification time, for `jobs.preprocess`'s idempotent
reruns: the one ``stat`` per file it needs happens in the folder tasks, not on the driver).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import ray
from ray import ObjectRef, ObjectRefGenerator

from ecgad.inputs import Source, input_kind, list_source
from ecgad.tree import ROOT, FolderTree, LocalTree, combine_digests, folder_digest


@ray.remote
def _list_source(source: Source, chunk_size: int) -> Iterator[Any]:
    """Yields the sources to list next, then ``source``'s slices (`ecgad.inputs.list_source`), one object each."""
    next_sources, source_slices = list_source(source, chunk_size)
    yield next_sources, None
    yield from source_slices


@ray.remote
def _digest_folder(folder: str, tree: FolderTree) -> Iterator[tuple[list[str], str | None]]:
    """Yields the folder's subfolders and its digest (`ecgad.tree.folder_digest`), its only object."""
    yield folder_digest(tree, folder)


def _walk(task: Any, first: Any, *args: Any) -> list[tuple[Any, Any, ObjectRefGenerator]]:
    """Run the remote generator ``task`` on ``first``, then on every item each run names next (its first object:
    ``(next items, payload)``), until none is left; returns ``(item, payload, generator)`` of every run, the
    generator positioned after its first object."""
    running = {task.remote(first, *args): first}
    finished = []
    while running:
        ray.wait(list(running), num_returns=1)
        ready, _ = ray.wait(list(running), num_returns=len(running), timeout=0)
        for generator in ready:
            item = running.pop(generator)
            next_items, payload = ray.get(next(generator))
            for next_item in next_items:
                running[task.remote(next_item, *args)] = next_item
            finished.append((item, payload, generator))
    return finished


def list_slices(input_path: Path, chunk_size: int) -> list[ObjectRef[pa.Table]]:
    """The records of any input (`ecgad.inputs.input_kind`; ``input_path`` absolute and resolved) as refs to
    `ecgad.inputs.SLICE_SCHEMA` tables, in a deterministic order (by folder, then position)."""
    finished = _walk(_list_source, Source(input_kind(input_path), str(input_path)), chunk_size)
    return [ref for _, _, generator in sorted(finished, key=_folder_of) for ref in generator]


def _folder_of(run: tuple[Source, Any, Any]) -> str:
    return run[0].folder


def tree_digest(root: Path) -> str:
    """A digest of every file under the folder ``root`` (absolute and resolved): name, size and modification time
    (`ecgad.tree.folder_digest`), each folder digested in a task of its own and combined on the driver."""
    finished = _walk(_digest_folder, ROOT, LocalTree(str(root)))
    return combine_digests((folder, digest) for folder, digest, _ in finished if digest is not None)

