"""Where a run's checkpoints and records live: a local directory or an S3-compatible bucket.

Ray Train writes checkpoints through a pyarrow filesystem; the same filesystem reads and writes the
run's small records (resolved config, final result). boto3 checks that an endpoint answers, so a bad
endpoint fails in seconds with a clear message instead of deep inside a worker, and makes the conditional
writes a lease needs (S3's If-None-Match / If-Match; a file lock on local paths), which pyarrow lacks.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import posixpath
import re
import sys
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

import pyarrow.fs as pafs

from .errors import ExperimentError

# the config keys that name a place in storage, all checked by check_uri before any work
STORAGE_KEYS = ("storage.uri", "data.root", "model.init_from", "eval.fid.inception_weights")
SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://")
RETRY_SECONDS = 180.0  # storage.retry_seconds' default


def check_uri(value, key: str, shown: str | None = None) -> None:
    """A storage location this code can use: a local path, file:///path, or s3://bucket/prefix (any S3-compatible
    store). Anything else would become a local folder named after its scheme: an ExperimentError names the key.
    shown: the value as the message shows it (credentials redacted, where it came from)."""
    m = SCHEME.match(value) if isinstance(value, str) else None
    if m is None or m.group(1) in ("s3", "file"):
        return
    scheme = m.group(1)
    said = f"{key}={shown or value}"
    if scheme.lower() in ("s3", "file"):
        raise ExperimentError(f"{said}: the scheme is spelled {scheme.lower()}:// (lower case)")
    if scheme.lower() in ("gs", "gcs"):
        bucket, _, rest = value[m.end():].partition("/")
        rest = f"{bucket.rpartition('@')[2]}/{rest}".rstrip("/")  # never a credential in the advice
        raise ExperimentError(
            f"{said}: Google Cloud Storage is reached through its S3-compatible XML API: "
            f"{key}=s3://{rest} with storage.endpoint_url=https://storage.googleapis.com, and an HMAC key "
            "of a service account that may use the bucket as AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY")
    raise ExperimentError(f"{said}: {scheme}:// is not a storage this code reads or writes; use a local path (or "
                          "file:///path) or s3://bucket/prefix (any S3-compatible store, with storage.endpoint_url)")


def local_path(uri: str) -> str:
    """file:///x/y -> /x/y; anything else as it is."""
    if not uri.startswith("file://"):
        return uri
    parsed = urlparse(uri)
    if parsed.netloc not in ("", "localhost"):
        raise ExperimentError(f"{uri}: a file:// URI names a path on this machine (file:///path), not on "
                              f"host {parsed.netloc!r}")
    return unquote(parsed.path)


@dataclass
class RunStorage:
    uri: str                          # local path (or file:///path) or s3://bucket/prefix
    endpoint_url: str | None = None
    retry_seconds: float = RETRY_SECONDS  # how long S3 requests are retried before an error (storage.retry_seconds)

    def __post_init__(self):
        check_uri(self.uri, "storage")
        # absolute now: Ray Tune runs trials in other working directories
        if not self.uri.startswith("s3://"):
            self.uri = str(Path(local_path(self.uri)).expanduser().resolve())

    @property
    def is_s3(self) -> bool:
        return self.uri.startswith("s3://")

    def filesystem_and_root(self) -> tuple[pafs.FileSystem, str]:
        """The pyarrow filesystem and the root path inside it (what Ray's RunConfig takes)."""
        if not self.is_s3:
            return pafs.LocalFileSystem(), str(Path(self.uri).expanduser().resolve())
        parsed = urlparse(self.uri)
        root = posixpath.join(parsed.netloc, parsed.path.lstrip("/")).rstrip("/")
        kwargs = {}
        if self.endpoint_url:
            ep = urlparse(self.endpoint_url)
            # pyarrow ignores AWS_ENDPOINT_URL: the endpoint must be passed explicitly
            kwargs = dict(endpoint_override=ep.netloc or ep.path, scheme=ep.scheme or "https")
        return RetryingS3FileSystem(self.retry_seconds, **kwargs), root

    def describe(self) -> str:
        return f"{self.uri} (endpoint {self.endpoint_url})" if self.endpoint_url else self.uri

    def check(self) -> None:
        """Fail early, naming the target, if the storage cannot be written."""
        if not self.is_s3:
            root = Path(self.uri).expanduser().resolve()
            probe = root
            while not probe.exists():
                probe = probe.parent
            if not probe.is_dir() or not _writable(probe):
                raise ExperimentError(f"storage {root} is not a writable directory")
            return
        import botocore.exceptions

        bucket = urlparse(self.uri).netloc
        try:
            self._s3_client(retries=1).head_bucket(Bucket=bucket)
        except botocore.exceptions.EndpointConnectionError:
            raise ExperimentError(f"S3 endpoint {self.endpoint_url or 'of AWS'} for storage {self.uri} is unreachable; "
                                  "check storage.endpoint_url and that the server is running") from None
        except botocore.exceptions.NoCredentialsError:
            raise ExperimentError(f"no AWS credentials for storage {self.describe()}: set AWS_ACCESS_KEY_ID/"
                                  "AWS_SECRET_ACCESS_KEY or a profile (never in the experiment YAML)") from None
        except botocore.exceptions.ClientError as e:
            code = e.response.get("Error", {}).get("Code", "?")
            what = {"404": "does not exist", "NoSuchBucket": "does not exist", "403": "refuses these credentials"}
            raise ExperimentError(f"bucket {bucket!r} at {self.describe()} {what.get(code, f'answered {code}')}") \
                from None

    def _s3_client(self, retries: int = 3):
        import boto3
        import botocore.config

        # a session of its own: boto3's default one keeps the first credentials it found for the process
        return boto3.session.Session().client("s3", endpoint_url=self.endpoint_url, config=botocore.config.Config(
            connect_timeout=3, read_timeout=10, retries={"max_attempts": retries}))

    def _s3_key(self, relpath: str) -> tuple[str, str]:
        parsed = urlparse(self.uri)
        return parsed.netloc, posixpath.join(parsed.path.lstrip("/"), relpath)

    # -- conditional writes: one writer wins ----------------------------------------------------

    def read_versioned(self, relpath: str) -> tuple[bytes, str] | None:
        """(content, version) of a record, or None; the version is what replace_if_version compares."""
        if self.is_s3:
            import botocore.exceptions

            bucket, key = self._s3_key(relpath)
            try:
                obj = self._s3_client().get_object(Bucket=bucket, Key=key)
            except botocore.exceptions.ClientError as e:
                if e.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                    return None
                raise
            return obj["Body"].read(), obj["ETag"]
        path = Path(self.uri) / relpath
        with file_lock(path.with_name(path.name + ".lock")):
            if not path.is_file():
                return None
            data = path.read_bytes()
        return data, hashlib.sha256(data).hexdigest()

    def create_if_absent(self, relpath: str, data: bytes) -> bool:
        """Write a record only if none exists; False when another writer got there first."""
        return self._conditional_put(relpath, data, None)

    def replace_if_version(self, relpath: str, data: bytes, version: str) -> bool:
        """Overwrite a record only if it is still at `version`; False when it changed meanwhile."""
        return self._conditional_put(relpath, data, version)

    def _conditional_put(self, relpath: str, data: bytes, version: str | None) -> bool:
        if self.is_s3:
            import botocore.exceptions

            bucket, key = self._s3_key(relpath)
            condition = {"IfNoneMatch": "*"} if version is None else {"IfMatch": version}
            try:
                self._s3_client().put_object(Bucket=bucket, Key=key, Body=data, **condition)
            except botocore.exceptions.ClientError as e:
                code = e.response.get("Error", {}).get("Code")
                if code in ("PreconditionFailed", "412", "ConditionalRequestConflict", "409", "NoSuchKey"):
                    return False
                raise
            return True
        path = Path(self.uri) / relpath
        path.parent.mkdir(parents=True, exist_ok=True)
        with file_lock(path.with_name(path.name + ".lock")):
            current = path.read_bytes() if path.is_file() else None
            if (version is None and current is not None) or (
                    version is not None and (current is None or hashlib.sha256(current).hexdigest() != version)):
                return False
            write_atomic(path, data)
        return True

    def honours_conditional_writes(self, probe: str) -> bool:
        """Whether writes that must fail do: a create over an existing record, a replace of a version that is not
        the current one. Some S3-compatible endpoints ignore If-None-Match / If-Match and write anyway.
        probe: a scratch record's path, deleted after."""
        try:
            self.create_if_absent(probe, b"probe")
            return not self.create_if_absent(probe, b"create over it") and not self.replace_if_version(
                probe, b"replace another version", '"00000000000000000000000000000000"')
        finally:
            self.delete(probe)
            if not self.is_s3:
                Path(self.uri, probe + ".lock").unlink(missing_ok=True)

    def delete(self, relpath: str) -> None:
        fs, path = self._path(relpath)
        if fs.get_file_info(path).type == pafs.FileType.File:
            fs.delete_file(path)

    # -- small records next to the checkpoints -------------------------------------------------

    def _path(self, *parts: str) -> tuple[pafs.FileSystem, str]:
        fs, root = self.filesystem_and_root()
        return fs, posixpath.join(root, *parts)

    def write_bytes(self, relpath: str, data: bytes) -> None:
        """Whole or not at all: a local file by write_atomic; an S3 object appears only once its upload
        completes."""
        fs, path = self._path(relpath)
        fs.create_dir(posixpath.dirname(path), recursive=True)
        if self.is_s3:
            with fs.open_output_stream(path) as f:
                f.write(data)
            return
        write_atomic(Path(path), data)

    def write_text(self, relpath: str, text: str) -> None:
        self.write_bytes(relpath, text.encode())

    def read_bytes(self, relpath: str) -> bytes | None:
        fs, path = self._path(relpath)
        if fs.get_file_info(path).type != pafs.FileType.File:
            return None
        with fs.open_input_stream(path) as f:
            return f.read()

    def read_text(self, relpath: str) -> str | None:
        data = self.read_bytes(relpath)
        return None if data is None else data.decode()

    def read_json(self, relpath: str) -> dict | None:
        text = self.read_text(relpath)
        return None if text is None else json.loads(text)

    def download(self, relpath: str, local: Path) -> Path:
        """Copy one stored file to a local path (streamed: checkpoints can be many GB)."""
        fs, path = self._path(relpath)
        if fs.get_file_info(path).type != pafs.FileType.File:
            raise FileNotFoundError(f"{self.describe()}/{relpath} does not exist")
        local = Path(local)
        local.parent.mkdir(parents=True, exist_ok=True)
        pafs.copy_files(path, str(local), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
        return local

    def upload(self, local: Path, relpath: str) -> None:
        """Copy a local file into the storage (streamed)."""
        fs, path = self._path(relpath)
        fs.create_dir(posixpath.dirname(path), recursive=True)
        pafs.copy_files(str(local), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)

    def delete_dir(self, relpath: str) -> None:
        fs, path = self._path(relpath)
        if fs.get_file_info(path).type == pafs.FileType.Directory:
            fs.delete_dir(path)

    def move_dir(self, relpath: str, to_relpath: str) -> None:
        """Move a directory within the storage (S3: copy every object, then delete the originals)."""
        fs, src = self._path(relpath)
        _, dst = self._path(to_relpath)
        if not self.is_s3:
            Path(dst).parent.mkdir(parents=True, exist_ok=True)
            os.replace(src, dst)
            return
        fs.create_dir(dst, recursive=True)
        pafs.copy_files(src, dst, source_filesystem=fs, destination_filesystem=fs)
        fs.delete_dir(src)

    def move_file(self, relpath: str, to_relpath: str) -> None:
        fs, src = self._path(relpath)
        _, dst = self._path(to_relpath)
        fs.create_dir(posixpath.dirname(dst), recursive=True)
        if self.is_s3:
            fs.copy_file(src, dst)
            fs.delete_file(src)
        else:
            os.replace(src, dst)

    def verify_file(self, relpath: str) -> bool:
        """Check a stored checkpoint file against its checksum record (tarflow.save_checkpoint writes one);
        False when it has none. CheckpointCorrupt when the stored bytes differ from those written; an
        OSError when they could not all be read (a read cut short is an I/O problem, not corruption)."""
        from tarflow.training import CHECKSUM_SUFFIX, CheckpointCorrupt, parse_checksum

        record = self.read_text(relpath + CHECKSUM_SUFFIX)
        if record is None:
            return False
        want_digest, want_size = parse_checksum(record)
        fs, path = self._path(relpath)
        info = fs.get_file_info(path)
        if info.type != pafs.FileType.File:
            raise CheckpointCorrupt(f"{self.describe()}/{relpath} is missing (its checksum record is there)")
        if info.size != want_size:
            raise CheckpointCorrupt(f"{self.describe()}/{relpath} is {info.size} bytes, {want_size} were written "
                                    "(truncated or overwritten)")
        digest, read = hashlib.sha256(), 0
        with fs.open_input_stream(path) as f:
            while block := f.read(1 << 24):
                digest.update(block)
                read += len(block)
        if read != want_size:
            raise OSError(f"read {read} of {want_size} bytes of {self.describe()}/{relpath}")
        if digest.hexdigest() != want_digest:
            raise CheckpointCorrupt(f"{self.describe()}/{relpath} does not match its checksum")
        return True

    def exists(self, relpath: str) -> bool:
        fs, path = self._path(relpath)
        return fs.get_file_info(path).type == pafs.FileType.File

    def listdir(self, relpath: str) -> list[str]:
        fs, path = self._path(relpath)
        if fs.get_file_info(path).type != pafs.FileType.Directory:
            return []
        return sorted(posixpath.basename(i.path) for i in fs.get_file_info(pafs.FileSelector(path)))


class RetryingS3FileSystem(pafs.S3FileSystem):
    """pyarrow's S3 filesystem, its requests retried by the AWS SDK for about `retry_seconds` (connection refused
    and timeouts included) before an error: a storage hiccup during a checkpoint upload is waited out in place
    instead of costing a restart of the worker group.

    The AWS SDK's standard strategy waits a random 0-1 s before the first retry, doubling up to 20 s
    (benchmarks/bench_s3_retry.py measures it). It is a subclass only to survive pickling: Ray Train ships the
    filesystem to its controller and workers, and pyarrow's own pickling drops the retry strategy
    (apache/arrow#47348)."""

    def __init__(self, retry_seconds: float = RETRY_SECONDS, **kwargs):
        super().__init__(retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=s3_attempts(retry_seconds)),
                         **kwargs)
        self.retry_seconds, self.kwargs = retry_seconds, kwargs

    def __reduce__(self):
        return RetryingS3FileSystem._rebuild, (self.retry_seconds, self.kwargs)

    @staticmethod
    def _rebuild(retry_seconds: float, kwargs: dict) -> RetryingS3FileSystem:
        return RetryingS3FileSystem(retry_seconds, **kwargs)


def s3_attempts(seconds: float) -> int:
    """The max_attempts of the AWS SDK's standard retry strategy whose expected back-off adds up to `seconds`:
    retry k waits min(U·2^k, 20) s, U uniform in [0, 1)."""
    attempts, waited = 1, 0.0
    while waited < seconds:
        span = float(2 ** min(attempts - 1, 30))
        waited += span / 2 if span <= 20 else 20 - 200 / span  # the mean of min(U·span, 20)
        attempts += 1
    return attempts


@contextmanager
def file_lock(path: Path, waiting: str | None = None):
    """An exclusive flock on `path` (created) for the block: the processes of one host, one at a time.
    waiting: said once when another process holds it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if waiting:
                print(waiting, file=sys.stderr, flush=True)
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def write_atomic(path: Path, data: bytes) -> None:
    """A local file whole or not at all: written beside its place and renamed (a crash mid-write leaves the old
    one, and a reader never sees half of it)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _writable(path: Path) -> bool:
    return os.access(path, os.W_OK)


def storage_from_config(cfg) -> RunStorage:
    return RunStorage(uri=cfg.storage.uri, endpoint_url=cfg.storage.endpoint_url,
                      retry_seconds=cfg.storage.retry_seconds)
