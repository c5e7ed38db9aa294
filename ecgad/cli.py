"""The ``ecgad`` command line: one small sub-command per stage, each a thin wrapper over the library.

Heavy imports (torch, ray, wfdb) happen inside the handlers so ``ecgad --help`` stays instant. Errors a user can fix
(bad input, bad checkpoint) end with a one-line message on stderr and a non-zero exit code, never a traceback.
Exit codes: 0 success, 1 a record was rejected or a job failed, 2 bad usage.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:   # imported for real inside the handlers, so that `ecgad --help` stays instant
    from ecgad.scoring import Scorer
    from ecgad.types import Record, Rejection, Scores


class CLIError(Exception):
    """A failure with a message meant for the user (printed without a traceback)."""


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, default=float))


def _report_rejection(path: str | Path, reason: str, message: str) -> None:
    print(f"ecgad: {path}: rejected: {reason} ({message})", file=sys.stderr)


# -- ecgad synth -------------------------------------------------------------------------------------------------

def cmd_synth(args: argparse.Namespace) -> int:
    from ecgad.synth_dataset import write_dataset

    try:
        root = write_dataset(Path(args.out), n=args.n, seed=args.seed, anomaly_fraction=args.anomaly_fraction,
                             source=args.source, long_tail=args.long_tail)
    except ValueError as err:   # an option value the generator cannot honour: a message, not a traceback
        raise CLIError(str(err)) from err
    print(f"wrote {args.n} synthetic records ({args.source}) in PTB-XL layout to {root}")
    return 0


# -- ecgad inspect -----------------------------------------------------------------------------------------------

def inspect_record(path: Path, fs: float | None = None) -> dict[str, Any]:
    """Read, validate and prepare one record; report what the model would see (or why it cannot)."""
    from ecgad.io import read_record
    from ecgad.preprocess import prepare
    from ecgad.types import Rejection
    from ecgad.validate import validate

    report: dict[str, Any] = {"path": str(path), "status": "ok", "reason": "", "fs": None, "leads": [],
                              "samples": None, "r_peaks": 0, "n_beats": 0, "windows": 0}
    try:
        record = read_record(path, fs=fs)
        report.update(fs=float(record.fs), leads=list(record.lead_names), samples=record.n_samples)
        prepared = prepare(validate(record))
        report.update(r_peaks=int(sum(len(w.peaks) for w in prepared.windows)), n_beats=prepared.n_beats,
                      windows=len(prepared.windows))
    except Rejection as rejection:
        report.update(status="rejected", reason=rejection.reason, message=rejection.message)
    return report


def cmd_inspect(args: argparse.Namespace) -> int:
    report = inspect_record(Path(args.path), fs=args.fs)
    if args.json:
        _print_json(report)
    else:
        width = max(len(k) for k in report)
        for key, value in report.items():
            print(f"{key:<{width}}  {', '.join(value) if isinstance(value, list) else value}")
    if report["status"] != "ok":
        _report_rejection(args.path, report["reason"], report.get("message", ""))
        return 1
    return 0


# -- ecgad train-local / import-checkpoint -----------------------------------------------------------------------

def cmd_train_local(args: argparse.Namespace) -> int:
    from ecgad.train import train_local

    try:
        out = train_local(Path(args.data), Path(args.out), config=args.config, epochs=args.epochs,
                          batch_size=args.batch_size, seed=args.seed, device=args.device, lr=args.lr,
                          init_from=args.init_from)
    except ValueError as err:   # unusable data or arguments (train_local says which)
        raise CLIError(str(err)) from err
    print(f"checkpoint written to {out} ({args.out} points at it)")
    return 0


def cmd_import_checkpoint(args: argparse.Namespace) -> int:
    from ecgad.checkpoint import import_published_checkpoint

    out = import_published_checkpoint(Path(args.published), Path(args.out), threshold=args.threshold)
    print(f"imported {args.published} as ecgad checkpoint {out}")
    return 0


# -- ecgad score -------------------------------------------------------------------------------------------------

def _read_and_score(scorer: Scorer, paths: list[Path]) -> dict[Path, tuple[Record | None, Scores | Rejection]]:
    """Each path's ``(record, Scores)``, or ``(None, Rejection)`` where it cannot be read; the readable records are
    scored in one call, so they share batches."""
    from ecgad.io import read_record
    from ecgad.types import Rejection
    from ecgad.validate import validate

    records, results = [], {}
    for path in paths:
        try:
            records.append((path, validate(read_record(path))))
        except Rejection as rejection:
            results[path] = (None, rejection)
    scored = scorer.score_records([record for _, record in records]) if records else []
    for (path, record), outcome in zip(records, scored, strict=True):
        results[path] = (record, outcome)
    return results


def _write_outputs(args: argparse.Namespace, path: Path, record: Record, scores: Scores, several: bool) -> None:
    """The record's anomaly map (``--maps``) and plot (``--plot``), each written atomically."""
    if args.maps and scores.anomaly_map is not None:
        import numpy as np

        from ecgad.atomic import atomic_file

        with atomic_file(Path(args.maps) / f"{path.stem}.npy") as fh:
            np.save(fh, scores.anomaly_map.astype(np.float32))
    if args.plot:
        from ecgad.plot import plot_ecg, verdict_title

        base = Path(args.plot)
        plot_ecg(record.signal, record.fs, anomaly_map=scores.anomaly_map, title=verdict_title(path.stem, scores),
                 out=base.with_name(f"{base.stem}_{path.stem}{base.suffix}") if several else base)


def cmd_score(args: argparse.Namespace) -> int:
    from ecgad.checkpoint import resolve_checkpoint
    from ecgad.scoring import Scorer
    from ecgad.types import Rejection

    checkpoint = resolve_checkpoint(args.checkpoint)
    scorer = Scorer.from_checkpoint(checkpoint, device=args.device, mode=args.mode)
    print(f"ecgad score: model version {scorer.model_version} ({checkpoint})", file=sys.stderr)
    paths = [Path(p) for p in args.paths]
    results = _read_and_score(scorer, paths)
    failures = 0
    for path in paths:
        record, outcome = results[path]
        if isinstance(outcome, Rejection):
            failures += 1
            row = {"path": str(path), "status": "rejected", "reason": outcome.reason,
                   "pred_score": None, "pred_label": None, "model_version": scorer.model_version}
            _report_rejection(path, outcome.reason, outcome.message)
        else:
            row = {"path": str(path), "status": "ok", "reason": "", "pred_score": float(outcome.pred_score),
                   "pred_label": bool(outcome.pred_label),
                   "threshold": float(outcome.threshold) if math.isfinite(outcome.threshold) else None,
                   "beats_used": outcome.beats_used, "model_version": scorer.model_version}
            _write_outputs(args, path, record, outcome, several=len(paths) > 1)
        if args.json:
            _print_json(row)
        elif row["status"] == "ok":
            print(f"{path}\tscore={row['pred_score']:.6g}\tlabel={'anomalous' if row['pred_label'] else 'normal'}")
    return 1 if failures else 0


# -- ecgad diagnose ---------------------------------------------------------------------------------------------

def cmd_diagnose(args: argparse.Namespace) -> int:
    from ecgad.checkpoint import resolve_checkpoint
    from ecgad.diagnose import Diagnoser
    from ecgad.io import read_record
    from ecgad.types import Rejection
    from ecgad.validate import validate

    diagnoser = Diagnoser(resolve_checkpoint(args.checkpoint), device=args.device, mode=args.mode)
    print(f"ecgad diagnose: model version {diagnoser.model_version}, {diagnoser.level} labels "
          f"({len(diagnoser.classes)} classes)", file=sys.stderr)
    failures = 0
    for path in (Path(p) for p in args.paths):
        try:
            (outcome,) = diagnoser.diagnose_records([validate(read_record(path))], with_maps=args.json)
        except Rejection as rejection:
            outcome = rejection
        if isinstance(outcome, Rejection):
            failures += 1
            _report_rejection(path, outcome.reason, outcome.message)
            if args.json:
                _print_json({"path": str(path), "status": "rejected", "reason": outcome.reason})
            continue
        scores, diagnosis = outcome
        if args.json:
            _print_json({"path": str(path), "status": "ok", **diagnosis.to_dict(),
                         "pred_score": float(scores.pred_score), "pred_label": bool(scores.pred_label),
                         "threshold": float(scores.threshold) if math.isfinite(scores.threshold) else None,
                         "anomaly_map": scores.anomaly_map.round(6).tolist(),
                         "model_version": diagnoser.model_version})
        else:
            top = sorted(diagnosis.probabilities.items(), key=lambda kv: -kv[1])[:5]
            print(f"{path}\tlabels={','.join(diagnosis.labels) or '-'}\tscore={scores.pred_score:.6g}\t"
                  f"{'anomalous' if scores.pred_label else 'normal'}\ttop: "
                  + " ".join(f"{c}={v:.3f}" for c, v in top))
    return 1 if failures else 0


# -- ecgad export -----------------------------------------------------------------------------------------------

def cmd_export(args: argparse.Namespace) -> int:
    from ecgad.export import export_checkpoint

    out = export_checkpoint(Path(args.checkpoint), Path(args.out), args.format)
    print(f"exported {args.checkpoint} as {args.format} to {out}")
    return 0


# -- ecgad data download -----------------------------------------------------------------------------------------

def cmd_download(args: argparse.Namespace) -> int:
    from ecgad.download import PHYSIONET_PTBXL_URL, download_ptbxl

    root = download_ptbxl(Path(args.out), rate=args.rate, limit=args.limit,
                          base_url=args.base_url or PHYSIONET_PTBXL_URL)
    print(f"PTB-XL ({args.rate} Hz) ready at {root}")
    return 0


# -- ecgad serve / score-archive ---------------------------------------------------------------------------------

def cmd_serve(args: argparse.Namespace) -> int:
    from ecgad.checkpoint import resolve_checkpoint
    from serve.app import UnsafeBind, run_local

    hosts = [h.strip() for h in args.allowed_hosts.split(",") if h.strip()] if args.allowed_hosts else None
    try:
        run_local(resolve_checkpoint(args.checkpoint), host=args.host, port=args.port, config=args.config,
                  blocking=True, behind_auth_proxy=args.behind_auth_proxy, allowed_hosts=hosts,
                  metrics_port=args.metrics_port)
    except UnsafeBind as err:
        raise CLIError(str(err)) from None
    return 0


def cmd_score_archive(args: argparse.Namespace) -> int:
    from jobs.score_archive import main as score_archive_main

    return int(score_archive_main(args.rest) or 0)


# -- parser ------------------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ecgad", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("synth", help="write a synthetic 12-lead dataset (PTB-XL layout, with point masks)")
    p.add_argument("--out", required=True)
    p.add_argument("--n", type=int, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--anomaly-fraction", type=float, default=0.3)
    p.add_argument("--source", choices=("simple", "deepfake"), default="simple",
                   help="simple: the built-in wave model; deepfake: DeepFake ECG GAN normals (realistic morphology)")
    p.add_argument("--long-tail", action="store_true",
                   help="anomaly kinds and combinations with power-law prevalence (the diagnosis benchmark)")
    p.set_defaults(handler=cmd_synth)

    p = sub.add_parser("inspect", help="read, validate and prepare one record; print what the model sees")
    p.add_argument("path")
    p.add_argument("--fs", type=float, default=None, help="sampling rate for formats without one (CSV, NPY)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(handler=cmd_inspect)

    p = sub.add_parser("train-local", help="train MCF in this process (laptop scale); writes a checkpoint dir")
    p.add_argument("--data", required=True, help="a PTB-XL root (real or synthetic)")
    p.add_argument("--out", required=True, help="the finished checkpoint directory")
    p.add_argument("--config", choices=["small", "paper"], default="small")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-4, help="peak learning rate of the cosine schedule (paper: 1e-4)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when available)")
    p.add_argument("--init-from", default=None, metavar="CHECKPOINT",
                   help="start from this checkpoint's weights (its architecture and preparation are kept; --config is "
                        "then not used): fine-tune a pretrained model on your own normals, at a lower --lr")
    p.set_defaults(handler=cmd_train_local)

    p = sub.add_parser("score", help="score records with a checkpoint")
    p.add_argument("paths", nargs="+")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--mode", choices=["full", "fast"], default="full")
    p.add_argument("--device", default=None)
    p.add_argument("--json", action="store_true", help="one JSON object per record")
    p.add_argument("--plot", default=None, help="write the 12-lead plot with the anomaly overlay (PNG or SVG)")
    p.add_argument("--maps", default=None, help="save each record's anomaly map as OUTDIR/<record>.npy")
    p.set_defaults(handler=cmd_score)

    p = sub.add_parser("diagnose", help="diagnose records with a checkpoint that has a diagnosis head")
    p.add_argument("paths", nargs="+")
    p.add_argument("--checkpoint", required=True, help="a checkpoint from jobs.finetune (e.g. RUNDIR/best)")
    p.add_argument("--mode", choices=["full", "fast"], default="full", help="scoring mode of the anomaly verdict")
    p.add_argument("--device", default=None)
    p.add_argument("--json", action="store_true",
                   help="one JSON object per record: labels, probabilities, anomaly score and map")
    p.set_defaults(handler=cmd_diagnose)

    p = sub.add_parser("import-checkpoint", help="turn a published MCF checkpoint into an ecgad checkpoint dir")
    p.add_argument("published")
    p.add_argument("--out", required=True)
    p.add_argument("--threshold", type=float, default=float("nan"),
                   help="decision threshold (calibrate later with jobs.evaluate if unknown)")
    p.set_defaults(handler=cmd_import_checkpoint)

    p = sub.add_parser("export", help="export a checkpoint's scoring graph for use outside Ray (ONNX, TorchScript)")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--format", choices=["onnx", "torchscript"], required=True)
    p.add_argument("--out", required=True)
    p.set_defaults(handler=cmd_export)

    data = sub.add_parser("data", help="datasets").add_subparsers(dest="data_command", required=True)
    p = data.add_parser("download", help="download a public dataset (resumable, checksum-verified)")
    p.add_argument("dataset", choices=["ptbxl"])
    p.add_argument("--out", required=True)
    p.add_argument("--rate", type=int, choices=[100, 500], default=500)
    p.add_argument("--limit", type=int, default=None, help="only the first N records")
    p.add_argument("--base-url", default=None, help="mirror of PhysioNet's PTB-XL folder")
    p.set_defaults(handler=cmd_download)

    p = sub.add_parser("serve", help="start the scoring service locally (Ray Serve)")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--config", default=None, help="a serve config YAML (default: serve/config.yaml)")
    p.add_argument("--behind-auth-proxy", action="store_true",
                   help="serve a non-loopback --host without ECGAD_API_TOKEN: an authenticating proxy is in front")
    p.add_argument("--allowed-hosts", default=None,
                   help="comma-separated Host names the service answers (default: loopback names and --host)")
    p.add_argument("--metrics-port", type=int, default=None,
                   help="port of Ray's Prometheus endpoint (our ecgad_* metrics and Serve's) for a local Ray "
                        "instance; its address is printed (default: a port Ray picks)")
    p.set_defaults(handler=cmd_serve)

    p = sub.add_parser("score-archive", add_help=False,
                       help="score an archive with Ray Data (same options as python -m jobs.score_archive)")
    p.set_defaults(handler=cmd_score_archive)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from ecgad.checkpoint import CheckpointError
    from ecgad.download import DownloadError
    from ecgad.types import Rejection

    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest and args.handler is not cmd_score_archive:   # only score-archive passes options on (to its job)
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    args.rest = rest
    try:
        return args.handler(args)
    except (CLIError, Rejection, FileNotFoundError, CheckpointError, DownloadError) as err:
        print(f"ecgad {args.command}: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
