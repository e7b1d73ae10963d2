"""Training randomness as a pure function of (seed, step, position): no RNG state to save or share.

Every random number a training step draws belongs to one sample: its horizontal flip, its label drop and
its noise (Gaussian augmentation or uniform dequantisation). They come from the sample's key,
sample_key(seed, step, position), where step is the optimizer step and position the sample's place in
that step's global batch. So a sample's draws do not depend on which rank or micro-batch holds it, how
many ranks there are, or whether the run restarted: the data order fixes which image sits at a position,
the key fixes what happens to it.

Per sample, in this order: the flip (one bit of a hash of the key), the label-drop uniform (53 bits of
another hash of the key), then the noise, from a torch.Generator on the batch's device seeded with the
key. Flips and drops are therefore the same on every device; the noise is the same on the same kind of
device (CPU, or CUDA on one GPU model: the CUDA kernels' streams depend on the launch grid). On the CPU,
torch seeds its Mersenne Twister with the key's low 32 bits only, so two samples of a long run may share
their noise (by the birthday bound, after ~10⁵ samples some pair does); they are other images at other
steps, which is harmless. CUDA's Philox takes all 64 bits.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from .model import TarFlow, TarFlowConfig

_MASK = (1 << 64) - 1


def _mix(h: int) -> int:
    """SplitMix64's step: a bijection of 64-bit integers that spreads every input bit over the output."""
    h = (h + 0x9E3779B97F4A7C15) & _MASK
    h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & _MASK
    return h ^ (h >> 31)


def sample_key(seed: int, step: int, position: int) -> int:
    """A 64-bit key of (seed, step, position); distinct positions of one step get distinct keys."""
    h = 0
    for value in (seed, step, position):
        h = _mix(h ^ (value & _MASK))
    return h


def unit_uniform(key: int, stream: int) -> float:
    """A uniform in [0, 1) from a key: 53 bits of the hash of (key, stream)."""
    return (_mix(key ^ _mix(stream)) >> 11) / 2.0**53


def flip_coin(key: int) -> bool:
    return unit_uniform(key, 1) < 0.5


@dataclass
class SampleDraws:
    """The draws of a batch, one row per sample: what training_inputs applies."""

    flip: torch.Tensor   # (B,) bool: mirror the image horizontally
    drop: torch.Tensor   # (B,) float32 uniforms in [0, 1): the label is dropped when below the drop rate
    noise: torch.Tensor  # (B, *shape): standard normal (noise "gaussian"), or U[0, 1) float32 ("uniform")


def sample_draws(seed: int, step: int, positions: Iterable[int], shape: tuple[int, ...], noise: str,
                 dtype: torch.dtype, device: torch.device) -> SampleDraws:
    """Each sample's flip, drop uniform and noise from its key (see the module docstring). One generator
    seeding and one kernel per sample: cheap next to a training step (benchmarks/bench_randomness.py)."""
    keys = [sample_key(seed, step, int(p)) for p in positions]
    eps = torch.empty(len(keys), *shape, dtype=dtype if noise == "gaussian" else torch.float32, device=device)
    generator = torch.Generator(device=device)
    for row, key in zip(eps, keys):
        generator.manual_seed(key)
        if noise == "gaussian":
            row.normal_(generator=generator)
        else:
            row.uniform_(generator=generator)
    flip = torch.tensor([flip_coin(k) for k in keys], dtype=torch.bool).to(device, non_blocking=True)
    drop = torch.tensor([unit_uniform(k, 2) for k in keys], dtype=torch.float32).to(device, non_blocking=True)
    return SampleDraws(flip=flip, drop=drop, noise=eps)


def initial_model(config: TarFlowConfig, seed: int) -> TarFlow:
    """A model whose initial weights are a function of the seed alone (built on the CPU from a forked global
    RNG, so the caller's RNG state is left as it was): every rank and every restart builds the same one."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return TarFlow(config)
