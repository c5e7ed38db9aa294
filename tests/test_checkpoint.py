"""The checkpoint directory: a lossless round trip, and clear refusals of what does not fit."""

from __future__ import annotations

import json
import math

import pytest
import torch

from ecgad.checkpoint import CONFIG_FILE, WEIGHTS_FILE, CheckpointError, load_checkpoint, save_checkpoint
from ecgad.config import PrepConfig
from ecgad.model import MCF, MCFConfig


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(3)
    config = MCFConfig.small()
    model = MCF(config)
    path = save_checkpoint(tmp_path / "ckpt", model, config, PrepConfig(stride=1000), 0.125,
                           metadata={"epoch": 4}, threshold_quantile=0.9)
    return path, model, config


def test_round_trip_is_exact(saved):
    path, model, config = saved
    loaded = load_checkpoint(path, expected_model_config=config)
    assert loaded.model_config == config and loaded.prep_config == PrepConfig(stride=1000)
    assert (loaded.threshold, loaded.threshold_quantile, loaded.metadata) == (0.125, 0.9, {"epoch": 4})
    assert not loaded.model.training
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[name], tensor), name
    assert loaded.model_version.split("-")[0] == json.loads((path / CONFIG_FILE).read_text())["weights_sha256"][:12]


def test_a_mismatched_model_config_is_refused_by_field(saved):
    path, _, _ = saved
    with pytest.raises(CheckpointError, match=r"model config differs.*hidden: expected 50, checkpoint has"):
        load_checkpoint(path, expected_model_config=MCFConfig.paper())


def test_modified_or_missing_files_are_refused(saved, tmp_path):
    path, _, _ = saved
    weights = path / WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match="does not match the hash"):
        load_checkpoint(path)
    weights.unlink()
    with pytest.raises(CheckpointError, match="weights.pt is missing"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="config.json is missing"):
        load_checkpoint(tmp_path)


def test_weights_that_do_not_fit_the_stored_config_are_named(tmp_path):
    small, paper = MCFConfig.small(), MCFConfig.paper()
    path = save_checkpoint(tmp_path / "wrong", MCF(small), paper, PrepConfig(), math.nan)
    with pytest.raises(CheckpointError, match="do not fit the stored model config: .*shape"):
        load_checkpoint(path)
    assert math.isnan(json.loads((path / CONFIG_FILE).read_text())["threshold"] or math.nan)
