"""Hospital ECG formats: DICOM waveform, HL7 aECG, GE MUSE XML, Philips XML, SCP-ECG and EDF/EDF+.

`ecgad.io.read_record` sends every file that is not WFDB, CSV or NPY here: `sniff_format` recognizes the format
from the file's content (magic bytes, or the XML root element), whatever its name, and `decode` runs that format's
reader, which returns a `Decoded` rhythm waveform in mV; `ecgad.io` then maps its leads onto `LEADS` like any other
record. One module per format; each imports its library only when a file of that format is read, so a process
that reads only WFDB never loads pydicom or ecgdatakit. See docs/formats.md for what each reader keeps and refuses,
and which library is behind it.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from ecgad.formats.common import Decoded
from ecgad.formats.safe_xml import root_name
from ecgad.limits import LIMITS, InputLimits
from ecgad.types import Rejection

#: Format name -> module of this package holding its ``read(path) -> Decoded``.
READERS: dict[str, str] = {"dicom": "dicom", "hl7_aecg": "hl7_aecg", "ge_muse": "muse", "philips": "philips",
                           "scp_ecg": "scp", "edf": "edf"}

#: Formats whose reader takes the limits: headers that declare channel and sample counts, or samples as text.
_DECLARING = frozenset({"dicom", "edf", "scp_ecg", "hl7_aecg"})

#: XML root element -> format.
_XML_ROOTS: dict[str, str] = {"AnnotatedECG": "hl7_aecg", "RestingECG": "ge_muse", "restingecgdata": "philips"}

#: Bytes read to recognize a format (an XML prolog with comments or a DOCTYPE can push the root element back).
SNIFF_BYTES = 8192

#: The usual suffix of each format, for writing an upload to a temporary file before `ecgad.io.read_record`.
SUFFIXES: dict[str, str] = {"dicom": ".dcm", "hl7_aecg": ".xml", "ge_muse": ".xml", "philips": ".xml",
                            "scp_ecg": ".scp", "edf": ".edf"}

#: Suffixes that name a file of one of these formats in a folder of records. ``.xml`` files are also sniffed,
#: because a folder may hold other XML (reports, configuration).
NAMED_SUFFIXES = frozenset(SUFFIXES.values()) - {".xml"}


def sniff_format(path: str | Path) -> str | None:
    """The format of the file at ``path`` from its first bytes (`sniff_bytes`), or None (also if unreadable)."""
    try:
        with open(path, "rb") as file:
            return sniff_bytes(file.read(SNIFF_BYTES))
    except OSError:
        return None


def sniff_bytes(head: bytes) -> str | None:
    """The format (a key of `READERS`) of a file starting with ``head`` (its first `SNIFF_BYTES`), or None.

    DICOM: ``DICM`` after the 128-byte preamble. SCP-ECG: ``SCPECG`` in section 0's header (bytes 16-21). EDF and
    EDF+: the version field ``0`` and seven spaces. XML: the root element (``AnnotatedECG``, ``RestingECG``,
    ``restingecgdata``), in UTF-8 or UTF-16. For an upload, this decides the body type from the content.
    """
    if head[128:132] == b"DICM":
        return "dicom"
    if head[16:22] == b"SCPECG":
        return "scp_ecg"
    if head[:8] == b"0       ":
        return "edf"
    return _XML_ROOTS.get(root_name(head) or "")


def is_hospital_ecg_file(path: Path) -> bool:
    """Whether a file in a folder of records is one of these formats: ``.dcm``/``.scp``/``.edf`` by name (a
    truncated copy still counts, so it is reported, not skipped), ``.xml`` by its root element."""
    suffix = path.suffix.lower()
    return suffix in NAMED_SUFFIXES or (suffix == ".xml" and sniff_format(path) is not None)


def decode(path: Path, fmt: str, limits: InputLimits = LIMITS) -> Decoded:
    """Run the reader of ``fmt`` (from `sniff_format`) on ``path``; raises only `Rejection`. Readers whose format
    declares its sizes (DICOM, EDF, SCP-ECG) check them against ``limits`` before decoding, HL7 aECG its sample
    text's length; the other XML formats (base64 samples) are bounded by the file's size, which `ecgad.io` checks
    first."""
    module = importlib.import_module(f"ecgad.formats.{READERS[fmt]}")
    decoded = module.read(path, limits) if fmt in _DECLARING else module.read(path)
    if decoded.signal.ndim != 2 or decoded.signal.shape[1] == 0:
        raise Rejection("bad_file", "no_samples", f"{path.name} holds no samples")
    return decoded
