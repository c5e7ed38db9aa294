"""The input limits: how long, how wide and how large a record may be, checked before anything is allocated.

Why here, and why before allocating: a 1 MiB upload can declare a (12, 10^12) array, a zip member can inflate a
thousandfold, and a short file at a low rate becomes a huge one once resampled to 500 Hz. Every reader checks what
the input *declares* (an NPY header's shape and item size, a zip member's uncompressed size, a WFDB header's
``sig_len`` and channel count, a CSV's row count) against these limits first, and refuses with a typed
`Rejection` (``too_long``, ``too_large``, ``too_many_channels``) before it decodes a sample. The service, the CLI
and the batch jobs all read through `ecgad.io`, so one set of limits holds at every door.

Defaults (override per process with the environment variables named in `InputLimits.from_env`):

- ``max_seconds`` 300: five minutes of ECG, thirty 10 s windows; a resting ECG is 10 s, a long rhythm strip a few
  minutes. Holter recordings (24 h) belong in an archive job cut into segments, not in one request.
- ``max_channels`` 64: room for 12 leads plus Frank leads, pacing and auxiliary channels that some devices store.
- ``max_decoded_mb`` 64: the raw samples as float64 (the widest type a reader produces), e.g. 16 channels x 300 s
  x 1 kHz x 8 bytes = 38 MB; a record within the duration and channel limits at a plausible rate fits.
- ``max_compression_ratio`` 100: how many times a compressed member (of an NPZ) may inflate.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields

from ecgad.types import Rejection


@dataclass(frozen=True)
class InputLimits:
    max_seconds: float = 300.0
    max_channels: int = 64
    max_decoded_mb: float = 64.0
    max_compression_ratio: float = 100.0

    @property
    def max_decoded_bytes(self) -> int:
        return int(self.max_decoded_mb * 2**20)

    @classmethod
    def from_env(cls) -> "InputLimits":
        """The defaults, overridden by ``ECGAD_MAX_SECONDS``, ``ECGAD_MAX_CHANNELS``, ``ECGAD_MAX_DECODED_MB`` and
        ``ECGAD_MAX_COMPRESSION_RATIO`` (``ECGAD_`` and the field's name in capitals), each of the default's type."""
        return cls(**{f.name: type(f.default)(os.environ.get(f"ECGAD_{f.name.upper()}", f.default))
                      for f in fields(cls)})

    def check_channels(self, channels: int) -> None:
        if channels > self.max_channels:
            raise Rejection("too_many_channels", f"{channels}>{self.max_channels}")

    def check_bytes(self, n_bytes: int, what: str = "signal") -> None:
        """Refuse ``n_bytes`` of decoded data (an array, a decompressed member) above ``max_decoded_bytes``."""
        if n_bytes > self.max_decoded_bytes:
            raise Rejection("too_large", f"{what}:{n_bytes // 2**20}MiB>{self.max_decoded_mb:g}MiB")

    def check_compression(self, n_bytes: int, compressed_bytes: int, what: str) -> None:
        """Refuse a compressed member inflating more than ``max_compression_ratio`` times (a zip bomb's ratio is
        ~1000; ECG samples deflate a few times at most), bounding the time spent inflating as well as the memory."""
        if n_bytes > self.max_compression_ratio * max(compressed_bytes, 1):
            raise Rejection("too_large", f"compression_ratio:{what}",
                            f"{what} inflates {n_bytes / max(compressed_bytes, 1):.0f} times, more than the limit "
                            f"of {self.max_compression_ratio:g}")

    def check_duration(self, samples: int, fs: float | None) -> None:
        """Refuse a record of ``samples`` at ``fs`` Hz lasting longer than ``max_seconds`` (no check without a rate:
        the byte limit still holds, and the rate is checked once known)."""
        if fs and samples / fs > self.max_seconds:
            raise Rejection("too_long", f"{samples / fs:.0f}s>{self.max_seconds:g}s")

    def check_declared(self, channels: int, samples: int, fs: float | None = None) -> None:
        """All three checks for a declared ``(channels, samples)`` signal, cheapest first. Decoded size counts 8 bytes
        a sample whatever the stored type: readers and the resampler work in float64."""
        self.check_channels(channels)
        self.check_bytes(int(channels) * int(samples) * 8)
        self.check_duration(samples, fs)


#: The limits of this process (environment read once, at import).
LIMITS = InputLimits.from_env()
