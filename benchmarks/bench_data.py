"""What prepared data buys: training workers' memory, loader and preparation throughput, and time to the first
batch from S3 with a cold and a warm node cache.

    python benchmarks/bench_data.py [--images 300000] [--old-images 100000] [--steps 300]
                                    [--cache-dir /tmp/tarflow-bench-data] [--parts memory,loader,prepare,cache]

(a) memory: a synthetic ImageNet-64-shaped training set in the official npz layout (generated once into the
    cache dir, 12,288 bytes an image), trained on by 2 Ray Train workers (tiny model, DDP on gloo) through
    today's `imagenet_npz` loader (at --old-images: it holds the whole set in every worker) and through the
    same data prepared with `python -m orchestrator.prepare`: each worker's peak unique memory (USS).
    Also one process reading the shards at random with np.load(mmap_mode="r") against PreparedDataset.
(b) loader: images/s one DataLoader (random order, batch 64) delivers from the prepared set, beside what
    the paper's 2-768-8-8 consumes per A100 (its training FLOPs per image at 40% of 312 TFLOP/s).
(c) prepare: photos/s per core decoding 500×375 JPEGs to 64², and npz images/s, in one process and
    through prepare() on a local Ray instance of 2 CPUs (first with fresh workers, then warm ones).
(d) cache: time to the first batch on a "new node" (a fresh process) from prepared data in a local SeaweedFS:
    cold cache (fetch + check) vs warm (stat checks only).

Prints figures; asserts nothing. The cache dir keeps the generated data for reruns (about 8 GB at the
defaults); delete it when done.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
ENV = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
       "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}
os.environ.update(ENV)  # before ray is imported: the workers import this checkout

SIDE = 64
IMAGE_BYTES = 3 * SIDE * SIDE
PER_FILE = 100_000


def gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


# ---------------------------------------------------------------------------------------------
# Data


def synthetic_npz(cache: Path, images: int) -> Path:
    """`images` random 64² train images (+ 1,000 val) in the official layout, generated once."""
    root = cache / f"npz-{images}"
    if (root / "done").exists():
        return root
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    files = [(f"train_data_batch_{i + 1}.npz", min(PER_FILE, images - i * PER_FILE))
             for i in range(-(-images // PER_FILE))] + [("val_data.npz", 1000)]
    for name, n in files:
        data = np.empty((n, IMAGE_BYTES), np.uint8)
        for a in range(0, n, 10_000):
            data[a:a + 10_000] = rng.integers(0, 256, (min(10_000, n - a), IMAGE_BYTES), dtype=np.uint8)
        with open(root / name, "wb") as f:
            np.savez(f, data=data, labels=rng.integers(1, 1001, n).tolist(), mean=np.zeros(IMAGE_BYTES))
        del data
    (root / "done").touch()
    print(f"  generated {images} images in {len(files)} npz files ({gb(images * IMAGE_BYTES)}) in "
          f"{time.perf_counter() - t0:.0f} s")
    return root


def prepare_cli(source: Path | str, dest: Path | str, *extra: str) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "orchestrator.prepare", str(source), str(dest), *extra],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, check=False)
    if proc.returncode:
        sys.exit(f"prepare failed:\n{proc.stdout}\n{proc.stderr[-3000:]}")
    for line in proc.stdout.splitlines():
        print(f"  | {line}")
    return time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------
# (a) memory of training workers


def train_func(config: dict) -> None:
    """A minimal Ray Train loop: the data, a DistributedSampler, a tiny model; samples its own USS."""
    import threading

    import psutil
    import ray.train
    import ray.train.torch
    import torch
    from torch.utils.data import DataLoader, DistributedSampler

    from tarflow.data import DataConfig, load_dataset

    proc, peak, stop = psutil.Process(), [0], threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], proc.memory_full_info().uss)
            stop.wait(0.5)

    base = proc.memory_full_info().uss
    threading.Thread(target=sample, daemon=True).start()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    t0 = time.perf_counter()
    data = load_dataset(DataConfig(**config["data"]), "train")
    load_s = time.perf_counter() - t0
    after_load = proc.memory_full_info().uss
    model = ray.train.torch.prepare_model(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(IMAGE_BYTES, 16)))
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    sampler = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=True, seed=0, drop_last=True)
    steps, t0 = 0, time.perf_counter()
    for x, y in DataLoader(data, batch_size=64, sampler=sampler, drop_last=True):
        loss = torch.nn.functional.cross_entropy(model(x), y % 16)
        opt.zero_grad()
        loss.backward()
        opt.step()
        steps += 1
        if steps == config["steps"]:
            break
    train_s = time.perf_counter() - t0
    stop.set()
    peak[0] = max(peak[0], proc.memory_full_info().uss)
    Path(config["out"], f"rank{rank}.json").write_text(json.dumps(
        {"base": base, "after_load": after_load, "peak": peak[0], "load_s": load_s, "steps": steps,
         "train_s": train_s, "images": len(data)}))
    ray.train.report({"steps": steps})


def fit(data: dict, steps: int, tmp: Path, name: str) -> list[dict]:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    out = tmp / name
    out.mkdir()
    TorchTrainer(train_func, train_loop_config={"data": data, "steps": steps, "out": str(out)},
                 scaling_config=ScalingConfig(num_workers=2, use_gpu=False, resources_per_worker={"CPU": 1}),
                 run_config=RunConfig(name=name, storage_path=str(tmp / "ray"))).fit()
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def bench_memory(cache: Path, images: int, old_images: int, steps: int) -> Path:
    print(f"\n(a) memory of 2 Ray Train workers, {steps} steps of 64 images each (random order)")
    npz = synthetic_npz(cache, images)
    prepared = cache / f"prepared-{images}"
    t = prepare_cli(npz, prepared, "--num-cpus", "2")
    print(f"  prepare CLI (2 CPUs, incl. Ray start; a no-op when already prepared): {t:.0f} s")
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=200_000_000,
             log_to_driver=False)
    rows = []
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        for label, data, n in [
            ("imagenet_npz (today)", {"name": "imagenet_npz", "root": str(npz), "limit": old_images}, old_images),
            ("prepared", {"name": "prepared", "root": str(prepared)}, images),
        ]:
            t0 = time.perf_counter()
            workers = fit(data, steps, Path(tmp), label.split()[0])
            rows.append((label, n, workers, time.perf_counter() - t0))
    ray.shutdown()
    print(f"  {'loader':22} {'images':>8} {'data set':>9} {'worker peak USS':>18} {'growth over start':>20} "
          f"{'growth / data':>13} {'load s':>7} {'steps/s':>8}")
    for label, n, workers, _ in rows:
        for w in workers:
            growth = w["peak"] - w["base"]
            print(f"  {label:22} {n:>8} {gb(n * IMAGE_BYTES):>9} {gb(w['peak']):>18} {gb(growth):>20} "
                  f"{growth / (n * IMAGE_BYTES):>12.1%} {w['load_s']:>7.1f} {w['steps'] / w['train_s']:>8.1f}")
    mmap_vs_pread(prepared)
    return prepared


def mmap_vs_pread(prepared: Path, reads: int = 40_000) -> None:
    """One process reading random images of the prepared set: USS growth with np.load(mmap_mode) vs pread."""
    code = f"""
import json, sys, numpy as np, psutil
from tarflow.prepared import PreparedDataset, load_manifest
root, mode = {str(prepared)!r}, sys.argv[1]
ds = PreparedDataset(root, "train", flip=False)
idx = np.random.default_rng(1).permutation(len(ds))[:{reads}]
proc = psutil.Process(); base = proc.memory_full_info().uss
if mode == "mmap":
    shards = [np.load(f"{{root}}/{{s['images']}}", mmap_mode="r")
              for s in load_manifest(root)["splits"]["train"]["shards"]]
    starts = np.cumsum([0] + [len(s) for s in shards])
    for i in idx:
        k = np.searchsorted(starts, i, "right") - 1
        x = np.array(shards[k][i - starts[k]])
else:
    for i in idx:
        x = ds.image(int(i))
print(json.dumps(proc.memory_full_info().uss - base))
"""
    print(f"  one process reading {reads} random images ({gb(reads * IMAGE_BYTES)}) of the prepared set:")
    for mode in ("mmap", "pread"):
        out = subprocess.run([sys.executable, "-c", code, mode], cwd=ROOT, env=ENV, capture_output=True, text=True,
                             check=True).stdout
        print(f"    {'np.load(mmap_mode=r)' if mode == 'mmap' else 'PreparedDataset (pread)':26} USS +{gb(int(out))}")


# ---------------------------------------------------------------------------------------------
# (b) loader throughput


def bench_loader(prepared: Path, batches: int = 400) -> None:
    import torch

    from tarflow.data import DataConfig, load_dataset
    from tarflow.model import TarFlowConfig

    print("\n(b) one DataLoader over the prepared set (random order, batch 64, page cache warm)")
    data = load_dataset(DataConfig(name="prepared", root=str(prepared)), "train")
    batches = min(batches, len(data) // 64 - 1)
    need = 0.4 * 312e12 / TarFlowConfig.from_string("2-768-8-8", image_size=64, in_channels=3).flops_per_image(True)
    for workers in (0, 2):
        loader = torch.utils.data.DataLoader(data, batch_size=64, shuffle=True, num_workers=workers, drop_last=True)
        it = iter(loader)
        next(it)
        t0 = time.perf_counter()
        for _ in range(batches):
            next(it)
        rate = batches * 64 / (time.perf_counter() - t0)
        print(f"  num_workers={workers}: {rate:,.0f} images/s = {rate / need:,.0f}× what 2-768-8-8 trains per A100 "
              f"({need:.1f} images/s at 40% of 312 TFLOP/s)")
        del it


# ---------------------------------------------------------------------------------------------
# (c) preparation throughput


def jpeg_tree(cache: Path, count: int) -> Path:
    """`count` 500×375 JPEGs (gradients, shapes and noise, about photo-sized files) in 10 class folders."""
    from PIL import Image, ImageDraw

    root = cache / f"jpeg-{count}"
    if (root / "done").exists():
        return root
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:375, 0:500]
    for i in range(count):
        folder = root / "train" / f"n{i % 10:08d}"
        folder.mkdir(parents=True, exist_ok=True)
        c = rng.uniform(0, 255, (3, 3))
        base = np.stack([c[k, 0] + (c[k, 1] - c[k, 0]) * xx / 500 + 30 * np.sin(yy / (8 + 4 * k))
                         for k in range(3)], -1)
        img = Image.fromarray(np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(img)
        for _ in range(6):
            x0, y0 = rng.integers(0, 450), rng.integers(0, 330)
            draw.ellipse([x0, y0, x0 + rng.integers(20, 150), y0 + rng.integers(20, 150)],
                         fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
        img.save(folder / f"{i:06d}.JPEG", quality=90)
    (root / "done").touch()
    return root


def bench_prepare(cache: Path, npz: Path, photos: int) -> None:
    from orchestrator.raw_data import SourceTree, plan_source, read_shard

    print("\n(c) preparation throughput")
    tree_root = jpeg_tree(cache, photos)
    size = sum(p.stat().st_size for p in tree_root.rglob("*.JPEG")) / photos
    for label, src, kind, size_arg in [(f"JPEG 500×375 ({size / 1e3:.0f} kB) -> 64²", tree_root, "image_folder", 64),
                                       ("npz 64² -> 64²", npz, "imagenet_npz", None)]:
        tree = SourceTree(str(src))
        plan = plan_source(tree, tree.list_files(), kind, size_arg, None, None, 20_000 if kind != "image_folder"
                           else None, None)
        shards = [s for s in plan.shards if s["split"] == "train"]
        t0 = time.perf_counter()
        n = sum(len(read_shard(tree, plan, s)[1]) for s in shards)
        rate = n / (time.perf_counter() - t0)
        print(f"  {label:28} one process, one core: {rate:8,.0f} images/s  (read + decode + convert, no writing)")
    import ray

    from orchestrator.prepare import prepare

    ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=200_000_000,
             log_to_driver=False)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        for label, src, kw, n in [("JPEG -> 64²", tree_root, {"image_size": 64, "shard_size": 100}, photos),
                                  ("npz -> 64²", npz, {"limit": 100_000}, 101_000)]:
            for run in ("cold", "warm"):  # warm: the Ray workers have imported torch & co. already
                t0 = time.perf_counter()
                prepare(str(src), f"{tmp}/{label[:4]}-{run}", log=lambda *a: None, **kw)
                t = time.perf_counter() - t0
                print(f"  {label:28} prepare() on 2 Ray CPUs, {run} workers: {t:5.1f} s = {n / t / 2:8,.0f} images/s "
                      f"per CPU")
    ray.shutdown()


# ---------------------------------------------------------------------------------------------
# (d) time to the first batch from S3


FIRST_BATCH = """
import sys, time, json
t0 = time.perf_counter()
import torch
from orchestrator.datacache import sync_prepared
from tarflow.data import DataConfig, load_dataset
t1 = time.perf_counter()
sync = sync_prepared(sys.argv[1], sys.argv[2], sys.argv[3])
t2 = time.perf_counter()
data = load_dataset(DataConfig(name="prepared", root=sync.path), "train")
x, y = next(iter(torch.utils.data.DataLoader(data, batch_size=64, shuffle=True)))
t3 = time.perf_counter()
print(json.dumps({"imports": t1 - t0, "sync": t2 - t1, "first_batch": t3 - t2, "fetched": len(sync.fetched),
                  "bytes": sync.bytes_fetched}))
"""


def bench_cache(cache: Path, npz: Path, images: int) -> None:
    sys.path.insert(0, str(ROOT / "infra" / "local"))
    from devservers import create_bucket, start_s3_server

    print(f"\n(d) time to the first batch on a new process of a node, {images} prepared images in a local SeaweedFS")
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        svc = start_s3_server(Path(tmp) / "s3", kind="seaweedfs")
        try:
            env = {"AWS_ACCESS_KEY_ID": "testkey", "AWS_SECRET_ACCESS_KEY": "testsecret",
                   "AWS_DEFAULT_REGION": "us-east-1"}
            ENV.update(env)
            os.environ.update(env)
            create_bucket(svc.url, "bench", "testkey", "testsecret")
            dest = f"s3://bench/imagenet64-{images}"
            t = prepare_cli(npz, dest, "--limit", str(images), "--endpoint-url", svc.url, "--num-cpus", "2")
            print(f"  prepared into the bucket in {t:.0f} s")
            node_cache = Path(tmp) / "node-cache"
            for label in ("cold cache", "warm cache"):
                out = subprocess.run([sys.executable, "-c", FIRST_BATCH, dest, svc.url, str(node_cache)], cwd=ROOT,
                                     env=ENV, capture_output=True, text=True, check=True).stdout
                r = json.loads(out.splitlines()[-1])
                rate = f" ({r['bytes'] / r['sync'] / 1e6:.0f} MB/s)" if r["bytes"] else ""
                print(f"  {label}: fetch/check {r['sync']:.2f} s for {r['fetched']} files, {gb(r['bytes'])}{rate}; "
                      f"then first batch {r['first_batch']:.2f} s (python + torch imports {r['imports']:.1f} s)")
        finally:
            svc.stop()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=300_000, help="synthetic training images (64², RGB)")
    p.add_argument("--old-images", type=int, default=100_000, help="images for today's imagenet_npz loader")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--photos", type=int, default=2000)
    p.add_argument("--s3-images", type=int, default=50_000)
    p.add_argument("--cache-dir", default=os.path.join(tempfile.gettempdir(), "tarflow-bench-data"))
    p.add_argument("--parts", default="memory,loader,prepare,cache")
    a = p.parse_args()
    cache = Path(a.cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    parts = set(a.parts.split(","))
    npz = synthetic_npz(cache, a.images)
    prepared = cache / f"prepared-{a.images}"
    if "memory" in parts:
        bench_memory(cache, a.images, a.old_images, a.steps)
    elif "loader" in parts:
        prepare_cli(npz, prepared, "--num-cpus", "2")
    if "loader" in parts:
        bench_loader(prepared)
    if "prepare" in parts:
        bench_prepare(cache, npz, a.photos)
    if "cache" in parts:
        bench_cache(cache, npz, a.s3_images)


if __name__ == "__main__":
    main()
