"""`make demo`: the main job end to end on data the project makes itself (or real PTB-XL via ``ECGAD_DATA``).

Every stage runs the same command a user or a cluster job would run (``python -m jobs.<stage>``, ``ecgad ...``), as a
subprocess, so the demo exercises the real entry points rather than a shortcut through the library:

    DeepFake ECG PTB-XL-layout data ─► jobs.preprocess ─► jobs.train (2 Ray Train workers) ─► jobs.evaluate
        ─► jobs.score_archive ─► the Ray Serve service, scored over HTTP, then shut down

What a person reads is one line per stage: its result, where its output is, and how long it took. Everything the
stages print themselves (Ray's progress blocks, the training reports, the service's request log) goes to
``<out>/demo.log``; a failing stage's tail of that log is printed, and the demo exits non-zero. Each stage's result
comes from the JSON summary its command prints as its last stdout line (a contract of every ``jobs.*`` entry point).

``ECGAD_DATA=path/to/ptbxl make demo`` runs the same on a real PTB-XL root (``ecgad data download ptbxl`` fetches one).
``ECGAD_DEMO_OUT`` (default ``demo_out``) is where everything is written; ``ECGAD_DEMO_EPOCHS`` sets the epochs
(default 20); ``ECGAD_DEMO_PORT`` the service's port (default 8000). The demo trains the small config at a peak
learning rate of 1e-3: at the paper's 1e-4 a model trained for a few minutes learns next to nothing (see
tests/test_train.py).
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import shlex
import subprocess
import sys
import time
import urllib.request
from collections import deque
from pathlib import Path
from typing import IO, Any

import numpy as np

from ecgad.log import get_logger

PY = sys.executable
N_STAGES = 6
#: Lines of the log shown when a stage fails.
TAIL_LINES = 40

log = get_logger("jobs.demo")   # not __name__: run as `python -m jobs.demo`, that is "__main__"


class StageFailed(RuntimeError):
    """A stage exited non-zero or did not give what the next stage needs."""


def _duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes}m {secs:02d}s" if minutes else f"{secs}s"


def _shown(path: Path) -> str:
    """``path`` relative to the working directory where it lies below it (what a person types), else absolute."""
    return str(path.relative_to(Path.cwd())) if path.is_relative_to(Path.cwd()) else str(path)


class Stages:
    """Numbers the stages, runs their commands with all output in one log file, and reports one line each."""

    def __init__(self, log_path: Path) -> None:
        self.log_path = log_path
        self.log_file: IO[str] = open(log_path, "a", buffering=1)
        self.number = 0
        self.started = 0.0

    def begin(self, title: str) -> None:
        self.number += 1
        self.started = time.perf_counter()
        self.log_file.write(f"\n=== [{self.number}/{N_STAGES}] {title} ({time.strftime('%H:%M:%S')})\n")

    def report(self, name: str, result: str, where: str) -> None:
        log.info("[%d/%d] %-10s %s -> %s (%s)", self.number, N_STAGES, name, result, where,
                 _duration(time.perf_counter() - self.started))

    def run(self, argv: list[str], summary: bool = True) -> dict[str, Any]:
        """Run ``argv`` with its stdout and stderr appended to the log; its summary (last JSON line on stdout)."""
        self.log_file.write(f"$ {shlex.join(argv)}\n")
        lines: deque[str] = deque(maxlen=TAIL_LINES)   # the summary is the last line; memory stays flat
        with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=self.log_file, text=True, bufsize=1) as process:
            assert process.stdout is not None
            for line in process.stdout:
                self.log_file.write(line)
                lines.append(line)
        if process.returncode:
            raise StageFailed(f"`{shlex.join(argv[:3])} ...` exited with code {process.returncode}")
        for line in reversed(lines):
            with contextlib.suppress(ValueError):
                value = json.loads(line)
                if isinstance(value, dict):
                    return value
        if summary:
            raise StageFailed(f"{argv[2]} printed no JSON summary as its last line")
        return {}

    def tail(self) -> str:
        self.log_file.flush()
        return "".join(self.log_path.read_text(errors="replace").splitlines(keepends=True)[-TAIL_LINES:])


# -- the service stage -----------------------------------------------------------------------------------------------

def _wait_ready(url: str, process: subprocess.Popen, deadline_s: float = 180.0) -> None:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise StageFailed(f"the service exited early with code {process.returncode}")
        with contextlib.suppress(OSError), urllib.request.urlopen(url + "/readyz", timeout=5) as response:
            if response.status == 200:
                return
        time.sleep(2)
    raise StageFailed(f"the service at {url} was not ready within {deadline_s:.0f} s")


def _post(url: str, body: bytes, content_type: str) -> dict:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": content_type}, method="POST")
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


def _multipart(files: dict[str, bytes]) -> tuple[bytes, str]:
    boundary = "ecgad-demo-boundary"
    parts = (f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="{name}"\r\n'
             f"Content-Type: application/octet-stream\r\n\r\n".encode() + content + b"\r\n"
             for name, content in files.items())
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def _verdict(response: dict) -> str:
    return f"{response['pred_score']:.4g} ({'anomalous' if response['pred_label'] else 'normal'})"


def _score_over_http(url: str, data_root: Path, stages: Stages) -> str:
    """Score a synthetic PVC record (binary NPY body) and the first WFDB record of ``data_root`` (multipart: its
    header and the ``.dat`` signal file PTB-XL headers name)."""
    from ecgad.ptbxl import load_ptbxl_index
    from ecgad.synth import generate_ecg

    synthetic = generate_ecg(seed=2024, anomaly="pvc")
    buffer = io.BytesIO()
    np.save(buffer, synthetic.signal)
    leads = ",".join(synthetic.lead_names)
    pvc = _post(f"{url}/v1/score?fs={synthetic.fs:g}&lead_names={leads}&map=downsample=10", buffer.getvalue(),
                "application/x-npy")
    header = data_root / f"{load_ptbxl_index(data_root).iloc[0]['record_path']}.hea"
    signal_file = header.with_suffix(".dat")
    body, content_type = _multipart({header.name: header.read_bytes(), signal_file.name: signal_file.read_bytes()})
    wfdb = _post(f"{url}/v1/score?map=none", body, content_type)
    for name, response in (("synthetic PVC record", pvc), (header.name, wfdb)):
        shown = {k: v for k, v in response.items() if k != "anomaly_map"}
        stages.log_file.write(f"{name}: {json.dumps(shown)}\n")
    return f"synthetic PVC {_verdict(pvc)}, WFDB {header.stem} {_verdict(wfdb)}"


def _serve_and_score(stages: Stages, checkpoint: Path, data_root: Path, port: int) -> None:
    """Start `ecgad serve`, score two records over HTTP, shut it down."""
    stages.begin("online scoring service")
    url = f"http://127.0.0.1:{port}"
    argv = [str(Path(PY).with_name("ecgad")), "serve", "--checkpoint", str(checkpoint), "--port", str(port)]
    stages.log_file.write(f"$ {shlex.join(argv)}\n")
    service = subprocess.Popen(argv, stdout=stages.log_file, stderr=subprocess.STDOUT)
    try:
        _wait_ready(url, service)
        result = _score_over_http(url, data_root, stages)
    finally:
        service.terminate()
        try:
            service.wait(timeout=60)
        except subprocess.TimeoutExpired:
            service.kill()
    stages.report("serve", result, f"{url}/ (stopped now)")


# -- the batch stages ------------------------------------------------------------------------------------------------

def _data(stages: Stages, out: Path) -> Path:
    stages.begin("data")
    real = os.environ.get("ECGAD_DATA")
    if real:
        data_root = Path(real).resolve()
        how = "records (PTB-XL root)"
    else:
        data_root = out / "deepfake"     # DeepFake ECG normals: realistic morphology (ecgad.deepfake)
        how = "DeepFake ECG records (reused)"
        if not (data_root / "ptbxl_database.csv").is_file():
            stages.run([PY, "-m", "ecgad.cli", "synth", "--source", "deepfake", "--out", str(data_root), "--n", "300",
                        "--seed", "0", "--anomaly-fraction", "0.3"], summary=False)
            how = "DeepFake ECG records, 30 % with inserted anomalies"
    with open(data_root / "ptbxl_database.csv", newline="") as f:
        n_records = sum(1 for _ in csv.DictReader(f))
    stages.report("data", f"{n_records} {how}", _shown(data_root))
    return data_root


def _preprocess(stages: Stages, data_root: Path, shards: Path) -> None:
    stages.begin("preprocess (Ray Data -> Parquet shards)")
    manifest = stages.run([PY, "-m", "jobs.preprocess", "--data", str(data_root), "--out", str(shards)])
    counts = manifest["counts"]
    stages.report("preprocess", f"{counts['ok']} prepared, {counts['rejected']} rejected, "
                  f"{counts['train_normals']} training normals", _shown(shards))


def _train(stages: Stages, shards: Path, run: Path, epochs: str) -> Path:
    stages.begin("train (Ray Train, 2 workers)")
    summary = stages.run(
        [PY, "-m", "jobs.train", "--data", str(shards), "--out", str(run), "--num-workers", "2",
         "--cpus-per-worker", "0.5", "--config", "small", "--epochs", epochs, "--batch-size", "8", "--lr", "1e-3",
         "--name", "demo"])
    best = summary["best"]
    metric = str(best["selected_by"]).removeprefix("val_").replace("auroc", "AUROC")
    stages.report("train", f"fold-9 {metric} {best['value']:.3f} at epoch {best['epoch']} of {len(summary['epochs'])}",
                  _shown(Path(best["checkpoint"])))
    return Path(best["checkpoint"])


def _evaluate(stages: Stages, checkpoint: Path, data_root: Path, evaluation: Path) -> None:
    stages.begin("evaluate (Ray Data batch inference on fold 10)")
    summary = stages.run(
        [PY, "-m", "jobs.evaluate", "--checkpoint", str(checkpoint), "--data", str(data_root), "--fold", "10",
         "--out", str(evaluation)])
    auroc = summary["metrics"]["record_auroc"]
    low, high = auroc["ci95"]
    value = "n/a" if auroc["value"] is None else f"{auroc['value']:.3f}"
    interval = "" if low is None else f" [{low:.3f}, {high:.3f}]"
    stages.report("evaluate", f"fold-10 AUROC {value}{interval} over {summary['records']} records",
                  _shown(evaluation / "metrics.json"))


def _score_archive(stages: Stages, checkpoint: Path, data_root: Path, archive: Path) -> None:
    stages.begin("score an archive (Ray Data, every record accounted for)")
    summary = stages.run(
        [PY, "-m", "jobs.score_archive", "--input", str(data_root), "--checkpoint", str(checkpoint),
         "--out", str(archive), "--mode", "fast"])
    by_status = ", ".join(f"{count} {status}" for status, count in sorted(summary["by_status"].items()))
    rate = summary.get("records_per_s")
    stages.report("archive", f"{summary['records']}/{summary['inputs']} records ({by_status})"
                  + (f", {rate:.1f} records/s" if rate else ""), _shown(archive))


def main() -> int:
    out = Path(os.environ.get("ECGAD_DEMO_OUT", "demo_out")).resolve()
    epochs = os.environ.get("ECGAD_DEMO_EPOCHS", "20")
    out.mkdir(parents=True, exist_ok=True)
    stages = Stages(out / "demo.log")
    log.info("ecgad demo: %d stages into %s; the stages' own output (Ray's) goes to %s", N_STAGES, _shown(out),
             _shown(stages.log_path))
    started = time.perf_counter()
    try:
        data_root = _data(stages, out)
        _preprocess(stages, data_root, out / "shards")
        checkpoint = _train(stages, out / "shards", out / "run", epochs)
        _evaluate(stages, checkpoint, data_root, out / "eval")
        _score_archive(stages, checkpoint, data_root, out / "archive")
        _serve_and_score(stages, checkpoint, data_root, port=int(os.environ.get("ECGAD_DEMO_PORT", "8000")))
    except (StageFailed, OSError, KeyError, TypeError, ValueError) as exc:
        problem = exc if isinstance(exc, StageFailed) else f"{type(exc).__name__}: {exc}"
        log.error("[%d/%d] failed: %s. The last %d lines of %s:\n%s", stages.number, N_STAGES, problem, TAIL_LINES,
                  _shown(stages.log_path), stages.tail())
        return 1
    finally:
        stages.log_file.close()
    log.info("done in %s; full output in %s; `ecgad serve --checkpoint %s` serves the model",
             _duration(time.perf_counter() - started), _shown(stages.log_path), _shown(checkpoint))
    return 0


if __name__ == "__main__":
    sys.exit(main())
