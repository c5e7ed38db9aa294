"""The GPU path: what runs where CUDA exists, and what a machine without it says instead.

Without CUDA, bench/gpu.sh must stop at once with a clear message and bench/score.py ``--device cuda`` must skip
with its reason; with CUDA, the `Scorer` on the GPU must give the CPU's scores (float32), and bf16 autocast must
stay close to them. Timing is bench/gpu.sh's job, never a test's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ecgad.io import read_record
from ecgad.model import MCF, MCFConfig
from ecgad.preprocess import prepare
from ecgad.scoring import Scorer
from ecgad.settings import REPO_ROOT

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="no CUDA device on this machine (torch.cuda.is_available() is False)")
needs_no_cuda = pytest.mark.skipif(CUDA, reason="this machine has CUDA: bench/gpu.sh would run the benchmarks")


def _run(*command: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{REPO_ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "PYTHON": sys.executable}
    return subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_gpu_script_parses():
    assert _run("bash", "-n", "bench/gpu.sh").returncode == 0


@needs_no_cuda
def test_gpu_script_stops_at_once_without_cuda():
    done = _run("bash", "bench/gpu.sh")
    assert done.returncode == 2
    assert "no CUDA device" in done.stderr
    assert done.stdout == ""


@needs_no_cuda
def test_score_bench_skips_cuda_with_a_reason():
    done = _run(sys.executable, "bench/score.py", "--device", "cuda", "--precision", "bf16")
    assert done.returncode == 0, done.stderr
    row = json.loads(done.stdout.strip().splitlines()[-1])
    assert row["benchmark"] == "score" and "CUDA is not available" in row["skipped"]


@pytest.fixture(scope="module")
def prepared(sample_data: Path) -> list:
    return [prepare(read_record(sample_data / "ptbxl/records500/06000/06000_hr"))]


@needs_cuda
@pytest.mark.parametrize("mode", ["full", "fast"])
def test_scorer_on_cuda_gives_the_cpu_scores(prepared, mode):
    torch.manual_seed(0)
    model = MCF(MCFConfig.small()).eval()
    on_cpu = Scorer(model, device="cpu", mode=mode).score_prepared(prepared)
    on_gpu = Scorer(model, device="cuda", mode=mode).score_prepared(prepared)
    np.testing.assert_allclose([s.pred_score for s in on_gpu], [s.pred_score for s in on_cpu], rtol=1e-4)
    np.testing.assert_allclose(on_gpu[0].anomaly_map, on_cpu[0].anomaly_map, rtol=1e-3,
                               atol=1e-4 * float(on_cpu[0].anomaly_map.max()))


@needs_cuda
def test_bf16_autocast_scoring_stays_close_to_fp32(prepared):
    torch.manual_seed(0)
    scorer = Scorer(MCF(MCFConfig.small()).eval(), device="cuda")
    reference = scorer.score_prepared(prepared)[0]
    with torch.autocast("cuda", dtype=torch.bfloat16):
        lowered = scorer.score_prepared(prepared)[0]
    assert abs(lowered.pred_score / reference.pred_score - 1) < 2e-2
