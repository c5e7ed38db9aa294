"""The `ecgad` command line: contracts scripts rely on (sub-command names, --json keys, exit codes)."""

from __future__ import annotations

import json

import pytest

from ecgad.cli import main

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


def test_unknown_option_is_a_usage_error():
    with pytest.raises(SystemExit) as exit_info:
        main(["inspect", "x.hea", "--no-such-flag"])
    assert exit_info.value.code == 2
