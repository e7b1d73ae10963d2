"""Jacobi (parallel) inversion against the sequential KV-cached sampler, on a model trained at smoke scale.

    python benchmarks/bench_sampling.py [--checkpoint PATH ...] [--arch 4-64-2-2 --arch 2-64-4-2]
        [--steps 600] [--batch 64,4] [--tols 1e-2,1e-3,1e-4] [--plan-tol 1e-3] [--guidance 2]
        [--device cpu|cuda] [--bf16] [--repeats 3] [--threads N]

Jacobi's speed depends on trained weights (random blocks barely contract), so without --checkpoint the
script trains each --arch on Fashion-MNIST 16×16 (4096 images, class-conditional, σ=0.05, lr 1e-3,
batch 64, 600 steps) with tarflow.train_step and caches the checkpoint under --cache-dir. For every
model and batch size it samples the same noise with every sampler, unguided and guided (w=2, annealed;
attn_temp 0.9 for an unconditional checkpoint), and prints images/s, network calls, network evaluations
per block, Jacobi iterations, fallbacks, the max |pixel difference| to the sequential samples and the
share of uint8 pixels that differ, then the calibrated plan. Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import tarflow  # noqa: E402
from tarflow.data import DataConfig, load_dataset, to_uint8  # noqa: E402
from tarflow.jacobi import DEFAULT_TOL, even_bounds  # noqa: E402


def train_model(arch: str, steps: int, cache_dir: Path, classes: int = 10, batch: int = 64, lr: float = 1e-3,
                noise_std: float = 0.05, seed: int = 0) -> Path:
    """Train `arch` on Fashion-MNIST 16×16 at smoke scale (or reuse the cached checkpoint); returns its path."""
    path = cache_dir / f"fmnist16-{arch}-c{classes}-s{steps}-b{batch}-lr{lr:g}-seed{seed}.pt"
    if path.is_file():
        return path
    data = load_dataset(DataConfig(name="fashion_mnist", image_size=16, fit="resize", limit=4096))
    torch.manual_seed(seed)
    model = tarflow.TarFlow(tarflow.TarFlowConfig.from_string(f"{arch}-{noise_std:g}", image_size=16, in_channels=1,
                                                              num_classes=classes))
    state = tarflow.make_train_state(model, tarflow.TrainConfig(lr=lr, total_steps=steps, warmup_steps=steps // 20,
                                                                noise_std=noise_std))
    loader = torch.utils.data.DataLoader(data, batch_size=batch, shuffle=True, drop_last=True,
                                         generator=torch.Generator().manual_seed(seed))
    t0, done = time.perf_counter(), 0
    while done < steps:
        for x, y in loader:
            m = tarflow.train_step(state, x, y if classes else None)
            done += 1
            if done % 100 == 0 or done == steps:
                print(f"  [train {arch}] step {done}/{steps} loss {m['loss']:.3f} ({time.perf_counter() - t0:.0f}s)",
                      flush=True)
            if done == steps:
                break
    return tarflow.save_checkpoint(path, state)


def load_model(path: Path, device: str) -> tarflow.TarFlow:
    return tarflow.model_from_checkpoint(tarflow.load_checkpoint(path)).to(device).eval()


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


HEADER = (f"  {'sampler':30s} {'tol':>6s} {'img/s':>8s} {'vs seq':>7s} {'forwards':>8s}  {'NFE per block':24s} "
          f"{'iterations per block':28s} {'fallback':>8s} {'max|dx|':>8s} {'uint8 !=':>8s}")


def row(label: str, tol: str, ips: float, base_ips: float, forwards: str, nfe: str, iters: str, fallbacks: str,
        diff: str, changed: str) -> str:
    return (f"  {label:30s} {tol:>6s} {ips:8.1f} {ips / base_ips:6.2f}x {forwards:>8s}  {nfe:24s} {iters:28s} "
            f"{fallbacks:>8s} {diff:>8s} {changed:>8s}")


def describe_case(guidance: float, annealed: bool, attn_temp: float) -> str:
    if not guidance:
        return "unguided"
    return f"guided w={guidance:g}" + (" annealed" if annealed else "") + (
        f" attn_temp={attn_temp:g}" if attn_temp != 1 else "")


def bench_case(model: tarflow.TarFlow, title: str, B: int, guidance: float, annealed: bool, attn_temp: float,
               tols: list[float], plan_tol: float, device: str, repeats: int, bf16: bool, seed: int = 0) -> None:
    """Sequential vs Jacobi on the same noise, one table: one segment per block; the plan that
    plan_jacobi calibrates at plan_tol on another batch of the same size, reused at every tol; and
    4 segments per block with and without the prefix KV cache (at plan_tol)."""
    c = model.config
    N, T = c.num_tokens, c.num_blocks
    gen = torch.Generator().manual_seed(seed)
    shape = (B, c.in_channels, c.image_size, c.image_size)
    z = torch.randn(shape, generator=gen).to(device)
    z_cal = torch.randn(shape, generator=gen).to(device)  # calibration batch: other noise, same size
    y = (torch.arange(B) % c.num_classes).to(device) if c.num_classes else None
    mode = (guidance, annealed, attn_temp)

    def autocast():
        return torch.autocast(device, dtype=torch.bfloat16, enabled=bf16)

    def jacobi(tol, **kw):
        return lambda: tarflow.jacobi_reverse(model, z, y, *mode, tol=tol, **kw)

    t0 = time.perf_counter()
    with autocast():
        plan = tarflow.plan_jacobi(model, z_cal, y, *mode, tol=plan_tol)
    plan_seconds = time.perf_counter() - t0
    runners = {("sequential", None): lambda: (model.reverse(z, y, *mode), None)}
    for tol in tols:
        runners[("jacobi, one segment", tol)] = jacobi(tol)
        runners[("jacobi, calibrated plan", tol)] = jacobi(tol, plan=plan)
    seg4 = tarflow.JacobiPlan.uniform(T, tarflow.BlockPlan(even_bounds(N, 4)))
    runners[("jacobi, 4 segments, cache", plan_tol)] = jacobi(plan_tol, plan=seg4)
    runners[("jacobi, 4 segments, recompute", plan_tol)] = jacobi(plan_tol, plan=seg4, cache_prefix=False)

    outputs, times = {}, {k: [] for k in runners}
    for k, f in runners.items():  # warm-up, and the samples to compare
        with autocast():
            outputs[k] = f()
    order = list(runners)
    shuffle = random.Random(seed)
    for _ in range(repeats):  # interleaved in a new order each time, so background load hits every sampler alike
        shuffle.shuffle(order)
        for k in order:
            sync(device)
            t0 = time.perf_counter()
            with autocast():
                runners[k]()
            sync(device)
            times[k].append(time.perf_counter() - t0)

    ref = outputs[("sequential", None)][0].float()
    ref_u8 = to_uint8(ref.clamp(-1, 1))
    base = B / min(times[("sequential", None)])
    print(f"\n{title}: batch {B}, {describe_case(*mode)}")
    print(HEADER)
    for (label, tol), (x, stats) in outputs.items():
        ips = B / min(times[(label, tol)])
        if stats is None:
            seq_nfe = " ".join([f"{(N - 1) / N:4.2f}"] * T)
            print(row(label, "-", ips, base, str(T * (N - 1)), seq_nfe, "-", "-", "-", "-"))
            continue
        nfe = " ".join(f"{b.nfe:4.1f}" for b in stats.blocks)
        iters = " ".join("seq" if b.mode == "sequential" else "+".join(map(str, b.iterations))
                         + ("!" if b.mode == "fallback" else "") for b in stats.blocks)
        diff = (x.float() - ref).abs().max().item()
        changed = (to_uint8(x.float().clamp(-1, 1)) != ref_u8).float().mean().item()
        print(row(label, f"{tol:g}", ips, base, str(stats.forwards), nfe, iters,
                  ",".join(map(str, stats.fallbacks)) or "-", f"{diff:.1e}", f"{changed:.3%}"))
    cost = plan.cost
    print(f"  plan, calibrated at tol {plan_tol:g} in {plan_seconds:.1f}s: {plan.describe()}")
    print(f"    fitted time per block: sequential {cost.sequential * 1e3:.1f} ms; Jacobi "
          f"{cost.per_forward * 1e3:.2f} ms per network call + {cost.per_token * 1e3:.3f} ms per token position "
          "(whole batch)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, action="append", default=[],
                   help="a tarflow.save_checkpoint file (repeatable); default: train --arch at smoke scale")
    p.add_argument("--arch", action="append", default=None, help="P-Ch-T-K to train (repeatable; default 4-64-2-2 "
                   "and 2-64-4-2)")
    p.add_argument("--steps", type=int, default=600, help="training steps per model")
    p.add_argument("--cache-dir", type=Path, default=Path(tempfile.gettempdir()) / "tarflow-bench-cache")
    p.add_argument("--batch", default="64,4", help="comma-separated batch sizes")
    p.add_argument("--tols", default="1e-2,1e-3,1e-4", help="comma-separated Jacobi tolerances")
    p.add_argument("--plan-tol", type=float, default=DEFAULT_TOL, help="tolerance of the calibrated plan")
    p.add_argument("--guidance", type=float, default=2.0, help="weight of the guided case (annealed)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast for both samplers")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    tols = [float(t) for t in args.tols.split(",")]
    batches = [int(b) for b in args.batch.split(",")]

    paths = list(args.checkpoint)
    if not paths:
        for arch in args.arch or ["4-64-2-2", "2-64-4-2"]:
            paths.append(train_model(arch, args.steps, args.cache_dir))
    print(f"{args.device}, {'bf16 autocast' if args.bf16 else 'fp32'}, threads {torch.get_num_threads()}, "
          f"torch {torch.__version__}; best of {args.repeats} timings; img/s of the inverse alone (no noise draw, "
          "no denoising); forwards = network calls in a row; NFE = tokens through the network / N")
    for path in paths:
        model = load_model(path, args.device)
        c = model.config
        title = f"{c.name} {c.image_size}x{c.image_size}x{c.in_channels}, {c.num_tokens} tokens, " \
                f"{c.num_classes} classes ({path.name})"
        cases = [(0.0, False, 1.0), (args.guidance, True, 1.0) if c.num_classes else (args.guidance, True, 0.9)]
        for B in batches:
            for case in cases:
                bench_case(model, title, B, *case, tols, args.plan_tol, args.device, args.repeats, args.bf16)


if __name__ == "__main__":
    main()
