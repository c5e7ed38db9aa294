"""Process-wide settings read from the environment, in one place."""

from __future__ import annotations

import os
from pathlib import Path

#: Repository root (the folder holding ``pyproject.toml``) when running from a checkout.
REPO_ROOT = Path(__file__).resolve().parent.parent


def sample_data_dir() -> Path:
    """The real sample ECGs used by tests and benchmarks, read in place (never copied into the repo).

    ``ECGAD_SAMPLE_DATA`` overrides the default ``../shared/data`` next to the repository root.
    """
    return Path(os.environ.get("ECGAD_SAMPLE_DATA", REPO_ROOT.parent / "shared" / "data")).resolve()


def reference_mcf_dir() -> Path:
    """The published-implementation conformance fixture (``ECGAD_REFERENCE_MCF``, default ``../shared/reference-mcf``)."""
    return Path(os.environ.get("ECGAD_REFERENCE_MCF", REPO_ROOT.parent / "shared" / "reference-mcf")).resolve()
