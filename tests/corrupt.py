"""Corrupted copies of a real WFDB record, written into a temporary folder, for tests of every layer that must
reject bad input with a typed reason (readers here; the service's 422 bodies and the batch jobs' status rows).

Each corruption is a function ``(src, out_dir) -> Path``: ``src`` is a real record (extension-less WFDB path,
e.g. ``sample_data / "ptbxl/records500/06000/06000_hr"``), the result is the path to hand to ``read_record``.
Signal-level corruptions are written with ``wfdb.wrsamp`` so the header (checksums included) is consistent and only
the intended defect remains; file-level ones then damage the written files. `CORRUPTIONS` maps each name to its
function and the rejection reason ``read_record`` + ``validate`` must give:

    for name, case in CORRUPTIONS.items():
        path = case.write(src, tmp_path / name)    # expect Rejection with .reason == case.reason
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import wfdb

_NAME = "corrupt"
_FLAT_LEAD = "V3"
_SATURATED_LEAD = "V2"
_NAN_LEAD = "aVL"
_INVALID_16 = -32768     # WFDB format 16 stores a missing sample (read back as NaN) as this value


def _read(src: Path) -> wfdb.Record:
    return wfdb.rdrecord(str(src), physical=False)


def _write(rec: wfdb.Record, out_dir: Path, d_signal: np.ndarray, sig_name: list[str] | None = None,
           channels: list[int] | None = None) -> Path:
    """Write ``d_signal`` (samples, channels; digital units) as a format-16 record named like the source's
    ``channels`` (all by default), with the source's rate, gains and baselines. Returns the extension-less path."""
    channels = list(range(d_signal.shape[1])) if channels is None else channels
    out_dir.mkdir(parents=True, exist_ok=True)
    wfdb.wrsamp(_NAME, fs=rec.fs, units=[rec.units[c] for c in channels],
                sig_name=sig_name or [rec.sig_name[c] for c in channels],
                d_signal=np.ascontiguousarray(d_signal, dtype=np.int64), fmt=["16"] * len(channels),
                adc_gain=[rec.adc_gain[c] for c in channels], baseline=[rec.baseline[c] for c in channels],
                write_dir=str(out_dir))
    return out_dir / _NAME


def _lead_index(rec: wfdb.Record, lead: str) -> int:
    return [name.lower() for name in rec.sig_name].index(lead.lower())


def copy_record(src: Path, out_dir: Path) -> Path:
    """An intact copy (format 16), the base of the file-level corruptions and a control for them."""
    rec = _read(src)
    return _write(rec, out_dir, rec.d_signal)


def nan_samples(src: Path, out_dir: Path) -> Path:
    """A second of lead aVL stored as WFDB's missing-sample value, which reads back as NaN."""
    rec = _read(src)
    d = rec.d_signal.copy()
    d[: int(rec.fs), _lead_index(rec, _NAN_LEAD)] = _INVALID_16
    return _write(rec, out_dir, d)


def flat_lead(src: Path, out_dir: Path) -> Path:
    """Lead V3 constant at its baseline (an unplugged electrode)."""
    rec = _read(src)
    d = rec.d_signal.copy()
    lead = _lead_index(rec, _FLAT_LEAD)
    d[:, lead] = rec.baseline[lead]
    return _write(rec, out_dir, d)


def saturated_lead(src: Path, out_dir: Path) -> Path:
    """Lead V2 clipped at its 75th percentile, so a quarter of its samples sit at the rail."""
    rec = _read(src)
    d = rec.d_signal.copy()
    lead = _lead_index(rec, _SATURATED_LEAD)
    d[:, lead] = np.minimum(d[:, lead], np.percentile(d[:, lead], 75).astype(np.int64))
    return _write(rec, out_dir, d)


def short_record(src: Path, out_dir: Path) -> Path:
    """Only the first 5 s."""
    rec = _read(src)
    return _write(rec, out_dir, rec.d_signal[: int(5 * rec.fs)])


def single_lead(src: Path, out_dir: Path) -> Path:
    """Lead II alone, as a one-lead monitor would export it."""
    rec = _read(src)
    lead = _lead_index(rec, "II")
    return _write(rec, out_dir, rec.d_signal[:, [lead]], channels=[lead])


def unknown_channels(src: Path, out_dir: Path) -> Path:
    """Fifteen channels named ``ch1``..``ch15`` (the 12 leads plus three copies), none a known lead name."""
    rec = _read(src)
    channels = list(range(rec.n_sig)) + [0, 1, 2]
    return _write(rec, out_dir, rec.d_signal[:, channels], sig_name=[f"ch{i + 1}" for i in range(len(channels))],
                  channels=channels)


def limb_leads_i_ii_only(src: Path, out_dir: Path) -> Path:
    """Of the limb leads only I and II, plus V1-V6 (not a corruption: III, aVR, aVL, aVF must be derived)."""
    rec = _read(src)
    channels = [_lead_index(rec, lead) for lead in ("I", "II", "V1", "V2", "V3", "V4", "V5", "V6")]
    return _write(rec, out_dir, rec.d_signal[:, channels], channels=channels)


def _edit_header(path: Path, edit: Callable[[list[str]], list[str]]) -> Path:
    header = path.with_suffix(".hea")
    header.write_text("\n".join(edit(header.read_text().splitlines())) + "\n")
    return path


def truncated_dat(src: Path, out_dir: Path) -> Path:
    """The ``.dat`` cut to an odd byte count at 60 % of its size, as an interrupted copy leaves it."""
    path = copy_record(src, out_dir)
    dat = path.with_suffix(".dat")
    data = dat.read_bytes()
    dat.write_bytes(data[: int(len(data) * 0.6) | 1])
    return path


def extra_channel_in_header(src: Path, out_dir: Path) -> Path:
    """The header declares a 13th channel (a repeated V6 line) the ``.dat`` does not hold."""
    def edit(lines: list[str]) -> list[str]:
        name, n_sig, *rest = lines[0].split()
        return [" ".join([name, str(int(n_sig) + 1), *rest]), *lines[1:], lines[int(n_sig)]]
    return _edit_header(copy_record(src, out_dir), edit)


def bad_checksum(src: Path, out_dir: Path) -> Path:
    """One sample of lead I changed in the ``.dat`` after the header's checksums were written."""
    path = copy_record(src, out_dir)
    dat = path.with_suffix(".dat")
    data = bytearray(dat.read_bytes())
    data[0] ^= 0x01
    dat.write_bytes(bytes(data))
    return path


def non_numeric_fs(src: Path, out_dir: Path) -> Path:
    """The header's rate replaced by ``abc`` (``wfdb`` alone would silently read it as 250 Hz)."""
    def edit(lines: list[str]) -> list[str]:
        tokens = lines[0].split()
        return [" ".join([*tokens[:2], "abc", *tokens[3:]]), *lines[1:]]
    return _edit_header(copy_record(src, out_dir), edit)


def empty_file(src: Path, out_dir: Path) -> Path:
    """A zero-byte ``.hea`` (``src`` unused; the signature matches the other corruptions)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{_NAME}.hea"
    path.write_bytes(b"")
    return path


def random_bytes(src: Path, out_dir: Path, suffix: str = ".hea") -> Path:
    """4 KiB of (seeded) random bytes named like an ECG file with ``suffix`` (``.hea``, ``.csv``, ``.npy``, ...)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{_NAME}{suffix}"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    return path


@dataclass(frozen=True)
class Corruption:
    write: Callable[[Path, Path], Path]
    reason: str                    # the expected ``Rejection.reason``


CORRUPTIONS: dict[str, Corruption] = {
    "nan": Corruption(nan_samples, "nan"),
    "flat_lead": Corruption(flat_lead, f"flat_lead:{_FLAT_LEAD}"),
    "saturated_lead": Corruption(saturated_lead, f"saturated_lead:{_SATURATED_LEAD}"),
    "truncated_dat": Corruption(truncated_dat, "truncated"),
    "extra_channel_in_header": Corruption(extra_channel_in_header, "header_mismatch:channels"),
    "bad_checksum": Corruption(bad_checksum, "header_mismatch:checksum"),
    "single_lead": Corruption(single_lead, "missing_lead:I"),
    "unknown_channels": Corruption(unknown_channels, "unknown_lead:ch1"),
    "short_record": Corruption(short_record, "too_short"),
    "non_numeric_fs": Corruption(non_numeric_fs, "bad_fs:non_numeric"),
    "empty_file": Corruption(empty_file, "bad_file:empty"),
    "random_bytes": Corruption(random_bytes, "bad_file:header"),
}
