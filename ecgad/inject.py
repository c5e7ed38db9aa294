"""Insert the synthetic anomalies of `ecgad.synth` into a *given* ECG (a real record, a DeepFake normal), with the
exact per-lead, per-sample mask of what changed.

Why: localization can only be measured where the anomalous samples are known, and `ecgad.synth` knows them only for
its own wave-model ECGs. Here the same anomaly functions (`ecgad.synth`'s ``_ANOMALIES``, unchanged) run on a
stand-in of the given record: its R-peaks (found as preparation finds them, docs/method.md §1.5) carry waves placed
by standard timing (S wave end 47 ms after R; T wave by Bazett with QTc 0.40 s) whose amplitudes are zero except the
T wave's, measured on the record. Every wave an anomaly *adds* is rendered and added to the record's independent
leads (I, II, V1..V6); the four derived limb leads get the Einthoven/Goldberger combination of that change, so the
limb-lead identities the record had still hold. Per anomaly:

- ST elevation / depression, T inversion: exactly `ecgad.synth`'s (a plateau from J to the T peak; the T wave turned
  to ``-depth`` along the lead group, measured T amplitude cancelled).
- Wide QRS: the terminal conduction-delay component (R' in V1-V2 for RBBB-like, broad late R in I, V5-V6 for
  LBBB-like); the record's own QRS is not stretched, since its waves are not known one by one.
- PVC: the sinus beat it pre-empts is removed (the record crossfades to the straight line between the surrounding
  TP segments) and the ectopic complex is added; the mask is both.
- AF: the fibrillatory f-waves are added; the record's own rhythm and P waves stay. Mask: the whole record.
- Noise burst: exactly `ecgad.synth`'s additive artefact.

Signals are ``(leads, samples)`` float32 mV in ``LEADS`` order at 500 Hz.
"""

from __future__ import annotations

import numpy as np

from ecgad.preprocess import bandpass, find_r_peaks, normalize_minmax
from ecgad.synth import (_ANOMALIES, ANOMALY_TYPES, INDEPENDENT_LEADS, Beat, SynthECG, Wave, _render, _Sinus,
                         derive_limb_leads)
from ecgad.types import LEADS, MODEL_FS

#: Rows of the independent leads (I, II, V1..V6) in ``LEADS`` order.
_INDEPENDENT_ROWS = [LEADS.index(name) for name in INDEPENDENT_LEADS]
#: Standard timing relative to R (s): end of S, the PR-segment point used as each beat's baseline, and QTc.
S_END_S, PR_BASELINE_S, QTC_S = 0.047, 0.07, 0.40


def _t_wave(r: float, rr: float, amps: np.ndarray) -> Wave:
    """The T wave of a beat with R at ``r`` (s), placed as `ecgad.synth` places it (Bazett: QT = QTc * sqrt(RR))."""
    qrs_on = r - 0.042
    qt = QTC_S * np.sqrt(rr)
    return Wave(qrs_on + 0.35 * qt, 0.45 * qt, 0.20 * qt, amps)


def _measured_t_amplitude(x8: np.ndarray, peaks: np.ndarray, rr: float, fs: float) -> np.ndarray:
    """Median over beats of (signal at the T peak - signal at the PR baseline point), per independent lead."""
    n = x8.shape[1]
    rows = []
    for p in peaks:
        t = _t_wave(p / fs, rr, np.zeros(len(INDEPENDENT_LEADS)))
        peak, base = int(round((t.onset + t.rise) * fs)), int(round(p - PR_BASELINE_S * fs))
        if 0 <= base and peak < n:
            rows.append(x8[:, peak] - x8[:, base])
    return np.median(rows, axis=0) if rows else np.zeros(len(INDEPENDENT_LEADS))


def _stand_in(signal: np.ndarray, fs: float) -> _Sinus:
    """The `ecgad.synth` stand-in of a record (module docstring)."""
    peaks = find_r_peaks(normalize_minmax(bandpass(signal, fs))[LEADS.index("II")], fs)
    if len(peaks) < 4:
        raise ValueError(f"found {len(peaks)} R-peaks; an anomaly needs at least 4 beats to be placed")
    rr = float(np.median(np.diff(peaks))) / fs
    x8 = signal[_INDEPENDENT_ROWS].astype(np.float64)
    zero = np.zeros(len(INDEPENDENT_LEADS))
    t_amps = _measured_t_amplitude(x8, peaks, rr, fs)
    beats = []
    for p in peaks:
        r = p / fs
        waves = {"P": Wave(r - 0.2, 0.05, 0.05, zero), "Q": Wave(r - 0.042, 0.016, 0.016, zero),
                 "R": Wave(r - 0.025, 0.025, 0.025, zero), "S": Wave(r + 0.005, 0.020, S_END_S - 0.025, zero),
                 "T": _t_wave(r, rr, t_amps)}
        beats.append(Beat(r=r, kind="N", gain=1.0, waves=waves))
    sinus = _Sinus(template={}, beats=beats, background=np.zeros_like(x8), gain_at=lambda t: 1.0, fs=fs,
                   heart_rate=60.0 / rr, axis_deg=float("nan"))
    return sinus


def _blank_beat(x8: np.ndarray, beats: list[Beat], k: int, fs: float) -> tuple[np.ndarray, slice]:
    """The change that removes beat ``k``: from the previous T end to this T end, a raised-cosine crossfade of the
    record to the straight line between the segment's end values; and that segment."""
    lo = int(np.ceil(beats[k - 1].waves["T"].end * fs))
    hi = min(int(np.floor(beats[k].waves["T"].end * fs)), x8.shape[1] - 1)
    seg = x8[:, lo:hi + 1]
    line = seg[:, :1] + (seg[:, -1:] - seg[:, :1]) * np.linspace(0.0, 1.0, seg.shape[1])
    fade = np.sin(np.pi * np.linspace(0.0, 1.0, seg.shape[1])) ** 0.5
    change = np.zeros_like(x8)
    change[:, lo:hi + 1] = (line - seg) * fade
    return change, slice(lo, hi + 1)


def inject(signal: np.ndarray, anomaly: str, seed: int, fs: float = MODEL_FS) -> SynthECG:
    """``signal`` ``(12, samples)`` float32 mV (``LEADS`` order) with ``anomaly`` inserted (module docstring).

    Returns a `SynthECG` whose ``signal`` is the anomalous twin of the input and ``mask`` ``(12, samples)`` bool is
    True exactly where it differs from the input (up to float32 rounding). Deterministic in ``seed``. Raises
    ``ValueError`` for an unknown anomaly or a record with fewer than 4 R-peaks. ``anomaly`` may combine kinds with
    ``+`` (``"st_elevation+pvc"``, as `ecgad.synth.generate_ecg` takes them; `_inject_combined`).
    """
    kinds = anomaly.split("+")
    if any(kind not in _ANOMALIES for kind in kinds):
        raise ValueError(f"unknown anomaly {anomaly!r}; known: {ANOMALY_TYPES} (combined with '+')")
    if len(kinds) > 1:
        return _inject_combined(signal, kinds, seed, fs)
    signal = np.asarray(signal, dtype=np.float32)
    sinus = _stand_in(signal, fs)
    n = signal.shape[1]
    change = _ANOMALIES[anomaly](sinus, np.random.default_rng(np.random.SeedSequence(seed)))

    clean_ids = {id(w) for b in sinus.beats for w in b.waves.values()}
    added = [w for b in change.beats for w in b.waves.values() if id(w) not in clean_ids]
    delta8 = _render(added, n, fs)
    mask = np.zeros((len(LEADS), n), dtype=bool)
    for w in added:
        mask[derive_limb_leads(w.amps[:, None])[:, 0] != 0, w.support(n, fs)[0]] = True
    if anomaly == "pvc":
        removed, segment = _blank_beat(signal[_INDEPENDENT_ROWS].astype(np.float64), sinus.beats,
                                       change.details["beat"], fs)
        delta8 += removed
        mask[:, segment] = True
    if change.additive is not None:
        delta8 += change.additive
        if change.additive_mask is not None:
            mask |= change.additive_mask
    if change.whole_record:
        mask[:] = True
    # AF's drawn rhythm is not rendered (the record keeps its own), so its beats stay the record's.
    beats = [b for b in (sinus.beats if change.whole_record else change.beats) if 0 <= round(b.r * fs) < n]
    return SynthECG(signal=(signal + derive_limb_leads(delta8)).astype(np.float32), fs=float(fs), lead_names=LEADS,
                    mask=mask, anomaly=anomaly, r_peaks=np.array([round(b.r * fs) for b in beats], dtype=np.int64),
                    beat_types="".join(b.kind for b in beats), seed=int(seed),
                    details={"heart_rate": float(sinus.heart_rate), **change.details})


def _inject_combined(signal: np.ndarray, kinds: list[str], seed: int, fs: float) -> SynthECG:
    """Each kind inserted in turn into the previous result (in the order given, each with its own seed drawn from
    ``seed``), so the long-tail data set's combinations exist on DeepFake records too; the mask is the union of the
    parts' masks and ``details`` holds each kind's own, keyed by kind (as `ecgad.synth.generate_ecg` keys them)."""
    parts, current = [], signal
    for k, kind in enumerate(kinds):
        parts.append(inject(current, kind, int(np.random.SeedSequence([seed, k]).generate_state(1)[0]), fs))
        current = parts[-1].signal
    last = parts[-1]
    return SynthECG(signal=last.signal, fs=last.fs, lead_names=LEADS,
                    mask=np.logical_or.reduce([part.mask for part in parts]), anomaly="+".join(kinds), r_peaks=last.r_peaks, beat_types=last.beat_types, seed=int(seed),
                    details={"heart_rate": parts[0].details["heart_rate"],
                             **{kind: part.details for kind, part in zip(kinds, parts)}})
