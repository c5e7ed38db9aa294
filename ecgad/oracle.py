"""The published test protocol, literally: the yardstick `ecgad.scoring.Scorer` is tested against.

The protocol (docs/method.md §4.1). For every valid beat of a 10 s window and each of the 3 deterministic test
passes (`ecgad.masks.eval_masks`), one forward pass restores the masked global signal, the masked beat and (from the
trend) the global signal again; its error ``e`` and point maps come from `ecgad.objective`. The window score is the
mean of ``e`` over passes and beats; the window map is the global + trend error averaged over passes and beats, plus
the beat errors summed into each beat's window and divided by 3, smoothed per lead by a Gaussian (sigma 15 samples).
`oracle_score_window` does exactly that, one forward pass at a time, as the reference did. It is kept as written
there, not made fast: it is what "the same numbers" means (tests/test_conformance.py, tests/test_scoring.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from scipy.ndimage import gaussian_filter

from ecgad.config import PrepConfig
from ecgad.maps import MAP_SIGMA
from ecgad.masks import TEST_PASSES, eval_masks
from ecgad.model import MCF, device_of
from ecgad.objective import global_error_map, local_error_map, pass_errors
from ecgad.types import Rejection


def oracle_score_window(model: MCF, window_signal: np.ndarray, beat_peaks: Sequence[int],
                        cfg: PrepConfig = PrepConfig()) -> tuple[float, np.ndarray]:
    """The published test protocol on one prepared 10 s window: ``(score, anomaly map (12, 4800))``.

    ``window_signal`` is the filtered, min-maxed window ``(leads, samples)`` = ``(12, 5000)``, float32; beats are
    cut around the R-peaks in ``beat_peaks`` that satisfy ``200 < r < 4400`` and min-maxed per lead, and every
    (beat, pass) gets its own forward pass at batch size 1, as in the reference; the map is smoothed lead by lead
    with ``scipy.ndimage.gaussian_filter`` (sigma 15), as in the reference. Not a production path. The model is put
    in eval mode; autograd is off (the reference built and dropped graphs, which changes no number).
    """
    model.eval()
    device = device_of(model)
    keep_global, keep_beat = (m.to(device) for m in eval_masks(cfg.global_len, cfg.beat_len))
    signal = torch.as_tensor(np.asarray(window_signal), dtype=torch.float32, device=device)
    x_global = signal[None, :, cfg.global_start:cfg.global_end]
    peaks = [int(r) for r in beat_peaks if cfg.peak_min < r < cfg.peak_max]
    if not peaks:
        raise Rejection("no_beats")
    global_map = torch.zeros_like(x_global[0])
    local_map = torch.zeros_like(signal)
    beat_scores = []
    with torch.no_grad():
        for r in peaks:
            beat = signal[None, :, r - cfg.beat_before:r + cfg.beat_after]
            lo, hi = beat.amin(-1, keepdim=True), beat.amax(-1, keepdim=True)
            beat = 2 * (beat - lo) / (hi - lo) - 1
            errors = []
            for j in range(TEST_PASSES):
                global_masked = x_global * keep_global[j]
                out = model(global_masked, beat * keep_beat[j], model.trend_for(x_global, global_masked))
                errors.append(pass_errors(out, x_global, beat).item())
                global_map += global_error_map(out.gen_global, out.global_logvar, out.gen_trend, x_global)[0]
                local_map[:, r - cfg.beat_before:r + cfg.beat_after] += local_error_map(
                    out.gen_local, out.local_logvar, beat)[0]
            beat_scores.append(float(np.mean(errors)))
    anomaly = (global_map / (TEST_PASSES * len(peaks))
               + local_map[:, cfg.global_start:cfg.global_end] / TEST_PASSES).cpu().numpy()
    anomaly = np.stack([gaussian_filter(lead, MAP_SIGMA) for lead in anomaly])
    return float(np.mean(beat_scores)), anomaly
