"""End-of-run evaluation on the workers: held-out bits/dim (sharded over ranks), a sample grid, and FID
with samples drawn on every worker."""

from __future__ import annotations

import dataclasses
import io
import os
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

import tarflow
from tarflow.data import DataConfig, ImageDataset, load_dataset, to_uint8


def heldout_bpd(model: tarflow.TarFlow, val: ImageDataset, batch_size: int, device: torch.device,
                rank: int = 0, world: int = 1, seed: int = 0) -> float:
    """Mean BPD over the held-out split, one dequantisation sample per image, each rank a shard."""
    sampler = DistributedSampler(val, num_replicas=world, rank=rank, shuffle=False, drop_last=False)
    loader = DataLoader(val, batch_size=batch_size, sampler=sampler)
    gen = torch.Generator(device=device).manual_seed(seed + rank)
    total = torch.zeros(2, dtype=torch.float64, device=device)  # sum of BPD, count
    model.eval()
    with torch.no_grad():
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            bpd = tarflow.bits_per_dim(model, to_uint8(x), y if model.config.num_classes else None, generator=gen)
            total += torch.stack([bpd.double().sum(), torch.tensor(float(len(bpd)), device=device)])
    if world > 1:
        # DistributedSampler pads shards to equal length by repeating images: a negligible bias
        dist.all_reduce(total)
    return (total[0] / total[1]).item()


def sample_grid_png(model: tarflow.TarFlow, path: Path, n: int, batch_size: int, device: torch.device,
                    num_classes: int, guidance: float, annealed_guidance: bool, attn_temp: float,
                    denoise_sigma: float | None, denoise_step: float, seed: int = 0) -> Path:
    """Samples (labels cycling through the classes for conditional models) saved as one PNG grid."""
    from PIL import Image

    gen = torch.Generator(device="cpu").manual_seed(seed)
    images = []
    for start in range(0, n, batch_size):
        b = min(batch_size, n - start)
        y = (torch.arange(start, start + b) % num_classes).to(device) if num_classes else None
        images.append(tarflow.sample(model, b, y=y, guidance=guidance, annealed_guidance=annealed_guidance,
                                     attn_temp=attn_temp, denoise_sigma=denoise_sigma, denoise_step=denoise_step,
                                     generator=gen, device=device).cpu())
    grid = tarflow.sample_grid(torch.cat(images), nrow=max(1, int(n**0.5)))
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid.numpy()).save(path)
    return path


# ---------------------------------------------------------------------------------------------
# FID: reference statistics cached in storage, samples drawn in parallel on every worker


class FeatureMoments:
    """Running sums of features, so ranks combine statistics with one all-reduce instead of shipping
    every feature vector (50K × 2048 floats) to rank 0."""

    def __init__(self, dim: int, device: torch.device):
        self.s1 = torch.zeros(dim, dtype=torch.float64, device=device)
        self.s2 = torch.zeros(dim, dim, dtype=torch.float64, device=device)
        self.n = torch.zeros((), dtype=torch.float64, device=device)

    def add(self, feats: torch.Tensor) -> None:
        f = feats.to(self.s1.device, torch.float64)
        self.s1 += f.sum(0)
        self.s2 += f.T @ f
        self.n += len(f)

    def all_reduce(self, world: int) -> "FeatureMoments":
        if world > 1:
            for t in (self.s1, self.s2, self.n):
                dist.all_reduce(t)
        return self

    def statistics(self):
        from tarflow.fid import FIDStatistics

        n = self.n.item()
        mu = self.s1 / n
        sigma = (self.s2 - n * torch.outer(mu, mu)) / (n - 1)
        return FIDStatistics(mu.cpu().numpy(), sigma.cpu().numpy(), int(n))


def inception_weights_file(spec: str | None, storage) -> str | None:
    """A local weights file for torch-fidelity's Inception, from the config's eval.fid.inception_weights."""
    if not spec:
        return None
    cache = Path(os.environ.get("TARFLOW_CACHE", Path.home() / ".cache" / "tarflow"))
    if spec == "fid-helper":
        from tarflow.fid import convert_fid_helper_weights

        path = cache / "inception-fid-helper.pth"
        if not path.exists():
            cache.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            convert_fid_helper_weights(tmp)
            os.replace(tmp, path)  # atomic: workers on one node may convert at the same time
        return str(path)
    if spec.startswith("s3://"):
        from .storage import RunStorage

        remote = RunStorage(spec.rsplit("/", 1)[0], storage.endpoint_url)
        path = cache / ("inception-" + spec.replace("/", "_").replace(":", ""))
        if not path.exists():
            data = remote.read_bytes(spec.rsplit("/", 1)[1])
            if data is None:
                raise FileNotFoundError(f"eval.fid.inception_weights {spec} does not exist")
            cache.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        return str(path)
    if not Path(spec).is_file():
        raise FileNotFoundError(f"eval.fid.inception_weights {spec} does not exist")
    return spec


def reference_statistics(data_cfg: DataConfig, fid_cfg, storage, extractor, rank: int, world: int,
                         device: torch.device):
    """Training-set statistics (with flips), computed once per data set × resolution × transform and
    cached in storage; each rank featurises its shard. Returns the statistics on every rank."""
    from tarflow.fid import FEATURE_DIM, FIDStatistics, reference_stats_key

    plain = dataclasses.replace(data_cfg, flip=False)
    key = reference_stats_key(plain.name, plain.image_size or 0, {
        "root": plain.root, "fit": plain.fit, "channels": plain.channels, "limit": plain.limit,
        "reference_images": fid_cfg.reference_images, "flips": fid_cfg.flips, "split": "train"})
    relpath = f"fid_stats/{key}"
    cached = storage.read_bytes(relpath)
    if cached is not None:
        return FIDStatistics.load(io.BytesIO(cached))
    train = load_dataset(plain, "train")
    if fid_cfg.reference_images:
        train = torch.utils.data.Subset(train, range(min(fid_cfg.reference_images, len(train))))
    shard = torch.utils.data.Subset(train, range(rank, len(train), world))
    moments = FeatureMoments(FEATURE_DIM, device)
    for x, _ in DataLoader(shard, batch_size=fid_cfg.batch_size):
        moments.add(extractor(x))
        if fid_cfg.flips:
            moments.add(extractor(x.flip(-1)))
    stats = moments.all_reduce(world).statistics()
    if rank == 0:
        buf = io.BytesIO()
        stats.save(buf)
        storage.write_bytes(relpath, buf.getvalue())
    return stats


def sample_fid(model: tarflow.TarFlow, eval_cfg, noise_std: float | None, reference, extractor, rank: int,
               world: int, device: torch.device, seed: int) -> float:
    """FID of eval.fid.num_samples samples, each rank drawing its share; samples clipped to [−1, 1]."""
    from tarflow.fid import FEATURE_DIM, frechet_distance

    fid_cfg = eval_cfg.fid
    share = fid_cfg.num_samples // world + (rank < fid_cfg.num_samples % world)
    gen = torch.Generator(device="cpu").manual_seed(seed * 7919 + rank)
    moments = FeatureMoments(FEATURE_DIM, device)
    classes = model.config.num_classes
    for start in range(0, share, fid_cfg.batch_size):
        b = min(fid_cfg.batch_size, share - start)
        y = torch.randint(classes, (b,), generator=gen).to(device) if classes else None
        x = tarflow.sample(model, b, y=y, guidance=eval_cfg.guidance, annealed_guidance=eval_cfg.annealed_guidance,
                           attn_temp=eval_cfg.attn_temp, denoise_sigma=noise_std if eval_cfg.denoise else None,
                           denoise_step=eval_cfg.denoise_step, generator=gen, device=device)
        moments.add(extractor(x.clamp(-1, 1)))
    return frechet_distance(moments.all_reduce(world).statistics(), reference)
