"""XML for untrusted files: no entity declarations (billion laughs), no external entities or DTD fetching (XXE),
a size limit before parsing, and the root element read from the first bytes to recognize a format.

Every XML reader (HL7 aECG, GE MUSE, Philips) parses through `parse_xml`, which uses ``defusedxml`` (the standard
library's own parser with those features refused), so a hostile file costs at most its own size in memory.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from pathlib import Path

from defusedxml import DefusedXmlException, EntitiesForbidden
from defusedxml.ElementTree import fromstring

from ecgad.types import Rejection

#: The largest XML file parsed. A 12-lead resting ECG in any of these formats is under 2 MB; the element tree of
#: a file takes several times its size in memory, so this bounds a worker's memory per file.
MAX_XML_BYTES: int = 64 * 2**20

#: expat errors that mean the document stopped early ("no element found", "unclosed token", "partial character").
_TRUNCATION_ERRORS = frozenset({3, 5, 6})

_TAG = re.compile(r"<([A-Za-z_][\w.\-]*:)?([A-Za-z_][\w.\-]*)")


def root_name(head: bytes) -> str | None:
    """The root element's local name from a file's first bytes (UTF-8 or UTF-16, with or without BOM), or None.

    Processing instructions, comments and a DOCTYPE come before the root and are skipped (the pattern only
    matches a ``<`` followed by a name).
    """
    if head.startswith((b"\xff\xfe", b"\xfe\xff")):
        text = head.decode("utf-16", errors="ignore")
    elif head.startswith(b"<\x00"):
        text = head.decode("utf-16-le", errors="ignore")
    else:
        text = head.decode("utf-8", errors="ignore").lstrip("\ufeff")
    if not text.lstrip().startswith("<"):
        return None
    match = _TAG.search(text)
    return match.group(2) if match else None


def parse_xml(path: Path) -> ET.Element:
    """The document's root element with namespaces stripped from every tag (the formats' element names are
    unambiguous), or a typed `Rejection`: ``too_large``, ``bad_file:xml_entities`` (any entity declaration, internal
    or external: refused when declared, before anything is expanded or fetched), ``truncated`` (the document stops
    early), ``bad_file:xml`` (not well-formed, or another construct defusedxml refuses). An external DTD named in a
    DOCTYPE is never fetched (expat does not load external subsets).
    """
    size = path.stat().st_size
    if size > MAX_XML_BYTES:
        raise Rejection("too_large", "", f"{path.name}: {size} bytes of XML, the limit is {MAX_XML_BYTES}")
    try:
        root = fromstring(path.read_bytes(), forbid_dtd=False, forbid_entities=True, forbid_external=True)
    except EntitiesForbidden:
        raise Rejection("bad_file", "xml_entities", f"{path.name} declares XML entities (refused)") from None
    except DefusedXmlException as exc:
        raise Rejection("bad_file", "xml", f"{path.name}: refused XML construct: {exc}") from None
    except LookupError as exc:                 # an encoding named in the XML declaration that Python lacks
        raise Rejection("bad_file", "xml", f"{path.name}: {exc}") from None
    except ET.ParseError as exc:
        if exc.code in _TRUNCATION_ERRORS:
            raise Rejection("truncated", "", f"{path.name}: the XML document ends early ({exc})") from None
        raise Rejection("bad_file", "xml", f"{path.name} is not well-formed XML: {exc}") from None
    for element in root.iter():
        if isinstance(element.tag, str) and "}" in element.tag:
            element.tag = element.tag.rsplit("}", 1)[1]
    return root
