"""Path options as locations (`ecgad.storage`): URIs never go through pathlib, local paths behave as before, the S3
endpoint comes from the standard variable, and the multi-node refusal names the nodes and paths. (The chain on a
real S3 API: tests/test_s3_chain.py.)"""

from __future__ import annotations

from pathlib import Path

import pyarrow.fs as pafs
import pytest

from ecgad import storage
from ecgad.atomic import write_json
from ecgad.tree import ArrowTree, LocalTree, tree_of


def test_a_uri_is_never_made_a_local_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert storage.location("s3://bucket/data/") == "s3://bucket/data"
    assert storage.join("s3://bucket/runs", "mcf", "best") == "s3://bucket/runs/mcf/best"
    assert storage.parent("s3://bucket/runs/mcf/best") == "s3://bucket/runs/mcf"
    assert isinstance(tree_of("s3://bucket/data"), ArrowTree)
    # local paths keep their meaning: absolute, resolved, Path objects, joined as Paths
    assert storage.location("data") == tmp_path.resolve() / "data"
    assert storage.join(Path("/x"), "y") == Path("/x/y")
    assert storage.location("file:///tmp/x") == Path("/tmp/x").resolve()
    assert isinstance(tree_of("data"), LocalTree)


def test_the_s3_endpoint_comes_from_the_standard_variables(monkeypatch):
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    fs, path = storage.filesystem("s3://bucket/key/x.parquet")
    options = fs.__reduce__()[1][0]
    assert path == "bucket/key/x.parquet"
    assert (options["endpoint_override"], options["scheme"]) == ("127.0.0.1:9", "http")
    assert options["access_key"] is None   # credentials stay with the SDK's chain on each node
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "https://minio.example:9000")   # the service-specific one wins
    assert storage.filesystem("s3://bucket/k")[0].__reduce__()[1][0]["endpoint_override"] == "minio.example:9000"


def test_local_locations_read_and_write_through_the_same_calls(tmp_path):
    target = tmp_path / "out" / "a.json"
    write_json(str(target), {"a": 1})
    assert storage.is_file(target) and storage.is_dir(tmp_path / "out")
    assert storage.read_text(target) == '{\n  "a": 1\n}\n'
    assert storage.list_names(tmp_path / "out") == ["a.json"] and storage.list_names(tmp_path / "none") == []
    with pytest.raises(storage.StorageError, match="no such file"):
        storage.read_bytes(tmp_path / "missing")
    with storage.local_copy(str(target)) as local:
        assert local == str(target)   # a local file is read in place
    assert isinstance(storage.filesystem(target)[0], pafs.LocalFileSystem)


def test_a_path_some_node_cannot_see_is_refused_with_the_reason():
    pytest.importorskip("ray")
    from ecgad.ray.paths import refusal

    assert refusal({"10.0.0.1 (aa)": [], "10.0.0.2 (bb)": []}, 2) is None
    message = refusal({"10.0.0.1 (aa)": [], "10.0.0.2 (bb)": ["/data/ptbxl"]}, 2)
    assert "node 10.0.0.2 (bb) does not see /data/ptbxl" in message
    assert "shared storage mounted at the same path on every node" in message and "s3://" in message
    assert "10.0.0.1" not in message
