"""Keep freed memory in the process instead of handing it back to the kernel after every scoring step.

Why: PyTorch's CPU allocator takes each tensor straight from the C library's ``malloc``, and glibc serves a block
above its mmap threshold (at most 32 MiB, raised on the fly) with a fresh ``mmap`` and returns it with ``munmap``
when the tensor dies. The scorer's decoder activations are 10-40 MiB per step, so every step paid the kernel to map
and zero those pages again. Measured with `bench/score.py`'s records (paper model, full mode, 8 records): 162,000
minor page faults and 0.26 s of system time per 1.3 s call; with this setting, 0 faults and 0.96 s instead of 1.10 s
per call in the same session, for a resident size of 590 MiB instead of 530. Raising the mmap and trim thresholds
above those sizes lets ``free`` keep the pages in the heap for the next step; the process's memory then stays at its
peak instead of shrinking between calls, which a long-lived scoring process (service replica, archive actor,
evaluation) wants anyway. It is the effect of running under jemalloc or tcmalloc, without asking users to
``LD_PRELOAD`` anything. `ecgad.scoring.Scorer` applies it on CPU.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

#: bytes: above the largest activation of one scoring step at the default batch (paper model: ~40 MiB)
MMAP_THRESHOLD = 256 * 2 ** 20
#: bytes of free heap top kept before giving memory back to the kernel
TRIM_THRESHOLD = 2 * MMAP_THRESHOLD
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3   # glibc's mallopt parameters (malloc.h)


@functools.cache
def retain_freed_memory() -> bool:
    """Make glibc keep freed blocks up to `MMAP_THRESHOLD` in the heap, once per process. True when applied; False
    where the C library is not glibc (musl, macOS, Windows), where nothing changes."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
