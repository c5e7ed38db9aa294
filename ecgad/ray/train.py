"""The Ray Train (V2) adapter: `ecgad.train`'s epoch loop, unchanged, in data-parallel Ray Train workers.

What Ray adds around the library, and nothing more:

- **Data**: the fold 1-8 normals of a shards directory (`ecgad.shards`), streamed by Ray Data and split equally over
  the workers (DDP needs the same number of steps on every worker); each row becomes one training sample in the
  collate function (`TrainingCollate`: the record's global input and one random beat, drawn by
  `ecgad.train.sample_beats` as the published loader draws). The fold-9 rows are split too, but unequally, so every
  validation record is scored exactly once.
- **Model**: ``ray.train.torch.prepare_model`` (device placement, DDP), trained by `ecgad.train.train_epoch`. Masks
  are drawn from a generator seeded per (seed, epoch, rank), so an epoch redone after a failure draws the same masks.
- **Validation, every epoch**: the restoration loss of the fold-9 normals (`ecgad.train.validation_step`, fixed
  beats and masks so epochs compare), and the fold-9 records scored with the `Scorer` (the protocol evaluation and
  serving use), giving the validation AUROC where fold 9 has abnormal records and the threshold (a quantile of the
  normal records' scores, `ecgad.metrics.calibrate_threshold`) stored in that epoch's checkpoint.
- **Checkpoints, every epoch**: an ecgad checkpoint directory (`ecgad.checkpoint.save_checkpoint`) plus
  `TRAIN_STATE_FILE` (optimizer state, epoch, history), reported with ``ray.train.report``. Ray keeps the best by the
  selection metric and always the latest, and `fit` exports the best of those by `ecgad.train.selection_key` (the
  rule `train_local` selects by). A restarted worker group (``FailureConfig.max_failures``) or a rerun with the same
  run name and storage path resumes after the latest reported epoch, with the optimizer state restored, so no
  epoch is repeated or skipped.

`fit` is the driver side: it builds the datasets and the ``TorchTrainer``, runs it, and publishes the selected
checkpoint as ``OUT/models/<version>/``, pointed at by ``OUT/best`` (`ecgad.checkpoint.publish_checkpoint`), with
``OUT/metrics.json``. Fault injection for tests (`TrainSettings.fail_at_epoch`) makes
the last worker die once, mid-epoch, recorded by a marker file so the restarted run does not fail again.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
import zlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from ray.data.collate_fn import NumpyBatchCollateFn
from ray.train import DataConfig

from ecgad.atomic import write_json, write_text
from ecgad.checkpoint import POINTER, publish_checkpoint
from ecgad.config import PrepConfig
from ecgad.log import get_logger
from ecgad.model import MCF, MCFConfig, unwrap
from ecgad.ray import metrics as job_metrics
from ecgad.shards import training_arrays
from ecgad.storage import for_ray, is_file, is_uri, join, location
from ecgad.train import BASE_LR, SELECTION_ORDER, EpochStats, sample_beats, seeded_generator, selection_key

#: Optimizer state, epoch and history, next to the model files in every reported checkpoint.
TRAIN_STATE_FILE = "train_state.pt"

#: Records per validation scoring call: enough beats to fill the Scorer's batches, little memory.
VALIDATION_BATCH = 16


@dataclass
class TrainSettings:
    """Everything a worker needs, passed as ``train_loop_config`` (a plain dict, so Ray can ship it)."""

    model_config: dict[str, Any]
    prep_config: dict[str, Any] = field(default_factory=lambda: PrepConfig().to_dict())
    epochs: int = 50
    batch_size: int = 32
    lr: float = BASE_LR                  # peak of the per-epoch cosine schedule (the paper's 1e-4)
    seed: int = 0
    select_by: str = "val_loss"          # a key of ecgad.train.SELECTION_ORDER
    threshold_quantile: float = 0.95
    val_mode: str = "full"               # Scorer mode for validation scores (and so for the threshold)
    shuffle_buffer: int | None = None    # rows in Ray Data's local shuffle buffer (default two batches), mixing
    #                                      shard files read in a new order every epoch (`ecgad.ray.data.read_shards`);
    #                                      the first batch waits for the buffer to fill, so larger starts later
    fail_at_epoch: int | None = None     # testing: the last worker exits mid-way through this epoch, once
    failure_marker: str | None = None    # where that failure is recorded (shared storage)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainSettings":
        return cls(**data)


logger = get_logger(__name__)


class WorkerEpoch(NamedTuple):
    """One worker's training epoch, as gathered on every rank."""

    node_id: str
    stats: EpochStats


class WorkerValidation(NamedTuple):
    """One worker's share of validation, as gathered on every rank."""

    loss_sum: float                   # validation loss times samples, over this worker's fold-9 normals
    samples: int
    scored: list[tuple[bool, float]]  # (is_normal, record score) per fold-9 record this worker scored


# -- data ---------------------------------------------------------------------------------------------------------

def ready_batch(batch: dict[str, np.ndarray], prep_config: PrepConfig, *entropy: int) -> tuple[torch.Tensor,
                                                                                                 torch.Tensor]:
    """Shard rows -> ``(global (B, 12, 4800), beat (B, 12, 480))`` float32 tensors, the beat drawn by
    `ecgad.train.sample_beats` from a generator seeded by ``entropy`` and the batch's record ids: the same rows
    draw the same beats, whichever thread collates them."""
    global_x, beats = training_arrays(batch, prep_config)
    ids = zlib.crc32("\n".join(map(str, batch["record_id"])).encode())
    return torch.from_numpy(global_x), sample_beats(beats, seeded_generator(*entropy, ids))


class TrainingCollate(NumpyBatchCollateFn):
    """Shard rows -> ``{"global": (B, 12, 4800), "beat": (B, 12, 480)}`` float32 tensors (`ready_batch`).

    Ray Data calls collate functions from several threads, so the beat draw cannot share one generator: each batch
    seeds its own from (seed, epoch, rank, its record ids), which is thread-safe and gives every record a new beat
    each epoch.
    """

    def __init__(self, seed: int, epoch: int, rank: int, prep_config: PrepConfig) -> None:
        self.seed, self.epoch, self.rank, self.prep_config = seed, epoch, rank, prep_config

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        global_x, beat_x = ready_batch(batch, self.prep_config, self.seed, self.epoch, self.rank)
        return {"global": global_x, "beat": beat_x}


class IngestConfig(DataConfig):
    """Train split *equally* over workers (DDP steps in lockstep, so every worker needs the same number of
    batches; Ray drops at most ``workers - 1`` rows per epoch for it), validation split *unequally* (every fold-9
    record is scored exactly once, none dropped)."""

    def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
        # Ray Train V2 configures one dataset per call, when the workers first ask for its shard.
        from ray.data import ExecutionOptions

        output: list[dict[str, Any]] = [{} for _ in range(world_size)]
        for name, dataset in datasets.items():
            dataset = dataset.copy(dataset)
            # Fresh defaults, not DataConfig.default_ingest_options(): in Ray 2.60 that one passes the deprecated
            # ``exclude_resources`` (a DeprecationWarning on every run); Train reserves its workers' resources itself.
            dataset.context.execution_options = ExecutionOptions()
            splits = dataset.streaming_split(world_size, equal=name == "train", locality_hints=worker_node_ids)
            for shard, split in zip(output, splits):
                shard[name] = split
        return output


# -- the worker ---------------------------------------------------------------------------------------------------

def _gather(value: Any) -> list[Any]:
    """Every worker's ``value`` (all ranks get the list); a one-element list without a process group."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [value]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def _align_replicas(model: torch.nn.Module) -> None:
    """Give every rank rank 0's weights and batch-norm statistics, bit for bit, before validation.

    DDP copies rank 0's buffers to the other ranks at the *start* of each forward pass, so after an epoch's last
    step each rank's BatchNorm running statistics include its own last batch: rank 1 would validate (and score its
    share of the fold-9 records, hence the threshold) with statistics the checkpoint, saved from rank 0, does not
    have (measured: a threshold 2-3e-5 off the exported model's own scores). Parameters are broadcast too, so
    nothing rests on the all-reduce giving every rank bitwise the same gradients.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    with torch.no_grad():
        flat = torch.nn.utils.parameters_to_vector(model.parameters())
        dist.broadcast(flat, src=0)
        torch.nn.utils.vector_to_parameters(flat, model.parameters())
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)


def _resume(settings: TrainSettings) -> tuple[MCF, dict[str, Any] | None]:
    """A fresh model, or the one of the latest reported checkpoint with its training state."""
    import ray.train

    from ecgad.checkpoint import load_checkpoint

    model_config = MCFConfig.from_dict(settings.model_config)
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return MCF(model_config), None
    with checkpoint.as_directory() as directory:
        model = load_checkpoint(directory, device="cpu", expected_model_config=model_config).model
        state = torch.load(Path(directory) / TRAIN_STATE_FILE, map_location="cpu", weights_only=True)
    return model.train(), state


def _validate(model: torch.nn.Module, shard, settings: TrainSettings,
              device: torch.device) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Validation loss of the fold-9 normals and scores of every fold-9 record, over all workers; and the
    calibration (`ecgad.drift.Calibration`) of the normals' scores, None when fold 9 has none."""
    from ecgad.drift import Calibration
    from ecgad.metrics import calibrate_threshold, record_auroc
    from ecgad.rows import row_to_prepared
    from ecgad.scoring import Scorer
    from ecgad.train import validation_step

    prep_config = PrepConfig.from_dict(settings.prep_config)
    net = unwrap(model)
    scorer = Scorer(net, prep_config, device=device, mode=settings.val_mode)
    loss_sum, loss_n, scored = 0.0, 0, []
    for batch in shard.iter_batches(batch_size=VALIDATION_BATCH, batch_format="numpy"):
        normal = np.asarray(batch["is_normal"], dtype=bool)
        if normal.any():
            # The same beat and masks for a record every epoch, so the loss compares checkpoints, not draws.
            global_x, beat_x = ready_batch({k: v[normal] for k, v in batch.items()}, prep_config, settings.seed)
            loss = validation_step(net, global_x.to(device), beat_x.to(device))["loss"]
            loss_sum += loss * len(global_x)
            loss_n += len(global_x)
        rows = [{k: batch[k][i] for k in batch} for i in range(len(normal))]
        scores = scorer.score_prepared([row_to_prepared(r) for r in rows], with_maps=False)
        scored += [(bool(r["is_normal"]), s.pred_score) for r, s in zip(rows, scores)]
    parts: list[WorkerValidation] = _gather(WorkerValidation(loss_sum, loss_n, scored))
    loss_sum, loss_n = sum(p.loss_sum for p in parts), sum(p.samples for p in parts)
    scored = [item for part in parts for item in part.scored]
    normal_scores = [s for is_normal, s in scored if is_normal]
    labels = [0 if is_normal else 1 for is_normal, _ in scored]
    auroc = record_auroc(labels, [s for _, s in scored]) if scored else math.nan
    threshold = calibrate_threshold(normal_scores, settings.threshold_quantile) if normal_scores else math.nan
    return {
        "val_loss": loss_sum / loss_n if loss_n else math.nan,
        "val_auroc": auroc,
        "val_records": len(scored), "val_normals": len(normal_scores),
        "threshold": threshold,
    }, Calibration.from_scores(normal_scores, threshold).to_dict() if normal_scores else None


def _checkpoint(directory: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, settings: TrainSettings,
                epoch: int, history: list[dict[str, Any]], threshold: float, calibration: dict[str, Any] | None):
    """This epoch's ecgad checkpoint plus the training state, as a Ray checkpoint."""
    import ray.train

    from ecgad.checkpoint import save_checkpoint

    save_checkpoint(directory, unwrap(model), MCFConfig.from_dict(settings.model_config),
                    PrepConfig.from_dict(settings.prep_config), threshold,
                    threshold_quantile=settings.threshold_quantile, calibration=calibration,
                    metadata={"epoch": epoch, "selected_by": settings.select_by,
                              "history": [_json_ready(m) for m in history], "settings": settings.to_dict()})
    torch.save({"optimizer": optimizer.state_dict(), "epoch": epoch, "history": history},
               directory / TRAIN_STATE_FILE)
    return ray.train.Checkpoint.from_directory(str(directory))


def _maybe_fail(settings: TrainSettings, epoch: int, rank: int, world_size: int) -> None:
    """Testing: the last worker exits abruptly (no cleanup, like a crash or a lost node), once per run."""
    if settings.fail_at_epoch != epoch or rank != world_size - 1 or settings.failure_marker is None:
        return
    marker = settings.failure_marker
    if is_file(marker):
        return
    write_text(marker, f"worker {rank} exited during epoch {epoch}\n")
    # Ray Train's controller collects reports when it polls the workers (every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S,
    # 2 s by default); a worker group that fails before the poll after a report restarts from the report before
    # it, redoing one more epoch. Waiting out two polls makes the injected crash land after the last report is
    # registered, so tests see the restart from the last checkpoint that real mid-epoch crashes get.
    time.sleep(2 * float(os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", 2.0)) + 1)
    logger.info("fault injection: worker %d exits during epoch %d", rank, epoch)
    os._exit(1)


def _training_batches(batches, settings: TrainSettings, epoch: int, rank: int, world_size: int):
    """The collated batches as ``(global, beat)`` pairs for `ecgad.train.train_epoch`, with the injected failure
    (`_maybe_fail`) once the first batch has been trained on."""
    for step, batch in enumerate(batches):
        if step == 1:
            _maybe_fail(settings, epoch, rank, world_size)
        yield batch["global"], batch["beat"]


def _epoch_metrics(epoch: int, lr: float, workers: Sequence[WorkerEpoch]) -> dict[str, Any]:
    """The training half of an epoch's reported metrics, over every worker's `WorkerEpoch`."""
    samples = sum(w.stats.samples for w in workers)
    return {
        "epoch": epoch, "lr": lr, "workers": len(workers), "nodes": len({w.node_id for w in workers}),
        "train_loss": sum(w.stats.loss * w.stats.samples for w in workers) / max(1, samples),
        "train_samples": samples,
        "train_samples_per_s": samples / max(w.stats.seconds for w in workers),
        # Input-bound? Time the slowest worker's loop spent waiting for batches (first one included).
        "train_data_wait_s": max(w.stats.data_wait_s for w in workers),
        "train_first_batch_s": max(w.stats.first_batch_s for w in workers),
    }


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """The function every Ray Train worker runs (module docstring)."""
    import ray
    import ray.train
    import ray.train.torch

    from ecgad.train import lr_for_epoch, make_optimizer, set_lr, set_seed, train_epoch

    settings = TrainSettings.from_dict(config)
    torch.set_num_threads(1)   # one CPU thread per worker: the node's other cores feed it (Ray Data) or run others
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    prep_config = PrepConfig.from_dict(settings.prep_config)

    set_seed(settings.seed)    # the same initial weights on every worker (DDP also broadcasts rank 0's)
    model, state = _resume(settings)
    model = ray.train.torch.prepare_model(model)
    optimizer = make_optimizer(model, lr=settings.lr)
    start_epoch, history = 0, []
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        start_epoch, history = int(state["epoch"]) + 1, list(state["history"])
        if rank == 0:
            logger.info("resuming after epoch %d (restored weights and optimizer state)", start_epoch - 1)

    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("validation")
    for epoch in range(start_epoch, settings.epochs):
        lr = lr_for_epoch(epoch, settings.epochs, settings.lr)
        set_lr(optimizer, lr)
        batches = train_shard.iter_torch_batches(
            batch_size=settings.batch_size, collate_fn=TrainingCollate(settings.seed, epoch, rank, prep_config),
            local_shuffle_buffer_size=max(settings.shuffle_buffer or 2 * settings.batch_size, settings.batch_size),
            local_shuffle_seed=settings.seed + 1000 * epoch + rank)
        stats = train_epoch(model, optimizer, _training_batches(batches, settings, epoch, rank, world_size),
                            seeded_generator(settings.seed, epoch, rank))
        workers: list[WorkerEpoch] = _gather(WorkerEpoch(ray.get_runtime_context().get_node_id(), stats))
        _align_replicas(model)
        validation, calibration = _validate(model, val_shard, settings, device)
        metrics = {**_epoch_metrics(epoch, lr, workers), **validation}
        history.append(metrics)
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = (_checkpoint(Path(tmp) / "checkpoint", model, optimizer, settings, epoch, history,
                                      metrics["threshold"], calibration) if rank == 0 else None)
            ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=f"epoch-{epoch:04d}")
        if rank == 0:
            job_metrics.count("ecgad_train_epochs_total")
            job_metrics.count("ecgad_train_samples_total", metrics["train_samples"])
            logger.info("epoch %d reported: %s", epoch, ", ".join(
                f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()))


# -- the driver ---------------------------------------------------------------------------------------------------

def fit(data: str | Path, out: str | Path, settings: TrainSettings, *, num_workers: int = 1, use_gpu: bool = False,
        cpus_per_worker: float = 1.0, placement_strategy: str = "PACK", name: str = "train",
        storage_path: str | None = None, max_failures: int = 3, num_to_keep: int = 2) -> dict[str, Any]:
    """Train on the shards at ``data`` with Ray Train; publish the selected checkpoint as ``out/models/<version>/``,
    point ``out/best`` at it, and write ``out/metrics.json``; returns what it writes there.

    Runs on the Ray cluster this process is connected to. Ray's run directory is ``storage_path/name`` (default
    ``storage_path`` = ``out``; on a multi-node cluster it must be shared storage, e.g. EFS or ``s3://...``): a
    second call with the same name and storage path resumes that run after its latest reported epoch. Ray keeps
    ``num_to_keep`` checkpoints by the selection metric, plus always the latest (which resuming needs). ``data``,
    ``out`` and ``storage_path`` may be URIs (`ecgad.storage`; Ray Train gets the filesystem it builds).
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from ecgad.ptbxl import TRAIN_FOLDS, VALIDATION_FOLD
    from ecgad.ray.data import read_shards
    from ecgad.shards import TRAINING_COLUMNS, VALIDATION_COLUMNS, ShardLayout

    started = time.perf_counter()
    data, out = location(data), location(out)
    manifest = ShardLayout(data).require_manifest()
    if not is_uri(out):
        out.mkdir(parents=True, exist_ok=True)
    order = SELECTION_ORDER[settings.select_by]
    storage_path, storage_filesystem = for_ray(storage_path or out)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=settings.to_dict(),
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu, placement_strategy=placement_strategy,
                                     resources_per_worker={"CPU": cpus_per_worker, **({"GPU": 1} if use_gpu else {})}),
        run_config=RunConfig(
            name=name, storage_path=storage_path, storage_filesystem=storage_filesystem,
            checkpoint_config=CheckpointConfig(num_to_keep=num_to_keep, checkpoint_score_attribute=settings.select_by,
                                               checkpoint_score_order=order),
            failure_config=FailureConfig(max_failures=max_failures)),
        datasets={"train": read_shards(data, TRAINING_COLUMNS, TRAIN_FOLDS, only_normal=True,
                                       shuffle_seed=settings.seed),
                  "validation": read_shards(data, VALIDATION_COLUMNS, (VALIDATION_FOLD,))},
        dataset_config=IngestConfig(),
    )
    result = trainer.fit()
    if not result.best_checkpoints or result.checkpoint is None:
        raise RuntimeError(f"run {name} reported no checkpoint (no epochs to train?)")
    best, _ = max(result.best_checkpoints, key=lambda kept: selection_key(kept[1], settings.select_by))
    with result.checkpoint.as_directory() as latest:
        history = json.loads((Path(latest) / "config.json").read_text())["metadata"]["history"]
    exported = export_checkpoint(best, out)
    logger.info("model version %s published at %s (%s points at it)", exported.model_version, exported.path,
                join(out, POINTER))
    chosen = next(m for m in history if m["epoch"] == exported.metadata["epoch"])
    summary = {
        "run": {"name": name, "path": result.path, "num_workers": num_workers, "use_gpu": use_gpu},
        "data": {"shards": str(data), "fingerprint": manifest["fingerprint"], "counts": manifest["counts"]},
        "settings": settings.to_dict(),
        "epochs": history,
        "best": {
            "epoch": chosen["epoch"], "checkpoint": str(exported.path), "pointer": str(join(out, POINTER)),
            "model_version": exported.model_version,
            "selected_by": settings.select_by, "order": order,
            "value": chosen[settings.select_by],
            "why": f"{order} {settings.select_by} over the {len(history)} epochs on the validation fold "
                   f"({VALIDATION_FOLD}); the test fold is never looked at",
            "threshold": chosen["threshold"],
            "threshold_quantile": exported.threshold_quantile,
        },
        "wall_s": round(time.perf_counter() - started, 3),
    }
    write_json(join(out, "metrics.json"), summary, sort_keys=False)
    return summary


def export_checkpoint(checkpoint, out: Path | str):
    """Publish the ecgad files of a reported Ray checkpoint (not the training state) as a version of the run
    ``out`` and point ``out/best`` at it; returns the published `ecgad.checkpoint.Checkpoint`."""
    with checkpoint.as_directory() as source:
        return publish_checkpoint(source, out)


def _json_ready(metrics: dict[str, Any]) -> dict[str, Any]:
    """NaN (an undefined AUROC, an uncalibrated threshold) as null: JSON has no NaN."""
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in metrics.items()}
