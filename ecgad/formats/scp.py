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
from ecgad.types import Rejection

#: What ecgdatakit and the struct/array code under it raise on a malformed file.
_DECODER_ERRORS = (ValueError, IndexError, KeyError, TypeError, struct.error, OverflowError, EOFError)


def read(path: Path) -> Decoded:
    from ecgdatakit import ECGDataKitError
    from ecgdatakit.parsing.parsers.scp_ecg import SCPECGParser

    data = path.read_bytes()
    if len(data) < 6:
        raise Rejection("truncated", "", f"{path.name}: {len(data)} bytes, no SCP record header")
    check_declared_bytes(len(data), struct.unpack_from("<I", data, 2)[0], path.name)
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
