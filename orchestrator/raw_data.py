"""Raw data sets as users download them, read from a local directory or an s3:// prefix, planned into shards.

Kinds (named like the tarflow.data loaders that read them directly, whose conversions are reused here, so a
prepared image equals the image the direct loader returns):

- `fashion_mnist`: the gzipped IDX files (train-images-idx3-ubyte.gz, ..., t10k-*: the val split).
- `imagenet_npz`: the official downsampled-ImageNet batches (train_data_batch_*.npz, val_data.npz; rows of
  R, G, B planes; labels 1..1000, stored as 0..999), in the root, root/train + root/val or Imagenet*_train.
- `image_folder`: root/train/<class>/<photo> and root/val/<class>/... (ImageNet, AFHQ), or root/<class>/...
  (a train split only). Classes are the train class folders in sorted order; photos are taken in the direct
  loader's order (class, folder, file name).

Files in a folder tree that are not photos by their extension (notes, .DS_Store) are ignored and counted, as
the direct loader ignores them. Photos that cannot be decoded (truncated, not an image despite the name)
are SKIPPED: named in the manifest (`splits.<split>.skipped`) and counted, and the preparation goes on, since
one bad file in 1.28 million should not cost hours of work. Every other problem with a source (a missing
or malformed IDX or npz file, mismatched class folders) is one error naming the file.

A plan is deterministic: the same source and settings give the same shards, each described by its inputs
(file, row range or file list), so an interrupted preparation can redo only the shards it lacks.
"""

from __future__ import annotations

import io
import posixpath
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pyarrow.fs as pafs
import torch

from tarflow.data import (
    FASHION_FILES,
    FOLDER_LAYOUT,
    NPZ_LAYOUT,
    DataConfig,
    _idx_header,
    _npz_side,
    _read_gzip,
    convert,
    decode_photo,
    npy_shape,
    output_size,
    read_idx,
)
from tarflow.model import ConfigError
from tarflow.prepared import FASHION_CLASSES

from .errors import ExperimentError
from .storage import RunStorage

KINDS = ("fashion_mnist", "imagenet_npz", "image_folder")
SHARD_BYTES = 64 << 20  # default shard: 64 MiB of pixels (5,461 images at 64², 1,365 at 128², 341 at 256²)


# ---------------------------------------------------------------------------------------------
# Reading files of a local directory or an s3:// prefix


class NamedFile:
    """A binary file that prints as its URI, so tarflow.data's readers name the right file in their errors."""

    def __init__(self, f, name: str):
        self._f, self.name = f, name

    def __getattr__(self, attr):
        return getattr(self._f, attr)

    def __str__(self) -> str:
        return self.name

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


class SourceTree:
    """The files under a local directory or an s3:// prefix (endpoint passed explicitly: pyarrow ignores
    AWS_ENDPOINT_URL; credentials from the standard AWS chain)."""

    def __init__(self, uri: str, endpoint_url: str | None = None):
        self.storage = RunStorage(uri, endpoint_url)
        self.uri = self.storage.uri
        self.fs, self.root = self.storage.filesystem_and_root()

    def name(self, rel: str) -> str:
        return f"{self.uri.rstrip('/')}/{rel}"

    def list_files(self) -> dict[str, int]:
        """{relative path: size} of every file, recursively."""
        try:
            info = self.fs.get_file_info(self.root)
            if info.type == pafs.FileType.File:
                raise ExperimentError(f"source {self.uri} is a file; give the directory (or s3:// prefix) that "
                                      f"holds the data set")
            infos = self.fs.get_file_info(pafs.FileSelector(self.root, recursive=True, allow_not_found=True))
        except OSError as e:
            raise ExperimentError(f"cannot list source {self.storage.describe()}: {e}") from None
        files = {i.path[len(self.root):].lstrip("/"): i.size for i in infos if i.type == pafs.FileType.File}
        if not files:
            raise ExperimentError(f"source {self.storage.describe()} does not exist or holds no files")
        return files

    def open(self, rel: str) -> NamedFile:
        """Random access (seek + read), for zip and npy headers."""
        return NamedFile(self.fs.open_input_file(posixpath.join(self.root, rel)), self.name(rel))

    def read(self, rel: str) -> bytes:
        with self.fs.open_input_stream(posixpath.join(self.root, rel)) as f:
            return f.read()


# ---------------------------------------------------------------------------------------------
# Plans


@dataclass
class SourcePlan:
    """What a source holds and how it becomes shards."""

    kind: str
    classes: list[str]
    channels: int                     # output
    image_size: int                   # output
    fit: str
    native: str                       # the source's own image size, in words
    shards: list[dict] = field(default_factory=list)   # {"split", "index", "inputs", "count"}
    ignored: dict[str, int] = field(default_factory=dict)  # non-image files per split (folders)

    def data_config(self) -> DataConfig:
        """The direct loader's config whose conversions the shards apply."""
        return DataConfig(name=self.kind, root="-", image_size=self.image_size, fit=self.fit,
                          channels=self.channels, flip=False)

    def transform(self) -> str:
        how = {"fashion_mnist": "IDX images", "imagenet_npz": "npz rows of R, G, B planes, labels 1..1000 -> 0..999",
               "image_folder": "photos decoded with PIL as RGB"}[self.kind]
        fit = ("shorter side resized (antialiased) to S, centre-cropped" if self.fit == "resize"
               else "centred on black (pad) to S")
        return (f"{how}; native {self.native}; {fit}, S = {self.image_size}; {self.channels} channel(s) "
                f"(gray -> RGB by repeat, RGB -> gray by the rounded mean); tarflow.data conversions")


def detect_kind(files: dict[str, int], uri: str) -> str:
    if FASHION_FILES["train"][0] in files:
        return "fashion_mnist"
    if _npz_split_files(files, "train"):
        return "imagenet_npz"
    if any(_is_photo(rel) for rel in files):
        return "image_folder"
    raise ExperimentError(f"cannot tell what source {uri} holds: expected the Fashion-MNIST IDX files "
                          f"({', '.join(FASHION_FILES['train'])}, ...), or {NPZ_LAYOUT}, or a folder tree of "
                          f"photos ({FOLDER_LAYOUT}); --kind forces one of {', '.join(KINDS)}")


def plan_source(tree: SourceTree, files: dict[str, int], kind: str, image_size: int | None, fit: str | None,
                channels: int | None, limit: int | None, shard_size: int | None) -> SourcePlan:
    """The deterministic shard plan of a source (reads only file headers)."""
    try:
        return {"fashion_mnist": _plan_fashion, "imagenet_npz": _plan_npz, "image_folder": _plan_folder}[kind](
            tree, files, image_size, fit, channels, limit, shard_size)
    except ConfigError as e:
        raise ExperimentError(str(e)) from None


def _split_into_shards(plan: SourcePlan, split: str, runs: list[tuple[dict, int]], shard_size: int | None) -> None:
    """Cut each run (inputs with a row range [start, stop), or a file list) into shards of shard_size images;
    shards never span two source files, so a task reads one file."""
    per_shard = shard_size or max(1, SHARD_BYTES // (plan.channels * plan.image_size ** 2))
    index = 0
    for inputs, count in runs:
        for a in range(0, count, per_shard):
            b = min(count, a + per_shard)
            if "files" in inputs:
                part = {"files": inputs["files"][a:b]}
            else:
                part = {**inputs, "start": inputs["start"] + a, "stop": inputs["start"] + b}
            plan.shards.append({"split": split, "index": index, "inputs": part, "count": b - a})
            index += 1


def _plan_fashion(tree, files, image_size, fit, channels, limit, shard_size) -> SourcePlan:
    fit = fit or "pad"
    size = output_size(DataConfig(name="fashion_mnist", image_size=image_size, fit=fit), 28)
    plan = SourcePlan("fashion_mnist", FASHION_CLASSES, channels or 1, size, fit, "28×28 gray")
    for split, (images, labels) in FASHION_FILES.items():
        if images not in files and split == "val":
            continue
        counts = []
        for rel in (images, labels):
            if rel not in files:
                raise ConfigError(f"fashion_mnist: {tree.name(rel)} is missing; a Fashion-MNIST source holds "
                                  f"{', '.join(f for pair in FASHION_FILES.values() for f in pair)}")
            with tree.open(rel) as f:
                dims = _idx_header(_read_gzip(f, 16), f)
            counts.append(dims[0])
        if counts[0] != counts[1]:
            raise ConfigError(f"fashion_mnist: {tree.name(images)} has {counts[0]} images, {tree.name(labels)} "
                              f"{counts[1]} labels")
        n = min(counts[0], limit or counts[0])
        _split_into_shards(plan, split, [({"images": images, "labels": labels, "start": 0}, n)], shard_size)
    return plan


_NPZ_NAME = {"train": re.compile(r"train_data_batch_(\d+)\.npz"), "val": re.compile(r"val_data()\.npz")}


def _npz_split_files(files: dict[str, int], split: str) -> list[str]:
    """The split's npz files in batch order, from the first folder that has them: the root, root/<split>, or
    the folders the official zips unpack to (Imagenet64_train, ...); as tarflow.data finds them."""
    folders = ["", split] + sorted({rel.split("/")[0] for rel in files
                                    if re.fullmatch(rf"Imagenet[^/]*_{split}", rel.split("/")[0])})
    for folder in folders:
        numbered = {}
        for rel in files:
            head, name = posixpath.split(rel)
            if head == folder and (m := _NPZ_NAME[split].fullmatch(name)):
                numbered[int(m.group(1) or 0)] = rel
        if numbered:
            return [numbered[k] for k in sorted(numbered)]
    return []


def _plan_npz(tree, files, image_size, fit, channels, limit, shard_size) -> SourcePlan:
    fit = fit or "pad"
    plan = None
    for split in ("train", "val"):
        rels = _npz_split_files(files, split)
        if not rels:
            if split == "train":
                raise ConfigError(f"imagenet_npz: found no train files under {tree.uri}; {NPZ_LAYOUT}")
            continue
        runs, left = [], limit
        for rel in rels:
            with tree.open(rel) as f:
                side = _npz_side(f)
                rows = npy_shape(f, "data")[0][0]
            if plan is None:
                size = output_size(DataConfig(name="imagenet_npz", root="-", image_size=image_size, fit=fit), side)
                plan = SourcePlan("imagenet_npz", [str(k) for k in range(1, 1001)], channels or 3, size, fit,
                                  f"{side}×{side} RGB")
                first = rel
            elif f"{side}×{side} RGB" != plan.native:
                raise ConfigError(f"imagenet_npz: {tree.name(rel)} holds {side}² images, {tree.name(first)} "
                                  f"holds {plan.native}")
            n = rows if left is None else min(rows, left)
            if n:
                runs.append(({"file": rel, "start": 0}, n))
            left = None if left is None else left - n
        _split_into_shards(plan, split, runs, shard_size)
    return plan


def _is_photo(rel: str) -> bool:
    from torchvision.datasets.folder import IMG_EXTENSIONS

    return rel.lower().endswith(IMG_EXTENSIONS)


def _plan_folder(tree, files, image_size, fit, channels, limit, shard_size) -> SourcePlan:
    if not image_size:
        raise ConfigError(f"image_folder: --image-size is required for a folder of photos ({tree.uri}): photos "
                          f"come in many sizes")
    if fit not in (None, "resize"):
        raise ConfigError(f"image_folder: --fit {fit} is not possible for photos of many sizes; they are always "
                          f"resized (shorter side) and centre-cropped, as the direct loader does")
    has_splits = any(rel.startswith("train/") for rel in files)
    splits = {"train": "train/", "val": "val/"} if has_splits else {"train": ""}

    def class_files(prefix: str) -> tuple[dict[str, list[str]], int]:
        by_class, ignored = {}, 0
        for rel in files:
            if not rel.startswith(prefix):
                continue
            parts = rel[len(prefix):].split("/")
            if len(parts) < 2 or not _is_photo(rel):
                ignored += 1
                continue
            by_class.setdefault(parts[0], []).append(rel)
        return by_class, ignored

    train, ignored = class_files(splits["train"])
    if not train:
        raise ConfigError(f"image_folder: {tree.name(splits['train'].rstrip('/'))} has no class folders of "
                          f"photos; {FOLDER_LAYOUT}")
    classes = sorted(train)
    plan = SourcePlan("image_folder", classes, channels or 3, image_size, "resize", "photos of any size")
    for split, prefix in splits.items():
        by_class, ignored = class_files(prefix) if split != "train" else (train, ignored)
        if split == "val" and not by_class:
            continue
        if sorted(by_class) != classes:
            raise ConfigError(f"image_folder: {tree.name(prefix.rstrip('/'))} has classes {sorted(by_class)}, "
                              f"{tree.name(splits['train'].rstrip('/'))} has {classes}; both splits need the same "
                              f"class folders")
        # the direct loader's order: class by class, folder by folder (sorted os.walk), file names sorted
        samples = [[rel, label] for label, c in enumerate(classes)
                   for rel in sorted(by_class[c], key=lambda r: posixpath.split(r))][:limit]
        plan.ignored[split] = ignored
        _split_into_shards(plan, split, [({"files": samples}, len(samples))], shard_size)
    return plan


# ---------------------------------------------------------------------------------------------
# Reading one shard


def read_shard(tree: SourceTree, plan: SourcePlan, shard: dict) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(images (n, C, S, S) uint8, labels (n,) int64, skipped source files) of one planned shard."""
    inputs = shard["inputs"]
    cfg = plan.data_config()
    if plan.kind == "fashion_mnist":
        with tree.open(inputs["images"]) as f:
            images = read_idx(f)
        with tree.open(inputs["labels"]) as f:
            labels = read_idx(f)
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise ConfigError(f"fashion_mnist: {tree.name(inputs['images'])} has images of shape {images.shape} and "
                              f"labels of shape {labels.shape}; expected (N, 28, 28) and (N,)")
        a, b = inputs["start"], inputs["stop"]
        x = torch.from_numpy(np.array(images[a:b, None]))
        return convert(x, cfg, plan.image_size).numpy(), labels[a:b].astype(np.int64), []
    if plan.kind == "imagenet_npz":
        with tree.open(inputs["file"]) as f:
            data, labels, side = read_npz_rows(f, inputs["start"], inputs["stop"])
        x = torch.from_numpy(data.reshape(len(data), 3, side, side))
        return convert(x, cfg, plan.image_size).numpy(), labels - 1, []
    return _read_photos(tree, plan, inputs["files"])


def read_npz_rows(f: NamedFile, start: int, stop: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Rows [start, stop) of an official npz batch: (data (n, 3·S·S) uint8, labels 1..1000, S), read without
    loading the rest of the file (a stored member is read at its offset; a compressed one is streamed)."""
    import zipfile

    side = _npz_side(f)
    row = 3 * side * side
    try:
        with zipfile.ZipFile(f) as z:
            if "labels.npy" not in z.namelist():
                raise ConfigError(f"imagenet_npz: {f} has no 'labels' array; {NPZ_LAYOUT}")
            with z.open("labels.npy") as m:
                labels = np.lib.format.read_array(m, allow_pickle=False)
            info = z.getinfo("data.npy")
            if info.compress_type == zipfile.ZIP_STORED:
                # the member's bytes sit after its local header (30 bytes + name + extra field)
                f.seek(info.header_offset)
                local = f.read(30)
                f.seek(info.header_offset + 30 + int.from_bytes(local[26:28], "little")
                       + int.from_bytes(local[28:30], "little"))
                data = _npy_rows(f, start, stop, row)
            else:
                with z.open("data.npy") as m:
                    data = _npy_rows(m, start, stop, row)
    except (zipfile.BadZipFile, ValueError, OSError) as e:
        raise ConfigError(f"imagenet_npz: {f} is not a readable npz file ({e})") from e
    labels = np.asarray(labels, dtype=np.int64)
    if len(data) != stop - start or len(labels) < stop:
        raise ConfigError(f"imagenet_npz: {f} is cut short: rows {start}..{stop} asked, {len(labels)} labels")
    labels = labels[start:stop]
    if len(labels) and (labels.min() < 1 or labels.max() > 1000):
        raise ConfigError(f"imagenet_npz: {f} 'labels' should be 1-based classes 1..1000, got values in "
                          f"[{labels.min()}, {labels.max()}]")
    return data, labels, side


def _npy_rows(f, start: int, stop: int, row: int) -> np.ndarray:
    version = np.lib.format.read_magic(f)
    (np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0)(f)
    f.seek(f.tell() + start * row)
    raw = f.read((stop - start) * row)
    return np.frombuffer(bytearray(raw), np.uint8)[: len(raw) // row * row].reshape(-1, row)


def _read_photos(tree: SourceTree, plan: SourcePlan, samples: list) -> tuple[np.ndarray, np.ndarray, list[str]]:
    from PIL import Image

    images, labels, skipped = [], [], []
    # reads overlap (S3 latency), decoding stays on this task's one core
    with ThreadPoolExecutor(8) as pool:
        for (rel, label), data in zip(samples, pool.map(tree.read, [rel for rel, _ in samples])):
            try:
                images.append(decode_photo(io.BytesIO(data), plan.image_size, plan.channels))
            except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
                skipped.append(rel)
                continue
            labels.append(label)
    shape = (0, plan.channels, plan.image_size, plan.image_size)
    stacked = torch.stack(images).numpy() if images else np.zeros(shape, np.uint8)
    return stacked, np.asarray(labels, dtype=np.int64), skipped
