"""Realistic synthetic 12-lead ECGs with point-level ground truth.

Why synthetic data at all: the fresh-clone demo must train and evaluate without PTB-XL, and localization needs
a benchmark whose anomalous samples are known exactly. Real data gives neither, so this module draws ECGs that
look like PTB-XL to the pipeline (HeartPy finds the R-peaks on lead II after the 1-25 Hz chain, amplitudes and
intervals are physiological) and whose anomalies come with a per-lead, per-sample boolean mask.

How a record is built (all times in seconds, amplitudes in mV):

- **Eight independent leads.** Waves are drawn on I, II and V1..V6 only; III, aVR, aVL and aVF are then derived
  with the Einthoven/Goldberger relations (III = II - I, aVR = -(I + II)/2, aVL = I - II/2, aVF = II - I/2),
  exactly as an electrocardiograph derives them, so every limb-lead identity holds to float rounding.
- **Beats as sums of waves.** Each beat is P, Q, R, S, T; each wave is a raised-cosine pulse (rise, optional
  flat top, fall) with one amplitude per independent lead. Raised cosines look like the usual Gaussian waves
  but have *compact support*, so the samples a changed wave touches (the mask) are known exactly. Limb-lead
  amplitudes come from a frontal-plane vector per wave (hexaxial projection onto I at 0 deg and II at 60 deg),
  so a per-record axis rotation moves all six limb leads consistently; precordial amplitudes come from a table
  with the usual R-wave progression.
- **Per-record variation:** heart rate 55-95 bpm, respiratory sinus arrhythmia and RR jitter, QRS axis, voltage,
  per-electrode gain, PR and QRS duration, QT by Bazett, respiratory amplitude modulation, baseline wander
  (< 0.5 Hz), white noise and 50 Hz powerline interference.

**Twins.** Everything above is drawn from one random stream, always in the same order and amount, whatever the
anomaly; the anomaly draws from a second, independent stream (``SeedSequence(seed).spawn(2)``). So
``generate_ecg(s)`` and ``generate_ecg(s, anomaly=X)`` are the same ECG except where X changed it, and the mask is
the union of the supports of the removed/added waves (or of the additive burst) on the leads they touch;
derived limb leads inherit the mask of I or II. Outside the mask the two signals are bitwise equal.

**Atrial fibrillation** replaces the rhythm itself (new irregular R times, no P waves, fibrillatory f-waves
everywhere), so every sample changes: its twin shares morphology, baseline and noise, and its mask is the whole
record on all 12 leads.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any, Callable

import numpy as np
from scipy import signal as sps

from ecgad.types import LEADS, MODEL_FS, Record

#: The anomaly types ``generate_ecg`` can insert.
ANOMALY_TYPES: tuple[str, ...] = ("pvc", "st_elevation", "st_depression", "t_inversion", "wide_qrs", "af",
                                  "noise_burst")

#: Independent leads, in the order of the first axis of every internal (8, samples) array.
INDEPENDENT_LEADS: tuple[str, ...] = ("I", "II", "V1", "V2", "V3", "V4", "V5", "V6")

#: Parts of a change smaller than this (mV; a precordial amplitude, or the frontal-plane vector) are dropped, so
#: the mask never marks a lead where nothing visible changed (e.g. the 1e-17 projection onto a perpendicular lead).
MIN_CHANGE_MV = 0.05

# Normal adult waves before per-record scaling. Frontal plane: (magnitude mV, hexaxial angle deg);
# precordial: V1..V6 amplitudes (mV). Values follow textbook normal ECGs (deep S in V1-V2, transition at V3-V4,
# tallest R in V4-V5, small septal q in V5-V6, aVR negative).
_FRONTAL = {"P": (0.15, 55.0), "Q": (0.10, 190.0), "R": (1.30, 50.0), "S": (0.35, -110.0), "T": (0.35, 45.0)}
_PRECORDIAL = {
    "P": (0.06, 0.08, 0.09, 0.10, 0.10, 0.09),
    "Q": (0.0, 0.0, 0.0, -0.05, -0.08, -0.08),
    "R": (0.25, 0.50, 0.90, 1.40, 1.30, 1.00),
    "S": (-0.90, -1.40, -0.90, -0.50, -0.30, -0.15),
    "T": (0.05, 0.45, 0.50, 0.45, 0.35, 0.25),
}

#: Lead groups for regional ST-T changes: a frontal-plane direction (deg; None = limb leads unchanged) and
#: precordial weights V1..V6. The frontal direction gives the reciprocal changes a real injury vector gives
#: (inferior elevation with depression in aVL; lateral elevation with depression in III). The directions sit at
#: odd multiples of 15 deg and move at most GROUP_JITTER_DEG, so they stay >= 8 deg from perpendicular to every
#: limb-lead axis (multiples of 30 deg): each limb lead sees >= 12 % of the change, never a sliver that the
#: mask would overstate.
LEAD_GROUPS: dict[str, tuple[float | None, tuple[float, ...]]] = {
    "inferior": (105.0, (0.0, 0.0, 0.0, 0.0, 0.0, 0.0)),
    "anterior": (None, (0.6, 1.0, 1.0, 0.8, 0.3, 0.0)),
    "lateral": (-15.0, (0.0, 0.0, 0.0, 0.5, 1.0, 1.0)),
}
GROUP_JITTER_DEG = 7.0

_SQRT3 = float(np.sqrt(3.0))


# ---------------------------------------------------------------------------------------------- waves and beats
@dataclass(frozen=True, eq=False)
class Wave:
    """One deflection: a raised-cosine rise, a flat top, a raised-cosine fall; ``amps`` (8,) on INDEPENDENT_LEADS.

    Compared by identity (``eq=False``): an anomaly that changes a wave makes a new object, which is how the
    mask finds what changed.
    """

    onset: float
    rise: float
    fall: float
    amps: np.ndarray
    flat: float = 0.0

    @property
    def end(self) -> float:
        return self.onset + self.rise + self.flat + self.fall

    def support(self, n: int, fs: float) -> tuple[slice, np.ndarray]:
        """Samples where the wave is non-zero (strictly inside its support) and its unit profile there."""
        lo = max(int(np.floor(self.onset * fs)) + 1, 0)
        hi = min(int(np.ceil(self.end * fs)), n)
        x = np.arange(lo, hi) / fs - self.onset
        prof = np.ones(x.shape)
        up = x < self.rise
        prof[up] = np.sin(0.5 * np.pi * x[up] / self.rise) ** 2
        down = x > self.rise + self.flat
        prof[down] = np.cos(0.5 * np.pi * (x[down] - self.rise - self.flat) / self.fall) ** 2
        return slice(lo, max(hi, lo)), prof


@dataclass(frozen=True)
class Beat:
    """One complex: its R time (s), kind ('N' conducted, 'V' ventricular ectopic), gain and waves in render order."""

    r: float
    kind: str
    gain: float
    waves: dict[str, Wave]


def _frontal(magnitude: float, angle_deg: float) -> np.ndarray:
    """Project a frontal-plane vector onto leads I (0 deg) and II (60 deg)."""
    a = np.deg2rad(angle_deg)
    return magnitude * np.array([np.cos(a), np.cos(a - np.pi / 3)])


def _to_vector(i_ii: np.ndarray) -> np.ndarray:
    """Inverse of ``_frontal``: the (x, y) frontal vector whose projections are the given I and II values."""
    return np.array([i_ii[0], (2.0 * i_ii[1] - i_ii[0]) / _SQRT3])


def _from_vector(v: np.ndarray) -> np.ndarray:
    return np.array([v[0], 0.5 * v[0] + 0.5 * _SQRT3 * v[1]])


def _group_direction(group: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A lead group's jittered unit frontal vector (x, y) (zero for a precordial-only group) and V1..V6 weights."""
    angle, weights = LEAD_GROUPS[group]
    a = np.deg2rad((angle or 0.0) + rng.uniform(-GROUP_JITTER_DEG, GROUP_JITTER_DEG))
    u = np.zeros(2) if angle is None else np.array([np.cos(a), np.sin(a)])
    return u, np.asarray(weights)


def _visible(amps: np.ndarray) -> np.ndarray:
    """``amps`` (8,) without the parts of a change below MIN_CHANGE_MV."""
    out = np.where(np.abs(amps) >= MIN_CHANGE_MV, amps, 0.0)
    out[:2] = amps[:2] if np.linalg.norm(_to_vector(amps[:2])) >= MIN_CHANGE_MV else 0.0
    return out


def derive_limb_leads(x8: np.ndarray) -> np.ndarray:
    """(8, n) on INDEPENDENT_LEADS -> (12, n) in LEADS order, by Einthoven's and Goldberger's relations."""
    lead_i, lead_ii = x8[0], x8[1]
    limb = [lead_i, lead_ii, lead_ii - lead_i, -0.5 * (lead_i + lead_ii), lead_i - 0.5 * lead_ii,
            lead_ii - 0.5 * lead_i]
    return np.concatenate([np.stack(limb), x8[2:]])


def _derive_mask(m8: np.ndarray) -> np.ndarray:
    """The 12-lead mask of an additive change: a derived limb lead changes wherever I or II changes."""
    limb = m8[0] | m8[1]
    return np.concatenate([m8[:2], np.stack([limb] * 4), m8[2:]])


# ---------------------------------------------------------------------------------------------- the clean record
@dataclass
class _Sinus:
    """What the main stream drew: the beat template, the sinus beats and the background (wander + noise)."""

    template: dict[str, Wave]     # waves of one beat with R at t = 0 and unit gain
    beats: list[Beat]
    background: np.ndarray        # (8, n) baseline wander + white noise + powerline
    gain_at: Callable[[float], float]
    fs: float
    heart_rate: float
    axis_deg: float

    @property
    def duration_s(self) -> float:
        return self.background.shape[1] / self.fs


def _beat(template: dict[str, Wave], r: float, gain: float, skip: tuple[str, ...] = ()) -> Beat:
    """A conducted beat: the template's waves (minus ``skip``) moved to R time ``r`` and scaled by ``gain``."""
    waves = {k: replace(w, onset=w.onset + r, amps=w.amps * gain) for k, w in template.items() if k not in skip}
    return Beat(r=r, kind="N", gain=gain, waves=waves)


def _rr_times(rng: np.random.Generator, duration_s: float, first: float, next_rr: Callable[[float, float], float],
              min_rr: float) -> list[float]:
    """R times from ``first`` until past the end; draws a fixed number of normals so the stream never shifts."""
    eps = rng.standard_normal(int(np.ceil((duration_s + 2.0) / min_rr)))
    times, t = [], first
    for e in eps:
        if t > duration_s + 0.5:
            break
        times.append(t)
        t += max(next_rr(t, e), min_rr)
    return times


def _draw_sinus(rng: np.random.Generator, fs: float, n: int) -> _Sinus:
    duration_s = n / fs
    heart_rate = rng.uniform(55.0, 95.0)
    rr = 60.0 / heart_rate
    f_resp, resp_phase = rng.uniform(0.15, 0.35), rng.uniform(0, 2 * np.pi)
    rsa, jitter, resp_gain = rng.uniform(0.02, 0.05), rng.uniform(0.005, 0.015), rng.uniform(0.03, 0.08)
    axis, t_axis, p_axis = rng.uniform(-25.0, 20.0), rng.uniform(-10.0, 10.0), rng.uniform(-15.0, 15.0)
    voltage, p_scale, t_scale = rng.uniform(0.75, 1.3), rng.uniform(0.7, 1.3), rng.uniform(0.7, 1.3)
    electrode_gain = np.exp(rng.normal(0.0, 0.1, 8))
    pr, qrs, qtc = rng.uniform(0.13, 0.19), rng.uniform(0.9, 1.1), rng.uniform(0.38, 0.43)

    def amps(name: str, scale: float, rotate: float) -> np.ndarray:
        mag, angle = _FRONTAL[name]
        limb = _frontal(mag, angle + rotate)
        return np.concatenate([limb, _PRECORDIAL[name]]) * scale * voltage * electrode_gain

    qrs_on = -0.042 * qrs
    t_end = qrs_on + qtc * np.sqrt(rr)           # Bazett: QT = QTc * sqrt(RR)
    qt = t_end - qrs_on
    template = {
        "P": Wave(qrs_on - pr, 0.05, 0.05, amps("P", p_scale, p_axis)),
        "Q": Wave(qrs_on, 0.016 * qrs, 0.016 * qrs, amps("Q", 1.0, axis)),
        "R": Wave(-0.025 * qrs, 0.025 * qrs, 0.025 * qrs, amps("R", 1.0, axis)),
        "S": Wave(0.005 * qrs, 0.020 * qrs, 0.022 * qrs, amps("S", 1.0, axis)),
        "T": Wave(t_end - 0.65 * qt, 0.45 * qt, 0.20 * qt, amps("T", t_scale, axis + t_axis)),
    }

    def gain_at(t: float) -> float:
        return 1.0 + resp_gain * np.sin(2 * np.pi * f_resp * t + resp_phase)

    times = _rr_times(rng, duration_s, -rng.uniform(0.0, 1.0) * rr,
                      lambda t, e: rr * (1 + rsa * np.sin(2 * np.pi * f_resp * t + resp_phase) + jitter * e),
                      min_rr=0.5)
    beats = [_beat(template, t, gain_at(t)) for t in times]

    t = np.arange(n) / fs
    wander_f = rng.uniform(0.05, 0.45, (8, 2, 1))
    wander_a = rng.uniform(0.02, 0.12, (8, 2, 1))
    wander_p = rng.uniform(0, 2 * np.pi, (8, 2, 1))
    background = (wander_a * np.sin(2 * np.pi * wander_f * t + wander_p)).sum(axis=1)
    background += rng.normal(0.0, rng.uniform(0.004, 0.015), (8, n))
    mains_a, mains_p = rng.uniform(0.0, 0.015), rng.uniform(0, 2 * np.pi, (8, 1))
    background += mains_a * np.sin(2 * np.pi * 50.0 * t + mains_p)
    return _Sinus(template, beats, background, gain_at, fs, heart_rate, axis)


# ---------------------------------------------------------------------------------------------- anomalies
@dataclass
class _Change:
    """An anomaly: the beats it leaves (changed waves are new objects), an additive signal, and details."""

    beats: list[Beat]
    additive: np.ndarray | None = None
    additive_mask: np.ndarray | None = None   # (12, n) where ``additive`` is non-zero
    whole_record: bool = False
    details: dict[str, Any] = field(default_factory=dict)


def _with_waves(beat: Beat, **waves: Wave) -> Beat:
    return replace(beat, waves={**beat.waves, **waves})


def _st_shift(sinus: _Sinus, rng: np.random.Generator, sign: float) -> _Change:
    """ST elevation (0.3-0.5 mV) or depression (0.25-0.4 mV) in one lead group: a plateau from the J point to the
    T peak, fading with the T wave. Real injury currents shift the whole ST segment and merge into the T wave."""
    group = str(rng.choice(tuple(LEAD_GROUPS)))
    magnitude = rng.uniform(0.3, 0.5) if sign > 0 else rng.uniform(0.25, 0.4)
    u, weights = _group_direction(group, rng)
    delta = _visible(sign * magnitude * np.concatenate([_from_vector(u), weights]))
    beats = []
    for b in sinus.beats:
        s_wave, t_wave = b.waves["S"], b.waves["T"]
        onset = s_wave.end - 0.01
        t_peak = t_wave.onset + t_wave.rise
        st = Wave(onset, 0.02, t_wave.fall, delta, flat=t_peak - onset - 0.02)
        beats.append(_with_waves(b, ST=st))
    return _Change(beats, details={"group": group, "st_mv": float(sign * magnitude)})


def _t_inversion(sinus: _Sinus, rng: np.random.Generator) -> _Change:
    """T waves turned away from a lead group, as in ischaemic T inversion, to a depth of 0.25-0.5 mV: the frontal
    T vector's component along the group direction becomes ``-depth`` (its other component is kept, so the change
    lies along the group direction, see LEAD_GROUPS) and each precordial T wave of the group moves towards
    ``-depth`` by its lead weight."""
    group = str(rng.choice(tuple(LEAD_GROUPS)))
    depth = rng.uniform(0.25, 0.5)
    u, weights = _group_direction(group, rng)
    beats = []
    for b in sinus.beats:
        t_wave = b.waves["T"]
        limb = _from_vector(-(_to_vector(t_wave.amps[:2]) @ u + depth * b.gain) * u)
        change = np.concatenate([limb, -weights * (t_wave.amps[2:] + depth * b.gain)])
        delta = Wave(t_wave.onset, t_wave.rise, t_wave.fall, _visible(change))
        beats.append(_with_waves(b, T_inversion=delta))
    return _Change(beats, details={"group": group, "depth_mv": float(depth)})


def _wide_qrs(sinus: _Sinus, rng: np.random.Generator) -> _Change:
    """Bundle-branch-like conduction on every beat: Q, R, S widened about the R time plus a late component.

    RBBB: terminal rightward forces (R' in V1-V2, wide S in I, V5-V6). LBBB: broad notched R in I, V5-V6 and a
    QS in V1-V2. Secondary ST-T changes are not modelled, so the change (and the mask) stays on the QRS.
    """
    variant = str(rng.choice(("rbbb", "lbbb")))
    widen = rng.uniform(1.5, 1.8)
    if variant == "rbbb":
        late = np.concatenate([_frontal(0.3, 180.0 + rng.uniform(-20, 20)), (0.6, 0.35, 0.0, -0.1, -0.25, -0.3)])
        late_onset, late_rise, late_fall = 0.03, 0.03, 0.04
    else:
        late = np.concatenate([_frontal(0.5, -20.0 + rng.uniform(-15, 15)), (-0.3, -0.4, -0.2, 0.3, 0.6, 0.6)])
        late_onset, late_rise, late_fall = 0.0, 0.04, 0.04
    beats = []
    for b in sinus.beats:
        wide = {k: replace(b.waves[k], onset=b.r + (b.waves[k].onset - b.r) * widen,
                           rise=b.waves[k].rise * widen, fall=b.waves[k].fall * widen) for k in ("Q", "R", "S")}
        if variant == "lbbb":    # the septal r in V1-V2 disappears: QS complexes
            wide["R"] = replace(wide["R"], amps=wide["R"].amps * np.array([1, 1, 0.1, 0.1, 1, 1, 1, 1]))
        wide["late"] = Wave(b.r + late_onset * widen, late_rise * widen, late_fall * widen, late * b.gain)
        beats.append(_with_waves(b, **wide))
    return _Change(beats, details={"variant": variant, "widen": float(widen)})


def _pvc(sinus: _Sinus, rng: np.random.Generator) -> _Change:
    """One premature ventricular complex: early, wide, bizarre, no P wave, discordant T, compensatory pause.

    The sinus node is not reset, so the sinus beat the PVC pre-empts is dropped whole and the next sinus beat
    keeps its time: the interval around the PVC is two sinus cycles.
    """
    candidates = [i for i in range(1, len(sinus.beats) - 1) if 1.5 <= sinus.beats[i].r <= sinus.duration_s - 2.0]
    k = int(rng.choice(candidates))
    prev, this = sinus.beats[k - 1], sinus.beats[k]
    coupling = rng.uniform(0.55, 0.7)
    r = prev.r + coupling * (this.r - prev.r)
    origin = str(rng.choice(("right", "left")))     # right-ventricular focus: LBBB-like; left: RBBB-like
    precordial = (-1.0, -0.8, -0.3, 0.3, 0.8, 1.0) if origin == "right" else (1.0, 0.8, 0.4, -0.2, -0.6, -0.8)
    magnitude = rng.uniform(1.2, 1.8)
    axis = rng.uniform(-90.0, 180.0)
    e = np.concatenate([_frontal(1.0, axis), precordial]) * magnitude
    waves = {
        "QRS": Wave(r - 0.06, 0.06, 0.07, e),
        "notch": Wave(r, 0.04, 0.05, -0.4 * e),
        "T": Wave(r + 0.12, 0.14, 0.08, -0.35 * e),
    }
    beats = list(sinus.beats)
    beats[k] = Beat(r=r, kind="V", gain=1.0, waves=waves)
    return _Change(beats, details={"beat": k, "coupling": float(coupling), "origin": origin})


def _af(sinus: _Sinus, rng: np.random.Generator) -> _Change:
    """Atrial fibrillation: irregularly irregular ventricular rhythm (lognormal RR, 70-110 bpm), no P waves, and
    fibrillatory f-waves (a few incommensurate 4-8 Hz components), largest in V1 and the inferior leads.

    The rhythm itself changes, so every sample differs from the twin: the mask is the whole record, all leads.
    Morphology, baseline wander and noise are the twin's.
    """
    rate = rng.uniform(70.0, 110.0)
    rr, spread = 60.0 / rate, rng.uniform(0.2, 0.3)
    times = _rr_times(rng, sinus.duration_s, -rng.uniform(0.0, 1.0) * rr, lambda t, e: rr * np.exp(spread * e),
                      min_rr=0.4)
    beats = [_beat(sinus.template, t, sinus.gain_at(t), skip=("P",)) for t in times]
    t = np.arange(sinus.background.shape[1]) / sinus.fs
    freqs, phases = rng.uniform(4.0, 8.0, (3, 1)), rng.uniform(0, 2 * np.pi, (3, 1))
    source = (rng.uniform(0.5, 1.0, (3, 1)) * np.sin(2 * np.pi * freqs * t + phases)).sum(axis=0)
    source *= rng.uniform(0.06, 0.15) / np.abs(source).max()
    weights = np.array([0.2, 0.6, 1.0, 0.7, 0.45, 0.35, 0.3, 0.25])     # aVL = I - II/2 keeps some too
    return _Change(beats, additive=weights[:, None] * source, whole_record=True,
                   details={"ventricular_rate": float(rate)})


def _noise_burst(sinus: _Sinus, rng: np.random.Generator) -> _Change:
    """Electrode-motion / muscle artefact: 0.4-1.0 s of large (0.3-0.6 mV rms, peaks of 1-2 mV) 2-40 Hz noise on
    1-3 adjacent chest leads, faded in and out so it has no step; the heart is untouched."""
    fs, n = sinus.fs, sinus.background.shape[1]
    n_leads = int(rng.integers(1, 4))
    leads = 2 + int(rng.integers(0, 7 - n_leads)) + np.arange(n_leads)
    length = int(rng.uniform(0.4, 1.0) * fs)
    start = int(rng.uniform(0.5, sinus.duration_s - 1.5) * fs)
    pad = int(0.5 * fs)        # filter transients fall in the discarded padding
    sos = sps.butter(4, [2.0, 40.0], btype="bandpass", fs=fs, output="sos")
    noise = sps.sosfiltfilt(sos, rng.standard_normal((n_leads, length + 2 * pad)))[:, pad:-pad]
    noise *= rng.uniform(0.3, 0.6, (n_leads, 1)) / noise.std(axis=1, keepdims=True)
    envelope = sps.windows.tukey(length + 2, alpha=0.3)[1:-1]      # strictly positive on the burst
    additive = np.zeros((8, n))
    additive[leads, start:start + length] = noise * envelope
    return _Change(list(sinus.beats), additive=additive, additive_mask=_derive_mask(additive != 0),
                   details={"leads": [INDEPENDENT_LEADS[i] for i in leads]})


_ANOMALIES: dict[str, Callable[[_Sinus, np.random.Generator], _Change]] = {
    "pvc": _pvc, "st_elevation": partial(_st_shift, sign=+1.0),
    "st_depression": partial(_st_shift, sign=-1.0), "t_inversion": _t_inversion,
    "wide_qrs": _wide_qrs, "af": _af, "noise_burst": _noise_burst,
}
assert tuple(_ANOMALIES) == ANOMALY_TYPES


# ---------------------------------------------------------------------------------------------- public API
@dataclass
class SynthECG:
    """A synthetic ECG and its ground truth.

    ``signal`` (12, samples) float32 mV in ``LEADS`` order; ``mask`` (12, samples) bool, True exactly where the
    anomaly changed the signal (all False for a clean record); ``r_peaks`` sample indices of every QRS inside the
    record and ``beat_types`` one character per peak ('N' conducted, 'V' ventricular ectopic); ``details`` the
    drawn parameters that matter downstream (heart rate, lead group, variant, ...).
    """

    signal: np.ndarray
    fs: float
    lead_names: tuple[str, ...]
    mask: np.ndarray
    anomaly: str | None
    r_peaks: np.ndarray
    beat_types: str
    seed: int
    details: dict[str, Any]

    def to_record(self, record_id: str = "") -> Record:
        return Record(signal=self.signal, fs=self.fs, lead_names=self.lead_names,
                      record_id=record_id or f"synth-{self.seed}",
                      metadata={"anomaly": self.anomaly or "none", "synth_seed": self.seed, **self.details})


def _render(waves: list[Wave], n: int, fs: float) -> np.ndarray:
    out = np.zeros((len(INDEPENDENT_LEADS), n))
    for w in waves:
        sl, prof = w.support(n, fs)
        out[:, sl] += w.amps[:, None] * prof
    return out


def _combined(sinus: _Sinus, kinds: list[str], rng: np.random.Generator) -> _Change:
    """Several anomalies in one record, each applied to the beats the previous one left, their additive signals
    summed; ``details`` holds each kind's own. Order matters where one replaces beats another reshapes: a PVC is
    applied last among the beat changes, since its ectopic beat has no Q, R, S for a later change to move."""
    change = _Change(sinus.beats, details={})
    for kind in kinds:
        step = _ANOMALIES[kind](replace(sinus, beats=change.beats), rng)
        masks = [m for m in (change.additive_mask, step.additive_mask) if m is not None]
        change = _Change(step.beats,
                         additive=step.additive if change.additive is None else
                         change.additive if step.additive is None else change.additive + step.additive,
                         additive_mask=np.logical_or.reduce(masks) if masks else None,
                         whole_record=change.whole_record or step.whole_record,
                         details={**change.details, kind: step.details})
    return change


def generate_ecg(seed: int, anomaly: str | None = None, fs: float = MODEL_FS, duration_s: float = 10.0) -> SynthECG:
    """One synthetic 12-lead ECG; the same ``seed`` with and without ``anomaly`` gives twins (module docstring).

    ``anomaly`` may combine kinds with ``+`` (``"st_elevation+pvc"``, applied in that order; `_combined`), the
    details then keyed by kind."""
    kinds = anomaly.split("+") if anomaly else []
    if any(kind not in _ANOMALIES for kind in kinds):
        raise ValueError(f"unknown anomaly {anomaly!r}; known: {ANOMALY_TYPES} (combined with '+')")
    n = int(round(duration_s * fs))
    main_ss, anomaly_ss = np.random.SeedSequence(seed).spawn(2)
    sinus = _draw_sinus(np.random.default_rng(main_ss), fs, n)
    rng = np.random.default_rng(anomaly_ss)
    change = (_Change(sinus.beats) if not kinds else _ANOMALIES[kinds[0]](sinus, rng) if len(kinds) == 1
              else _combined(sinus, kinds, rng))

    waves = [w for b in change.beats for w in b.waves.values()]
    x8 = _render(waves, n, fs) + sinus.background
    mask = np.zeros((len(LEADS), n), dtype=bool)
    if change.whole_record:
        mask[:] = True
    else:    # the supports of removed and added waves, on the leads (derived ones included) where they are non-zero
        clean = [w for b in sinus.beats for w in b.waves.values()]
        clean_ids, new_ids = {id(w) for w in clean}, {id(w) for w in waves}
        changed = [w for w in clean if id(w) not in new_ids] + [w for w in waves if id(w) not in clean_ids]
        for w in changed:
            mask[derive_limb_leads(w.amps[:, None])[:, 0] != 0, w.support(n, fs)[0]] = True
    if change.additive is not None:
        x8 = x8 + change.additive
        if change.additive_mask is not None:
            mask |= change.additive_mask

    peaks = [(int(round(b.r * fs)), b.kind) for b in change.beats if 0 <= round(b.r * fs) < n]
    return SynthECG(
        signal=derive_limb_leads(x8).astype(np.float32),
        fs=float(fs),
        lead_names=LEADS,
        mask=mask,
        anomaly=anomaly,
        r_peaks=np.array([p for p, _ in peaks], dtype=np.int64),
        beat_types="".join(k for _, k in peaks),
        seed=int(seed),
        details={"heart_rate": float(sinus.heart_rate), "axis_deg": float(sinus.axis_deg) + _FRONTAL["R"][1],
                 **change.details},
    )
