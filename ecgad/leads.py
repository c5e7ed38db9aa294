"""Lead names: map whatever a file calls its channels onto the canonical 12-lead order (`ecgad.types.LEADS`).

Files name leads inconsistently (PTB-XL ``AVR``, CinC ``aVR``, PTB ``avr``; European ``C1..C6`` for ``V1..V6``), and
some carry channels the model does not use (Frank ``vx vy vz``, right-sided / posterior chest leads). Everything
downstream indexes leads by position, so every reader funnels its channels through `standardize_leads` once.

Accepted spellings (case-insensitive, surrounding whitespace ignored, optional ``lead`` prefix as in ``Lead II``,
``LEAD_aVR``): the 12 standard names and ``C1``-``C6`` for ``V1``-``V6``. Nothing cleverer on purpose: a guess
such as ``MLII`` -> ``II`` or ``-aVR`` -> ``aVR`` would silently change the signal the model sees.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

from ecgad.types import LEADS, Rejection

_CANONICAL: dict[str, str] = {name.lower(): name for name in LEADS}
_CANONICAL.update({f"c{i}": f"V{i}" for i in range(1, 7)})

#: Channels that real 12-lead files carry next to the standard leads and that are dropped, not rejected:
#: Frank orthogonal leads (PTB ``vx vy vz``; ``x y z`` elsewhere) and right-sided / posterior chest leads of
#: 15- and 18-lead ECGs.
EXTRA_CHANNELS: frozenset[str] = frozenset({"vx", "vy", "vz", "x", "y", "z", "v3r", "v4r", "v5r", "v7", "v8", "v9"})

_LEAD_PREFIX = re.compile(r"^lead[\s_-]*")

#: Limb leads that can be computed from I and II (Einthoven / Goldberger), as (I, II) coefficients.
_DERIVABLE: dict[str, tuple[float, float]] = {
    "III": (-1.0, 1.0),     # III = II - I
    "aVR": (-0.5, -0.5),    # aVR = -(I + II) / 2
    "aVL": (1.0, -0.5),     # aVL = I - II / 2
    "aVF": (-0.5, 1.0),     # aVF = II - I / 2
}


def canonical_lead_name(name: str | None) -> str | None:
    """The canonical name (an element of `LEADS`) for a channel name, or None for a known extra channel.

    Raises ``Rejection("unknown_lead", name)`` for anything else, including an unnamed channel: a channel we cannot
    identify might be a standard lead under a name we do not know, so it is safer to refuse than to drop it.
    """
    key = _LEAD_PREFIX.sub("", (name or "").strip().lower())
    if key in _CANONICAL:
        return _CANONICAL[key]
    if key in EXTRA_CHANNELS:
        return None
    raise Rejection("unknown_lead", name.strip() if name and name.strip() else "<unnamed>")


def standardize_leads(signal: np.ndarray, lead_names: Sequence[str | None]) -> tuple[np.ndarray, tuple[str, ...]]:
    """Reorder ``signal`` ``(len(lead_names), samples)`` (float32, mV) into `LEADS` order ``(12, samples)``.

    Extra channels are dropped; III, aVR, aVL and aVF are derived from I and II when absent (a record exported as
    I, II, V1-V6 carries the same information). Returns the new array (float32, mV) and the names of the derived
    leads, which readers keep in the metadata so a user can tell measured from computed leads.

    Rejections: ``unknown_lead:<name>``, ``bad_shape:duplicate:<lead>`` (two channels claim the same lead; which
    one is right cannot be known), ``missing_lead:<lead>`` (the first lead that is absent and not derivable; the
    message names all of them).
    """
    index: dict[str, int] = {}
    for i, name in enumerate(lead_names):
        lead = canonical_lead_name(name)
        if lead is None:
            continue
        if lead in index:
            raise Rejection("bad_shape", f"duplicate:{lead}", f"two channels map to lead {lead}: {lead_names}")
        index[lead] = i

    derived = tuple(lead for lead in LEADS if lead not in index and lead in _DERIVABLE)
    if derived and not {"I", "II"} <= index.keys():
        absent = [lead for lead in LEADS if lead not in index]
        raise Rejection("missing_lead", "I" if "I" not in index else "II",
                        f"missing: {', '.join(absent)}; III, aVR, aVL and aVF can only be derived from I and II")
    missing = [lead for lead in LEADS if lead not in index and lead not in _DERIVABLE]
    if missing:
        raise Rejection("missing_lead", missing[0], f"missing and not derivable: {', '.join(missing)} "
                                                    f"(present: {', '.join(sorted(index, key=LEADS.index))})")

    out = np.empty((len(LEADS), signal.shape[1]), dtype=np.float32)
    for row, lead in enumerate(LEADS):
        if lead in index:
            out[row] = signal[index[lead]]
        else:
            c1, c2 = _DERIVABLE[lead]
            out[row] = c1 * signal[index["I"]] + c2 * signal[index["II"]]
    return out, derived
