"""PTB-XL roots (the PhysioNet layout: ``ptbxl_database.csv``, ``scp_statements.csv``, ``records100/``,
``records500/``) as a labelled index and a stream of `Record`s (arbitrary folders are listed by `ecgad.inputs`).

The label rule is ours, not the published code's (docs/method.md §5 D3): a record is ``normal`` iff the
set of diagnostic superclasses over *all* its ``scp_codes`` keys whose statement has ``diagnostic == 1``
(likelihood ignored, as in PTB-XL's ``aggregate_diagnostic``) is exactly ``{NORM}``. A record with no diagnostic
statement at all (rhythm/form statements only, e.g. atrial flutter) is ``abnormal``: nothing certifies it normal.
"""

from __future__ import annotations

import ast
import math
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ecgad.io import read_record
from ecgad.log import get_logger
from ecgad.storage import is_file, join, open_input
from ecgad.types import Record

log = get_logger(__name__)

#: PTB-XL's folds as we use them (docs/method.md §3.1, §5 D4): train on the normals of 1-8, select on 9, test on 10.
TRAIN_FOLDS = (1, 2, 3, 4, 5, 6, 7, 8)
VALIDATION_FOLD = 9
TEST_FOLD = 10


def load_ptbxl_index(root: str | Path) -> pd.DataFrame:
    """One row per PTB-XL record present under ``root``, with its label.

    Keeps every ``ptbxl_database.csv`` column (``scp_codes`` parsed to a dict; extra columns a writer added, such
    as ``mask_path``, pass through) and adds ``superclasses`` (sorted tuple), ``is_normal``, ``label``
    (``"normal"``/``"abnormal"``), ``record_path`` (relative to ``root``, without extension) and
    ``sampling_rate_hz``. The 500 Hz file (``filename_hr``, the rate the model uses) is preferred, else the
    100 Hz one; rows with neither on disk are dropped and counted in a warning, since a subset of PTB-XL (like the
    sample data) keeps the full metadata rows but only one rate of each record. ``root`` may be a URI.
    """
    root = str(root)   # a local path or a URI (`ecgad.storage`)
    with open_input(join(root, "ptbxl_database.csv")) as database, \
            open_input(join(root, "scp_statements.csv")) as statements_file:
        db = pd.read_csv(database)
        statements = pd.read_csv(statements_file, index_col=0)
    diagnostic_class = statements.loc[statements["diagnostic"] == 1, "diagnostic_class"].to_dict()

    db["scp_codes"] = db["scp_codes"].map(ast.literal_eval)
    db["superclasses"] = db["scp_codes"].map(lambda codes: tuple(sorted({diagnostic_class[c] for c in codes
                                                                          if c in diagnostic_class})))
    db["is_normal"] = db["superclasses"] == ("NORM",)
    db["label"] = np.where(db["is_normal"], "normal", "abnormal")

    on_disk = {rate: db[column].map(lambda name: is_file(join(root, f"{name}.hea")))
               for rate, column in ((500, "filename_hr"), (100, "filename_lr"))}
    db["record_path"] = np.where(on_disk[500], db["filename_hr"], np.where(on_disk[100], db["filename_lr"], None))
    db["sampling_rate_hz"] = np.where(on_disk[500], 500, 100)
    missing = int(db["record_path"].isna().sum())
    if missing:
        log.warning("PTB-XL root %s: %d of %d rows have no record file on disk at either rate; dropped",
                    root, missing, len(db))
    return db[db["record_path"].notna()].reset_index(drop=True)


def read_ptbxl_record(root: str | Path, row: pd.Series | dict[str, Any]) -> Record:
    """Read the record of one `load_ptbxl_index` row, with every column of the row in its metadata.

    Separate from `iter_ptbxl_records` so a distributed job can map it over index rows. Values become plain Python
    (NaN -> None) so the metadata serializes as JSON. Raises `Rejection` like `read_record`.
    """
    record = read_record(Path(root) / row["record_path"])
    record.metadata.update({key: _plain(value) for key, value in dict(row).items()})
    return record


def iter_ptbxl_records(root: str | Path, folds: Iterable[int] | None = None,
                       only_normal: bool = False) -> Iterator[Record]:
    """Yield the records of a PTB-XL root (optionally only ``strat_fold`` in ``folds``, only normals), in index
    order. Each is ``(12, samples)`` float32 mV with the index row (ecg_id, patient_id, strat_fold, label, ...) in
    its metadata. A record that cannot be read raises its `Rejection` (a PTB-XL root is curated: an unreadable file
    means a broken copy); jobs that must go on past bad files map `read_ptbxl_record` over the index instead.
    """
    index = load_ptbxl_index(root)
    if folds is not None:
        index = index[index["strat_fold"].isin(list(folds))]
    if only_normal:
        index = index[index["is_normal"]]
    for _, row in index.iterrows():
        yield read_ptbxl_record(root, row)


#: Where a synthetic root keeps its ground-truth point masks (``.npy`` arrays that are not ECGs).
MASK_DIR = "masks"


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    return value
