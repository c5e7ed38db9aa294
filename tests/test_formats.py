"""Hospital ECG formats (`ecgad.formats` through `ecgad.io.read_record`): every real sample file, the three files
of one ECG against each other, synthetic round trips through the writers, and the files that must be refused."""

from __future__ import annotations

import json
import random
import shutil
import tracemalloc
import warnings
from pathlib import Path

import numpy as np
import pytest

from ecgad.cli import main
from ecgad.formats import sniff_format
from ecgad.io import read_record
from ecgad.leads import canonical_lead_name
from ecgad.preprocess import prepare
from ecgad.inputs import list_record_files
from ecgad.synth import generate_ecg
from ecgad.types import LEADS, Record, Rejection
from ecgad.validate import validate

#: relative path -> (format, fs, samples, derived leads). Philips files lose their trailing calibration segment.
FILES: dict[str, tuple[str, float, int, list[str]]] = {
    "dicom/mortara_waveform_ecg.dcm": ("dicom", 1000, 10000, []),
    "dicom/ecgtoolkit_Example.dcm": ("dicom", 500, 5000, []),
    "hl7_aecg/example_aecg.xml": ("hl7_aecg", 500, 5000, []),
    "ge_muse_xml/example1.xml": ("ge_muse", 500, 5000, ["III", "aVR", "aVL", "aVF"]),
    "philips_xml/129DYPRG.XML": ("philips", 500, 5264, []),
    "philips_xml/3191723_ZZDEMOPTONLY_1-04_orig.xml": ("philips", 500, 5300, []),
    "scp_ecg/ecgtoolkit_Example.scp": ("scp_ecg", 500, 5000, []),
    "edf/contec_0000050.ECG.edf": ("edf", 800, 37855, []),
}
SAME_ECG = ("dicom/ecgtoolkit_Example.dcm", "hl7_aecg/example_aecg.xml", "scp_ecg/ecgtoolkit_Example.scp")
EDF = "edf/contec_0000050.ECG.edf"


@pytest.fixture(scope="session")
def formats(sample_data) -> Path:
    root = sample_data / "formats"
    if not root.is_dir():
        pytest.skip(f"no hospital-format sample files at {root}")
    return root


def _reason(path, **kwargs) -> str:
    with pytest.raises(Rejection) as info:
        read_record(path, **kwargs)
    return info.value.reason


def _qrs_amplitude(record: Record) -> float:
    """Median over 1 s pieces of lead II's peak-to-peak: about one QRS complex's size, in mV."""
    n = int(record.fs)
    lead_ii = record.signal[LEADS.index("II"), : record.n_samples // n * n]
    return float(np.median(np.ptp(lead_ii.reshape(-1, n), axis=1)))


# --- the real sample files ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", FILES)
def test_every_sample_file_reads(formats, name):
    fmt, fs, samples, derived = FILES[name]
    record = read_record(formats / name)
    assert record.metadata["format"] == fmt == sniff_format(formats / name)
    assert record.lead_names == LEADS and record.signal.dtype == np.float32
    assert record.fs == fs and record.signal.shape == (12, samples)
    assert record.metadata["derived_leads"] == derived and record.metadata["warnings"] == []
    assert 0.3 < _qrs_amplitude(record) < 4.0


@pytest.mark.parametrize("name", [n for n in FILES if n != "dicom/ecgtoolkit_Example.dcm"])
def test_samples_agree_with_an_independent_parser(formats, name):
    """ecgdatakit parses every format on its own; our readers must give its samples, in mV, lead by lead.
    (It turns the ECGToolkit DICOM's rhythm into NaN: that file declares padding value 0, an ordinary sample.)"""
    from ecgdatakit import FileParser

    record = read_record(formats / name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = FileParser.parse(formats / name)
    assert {lead.label for lead in reference.leads} >= {canonical_lead_name(n) for n in
                                                         record.metadata["source_lead_names"]}
    for lead in reference.leads:
        ours = record.signal[LEADS.index(lead.label)]
        np.testing.assert_allclose(ours, np.asarray(lead.samples)[: len(ours)], atol=1e-6, err_msg=lead.label)


def test_three_formats_of_one_ecg_give_one_signal_and_one_score(formats):
    import torch

    from ecgad.model import MCF, MCFConfig
    from ecgad.scoring import Scorer

    records = [read_record(formats / name) for name in SAME_ECG]
    for record in records[1:]:       # all three store 2.5 µV steps
        np.testing.assert_allclose(record.signal, records[0].signal, atol=1.25e-3)
    torch.manual_seed(0)
    scores = Scorer(MCF(MCFConfig.small()).eval()).score_records([validate(r) for r in records], with_maps=False)
    values = [s.pred_score for s in scores]
    np.testing.assert_allclose(values, values[0], rtol=1e-4)


def test_muse_derives_the_four_limb_leads(formats):
    record = read_record(formats / "ge_muse_xml/example1.xml")
    assert record.metadata["source_lead_names"] == ["I", "II", "V1", "V2", "V3", "V4", "V5", "V6"]
    lead = {name: record.signal[i] for i, name in enumerate(LEADS)}
    np.testing.assert_allclose(lead["III"], lead["II"] - lead["I"], atol=1e-6)
    np.testing.assert_allclose(lead["aVR"], -(lead["I"] + lead["II"]) / 2, atol=1e-6)


def test_edf_flat_chest_leads_get_the_validators_answer(formats, sample_data):
    record = read_record(formats / EDF)
    with pytest.raises(Rejection) as edf:
        validate(record)
    other = read_record(sample_data / "ptbxl/records500/06000/06000_hr")
    other.signal[6:] = 0.015                     # the same flat chest leads on any record
    with pytest.raises(Rejection) as flat:
        validate(other)
    assert edf.value.reason == flat.value.reason == "flat_lead:V1"


def test_philips_calibration_segment_is_dropped(formats):
    record = read_record(formats / "philips_xml/129DYPRG.XML")
    assert record.metadata["calibration_dropped"] == 5500 - 5264
    assert record.metadata["compression"] == "XLI" and record.metadata["version"] == "1.03"


def test_format_comes_from_the_content_not_the_name(formats, tmp_path):
    for name in FILES:
        copy = tmp_path / f"{Path(name).stem}.bin"
        shutil.copy(formats / name, copy)
        assert read_record(copy).metadata["format"] == FILES[name][0]


def test_list_record_files_takes_the_new_formats(formats, tmp_path):
    assert {p.relative_to(formats).as_posix() for p in list_record_files(formats)} == set(FILES)
    (tmp_path / "settings.xml").write_text("<config><a>1</a></config>")
    assert list_record_files(tmp_path) == []


@pytest.mark.parametrize("name", FILES)
def test_truncated_copies_are_rejected(formats, tmp_path, name):
    data = (formats / name).read_bytes()
    copy = tmp_path / Path(name).name
    copy.write_bytes(data[: len(data) // 2])
    assert _reason(copy) == "truncated"


def write_mixed_folder(formats: Path, sample_data: Path, folder: Path) -> dict[str, str]:
    """A folder of WFDB, CSV, NPY and every hospital format, plus a truncated copy of each hospital file and a
    non-ECG XML; returns the status each record (by file name, the WFDB one by its header) must get: ``ok`` or its rejection reason (the NPY file
    carries no rate: ``bad_fs:missing`` unless a default rate is given)."""
    base = sample_data / "ptbxl/records500/06000/06000_hr"
    for suffix in (".hea", ".dat"):
        shutil.copy(base.with_suffix(suffix), folder)
    real = read_record(base)
    np.save(folder / "array.npy", real.signal)
    np.savetxt(folder / "table.csv", real.signal.T, delimiter=",", header="fs=500\n" + ",".join(LEADS),
               comments="# ", fmt="%.6g")
    expected = {"06000_hr.hea": "ok", "array.npy": "bad_fs:missing", "table.csv": "ok"}
    for name in FILES:
        data = (formats / name).read_bytes()
        file_name = Path(name).name
        (folder / file_name).write_bytes(data)
        (folder / f"cut_{file_name}").write_bytes(data[: len(data) // 2])
        expected[file_name] = "flat_lead:V1" if name == EDF else "ok"
        expected[f"cut_{file_name}"] = "truncated"
    (folder / "settings.xml").write_text("<config/>")          # not an ECG: not listed
    return expected


def test_mixed_folder_lists_and_reads_every_file_with_the_right_status(formats, sample_data, tmp_path):
    """What `jobs.score_archive` and `jobs.preprocess` do per file: list the folder, read, validate."""
    expected = write_mixed_folder(formats, sample_data, tmp_path)
    statuses = {}
    for path in list_record_files(tmp_path):
        try:
            validate(read_record(path))
            statuses[path.name] = "ok"
        except Rejection as rejection:
            statuses[path.name] = rejection.reason
    assert statuses == expected


def test_uncompressed_philips_keeps_its_limb_leads(formats, tmp_path):
    """An uncompressed Philips file stores III, aVR, aVL, aVF as measured: no residual rebuild (that is XLI's)."""
    import base64
    import re

    source = formats / "philips_xml/3191723_ZZDEMOPTONLY_1-04_orig.xml"
    xli = read_record(source)
    counts = np.round(xli.signal / 5e-3).astype("<i2")           # 5 µV per count, the calibration already cut
    text = source.read_bytes().decode("utf-16")
    text = re.sub(r'compression="XLI"', 'compression="Uncompressed"', text)
    text = re.sub(r'durationperchannel="\d+"', f'durationperchannel="{counts.shape[1] * 2}"', text)
    start = text.index(">", text.index("<parsedwaveforms")) + 1
    end = text.index("</parsedwaveforms>")
    text = text[:start] + base64.b64encode(counts.tobytes()).decode() + text[end:]
    plain = tmp_path / "plain.xml"
    plain.write_bytes(text.encode("utf-16"))
    record = read_record(plain)
    assert record.metadata["compression"] == "Uncompressed"
    np.testing.assert_allclose(record.signal, xli.signal, atol=1e-6)


@pytest.mark.parametrize("name", FILES)
def test_cli_inspect(formats, capsys, name):
    code = main(["inspect", str(formats / name), "--json"])
    report = json.loads(capsys.readouterr().out)
    if name == EDF:
        assert code == 1 and report["reason"] == "flat_lead:V1"
    else:
        assert code == 0 and report["status"] == "ok" and report["n_beats"] > 0


# --- what is kept or refused explicitly -----------------------------------------------------------------------------

def _edit(source: Path, target: Path, old: str, new: str, count: int = 1) -> Path:
    text = source.read_text()
    assert old in text
    target.write_text(text.replace(old, new, count))
    return target


def test_median_beat_only_files_are_refused(formats, tmp_path):
    muse = _edit(formats / "ge_muse_xml/example1.xml", tmp_path / "muse.xml",
                 "<WaveformType>Rhythm</WaveformType>", "<WaveformType>Median</WaveformType>")
    assert _reason(muse) == "bad_file:median_beat_only"
    aecg = _edit(formats / "hl7_aecg/example_aecg.xml", tmp_path / "aecg.xml", 'code="RHYTHM"', 'code="OTHER"')
    assert _reason(aecg) == "bad_file:median_beat_only"


def test_pacemaker_spikes_flagged_by_the_device_warn(formats, tmp_path):
    aecg = _edit(formats / "hl7_aecg/example_aecg.xml", tmp_path / "paced.xml",
                 'code="MDC_ECG_WAVC_PWAVE"', 'code="MDC_ECG_WAVC_PACESPIKE"', 2)
    record = read_record(aecg)
    assert record.metadata["pacemaker_spikes"] == 2
    assert record.metadata["warnings"][0].startswith("pacemaker:")
    assert prepare(validate(record)).metadata["warnings"][0] == record.metadata["warnings"][0]  # on to Scores


def test_several_rhythm_series_score_the_first_and_warn(formats, tmp_path):
    source = formats / "ge_muse_xml/example1.xml"
    text = source.read_text()
    start, end = text.index("<Waveform>", text.index("<WaveformType>Rhythm") - 40), text.rindex("</Waveform>")
    doubled = tmp_path / "two.xml"
    doubled.write_text(text[:end + 11] + text[start:end + 11] + text[end + 11:])
    record = read_record(doubled)
    np.testing.assert_array_equal(record.signal, read_record(source).signal)
    assert record.metadata["warnings"][0].startswith("several_rhythm_series:")


def test_missing_leads_are_named(tmp_path):
    ecg = generate_ecg(3)
    path = _write_dicom(tmp_path / "limb.dcm", ecg.signal[:6], ecg.fs, LEADS[:6])
    with pytest.raises(Rejection) as info:
        read_record(path)
    assert info.value.reason == "missing_lead:V1" and "V1, V2, V3, V4, V5, V6" in info.value.message


_BOMB = """<?xml version="1.0"?>
<!DOCTYPE AnnotatedECG [<!ENTITY a "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa">
{}]>
<AnnotatedECG xmlns="urn:hl7-org:v3">&z;</AnnotatedECG>"""
_XXE = """<?xml version="1.0"?>
<!DOCTYPE RestingECG [<!ENTITY secret SYSTEM "file:///etc/passwd">]>
<RestingECG><MuseInfo>&secret;</MuseInfo></RestingECG>"""


def test_xml_bomb_and_external_entity_are_refused_in_bounded_memory(tmp_path):
    levels, previous = [], "a"
    for name in "bcdefghijklmnopqrstuvwxyz":     # 50 x 10^24 characters once expanded
        levels.append(f'<!ENTITY {name} "{("&" + previous + ";") * 10}">')
        previous = name
    bomb = tmp_path / "bomb.xml"
    bomb.write_text(_BOMB.format("\n".join(levels)))
    xxe = tmp_path / "xxe.xml"
    xxe.write_text(_XXE)
    tracemalloc.start()
    try:
        assert _reason(bomb) == "bad_file:xml_entities"
        assert _reason(xxe) == "bad_file:xml_entities"
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 20 * 2**20


def test_scp_sample_counts_are_bounded_before_decoding(formats, monkeypatch):
    """Section 3 declares each lead's sample range; the decoder would allocate it whatever it is."""
    import ecgad.formats.scp as scp

    monkeypatch.setattr(scp, "MAX_SAMPLES_PER_LEAD", 4999)
    assert _reason(formats / "scp_ecg/ecgtoolkit_Example.scp") == "too_large"


def test_damaged_files_only_ever_raise_rejection(formats, tmp_path):
    """Random byte changes (more of them in the headers) give a typed rejection or a record, never a crash."""
    rng = random.Random(7)
    for name in FILES:
        data = (formats / name).read_bytes()
        for _ in range(6):
            damaged = bytearray(data)
            for _ in range(rng.randint(1, 8)):
                damaged[rng.randrange(min(len(data), 2048) if rng.random() < 0.5 else len(data))] = rng.randrange(256)
            path = tmp_path / Path(name).name
            path.write_bytes(bytes(damaged))
            try:
                read_record(path)
            except Rejection:
                pass


# --- synthetic round trips through the writers ----------------------------------------------------------------------

def _write_dicom(path: Path, signal: np.ndarray, fs: float, names, groups: int = 1) -> Path:
    """``signal`` (leads, samples) mV as a 12-lead ECG Waveform Storage file, 1 µV per count, SCPECG lead codes."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    codes = {"I": 1, "II": 2, "V1": 3, "V2": 4, "V3": 5, "V4": 6, "V5": 7, "V6": 8, "III": 61, "aVR": 62, "aVL": 63,
             "aVF": 64}
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.9.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "ECG"
    counts = np.round(np.asarray(signal, dtype=np.float64) * 1000).astype("<i2")   # 1 µV per count
    sequence = []
    for _ in range(groups):
        group = Dataset()
        group.MultiplexGroupLabel, group.WaveformOriginality = "RHYTHM", "ORIGINAL"
        group.NumberOfWaveformChannels, group.NumberOfWaveformSamples = counts.shape
        group.SamplingFrequency = fs
        group.WaveformBitsAllocated, group.WaveformSampleInterpretation = 16, "SS"
        channels = []
        for name in names:
            channel, source, unit = Dataset(), Dataset(), Dataset()
            source.CodeValue, source.CodingSchemeDesignator = f"5.6.3-9-{codes[name]}", "SCPECG"
            source.CodeMeaning = f"Lead {name}"
            unit.CodeValue, unit.CodingSchemeDesignator, unit.CodeMeaning = "uV", "UCUM", "microvolt"
            channel.ChannelSourceSequence, channel.ChannelSensitivityUnitsSequence = [source], [unit]
            channel.ChannelSensitivity, channel.ChannelSensitivityCorrectionFactor = 1, 1
            channel.ChannelBaseline, channel.WaveformBitsStored = 0, 16
            channels.append(channel)
        group.ChannelDefinitionSequence = channels
        group.WaveformData = counts.T.tobytes()
        sequence.append(group)
    ds.WaveformSequence = sequence
    ds.save_as(path, enforce_file_format=True)
    return path


def test_synthetic_ecg_round_trips_through_dicom(tmp_path):
    ecg = generate_ecg(1)
    record = read_record(_write_dicom(tmp_path / "synth.dcm", ecg.signal, ecg.fs, LEADS))
    assert record.fs == ecg.fs and record.metadata["warnings"] == []
    np.testing.assert_allclose(record.signal, ecg.signal, atol=1e-3)     # 1 µV


def test_dicom_with_several_rhythm_groups_reads_the_first_and_warns(tmp_path):
    ecg = generate_ecg(2)
    record = read_record(_write_dicom(tmp_path / "two.dcm", ecg.signal, ecg.fs, LEADS, groups=2))
    assert record.metadata["warnings"][0].startswith("several_rhythm_series:")


def test_synthetic_ecg_round_trips_through_edf(tmp_path):
    from edfio import Edf, EdfAnnotation, EdfSignal

    ecg = generate_ecg(4)
    signals = [EdfSignal(ecg.signal[i].astype(np.float64) * 1000, sampling_frequency=ecg.fs, label=f"ECG {name}",
                         physical_dimension="uV", physical_range=(-5000, 5000)) for i, name in enumerate(LEADS)]
    signals.append(EdfSignal(np.zeros(int(ecg.fs * 10)), sampling_frequency=ecg.fs, label="C3"))  # an EEG channel
    path = tmp_path / "synth.edf"
    Edf(signals, annotations=[EdfAnnotation(1.0, None, "Pacemaker spike")]).write(path)
    record = read_record(path)
    assert record.fs == ecg.fs and record.metadata["ignored_channels"] == ["C3"]
    np.testing.assert_allclose(record.signal, ecg.signal, atol=1e-3)     # 1 µV
    assert record.metadata["pacemaker_spikes"] == 1
