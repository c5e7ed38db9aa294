"""GE MUSE XML (``RestingECG``), read by hand with the safe XML parser.

The format is plain: each ``Waveform`` (``WaveformType`` ``Rhythm`` or ``Median``) has a rate
(``SampleBase x 10^SampleExponent``) and one ``LeadData`` per stored lead: base64 little-endian int16 samples
times ``LeadAmplitudeUnitsPerBit`` (in ``LeadAmplitudeUnits``), with declared sample and byte counts and a CRC-32.
MUSE usually stores the 8 independent leads (I, II, V1-V6); `ecgad.leads` derives III, aVR, aVL and aVF from I and
II as the device does. Sizes are compared with the declarations before decoding, the CRC after.
"""

from __future__ import annotations

import zlib
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np

from ecgad.formats.common import (Decoded, check_declared_bytes, decode_base64, median_beat_only, stack_leads,
                                  unit_to_mv)
from ecgad.formats.safe_xml import parse_xml
from ecgad.types import Rejection


def read(path: Path) -> Decoded:
    root = parse_xml(path)
    waveforms = root.findall("Waveform")
    rhythm = [w for w in waveforms if (w.findtext("WaveformType") or "").strip().lower() == "rhythm"]
    if not rhythm:
        if waveforms:
            raise median_beat_only("MUSE Median waveform")
        raise Rejection("bad_file", "no_waveform", f"{path.name}: no Waveform element")
    waveform = rhythm[0]
    try:
        fs = float(waveform.findtext("SampleBase", "")) * 10 ** int(waveform.findtext("SampleExponent", "0") or 0)
    except ValueError:
        raise Rejection("bad_fs", "non_numeric",
                        f"{path.name}: SampleBase {waveform.findtext('SampleBase')!r}") from None
    names, leads = [], []
    for lead in waveform.findall("LeadData"):
        names.append((lead.findtext("LeadID") or "").strip())
        leads.append(_lead_mv(lead, f"{path.name} lead {names[-1]}"))
    if not leads:
        raise Rejection("missing_lead", "I", f"{path.name}: the rhythm waveform holds no LeadData")
    decoded = Decoded(stack_leads(leads, path.name), fs, names, {"format": "ge_muse"})
    decoded.warn_several_series(len(rhythm))
    decoded.warn_pacemaker(len(list(root.iter("PaceSpike"))), "MUSE PaceSpikes")
    return decoded


def _lead_mv(lead: ET.Element, what: str) -> np.ndarray:
    try:
        count = int(lead.findtext("LeadSampleCountTotal", ""))
        sample_size = int(lead.findtext("LeadSampleSize", "2"))
        declared_bytes = int(lead.findtext("LeadByteCountTotal", str(2 * count)))
        per_bit = float(lead.findtext("LeadAmplitudeUnitsPerBit", ""))
    except ValueError:
        raise Rejection("bad_file", "non_numeric", f"{what}: non-numeric sample count, size or scale") from None
    if sample_size != 2:
        raise Rejection("bad_file", "format", f"{what}: {sample_size}-byte samples (only int16 is defined)")
    if declared_bytes != count * sample_size:
        raise Rejection("header_mismatch", "size", f"{what}: {declared_bytes} bytes declared for {count} samples")
    text = lead.findtext("WaveFormData") or ""
    check_declared_bytes(len(text) * 3 // 4, declared_bytes, what)     # before decoding (whitespace only adds)
    data = decode_base64(text, what)
    check_declared_bytes(len(data), declared_bytes, what)
    crc = lead.findtext("LeadDataCRC32")
    if crc and crc.strip().isdigit() and zlib.crc32(data[:declared_bytes]) != int(crc):
        raise Rejection("header_mismatch", "checksum", f"{what}: CRC-32 of the samples disagrees with the file")
    samples = np.frombuffer(data[:declared_bytes], dtype="<i2").astype(np.float64)
    # MUSE states MICROVOLTS; older exports leave the element out, with the same meaning.
    return samples * per_bit * unit_to_mv(lead.findtext("LeadAmplitudeUnits") or "MICROVOLTS")
