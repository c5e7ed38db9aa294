"""`ecgad.memory.retain_freed_memory`: a freed scoring-sized tensor's pages are reused, not mapped and zeroed anew.

Counted in minor page faults (what the kernel does when a fresh mapping is first touched), in fresh interpreters, so
the process-wide allocator setting of one case cannot leak into the other.
"""

from __future__ import annotations

import ctypes.util
import platform
import subprocess
import sys

import pytest

PROBE = """
import resource, sys
import torch
if sys.argv[1] == "retain":
    from ecgad.memory import retain_freed_memory
    assert retain_freed_memory()
x, w = torch.randn(32, 1201, 64), torch.randn(64, 256)
def faults_of_four_steps():
    # a decoder layer's worth of work: a 40 MiB activation made from another, both freed at once
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(4):
        torch.relu(x @ w).sum()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
faults_of_four_steps()                 # the first steps always map fresh pages
print(min(faults_of_four_steps() for _ in range(3)))
"""


def _faults(setting: str) -> int:
    out = subprocess.run([sys.executable, "-c", PROBE, setting], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(platform.system() != "Linux" or "musl" in (ctypes.util.find_library("c") or ""),
                    reason="mallopt thresholds are glibc's")
def test_retained_memory_is_reused_without_page_faults():
    default, retained = _faults("default"), _faults("retain")
    assert default > 10_000, f"four steps over 40 MiB activations without faulting fresh pages? ({default})"
    assert retained < default / 100, (default, retained)
