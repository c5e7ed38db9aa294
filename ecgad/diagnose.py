"""Diagnose records with a checkpoint that has a diagnosis head: labels with probabilities, and the anomaly verdict.

One `Diagnoser` serves every consumer (``ecgad diagnose``, ``jobs.evaluate``, ``jobs.score_archive --diagnose``,
``POST /v1/diagnose``): each record is prepared once; the detector scores it with the `Scorer` (score, threshold,
map, exactly as ``/v1/score``), and the diagnosis network (`ecgad.diagnosis`) gives one probability per class, the
mean over the record's windows; a class is reported positive when its probability exceeds the threshold calibrated
for it on fold 9.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ecgad.diagnosis import load_diagnosis, make_batch, predict, record_probabilities
from ecgad.preprocess import prepare
from ecgad.scoring import Scorer
from ecgad.types import Prepared, Record, Rejection, Scores

#: Windows per forward pass of the diagnosis network.
WINDOWS_PER_BATCH = 32


@dataclass
class Diagnosis:
    """One record's diagnosis: a probability per class and the classes above their thresholds."""

    record_id: str
    level: str
    probabilities: dict[str, float]
    labels: list[str]

    def to_dict(self) -> dict:
        return {"record_id": self.record_id, "level": self.level, "labels": self.labels,
                "probabilities": self.probabilities}


class Diagnoser:
    """A diagnosis checkpoint, loaded once: `diagnose_records` for raw (validated) records, `diagnose_prepared`."""

    def __init__(self, directory: str | Path, device: str | torch.device | None = None, mode: str = "full") -> None:
        checkpoint, self.net = load_diagnosis(directory, device=device)
        self.checkpoint = checkpoint
        entry = checkpoint.diagnosis
        self.level, self.classes = entry["level"], list(entry["classes"])
        self.thresholds = np.asarray(entry["thresholds"], dtype=np.float64)
        self.scorer = Scorer(checkpoint.model, checkpoint.prep_config, checkpoint.threshold, device=device, mode=mode,
                             model_version=checkpoint.model_version)

    @property
    def model_version(self) -> str:
        return self.checkpoint.model_version

    def probabilities(self, prepared: Sequence[Prepared]) -> np.ndarray:
        """``(records, classes)``: each record's mean over its windows."""
        windows = [(i, w) for i, p in enumerate(prepared) for w in p.windows]
        batches = (make_batch(np.stack([w.global_input for _, w in chunk]), [w.beats for _, w in chunk])
                   for chunk in (windows[s:s + WINDOWS_PER_BATCH] for s in range(0, len(windows), WINDOWS_PER_BATCH)))
        return record_probabilities(predict(self.net, batches), [i for i, _ in windows], len(prepared))

    def diagnoses(self, prepared: Sequence[Prepared]) -> list[Diagnosis]:
        if not prepared:
            return []
        return [Diagnosis(p.record_id, self.level, {c: float(v) for c, v in zip(self.classes, probs)},
                          [c for c, v, t in zip(self.classes, probs, self.thresholds) if v > t])
                for p, probs in zip(prepared, self.probabilities(prepared))]

    def diagnose_prepared(self, prepared: Sequence[Prepared], with_maps: bool = True
                          ) -> list[tuple[Scores, Diagnosis]]:
        return list(zip(self.scorer.score_prepared(prepared, with_maps=with_maps), self.diagnoses(prepared)))

    def diagnose_records(self, records: Sequence[Record], with_maps: bool = True
                         ) -> list[tuple[Scores, Diagnosis] | Rejection]:
        """Prepare, score and diagnose raw records; one that cannot be prepared comes back as its `Rejection`, in
        place (as `Scorer.score_records`). Callers validate first."""
        outcomes: list[Rejection | None] = []
        prepared = []
        for record in records:
            try:
                prepared.append(prepare(record, self.scorer.prep_config))
                outcomes.append(None)
            except Rejection as rejection:
                outcomes.append(rejection)
        done = iter(self.diagnose_prepared(prepared, with_maps))
        return [next(done) if outcome is None else outcome for outcome in outcomes]
