"""A generated corpus of hostile ECG inputs, for every door a file or body comes in by.

Shared by the reader fuzz (`ecgad.io.read_record`), the archive fuzz (``python -m jobs.score_archive``) and the
service fuzz (the HTTP bodies): each case is a small set of named files (``FuzzCase.files``, the first names the
record), so it can be written to a folder (`FuzzCase.write`) or sent as an upload or a body. Nothing large is
committed: everything is generated, the fixed cases (`fixed_cases`: bombs, lying headers, huge declared shapes,
absurd rates, the shapes of issue 13's reproduction) by hand, the rest by ``hypothesis`` strategies that mutate a
small valid record of each format (`structured_cases`), deterministically (``derandomize``), so a failure
reproduces by its case name.

    cases = corpus()                              # >= 300 cases, every format
    for case in cases:
        path = case.write(tmp_path / case.name)   # read_record(path, fs=case.fs) -> Record or Rejection
"""

from __future__ import annotations

import functools
import io
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import wfdb
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from ecgad.types import LEADS

#: The valid base record every mutation starts from: 12 leads, 10 s at 100 Hz (the shortest rate and length the
#: validator accepts, so an unharmed mutation still reaches the model), small enough for hundreds of copies.
BASE_FS = 100
BASE_SAMPLES = 1000

#: Values a header field or a rate may be replaced with: zero, negative, huge, not a number, not a float at all.
HOSTILE_NUMBERS = ("0", "-1", "-500", "1e-300", "1e300", "1e12", "10000000000000", "99999999999999999999999",
                   "nan", "inf", "-inf", "0x10", "abc", "", "1/0", "500/0", "1.5.5", "\x00", "٣")

#: Record and file names that have broken renderers, shells or path handling (kept legal on a POSIX file system:
#: no NUL or slash, at most 255 bytes; the service fuzz adds NUL and longer names to its upload names itself).
HOSTILE_NAMES = ("$\\frac{1}{2}$", "$x^{2^{2^{2^{2}}}}$", "$" * 40, "%s%n%x", "<img src=x onerror=alert(1)>",
                 "-rf", " leading space", "trailing dot.", "a" * 240, "é\u202eevil", "😀" * 30, "x.hea.npy",
                 "CON", "..", "...", "a\\b", "\r\nfake: header")

RECORD_SUFFIXES = (".hea", ".dat", ".csv", ".npy", ".npz", ".xml", ".dcm", ".scp", ".edf", ".mat", "")


@dataclass(frozen=True)
class FuzzCase:
    """One hostile input: ``files`` are ``(file name, content)``, the first the one that names the record; ``fs``
    the rate to pass along where a format carries none (NPY, header-less CSV), possibly absurd itself."""

    name: str
    family: str
    files: tuple[tuple[str, bytes], ...]
    fs: float | None = None

    def write(self, folder: Path, prefix: str = "") -> Path:
        """Write the files into ``folder`` (created) and return the path of the record's file. With ``prefix``,
        every file name starts with it, and the first file's references to the others (a WFDB header naming its
        ``.dat``) are rewritten to match, so many cases can share a folder (one archive source, fewer chunks)."""
        folder.mkdir(parents=True, exist_ok=True)
        (first_name, first), *others = self.files
        for file_name, _ in others:
            first = first.replace(file_name.encode(), f"{prefix}{file_name}".encode())
        for file_name, content in [(first_name, first), *others]:
            (folder / f"{prefix}{file_name}").write_bytes(content)
        return folder / f"{prefix}{first_name}"

    @property
    def size(self) -> int:
        return sum(len(content) for _, content in self.files)


# --- valid base records -----------------------------------------------------------------------------------------

def base_signal() -> np.ndarray:
    """A plausible ``(12, BASE_SAMPLES)`` float64 ECG in mV: a 72 bpm train of R waves on a slow baseline."""
    t = np.arange(BASE_SAMPLES) / BASE_FS
    beats = sum(np.exp(-(((t - r) / 0.02) ** 2)) for r in np.arange(0.4, 10, 60 / 72))
    leads = [(0.5 + 0.1 * i) * beats + 0.05 * np.sin(2 * np.pi * 0.3 * t + i) for i in range(len(LEADS))]
    return np.asarray(leads)


@functools.cache
def base_wfdb() -> tuple[tuple[str, bytes], ...]:
    """The base record as a WFDB format-16 record named ``rec`` (``rec.hea`` first, then ``rec.dat``)."""
    with tempfile.TemporaryDirectory() as folder:
        wfdb.wrsamp("rec", fs=BASE_FS, units=["mV"] * len(LEADS), sig_name=list(LEADS), p_signal=base_signal().T,
                    fmt=["16"] * len(LEADS), adc_gain=[200.0] * len(LEADS), baseline=[0] * len(LEADS),
                    write_dir=folder)
        return tuple((name, (Path(folder) / name).read_bytes()) for name in ("rec.hea", "rec.dat"))


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def npy_header(shape: tuple[int, ...], descr: str | list = "<f8", fortran: bool = False,
               version: tuple[int, int] = (1, 0)) -> bytes:
    """An NPY header declaring ``shape`` and ``descr`` whatever data follows (a lying header when little does),
    written by hand (the NPY format: magic, version, header length, a dict literal padded to 64 bytes) so that any
    declaration can be made."""
    text = repr({"descr": descr, "fortran_order": fortran, "shape": tuple(shape)}).encode("latin1")
    length_size = 2 if version == (1, 0) else 4
    prefix = 6 + 2 + length_size
    text += b" " * (-(prefix + len(text) + 1) % 64) + b"\n"
    length = len(text).to_bytes(length_size, "little")
    return b"\x93NUMPY" + bytes(version) + length + text


def npz_bytes(members: dict[str, bytes], compression: int = zipfile.ZIP_DEFLATED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression) as archive:
        for name, content in members.items():
            archive.writestr(name, content)
    return buffer.getvalue()


def npz_bomb(decoded_mib: int, shape: tuple[int, int] | None = None) -> bytes:
    """An NPZ whose ``signal.npy`` inflates to ``decoded_mib`` MiB of zeros (about 1 KiB compressed per MiB),
    written by streaming so the bomb is never whole in memory; its NPY header tells the truth (int8 of ``shape``,
    by default 12 leads wide)."""
    n_bytes = decoded_mib * 2**20
    header = npy_header(shape or (12, n_bytes // 12), "|i1")
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as archive:
        with archive.open("signal.npy", "w", force_zip64=True) as member:
            member.write(header)
            chunk = bytes(2**20)
            for _ in range(decoded_mib):
                member.write(chunk)
        archive.writestr("fs.npy", npy_bytes(np.array(500.0)))
    return buffer.getvalue()


def csv_bytes(signal: np.ndarray, fs: float | None = BASE_FS) -> bytes:
    head = f"# fs={fs:g}\n" if fs is not None else ""
    rows = "\n".join(",".join(f"{v:.4f}" for v in row) for row in signal.T)
    return (head + ",".join(LEADS) + "\n" + rows + "\n").encode()


# --- byte-level mutations ---------------------------------------------------------------------------------------

def flip_bits(data: bytes, positions: list[int]) -> bytes:
    out = bytearray(data)
    for position in positions:
        if out:
            out[position % len(out)] ^= 1 << (position % 8)
    return bytes(out)


def _mutate_bytes(draw: Callable, data: bytes) -> bytes:
    """Truncated, bit-flipped, spliced with random bytes, or extended with garbage."""
    how = draw(st.sampled_from(["truncate", "flip", "splice", "extend"]))
    if how == "truncate":
        return data[: draw(st.integers(0, max(len(data) - 1, 0)))]
    if how == "flip":
        return flip_bits(data, draw(st.lists(st.integers(0, 2**31), min_size=1, max_size=16)))
    if how == "splice":
        at = draw(st.integers(0, len(data)))
        return data[:at] + draw(st.binary(min_size=1, max_size=64)) + data[at + 1:]
    return data + draw(st.binary(min_size=1, max_size=4096))


# --- structured strategies, one per format ----------------------------------------------------------------------

@st.composite
def wfdb_header_cases(draw) -> tuple[tuple[str, bytes], ...]:
    """The base WFDB record with its header edited: a record-line or signal-line field replaced by a hostile
    number, a line dropped or repeated, ``sig_len`` removed, or the header's bytes mutated."""
    (hea_name, hea), dat = base_wfdb()
    lines = hea.decode().splitlines()
    how = draw(st.sampled_from(["record_field", "signal_field", "drop_line", "repeat_line", "no_sig_len", "bytes"]))
    if how == "record_field":
        tokens = lines[0].split()
        tokens[draw(st.integers(1, len(tokens) - 1))] = draw(st.sampled_from(HOSTILE_NUMBERS))
        lines[0] = " ".join(tokens)
    elif how == "signal_field":
        row = draw(st.integers(1, len(lines) - 1))
        tokens = lines[row].split()
        value = draw(st.sampled_from(HOSTILE_NUMBERS + ("16x100000000", "212", "8", "999", "16+9999999",
                                                        "200(99999999999)/uV", "0/mV")))
        tokens[draw(st.integers(0, len(tokens) - 1))] = value
        lines[row] = " ".join(tokens)
    elif how == "drop_line":
        del lines[draw(st.integers(0, len(lines) - 1))]
    elif how == "repeat_line":
        lines.extend([lines[draw(st.integers(1, len(lines) - 1))]] * draw(st.sampled_from([1, 2, 100, 5000])))
    elif how == "no_sig_len":        # the record line without its length: wfdb infers it from the .dat size
        lines[0] = " ".join(lines[0].split()[:3])
    text = ("\n".join(lines) + "\n").encode()
    if how == "bytes":
        text = _mutate_bytes(draw, hea)
    return (hea_name, text), dat


@st.composite
def wfdb_data_cases(draw) -> tuple[tuple[str, bytes], ...]:
    """The base WFDB record with its ``.dat`` truncated, bit-flipped, spliced, extended, emptied or missing."""
    hea, (dat_name, dat) = base_wfdb()
    how = draw(st.sampled_from(["mutate", "mutate", "mutate", "empty", "missing", "random"]))
    if how == "missing":
        return (hea,)
    if how == "empty":
        return hea, (dat_name, b"")
    if how == "random":
        return hea, (dat_name, draw(st.binary(min_size=1, max_size=4 * len(dat))))
    return hea, (dat_name, _mutate_bytes(draw, dat))


_DESCRS = ("<f8", "<f4", ">f4", "<f2", "<i2", "|i1", "|u1", "|b1", "<c16", "|O", "<U10", "|S4", "|V8", "<M8[s]",
           "<m8[s]", [("a", "<f4")], "<f16", "|V0", "|V2147483647")
_DIMENSIONS = st.one_of(st.integers(0, 20), st.sampled_from([12, 1000, 10**6, 10**9, 10**12, 2**62, -1]))


@st.composite
def npy_cases(draw) -> tuple[tuple[str, bytes], ...]:
    """An NPY: a header declaring any shape and dtype (huge, negative, 1-D to 4-D, object, strings) over whatever
    data follows (little or none: a lying header), or the base record's NPY with its bytes mutated."""
    if draw(st.booleans()):
        shape = tuple(draw(st.lists(_DIMENSIONS, min_size=0, max_size=4)))
        descr = draw(st.sampled_from(_DESCRS))
        version = draw(st.sampled_from([(1, 0), (2, 0), (3, 0)]))
        try:
            header = npy_header(shape, descr, draw(st.booleans()), version)
        except (ValueError, TypeError):
            header = npy_header(shape)
        data = header + draw(st.binary(max_size=2048))
    else:
        base = npy_bytes(base_signal().astype(draw(st.sampled_from(["<f8", "<f4", "<i2"]))))
        data = _mutate_bytes(draw, base)
    return (("rec.npy", data),)


@st.composite
def npz_cases(draw) -> tuple[tuple[str, bytes], ...]:
    """An NPZ: members missing, renamed, lying, of hostile rates and lead names, stored or deflated, or the
    base NPZ's bytes mutated."""
    signal = base_signal()
    members = {"signal.npy": npy_bytes(signal), "fs.npy": npy_bytes(np.array(float(BASE_FS))),
               "lead_names.npy": npy_bytes(np.array(LEADS))}
    how = draw(st.sampled_from(["drop", "lying_signal", "fs", "names", "bytes", "extra"]))
    if how == "drop":
        del members[draw(st.sampled_from(sorted(members)))]
    elif how == "lying_signal":
        shape = tuple(draw(st.lists(_DIMENSIONS, min_size=1, max_size=3)))
        members["signal.npy"] = npy_header(shape, draw(st.sampled_from(_DESCRS[:8]))) + draw(st.binary(max_size=512))
    elif how == "fs":
        value = draw(st.sampled_from([np.array(v) for v in (0.0, -1.0, np.nan, np.inf, 1e300, 1e-300, 50.0)]
                                     + [np.array("500"), np.zeros(1000), np.array([], dtype=float)]))
        members["fs.npy"] = npy_bytes(value)
    elif how == "names":
        names = draw(st.sampled_from([list(HOSTILE_NAMES[:12]), ["I"] * 12, [], ["x" * 10000] * 12]))
        members["lead_names.npy"] = npy_bytes(np.array(names))
    elif how == "extra":
        members[draw(st.sampled_from(["../evil.npy", "/abs.npy", "signal", "a" * 200 + ".npy"]))] = b"junk"
    data = npz_bytes(members, draw(st.sampled_from([zipfile.ZIP_DEFLATED, zipfile.ZIP_STORED])))
    if how == "bytes":
        data = _mutate_bytes(draw, data)
    return (("rec.npz", data),)


_CELLS = st.one_of(st.floats(allow_nan=True, allow_infinity=True).map(repr), st.sampled_from(HOSTILE_NUMBERS),
                   st.text(max_size=8))


@st.composite
def csv_cases(draw) -> tuple[tuple[str, bytes], ...]:
    """A CSV: absurd rate hints, random cells, ragged rows, huge row counts of one short column, long lines, NULs
    and invalid UTF-8, or the base CSV's bytes mutated."""
    how = draw(st.sampled_from(["hint", "cells", "ragged", "many_rows", "long_line", "bytes"]))
    base = csv_bytes(base_signal())
    if how == "hint":
        return (("rec.csv", base.replace(b"fs=100", f"fs={draw(st.sampled_from(HOSTILE_NUMBERS))}".encode())),)
    if how == "cells":
        rows = draw(st.lists(st.lists(_CELLS, min_size=1, max_size=14), min_size=1, max_size=30))
        text = "\n".join(draw(st.sampled_from([",", ";", "\t", " "])).join(row) for row in rows)
        return (("rec.csv", text.encode("utf-8", "surrogatepass")),)
    if how == "ragged":
        lines = base.decode().splitlines()
        at = draw(st.integers(2, len(lines) - 1))
        lines[at] = lines[at] + ",1.0" * draw(st.integers(1, 3))
        return (("rec.csv", "\n".join(lines).encode()),)
    if how == "many_rows":
        return (("rec.csv", b"# fs=1\nI\n" + b"0\n" * draw(st.sampled_from([10**4, 10**5, 4 * 10**5]))),)
    if how == "long_line":
        return (("rec.csv", b"0," * draw(st.sampled_from([10**5, 10**6])) + b"0\n"),)
    return (("rec.csv", _mutate_bytes(draw, base)),)


@st.composite
def random_cases(draw) -> tuple[tuple[str, bytes], ...]:
    """Random bytes under any record suffix, some behind a format's magic (so the hospital readers get them)."""
    suffix = draw(st.sampled_from(RECORD_SUFFIXES))
    magic = draw(st.sampled_from([b"", b"\x93NUMPY", b"PK\x03\x04", bytes(128) + b"DICM", bytes(16) + b"SCPECG",
                                  b"0       ", b"<?xml version='1.0'?><AnnotatedECG>", b"<RestingECG>",
                                  b"<restingecgdata>"]))
    return ((f"rec{suffix}", magic + draw(st.binary(max_size=4096))),)


def _case_strategies(seed_files: tuple[Path, ...]) -> dict[str, st.SearchStrategy]:
    strategies = {"wfdb_header": wfdb_header_cases(), "wfdb_data": wfdb_data_cases(), "npy": npy_cases(),
                  "npz": npz_cases(), "csv": csv_cases(), "random": random_cases()}
    if seed_files:
        strategies["hospital"] = hospital_cases(seed_files)
    return strategies


@st.composite
def hospital_cases(draw, seed_files: tuple[Path, ...]) -> tuple[tuple[str, bytes], ...]:
    """A real hospital-format file (DICOM, XML, SCP-ECG, EDF: the sample data's) truncated or bit-flipped."""
    seed = draw(st.sampled_from(seed_files))
    return ((f"rec{seed.suffix}", _mutate_bytes(draw, seed.read_bytes())),)


def structured_cases(per_family: int = 45, seed_files: tuple[Path, ...] = ()) -> list[FuzzCase]:
    """``per_family`` cases drawn from each format's strategy (and from ``seed_files``, real hospital-format files,
    if given), the same ones on every run (``derandomize``)."""
    cases: list[FuzzCase] = []
    for family, strategy in _case_strategies(tuple(seed_files)).items():
        drawn: list[tuple[tuple[str, bytes], ...]] = []

        @settings(max_examples=per_family, derandomize=True, database=None, phases=[Phase.generate],
                  suppress_health_check=list(HealthCheck), deadline=None)
        @given(strategy, st.sampled_from([None, BASE_FS, 0.0, -1.0, 1e-300, 1e300, float("nan"), 50.0]))
        def collect(files, fs):
            drawn.append((files, fs))

        collect()
        cases += [FuzzCase(f"{family}_{i:03d}", family, files, fs) for i, (files, fs) in enumerate(drawn)]
    return cases


# --- fixed cases: the reproductions of issue 13 and the extremes --------------------------------------------------

def fixed_cases(bomb_mib: int = 1024) -> list[FuzzCase]:
    """Hand-made extremes: NPZ bombs (one of ``bomb_mib`` MiB), NPY headers claiming (12, 10^12), a long int8
    record at 50 Hz (the 3.5 GB resampling case, made smaller), a ``.hea`` without ``sig_len`` and a missing
    ``.dat``, huge WFDB declarations, and the base record under hostile names."""
    hea, dat = base_wfdb()
    header_text = hea[1].decode()
    record_line, *signal_lines = header_text.splitlines()
    name, n_sig, fs, sig_len = record_line.split()[:4]

    def header(line0: str, lines: list[str] = signal_lines) -> tuple[str, bytes]:
        return "rec.hea", ("\n".join([line0, *lines]) + "\n").encode()

    cases = [
        FuzzCase("npz_bomb", "npz", (("bomb.npz", npz_bomb(bomb_mib)),)),
        FuzzCase("npz_bomb_small", "npz", (("bomb.npz", npz_bomb(80)),)),
        FuzzCase("npz_bomb_lying_npy", "npz", (("bomb.npz", npz_bomb(8, shape=(12, 10**12))),)),
        FuzzCase("npy_lying_header", "npy", (("lie.npy", npy_header((12, 10**12)) + bytes(1024)),), fs=500.0),
        FuzzCase("npy_lying_header_f4", "npy", (("lie.npy", npy_header((10**12, 12), "<f4") + bytes(64)),), 500.0),
        FuzzCase("npy_many_channels", "npy", (("wide.npy", npy_bytes(np.zeros((1000, 12), np.int8))),), 500.0),
        FuzzCase("npy_long_fs50", "npy", (("long.npy", npy_bytes(np.zeros((12, 700_000), np.int8))),), 50.0),
        FuzzCase("npy_fs_tiny", "npy", (("slow.npy", npy_bytes(base_signal())),), 1e-3),
        FuzzCase("npy_fs_huge", "npy", (("fast.npy", npy_bytes(base_signal())),), 1e12),
        FuzzCase("npy_pickle", "npy", (("obj.npy", npy_header((12, 4), "|O") + b"\x80\x04N."),), 500.0),
        FuzzCase("wfdb_no_sig_len", "wfdb_header", (header(f"{name} {n_sig} {fs}"), dat)),
        FuzzCase("wfdb_no_sig_len_no_dat", "wfdb_header", (header(f"{name} {n_sig} {fs}"),)),
        FuzzCase("wfdb_huge_sig_len", "wfdb_header", (header(f"{name} {n_sig} {fs} {10**12}"), dat)),
        FuzzCase("wfdb_huge_spf", "wfdb_header",
                 (header(record_line, [line.replace("16 ", "16x100000000 ", 1) for line in signal_lines]), dat)),
        FuzzCase("wfdb_many_channels", "wfdb_header",
                 (header(f"{name} {200} {fs} {sig_len}", (signal_lines * 17)[:200]), dat)),
        FuzzCase("wfdb_long_fs50", "wfdb_header", (header(f"{name} {n_sig} 50 {10**7}"), dat)),
        FuzzCase("csv_many_rows", "csv", (("rows.csv", b"# fs=500\n" + b"0,0,0,0,0,0,0,0,0,0,0,0\n" * 800_000),)),
    ]
    cases += [FuzzCase(f"hostile_name_{i:02d}", "name", ((f"{stem}.npz", npz_bytes(
        {"signal.npy": npy_bytes(base_signal()), "fs.npy": npy_bytes(np.array(float(BASE_FS)))})),))
        for i, stem in enumerate(HOSTILE_NAMES) if stem not in ("..", "...")]
    return cases


def corpus(per_family: int = 45, seed_files: tuple[Path, ...] = (), bomb_mib: int = 1024) -> list[FuzzCase]:
    """The whole corpus: `fixed_cases` then `structured_cases` (about 300 + 45 per seed family)."""
    return fixed_cases(bomb_mib) + structured_cases(per_family, seed_files)


def hospital_seed_files(sample_data: Path) -> tuple[Path, ...]:
    """The sample data's hospital-format files (``formats/*/*``, not their READMEs or licenses), as seeds."""
    return tuple(sorted(path for path in (sample_data / "formats").glob("*/*")
                        if path.suffix.lower() in (".dcm", ".xml", ".scp", ".edf") and path.is_file()))
