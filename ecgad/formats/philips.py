"""Philips PageWriter / IntelliSpace XML (``restingecgdata``, SierraECG 1.03 and PhilipsECG 1.04.x, UTF-8 or
UTF-16), parsed with the safe XML parser; XLI-compressed waveforms decoded by ``ecgdatakit``'s XLI codec.

``parsedwaveforms`` holds all leads, base64, either plain int16 (lead after lead, ``durationperchannel`` ms each)
or XLI (LZW + delta chunks, one per lead). In XLI data, III, aVR, aVL and aVF are stored as residuals from I and
II and rebuilt here exactly as the device encodes them. Amplitudes are ``resolution`` µV per unit. The
representative beats (``repbeats``) are never read as the rhythm; ``pacepulses`` lists device-detected pacemaker
pulses. (``sierraecg``, the reference implementation, decodes the same samples 3-8 times slower, and its
``read_file`` also rebuilds the limb leads of uncompressed files, where they are stored as measured.)

PageWriters end the waveform with a calibration segment: every lead flat, then a 1 mV square pulse (in the
sample files, the last 0.4-0.5 s of 11 s). Scored, it would look like a gross anomaly, so the trailing run of
samples where all leads are identical (never the case in a recorded ECG, where aVR = -(I + II) / 2) is dropped
when it holds the pulse; ``metadata["calibration_dropped"]`` says how many samples went.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np

from ecgad.formats.common import Decoded, check_declared_bytes, decode_base64, median_beat_only
from ecgad.formats.safe_xml import parse_xml
from ecgad.types import Rejection

_LIMB_ORDER = ["I", "II", "III", "aVR", "aVL", "aVF"]


def read(path: Path) -> Decoded:
    root = parse_xml(path)
    parsed = root.findall(".//parsedwaveforms")
    if not parsed:
        if root.find(".//repbeats") is not None:
            raise median_beat_only("Philips repbeats")
        raise Rejection("bad_file", "no_waveform", f"{path.name}: no parsedwaveforms element")
    waveforms = parsed[0]
    characteristics = root.find(".//signalcharacteristics")
    fs = _number(waveforms.get("samplespersecond") or _text(characteristics, "samplingrate"), "sampling rate", path)
    resolution_uv = _number(waveforms.get("resolution") or _text(characteristics, "resolution")
                            or _text(characteristics, "signalresolution"), "resolution", path)
    n_leads = int(_number(waveforms.get("numberofleads") or _text(characteristics, "numberchannelsallocated"),
                          "number of leads", path))
    names = (waveforms.get("leadlabels") or " ".join(_LIMB_ORDER + [f"V{i}" for i in range(1, 7)])).split()[:n_leads]
    samples = round(_number(waveforms.get("durationperchannel"), "durationperchannel", path) * fs / 1000)
    if waveforms.get("dataencoding", "Base64") != "Base64":
        raise Rejection("bad_file", "encoding", f"{path.name}: waveform encoding {waveforms.get('dataencoding')!r}")
    data = decode_base64(waveforms.text, f"{path.name} parsedwaveforms")
    compression = waveforms.get("compressmethod") or waveforms.get("compression") or "Uncompressed"
    if compression == "XLI":
        counts = _xli_decode(data, names, samples, path)
    elif compression == "Uncompressed":
        check_declared_bytes(len(data), 2 * n_leads * samples, path.name)
        counts = np.frombuffer(data[:2 * n_leads * samples], dtype="<i2").reshape(n_leads, samples).astype(np.int64)
    else:
        raise Rejection("bad_file", "compression", f"{path.name}: waveform compression {compression!r}")
    counts, dropped = _drop_calibration(counts)
    decoded = Decoded(counts * resolution_uv * 1e-3, fs, list(names),
                      {"format": "philips", "version": root.findtext(".//documentversion", ""),
                       "compression": compression, "calibration_dropped": dropped})
    decoded.warn_several_series(len(parsed))
    pulses = sum(len((e.text or "").split()) for e in root.iter("pacepulses"))
    decoded.warn_pacemaker(pulses, "Philips pacepulses")
    return decoded


def _xli_decode(data: bytes, names: list[str], samples: int, path: Path) -> np.ndarray:
    """``(leads, samples)`` int64 counts from XLI chunks, limb leads rebuilt from their residuals."""
    from ecgdatakit import ECGDataKitError
    from ecgdatakit.parsing.codecs.xli import xli_decode

    try:
        chunks = xli_decode(data)
    except (ECGDataKitError, ValueError, IndexError, KeyError, OverflowError) as exc:
        raise Rejection("bad_file", "xli", f"{path.name}: corrupt XLI waveform data: {exc}") from None
    if len(chunks) < len(names):    # 1.03 files may carry more chunks than leads (unused channels)
        raise Rejection("truncated", "", f"{path.name}: {len(chunks)} XLI chunks for {len(names)} leads")
    chunks = chunks[:len(names)]
    short = min(len(chunk) for chunk in chunks)
    if short < samples:
        raise Rejection("truncated", "", f"{path.name}: a lead decodes to {short} samples, {samples} declared")
    counts = np.stack([np.asarray(chunk[:samples], dtype=np.int64) for chunk in chunks])
    if names[:6] == _LIMB_ORDER:
        lead_i, lead_ii = counts[0], counts[1]
        counts[2] = lead_ii - lead_i - counts[2]
        counts[3] = -counts[3] - (lead_i + lead_ii) // 2
        counts[4] = (lead_i - counts[2]) // 2 - counts[4]
        counts[5] = (lead_ii + counts[2]) // 2 - counts[5]
    return counts


def _drop_calibration(counts: np.ndarray) -> tuple[np.ndarray, int]:
    """``counts`` without its trailing calibration segment (all leads equal, not all zero), and its length."""
    same = np.all(counts == counts[:1], axis=0)
    differs = np.flatnonzero(~same)
    end = int(differs[-1]) + 1 if differs.size else 0
    if end == counts.shape[1] or not counts[:, end:].any():
        return counts, 0
    return counts[:, :end], counts.shape[1] - end


def _text(element: ET.Element | None, tag: str) -> str | None:
    return element.findtext(tag) if element is not None else None


def _number(text: str | None, what: str, path: Path) -> float:
    try:
        return float(text)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise Rejection("bad_file", "header", f"{path.name}: {what} is {text!r}, not a number") from None
