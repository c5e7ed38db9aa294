"""Where the jobs read and write: a local path or a filesystem URI (``s3://``, ``gs://``, ``abfs://``, ...), as a
pyarrow filesystem and a path on it, the form Ray Data and Ray Train take themselves.

A *location* is a string: a URI (it has a ``scheme://``) or a local path. Local paths keep their meaning (made
absolute, symlinks resolved, as the jobs always did); URIs are never passed through ``pathlib``, which would turn
``s3://bucket/x`` into ``s3:/bucket/x``, relative to the working directory.

Which filesystem: ``pyarrow.fs.FileSystem.from_uri`` for the schemes pyarrow knows, fsspec (wrapped in
``PyFileSystem``) for the others, and for ``s3://`` an ``S3FileSystem`` built here, because pyarrow reads neither
the standard ``AWS_ENDPOINT_URL`` (nor ``AWS_ENDPOINT_URL_S3``) variable that boto3 and the AWS CLI read, nor
resolves a bucket's region without real AWS: an S3-compatible server (MinIO, Ceph, moto) is named by that variable
and passed as ``endpoint_override``. Credentials are never put in the filesystem object: pyarrow's AWS SDK reads
``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, a profile or the node's instance profile wherever the (pickled)
filesystem is used, so a Ray task on another node uses that node's credentials.

Object stores have no rename and no symbolic links. What makes writes safe there instead: an object appears whole
or not at all (one PUT, or a multipart upload completed in one call), so `put` writes the final name directly and a
reader or a rerun never sees part of it (`ecgad.atomic` does this for every writer given a URI).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from urllib.parse import urlparse

import pyarrow.fs as pafs

#: The variables boto3 and the AWS CLI read for a custom S3 endpoint, the service-specific one first.
ENDPOINT_VARIABLES = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")


class StorageError(ValueError):
    """A location that cannot be used: an unknown scheme, or a file that is not there."""


def is_uri(location: str | Path) -> bool:
    """Whether ``location`` is a filesystem URI (``scheme://...``) rather than a local path."""
    return isinstance(location, str) and "://" in location and not location.startswith("file://")


def normalize(location: str | Path) -> str:
    """A location in the one form the jobs pass around and record: a URI without a trailing slash, or a local path
    made absolute with symlinks resolved (``file://`` URIs are local paths)."""
    if is_uri(location):
        return str(location).rstrip("/")
    local = str(location)
    return str(Path(local[len("file://"):] if local.startswith("file://") else local).resolve())


def location(given: str | Path) -> str | Path:
    """A path option as the jobs hold it: a URI as a normalized string, a local path as a resolved ``Path`` (so
    everything local behaves as it always did)."""
    return normalize(given) if is_uri(given) else Path(normalize(given))


def join(base: str | Path, *parts: str) -> str | Path:
    """``base/part/...`` of the same kind as ``base``: a ``Path`` for a ``Path``, else a string (a URI joined with
    ``/``, a local path as the OS joins it)."""
    if isinstance(base, Path):
        return base.joinpath(*parts)
    if is_uri(base):
        return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])
    return os.path.join(base, *parts)


def parent(location: str) -> str:
    """The folder holding ``location``."""
    return location.rstrip("/").rsplit("/", 1)[0] if is_uri(location) else os.path.dirname(location)


def name(location: str) -> str:
    """The last component of ``location``."""
    return location.rstrip("/").rsplit("/", 1)[-1]


def endpoint_url() -> str | None:
    """The custom S3 endpoint from the environment (`ENDPOINT_VARIABLES`), or None for AWS itself."""
    return next((os.environ[v] for v in ENDPOINT_VARIABLES if os.environ.get(v)), None)


def filesystem(location: str | Path) -> tuple[pafs.FileSystem, str]:
    """``(filesystem, path on it)`` of a location (module docstring for how the filesystem is chosen)."""
    if not is_uri(location):
        return pafs.LocalFileSystem(), normalize(location)
    uri = normalize(location)
    parsed = urlparse(uri)
    if parsed.scheme in ("s3", "s3a"):
        return _s3(endpoint_url(), os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION")), \
            f"{parsed.netloc}{parsed.path}"
    try:
        return pafs.FileSystem.from_uri(uri)
    except ValueError:   # pyarrow.ArrowInvalid: a scheme pyarrow does not know
        pass
    try:
        import fsspec
        from pyarrow.fs import FSSpecHandler, PyFileSystem

        spec, path = fsspec.core.url_to_fs(uri)
    except (ImportError, ValueError) as err:
        raise StorageError(f"{uri}: no filesystem for the scheme {parsed.scheme!r} ({err})") from err
    return PyFileSystem(FSSpecHandler(spec)), path


def for_ray(location: str | Path) -> tuple[str, pafs.FileSystem | None]:
    """``(path, filesystem)`` as Ray Data's readers and writers and Ray Train's ``RunConfig`` take them: a URI as
    the path on the filesystem built here (`filesystem`: the S3 endpoint), a local path as itself with no
    filesystem (Ray's own handling of local paths, unchanged)."""
    if is_uri(location):
        fs, path = filesystem(location)
        return path, fs
    return str(location), None


@lru_cache(maxsize=8)
def _s3(endpoint: str | None, region: str | None) -> pafs.S3FileSystem:
    """One S3 filesystem per endpoint and region (building one costs an SDK client)."""
    options: dict[str, object] = {"region": region or "us-east-1"}
    if endpoint:
        parsed = urlparse(endpoint)
        options.update(endpoint_override=parsed.netloc or parsed.path, scheme=parsed.scheme or "https",
                       force_virtual_addressing=False)
    return pafs.S3FileSystem(**options)


def file_type(location: str | Path) -> pafs.FileType:
    """``FileType.File``, ``Directory`` (on object stores: a prefix with objects under it) or ``NotFound``."""
    fs, path = filesystem(location)
    return fs.get_file_info(path).type


def is_file(location: str | Path) -> bool:
    return file_type(location) == pafs.FileType.File


def is_dir(location: str | Path) -> bool:
    return file_type(location) == pafs.FileType.Directory


def read_bytes(location: str | Path) -> bytes:
    fs, path = filesystem(location)
    try:
        with fs.open_input_stream(path) as stream:
            return stream.read()
    except FileNotFoundError as err:
        raise StorageError(f"{location}: no such file") from err


def read_text(location: str | Path) -> str:
    return read_bytes(location).decode("utf-8")


def put(location: str, data: bytes) -> None:
    """Write ``data`` as the object ``location`` (a URI) in one upload: it appears whole or not at all."""
    fs, path = filesystem(location)
    with fs.open_output_stream(path) as stream:
        stream.write(data)


def open_input(location: str | Path):
    """A seekable binary file of ``location`` (for pandas, the CSV and Parquet readers)."""
    fs, path = filesystem(location)
    return fs.open_input_file(path)


def list_names(location: str | Path) -> list[str]:
    """The names of the files directly in the folder ``location`` (none if it does not exist)."""
    fs, path = filesystem(location)
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    return [info.base_name for info in infos if info.type == pafs.FileType.File]


def delete_contents(location: str | Path) -> None:
    """Empty the folder ``location`` (nothing to do where it does not exist)."""
    fs, path = filesystem(location)
    fs.delete_dir_contents(path, missing_dir_ok=True)


@contextmanager
def local_copy(location: str | Path, companions: Callable[[str, bytes], list[str]] | None = None) -> Iterator[str]:
    """A local path of the file ``location``: itself when local, else a temporary copy (deleted on exit), with the
    sibling files ``companions(name, content)`` names (a WFDB header's signal files) copied next to it where they
    exist; a missing one is left for the reader to report."""
    if not is_uri(location):
        yield str(location)
        return
    with tempfile.TemporaryDirectory(prefix="ecgad-copy-") as folder:
        content = read_bytes(location)
        Path(folder, name(location)).write_bytes(content)
        for sibling in companions(name(location), content) if companions else []:
            if "/" in sibling or sibling in (".", ".."):
                continue
            try:
                Path(folder, sibling).write_bytes(read_bytes(join(parent(location), sibling)))
            except StorageError:
                pass
        yield str(Path(folder, name(location)))


def cache_dir() -> Path:
    """Where remote files read locally are kept: ``$ECGAD_CACHE_DIR``, else ``~/.cache/ecgad``."""
    return Path(os.environ.get("ECGAD_CACHE_DIR") or Path.home() / ".cache" / "ecgad")
