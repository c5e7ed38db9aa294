"""`make demo`: the main job end to end on data the project makes itself (or real PTB-XL via ``ECGAD_DATA``).

Every step runs the same command a user or a cluster job would run (``python -m jobs.<stage>``, ``ecgad ...``), as a
subprocess, so the demo exercises the real entry points rather than a shortcut through the library:

    synthetic PTB-XL-layout data ─► jobs.preprocess ─► jobs.train (2 Ray Train workers) ─► jobs.evaluate
        ─► jobs.score_archive ─► the Ray Serve service, scored over HTTP, then shut down

``ECGAD_DATA=path/to/ptbxl make demo`` runs the same on a real PTB-XL root (``ecgad data download ptbxl`` fetches one).
``ECGAD_DEMO_OUT`` (default ``demo_out``) is where everything is written; ``ECGAD_DEMO_EPOCHS`` sets the epochs
(default 20). The demo trains the small config at a peak learning rate of 1e-3: at the paper's 1e-4 a model trained
for a few minutes learns next to nothing (see tests/test_train.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np

PY = sys.executable


def _step(title: str, argv: list[str]) -> None:
    print(f"\n=== {title}\n$ {' '.join(argv)}", flush=True)
    started = time.perf_counter()
    subprocess.run(argv, check=True)
    print(f"--- {title}: {time.perf_counter() - started:.1f} s", flush=True)


def _wait_ready(url: str, process: subprocess.Popen, deadline_s: float = 180.0) -> None:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the service exited early with code {process.returncode}")
        try:
            with urllib.request.urlopen(url + "/readyz", timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(2)
    raise TimeoutError(f"the service at {url} was not ready within {deadline_s:.0f} s")


def _post(url: str, body: bytes, content_type: str) -> dict:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": content_type}, method="POST")
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


def _multipart(files: dict[str, bytes]) -> tuple[bytes, str]:
    boundary = "ecgad-demo-boundary"
    parts = []
    for name, content in files.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="{name}"\r\n'
                     f"Content-Type: application/octet-stream\r\n\r\n".encode() + content + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def _summarize(response: dict) -> dict:
    shown = {k: v for k, v in response.items() if k != "anomaly_map"}
    if response.get("anomaly_map") is not None:
        shown["anomaly_map"] = f"{len(response['anomaly_map'])} leads x {len(response['anomaly_map'][0])} samples"
    return shown


def _serve_and_score(checkpoint: Path, data_root: Path, port: int) -> None:
    """Start `ecgad serve`, score a synthetic record (binary NPY) and a WFDB record (multipart), shut down."""
    from ecgad.io import read_record
    from ecgad.ptbxl import load_ptbxl_index
    from ecgad.synth import generate_ecg

    url = f"http://127.0.0.1:{port}"
    argv = [str(Path(PY).with_name("ecgad")), "serve", "--checkpoint", str(checkpoint), "--port", str(port)]
    print(f"\n=== online scoring service\n$ {' '.join(argv)}", flush=True)
    service = subprocess.Popen(argv)
    try:
        _wait_ready(url, service)
        synthetic = generate_ecg(seed=2024, anomaly="pvc")
        buffer = __import__("io").BytesIO()
        np.save(buffer, synthetic.signal)
        leads = ",".join(synthetic.lead_names)
        response = _post(f"{url}/v1/score?fs={synthetic.fs:g}&lead_names={leads}&map=downsample=10",
                         buffer.getvalue(), "application/x-npy")
        print("synthetic PVC record (binary NPY body):", json.dumps(_summarize(response), indent=1)[:1500])

        index = load_ptbxl_index(data_root)
        header = data_root / f"{index.iloc[0]['record_path']}.hea"
        record = read_record(header)
        signal_file = Path(record.metadata.get("signal_file", header.with_suffix(".dat")))
        body, content_type = _multipart({header.name: header.read_bytes(), signal_file.name: signal_file.read_bytes()})
        response = _post(f"{url}/v1/score?map=none", body, content_type)
        print(f"WFDB record {header.name} (multipart upload):", json.dumps(_summarize(response), indent=1))
        print(f"\nviewer: {url}/   (API docs: {url}/docs) — stopping the service now; "
              f"`ecgad serve --checkpoint {checkpoint}` keeps it up.")
    finally:
        service.terminate()
        try:
            service.wait(timeout=60)
        except subprocess.TimeoutExpired:
            service.kill()


def main() -> int:
    out = Path(os.environ.get("ECGAD_DEMO_OUT", "demo_out")).resolve()
    epochs = os.environ.get("ECGAD_DEMO_EPOCHS", "20")
    real = os.environ.get("ECGAD_DATA")
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    if real:
        data_root = Path(real).resolve()
        print(f"using the PTB-XL root at {data_root}")
    else:
        data_root = out / "synthetic"
        if not (data_root / "ptbxl_database.csv").is_file():
            _step("synthetic dataset", [PY, "-m", "ecgad.cli", "synth", "--out", str(data_root), "--n", "300",
                                        "--seed", "0", "--anomaly-fraction", "0.3"])
    shards, run, evaluation, archive = out / "shards", out / "run", out / "eval", out / "archive"
    _step("preprocess (Ray Data -> Parquet shards)",
          [PY, "-m", "jobs.preprocess", "--data", str(data_root), "--out", str(shards)])
    _step("train (Ray Train, 2 workers)",
          [PY, "-m", "jobs.train", "--data", str(shards), "--out", str(run), "--num-workers", "2",
           "--cpus-per-worker", "0.5", "--config", "small", "--epochs", epochs, "--batch-size", "8", "--lr", "1e-3",
           "--name", "demo"])
    checkpoint = run / "best"
    _step("evaluate (Ray Data batch inference on fold 10)",
          [PY, "-m", "jobs.evaluate", "--checkpoint", str(checkpoint), "--data", str(data_root), "--fold", "10",
           "--out", str(evaluation)])
    _step("score an archive (Ray Data, every record accounted for)",
          [PY, "-m", "jobs.score_archive", "--input", str(data_root), "--checkpoint", str(checkpoint),
           "--out", str(archive), "--mode", "fast"])
    _serve_and_score(checkpoint, data_root, port=int(os.environ.get("ECGAD_DEMO_PORT", "8000")))

    metrics = json.loads((evaluation / "metrics.json").read_text())
    print(f"\n=== done in {time.perf_counter() - started:.0f} s")
    print(json.dumps({k: v for k, v in metrics.items() if not isinstance(v, (list, dict))}, indent=1))
    print(f"checkpoint: {checkpoint}\nevaluation (metrics.json, roc.png, map plots): {evaluation}\n"
          f"archive scores: {archive}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
