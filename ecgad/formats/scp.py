"""SCP-ECG (EN 1064 / ISO 11073-91064), decoded by ``ecgdatakit``.

SCP-ECG packs the rhythm data (section 6) with Huffman tables (section 2), first or second differences and
optionally reference-beat subtraction and decimation (sections 4 and 5): ``ecgdatakit`` is the one maintained
Python decoder. The record size that the file declares (bytes 2-5) is compared with the file's size before
decoding. Samples are ``raw x resolution + offset`` in the lead's unit (SCP stores nV per count; ecgdatakit
reports µV). Section 7's pacemaker spikes become a warning; a file holding only the reference beat is refused.
"""

from __future__ import annotations

import struct
import warnings
from pathlib import Path

import numpy as np

from ecgad.formats.common import Decoded, check_declared_bytes, median_beat_only, stack_leads, unit_to_mv
from ecgad.limits import LIMITS, InputLimits
from ecgad.types import Rejection

#: The most samples per lead decoded. Section 3 declares each lead's sample range and the decoder allocates it
#: before reading a bit, so a corrupt range would ask for gigabytes; this is 35 min at 1 kHz, far beyond a resting
#: ECG, and also never more than 64 samples per byte of the file (Huffman codes are at least a bit long, and
#: SCP's decimation does not reach 8x).
MAX_SAMPLES_PER_LEAD: int = 2**21
_SAMPLES_PER_BYTE = 64
_SECTION_HEADER = 16

#: What ecgdatakit and the struct/array code under it raise on a malformed file.
_DECODER_ERRORS = (ValueError, IndexError, KeyError, TypeError, struct.error, OverflowError, EOFError)


def read(path: Path, limits: InputLimits = LIMITS) -> Decoded:
    from ecgdatakit import ECGDataKitError
    from ecgdatakit.parsing.parsers.scp_ecg import SCPECGParser

    data = path.read_bytes()
    if len(data) < 6:
        raise Rejection("truncated", "", f"{path.name}: {len(data)} bytes, no SCP record header")
    check_declared_bytes(len(data), struct.unpack_from("<I", data, 2)[0], path.name)
    _check_lead_sample_counts(data, path, limits)
    try:
        with warnings.catch_warnings():        # checksum and section warnings: the CRC check is ours below
            warnings.simplefilter("ignore")
            record = SCPECGParser().parse(path)
    except (ECGDataKitError, *_DECODER_ERRORS) as exc:
        raise Rejection("bad_file", "scp", f"{path.name}: cannot decode SCP-ECG: {exc}") from None
    if not record.leads:
        if record.median_beats:
            raise median_beat_only("SCP-ECG section 5 reference beat")
        raise Rejection("bad_file", "no_waveform", f"{path.name}: no rhythm data (section 6)")
    rates = {lead.sampling_rate for lead in record.leads}
    if len(rates) != 1:
        raise Rejection("bad_fs", "mixed", f"{path.name}: leads sampled at {sorted(rates)} Hz")
    leads = [(np.asarray(lead.samples, dtype=np.float64) * lead.resolution + lead.offset)
             * unit_to_mv(lead.resolution_unit or "uV") for lead in record.leads]   # SCP fixes nV per count
    decoded = Decoded(stack_leads(leads, path.name), float(rates.pop()), [lead.label for lead in record.leads],
                      {"format": "scp_ecg", "checksum_valid": record.raw_metadata.get("checksum_valid")})
    decoded.warn_pacemaker(len(record.raw_metadata.get("pacemaker_spikes") or []), "SCP-ECG section 7")
    return decoded


def _check_lead_sample_counts(data: bytes, path: Path, limits: InputLimits) -> None:
    """``too_large`` if section 3 declares more samples per lead than can be decoded (`MAX_SAMPLES_PER_LEAD`),
    or more leads or samples than ``limits`` allow.

    Section 0 (after the 6-byte record header) lists ``(id u16, length u32, 1-based offset u32)`` per section after
    its 16-byte section header; section 3 holds the lead count, a flag byte, then ``(start u32, end u32, id u8)``
    per lead. Anything malformed here is left to the decoder, which refuses it.
    """
    limit = min(MAX_SAMPLES_PER_LEAD, _SAMPLES_PER_BYTE * len(data))
    section0_end = 6 + struct.unpack_from("<I", data, 10)[0] if len(data) >= 14 else 0
    for pointer in range(6 + _SECTION_HEADER, min(section0_end, len(data)) - 9, 10):
        section, length, index = struct.unpack_from("<HII", data, pointer)
        if section != 3 or not length or index < 1:
            continue
        body = data[index - 1 + _SECTION_HEADER: index - 1 + length]
        limits.check_channels(body[0] if body else 0)
        for lead in range(body[0] if body else 0):
            if 2 + 9 * lead + 8 > len(body):
                return
            start, end = struct.unpack_from("<II", body, 2 + 9 * lead)
            limits.check_bytes(body[0] * (end - start + 1) * 8)
            if end - start + 1 > limit:
                raise Rejection("too_large", "", f"{path.name}: lead {lead + 1} declares {end - start + 1} samples, "
                                                 f"more than {limit} can be decoded from this file")
