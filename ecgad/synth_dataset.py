"""Write synthetic ECGs (``ecgad.synth``) as a PTB-XL root, so every job reads synthetic and real data alike.

Layout (``out/``), the same as PhysioNet's PTB-XL release plus the ground truth::

    ptbxl_database.csv    PTB-XL's columns that matter (ecg_id, patient_id, age, sex, report, scp_codes,
                          burst_noise, extra_beats, strat_fold, filename_lr, filename_hr) + anomaly, anomaly_detail,
                          mask_path, synth_seed
    scp_statements.csv    the official rows (official column layout) of every SCP code used here
    labels.csv            the same derived table as ../shared/data/ptbxl/labels.csv
    records500/00000/00001_hr.hea/.dat   WFDB format 16, 1000 adu/mV, leads I II III AVR AVL AVF V1..V6, 500 Hz
    records100/00000/00001_lr.hea/.dat   only with ``lowres=True``: the same at 100 Hz (polyphase-decimated, as
                                         PTB-XL's are). Off by default because ``wfdb.wrsamp`` dominates the
                                         write time; without it ``filename_lr`` names a missing file, exactly as
                                         in ../shared/data, whose loaders use the rate that exists.
    masks/00001.npy       (12, 5000) bool on the 500 Hz axis, True where the anomaly changed the signal

``synth_seed`` regenerates a record with ``generate_ecg(synth_seed, anomaly)`` and its clean twin with
``generate_ecg(synth_seed)`` (``source="deepfake"``: ``ecgad.deepfake.deepfake_ecgs([synth_seed], [anomaly])``).

SCP codes are real PTB-XL statements chosen so that the project's label rule (normal iff the diagnostic
superclasses are exactly {NORM}; no diagnostic statement -> abnormal) gives normal for clean records and abnormal
for every anomaly: clean {NORM, SR}; ST elevation -> inferior/anterior/lateral MI (IMI/AMI/LMI, superclass MI) +
STE_; ST depression and T inversion -> ischaemia in the group's leads (ISCIN/ISCAN/ISCLA, STTC) + STD_ or INVT;
wide QRS -> CRBBB/CLBBB (CD); PVC -> PVC and AF -> AFIB, form/rhythm statements only, so abnormal by the
"no diagnostic statement" rule. A noise burst is an artefact, not a disease: its record carries no NORM statement
(only SR, so the rule makes it abnormal, the class we want a detector to flag) and names the leads in PTB-XL's
``burst_noise`` column.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pandas as pd
import wfdb
from scipy.signal import resample_poly

from ecgad.deepfake import deepfake_ecgs
from ecgad.ptbxl import MASK_DIR
from ecgad.synth import ANOMALY_TYPES, SynthECG, generate_ecg

#: PTB-XL spells the augmented leads in capitals in its WFDB headers.
PTBXL_LEAD_NAMES = ("I", "II", "III", "AVR", "AVL", "AVF", "V1", "V2", "V3", "V4", "V5", "V6")
FS_HR, FS_LR = 500, 100
#: Where ``write_dataset`` draws its ECGs from.
SOURCES = ("simple", "deepfake")
#: Folds cycle in this order, so with few records the validation (9) and test (10) folds fill first.
FOLD_ORDER = (10, 9, 1, 2, 3, 4, 5, 6, 7, 8)

#: The official PTB-XL 1.0.3 ``scp_statements.csv`` rows of the codes used here, verbatim (CC BY 4.0, Wagner et
#: al. 2020); the first header cell is empty, as in the release.
SCP_STATEMENTS_CSV = """\
,description,diagnostic,form,rhythm,diagnostic_class,diagnostic_subclass,Statement Category,SCP-ECG Statement Description,AHA code,aECG REFID,CDISC Code,DICOM Code
NORM,normal ECG,1.0,,,NORM,NORM,Normal/abnormal,normal ECG,1,,,F-000B7
IMI,inferior myocardial infarction,1.0,,,MI,IMI,Myocardial Infarction,inferior myocardial infarction,161,,,
CRBBB,complete right bundle branch block,1.0,,,CD,CRBBB,Intraventricular and intra-atrial Conduction disturbances,(complete) right bundle branch block,106,MDC_ECG_BEAT_RBB_BLK_COMP,C62270,D3-33110
CLBBB,complete left bundle branch block,1.0,,,CD,CLBBB,Intraventricular and intra-atrial Conduction disturbances,(complete) left bundle branch block,104,MDC_ECG_BEAT_LBB_BLK_COMP,C62269,D3-33120 or 122752
AMI,anterior myocardial infarction,1.0,,,MI,AMI,Myocardial Infarction,anterior myocardial infarction,160,,,
ISCIN,ischemic in inferior leads,1.0,,,STTC,ISCI,ischemic ST-T changes,in inferior leads,,,,
LMI,lateral myocardial infarction,1.0,,,MI,LMI,Myocardial Infarction,lateral myocardial infarction,163,,,
ISCLA,ischemic in lateral leads,1.0,,,STTC,ISCA,ischemic ST-T changes,in lateral leads,,,,
ISCAN,ischemic in anterior leads,1.0,,,STTC,ISCA,ischemic ST-T changes,in anterior leads,,,,
PVC,ventricular premature complex,,1.0,,,,Statements related to ectopic rhythm abnormalities,ventricular premature complex (beat),60,MDC_ECG_BEAT_V_P_C,,
STD_,non-specific ST depression,,1.0,,,,Basic roots for coding ST-T changes and abnormalities,non-specific ST depression,502,,,F-38278
INVT,inverted T-waves,,1.0,,,,other ST-T descriptive statements,inverted T-waves,367,,,
STE_,non-specific ST elevation,,1.0,,,,Basic roots for coding ST-T changes and abnormalities,non-specific ST elevation,501,MDC_ECG_RHY_STELVATION,,F-38277
SR,sinus rhythm,,,1.0,,,Statements related to impulse formation (abnormalities),sinus rhythm,20,MDC_ECG_RHY_SINUS_RHY,,
AFIB,atrial fibrillation,,,1.0,,,Statements related to impulse formation (abnormalities),atrial fibrillation,50,MDC_ECG_RHY_ATR_FIB,,D3-31520
"""

_MI_BY_GROUP = {"inferior": "IMI", "anterior": "AMI", "lateral": "LMI"}
_ISCHEMIA_BY_GROUP = {"inferior": "ISCIN", "anterior": "ISCAN", "lateral": "ISCLA"}


def _kind_codes(kind: str | None, d: dict) -> dict[str, float]:
    """The statements of one anomaly kind with its drawn details ``d`` (module docstring says why these)."""
    return {
        None: lambda: {"NORM": 100.0},
        "st_elevation": lambda: {_MI_BY_GROUP[d["group"]]: 100.0, "STE_": 100.0},
        "st_depression": lambda: {_ISCHEMIA_BY_GROUP[d["group"]]: 100.0, "STD_": 100.0},
        "t_inversion": lambda: {_ISCHEMIA_BY_GROUP[d["group"]]: 100.0, "INVT": 100.0},
        "wide_qrs": lambda: {"CRBBB" if d["variant"] == "rbbb" else "CLBBB": 100.0},
        "pvc": lambda: {"PVC": 100.0},
        "af": lambda: {"AFIB": 100.0},
        "noise_burst": lambda: {},
    }[kind]()


def _kinds(ecg: SynthECG) -> list[tuple[str | None, dict]]:
    """``(kind, its details)`` of each anomaly of ``ecg`` (one ``(None, details)`` for a clean record)."""
    kinds = ecg.anomaly.split("+") if ecg.anomaly else [None]
    return [(kind, ecg.details if len(kinds) == 1 else ecg.details[kind]) for kind in kinds]


def scp_codes(ecg: SynthECG) -> dict[str, float]:
    """PTB-XL ``scp_codes`` (statement -> likelihood) for a synthetic ECG: every one of its kinds' statements, and
    sinus rhythm unless one of them is atrial fibrillation."""
    kinds = _kinds(ecg)
    codes = {code: value for kind, d in kinds for code, value in _kind_codes(kind, d).items()}
    return codes if any(kind == "af" for kind, _ in kinds) else {**codes, "SR": 0.0}


def diagnostic_superclasses(codes: dict[str, float], statements: pd.DataFrame) -> set[str]:
    """The project's rule (``../shared/data/README.md``): diagnostic classes over all keys, likelihood ignored."""
    diagnostic = statements[statements["diagnostic"] == 1.0]
    return {str(diagnostic.loc[c, "diagnostic_class"]) for c in codes if c in diagnostic.index}


def _anomaly_detail(ecg: SynthECG) -> str:
    return "+".join(str(d.get("group") or d.get("variant") or d.get("origin") or "-".join(d.get("leads", [])))
                    for _, d in _kinds(ecg))


def _record_path(rate_dir: str, ecg_id: int, suffix: str) -> str:
    return f"{rate_dir}/{ecg_id // 1000 * 1000:05d}/{ecg_id:05d}_{suffix}"


def _write_wfdb(root: Path, rel: str, signal: np.ndarray, fs: int) -> None:
    folder = (root / rel).parent
    folder.mkdir(parents=True, exist_ok=True)
    wfdb.wrsamp(Path(rel).name, fs=fs, units=["mV"] * len(PTBXL_LEAD_NAMES), sig_name=list(PTBXL_LEAD_NAMES),
                p_signal=signal.T.astype(np.float64), fmt=["16"] * len(PTBXL_LEAD_NAMES),
                adc_gain=[1000.0] * len(PTBXL_LEAD_NAMES), baseline=[0] * len(PTBXL_LEAD_NAMES),
                write_dir=str(folder))


def _assignments(n: int, anomaly_fraction: float, anomaly_types: tuple[str, ...],
                 rng: np.random.Generator) -> tuple[list[str | None], list[int]]:
    """Anomaly (types balanced) and fold of every record; folds cycle FOLD_ORDER separately over normals and
    anomalies so both reach every fold as soon as there are enough of each."""
    n_anomalous = int(round(n * anomaly_fraction))
    anomalies: list[str | None] = [anomaly_types[i % len(anomaly_types)] for i in range(n_anomalous)]
    anomalies += [None] * (n - n_anomalous)
    anomalies = [anomalies[i] for i in rng.permutation(n)]
    return anomalies, _folds([a is not None for a in anomalies])


def _folds(groups: list) -> list[int]:
    """A fold per record: FOLD_ORDER cycled over the members of each group separately (stratified folds)."""
    folds = [0] * len(groups)
    for group in dict.fromkeys(groups):
        for j, i in enumerate(i for i, g in enumerate(groups) if g == group):
            folds[i] = FOLD_ORDER[j % len(FOLD_ORDER)]
    return folds


#: The long-tail mix: anomaly kinds and combinations, most to least common; the r-th (from 1) makes up a share
#: of the anomalous records proportional to ``r ** -LONG_TAIL_EXPONENT`` (a power law). Noise bursts are left out:
#: an artefact is not a diagnosis.
LONG_TAIL_KINDS = ("st_depression", "t_inversion", "wide_qrs", "st_elevation", "pvc", "af", "st_elevation+pvc",
                   "wide_qrs+pvc", "af+st_depression")
LONG_TAIL_EXPONENT = 2.0


def long_tail_assignments(n: int, anomaly_fraction: float, rng: np.random.Generator
                          ) -> tuple[list[str | None], list[int]]:
    """Anomalies with power-law prevalence (`LONG_TAIL_KINDS`; every kind at least once) and folds stratified by
    kind, so the rarest kinds reach the test (10) and validation (9) folds first."""
    weights = np.arange(1, len(LONG_TAIL_KINDS) + 1, dtype=np.float64) ** -LONG_TAIL_EXPONENT
    counts = np.maximum(1, np.round(n * anomaly_fraction * weights / weights.sum()).astype(int))
    anomalies: list[str | None] = [k for k, c in zip(LONG_TAIL_KINDS, counts) for _ in range(c)]
    if len(anomalies) > n:
        raise ValueError(f"{n} records cannot hold every long-tail kind at the fraction {anomaly_fraction}")
    anomalies += [None] * (n - len(anomalies))
    anomalies = [anomalies[i] for i in rng.permutation(n)]
    return anomalies, _folds(anomalies)


def write_dataset(out: str | Path, n: int, seed: int = 0, anomaly_fraction: float = 0.3,
                  anomaly_types: tuple[str, ...] = ANOMALY_TYPES, lowres: bool = False,
                  source: str = "simple", long_tail: bool = False) -> Path:
    """Write ``n`` synthetic 10 s 12-lead ECGs as a PTB-XL root at ``out`` (module docstring); returns ``out``.

    A fraction ``anomaly_fraction`` of the records (rounded) carries one anomaly each, the types in
    ``anomaly_types`` taking turns; ``lowres`` also writes the 100 Hz files. ``long_tail``: the anomalies follow
    `long_tail_assignments` instead (kinds and combinations with power-law prevalence, for the diagnosis
    benchmark; ``anomaly_types`` is not used). Deterministic in ``seed``.
    ``source`` draws the ECGs: ``"simple"`` the wave model of `ecgad.synth`, ``"deepfake"`` DeepFake ECG normals
    (`ecgad.deepfake`) with the anomalies inserted by `ecgad.inject`.
    """
    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}; got {source!r}")
    unknown = set(anomaly_types) - set(ANOMALY_TYPES)
    if unknown or not anomaly_types:
        raise ValueError(f"anomaly_types must be a non-empty subset of {ANOMALY_TYPES}; got {anomaly_types}")
    if not 0.0 <= anomaly_fraction <= 1.0:
        raise ValueError(f"anomaly_fraction must lie in [0, 1]; got {anomaly_fraction}")
    root = Path(out)
    (root / MASK_DIR).mkdir(parents=True, exist_ok=True)
    (root / "scp_statements.csv").write_text(SCP_STATEMENTS_CSV)
    statements = pd.read_csv(io.StringIO(SCP_STATEMENTS_CSV), index_col=0)

    layout = np.random.default_rng(np.random.SeedSequence([seed, 0]))
    anomalies, folds = (long_tail_assignments(n, anomaly_fraction, layout) if long_tail
                        else _assignments(n, anomaly_fraction, tuple(anomaly_types), layout))
    record_seeds = [int(np.random.SeedSequence([seed, i + 1]).generate_state(1)[0]) for i in range(n)]
    ecgs = (deepfake_ecgs(record_seeds, anomalies) if source == "deepfake"
            else (generate_ecg(s, a, fs=FS_HR) for s, a in zip(record_seeds, anomalies)))
    rows, labels = [], []
    for i, (anomaly, fold, record_seed, ecg) in enumerate(zip(anomalies, folds, record_seeds, ecgs)):
        ecg_id = i + 1
        hr, lr = _record_path("records500", ecg_id, "hr"), _record_path("records100", ecg_id, "lr")
        _write_wfdb(root, hr, ecg.signal, FS_HR)
        if lowres:
            _write_wfdb(root, lr, resample_poly(ecg.signal, FS_LR, FS_HR, axis=1), FS_LR)
        mask_path = f"{MASK_DIR}/{ecg_id:05d}.npy"
        np.save(root / mask_path, ecg.mask)

        codes = scp_codes(ecg)
        superclasses = diagnostic_superclasses(codes, statements)
        rows.append({
            "ecg_id": ecg_id, "patient_id": float(ecg_id), "age": float(layout.integers(18, 90)),
            "sex": int(layout.integers(0, 2)), "report": f"synthetic ecg: {anomaly or 'normal'}",
            "scp_codes": str(codes),
            "burst_noise": "-".join(ecg.details["leads"]) if anomaly == "noise_burst" else "",
            "extra_beats": "VES" if "pvc" in (anomaly or "").split("+") else "",
            "strat_fold": fold, "filename_lr": lr, "filename_hr": hr,
            "anomaly": anomaly or "none", "anomaly_detail": _anomaly_detail(ecg) if anomaly else "",
            "mask_path": mask_path, "synth_seed": record_seed,
        })
        labels.append({
            "ecg_id": ecg_id, "patient_id": float(ecg_id), "strat_fold": fold, "sampling_rate_hz": FS_HR,
            "record_path": hr, "diagnostic_superclasses": "|".join(sorted(superclasses)),
            "norm_only": int(superclasses == {"NORM"}), "has_norm": int("NORM" in superclasses),
            "label": "normal" if superclasses == {"NORM"} else "abnormal", "scp_codes": str(codes),
            "source": f"{'ecgad.deepfake' if source == 'deepfake' else 'ecgad.synth'} seed={record_seed} anomaly={anomaly or 'none'}",
        })
    pd.DataFrame(rows).to_csv(root / "ptbxl_database.csv", index=False)
    pd.DataFrame(labels).to_csv(root / "labels.csv", index=False)
    return root

