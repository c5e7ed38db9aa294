"""Training shards: a data set's prepared records as Parquet, written once (`jobs.preprocess`), streamed many times.

Layout of a shards directory::

    records/*.parquet     one row per input record: the `ecgad.rows` columns (ok rows and status rows alike) plus the
                          index columns below; Ray Data writes one file per block
    rejections.parquet    record_id, path, reason and index columns of every input that was not prepared
    scp_statements.csv    a PTB-XL root's statements table, copied so the diagnosis targets (`ecgad.labels`) can be
                          derived from the shards alone
    _SUCCESS.json         the manifest, written last: what was prepared from what (fingerprint), counts by fold,
                          label and rejection reason. A directory without it is not a shards directory.

Why one row per *record* (not per window): the rows are `ecgad.rows` rows, so a shard row decodes losslessly to the
very `Prepared` the online and batch scorers build, and validation during training scores exactly what evaluation
and serving would. Training turns rows into windows as it streams them (`training_arrays`).

Why float32 and not float16 (the payload is min-max normalized to [-1, 1], where float16 would be off by at most
~5e-4 and halve the files): exactness is worth more here than size. The validation fold is scored from the shards
to select the checkpoint and calibrate its threshold; in float16 that threshold would be calibrated on inputs that
differ from the float32 ones every other path scores, and the codec would no longer be the single lossless one
(`ecgad.rows`). The cost is modest: ~0.5 MB per 10 s record (window 240 kB + ~10 beats 230 kB), ~10 GB for all of
PTB-XL and ~4.5 GB for the normals training reads (zstd saves only ~5 % on float mantissas), and on a GPU a
paper-size training step costs far more time than reading its rows (see ``bench/train.py``).
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads

from ecgad.config import PrepConfig
from ecgad.labels import LEVELS, STATEMENTS_FILE, parse_codes, read_statements, vocabulary
from ecgad.ptbxl import TRAIN_FOLDS
from ecgad.storage import filesystem, is_file, join, read_text

#: Bumped whenever the shard columns or their meaning change; a manifest with another version is rebuilt.
FORMAT_VERSION = 2

#: Storage dtype of the signal payload (see the module docstring for why float32).
STORAGE_DTYPE = "float32"

#: The `ecgad.rows` columns with explicit Arrow types, so a block of rejected rows only (empty lists) has the same
#: schema as a block of prepared ones. Binary payloads are ``large_binary``: a block of many records can pass 2 GB.
ROW_FIELDS = [
    ("record_id", pa.string()),
    ("status", pa.string()),
    ("reason", pa.string()),
    ("n_samples_model", pa.int64()),
    ("source_fs", pa.float64()),
    ("source_samples", pa.int64()),
    ("window_offsets", pa.list_(pa.int64())),
    ("window_len", pa.int64()),
    ("signals", pa.large_binary()),
    ("peak_counts", pa.list_(pa.int64())),
    ("peaks", pa.list_(pa.int64())),
    ("beat_counts", pa.list_(pa.int64())),
    ("beat_peaks", pa.list_(pa.int64())),
    ("beat_len", pa.int64()),
    ("beats", pa.large_binary()),
    ("metadata_json", pa.string()),
]

#: Where a record came from and what it is: PTB-XL's columns where the input is a PTB-XL root (real or synthetic),
#: nulls for a plain folder of ECG files. ``mask_path`` (synthetic data: per-point ground truth) is relative to the
#: data root. ``scp_codes`` (statement -> likelihood, as JSON) are the diagnosis targets (`ecgad.labels`).
INDEX_FIELDS = [
    ("path", pa.string()),
    ("ecg_id", pa.int64()),
    ("patient_id", pa.float64()),
    ("strat_fold", pa.int64()),
    ("label", pa.string()),
    ("is_normal", pa.bool_()),
    ("mask_path", pa.string()),
    ("scp_codes", pa.string()),
]

ROW_SCHEMA = pa.schema(ROW_FIELDS)
INDEX_SCHEMA = pa.schema(INDEX_FIELDS)
SHARD_SCHEMA = pa.schema(ROW_FIELDS + INDEX_FIELDS)

#: The columns training reads (`training_arrays` turns them into model inputs).
TRAINING_COLUMNS = ["record_id", "window_len", "signals", "beat_counts", "beat_len", "beats"]
#: The columns validation reads: everything `ecgad.rows.row_to_prepared` needs, plus the label.
VALIDATION_COLUMNS = [name for name, _ in ROW_FIELDS] + ["is_normal"]


@dataclass(frozen=True)
class ShardLayout:
    """Where a shards directory keeps what; ``root`` a local ``Path`` or a URI string (`ecgad.storage.location`)."""

    root: Path | str

    @property
    def records(self) -> Path | str:
        return join(self.root, "records")

    @property
    def rejections(self) -> Path | str:
        return join(self.root, "rejections.parquet")

    @property
    def statements(self) -> Path | str:
        return join(self.root, STATEMENTS_FILE)

    @property
    def manifest(self) -> Path | str:
        return join(self.root, "_SUCCESS.json")

    def read_manifest(self) -> dict[str, Any] | None:
        """The manifest of a complete shards directory, or None (absent, unreadable or another format)."""
        try:
            manifest = json.loads(read_text(self.manifest))
        except (OSError, ValueError):
            return None
        return manifest if manifest.get("format_version") == FORMAT_VERSION else None

    def require_manifest(self) -> dict[str, Any]:
        manifest = self.read_manifest()
        if manifest is None:
            raise FileNotFoundError(f"{self.root} is not a complete shards directory (no valid _SUCCESS.json; "
                                    "run `python -m jobs.preprocess` first)")
        return manifest


def input_fingerprint(tree_digest: str, prep_config: PrepConfig) -> str:
    """A digest of everything a shards directory is made from: the data root's ``tree_digest`` (the relative path,
    size and modification time of every file under it: records, index tables, masks; computed folder by folder in
    Ray tasks, `ecgad.ray.listing.tree_digest`), the preprocessing config and the shard format.

    Stat-based rather than content-based so that checking a 20k-record root costs one pass over its folders, not
    reading ~3 GB; a file rewritten in place gets a new mtime, so any change to the inputs changes the digest.
    """
    return hashlib.sha256(json.dumps({"format": FORMAT_VERSION, "prep": prep_config.to_dict(), "tree": tree_digest},
                                     sort_keys=True).encode()).hexdigest()


def rows_table(rows: list[dict[str, Any]], extra: pa.Table | None = None) -> pa.Table:
    """`ecgad.rows` rows (plus a ``path`` each) as an Arrow table with `ROW_SCHEMA` types, and ``extra``'s columns
    (same length: the inputs' index columns) carried along unchanged."""
    table = pa.Table.from_pylist(rows, schema=ROW_SCHEMA.append(pa.field("path", pa.string())))
    if extra is not None:
        for name in extra.column_names:
            if name not in table.column_names:
                table = table.append_column(name, extra.column(name))
    return table


def conform(table: pa.Table) -> pa.Table:
    """``table`` with exactly `SHARD_SCHEMA`'s columns, in order: missing index columns as nulls, others cast."""
    columns = [table.column(f.name).cast(f.type) if f.name in table.column_names
               else pa.nulls(table.num_rows, f.type) for f in SHARD_SCHEMA]
    return pa.Table.from_arrays(columns, schema=SHARD_SCHEMA)


def summarize(records_dir: Path | str) -> tuple[dict[str, Any], pa.Table]:
    """Counts over the written shards (a local folder or a URI) and the table of rejected inputs, reading only the
    small columns."""
    fs, path = filesystem(records_dir)
    dataset = pads.dataset(path, format="parquet", filesystem=fs)
    small = dataset.to_table(columns=["record_id", "path", "status", "reason", "ecg_id", "strat_fold", "label",
                                      "is_normal"])
    status = small.column("status").to_pylist()
    reasons = Counter(r.split(":")[0] for s, r in zip(status, small.column("reason").to_pylist()) if s != "ok")
    ok_folds = Counter((fold, label) for s, fold, label in zip(status, small.column("strat_fold").to_pylist(),
                                                               small.column("label").to_pylist()) if s == "ok")
    counts = {
        "records": small.num_rows,
        "ok": status.count("ok"),
        "rejected": small.num_rows - status.count("ok"),
        "rejected_by_reason": dict(sorted(reasons.items())),
        "ok_by_fold_and_label": {f"{fold}/{label}": n for (fold, label), n in
                                 sorted(ok_folds.items(), key=lambda kv: (kv[0][0] is None, kv[0][0] or 0, str(kv[0][1])))},
        "train_normals": sum(n for (fold, label), n in ok_folds.items() if fold in TRAIN_FOLDS and label == "normal"),
    }
    mask = np.array([s != "ok" for s in status], dtype=bool)
    return counts, small.filter(pa.array(mask))


def label_summary(layout: ShardLayout) -> dict[str, Any]:
    """The classes each label level has in the prepared records (`ecgad.labels.vocabulary`), for the manifest;
    empty when the shards carry no statements table (a plain folder of ECG files has no labels)."""
    if not is_file(layout.statements):
        return {}
    fs, path = filesystem(layout.records)
    table = pads.dataset(path, format="parquet", filesystem=fs).to_table(columns=["status", "scp_codes"])
    codes = [parse_codes(c) for s, c in zip(table.column("status").to_pylist(), table.column("scp_codes").to_pylist())
             if s == "ok"]
    statements = read_statements(layout.statements)
    return {"statements": STATEMENTS_FILE, "classes": {level: vocabulary(codes, statements, level) for level in LEVELS}}


# -- what training takes from a row ------------------------------------------------------------------------------

def training_arrays(batch: dict[str, np.ndarray], cfg: PrepConfig = PrepConfig(),
                    n_leads: int = 12) -> tuple[np.ndarray, list[np.ndarray]]:
    """Training windows from a numpy batch of `TRAINING_COLUMNS` rows: globals ``(N, 12, 4800)`` float32 and, per
    window, all its valid beats ``(n_i, 12, 480)`` float32, one sample per *window* (every 10 s window of a record is a
    sample, as `ecgad.train` trains; PTB-XL records have one). The beat each step trains on is drawn from these by
    `ecgad.train.sample_beats`, the one beat sampler.
    """
    globals_, beats = [], []
    for i in range(len(batch["record_id"])):
        beat_counts = [int(c) for c in batch["beat_counts"][i]]
        window_len, beat_len = int(batch["window_len"][i]), int(batch["beat_len"][i])
        signals = _floats(batch["signals"][i], (len(beat_counts), n_leads, window_len))
        all_beats = _floats(batch["beats"][i], (sum(beat_counts), n_leads, beat_len))
        first = 0
        for window, count in enumerate(beat_counts):
            globals_.append(signals[window, :, cfg.global_start:cfg.global_end])
            beats.append(all_beats[first:first + count])
            first += count
    if not globals_:
        return np.empty((0, n_leads, cfg.global_len), np.float32), []
    return np.stack(globals_), beats


def _floats(blob: bytes, shape: tuple[int, ...]) -> np.ndarray:
    """A read-only float32 view of a row's payload (`ecgad.rows` stores little-endian float32 bytes)."""
    return np.frombuffer(blob, dtype="<f4").reshape(shape)
