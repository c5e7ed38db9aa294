"""The `ecgad` command line: contracts scripts rely on (sub-command names, --json keys, exit codes)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ecgad.cli import main
from ecgad.drift import Calibration

INSPECT_KEYS = {"path", "status", "reason", "fs", "leads", "samples", "r_peaks", "n_beats"}


def test_synth_then_inspect_every_record(tmp_path, capsys):
    assert main(["synth", "--out", str(tmp_path / "synth"), "--n", "6", "--seed", "3"]) == 0
    headers = sorted((tmp_path / "synth" / "records500").rglob("*.hea"))
    assert len(headers) == 6
    capsys.readouterr()
    for header in headers:
        assert main(["inspect", str(header), "--json"]) == 0
        report = json.loads(capsys.readouterr().out)
        assert INSPECT_KEYS <= set(report)
        assert report["status"] == "ok" and report["fs"] == 500.0 and report["samples"] == 5000
        assert report["n_beats"] >= 5 and report["r_peaks"] >= report["n_beats"]


def test_inspect_real_long_record_reports_windows(sample_data, capsys):
    assert main(["inspect", str(sample_data / "other_12lead" / "ptbdb" / "s0010_re.hea"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["fs"] == 1000.0 and report["samples"] == 38400 and report["windows"] > 1
    assert report["leads"][:3] == ["I", "II", "III"] and len(report["leads"]) == 12


def test_inspect_rejection_exits_nonzero_with_reason(tmp_path, capsys):
    bad = tmp_path / "noise.dat"
    bad.write_bytes(bytes(range(256)) * 4)
    assert main(["inspect", str(bad), "--json"]) == 1
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert report["status"] == "rejected" and report["reason"].startswith("bad_file")
    assert "rejected" in captured.err


def test_synth_option_values_it_cannot_honour_are_a_one_line_error(tmp_path, capsys):
    assert main(["synth", "--out", str(tmp_path / "bad"), "--n", "4", "--anomaly-fraction", "1.5"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("ecgad synth: error: anomaly_fraction must lie in [0, 1]") and "Traceback" not in err


def test_unknown_option_is_a_usage_error():
    with pytest.raises(SystemExit) as exit_info:
        main(["inspect", "x.hea", "--no-such-flag"])
    assert exit_info.value.code == 2


def test_train_local_then_score_with_json_maps_and_plot(tmp_path, capsys, sample_data):
    data, ckpt = tmp_path / "synth", tmp_path / "ckpt"
    assert main(["synth", "--out", str(data), "--n", "30", "--seed", "4"]) == 0
    assert main(["train-local", "--data", str(data), "--out", str(ckpt), "--config", "small", "--epochs", "1",
                 "--batch-size", "8", "--device", "cpu"]) == 0
    assert (ckpt / "weights.pt").is_file() and (ckpt / "config.json").is_file()
    # The score calibration the service's drift gauges compare with: the fold-9 normals the threshold was set on.
    saved = json.loads((ckpt / "config.json").read_text())
    calibration = Calibration.from_dict(saved["calibration"])
    assert calibration.n == saved["metadata"]["threshold_calibration"]["n"] > 0
    assert calibration.quantiles[95] == pytest.approx(saved["threshold"])
    capsys.readouterr()

    long_record = sample_data / "other_12lead" / "ptbdb" / "s0010_re.hea"     # 1000 Hz, 38.4 s
    hundred_hz = sample_data / "ptbxl" / "records100" / "00000" / "00001_lr.hea"
    bad = tmp_path / "noise.dat"
    bad.write_bytes(bytes(range(256)) * 4)
    code = main(["score", str(long_record), str(hundred_hz), str(bad), "--checkpoint", str(ckpt), "--json",
                 "--maps", str(tmp_path / "maps"), "--plot", str(tmp_path / "plot.png")])
    captured = capsys.readouterr()
    assert code == 1 and "noise.dat: rejected: bad_file" in captured.err      # one record rejected: exit 1
    rows = [json.loads(line) for line in captured.out.splitlines()]
    assert [r["status"] for r in rows] == ["ok", "ok", "rejected"]
    assert all({"path", "status", "reason", "pred_score", "pred_label"} <= set(r) for r in rows)
    assert rows[0]["pred_score"] > 0 and isinstance(rows[0]["pred_label"], bool) and rows[2]["pred_score"] is None
    # Maps on each record's own time axis: leads x samples at its own rate.
    assert np.load(tmp_path / "maps" / "s0010_re.npy").shape == (12, 38400)
    assert np.load(tmp_path / "maps" / "00001_lr.npy").shape == (12, 1000)
    assert (tmp_path / "plot_s0010_re.png").stat().st_size > 10_000 and (tmp_path / "plot_00001_lr.png").is_file()


def test_score_with_a_bad_checkpoint_is_a_one_line_error(tmp_path, capsys, sample_data):
    record = sample_data / "ptbxl" / "records100" / "00000" / "00001_lr.hea"
    assert main(["score", str(record), "--checkpoint", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("ecgad score: error:") and "not an ecgad checkpoint" in err and "Traceback" not in err


def test_train_local_on_data_without_training_normals_is_a_one_line_error(tmp_path, capsys):
    assert main(["synth", "--out", str(tmp_path / "tiny"), "--n", "2"]) == 0
    assert main(["train-local", "--data", str(tmp_path / "tiny"), "--out", str(tmp_path / "ckpt"),
                 "--epochs", "1"]) == 1
    assert "fewer than 2 usable training normals" in capsys.readouterr().err


def test_import_published_checkpoint_then_score(tmp_path, capsys, reference_mcf, sample_data):
    out = tmp_path / "imported"
    assert main(["import-checkpoint", str(reference_mcf / "state_dict_fp16.pt"), "--out", str(out)]) == 0
    record = sample_data / "ptbxl" / "records500" / "06000" / "06000_hr.hea"
    capsys.readouterr()
    assert main(["score", str(record), "--checkpoint", str(out), "--json", "--mode", "fast"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["status"] == "ok" and np.isfinite(row["pred_score"])
    assert row["threshold"] is None           # the published weights come without a calibrated threshold
    assert main(["import-checkpoint", str(record), "--out", str(tmp_path / "x")]) == 1
    assert "cannot read published checkpoint" in capsys.readouterr().err
