"""Restoration masks (docs/method.md §3.2 for training, §4.1 for testing), as keep-multipliers.

A mask is a float vector over time, 1 where the model sees the sample and 0 where it is hidden; ``x * keep`` masks
all leads at once (zero is the middle of the [-1, 1] scale). Training and testing use different masks, as published:

- training: 30 of the 100 global patches of 48 samples, drawn at random, and one 144-sample beat block starting at
  a random index in [1, 334]; one draw per batch, shared by every sample in it;
- testing: 3 deterministic passes; pass j hides the 30 global windows of 48 samples starting at ``48j + 160k`` and
  the beat block ``[c_j, c_j + 100)`` with ``c = (20, 70, 120)``. Together the three passes hide 144 of every 160
  global samples and beat samples 20..219 (P wave and QRS; the T wave is never hidden at test time).

Training draws come from a caller's generator (``numpy.random.Generator`` or ``torch.Generator``), so a seeded
run draws the same masks on any device. (The test-time masks are `eval_masks`, not ``test_masks``, so that pytest
never mistakes them for a test.)
"""

from __future__ import annotations

import numpy as np
import torch

MASK_RATIO = 0.3
N_PATCHES = 100                 # the global input is cut into 100 patches of 48 samples
TEST_PASSES = 3                 # = 100 // 30, as the reference computes it
TEST_BEAT_BLOCK = 100           # the reference hard-codes 100 (its computed 144 is overwritten)
TEST_BEAT_STARTS = (20, 70, 120)


def train_masks(generator: np.random.Generator | torch.Generator, global_len: int = 4800, beat_len: int = 480
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """One training draw: keep-multipliers ``(global_len,)`` and ``(beat_len,)``, shared by the whole batch.

    Global: ``round(0.3 * 100)`` random patches of ``global_len / 100`` samples. Beat: one block of
    ``int(0.3 * beat_len)`` samples starting at a uniform index in ``[1, beat_len - block - 2]`` ([1, 334] at 480,
    the reference's ``randint(1, 334)``).
    """
    patch = global_len // N_PATCHES
    n_hidden = round(MASK_RATIO * N_PATCHES)
    block = int(MASK_RATIO * beat_len)
    last_start = beat_len - block - 2
    if isinstance(generator, torch.Generator):
        patches = torch.randperm(N_PATCHES, generator=generator)[:n_hidden].tolist()
        start = int(torch.randint(1, last_start + 1, (1,), generator=generator))
    else:
        patches = generator.choice(N_PATCHES, n_hidden, replace=False).tolist()
        start = int(generator.integers(1, last_start + 1))
    keep_global = torch.ones(N_PATCHES, patch)
    keep_global[patches] = 0
    keep_beat = torch.ones(beat_len)
    keep_beat[start:start + block] = 0
    return keep_global.reshape(-1), keep_beat


def eval_masks(global_len: int = 4800, beat_len: int = 480) -> tuple[torch.Tensor, torch.Tensor]:
    """The deterministic test passes: keep-multipliers ``(3, global_len)`` and ``(3, beat_len)``."""
    patch = global_len // N_PATCHES
    n_hidden = round(MASK_RATIO * N_PATCHES)
    interval = global_len // n_hidden                      # 160 at 4800
    keep_global = torch.ones(TEST_PASSES, global_len)
    keep_beat = torch.ones(TEST_PASSES, beat_len)
    for j, start in enumerate(TEST_BEAT_STARTS):
        for k in range(n_hidden):
            keep_global[j, patch * j + interval * k: patch * (j + 1) + interval * k] = 0
        keep_beat[j, start:start + TEST_BEAT_BLOCK] = 0
    return keep_global, keep_beat
