"""Counters of the batch jobs (archive scoring, Ray Train training), recorded through Ray's metrics system.

The same system the service records into (`serve.metrics`): every Ray node exports them on its Prometheus
endpoint, named ``ray_<name>``, so a job's progress shows on the same dashboard (``ops/grafana-dashboard.json``)
without a second exporter. Each process keeps its own counters; Prometheus sums them.
"""

from __future__ import annotations

from ray.util.metrics import Counter

#: Every job counter: name -> (description, tag keys).
JOB_COUNTERS: dict[str, tuple[str, tuple[str, ...]]] = {
    "ecgad_archive_records_total": ("records committed by archive jobs, by status (scored, rejected, failed)",
                                    ("status",)),
    "ecgad_archive_chunks_total": ("chunks committed by archive jobs", ()),
    "ecgad_train_epochs_total": ("training epochs finished (reported with their checkpoint)", ()),
    "ecgad_train_samples_total": ("training samples (beat windows) seen, over all workers", ()),
}

_created: dict[str, Counter] = {}


def count(name: str, value: float = 1, tags: dict[str, str] | None = None) -> None:
    """Add ``value`` to the job counter ``name`` (one of `JOB_COUNTERS`) in this process."""
    counter = _created.get(name)
    if counter is None:
        description, tag_keys = JOB_COUNTERS[name]
        counter = _created[name] = Counter(name, description=description, tag_keys=tag_keys)
    counter.inc(value, tags=tags)
