"""The service's request and response schemas, as pydantic models.

They document the API (OpenAPI at ``/docs``) and validate the small parts of a request. They are deliberately *not*
run over the signal itself: pydantic spends ~100 ms turning a 12 x 5000 nested list into floats, ~20x what
``json.loads`` + ``numpy`` need, so the ingress validates the envelope (``fs``, ``lead_names``, ``record_id``) with
`ScoreRequest` and hands the signal to `ecgad.io.record_from_array`, which checks its shape and values. Responses
are built as plain dicts and serialized with ``json`` for the same reason; `ScoreResponse` describes them.
"""

from __future__ import annotations

from pydantic import BaseModel, Field

from ecgad.types import LEADS, REJECTION_CODES


class ScoreRequest(BaseModel):
    """A JSON scoring request: one ECG as a nested list, leads x samples, in millivolts."""

    signal: list[list[float]] = Field(
        description="(leads, samples) in mV; (samples, leads) is accepted when only that axis matches the leads")
    fs: float = Field(gt=0, description="sampling rate in Hz (any rate; resampled to the model's 500 Hz)")
    lead_names: list[str] | None = Field(
        default=None, description=f"names of the rows of `signal`; default the standard 12: {', '.join(LEADS)}")
    record_id: str = Field(default="", max_length=200, description="echoed back in the response")


class ScoreResponse(BaseModel):
    """The model's verdict on one ECG (field names follow anomalib's)."""

    record_id: str
    pred_score: float = Field(description="anomaly score; higher = more anomalous")
    pred_label: bool = Field(description="pred_score > threshold (true = anomalous)")
    threshold: float | None = Field(description="decision threshold from the checkpoint; null if never calibrated")
    anomaly_map: list[list[float]] | None = Field(
        description="(12, samples) anomaly map on the input's own time axis, leads in standard order; with "
                    "map=downsample=N each column is the maximum over N input samples; long records are "
                    "downsampled by map=auto (the default), and no map is wider than the service's limit; null "
                    "with map=none")
    map_step: int | None = Field(description="input samples per anomaly_map column (1 = full resolution)")
    r_peaks: list[int] = Field(description="R-peak positions used for the beats")
    beats_used: int
    windows_scored: int = Field(description="10 s windows scored (records longer than 10 s are scored in windows)")
    warnings: list[str]
    model_version: str = Field(description="the version of the model that scored it: <weights sha256[:12]>-<sha256 "
                                           "of weights, configs and threshold[:12]>")


#: The 422 code of a record the model failed on (its batch neighbours are scored as usual).
SCORING_FAILED = "scoring_failed"


class RejectionDetail(BaseModel):
    reason: str = Field(description="code or code:detail, e.g. flat_lead:V3")
    code: str = Field(description="one of: " + ", ".join(REJECTION_CODES) + f"; or {SCORING_FAILED} (the model "
                                  "failed on this record)")
    message: str


class RejectionBody(BaseModel):
    """The 422 body: why the ECG cannot be scored, in the vocabulary batch jobs and the CLI also use."""

    detail: RejectionDetail


class ModelInfo(BaseModel):
    model_version: str
    git_commit: str = Field(description="the commit the model was trained at")
    created: str
    threshold: float | None
    threshold_quantile: float | None
    mode: str = Field(description="scoring mode: full (the published protocol) or fast")
    device: str
    cpu_threads: int | None = Field(description="torch threads of the model replica on CPU; null on a GPU")
    model_config_: dict = Field(alias="model_config")
    prep_config: dict
    metadata: dict
    batching: dict = Field(description="max_batch_size and batch_wait_timeout_s of the model deployment")
    diagnosis: dict | None = Field(default=None, description="the diagnosis head's level and classes "
                                   "(`/v1/diagnose`), or null for a detector alone")


class ReadyBody(BaseModel):
    """``/readyz``: answered from the last probe of the model while it is younger than the app's ``ready_ttl_s``."""

    status: str = Field(description="ready, or unavailable (with status 503)")
    model_version: str
    canned_score: float = Field(description="the score of the canned synthetic ECG the probe sends")
    checked_at: float = Field(description="when the probe ran (Unix time)")
