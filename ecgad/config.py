"""Preprocessing configuration: the input geometry of the method (docs/method.md §1.1), in one place.

A checkpoint stores this next to the model config, so every scorer prepares records exactly as the model
was trained on them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, TypeVar

T = TypeVar("T")


def strict_from_dict(cls: type[T], data: dict[str, Any], what: str) -> T:
    """``cls(**data)`` for a config dataclass, refusing keys it does not know: a checkpoint written by another
    version of the code must fail loudly, naming the keys, rather than drop settings it carried."""
    unknown = set(data) - {f.name for f in fields(cls)}  # type: ignore[arg-type]
    if unknown:
        raise ValueError(f"unknown {what} config keys: {sorted(unknown)}")
    return cls(**data)


@dataclass(frozen=True)
class PrepConfig:
    """Sample counts are at ``fs`` (the model rate, 500 Hz)."""

    fs: int = 500
    window: int = 5000            # one 10 s record as the model sees it
    stride: int = 2500            # hop between windows of records longer than 10 s
    global_start: int = 100       # global input = window[:, 100:4900]
    global_end: int = 4900
    beat_before: int = 140        # beat = [r - 140, r + 340)
    beat_after: int = 340
    peak_min: int = 200           # valid R-peaks: peak_min < r < peak_max (the reference's test rule)
    peak_max: int = 4400
    highpass_hz: float = 1.0      # HeartPy chain: 1 Hz high-pass, 35 Hz "notch", 25 Hz low-pass, order 2,
    notch_hz: float = 35.0        # each zero-phase (filtfilt)
    lowpass_hz: float = 25.0
    filter_order: int = 2

    @property
    def beat_len(self) -> int:
        return self.beat_before + self.beat_after

    @property
    def global_len(self) -> int:
        return self.global_end - self.global_start

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PrepConfig":
        return strict_from_dict(cls, data, "preprocessing")
