"""Readers and lead handling on the real sample records, their CSV/NPY/NPZ re-encodings and damaged headers."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import wfdb

from ecgad.io import read_record, record_from_array
from ecgad.leads import canonical_lead_name, standardize_leads
from ecgad.types import LEADS, Rejection
from tests.corrupt import copy_record, limb_leads_i_ii_only

PTBXL_500 = "ptbxl/records500/06000/06000_hr"
GEORGIA = "other_12lead/cinc2021_georgia/E07501"
PTBDB = "other_12lead/ptbdb/s0010_re"


def _reason(path, **kwargs) -> str:
    with pytest.raises(Rejection) as info:
        read_record(path, **kwargs)
    return info.value.reason


def _wfdb_mv(base: Path) -> tuple[np.ndarray, list[str]]:
    """wfdb's own reading, ``(channels, samples)`` in mV, as the reference."""
    rec = wfdb.rdrecord(str(base))
    return rec.p_signal.T, rec.sig_name


# --- the real sample records -----------------------------------------------------------------------------------

def test_other_12lead_labels_counts(sample_data):
    labels = pd.read_csv(sample_data / "other_12lead" / "labels.csv")
    assert len(labels) == 22
    assert labels["label"].value_counts().to_dict() == {"abnormal": 19, "normal": 3}
    groups = labels["record_path"].str.split("/").str[0].value_counts().to_dict()
    assert groups == {"cinc2021_georgia": 11, "cinc2021_chapman_ningbo": 10, "ptbdb": 1}


def test_every_other_12lead_record_reads_in_canonical_order(sample_data):
    labels = pd.read_csv(sample_data / "other_12lead" / "labels.csv")
    for record_path in labels["record_path"]:
        base = sample_data / "other_12lead" / record_path
        record = read_record(base)
        reference, names = _wfdb_mv(base)
        assert record.lead_names == LEADS
        assert record.signal.dtype == np.float32 and record.signal.shape == (12, reference.shape[1])
        assert record.record_id == base.name and record.metadata["derived_leads"] == []
        assert record.fs == wfdb.rdheader(str(base)).fs
        for row, lead in enumerate(LEADS):      # every lead is the file's channel of that name, in mV
            source = [canonical_lead_name(name) for name in names].index(lead)
            np.testing.assert_allclose(record.signal[row], reference[source], atol=1e-6)


def test_ptbdb_frank_leads_dropped_and_gain_2000_gives_mv(sample_data):
    record = read_record(sample_data / PTBDB)
    assert record.signal.shape == (12, 38400) and record.fs == 1000
    assert record.metadata["source_lead_names"][12:] == ["vx", "vy", "vz"]
    # Independent of wfdb: format 16, baseline 0, 2000 adu/mV, standard leads first in s0010_re.dat.
    digital = np.fromfile(sample_data / (PTBDB + ".dat"), dtype="<i2").reshape(-1, 12).T
    np.testing.assert_allclose(record.signal, digital / 2000.0, atol=1e-6)
    assert 0.5 < np.ptp(record.signal[1]) < 3.0          # lead II: a plausible QRS amplitude in mV


@pytest.mark.parametrize("form", ["base", "hea", "dat", "str"])
def test_wfdb_path_forms_read_the_same_record(sample_data, form):
    base = sample_data / PTBXL_500
    path = {"base": base, "hea": base.with_suffix(".hea"), "dat": base.with_suffix(".dat"), "str": str(base)}[form]
    np.testing.assert_array_equal(read_record(path).signal, read_record(base).signal)


def test_mat_signal_file_path(sample_data):
    base = sample_data / GEORGIA
    np.testing.assert_array_equal(read_record(base.with_suffix(".mat")).signal, read_record(base).signal)


def test_metadata_keeps_source_names_units_and_comments(sample_data):
    record = read_record(sample_data / GEORGIA)
    meta = record.metadata
    assert meta["format"] == "wfdb" and meta["path"].endswith("E07501.hea")
    assert meta["source_lead_names"][:4] == ["I", "II", "III", "aVR"] and meta["units"][0] == "mV"
    assert "Dx: 253352002,427084000" in meta["comments"]


def test_derived_limb_leads_match_the_recorded_ones(sample_data, tmp_path):
    for source in (PTBXL_500, GEORGIA):
        real = read_record(sample_data / source)
        derived = read_record(limb_leads_i_ii_only(sample_data / source, tmp_path / Path(source).name))
        assert derived.metadata["derived_leads"] == ["III", "aVR", "aVL", "aVF"]
        # Recorded leads are rounded to 1 µV each, so the derived ones agree to within a few µV.
        np.testing.assert_allclose(derived.signal, real.signal, atol=2e-3)


# --- WFDB headers ------------------------------------------------------------------------------------------------

def _edit(path: Path, old: str, new: str, count: int = -1) -> Path:
    header = path.with_suffix(".hea")
    text = header.read_text()
    assert old in text
    header.write_text(text.replace(old, new, count))
    return path


def test_microvolt_units_are_converted(sample_data, tmp_path):
    path = copy_record(sample_data / PTBXL_500, tmp_path)
    reference = read_record(path).signal
    np.testing.assert_allclose(read_record(_edit(path, "/mV", "/uV")).signal, reference / 1000, rtol=1e-6)


def test_non_voltage_unit_rejected(sample_data, tmp_path):
    assert _reason(_edit(copy_record(sample_data / PTBXL_500, tmp_path), "/mV", "/mmHg", 1)) == "bad_file:unit"


def test_header_without_rate_needs_fs(sample_data, tmp_path):
    path = _edit(copy_record(sample_data / PTBXL_500, tmp_path), "corrupt 12 500 5000", "corrupt 12")
    assert _reason(path) == "bad_fs:missing"
    assert read_record(path, fs=500).fs == 500


def test_given_fs_must_agree_with_header(sample_data):
    assert read_record(sample_data / PTBXL_500, fs=500.0).fs == 500
    assert _reason(sample_data / PTBXL_500, fs=250) == "bad_fs:conflict"


@pytest.mark.parametrize("rate, reason", [("20", "bad_fs:out_of_range"), ("50000", "bad_fs:out_of_range"),
                                          ("nan", "bad_fs:out_of_range"), ("5o0", "bad_fs:non_numeric")])
def test_implausible_header_rate(sample_data, tmp_path, rate, reason):
    path = _edit(copy_record(sample_data / PTBXL_500, tmp_path), "corrupt 12 500 ", f"corrupt 12 {rate} ")
    assert _reason(path) == reason


def test_lead_names_override_for_unnamed_channels(sample_data, tmp_path):
    path = copy_record(sample_data / PTBXL_500, tmp_path)
    header = path.with_suffix(".hea")
    header.write_text("\n".join(line.rsplit(" ", 1)[0] if i else line
                                for i, line in enumerate(header.read_text().splitlines())) + "\n")
    assert _reason(path) == "unknown_lead:<unnamed>"
    np.testing.assert_array_equal(read_record(path, lead_names=LEADS).signal,
                                  read_record(sample_data / PTBXL_500).signal)
    assert _reason(path, lead_names=LEADS[:11]) == "bad_shape:leads"


def test_unsupported_format_and_missing_signal_file(sample_data, tmp_path):
    path = copy_record(sample_data / PTBXL_500, tmp_path / "a")
    assert _reason(_edit(path, ".dat 16 ", ".dat 516 ")) == "bad_file:format"
    path = copy_record(sample_data / PTBXL_500, tmp_path / "b")
    path.with_suffix(".dat").unlink()
    assert _reason(path.with_suffix(".hea")) == "bad_file:missing_signal_file"


def test_record_line_channel_count_disagrees_with_signal_lines(sample_data, tmp_path):
    path = _edit(copy_record(sample_data / PTBXL_500, tmp_path), "corrupt 12 ", "corrupt 999999999 ")
    assert _reason(path) == "header_mismatch:channels"


@pytest.mark.parametrize("path, reason", [("nothing_here.hea", "bad_file:no_such_file"),
                                          ("nothing_here.dat", "bad_file:no_such_file"),
                                          ("notes.txt", "bad_file:unknown_format")])
def test_missing_or_unknown_files(tmp_path, path, reason):
    (tmp_path / "notes.txt").write_text("not an ECG")
    assert _reason(tmp_path / path) == reason


def test_mangled_headers_only_ever_raise_rejection(sample_data, tmp_path):
    """wfdb raises ValueError, IndexError, KeyError, TypeError, OSError... on bad headers; each must come out typed."""
    rng = random.Random(1)
    tokens = ["", "abc", "0", "-1", "1e9", "212", "16x", "/", "(", "+", "999999999", "24", "nan", "1000/uV", "13"]
    reasons: set[str] = set()
    for source, ext in ((PTBXL_500, ".dat"), (GEORGIA, ".mat")):
        base = tmp_path / Path(source).name
        shutil.copy(sample_data / (source + ext), base.with_suffix(ext))
        original = (sample_data / (source + ".hea")).read_text().splitlines()
        for _ in range(100):
            lines = list(original)
            for _ in range(rng.randint(1, 3)):
                row = rng.randrange(13)
                words = lines[row].split(" ")
                words[rng.randrange(len(words))] = rng.choice(tokens)
                lines[row] = " ".join(words)
            base.with_suffix(".hea").write_text("\n".join(lines) + "\n")
            try:
                read_record(base)
            except Rejection as rejection:
                reasons.add(rejection.code)
    assert {"bad_file", "bad_fs", "header_mismatch", "unknown_lead"} <= reasons


def test_header_with_a_record_line_and_no_signal_lines_is_a_typed_mismatch(tmp_path):
    """wfdb leaves no signal-file list at all for such a header (found by sending it to the service)."""
    (tmp_path / "rec.hea").write_text("rec 12 500 5000\n")
    assert _reason(tmp_path / "rec.hea") == "header_mismatch:channels"


# --- CSV, NPY, NPZ -------------------------------------------------------------------------------------------------

@pytest.fixture()
def real(sample_data):
    return read_record(sample_data / PTBXL_500)


def test_csv_with_header_and_fs_comment(real, tmp_path):
    path = tmp_path / "ecg.csv"
    shuffled = [LEADS[i] for i in (1, 0, *range(2, 12))]                # column order does not matter
    table = real.signal[[LEADS.index(name) for name in shuffled]].T
    np.savetxt(path, table, delimiter=",", header="fs=500\n" + ",".join(shuffled), comments="", fmt="%.9g")
    path.write_text("# " + path.read_text())                               # "# fs=500" on the first line
    record = read_record(path)
    assert record.record_id == "ecg" and record.fs == 500 and record.metadata["format"] == "csv"
    np.testing.assert_allclose(record.signal, real.signal, atol=1e-6)


@pytest.mark.parametrize("transpose", [False, True])
def test_csv_without_header_either_orientation(real, tmp_path, transpose):
    path = tmp_path / "ecg.csv"
    np.savetxt(path, real.signal if transpose else real.signal.T, delimiter=";", fmt="%.9g")
    assert _reason(path) == "bad_fs:missing"
    np.testing.assert_allclose(read_record(path, fs=500).signal, real.signal, atol=1e-6)
    np.testing.assert_allclose(read_record(path, fs=500, lead_names=[n.upper() for n in LEADS]).signal,
                               real.signal, atol=1e-6)


def test_csv_written_by_pandas_with_index_and_aliases(real, tmp_path):
    path = tmp_path / "ecg.csv"
    names = ["Lead I", "lead_ii", "iii", "AVR", "avl", "aVF", *[f"C{i}" for i in range(1, 7)]]
    pd.DataFrame(real.signal.T.astype(np.float64), columns=names).to_csv(path)
    np.testing.assert_allclose(read_record(path, fs=500).signal, real.signal, atol=1e-6)


@pytest.mark.parametrize("content, reason", [
    ("# sampling_rate: fast\nI,II\n1,2\n", "bad_fs:non_numeric"),
    ("I,II\n1,x\n", "bad_file:non_numeric"),
    ("I,II\n1,2\n3\n", "bad_shape:ragged"),
    ("# only a comment\n", "bad_file:empty"),
    ("I,II\n", "bad_file:empty"),
    ("I,II,III\n1,2\n", "bad_shape:header"),
])
def test_bad_csv(tmp_path, content, reason):
    path = tmp_path / "bad.csv"
    path.write_text(content)
    assert _reason(path, fs=500) == reason


def test_npy_and_npz(real, tmp_path):
    np.save(tmp_path / "a.npy", real.signal.T)
    np.testing.assert_array_equal(read_record(tmp_path / "a.npy", fs=500).signal, real.signal)
    assert _reason(tmp_path / "a.npy") == "bad_fs:missing"
    np.savez(tmp_path / "b.npz", signal=real.signal[::-1], fs=500, lead_names=np.array(LEADS[::-1]))
    record = read_record(tmp_path / "b.npz")
    assert record.fs == 500 and record.metadata["format"] == "npz"
    np.testing.assert_array_equal(record.signal, real.signal)
    np.savez(tmp_path / "c.npz", data=real.signal)
    assert _reason(tmp_path / "c.npz", fs=500) == "bad_file:no_signal"
    np.save(tmp_path / "d.npy", np.array([{"signal": 1}], dtype=object))    # pickles are refused
    assert _reason(tmp_path / "d.npy", fs=500) == "bad_file:unreadable"


# --- in-memory arrays and lead names ------------------------------------------------------------------------------

def test_record_from_array_accepts_json_like_lists(real):
    record = record_from_array(real.signal.tolist(), 500, record_id="req-1", metadata={"source": "api"})
    np.testing.assert_array_equal(record.signal, real.signal)
    assert record.record_id == "req-1" and record.metadata["source"] == "api" and record.lead_names == LEADS


@pytest.mark.parametrize("signal, fs, names, reason", [
    ([[1.0, 2.0], [3.0]], 500, ["I", "II"], "bad_shape:ragged"),
    ([["a", "b"], ["c", "d"]], 500, ["I", "II"], "bad_file:non_numeric"),
    (np.zeros(5000), 500, None, "bad_shape:ndim"),
    (np.zeros((3, 5000)), 500, None, "bad_shape:leads"),
    (np.zeros((12, 5000)), "500", None, "bad_fs:non_numeric"),
    (np.zeros((12, 5000)), None, None, "bad_fs:missing"),
    (np.zeros((12, 5000)), 20_000, None, "bad_fs:out_of_range"),
    (np.zeros((12, 5000)), float("inf"), None, "bad_fs:out_of_range"),
])
def test_record_from_array_rejections(signal, fs, names, reason):
    with pytest.raises(Rejection) as info:
        record_from_array(signal, fs, names)
    assert info.value.reason == reason


@pytest.mark.parametrize("name, lead", [("AVR", "aVR"), ("avr", "aVR"), (" aVR ", "aVR"), ("LEAD_II", "II"),
                                        ("Lead III", "III"), ("c4", "V4"), ("v6", "V6"), ("vx", None),
                                        ("V4R", None), ("Z", None)])
def test_lead_aliases(name, lead):
    assert canonical_lead_name(name) == lead


@pytest.mark.parametrize("names, reason", [
    (["MLII", *LEADS[1:]], "unknown_lead:MLII"),
    (["-aVR", *LEADS[1:]], "unknown_lead:-aVR"),
    ([None, *LEADS[1:]], "unknown_lead:<unnamed>"),
    (["I", "ii", *LEADS[2:11], "II"], "bad_shape:duplicate:II"),
    (["II", *LEADS[2:], "vx"], "missing_lead:I"),
    (["I", "II", *LEADS[6:10], "vx", "vy"], "missing_lead:V5"),
])
def test_lead_rejections(names, reason):
    with pytest.raises(Rejection) as info:
        standardize_leads(np.zeros((len(names), 10), dtype=np.float32), names)
    assert info.value.reason == reason


def test_missing_lead_message_names_every_missing_lead():
    with pytest.raises(Rejection) as info:
        standardize_leads(np.zeros((6, 10), dtype=np.float32), ["I", "II", "V1", "V2", "V3", "V4"])
    assert info.value.reason == "missing_lead:V5" and "V5, V6" in info.value.message
    with pytest.raises(Rejection) as info:
        standardize_leads(np.zeros((7, 10), dtype=np.float32), ["I", *LEADS[6:]])
    assert info.value.reason == "missing_lead:II" and "II, III, aVR, aVL, aVF" in info.value.message


def test_unknown_content_with_any_suffix_is_refused(tmp_path):
    (tmp_path / "notes.xml").write_text("<notes>not an ECG</notes>")
    (tmp_path / "empty.dcm").write_bytes(b"")
    assert _reason(tmp_path / "notes.xml") == "bad_file:unknown_format"
    assert _reason(tmp_path / "empty.dcm") == "bad_file:empty"
