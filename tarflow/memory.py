"""What training needs in GPU memory, and what to change when it does not fit.

`training_memory` adds up, per GPU, the tensors one training step holds at its peak, from the model's
own shapes: the weights, their gradients, AdamW's two moments, an EMA copy, DDP's gradient buckets,
bf16 copies of the weights under autocast, and the activations autograd saves for the backward pass,
op by op:

- a Linear saves its input (the weight is a parameter, or under autocast its bf16 copy);
- LayerNorm saves its input and a mean and a 1/std per token (fp32, also under autocast);
- GELU saves its input, and the next Linear its output;
- attention with the flash or memory-efficient kernel saves q, k, v (three views of one qkv tensor),
  its output (which the output projection reads as a view) and a logsumexp per row and head, never an
  N×N matrix; the math kernel saves fp32 copies of q, kᵀ, v and the N×N probabilities per head;
- residual adds, the permutation and the shift save nothing; the affine step z = (x − μ)·exp(−α)
  saves exp(−α) and x − μ in fp32 (VP: exp(0) only), the loss saves z;
- under bf16 autocast the activations between the matmuls are bf16, the residual stream, LayerNorm
  and the flow's exp stay fp32.

With activation checkpointing only every layer's input stays (the residual stream, fp32) and the
backward pass rebuilds one layer's internals at a time. `activations` is what is saved at the end of
the forward pass (measured against autograd's saved tensors in tests/test_memory.py); `transient` is
what the backward pass holds on top at its peak: the activation gradients of one layer, plus with
checkpointing one layer's recomputed internals. Estimates are for eager PyTorch; torch.compile
usually saves less (it fuses and recomputes the elementwise ops).

`plan_fit` compares the total with a GPU's memory (plus `CUDA_OVERHEAD_BYTES`, within a headroom for
the caching allocator) and, when it does not fit, lists the cheapest changes that do. A dry run:

    plan = plan_fit(model_config, per_gpu_batch=256 // 8, gpu_memory_bytes=GPU_MEMORY["A100-80GB"],
                    precision="fp32", num_workers=8)        # resolve precision "auto" before calling
    print(plan.summary())                                   # needs / usable, the breakdown, the options
    if not plan.fits:                                       # refuse; plan.options[0].overrides is the
        ...                                                 # cheapest fix, e.g. {"train.grad_accum_steps": 2}

Which attention kernel: the default "flash" model is right for FlashAttention, memory-efficient and
cuDNN attention on CUDA and for the CPU's flash kernel (scaled_dot_product_attention's default for
fp32 and bf16 on CPU, which the tests measure); pass attention_kernel="math" for the math fallback.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from .model import ConfigError, FlowBlock, TarFlowConfig, TransformerLayer

GiB = 2**30

# Memory a GPU process uses outside PyTorch's tensors: the CUDA context and loaded kernels (0.5–1 GiB),
# NCCL's communication buffers and the cuBLAS/cuDNN workspaces. torch.cuda.max_memory_allocated does
# not see it; the GPU's total does.
CUDA_OVERHEAD_BYTES = int(1.5 * GiB)

# Total memory of common training GPUs as torch.cuda.get_device_properties(...).total_memory reports
# it (approximately; slightly below the marketing figure).
GPU_MEMORY = {
    "A100-40GB": int(39.4 * GiB),
    "A100-80GB": int(79.2 * GiB),
    "H100-80GB": int(79.1 * GiB),
    "H200-141GB": int(139.8 * GiB),
}

PRECISIONS = ("fp32", "bf16")
# "flash" covers every kernel that keeps a logsumexp instead of the probabilities: FlashAttention
# (CUDA, bf16/fp16), memory-efficient attention (CUDA, fp32 too) and PyTorch's CPU flash kernel,
# which scaled_dot_product_attention picks for fp32 and bf16 on CPU. "math" is the fallback that
# materialises softmax(qkᵀ): forced with torch.nn.attention.sdpa_kernel(SDPBackend.MATH), or fp64.
ATTENTION_KERNELS = ("flash", "math")

_FP32 = 4  # parameters, the residual stream, LayerNorm statistics, the flow's exp and z


def _check(precision: str, attention_kernel: str) -> None:
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if attention_kernel not in ATTENTION_KERNELS:
        raise ConfigError(f"attention_kernel must be one of {ATTENTION_KERNELS}, got {attention_kernel!r}")


@dataclass(frozen=True)
class _Shapes:
    """The model's shapes: one flow block without its layers, one transformer layer, and how often they
    repeat. Every block of a TarFlow has the same shapes (only the token order differs), and every layer
    of a block too, so this is the whole model at the cost of one block and one layer."""

    block: FlowBlock            # no layers; on the CPU: a few small tensors
    layer: TransformerLayer     # on the meta device: shapes without storage
    num_blocks: int
    layers_per_block: int
    tokens: int

    def repeated(self, per_block_outside: int, per_layer: int) -> int:
        return self.num_blocks * (per_block_outside + self.layers_per_block * per_layer)


@functools.lru_cache(maxsize=32)
def _shapes_of(key: tuple) -> _Shapes:
    c = TarFlowConfig(**dict(key))
    # (the block draws its embeddings with torch.randn, which on the meta device imports much of
    # torch's Python decompositions, seconds; on the CPU, with the caller's random stream left alone)
    with torch.random.fork_rng(devices=[]):
        block = FlowBlock(c.num_tokens, c.token_dim, c.width, 0, c.head_dim, c.num_classes, c.nvp, reverse_order=False)
    with torch.device("meta"):
        layer = TransformerLayer(c.width, c.head_dim)
    return _Shapes(block, layer, c.num_blocks, c.layers_per_block, c.num_tokens)


def _shapes(config: TarFlowConfig) -> _Shapes:
    return _shapes_of(tuple(sorted(config.to_dict().items())))


def _layer_bytes(layer: TransformerLayer, batch: int, tokens: int, act: int, attention_kernel: str
                 ) -> tuple[int, int]:
    """(input, internals) saved for backward by one transformer layer for a batch of images.

    input: the residual stream entering the layer (what checkpointing keeps); internals: the rest."""
    bn, c = batch * tokens, layer.qkv.in_features
    hidden, heads = layer.mlp_in.out_features, layer.num_heads
    residual = _FP32 * bn * c
    norm_stats = 2 * _FP32 * bn                                 # mean and 1/std per token
    if attention_kernel == "flash":
        attention = 3 * act * bn * c + act * bn * c + _FP32 * heads * bn  # qkv, output, logsumexp
    else:  # math: q·scale and kᵀ·scale (fp32 copies), softmax(qkᵀ) per head, v, and its output
        # copied into (B, N, Ch). v is an fp32 copy, except in fp32 when (B·H, N, 64) can alias the
        # qkv tensor (one image or one head): then v keeps the whole qkv alive.
        v_aliases = act == _FP32 and (batch == 1 or heads == 1)
        v = 3 * act * bn * c if v_aliases else _FP32 * bn * c
        attention = 2 * _FP32 * bn * c + _FP32 * heads * bn * tokens + v + act * bn * c
    internals = (norm_stats + act * bn * c                      # attention LayerNorm: stats; qkv's input
                 + attention
                 + residual + norm_stats + act * bn * c         # MLP LayerNorm: input, stats; mlp_in's input
                 + act * bn * hidden + act * bn * hidden)       # GELU's input, mlp_out's input
    return residual, internals


def _block_outside_bytes(block: FlowBlock, batch: int, tokens: int, act: int) -> int:
    """Saved by one flow block outside its transformer layers, for a batch of images."""
    bn, d, c = batch * tokens, block.token_dim, block.proj_in.out_features
    labels = batch * (8 + 1) if block.class_embed is not None else 0  # int64 class index, bool 'no class' mask
    flow = 2 * _FP32 * bn * d if block.nvp else _FP32 * bn * d  # exp(−α) and x − μ; VP: exp(0)
    return act * bn * d + labels + act * bn * c + flow          # + proj_in's and proj_out's inputs


def _activation_bytes(shapes: _Shapes, batch: int, precision: str, activation_checkpointing: bool,
                      attention_kernel: str) -> tuple[int, int, int]:
    """(saved, recompute, gradients) for a batch: saved at the end of the forward pass; one layer's
    recomputed internals (checkpointing); the activation gradients alive on top at the backward's peak."""
    act = 2 if precision == "bf16" else _FP32
    n, layer = shapes.tokens, shapes.layer
    residual, internals = _layer_bytes(layer, batch, n, act, attention_kernel)
    per_layer = residual if activation_checkpointing else residual + internals
    saved = shapes.repeated(_block_outside_bytes(shapes.block, batch, n, act), per_layer)
    saved += _FP32 * batch * n * shapes.block.token_dim  # the loss keeps z
    recompute = internals if activation_checkpointing else 0
    # the widest step of a layer's backward, GELU's: the gradient of the residual stream (fp32) and those
    # of GELU's output and input (activation dtype), less mlp_out's saved input, freed once mlp_out's
    # backward has run: one MLP-wide tensor on top
    grads = batch * n * (_FP32 * layer.qkv.in_features + act * layer.mlp_in.out_features)
    return saved, recompute, grads


def _state_bytes(shapes: _Shapes) -> dict[str, int]:
    def nbytes(module, adam=False):  # AdamW: two moments like the parameter and a 0-d fp32 step count
        return sum((3 if adam else 1) * p.numel() * p.element_size() + (4 if adam else 0)
                   for p in module.parameters())

    params = shapes.repeated(nbytes(shapes.block), nbytes(shapes.layer))
    with_adam = shapes.repeated(nbytes(shapes.block, adam=True), nbytes(shapes.layer, adam=True))
    buffers = _FP32 * shapes.tokens * shapes.block.token_dim  # TarFlow's one buffer: the prior variance (N, D)
    return {"params": params + buffers, "gradients": params, "optimizer": with_adam - params}


def _linear_numel(shapes: _Shapes) -> int:
    def linear(module):
        return sum(p.numel() for m in module.modules() if isinstance(m, nn.Linear) for p in m.parameters())

    return shapes.repeated(linear(shapes.block), linear(shapes.layer))


def training_memory(config: TarFlowConfig, batch_size: int, precision: str = "fp32",
                    activation_checkpointing: bool = False, ema: bool = False, grad_accum_steps: int = 1,
                    ddp: bool = False, attention_kernel: str = "flash") -> dict[str, int]:
    """Bytes per GPU that one training step of eager PyTorch holds at its peak.

    batch_size: images per GPU per optimizer step; with grad_accum_steps = k the activations are those of
    batch_size / k images. ddp: DistributedDataParallel's gradient buckets (a second fp32 copy of the
    gradients, unless gradient_as_bucket_view=True). Keys:

    params       weights and buffers (fp32; bf16 autocast keeps fp32 masters)
    gradients    one fp32 gradient per parameter
    optimizer    AdamW: two fp32 moments per parameter and a step count per tensor
    ema          an EMA copy of the weights and buffers (when ema)
    ddp_buckets  DDP's flat gradient buckets (when ddp)
    weight_casts bf16 copies of every Linear's weight and bias that autocast keeps during the forward
    activations  what autograd has saved for backward at the end of the forward pass, parameters and
                 their bf16 copies excluded (those are above)
    transient    what the backward pass holds on top at its peak: one layer's activation gradients,
                 and with checkpointing one layer's recomputed internals
    total        the sum: the figure to compare with torch.cuda.max_memory_allocated
    """
    _check(precision, attention_kernel)
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    if grad_accum_steps < 1 or batch_size % grad_accum_steps:
        raise ConfigError(f"batch_size={batch_size} is not divisible by grad_accum_steps={grad_accum_steps}")
    shapes = _shapes(config)
    state = _state_bytes(shapes)
    saved, recompute, grads = _activation_bytes(shapes, batch_size // grad_accum_steps, precision,
                                                activation_checkpointing, attention_kernel)
    out = {
        **state,
        "ema": state["params"] if ema else 0,
        "ddp_buckets": state["gradients"] if ddp else 0,
        "weight_casts": 2 * _linear_numel(shapes) if precision == "bf16" else 0,
        "activations": saved,
        "transient": recompute + grads,
    }
    out["total"] = sum(out.values())
    return out


# What torch.save adds per tensor beyond its bytes: the zip record of its storage (header, name, padding to
# 64-byte alignment, central directory entry) and the pickled rebuild call with its key; measured on
# tarflow.save_checkpoint files (about 300 bytes per tensor, tests/test_cost.py holds the total to ±5%)
TENSOR_RECORD_BYTES = 300
CHECKPOINT_HEADER_BYTES = 8 * 1024  # the configs, step and extras pickled beside the tensors


def checkpoint_bytes(config: TarFlowConfig, ema: bool = False) -> int:
    """Bytes of the file tarflow.save_checkpoint writes for this model once AdamW has stepped: the fp32
    weights and the prior buffer, AdamW's two fp32 moments and step count per parameter, an EMA copy of the
    weights and buffer (when ema), and torch.save's per-tensor records. Independent of the batch and the
    precision (autocast keeps fp32 weights and moments)."""
    shapes = _shapes(config)
    state = _state_bytes(shapes)
    weights = state["params"]  # parameters and the prior buffer, as the state_dict holds them
    num_params = shapes.repeated(len(list(shapes.block.parameters())), len(list(shapes.layer.parameters())))
    tensors = (num_params + 1) * (2 if ema else 1) + 3 * num_params  # state_dicts; exp_avg, exp_avg_sq, step
    return (weights * (2 if ema else 1) + state["optimizer"] + tensors * TENSOR_RECORD_BYTES
            + CHECKPOINT_HEADER_BYTES)


def recompute_flops_per_image(config: TarFlowConfig) -> float:
    """FLOPs activation checkpointing adds per training image: one more forward of every transformer
    layer (the projections outside the layers are not recomputed). Forward FLOPs grow linearly in the
    layers per block, so doubling them isolates the layers' share."""
    doubled = dataclasses.replace(config, layers_per_block=2 * config.layers_per_block)
    return doubled.flops_per_image() - config.flops_per_image()


# ---------------------------------------------------------------------------------------------
# Planning


@dataclass(frozen=True)
class FitOption:
    """One way to make training fit: the config overrides it implies and what it costs."""

    overrides: dict             # e.g. {"train.grad_accum_steps": 4, "train.activation_checkpointing": True}
    per_gpu_bytes: int          # training_memory(...)["total"] + CUDA_OVERHEAD_BYTES, with the changes
    extra_compute: float        # training FLOPs added, as a fraction (checkpointing: the recompute)
    num_workers: int            # GPUs needed (the global batch stays the same)
    changes_numerics: bool      # bf16 autocast where the config asked for fp32
    description: str            # one line, for a dry run to print


@dataclass(frozen=True)
class FitPlan:
    """Whether a training config fits a GPU, and if not, the cheapest changes that do (options, cheapest
    first; empty when it fits, or when nothing does: even one image per micro-batch is too much)."""

    fits: bool
    per_gpu_bytes: int          # needed as configured: tensors + CUDA_OVERHEAD_BYTES
    budget_bytes: int           # what may be used: headroom × gpu_memory_bytes
    memory: dict                # training_memory(...) as configured
    options: list = field(default_factory=list)

    def summary(self) -> str:
        head = (f"GPU memory: {self.per_gpu_bytes / GiB:.1f} GiB per GPU needed, {self.budget_bytes / GiB:.1f} GiB "
                f"usable: {'fits' if self.fits else 'does NOT fit'}")
        parts = ", ".join(f"{k} {v / GiB:.1f}" for k, v in self.memory.items() if v and k != "total")
        lines = [head, f"  ({parts} GiB; + {CUDA_OVERHEAD_BYTES / GiB:.1f} GiB CUDA context and buffers)"]
        if not self.fits:
            lines += [f"  option {i + 1}: {o.description}" for i, o in enumerate(self.options)]
            if not self.options:
                lines.append("  nothing fits: even the weights, gradients and optimizer state with one image per "
                             "micro-batch exceed the budget (would need sharded training)")
        return "\n".join(lines)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def plan_fit(config: TarFlowConfig, per_gpu_batch: int, gpu_memory_bytes: int, precision: str = "fp32",
             ema: bool = False, num_workers: int = 1, activation_checkpointing: bool = False,
             grad_accum_steps: int = 1, headroom: float = 0.9, attention_kernel: str = "flash") -> FitPlan:
    """Does training fit in gpu_memory_bytes per GPU, and if not, what is the cheapest change that does?

    The configuration: per_gpu_batch images per GPU per optimizer step on num_workers GPUs (the global
    batch is their product), in precision, with the given knobs. It fits when training_memory's total plus
    CUDA_OVERHEAD_BYTES is at most headroom × gpu_memory_bytes (the headroom leaves room for the caching
    allocator's fragmentation). DDP buckets are counted when num_workers > 1.

    When it does not fit, the options change as few of these as possible (single changes; combinations
    only when no single change fits), each at its smallest setting that fits:
      - train.grad_accum_steps: the smallest k > current dividing the per-GPU batch; the same gradients
        and no extra FLOPs, only smaller micro-batches (a GPU runs them less efficiently when small);
      - train.activation_checkpointing: the same gradients for one more forward of every layer
        (recompute_flops_per_image over flops_per_image(training=True), about +30%);
      - cluster.num_workers: the fewest GPUs (dividing the global batch) that fit, global batch unchanged;
      - train.precision bf16 (only from fp32): changes the numerics; the paper trains its likelihood (BPD)
        models in fp32.
    Options are ordered by cost: numerics changed last, then more GPUs, then extra compute, then the
    accumulation steps.
    """
    _check(precision, attention_kernel)
    if num_workers < 1 or per_gpu_batch < 1:
        raise ConfigError(f"need num_workers >= 1 and per_gpu_batch >= 1, got {num_workers}, {per_gpu_batch}")
    if not 0 < headroom <= 1:
        raise ConfigError(f"headroom must lie in (0, 1], got {headroom}")
    search = _FitSearch(config, per_gpu_batch * num_workers, num_workers, grad_accum_steps, activation_checkpointing,
                        precision, ema, attention_kernel, int(headroom * gpu_memory_bytes))
    current = search.memory(activation_checkpointing, grad_accum_steps, num_workers, precision)
    plan = FitPlan(fits=search.need(current) <= search.budget, per_gpu_bytes=search.need(current),
                   budget_bytes=search.budget, memory=current)
    if plan.fits:
        return plan
    knobs = ["grad_accum_steps"]
    if not activation_checkpointing:
        knobs.append("activation_checkpointing")
    knobs.append("num_workers")
    if precision == "fp32":
        knobs.append("bf16")
    options = []
    for size in range(1, len(knobs) + 1):  # single changes first, combinations only when none fits
        options = [o for changed in itertools.combinations(knobs, size) if (o := search.cheapest(changed))]
        if options:
            break
    options.sort(key=lambda o: (o.changes_numerics, o.num_workers, o.extra_compute,
                                o.overrides.get("train.grad_accum_steps", grad_accum_steps)))
    return dataclasses.replace(plan, options=options)


@dataclass(frozen=True)
class _FitSearch:
    """plan_fit's configuration, and the search for the cheapest setting of a set of changed knobs."""

    config: TarFlowConfig
    global_batch: int
    num_workers: int
    grad_accum_steps: int
    activation_checkpointing: bool
    precision: str
    ema: bool
    attention_kernel: str
    budget: int

    def memory(self, ckpt: bool, k: int, workers: int, precision: str) -> dict:
        return training_memory(self.config, self.global_batch // workers, precision, ckpt, self.ema, k,
                               ddp=workers > 1, attention_kernel=self.attention_kernel)

    @staticmethod
    def need(memory: dict) -> int:
        return memory["total"] + CUDA_OVERHEAD_BYTES

    @functools.cached_property
    def recompute_share(self) -> float:
        return recompute_flops_per_image(self.config) / self.config.flops_per_image(training=True)

    def cheapest(self, changed: tuple[str, ...]) -> FitOption | None:
        """The smallest setting of the changed knobs that fits: fewest GPUs first, then fewest
        accumulation steps; None when none does."""
        ckpt = self.activation_checkpointing or "activation_checkpointing" in changed
        precision = "bf16" if "bf16" in changed else self.precision
        worker_choices = ([w for w in range(self.num_workers + 1, self.global_batch + 1) if self.global_batch % w == 0]
                          if "num_workers" in changed else [self.num_workers])
        for workers in worker_choices:
            batch = self.global_batch // workers
            ks = ([k for k in _divisors(batch) if k > self.grad_accum_steps] if "grad_accum_steps" in changed
                  else [self.grad_accum_steps] if batch % self.grad_accum_steps == 0 else [])
            for k in ks:
                memory = self.memory(ckpt, k, workers, precision)
                if self.need(memory) <= self.budget:
                    return self.option(changed, k, workers, memory)
        return None

    def option(self, changed: tuple[str, ...], k: int, workers: int, memory: dict) -> FitOption:
        """The FitOption of a setting that fits: its overrides and a one-line description."""
        batch = self.global_batch // workers
        overrides, words = {}, []
        if "grad_accum_steps" in changed:
            overrides["train.grad_accum_steps"] = k
            words.append(f"gradient accumulation over {k} micro-batches of {batch // k}")
        if "activation_checkpointing" in changed:
            overrides["train.activation_checkpointing"] = True
            words.append(f"activation checkpointing (+{self.recompute_share:.0%} training FLOPs)")
        if "num_workers" in changed:
            overrides["cluster.num_workers"] = workers
            words.append(f"{workers} GPUs instead of {self.num_workers} ({batch} images per GPU, global batch "
                         f"{self.global_batch} unchanged)")
        if "bf16" in changed:
            overrides["train.precision"] = "bf16"
            words.append("bf16 autocast instead of fp32 (changes the numerics)")
        need = self.need(memory)
        return FitOption(overrides=overrides, per_gpu_bytes=need,
                         extra_compute=self.recompute_share if "activation_checkpointing" in changed else 0.0,
                         num_workers=workers, changes_numerics="bf16" in changed,
                         description=f"{' + '.join(words)}: {need / GiB:.1f} GiB per GPU of "
                                     f"{self.budget / GiB:.1f} usable")


__all__ = ["CUDA_OVERHEAD_BYTES", "GPU_MEMORY", "FitOption", "FitPlan", "checkpoint_bytes", "plan_fit",
           "recompute_flops_per_image", "training_memory"]
