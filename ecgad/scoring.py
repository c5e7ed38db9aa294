"""Scoring: the published test protocol (the oracle) and the fast, batched `Scorer` that reproduces it.

The protocol (mcf-method.md §4). For every valid beat of a 10 s window and each of the 3 deterministic test passes
(`ecgad.masks.eval_masks`), one forward pass restores the masked global signal, the masked beat and (from the trend)
the global signal again; its error ``e`` and point maps come from `ecgad.objective`. The window score is the mean of
``e`` over passes and beats; the window map is the global + trend error averaged over passes and beats, plus the
beat errors summed into each beat's window and divided by 3, smoothed per lead by a Gaussian (sigma 15 samples).
`oracle_score_window` does exactly that, one forward pass at a time, as the reference did.

The `Scorer` gives the same numbers (float32 rounding apart) from far less work (decision 8):

- what does not depend on the beat is computed once: the trend and its encoding once per window, the masked global
  encoding once per window and pass (3 times, not 3 x beats), and the trend latent's share of the trend decoder's
  first layer once per window (that layer is affine in eval mode, so it splits over ``cat(f_g_out, f_t)``);
- only the beat encoder, the cross-attention and the decoders run per beat and pass, batched over many beats, passes
  and records at once under ``torch.inference_mode``;
- the decoders run as channels-last matrix products with eval-mode BatchNorm folded into the weights
  (`_FoldedDecoder`), which is the same function and cheaper than PyTorch's transposed convolutions on CPU.

``mode="fast"`` (documented on `Scorer`) trades exactness for another large factor.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter, gaussian_filter1d
from torch import nn

from ecgad.config import PrepConfig
from ecgad.masks import TEST_PASSES, eval_masks
from ecgad.model import MCF, Decoder, trend
from ecgad.objective import global_error_map, local_error_map, pass_errors
from ecgad.types import Prepared, Record, Rejection, Scores, Window

#: Gaussian smoothing of the anomaly map along time, per lead (samples at 500 Hz; 30 ms).
MAP_SIGMA = 15.0
MODES = ("full", "fast")


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


# -- the oracle: the published protocol, literally -----------------------------------------------------------------

def oracle_score_window(model: MCF, window_signal: np.ndarray, beat_peaks: Sequence[int],
                        cfg: PrepConfig = PrepConfig()) -> tuple[float, np.ndarray]:
    """The published test protocol on one prepared 10 s window: ``(score, anomaly map (12, 4800))``.

    ``window_signal`` is the filtered, min-maxed window ``(12, 5000)``; beats are cut around the R-peaks in
    ``beat_peaks`` that satisfy ``200 < r < 4400`` and min-maxed per lead, and every (beat, pass) gets its own
    forward pass at batch size 1, as in the reference; the map is smoothed lead by lead with
    ``scipy.ndimage.gaussian_filter`` (sigma 15), as in the reference. This is the yardstick the `Scorer` is tested
    against, not a production path. The model is put in eval mode; autograd is off (the reference built and dropped
    graphs, which changes no number).
    """
    model.eval()
    device = _device_of(model)
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


# -- decoders as matrix products -----------------------------------------------------------------------------------

def _bn_affine(bn: nn.BatchNorm1d | None, like: torch.Tensor, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode BatchNorm as ``x * scale + shift`` (identity when there is none)."""
    if bn is None:
        return like.new_ones(channels), like.new_zeros(channels)
    scale = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
    return scale, bn.bias.detach() - bn.running_mean * scale


def _im2col(latent: torch.Tensor, kernel: int) -> torch.Tensor:
    """``(B, C, T)`` -> ``(B * (T + kernel - 1), C * kernel)``: the zero-padded windows a stride-1 transposed
    convolution sums over, rows ordered (time), columns (channel, window position)."""
    cols = F.pad(latent, (kernel - 1, kernel - 1)).unfold(2, kernel, 1).transpose(1, 2)
    return cols.reshape(-1, latent.shape[1] * kernel)


class _FoldedDecoder:
    """An eval-mode `Decoder` as channels-last matrix products with its BatchNorms folded into the weights.

    Why: batched, these products run faster on CPU than ``ConvTranspose1d`` + ``BatchNorm1d``, and the first layer
    (transposed convolution + BN, nothing nonlinear in between) becomes one affine map ``_im2col(z) @ first_weight +
    first_bias`` whose rows belong to input channels, so a latent made of parts (``cat(f_g_out, f_t)``) can be
    multiplied part by part. Same function; only float32 rounding differs.

    - First layer, k15 stride 1 transposed convolution: ``out[t] = sum_s W[:, :, s]^T z[t - s]``, a correlation of
      the zero-padded latent with the flipped kernel.
    - Stride-2 k4 pad-1 transposed convolutions: ``out[2m-1] = x[m-1] W2 + x[m] W0`` and
      ``out[2m] = x[m-1] W3 + x[m] W1``. With ``x`` padded by one zero row at each end, the row pairs
      ``(2m-1, 2m)``, ``m = 0..L``, are two matrix products over ``x[m-1]`` and ``x[m]``; viewed as ``(B, 2L+2, C)``
      the result is exactly the next layer's zero-padded input once its two end rows (``out[-1]``, ``out[2L]``) are
      zeroed, so no activation is copied or padded again.
    """

    def __init__(self, decoder: Decoder) -> None:
        layers = list(decoder.main)
        convs = [(i, m.weight.detach()) for i, m in enumerate(layers) if isinstance(m, nn.ConvTranspose1d)]
        bns = [layers[i + 1] if isinstance(layers[i + 1], nn.BatchNorm1d) else None for i, _ in convs]
        (_, first), *ups = convs
        scale, shift = _bn_affine(bns[0], first, first.shape[1])
        self.kernel = first.shape[2]
        #: rows (input channel, window position), matching `_im2col`; the kernel flipped for a correlation
        self.first_weight = (first * scale[:, None]).flip(2).transpose(1, 2).reshape(-1, first.shape[1])
        self.first_bias = shift
        self.ups = []
        for (_, weight), bn in zip(ups, bns[1:]):
            scale, shift = _bn_affine(bn, weight, weight.shape[1])
            scale = scale.repeat(2)
            from_previous = torch.cat([weight[:, :, 2], weight[:, :, 3]], dim=1) * scale   # x[m-1] -> (2m-1, 2m)
            from_current = torch.cat([weight[:, :, 0], weight[:, :, 1]], dim=1) * scale    # x[m]   -> (2m-1, 2m)
            self.ups.append((from_previous, from_current, shift.repeat(2)))

    def first_rows(self, channels: slice) -> torch.Tensor:
        """The rows of `first_weight` that multiply the latent channels ``channels``."""
        return self.first_weight[channels.start * self.kernel:channels.stop * self.kernel]

    def rest(self, first_linear: torch.Tensor) -> torch.Tensor:
        """The first layer's linear part ``(B, T, C)`` -> the restoration ``(B, samples, out_channels)``."""
        x = F.pad(torch.relu_(first_linear + self.first_bias), (0, 0, 1, 1))
        for i, (from_previous, from_current, bias) in enumerate(self.ups):
            batch, rows, _ = x.shape
            out = torch.baddbmm(bias, x[:, :-1], from_previous.expand(batch, -1, -1))
            out.baddbmm_(x[:, 1:], from_current.expand(batch, -1, -1))
            x = out.view(batch, 2 * (rows - 1), -1)
            if i < len(self.ups) - 1:
                x.relu_()
                x[:, 0] = 0
                x[:, -1] = 0
        return torch.tanh(x[:, 1:-1])


class _FoldedMCF:
    """The three decoders of an eval-mode `MCF`, folded (`_FoldedDecoder`) from its current weights.

    The global and trend decoders both start from ``f_g_out``: their first layers share one im2col and one matrix
    product. The trend decoder's first layer also sees ``f_t``, whose share (`trend_share`) is computed once per
    window and added, instead of once per beat.
    """

    def __init__(self, model: MCF) -> None:
        hidden = model.config.hidden
        self.global_decoder = _FoldedDecoder(model.global_decoder)
        self.local_decoder = _FoldedDecoder(model.local_decoder)
        self.trend_decoder = _FoldedDecoder(model.trend_decoder)
        self.width = self.global_decoder.first_weight.shape[1]
        self.global_and_trend_weight = torch.cat([self.global_decoder.first_weight,
                                                  self.trend_decoder.first_rows(slice(0, hidden))], dim=1)
        self.trend_latent_weight = self.trend_decoder.first_rows(slice(hidden, 2 * hidden))

    def trend_share(self, f_t: torch.Tensor) -> torch.Tensor:
        """``f_t``'s part of the trend decoder's first layer, ``(B, T + 14, width)``."""
        kernel = self.trend_decoder.kernel
        return (_im2col(f_t, kernel) @ self.trend_latent_weight).view(len(f_t), f_t.shape[2] + kernel - 1, -1)

    def restore_global(self, f_g_out: torch.Tensor, trend_share: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(global restoration (B, 4800, 13), trend restoration (B, 4800, 12))``, channels-last."""
        kernel = self.global_decoder.kernel
        both = (_im2col(f_g_out, kernel) @ self.global_and_trend_weight).view(len(f_g_out), -1, 2 * self.width)
        return (self.global_decoder.rest(both[..., :self.width]),
                self.trend_decoder.rest(both[..., self.width:] + trend_share))

    def restore_local(self, f_l_out: torch.Tensor) -> torch.Tensor:
        """The beat restoration ``(B, 480, 13)``, channels-last."""
        kernel = self.local_decoder.kernel
        first = (_im2col(f_l_out, kernel) @ self.local_decoder.first_weight).view(len(f_l_out), -1, self.width)
        return self.local_decoder.rest(first)


# -- anomaly maps on the record's own time axis ---------------------------------------------------------------------

def stitch_window_maps(maps: Sequence[np.ndarray], offsets: Sequence[int], n_samples: int,
                       cfg: PrepConfig = PrepConfig()) -> np.ndarray:
    """Window maps ``(12, 4800)`` -> one ``(12, n_samples)`` map on the record's 500 Hz axis.

    Window map sample ``i`` is record sample ``offset + 100 + i``. Where windows overlap their maps are averaged;
    samples no window scores (the first and last 100, and any gap left by a skipped window) take the value of the
    nearest scored sample at the ends and a linear blend of the two nearest inside.
    """
    total = np.zeros((maps[0].shape[0], n_samples))
    count = np.zeros(n_samples)
    for window_map, offset in zip(maps, offsets, strict=True):
        start = int(offset) + cfg.global_start
        total[:, start:start + window_map.shape[1]] += window_map
        count[start:start + window_map.shape[1]] += 1
    covered = np.flatnonzero(count)
    averaged = total[:, covered] / count[covered]
    every = np.arange(n_samples)
    return np.stack([np.interp(every, covered, lead) for lead in averaged]).astype(np.float32)


def to_source_axis(anomaly_map: np.ndarray, fs: float, source_fs: float, source_samples: int) -> np.ndarray:
    """A ``(12, n)`` map at ``fs`` (500 Hz) -> ``(12, source_samples)`` at ``source_fs``, by linear interpolation.

    Source sample ``i`` is at time ``i / source_fs``, i.e. at position ``i * fs / source_fs`` on the model axis
    (the resampling in `ecgad.preprocess` keeps sample 0 at time 0). Linear interpolation rather than a polyphase
    resampler because the map is non-negative and already smooth (Gaussian, sigma 30 ms): it never rings below
    zero, is exact at coinciding samples, and at 100 Hz and up its 30 ms detail is far above the Nyquist limit.
    """
    n = anomaly_map.shape[1]
    if source_samples == n and source_fs == fs:
        return anomaly_map.astype(np.float32, copy=False)
    positions = np.arange(source_samples) * (fs / source_fs)
    grid = np.arange(n)
    return np.stack([np.interp(positions, grid, lead) for lead in anomaly_map]).astype(np.float32)


# -- the production scorer -------------------------------------------------------------------------------------------

class _Accumulator:
    """Per-window sums of the restoration errors and maps of one group of windows, on the scoring device."""

    def __init__(self, n_windows: int, n_leads: int, cfg: PrepConfig, with_maps: bool, device: torch.device):
        zeros = dict(dtype=torch.float64, device=device)
        self.global_error, self.global_count = torch.zeros(n_windows, **zeros), torch.zeros(n_windows, **zeros)
        self.local_error, self.local_count = torch.zeros(n_windows, **zeros), torch.zeros(n_windows, **zeros)
        self.with_maps = with_maps
        if with_maps:
            self.global_map = torch.zeros(n_windows, cfg.global_len, n_leads, device=device)
            self.local_map = torch.zeros(n_windows * cfg.window, n_leads, device=device)   # whole windows, flattened

    def add_global(self, error_map: torch.Tensor, window: torch.Tensor) -> None:
        """``error_map (B, 4800, leads)`` of passes in windows ``window (B,)``."""
        self.global_error.index_add_(0, window, error_map.mean((1, 2), dtype=torch.float64))
        self.global_count.index_add_(0, window, torch.ones_like(window, dtype=torch.float64))
        if self.with_maps:
            self.global_map.index_add_(0, window, error_map)

    def add_local(self, error_map: torch.Tensor, window: torch.Tensor, rows: torch.Tensor) -> None:
        """``error_map (B, 480, leads)`` of beats in ``window``; ``rows (B, 480)`` index the flattened windows."""
        self.local_error.index_add_(0, window, error_map.mean((1, 2), dtype=torch.float64))
        self.local_count.index_add_(0, window, torch.ones_like(window, dtype=torch.float64))
        if self.with_maps:
            self.local_map.index_add_(0, rows.flatten(), error_map.flatten(0, 1))

    def result(self, cfg: PrepConfig) -> tuple[np.ndarray, np.ndarray | None]:
        """Window scores, and window maps ``(n, 12, 4800)`` when maps were asked for. The maps are smoothed along
        time in one ``gaussian_filter1d`` call: for each lead that is what the oracle's 1-D ``gaussian_filter``
        computes (it dispatches to it)."""
        scores = self.global_error / self.global_count + self.local_error / self.local_count
        if not self.with_maps:
            return scores.cpu().numpy(), None
        local = self.local_map.view(len(scores), cfg.window, -1)[:, cfg.global_start:cfg.global_end]
        maps = self.global_map / self.global_count[:, None, None].float() + local / TEST_PASSES
        return scores.cpu().numpy(), gaussian_filter1d(maps.transpose(1, 2).cpu().numpy(), MAP_SIGMA, axis=-1)


class Scorer:
    """Scores prepared windows, prepared records or raw records with the published protocol, fast.

    ``mode="full"`` reproduces `oracle_score_window` (scores and maps to float32 rounding, ~1e-6 relative) with the
    work that does not depend on the beat done once (module docstring) and everything batched: up to ``max_batch``
    (beat, pass) pairs per forward step, over as many records as are passed at once.

    ``mode="fast"``: the beat branch stays exact (every beat, every pass: the beat encoder, the cross-attention and
    the beat decoder are cheap), but the global and trend decoders, ~85 % of the per-beat work, run once per window
    and pass instead of once per beat and pass, on the attention-updated global latent ``f_g_out`` *averaged over
    the window's beats*. The beat enters ``f_g_out`` only as one of 137 tokens (through the attention and
    ``φ_g``), so the global and trend restorations of one window's beats are close; the per-beat local errors,
    which carry beat-level anomalies, are kept exactly. Score and map are then ``mean_j(global + trend error of
    pass j) + mean_{beat, j}(local error)``: the full formula with the beat average moved inside the global and
    trend decoders (exact for a one-beat window, an approximation otherwise).

    The model is used in eval mode and put back in its previous mode afterwards, and the decoders are folded from its
    current weights at every call, so a scorer can be kept across training epochs.
    """

    def __init__(self, model: MCF, prep_config: PrepConfig = PrepConfig(), threshold: float = math.nan,
                 device: str | torch.device | None = None, mode: str = "full", max_batch: int | None = None,
                 model_version: str | None = None) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.device = torch.device(device) if device is not None else _device_of(model)
        self.model = model.to(self.device)
        self.prep_config = prep_config
        self.threshold = float(threshold)
        self.mode = mode
        #: (beat, pass) pairs per forward step; windows are taken ``max_batch // 3`` at a time.
        self.max_batch = int(max_batch or (512 if self.device.type == "cuda" else 32))
        self._model_version = model_version

    @classmethod
    def from_checkpoint(cls, directory: str | Path, device: str | torch.device | None = None, mode: str = "full",
                        max_batch: int | None = None) -> "Scorer":
        from ecgad.checkpoint import load_checkpoint

        checkpoint = load_checkpoint(directory, device=device)
        return cls(checkpoint.model, checkpoint.prep_config, checkpoint.threshold, device=device, mode=mode,
                   max_batch=max_batch, model_version=checkpoint.model_version)

    @property
    def model_version(self) -> str:
        """The checkpoint's version, or (for a bare model) the first 12 hex digits of a SHA-256 of its weights."""
        if self._model_version:
            return self._model_version
        digest = hashlib.sha256()
        for name, tensor in self.model.state_dict().items():
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()[:12]

    # -- public entry points --

    def score_windows(self, windows: Sequence[Window]) -> tuple[np.ndarray, np.ndarray]:
        """Window scores ``(n,)`` and maps ``(n, 12, 4800)`` (samples 100..4900 of each window, as the oracle)."""
        return self._score_windows(windows, with_maps=True)

    def score_prepared(self, prepared: Sequence[Prepared], with_maps: bool = True) -> list[Scores]:
        """One `Scores` per prepared record, all windows of all records scored in shared batches.

        The record score is the mean over every valid beat of every window (beats in overlapping windows count in
        each). The map is stitched from the window maps (`stitch_window_maps`) and brought back to the input's
        own rate and length (`to_source_axis`); ``r_peaks`` are the scored beats' R-peaks on that axis too.
        """
        for record in prepared:
            if record.n_beats == 0:
                raise Rejection("no_beats", record.record_id)
        windows = [window for record in prepared for window in record.windows]
        window_scores, window_maps = self._score_windows(windows, with_maps)
        results, first = [], 0
        fs = self.prep_config.fs
        for record in prepared:
            last = first + len(record.windows)
            n_beats = np.array([w.n_beats for w in record.windows], dtype=np.float64)
            score = float(np.dot(window_scores[first:last], n_beats) / n_beats.sum())
            anomaly_map = None
            if window_maps is not None:
                stitched = stitch_window_maps(window_maps[first:last], [w.offset for w in record.windows],
                                              record.n_samples_model, self.prep_config)
                anomaly_map = to_source_axis(stitched, fs, record.source_fs, record.source_samples)
            peaks = np.concatenate([w.offset + w.beat_peaks for w in record.windows])
            results.append(Scores(
                record_id=record.record_id, pred_score=score, pred_label=bool(score > self.threshold),
                threshold=self.threshold, anomaly_map=anomaly_map,
                r_peaks=np.unique(np.round(peaks * record.source_fs / fs).astype(np.int64)),
                beats_used=record.n_beats, windows_scored=len(record.windows),
                warnings=list(record.metadata.get("warnings", []))))
            first = last
        return results

    def score_records(self, records: Sequence[Record], with_maps: bool = True) -> list[Scores | Rejection]:
        """Prepare and score raw records; a record that cannot be prepared comes back as its `Rejection`, in place,
        so one bad record never fails the batch. (Callers validate first, as the CLI and the service do.)"""
        from ecgad.preprocess import prepare

        outcomes: list[Scores | Rejection | None] = []
        prepared = []
        for record in records:
            try:
                prepared.append(prepare(record, self.prep_config))
                outcomes.append(None)
            except Rejection as rejection:
                outcomes.append(rejection)
        scored = iter(self.score_prepared(prepared, with_maps))
        return [next(scored) if outcome is None else outcome for outcome in outcomes]

    # -- the batched protocol --

    def _score_windows(self, windows: Sequence[Window], with_maps: bool) -> tuple[np.ndarray, np.ndarray | None]:
        for window in windows:
            if window.n_beats == 0:
                raise Rejection("no_beats", f"window at sample {window.offset}")
        model = self.model
        was_training = model.training
        model.eval()
        try:
            with torch.inference_mode():
                folded = _FoldedMCF(model)
                per_group = max(1, self.max_batch // TEST_PASSES)
                results = [self._score_group(windows[i:i + per_group], folded, with_maps)
                           for i in range(0, len(windows), per_group)]
        finally:
            model.train(was_training)
        if not results:
            return np.zeros(0), (np.zeros((0, model.config.n_leads, self.prep_config.global_len), np.float32)
                                 if with_maps else None)
        scores = np.concatenate([r[0] for r in results])
        return scores, (np.concatenate([r[1] for r in results]) if with_maps else None)

    def _chunks(self, n: int):
        return (slice(i, min(i + self.max_batch, n)) for i in range(0, n, self.max_batch))

    def _batched(self, fn, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([fn(x[chunk]) for chunk in self._chunks(len(x))])

    def _score_group(self, windows: Sequence[Window], folded: _FoldedMCF, with_maps: bool
                     ) -> tuple[np.ndarray, np.ndarray | None]:
        model, cfg, device, passes = self.model, self.prep_config, self.device, TEST_PASSES
        keep_global, keep_beat = (m.to(device) for m in eval_masks(cfg.global_len, cfg.beat_len))

        def tensor(arrays: list[np.ndarray]) -> torch.Tensor:
            return torch.from_numpy(np.ascontiguousarray(np.concatenate(arrays), dtype=np.float32)).to(device)

        x = tensor([w.signal[None, :, cfg.global_start:cfg.global_end] for w in windows])     # (W, 12, 4800)
        beats = tensor([w.beats for w in windows])                                            # (N, 12, 480)
        n_beats = torch.tensor([w.n_beats for w in windows], device=device)
        peaks = torch.from_numpy(np.concatenate([w.beat_peaks for w in windows])).to(device)

        # Once per window and pass: the masked global latent (index w * 3 + j). Once per window (or per window and
        # pass when the trend sees the masked signal): the trend latent's share of the trend decoder's first layer.
        global_masked = (x[:, None] * keep_global[:, None]).flatten(0, 1)
        f_g = self._batched(model.encode_global, global_masked)
        trend_source = global_masked if model.config.trend_from_masked else x
        f_t = self._batched(lambda s: model.encode_trend(trend(s)), trend_source)
        trend_share = folded.trend_share(f_t)

        # The (beat, pass) pairs, index b * 3 + j.
        beat = torch.arange(len(beats), device=device).repeat_interleave(passes)
        pass_ = torch.arange(passes, device=device).repeat(len(beats))
        window = torch.arange(len(windows), device=device).repeat_interleave(n_beats)[beat]
        global_index = window * passes + pass_
        trend_index = global_index if model.config.trend_from_masked else window

        x_last = x.transpose(1, 2).contiguous()           # channels-last targets, like the folded decoders' output
        beats_last = beats.transpose(1, 2).contiguous()
        beat_rows = (window * cfg.window + peaks[beat] - cfg.beat_before)[:, None] + torch.arange(cfg.beat_len,
                                                                                                  device=device)
        acc = _Accumulator(len(windows), model.config.n_leads, cfg, with_maps, device)

        def restore_global(f_g_out: torch.Tensor, trend_rows: torch.Tensor, target_window: torch.Tensor) -> None:
            gen, gen_trend = folded.restore_global(f_g_out, trend_share[trend_rows])
            acc.add_global(global_error_map(gen[..., :-1], gen[..., -1:], gen_trend, x_last[target_window]),
                           target_window)

        f_g_sum = torch.zeros_like(f_g) if self.mode == "fast" else None
        for chunk in self._chunks(len(beat)):
            f_l = model.encode_local(beats[beat[chunk]] * keep_beat[pass_[chunk], None])
            f_g_out, f_l_out = model.cross_attend(f_g[global_index[chunk]], f_l)
            gen = folded.restore_local(f_l_out)
            acc.add_local(local_error_map(gen[..., :-1], gen[..., -1:], beats_last[beat[chunk]]), window[chunk],
                          beat_rows[chunk])
            if f_g_sum is None:
                restore_global(f_g_out, trend_index[chunk], window[chunk])
            else:
                f_g_sum.index_add_(0, global_index[chunk], f_g_out)
        if f_g_sum is not None:   # fast mode: one global and trend restoration per window and pass
            f_g_mean = f_g_sum / n_beats.repeat_interleave(passes)[:, None, None]
            for chunk in self._chunks(len(f_g_mean)):
                rows = torch.arange(chunk.start, chunk.stop, device=device)
                restore_global(f_g_mean[chunk], rows if model.config.trend_from_masked else rows // passes,
                               rows // passes)
        return acc.result(cfg)


def score_isolated(scorer: Scorer, prepared: Sequence[Prepared], with_maps: bool = True) -> list[Scores | Exception]:
    """``scorer.score_prepared``, but a record that makes the model raise costs only itself: when the batch call
    fails, each record is scored alone, and a record's own exception takes its place in the result. Batch jobs use
    it so that one bad record never fails a block; nothing costs more than one call while nothing fails."""
    try:
        return list(scorer.score_prepared(prepared, with_maps=with_maps)) if prepared else []
    except Exception as exc:
        if len(prepared) == 1:
            return [exc]
    return [outcome for record in prepared for outcome in score_isolated(scorer, [record], with_maps)]
