"""Scoring: the batched `Scorer`, which reproduces the published protocol (`ecgad.oracle`) from far less work.

The `Scorer` gives the numbers of `ecgad.oracle.oracle_score_window` (float32 rounding apart; docs/method.md §4.2,
D8) because it does the same sums in a different order:

- what does not depend on the beat is computed once: the trend and its encoding once per window, the masked global
  encoding once per window and pass (3 times, not 3 x beats), and the trend latent's share of the trend decoder's
  first layer once per window (that layer is affine in eval mode, so it splits over ``cat(f_g_out, f_t)``);
- only the beat encoder, the cross-attention and the decoders run per beat and pass, batched over many beats, passes
  and records at once under ``torch.inference_mode``;
- the decoders run as channels-last matrix products with eval-mode BatchNorm folded into the weights
  (`ecgad.folded`), which is the same function and cheaper than PyTorch's transposed convolutions on CPU.

``mode="fast"`` (documented on `Scorer`; docs/method.md §4.3) trades exactness for another large factor. Window maps
become record maps on the input's own axis in `ecgad.maps`.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from ecgad.backends import check_backend, stages
from ecgad.config import PrepConfig
from ecgad.folded import FoldedMCF
from ecgad.maps import smooth, stitch_window_maps, to_source_axis
from ecgad.memory import retain_freed_memory
from ecgad.masks import TEST_PASSES, eval_masks
from ecgad.model import MCF, device_of, trend
from ecgad.objective import global_error_map, local_error_map
from ecgad.types import Prepared, Record, Rejection, Scores, Window

MODES = ("full", "fast")


def record_score(windows: Sequence[Window], window_scores: Sequence[float]) -> float:
    """A record's score from its windows' scores: the mean over every beat of every window (a window weighs its
    beats; beats in overlapping windows count in each)."""
    n_beats = np.array([w.n_beats for w in windows], dtype=np.float64)
    return float(np.dot(window_scores, n_beats) / n_beats.sum())


class _Accumulator:
    """Per-window sums of the restoration errors and maps of one group of windows, on the scoring device."""

    def __init__(self, n_windows: int, n_leads: int, cfg: PrepConfig, with_maps: bool, device: torch.device):
        zeros = dict(dtype=torch.float64, device=device)
        self.global_error, self.global_count = torch.zeros(n_windows, **zeros), torch.zeros(n_windows, **zeros)
        self.local_error, self.local_count = torch.zeros(n_windows, **zeros), torch.zeros(n_windows, **zeros)
        self.cfg, self.with_maps = cfg, with_maps
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

    def result(self) -> tuple[np.ndarray, np.ndarray | None]:
        """Window scores, and window maps ``(n, 12, 4800)`` (smoothed, `ecgad.maps.smooth`) when maps were asked
        for: the global + trend error averaged over passes and beats plus the beat errors divided by the passes."""
        scores = self.global_error / self.global_count + self.local_error / self.local_count
        if not self.with_maps:
            return scores.cpu().numpy(), None
        cfg = self.cfg
        local = self.local_map.view(len(scores), cfg.window, -1)[:, cfg.global_start:cfg.global_end]
        maps = self.global_map / self.global_count[:, None, None].float() + local / TEST_PASSES
        return scores.cpu().numpy(), smooth(maps.transpose(1, 2).cpu().numpy())


def _on_device(arrays: list[np.ndarray], device: torch.device) -> torch.Tensor:
    """Arrays concatenated along their first axis, as one float32 tensor on ``device``."""
    return torch.from_numpy(np.ascontiguousarray(np.concatenate(arrays), dtype=np.float32)).to(device)


class _WindowGroup:
    """One group of windows scored together: their tensors on the device, the once-per-window encodings, the index
    of every (beat, pass) pair, and the sums (`_Accumulator`) the restorations add to.

    Rows of the masked global latent ``f_g`` are ``window * 3 + pass`` ("global rows"); pairs are
    ``beat * 3 + pass``. Everything runs in chunks of at most ``max_batch`` rows.
    """

    def __init__(self, model: MCF, folded: FoldedMCF, cfg: PrepConfig, windows: Sequence[Window], max_batch: int,
                 with_maps: bool, device: torch.device) -> None:
        self.model, self.folded, self.max_batch = model, folded, max_batch
        self.trend_from_masked = model.config.trend_from_masked
        self.keep_global, self.keep_beat = (m.to(device) for m in eval_masks(cfg.global_len, cfg.beat_len))
        self.x = _on_device([w.signal[None, :, cfg.global_start:cfg.global_end] for w in windows], device)
        self.beats = _on_device([w.beats for w in windows], device)                           # (N, 12, 480)
        self.n_beats = torch.tensor([w.n_beats for w in windows], device=device)
        self.x_last = self.x.transpose(1, 2).contiguous()   # channels-last targets, like the folded decoders' output
        self.beats_last = self.beats.transpose(1, 2).contiguous()

        self.beat = torch.arange(len(self.beats), device=device).repeat_interleave(TEST_PASSES)
        self.pass_ = torch.arange(TEST_PASSES, device=device).repeat(len(self.beats))
        self.window = torch.arange(len(windows), device=device).repeat_interleave(self.n_beats)[self.beat]
        self.global_row = self.window * TEST_PASSES + self.pass_
        peaks = torch.from_numpy(np.concatenate([w.beat_peaks for w in windows])).to(device)
        self.beat_rows = ((self.window * cfg.window + peaks[self.beat] - cfg.beat_before)[:, None]
                          + torch.arange(cfg.beat_len, device=device))       # each pair's samples, windows flattened

        self.f_g, self.trend_share = self._encode_windows()
        self.sums = _Accumulator(len(windows), model.config.n_leads, cfg, with_maps, device)

    def score(self, fast: bool) -> tuple[np.ndarray, np.ndarray | None]:
        """Window scores and (optionally) maps. ``fast``: one global and trend restoration per window and pass, of
        ``f_g_out`` averaged over the window's beats, instead of one per (beat, pass) pair (see `Scorer`)."""
        f_g_sum = torch.zeros_like(self.f_g) if fast else None
        for chunk in self._chunks(len(self.beat)):
            f_g_out = self._score_beats(chunk)
            if f_g_sum is None:
                self._restore_global(f_g_out, self.global_row[chunk])
            else:
                f_g_sum.index_add_(0, self.global_row[chunk], f_g_out)
        if f_g_sum is not None:
            self._restore_beat_means(f_g_sum)
        return self.sums.result()

    def _chunks(self, n: int) -> list[slice]:
        return [slice(i, min(i + self.max_batch, n)) for i in range(0, n, self.max_batch)]

    def _batched(self, fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return torch.cat([fn(x[chunk]) for chunk in self._chunks(len(x))])

    def _encode_windows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Once per window and pass: the masked global latent ``f_g`` (by global row). Once per window (or per
        window and pass when the trend sees the masked signal): the trend latent's share of the trend decoder's
        first layer."""
        global_masked = (self.x[:, None] * self.keep_global[:, None]).flatten(0, 1)
        f_g = self._batched(self.model.encode_global, global_masked)
        f_t = self._batched(lambda signal: self.model.encode_trend(trend(signal)),
                            global_masked if self.trend_from_masked else self.x)
        return f_g, self.folded.trend_share(f_t)

    def _score_beats(self, pairs: slice) -> torch.Tensor:
        """The beat branch of the (beat, pass) pairs ``pairs``: their local errors go into the sums; returns their
        attention-updated global latents ``f_g_out``."""
        beat = self.beat[pairs]
        f_l = self.model.encode_local(self.beats[beat] * self.keep_beat[self.pass_[pairs], None])
        f_g_out, f_l_out = self.model.cross_attend(self.f_g[self.global_row[pairs]], f_l)
        gen = self.folded.restore_local(f_l_out)
        self.sums.add_local(local_error_map(gen[..., :-1], gen[..., -1:], self.beats_last[beat]),
                            self.window[pairs], self.beat_rows[pairs])
        return f_g_out

    def _restore_global(self, f_g_out: torch.Tensor, global_rows: torch.Tensor) -> None:
        """Global and trend restorations of ``f_g_out`` (one per entry of ``global_rows``) into the sums."""
        window = global_rows // TEST_PASSES
        trend_rows = global_rows if self.trend_from_masked else window
        gen, gen_trend = self.folded.restore_global(f_g_out, self.trend_share[trend_rows])
        self.sums.add_global(global_error_map(gen[..., :-1], gen[..., -1:], gen_trend, self.x_last[window]), window)

    def _restore_beat_means(self, f_g_sum: torch.Tensor) -> None:
        """Fast mode: restore each global row once, from ``f_g_out`` averaged over its window's beats."""
        f_g_mean = f_g_sum / self.n_beats.repeat_interleave(TEST_PASSES)[:, None, None]
        for chunk in self._chunks(len(f_g_mean)):
            self._restore_global(f_g_mean[chunk], torch.arange(chunk.start, chunk.stop, device=f_g_mean.device))


class Scorer:
    """Scores prepared windows, prepared records or raw records with the published protocol, fast.

    ``mode="full"`` reproduces `ecgad.oracle.oracle_score_window` (scores and maps to float32 rounding, ~1e-6
    relative) with the work that does not depend on the beat done once (module docstring) and everything batched:
    up to ``max_batch`` (beat, pass) pairs per forward step, over as many records as are passed at once.

    ``mode="fast"``: the beat branch stays exact (every beat, every pass: the beat encoder, the cross-attention and
    the beat decoder are cheap), but the global and trend decoders, ~85 % of the per-beat work, run once per window
    and pass instead of once per beat and pass, on the attention-updated global latent ``f_g_out`` *averaged over
    the window's beats*. The beat enters ``f_g_out`` only as one of 137 tokens (through the attention and
    ``φ_g``), so the global and trend restorations of one window's beats are close; the per-beat local errors,
    which carry beat-level anomalies, are kept exactly. Score and map are then ``mean_j(global + trend error of
    pass j) + mean_{beat, j}(local error)``: the full formula with the beat average moved inside the global and
    trend decoders (exact for a one-beat window, an approximation otherwise).

    The model is used in eval mode and put back in its previous mode afterwards, and the decoders are folded again
    whenever its weights have changed (`_folded`), so a scorer can be kept across training epochs.
    """

    def __init__(self, model: MCF, prep_config: PrepConfig = PrepConfig(), threshold: float = math.nan,
                 device: str | torch.device | None = None, mode: str = "full", max_batch: int | None = None,
                 model_version: str | None = None, backend: str = "eager") -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.device = torch.device(device) if device is not None else device_of(model)
        if self.device.type == "cpu":
            retain_freed_memory()   # the per-step activations would otherwise be mapped and zeroed anew each step
        self.model = model.to(self.device)
        self.prep_config = prep_config
        self.threshold = float(threshold)
        self.mode = mode
        #: (beat, pass) pairs per forward step; windows are taken ``max_batch // 3`` at a time.
        self.max_batch = int(max_batch or (512 if self.device.type == "cuda" else 32))
        self._model_version = model_version
        #: "eager" (the reference) or "compile" (`ecgad.backends`: the same stages through torch.compile)
        self.backend = check_backend(backend)
        self._compiled: dict = {}
        self._folding: tuple[tuple[tuple[int, int], ...], FoldedMCF] | None = None   # (weights' identity, folded)

    @classmethod
    def from_checkpoint(cls, directory: str | Path, device: str | torch.device | None = None, mode: str = "full",
                        max_batch: int | None = None, backend: str = "eager") -> "Scorer":
        from ecgad.checkpoint import load_checkpoint

        checkpoint = load_checkpoint(directory, device=device)
        return cls(checkpoint.model, checkpoint.prep_config, checkpoint.threshold, device=device, mode=mode,
                   max_batch=max_batch, model_version=checkpoint.model_version, backend=backend)

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

    def score_prepared(self, prepared: Sequence[Prepared], with_maps: bool = True) -> list[Scores]:
        """One `Scores` per prepared record, all windows of all records scored in shared batches.

        The record score is the mean over every valid beat of every window (beats in overlapping windows count in
        each). The map is stitched from the window maps (`ecgad.maps.stitch_window_maps`) and brought back to the
        input's own rate and length (`ecgad.maps.to_source_axis`); ``r_peaks`` are the scored beats' R-peaks on
        that axis too.
        """
        for record in prepared:
            if record.n_beats == 0:
                raise Rejection("no_beats", record.record_id)
        window_scores, window_maps = self.score_windows([w for record in prepared for w in record.windows],
                                                        with_maps)
        bounds = np.cumsum([len(record.windows) for record in prepared])[:-1]
        maps = [None] * len(prepared) if window_maps is None else np.split(window_maps, bounds)
        return [self._record_scores(record, scores, record_maps)
                for record, scores, record_maps in zip(prepared, np.split(window_scores, bounds), maps)]

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

    def _record_scores(self, record: Prepared, window_scores: np.ndarray, window_maps: np.ndarray | None) -> Scores:
        """A record's `Scores` from its windows' scores and maps, on the input's own time axis."""
        fs = self.prep_config.fs
        score = record_score(record.windows, window_scores)
        anomaly_map = None
        if window_maps is not None:
            stitched = stitch_window_maps(window_maps, [w.offset for w in record.windows], record.n_samples_model,
                                          self.prep_config)
            anomaly_map = to_source_axis(stitched, fs, record.source_fs, record.source_samples)
        peaks = np.concatenate([w.offset + w.beat_peaks for w in record.windows])
        return Scores(record_id=record.record_id, pred_score=score, pred_label=bool(score > self.threshold),
                      threshold=self.threshold, anomaly_map=anomaly_map,
                      r_peaks=np.unique(np.round(peaks * record.source_fs / fs).astype(np.int64)),
                      beats_used=record.n_beats, windows_scored=len(record.windows),
                      warnings=list(record.metadata.get("warnings", [])))

    def _folded(self) -> FoldedMCF:
        """The model's decoders folded (`ecgad.folded`), folded again only when a weight or a BatchNorm statistic
        has changed since: an optimizer step, a training forward pass or a load changes a tensor in place, which
        bumps its version counter, and moving the model replaces it. Folding costs about a batch of a few records'
        scoring (measured: 6 % of a service replica's time at small batches), so it is not redone per call."""
        identity = tuple((t.data_ptr(), t._version) for t in self.model.state_dict().values())
        if self._folding is None or self._folding[0] != identity:
            self._folding = identity, FoldedMCF(self.model)
        return self._folding[1]

    def score_windows(self, windows: Sequence[Window], with_maps: bool = True
                      ) -> tuple[np.ndarray, np.ndarray | None]:
        """Window scores ``(n,)`` and maps ``(n, 12, 4800)`` (samples 100..4900 of each window, as the oracle; None
        without ``with_maps``)."""
        for window in windows:
            if window.n_beats == 0:
                raise Rejection("no_beats", f"window at sample {window.offset}")
        model = self.model
        was_training = model.training
        model.eval()
        try:
            with torch.inference_mode():
                staged, folded = stages(self.backend, model, self._folded(), self._compiled)
                per_group = max(1, self.max_batch // TEST_PASSES)
                results = [_WindowGroup(staged, folded, self.prep_config, windows[i:i + per_group], self.max_batch,
                                        with_maps, self.device).score(fast=self.mode == "fast")
                           for i in range(0, len(windows), per_group)]
        finally:
            model.train(was_training)
        if not results:
            return np.zeros(0), (np.zeros((0, model.config.n_leads, self.prep_config.global_len), np.float32)
                                 if with_maps else None)
        scores = np.concatenate([r[0] for r in results])
        return scores, (np.concatenate([r[1] for r in results]) if with_maps else None)


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
