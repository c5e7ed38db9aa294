"""ecgad.download against a local PhysioNet look-alike that serves the sample PTB-XL files from a temp folder."""

from __future__ import annotations

import csv
import hashlib
import os
import shutil
import threading
from dataclasses import dataclass
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from ecgad.download import SUMS_FILE, DownloadError, check_url, download_ptbxl, local_path, parse_sums

FIRST_FIVE = ("00001", "00003", "00004", "00005", "00006")     # the first rows of the sample ptbxl_database.csv
EXPECTED = {SUMS_FILE, "ptbxl_database.csv", "scp_statements.csv", "LICENSE.txt",
            *(f"records100/00000/{i}_lr.{ext}" for i in FIRST_FIVE for ext in ("hea", "dat"))}


class _RangeHandler(SimpleHTTPRequestHandler):
    """The stdlib file server plus single ``bytes=N-`` ranges (PhysioNet honours them, the stdlib does not);
    every request is logged on the server as (path, Range header)."""

    def send_head(self):
        requested = self.headers.get("Range")
        self.server.requests.append((self.path, requested))
        if requested is None:
            return super().send_head()
        path = self.translate_path(self.path)
        if not os.path.isfile(path):
            self.send_error(404)
            return None
        size, start = os.path.getsize(path), int(requested.removeprefix("bytes=").rstrip("-"))
        if start >= size:
            self.send_error(416)
            return None
        f = open(path, "rb")
        f.seek(start)
        self.send_response(206)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Range", f"bytes {start}-{size - 1}/{size}")
        self.send_header("Content-Length", str(size - start))
        self.end_headers()
        return f

    def log_message(self, *args) -> None:
        pass


@dataclass
class Server:
    root: Path
    url: str
    requests: list[tuple[str, str | None]]


@pytest.fixture
def physionet(tmp_path: Path, sample_data: Path):
    """A copy of the sample PTB-XL root in PhysioNet's URL layout, with a SHA256SUMS.txt made for it."""
    root = tmp_path / "physionet"
    shutil.copytree(sample_data / "ptbxl" / "records100", root / "records100")
    for name in ("ptbxl_database.csv", "scp_statements.csv", "LICENSE.txt"):
        shutil.copy(sample_data / "ptbxl" / name, root / name)
    sums = [f"{hashlib.sha256(p.read_bytes()).hexdigest()} {p.relative_to(root).as_posix()}"
            for p in sorted(root.rglob("*")) if p.is_file()]
    (root / SUMS_FILE).write_text("\n".join(sums) + "\n")

    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(_RangeHandler, directory=str(root)))
    server.requests = []
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield Server(root, f"http://127.0.0.1:{server.server_address[1]}/", server.requests)
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def _download(server: Server, out: Path) -> Path:
    return download_ptbxl(out, rate=100, limit=5, base_url=server.url, workers=2, progress=False)


def _files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def test_download_is_byte_identical_and_a_rerun_fetches_nothing(physionet: Server, tmp_path: Path) -> None:
    out = _download(physionet, tmp_path / "out")
    assert _files(out) == EXPECTED
    for rel in EXPECTED:
        assert (out / rel).read_bytes() == (physionet.root / rel).read_bytes(), rel
    assert len(physionet.requests) == len(EXPECTED)

    physionet.requests.clear()
    _download(physionet, out)
    assert physionet.requests == []


def test_interrupted_download_resumes_with_a_range_request(physionet: Server, tmp_path: Path) -> None:
    out = _download(physionet, tmp_path / "out")
    rel = "records100/00000/00004_lr.dat"
    whole = (out / rel).read_bytes()
    (out / rel).unlink()
    (out / f"{rel}.part").write_bytes(whole[:len(whole) // 2])      # what an interrupted run leaves
    physionet.requests.clear()

    _download(physionet, out)
    assert physionet.requests == [(f"/{rel}", f"bytes={len(whole) // 2}-")]
    assert (out / rel).read_bytes() == whole and _files(out) == EXPECTED


def test_a_corrupt_part_file_is_fetched_again_from_scratch(physionet: Server, tmp_path: Path) -> None:
    out = _download(physionet, tmp_path / "out")
    rel = "records100/00000/00005_lr.hea"
    whole = (out / rel).read_bytes()
    (out / rel).unlink()
    (out / f"{rel}.part").write_bytes(b"garbage")
    physionet.requests.clear()

    _download(physionet, out)
    assert physionet.requests == [(f"/{rel}", "bytes=7-"), (f"/{rel}", None)]
    assert (out / rel).read_bytes() == whole and _files(out) == EXPECTED


def test_a_corrupted_server_file_fails_after_one_retry(physionet: Server, tmp_path: Path) -> None:
    rel = "records100/00000/00003_lr.dat"
    data = bytearray((physionet.root / rel).read_bytes())
    data[100] ^= 0xFF
    (physionet.root / rel).write_bytes(bytes(data))

    out = tmp_path / "out"
    with pytest.raises(DownloadError, match=r"00003_lr\.dat: sha256 .* does not match"):
        _download(physionet, out)
    assert [path for path, _ in physionet.requests].count(f"/{rel}") == 2
    assert not (out / rel).exists() and not (out / f"{rel}.part").exists()


def test_an_http_error_is_a_download_error(physionet: Server, tmp_path: Path) -> None:
    (physionet.root / "records100/00000/00006_lr.hea").unlink()
    with pytest.raises(DownloadError, match=r"00006_lr\.hea: HTTP 404"):
        _download(physionet, tmp_path / "out")


def test_unreachable_server_is_a_download_error(tmp_path: Path) -> None:
    with pytest.raises(DownloadError, match="cannot reach"):
        download_ptbxl(tmp_path, base_url="http://127.0.0.1:9/", progress=False)


def test_arguments_are_checked(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="rate"):
        download_ptbxl(tmp_path, rate=250)
    with pytest.raises(ValueError, match="limit"):
        download_ptbxl(tmp_path, limit=-1)


def test_parse_sums_reads_physionet_and_sha256sum_lines() -> None:
    digest = "ab" * 32
    text = f"{digest} records500/00000/00001_hr.dat\n{digest.upper()} *LICENSE.txt\n\nnot a line\n"
    assert parse_sums(text) == {"records500/00000/00001_hr.dat": digest, "LICENSE.txt": digest}


# -- hostile listings (issue 13: names from the remote side are checked before anything is written) ------------------

@pytest.mark.parametrize("name", ["../../x.hea", "../x", "/etc/passwd", "records100/../../x", "a\\b.hea",
                                  "a\x00b.hea", "a//b.hea", "./a", "", "C:/x", "records100/\nx"])
def test_a_listed_name_outside_the_output_folder_is_refused(tmp_path: Path, name: str) -> None:
    with pytest.raises(DownloadError, match="refusing the listed name"):
        local_path(tmp_path, name)
    assert local_path(tmp_path, "records100/00000/00001_lr.hea") == tmp_path / "records100/00000/00001_lr.hea"


def test_a_listed_name_through_a_symlink_out_of_the_folder_is_refused(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "records100").symlink_to(tmp_path)
    with pytest.raises(DownloadError, match="resolves outside"):
        local_path(tmp_path / "out", "records100/x.hea")


def test_a_download_whose_listing_climbs_out_writes_nothing_outside(physionet: Server, tmp_path: Path) -> None:
    """The database names a record ``../escaped`` and the sums file vouches for it (the server resolves the URL to
    a file it holds): the download must stop before writing ``out/../escaped.hea``."""
    payload = b"not what you wanted\n"
    (physionet.root / "escaped.hea").write_bytes(payload)
    database = physionet.root / "ptbxl_database.csv"
    with open(database, newline="") as f:
        rows = list(csv.DictReader(f))
    rows[0]["filename_lr"] = "../escaped"
    with open(database, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    digest = hashlib.sha256(payload).hexdigest()
    sums = [line for line in (physionet.root / SUMS_FILE).read_text().splitlines() if "ptbxl_database" not in line]
    sums += [f"{hashlib.sha256(database.read_bytes()).hexdigest()} ptbxl_database.csv", f"{digest} ../escaped.hea"]
    (physionet.root / SUMS_FILE).write_text("\n".join(sums) + "\n")

    with pytest.raises(DownloadError, match=r"refusing the listed name '\.\./escaped\.(hea|dat)'"):
        _download(physionet, tmp_path / "out")
    assert not (tmp_path / "escaped.hea").exists()


@pytest.mark.parametrize("url", ["http://physionet.org/files/ptb-xl/1.0.3/", "ftp://example.org/x/",
                                 "file:///etc/", "http://10.0.0.1/x/"])
def test_only_https_or_loopback_http_is_used(tmp_path: Path, url: str) -> None:
    with pytest.raises(DownloadError, match="https only"):
        download_ptbxl(tmp_path, base_url=url, progress=False)
    assert list(tmp_path.iterdir()) == []
    assert check_url("https://physionet.org/files/") == "https://physionet.org/files/"
    assert check_url("http://127.0.0.1:8000/") == "http://127.0.0.1:8000/"
