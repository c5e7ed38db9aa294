"""Core value types shared by every entry point (docs/method.md §1 describes the path they travel).

Everything that reads, validates, prepares or scores an ECG passes these types around, so that a record
scored online, in a batch job or from the CLI goes through exactly the same code.

Shape convention for every signal in ecgad: ``(leads, samples)``, float32, millivolts (mV), unless a
docstring says otherwise (model inputs are min-max normalized to [-1, 1], still ``(leads, samples)``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

#: Canonical 12-lead order. Every ``Record`` leaving ``ecgad.io`` is in this order.
LEADS: tuple[str, ...] = ("I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6")

#: The model's sampling rate (Hz); every input is resampled to it before preparation.
MODEL_FS: int = 500

#: Every rejection code ecgad can produce. The same vocabulary appears in HTTP 422 bodies,
#: batch ``status``/``reason`` columns and CLI error messages.
REJECTION_CODES: dict[str, str] = {
    "bad_file": "the file could not be read as an ECG (empty, unreadable, unknown format or random bytes)",
    "truncated": "the signal file holds fewer samples than its header announces",
    "header_mismatch": "the header disagrees with the signal data (channel count, format or checksum)",
    "bad_fs": "the sampling rate is missing, not a number, or implausible",
    "nan": "the signal contains NaN or infinite values",
    "flat_lead": "a lead is flat (constant), so it carries no ECG",
    "saturated_lead": "a lead sits at its rail for a large part of the record (clipped amplifier)",
    "too_short": "the record is shorter than the model's 10 s window",
    "unknown_lead": "a lead name is not a standard 12-lead ECG lead",
    "missing_lead": "a standard lead is missing and cannot be derived from the others",
    "bad_shape": "the signal array does not have the (leads, samples) shape its metadata describes",
    "no_beats": "no R-peak was found where a full heartbeat window fits (200 < r < 4400 at 500 Hz)",
    "too_large": "the record is larger than the configured limit",
    "too_long": "the record lasts longer than the configured limit",
    "too_many_channels": "the record has more channels than the configured limit",
}


class Rejection(Exception):
    """A typed reason why a record cannot be scored.

    It is an exception so that readers and validators can stop at the first problem, and a value (``code``,
    ``detail``, ``reason``) so that batch jobs can store it as a status row and the service can return it as a
    422 body. ``reason`` is ``code`` or ``code:detail`` (e.g. ``flat_lead:V3``).
    """

    def __init__(self, code: str, detail: str = "", message: str = "") -> None:
        if code not in REJECTION_CODES:
            raise ValueError(f"unknown rejection code {code!r}; known: {sorted(REJECTION_CODES)}")
        self.code = code
        self.detail = str(detail)
        self.message = message or REJECTION_CODES[code]
        super().__init__(f"{self.reason}: {self.message}")

    @property
    def reason(self) -> str:
        return f"{self.code}:{self.detail}" if self.detail else self.code

    def to_dict(self) -> dict[str, str]:
        return {"status": "rejected", "reason": self.reason, "code": self.code, "detail": self.detail,
                "message": self.message}

    def __reduce__(self):  # keep the type across process boundaries (Ray tasks, multiprocessing)
        return (Rejection, (self.code, self.detail, self.message))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Rejection) and (self.code, self.detail) == (other.code, other.detail)

    def __hash__(self) -> int:
        return hash((self.code, self.detail))


@dataclass
class Record:
    """A raw ECG as read from a file or request.

    ``signal`` is ``(leads, samples)`` float32 in mV, leads in ``LEADS`` order once it has left ``ecgad.io``;
    ``fs`` in Hz; ``metadata`` holds anything the source carried (PTB-XL fold and label, file path, ...).
    """

    signal: np.ndarray
    fs: float
    lead_names: tuple[str, ...]
    record_id: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def n_samples(self) -> int:
        return int(self.signal.shape[1])

    @property
    def duration_s(self) -> float:
        return self.n_samples / float(self.fs)


@dataclass
class Window:
    """One 10 s (5000-sample, 500 Hz) slice of a prepared record.

    ``signal`` is the filtered, per-lead min-max normalized window ``(12, 5000)`` float32 in [-1, 1];
    ``offset`` is where it starts on the record's 500 Hz time axis; ``peaks`` is HeartPy's full peak list on
    lead II (as the reference uses it); ``beat_peaks`` the subset with ``200 < r < 4400`` and ``beats`` the
    matching per-beat, per-lead normalized windows ``(n_beats, 12, 480)``.
    """

    signal: np.ndarray
    offset: int
    peaks: np.ndarray
    beat_peaks: np.ndarray
    beats: np.ndarray

    @property
    def global_input(self) -> np.ndarray:
        """The model's global input ``(12, 4800)``: samples 100..4900 of the window."""
        return self.signal[:, 100:4900]

    @property
    def n_beats(self) -> int:
        return int(self.beats.shape[0])


@dataclass
class Prepared:
    """What the model consumes for one record, plus what is needed to project maps back onto the input.

    ``n_samples_model`` is the record's length on the 500 Hz axis; ``source_fs`` and ``source_samples`` are the
    input's own rate and length, so an anomaly map computed at 500 Hz can be resampled back onto it.
    """

    record_id: str
    windows: list[Window]
    n_samples_model: int
    source_fs: float
    source_samples: int
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def n_beats(self) -> int:
        return sum(w.n_beats for w in self.windows)


@dataclass
class Scores:
    """The model's verdict on one record (names follow anomalib's).

    ``pred_score``: higher = more anomalous; ``pred_label``: ``pred_score > threshold``; ``anomaly_map``:
    ``(12, source_samples)`` float32 on the input's own time axis (None when maps were not asked for).
    """

    record_id: str
    pred_score: float
    pred_label: bool
    threshold: float
    anomaly_map: np.ndarray | None
    r_peaks: np.ndarray
    beats_used: int
    windows_scored: int
    warnings: list[str] = field(default_factory=list)
