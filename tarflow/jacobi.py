"""Parallel (Jacobi) inversion of TarFlow's flow blocks.

Inverting one block means solving x_i = z_i·exp(α_i(x_<i)) + μ_i(x_<i) for i = 1..N−1 (x_0 = z_0).
`FlowBlock.reverse` does it token by token: N−1 network calls on one token each. Jacobi iteration
instead evaluates α, μ of all tokens at once from the current guess and updates every token in
parallel: x ← z·exp(α(x)) + μ(x). Because the system is triangular, iteration k makes token k exact,
so at most N−1 iterations solve it exactly; trained blocks typically need far fewer (GS-Jacobi, Liu &
Qin 2025, arXiv 2505.12849). Blocks that converge slowly can be split into segments solved in order
(Gauss-Seidel over segments, Jacobi within one), with the keys and values of finished segments kept
in a cache, or handed to the sequential sampler. A `JacobiPlan` says which block gets what; a short
calibration run (`plan_jacobi`) chooses it from the iteration counts and measured times.

Guidance, annealed guidance, attention temperature and the VP variant are exactly those of
`FlowBlock.reverse`, so at a tight tolerance the two agree to rounding (tests/test_jacobi.py).

Reading order: the network on a chunk of tokens with a prefix cache, one block (its plan, its
diagnostics, the solver), the whole model, the calibration that makes a plan.
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .model import FlowBlock, TarFlow, TransformerLayer, at_least_fp32

INITS = ("z", "zeros")  # initial guess of the unsolved tokens: the block's input, or zeros
DEFAULT_TOL = 1e-3      # largest |update| of a settled token; see benchmarks/README.md for the choice


# ---------------------------------------------------------------------------------------------
# The network on a chunk of tokens


def layer_chunk(layer: TransformerLayer, h: torch.Tensor, start: int, kv: torch.Tensor | None,
                q_scale: torch.Tensor | None, mask: torch.Tensor | None = None) -> torch.Tensor:
    """TransformerLayer.forward on the tokens at positions start..start+L−1, attending causally to
    themselves and to the keys/values already in `kv` at positions < start. h: (B', L, Ch).

    kv: (2, B', H, N, 64) cache of this layer, or None (then start must be 0). The chunk's own keys
    and values are written into it at start..start+L−1, where later chunks find them. q_scale:
    (B', 1, 1, 1) per-row multiplier of the logits (attention temperature). mask: `prefix_mask`.
    """
    B, L, Ch = h.shape
    q, k, v = layer._heads(layer.attn_norm(h))
    if q_scale is not None:
        q = q * q_scale.to(q.dtype)
    end = start + L
    if kv is not None:
        kv[0, :, :, start:end] = k
        kv[1, :, :, start:end] = v
        if start:
            k, v = kv[0, :, :, :end], kv[1, :, :, :end]
    if start:
        mask = prefix_mask(start, L, h.device) if mask is None else mask
        a = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask)
    else:
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    h = h + layer.attn_proj(a.transpose(1, 2).reshape(B, L, Ch))
    return h + layer._mlp(h)


def prefix_mask(start: int, length: int, device: torch.device) -> torch.Tensor:
    """(L, start+L) causal mask aligned at the bottom right: query j (position start+j) sees keys
    0..start+j. (is_causal=True aligns at the top left when there are more keys than queries.)"""
    end = start + length
    return torch.arange(end, device=device) <= torch.arange(start, end, device=device)[:, None]


@dataclass
class BlockInputs:
    """What every network call of one block's inverse shares (precomputed once per block)."""

    pos: torch.Tensor              # (N, Ch) positional embedding in the block's order, + proj_in bias
    cls: torch.Tensor              # (G, B, 1, Ch) class (or no-class) embedding per branch, or zeros
    q_scale: torch.Tensor | None   # (G·B, 1, 1, 1) attention temperature of the uncond rows, or None
    guidance: float
    annealed: bool
    G: int


def block_inputs(block: FlowBlock, B: int, y: torch.Tensor | None, guidance: float, attn_temp: float,
                 annealed: bool, dtype: torch.dtype, device: torch.device) -> BlockInputs:
    guided = guidance != 0
    G = 2 if guided else 1
    width = block.pos_embed.shape[1]

    def embed(labels):
        c = block.condition(labels, B)
        return c if torch.is_tensor(c) else block.pos_embed.new_zeros(B, 1, width)

    cls = torch.stack([embed(y), embed(None)] if guided else [embed(y)])
    pos = block.permute(block.pos_embed[None])[0] + block.proj_in.bias
    q_scale = None
    if guided and attn_temp != 1.0:  # logits/τ == (q/τ)·k: only the unconditional rows
        q_scale = torch.ones(G * B, 1, 1, 1, dtype=dtype, device=device)
        q_scale[B:] /= attn_temp
    return BlockInputs(pos, cls, q_scale, guidance, annealed, G)


def chunk_params(block: FlowBlock, inp: BlockInputs, x: torch.Tensor, start: int,
                 cache: list[torch.Tensor] | None) -> torch.Tensor:
    """The guided network outputs computed from the tokens x at positions start..start+L−1: they are
    the parameters of tokens start+1..start+L. x: (B, L, D) -> (B, L, 2D) ([α | μ]; μ only for VP)."""
    B, L, _ = x.shape
    h = F.linear(x, block.proj_in.weight)[None] + inp.pos[start:start + L] + inp.cls  # (G, B, L, Ch)
    h = h.reshape(inp.G * B, L, -1)
    mask = prefix_mask(start, L, x.device) if start else None
    for k, layer in enumerate(block.layers):
        h = layer_chunk(layer, h, start, None if cache is None else cache[k], inp.q_scale, mask)
    out = F.linear(h, block.proj_out.weight, block.proj_out.bias)
    if inp.G == 1:
        return out
    out = out.view(2, B, L, -1)
    N = inp.pos.shape[0]
    if inp.annealed:  # token j gets w·j/(N−1), as the sequential sampler's step j−1 gives it
        j = torch.arange(start + 1, start + L + 1, device=x.device, dtype=out.dtype)
        weight = (1 + inp.guidance * j / (N - 1))[:, None]
    else:
        weight = 1 + inp.guidance
    return torch.lerp(out[1], out[0], weight)  # (1+w)·cond − w·uncond


# ---------------------------------------------------------------------------------------------
# One block


@dataclass
class BlockStats:
    """What inverting one block cost. Indices are the model's block indices (sampling runs T−1..0)."""

    block: int
    mode: str                    # "jacobi", "sequential" (as planned) or "fallback" (Jacobi gave up)
    tokens_per_forward: int      # N: a full-sequence forward's worth of tokens
    iterations: list[int] = field(default_factory=list)  # Jacobi iterations per segment (before any fallback)
    forwards: int = 0            # network calls, however many tokens each (sequential: N−1)
    tokens: int = 0              # query tokens through the network, per image and branch
    seconds: float = 0.0
    reason: str = ""             # why it fell back

    @property
    def nfe(self) -> float:
        """Network evaluations in full-sequence-forward equivalents (tokens / N). Sequential ≈ 1."""
        return self.tokens / self.tokens_per_forward


@dataclass(frozen=True)
class BlockPlan:
    """How to invert one block: Jacobi over segments of its tokens 1..N−1, or the sequential sampler.

    bounds (1, b_1, ..., N) are segments [1, b_1), [b_1, b_2), ... solved in order; None is one
    segment. init is the first guess of the unsolved tokens: "z" (the block's input) or "zeros".
    """

    bounds: tuple[int, ...] | None = None
    init: str = "z"
    sequential: bool = False

    def segments(self, N: int) -> list[tuple[int, int]]:
        b = self.bounds or (1, N)
        pairs = list(itertools.pairwise(b))
        if b[0] != 1 or b[-1] != N or any(lo >= hi for lo, hi in pairs):
            raise ValueError(f"BlockPlan.bounds must rise strictly from 1 to N={N}, got {b}")
        return pairs

    def describe(self) -> str:
        if self.sequential:
            return "sequential"
        n = len(self.bounds) - 1 if self.bounds else 1
        return f"jacobi init={self.init}" + (f" {n} segments" if n > 1 else "")


def even_bounds(N: int, segments: int) -> tuple[int, ...]:
    """BlockPlan.bounds splitting tokens 1..N−1 into `segments` runs of nearly equal length."""
    segments = max(1, min(segments, N - 1))
    return tuple(1 + round(s * (N - 1) / segments) for s in range(segments + 1))


@torch.inference_mode()
def jacobi_block_reverse(block: FlowBlock, z: torch.Tensor, y: torch.Tensor | None = None, guidance: float = 0.0,
                         annealed: bool = False, attn_temp: float = 1.0, tol: float = DEFAULT_TOL,
                         max_iters: int | None = None, plan: BlockPlan | None = None, cache_prefix: bool = True,
                         stats: BlockStats | None = None) -> torch.Tensor:
    """Inverse of one block by Jacobi iteration, segment after segment. z: (B, N, D) spatial order,
    as FlowBlock.reverse takes it; returns x in spatial order.

    Within a segment every iteration updates all unsettled tokens at once from the current guess.
    Tokens settle front to back: a token is frozen once its largest |update| (over the batch and its
    values) and those of all tokens before it are <= tol, or once it is exact (iteration k makes the
    k-th unsettled token exact, whatever tol is). The next iteration feeds the network only the
    unsettled tokens, attending to the frozen ones through the KV cache, so a segment of L tokens
    costs at most L iterations and L(L+1)/2 token evaluations. With cache_prefix=False every
    iteration recomputes the whole prefix instead (same result, for measuring what the cache saves).

    Gives up, and the whole block is inverted by FlowBlock.reverse, when an update is non-finite,
    when the largest update grows three iterations running, or when max_iters iterations of one
    segment pass unsettled; `stats` records which.
    """
    plan = plan or BlockPlan()
    B, N, D = z.shape
    stats = stats if stats is not None else BlockStats(-1, "jacobi", N)
    stats.mode = "jacobi"
    if plan.sequential:
        return _sequential(block, z, y, guidance, annealed, attn_temp, stats, "sequential")
    if plan.init not in INITS:
        raise ValueError(f"BlockPlan.init must be one of {INITS}, got {plan.init!r}")
    zb = block.permute(z)
    x = zb.clone() if plan.init == "z" else torch.cat([zb[:, :1], torch.zeros_like(zb[:, 1:])], 1)
    inp = block_inputs(block, B, y, guidance, attn_temp, annealed, z.dtype, z.device)
    cache = _prefix_cache(block, inp.G * B, z) if cache_prefix else None
    for a, b in plan.segments(N):
        failure = _solve_segment(block, inp, zb, x, a, b, cache, tol, max_iters, stats)
        if failure:
            return _sequential(block, z, y, guidance, annealed, attn_temp, stats, "fallback", failure)
    return block.permute(x)


def _prefix_cache(block: FlowBlock, rows: int, z: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Per layer, an empty (2, rows, H, N, 64) key/value cache in the dtype the layers emit (bf16 under
    autocast)."""
    layer0 = block.layers[0]
    dev = z.device.type
    dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else z.dtype
    return torch.empty(len(block.layers), 2, rows, layer0.num_heads, z.shape[1], layer0.head_dim, dtype=dtype,
                       device=z.device).unbind(0)


def _solve_segment(block: FlowBlock, inp: BlockInputs, zb: torch.Tensor, x: torch.Tensor, a: int, b: int,
                   cache: tuple[torch.Tensor, ...] | None, tol: float, max_iters: int | None,
                   stats: BlockStats) -> str | None:
    """Jacobi iteration over tokens a..b−1 of x (this block's order), written into x in place. Returns None
    once they have settled, else why it gave up (the caller then inverts the block sequentially)."""
    D = zb.shape[2]
    lo = a - 1  # tokens <= lo are settled; inputs lo..b−2 give the parameters of tokens lo+1..b−1
    prev, grew, it = math.inf, 0, 0
    while lo < b - 1:
        if max_iters is not None and it == max_iters:
            stats.iterations.append(it)
            return f"segment [{a}, {b}): {b - 1 - lo} tokens unsettled after max_iters={max_iters}"
        it += 1
        start = lo if cache is not None else 0
        out = chunk_params(block, inp, x[:, start:b - 1], start, cache)[:, lo - start:]
        stats.forwards += 1
        stats.tokens += b - 1 - start
        zs = zb[:, lo + 1:b]
        if block.nvp:
            new = torch.addcmul(out[..., D:].to(x.dtype), zs, torch.exp(at_least_fp32(out[..., :D])).to(x.dtype))
        else:
            new = zs + out.to(x.dtype)
        upd = (new - x[:, lo + 1:b]).abs().amax(dim=(0, 2))  # per token; NaN propagates
        x[:, lo + 1:b] = new
        # one sync: how many leading tokens settled (NaN counts as unsettled), and the largest update
        unsettled = torch.cat([~(upd <= tol), upd.new_ones(1, dtype=torch.bool)])
        settled, delta = torch.stack([unsettled.int().argmax().to(upd.dtype), upd.max()]).tolist()
        grew = grew + 1 if delta > prev else 0
        prev = delta
        if not math.isfinite(delta) or grew >= 3:
            stats.iterations.append(it)
            why = "non-finite update" if not math.isfinite(delta) else "largest update grew 3 iterations running"
            return f"segment [{a}, {b}) iteration {it}: {why}"
        lo += max(1, int(settled))  # token lo+1 was computed from settled tokens only: exact
    stats.iterations.append(it)
    return None


def _sequential(block, z, y, guidance, annealed, attn_temp, stats, mode, reason=""):
    stats.mode, stats.reason = mode, reason
    stats.forwards += z.shape[1] - 1
    stats.tokens += z.shape[1] - 1
    # contiguous: FlowBlock.reverse writes into its input when that is already token-major (N, B, D) memory
    return block.reverse(z.contiguous(), y, guidance, annealed, attn_temp)


# ---------------------------------------------------------------------------------------------
# The whole model


@dataclass
class JacobiPlan:
    """One BlockPlan per flow block (indexed like model.blocks), made once and reused for every batch.

    calibration: what plan_jacobi measured and predicted per block (model index -> option -> figures).
    """

    blocks: list[BlockPlan]
    calibration: dict[int, dict[str, dict]] = field(default_factory=dict)
    cost: CostModel | None = None  # the timings plan_jacobi fitted

    @classmethod
    def uniform(cls, num_blocks: int, block: BlockPlan | None = None) -> JacobiPlan:
        return cls([block or BlockPlan()] * num_blocks)

    def describe(self) -> str:
        return "; ".join(f"block {t}: {p.describe()}" for t, p in reversed(list(enumerate(self.blocks))))


@dataclass
class JacobiStats:
    """Diagnostics of one jacobi_reverse call."""

    blocks: list[BlockStats]     # in sampling order (block T−1 first)
    seconds: float = 0.0

    @property
    def nfe(self) -> float:
        """Full-sequence-forward equivalents over all blocks (the sequential sampler: ≈ T)."""
        return sum(b.nfe for b in self.blocks)

    @property
    def forwards(self) -> int:
        """Network calls in a row over all blocks (the sequential sampler: T·(N−1))."""
        return sum(b.forwards for b in self.blocks)

    @property
    def fallbacks(self) -> list[int]:
        """Blocks where Jacobi gave up and the sequential sampler took over."""
        return [b.block for b in self.blocks if b.mode == "fallback"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def jacobi_reverse(model: TarFlow, z: torch.Tensor, y: torch.Tensor | None = None, guidance: float = 0.0,
                   annealed_guidance: bool = False, attn_temp: float = 1.0, tol: float = DEFAULT_TOL,
                   max_iters: int | None = None, plan: JacobiPlan | None = None,
                   cache_prefix: bool = True) -> tuple[torch.Tensor, JacobiStats]:
    """TarFlow.reverse by Jacobi iteration: noise (B, C, H, W) -> (images, JacobiStats).

    guidance, annealed_guidance, attn_temp: as TarFlow.reverse. tol: largest |update| at which a
    token counts as solved, on the scale of the block's tokens (the [−1, 1] data scale for the last
    block sampled). max_iters: iterations per segment before Jacobi gives up on a block (None: no
    limit; a segment of L tokens is exact after L). plan: from plan_jacobi; default, every block
    one segment with initial guess z.
    """
    model.check_input(z, y)
    h = model.patchify(z) * model.prior_var.sqrt().to(z.dtype)
    plan = plan or JacobiPlan.uniform(len(model.blocks))
    if len(plan.blocks) != len(model.blocks):
        raise ValueError(f"plan has {len(plan.blocks)} blocks, the model {len(model.blocks)}")
    N = model.config.num_tokens
    stats = JacobiStats([])
    _sync(z.device)
    t_all = time.perf_counter()
    for t in reversed(range(len(model.blocks))):
        s = BlockStats(t, "jacobi", N)
        t0 = time.perf_counter()
        h = jacobi_block_reverse(model.blocks[t], h, y, guidance, annealed_guidance, attn_temp, tol, max_iters,
                                 plan.blocks[t], cache_prefix, s)
        _sync(z.device)
        s.seconds = time.perf_counter() - t0
        stats.blocks.append(s)
    stats.seconds = time.perf_counter() - t_all
    return model.unpatchify(h), stats  # outside inference mode: a normal tensor


# ---------------------------------------------------------------------------------------------
# Calibration


SEQUENTIAL_PREFERENCE = 1.05  # Jacobi must beat the sequential sampler's predicted time by 5% to be chosen


@dataclass
class CostModel:
    """Seconds to invert one block of a batch: sequential, or Jacobi as per_forward·forwards +
    per_token·tokens (network calls, and query tokens per image and branch, as BlockStats counts them)."""

    sequential: float
    per_forward: float
    per_token: float

    def predict(self, figures: dict, N: int) -> float:
        if figures["mode"] == "sequential":
            return self.sequential
        forwards, tokens = figures["forwards"], figures["tokens"]
        extra = 0.0
        if figures["mode"] == "fallback":  # the counts include the sequential steps that followed
            forwards, tokens, extra = forwards - (N - 1), tokens - (N - 1), self.sequential
        return self.per_forward * forwards + self.per_token * tokens + extra

    @classmethod
    def fit(cls, sequential: list[float], jacobi: list[tuple[int, int, float]]) -> CostModel:
        """Median sequential time; least squares over (forwards, tokens, seconds) of the Jacobi runs
        that converged, coefficients kept >= 0."""
        def lstsq(cols):
            A = torch.tensor([[r[c] for c in cols] for r in jacobi], dtype=torch.float64)
            sol = torch.linalg.lstsq(A, torch.tensor([r[2] for r in jacobi], dtype=torch.float64)[:, None]).solution
            return sol[:, 0].tolist()

        per_forward = per_token = 0.0
        if jacobi:
            per_forward, per_token = lstsq([0, 1])
            if per_forward < 0 or per_token < 0:  # noise: keep the one term that explains the times
                per_forward, per_token = (0.0, max(lstsq([1])[0], 0.0)) if per_forward < 0 else (
                    max(lstsq([0])[0], 0.0), 0.0)
        return cls(sorted(sequential)[len(sequential) // 2], per_forward, per_token)


@torch.no_grad()
def plan_jacobi(model: TarFlow, z: torch.Tensor, y: torch.Tensor | None = None, guidance: float = 0.0,
                annealed_guidance: bool = False, attn_temp: float = 1.0, tol: float = DEFAULT_TOL,
                max_iters: int | None = None, segments: tuple[int, ...] = (2, 4, 8), inits: tuple[str, ...] = INITS,
                repeats: int = 2) -> JacobiPlan:
    """Choose, per block, the fastest way to invert it, from one calibration batch.

    Use a batch like those to be sampled (same size, device, guidance and tol): the answer depends
    on them. Per block, in sampling order, it runs the sequential sampler (which also supplies the
    exact input of the next block and the reference for each option's error), Jacobi in one segment
    with each initial guess in `inits`, then the better guess (fewer token evaluations; GS-Jacobi's
    initial guessing) with the block split into each number of `segments`, and counts each option's
    network calls and token evaluations. The counts do not depend on the machine; the time per call
    and per token does, so a CostModel is fitted to all the runs' timings at once (best of `repeats`
    each), which is far steadier on a busy machine than comparing single timings. The option with
    the least predicted time wins; Jacobi must beat sequential by SEQUENTIAL_PREFERENCE. Costs about
    (2 + len(inits) + len(segments))·repeats inversions of the batch.
    """
    model.check_input(z, y)
    h = model.patchify(z) * model.prior_var.sqrt().to(z.dtype)
    N = model.config.num_tokens
    measured: dict[int, dict[BlockPlan, dict]] = {}

    for t in reversed(range(len(model.blocks))):
        args = (model.blocks[t], h, y, guidance, annealed_guidance, attn_temp, tol, max_iters)
        exact, seq = _timed_block(t, N, args, BlockPlan(sequential=True), repeats)
        options = measured[t] = {BlockPlan(sequential=True): seq}
        candidates = [BlockPlan(init=i) for i in inits]
        for bp in candidates:
            options[bp] = _timed_block(t, N, args, bp, repeats, exact)[1]
        converged = [bp for bp in candidates if options[bp]["mode"] == "jacobi"]
        init = min(converged, key=lambda bp: options[bp]["tokens"]).init if converged else inits[0]
        for n in segments:
            bounds = even_bounds(N, n)
            if 2 < len(bounds) < N:  # a real split, and not one token per segment (that is sequential)
                bp = BlockPlan(bounds, init)
                options[bp] = _timed_block(t, N, args, bp, repeats, exact)[1]
        h = exact

    cost = CostModel.fit([o[BlockPlan(sequential=True)]["seconds"] for o in measured.values()],
                         [(f["forwards"], f["tokens"], f["seconds"]) for o in measured.values() for f in o.values()
                          if f["mode"] == "jacobi"])
    chosen, table = [None] * len(model.blocks), {}
    for t, options in measured.items():
        for f in options.values():
            f["predicted"] = cost.predict(f, N)
        score = {bp: f["predicted"] * (1 if bp.sequential else SEQUENTIAL_PREFERENCE) for bp, f in options.items()}
        chosen[t] = min(score, key=score.get)
        table[t] = {bp.describe(): f for bp, f in options.items()}
    return JacobiPlan(chosen, table, cost)


def _timed_block(t: int, N: int, args: tuple, bp: BlockPlan, repeats: int,
                 exact: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """Invert one block `repeats` times with plan bp: (result, figures with the best time)."""
    device = args[1].device
    best = math.inf
    for _ in range(repeats):
        s = BlockStats(t, "jacobi", N)
        _sync(device)
        t0 = time.perf_counter()
        x = jacobi_block_reverse(*args, plan=bp, stats=s)
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    figures = {"seconds": best, "mode": s.mode, "iterations": s.iterations, "forwards": s.forwards,
               "tokens": s.tokens, "nfe": s.nfe, "reason": s.reason}
    if exact is not None:
        figures["max_err"] = (x - exact).abs().max().item()
    return x, figures
