"""Fetch PTB-XL from PhysioNet: resumable, every file verified against the release's ``SHA256SUMS.txt``.

Why this shape: the full 500 Hz release is ~44,000 files, so a download will be interrupted and re-run. A file
whose sha256 already matches is skipped without a request; a file is written to ``<name>.part`` and renamed only
once verified, so a file that exists under its real name is whole; a ``.part`` left by an interrupted run is
resumed with an HTTP ``Range`` request. A failed or mismatching transfer is retried once (from scratch, so a
corrupt ``.part`` cannot poison the retry), then raises `DownloadError` naming the file and the reason. urllib
only, so no new dependency.

The release's ``SHA256SUMS.txt`` lists ``<sha256> <path relative to the release root>`` per line; it is the trust
anchor, fetched once and kept (it cannot verify itself). Because the names to fetch come from the remote side (the
release's database lists them, the sums file vouches for them) and a checksum from the same source proves nothing
about a name, every name is checked to stay inside the output folder before anything is written (`local_path`),
and the transfer is HTTPS only (plain HTTP only to this machine's loopback address: a local mirror, the tests).
"""

from __future__ import annotations

import csv
import hashlib
import http.client
import os
import shutil
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from urllib.error import HTTPError, URLError
from urllib.parse import quote, urlsplit
from urllib.request import Request, urlopen

from tqdm import tqdm

from ecgad.atomic import atomic_file
from ecgad.log import get_logger

log = get_logger(__name__)

PHYSIONET_PTBXL_URL = "https://physionet.org/files/ptb-xl/1.0.3/"
SUMS_FILE = "SHA256SUMS.txt"
#: Fetched (and verified) before any record; ``ptbxl_database.csv`` names the records.
METADATA_FILES = ("ptbxl_database.csv", "scp_statements.csv", "LICENSE.txt")
#: Database column naming each record's files (without extension), per sampling rate.
FILENAME_COLUMN = {500: "filename_hr", 100: "filename_lr"}
ATTEMPTS = 2
TIMEOUT_S = 60.0
_CHUNK = 1 << 16
#: Hosts plain ``http://`` may be used with: this machine only.
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})


class DownloadError(RuntimeError):
    """A file could not be fetched (HTTP or network error) or verified (sha256 mismatch), even after a retry."""


def parse_sums(text: str) -> dict[str, str]:
    """``SHA256SUMS.txt`` -> {relative path: sha256}. Accepts sha256sum's ``*`` (binary) marker and extra spaces."""
    sums = {}
    for line in text.splitlines():
        parts = line.strip().split(maxsplit=1)
        if len(parts) == 2 and len(parts[0]) == 64:
            sums[parts[1].lstrip("*").strip()] = parts[0].lower()
    return sums


def check_url(url: str) -> str:
    """``url`` if it is ``https://`` (or ``http://`` to a loopback host), else `DownloadError`: a download over plain
    HTTP can be rewritten by anyone on the path, checksums included, since they come from the same server."""
    parts = urlsplit(url)
    if parts.scheme == "https" or (parts.scheme == "http" and parts.hostname in LOOPBACK_HOSTS):
        return url
    raise DownloadError(f"refusing {url!r}: downloads are https only (plain http only to a loopback address)")


def local_path(root: Path, rel: str) -> Path:
    """Where the release-relative name ``rel`` (from the remote listing) is written under ``root``; `DownloadError`
    for a name that could land elsewhere or is not a plain relative path: absolute, ``..`` or empty components,
    backslashes (a Windows separator), NUL or other control characters."""
    parts = rel.split("/")
    if (not rel or rel.startswith("/") or "\\" in rel or any(ord(c) < 32 for c in rel)
            or any(part in ("", ".", "..") for part in parts) or ":" in parts[0]):
        raise DownloadError(f"refusing the listed name {rel!r}: not a plain path inside the output folder")
    dest = root / rel
    if not dest.resolve().is_relative_to(root.resolve()):     # a symlinked folder inside root pointing out
        raise DownloadError(f"refusing the listed name {rel!r}: it resolves outside {root}")
    return dest


def record_files(database_csv: str | Path, rate: int, limit: int | None = None) -> list[str]:
    """The ``.hea`` and ``.dat`` paths (relative to the release root) of the first ``limit`` records at ``rate``."""
    with open(database_csv, newline="") as f:
        names = [row[FILENAME_COLUMN[rate]] for row in csv.DictReader(f)]
    return [f"{name}.{ext}" for name in names[:limit] for ext in ("hea", "dat")]


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


class _Fetcher:
    """Fetches release-relative paths from ``base_url`` into ``root``; thread-safe (one file per call)."""

    def __init__(self, root: Path, base_url: str) -> None:
        self.root = root
        self.base_url = check_url(base_url.rstrip("/") + "/")
        self.sums: dict[str, str] = {}

    def url(self, rel: str) -> str:
        return self.base_url + quote(rel)

    def fetch(self, rel: str) -> bool:
        """Make ``root/rel`` a verified copy; True if it had to be downloaded, False if it already matched."""
        dest = local_path(self.root, rel)
        expected = self.sums.get(rel)
        if expected is None:
            raise DownloadError(f"{rel} is not listed in {SUMS_FILE}; cannot verify it")
        if dest.is_file() and _sha256(dest) == expected:
            return False
        dest.parent.mkdir(parents=True, exist_ok=True)
        part = dest.with_name(dest.name + ".part")
        problem = ""
        for attempt in range(1, ATTEMPTS + 1):
            if attempt > 1:
                log.warning("%s: %s; retrying from scratch", rel, problem)
                part.unlink(missing_ok=True)
            try:
                if not (part.is_file() and _sha256(part) == expected):    # an interrupted run may have finished it
                    self.transfer(rel, part)
            except (OSError, http.client.HTTPException, DownloadError) as exc:   # resets, timeouts, short reads
                problem = str(exc)
                continue
            actual = _sha256(part)
            if actual == expected:
                # Not `ecgad.atomic`: its temporaries vanish on failure, and a ``.part`` must survive to be resumed.
                # Renaming the verified ``.part`` is the same atomic publish.
                os.replace(part, dest)
                return True
            problem = f"sha256 {actual} does not match {expected} listed in {SUMS_FILE}"
        part.unlink(missing_ok=True)
        raise DownloadError(f"{self.url(rel)}: {problem} (after {ATTEMPTS} attempts)")

    def open(self, rel: str, offset: int = 0):
        """The HTTP response for ``rel`` from byte ``offset`` on. Failures are `DownloadError`s, except a 416 to a
        ranged request, which stays an ``HTTPError`` so `transfer` can start over."""
        request = Request(self.url(rel), headers={"Range": f"bytes={offset}-"} if offset else {})
        try:
            response = urlopen(request, timeout=TIMEOUT_S)
        except HTTPError as exc:
            if exc.code == 416 and offset:
                raise
            raise DownloadError(f"HTTP {exc.code} {exc.reason}") from exc
        except URLError as exc:
            raise DownloadError(f"cannot reach {self.url(rel)}: {exc.reason}") from exc
        try:
            check_url(response.geturl())        # urllib follows redirects, https -> http included
        except DownloadError:
            response.close()
            raise
        return response

    def transfer(self, rel: str, part: Path) -> None:
        """Download into ``part``, resuming from its current size with a Range request where it exists."""
        offset = part.stat().st_size if part.is_file() else 0
        try:
            response = self.open(rel, offset)
        except HTTPError:                       # 416: the .part is not a prefix of the file: start over
            part.unlink()
            return self.transfer(rel, part)
        with response, open(part, "ab" if offset and response.status == 206 else "wb") as f:
            shutil.copyfileobj(response, f, _CHUNK)

    def fetch_whole(self, rel: str, dest: Path) -> None:
        """Download ``rel`` to ``dest`` atomically, in one go (nothing to resume or verify it against)."""
        with self.open(rel) as response, atomic_file(dest) as f:
            shutil.copyfileobj(response, f, _CHUNK)


def download_ptbxl(out: str | Path, rate: int = 500, limit: int | None = None,
                   base_url: str = PHYSIONET_PTBXL_URL, *, workers: int = 8, progress: bool = True) -> Path:
    """Download PTB-XL into ``out`` (the release layout, so ``out`` is a PTB-XL root); returns ``out``.

    Fetches ``SHA256SUMS.txt``, the metadata files, then the ``.hea``/``.dat`` of the first ``limit`` records (all
    if None) at ``rate`` (500: ``records500``, 100: ``records100``). Re-running skips every file that already
    verifies, so an interrupted download is finished by running it again. ``workers`` parallel connections
    (PhysioNet serves many small files slowly one by one). Raises `DownloadError` on any file that cannot be
    fetched and verified.
    """
    if rate not in FILENAME_COLUMN:
        raise ValueError(f"rate must be one of {sorted(FILENAME_COLUMN)} Hz; got {rate}")
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0 or None; got {limit}")
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    fetcher = _Fetcher(root, base_url)

    sums_path = root / SUMS_FILE
    if not sums_path.is_file():
        fetcher.fetch_whole(SUMS_FILE, sums_path)   # nothing can verify a partial trust anchor: fetch it whole
    fetcher.sums = parse_sums(sums_path.read_text())
    if not fetcher.sums:
        raise DownloadError(f"{sums_path} lists no files; delete it and retry")
    for name in METADATA_FILES:
        fetcher.fetch(name)

    files = record_files(root / "ptbxl_database.csv", rate, limit)
    downloaded = 0
    with tqdm(total=len(files), unit="file", desc=f"PTB-XL {rate} Hz", disable=not progress) as bar, \
            ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        futures = [pool.submit(fetcher.fetch, rel) for rel in files]
        try:
            for future in as_completed(futures):
                downloaded += future.result()
                bar.update()
        except BaseException:
            pool.shutdown(cancel_futures=True)
            raise
    log.info("PTB-XL %d Hz in %s: %d files downloaded, %d already present", rate, root, downloaded,
             len(files) - downloaded)
    return root
