"""What every hospital-format reader hands to `ecgad.io`: a `Decoded` waveform, plus the shared rules for units,
warnings and the refusals that several formats share (median beat only, declared sizes)."""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ecgad.types import Rejection

#: Physical units an ECG file may state, as a factor to mV (WFDB, DICOM/UCUM, HL7 PQ units, MUSE, EDF spellings).
_UNIT_TO_MV: dict[str, float] = {"mv": 1.0, "millivolts": 1.0, "uv": 1e-3, "µv": 1e-3, "μv": 1e-3,
                                 "microvolts": 1e-3, "nv": 1e-6, "nanovolts": 1e-6, "v": 1e3, "volts": 1e3}


def unit_to_mv(unit: str | None) -> float:
    """The factor that turns a value in ``unit`` into mV; ``bad_file:unit`` for anything that is not a voltage,
    a missing unit included (a reader whose format defines a default passes that default)."""
    try:
        return _UNIT_TO_MV[(unit or "").strip().lower()]
    except KeyError:
        raise Rejection("bad_file", "unit", f"physical unit {unit!r} is not a voltage") from None


@dataclass
class Decoded:
    """One file's rhythm waveform as a reader found it, before lead canonicalization.

    ``signal`` is ``(channels, samples)`` in mV (any float dtype), ``lead_names`` the file's name for each channel
    (already mapped from format codes to names `ecgad.leads` understands), ``fs`` in Hz. ``metadata`` carries
    ``format`` and what else the file said that matters for scoring; ``warnings`` ends up in
    ``Record.metadata["warnings"]``, which the scorer passes on to every result.
    """

    signal: np.ndarray
    fs: float
    lead_names: list[str | None]
    metadata: dict[str, Any]
    warnings: list[str] = field(default_factory=list)

    def warn_pacemaker(self, spikes: int, where: str) -> None:
        """Record device-flagged pacemaker spikes: paced beats look anomalous to a model trained on unpaced ECGs."""
        if spikes:
            self.metadata["pacemaker_spikes"] = int(spikes)
            self.warnings.append(f"pacemaker: the device flagged {spikes} pacemaker spike(s) ({where}); paced beats "
                                 "score as anomalous")

    def warn_several_series(self, count: int) -> None:
        """A file with several rhythm series is scored on its first one; say so."""
        if count > 1:
            self.warnings.append(f"several_rhythm_series: the file holds {count} rhythm series; scored the first")


def median_beat_only(what: str) -> Rejection:
    """A file holding only representative (median) beats: a few hundred ms of an averaged beat, not a recording."""
    return Rejection("bad_file", "median_beat_only",
                     f"the file holds only a representative (median) beat ({what}), no rhythm waveform")


def check_declared_bytes(available: int, declared: int, what: str) -> None:
    """``truncated`` if a file holds fewer bytes than its header declares; checked before any sample is decoded."""
    if declared < 0:
        raise Rejection("header_mismatch", "size", f"{what}: negative declared size {declared}")
    if available < declared:
        raise Rejection("truncated", "", f"{what}: {available} bytes present, {declared} declared")


def stack_leads(leads: list[np.ndarray], what: str) -> np.ndarray:
    """``(channels, samples)`` from per-lead arrays, ``bad_shape:lead_lengths`` if they differ in length."""
    lengths = {len(lead) for lead in leads}
    if len(lengths) != 1:
        raise Rejection("bad_shape", "lead_lengths", f"{what}: leads of different lengths {sorted(lengths)}")
    return np.stack(leads)


def decode_base64(text: str | None, what: str) -> bytes:
    """Base64 text (whitespace ignored) as bytes; ``bad_file:base64`` for anything else (non-ASCII included)."""
    try:
        return base64.b64decode("".join((text or "").split()), validate=True)
    except ValueError:                      # binascii.Error, and non-ASCII text
        raise Rejection("bad_file", "base64", f"{what}: waveform data is not base64") from None
