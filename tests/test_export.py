"""`ecgad export` and `ecgad.export`: the exported scoring graph against the eager model and against the `Scorer`.

A seeded small model with randomized BatchNorm (tests/test_scoring.py), saved as a checkpoint and
exported once per format through the command line; the ONNX cases need the ``export`` extra (onnx, onnxscript,
onnxruntime) and are skipped with the reason when it is not installed.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from ecgad.checkpoint import load_checkpoint, save_checkpoint
from ecgad.cli import main as cli_main
from ecgad.config import PrepConfig
from ecgad.export import ExportedScorer, RestorationPass, read_metadata
from ecgad.io import read_record
from ecgad.model import MCFConfig
from ecgad.oracle import oracle_score_window
from ecgad.preprocess import prepare
from ecgad.scoring import Scorer
from tests.test_scoring import _random_model

RECORDS = ("ptbxl/records500/06000/06000_hr", "ptbxl/records100/00000/00017_lr",
           "other_12lead/ptbdb/s0010_re")   # 500 Hz; 100 Hz; 38.4 s at 1000 Hz (several windows)
ONNX_MISSING = [name for name in ("onnx", "onnxscript", "onnxruntime") if importlib.util.find_spec(name) is None]
FORMATS = [pytest.param("torchscript", id="torchscript"),
           pytest.param("onnx", id="onnx", marks=pytest.mark.skipif(
               bool(ONNX_MISSING), reason=f"the export extra is not installed (missing {', '.join(ONNX_MISSING)}): "
                                          "pip install -e '.[export]'"))]
SUFFIX = {"onnx": ".onnx", "torchscript": ".pt"}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    model = _random_model(MCFConfig.small())
    return save_checkpoint(tmp_path_factory.mktemp("export") / "ckpt", model, model.config, PrepConfig(), 0.5)


@pytest.fixture(scope="module", params=FORMATS)
def exported(request, checkpoint: Path) -> tuple[str, Path]:
    """The checkpoint exported by ``ecgad export``, once per format."""
    fmt = request.param
    out = checkpoint.parent / f"model{SUFFIX[fmt]}"
    assert cli_main(["export", "--checkpoint", str(checkpoint), "--format", fmt, "--out", str(out)]) == 0
    return fmt, out


@pytest.fixture(scope="module")
def prepared(sample_data: Path) -> list:
    return [prepare(read_record(sample_data / name)) for name in RECORDS]


def test_export_records_model_version_and_preprocessing(exported, checkpoint: Path):
    _, path = exported
    loaded = load_checkpoint(checkpoint)
    metadata = read_metadata(path)
    assert metadata["model_version"] == loaded.model_version
    assert PrepConfig.from_dict(metadata["prep_config"]) == loaded.prep_config
    assert MCFConfig.from_dict(metadata["model_config"]) == loaded.model_config
    assert metadata["inputs"] == ["global_ecg", "beat"]


def test_exported_graph_matches_eager(exported, checkpoint: Path, prepared):
    """Outputs of the exported graph and of the eager `RestorationPass` agree to 1e-5, at a batch size other than
    the one it was exported with (the batch axis is dynamic)."""
    _, path = exported
    window = prepared[0].windows[0]
    global_ecg = np.ascontiguousarray(np.repeat(window.global_input[None], 5, axis=0), dtype=np.float32)
    beats = np.ascontiguousarray(window.beats[:5], dtype=np.float32)
    graph = RestorationPass(load_checkpoint(checkpoint).model).eval()
    with torch.inference_mode():
        expected = [t.numpy() for t in graph(torch.from_numpy(global_ecg), torch.from_numpy(beats))]
    got = ExportedScorer(path)._run(global_ecg, beats)
    for name, want, have in zip(("errors", "global_map", "local_map"), expected, got, strict=True):
        assert have.shape == want.shape, name
        np.testing.assert_allclose(have, want, rtol=1e-5, atol=1e-5 * float(np.abs(want).max()), err_msg=name)


def test_eager_restoration_pass_is_the_published_protocol(checkpoint: Path, prepared):
    """The graph that is exported computes the oracle's window score (so exporting it exports the protocol)."""
    model = load_checkpoint(checkpoint).model
    window = prepared[0].windows[0]
    graph = RestorationPass(model).eval()
    with torch.inference_mode():
        errors, _, _ = graph(torch.from_numpy(np.repeat(window.global_input[None], window.n_beats, axis=0).copy()),
                             torch.from_numpy(window.beats.astype(np.float32)))
    expected, _ = oracle_score_window(model, window.signal, window.beat_peaks)
    assert math.isclose(float(errors.double().mean()), expected, rel_tol=1e-5)


def test_exported_model_scores_records_like_the_scorer(exported, checkpoint: Path, prepared):
    _, path = exported
    scorer = Scorer.from_checkpoint(checkpoint, device="cpu", mode="full")
    expected = [s.pred_score for s in scorer.score_prepared(prepared, with_maps=False)]
    exported_scorer = ExportedScorer(path)
    assert exported_scorer.model_version == scorer.model_version
    np.testing.assert_allclose(exported_scorer.score_prepared(prepared), expected, rtol=1e-4)
    window = prepared[0].windows[0]
    _, expected_maps = scorer.score_windows([window])
    _, anomaly_map = exported_scorer.score_window(window)
    np.testing.assert_allclose(anomaly_map, expected_maps[0], rtol=1e-4, atol=1e-4 * float(expected_maps.max()))


def test_export_refuses_an_unknown_format(checkpoint: Path, tmp_path: Path):
    with pytest.raises(SystemExit):
        cli_main(["export", "--checkpoint", str(checkpoint), "--format", "tflite", "--out", str(tmp_path / "m")])
