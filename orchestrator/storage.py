"""Where a run's checkpoints and records live: a local directory or an S3-compatible bucket.

Ray Train writes checkpoints through a pyarrow filesystem; the same filesystem reads and writes the
run's small records (resolved config, final result). boto3 only checks that an endpoint answers, so a
bad endpoint fails in seconds with a clear message instead of deep inside a worker.
"""

from __future__ import annotations

import json
import posixpath
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import pyarrow.fs as pafs

from .errors import ExperimentError


@dataclass
class RunStorage:
    uri: str                          # local path or s3://bucket/prefix
    endpoint_url: str | None = None

    def __post_init__(self):
        # absolute now: Ray Tune runs trials in other working directories
        if not self.uri.startswith("s3://"):
            self.uri = str(Path(self.uri).expanduser().resolve())

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
        return pafs.S3FileSystem(**kwargs), root

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
        import boto3
        import botocore.config
        import botocore.exceptions

        bucket = urlparse(self.uri).netloc
        client = boto3.client("s3", endpoint_url=self.endpoint_url, config=botocore.config.Config(
            connect_timeout=3, read_timeout=5, retries={"max_attempts": 1}))
        try:
            client.head_bucket(Bucket=bucket)
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

    # -- small records next to the checkpoints -------------------------------------------------

    def _path(self, *parts: str) -> tuple[pafs.FileSystem, str]:
        fs, root = self.filesystem_and_root()
        return fs, posixpath.join(root, *parts)

    def write_bytes(self, relpath: str, data: bytes) -> None:
        fs, path = self._path(relpath)
        fs.create_dir(posixpath.dirname(path), recursive=True)
        with fs.open_output_stream(path) as f:
            f.write(data)

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

    def list(self, relpath: str) -> list[str]:
        fs, path = self._path(relpath)
        if fs.get_file_info(path).type != pafs.FileType.Directory:
            return []
        return sorted(posixpath.basename(i.path) for i in fs.get_file_info(pafs.FileSelector(path)))


def _writable(path: Path) -> bool:
    import os

    return os.access(path, os.W_OK)


def storage_from_config(cfg) -> RunStorage:
    return RunStorage(uri=cfg.storage.uri, endpoint_url=cfg.storage.endpoint_url)
