"""The online scoring service: a FastAPI ingress in front of a batched model deployment, on Ray Serve.

Why two deployments: turning a request into model input (``json.loads`` of ~1 MB, reading uploaded WFDB files,
validation, then `ecgad.preprocess.prepare`: resampling, filtering, R-peaks, beats) is per-request CPU work that
does not batch, while the model's forward passes do, on a GPU above all (on a CPU they are compute-bound and gain
little; see ``bench/serve.py``). So `ECGIngress` replicas
do all of the former (and render plots), scaling out with the request rate, and hand only `Prepared` records to
`ECGModel`, whose ``score`` method gathers concurrent requests into one `ecgad.scoring.Scorer.score_prepared` call
with ``@serve.batch``. The model replica never parses a byte or filters a signal, so a slow upload cannot hold up a
batch and a GPU replica is not left waiting on CPU work. Both read the preparation settings from the same
checkpoint, so online preparation is the one the model was trained with.

Safety, in the order a request meets it: the proxy's ``request_timeout_s`` (408) and queue limit (503); the trusted
``Host`` names (400) and, for browsers, the same-site check on ``/v1`` POSTs (403; `serve.guard`); the bearer token
(401, when ``ECGAD_API_TOKEN`` is set in the replica's environment); the body format (415); a work slot of the
replica (503 when all stay busy; `serve.work`); the body-size limit (413, from ``Content-Length`` and again while
reading); the typed rejection of `ecgad.io`, `ecgad.limits` and `ecgad.validate` (422, ``{"detail": {"reason",
"code", "message"}}``; any other error reading a body becomes one too); the model's queue limit (503, raised here by
the deployment handle and answered like the proxy's); a model failure on one record (422 ``scoring_failed`` for that
record alone: the model scores a batch, and on failure each record alone); a model replica dying mid-request (503,
Serve replaces it). What is answered is bounded as well: maps of long records are downsampled, plots cut
(`serve.bodies`). `run_local` refuses to serve a non-loopback address without a token unless told that an
authenticating proxy is in front.

Deploy with ``serve deploy serve/config.yaml`` (the checkpoint path in its ``args``) or, locally, with
`run_local` (``ecgad serve --checkpoint DIR``), which deploys that same config.
"""

import asyncio
import functools
import hmac
import ipaddress
import json
import math
import os
import threading
import time
from concurrent.futures import Future
from copy import deepcopy
from pathlib import Path
from typing import Any, Literal

import numpy as np
import yaml
from fastapi import Depends, FastAPI, Header, HTTPException, Query, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle
from ray.serve.schema import ServeApplicationSchema, ServeDeploySchema
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from ecgad import __version__
from ecgad.storage import normalize
from ecgad.config import PrepConfig
from ecgad.drift import DEFAULT_WINDOW, Calibration, DriftWindow
from ecgad.log import get_logger
from ecgad.preprocess import prepare
from ecgad.scoring import score_isolated
from ecgad.synth import generate_ecg
from ecgad.types import Prepared, Record, Rejection, Scores
from serve import bodies, metrics
from serve.guard import LOOPBACK_HOSTS, GuardPolicy, RequestGuard, install
from serve.schemas import SCORING_FAILED, ModelInfo, ReadyBody, RejectionBody, ScoreRequest, ScoreResponse
from serve.work import Busy, WorkSlots

logger = get_logger(__name__)

DEFAULT_CONFIG = Path(__file__).with_name("config.yaml")
STATIC_DIR = Path(__file__).with_name("static")
#: Environment variable holding the API token; when set (in the ingress replicas' environment), every ``/v1``
#: request needs ``Authorization: Bearer <token>``.
TOKEN_ENV = "ECGAD_API_TOKEN"
#: Seconds a client is told to wait before retrying a 503.
RETRY_AFTER_S = 1


def canned_record() -> Record:
    """A fixed synthetic 10 s, 500 Hz ECG: what readiness and health probes score, identical in every process."""
    return generate_ecg(seed=0).to_record("canned")


def checkpoint_prep_config(directory: str | Path) -> PrepConfig:
    """The preparation settings stored in a checkpoint (a local directory or a URI), read without loading its
    weights (for the ingress)."""
    from ecgad.checkpoint import CONFIG_FILE
    from ecgad.storage import join, read_text

    return PrepConfig.from_dict(json.loads(read_text(join(str(directory), CONFIG_FILE)))["prep_config"])


class BatchConfig(BaseModel):
    """``ECGModel``'s ``user_config``: ``serve deploy`` of a changed config applies it without restarting replicas."""

    max_batch_size: int = Field(default=16, ge=1, le=1024)
    batch_wait_timeout_s: float = Field(default=0.01, ge=0.0, le=10.0)


class AppArgs(BaseModel):
    """The application's ``args`` in the Serve config (``serve deploy`` validates them against this model)."""

    checkpoint: str = Field(description="checkpoint directory, readable from every node running a replica, or a URI "
                                        "(s3://bucket/runs/mcf/best): each replica loads a local copy")
    mode: Literal["full", "fast"] = Field(default="full", description="Scorer mode (see ecgad.scoring)")
    device: str | None = Field(default=None, description="torch device; default cuda when the replica has a GPU")
    max_body_mb: float = Field(default=32.0, gt=0, description="larger request bodies get 413")
    cpu_threads: int | None = Field(
        default=None, ge=1, le=256,
        description="torch threads of a model replica on CPU; default: what Ray gives it (its num_cpus, rounded "
                    "down, at least 1). The model is the costly part of a request: on a CPU-only host give it the "
                    "cores the ingress leaves idle")
    allowed_hosts: list[str] = Field(
        default=list(LOOPBACK_HOSTS),
        description="Host header names the service answers (DNS-rebinding defence); '*' for any, '*.example.org' "
                    "for a domain. Default: loopback names only")
    allowed_origins: list[str] = Field(
        default_factory=list, description="browser origins allowed to POST to /v1 from another site")
    work_slots: int = Field(
        default=2, ge=1, le=64,
        description="heavy requests (body reading and preparation, plotting, map rendering) running at once per "
                    "ingress replica")
    work_wait_s: float = Field(default=2.0, ge=0, le=60,
                               description="how long a request waits for a work slot before its 503")
    ready_ttl_s: float = Field(default=5.0, gt=0, le=300,
                               description="how long /readyz answers from its last model probe")
    drift_window: int = Field(default=DEFAULT_WINDOW, ge=10, le=1_000_000,
                              description="recent scores per model replica compared with the checkpoint's "
                                          "calibration scores for the drift gauges (ecgad.drift)")


# --------------------------------------------------------------------------------------------- model deployment

@serve.deployment(name="ECGModel", max_ongoing_requests=64)
class ECGModel:
    """One loaded checkpoint per replica; scores micro-batches of records.

    ``max_ongoing_requests`` must be at least the batch size, or a replica never sees a full batch.
    """

    def __init__(self, checkpoint: str, mode: str = "full", device: str | None = None,
                 cpu_threads: int | None = None, drift_window: int = DEFAULT_WINDOW) -> None:
        import torch

        from ecgad.checkpoint import load_checkpoint
        from ecgad.scoring import Scorer

        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if self.device == "cpu" and cpu_threads:
            torch.set_num_threads(cpu_threads)
        self.mode = mode
        self.checkpoint = load_checkpoint(checkpoint, device=self.device)
        logger.info("model replica: version %s from %s", self.checkpoint.model_version, self.checkpoint.path)
        self.scorer = Scorer(self.checkpoint.model, self.checkpoint.prep_config, self.checkpoint.threshold,
                             device=self.device, mode=mode, model_version=self.checkpoint.model_version)
        self.diagnoser = None   # /v1/diagnose: only a checkpoint with a diagnosis head (jobs.finetune) has one
        if self.checkpoint.diagnosis is not None:
            from ecgad.diagnose import Diagnoser

            self.diagnoser = Diagnoser(checkpoint, device=self.device, mode=mode)
        # Batches and health probes share one model; running them one at a time bounds memory (GPU above all).
        self._lock = threading.Lock()
        self._canned = prepare(canned_record(), self.scorer.prep_config)
        self._batching = BatchConfig()
        self.metrics = metrics.ModelMetrics(self.checkpoint.model_version)
        self._waiting = 0   # records in this replica, for the queue-depth gauge
        self.metrics.queue_depth.set(0)
        self.drift = (DriftWindow(Calibration.from_dict(self.checkpoint.calibration), drift_window)
                      if self.checkpoint.calibration else None)
        if self.drift is None:
            logger.warning("checkpoint %s holds no score calibration: no drift gauges", self.checkpoint.path)
        self._probe()   # a replica that cannot score must never become ready

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        self._batching = BatchConfig.model_validate(user_config)
        for batch in (self._score_batch, self._diagnose_batch):
            batch.set_max_batch_size(self._batching.max_batch_size)
            batch.set_batch_wait_timeout_s(self._batching.batch_wait_timeout_s)

    def _score_now(self, prepared: list[Prepared], with_maps: bool) -> list[Scores | Exception]:
        """Scores, or in its place the exception of a record the model failed on (`ecgad.scoring.score_isolated`:
        the batch in one call, and only if that fails each record alone)."""
        with self._lock:
            outcomes = score_isolated(self.scorer, prepared, with_maps=with_maps)
        return [_portable(outcome, record.record_id) for outcome, record in zip(outcomes, prepared)]

    async def score(self, prepared: Prepared, with_map: bool) -> tuple[Scores | Exception, str]:
        """One record's outcome and the model version that produced it, scored in a batch with the records of
        concurrent requests (`_score_batch`); counted in the queue-depth gauge while it is here."""
        return await self._queued(self._score_batch, prepared, with_map)

    async def _queued(self, batch: Any, prepared: Prepared, with_map: bool) -> Any:
        """``batch(prepared, with_map, arrival time)``, the record counted in the queue-depth gauge meanwhile."""
        self._waiting += 1
        self.metrics.queue_depth.set(self._waiting)
        try:
            return await batch(prepared, with_map, time.monotonic())
        finally:
            self._waiting -= 1
            self.metrics.queue_depth.set(self._waiting)

    @serve.batch(max_batch_size=BatchConfig().max_batch_size,
                 batch_wait_timeout_s=BatchConfig().batch_wait_timeout_s)
    async def _score_batch(self, prepared: list[Prepared], with_maps: list[bool],
                           arrived: list[float]) -> list[tuple[Scores | Exception, str]]:
        """Score the records of concurrent requests in one batch (maps for all if any request wants one: a batch
        is one pass over the model) and tag each result with the model version that produced it. A record the
        model fails on gets its exception as its result (returned, not raised: raising would fail every request
        of the batch), which the ingress answers for that request alone."""
        started = time.monotonic()
        results = await asyncio.to_thread(self._score_now, prepared, any(with_maps))
        self._record(results, [started - t for t in arrived], time.monotonic() - started)
        return [(result, self.scorer.model_version) for result in results]

    def _record(self, results: list[Scores | Exception], waits_s: list[float], model_s: float) -> None:
        """The batch's metrics, and its scores into the drift window (probes never come here)."""
        self.metrics.batch(len(results), waits_s, model_s)
        scored = [r for r in results if isinstance(r, Scores)]
        self.metrics.scored([s.pred_score for s in scored], [s.pred_label for s in scored])
        if self.drift is not None and scored:
            self.drift.add([s.pred_score for s in scored], [s.pred_label for s in scored])
            reading = self.drift.reading()
            if reading is not None:
                self.metrics.drift(reading)

    def _diagnose_now(self, prepared: list[Prepared], with_maps: bool) -> list[tuple[Scores | Exception, Any]]:
        """`_score_now`, and each scored record's diagnosis (`ecgad.diagnose.Diagnosis`) beside it."""
        outcomes = self._score_now(prepared, with_maps)
        scored = [p for p, o in zip(prepared, outcomes) if isinstance(o, Scores)]
        with self._lock:
            diagnoses = iter(self.diagnoser.diagnoses(scored))
        return [(o, next(diagnoses) if isinstance(o, Scores) else None) for o in outcomes]

    async def diagnose(self, prepared: Prepared, with_map: bool) -> tuple[Any, Any, str]:
        """`score`, plus the record's diagnosis: ``(scores or exception, diagnosis, version)``; ``(None, None,
        version)`` when the checkpoint has no diagnosis head."""
        return await self._queued(self._diagnose_batch, prepared, with_map)

    @serve.batch(max_batch_size=BatchConfig().max_batch_size,
                 batch_wait_timeout_s=BatchConfig().batch_wait_timeout_s)
    async def _diagnose_batch(self, prepared: list[Prepared], with_maps: list[bool],
                              arrived: list[float]) -> list[tuple[Any, Any, str]]:
        """`_score_batch`'s batch, each record with its diagnosis (its own batch queue on the same replica)."""
        if self.diagnoser is None:
            return [(None, None, self.scorer.model_version)] * len(prepared)
        started = time.monotonic()
        results = await asyncio.to_thread(self._diagnose_now, prepared, any(with_maps))
        self._record([outcome for outcome, _ in results], [started - t for t in arrived], time.monotonic() - started)
        return [(outcome, diagnosis, self.scorer.model_version) for outcome, diagnosis in results]

    def _probe(self) -> None:
        (result,) = self._score_now([self._canned], with_maps=True)
        if isinstance(result, Exception):
            raise RuntimeError(f"the model cannot score the canned ECG: {result}")
        if not math.isfinite(result.pred_score) or not np.isfinite(result.anomaly_map).all():
            raise RuntimeError(f"the model scores the canned ECG as {result.pred_score}")

    async def check_health(self) -> None:
        """Serve calls this periodically; raising makes it replace the replica. Scoring the canned ECG (in a
        thread, so requests keep flowing) is the only check that covers a broken device or corrupted weights."""
        await asyncio.to_thread(self._probe)

    def info(self) -> dict[str, Any]:
        import torch

        checkpoint = self.checkpoint
        threshold = float(checkpoint.threshold)
        return {
            "model_version": checkpoint.model_version,
            "git_commit": checkpoint.git_commit,
            "created": checkpoint.created,
            "threshold": threshold if math.isfinite(threshold) else None,
            "threshold_quantile": checkpoint.threshold_quantile,
            "mode": self.mode,
            "device": self.device,
            "cpu_threads": torch.get_num_threads() if self.device == "cpu" else None,
            "model_config": checkpoint.model_config.to_dict(),
            "prep_config": checkpoint.prep_config.to_dict(),
            "metadata": checkpoint.metadata,
            "batching": self._batching.model_dump(),
            "diagnosis": None if self.diagnoser is None else {"level": self.diagnoser.level,
                                                               "classes": self.diagnoser.classes},
        }


class ScoringFailed(Exception):
    """The model failed on this record (not on its batch neighbours): answered 422 ``scoring_failed``."""


def _portable(outcome: Scores | Exception, record_id: str) -> Scores | Exception:
    """A model outcome fit to cross to the ingress: scores and `Rejection` as they are, any other exception as a
    `ScoringFailed` naming only its type (logged here with its traceback; the client learns nothing internal)."""
    if isinstance(outcome, (Scores, Rejection)):
        return outcome
    logger.error("the model failed on record %r", record_id, exc_info=outcome)
    return ScoringFailed(type(outcome).__name__)


# ----------------------------------------------------------------------------------------------------- ingress

app = FastAPI(
    title="ecgad",
    version=__version__,
    description="12-lead ECG anomaly detection (MCF, MICCAI 2023): a score, a label and a per-lead, per-sample "
                "anomaly map for one ECG per request. Bodies: JSON (`ScoreRequest`), an `.npy` array "
                "(`application/x-npy`), or a multipart upload of one WFDB record (`.hea` + `.dat`/`.mat`) or CSV. "
                "Records that cannot be scored get 422 with a typed reason.",
)
app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
app.add_middleware(RequestGuard)   # before serve.ingress copies the app; its policy comes from the replica's args
app.add_middleware(metrics.RequestMetrics)   # outermost: counts the guard's answers too

_bearer = HTTPBearer(auto_error=False, description=f"required when the service has {TOKEN_ENV} set")


def require_token(credentials: HTTPAuthorizationCredentials | None = Depends(_bearer)) -> None:
    """401 unless the bearer token matches ``ECGAD_API_TOKEN`` (read per request: rotating it needs no restart of
    the code, only of the environment). Compared in constant time."""
    expected = os.environ.get(TOKEN_ENV, "")
    if not expected:
        return
    given = credentials.credentials if credentials is not None else ""
    if not hmac.compare_digest(given.encode(), expected.encode()):
        raise HTTPException(401, detail="missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})


class ServiceUnavailable(Exception):
    """The model deployment cannot take the request now (queue full, replica gone); the client should retry."""


def _count_rejection(reason: str) -> None:
    if metrics.RequestMetrics.metrics is not None:
        metrics.RequestMetrics.metrics.rejections.inc(tags={"reason": reason})


@app.exception_handler(Rejection)
async def _rejected(request: Request, exc: Rejection) -> JSONResponse:
    _count_rejection(exc.code)
    return JSONResponse(bodies.rejection_body(exc), status_code=422)


@app.exception_handler(RequestValidationError)
async def _bad_parameters(request: Request, exc: RequestValidationError) -> JSONResponse:
    """Malformed query parameters or headers are the request's fault, not the ECG's: 400, so that 422 always
    carries a typed rejection of the record."""
    return JSONResponse({"detail": jsonable_encoder(exc.errors())}, status_code=400)


@app.exception_handler(bodies.BodyTooLarge)
async def _too_large(request: Request, exc: bodies.BodyTooLarge) -> JSONResponse:
    return JSONResponse({"detail": str(exc)}, status_code=413)


@app.exception_handler(bodies.UnsupportedMediaType)
async def _unsupported(request: Request, exc: bodies.UnsupportedMediaType) -> JSONResponse:
    return JSONResponse({"detail": str(exc)}, status_code=415)


@app.exception_handler(ScoringFailed)
async def _scoring_failed(request: Request, exc: ScoringFailed) -> JSONResponse:
    _count_rejection(SCORING_FAILED)
    return JSONResponse(bodies.error_body(f"{SCORING_FAILED}:{exc}", SCORING_FAILED,
                                          "the model could not score this record"), status_code=422)


@app.exception_handler(ServiceUnavailable)
@app.exception_handler(Busy)
async def _unavailable(request: Request, exc: Exception) -> JSONResponse:
    return JSONResponse({"detail": str(exc)}, status_code=503, headers={"Retry-After": str(RETRY_AFTER_S)})


_ERRORS = {400: {"description": "malformed query parameters or headers (e.g. map=half), or a Host not allowed"},
           403: {"description": "a browser's cross-site POST from an origin not allowed"},
           413: {"description": "body larger than the configured limit"},
           415: {"description": "not JSON, application/x-npy, multipart/form-data or one ECG file"},
           422: {"model": RejectionBody, "description": "the ECG cannot be scored; `reason` says why"},
           503: {"description": "overloaded (the queues, or every work slot of the replica, are full) or a model "
                                "replica is being replaced; retry after Retry-After"}}
_AUTH = {401: {"description": f"bearer token missing or wrong (only when {TOKEN_ENV} is set)"}}

#: The three body formats, for the OpenAPI docs (the handler reads the raw body itself; see serve.bodies).
_SCORE_BODY = {"requestBody": {"required": True, "content": {
    bodies.JSON_TYPE: {"schema": ScoreRequest.model_json_schema()},
    bodies.NPY_TYPE: {"schema": {"type": "string", "format": "binary",
                                 "description": "an .npy array (leads, samples) in mV, float32; fs and lead_names "
                                                "as query parameters or X-ECG-FS / X-ECG-Leads headers"}},
    bodies.MULTIPART_TYPE: {"schema": {"type": "object", "required": ["files"], "properties": {"files": {
        "type": "array", "items": {"type": "string", "format": "binary"},
        "description": "one record: a WFDB .hea with its .dat/.mat, one .csv/.npy, or one DICOM, HL7 aECG, GE "
                       "MUSE, Philips, SCP-ECG or EDF file (fs as a query parameter if the file has none)"}}}},
    "application/octet-stream": {"schema": {"type": "string", "format": "binary", "description":
        "one DICOM, HL7 aECG, GE MUSE, Philips, SCP-ECG or EDF file, recognized from its content"}},
}}}

_MapQuery = Query("auto", alias="map", pattern=bodies.MAP_SPEC_PATTERN,
                  description=f"auto (full resolution up to {bodies.AUTO_MAP_COLUMNS} samples, downsampled "
                              f"beyond), none, full, or downsample=N (block maximum over N input samples); no map "
                              f"is wider than {bodies.MAX_MAP_COLUMNS} columns")
_FsQuery = Query(None, description="sampling rate (Hz) for NPY bodies and files without one")
_LeadsQuery = Query(None, description="comma-separated lead names for NPY bodies and header-less files")
_IdQuery = Query("", max_length=200, description="record id echoed back (NPY bodies)")
_FsHeader = Header(None, description="the same as the fs query parameter")
_LeadsHeader = Header(None, description="the same as the lead_names query parameter")


async def _multipart_files(request: Request, body: bytes) -> list[tuple[str, bytes]]:
    """Parse an already size-checked multipart body with Starlette's parser, replaying it as the request stream."""
    async def replay() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(request.scope, replay).form(max_files=bodies.MAX_UPLOAD_FILES)
    except StarletteHTTPException as err:   # Starlette's 400 for a malformed body
        raise Rejection("bad_file", "multipart", f"malformed multipart body: {err.detail}") from None
    try:
        return [(item.filename or "", await item.read()) for _, item in form.multi_items()
                if isinstance(item, UploadFile)]
    finally:
        await form.close()


@serve.deployment(name="ECGIngress", max_ongoing_requests=32)
@serve.ingress(app)
class ECGIngress:
    """HTTP front: schemas, limits, parsing and validation, plots; holds a handle to `ECGModel`."""

    def __init__(self, model: DeploymentHandle, args: AppArgs) -> None:
        install(GuardPolicy(tuple(args.allowed_hosts), tuple(args.allowed_origins)))
        self.model = model
        self.max_body_bytes = int(args.max_body_mb * 2**20)
        self.prep_config = checkpoint_prep_config(args.checkpoint)
        self.canned = prepare(canned_record(), self.prep_config)
        self.work = WorkSlots(args.work_slots, args.work_wait_s)
        self.metrics = metrics.install()
        self.ready_ttl_s = args.ready_ttl_s
        self._readiness: tuple[float, int, dict[str, Any]] | None = None   # (monotonic time, status, body)
        self._readiness_lock = asyncio.Lock()

    async def _prepare(self, request: Request, fs: str | None, lead_names: str | None,
                       record_id: str) -> tuple[Record, Prepared]:
        """Read the body (size-limited), then parse, validate and prepare it in a worker thread, so the event loop
        keeps serving other requests meanwhile; all of it in one work slot, so a burst of large bodies waits (or
        gets 503) instead of being held in memory at once."""
        kind = bodies.media_type(request.headers.get("content-type"))
        if kind not in (bodies.JSON_TYPE, bodies.NPY_TYPE, bodies.MULTIPART_TYPE) and kind not in bodies.FILE_TYPES:
            raise bodies.UnsupportedMediaType(f"unsupported Content-Type {kind!r}; send {bodies.JSON_TYPE}, "
                                              f"{bodies.NPY_TYPE}, {bodies.MULTIPART_TYPE} or one ECG file as "
                                              "application/octet-stream")
        async with self.work.taken() as slot:
            body = await bodies.read_limited(request.headers.get("content-length"), request.stream(),
                                             self.max_body_bytes)
            if kind == bodies.JSON_TYPE:
                parse = functools.partial(bodies.record_from_json, body)
            elif kind == bodies.NPY_TYPE:
                parse = functools.partial(bodies.record_from_npy, body, bodies.parse_fs(fs),
                                          bodies.parse_lead_names(lead_names), record_id)
            elif kind == bodies.MULTIPART_TYPE:
                parse = functools.partial(bodies.record_from_files, await _multipart_files(request, body),
                                          bodies.parse_fs(fs), bodies.parse_lead_names(lead_names))
            else:
                parse = functools.partial(bodies.record_from_file_body, body, bodies.parse_fs(fs),
                                          bodies.parse_lead_names(lead_names), record_id)

            def parse_and_prepare() -> tuple[Record, Prepared]:
                started = time.perf_counter()
                try:
                    record = parse()
                    return record, prepare(record, self.prep_config)
                finally:
                    self.metrics.preparation.observe(time.perf_counter() - started)

            return await slot.offload(functools.partial(bodies.typed_errors, parse_and_prepare))

    async def _call_model(self, method: str, *args: Any) -> Any:
        """One call of the model deployment's batched ``method``; capacity and replica failures as 503."""
        try:
            return await getattr(self.model, method).remote(*args)
        except BackPressureError as err:
            raise ServiceUnavailable(f"the model is at capacity: {err}") from None
        except (RayActorError, DeploymentUnavailableError) as err:
            raise ServiceUnavailable(f"the model replica is unavailable: {type(err).__name__}") from None

    async def _score(self, prepared: Prepared, with_map: bool) -> tuple[Scores, str]:
        """The model's scores of one record; its `Rejection` or `ScoringFailed` is raised for this request only."""
        outcome, model_version = await self._call_model("score", prepared, with_map)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome, model_version

    @app.post("/v1/score", summary="Score one ECG", dependencies=[Depends(require_token)],
              responses={200: {"model": ScoreResponse}, **_AUTH, **_ERRORS}, openapi_extra=_SCORE_BODY)
    async def score(self, request: Request, map_spec: str = _MapQuery, fs: str | None = _FsQuery,
                    lead_names: str | None = _LeadsQuery, record_id: str = _IdQuery,
                    x_ecg_fs: str | None = _FsHeader, x_ecg_leads: str | None = _LeadsHeader) -> Response:
        step = bodies.parse_map_spec(map_spec)
        _, prepared = await self._prepare(request, fs or x_ecg_fs, lead_names or x_ecg_leads, record_id)
        scores, model_version = await self._score(prepared, with_map=step is not None)

        def encode() -> str:
            return json.dumps(bodies.score_body(scores, model_version, step))

        # Without a map the answer is a few hundred bytes: cheaper encoded here than via a work slot and a thread.
        text = encode() if step is None else await self.work.run(encode)
        return Response(text, media_type=bodies.JSON_TYPE)

    @app.post("/v1/diagnose", summary="Diagnose one ECG: SCP labels with probabilities, and the anomaly verdict",
              dependencies=[Depends(require_token)], responses={200: {"model": ScoreResponse}, **_AUTH, **_ERRORS},
              openapi_extra=_SCORE_BODY)
    async def diagnose(self, request: Request, map_spec: str = _MapQuery, fs: str | None = _FsQuery,
                       lead_names: str | None = _LeadsQuery, record_id: str = _IdQuery,
                       x_ecg_fs: str | None = _FsHeader, x_ecg_leads: str | None = _LeadsHeader) -> Response:
        """The `/v1/score` answer plus ``diagnosis``: the label level, the positive labels at the thresholds
        calibrated on fold 9, and every class's probability. 404 ``no_diagnosis_head`` for a detector alone."""
        step = bodies.parse_map_spec(map_spec)
        _, prepared = await self._prepare(request, fs or x_ecg_fs, lead_names or x_ecg_leads, record_id)
        outcome, diagnosis, model_version = await self._call_model("diagnose", prepared, step is not None)
        if outcome is None:
            return JSONResponse({"reason": "no_diagnosis_head", "message": f"model {model_version} is an anomaly "
                                 "detector without a diagnosis head (train one with jobs.finetune)"}, status_code=404)
        if isinstance(outcome, Exception):
            raise outcome
        body = {**bodies.score_body(outcome, model_version, step), "diagnosis": diagnosis.to_dict()}
        text = await self.work.run(lambda: json.dumps(body))
        return Response(text, media_type=bodies.JSON_TYPE)

    @app.post("/v1/score/plot", summary="Score one ECG and plot it with its anomaly map",
              dependencies=[Depends(require_token)], openapi_extra=_SCORE_BODY, response_class=Response,
              responses={200: {"content": {"image/png": {}}, "description": "the 12-lead plot; the verdict is in "
                               "the X-ECG-Score, X-ECG-Label, X-ECG-Threshold and X-Model-Version headers"},
                         **_AUTH, **_ERRORS})
    async def score_plot(self, request: Request, fs: str | None = _FsQuery, lead_names: str | None = _LeadsQuery,
                         record_id: str = _IdQuery, x_ecg_fs: str | None = _FsHeader,
                         x_ecg_leads: str | None = _LeadsHeader) -> Response:
        record, prepared = await self._prepare(request, fs or x_ecg_fs, lead_names or x_ecg_leads, record_id)
        scores, model_version = await self._score(prepared, with_map=True)
        png = await self.work.run(functools.partial(bodies.plot_png, record, scores))
        return Response(png, media_type="image/png", headers={
            "X-ECG-Score": repr(float(scores.pred_score)),
            "X-ECG-Label": "anomalous" if scores.pred_label else "normal",
            "X-ECG-Threshold": f"{scores.threshold:.6g}",
            "X-Model-Version": model_version,
        })

    @app.get("/v1/model", summary="The loaded checkpoint", response_model=ModelInfo,
             dependencies=[Depends(require_token)], responses=_AUTH)
    async def model_info(self) -> dict[str, Any]:
        try:
            return await self.model.info.remote()
        except (BackPressureError, RayActorError, DeploymentUnavailableError) as err:
            raise ServiceUnavailable(f"the model replica is unavailable: {type(err).__name__}") from None

    @app.get("/healthz", summary="Liveness: the HTTP process is up")
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", summary="Readiness: a model replica is loaded and scores the canned ECG",
             responses={200: {"model": ReadyBody}, 503: {"description": "no model replica can score now"}})
    async def readyz(self) -> JSONResponse:
        """The last probe's answer while it is younger than ``ready_ttl_s``, else a new probe (one at a time: the
        callers of a burst share it). Probes are unauthenticated, so they must not cost a model pass each."""
        async with self._readiness_lock:
            if self._readiness is None or time.monotonic() - self._readiness[0] > self.ready_ttl_s:
                self._readiness = (time.monotonic(), *await self._probe())
            _, status, body = self._readiness
        return JSONResponse(body, status_code=status)

    async def _probe(self) -> tuple[int, dict[str, Any]]:
        """Score the canned ECG once: the status and body of a readiness answer, stamped with the time."""
        checked_at = time.time()
        try:
            scores, model_version = await self._score(self.canned, with_map=False)
        except (ServiceUnavailable, ScoringFailed, Rejection) as err:
            return 503, {"status": "unavailable", "detail": str(err), "checked_at": checked_at}
        return 200, {"status": "ready", "model_version": model_version, "canned_score": float(scores.pred_score),
                     "checked_at": checked_at}

    @app.get("/", include_in_schema=False)
    async def viewer(self) -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html")


#: What the config's ``import_path`` names: the builder ``serve deploy`` calls with the config's ``args``.
IMPORT_PATH = f"{__name__}:build_app"


def bind_app(args: AppArgs, options: dict[str, dict[str, Any]] | None = None) -> serve.Application:
    """The application, each deployment with the ``Deployment.options`` given for its name in ``options``.

    The checkpoint is resolved here, once (`ecgad.checkpoint.resolve_checkpoint`): every replica, including one
    Serve starts later to replace another, loads that version directory, so the application serves one version
    however often training moves ``RUN/best``. Another version is a redeploy, which Serve rolls out replica by
    replica while the application keeps answering."""
    from ecgad.checkpoint import model_version_at, resolve_checkpoint

    args = args.model_copy(update={"checkpoint": str(resolve_checkpoint(args.checkpoint))})
    logger.info("application pinned to model version %s (%s)", model_version_at(args.checkpoint), args.checkpoint)
    options = options or {}
    model = ECGModel.options(**options.get(ECGModel.name, {})).bind(
        checkpoint=args.checkpoint, mode=args.mode, device=args.device, cpu_threads=args.cpu_threads,
        drift_window=args.drift_window)
    return ECGIngress.options(**options.get(ECGIngress.name, {})).bind(model, args)


def build_app(args: AppArgs) -> serve.Application:
    """The application ``serve deploy`` / ``serve run`` build from the config's ``import_path`` and ``args`` (Serve
    applies the config's deployment settings itself)."""
    return bind_app(args)


# --------------------------------------------------------------------------------------------------- local run

class UnsafeBind(ValueError):
    """Asked to serve a non-loopback address with no token, without being told that an authenticating proxy is in
    front: anything that can reach the port could score, so `run_local` refuses."""


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or an IP address, IPv6 with or without brackets) is reachable from this machine
    only. Names other than ``localhost`` count as not: what they resolve to can change."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _token_configured(application: dict[str, Any]) -> bool:
    """Whether the config gives the application's ingress a token (the application's or the ingress's
    ``runtime_env``), or this process has one that the local replicas inherit."""
    ingress = [d for d in application.get("deployments", []) if d.get("name") == ECGIngress.name]
    envs = [application.get("runtime_env") or {},
            *(((d.get("ray_actor_options") or {}).get("runtime_env") or {}) for d in ingress)]
    return bool(os.environ.get(TOKEN_ENV)) or any((env.get("env_vars") or {}).get(TOKEN_ENV) for env in envs)


def check_exposure(data: dict[str, Any], behind_auth_proxy: bool = False) -> None:
    """Raise `UnsafeBind` where the config binds a non-loopback address and an application has no token, unless
    ``behind_auth_proxy`` says that a proxy in front authenticates every request."""
    host = str(data.get("http_options", {}).get("host", "127.0.0.1"))
    if is_loopback(host) or behind_auth_proxy:
        return
    open_apps = [a.get("name", "?") for a in data["applications"] if not _token_configured(a)]
    if open_apps:
        raise UnsafeBind(f"refusing to serve {host} without a token ({', '.join(open_apps)}): set {TOKEN_ENV} in "
                         f"the environment or the config's runtime_env, or, if an authenticating reverse proxy is "
                         f"in front, say so (--behind-auth-proxy)")


def load_config(config: str | Path | dict[str, Any] | None, checkpoint: str | Path, host: str,
                port: int, allowed_hosts: list[str] | None = None) -> dict[str, Any]:
    """A Serve deploy config (a YAML path, an already-loaded dict, or the default ``serve/config.yaml``) with the
    checkpoint, host and port filled in; the input is not modified.

    ``allowed_hosts`` replaces the applications' trusted Host names; without it, an application that names none
    answers the loopback names and, when ``host`` is a specific non-loopback address, that address (the name
    clients use for it must be added by the operator)."""
    if isinstance(config, dict):
        data = deepcopy(config)
    else:
        data = yaml.safe_load(Path(config or DEFAULT_CONFIG).read_text())
    data.setdefault("http_options", {}).update(host=host, port=int(port))
    bound = [] if is_loopback(host) or host in ("0.0.0.0", "::") else [host]
    for application in data["applications"]:
        args = application.setdefault("args", {})
        args["checkpoint"] = normalize(checkpoint)   # a URI stays one (`ecgad.storage`)
        if allowed_hosts is not None:
            args["allowed_hosts"] = list(allowed_hosts)
        elif bound and "allowed_hosts" not in args:
            args["allowed_hosts"] = [*LOOPBACK_HOSTS, *bound]
    return data


def _fit_gpus(data: dict[str, Any], cluster_gpus: float) -> None:
    """Run on CPU where the cluster has no GPU: a replica asking for one would otherwise wait forever."""
    if cluster_gpus > 0:
        return
    for application in data["applications"]:
        for deployment in application.get("deployments", []):
            options = deployment.get("ray_actor_options") or {}
            if options.get("num_gpus"):
                logger.warning("no GPU in this Ray cluster: %s runs on CPU", deployment.get("name"))
                options["num_gpus"] = 0


def _merged_runtime_env(application_env: dict[str, Any], deployment_env: dict[str, Any]) -> dict[str, Any]:
    """A deployment's ``runtime_env`` over its application's, environment variables merged: how Serve combines
    them for a deployed config."""
    env_vars = {**application_env.get("env_vars", {}), **deployment_env.get("env_vars", {})}
    return {**application_env, **deployment_env, **({"env_vars": env_vars} if env_vars else {})}


def _deployment_options(application: ServeApplicationSchema) -> dict[str, dict[str, Any]]:
    """``Deployment.options`` by deployment name: what the config entry sets for each deployment (replicas,
    autoscaling, queue limits, ``user_config``, health checks, actor options), with the application's
    ``runtime_env`` (e.g. the API token) applied to every deployment."""
    settings: dict[str, dict[str, Any]] = {ECGModel.name: {}, ECGIngress.name: {}}
    for deployment in application.deployments:
        if deployment.name not in settings:
            raise ValueError(f"the config names deployment {deployment.name!r}; this application has "
                             f"{', '.join(settings)}")
        settings[deployment.name] = deployment.model_dump(exclude_unset=True, exclude={"name"})
    for options in settings.values():
        actor = options.get("ray_actor_options") or {}
        runtime_env = _merged_runtime_env(application.runtime_env, actor.get("runtime_env") or {})
        if runtime_env:
            options["ray_actor_options"] = {**actor, "runtime_env": runtime_env}
    return settings


def _bind(application: ServeApplicationSchema) -> serve.Application:
    """The application a config entry describes: this service (the only one `run_local` deploys), bound with the
    entry's ``args`` and deployment settings."""
    if application.import_path != IMPORT_PATH:
        raise ValueError(f"run_local deploys {IMPORT_PATH}, not {application.import_path}")
    return bind_app(AppArgs.model_validate(application.args), _deployment_options(application))


def _run_all(applications: list[ServeApplicationSchema], done: Future) -> None:
    """``serve.run`` each config entry (each call returns once its application is RUNNING, or raises Serve's own
    message when it fails); the outcome goes to ``done``."""
    try:
        for application in applications:
            serve.run(_bind(application), name=application.name, route_prefix=application.route_prefix,
                      logging_config=application.logging_config)
        done.set_result(None)
    except BaseException as err:   # handed to the waiting thread, which raises it
        done.set_exception(err)


def _deploy(applications: list[ServeApplicationSchema], timeout_s: float) -> None:
    """Deploy the config's applications and return once all are RUNNING, or raise `TimeoutError` after
    ``timeout_s``: ``serve.run`` waits without a limit (a replica no node can host keeps it waiting forever), so it
    runs in a daemon thread and this one waits for it with the limit."""
    done: Future = Future()
    threading.Thread(target=_run_all, args=(applications, done), name="ecgad-serve-deploy", daemon=True).start()
    try:
        done.result(timeout=timeout_s)
    except TimeoutError:
        statuses = {name: status.status for name, status in serve.status().applications.items()}
        raise TimeoutError(f"Serve applications not running after {timeout_s:g} s: {statuses}") from None


def metrics_url() -> str:
    """Where this node's Ray Prometheus endpoint serves every process's metrics, ours (`serve.metrics`) included.
    Ray listens on every interface unless the node's address is a loopback one: firewall the port."""
    import ray

    node_id = ray.get_runtime_context().get_node_id()
    (node,) = [node for node in ray.nodes() if node["NodeID"] == node_id]
    return f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"


def run_local(checkpoint: str | Path, host: str = "127.0.0.1", port: int = 8000,
              config: str | Path | dict[str, Any] | None = None, blocking: bool = True,
              timeout_s: float = 300.0, behind_auth_proxy: bool = False,
              allowed_hosts: list[str] | None = None, metrics_port: int | None = None) -> str:
    """Deploy the service from a Serve config through Serve's public Python API; returns its base URL.

    It deploys what ``serve deploy`` of that config deploys: the HTTP options and proxy location (``serve.start``),
    then each application (``serve.run``) with the config's ``args`` and every deployment setting of the config
    (replicas, autoscaling, queue limits, batching, health checks, actor options, ``runtime_env``) applied through
    ``Deployment.options``, so a local run exercises the production settings. Calling it again redeploys the
    application with the changed config; its replicas are replaced (``serve deploy`` updates a changed
    ``user_config`` in place, which has no public Python API). The HTTP options are fixed by the first call.

    Where Ray is not initialized yet, it starts a new local Ray instance, or connects to the cluster ``RAY_ADDRESS``
    names, but never silently joins whatever cluster another process on the machine last started (``ray.init()``'s
    default). ``blocking`` serves until Ctrl-C; Ctrl-C, also during deployment, shuts Serve down.
    ``metrics_port`` is the port of the new local Ray instance's Prometheus endpoint (`metrics_url`; Ray picks one
    without it); a cluster that is already running keeps the port it was started with.

    Safe by default: a non-loopback ``host`` needs a token (`check_exposure`) unless ``behind_auth_proxy``; the
    trusted Host names are the loopback ones (plus ``host``) unless ``allowed_hosts`` or the config says otherwise.
    """
    import ray

    data = load_config(config, checkpoint, host, port, allowed_hosts)
    check_exposure(data, behind_auth_proxy)
    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS") or "local"
        ray.init(address=address, **({"_metrics_export_port": metrics_port} if address == "local" and metrics_port
                                     else {}))
    if metrics_port and not metrics_url().endswith(f":{metrics_port}/metrics"):
        logger.warning("Ray was started before: its metrics are at %s, not on port %d", metrics_url(), metrics_port)
    _fit_gpus(data, ray.cluster_resources().get("GPU", 0))
    schema = ServeDeploySchema.model_validate(data)
    url = f"http://{host}:{port}"
    try:
        serve.start(proxy_location=schema.proxy_location, http_options=schema.http_options.model_dump())
        _deploy(schema.applications, timeout_s)
        if blocking:
            logger.info("ecgad service at %s/ (API docs at %s/docs), Prometheus metrics at %s; Ctrl-C stops it",
                        url, url, metrics_url())
            while True:
                time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()
        if not blocking:
            raise
    return url
