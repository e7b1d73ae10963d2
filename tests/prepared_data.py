"""Small raw data sets in their published layouts, and prepared data made from them: helpers for the tests of
orchestrator.prepare / datacache, reusable by training tests that need prepared data in S3 (import with
`from prepared_data import ...`; pytest puts tests/ on sys.path)."""

from __future__ import annotations

import gzip
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

FASHION = "/usr/share/datasets/fashion-mnist"
ROOT = str(Path(__file__).resolve().parents[1])  # this checkout: Ray workers must import its packages


def write_idx(path: Path, array: np.ndarray) -> None:
    """A gzipped IDX file (uint8), as Fashion-MNIST publishes them."""
    header = bytes([0, 0, 8, array.ndim]) + np.array(array.shape, ">u4").tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def write_npz_batches(root: Path, batches: dict[str, int], side: int = 8, seed: int = 0,
                      compressed: tuple[str, ...] = ()) -> None:
    """Official downsampled-ImageNet files: {"train_data_batch_1.npz": n, ..., "val_data.npz": n}, rows of R, G,
    B planes, random pixels and labels 1..1000; files named in `compressed` are saved with savez_compressed."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for name, n in batches.items():
        data = rng.integers(0, 256, (n, 3 * side * side), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(1, 1001, n)]  # a list, as in the published files
        save = np.savez_compressed if name in compressed else np.savez
        save(root / name, data=data, labels=labels, mean=np.zeros(3 * side * side))


def write_photo_tree(root: Path, counts: dict[str, dict[str, int]], size=(50, 38), seed: int = 0) -> list[Path]:
    """Real JPEGs (smooth colour gradients with noise) in root/<split>/<class>/, plus a non-image file, a
    truncated JPEG and a text file named .jpg in the first class of each split. Returns the bad photos."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    bad = []
    for split, per_class in counts.items():
        for k, (cls, n) in enumerate(per_class.items()):
            folder = root / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                w, h = size
                yy, xx = np.mgrid[0:h, 0:w]
                base = np.stack([xx * 255 / w, yy * 255 / h, np.full((h, w), 40.0 * k + 20)], -1)
                pixels = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i:03d}.jpg", quality=90)
            if k == 0:
                (folder / "notes.txt").write_text("not an image")
                data = (folder / "000.jpg").read_bytes()
                (folder / "zz_truncated.jpg").write_bytes(data[: len(data) // 3])
                (folder / "zz_text.jpg").write_text("a text file named like a photo")
                bad += [folder / "zz_truncated.jpg", folder / "zz_text.jpg"]
    return bad


def upload_dir(client, local: Path, bucket: str, prefix: str) -> None:
    for path in sorted(Path(local).rglob("*")):
        if path.is_file():
            client.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(local).as_posix()}")


def python_env() -> dict:
    """Environment for subprocesses and Ray workers that import this checkout."""
    return {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}


def prepare_fashion(dest: str, endpoint_url: str | None = None, address: str | None = None, limit: int = 300,
                    image_size: int = 32, *extra: str) -> str:
    """Fashion-MNIST (`limit` train + `limit` val images, padded to image_size², RGB, 128-image shards) prepared
    into dest by the CLI, on the Ray cluster at `address` (e.g. the ray_cluster fixture's) or a local instance.
    Returns the CLI's stdout; raises with its stderr if it fails."""
    cmd = [sys.executable, "-m", "orchestrator.prepare", FASHION, dest, "--image-size", str(image_size),
           "--channels", "3", "--limit", str(limit), "--shard-size", "128", *extra]
    cmd += ["--endpoint-url", endpoint_url] if endpoint_url else []
    cmd += ["--address", address] if address else ["--num-cpus", "2"]
    proc = subprocess.run(cmd, cwd=ROOT, env=python_env(), capture_output=True, text=True, check=False, timeout=600)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return proc.stdout
