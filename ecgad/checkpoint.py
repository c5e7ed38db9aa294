"""Checkpoints: one directory that holds everything needed to score exactly as the model was trained.

Layout::

    <dir>/weights.pt     the model's state_dict (CPU tensors), loaded with ``torch.load(weights_only=True)``
    <dir>/config.json    model_config, prep_config, threshold (null when unknown), threshold_quantile, git_commit,
                         created, ecgad_version, weights_sha256, format_version, metadata (training history, ...)

Why a directory of plain files rather than one pickle: ``weights_only`` loading cannot execute code from a
checkpoint someone hands us, and ``config.json`` can be read (and diffed) without torch. The weights' SHA-256 is
recorded at save time and checked at load time, so a swapped or truncated weights file is refused instead of
silently scoring with the wrong model; with the commit it forms ``model_version``, which every score can carry.

Writes are atomic: the directory is assembled under a temporary name next to the target and renamed into place,
so a reader (a Serve replica, a batch job) never sees half a checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import math
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
from ecgad.atomic import replace_directory
from ecgad.config import PrepConfig
from ecgad.model import MCF, MCFConfig, load_published_state_dict
from ecgad.settings import REPO_ROOT

WEIGHTS_FILE = "weights.pt"
CONFIG_FILE = "config.json"
FORMAT_VERSION = 1


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
    model_version: str                    # "<weights sha256[:12]>-<commit[:12]>"
    git_commit: str
    created: str
    path: Path
    metadata: dict[str, Any] = field(default_factory=dict)


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
                    threshold_quantile: float | None = 0.95) -> Path:
    """Write ``model`` (its weights moved to CPU) and its configs to ``directory``, atomically; returns the path.

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
        }
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2, default=_to_json, allow_nan=False) + "\n")
        replace_directory(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


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
    do not fit the stored config (key by key).
    """
    directory = Path(directory)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (directory / name).is_file():
            raise CheckpointError(f"{directory} is not an ecgad checkpoint: {name} is missing")
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

    threshold = config.get("threshold")
    commit = str(config.get("git_commit", "unknown"))
    return Checkpoint(
        model=model, model_config=model_config, prep_config=prep_config,
        threshold=math.nan if threshold is None else float(threshold),
        threshold_quantile=config.get("threshold_quantile"),
        model_version=f"{weights_sha[:12]}-{commit[:12]}", git_commit=commit,
        created=str(config.get("created", "")), path=directory.resolve(), metadata=config.get("metadata", {}))


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
