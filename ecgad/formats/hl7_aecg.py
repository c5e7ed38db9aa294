"""HL7 aECG (HL7 v3 Annotated ECG, the FDA's format), read by hand with the safe XML parser.

No maintained Python library reads aECG without heavy dependencies, and the waveform part is small: the first
``series`` coded ``RHYTHM`` holds a ``sequenceSet`` whose ``TIME_*`` sequence gives the sample increment (the rate)
and whose ``MDC_ECG_LEAD_*`` sequences hold ``origin + scale x digits`` (units from the ``PQ`` values). The
representative beat lives in ``derivation/derivedSeries`` and is never read as the rhythm. Annotations whose code
mentions ``PACE`` (e.g. ``MDC_ECG_WAVC_PACESPIKE``) are device-flagged pacemaker spikes.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from array import array
from pathlib import Path

import numpy as np

from ecgad.formats.common import Decoded, median_beat_only, stack_leads, unit_to_mv
from ecgad.formats.safe_xml import parse_xml
from ecgad.limits import LIMITS, InputLimits
from ecgad.types import Rejection

_LEAD_PREFIX = "MDC_ECG_LEAD_"
_SECONDS = {"s": 1.0, "ms": 1e-3, "us": 1e-6}
_TOKEN = re.compile(r"\S+")


def read(path: Path, limits: InputLimits = LIMITS) -> Decoded:
    root = parse_xml(path)
    rhythm = [s for s in root.findall("component/series") if _code(s) in ("RHYTHM", "")]
    if not rhythm:
        if root.find(".//derivedSeries") is not None:
            raise median_beat_only("HL7 aECG derivedSeries")
        raise Rejection("bad_file", "no_waveform", f"{path.name}: no rhythm series")
    sets = rhythm[0].findall("component/sequenceSet")
    if not sets:
        raise Rejection("bad_file", "no_waveform", f"{path.name}: the rhythm series has no sequenceSet")
    sequences = sets[0].findall("component/sequence")
    fs = _rate([seq for seq in sequences if _code(seq).startswith("TIME_")], path)
    names, leads = [], []
    for seq in sequences:
        code = _code(seq)
        if code.startswith(_LEAD_PREFIX):
            names.append(code[len(_LEAD_PREFIX):])
            leads.append(_lead_mv(seq, path, limits))
    if not leads:
        raise Rejection("missing_lead", "I", f"{path.name}: the rhythm series holds no MDC_ECG_LEAD_* sequence")
    decoded = Decoded(stack_leads(leads, path.name), fs, names, {"format": "hl7_aecg"})
    decoded.warn_several_series(len(rhythm) + len(sets) - 1)
    paced = [a for a in root.iter("annotation") if "PACE" in _code(a.find("value"))]
    decoded.warn_pacemaker(len(paced), "aECG annotations")
    return decoded


def _code(element: ET.Element | None) -> str:
    """The ``code`` attribute of an element's ``code`` child (or of a ``value`` element itself)."""
    if element is not None and element.tag != "value":
        element = element.find("code")
    return element.get("code", "") if element is not None else ""


def _rate(time_sequences: list[ET.Element], path: Path) -> float:
    increment = time_sequences[0].find("value/increment") if time_sequences else None
    if increment is None:
        raise Rejection("bad_fs", "missing", f"{path.name}: no TIME sequence increment")
    try:
        seconds = float(increment.get("value", "")) * _SECONDS[increment.get("unit", "s")]
    except (ValueError, KeyError):
        raise Rejection("bad_fs", "non_numeric", f"{path.name}: time increment {increment.attrib}") from None
    if seconds <= 0:
        raise Rejection("bad_fs", "out_of_range", f"{path.name}: time increment {seconds} s")
    return 1.0 / seconds


def _lead_mv(sequence: ET.Element, path: Path, limits: InputLimits) -> np.ndarray:
    """One lead's ``origin + scale x digits`` in mV. The digits are converted one by one into 8-byte floats (a
    list of Python strings would cost ~60 bytes a sample), after checking against ``limits`` the most samples the
    text can hold (one character and one separator each)."""
    value = sequence.find("value")
    origin, scale, digits = (value.find(tag) if value is not None else None for tag in ("origin", "scale", "digits"))
    if scale is None or digits is None:
        raise Rejection("bad_file", "no_samples", f"{path.name}: lead {_code(sequence)} has no scale or digits")
    try:
        text = digits.text or ""
        limits.check_bytes((len(text) + 1) // 2 * 8)
        samples = np.frombuffer(array("d", map(float, (m.group() for m in _TOKEN.finditer(text)))), np.float64)
        factor = float(scale.get("value", "")) * unit_to_mv(scale.get("unit"))
        offset = 0.0 if origin is None else float(origin.get("value", "0")) * unit_to_mv(
            origin.get("unit") or scale.get("unit"))       # an origin without unit is in the scale's
    except ValueError:
        raise Rejection("bad_file", "non_numeric", f"{path.name}: lead {_code(sequence)} is not numeric") from None
    return offset + factor * samples
