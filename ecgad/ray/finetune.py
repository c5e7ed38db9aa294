"""Ray Train (V2) fine-tuning of the diagnosis network: `ecgad.finetune`'s recipe on the shards `jobs.train` reads.

The same data path as pretraining (`ecgad.ray.train`): the shards of ``jobs.preprocess`` streamed by Ray Data, the
training folds split equally over the workers and fold 9 unequally (`ecgad.ray.train.IngestConfig`), DDP through
``prepare_model``, replicas aligned before validation. What differs:

- **rows**: every prepared record of folds 1-8 with a class at the label level (not only the normals), made into
  diagnosis batches by `DiagnosisCollate` (targets from the row's ``scp_codes`` through a statement -> classes map
  computed once on the driver, `ecgad.labels.code_map`);
- **model**: `ecgad.diagnosis.DiagnosisNet` built from the pretrained detector (``init``, ``freeze_encoders``),
  trained by `ecgad.diagnosis.train_epoch`;
- **validation, every epoch**: each worker predicts its share of fold 9; the gathered probabilities give the macro
  AUROC the epoch is ranked by and the per-class thresholds (`ecgad.diagnosis.fit_thresholds`) stored in its
  checkpoint (`ecgad.diagnosis.save_diagnosis_checkpoint`: the detector unchanged, plus the network).

`fit` publishes the best epoch as ``OUT/models/<version>/`` with ``OUT/best`` pointing at it, and writes
``OUT/metrics.json``. A run starts from the detector each time (no resumption of a half-finished fine-tune: the
runs are short next to pretraining).
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ray.data.collate_fn import NumpyBatchCollateFn

from ecgad.atomic import write_json
from ecgad.checkpoint import POINTER, load_checkpoint
from ecgad.config import PrepConfig
from ecgad.diagnosis import (Batch, HeadConfig, build_network, fit_thresholds, macro_auroc, make_batch, make_loss,
                             predict, save_diagnosis_checkpoint, train_epoch)
from ecgad.finetune import FINETUNE_LR, describe
from ecgad.labels import parse_codes, targets_from_map
from ecgad.log import get_logger
from ecgad.ray.train import IngestConfig, _align_replicas, _gather, _json_ready, export_checkpoint
from ecgad.shards import training_arrays

logger = get_logger(__name__)

#: The shard columns fine-tuning reads: the training columns plus the statements.
FINETUNE_COLUMNS = ["record_id", "window_len", "signals", "beat_counts", "beat_len", "beats", "scp_codes"]
METRIC = "val_macro_auroc"


@dataclass
class FinetuneSettings:
    """Everything a worker needs, passed as ``train_loop_config``."""

    pretrained: str                       # the detector's version directory (resolved once, on the driver)
    level: str
    classes: list[str]
    classes_of: dict[str, list[str]]      # statement -> classes at the level (`ecgad.labels.code_map`)
    class_counts: list[int]               # training positives per class (the balanced loss's weights)
    split: dict[str, Any]                 # `ecgad.labels.head_and_tail`
    prep_config: dict[str, Any] = field(default_factory=lambda: PrepConfig().to_dict())
    init: str = "pretrained"
    freeze_encoders: bool = False
    loss: str = "bce"
    epochs: int = 10
    batch_size: int = 32
    lr: float = FINETUNE_LR
    seed: int = 0
    anomaly_inputs: bool = True

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def rows_to_batch(rows: dict[str, np.ndarray], settings: FinetuneSettings) -> tuple[Batch, np.ndarray]:
    """Shard rows -> a diagnosis `Batch` of their windows with targets, and the row of every window."""
    globals_, beats = training_arrays(rows, PrepConfig.from_dict(settings.prep_config))
    window_row = np.repeat(np.arange(len(rows["record_id"])), [len(c) for c in rows["beat_counts"]])
    targets = targets_from_map([parse_codes(c) for c in rows["scp_codes"]], settings.classes_of, settings.classes)
    return make_batch(globals_, beats, targets[window_row]), window_row


class DiagnosisCollate(NumpyBatchCollateFn):
    """Shard rows -> a diagnosis `Batch` as a dict of tensors (Ray Data collates in threads; nothing shared)."""

    def __init__(self, settings: dict[str, Any]) -> None:
        self.settings = FinetuneSettings(**settings)

    def __call__(self, rows: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        return rows_to_batch(rows, self.settings)[0]._asdict()


def has_label(row: dict[str, Any], classes_of: dict[str, list[str]]) -> bool:
    """Whether a shard row carries a class at the level (records without one are left out, `ecgad.labels`)."""
    return any(classes_of.get(code) for code in parse_codes(row["scp_codes"]))


def _validate(net: torch.nn.Module, shard, settings: FinetuneSettings) -> tuple[np.ndarray, np.ndarray]:
    """Targets and probabilities of every fold-9 record, over all workers (records of one window: PTB-XL's)."""
    targets, probs = [], []
    for rows in shard.iter_batches(batch_size=settings.batch_size, batch_format="numpy"):
        batch, window_row = rows_to_batch(rows, settings)
        window_probs = predict(net, [batch])
        n_rows = len(rows["record_id"])
        counts = np.maximum(np.bincount(window_row, minlength=n_rows), 1)[:, None]
        summed = np.zeros((n_rows, len(settings.classes)))
        np.add.at(summed, window_row, window_probs)
        probs.append(summed / counts)
        targets.append(targets_from_map([parse_codes(c) for c in rows["scp_codes"]], settings.classes_of,
                                        settings.classes))
    empty = np.zeros((0, len(settings.classes)))
    parts = _gather((np.concatenate(targets) if targets else empty, np.concatenate(probs) if probs else empty))
    return np.concatenate([t for t, _ in parts]), np.concatenate([p for _, p in parts])


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """The function every Ray Train worker runs (module docstring)."""
    import ray.train
    import ray.train.torch

    from ecgad.model import unwrap
    from ecgad.train import lr_for_epoch, make_optimizer, set_lr, set_seed

    settings = FinetuneSettings(**config)
    torch.set_num_threads(1)
    rank = ray.train.get_context().get_world_rank()
    set_seed(settings.seed)    # the same initial head on every worker (DDP also broadcasts rank 0's)
    detector = load_checkpoint(settings.pretrained)
    head_config = HeadConfig(len(settings.classes), detector.model_config.hidden, detector.model_config.n_leads,
                             settings.anomaly_inputs)
    net = ray.train.torch.prepare_model(build_network(head_config, detector.model, settings.init,
                                                      settings.freeze_encoders))
    optimizer = make_optimizer(net, lr=settings.lr)
    loss_fn = make_loss(settings.loss, settings.class_counts)
    train_shard, val_shard = ray.train.get_dataset_shard("train"), ray.train.get_dataset_shard("validation")
    history: list[dict[str, Any]] = []
    for epoch in range(settings.epochs):
        set_lr(optimizer, lr_for_epoch(epoch, settings.epochs, settings.lr))
        batches = (Batch(**b) for b in train_shard.iter_torch_batches(
            batch_size=settings.batch_size, collate_fn=DiagnosisCollate(config),
            local_shuffle_buffer_size=2 * settings.batch_size, local_shuffle_seed=settings.seed + 1000 * epoch + rank))
        losses = _gather(train_epoch(net, optimizer, batches, loss_fn))
        _align_replicas(net)
        targets, probs = _validate(unwrap(net), val_shard, settings)
        metrics = {"epoch": epoch, "train_loss": float(np.mean(losses)), METRIC: macro_auroc(targets, probs),
                   "val_records": len(targets)}
        history.append(_json_ready(metrics))
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if rank == 0:
                diagnosis = describe(settings.level, settings.classes, fit_thresholds(targets, probs), settings.split,
                                     init=settings.init, loss=settings.loss, detector=detector,
                                     selection={"epoch": epoch, METRIC: metrics[METRIC]})
                path = save_diagnosis_checkpoint(Path(tmp) / "checkpoint", detector, net, diagnosis,
                                                 metadata={"epoch": epoch, "history": history,
                                                           "settings": settings.to_dict()})
                checkpoint = ray.train.Checkpoint.from_directory(str(path))
            ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=f"epoch-{epoch:04d}")
        if rank == 0:
            logger.info("fine-tune epoch %d: train loss %.4f, fold-9 macro AUROC %.4f (%d records)", epoch,
                        metrics["train_loss"], metrics[METRIC], len(targets))


def fit(data: str | Path, out: str | Path, settings: FinetuneSettings, *, num_workers: int = 1,
        use_gpu: bool = False, cpus_per_worker: float = 1.0, name: str = "finetune",
        storage_path: str | None = None) -> dict[str, Any]:
    """Fine-tune on the shards at ``data``; publish the best fold-9 epoch as ``out/models/<version>/``, point
    ``out/best`` at it and write ``out/metrics.json``; returns what it writes there."""
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from ecgad.ptbxl import TRAIN_FOLDS, VALIDATION_FOLD
    from ecgad.ray.data import read_shards

    started = time.perf_counter()
    data, out = Path(data).resolve(), Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    labelled = {"fn": has_label, "fn_kwargs": {"classes_of": settings.classes_of}}
    trainer = TorchTrainer(
        train_loop_per_worker, train_loop_config=settings.to_dict(),
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": cpus_per_worker, **({"GPU": 1} if use_gpu else {})}),
        run_config=RunConfig(name=name, storage_path=storage_path or str(out),
                             checkpoint_config=CheckpointConfig(num_to_keep=2, checkpoint_score_attribute=METRIC,
                                                                checkpoint_score_order="max")),
        datasets={"train": read_shards(data, FINETUNE_COLUMNS, TRAIN_FOLDS, shuffle_seed=settings.seed)
                  .filter(**labelled),
                  "validation": read_shards(data, FINETUNE_COLUMNS, (VALIDATION_FOLD,)).filter(**labelled)},
        dataset_config=IngestConfig())
    result = trainer.fit()
    if not result.best_checkpoints:
        raise RuntimeError(f"run {name} reported no checkpoint (no epochs to train?)")
    best, best_metrics = max(result.best_checkpoints, key=lambda kept: _rank(kept[1].get(METRIC)))
    exported = export_checkpoint(best, out)
    summary = {
        "run": {"name": name, "path": result.path, "num_workers": num_workers, "use_gpu": use_gpu},
        "data": str(data), "settings": {k: v for k, v in settings.to_dict().items() if k != "classes_of"},
        "best": {"epoch": best_metrics["epoch"], METRIC: _json_ready(best_metrics)[METRIC],
                 "checkpoint": str(exported.path), "pointer": str(out / POINTER),
                 "model_version": exported.model_version,
                 "why": f"max {METRIC} on fold {VALIDATION_FOLD}; the test fold is never looked at"},
        "epochs": exported.metadata.get("history", []),
        "wall_s": round(time.perf_counter() - started, 3),
    }
    write_json(out / "metrics.json", summary, sort_keys=False)
    return summary


def _rank(value: float | None) -> float:
    """Larger is better; an undefined AUROC ranks below every defined one."""
    return value if value is not None and np.isfinite(value) else -np.inf
