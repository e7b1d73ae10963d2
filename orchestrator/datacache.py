"""Prepared data on the node that trains: an s3:// prepared root fetched once per node into a local cache.

    data = on_this_node(plan.data, endpoint_url, cfg.data.cache_dir)   # every rank, before the data
    train = load_dataset(data, "train")

- s3:// roots: the manifest is read from S3; every data file it lists is fetched into
  `<cache_dir>/<name>-<hash of the URI and endpoint>/` (cache_dir default: `<temp dir>/tarflow-data`) and its
  size and sha256 checked. An exclusive `fcntl.flock` serialises the processes of a node, so the ranks of an
  8-GPU node fetch once: the first one fetches, the others wait and find the files there. A verified file is
  stamped (size, mtime, sha256); later calls re-hash only files whose size or mtime changed, and fetch again
  any that no longer match (a corrupted or truncated cached shard). Files the manifest no longer lists are
  removed; the manifest is copied last. A cache disk too small for the data is one clear error.
- Local paths (a node disk, or a mount shared by the nodes) are used where they are, after a cheap check
  (manifest, every file present with its size); `tarflow.prepared.verify` checks the checksums.
- Absent data, an interrupted preparation (shards but no manifest) and a corrupt manifest are each one
  ExperimentError naming the root and what to run. A manifest naming a file outside the root (`../x`, `/x`) is
  corrupt: refused by tarflow.prepared.check_manifest on the driver and on every node, before any read or write.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import posixpath
import re
import shutil
import socket
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs

from tarflow.data import DataConfig, dataset_info
from tarflow.model import ConfigError
from tarflow.prepared import MANIFEST, check_request, load_manifest, parse_manifest, sha256_file, verify

from .errors import ExperimentError
from .storage import RunStorage, file_lock, write_atomic

log = logging.getLogger(__name__)
STAMPS = ".stamps.json"
# what to prepare for the data presets (orchestrator/conf/data/*_prepared.yaml), by the root's last name
PREPARE_HINTS = {
    "imagenet64": ("/path/to/imagenet64 (the official train_data_batch_*.npz and val_data.npz)", "--fid-stats"),
    "imagenet128": ("/path/to/imagenet (train/<wnid>/*.JPEG, val/<wnid>/*.JPEG)", "--image-size 128 --fid-stats"),
    "afhq256": ("/path/to/afhq (train/{cat,dog,wild}, val/...)", "--image-size 256 --fid-stats"),
}


class ManifestRefused(ExperimentError):
    """The prepared data's manifest is there and cannot be used (corrupt, or naming files outside the root): a dry
    run fails on it as the run would, where data that is merely absent here only falls back to the config's sizes."""


def default_cache_dir() -> str:
    return os.path.join(tempfile.gettempdir(), "tarflow-data")


@dataclass
class CacheSync:
    path: str               # the local root to give PreparedDataset / DataConfig(name="prepared")
    fetched: list[str]      # files fetched by this call (the others were verified in the cache)
    bytes_fetched: int
    seconds: float


def on_this_node(data: DataConfig, endpoint_url: str | None, cache_dir: str | None) -> DataConfig:
    """The data config a worker reads: prepared data in S3 replaced by this node's verified local copy."""
    if data.name != "prepared" or not str(data.root).startswith("s3://"):
        return data
    sync = sync_prepared(data.root, endpoint_url, cache_dir)
    # one line per worker: on each node one of them fetches, the others find the cache warm
    sys.stderr.write(f"[data] {socket.gethostname()} pid {os.getpid()}: {len(sync.fetched)} file(s) "
                     f"({sync.bytes_fetched / 1e6:.1f} MB) fetched into {sync.path} in {sync.seconds:.1f} s\n")
    return dataclasses.replace(data, root=sync.path)


def sync_prepared(root: str, endpoint_url: str | None = None, cache_dir: str | None = None) -> CacheSync:
    """A local directory holding the prepared data at `root` (s3:// fetched once per node; see the module), and
    what it took."""
    t0 = time.perf_counter()
    if not root.startswith("s3://"):
        return CacheSync(_check_local(root), [], 0, time.perf_counter() - t0)
    store = RunStorage(root, endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or None)
    raw = _remote_manifest(store)
    manifest = _parse(raw, store)
    local = Path(cache_dir or default_cache_dir()).expanduser() / cache_name(store)
    local.mkdir(parents=True, exist_ok=True)
    with file_lock(local.parent / f"{local.name}.lock",
                   f"[data] waiting for another process of this node to fetch {store.describe()}"):
        stamps = _load_stamps(local)
        todo = [rel for rel, rec in manifest["files"].items() if not _cached(local, rel, rec, stamps)]
        needed = sum(manifest["files"][rel]["bytes"] for rel in todo)
        free = shutil.disk_usage(local).free
        if needed > free:
            raise ExperimentError(f"the node's data cache {local} needs {needed / 1e9:.1f} GB for {store.describe()} "
                                  f"and has {free / 1e9:.1f} GB free; set data.cache_dir to a larger disk")
        if todo:
            log.info("fetching %d files (%.2f GB) of %s into %s", len(todo), needed / 1e9, store.describe(), local)
            fs, prefix = store.filesystem_and_root()
            with ThreadPoolExecutor(8) as pool:
                for rel, stamp in zip(todo, pool.map(lambda r: _fetch(fs, prefix, r, manifest["files"][r], local,
                                                                      store), todo)):
                    stamps[rel] = stamp
        _remove_stale(local, manifest)
        write_atomic(local / STAMPS, json.dumps(stamps).encode())
        write_atomic(local / MANIFEST, raw)
    return CacheSync(str(local), todo, needed, time.perf_counter() - t0)


def cache_name(store: RunStorage) -> str:
    """<last part of the URI>-<hash of URI and endpoint>: one cache folder per prepared data set."""
    digest = hashlib.sha256(f"{store.endpoint_url or ''}|{store.uri.rstrip('/')}".encode()).hexdigest()[:12]
    tail = re.sub(r"[^A-Za-z0-9_.-]+", "-", posixpath.basename(store.uri.rstrip("/"))) or "data"
    return f"{tail}-{digest}"


def data_info(cfg: DataConfig, endpoint_url: str | None = None) -> dict:
    """tarflow.data.dataset_info, for prepared data in S3 too (reads only the manifest there): what the driver
    checks before a run starts."""
    try:
        if cfg.name != "prepared":
            return dataset_info(cfg)
        if not str(cfg.root).startswith("s3://"):
            _check_local(cfg.root)
            return check_request(cfg)
        store = RunStorage(cfg.root, endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or None)
        return check_request(cfg, _parse(_remote_manifest(store), store))
    except ConfigError as e:
        raise ExperimentError(str(e)) from None


def prepare_command(root: str, endpoint_url: str | None = None) -> str:
    """The command that makes the prepared data a config names (the raw data's path left to the user)."""
    source, options = PREPARE_HINTS.get(posixpath.basename(root.rstrip("/")),
                                        ("SOURCE (the raw data as downloaded, a local path or s3://)",
                                         "--image-size S"))
    endpoint = f" --endpoint-url {endpoint_url}" if endpoint_url and root.startswith("s3://") else ""
    return f"python -m orchestrator.prepare {source} {root}{endpoint} {options}"


# ---------------------------------------------------------------------------------------------
# What is at the root


def _absent(root: str, endpoint_url: str | None) -> ExperimentError:
    return ExperimentError(
        f"prepared data {root} does not exist. Prepare it once (from any machine that reaches the data and a Ray "
        f"cluster; --address spreads the work over the cluster): `{prepare_command(root, endpoint_url)}`. "
        f"scale=smoke runs on a CPU without it (Fashion-MNIST from the local disk).")


def _incomplete(root: str, endpoint_url: str | None) -> ExperimentError:
    return ExperimentError(
        f"prepared data {root} has no {MANIFEST}: its preparation did not finish. Run the same "
        f"`python -m orchestrator.prepare SOURCE {root} ...` command again; it makes only the missing shards "
        f"(`{prepare_command(root, endpoint_url)}`).")


def _check_local(root: str) -> str:
    path = Path(root).expanduser()
    if not (path / MANIFEST).is_file():
        if path.is_dir() and any(path.iterdir()):
            raise _incomplete(root, None)
        raise _absent(root, None)
    try:
        manifest = load_manifest(path)
    except ConfigError as e:
        raise ManifestRefused(f"{e}; prepare it again (`python -m orchestrator.prepare SOURCE {root} ...` after "
                              f"deleting the bad {MANIFEST})") from None
    try:
        verify(path, checksums=False, manifest=manifest)
    except ConfigError as e:
        raise ExperimentError(f"{e}; prepare it again (`python -m orchestrator.prepare SOURCE {root} ...` remakes "
                              f"what does not match once {MANIFEST} is deleted)") from None
    return str(path.resolve())


def _remote_manifest(store: RunStorage) -> bytes:
    store.check()  # an unreachable endpoint, missing credentials or bucket: one clear error, in seconds
    try:
        raw = store.read_bytes(MANIFEST)
        if raw is None:
            fs, prefix = store.filesystem_and_root()
            anything = fs.get_file_info(pafs.FileSelector(prefix, allow_not_found=True))
            raise (_incomplete if anything else _absent)(store.uri, store.endpoint_url)
    except OSError as e:
        raise ExperimentError(f"cannot read prepared data {store.describe()}: {e}") from None
    return raw


def _parse(raw: bytes, store: RunStorage) -> dict:
    try:
        return parse_manifest(raw, f"prepared data {store.describe()}")
    except ConfigError as e:
        raise ManifestRefused(f"{e}; prepare it again: `{prepare_command(store.uri, store.endpoint_url)}` "
                              f"(after deleting the bad {MANIFEST})") from None


# ---------------------------------------------------------------------------------------------
# The cache


def _load_stamps(local: Path) -> dict:
    try:
        return json.loads((local / STAMPS).read_bytes())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def _cached(local: Path, rel: str, rec: dict, stamps: dict) -> bool:
    """Whether the cache holds rel as the manifest describes it (re-hashed only when size or mtime changed)."""
    try:
        st = (local / rel).stat()
    except FileNotFoundError:
        return False
    if st.st_size != rec["bytes"]:
        return False
    stamp = [st.st_size, st.st_mtime_ns, rec["sha256"]]
    if stamps.get(rel) == stamp:
        return True
    if sha256_file(local / rel) != rec["sha256"]:
        log.info("cached %s differs from the manifest: fetching it again", local / rel)
        return False
    stamps[rel] = stamp
    return True


def _fetch(fs: pafs.FileSystem, prefix: str, rel: str, rec: dict, local: Path, store: RunStorage) -> list:
    """Stream one file into the cache, checking size and sha256 before it takes its name; returns its stamp."""
    path = local / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_name(f".{path.name}.{os.getpid()}.part")
    h, size = hashlib.sha256(), 0
    try:
        with fs.open_input_stream(posixpath.join(prefix, rel)) as src, open(part, "wb") as dst:
            while block := src.read(8 << 20):
                h.update(block)
                dst.write(block)
                size += len(block)
        if size != rec["bytes"] or h.hexdigest() != rec["sha256"]:
            raise ExperimentError(f"{store.uri.rstrip('/')}/{rel} does not match its manifest entry ({size} bytes, "
                                  f"sha256 {h.hexdigest()[:12]}…; the manifest says {rec['bytes']} bytes, "
                                  f"{rec['sha256'][:12]}…): the prepared data is damaged; delete its {MANIFEST} "
                                  f"and rerun the prepare command, which remakes the bad shards")
        os.replace(part, path)
    except FileNotFoundError:
        raise ExperimentError(f"{store.uri.rstrip('/')}/{rel}, listed in its {MANIFEST}, is missing") from None
    finally:
        part.unlink(missing_ok=True)
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, rec["sha256"]]


def _remove_stale(local: Path, manifest: dict) -> None:
    keep = set(manifest["files"]) | {MANIFEST, STAMPS}
    for path in local.rglob("*"):
        if path.is_file() and path.relative_to(local).as_posix() not in keep:
            path.unlink(missing_ok=True)

