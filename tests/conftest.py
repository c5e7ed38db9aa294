"""Shared fixtures (the real sample data, read in place; a local Ray session) and the marker rule for them."""

from __future__ import annotations

from pathlib import Path

import pytest

from ecgad.settings import reference_mcf_dir, sample_data_dir


@pytest.fixture(scope="session")
def sample_data() -> Path:
    """``../shared/data`` (or ``ECGAD_SAMPLE_DATA``); tests that need it skip, saying why, where it is absent."""
    root = sample_data_dir()
    if not (root / "ptbxl" / "ptbxl_database.csv").is_file():
        pytest.skip(f"real sample data not found at {root} (set ECGAD_SAMPLE_DATA)")
    return root


@pytest.fixture(scope="session")
def reference_mcf() -> Path:
    root = reference_mcf_dir()
    if not (root / "forward.npz").is_file():
        pytest.skip(f"reference MCF fixture not found at {root} (set ECGAD_REFERENCE_MCF)")
    return root


#: Small, quiet local Ray sessions: 2 CPUs like CI, a modest object store so several can coexist.
RAY_TEST_INIT = {"num_cpus": 2, "object_store_memory": 512 * 2**20, "include_dashboard": False}


@pytest.fixture(scope="module")
def ray_session():
    """One local Ray session per test module (starting Ray costs seconds; per-test sessions would not fit CI)."""
    import ray

    ray.init(**RAY_TEST_INIT)
    try:
        yield ray
    finally:
        ray.shutdown()


def pytest_collection_modifyitems(config, items) -> None:
    """A test that uses `ray_session` starts Ray, so it must be marked ``cluster``: `make test-fast`
    (``-m "not cluster and not slow"``) relies on the marker to stay free of Ray. Refuse to run otherwise."""
    unmarked = [item.nodeid for item in items
                if "ray_session" in getattr(item, "fixturenames", ()) and item.get_closest_marker("cluster") is None]
    if unmarked:
        raise pytest.UsageError("these tests use the ray_session fixture but are not marked cluster "
                                f"(add `pytestmark = pytest.mark.cluster`): {unmarked}")
