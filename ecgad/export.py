"""The model outside Ray and outside this package: export to ONNX or TorchScript, and scoring with the exported file.

What is exported is not the bare `MCF` forward but the whole test-time restoration a scorer needs
(`RestorationPass`, docs/method.md §4.1): a batch of beats, each with its window's global ECG, goes through the three
deterministic test passes (masks, trend, the model, the errors), and the graph returns every beat's per-pass error
and its summed error maps. A deployer (Triton, ONNX Runtime, a phone) then only cuts and normalizes beats, as
`ecgad.preprocess` does, and averages; nothing of the model's protocol has to be re-implemented, so it cannot drift.

The exported file records where it came from: the model version (`ecgad.checkpoint`), the model and preprocessing
configs and the graph's input and output conventions, as ONNX ``metadata_props`` or TorchScript ``_extra_files``
(`read_metadata`). `ExportedScorer` scores prepared records through such a file with the numbers of
`ecgad.scoring.Scorer` in full mode (tests/test_export.py holds them to it).
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ecgad import __version__
from ecgad.atomic import write_bytes
from ecgad.config import PrepConfig
from ecgad.maps import smooth
from ecgad.masks import TEST_PASSES, eval_masks
from ecgad.model import MCF
from ecgad.objective import global_error_map, local_error_map, pass_errors
from ecgad.scoring import record_score
from ecgad.types import Prepared, Rejection, Window

FORMATS = ("onnx", "torchscript")
INPUT_NAMES = ("global_ecg", "beat")
OUTPUT_NAMES = ("errors", "global_map", "local_map")
#: The TorchScript extra file (and the ONNX metadata key) that holds the metadata as one JSON object.
METADATA_KEY = "ecgad.json"
ONNX_OPSET = 18


class RestorationPass(nn.Module):
    """The three test passes over a batch of beats, as one graph.

    Inputs: ``global_ecg (B, 12, 4800)``, the unmasked global input of each beat's window (samples 100..4900 of the
    prepared window, float32 in [-1, 1]), and ``beat (B, 12, 480)``, the beat cut at ``[r-140, r+340)`` and min-maxed
    per lead (`ecgad.types.Window.beats`). Outputs: ``errors (B, 3)``, the anomaly error ``e`` of each pass
    (`ecgad.objective.pass_errors`); ``global_map (B, 12, 4800)``, the global + trend error summed over the passes;
    ``local_map (B, 12, 480)``, the beat error summed over the passes.
    """

    def __init__(self, model: MCF, prep_config: PrepConfig = PrepConfig()) -> None:
        super().__init__()
        self.model = model
        keep_global, keep_beat = eval_masks(prep_config.global_len, prep_config.beat_len)
        self.register_buffer("keep_global", keep_global)
        self.register_buffer("keep_beat", keep_beat)

    def forward(self, global_ecg: torch.Tensor, beat: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        errors = []
        global_map = torch.zeros_like(global_ecg)
        local_map = torch.zeros_like(beat)
        for j in range(TEST_PASSES):
            global_masked = global_ecg * self.keep_global[j]
            out = self.model(global_masked, beat * self.keep_beat[j], self.model.trend_for(global_ecg, global_masked))
            errors.append(pass_errors(out, global_ecg, beat))
            global_map = global_map + global_error_map(out.gen_global, out.global_logvar, out.gen_trend, global_ecg)
            local_map = local_map + local_error_map(out.gen_local, out.local_logvar, beat)
        return torch.stack(errors, dim=1), global_map, local_map


def export_metadata(model_version: str, model: MCF, prep_config: PrepConfig) -> dict[str, Any]:
    """What an exported file records about itself: enough to prepare inputs exactly as the model was trained."""
    return {"model_version": model_version, "ecgad_version": __version__, "graph": "restoration_pass",
            "inputs": list(INPUT_NAMES), "outputs": list(OUTPUT_NAMES), "test_passes": TEST_PASSES,
            "model_config": model.config.to_dict(), "prep_config": prep_config.to_dict()}


def _example_inputs(prep_config: PrepConfig, n_leads: int, batch: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return (torch.rand(batch, n_leads, prep_config.global_len, generator=generator) * 2 - 1,
            torch.rand(batch, n_leads, prep_config.beat_len, generator=generator) * 2 - 1)


def _onnx_bytes(graph: RestorationPass, example: tuple[torch.Tensor, ...], metadata: dict[str, Any]) -> bytes:
    """The graph as an ONNX model (opset `ONNX_OPSET`, the batch axis dynamic), metadata in ``metadata_props``."""
    batch = torch.export.Dim("batch", min=1)
    program = torch.onnx.export(graph, example, dynamo=True, opset_version=ONNX_OPSET, verbose=False,
                                input_names=list(INPUT_NAMES), output_names=list(OUTPUT_NAMES),
                                dynamic_shapes=({0: batch}, {0: batch}))
    proto = program.model_proto
    entries = {METADATA_KEY: json.dumps(metadata), "model_version": metadata["model_version"],
               "prep_config": json.dumps(metadata["prep_config"])}
    for key, value in entries.items():
        proto.metadata_props.add(key=key, value=value)
    return proto.SerializeToString()


def _torchscript_bytes(graph: RestorationPass, example: tuple[torch.Tensor, ...], metadata: dict[str, Any]) -> bytes:
    """The graph traced (every branch in it depends on configuration only), metadata in ``_extra_files``."""
    traced = torch.jit.trace(graph, example, check_trace=False)
    buffer = io.BytesIO()
    torch.jit.save(traced, buffer, _extra_files={METADATA_KEY: json.dumps(metadata)})
    return buffer.getvalue()


def export_model(model: MCF, out: str | Path, fmt: str, prep_config: PrepConfig = PrepConfig(),
                 model_version: str = "unknown") -> Path:
    """Write ``model``'s `RestorationPass` to ``out`` as ``fmt`` (``"onnx"`` or ``"torchscript"``), atomically.

    The model is exported from CPU in eval mode (and put back in its previous mode and device afterwards).
    """
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    was_training, device = model.training, next(model.parameters()).device
    graph = RestorationPass(model.to("cpu").eval(), prep_config).eval()
    try:
        with torch.no_grad():
            example = _example_inputs(prep_config, model.config.n_leads)
            metadata = export_metadata(model_version, model, prep_config)
            data = (_onnx_bytes if fmt == "onnx" else _torchscript_bytes)(graph, example, metadata)
    finally:
        model.to(device).train(was_training)
    write_bytes(out, data)
    return Path(out)


def export_checkpoint(checkpoint_dir: str | Path, out: str | Path, fmt: str) -> Path:
    """`export_model` of an ecgad checkpoint directory, with its model version and preprocessing config."""
    from ecgad.checkpoint import load_checkpoint

    checkpoint = load_checkpoint(checkpoint_dir)
    return export_model(checkpoint.model, out, fmt, checkpoint.prep_config, checkpoint.model_version)


def format_of(path: str | Path) -> str:
    """``"onnx"`` for a ``.onnx`` file, else ``"torchscript"`` (``.pt``, ``.ts``, ...)."""
    return "onnx" if Path(path).suffix.lower() == ".onnx" else "torchscript"


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The metadata an exported file records (`export_metadata`), without running it."""
    if format_of(path) == "onnx":
        import onnx

        props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
        return json.loads(props[METADATA_KEY])
    extra = {METADATA_KEY: ""}
    torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    return json.loads(extra[METADATA_KEY])


class ExportedScorer:
    """Scores prepared records through an exported `RestorationPass` (ONNX Runtime or TorchScript, on CPU).

    The protocol of `ecgad.oracle.oracle_score_window`, with one graph call per window (all its beats at once): the
    window score is the mean error over beats and passes; the window map is the summed global map over ``3 x beats``
    plus the beat maps placed at their beats over 3, smoothed (`ecgad.maps.smooth`); a record's score is the mean
    over all its windows' beats, as `ecgad.scoring.Scorer` weighs them.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.metadata = read_metadata(self.path)
        self.prep_config = PrepConfig.from_dict(self.metadata["prep_config"])
        if format_of(self.path) == "onnx":
            import onnxruntime

            session = onnxruntime.InferenceSession(str(self.path), providers=["CPUExecutionProvider"])
            self._run = lambda g, b: session.run(list(OUTPUT_NAMES), {INPUT_NAMES[0]: g, INPUT_NAMES[1]: b})
        else:
            module = torch.jit.load(str(self.path), map_location="cpu")

            def run(global_ecg: np.ndarray, beats: np.ndarray) -> list[np.ndarray]:
                with torch.inference_mode():
                    return [t.numpy() for t in module(torch.from_numpy(global_ecg), torch.from_numpy(beats))]
            self._run = run

    @property
    def model_version(self) -> str:
        return self.metadata["model_version"]

    def score_window(self, window: Window) -> tuple[float, np.ndarray]:
        """One prepared window ``(12, 5000)`` with its beats: ``(score, anomaly map (12, 4800))``."""
        cfg = self.prep_config
        if window.n_beats == 0:
            raise Rejection("no_beats", f"window at sample {window.offset}")
        global_ecg = np.ascontiguousarray(np.broadcast_to(window.signal[:, cfg.global_start:cfg.global_end],
                                                          (window.n_beats, *window.global_input.shape)),
                                          dtype=np.float32)
        errors, global_map, local_map = self._run(global_ecg, np.ascontiguousarray(window.beats, dtype=np.float32))
        beat_map = np.zeros(window.signal.shape, dtype=np.float32)
        for r, beat in zip(window.beat_peaks, local_map):
            beat_map[:, r - cfg.beat_before:r + cfg.beat_after] += beat
        anomaly = (global_map.sum(0) / (TEST_PASSES * window.n_beats)
                   + beat_map[:, cfg.global_start:cfg.global_end] / TEST_PASSES)
        return float(errors.astype(np.float64).mean()), smooth(anomaly)

    def score_prepared(self, prepared: Sequence[Prepared]) -> list[float]:
        """The record score of each prepared record (`ecgad.scoring.record_score` of its windows' scores)."""
        return [record_score(record.windows, [self.score_window(w)[0] for w in record.windows])
                for record in prepared]
