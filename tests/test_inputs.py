"""Listing inputs (`ecgad.inputs`, `ecgad.tree`, `ecgad.ray.listing`): every record file of a tree exactly once,
never side files, ``masks/`` or files reached through a symlink out of the root; the same chunks on every run, however
the folder tasks are scheduled; a big folder leaves its task in several slices; the tree digest moves with any file.
"""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ecgad.inputs import CHUNKS_PER_SLICE, Source, list_record_files, list_source, slice_chunks
from ecgad.tree import ROOT, LocalTree, combine_digests, folder_digest

CHUNK = 2


def _touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


@pytest.fixture
def tree(tmp_path) -> tuple[Path, list[str]]:
    """A nested tree with records at several depths, side files, a ``masks/`` folder, metadata tables, and symlinks
    in and out of the root; and the relative paths of the records it holds."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    records = ["a.hea", "x/b.npy", "x/c.csv", "x/y/d.npz", "x/y/e.hea", "z/deep/er/f.NPY", "x/y/e.b.hea"]
    for rel in records:
        _touch(root / rel)
    for side in ("a.dat", "x/y/e.dat", "notes.txt", "x/y/ptbxl_database.csv", "z/labels.csv", "x/.npy",
                 "masks/m.npy", "x/masks/n.npy", "x/masks/deeper/o.hea"):
        _touch(root / side)
    _touch(outside / "stolen.hea")
    _touch(outside / "dir" / "g.npy")
    os.symlink(outside / "stolen.hea", root / "x" / "link_out.hea")     # a file out of the root: skipped
    os.symlink(outside / "dir", root / "linked_dir")                    # a folder out of the root: skipped
    os.symlink(root / "x", root / "z" / "loop")                         # a folder inside: not followed
    os.symlink(root / "a.hea", root / "z" / "alias.hea")                # a file inside: a record of its own
    (root / "empty").mkdir()
    return root, sorted(records + ["z/alias.hea"])


def _listed(root: Path, chunk_size: int = CHUNK) -> list[dict]:
    """Every chunk row of a folder tree, listed serially through `list_source` (what the folder tasks run)."""
    rows, sources = [], [Source("directory", str(root.resolve()))]
    while sources:
        next_sources, slices = list_source(sources.pop(), chunk_size)
        sources += next_sources
        rows += [row for table in slices for row in slice_chunks(table, chunk_size).to_pylist()]
    return rows


def test_a_nested_tree_lists_each_record_file_once_and_nothing_else(tree):
    root, records = tree
    assert [p.relative_to(root).as_posix() for p in list_record_files(root)] == records
    rows = _listed(root)
    paths = [p for row in rows for p in row["paths"]]
    assert sorted(paths) == [str(root / rel) for rel in records]
    ids = {r for row in rows for r in row["record_ids"]}
    assert ids == {rel.rsplit(".", 1)[0] for rel in records}
    assert all(row["n_paths"] == len(row["paths"]) <= CHUNK for row in rows)


def test_a_rerun_plans_exactly_the_same_chunks(tree):
    root, _ = tree
    first = {row["chunk"]: row["paths"] for row in _listed(root)}
    assert {row["chunk"]: row["paths"] for row in _listed(root)} == first
    _touch(root / "x" / "a0.npy")                        # a changed folder changes its own chunks only
    changed = {row["chunk"]: row["paths"] for row in _listed(root)}
    in_x = {c for c, paths in first.items() if Path(paths[0]).parent == root / "x"}
    assert in_x and in_x.isdisjoint(changed) and set(first) - in_x <= set(changed)


def test_symlinks_never_lead_out_of_the_root(tree, tmp_path):
    root, _ = tree
    names = {(entry.name, entry.is_dir) for entry in LocalTree(str(root.resolve())).entries("z")}
    assert names == {("deep", True), ("labels.csv", False), ("alias.hea", False)}   # the folder link is not
    assert "linked_dir" not in {entry.name for entry in LocalTree(str(root.resolve())).entries(ROOT)}


def test_a_big_folder_leaves_its_task_in_several_slices(tmp_path):
    n = CHUNK * CHUNKS_PER_SLICE * 2 + 3
    for i in range(n):
        _touch(tmp_path / f"r{i:05d}.hea")
    next_sources, slices = list_source(Source("directory", str(tmp_path)), CHUNK)
    tables = list(slices)
    assert next_sources == [] and len(tables) == 3
    assert [t.column("first_chunk")[0].as_py() for t in tables] == [0, CHUNKS_PER_SLICE, 2 * CHUNKS_PER_SLICE]
    chunks = [row for t in tables for row in slice_chunks(t, CHUNK).to_pylist()]
    assert [p for row in chunks for p in row["paths"]] == [str(tmp_path / f"r{i:05d}.hea") for i in range(n)]
    assert len({row["chunk"] for row in chunks}) == len(chunks) == n // CHUNK + 1


def test_folder_digest_moves_with_any_file_and_only_then(tmp_path):
    _touch(tmp_path / "a" / "r.hea")
    _touch(tmp_path / "masks" / "m.npy")
    local = LocalTree(str(tmp_path))

    def digest() -> str:
        return combine_digests((f, folder_digest(local, f)[1]) for f in ("a", "masks"))

    before = digest()
    assert folder_digest(local, ROOT) == (["a", "masks"], None) and digest() == before
    mask = tmp_path / "masks" / "m.npy"
    os.utime(mask, ns=(mask.stat().st_atime_ns, mask.stat().st_mtime_ns + 10**9))
    assert digest() != before


# -- through Ray: the listing the archive job runs ---------------------------------------------------------------

@pytest.mark.cluster
def test_list_chunks_of_a_tree_matches_the_serial_listing_on_every_run(ray_session, tree):
    from ecgad.ray.data import list_chunks, plan_chunks
    from ecgad.ray.listing import list_slices

    root, records = tree
    chunks = list_chunks(root, CHUNK).take_all()
    assert sorted((c["chunk"], list(c["paths"])) for c in chunks) \
        == sorted((c["chunk"], c["paths"]) for c in _listed(root))
    assert sorted(p for c in chunks for p in c["paths"]) == [str(root / rel) for rel in records]
    _, sizes = plan_chunks(root, CHUNK)
    assert sizes == {c["chunk"]: c["n_paths"] for c in chunks}     # a rerun plans exactly the same chunks
    sources = [t.column("source").to_pylist() for t in ray_session.get(list_slices(root.resolve(), CHUNK))]
    assert sorted(s for table in sources for s in table) == [".", "x", "x/y", "z", "z/deep/er"]  # each folder once


@pytest.mark.cluster
def test_a_big_folder_is_split_across_tasks(ray_session, tmp_path):
    from ecgad.ray.data import list_chunks
    from ecgad.ray.listing import list_slices

    n = CHUNK * CHUNKS_PER_SLICE * 3 + 1
    for i in range(n):
        _touch(tmp_path / f"r{i:05d}.npy")
    assert len(list_slices(tmp_path, CHUNK)) == 4                   # separate objects, so separate tasks
    chunks = list_chunks(tmp_path, CHUNK).take_all()
    assert sorted(p for c in chunks for p in c["paths"]) == [str(tmp_path / f"r{i:05d}.npy") for i in range(n)]
    assert len({c["chunk"] for c in chunks}) == len(chunks) == n // CHUNK + 1


@pytest.mark.cluster
def test_a_manifest_streams_in_slices(ray_session, tmp_path):
    from ecgad.ray.data import list_chunks

    n = CHUNK * CHUNKS_PER_SLICE + 5
    manifest = tmp_path / "m.parquet"
    pq.write_table(pa.table({"path": [f"d/r{i}.npy" for i in range(n)]}), manifest,
                   row_group_size=7)
    chunks = list_chunks(manifest, CHUNK).take_all()
    assert sorted(r for c in chunks for r in c["record_ids"]) == sorted(f"d/r{i}" for i in range(n))
    assert sorted(c["chunk"] for c in chunks) == sorted(c["chunk"] for c in list_chunks(manifest, CHUNK).take_all())


@pytest.mark.cluster
def test_tree_digest_is_stable_and_moves_with_any_file(ray_session, tree):
    from ecgad.ray.listing import tree_digest

    root, _ = tree
    before = tree_digest(root.resolve())
    assert tree_digest(root.resolve()) == before
    mask = root / "x" / "masks" / "deeper" / "o.hea"                # side files count: shards are made from them
    os.utime(mask, ns=(mask.stat().st_atime_ns, mask.stat().st_mtime_ns + 10**9))
    assert tree_digest(root.resolve()) != before


@pytest.mark.cluster
def test_inputs_the_driver_holds_become_the_same_records_in_chunks(ray_session, tree):
    from ecgad.inputs import list_inputs
    from ecgad.ray.data import chunks_dataset

    root, records = tree
    chunks = chunks_dataset(list_inputs(root), CHUNK).take_all()
    assert [p for c in sorted(chunks, key=lambda c: c["paths"][0]) for p in c["paths"]] \
        == [str(root / rel) for rel in records]
    assert all(c["n_paths"] == len(c["paths"]) == len(c["record_ids"]) <= CHUNK for c in chunks)
