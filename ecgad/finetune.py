"""Fine-tune a diagnosis network (`ecgad.diagnosis`) from an anomaly-detection checkpoint, in this process.

The in-process twin of ``jobs.finetune`` (Ray Train, `ecgad.ray.finetune`), for small data sets and the long-tail
benchmark (``bench/longtail.py``), which trains many variants on the same prepared records. Both follow one recipe:

- every record of a PTB-XL root (not only the normals) with at least one class at the label level
  (`ecgad.labels`); folds 1-8 train, fold 9 selects the epoch (macro AUROC) and sets each class's threshold,
  fold 10 is only scored once, after selection;
- AdamW with the per-epoch cosine schedule of `ecgad.train` (`lr_for_epoch`); every window of a record is a
  sample carrying the record's labels, and a record's probabilities are the mean over its windows;
- the result is published like a detector (`ecgad.checkpoint.publish_checkpoint`): ``<parent>/models/<version>/``
  with ``out_dir`` a link to it, holding the detector it started from and the diagnosis network.
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ecgad.checkpoint import Checkpoint, load_checkpoint, publish_checkpoint
from ecgad.config import PrepConfig
from ecgad.diagnosis import (Batch, DiagnosisNet, FeatureBatch, HeadConfig, HeadOnFeatures, build_network,
                             cached_features, diagnosis_metrics, fit_thresholds, macro_auroc, make_batch, make_loss,
                             predict, record_probabilities, save_diagnosis_checkpoint, train_epoch)
from ecgad.labels import head_and_tail, level_classes, multi_hot, read_statements, vocabulary
from ecgad.log import get_logger
from ecgad.ptbxl import TEST_FOLD, TRAIN_FOLDS, VALIDATION_FOLD, load_ptbxl_index
from ecgad.train import lr_for_epoch, make_optimizer, prepare_index_rows, set_lr, set_seed
from ecgad.types import Prepared

logger = get_logger(__name__)

#: Peak learning rate: fine-tuning a small model for a few epochs needs more than pretraining's 1e-4.
FINETUNE_LR = 1e-3


@dataclass
class LabelledFold:
    """The prepared records of one fold group: their windows (each window's beats), the record of every window,
    and the records' multi-hot targets ``(records, classes)``."""

    record_ids: list[str]
    globals_: np.ndarray            # (windows, 12, 4800) float32
    beats: list[np.ndarray]         # per window, (n_i, 12, 480) float32
    window_record: np.ndarray       # (windows,) index into record_ids
    targets: np.ndarray             # (records, classes) float32

    @classmethod
    def from_prepared(cls, prepared: Sequence[Prepared], targets: np.ndarray) -> "LabelledFold":
        windows = [(i, w) for i, p in enumerate(prepared) for w in p.windows]
        return cls([p.record_id for p in prepared],
                   np.stack([w.global_input for _, w in windows]).astype(np.float32) if windows
                   else np.zeros((0, 12, PrepConfig().global_len), np.float32),
                   [w.beats for _, w in windows], np.array([i for i, _ in windows], dtype=np.int64), targets)

    def window_targets(self) -> np.ndarray:
        return self.targets[self.window_record]

    def batches(self, batch_size: int, generator: torch.Generator | None = None) -> Iterator[Batch]:
        """Window batches with targets, shuffled by ``generator`` (in order without one)."""
        n = len(self.beats)
        order = torch.randperm(n, generator=generator).tolist() if generator is not None else list(range(n))
        targets = self.window_targets()
        for start in range(0, n, batch_size):
            idx = order[start:start + batch_size]
            yield make_batch(self.globals_[idx], [self.beats[i] for i in idx], targets[idx])

    def probabilities(self, net: torch.nn.Module, batch_size: int = 32) -> np.ndarray:
        """Per-record probabilities ``(records, classes)`` of ``net``."""
        return record_probabilities(predict(net, self.batches(batch_size)), self.window_record, len(self.record_ids))


class FeatureFold(LabelledFold):
    """A fold whose windows are the cached features of a frozen-encoder network (`ecgad.diagnosis.HeadOnFeatures`
    trains on them): a linear probe computes its encoders once, not every epoch."""

    def __init__(self, fold: LabelledFold, net: DiagnosisNet, batch_size: int) -> None:
        super().__init__(fold.record_ids, fold.globals_, fold.beats, fold.window_record, fold.targets)
        self.features = cached_features(net, fold.batches(batch_size))

    def batches(self, batch_size: int, generator: torch.Generator | None = None) -> Iterator[FeatureBatch]:
        n = len(self.features)
        order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
        targets = torch.from_numpy(self.window_targets())
        for start in range(0, n, batch_size):
            idx = order[start:start + batch_size]
            yield FeatureBatch(self.features[idx], targets[idx])


@dataclass
class LabelledData:
    """A PTB-XL root prepared for diagnosis at one label level (`load_labelled`)."""

    level: str
    classes: list[str]
    split: dict[str, Any]           # `ecgad.labels.head_and_tail` of the training fold
    train: LabelledFold
    val: LabelledFold
    test: LabelledFold
    rejections: dict[str, int]


def load_labelled(data_root: str | Path, level: str, prep_config: PrepConfig = PrepConfig()) -> LabelledData:
    """Every record of a PTB-XL root with a class at ``level``, prepared, split into folds 1-8 / 9 / 10."""
    index = load_ptbxl_index(data_root)
    statements = read_statements(data_root)
    classes = vocabulary(index["scp_codes"], statements, level)
    labelled = index[[bool(level_classes(c, statements, level)) for c in index["scp_codes"]]]
    prepared, rejections = prepare_index_rows(data_root, labelled, prep_config)
    folds = {}
    for name, wanted in (("train", TRAIN_FOLDS), ("val", (VALIDATION_FOLD,)), ("test", (TEST_FOLD,))):
        members = [(row, p) for row, p in prepared if row["strat_fold"] in wanted]
        folds[name] = LabelledFold.from_prepared(
            [p for _, p in members], multi_hot([row["scp_codes"] for row, _ in members], statements, level, classes))
    return LabelledData(level, classes, head_and_tail(folds["train"].targets, classes), folds["train"], folds["val"],
                        folds["test"], dict(rejections))


def finetune_local(data: LabelledData, pretrained: str | Path, out_dir: str | Path, *, init: str = "pretrained",
                   freeze_encoders: bool = False, loss: str = "bce", epochs: int = 10, batch_size: int = 32,
                   lr: float = FINETUNE_LR, seed: int = 0, anomaly_inputs: bool = True,
                   device: str | torch.device = "cpu", n_boot: int = 200,
                   probe_features: dict[str, FeatureFold] | None = None) -> dict[str, Any]:
    """Fine-tune on ``data`` from the detector at ``pretrained`` (`ecgad.diagnosis.INITS`), keep the epoch with the
    best fold-9 macro AUROC, set the thresholds on fold 9, measure fold 10, publish; returns the summary
    (``checkpoint``, ``val``/``test`` metrics, ``history``).

    ``probe_features``: a dict that keeps a linear probe's cached features (`FeatureFold`) for the next probe on
    the same data and detector (the features depend on nothing else), filled on first use."""
    started = time.perf_counter()
    generator = set_seed(seed)
    detector = load_checkpoint(pretrained)
    head_config = HeadConfig(len(data.classes), detector.model_config.hidden, detector.model_config.n_leads,
                             anomaly_inputs)
    net = build_network(head_config, detector.model, init, freeze_encoders).to(device)
    folds = {"train": data.train, "val": data.val, "test": data.test}
    trained = net
    if freeze_encoders:   # the features do not change: compute them once
        cache = probe_features if probe_features is not None and init == "pretrained" else {}
        folds = {name: cache.get(name) or FeatureFold(fold, net, batch_size) for name, fold in folds.items()}
        cache.update(folds)
        trained = HeadOnFeatures(net)
    loss_fn = make_loss(loss, data.train.window_targets().sum(axis=0))
    optimizer = make_optimizer(trained, lr=lr)
    history, best = [], None
    for epoch in range(epochs):
        set_lr(optimizer, lr_for_epoch(epoch, epochs, lr))
        train_loss = train_epoch(trained, optimizer, folds["train"].batches(batch_size, generator), loss_fn)
        val_probs = folds["val"].probabilities(trained, batch_size)
        entry = {"epoch": epoch, "train_loss": train_loss, "val_macro_auroc": macro_auroc(data.val.targets, val_probs)}
        history.append(entry)
        logger.info("finetune epoch %d/%d: train loss %.4f, fold-9 macro AUROC %.4f", epoch, epochs - 1, train_loss,
                    entry["val_macro_auroc"])
        if best is None or _better(entry["val_macro_auroc"], best["value"]):
            best = {"epoch": epoch, "value": entry["val_macro_auroc"], "val_probs": val_probs,
                    "state": {k: v.detach().to("cpu", copy=True) for k, v in net.state_dict().items()}}
    net.load_state_dict(best["state"])
    thresholds = fit_thresholds(data.val.targets, best["val_probs"])
    summary = {
        "val": diagnosis_metrics(data.val.targets, best["val_probs"], thresholds, data.classes, data.split,
                                 n_boot=n_boot),
        "test": diagnosis_metrics(data.test.targets, folds["test"].probabilities(trained, batch_size), thresholds,
                                  data.classes, data.split, n_boot=n_boot),
        "history": history,
    }
    diagnosis = describe(data.level, data.classes, thresholds, data.split, init=init, loss=loss, detector=detector,
                         selection={"epoch": best["epoch"], "val_macro_auroc": best["value"]})
    out_dir = Path(out_dir).resolve()
    with tempfile.TemporaryDirectory() as staging:
        saved = save_diagnosis_checkpoint(Path(staging) / "checkpoint", detector, net, diagnosis,
                                          metadata={"epochs": epochs, "batch_size": batch_size, "lr": lr,
                                                    "seed": seed, "history": history})
        published = publish_checkpoint(saved, out_dir.parent, out_dir.name)
    summary["checkpoint"] = str(published.path)
    summary["seconds"] = time.perf_counter() - started
    return summary


def probe_feature_folds(data: LabelledData, pretrained: str | Path, batch_size: int = 32) -> dict[str, FeatureFold]:
    """The cached features of a linear probe on the detector at ``pretrained`` (``probe_features`` of
    `finetune_local`), computed ahead, e.g. once for several processes."""
    detector = load_checkpoint(pretrained)
    net = build_network(HeadConfig(len(data.classes), detector.model_config.hidden, detector.model_config.n_leads),
                        detector.model, "pretrained", freeze_encoders=True)
    return {name: FeatureFold(fold, net, batch_size)
            for name, fold in (("train", data.train), ("val", data.val), ("test", data.test))}


def describe(level: str, classes: Sequence[str], thresholds: np.ndarray, split: dict[str, Any], *, init: str,
             loss: str, detector: Checkpoint, selection: dict[str, Any]) -> dict[str, Any]:
    """The ``diagnosis`` entry of a checkpoint (`ecgad.diagnosis.save_diagnosis_checkpoint` adds the network's)."""
    return {"level": level, "classes": list(classes), "thresholds": [float(t) for t in thresholds],
            "threshold_rule": f"per class, max Youden J on fold {VALIDATION_FOLD}",
            "split": split, "init": init, "loss": loss,
            "pretrained": {"path": str(detector.path), "model_version": detector.model_version},
            "selection": {"metric": f"fold-{VALIDATION_FOLD} macro AUROC", **selection}}


def _better(value: float, best: float) -> bool:
    """Larger is better; an undefined value (NaN) ranks below every defined one."""
    return math.isfinite(value) and (not math.isfinite(best) or value > best)
