"""End-of-run evaluation on the workers: held-out bits/dim (sharded over ranks) and a sample grid."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

import tarflow
from tarflow.data import ImageDataset, to_uint8


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
