"""The scoring service against hostile input, over real HTTP: one Serve application for the module (one replica per
deployment, one work slot that is never waited for, a short readiness cache, a required token).

What it shows (issue 13, the service's half): every hostile request of the shared fuzz corpus (`tests.fuzz_corpus`,
sent as uploads and as NPY bodies) and of the JSON, name and header cases made here gets a typed 4xx and never a
5xx, while the service's processes stay within a stated memory bound and still score a good record afterwards; long
records get bounded maps and plots; lying headers, deep JSON, math-text ids and unusable upload names get typed
answers; a record the model fails on fails alone; untrusted hosts, cross-site browser POSTs and unsafe binds are
refused; ``/readyz`` answers from a cached probe; overload is a fast 503.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import psutil
import pytest

from ecgad.io import read_record
from ecgad.types import REJECTION_CODES, Scores
from serve import bodies
from serve.schemas import SCORING_FAILED
from serve.testing import local_config, local_service, random_checkpoint, token_client
from tests.fuzz_corpus import FuzzCase, corpus, npy_bytes, npy_header

pytestmark = pytest.mark.cluster  # starts Ray and Serve (see pyproject.toml's markers)

TOKEN = "hostile-token"
MAX_BODY_MB = 16
ALLOWED_ORIGIN = "https://viewer.example.org"
READY_TTL_S = 2.0
ARGS = {"mode": "fast", "max_body_mb": MAX_BODY_MB, "cpu_threads": 1, "work_slots": 1, "work_wait_s": 0.0,
        "ready_ttl_s": READY_TTL_S, "allowed_origins": [ALLOWED_ORIGIN]}
MODEL = {"user_config": {"max_batch_size": 4, "batch_wait_timeout_s": 0.01}}
GOOD_RECORD = "ptbxl/records500/06000/06000_hr"
#: The bound the memory test states: the service's processes may grow this much above idle while the corpus runs.
MEMORY_BOUND_BYTES = int(1.5 * 2**30)
#: Every status a hostile request may get: typed client errors, or 200 where the input was in fact valid.
TYPED = {200, 400, 403, 413, 415, 422}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return random_checkpoint(tmp_path_factory.mktemp("hostile") / "checkpoint", seed=0)


@pytest.fixture(scope="module")
def service(ray_session, checkpoint):
    config = local_config(args=ARGS, model=MODEL, token=TOKEN, http={"request_timeout_s": 60})
    with local_service(checkpoint, config) as url:
        yield url


@pytest.fixture(scope="module")
def client(service):
    with token_client(service, TOKEN) as c:
        yield c


@pytest.fixture(scope="module")
def good_signal(sample_data) -> np.ndarray:
    return read_record(sample_data / GOOD_RECORD).signal


def _score_npy(client: httpx.Client, signal: np.ndarray, fs: float = 500, path: str = "/v1/score",
               **params) -> httpx.Response:
    return client.post(path, params={"fs": fs, **params}, content=npy_bytes(np.asarray(signal, np.float32)),
                       headers={"Content-Type": bodies.NPY_TYPE})


def _multipart(files: list[tuple[str, bytes]], boundary: str = "ecgadfuzz") -> tuple[bytes, dict[str, str]]:
    """A multipart body written by hand: clients escape control characters in file names, a hostile one does not."""
    parts = [b"--" + boundary.encode() + b"\r\nContent-Disposition: form-data; name=\"files\"; filename=\""
             + name.encode("utf-8", "surrogateescape") + b"\"\r\nContent-Type: application/octet-stream\r\n\r\n"
             + content + b"\r\n" for name, content in files]
    body = b"".join(parts) + b"--" + boundary.encode() + b"--\r\n"
    return body, {"Content-Type": f"{bodies.MULTIPART_TYPE}; boundary={boundary}"}


def _assert_typed(response: httpx.Response, what: str) -> None:
    """A typed answer: a listed status, and a 422 with a known code."""
    assert response.status_code in TYPED, (what, response.status_code, response.text[:300])
    if response.status_code == 422:
        code = response.json()["detail"]["code"]
        assert code in REJECTION_CODES or code == SCORING_FAILED, (what, response.text[:300])


def _png_width(png: bytes) -> int:
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    return int.from_bytes(png[16:20], "big")


# --- finding 1: bounded work for long records --------------------------------------------------------------------

def test_long_records_get_bounded_maps_and_plots(client, good_signal):
    long_signal = np.tile(good_signal, 20)                              # 200 s at 500 Hz: 100,000 samples
    auto = _score_npy(client, long_signal, map="auto")
    assert auto.status_code == 200, auto.text[:300]
    body = auto.json()
    assert body["map_step"] > 1 and np.shape(body["anomaly_map"])[1] <= bodies.AUTO_MAP_COLUMNS
    default = _score_npy(client, long_signal)
    assert default.json()["map_step"] == body["map_step"]              # auto is the default
    full = _score_npy(client, long_signal, map="full").json()          # asked for: full resolution, still bounded
    assert full["map_step"] == 1 and np.shape(full["anomaly_map"]) == (12, long_signal.shape[1])
    plot = _score_npy(client, long_signal, path="/v1/score/plot")
    assert plot.status_code == 200, plot.text[:300]
    inches = (bodies.PLOT_MAX_SECONDS + 1) * 25.0 / 25.4 + 1.0          # paper at 25 mm/s, margins, calibration
    assert _png_width(plot.content) <= inches * 100


def test_long_record_at_a_low_rate_is_too_long(client):
    response = client.post("/v1/score", params={"fs": 50}, headers={"Content-Type": bodies.NPY_TYPE},
                           content=npy_bytes(np.zeros((12, 600_000), np.int8)))   # 12,000 s
    assert response.status_code == 422 and response.json()["detail"]["code"] == "too_long", response.text


def test_map_wider_than_the_limit_is_downsampled():
    scores = Scores(record_id="r", pred_score=1.0, pred_label=False, threshold=2.0,
                    anomaly_map=np.ones((12, bodies.MAX_MAP_COLUMNS * 2 + 1), np.float32), r_peaks=np.array([1]),
                    beats_used=1, windows_scored=1, warnings=[])
    body = bodies.score_body(scores, "v", step=1)
    assert body["map_step"] == 3 and len(body["anomaly_map"][0]) <= bodies.MAX_MAP_COLUMNS
    assert "downsampled" in body["warnings"][-1]


# --- finding 4: exceptions that were 500s --------------------------------------------------------------------------

def test_lying_npy_header_is_too_large(client):
    lie = npy_header((12, 10**12)) + bytes(1024)
    response = client.post("/v1/score", params={"fs": 500}, content=lie, headers={"Content-Type": bodies.NPY_TYPE})
    assert response.status_code == 422 and response.json()["detail"]["code"] == "too_large", response.text


def test_deep_json_is_bad_file(client):
    response = client.post("/v1/score", content=b"[" * 100_000, headers={"Content-Type": bodies.JSON_TYPE})
    assert response.status_code == 422 and response.json()["detail"]["reason"] == "bad_file:json", response.text


MATH_IDS = ("$\\frac{1}{2}$", "$x^{2^{2^{2^{2^{2^{2^{2}}}}}}}$", "$" * 41, "$\\sqrt{" * 25 + "$", "$\\undefined$")


@pytest.mark.parametrize("record_id", MATH_IDS)
def test_math_text_ids_are_plotted_literally(client, good_signal, record_id):
    as_json = client.post("/v1/score/plot", json={"signal": good_signal.tolist(), "fs": 500, "record_id": record_id})
    assert as_json.status_code == 200, as_json.text[:300]
    body, headers = _multipart([(f"{record_id}.npy", npy_bytes(good_signal))])
    as_upload = client.post("/v1/score/plot", params={"fs": 500}, content=body, headers=headers)
    assert as_upload.status_code == 200, as_upload.text[:300]


@pytest.mark.parametrize("name", ["a\x00b.npy", "x" * 300 + ".npy", "é" * 130 + ".npy", "line\r\nbreak.npy",
                                  "tab\there.npy"])
def test_unusable_upload_names_are_refused(client, good_signal, name):
    body, headers = _multipart([(name, npy_bytes(good_signal))])
    response = client.post("/v1/score", params={"fs": 500}, content=body, headers=headers)
    assert response.status_code == 422, response.text[:300]
    assert response.json()["detail"]["reason"] in ("bad_file:upload", "bad_file:multipart"), response.text[:300]


def test_wfdb_header_without_length_leaks_no_path(client):
    header = b"rec 12 500\n" + b"".join(f"rec.dat 16 200/mV 16 0 0 0 0 {n}\n".encode() for n in
                                       ("I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6"))
    body, headers = _multipart([("rec.hea", header), ("rec.dat", bytes(12 * 2 * 5000))])
    response = client.post("/v1/score", content=body, headers=headers)
    _assert_typed(response, "no sig_len")
    assert "ecgad-upload-" not in response.text and "/tmp" not in response.text


# --- finding 5: one bad record fails only itself --------------------------------------------------------------------

def test_a_record_the_model_fails_on_fails_alone(checkpoint):
    """The model deployment's batch method, in process: the broken record gets its own failure, its neighbours
    their scores (scored alone after the batch call failed)."""
    from serve.app import ECGModel, ScoringFailed

    replica = ECGModel.func_or_class(checkpoint=str(checkpoint), mode="fast", device="cpu")
    good = replica._canned
    window = good.windows[0]
    broken = dataclasses.replace(good, record_id="broken",
                                 windows=[dataclasses.replace(window, beats=window.beats[:, :5])])
    batch = ECGModel.func_or_class._score_batch.__wrapped__        # the method under @serve.batch
    outcomes = asyncio.run(batch(replica, [good, broken, good], [False, False, False], [0.0, 0.0, 0.0]))
    first, failed, last = (outcome for outcome, _ in outcomes)
    assert isinstance(first, Scores) and isinstance(last, Scores)
    assert first.pred_score == pytest.approx(last.pred_score)
    assert isinstance(failed, ScoringFailed) and str(failed) == "RuntimeError"


# --- finding 7: safe defaults ---------------------------------------------------------------------------------------

def test_untrusted_host_is_refused(service, good_signal):
    response = httpx.post(f"{service}/v1/score", params={"fs": 500}, content=npy_bytes(good_signal),
                          headers={"Content-Type": bodies.NPY_TYPE, "Host": "rebound.attacker.example",
                                   "Authorization": f"Bearer {TOKEN}"})
    assert response.status_code == 400
    assert httpx.get(f"{service}/healthz", headers={"Host": "rebound.attacker.example"}).status_code == 400
    assert httpx.get(f"{service}/healthz", headers={"Host": "localhost"}).status_code == 200


def test_cross_site_browser_posts_are_refused(client, service, good_signal):
    body, headers = _multipart([("rec.npy", npy_bytes(good_signal))])
    cross = {**headers, "Origin": "https://evil.example", "Sec-Fetch-Site": "cross-site"}
    assert client.post("/v1/score", params={"fs": 500}, content=body, headers=cross).status_code == 403
    old_browser = {**headers, "Origin": "https://evil.example"}
    assert client.post("/v1/score", params={"fs": 500}, content=body, headers=old_browser).status_code == 403
    same = {**headers, "Origin": service, "Sec-Fetch-Site": "same-origin"}
    assert client.post("/v1/score", params={"fs": 500}, content=body, headers=same).status_code == 200
    listed = {**headers, "Origin": ALLOWED_ORIGIN, "Sec-Fetch-Site": "cross-site"}
    assert client.post("/v1/score", params={"fs": 500}, content=body, headers=listed).status_code == 200


def test_readyz_answers_from_a_cached_probe(service):
    first = httpx.get(f"{service}/readyz", timeout=60).json()
    again = httpx.get(f"{service}/readyz", timeout=60).json()
    assert first["status"] == "ready" and again["checked_at"] == first["checked_at"]
    time.sleep(READY_TTL_S + 0.5)
    later = httpx.get(f"{service}/readyz", timeout=60).json()
    assert later["status"] == "ready" and later["checked_at"] > first["checked_at"]


def test_non_loopback_bind_needs_a_token(checkpoint, monkeypatch):
    from ecgad.cli import main
    from serve.app import UnsafeBind, check_exposure, load_config, run_local

    monkeypatch.delenv("ECGAD_API_TOKEN", raising=False)
    with pytest.raises(UnsafeBind, match="behind-auth-proxy"):
        run_local(checkpoint, host="0.0.0.0", port=1, blocking=False)      # refused before anything starts
    assert main(["serve", "--checkpoint", str(checkpoint), "--host", "0.0.0.0"]) == 1
    open_config = load_config(None, checkpoint, "0.0.0.0", 8000)
    check_exposure(open_config, behind_auth_proxy=True)                     # told: a proxy authenticates
    check_exposure(load_config(local_config(token="t"), checkpoint, "10.1.2.3", 8000))
    check_exposure(load_config(None, checkpoint, "::1", 8000))
    assert load_config(None, checkpoint, "10.1.2.3", 8000)["applications"][0]["args"]["allowed_hosts"][-1] == \
        "10.1.2.3"


# --- the HTTP fuzz, with memory bounded ---------------------------------------------------------------------------

def _json_cases(signal: list[list[float]]) -> Iterator[tuple[str, bytes, str]]:
    """Hostile JSON bodies ``(name, body, content type)``: deep nesting, wrong types in every field, huge or lying
    sizes, bad encodings, math-text and oversize ids."""
    yield "deep_array", b"[" * 100_000, bodies.JSON_TYPE
    yield "deep_object", b'{"a":' * 50_000, bodies.JSON_TYPE
    yield "deep_signal", b'{"fs": 500, "signal": ' + b"[" * 900 + b"]" * 900 + b"}", bodies.JSON_TYPE
    for raw in (b"", b"null", b"1", b'"x"', b"[]", b"{}", b"\xff\xfe{", b"\xef\xbb\xbf{}", b"{" * 3, b"NaN",
                b'{"signal": [[1e999]], "fs": 500}', b'{"signal": [[NaN, Infinity]], "fs": 500}'):
        yield f"raw_{raw[:12]!r}", raw, bodies.JSON_TYPE
    hostile = {
        "signal": ["x", 1, None, {}, [1, 2], [[]], [["1"]], [[True] * 20] * 12, [[[1]]] * 12,
                   [[0.0] * 20_000] * 12, [[0.0] * 5] * 1000, [[2**70] * 5000] * 12],
        "fs": ["500", -1, 0, 1e300, True, [500], None, 1e-300, 50],
        "lead_names": ["I", ["I"] * 12, [1] * 12, ["x" * 10_000] * 12, [None] * 12, []],
        "record_id": ["x" * 10_000, 5, "$\\frac{1}{2}$", "\x00", None],
    }
    for field, values in hostile.items():
        for i, value in enumerate(values):
            payload = {"signal": signal, "fs": 500, field: value}
            yield f"{field}_{i}", json.dumps(payload).encode(), bodies.JSON_TYPE
    yield "latin1_charset", json.dumps({"signal": signal, "fs": 500}).encode(), "application/json; charset=latin-1"
    for kind in ("text/plain", "application/x-www-form-urlencoded", "image/png", "multipart/mixed", "*/*", ";;"):
        yield f"type_{kind}", b"{}", kind


def _requests(cases: list[FuzzCase], signal: np.ndarray) -> Iterator[tuple[str, dict]]:
    """Every hostile request: each corpus case as an upload (and, if it is one NPY, as an NPY body), the JSON
    cases, and hostile upload names and multipart framings."""
    for case in cases:
        params = {"fs": repr(case.fs)} if case.fs is not None else {}
        body, headers = _multipart(list(case.files))
        yield f"upload:{case.name}", {"params": params, "content": body, "headers": headers}
        if len(case.files) == 1 and case.files[0][0].endswith(".npy"):
            yield f"npy:{case.name}", {"params": params, "content": case.files[0][1],
                                       "headers": {"Content-Type": bodies.NPY_TYPE}}
    for name, body, kind in _json_cases(signal[:, :5000].tolist()):
        yield f"json:{name}", {"content": body, "headers": {"Content-Type": kind}}
    good = npy_bytes(signal.astype(np.float32))
    for i, name in enumerate(["a\x00.npy", "x" * 300 + ".npy", "../../etc/x.npy", "/abs.npy", "C:\\x\\y.npy", "",
                              ".npy", "x.npy.sh", "\u202e.npy", "x" * 251 + ".npy"]):
        body, headers = _multipart([(name, good)])
        yield f"name_{i}", {"params": {"fs": "500"}, "content": body, "headers": headers}
    for i, (body, kind) in enumerate([(b"--b\r\n\r\n", "multipart/form-data; boundary=b"),
                                      (b"junk", "multipart/form-data; boundary=" + "b" * 100),
                                      (b"--b--\r\n", "multipart/form-data; boundary=b"),
                                      (b"--b\r\nContent-Disposition: form-data; name=\"files\"\r\n\r\nx\r\n--b--",
                                       "multipart/form-data; boundary=b")]):
        yield f"framing_{i}", {"content": body, "headers": {"Content-Type": kind}}


def _service_processes() -> list[psutil.Process]:
    """The Serve replicas and proxy of this module's Ray instance (its processes descend from this one)."""
    found = []
    for process in psutil.Process().children(recursive=True):
        try:
            title = " ".join(process.cmdline())
        except psutil.Error:
            continue
        if "ServeReplica" in title or "ProxyActor" in title:
            found.append(process)
    return found


class _PeakRSS:
    """The peak of the summed RSS of some processes, sampled in a thread while the block runs."""

    def __init__(self, processes: list[psutil.Process], period_s: float = 0.02) -> None:
        self.processes, self.period_s = processes, period_s
        self.peak = self.idle = self.recent = self._total()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _total(self) -> int:
        total = 0
        for process in self.processes:
            try:
                total += process.memory_info().rss
            except psutil.Error:
                pass
        return total

    def _sample(self) -> None:
        while not self._stop.is_set():
            total = self._total()
            self.peak, self.recent = max(self.peak, total), max(self.recent, total)
            time.sleep(self.period_s)

    def recent_peak(self) -> int:
        """The peak since the last call (which request made the service grow, for the failure message)."""
        peak, self.recent = self.recent, self._total()
        return peak

    def __enter__(self) -> "_PeakRSS":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def test_http_fuzz_typed_answers_and_bounded_memory(client, good_signal):
    cases = corpus()
    requests = list(_requests(cases, good_signal))
    assert len(requests) >= 300 and {"npz", "npy", "csv", "wfdb_header", "wfdb_data"} <= {c.family for c in cases}
    processes = _service_processes()
    assert len(processes) >= 3, processes          # the proxy and the two replicas
    statuses: dict[str, int] = {}
    grown_by: dict[str, int] = {}
    with _PeakRSS(processes) as memory:
        for name, request in requests:
            response = client.post("/v1/score", **request)
            _assert_typed(response, name)
            statuses[name] = response.status_code
            grown_by[name] = memory.recent_peak() - memory.idle
    assert statuses["npy:npy_lying_header"] == 422 and statuses["json:deep_array"] == 422
    grown = memory.peak - memory.idle
    worst = sorted(grown_by.items(), key=lambda item: -item[1])[:5]
    assert grown < MEMORY_BOUND_BYTES, (f"the service grew {grown / 2**30:.2f} GiB while the corpus was sent; "
                                        f"largest: {[(n, f'{g / 2**30:.2f} GiB') for n, g in worst]}")
    after = _score_npy(client, good_signal, map="none")
    assert after.status_code == 200, after.text


# --- overload: a fast 503 (destructive: last) --------------------------------------------------------------------

async def _burst(url: str, body: bytes, n: int) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=httpx.Limits(max_connections=n),
                                 headers={"Authorization": f"Bearer {TOKEN}"}) as c:
        async def one() -> httpx.Response:
            return await c.post("/v1/score/plot", params={"fs": 500}, content=body,
                                headers={"Content-Type": bodies.NPY_TYPE})
        return await asyncio.gather(*(one() for _ in range(n)))


def test_busy_work_slots_answer_503(service, client, good_signal):
    responses = asyncio.run(_burst(service, npy_bytes(np.tile(good_signal, 3).astype(np.float32)), 8))
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 503} and 200 in statuses and 503 in statuses, statuses
    assert all(r.headers["retry-after"] == "1" for r in responses if r.status_code == 503)
    assert _score_npy(client, good_signal, map="none").status_code == 200
