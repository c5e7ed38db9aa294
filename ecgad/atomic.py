"""Replacing a directory whole, so that a reader never sees half of an old one and half of a new one."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path


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
