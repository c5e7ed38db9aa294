"""Checkpoints: one directory that holds everything needed to score exactly as the model was trained.

Layout::

    <dir>/weights.pt     the model's state_dict (CPU tensors), loaded with ``torch.load(weights_only=True)``
    <dir>/config.json    model_config, prep_config, threshold (null when unknown), threshold_quantile, git_commit,
                         created, ecgad_version, weights_sha256, format_version, metadata (training history, ...)
    <dir>/diagnosis.pt   only in a diagnosis checkpoint: the state_dict of the diagnosis network (its own, fine-tuned
                         copy of the encoders, and the multi-label head); config.json then has a ``diagnosis`` entry
                         (classes, thresholds, head config, diagnosis_sha256; `ecgad.diagnosis`). weights.pt stays the
                         anomaly detector it was fine-tuned from, so scores and maps keep their calibrated threshold

Why a directory of plain files rather than one pickle: ``weights_only`` loading cannot execute code from a
checkpoint someone hands us, and ``config.json`` can be read (and diffed) without torch. The weights' SHA-256 is
recorded at save time and checked at load time, so a swapped or truncated weights file is refused instead of
silently scoring with the wrong model.

**Versions.** A model's version (`model_version_of`, ``<weights sha256[:12]>-<content sha256[:12]>``) is a hash of
what decides its scores: the weights, the model and preparation configs, the threshold and its quantile; not the
training history or the time of saving, so exporting the same model twice gives the same version. Training
publishes each selected model once (`publish_checkpoint`) to ``RUN/models/<version>/``, a directory never written
again, and points ``RUN/best`` at the current one. Every consumer resolves its checkpoint argument once, at start
(`resolve_checkpoint`), and hands the version directory, not the pointer, to every process it starts; so a later
export cannot change what a running job, or one replica of a running service, scores with.

Why the pointer is a relative symbolic link and not a pointer file: every reader of a checkpoint directory (ours,
Ray's, a user's ``ls`` or ``cat best/config.json``) follows a link without knowing about it, so ``RUN/best`` keeps
working as a checkpoint argument everywhere; a rename swaps it atomically (`ecgad.atomic.replace_symlink`); and
being relative, it means the same on every node that mounts the run directory under another path, and survives
copying the run directory. Object stores have no links: a run directory given as a URI (``s3://...``,
`ecgad.storage`) holds ``RUN/best`` as a small pointer file naming the version folder (``models/<version>``),
uploaded in one piece (so swapped atomically), and read in `resolve_checkpoint`, the one place that interprets the
pointer. A checkpoint on object storage is loaded from a local copy, downloaded once per node into
``<ecgad.storage.cache_dir()>/checkpoints/<version>/`` (a version never changes, so the copy never goes stale), and
checked against its recorded hash like any other.

Writes are atomic: a directory is assembled under a temporary name next to the target and renamed into place, so
a reader (a Serve replica, a batch job) never sees half a checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ecgad import __version__
from ecgad.atomic import publish_directory, replace_directory, replace_symlink, temporary_directory
from ecgad.config import PrepConfig
from ecgad.model import MCF, MCFConfig, load_published_state_dict
from ecgad.settings import REPO_ROOT
from ecgad.storage import (StorageError, cache_dir, is_file, is_uri, join, normalize, parent, put, read_bytes,
                           read_text)

WEIGHTS_FILE = "weights.pt"
CONFIG_FILE = "config.json"
DIAGNOSIS_FILE = "diagnosis.pt"
FORMAT_VERSION = 1
#: The folder of a run directory that holds its published versions, and the pointer at the current one.
MODELS_DIR = "models"
POINTER = "best"
#: The ``config.json`` entries a model's version is a hash of: everything that decides its scores.
VERSIONED_FIELDS = ("weights_sha256", "model_config", "prep_config", "threshold", "threshold_quantile")


class CheckpointError(Exception):
    """A checkpoint cannot be used: missing files, corrupt weights, or a config that does not match."""


@dataclass
class Checkpoint:
    """A loaded checkpoint; ``model`` is in eval mode on the requested device."""

    model: MCF
    model_config: MCFConfig
    prep_config: PrepConfig
    threshold: float                      # NaN when never calibrated (e.g. an imported published model)
    threshold_quantile: float | None
    model_version: str                    # `model_version_of`: the name of its directory under models/
    git_commit: str
    created: str
    path: Path | str                      # a local directory, or the URI it was loaded from
    metadata: dict[str, Any] = field(default_factory=dict)
    calibration: dict[str, Any] | None = None   # `ecgad.drift.Calibration.to_dict` of the threshold's scores
    diagnosis: dict[str, Any] | None = None  # the diagnosis network's entry (`ecgad.diagnosis`), None for a detector


def git_commit() -> str:
    """The commit of the code doing the training (``git rev-parse HEAD``), or ``"unknown"`` outside a checkout."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                             timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() or "unknown"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _to_json(value: Any) -> Any:
    """``json.dumps`` fallback for the numpy and path values that training metadata naturally contains."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"checkpoint metadata value of type {type(value).__name__} is not JSON-serializable")


def _finite_or_none(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def save_checkpoint(directory: str | Path, model: torch.nn.Module, model_config: MCFConfig,
                    prep_config: PrepConfig, threshold: float, *, metadata: dict[str, Any] | None = None,
                    threshold_quantile: float | None = 0.95, calibration: dict[str, Any] | None = None,
                    network: torch.nn.Module | None = None, diagnosis: dict[str, Any] | None = None) -> Path:
    """Write ``model`` (its weights moved to CPU) and its configs to ``directory``, atomically; returns the path.

    ``calibration`` (`ecgad.drift.Calibration.to_dict`): the score distribution the threshold was set on, which a
    service compares its recent scores with (drift); not part of the model version.
    ``network`` and ``diagnosis`` (together): a diagnosis network and its description (`ecgad.diagnosis`), stored as
    `DIAGNOSIS_FILE` and the ``diagnosis`` entry; the detector files stay as they are, so the checkpoint still scores.

    An existing checkpoint at ``directory`` is replaced whole. ``threshold`` may be NaN (not calibrated yet); it is
    stored as ``null`` because JSON has no NaN.
    """
    directory = Path(directory).resolve()
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    try:
        state = {k: v.detach().to("cpu").clone() for k, v in model.state_dict().items()}
        torch.save(state, tmp / WEIGHTS_FILE)
        commit = git_commit()
        config = {
            "format_version": FORMAT_VERSION,
            "model_config": model_config.to_dict(),
            "prep_config": prep_config.to_dict(),
            "threshold": _finite_or_none(threshold),
            "threshold_quantile": _finite_or_none(threshold_quantile),
            "git_commit": commit,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "ecgad_version": __version__,
            "weights_sha256": _sha256(tmp / WEIGHTS_FILE),
            "metadata": metadata or {},
            "calibration": calibration,
        }
        if network is not None:
            torch.save({k: v.detach().to("cpu").clone() for k, v in network.state_dict().items()},
                       tmp / DIAGNOSIS_FILE)
            config["diagnosis"] = {**(diagnosis or {}), "diagnosis_sha256": _sha256(tmp / DIAGNOSIS_FILE)}
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2, default=_to_json, allow_nan=False) + "\n")
        replace_directory(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def model_version_of(config: dict[str, Any]) -> str:
    """The version of the checkpoint whose ``config.json`` is ``config``: ``<weights sha256[:12]>-<sha256 of the
    VERSIONED_FIELDS as canonical JSON[:12]>``. The first part shows at a glance which versions share weights (the
    same model with another threshold); the second tells those apart."""
    versioned = {name: config.get(name) for name in VERSIONED_FIELDS}
    if config.get("diagnosis") is not None:   # a detector's version is unchanged by the field's existence
        versioned["diagnosis"] = config["diagnosis"]
    content = json.dumps(versioned, sort_keys=True,
                         separators=(",", ":"), allow_nan=False)
    return f"{str(config.get('weights_sha256'))[:12]}-{hashlib.sha256(content.encode()).hexdigest()[:12]}"


def model_version_at(directory: str | Path) -> str:
    """The version of the checkpoint at ``directory``, from its ``config.json`` alone (the weights are neither read
    nor checked: `load_checkpoint` does that)."""
    if is_uri(directory):
        return model_version_of(_remote_config(str(directory)))
    directory = Path(directory)
    _require_files(directory, (CONFIG_FILE,))
    try:
        return model_version_of(json.loads((directory / CONFIG_FILE).read_text()))
    except ValueError as err:
        raise CheckpointError(f"{directory / CONFIG_FILE} is not a valid checkpoint config: {err}") from err


def _require_files(directory: Path, names: tuple[str, ...]) -> None:
    for name in names:
        if not (directory / name).is_file():
            raise CheckpointError(f"{directory} is not an ecgad checkpoint: {name} is missing")


def resolve_checkpoint(path: str | Path) -> Path:
    """The directory a checkpoint argument stands for now, as an absolute path: ``RUN/best`` becomes the version
    directory it points at (a plain checkpoint directory is itself). Resolve once, at start, and give the result,
    never the pointer, to every process and replica, so that all of them load the same model even if training
    publishes a new one meanwhile. Raises `CheckpointError` when there is no checkpoint there. A URI resolves to
    a URI: a pointer file (module docstring) to the version folder it names."""
    if is_uri(path):
        return _resolve_remote(normalize(path))
    directory = Path(path).resolve()
    _require_files(directory, (CONFIG_FILE,))
    return directory


def _store_version(source: Path, models: Path) -> Checkpoint:
    """Copy the checkpoint files of ``source`` to ``models/<version>/`` unless that version is there already;
    returns the stored checkpoint, loaded back (its hash checked)."""
    checkpoint = load_checkpoint(source)   # checks the weights against their hash before copying
    target = models / checkpoint.model_version
    if not target.is_dir():
        tmp = temporary_directory(target)
        try:
            for name in checkpoint_files({"diagnosis": checkpoint.diagnosis}):
                shutil.copy2(source / name, tmp / name)
            publish_directory(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return load_checkpoint(target)


def publish_checkpoint(source: str | Path, run_dir: str | Path, pointer: str = POINTER) -> Checkpoint:
    """Publish the checkpoint at ``source`` (only its ``weights.pt`` and ``config.json``; other files, such as a
    training state, stay behind) as ``run_dir/models/<version>/`` and point ``run_dir/<pointer>`` at it; returns
    the published checkpoint (its ``path`` is the version directory).

    A version is written once: publishing one that exists already (the same weights, configs and threshold) only
    moves the pointer, and nothing under ``models/`` is ever replaced, so a job or service that resolved an older
    version keeps reading the same bytes. A ``pointer`` that is still a real checkpoint directory (written before
    versions existed) is first published as a version of its own, so replacing it by the link loses no model.
    """
    if is_uri(run_dir):
        return _publish_remote(Path(source), normalize(run_dir), pointer)
    run_dir = Path(run_dir).resolve()
    models = run_dir / MODELS_DIR
    models.mkdir(parents=True, exist_ok=True)
    link = run_dir / pointer
    if link.exists() and not link.is_symlink():
        if not (link / CONFIG_FILE).is_file():
            raise CheckpointError(f"{link} is neither a link nor a checkpoint; not replacing it")
        _store_version(link, models)
    published = _store_version(Path(source), models)
    replace_symlink(link, os.path.relpath(published.path, run_dir))
    return published


def _config_diff(expected: MCFConfig, stored: MCFConfig) -> list[str]:
    return [f"{f.name}: expected {getattr(expected, f.name)!r}, checkpoint has {getattr(stored, f.name)!r}"
            for f in fields(stored) if getattr(expected, f.name) != getattr(stored, f.name)]


def _state_dict_diff(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> list[str]:
    """Human-readable reasons why ``state`` does not fit ``model``: missing, unexpected and mis-shaped entries."""
    own = model.state_dict()
    problems = [f"missing {k}" for k in own if k not in state]
    problems += [f"unexpected {k}" for k in state if k not in own]
    problems += [f"{k}: shape {tuple(state[k].shape)} in the weights, {tuple(v.shape)} in the model"
                 for k, v in own.items() if k in state and tuple(state[k].shape) != tuple(v.shape)]
    return problems


def load_checkpoint(directory: str | Path, device: str | torch.device | None = "cpu",
                    expected_model_config: MCFConfig | None = None) -> Checkpoint:
    """Load a checkpoint directory; the model comes back in eval mode on ``device`` (``None`` = CPU).

    Raises ``CheckpointError`` naming what is wrong: a missing file, weights whose hash differs from the one
    recorded, a stored model config that differs from ``expected_model_config`` (field by field), or weights that
    do not fit the stored config (key by key). A URI is loaded from its local copy (module docstring), its
    ``path`` the URI of the version folder (a pointer file is followed).
    """
    if is_uri(directory):
        uri = _resolve_remote(normalize(directory))
        loaded = load_checkpoint(_local_copy(uri), device, expected_model_config)
        loaded.path = uri
        return loaded
    directory = Path(directory)
    _require_files(directory, (CONFIG_FILE, WEIGHTS_FILE))
    try:
        config = json.loads((directory / CONFIG_FILE).read_text())
        model_config = MCFConfig.from_dict(config["model_config"])
        prep_config = PrepConfig.from_dict(config["prep_config"])
    except (ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{directory / CONFIG_FILE} is not a valid checkpoint config: {err}") from err
    if config.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{directory}: checkpoint format {config.get('format_version')!r}, "
                              f"this ecgad reads format {FORMAT_VERSION}")
    if expected_model_config is not None and expected_model_config != model_config:
        raise CheckpointError(f"{directory}: model config differs from the expected one: "
                              + "; ".join(_config_diff(expected_model_config, model_config)))

    weights_sha = _sha256(directory / WEIGHTS_FILE)
    if weights_sha != config.get("weights_sha256"):
        raise CheckpointError(f"{directory / WEIGHTS_FILE} does not match the hash recorded in {CONFIG_FILE} "
                              "(modified or truncated weights)")
    try:
        state = torch.load(directory / WEIGHTS_FILE, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several unrelated types for an unreadable file
        raise CheckpointError(f"cannot read {directory / WEIGHTS_FILE}: {err}") from err
    model = MCF(model_config)
    problems = _state_dict_diff(model, state)
    if problems:
        raise CheckpointError(f"{directory}: the weights do not fit the stored model config: "
                              + "; ".join(problems[:20]) + (f" (and {len(problems) - 20} more)"
                                                           if len(problems) > 20 else ""))
    model.load_state_dict(state)
    model.to(torch.device(device or "cpu")).eval()
    diagnosis = config.get("diagnosis")
    if diagnosis is not None and (not (directory / DIAGNOSIS_FILE).is_file()
                                  or _sha256(directory / DIAGNOSIS_FILE) != diagnosis.get("diagnosis_sha256")):
        raise CheckpointError(f"{directory / DIAGNOSIS_FILE} is missing or does not match the hash recorded in {CONFIG_FILE}")

    threshold = config.get("threshold")
    commit = str(config.get("git_commit", "unknown"))
    return Checkpoint(
        model=model, model_config=model_config, prep_config=prep_config,
        threshold=math.nan if threshold is None else float(threshold),
        threshold_quantile=config.get("threshold_quantile"),
        model_version=model_version_of(config), git_commit=commit,
        created=str(config.get("created", "")), path=directory.resolve(), metadata=config.get("metadata", {}),
        calibration=config.get("calibration"), diagnosis=diagnosis)


# -- on object storage (module docstring) ----------------------------------------------------------------------

def local_directory(directory: str | Path) -> Path:
    """Where the files of the checkpoint at ``directory`` are on this machine: the folder itself, or for a URI its
    local copy (downloaded once, under its version)."""
    return _local_copy(_resolve_remote(normalize(directory))) if is_uri(directory) else Path(directory)


def checkpoint_files(config: dict[str, Any]) -> tuple[str, ...]:
    """The files of the checkpoint whose ``config.json`` is ``config``, ``config.json`` last (what a copy writes
    last is what makes it a checkpoint)."""
    return (WEIGHTS_FILE, *((DIAGNOSIS_FILE,) if config.get("diagnosis") is not None else ()), CONFIG_FILE)


def _remote_config(uri: str) -> dict[str, Any]:
    try:
        return json.loads(read_text(join(uri, CONFIG_FILE)))
    except StorageError as err:
        raise CheckpointError(f"{uri} is not an ecgad checkpoint: {CONFIG_FILE} is missing") from err
    except ValueError as err:
        raise CheckpointError(f"{join(uri, CONFIG_FILE)} is not a valid checkpoint config: {err}") from err


def _resolve_remote(uri: str) -> str:
    """A checkpoint folder URI as it is, or the version folder a pointer file at ``uri`` names."""
    if is_file(uri):
        uri = join(parent(uri), read_text(uri).strip())
    _remote_config(uri)
    return uri


def _local_copy(uri: str) -> Path:
    """The local copy of the checkpoint at ``uri``, downloaded once into the cache, under its version."""
    config = _remote_config(uri)
    local = cache_dir() / "checkpoints" / model_version_of(config)
    if not (local / CONFIG_FILE).is_file():
        tmp = temporary_directory(local)
        try:
            for name in checkpoint_files(config):
                (tmp / name).write_bytes(read_bytes(join(uri, name)))
            publish_directory(tmp, local)
        except StorageError as err:
            shutil.rmtree(tmp, ignore_errors=True)
            raise CheckpointError(f"{uri} is not an ecgad checkpoint: {err}") from err
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return local


def _publish_remote(source: Path, run_uri: str, pointer: str) -> Checkpoint:
    """`publish_checkpoint` to a run folder on object storage: the version's files uploaded once (``config.json``
    last), then the pointer file."""
    checkpoint = load_checkpoint(source)   # checks the weights against their hash before uploading
    target = join(run_uri, MODELS_DIR, checkpoint.model_version)
    if not is_file(join(target, CONFIG_FILE)):
        for name in checkpoint_files({"diagnosis": checkpoint.diagnosis}):
            put(join(target, name), (source / name).read_bytes())
    put(join(run_uri, pointer), f"{MODELS_DIR}/{checkpoint.model_version}\n".encode())
    return load_checkpoint(target)


def import_published_checkpoint(published_pt: str | Path, out_dir: str | Path,
                                threshold: float = math.nan) -> Path:
    """Turn the authors' checkpoint (``{"model_state_dict": ...}``, paper config) into an ecgad checkpoint.

    The published model was trained on the reference preprocessing, which the default ``PrepConfig`` reproduces.
    Its threshold is unknown (the paper reports AUROC only): pass one, or calibrate it later on held-out normals.
    """
    published_pt = Path(published_pt)
    try:
        blob = torch.load(published_pt, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(f"cannot read published checkpoint {published_pt}: {err}") from err
    if not isinstance(blob, dict) or "model_state_dict" not in blob:
        raise CheckpointError(f"{published_pt} is not a published MCF checkpoint (no 'model_state_dict')")
    model_config = MCFConfig.paper()
    model = MCF(model_config)
    state = load_published_state_dict(blob)
    problems = _state_dict_diff(model, state)
    if problems:
        raise CheckpointError(f"{published_pt} does not fit the paper config: " + "; ".join(problems[:20]))
    model.load_state_dict(state)
    metadata = {"source": "published MCF checkpoint (MediaBrain-SJTU/ECGAD)", "published_file": published_pt.name,
                "published_sha256": _sha256(published_pt)}
    return save_checkpoint(out_dir, model, model_config, PrepConfig(), threshold, metadata=metadata,
                           threshold_quantile=None)
