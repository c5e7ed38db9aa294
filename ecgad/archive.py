"""The output of archive scoring (`ecgad.ray.archive`, ``python -m jobs.score_archive``): its layout on disk, its
commits, the settings check that makes a rerun resume, and the summary over everything committed. Ray-free, so a
finished archive can be inspected, checked and summarized without a cluster.

Layout under the output directory::

    _job.json                      what the run scores with (model version, mode, chunk size, input); a rerun with
                                   different settings is refused, so one output never mixes two models
    records/chunk-<id>.parquet     one `ecgad.results.RESULT_SCHEMA` row per input record of the chunk
    maps/chunk-<id>.parquet        with --maps: `ecgad.results.MAP_SCHEMA` rows (float16, zstd)
    summary.json                   counts by status and reason, records/s, wall time

A chunk's records file is its commit marker: written last, atomically (`ecgad.atomic`: a hidden temporary renamed
into place, which no Parquet reader lists; on object storage one upload, which appears whole or not at all), so a
chunk is either wholly stored or absent, and a rerun skips exactly the committed chunks. The output directory may be
a URI (`ecgad.storage`); then ``root`` is a string, else a ``Path``.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.dataset as pads

from ecgad.atomic import remove_temporaries, write_json, write_parquet
from ecgad.results import RESULT_SCHEMA
from ecgad.storage import filesystem, is_dir, is_file, join, list_names, read_text

#: Records per committed chunk: the unit of resumption (work lost to a kill) and of output files. 128 records make
#: files of ~10 kB of results (~1.5 MB of maps), few enough files for 10^6 records, and a prepared chunk of ~60 MB.
DEFAULT_CHUNK_SIZE = 128

#: Bumped when the output's columns change, so that a rerun never appends chunks of another format (2: the result
#: column ``n_beats`` became ``beats_used``, the name `Scores` and the service use).
OUTPUT_FORMAT = 2


class ArchiveError(Exception):
    """The job cannot run as asked (bad settings, or an output directory written with other settings or input)."""


@dataclass(frozen=True)
class ArchiveLayout:
    """Where everything lives under the output directory, and the atomic commit of one file."""

    root: Path | str

    @property
    def records(self) -> Path | str:
        return join(self.root, "records")

    @property
    def maps(self) -> Path | str:
        return join(self.root, "maps")

    @property
    def job_file(self) -> Path | str:
        return join(self.root, "_job.json")

    @property
    def summary_file(self) -> Path | str:
        return join(self.root, "summary.json")

    @staticmethod
    def chunk_name(chunk: str) -> str:
        return f"chunk-{chunk}.parquet"

    def committed_chunks(self) -> set[str]:
        """Ids of the chunks whose records file is in place (the records file is the commit marker)."""
        return {name[len("chunk-"):-len(".parquet")] for name in list_names(self.records)
                if name.startswith("chunk-") and name.endswith(".parquet")}

    def remove_partial_files(self) -> int:
        """Delete temporaries a killed run left behind; returns how many. Only safe with one job per output."""
        return remove_temporaries(self.records) + remove_temporaries(self.maps)

    @staticmethod
    def commit(table: pa.Table, final: Path | str) -> None:
        """Write ``table`` as the Parquet file ``final`` (zstd), atomically: a reader or a rerun sees no file or the
        complete one."""
        write_parquet(final, table)

    def check_or_write_job(self, job: dict[str, Any]) -> bool:
        """Record the run's settings on the first run; on a rerun refuse different ones. True when resuming."""
        job = {**job, "output_format": OUTPUT_FORMAT}
        if is_file(self.job_file):
            stored = json.loads(read_text(self.job_file))
            diff = {k: (stored.get(k), v) for k, v in job.items() if stored.get(k) != v}
            if diff:
                raise ArchiveError(f"{self.root} holds a run with other settings ("
                                   + "; ".join(f"{k}: {a!r} there, {b!r} now" for k, (a, b) in diff.items())
                                   + "); use another --out, or the same settings to resume")
            return True
        write_json(self.job_file, job)
        return False


def summarize(layout: ArchiveLayout) -> dict[str, Any]:
    """Counts over everything committed (this run and earlier ones), scanning only the status and reason columns in
    record batches, so it needs no memory in proportion to the archive."""
    by_status: Counter[str] = Counter()
    by_reason: Counter[str] = Counter()
    if is_dir(layout.records):
        fs, path = filesystem(layout.records)
        dataset = pads.dataset(path, format="parquet", schema=RESULT_SCHEMA, filesystem=fs)
        for batch in dataset.to_batches(columns=["status", "reason"]):
            for status, reason in zip(batch.column("status").to_pylist(), batch.column("reason").to_pylist()):
                by_status[status] += 1
                if status != "ok":
                    by_reason[f"{status}:{reason.split(':')[0]}"] += 1
    return {"records": sum(by_status.values()), "by_status": dict(sorted(by_status.items())),
            "by_reason": dict(sorted(by_reason.items()))}
