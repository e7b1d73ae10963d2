"""FID reference statistics on the workers (orchestrator/evaluation.py): one rank decides whether the cached
statistics exist (ranks deciding on their own can split when a concurrent run writes them, and the collective
then hangs until its timeout), and the cache key follows the data's content (an image folder refilled under the
same root does not reuse stale statistics)."""

import datetime
import io
import os
import time

import numpy as np
import pytest
import torch
import torch.distributed as dist
from PIL import Image

from orchestrator.evaluation import reference_statistics, reference_stats_relpath
from orchestrator.storage import RunStorage
from tarflow.data import DataConfig
from tarflow.fid import FIDStatistics


class FidSettings:  # what reference_statistics reads of the eval.fid section
    flips, reference_images, batch_size = True, None, 8


def features(x: torch.Tensor) -> torch.Tensor:
    """A stand-in feature extractor (2048 features of each image), cheap: the question here is who decides."""
    return x.flatten(1)[:, :1].repeat(1, 2048) + torch.arange(2048.0)


def write_folder(root, seed: int):
    rng = np.random.default_rng(seed)
    for split in ("train", "val"):
        for cls in ("cat", "dog"):
            (root / split / cls).mkdir(parents=True, exist_ok=True)
            for i in range(3):
                Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(root / split / cls / f"{i}.png")


def _rank(rank: int, rendezvous: str, folder: str, stores: list, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=30))
    try:
        data = DataConfig(name="image_folder", root=folder, image_size=8)
        stats = reference_statistics(data, FidSettings, RunStorage(stores[rank]), features, rank, 2,
                                     torch.device("cpu"))
        torch.save({"mu": torch.from_numpy(stats.mu), "count": stats.count}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two spawned processes
def test_one_rank_decides_whether_the_cached_statistics_exist(tmp_path):
    """Rank 0 finds statistics that rank 1 does not (as when another run writes them between the two reads):
    both must use them, instead of rank 1 waiting alone in the all-reduce of a computation."""
    folder = tmp_path / "photos"
    write_folder(folder, seed=0)
    data = DataConfig(name="image_folder", root=str(folder), image_size=8)
    cached = FIDStatistics(np.full(2048, 7.0), np.eye(2048), 123)
    buf = io.BytesIO()
    cached.save(buf)
    seen_by_rank0 = RunStorage(str(tmp_path / "store0"))
    seen_by_rank0.write_bytes(reference_stats_relpath(data, FidSettings), buf.getvalue())
    out = tmp_path / "rank"
    torch.multiprocessing.spawn(_rank, args=(str(tmp_path / "rendezvous"), str(folder),
                                             [seen_by_rank0.uri, str(tmp_path / "store1")], str(out)), nprocs=2)
    for rank in range(2):
        got = torch.load(f"{out}.{rank}", weights_only=True)
        assert got["count"] == 123 and torch.all(got["mu"] == 7.0), rank


def test_the_cache_key_follows_the_data_not_its_path(tmp_path):
    folder = tmp_path / "photos"
    write_folder(folder, seed=0)
    data = DataConfig(name="image_folder", root=str(folder), image_size=8)
    key = reference_stats_relpath(data, FidSettings)
    assert reference_stats_relpath(data, FidSettings) == key
    time.sleep(0.01)
    write_folder(folder, seed=1)  # refilled under the same root: same names, same counts, other photos
    assert reference_stats_relpath(data, FidSettings) != key
    os.rename(folder / "train" / "cat" / "0.png", folder / "train" / "cat" / "9.png")
    assert reference_stats_relpath(data, FidSettings) not in (key,)
