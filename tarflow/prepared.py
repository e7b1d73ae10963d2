"""Prepared data: any image source converted once into uint8 shards that every node reads without decoding.

A prepared root (a local directory; `orchestrator.datacache` brings an s3:// one to each node):

    manifest.json               written last: format, classes in label order, image shape, counts, settings,
                                every data file's size and sha256, skipped source files
    train/images-00000.npy      (n, C, S, S) uint8, plain .npy: np.load(path, mmap_mode="r") works
    train/labels-00000.npy      (n,) int64 classes 0..K-1
    train/shard-00000.json      the shard's sidecar (what it holds, its files' sizes and checksums): lets an
                                interrupted preparation redo only the shards that are missing
    val/...
    fid_stats.npz               optional: Inception statistics of the train split with flips (tarflow.fid)

Shards are planned with a fixed number of images; a shard can hold fewer (the end of a source file or a split,
or photos that could not be decoded), so the manifest records each shard's count.

Reading: `PreparedDataset` reads one image with one pread() at its offset in the shard file. The pages live in
the kernel's page cache, shared by every process of the node (ranks and loader workers), and never count in a
process's own memory. Measured (benchmarks/README.md): with np.load(mmap_mode="r") instead, a process's unique
memory (USS) grows with every page it maps, and the kernel maps pages around each fault (+3.4 GB after 40,000
random reads, 0.49 GB, of a 3.7 GB set); with pread() it stays flat, and a read is faster.

Pure numpy/torch: no Ray, boto3 or pyarrow here. Reading order: layout and format helpers, the manifest,
verification, the dataset, config checks. The FID statistics stored here are read by
tarflow.fid.prepared_fid_statistics.
"""

from __future__ import annotations

import bisect
import hashlib
import io
import json
import os
from pathlib import Path

import numpy as np
import torch

from .images import ImageDataset
from .model import ConfigError

FORMAT = "tarflow-prepared"
VERSION = 1
MANIFEST = "manifest.json"
FID_STATS_FILE = "fid_stats.npz"
SPLITS = ("train", "val")
FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot"]


# ---------------------------------------------------------------------------------------------
# Layout and file format


def shard_files(split: str, index: int) -> dict[str, str]:
    """Paths, relative to the root, of one shard's images, labels and sidecar."""
    return {"images": f"{split}/images-{index:05d}.npy", "labels": f"{split}/labels-{index:05d}.npy",
            "sidecar": f"{split}/shard-{index:05d}.json"}


def encode_npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def encode_shard(images: np.ndarray, labels: np.ndarray) -> tuple[bytes, bytes]:
    """(images .npy, labels .npy) bytes of one shard, checked: (n, C, S, S) uint8 and (n,) int64."""
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[2] != images.shape[3]:
        raise ValueError(f"shard images must be (n, C, S, S) uint8, got {images.dtype} {images.shape}")
    if len(labels) != len(images):
        raise ValueError(f"{len(labels)} labels for {len(images)} images")
    return encode_npy(images), encode_npy(np.asarray(labels, dtype=np.int64))


def file_record(data: bytes) -> dict:
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# The manifest


def make_manifest(*, image_shape, classes: list[str], splits: dict, files: dict, source: dict, settings: dict,
                  transform: str, fid_stats: dict | None = None) -> dict:
    """The manifest of a finished preparation (checked as a reader would check it).

    splits: {split: {"shards": [{"images", "labels", "count"}, ...], "skipped": [source paths],
    "ignored": number of non-image files}}; files: {relpath: {"bytes", "sha256"}} of every data file.
    settings: the preparation's options (kind, image_size, fit, channels, limit, shard_size), compared on a
    rerun; transform: how source pixels became these, in words.
    """
    manifest = {
        "format": FORMAT, "version": VERSION, "image_shape": [int(v) for v in image_shape],
        "classes": [str(c) for c in classes], "source": source, "settings": settings, "transform": transform,
        "splits": {name: {"count": sum(s["count"] for s in split["shards"]), "shards": split["shards"],
                          "skipped": list(split.get("skipped", [])), "skipped_count": len(split.get("skipped", [])),
                          "ignored": int(split.get("ignored", 0))} for name, split in splits.items()},
        "files": dict(sorted(files.items())), "fid_stats": fid_stats,
    }
    return check_manifest(manifest, "new manifest")


def check_manifest(manifest, where: str) -> dict:
    """The manifest if it is one this code can read, every file it names inside the root; otherwise a
    ConfigError naming `where`."""
    def fail(why: str):
        raise ConfigError(f"{where}: {MANIFEST} is not a valid prepared-data manifest ({why})")

    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        fail(f"its format is not {FORMAT!r}")
    if manifest.get("version") != VERSION:
        fail(f"version {manifest.get('version')!r}; this code reads version {VERSION}")
    try:
        c, s, s2 = manifest["image_shape"]
        if c not in (1, 3) or s != s2 or s < 1:
            fail(f"image_shape {manifest['image_shape']}")
        if not manifest["classes"]:
            fail("no classes")
        files = manifest["files"]
        if not manifest["splits"] or "train" not in manifest["splits"]:
            fail("no train split")
        for name, split in manifest["splits"].items():
            if name not in SPLITS:
                fail(f"unknown split {name!r}")
            for shard in split["shards"]:
                for key in ("images", "labels"):
                    if shard[key] not in files:
                        fail(f"{shard[key]} is not among its files")
                if not isinstance(shard["count"], int) or shard["count"] < 0:
                    fail(f"shard {shard['images']} has count {shard['count']!r}")
            if split["count"] != sum(sh["count"] for sh in split["shards"]):
                fail(f"{name} count {split['count']} is not the sum of its shards")
        for rel, rec in files.items():  # shards and fid_stats name files among these: each is checked here
            if not _inside_root(rel):
                fail(f"{rel!r} is not a plain relative path inside the root")
            if not isinstance(rec.get("bytes"), int) or len(str(rec.get("sha256", ""))) != 64:
                fail(f"file record of {rel}: {rec}")
        if manifest.get("fid_stats") and manifest["fid_stats"]["file"] not in files:
            fail("its fid_stats file is not among its files")
    except ConfigError:  # fail()'s own (a ValueError): not wrapped a second time
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        fail(f"{type(e).__name__}: {e}")
    return manifest


def _inside_root(rel) -> bool:
    """Whether a manifest's file name is one every node may join to the root (or its cache) as it is: relative,
    POSIX, normalised, no '..' (a manifest comes from storage: it must not make a node read or write elsewhere)."""
    return (isinstance(rel, str) and not rel.startswith("/") and "\\" not in rel and "\0" not in rel
            and all(part not in ("", ".", "..") for part in rel.split("/")))


def parse_manifest(data: bytes, where: str) -> dict:
    try:
        manifest = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{where}: {MANIFEST} is not valid JSON ({e})") from None
    return check_manifest(manifest, where)


def load_manifest(root: str | os.PathLike) -> dict:
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise ConfigError(f"{root} holds no prepared data (no {MANIFEST}); make it with "
                          f"`python -m orchestrator.prepare SOURCE {root}`")
    return parse_manifest(path.read_bytes(), str(root))


# ---------------------------------------------------------------------------------------------
# Verification


def verify(root: str | os.PathLike, checksums: bool = True, manifest: dict | None = None) -> dict:
    """The manifest (given, when the caller already loaded it), after checking that every data file it lists is
    present with its size (and, with checksums=True, its sha256); ConfigError naming the files that are not."""
    root = Path(root)
    manifest = manifest if manifest is not None else load_manifest(root)
    bad = []
    for rel, rec in manifest["files"].items():
        path = root / rel
        if not path.is_file():
            bad.append(f"{rel} (missing)")
        elif (size := path.stat().st_size) != rec["bytes"]:
            bad.append(f"{rel} ({size} bytes, the manifest says {rec['bytes']})")
        elif checksums and sha256_file(path) != rec["sha256"]:
            bad.append(f"{rel} (sha256 differs from the manifest)")
    if bad:
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise ConfigError(f"prepared data {root} is damaged: {', '.join(bad[:5])}{more}")
    return manifest


# ---------------------------------------------------------------------------------------------
# The dataset


class PreparedDataset(ImageDataset):
    """The `split` of a prepared root: (x in [-1, 1] float32, label), flips (ImageDataset) as the direct
    loaders have them. Labels are held (8 bytes an image); images are read from the shard files per item.

    limit: only the first `limit` images. Pickles without its open files (reopened on first use).
    """

    def __init__(self, root: str | os.PathLike, split: str = "train", flip: bool = True, limit: int | None = None,
                 manifest: dict | None = None):
        self.root = Path(root)
        manifest = manifest or load_manifest(self.root)
        if split not in manifest["splits"]:
            raise ConfigError(f"prepared data {self.root} has no {split} split (it has: "
                              f"{', '.join(manifest['splits'])})")
        channels, size, _ = manifest["image_shape"]
        shards = [s for s in manifest["splits"][split]["shards"] if s["count"]]
        total = sum(s["count"] for s in shards)
        total = min(total, limit) if limit else total
        self._starts, self._paths, labels, start = [], [], [], 0
        for shard in shards:
            if start >= total:
                break
            y = np.load(self.root / shard["labels"], allow_pickle=False)
            if y.shape != (shard["count"],) or y.dtype != np.int64:
                raise ConfigError(f"{self.root / shard['labels']} holds {y.dtype} {y.shape}; the manifest says "
                                  f"({shard['count']},) int64")
            labels.append(y)
            self._starts.append(start)
            self._paths.append((self.root / shard["images"], shard["count"]))
            start += shard["count"]
        labels = torch.from_numpy(np.concatenate(labels)[:total]) if labels else torch.empty(0, dtype=torch.int64)
        super().__init__(labels, len(manifest["classes"]), channels, size, flip)
        self.split = split
        self.classes = manifest["classes"]
        self._image_bytes = channels * size * size
        self._files: dict[int, tuple] = {}

    def _shard_file(self, k: int) -> tuple:
        """(open file, offset of the first image) of shard k, opened and checked on first use."""
        if k not in self._files:
            path, count = self._paths[k]
            f = open(path, "rb")
            try:
                version = np.lib.format.read_magic(f)
                shape, fortran, dtype = (np.lib.format.read_array_header_1_0(f) if version == (1, 0)
                                         else np.lib.format.read_array_header_2_0(f))
            except ValueError as e:
                f.close()
                raise ConfigError(f"{path} is not a .npy file ({e})") from None
            expected = (count, self.channels, self.image_size, self.image_size)
            if shape != expected or dtype != np.uint8 or fortran:
                f.close()
                raise ConfigError(f"{path} holds {dtype} {shape}; the manifest says uint8 {expected}")
            self._files[k] = (f, f.tell())
        return self._files[k]

    def image(self, i: int) -> torch.Tensor:
        i = int(i)
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} images")
        k = bisect.bisect_right(self._starts, i) - 1
        f, offset = self._shard_file(k)
        buf = bytearray(self._image_bytes)
        # pread: no shared file position, so forked DataLoader workers can use the same descriptor
        n = os.preadv(f.fileno(), [buf], offset + (i - self._starts[k]) * self._image_bytes)
        if n != self._image_bytes:
            raise ConfigError(f"{self._paths[k][0]} is truncated (image {i - self._starts[k]} is cut short)")
        return torch.frombuffer(buf, dtype=torch.uint8).view(self.channels, self.image_size, self.image_size)

    def __getstate__(self):
        return {**self.__dict__, "_files": {}}


# ---------------------------------------------------------------------------------------------
# DataConfig(name="prepared")


def check_request(cfg, manifest: dict | None = None) -> dict:
    """{"channels", "image_size", "num_classes", "train_images" (data.limit applied)} of the prepared data a
    DataConfig names, from its manifest (read from cfg.root unless given), after checking that the config asks
    for what the data holds (it is not resized when read)."""
    if manifest is None:
        if str(cfg.root).startswith("s3://"):
            raise ConfigError(f"prepared: {cfg.root} is in S3; training reads a node-local copy, made once per "
                              f"node by orchestrator.datacache.sync_prepared(root, endpoint_url, cache_dir)")
        manifest = load_manifest(cfg.root_path)
    channels, size, _ = manifest["image_shape"]
    for key, have in (("image_size", size), ("channels", channels)):
        want = getattr(cfg, key)
        if want not in (None, have):
            raise ConfigError(f"prepared: {cfg.root} holds images with {key}={have}, the config asks for {want}; "
                              f"set data.{key}={have} or prepare the source again with --{key.replace('_', '-')} "
                              f"{want} into another destination")
    train = sum(shard["count"] for shard in manifest["splits"]["train"]["shards"])
    return {"channels": channels, "image_size": size, "num_classes": len(manifest["classes"]),
            "train_images": min(train, cfg.limit) if cfg.limit else train}
