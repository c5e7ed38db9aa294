"""Training MCF: plain functions a Ray Train worker calls unchanged, and `train_local`, which wires them in-process.

The recipe is the published one (mcf-method.md §3): AdamW (lr 1e-4, weight decay 1e-5), batch 32, one random valid
beat per record per step, one training mask per batch shared by its samples, loss ``L_g + L_l + L_t`` over every
point. Two deliberate differences ("Our decisions" 4 and 5):

- **Cosine without a wasted epoch.** The reference sets ``lr_e = lr * 0.5 * (1 + cos(pi * e / E))`` for
  e = 1..E, so its last epoch runs at lr = 0. We shift by one epoch: with epochs counted from 0 (as Ray Train
  counts them), ``lr_e = lr * 0.5 * (1 + cos(pi * e / E))`` for e = 0..E-1, starting at the full rate and ending at
  ``lr * 0.5 * (1 + cos(pi * (E - 1) / E)) > 0``.
- **Validation, not test, selects the checkpoint.** Folds 1-8 (normals) train, fold 9 validates, fold 10 is never
  read here. The threshold is the 0.95 quantile of the chosen model's scores on fold-9 normals.

Randomness: every draw that shapes training (masks, beat choice, batch order) comes from one explicit
``torch.Generator`` on the CPU, and model initialization and dropout from the global torch seed `set_seed` sets; so a
CPU run is repeatable bit for bit, and a GPU run draws the same masks and beats. Tensors live wherever the model
lives: nothing here assumes a device. A model wrapped by ``DistributedDataParallel`` (Ray Train's
``prepare_model``) works as is.
"""

from __future__ import annotations

import math
import random
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ecgad.checkpoint import save_checkpoint
from ecgad.config import PrepConfig
from ecgad.masks import eval_masks, train_masks
from ecgad.metrics import calibrate_threshold, record_auprc, record_auroc
from ecgad.model import MCF, MCFConfig, MCFOutput
from ecgad.objective import restoration_loss
from ecgad.preprocess import prepare
from ecgad.ptbxl import TRAIN_FOLDS, VALIDATION_FOLD, load_ptbxl_index, read_ptbxl_record
from ecgad.scoring import Scorer
from ecgad.types import Prepared, Rejection
from ecgad.validate import validate

BASE_LR = 1e-4
WEIGHT_DECAY = 1e-5
THRESHOLD_QUANTILE = 0.95

#: A batch is the global inputs ``(B, 12, 4800)`` and, per record, all its valid beats ``(n_i, 12, 480)``.
Batch = tuple[torch.Tensor | np.ndarray, Sequence[np.ndarray | torch.Tensor]]


# -- the pieces a Ray Train worker calls --------------------------------------------------------------------------

def set_seed(seed: int) -> torch.Generator:
    """Seed Python, numpy and torch (CPU and every GPU); return a CPU generator for masks, beats and batch order.

    The published code seeded nothing with its default seed (mcf-method.md §3 "Seeds"), so its runs could not
    be repeated. The returned generator is separate from the global stream, so the draws it makes do not depend
    on how many random numbers model construction consumed.
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


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
    """One uniformly drawn beat per record: ``(B, 12, 480)`` float32 on the CPU.

    As in the reference, beats differ every epoch; every entry of ``beats_per_record`` must hold at least one beat
    (``prepare`` rejects records without one).
    """
    counts = torch.tensor([len(b) for b in beats_per_record])
    if (counts < 1).any():
        raise ValueError(f"record(s) {torch.nonzero(counts < 1).flatten().tolist()} have no beat to sample")
    picks = (torch.rand(len(counts), generator=generator) * counts).long().clamp_max(counts - 1)
    return torch.stack([torch.as_tensor(beats[int(i)], dtype=torch.float32)
                        for beats, i in zip(beats_per_record, picks)])


def _core(model: nn.Module) -> MCF:
    """The MCF inside a ``DistributedDataParallel`` wrapper (or the model itself)."""
    return getattr(model, "module", model)


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
    trend_input = _core(model).trend_for(global_x, global_masked)
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


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def train_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, batches: Iterable[Batch],
                generator: torch.Generator, *, autocast_dtype: torch.dtype | None = None) -> dict[str, float]:
    """Train over ``batches`` (each ``(global (B,12,4800), beats per record)``); sample-weighted mean losses.

    Inputs are moved to the model's device here, so a caller may hand over CPU arrays.
    """
    model.train()
    device = _device_of(model)
    totals: dict[str, float] = defaultdict(float)
    n_samples = n_batches = 0
    start = time.perf_counter()
    for global_x, beats in batches:
        beat_x = sample_beats(beats, generator).to(device)
        global_x = torch.as_tensor(global_x, dtype=torch.float32).to(device)
        stats = train_step(model, optimizer, global_x, beat_x, generator, autocast_dtype=autocast_dtype)
        for key, value in stats.items():
            totals[key] += value * len(beats)
        n_samples += len(beats)
        n_batches += 1
    if not n_samples:
        raise ValueError("train_epoch got no batches")
    return {**{k: v / n_samples for k, v in totals.items()}, "samples": n_samples, "batches": n_batches,
            "seconds": time.perf_counter() - start}


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
        out = model(global_masked, beat_x * keep_b, _core(model).trend_for(global_x, global_masked))
        loss, parts = restoration_loss(out, global_x, beat_x)
        for key, value in {"loss": loss, **parts}.items():
            totals[key] += value.item() / len(keep_global)
    return dict(totals)


def validation_loss(model: nn.Module, batches: Iterable[Batch], generator: torch.Generator) -> dict[str, float]:
    """Sample-weighted `validation_step` over ``batches`` (each ``(global (B,12,4800), beats per record)``).

    The beat per record is drawn from ``generator``: pass a freshly seeded one every epoch, so every epoch is
    judged on the same beats and the numbers are comparable.
    """
    device = _device_of(model)
    totals: dict[str, float] = defaultdict(float)
    n_samples = 0
    for global_x, beats in batches:
        beat_x = sample_beats(beats, generator).to(device)
        stats = validation_step(model, torch.as_tensor(global_x, dtype=torch.float32).to(device), beat_x)
        for key, value in stats.items():
            totals[key] += value * len(beats)
        n_samples += len(beats)
    if not n_samples:
        raise ValueError("validation_loss got no batches")
    return {k: v / n_samples for k, v in totals.items()}


def iterate_batches(globals_: np.ndarray, beats: Sequence[np.ndarray], batch_size: int,
                    generator: torch.Generator | None = None) -> Iterator[Batch]:
    """Batches over in-memory windows, shuffled by ``generator`` (in order without one).

    A last batch of a single record is dropped when shuffling: BatchNorm in training mode cannot normalize the
    beat branch's one-token latent over one sample. Shuffling moves a different record there each epoch.
    """
    n = len(beats)
    order = torch.randperm(n, generator=generator).tolist() if generator is not None else list(range(n))
    for start in range(0, n, batch_size):
        idx = order[start:start + batch_size]
        if generator is not None and len(idx) < 2:
            break
        yield torch.from_numpy(globals_[idx]), [beats[i] for i in idx]


# -- in-process training ------------------------------------------------------------------------------------------

def _windows(prepared: Sequence[Prepared]) -> tuple[np.ndarray, list[np.ndarray]]:
    """Every window of every record as a training sample: globals ``(N, 12, 4800)`` and their beats."""
    windows = [w for p in prepared for w in p.windows]
    return np.stack([w.global_input for w in windows]).astype(np.float32), [w.beats for w in windows]


def load_split(data_root: str | Path, prep_config: PrepConfig, log: Callable[[str], None] = print
               ) -> tuple[list[Prepared], list[Prepared], np.ndarray, Counter]:
    """Read and prepare the training normals (folds 1-8) and every fold-9 record of a PTB-XL root.

    Returns ``(train, validation, validation labels (1 = abnormal), rejection reasons counted by code)``.
    Records that cannot be read or prepared are skipped and counted: one bad file must not stop a training run.
    Fold 10 (test) is not read at all.
    """
    index = load_ptbxl_index(data_root)
    train_rows = index["strat_fold"].isin(TRAIN_FOLDS) & index["is_normal"]
    index = index[train_rows | (index["strat_fold"] == VALIDATION_FOLD)]
    train, val, val_labels = [], [], []
    rejections: Counter = Counter()
    for i, (_, row) in enumerate(index.iterrows(), 1):
        try:
            record = read_ptbxl_record(data_root, row)
            prepared = prepare(validate(record), prep_config)
        except Rejection as rejection:
            rejections[rejection.code] += 1
            continue
        prepared.metadata.update(record.metadata)
        if row["strat_fold"] == VALIDATION_FOLD:
            val.append(prepared)
            val_labels.append(0 if row["is_normal"] else 1)
        else:
            train.append(prepared)
        if i % 1000 == 0:
            log(f"prepared {i}/{len(index)} records")
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
                log: Callable[[str], None] = print, trend_from_masked: bool = False, score_mode: str = "full",
                autocast_dtype: torch.dtype | None = None, lr: float = BASE_LR) -> Path:
    """Train MCF on a PTB-XL root (real or synthetic) in this process and write the finished checkpoint.

    Folds 1-8 normals train; after every epoch the fold-9 normals give a validation loss (deterministic test
    masks) and, when fold 9 holds abnormal records, the scorer gives the fold-9 record AUROC. The kept epoch is the
    best by AUROC when it exists (the quantity we report, measured on held-out data) and by validation loss
    otherwise; ``metadata["selection"]`` says which and why. The threshold is the 0.95 quantile of the kept model's
    scores on fold-9 normals. ``lr`` is the peak of the cosine schedule (the paper's 1e-4 by default; a small model
    trained for a few minutes learns far more with 1e-3). Returns ``out_dir``.
    """
    if config not in ("small", "paper"):
        raise ValueError(f"config must be 'small' or 'paper', got {config!r}")
    generator = set_seed(seed)
    device = _resolve_device(device)
    prep_config = PrepConfig()
    base = MCFConfig.small() if config == "small" else MCFConfig.paper()
    model_config = replace(base, trend_from_masked=trend_from_masked)

    started = time.perf_counter()
    train, val, val_labels, rejections = load_split(data_root, prep_config, log)
    val_normals = [p for p, label in zip(val, val_labels) if label == 0]
    log(f"data: {len(train)} training normals, fold {VALIDATION_FOLD}: {len(val_normals)} normal + "
        f"{int(val_labels.sum())} abnormal; rejected {dict(rejections) or 0} ({time.perf_counter() - started:.0f} s)")
    if len(train) < 2:
        raise ValueError(f"{data_root}: fewer than 2 usable training normals in folds {TRAIN_FOLDS[0]}-"
                         f"{TRAIN_FOLDS[-1]}")
    if not val_normals:
        raise ValueError(f"{data_root}: fold {VALIDATION_FOLD} has no usable normal record to validate on and to "
                         "calibrate the threshold with")
    train_globals, train_beats = _windows(train)
    val_globals, val_beats = _windows(val_normals)
    use_auroc = 0 < int(val_labels.sum()) < len(val_labels)

    model = MCF(model_config).to(device)
    optimizer = make_optimizer(model, lr=lr)
    history: list[dict[str, Any]] = []
    best: dict[str, Any] | None = None
    for epoch in range(epochs):
        epoch_lr = lr_for_epoch(epoch, epochs, lr)
        set_lr(optimizer, epoch_lr)
        stats = train_epoch(model, optimizer, iterate_batches(train_globals, train_beats, batch_size, generator),
                            generator, autocast_dtype=autocast_dtype)
        val_stats = validation_loss(model, iterate_batches(val_globals, val_beats, batch_size),
                                    torch.Generator().manual_seed(seed + 1))
        entry = {"epoch": epoch, "lr": epoch_lr, "train": stats, "val_loss": val_stats["loss"]}
        scores = None
        if use_auroc:
            scores = _record_scores(model, val, prep_config, device, score_mode)
            entry["val_auroc"] = record_auroc(val_labels, scores)
            entry["val_auprc"] = record_auprc(val_labels, scores)
        history.append(entry)
        log(f"epoch {epoch}/{epochs - 1} lr {epoch_lr:.2e} train loss {stats['loss']:.4f} val loss {val_stats['loss']:.4f}"
            + (f" val AUROC {entry['val_auroc']:.4f}" if use_auroc else "") + f" ({stats['seconds']:.0f} s)")
        key = (entry["val_auroc"], -entry["val_loss"]) if use_auroc else (-entry["val_loss"],)
        if best is None or key > best["key"]:
            best = {"key": key, "epoch": epoch, "scores": scores,
                    "state": {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}}

    model.load_state_dict(best["state"])
    scores = best["scores"]
    if scores is None:
        scores = _record_scores(model, val, prep_config, device, score_mode)
    threshold = calibrate_threshold(scores[val_labels == 0], THRESHOLD_QUANTILE)
    selection = ({"metric": "val_auroc", "mode": "max", "reason": f"fold {VALIDATION_FOLD} holds normal and abnormal "
                  "records, so the detection AUROC we report is measured directly on held-out data (ties: lower "
                  "validation loss); fold 10 is never read"}
                 if use_auroc else
                 {"metric": "val_loss", "mode": "min", "reason": f"fold {VALIDATION_FOLD} holds no abnormal record, so "
                  "the restoration loss of held-out normals under the deterministic test masks is the best "
                  "available signal"})
    best_entry = history[best["epoch"]]
    metadata = {
        "data_root": str(Path(data_root).resolve()), "config": config, "epochs": epochs, "batch_size": batch_size,
        "seed": seed, "device": str(device), "score_mode": score_mode,
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
    path = save_checkpoint(out_dir, model, model_config, prep_config, threshold, metadata=metadata,
                           threshold_quantile=THRESHOLD_QUANTILE)
    log(f"kept epoch {best['epoch']} ({selection['metric']}); threshold {threshold:.6g}; checkpoint {path}")
    return path
