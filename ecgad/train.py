"""Training MCF: one epoch loop, one beat sampler and one selection rule, run in-process by `train_local` and by
every Ray Train worker (`ecgad.ray.train`) unchanged.

The recipe is the published one (docs/method.md §3): AdamW (lr 1e-4, weight decay 1e-5), batch 32, one random valid
beat per record per step, one training mask per batch shared by its samples, loss ``L_g + L_l + L_t`` over every
point. Where we depart from it:

- **Cosine without a wasted epoch** (our own choice, docs/method.md §3.4). The reference sets
  ``lr_e = lr * 0.5 * (1 + cos(pi * e / E))`` for e = 1..E, so its last epoch runs at lr = 0. We shift by one
  epoch: with epochs counted from 0 (as Ray Train counts them), ``lr_e = lr * 0.5 * (1 + cos(pi * e / E))`` for
  e = 0..E-1, starting at the full rate and ending at ``lr * 0.5 * (1 + cos(pi * (E - 1) / E)) > 0``.
- **Validation, not test, selects the checkpoint** (docs/method.md §3.6, D4). Folds 1-8 (normals) train, fold 9
  validates, fold 10 is never read here. The threshold is the 0.95 quantile of the chosen model's scores on fold-9
  normals.
- **Seeds that work** (docs/method.md §3.5, D5). Every draw that shapes training (masks, beat choice, batch order)
  comes from an explicit ``torch.Generator`` on the CPU, and model initialization and dropout from the global torch
  seed `set_seed` sets; so a CPU run is repeatable bit for bit, and a GPU run draws the same masks and beats.

Tensors live wherever the model lives: nothing here assumes a device. A model wrapped by ``DistributedDataParallel``
(Ray Train's ``prepare_model``) works as is.
"""

from __future__ import annotations

import math
import random
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ecgad.checkpoint import load_checkpoint, publish_checkpoint, save_checkpoint
from ecgad.config import PrepConfig
from ecgad.masks import eval_masks, train_masks
from ecgad.drift import Calibration
from ecgad.metrics import calibrate_threshold, record_auprc, record_auroc
from ecgad.log import get_logger
from ecgad.model import MCF, MCFConfig, MCFOutput, device_of, unwrap
from ecgad.objective import restoration_loss
from ecgad.preprocess import prepare
from ecgad.ptbxl import TRAIN_FOLDS, VALIDATION_FOLD, load_ptbxl_index, read_ptbxl_record
from ecgad.scoring import Scorer
from ecgad.types import Prepared, Rejection
from ecgad.validate import validate

BASE_LR = 1e-4
WEIGHT_DECAY = 1e-5
THRESHOLD_QUANTILE = 0.95

#: Validation metrics a checkpoint can be selected by, and whether higher ("max") or lower ("min") is better.
SELECTION_ORDER = {"val_auroc": "max", "val_loss": "min"}

#: A ready batch: the global inputs ``(B, 12, 4800)`` and one beat per sample ``(B, 12, 480)``, float32, any device.
Batch = tuple[torch.Tensor | np.ndarray, torch.Tensor | np.ndarray]

logger = get_logger(__name__)


# -- the pieces a Ray Train worker calls --------------------------------------------------------------------------

def set_seed(seed: int) -> torch.Generator:
    """Seed Python, numpy and torch (CPU and every GPU); return a CPU generator for masks, beats and batch order.

    The published code seeded nothing with its default seed (docs/method.md §3.5, D5), so its runs could not
    be repeated. The returned generator is separate from the global stream, so the draws it makes do not depend
    on how many random numbers model construction consumed.
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def seeded_generator(*entropy: int) -> torch.Generator:
    """A CPU generator seeded from several integers (e.g. seed, epoch, rank): independent streams for each
    combination, so an epoch redone after a failure, or a batch drawn on another thread, draws the same values."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence(list(entropy)).generate_state(1)[0]))


def make_optimizer(model: nn.Module, lr: float = BASE_LR, weight_decay: float = WEIGHT_DECAY) -> torch.optim.AdamW:
    """AdamW(lr 1e-4, weight decay 1e-5), the published optimizer."""
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)


def lr_for_epoch(epoch: int, epochs: int, base_lr: float = BASE_LR) -> float:
    """Cosine rate for ``epoch`` in 0..``epochs - 1``: ``base_lr * 0.5 * (1 + cos(pi * epoch / epochs))``.

    Epoch 0 runs at ``base_lr``; the last at a small positive rate, never 0 (module docstring).
    """
    if not 0 <= epoch < epochs:
        raise ValueError(f"epoch must lie in 0..{epochs - 1} (counted from 0), got {epoch}")
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set the rate of every parameter group (the schedule is applied once per epoch)."""
    for group in optimizer.param_groups:
        group["lr"] = lr


def sample_beats(beats_per_record: Sequence[np.ndarray | torch.Tensor], generator: torch.Generator) -> torch.Tensor:
    """One uniformly drawn beat per record (or window): ``(B, 12, 480)`` float32 on the CPU, from per-record beats
    ``(n_i, 12, 480)``. The one beat sampler of training, in memory (`iterate_batches`) and streamed from shards.

    As in the reference, beats differ every epoch; every entry of ``beats_per_record`` must hold at least one beat
    (``prepare`` rejects records without one).
    """
    counts = torch.tensor([len(b) for b in beats_per_record])
    if (counts < 1).any():
        raise ValueError(f"record(s) {torch.nonzero(counts < 1).flatten().tolist()} have no beat to sample")
    picks = (torch.rand(len(counts), generator=generator) * counts).long().clamp_max(counts - 1)
    # Through numpy: the copy np.stack makes is writable, so read-only views of shard payloads pass too.
    return torch.from_numpy(np.stack([np.asarray(beats[int(i)], dtype=np.float32)
                                      for beats, i in zip(beats_per_record, picks)]))


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, global_x: torch.Tensor, beat_x: torch.Tensor,
               generator: torch.Generator | np.random.Generator, *, autocast_dtype: torch.dtype | None = None) -> dict[str, float]:
    """One optimization step on a batch; returns the loss and its parts as floats.

    Draws one training mask (shared by the batch, as published) from ``generator``, builds the trend input
    (from the unmasked or the masked ECG, as the model config says, so training and scoring agree), restores,
    and steps. ``autocast_dtype`` (e.g. ``torch.bfloat16`` on CUDA) runs the forward pass in mixed precision; the
    loss is always computed in float32. A non-finite loss raises ``FloatingPointError`` before the weights change.
    """
    keep_global, keep_beat = train_masks(generator, global_x.shape[-1], beat_x.shape[-1])
    global_masked = global_x * keep_global.to(global_x.device)
    beat_masked = beat_x * keep_beat.to(beat_x.device)
    trend_input = unwrap(model).trend_for(global_x, global_masked)
    with torch.autocast(global_x.device.type, dtype=autocast_dtype or torch.bfloat16,
                        enabled=autocast_dtype is not None):
        out = model(global_masked, beat_masked, trend_input)
    loss, parts = restoration_loss(MCFOutput(*(t.float() for t in out)), global_x, beat_x)
    if not torch.isfinite(loss):
        raise FloatingPointError(f"non-finite training loss {loss.item()} (parts: "
                                 f"{ {k: v.item() for k, v in parts.items()} })")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return {"loss": loss.item(), **{k: v.item() for k, v in parts.items()}}


def _on_device(batch: Batch, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A ready batch as float32 tensors on ``device`` (callers may hand over CPU arrays)."""
    global_x, beat_x = batch
    return (torch.as_tensor(global_x, dtype=torch.float32).to(device),
            torch.as_tensor(beat_x, dtype=torch.float32).to(device))


@dataclass(frozen=True)
class EpochStats:
    """What one worker's pass over its batches did: sample-weighted mean losses and where the time went."""

    loss: float
    parts: dict[str, float]    # the loss terms (``restoration_loss``), sample-weighted means
    samples: int
    batches: int
    seconds: float             # the whole loop, data waits included
    data_wait_s: float         # waiting for the next batch (first one included): is training input-bound?
    first_batch_s: float

    def to_dict(self) -> dict[str, Any]:
        return {"loss": self.loss, **self.parts, "samples": self.samples, "batches": self.batches,
                "seconds": self.seconds, "data_wait_s": self.data_wait_s, "first_batch_s": self.first_batch_s}


def train_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, batches: Iterable[Batch],
                generator: torch.Generator, *, autocast_dtype: torch.dtype | None = None) -> EpochStats:
    """One epoch over ready batches ``(global (B,12,4800), beat (B,12,480))``: the one training loop, run by
    `train_local` over in-memory batches and by each Ray Train worker over its streamed shard.

    Masks are drawn from ``generator``. Inputs are moved to the model's device here, so a caller may hand over
    CPU arrays.
    """
    model.train()
    device = device_of(model)
    totals: dict[str, float] = defaultdict(float)
    n_samples = n_batches = 0
    waited, first_batch_s = 0.0, math.nan
    start = time.perf_counter()
    iterator = iter(batches)
    while True:
        asked = time.perf_counter()
        batch = next(iterator, None)
        waited += time.perf_counter() - asked
        if batch is None:
            break
        if not n_batches:
            first_batch_s = time.perf_counter() - start
        global_x, beat_x = _on_device(batch, device)
        stats = train_step(model, optimizer, global_x, beat_x, generator, autocast_dtype=autocast_dtype)
        for key, value in stats.items():
            totals[key] += value * len(global_x)
        n_samples += len(global_x)
        n_batches += 1
    if not n_samples:
        raise ValueError("train_epoch got no batches")
    means = {k: v / n_samples for k, v in totals.items()}
    return EpochStats(loss=means.pop("loss"), parts=means, samples=n_samples, batches=n_batches,
                      seconds=time.perf_counter() - start, data_wait_s=waited, first_batch_s=first_batch_s)


@torch.no_grad()
def validation_step(model: nn.Module, global_x: torch.Tensor, beat_x: torch.Tensor) -> dict[str, float]:
    """The training loss of one batch in eval mode, averaged over the three deterministic test masks.

    Deterministic masks (``ecgad.masks.eval_masks``) rather than random ones, so two epochs are compared on the
    same task and the difference is the model's. Leaves the model in eval mode.
    """
    model.eval()
    keep_global, keep_beat = (k.to(global_x.device) for k in eval_masks(global_x.shape[-1], beat_x.shape[-1]))
    totals: dict[str, float] = defaultdict(float)
    for keep_g, keep_b in zip(keep_global, keep_beat):
        global_masked = global_x * keep_g
        out = model(global_masked, beat_x * keep_b, unwrap(model).trend_for(global_x, global_masked))
        loss, parts = restoration_loss(out, global_x, beat_x)
        for key, value in {"loss": loss, **parts}.items():
            totals[key] += value.item() / len(keep_global)
    return dict(totals)


def validation_loss(model: nn.Module, batches: Iterable[Batch]) -> dict[str, float]:
    """Sample-weighted `validation_step` over ready batches ``(global (B,12,4800), beat (B,12,480))``.

    Draw the beats from a freshly seeded generator every epoch, so every epoch is judged on the same beats and the
    numbers are comparable.
    """
    device = device_of(model)
    totals: dict[str, float] = defaultdict(float)
    n_samples = 0
    for batch in batches:
        global_x, beat_x = _on_device(batch, device)
        stats = validation_step(model, global_x, beat_x)
        for key, value in stats.items():
            totals[key] += value * len(global_x)
        n_samples += len(global_x)
    if not n_samples:
        raise ValueError("validation_loss got no batches")
    return {k: v / n_samples for k, v in totals.items()}


def iterate_batches(globals_: np.ndarray, beats: Sequence[np.ndarray], batch_size: int, generator: torch.Generator,
                    *, shuffle: bool = True) -> Iterator[Batch]:
    """Ready batches over in-memory windows (globals ``(N, 12, 4800)``, per-window beats ``(n_i, 12, 480)``): one
    beat per window drawn from ``generator`` (`sample_beats`), in an order shuffled by it (or in order).

    A last batch of a single record is dropped when shuffling: BatchNorm in training mode cannot normalize the
    beat branch's one-token latent over one sample. Shuffling moves a different record there each epoch.
    """
    n = len(beats)
    order = torch.randperm(n, generator=generator).tolist() if shuffle else list(range(n))
    for start in range(0, n, batch_size):
        idx = order[start:start + batch_size]
        if shuffle and len(idx) < 2:
            break
        yield torch.from_numpy(globals_[idx]), sample_beats([beats[i] for i in idx], generator)


# -- model selection ----------------------------------------------------------------------------------------------

def selection_metric(n_normal: int, n_abnormal: int) -> str:
    """The metric that selects the checkpoint, given the validation fold's usable records (docs/method.md §3.6, D4).

    The record AUROC where the fold holds normal and abnormal records: the detection quality we report, measured
    on held-out data (the reference tuned on it too, but on the test fold). Otherwise the restoration loss of the
    held-out normals under the deterministic test masks, the best signal left.
    """
    return "val_auroc" if n_normal > 0 and n_abnormal > 0 else "val_loss"


def selection_key(metrics: Mapping[str, Any], metric: str) -> tuple[float, ...]:
    """The one ranking of epochs: larger keys are better. ``metric`` in its `SELECTION_ORDER`, ties broken by the
    lower validation loss; an undefined value (NaN, or None as JSON stores it) ranks below every defined one."""
    def better_is_larger(name: str) -> float:
        value = metrics.get(name)
        if value is None or not math.isfinite(value):
            return -math.inf
        return value if SELECTION_ORDER[name] == "max" else -value

    return tuple(better_is_larger(name) for name in dict.fromkeys([metric, "val_loss"]))


# -- in-process training ------------------------------------------------------------------------------------------

def _windows(prepared: Sequence[Prepared]) -> tuple[np.ndarray, list[np.ndarray]]:
    """Every window of every record as a training sample: globals ``(N, 12, 4800)`` and their beats."""
    windows = [w for p in prepared for w in p.windows]
    return np.stack([w.global_input for w in windows]).astype(np.float32), [w.beats for w in windows]


def prepare_index_rows(data_root: str | Path, index: Any, prep_config: PrepConfig
                       ) -> tuple[list[tuple[Any, Prepared]], Counter]:
    """Read and prepare the records of ``index`` rows (a `load_ptbxl_index` frame) of a PTB-XL root, in order.

    Returns ``([(row, prepared), ...], rejection reasons counted by code)``. Records that cannot be read or prepared
    are skipped and counted: one bad file must not stop a training run.
    """
    out, rejections = [], Counter()
    for i, (_, row) in enumerate(index.iterrows(), 1):
        try:
            record = read_ptbxl_record(data_root, row)
            prepared = prepare(validate(record), prep_config)
        except Rejection as rejection:
            rejections[rejection.code] += 1
            continue
        prepared.metadata.update(record.metadata)
        out.append((row, prepared))
        if i % 1000 == 0:
            logger.info("prepared %d/%d records", i, len(index))
    return out, rejections


def load_split(data_root: str | Path, prep_config: PrepConfig
               ) -> tuple[list[Prepared], list[Prepared], np.ndarray, Counter]:
    """Read and prepare the training normals (folds 1-8) and every fold-9 record of a PTB-XL root.

    Returns ``(train, validation, validation labels (1 = abnormal), rejection reasons counted by code)``
    (`prepare_index_rows`). Fold 10 (test) is not read at all.
    """
    index = load_ptbxl_index(data_root)
    train_rows = index["strat_fold"].isin(TRAIN_FOLDS) & index["is_normal"]
    prepared, rejections = prepare_index_rows(
        data_root, index[train_rows | (index["strat_fold"] == VALIDATION_FOLD)], prep_config)
    train, val, val_labels = [], [], []
    for row, record in prepared:
        if row["strat_fold"] == VALIDATION_FOLD:
            val.append(record)
            val_labels.append(0 if row["is_normal"] else 1)
        else:
            train.append(record)
    return train, val, np.asarray(val_labels, dtype=np.int8), rejections


def _resolve_device(device: str | torch.device | None) -> torch.device:
    return torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))


def _record_scores(model: MCF, prepared: Sequence[Prepared], prep_config: PrepConfig, device: torch.device,
                   mode: str) -> np.ndarray:
    """Record scores of the scoring protocol itself, so validation measures exactly what serving will compute."""
    scorer = Scorer(model, prep_config, math.nan, device, mode)
    return np.array([s.pred_score for s in scorer.score_prepared(list(prepared), with_maps=False)],
                    dtype=np.float64)


def train_local(data_root: str | Path, out_dir: str | Path, *, config: str = "small", epochs: int = 10,
                batch_size: int = 32, seed: int = 0, device: str | torch.device | None = None,
                trend_from_masked: bool = False, score_mode: str = "full",
                autocast_dtype: torch.dtype | None = None, lr: float = BASE_LR,
                init_from: str | Path | None = None) -> Path:
    """Train MCF on a PTB-XL root (real or synthetic) in this process and write the finished checkpoint.

    Folds 1-8 normals train; after every epoch the fold-9 normals give a validation loss (deterministic test
    masks) and, when fold 9 holds abnormal records, the scorer gives the fold-9 record AUROC. The kept epoch is the
    best by `selection_key` (AUROC when it exists, else validation loss: `selection_metric`);
    ``metadata["selection"]`` says which and why. The threshold is the 0.95 quantile of the kept model's
    scores on fold-9 normals. ``lr`` is the peak of the cosine schedule (the paper's 1e-4 by default; a small model
    trained for a few minutes learns far more with 1e-3).

    ``init_from`` (a checkpoint directory or URI) starts from that model's weights instead of a random
    initialization: fine-tuning a model pretrained elsewhere (e.g. on DeepFake ECG normals) on one's own normals,
    usually at a lower ``lr``. Its architecture and preparation settings are kept (``config`` and
    ``trend_from_masked`` are then not used: a model cannot change shape), and ``metadata["init_from"]`` names it.

    The checkpoint is published as a version beside ``out_dir`` (``<parent>/models/<version>/``, never rewritten;
    `ecgad.checkpoint.publish_checkpoint`) and ``out_dir`` becomes a link to it, so training again into the same
    ``out_dir`` cannot change what a running service or job loaded from it. Returns the version directory.
    """
    if config not in ("small", "paper"):
        raise ValueError(f"config must be 'small' or 'paper', got {config!r}")
    generator = set_seed(seed)
    device = _resolve_device(device)
    start = load_checkpoint(init_from, device=device) if init_from is not None else None
    prep_config = start.prep_config if start else PrepConfig()
    base = MCFConfig.small() if config == "small" else MCFConfig.paper()
    model_config = start.model_config if start else replace(base, trend_from_masked=trend_from_masked)

    started = time.perf_counter()
    train, val, val_labels, rejections = load_split(data_root, prep_config)
    val_normals = [p for p, label in zip(val, val_labels) if label == 0]
    logger.info("data: %d training normals, fold %d: %d normal + %d abnormal; rejected %s (%.0f s)", len(train),
             VALIDATION_FOLD, len(val_normals), int(val_labels.sum()), dict(rejections) or 0,
             time.perf_counter() - started)
    if len(train) < 2:
        raise ValueError(f"{data_root}: fewer than 2 usable training normals in folds {TRAIN_FOLDS[0]}-"
                         f"{TRAIN_FOLDS[-1]}")
    if not val_normals:
        raise ValueError(f"{data_root}: fold {VALIDATION_FOLD} has no usable normal record to validate on and to "
                         "calibrate the threshold with")
    train_globals, train_beats = _windows(train)
    val_globals, val_beats = _windows(val_normals)
    metric = selection_metric(len(val_normals), int(val_labels.sum()))

    model = start.model.train() if start else MCF(model_config).to(device)
    optimizer = make_optimizer(model, lr=lr)
    history: list[dict[str, Any]] = []
    best: dict[str, Any] | None = None
    for epoch in range(epochs):
        epoch_lr = lr_for_epoch(epoch, epochs, lr)
        set_lr(optimizer, epoch_lr)
        stats = train_epoch(model, optimizer, iterate_batches(train_globals, train_beats, batch_size, generator),
                            generator, autocast_dtype=autocast_dtype)
        val_stats = validation_loss(model, iterate_batches(val_globals, val_beats, batch_size,
                                                           torch.Generator().manual_seed(seed + 1), shuffle=False))
        entry = {"epoch": epoch, "lr": epoch_lr, "train": stats.to_dict(), "val_loss": val_stats["loss"]}
        scores = None
        if metric == "val_auroc":
            scores = _record_scores(model, val, prep_config, device, score_mode)
            entry["val_auroc"] = record_auroc(val_labels, scores)
            entry["val_auprc"] = record_auprc(val_labels, scores)
        history.append(entry)
        logger.info("epoch %d/%d lr %.2e train loss %.4f val loss %.4f%s (%.0f s)", epoch, epochs - 1, epoch_lr,
                 stats.loss, val_stats["loss"], f" val AUROC {entry['val_auroc']:.4f}" if "val_auroc" in entry else "",
                 stats.seconds)
        key = selection_key(entry, metric)
        if best is None or key > best["key"]:
            best = {"key": key, "epoch": epoch, "scores": scores,
                    "state": {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}}

    model.load_state_dict(best["state"])
    scores = best["scores"]
    if scores is None:
        scores = _record_scores(model, val, prep_config, device, score_mode)
    threshold = calibrate_threshold(scores[val_labels == 0], THRESHOLD_QUANTILE)
    calibration = Calibration.from_scores(scores[val_labels == 0], threshold)
    selection = {"metric": metric, "mode": SELECTION_ORDER[metric], "reason": (
        f"fold {VALIDATION_FOLD} holds normal and abnormal records, so the detection AUROC we report is measured "
        "directly on held-out data (ties: lower validation loss); fold 10 is never read" if metric == "val_auroc" else
        f"fold {VALIDATION_FOLD} holds no abnormal record, so the restoration loss of held-out normals under the "
        "deterministic test masks is the best available signal")}
    best_entry = history[best["epoch"]]
    metadata = {
        "data_root": str(Path(data_root).resolve()), "config": config, "epochs": epochs, "batch_size": batch_size,
        "seed": seed, "device": str(device), "score_mode": score_mode,
        "init_from": {"path": str(start.path), "model_version": start.model_version} if start else None,
        "autocast_dtype": str(autocast_dtype) if autocast_dtype else None,
        "optimizer": {"name": "AdamW", "lr": lr, "weight_decay": WEIGHT_DECAY,
                      "schedule": "lr * 0.5 * (1 + cos(pi * epoch / epochs)), per epoch, epochs from 0"},
        "data": {"train_folds": list(TRAIN_FOLDS), "val_fold": VALIDATION_FOLD, "train_records": len(train),
                 "train_windows": len(train_beats), "val_normal": len(val_normals),
                 "val_abnormal": int(val_labels.sum()), "rejections": dict(rejections)},
        "selection": {**selection, "best_epoch": best["epoch"], "best": best_entry},
        "threshold_calibration": {"quantile": THRESHOLD_QUANTILE, "on": f"fold {VALIDATION_FOLD} normal record scores",
                                  "n": int((val_labels == 0).sum())},
        "history": history, "train_seconds": time.perf_counter() - started,
    }
    out_dir = Path(out_dir).resolve()
    with tempfile.TemporaryDirectory() as staging:
        saved = save_checkpoint(Path(staging) / "checkpoint", model, model_config, prep_config, threshold,
                                metadata=metadata, threshold_quantile=THRESHOLD_QUANTILE,
                                calibration=calibration.to_dict())
        published = publish_checkpoint(saved, out_dir.parent, out_dir.name)
    logger.info("kept epoch %d (%s); threshold %.6g; model version %s at %s (%s points at it)", best["epoch"],
                metric, threshold, published.model_version, published.path, out_dir)
    return published.path
