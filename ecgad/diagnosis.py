"""Multi-label ECG diagnosis on top of MCF's encoders: the network, its losses, its thresholds and its metrics.

**Network** (`DiagnosisNet`): MCF's three encoders read the *unmasked* window (diagnosis sees the whole signal):
the global latent ``(B, hidden, 136)``, the beat latent of every beat of the window, averaged per window (every
beat, not one drawn at random, so training and prediction see the same thing), and the trend latent of the TGM
(docs/method.md §2.1-§2.3). The global and beat latents meet in MCF's cross-attention (§2.4), as in pretraining.
The head reads the global and trend latents pooled over time (mean and max) and the beat latent, plus an
**anomaly summary**: the restoration error of the window by MCF's own global and trend decoders (frozen, so
they stay the detector's), per lead and overall, log-scaled: what the anomaly map says about each lead and the
score, on the unmasked window. The head is batch norm + linear, so with frozen encoders it is a linear probe.

Three starting points (`INITS`): ``pretrained`` (an anomaly-detection checkpoint: encoders, attention and decoders),
``random`` (the same network from random weights: the baseline). ``freeze_encoders`` keeps everything but the head
fixed (a linear probe on the detector's features).

**Imbalance** (`LOSSES`): plain binary cross-entropy; ``balanced``: positives of class c weighted by the inverse
effective number of samples ``(1 - beta) / (1 - beta^n_c)`` (Cui et al., CVPR 2019), normalized to mean 1; or
``focal`` (Lin et al., ICCV 2017, gamma 2). Which one is measured on fold 9 (``bench/longtail.py``).

**Thresholds** (`fit_thresholds`): per class, the one that maximizes Youden's J (sensitivity + specificity - 1) on
fold 9; a class fold 9 cannot calibrate (no positive or no negative record) keeps 0.5.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ecgad.checkpoint import DIAGNOSIS_FILE, Checkpoint, CheckpointError, load_checkpoint, local_directory, save_checkpoint
from ecgad.metrics import bootstrap_ci, record_auprc, record_auroc, sensitivity_specificity
from ecgad.model import MCF, device_of, trend, unwrap

INITS = ("pretrained", "random")
LOSSES = ("bce", "balanced", "focal")
#: Cui et al.'s beta for the class-balanced loss, and the focal loss's gamma (both their papers' defaults).
BALANCED_BETA = 0.999
FOCAL_GAMMA = 2.0
#: A class fold 9 cannot calibrate keeps this threshold.
DEFAULT_THRESHOLD = 0.5
#: Beats per window whose latents are averaged, spread evenly over the window: each costs a beat-encoder pass, and
#: a mean over a few beats of one rhythm already says what the beat looks like.
MAX_BEATS_PER_WINDOW = 4


@dataclass(frozen=True)
class HeadConfig:
    """The head's shape: ``n_classes`` outputs over the pooled latents of an MCF of width ``hidden``."""

    n_classes: int
    hidden: int
    n_leads: int = 12
    anomaly_inputs: bool = True
    dropout: float = 0.1

    @property
    def features(self) -> int:
        """Mean and max of the global and trend latents, the beat latent, and the anomaly summary."""
        return 5 * self.hidden + (self.n_leads + 1 if self.anomaly_inputs else 0)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "HeadConfig":
        return cls(**data)


class Batch(NamedTuple):
    """Diagnosis inputs: windows ``global_x (B, 12, 4800)``, all their beats ``beats (n, 12, 480)`` with the
    window each belongs to ``beat_window (n,)``, and, for training, ``targets (B, classes)``."""

    global_x: torch.Tensor
    beats: torch.Tensor
    beat_window: torch.Tensor
    targets: torch.Tensor | None = None

    def to(self, device: torch.device) -> "Batch":
        return Batch(*(None if t is None else t.to(device) for t in self))


def spread_beats(beats: np.ndarray, most: int = MAX_BEATS_PER_WINDOW) -> np.ndarray:
    """At most ``most`` of a window's beats ``(n, 12, 480)``, evenly spread over it (first and last included)."""
    if len(beats) <= most:
        return beats
    return beats[np.linspace(0, len(beats) - 1, most).round().astype(int)]


def make_batch(globals_: np.ndarray, beats: Sequence[np.ndarray], targets: np.ndarray | None = None) -> Batch:
    """A `Batch` from windows ``(B, 12, 4800)`` float32, each window's beats ``(n_i, 12, 480)`` (`spread_beats`
    of them are used) and targets ``(B, classes)``."""
    beats = [spread_beats(b) for b in beats]
    counts = torch.tensor([len(b) for b in beats])
    if (counts == 0).any():
        raise ValueError("every window needs at least one beat")
    return Batch(torch.from_numpy(np.ascontiguousarray(globals_, dtype=np.float32)),
                 torch.from_numpy(np.concatenate(beats).astype(np.float32, copy=False)),
                 torch.arange(len(beats)).repeat_interleave(counts),
                 None if targets is None else torch.from_numpy(np.asarray(targets, dtype=np.float32)))


class DiagnosisNet(nn.Module):
    """MCF's encoders and cross-attention, frozen decoders for the anomaly summary, and a multi-label head."""

    def __init__(self, mcf: MCF, head_config: HeadConfig, freeze_encoders: bool = False) -> None:
        super().__init__()
        if head_config.hidden != mcf.config.hidden:
            raise ValueError(f"head hidden={head_config.hidden} does not fit an MCF of hidden={mcf.config.hidden}")
        self.mcf, self.head_config, self.freeze_encoders = mcf, head_config, freeze_encoders
        self.head = nn.Sequential(nn.BatchNorm1d(head_config.features), nn.Dropout(head_config.dropout),
                                  nn.Linear(head_config.features, head_config.n_classes))
        frozen = [mcf] if freeze_encoders else [mcf.global_decoder, mcf.local_decoder, mcf.trend_decoder]
        for module in frozen:
            module.requires_grad_(False)
        self.train()

    def train(self, mode: bool = True) -> "DiagnosisNet":
        """Frozen parts stay in eval mode, so their batch-norm statistics stay the detector's."""
        super().train(mode)
        if self.freeze_encoders:
            self.mcf.eval()
        for decoder in (self.mcf.global_decoder, self.mcf.local_decoder, self.mcf.trend_decoder):
            decoder.eval()
        return self

    def features(self, batch: Batch) -> torch.Tensor:
        """``(B, HeadConfig.features)`` pooled latents (and anomaly summary) of the batch's windows."""
        x = batch.global_x
        f_g = self.mcf.encode_global(x)
        f_t = self.mcf.encode_trend(trend(x))
        f_beats = self.mcf.encode_local(batch.beats)                                    # (n, hidden, 1)
        sums = torch.zeros(len(x), *f_beats.shape[1:], dtype=f_beats.dtype, device=f_beats.device)
        counts = torch.bincount(batch.beat_window, minlength=len(x)).clamp_min(1).to(f_beats.dtype)
        f_l = sums.index_add(0, batch.beat_window, f_beats) / counts[:, None, None]
        f_g_out, f_l_out = self.mcf.cross_attend(f_g, f_l)
        parts = [f_g_out.mean(-1), f_g_out.amax(-1), f_l_out.mean(-1), f_t.mean(-1), f_t.amax(-1)]
        if self.head_config.anomaly_inputs:
            parts.append(self.anomaly_summary(x, f_g_out, f_t))
        return torch.cat(parts, dim=1)

    @torch.no_grad()
    def anomaly_summary(self, x: torch.Tensor, f_g_out: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
        """``(B, leads + 1)``: log mean squared restoration error per lead (global decoder) and of the trend
        decoder's restoration, from the frozen decoders, with no gradient."""
        restored, _ = self.mcf.decode_global(f_g_out.detach())
        per_lead = (restored - x).pow(2).mean(-1)
        trend_error = (self.mcf.decode_trend(f_g_out.detach(), f_t.detach()) - x).pow(2).mean((1, 2))
        return torch.log(torch.cat([per_lead, trend_error[:, None]], dim=1) + 1e-6)

    def forward(self, batch: Batch) -> torch.Tensor:
        """Logits ``(B, classes)``."""
        return self.head(self.features(batch))


def build_network(head_config: HeadConfig, mcf: MCF, init: str, freeze_encoders: bool) -> DiagnosisNet:
    """The diagnosis network on a copy of ``mcf`` (``pretrained``) or on a freshly initialized MCF of the same
    config (``random``; seed the global generator first for a repeatable draw)."""
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    body = MCF(mcf.config)
    if init == "pretrained":
        body.load_state_dict(mcf.state_dict())
    return DiagnosisNet(body, head_config, freeze_encoders)


# -- losses -------------------------------------------------------------------------------------------------------

def class_balanced_weights(counts: Sequence[float], beta: float = BALANCED_BETA) -> np.ndarray:
    """Per-class weights of the positives from the training positives per class ``counts``:
    ``(1 - beta) / (1 - beta^n_c)`` normalized to mean 1 (a class with no training positive gets the largest
    weight, harmlessly: it has no positive term)."""
    counts = np.asarray(counts, dtype=np.float64)
    weights = (1.0 - beta) / (1.0 - np.power(beta, np.maximum(counts, 1)))
    return (weights / weights.mean()).astype(np.float32)


def make_loss(name: str, class_counts: Sequence[float]):
    """``loss(logits, targets) -> scalar`` for one of `LOSSES`, fitted to the training positives per class."""
    if name == "bce":
        return lambda logits, targets: F.binary_cross_entropy_with_logits(logits, targets)
    if name == "balanced":
        weights = torch.from_numpy(class_balanced_weights(class_counts))

        def balanced(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            w = weights.to(logits.device)
            per_entry = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
            return (per_entry * (targets * w + (1 - targets))).mean()
        return balanced
    if name == "focal":
        def focal(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            per_entry = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
            p_true = torch.exp(-per_entry)
            return ((1 - p_true) ** FOCAL_GAMMA * per_entry).mean()
        return focal
    raise ValueError(f"loss must be one of {LOSSES}, got {name!r}")


# -- training and prediction --------------------------------------------------------------------------------------

class FeatureBatch(NamedTuple):
    """Cached `DiagnosisNet.features` of windows ``(B, features)`` and their targets: what a linear probe trains on,
    since its frozen encoders give the same features every epoch (`HeadOnFeatures`)."""

    features: torch.Tensor
    targets: torch.Tensor | None = None

    def to(self, device: torch.device) -> "FeatureBatch":
        return FeatureBatch(*(None if t is None else t.to(device) for t in self))


class HeadOnFeatures(nn.Module):
    """A frozen-encoder `DiagnosisNet` seen through its head alone, taking `FeatureBatch` es."""

    def __init__(self, net: DiagnosisNet) -> None:
        super().__init__()
        self.head = net.head

    def forward(self, batch: FeatureBatch) -> torch.Tensor:
        return self.head(batch.features)


@torch.no_grad()
def cached_features(net: DiagnosisNet, batches: Iterable[Batch]) -> torch.Tensor:
    """``(windows, features)`` of a frozen-encoder network over ``batches``, in order (on the CPU)."""
    if not net.freeze_encoders:
        raise ValueError("features can be cached only with frozen encoders")
    net.eval()
    device = device_of(net)
    return torch.cat([net.features(batch.to(device)).cpu() for batch in batches])


def train_epoch(net: nn.Module, optimizer: torch.optim.Optimizer, batches: Iterable[Batch | FeatureBatch],
                loss_fn) -> float:
    """One pass over ``batches``; returns the sample-weighted mean loss. Works on a DDP-wrapped network too."""
    net.train()
    device = device_of(net)
    total, n = 0.0, 0
    for batch in batches:
        if len(batch.targets) < 2:   # batch norm in training mode cannot normalize one sample
            continue
        batch = batch.to(device)
        loss = loss_fn(net(batch), batch.targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += loss.item() * len(batch.targets)
        n += len(batch.targets)
    if not n:
        raise ValueError("train_epoch got no batch of two or more windows")
    return total / n


@torch.no_grad()
def predict(net: nn.Module, batches: Iterable[Batch | FeatureBatch]) -> np.ndarray:
    """Probabilities ``(windows, classes)`` over ``batches``, in order, in eval mode."""
    net.eval()
    device = device_of(net)
    out = [torch.sigmoid(net(batch.to(device))).cpu().numpy() for batch in batches]
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def record_probabilities(window_probs: np.ndarray, window_record: Sequence[int], n_records: int) -> np.ndarray:
    """Per-record probabilities: the mean over each record's windows (a 10 s record has one)."""
    sums = np.zeros((n_records, window_probs.shape[1]))
    np.add.at(sums, np.asarray(window_record), window_probs)
    counts = np.bincount(np.asarray(window_record), minlength=n_records)[:, None]
    return sums / np.maximum(counts, 1)


# -- thresholds and metrics ---------------------------------------------------------------------------------------

def fit_thresholds(targets: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """Per-class thresholds maximizing Youden's J on ``(records, classes)`` targets and probabilities; the rule is
    ``prob > threshold``, as `ecgad.metrics.sensitivity_specificity` applies it."""
    thresholds = np.full(targets.shape[1], DEFAULT_THRESHOLD)
    for c in range(targets.shape[1]):
        y, p = targets[:, c] > 0.5, probs[:, c]
        if y.all() or not y.any():
            continue
        candidates = np.unique(p)
        # ``prob > t`` for each t just below a candidate: midpoints, and one below the smallest
        cuts = np.concatenate([[candidates[0] - 1e-6], (candidates[:-1] + candidates[1:]) / 2])
        sens = ((p[None, :] > cuts[:, None]) & y).sum(1) / y.sum()
        spec = ((p[None, :] <= cuts[:, None]) & ~y).sum(1) / (~y).sum()
        thresholds[c] = float(cuts[int(np.argmax(sens + spec))])
    return thresholds


def macro_auroc(targets: np.ndarray, probs: np.ndarray, columns: Sequence[int] | None = None) -> float:
    """Mean AUROC over ``columns`` (all classes by default) where it is defined; NaN if it is nowhere."""
    columns = range(targets.shape[1]) if columns is None else columns
    values = [record_auroc(targets[:, c], probs[:, c]) for c in columns]
    values = [v for v in values if math.isfinite(v)]
    return float(np.mean(values)) if values else math.nan


def _number(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def diagnosis_metrics(targets: np.ndarray, probs: np.ndarray, thresholds: np.ndarray, classes: Sequence[str],
                      split: dict[str, Any], *, n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Per-class AUROC, AUPRC, sensitivity and specificity (at ``thresholds``), and macro AUROC over all, head and
    tail classes (``split``: `ecgad.labels.head_and_tail`) with percentile bootstrap 95 % CIs over records."""
    per_class = {}
    for c, name in enumerate(classes):
        sens, spec = sensitivity_specificity(targets[:, c], probs[:, c], thresholds[c])
        per_class[name] = {"positives": int(targets[:, c].sum()), "threshold": float(thresholds[c]),
                           "auroc": _number(record_auroc(targets[:, c], probs[:, c])),
                           "auprc": _number(record_auprc(targets[:, c], probs[:, c])),
                           "sensitivity": _number(sens), "specificity": _number(spec)}
    index = {name: i for i, name in enumerate(classes)}
    macro = {}
    for group, names in (("all", list(classes)), ("head", split["head"]), ("tail", split["tail"])):
        columns = [index[n] for n in names if n in index]
        value = macro_auroc(targets, probs, columns) if columns else math.nan
        lo, hi = bootstrap_ci(lambda i: macro_auroc(targets[i], probs[i], columns), len(targets), n_boot=n_boot,
                              seed=seed) if columns else (math.nan, math.nan)
        macro[group] = {"classes": len(columns), "auroc": _number(value), "ci95": [_number(lo), _number(hi)]}
    return {"records": int(len(targets)), "macro_auroc": macro, "per_class": per_class,
            "split": {k: split[k] for k in ("rule", "head", "tail")}}


# -- checkpoints --------------------------------------------------------------------------------------------------

def save_diagnosis_checkpoint(directory: str | Path, detector: Checkpoint, net: nn.Module, diagnosis: dict[str, Any],
                              metadata: dict[str, Any] | None = None) -> Path:
    """A checkpoint holding ``detector`` (the anomaly detector, unchanged: it still scores, with its threshold) and
    the diagnosis network with its ``diagnosis`` entry (level, classes, thresholds, ...; `load_diagnosis`)."""
    net = unwrap(net)
    entry = {**diagnosis, "head_config": net.head_config.to_dict(), "freeze_encoders": net.freeze_encoders}
    return save_checkpoint(directory, detector.model, detector.model_config, detector.prep_config, detector.threshold,
                           threshold_quantile=detector.threshold_quantile, metadata=metadata, network=net,
                           diagnosis=entry)


def load_diagnosis(directory: str | Path, device: str | torch.device | None = "cpu"
                   ) -> tuple[Checkpoint, DiagnosisNet]:
    """The checkpoint at ``directory`` and its diagnosis network (eval mode, on ``device``); `CheckpointError` if
    the checkpoint has no diagnosis head."""
    checkpoint = load_checkpoint(directory, device=device)
    if checkpoint.diagnosis is None:
        raise CheckpointError(f"{directory} is an anomaly detector without a diagnosis head (train one with "
                              "`python -m jobs.finetune`)")
    entry = checkpoint.diagnosis
    net = DiagnosisNet(MCF(checkpoint.model_config), HeadConfig.from_dict(entry["head_config"]),
                       bool(entry.get("freeze_encoders", False)))
    state = torch.load(local_directory(checkpoint.path) / DIAGNOSIS_FILE, map_location="cpu", weights_only=True)
    try:
        net.load_state_dict(state)
    except RuntimeError as err:
        raise CheckpointError(f"{directory}: the diagnosis network does not fit its config: {err}") from err
    return checkpoint, net.to(torch.device(device or "cpu")).eval()
