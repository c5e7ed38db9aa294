"""Conformance with the published implementation (the fixture at `ecgad.settings.reference_mcf_dir`, see its README).

The fixture holds random weights with the published parameter names, one eval-mode forward pass of the published
model, and the published test protocol (scores and anomaly maps) on three real records. The published arrays are
time-major ``(batch, samples, leads)``; ours are channels-first, hence the transposes.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ecgad.model import MCF, MCFConfig, count_parameters, load_published_state_dict, trend
from ecgad.oracle import oracle_score_window
from ecgad.preprocess import prepare_window
from ecgad.scoring import Scorer

FORWARD_ATOL = 1e-5
PROTOCOL_RTOL = 1e-4


def _channels_first(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array.transpose(0, 2, 1)))


@pytest.fixture(scope="module")
def published(reference_mcf: Path) -> MCF:
    model = MCF(MCFConfig.paper())
    model.load_state_dict(load_published_state_dict(reference_mcf / "state_dict_fp16.pt"), strict=True)
    return model.eval()


@pytest.fixture(scope="module")
def protocol(reference_mcf: Path) -> dict[str, np.ndarray]:
    with np.load(reference_mcf / "protocol.npz") as data:
        return {k: data[k] for k in data.files}


def test_published_names_shapes_and_parameter_count(reference_mcf: Path, published: MCF):
    keys = json.loads((reference_mcf / "keys.json").read_text())
    ours = published.state_dict()
    assert [(name, list(ours[name].shape)) for name, _, _ in keys] == [(name, shape) for name, shape, _ in keys]
    assert list(ours) == [name for name, _, _ in keys]
    assert count_parameters(published) == 7_085_779


def test_published_checkpoint_loader_accepts_a_path_or_its_content(reference_mcf: Path):
    from_path = load_published_state_dict(reference_mcf / "state_dict_fp16.pt")
    blob = torch.load(reference_mcf / "state_dict_fp16.pt", map_location="cpu", weights_only=True)
    from_blob = load_published_state_dict(blob)
    assert from_path.keys() == from_blob.keys()
    assert all(torch.equal(from_path[k], from_blob[k]) for k in from_path)
    assert {v.dtype for v in from_path.values()} == {torch.float32, torch.int64}
    assert load_published_state_dict(blob["model_state_dict"]).keys() == from_path.keys()  # a bare state dict


def test_forward_pass_reproduces_the_published_outputs(reference_mcf: Path, published: MCF):
    with np.load(reference_mcf / "forward.npz") as data:
        ref = {k: _channels_first(data[k]) for k in data.files}
    torch.testing.assert_close(trend(ref["global_ecg"]), ref["trend"], rtol=0, atol=FORWARD_ATOL)
    with torch.no_grad():
        out = published(ref["masked_global"], ref["masked_local"], ref["trend"])
    names = {"gen_global": "gen_global", "global_logvar": "global_var", "gen_local": "gen_local",
             "local_logvar": "local_var", "gen_trend": "gen_trend"}
    for ours, theirs in names.items():
        torch.testing.assert_close(getattr(out, ours), ref[theirs], rtol=0, atol=FORWARD_ATOL, msg=ours)


def test_our_preparation_finds_the_published_beats(protocol):
    for prepared, peaks, n_valid in zip(protocol["prepared"], protocol["peaks"], protocol["valid_beats"]):
        window = prepare_window(prepared.T)
        np.testing.assert_array_equal(window.peaks, peaks[peaks >= 0])
        assert window.n_beats == n_valid


def test_oracle_reproduces_the_published_protocol(published: MCF, protocol):
    for i, (prepared, peaks) in enumerate(zip(protocol["prepared"], protocol["peaks"])):
        score, anomaly_map = oracle_score_window(published, prepared.T, peaks)
        assert score == pytest.approx(protocol["score"][i], rel=PROTOCOL_RTOL)
        np.testing.assert_allclose(anomaly_map, protocol["anomaly_map"][i].T, rtol=PROTOCOL_RTOL)


@pytest.mark.parametrize("mode", ["full", "fast"])
def test_scorer_reproduces_the_published_protocol(published: MCF, protocol, mode):
    """The fast mode matches here too only because these random weights make the beat's effect on the global
    latent negligible; with trained weights it is an approximation (see `Scorer`)."""
    windows = [prepare_window(prepared.T) for prepared in protocol["prepared"]]
    scores, maps = Scorer(published, mode=mode).score_windows(windows)
    np.testing.assert_allclose(scores, protocol["score"], rtol=PROTOCOL_RTOL)
    np.testing.assert_allclose(maps, protocol["anomaly_map"].transpose(0, 2, 1), rtol=PROTOCOL_RTOL)
