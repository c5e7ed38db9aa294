"""Realistic normal 12-lead ECGs from DeepFake ECG (``deepfake-ecg`` on PyPI, MIT; Thambawita et al., Sci. Rep. 2021).

Why: real normals are what the model must learn, and full PTB-XL is not always at hand. DeepFake ECG is a
Pulse2Pulse GAN trained on 7,233 real normal 12-lead ECGs whose generator weights ship inside the wheel, so any
number of realistic normals can be drawn offline. Its own ``generate()`` writes text files one ECG at a time and
loads the weights with an unrestricted ``torch.load``; here we call its generator class directly, load the weights
with ``weights_only=True``, seed the noise and batch it.

The generator maps uniform noise ``(B, 8, 5000)`` to ``tanh`` outputs ``(B, 8, 5000)``: 10 s at 500 Hz on the
independent leads I, II, V1..V6 (the package's order, ``ecgad.synth.INDEPENDENT_LEADS``); ``x 6000`` gives uV, so
``x 6`` gives mV. III, aVR, aVL, aVF are derived by Einthoven's and Goldberger's relations, as an electrocardiograph
derives them.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from functools import lru_cache
from importlib import resources

import numpy as np
import torch

from ecgad.inject import inject
from ecgad.synth import SynthECG, derive_limb_leads
from ecgad.types import LEADS

#: DeepFake ECG's fixed geometry: 8 independent leads, 10 s at 500 Hz.
DEEPFAKE_FS = 500
DEEPFAKE_SAMPLES = 5000
DEEPFAKE_LEADS = 8
#: Generator output -> mV (the package documents ``x 6000`` as uV).
OUTPUT_TO_MV = 6.0
#: Records drawn per forward pass: large enough to amortize the convolutions, small enough for a laptop's memory.
BATCH = 32


@lru_cache(maxsize=1)
def load_generator() -> torch.nn.Module:
    """The Pulse2Pulse generator with the wheel's weights, in eval mode on the CPU (cached: 42 MB to read)."""
    from deepfakeecg.models import Generator

    weights = resources.files("deepfakeecg") / "checkpoints" / "g_stat.pt"
    with warnings.catch_warnings():
        # Its constructor calls the deprecated nn.init.kaiming_normal; the weights are overwritten just below.
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", UserWarning)
        generator = Generator()
    with resources.as_file(weights) as path:
        state = torch.load(path, map_location="cpu", weights_only=True)
    generator.load_state_dict(state["stat_dict"])
    return generator.eval()


def generate_batch(seeds: list[int]) -> np.ndarray:
    """One normal ECG per seed, ``(len(seeds), 12, 5000)`` float32 mV in ``LEADS`` order, 500 Hz.

    Each record's noise comes from its own ``torch.Generator`` seeded with its seed, so a record depends on its
    seed only, not on which batch it was drawn in (up to float rounding of batched convolutions).
    """
    noise = torch.stack([torch.empty(DEEPFAKE_LEADS, DEEPFAKE_SAMPLES).uniform_(
        -1.0, 1.0, generator=torch.Generator().manual_seed(int(seed))) for seed in seeds])
    with torch.inference_mode():
        x8 = load_generator()(noise).numpy().astype(np.float64) * OUTPUT_TO_MV
    return np.stack([derive_limb_leads(x) for x in x8]).astype(np.float32)


def generate(seeds: list[int], batch: int = BATCH) -> Iterator[np.ndarray]:
    """`generate_batch` over ``seeds`` in batches of ``batch``: one ``(12, 5000)`` float32 mV signal per seed."""
    for start in range(0, len(seeds), batch):
        yield from generate_batch(seeds[start:start + batch])


def deepfake_ecgs(seeds: list[int], anomalies: list[str | None]) -> Iterator[SynthECG]:
    """One DeepFake normal per seed, with ``anomalies[i]`` inserted by `ecgad.inject` (same seed) unless None:
    the records `ecgad.synth_dataset.write_dataset` writes for ``source="deepfake"``."""
    for seed, anomaly, signal in zip(seeds, anomalies, generate(seeds)):
        if anomaly is not None:
            yield inject(signal, anomaly, seed, fs=DEEPFAKE_FS)
            continue
        yield SynthECG(signal=signal, fs=float(DEEPFAKE_FS), lead_names=LEADS, mask=np.zeros(signal.shape, bool),
                       anomaly=None, r_peaks=np.zeros(0, np.int64), beat_types="", seed=int(seed),
                       details={"source": "deepfake-ecg"})
