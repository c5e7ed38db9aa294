"""Hostile input at the readers (issue 13): limits checked from what a file declares before anything is allocated,
typed rejections for bombs and lying headers, no server path in a rejection, and the generated fuzz corpus
(`tests.fuzz_corpus`) read with bounded memory, every outcome a `Record` or a `Rejection`.
"""

from __future__ import annotations

import resource
import threading
from pathlib import Path

import numpy as np
import psutil
import pytest

from ecgad.io import read_record, record_from_array
from ecgad.limits import InputLimits
from ecgad.types import REJECTION_CODES, Record, Rejection
from tests.fuzz_corpus import (BASE_FS, FuzzCase, base_signal, base_wfdb, corpus, csv_bytes, hospital_seed_files,
                               npy_bytes, npy_header, npz_bomb, npz_bytes)

#: The most a process may grow (peak RSS over the RSS before) while reading the whole corpus, bombs included: a few
#: times the decoded-size limit (64 MiB by default), far below the gigabytes the bombs declare.
MEMORY_BOUND = 512 * 2**20


def _write(tmp_path: Path, name: str, content: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(content)
    return path


def _rejection(path: Path, **kwargs) -> Rejection:
    with pytest.raises(Rejection) as caught:
        read_record(path, **kwargs)
    return caught.value


class _PeakRss:
    """Peak RSS growth of this process over a block: sampled every few ms, and the kernel's high-water mark when
    the block raised it (a spike between samples)."""

    def __enter__(self) -> "_PeakRss":
        self.process = psutil.Process()
        self.before = self.process.memory_info().rss
        self.high_water_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        self.peak, self.done = self.before, threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self) -> None:
        while not self.done.wait(0.002):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def __exit__(self, *exc) -> None:
        self.done.set()
        self.thread.join()
        high_water = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        if high_water > self.high_water_before:
            self.peak = max(self.peak, high_water)
        self.growth = self.peak - self.before


# -- limits at each reader (finding 1) ---------------------------------------------------------------------------

def test_a_long_record_at_a_low_rate_is_too_long_before_resampling(tmp_path):
    """Issue 13's 3.5 GB case in small: int8 at 50 Hz is cheap to send, and 10x as many float64 once resampled."""
    path = _write(tmp_path, "long.npy", npy_bytes(np.zeros((12, 20_000), np.int8)))    # 400 s at 50 Hz
    assert _rejection(path, fs=50).code == "too_long"
    assert read_record(path, fs=50, limits=InputLimits(max_seconds=500)).signal.shape == (12, 20_000)


def test_every_reader_applies_the_limits_it_is_given(tmp_path):
    (hea_name, hea), (dat_name, dat) = base_wfdb()
    wfdb_path = FuzzCase("wfdb", "wfdb", ((hea_name, hea), (dat_name, dat))).write(tmp_path / "wfdb")
    files = {"wfdb": wfdb_path, "csv": _write(tmp_path, "a.csv", csv_bytes(base_signal())),
             "npy": _write(tmp_path, "a.npy", npy_bytes(base_signal())),
             "npz": _write(tmp_path, "a.npz", npz_bytes({"signal.npy": npy_bytes(base_signal()),
                                                        "fs.npy": npy_bytes(np.array(float(BASE_FS)))}))}
    fs = {"npy": BASE_FS}
    for kind, path in files.items():
        assert read_record(path, fs=fs.get(kind)).signal.shape[0] == 12, kind     # 10 s, 12 leads: within LIMITS
        assert _rejection(path, fs=fs.get(kind), limits=InputLimits(max_seconds=5)).code == "too_long", kind
        assert _rejection(path, fs=fs.get(kind), limits=InputLimits(max_channels=8)).code == "too_many_channels", kind
        assert _rejection(path, fs=fs.get(kind), limits=InputLimits(max_decoded_mb=0.01)).code == "too_large", kind
    with pytest.raises(Rejection, match="too_long"):
        record_from_array(base_signal(), BASE_FS, limits=InputLimits(max_seconds=5))


def test_wfdb_declarations_are_checked_before_wfdb_reads(tmp_path):
    hea, dat = base_wfdb()
    record_line, *signal_lines = hea[1].decode().splitlines()
    name, n_sig, fs, _ = record_line.split()[:4]

    def case(line0: str, lines: list[str]) -> Path:
        return FuzzCase("h", "wfdb", (("rec.hea", ("\n".join([line0, *lines]) + "\n").encode()), dat)).write(
            tmp_path / str(len(list(tmp_path.iterdir()))))

    assert _rejection(case(f"{name} {n_sig} {fs} {10**12}", signal_lines)).code == "too_large"
    assert _rejection(case(f"{name} 200 {fs} 1000", (signal_lines * 17)[:200])).code == "too_many_channels"
    assert _rejection(case(f"{name} {n_sig} {fs} 40000", signal_lines)).code == "too_long"     # 400 s
    spf = [line.replace("16 ", "16x100000 ", 1) for line in signal_lines]
    assert _rejection(case(record_line, spf)).code in ("too_large", "truncated")
    # no sig_len: wfdb would size the record from the .dat; the limit holds for the inferred length too
    no_length = case(f"{name} {n_sig} {fs}", signal_lines)
    assert read_record(no_length).signal.shape == (12, 1000)
    assert _rejection(no_length, limits=InputLimits(max_seconds=5)).code == "too_long"


def test_a_csv_stops_at_the_limit_instead_of_reading_on(tmp_path):
    """The limit is hit before the bad cell at the end: reading stopped early."""
    path = _write(tmp_path, "rows.csv", b"# fs=500\nI,II\n" + b"0.5,0.25\n" * 200_000 + b"x,y\n")
    rejection = _rejection(path, limits=InputLimits(max_decoded_mb=1))
    assert rejection.code == "too_large"
    line = _write(tmp_path, "line.csv", b"0," * 5_000_000 + b"0\n")
    assert _rejection(line, fs=500).reason == "too_large:line"


def test_npz_bomb_is_refused_from_the_zip_directory(tmp_path):
    """Issue 13's 1.34 GiB bomb: a 1 GiB member compressed to ~1 MiB; refused before it is inflated."""
    path = _write(tmp_path, "bomb.npz", npz_bomb(1024))
    with _PeakRss() as rss:
        rejection = _rejection(path)
    assert rejection.code == "too_large" and rejection.detail.startswith("signal")
    assert rss.growth < 64 * 2**20
    ratio = _write(tmp_path, "ratio.npz", npz_bomb(16, shape=(12, 16 * 2**20 // 12)))   # 16 MiB at ~1000:1
    assert _rejection(ratio).reason == "too_large:compression_ratio:signal"


def test_a_lying_npy_header_is_a_typed_rejection(tmp_path):
    huge = _write(tmp_path, "huge.npy", npy_header((12, 10**12)) + bytes(1024))
    assert _rejection(huge, fs=500).code == "too_large"                       # was a MemoryError (a 500)
    lying = _write(tmp_path, "lying.npy", npy_header((12, 5000)) + bytes(1024))
    assert _rejection(lying, fs=500).code == "truncated"
    inside = _write(tmp_path, "inside.npz", npz_bytes({"signal.npy": npy_header((12, 10**5), "<f4") + bytes(64)}))
    assert _rejection(inside, fs=500).code == "truncated"


def test_limits_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("ECGAD_MAX_SECONDS", "60")
    monkeypatch.setenv("ECGAD_MAX_CHANNELS", "16")
    monkeypatch.setenv("ECGAD_MAX_DECODED_MB", "8")
    monkeypatch.setenv("ECGAD_MAX_COMPRESSION_RATIO", "20")
    assert InputLimits.from_env() == InputLimits(max_seconds=60, max_channels=16, max_decoded_mb=8,
                                                 max_compression_ratio=20)


# -- no server path in a rejection (finding 8b) ------------------------------------------------------------------

@pytest.mark.parametrize("with_dat", [True, False])
def test_a_header_without_sig_len_names_no_folder(tmp_path, with_dat):
    hea, dat = base_wfdb()
    record_line, *signal_lines = hea[1].decode().splitlines()
    header = ("rec.hea", ("\n".join([" ".join(record_line.split()[:3]), *signal_lines]) + "\n").encode())
    bad_dat = (dat[0], dat[1][:-3])
    path = FuzzCase("h", "wfdb", (header, bad_dat) if with_dat else (header,)).write(tmp_path / "upload")
    rejection = _rejection(path)
    text = f"{rejection.reason} {rejection.message}"
    assert str(tmp_path) not in text and "/tmp" not in text
    assert rejection.code in REJECTION_CODES


# -- the fuzz corpus (issue 13, "must show" a) -------------------------------------------------------------------

@pytest.fixture(scope="module")
def fuzz_cases(sample_data) -> list[FuzzCase]:
    return corpus(seed_files=hospital_seed_files(sample_data))


def test_the_corpus_is_large_and_covers_every_format(fuzz_cases):
    families = {case.family for case in fuzz_cases}
    assert len(fuzz_cases) >= 300 and len({case.name for case in fuzz_cases}) == len(fuzz_cases)
    assert families >= {"wfdb_header", "wfdb_data", "npy", "npz", "csv", "random", "hospital", "name"}


def test_every_corpus_input_is_a_record_or_a_typed_rejection_in_bounded_memory(fuzz_cases, tmp_path):
    paths = [case.write(tmp_path / case.name) for case in fuzz_cases]
    outcomes, problems = {}, []
    with _PeakRss() as rss:
        for case, path in zip(fuzz_cases, paths):
            try:
                outcomes[case.name] = read_record(path, fs=case.fs)
            except Rejection as rejection:
                outcomes[case.name] = rejection
                if str(tmp_path) in f"{rejection.detail} {rejection.message}":
                    problems.append(f"{case.name}: rejection names the folder: {rejection.message}")
            except Exception as exc:  # the property under test: nothing but Rejection escapes a reader
                problems.append(f"{case.name}: {type(exc).__name__}: {exc}")
    assert problems == []
    assert all(isinstance(o, (Record, Rejection)) for o in outcomes.values())
    assert rss.growth < MEMORY_BOUND, f"peak RSS grew by {rss.growth / 2**20:.0f} MiB"
    for name in ("npz_bomb", "npy_lying_header", "npz_bomb_lying_npy", "wfdb_huge_sig_len", "csv_many_rows"):
        assert isinstance(outcomes[name], Rejection) and outcomes[name].code in ("too_large", "truncated"), name
    assert outcomes["npy_many_channels"].signal.shape == (12, 1000)     # (1000, 12) is samples x leads
    assert outcomes["wfdb_many_channels"].code == "too_many_channels"
