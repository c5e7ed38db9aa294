"""DICOM waveforms (12-lead ECG, General ECG and Ambulatory ECG Waveform Storage), read with ``pydicom``.

The rhythm multiplex group is read, never the median beat (a group labelled ``MEDIAN``/``REPRESENTATIVE`` or
marked ``DERIVED``). pydicom applies each channel's sensitivity, correction factor and baseline; the
sensitivity unit (UCUM: ``uV``, ``mV``) gives the factor to mV. Lead names come from the channel source code
(SCPECG ``5.6.3-9-N`` or MDC ``2:N`` codes), else from its meaning (``Lead I (Einthoven)`` -> ``I``). The waveform
data's length is compared with channels x samples x bytes before decoding. Trailing samples that hold the
padding value in every channel are cut (padding fills a group up to its length; a padding value inside the
signal is not trusted: the ECGToolkit sample declares 0, an ordinary sample value). Waveform annotations naming
a pacemaker become a warning.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np

from ecgad.formats.common import Decoded, check_declared_bytes, median_beat_only, unit_to_mv
from ecgad.limits import LIMITS, InputLimits
from ecgad.types import Rejection

#: SOP classes holding ECG waveforms.
ECG_SOP_CLASSES: dict[str, str] = {
    "1.2.840.10008.5.1.4.1.1.9.1.1": "12-lead ECG", "1.2.840.10008.5.1.4.1.1.9.1.2": "General ECG",
    "1.2.840.10008.5.1.4.1.1.9.1.3": "Ambulatory ECG",
}

#: Lead numbers of the SCP-ECG lead code table, used by both the SCPECG (``5.6.3-9-N``) and MDC (``2:N``) codes.
_LEAD_NUMBERS: dict[int, str] = {1: "I", 2: "II", 3: "V1", 4: "V2", 5: "V3", 6: "V4", 7: "V5", 8: "V6",
                                 61: "III", 62: "aVR", 63: "aVL", 64: "aVF"}
_LEAD_CODE = re.compile(r"^(?:5\.6\.3-9-|2:)(\d+)$")
_MEDIAN_LABELS = ("MEDIAN", "REPRESENTATIVE", "AVERAGE")


def read(path: Path, limits: InputLimits = LIMITS) -> Decoded:
    import pydicom
    from pydicom.errors import BytesLengthException, InvalidDicomError

    try:
        with warnings.catch_warnings():        # invalid UIDs and similar value warnings: the waveform is intact
            warnings.simplefilter("ignore")
            return _decode(pydicom.dcmread(path), path, limits)
    except (EOFError, OSError) as exc:         # pydicom's "No tag to read at file position": data ends early
        raise Rejection("truncated", "", f"{path.name}: DICOM data ends before its elements do: {exc}") from None
    except NotImplementedError as exc:         # an unknown value representation, mu-law / A-law samples
        raise Rejection("bad_file", "dicom_unsupported", f"{path.name}: {exc}") from None
    except (InvalidDicomError, BytesLengthException, ValueError, KeyError, TypeError, IndexError,
            AttributeError) as exc:
        raise Rejection("bad_file", "dicom", f"{path.name}: malformed DICOM: {exc}") from None


def _decode(dataset, path: Path, limits: InputLimits) -> Decoded:
    """The rhythm group of a parsed dataset. pydicom converts elements when they are first accessed, so anything
    here may raise what `read` maps to a rejection."""
    from pydicom.waveforms.numpy_handler import multiplex_array

    sop_class = str(dataset.get("SOPClassUID", ""))
    if sop_class not in ECG_SOP_CLASSES:
        raise Rejection("bad_file", "dicom_not_ecg", f"{path.name}: SOP class {sop_class or '?'} is not an ECG")
    groups = list(dataset.get("WaveformSequence") or [])
    rhythm = [i for i, group in enumerate(groups) if not _is_median(group)]
    if not rhythm:
        if groups:
            raise median_beat_only("DICOM median multiplex group")
        raise Rejection("bad_file", "no_waveform", f"{path.name}: no WaveformSequence")
    index, group = rhythm[0], groups[rhythm[0]]
    channels = list(group.ChannelDefinitionSequence)
    declared = int(group.NumberOfWaveformChannels) * int(group.NumberOfWaveformSamples) \
        * int(group.WaveformBitsAllocated) // 8
    check_declared_bytes(len(group.WaveformData), declared, path.name)
    limits.check_declared(int(group.NumberOfWaveformChannels), int(group.NumberOfWaveformSamples),
                          float(group.SamplingFrequency))
    signal = multiplex_array(dataset, index, as_raw=False).T.astype(np.float64)
    padding = group.get("WaveformPaddingValue")
    if padding is not None:
        signal = signal[:, :_unpadded_length(multiplex_array(dataset, index, as_raw=True).T, padding)]
    units = [unit_to_mv(ch.ChannelSensitivityUnitsSequence[0].CodeValue
                        if "ChannelSensitivityUnitsSequence" in ch else None) for ch in channels]
    decoded = Decoded(signal * np.array(units)[:, None], float(group.SamplingFrequency),
                      [_lead_name(ch) for ch in channels],
                      {"format": "dicom", "sop_class": ECG_SOP_CLASSES[sop_class],
                       "multiplex_group": str(group.get("MultiplexGroupLabel", ""))})
    decoded.warn_several_series(len(rhythm))
    decoded.warn_pacemaker(_pacemaker_annotations(dataset), "DICOM waveform annotations")
    return decoded


def _unpadded_length(raw: np.ndarray, padding: bytes) -> int:
    """Samples before the trailing run where every channel holds the padding value."""
    real = np.flatnonzero(~np.all(raw == int.from_bytes(padding, "little", signed=True), axis=0))
    return int(real[-1]) + 1 if real.size else 0


def _is_median(group) -> bool:
    label = str(group.get("MultiplexGroupLabel", "")).upper()
    return any(word in label for word in _MEDIAN_LABELS) or (
        not label.startswith("RHYTHM") and str(group.get("WaveformOriginality", "")).upper() == "DERIVED")


def _lead_name(channel) -> str | None:
    """A name `ecgad.leads` understands for a channel: from its source code, else from the code's meaning."""
    sources = channel.get("ChannelSourceSequence") or []
    if not sources:
        return str(channel.get("ChannelLabel", "")) or None
    source = sources[0]
    match = _LEAD_CODE.match(str(source.get("CodeValue", "")).strip())
    if match and int(match.group(1)) in _LEAD_NUMBERS:
        return _LEAD_NUMBERS[int(match.group(1))]
    return re.sub(r"\s*\(.*\)\s*$", "", str(source.get("CodeMeaning", ""))) or None


def _pacemaker_annotations(dataset) -> int:
    count = 0
    for annotation in dataset.get("WaveformAnnotationSequence") or []:
        texts = [str(annotation.get("UnformattedTextValue", ""))]
        texts += [str(code.get("CodeMeaning", "")) for code in annotation.get("ConceptNameCodeSequence") or []]
        count += any("pace" in text.lower() for text in texts)
    return count
