"""TarFlow: a normalizing flow made of causal-transformer autoregressive blocks over image patches.

Zhai et al., "Normalizing Flows are Capable Generative Models" (arXiv 2412.06329). Where the paper
and the authors' reference code differ we follow the code (see ../shared/docs/tarflow-paper.md).

Reading order: attention and MLP, one transformer layer, one flow block (forward and the KV-cached
inverse step), the config dataclass, then the model.

Shapes: B batch, N tokens (patches), D = C·P² values per token, Ch width, H heads of 64.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


class ConfigError(ValueError):
    """A model configuration or input that cannot work, with the offending value named."""


def at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    """exp and log-det sums in fp32 even under bf16 autocast; fp64 stays fp64 (for exactness tests)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


# ---------------------------------------------------------------------------------------------
# Building blocks


class TransformerLayer(nn.Module):
    """Pre-LayerNorm attention + 4×MLP with GELU. The caller supplies the causal structure."""

    def __init__(self, width: int, head_dim: int, mlp_ratio: int = 4):
        super().__init__()
        self.num_heads = width // head_dim
        self.head_dim = head_dim
        self.attn_norm = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.attn_proj = nn.Linear(width, width)
        self.mlp_norm = nn.LayerNorm(width)
        self.mlp_in = nn.Linear(width, mlp_ratio * width)
        self.mlp_out = nn.Linear(mlp_ratio * width, width)

    def _heads(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # (B, T, 3·Ch) -> three (B, H, T, 64); q, k, v are contiguous thirds of the qkv output
        # unbind, not qkv[0], qkv[1], qkv[2]: its backward is one stack, where three selects would
        # each write their gradient into a zeroed copy of the whole qkv tensor
        B, T, Ch = h.shape
        b = self.qkv.bias
        # the key bias adds q·b to every logit of a query's row, which softmax ignores: its gradient is zero in exact
        # arithmetic, and Adam would turn the rounding noise of that zero into lr-sized steps that differ with the
        # world size, the batch split and the hardware. Detached, it gets an exact zero (weight decay still acts).
        bias = torch.cat([b[:Ch], b[Ch : 2 * Ch].detach(), b[2 * Ch :]])
        q, k, v = F.linear(h, self.qkv.weight, bias).view(B, T, 3, self.num_heads, self.head_dim).permute(
            2, 0, 3, 1, 4).unbind(0)
        return q, k, v

    def _mlp(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp_out(F.gelu(self.mlp_in(self.mlp_norm(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Whole sequence with a causal mask (diagonal included). x: (B, N, Ch)."""
        B, N, Ch = x.shape
        q, k, v = self._heads(self.attn_norm(x))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.attn_proj(a.transpose(1, 2).reshape(B, N, Ch))
        return x + self._mlp(x)

    def step_weights(self) -> tuple[torch.Tensor, ...]:
        """The tensors `step` uses, gathered once per inverse: a submodule call or parameter lookup
        through nn.Module costs microseconds, as much as the small ops of one step themselves."""
        return (self.attn_norm.weight, self.attn_norm.bias, self.qkv.weight, self.qkv.bias,
                self.attn_proj.weight, self.attn_proj.bias, self.mlp_norm.weight, self.mlp_norm.bias,
                self.mlp_in.weight, self.mlp_in.bias, self.mlp_out.weight, self.mlp_out.bias)

    def step(self, x: torch.Tensor, cache: KVCache, layer: int, pos: int, q_scale: float | torch.Tensor,
             weights: tuple[torch.Tensor, ...] | None = None) -> torch.Tensor:
        """One new token per row at position `pos`, attending to the cached keys 0..pos. x: (B', Ch).

        q_scale multiplies the queries: 1/√64, or a (B', 1, 1, 1) tensor for a per-row attention
        temperature (logits/τ == (q/τ)·k). weights: `step_weights()`, passed in by a caller that
        loops. The sampler spends its time here, T·(N−1) times per batch, on matrices a few rows
        tall, so per-op overhead matters as much as FLOPs: 2-D activations (no sequence dim),
        functional calls instead of submodule calls, and attention as two bmm over contiguous
        cache views, which on CPU beats scaled_dot_product_attention's dispatch for one query.
        Same arithmetic as forward() (F.layer_norm's eps is nn.LayerNorm's 1e-5), so the inverse is exact.
        """
        n1w, n1b, w_qkv, b_qkv, w_o, b_o, n2w, n2b, w_1, b_1, w_2, b_2 = weights or self.step_weights()
        B, Ch = x.shape
        H, hd = self.num_heads, self.head_dim
        qkv = F.linear(F.layer_norm(x, (Ch,), n1w, n1b), w_qkv, b_qkv)  # (B', 3·Ch) = [q | k | v]
        cache.write(layer, pos, qkv[:, Ch:])
        q = (qkv[:, :Ch].view(B, H, 1, hd) * q_scale).view(B * H, 1, hd)  # the multiply also makes q contiguous
        k, v = cache.keys[layer][:, : pos + 1], cache.values[layer][:, : pos + 1]  # (B'·H, pos+1, 64)
        a = torch.bmm(torch.softmax(torch.bmm(q, k.transpose(1, 2)), dim=-1), v).view(B, Ch)
        x = x + F.linear(a, w_o, b_o)
        return x + F.linear(F.gelu(F.linear(F.layer_norm(x, (Ch,), n2w, n2b), w_1, b_1)), w_2, b_2)


class KVCache:
    """Keys and values of every layer of one flow block, preallocated for the whole sequence.

    Stored as (layers, 2, B', H, N, 64) so that, per layer, the keys (and values) of one (row, head)
    are a contiguous (N, 64) matrix: `keys[l]` / `values[l]` are (B'·H, N, 64) views that attention
    slices to 0..pos without copying (the reference concatenates growing lists every step instead).
    """

    def __init__(self, layers: int, batch: int, heads: int, length: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device):
        self.kv = torch.empty(layers, 2, batch, heads, length, head_dim, dtype=dtype, device=device)
        flat = self.kv.view(layers, 2, batch * heads, length, head_dim)
        self.keys, self.values = flat[:, 0].unbind(0), flat[:, 1].unbind(0)
        self._layers = self.kv.unbind(0)  # (2, B', H, N, 64) each

    def write(self, layer: int, pos: int, kv: torch.Tensor) -> None:
        """Store the new token's [k | v] (B', 2·Ch) at position pos: one strided copy."""
        dst = self._layers[layer].select(3, pos)  # (2, B', H, 64)
        dst.copy_(kv.view(dst.shape[1], 2, dst.shape[2], dst.shape[3]).transpose(0, 1))


class FlowBlock(nn.Module):
    """One autoregressive affine flow over the token sequence, in its own token order.

    z_i = (x_i − μ_i(x_<i))·exp(−α_i(x_<i)); token 0 passes through (μ = α = 0).
    """

    def __init__(self, tokens: int, token_dim: int, width: int, layers: int, head_dim: int,
                 num_classes: int, nvp: bool, reverse_order: bool):
        super().__init__()
        self.token_dim = token_dim
        self.nvp = nvp
        self.reverse_order = reverse_order
        self.proj_in = nn.Linear(token_dim, width)
        # indexed by spatial token: it is permuted together with the input
        self.pos_embed = nn.Parameter(torch.randn(tokens, width) * 1e-2)
        self.class_embed = nn.Parameter(torch.randn(num_classes, width) * 1e-2) if num_classes else None
        self.layers = nn.ModuleList(TransformerLayer(width, head_dim) for _ in range(layers))
        self.proj_out = nn.Linear(width, (2 if nvp else 1) * token_dim)
        nn.init.zeros_(self.proj_out.weight)  # every block starts as the identity map

    def permute(self, x: torch.Tensor) -> torch.Tensor:
        """Spatial order <-> this block's order along dim 1 (an involution)."""
        return x.flip(1) if self.reverse_order else x

    def condition(self, y: torch.Tensor | None, batch: int) -> torch.Tensor | int:
        """Class embedding added to every token: (B, 1, Ch), or 0. Label −1 (or y=None) = no class."""
        if self.class_embed is None:
            return 0
        null = self.class_embed.mean(0)
        if y is None:
            return null.expand(batch, 1, -1)
        emb = self.class_embed[y.clamp(min=0)]
        return torch.where((y < 0)[:, None], null, emb)[:, None, :]

    def split_params(self, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # first D outputs are α (log-scale), last D are μ; the VP variant has μ only
        if self.nvp:
            return out[..., : self.token_dim], out[..., self.token_dim :]
        return torch.zeros_like(out), out

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (B, N, D) tokens in spatial order -> z (B, N, D) in spatial order, logdet (B,)."""
        x = self.permute(x)
        alpha, mu = self.params(x, y)
        z = (x - mu) * torch.exp(-at_least_fp32(alpha)).to(x.dtype)
        return self.permute(z), -at_least_fp32(alpha).sum(dim=(1, 2))

    checkpoint_layers = False  # set through TarFlow.set_activation_checkpointing

    def params(self, x: torch.Tensor, y: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """α, μ of every token from the whole sequence at once. x: (B, N, D) in this block's order."""
        h = self.proj_in(x) + self.permute(self.pos_embed[None]) + self.condition(y, x.shape[0])
        # Activation checkpointing keeps only each layer's input and recomputes its internals in the
        # backward pass; only while training with autograd on (evaluation and sampling run plainly).
        # The layers draw no random numbers, so there is no RNG state to stash and restore.
        recompute = self.checkpoint_layers and self.training and torch.is_grad_enabled()
        for layer in self.layers:
            h = checkpoint(layer, h, use_reentrant=False, preserve_rng_state=False) if recompute else layer(h)
        out = self.proj_out(h)
        # shift right: the parameters of token i come from tokens < i only
        out = torch.cat([torch.zeros_like(out[:, :1]), out[:, :-1]], dim=1)
        return self.split_params(out)

    @torch.inference_mode()  # not just no_grad: skipping autograd's dispatch saves ~4% of sampling time
    def reverse(self, z: torch.Tensor, y: torch.Tensor | None, guidance: float, annealed: bool,
                attn_temp: float) -> torch.Tensor:
        """Inverse, one token at a time with a preallocated KV cache. z: (B, N, D), spatial order.

        With guidance the conditional and the unconditional branch run as one batch of B' = 2B rows,
        [cond; uncond], sharing the token projection. Only the unconditional rows' attention logits
        are divided by attn_temp (as in the reference). z is not modified. The result is an
        inference tensor (no in-place updates outside inference mode); TarFlow.reverse returns a
        normal one.
        """
        B, N, D = z.shape
        guided = guidance != 0
        G = 2 if guided else 1
        # Token-major (N, B, D) copy: the token read (x[i]) and the token written (x[i+1]) are
        # contiguous (B, D) slabs, updated in place.
        # a copy even when z is already token-major (contiguous() would then return z itself, written in place)
        x = self.permute(z).transpose(0, 1).clone(memory_format=torch.contiguous_format)
        width = self.pos_embed.shape[1]

        def embed(labels):  # (B, Ch) class (or no-class) embedding of one branch
            c = self.condition(labels, B)
            return c[:, 0] if torch.is_tensor(c) else self.pos_embed.new_zeros(B, width)

        # Everything added to x_i·W_in, precomputed once for all positions and both branches:
        # position + proj_in bias + class, (N, G, B, Ch). The step then costs one mm and one add.
        branches = torch.stack([embed(y), embed(None)] if guided else [embed(y)])
        bias = (self.permute(self.pos_embed[None])[0] + self.proj_in.bias)[:, None, None] + branches
        layer0 = self.layers[0]
        q_scale = layer0.head_dim ** -0.5
        if guided and attn_temp != 1.0:
            q_scale = torch.full((G * B, 1, 1, 1), q_scale, dtype=bias.dtype, device=bias.device)
            q_scale[B:] /= attn_temp
        # Under autocast the layers emit bf16 k/v: cache them as such, so attention reads no casts.
        dev = x.device.type
        cache_dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
        cache = KVCache(len(self.layers), G * B, layer0.num_heads, N, layer0.head_dim, cache_dtype, x.device)
        w_in = self.proj_in.weight.t()
        w_out, b_out = self.proj_out.weight, self.proj_out.bias
        layers = [(k, layer, layer.step_weights()) for k, layer in enumerate(self.layers)]
        for i in range(N - 1):
            h = torch.add(bias[i], torch.mm(x[i], w_in)).view(G * B, width)  # token shared by both branches
            for k, layer, weights in layers:
                h = layer.step(h, cache, k, i, q_scale, weights)
            out = F.linear(h, w_out, b_out)
            if guided:
                w = guidance * (i + 1) / (N - 1) if annealed else guidance
                out = out.view(2, B, -1)
                out = torch.lerp(out[1], out[0], 1 + w)  # (1+w)·cond − w·uncond, in one op
            nxt = x[i + 1]
            if self.nvp:  # x_{i+1} = z_{i+1}·exp(α) + μ, written in place with one fused op
                scale = torch.exp(at_least_fp32(out[:, :D])).to(x.dtype)
                torch.addcmul(out[:, D:].to(x.dtype), nxt, scale, out=nxt)
            else:  # VP: α = 0
                nxt += out
        return self.permute(x.transpose(0, 1))


# ---------------------------------------------------------------------------------------------
# Configuration


@dataclass
class TarFlowConfig:
    """The single source of a model's shape. Paper notation: P-Ch-T-K(-σ)."""

    image_size: int = 64
    in_channels: int = 3
    patch_size: int = 2
    width: int = 768
    num_blocks: int = 8
    layers_per_block: int = 8
    num_classes: int = 0
    nvp: bool = True
    head_dim: int = 64
    noise_std: float | None = None  # the σ of a P-Ch-T-K-σ name; a training setting kept with the model

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        def positive(name):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ConfigError(f"TarFlowConfig.{name} must be a positive integer, got {v!r}")

        for name in ("image_size", "in_channels", "patch_size", "width", "num_blocks", "layers_per_block", "head_dim"):
            positive(name)
        if self.num_classes < 0:
            raise ConfigError(f"TarFlowConfig.num_classes must be >= 0, got {self.num_classes}")
        if self.image_size % self.patch_size:
            raise ConfigError(
                f"patch_size={self.patch_size} does not divide image_size={self.image_size}: "
                f"choose a patch size that divides it (or pad/resize the images to a multiple of {self.patch_size})")
        if self.width % self.head_dim:
            raise ConfigError(f"width={self.width} is not a multiple of the attention head dim {self.head_dim}")
        if self.num_tokens < 2:
            raise ConfigError(f"patch_size={self.patch_size} leaves a single token for image_size={self.image_size}; "
                              "an autoregressive flow needs at least 2")
        if self.noise_std is not None and self.noise_std < 0:
            raise ConfigError(f"noise_std must be >= 0, got {self.noise_std}")

    @property
    def num_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def token_dim(self) -> int:
        return self.in_channels * self.patch_size**2

    @property
    def name(self) -> str:
        """The paper's P-Ch-T-K(-σ) name."""
        s = f"{self.patch_size}-{self.width}-{self.num_blocks}-{self.layers_per_block}"
        return s if self.noise_std is None else f"{s}-{self.noise_std:g}"

    @classmethod
    def from_string(cls, spec: str, **kwargs) -> TarFlowConfig:
        """Parse 'P-Ch-T-K' or 'P-Ch-T-K-σ' (e.g. '2-768-8-8-0.05'); other fields from kwargs."""
        m = re.fullmatch(r"\s*(\d+)-(\d+)-(\d+)-(\d+)(?:-([0-9.eE+-]+))?\s*", spec)
        if not m:
            raise ConfigError(f"cannot parse model name {spec!r}: expected P-Ch-T-K or P-Ch-T-K-sigma, "
                              "e.g. '2-768-8-8-0.05'")
        p, ch, t, k, sigma = m.groups()
        values = dict(patch_size=int(p), width=int(ch), num_blocks=int(t), layers_per_block=int(k))
        if sigma is not None:
            values["noise_std"] = float(sigma)
        clash = set(values) & set(kwargs)
        if clash:
            raise ConfigError(f"{sorted(clash)} given both in {spec!r} and as keyword arguments")
        return cls(**values, **kwargs)

    @classmethod
    def from_reference(cls, ref: dict) -> TarFlowConfig:
        """From the authors' argument names (img_size, channels, num_blocks, ...)."""
        return cls(image_size=ref["img_size"], in_channels=ref["in_channels"], patch_size=ref["patch_size"],
                   width=ref["channels"], num_blocks=ref["num_blocks"], layers_per_block=ref["layers_per_block"],
                   num_classes=ref.get("num_classes", 0) or 0, nvp=ref.get("nvp", True))

    def flops_per_image(self, training: bool = False) -> float:
        """Matmul FLOPs of one full-sequence forward pass of one image (×3 for forward+backward when
        training): projections, qkv/out/MLP linears and the two attention matmuls (causal mask not
        discounted). Elementwise ops, norms and softmax are not counted."""
        n, d, w = self.num_tokens, self.token_dim, self.width
        per_layer = 2 * n * w * 3 * w + 2 * 2 * n * n * w + 2 * n * w * w + 2 * 2 * n * w * 4 * w
        per_block = 2 * n * d * w + self.layers_per_block * per_layer + 2 * n * w * (2 if self.nvp else 1) * d
        fwd = self.num_blocks * per_block
        return float(3 * fwd if training else fwd)

    def to_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------------------------------------
# The model


class TarFlow(nn.Module):
    def __init__(self, config: TarFlowConfig):
        super().__init__()
        config.validate()
        self.config = config
        c = config
        self.blocks = nn.ModuleList(
            FlowBlock(c.num_tokens, c.token_dim, c.width, c.layers_per_block, c.head_dim, c.num_classes, c.nvp,
                      reverse_order=t % 2 == 1)
            for t in range(c.num_blocks))
        # Prior variance per token value: ones for the affine model, learned (running mean of z²) for VP
        self.register_buffer("prior_var", torch.ones(c.num_tokens, c.token_dim))

    # -- layout ------------------------------------------------------------------------------

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, N, D): P×P patches in raster order, values channel-major."""
        return F.unfold(x, self.config.patch_size, stride=self.config.patch_size).transpose(1, 2)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        c = self.config
        return F.fold(x.transpose(1, 2), (c.image_size, c.image_size), c.patch_size, stride=c.patch_size)

    def check_input(self, x: torch.Tensor, y: torch.Tensor | None) -> None:
        c = self.config
        want = (c.in_channels, c.image_size, c.image_size)
        if x.dim() != 4 or tuple(x.shape[1:]) != want:
            raise ConfigError(f"expected images of shape (B, {want[0]}, {want[1]}, {want[2]}), got {tuple(x.shape)}")
        if y is None:
            return
        if c.num_classes == 0:
            raise ConfigError("labels were given to an unconditional model (num_classes=0)")
        if y.shape != (x.shape[0],):
            raise ConfigError(f"labels must have shape ({x.shape[0]},), got {tuple(y.shape)}")
        if y.numel() and (int(y.max()) >= c.num_classes or int(y.min()) < -1):
            raise ConfigError(f"label out of range: labels must lie in [0, {c.num_classes - 1}] "
                              f"(or -1 for 'no class'), got min {int(y.min())}, max {int(y.max())}")

    # -- flow ----------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Data -> noise. x: (B, C, H, W) -> z (B, C, H, W), logdet (B,) = log|det ∂z/∂x| in nats."""
        self.check_input(x, y)
        h = self.patchify(x)
        logdet = 0
        for block in self.blocks:
            h, ld = block(h, y)
            logdet = logdet + ld
        return self.unpatchify(h), logdet

    @torch.no_grad()
    def reverse(self, z: torch.Tensor, y: torch.Tensor | None = None, guidance: float = 0.0,
                annealed_guidance: bool = False, attn_temp: float = 1.0) -> torch.Tensor:
        """Noise -> data with a KV cache: T·(N−1) sequential steps.

        Classifier-free guidance on α and μ: p̃ = (1+w)·p_cond − w·p_uncond, where "uncond" is the
        no-class embedding and attention logits divided by attn_temp. With annealed_guidance the
        weight ramps as w·(i+1)/(N−1) over positions, restarting in every block.
        """
        self.check_input(z, y)
        h = self.patchify(z) * self.prior_var.sqrt().to(z.dtype)
        for block in reversed(self.blocks):
            h = block.reverse(h, y, guidance, annealed_guidance, attn_temp)
        return self.unpatchify(h)  # outside inference mode: a normal tensor, free to update in place

    def prior_log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """log N(z; 0, prior_var) per sample, constant included. z: (B, C, H, W) -> (B,)."""
        zs = self.patchify(at_least_fp32(z))
        var = self.prior_var.to(zs.dtype)
        return -0.5 * (zs.pow(2) / var + torch.log(2 * math.pi * var)).sum(dim=(1, 2))

    def log_prob(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Exact log-density of x in nats per sample (B,)."""
        z, logdet = self(x, y)
        return self.prior_log_prob(z) + logdet

    @torch.no_grad()
    def update_prior(self, z: torch.Tensor, rate: float = 0.1,
                     all_reduce_mean: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        """VP variant only: running estimate of the prior variance, lerped towards the per-token second moment
        of a batch of z. all_reduce_mean (under DDP) averages that moment over the ranks first, as the
        reference does, so every rank holds the same prior (equal batches per rank)."""
        if self.config.nvp:
            return
        second_moment = self.patchify(at_least_fp32(z)).pow(2).mean(0)
        if all_reduce_mean is not None:
            second_moment = all_reduce_mean(second_moment)
        self.prior_var.lerp_(second_moment.to(self.prior_var.dtype), rate)

    def set_activation_checkpointing(self, enabled: bool) -> None:
        """Recompute each transformer layer in the backward pass instead of keeping its activations
        (training only): saves most of the activation memory for about one extra forward's FLOPs."""
        for block in self.blocks:
            block.checkpoint_layers = bool(enabled)

    # -- accounting ------------------------------------------------------------------------------

    def flops_per_image(self, training: bool = False) -> float:
        """Matmul FLOPs of one forward pass (×3 for forward+backward when training); see TarFlowConfig."""
        return self.config.flops_per_image(training)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # -- the authors' checkpoints ----------------------------------------------------------------

    _REFERENCE_KEYS = [  # (ours, theirs) inside blocks.{t}
        ("proj_in.weight", "proj_in.weight"), ("proj_in.bias", "proj_in.bias"),
        ("pos_embed", "pos_embed"), ("proj_out.weight", "proj_out.weight"), ("proj_out.bias", "proj_out.bias"),
    ]
    _REFERENCE_LAYER_KEYS = [  # (ours, theirs) inside blocks.{t}.layers.{k} / blocks.{t}.attn_blocks.{k}
        ("attn_norm", "attention.norm"), ("qkv", "attention.qkv"), ("attn_proj", "attention.proj"),
        ("mlp_norm", "mlp.norm"), ("mlp_in", "mlp.main.0"), ("mlp_out", "mlp.main.2"),
    ]

    def reference_key_map(self) -> dict[str, str]:
        """Our state_dict key -> the key in the authors' checkpoint layout."""
        keys = {"prior_var": "var"}
        for t, block in enumerate(self.blocks):
            for ours, theirs in self._REFERENCE_KEYS:
                keys[f"blocks.{t}.{ours}"] = f"blocks.{t}.{theirs}"
            if block.class_embed is not None:
                keys[f"blocks.{t}.class_embed"] = f"blocks.{t}.class_embed"
            for k in range(len(block.layers)):
                for ours, theirs in self._REFERENCE_LAYER_KEYS:
                    for p in ("weight", "bias"):
                        keys[f"blocks.{t}.layers.{k}.{ours}.{p}"] = f"blocks.{t}.attn_blocks.{k}.{theirs}.{p}"
        return keys

    @classmethod
    def from_reference(cls, state_dict: dict, config: TarFlowConfig | dict) -> TarFlow:
        """Load a checkpoint in the authors' layout (see ../shared/docs/reference-checkpoint.md)."""
        if isinstance(config, dict):
            config = TarFlowConfig.from_reference(config) if "img_size" in config else TarFlowConfig(**config)
        model = cls(config)
        ours = model.state_dict()
        mapped = {}
        for key, ref_key in model.reference_key_map().items():
            if ref_key not in state_dict:
                raise KeyError(f"reference checkpoint has no {ref_key!r} (needed for {config.name}, "
                               f"num_classes={config.num_classes}, nvp={config.nvp})")
            t = state_dict[ref_key]
            if key.endswith("class_embed"):
                t = t.reshape(t.shape[0], -1)  # theirs is (n, 1, Ch)
            if t.shape != ours[key].shape:
                raise ValueError(f"{ref_key}: shape {tuple(t.shape)} in the checkpoint, {tuple(ours[key].shape)} "
                                 f"expected for config {config}")
            mapped[key] = t
        model.load_state_dict(mapped)
        return model

    def to_reference(self) -> dict[str, torch.Tensor]:
        """Our weights in the authors' layout (inverse of from_reference)."""
        sd = self.state_dict()
        out = {}
        for key, ref_key in self.reference_key_map().items():
            t = sd[key]
            out[ref_key] = t[:, None, :] if key.endswith("class_embed") else t
        n = self.config.num_tokens
        for t in range(len(self.blocks)):
            out[f"blocks.{t}.attn_mask"] = torch.tril(torch.ones(n, n))
        return out


__all__ = ["ConfigError", "KVCache", "FlowBlock", "TransformerLayer", "TarFlowConfig", "TarFlow"]
