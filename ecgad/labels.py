"""PTB-XL's SCP statements as multi-label diagnosis targets, at the benchmark levels of Strodthoff et al. (2020).

A record's ``scp_codes`` (statement -> likelihood) become a set of class names per level, every key counted
whatever its likelihood (as the benchmark's ``compute_label_aggregations`` does):

- ``all``: every statement (71 on full PTB-XL);
- ``diag``: the statements with ``diagnostic == 1`` (44); ``subdiag``: their ``diagnostic_subclass`` (23);
  ``superdiag``: their ``diagnostic_class`` (5);
- ``form``: the statements with ``form == 1`` (19); ``rhythm``: those with ``rhythm == 1`` (12).

The classes of a level are those that occur in the data set (the benchmark fits its label binarizer on every record;
the counts above are full PTB-XL's), in sorted order; a record with no class at a level is left out of that level
(the benchmark drops it too: a record without a rhythm statement says nothing about rhythm).

**Head and tail** are named from the training folds' frequencies: a class is in the tail when fewer than
`TAIL_FRACTION` (1 %) of the level's training records carry it, else in the head.
"""

from __future__ import annotations

import ast
import io
import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ecgad.storage import is_file, join, read_bytes

LEVELS = ("all", "diag", "subdiag", "superdiag", "form", "rhythm")

#: A class carried by fewer than this fraction of a level's training records is a tail class.
TAIL_FRACTION = 0.01

#: The statements table of a PTB-XL root, copied next to shards that carry labels.
STATEMENTS_FILE = "scp_statements.csv"


def read_statements(path: str | Path) -> pd.DataFrame:
    """PTB-XL's ``scp_statements.csv`` (a root, or the file itself; a local path or a URI), indexed by statement."""
    return pd.read_csv(io.BytesIO(read_bytes(path if is_file(path) else join(path, STATEMENTS_FILE))), index_col=0)


def parse_codes(codes: str | Mapping[str, float] | None) -> dict[str, float]:
    """``scp_codes`` as PTB-XL writes it (a Python dict literal), as the shards store it (JSON), or a dict."""
    if codes is None:
        return {}
    if isinstance(codes, Mapping):
        return dict(codes)
    text = codes.strip()
    if not text:
        return {}
    try:
        return dict(json.loads(text))
    except ValueError:
        return dict(ast.literal_eval(text))


def level_classes(codes: Mapping[str, float], statements: pd.DataFrame, level: str) -> set[str]:
    """The classes of one record's ``codes`` at ``level`` (module docstring); unknown statements are ignored."""
    if level not in LEVELS:
        raise ValueError(f"unknown label level {level!r}; known: {LEVELS}")
    known = [c for c in codes if c in statements.index]
    if level == "all":
        return set(known)
    if level in ("form", "rhythm"):
        return {c for c in known if statements.at[c, level] == 1}
    diagnostic = [c for c in known if statements.at[c, "diagnostic"] == 1]
    column = {"diag": None, "subdiag": "diagnostic_subclass", "superdiag": "diagnostic_class"}[level]
    return set(diagnostic) if column is None else {str(statements.at[c, column]) for c in diagnostic}


def vocabulary(all_codes: Iterable[Mapping[str, float]], statements: pd.DataFrame, level: str) -> list[str]:
    """The sorted classes of ``level`` that occur in at least one record of ``all_codes``."""
    return sorted(set().union(*(level_classes(c, statements, level) for c in all_codes)))


def code_map(statements: pd.DataFrame, level: str) -> dict[str, list[str]]:
    """Statement -> its classes at ``level``: a record's classes are the union over its statements, so this small
    map (plain JSON) is all a training worker needs to turn ``scp_codes`` into targets (`targets_from_map`)."""
    return {code: sorted(level_classes({code: 0.0}, statements, level)) for code in statements.index}


def targets_from_map(codes: Sequence[Mapping[str, float]], classes_of: Mapping[str, Sequence[str]],
                     classes: Sequence[str]) -> np.ndarray:
    """``(records, classes)`` float32 targets: 1 where one of the record's statements maps to the class."""
    position = {name: i for i, name in enumerate(classes)}
    targets = np.zeros((len(codes), len(classes)), dtype=np.float32)
    for row, record_codes in enumerate(codes):
        for code in record_codes:
            for name in classes_of.get(code, ()):
                if name in position:
                    targets[row, position[name]] = 1.0
    return targets


def multi_hot(codes: Sequence[Mapping[str, float]], statements: pd.DataFrame, level: str,
              classes: Sequence[str]) -> np.ndarray:
    """``(records, classes)`` float32 targets: 1 where the record carries the class at ``level``."""
    return targets_from_map(codes, code_map(statements, level), classes)


def head_and_tail(train_targets: np.ndarray, classes: Sequence[str],
                  fraction: float = TAIL_FRACTION) -> dict[str, Any]:
    """Split ``classes`` by their share of the training records ``train_targets (records, classes)``.

    Returns ``{"rule", "counts", "head", "tail"}``, JSON-ready, so a checkpoint states how its classes were split.
    """
    counts = train_targets.sum(axis=0).astype(int)
    n = max(1, len(train_targets))
    tail = [c for c, k in zip(classes, counts) if k / n < fraction]
    return {"rule": f"tail = classes on fewer than {fraction:.0%} of the {len(train_targets)} training records "
                    "(folds 1-8) that carry a label at this level",
            "counts": {c: int(k) for c, k in zip(classes, counts)},
            "head": [c for c in classes if c not in tail], "tail": tail}
