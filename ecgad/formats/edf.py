"""EDF and EDF+ (continuous), read with ``edfio``.

EDF is a polygraphy container, so only channels labelled as ECG leads are taken (``I``, ``Lead II``, ``ECG V1``,
``ECG aVR``...; ``C1``-``C6`` only with the ``ECG`` prefix, because bare they are EEG electrode names); the others
(EEG, respiration, SpO2...) are listed in ``metadata["ignored_channels"]``. Physical values come from each signal's
physical/digital range, in its physical dimension (``uV``, ``mV``, ``V``). The file size is compared with what the
header declares (header bytes + records x samples per record x 2) before decoding. EDF+ annotations naming a
pacemaker become a warning. EDF+D (discontinuous records) is refused: its samples have no single time axis.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from ecgad.formats.common import Decoded, check_declared_bytes, unit_to_mv
from ecgad.limits import LIMITS, InputLimits
from ecgad.leads import canonical_lead_name
from ecgad.types import Rejection

_ECG_PREFIX = re.compile(r"^\s*(ecg|ekg)[\s_-]*", re.IGNORECASE)
_EEG_NAMES = re.compile(r"^c[1-6]$", re.IGNORECASE)


def read(path: Path, limits: InputLimits = LIMITS) -> Decoded:
    import edfio

    _check_declared_size(path, limits)
    try:
        edf = edfio.read_edf(path)
        labelled = [(signal, _ecg_lead(signal.label)) for signal in edf.signals]
        taken = [(signal, name) for signal, name in labelled if name]
        if not taken:
            raise Rejection("missing_lead", "I", f"{path.name}: no ECG channel among {[s.label for s, _ in labelled]}")
        rates = {float(signal.sampling_frequency) for signal, _ in taken}
        if len(rates) != 1:
            raise Rejection("bad_fs", "mixed", f"{path.name}: ECG channels sampled at {sorted(rates)} Hz")
        leads = np.stack([signal.data * unit_to_mv(signal.physical_dimension) for signal, _ in taken])
        paced = sum("pace" in (annotation.text or "").lower() for annotation in edf.annotations)
    except (ValueError, IndexError, KeyError, TypeError, OSError, EOFError, UnicodeDecodeError) as exc:
        raise Rejection("bad_file", "edf", f"{path.name}: unreadable EDF: {exc}") from None
    decoded = Decoded(leads, rates.pop(), [name for _, name in taken],
                      {"format": "edf", "ignored_channels": [s.label for s, name in labelled if not name],
                       "units": [signal.physical_dimension for signal, _ in taken]})
    decoded.warn_pacemaker(paced, "EDF+ annotations")
    return decoded


def _ecg_lead(label: str) -> str | None:
    """The lead a channel label names, or None for a channel that is not an ECG lead."""
    prefixed = _ECG_PREFIX.match(label) is not None
    bare = _ECG_PREFIX.sub("", label).strip()
    if not prefixed and _EEG_NAMES.match(bare):
        return None
    try:
        return canonical_lead_name(bare)
    except Rejection:
        return None


def _check_declared_size(path: Path, limits: InputLimits) -> None:
    """``truncated`` when the file is shorter than its header declares (EDF stores 2-byte samples); EDF+D refused;
    the declared channels and samples checked against ``limits``."""
    size = path.stat().st_size
    with open(path, "rb") as file:
        fixed = file.read(256)
        if len(fixed) < 256:
            raise Rejection("truncated", "", f"{path.name}: {len(fixed)} bytes, the EDF header has 256")
        try:
            header_bytes, records, n_signals = int(fixed[184:192]), int(fixed[236:244]), int(fixed[252:256])
        except ValueError:
            raise Rejection("bad_file", "edf", f"{path.name}: non-numeric EDF header fields") from None
        if fixed[192:197] == b"EDF+D":         # records with gaps between them: no single time axis
            raise Rejection("bad_file", "edf_discontinuous", f"{path.name}: EDF+D (discontinuous) is not supported")
        check_declared_bytes(size, header_bytes, path.name)
        limits.check_channels(n_signals)
        file.seek(256 + n_signals * 216)
        try:
            per_record = sum(int(file.read(8)) for _ in range(n_signals))
        except ValueError:
            raise Rejection("bad_file", "edf", f"{path.name}: non-numeric samples per record") from None
    if records >= 0:                           # -1: unknown while recording
        check_declared_bytes(size, header_bytes + records * per_record * 2, path.name)
        limits.check_bytes(records * per_record * 8)
