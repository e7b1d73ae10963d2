"""Training math, independent of any launcher: loss, flips, noise, label drop, AdamW with warm-up + cosine,
bf16, EMA, gradient clipping, gradient accumulation, activation checkpointing, and checkpoints that
load with torch.load(weights_only=True).

Any loop (a plain script, the orchestrator's Ray worker) builds a TrainState and calls train_step. Its
random draws are keyed by (TrainConfig.seed, step, position in the global batch) (tarflow/randomness.py),
so they need no RNG state and do not depend on the number of ranks; build the model with
tarflow.initial_model(config, seed) for initial weights that depend on the seed alone.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

from .likelihood import dequantize, dequantize_uniform
from .model import ConfigError, TarFlow, TarFlowConfig, at_least_fp32
from .randomness import sample_draws


@dataclass
class TrainConfig:
    lr: float = 1e-4
    min_lr: float = 1e-6
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 1e-4
    warmup_steps: int = 0       # the paper warms up for one epoch
    total_steps: int = 1000
    noise: str = "gaussian"     # "gaussian" (generation models) or "uniform" (likelihood models)
    noise_std: float = 0.05     # σ of the Gaussian augmentation on the [−1, 1] scale
    label_drop: float = 0.1     # probability of training a class-conditional model without its label
    bf16: bool = False          # autocast; the paper uses it for Gaussian-noise runs
    grad_clip: float | None = None  # not in the reference; reproductions needed it for stability
    ema_decay: float | None = None  # likewise
    compile: bool = False
    activation_checkpointing: bool = False  # recompute each transformer layer in backward (see tarflow.memory)
    grad_accum_steps: int = 1   # micro-batches per optimizer step; the batch given to train_step is split
    # TF32 matmuls for fp32 work on CUDA (10-bit mantissa inputs, fp32 sums): ~8x the fp32 peak of an A100 or
    # H100, other numerics. make_train_state sets it for the whole process when the model is on CUDA; the
    # authors' code leaves it off (PyTorch's default)
    tf32: bool = False
    seed: int = 0               # keys every draw of training (tarflow/randomness.py)
    flip: bool = False          # random horizontal flips (the paper's); the datasets then should not flip

    def __post_init__(self):
        self.betas = tuple(self.betas)
        if not isinstance(self.flip, bool):
            raise ConfigError(f"TrainConfig.flip must be true or false, got {self.flip!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ConfigError(f"TrainConfig.seed must be an integer, got {self.seed!r}")
        if not isinstance(self.activation_checkpointing, bool):
            raise ConfigError(f"TrainConfig.activation_checkpointing must be true or false, "
                              f"got {self.activation_checkpointing!r}")
        if (not isinstance(self.grad_accum_steps, int) or isinstance(self.grad_accum_steps, bool)
                or self.grad_accum_steps < 1):
            raise ConfigError(f"TrainConfig.grad_accum_steps must be an integer >= 1, got {self.grad_accum_steps!r}")
        if self.noise not in ("gaussian", "uniform"):
            raise ConfigError(f"TrainConfig.noise must be 'gaussian' or 'uniform', got {self.noise!r}")
        if self.noise_std < 0:
            raise ConfigError(f"TrainConfig.noise_std must be >= 0, got {self.noise_std}")
        if not 0 <= self.label_drop < 1:
            raise ConfigError(f"TrainConfig.label_drop must lie in [0, 1), got {self.label_drop}")
        if self.total_steps <= 0 or self.warmup_steps < 0 or self.warmup_steps > self.total_steps:
            raise ConfigError(f"need 0 <= warmup_steps ({self.warmup_steps}) <= total_steps ({self.total_steps}), "
                              "total_steps > 0")
        if self.ema_decay is not None and not 0 < self.ema_decay < 1:
            raise ConfigError(f"TrainConfig.ema_decay must lie in (0, 1), got {self.ema_decay}")


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of (0-based) step: linear warm-up from min_lr, then cosine down to min_lr."""
    if step < cfg.warmup_steps:
        return cfg.min_lr + step / cfg.warmup_steps * (cfg.lr - cfg.min_lr)
    t = (step - cfg.warmup_steps) / max(1, cfg.total_steps - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (1 + math.cos(math.pi * min(t, 1.0))) * (cfg.lr - cfg.min_lr)


def augment(x: torch.Tensor, cfg: TrainConfig, generator: torch.Generator | None = None,
            noise: torch.Tensor | None = None) -> torch.Tensor:
    """x in [−1, 1] from integer pixels -> the model's continuous input. noise: x-shaped draws, standard
    normal (cfg.noise "gaussian") or U[0, 1) ("uniform"); drawn here from generator when not given."""
    if cfg.noise == "uniform":
        return dequantize(x, noise) if noise is not None else dequantize_uniform(x, generator)
    if noise is None:
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return x + cfg.noise_std * noise


def drop_labels(y: torch.Tensor, p: float, generator: torch.Generator | None = None,
                u: torch.Tensor | None = None) -> torch.Tensor:
    """Replace each label by −1 ("no class") with probability p, for classifier-free guidance. u: one U[0, 1)
    draw per label (the label is dropped when u < p); drawn here from generator when not given."""
    if p <= 0:
        return y
    if u is None:
        u = torch.rand(y.shape, generator=generator, device=y.device)
    return torch.where(u < p, torch.full_like(y, -1), y)


def training_inputs(x: torch.Tensor, y: torch.Tensor | None, cfg: TrainConfig, step: int,
                    positions: torch.Tensor | Sequence[int] | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """What the model trains on at optimizer step `step`: every sample flipped (cfg.flip), noised and its label
    dropped with its own draws, keyed by (cfg.seed, step, its position in the global batch).

    positions: the samples' positions in this step's global batch (default 0..B−1, one process holding
    the whole batch; required when a process group of several ranks is up); a CPU LongTensor or ints.
    """
    if positions is None:
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            raise ConfigError(f"train_step under {dist.get_world_size()} ranks needs positions (else every rank "
                              "draws the same noise): e.g. rank + world_size * arange(per-rank batch) for "
                              "DistributedSampler's layout")
        positions = range(len(x))
    if len(positions) != len(x):
        raise ConfigError(f"train_step got {len(x)} images but {len(positions)} positions")
    positions = positions.tolist() if torch.is_tensor(positions) else positions
    draws = sample_draws(cfg.seed, step, positions, tuple(x.shape[1:]), cfg.noise, x.dtype, x.device)
    if cfg.flip:
        x = torch.where(draws.flip.view(-1, *[1] * (x.dim() - 1)), x.flip(-1), x)
    x = augment(x, cfg, noise=draws.noise)
    if y is not None:
        y = drop_labels(y, cfg.label_drop, u=draws.drop)
    return x, y


def flow_loss(z: torch.Tensor, logdet: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """NLL per dimension in nats, Gaussian constant dropped: 0.5·mean(z²) − mean(logdet)/dims.

    Returns (loss, prior term, logdet per dim) so the two halves can be watched separately.
    """
    prior_term = 0.5 * at_least_fp32(z).pow(2).mean()
    logdet_per_dim = logdet.mean() / z[0].numel()
    return prior_term - logdet_per_dim, prior_term, logdet_per_dim


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    # Like the reference, AdamW decays every parameter; fused where the device supports it
    fused = all(p.is_cuda for p in model.parameters())
    return torch.optim.AdamW(model.parameters(), lr=lr_at(0, cfg), betas=cfg.betas,
                             weight_decay=cfg.weight_decay, fused=fused or None)


@dataclass
class TrainState:
    model: TarFlow                  # the raw model: what is saved and sampled
    optimizer: torch.optim.Optimizer
    config: TrainConfig
    net: nn.Module                  # what the forward pass runs through: model, DDP(model), compiled
    ema: TarFlow | None = None
    step: int = 0
    extra: dict = field(default_factory=dict)
    # Under DDP: averages a tensor over the ranks (all-reduce / world size), for the VP prior's statistic
    all_reduce_mean: Callable[[torch.Tensor], torch.Tensor] | None = None


def make_train_state(model: TarFlow, cfg: TrainConfig, wrap: Callable[[nn.Module], nn.Module] | None = None,
                     all_reduce_mean: Callable[[torch.Tensor], torch.Tensor] | None = None) -> TrainState:
    """wrap: e.g. DistributedDataParallel; applied before torch.compile. all_reduce_mean: see TrainState."""
    model.set_activation_checkpointing(cfg.activation_checkpointing)
    if any(p.is_cuda for p in model.parameters()):
        torch.backends.cuda.matmul.allow_tf32 = cfg.tf32
    net = wrap(model) if wrap else model
    if cfg.compile:
        net = torch.compile(net)
    ema = None
    if cfg.ema_decay:
        ema = copy.deepcopy(model).requires_grad_(False)
    return TrainState(model=model, optimizer=make_optimizer(model, cfg), config=cfg, net=net, ema=ema,
                      all_reduce_mean=all_reduce_mean)


def no_sync(net: nn.Module) -> contextlib.AbstractContextManager:
    """DDP's no_sync() (gradients accumulate locally, no all-reduce) for a DDP module, also under
    torch.compile (whose wrapper forwards attribute lookups to the DDP inside); a no-op otherwise."""
    return net.no_sync() if hasattr(net, "no_sync") else contextlib.nullcontext()


def train_step(state: TrainState, x: torch.Tensor, y: torch.Tensor | None = None,
               positions: torch.Tensor | Sequence[int] | None = None, loss_weight: float = 1.0) -> dict[str, float]:
    """One optimisation step on this rank's batch of images in [−1, 1] (integer-valued pixels). Returns metrics.

    positions: the images' positions in this step's global batch, which key their flips, noise and label
    drops (training_inputs); default 0..B−1, for a single process holding the whole batch.
    loss_weight: this rank's share of the global batch times the world size (n·W/B): DDP averages the ranks'
    gradients, so ranks holding unequal shares (a world size that does not divide the batch) are weighted to
    the global batch's mean; 1 when the shares are equal.
    With cfg.grad_accum_steps = k the batch runs as k micro-batches (equal when k divides it), each loss
    weighted by its share so the summed gradients are the batch mean; DDP all-reduces only on the last one
    (no_sync before); then one optimizer step. state.step counts optimizer steps, and a checkpoint is only
    ever taken between calls.
    The VP prior is updated from the z of the whole rank batch, averaged over the ranks by
    state.all_reduce_mean when given, so every rank holds the same prior whatever the world size.
    """
    cfg, model = state.config, state.model
    lr = lr_at(state.step, cfg)
    for group in state.optimizer.param_groups:
        group["lr"] = lr
    conditional = bool(model.config.num_classes) and y is not None
    x, y = training_inputs(x, y if conditional else None, cfg, state.step, positions)
    state.optimizer.zero_grad(set_to_none=True)
    terms, z = _backward(state, x, y, loss_weight)
    if cfg.grad_clip:
        grad_norm = nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    else:  # the norm alone, for the logs: clipping at infinity would still rescale every gradient by 1
        grad_norm = nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
    state.optimizer.step()
    model.update_prior(z, all_reduce_mean=state.all_reduce_mean)
    if state.ema is not None:
        update_ema(state.ema, model, cfg.ema_decay)
    state.step += 1
    # one device sync for all the numbers, not one per number
    numbers = torch.cat([terms, grad_norm.detach().to(terms.dtype).view(1)])
    loss, prior_term, logdet_per_dim, grad_norm = numbers.tolist()
    return {"loss": loss, "prior_term": prior_term, "logdet_per_dim": logdet_per_dim, "lr": lr, "grad_norm": grad_norm}


def _backward(state: TrainState, x: torch.Tensor, y: torch.Tensor | None, loss_weight: float
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of loss_weight × the batch's mean loss, micro-batch by micro-batch (as equal as the batch
    allows; each weighted by its share of the batch). Returns the batch's (loss, prior term, logdet per dim)
    and its z."""
    cfg, k, n = state.config, state.config.grad_accum_steps, x.shape[0]
    sizes = [size for i in range(k) if (size := n // k + (i < n % k))]
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    terms, zs = 0.0, []
    for i, (start, size) in enumerate(zip(starts, sizes)):
        share, part = size / n, slice(start, start + size)
        with no_sync(state.net) if i < len(sizes) - 1 else contextlib.nullcontext():
            with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
                z, logdet = state.net(x[part], None if y is None else y[part])
            loss, prior_term, logdet_per_dim = flow_loss(z, logdet)
            (loss * (share * loss_weight)).backward()
        terms = terms + share * torch.stack([loss.detach(), prior_term.detach(), logdet_per_dim.detach()])
        zs.append(z.detach())
    return terms, torch.cat(zs) if len(zs) > 1 else zs[0]


@torch.no_grad()
def update_ema(ema: TarFlow, model: TarFlow, decay: float) -> None:
    """Parameters: ema ← decay·ema + (1 − decay)·model. Buffers (the VP prior variance, itself a running
    estimate) are copied, so the EMA model samples and scores with the prior it was trained with."""
    torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1 - decay)
    for mine, theirs in zip(ema.buffers(), model.buffers()):
        mine.copy_(theirs)


# ---------------------------------------------------------------------------------------------
# Checkpoints


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read or does not match the run."""


class CheckpointCorrupt(CheckpointError):
    """A checkpoint whose bytes differ from those written (its checksum record says so)."""


CHECKSUM_SUFFIX = ".sha256"  # beside each checkpoint file: "<sha256 hex> <size in bytes>"


def checksum_path(path: str | os.PathLike) -> Path:
    return Path(str(path) + CHECKSUM_SUFFIX)


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 24) -> tuple[str, int]:
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
            size += len(block)
    return digest.hexdigest(), size


def parse_checksum(text: str) -> tuple[str, int]:
    digest, size = text.split()
    return digest, int(size)


def verify_checkpoint(path: str | os.PathLike) -> bool:
    """Check a checkpoint file against its checksum record; False when it has none (older checkpoints).
    Raises CheckpointCorrupt naming what differs."""
    path, record = Path(path), checksum_path(path)
    if not record.is_file():
        return False
    want_digest, want_size = parse_checksum(record.read_text())
    size = path.stat().st_size
    if size != want_size:
        raise CheckpointCorrupt(f"checkpoint {path} is {size} bytes, {want_size} were written (truncated or "
                                "overwritten)")
    digest, _ = file_sha256(path)
    if digest != want_digest:
        raise CheckpointCorrupt(f"checkpoint {path} does not match its checksum (sha256 {digest[:12]}…, "
                                f"{want_digest[:12]}… written)")
    return True


def checkpoint_dict(state: TrainState, **extra) -> dict:
    """Everything needed to resume: plain tensors and Python values only (weights_only-loadable)."""
    return {
        "model": state.model.state_dict(),
        "optimizer": state.optimizer.state_dict(),
        "ema": state.ema.state_dict() if state.ema is not None else None,
        "step": state.step,
        "model_config": state.model.config.to_dict(),
        "train_config": {**asdict(state.config), "betas": list(state.config.betas)},
        "extra": {**state.extra, **extra},
    }


def save_checkpoint(path: str | os.PathLike, state: TrainState, **extra) -> Path:
    """Atomic write (temp file + rename) so a crash never leaves a half-written checkpoint, with a checksum
    record beside it (path + ".sha256") so that later corruption is told from a failed read."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(checkpoint_dict(state, **extra), tmp)
    digest, size = file_sha256(tmp)
    os.replace(tmp, path)
    checksum_path(path).write_text(f"{digest} {size}\n")
    return path


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """A checkpoint's dict, verified against its checksum record when it has one."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    verify_checkpoint(path)
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises many kinds for truncated or foreign files
        raise CheckpointError(f"checkpoint {path} is corrupt or not a tarflow checkpoint "
                              f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from e
    if not isinstance(ckpt, dict) or not {"model", "step", "model_config"} <= set(ckpt):
        raise CheckpointError(f"checkpoint {path} lacks model/step/model_config: not a tarflow checkpoint")
    return ckpt


def restore(state: TrainState, ckpt: dict) -> TrainState:
    """Load a checkpoint dict into a freshly built TrainState of the same config."""
    if ckpt["model_config"] != state.model.config.to_dict():
        raise CheckpointError(f"checkpoint model config {ckpt['model_config']} differs from the run's "
                              f"{state.model.config.to_dict()}")
    state.model.load_state_dict(ckpt["model"])
    state.optimizer.load_state_dict(ckpt["optimizer"])
    if state.ema is not None and ckpt.get("ema") is not None:
        state.ema.load_state_dict(ckpt["ema"])
    state.step = int(ckpt["step"])
    state.extra = dict(ckpt.get("extra") or {})
    return state


def model_from_checkpoint(ckpt: dict, use_ema: bool = True) -> TarFlow:
    model = TarFlow(TarFlowConfig(**ckpt["model_config"]))
    weights = ckpt["ema"] if use_ema and ckpt.get("ema") is not None else ckpt["model"]
    model.load_state_dict(weights)
    return model
