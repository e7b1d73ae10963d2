"""Will the paper's configs train on this GPU, how fast, and does tarflow.memory predict the memory?

    python benchmarks/bench_gpu.py                       # cuda: the paper's 2-768-8-8 @64² and 4-1024-8-8 @128²
    python benchmarks/bench_gpu.py --tiny                # cpu (or --device cpu): 2-64-2-2 @16², seconds
    python benchmarks/bench_gpu.py --sections train,sample --table2-batch 32 --imagenet128-batch 24

Sections (run in this order; --sections picks some):
  attention  which scaled_dot_product_attention kernel runs by default at the training shapes, and the
             forward+backward time of each kernel that is available there
  train      a few training steps (tarflow.train_step: noise, forward, backward, AdamW) per config in bf16,
             tf32 (fp32 with TF32 matmuls, CUDA only) and fp32, with the knobs tarflow.plan_fit picks for this
             device's memory: images/s, MFU against the device's peak for that precision, peak memory beside
             training_memory's estimate
  sample     guided sampling images/s: model.reverse(z, y, guidance=2.0, annealed_guidance=True), bf16
  compile    the train section's bf16 runs again under torch.compile

The per-GPU batches default to the paper's global batches over 8 and 32 GPUs: table2 256 / 8 = 32,
ImageNet 128 768 / 32 = 24 (the YAMLs train table2 on 16 GPUs, 16 each: --table2-batch 16). Every run is
independent: an out-of-memory error (or any other) is reported and the script goes on; once --budget-s
seconds have passed the remaining runs are skipped. Prints figures, a summary table at the end and the
images/s per GPU of every training run as the override the dry run's cost model takes
(cluster.images_per_sec_per_gpu, valid for that precision, batch and knobs); asserts nothing.
"""

from __future__ import annotations

import argparse
import functools
import gc
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tarflow import TarFlow, TarFlowConfig, TrainConfig, make_train_state, plan_fit, train_step, training_memory  # noqa: E402
from tarflow.memory import GiB, recompute_flops_per_image  # noqa: E402

# Dense peak TFLOP/s by device name (first match): bf16, tf32, fp32 (no tensor cores)
PEAK_TFLOPS = [
    ("H200", {"bf16": 989.0, "tf32": 494.7, "fp32": 66.9}),
    ("H100 PCIe", {"bf16": 756.0, "tf32": 378.0, "fp32": 51.2}),
    ("H100", {"bf16": 989.0, "tf32": 494.7, "fp32": 66.9}),  # SXM
    ("A100", {"bf16": 312.0, "tf32": 156.0, "fp32": 19.5}),
]

SECTIONS = ("attention", "train", "sample", "compile")


@dataclass
class Bench:
    name: str
    config: TarFlowConfig
    batch: int


@dataclass
class Row:
    section: str
    bench: str
    precision: str
    knobs: str = ""
    images_per_s: float | None = None
    mfu: float | None = None
    hfu: float | None = None
    peak_gib: float | None = None
    estimate_gib: float | None = None
    status: str = "ok"


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def free(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


PRECISIONS = ("bf16", "tf32", "fp32")  # tf32: fp32 weights and activations, TF32 matmuls (train.tf32=true)
# what each precision is in an experiment's config, for the cost model's override line
CONFIG_OF = {"bf16": "train.precision=bf16 (or auto with Gaussian noise)",
             "tf32": "train.precision=fp32 train.tf32=true", "fp32": "train.precision=fp32 (or auto with uniform "
                                                                      "noise), train.tf32=false"}


def memory_precision(precision: str) -> str:
    return "bf16" if precision == "bf16" else "fp32"  # TF32 changes the matmuls, not what is stored


@functools.cache
def peak_tflops(device: str, precision: str, repeats: int = 3) -> tuple[float, str]:
    """(peak FLOP/s, where it came from): the known table for this GPU, else a measured large matmul."""
    if device == "cuda":
        name = torch.cuda.get_device_name()
        for key, peaks in PEAK_TFLOPS:
            if key in name:
                return peaks[precision] * 1e12, f"{name} {precision} dense peak (table)"
    n = 8192 if device == "cuda" else 1024
    dtype = torch.bfloat16 if precision == "bf16" and device == "cuda" else torch.float32
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
    a @ b
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best, f"measured {n}² {str(dtype).removeprefix('torch.')} matmul"


def memory_total(device: str) -> int:
    if device == "cuda":
        return torch.cuda.get_device_properties(0).total_memory
    return 64 * GiB  # no accelerator: a notional budget, so that plan_fit has something to say


def pick_knobs(args, bench: Bench, precision: str, device_memory: int) -> tuple[bool, int, str]:
    """(activation checkpointing, grad accumulation steps, what was chosen and why)."""
    if args.knobs != "auto":
        ckpt = "ckpt" in args.knobs
        accum = next((int(p[5:]) for p in args.knobs.split("+") if p.startswith("accum")), 1)
        return ckpt, accum, f"--knobs {args.knobs}"
    plan = plan_fit(bench.config, bench.batch, device_memory, memory_precision(precision))
    if plan.fits:
        return False, 1, "fits as is"
    for option in plan.options:  # on one GPU at a fixed precision only these two knobs apply
        if set(option.overrides) <= {"train.grad_accum_steps", "train.activation_checkpointing"}:
            return (option.overrides.get("train.activation_checkpointing", False),
                    option.overrides.get("train.grad_accum_steps", 1), f"plan_fit: {option.description}")
    raise RuntimeError(f"plan_fit finds no knob that fits {bench.name} in {precision} on one GPU:\n{plan.summary()}")


def knob_text(ckpt: bool, accum: int) -> str:
    return "+".join(([f"accum{accum}"] if accum > 1 else []) + (["ckpt"] if ckpt else [])) or "none"


def batch_of(bench: Bench, n: int, device: str):
    c = bench.config
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n, c.in_channels, c.image_size, c.image_size), generator=g) / 127.5 - 1
    y = torch.randint(0, max(c.num_classes, 1), (n,), generator=g) if c.num_classes else None
    return x.to(device), (y.to(device) if y is not None else None)


def run_training(args, bench: Bench, precision: str, compiled: bool, device_memory: int) -> Row:
    device = args.device
    section = "compile" if compiled else "train"
    row = Row(section, bench.name, precision)
    free(device)
    ckpt, accum, why = pick_knobs(args, bench, precision, device_memory)
    row.knobs = knob_text(ckpt, accum)
    est = training_memory(bench.config, bench.batch, memory_precision(precision), activation_checkpointing=ckpt,
                          grad_accum_steps=accum)
    row.estimate_gib = est["total"] / GiB
    print(f"\n[{section}] {bench.name} {bench.config.name} @{bench.config.image_size}², batch {bench.batch}/GPU, "
          f"{precision}{', torch.compile' if compiled else ''}; knobs {row.knobs} ({why})")
    unit, scale = ("GiB", GiB) if est["total"] > GiB else ("MiB", 2**20)
    print(f"  estimate ({unit}): " + ", ".join(f"{k} {v / scale:.2f}" for k, v in est.items() if v))
    torch.manual_seed(0)
    with torch.device(device):  # built where it runs: no host copy of a billion parameters
        model = TarFlow(bench.config)
    for block in model.blocks:  # a zero output projection would make every block the identity
        torch.nn.init.normal_(block.proj_out.weight, std=0.02)
    tcfg = TrainConfig(lr=1e-4, total_steps=10**6, bf16=precision == "bf16", label_drop=0.1,
                       activation_checkpointing=ckpt, grad_accum_steps=accum, tf32=precision == "tf32")
    state = make_train_state(model, tcfg)
    if compiled:
        state.net = torch.compile(state.net, backend=args.compile_backend)
    x, y = batch_of(bench, bench.batch, device)
    t = time.perf_counter()
    for _ in range(args.warmup):
        train_step(state, x, y)
    sync(device)
    print(f"  warm-up ({args.warmup} steps{', compilation included' if compiled else ''}): "
          f"{time.perf_counter() - t:.1f} s")
    t = time.perf_counter()
    for _ in range(args.steps):
        m = train_step(state, x, y)
    sync(device)
    seconds = (time.perf_counter() - t) / args.steps
    row.images_per_s = bench.batch / seconds
    model_flops = bench.config.flops_per_image(training=True)
    hardware_flops = model_flops + (recompute_flops_per_image(bench.config) if ckpt else 0)
    peak, source = peak_tflops(device, precision)
    row.mfu, row.hfu = row.images_per_s * model_flops / peak, row.images_per_s * hardware_flops / peak
    print(f"  {seconds * 1e3:.0f} ms/step, {row.images_per_s:.1f} images/s, loss {m['loss']:.4f}; "
          f"{row.images_per_s * model_flops / 1e12:.1f} model TFLOP/s = MFU {row.mfu:.1%}, with recompute "
          f"HFU {row.hfu:.1%} (peak {peak / 1e12:.1f} TFLOP/s: {source})")
    if device == "cuda":
        row.peak_gib = torch.cuda.max_memory_allocated() / GiB
        reserved = torch.cuda.max_memory_reserved() / GiB
        print(f"  peak memory {row.peak_gib:.2f} GiB allocated (reserved {reserved:.2f}); "
              f"estimate {row.estimate_gib:.2f} GiB: measured/estimate {row.peak_gib / row.estimate_gib:.3f}")
    return row


def attention_backends(args, bench: Bench, precision: str) -> Row:
    """Which SDPA kernel runs by default at the training shapes (from the aten op the profiler sees),
    and forward+backward milliseconds of each kernel that accepts these inputs."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    device, c = args.device, bench.config
    row = Row("attention", bench.name, precision)
    free(device)
    ckpt, accum, _ = pick_knobs(args, bench, precision, memory_total(device))
    micro = bench.batch // accum
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"  # the math kernel's matmuls
    heads = c.width // c.head_dim
    q, k, v = (torch.randn(micro, heads, c.num_tokens, c.head_dim, device=device, dtype=dtype, requires_grad=True)
               for _ in range(3))

    def call():
        F.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()

    call()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        call()
        sync(device)
    ops = sorted({e.name for e in prof.events() if "attention" in e.name and e.name.startswith("aten::_")
                  and "backward" not in e.name})
    row.knobs = " ".join(op.removeprefix("aten::_").removeprefix("scaled_dot_product_") for op in ops) or "math"
    print(f"\n[attention] {bench.name}: (B={micro}, H={heads}, N={c.num_tokens}, 64) {precision}, causal; "
          f"default runs {row.knobs}")
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION,
                    SDPBackend.MATH):
        try:
            with sdpa_kernel([backend]):
                call()
                sync(device)
                t = time.perf_counter()
                for _ in range(3):
                    call()
                sync(device)
            print(f"  {backend.name:20s} {(time.perf_counter() - t) / 3 * 1e3:8.2f} ms forward+backward")
        except RuntimeError as e:
            print(f"  {backend.name:20s} unavailable ({str(e).splitlines()[0][:90]})")
    return row


def run_sampling(args, bench: Bench) -> Row:
    device = args.device
    row = Row("sample", bench.name, "bf16", knobs=f"batch {args.sample_batch}")
    free(device)
    torch.manual_seed(0)
    with torch.device(device):
        model = TarFlow(bench.config).eval()
    for block in model.blocks:
        torch.nn.init.normal_(block.proj_out.weight, std=0.02)
    z = torch.randn(args.sample_batch, bench.config.in_channels, bench.config.image_size, bench.config.image_size,
                    device=device)
    classes = bench.config.num_classes
    y = (torch.arange(args.sample_batch, device=device) % classes) if classes else None
    autocast = torch.autocast(device_type=device, dtype=torch.bfloat16)
    sync(device)
    t = time.perf_counter()
    with autocast:
        model.reverse(z, y, guidance=2.0, annealed_guidance=True)
    sync(device)
    seconds = time.perf_counter() - t
    row.images_per_s = args.sample_batch / seconds
    c = bench.config
    print(f"\n[sample] {bench.name}: {args.sample_batch} images, guidance 2.0 annealed, bf16: {seconds:.1f} s = "
          f"{row.images_per_s:.2f} images/s ({c.num_blocks}×{c.num_tokens - 1} sequential steps)")
    return row


def guarded(run, rows: list, started: float, budget: float, label: str, device: str) -> None:
    """Run one benchmark; report an OOM or any other error and go on; skip once over the time budget."""
    if time.perf_counter() - started > budget:
        print(f"\n[skipped] {label}: time budget of {budget:.0f} s spent")
        rows.append(Row(*label.split()[:3], status="skipped (budget)"))
        return
    try:
        rows.append(run())
    except torch.cuda.OutOfMemoryError as e:
        print(f"\n[OOM] {label}: {str(e).splitlines()[0][:160]}")
        rows.append(Row(*label.split()[:3], status="OOM"))
    except Exception as e:
        print(f"\n[error] {label}: {type(e).__name__}: {e}")
        traceback.print_exc(limit=3)
        rows.append(Row(*label.split()[:3], status=f"error: {type(e).__name__}"))
    finally:
        free(device)


def summary(rows: list[Row]) -> str:
    def f(v, fmt):
        width = int(fmt.split(".")[0])
        return format(v, fmt) if v is not None else "-".rjust(width)

    head = (f"{'section':9s} {'config':12s} {'prec':5s} {'knobs':28s} {'img/s':>9s} {'MFU':>6s} {'HFU':>6s} "
            f"{'peak GiB':>9s} {'est GiB':>8s} {'ratio':>6s}  status")
    lines = [head, "-" * len(head)]
    for r in rows:
        ratio = r.peak_gib / r.estimate_gib if r.peak_gib and r.estimate_gib else None
        lines.append(f"{r.section:9s} {r.bench:12s} {r.precision:5s} {r.knobs[:28]:28s} {f(r.images_per_s, '9.2f')} "
                     f"{f(r.mfu, '6.1%')} {f(r.hfu, '6.1%')} {f(r.peak_gib, '9.2f')} {f(r.estimate_gib, '8.2f')} "
                     f"{f(ratio, '6.3f')}  {r.status}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[Row]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cuda", "cpu"], default=None, help="default: cuda if available")
    p.add_argument("--tiny", action="store_true", help="a 2-64-2-2 @16² model instead of the paper's (implied on cpu)")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, from {','.join(SECTIONS)}")
    p.add_argument("--precisions", default=",".join(PRECISIONS),
                   help="for the attention and train sections, from bf16,tf32,fp32 (tf32: CUDA only; compile runs "
                        "bf16 only)")
    p.add_argument("--table2-batch", type=int, default=32, help="per-GPU batch of 2-768-8-8 @64² (256/8 GPUs)")
    p.add_argument("--imagenet128-batch", type=int, default=24, help="per-GPU batch of 4-1024-8-8 @128² (768/32)")
    p.add_argument("--tiny-batch", type=int, default=4)
    p.add_argument("--knobs", default="auto", help="auto (plan_fit) or e.g. none, ckpt, accum4, ckpt+accum2")
    p.add_argument("--steps", type=int, default=4, help="timed training steps per run")
    p.add_argument("--warmup", type=int, default=2, help="untimed training steps first")
    p.add_argument("--sample-batch", type=int, default=32)
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend (eager: tracing only)")
    p.add_argument("--budget-s", type=float, default=480, help="skip the runs that would start after this")
    args = p.parse_args(argv)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    sections = [s for s in args.sections.split(",") if s]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        p.error(f"unknown sections {sorted(unknown)}; choose from {SECTIONS}")
    precisions = [s for s in args.precisions.split(",") if s]
    if set(precisions) - set(PRECISIONS):
        p.error(f"unknown precisions {sorted(set(precisions) - set(PRECISIONS))}; choose from {PRECISIONS}")
    if args.device == "cpu":
        args.tiny = True
    threads, tf32 = torch.get_num_threads(), torch.backends.cuda.matmul.allow_tf32
    try:
        if args.device == "cpu":
            torch.set_num_threads(1)  # a shared CPU: one thread gives steadier timings
        return run_sections(args, sections, precisions)
    finally:
        torch.set_num_threads(threads)
        torch.backends.cuda.matmul.allow_tf32 = tf32


def run_sections(args, sections: list[str], precisions: list[str]) -> list[Row]:

    if args.tiny:
        benches = [Bench("tiny", TarFlowConfig.from_string("2-64-2-2", image_size=16, num_classes=10), args.tiny_batch)]
    else:
        benches = [Bench("table2", TarFlowConfig.from_string("2-768-8-8", image_size=64, num_classes=1000),
                         args.table2_batch),
                   Bench("imagenet128", TarFlowConfig.from_string("4-1024-8-8", image_size=128, num_classes=1000),
                         args.imagenet128_batch)]
    if args.device != "cuda" and "tf32" in precisions:
        print("tf32 skipped: TF32 matmuls are CUDA's (on a CPU it would be fp32 again)")
        precisions = [p for p in precisions if p != "tf32"]
    device_memory = memory_total(args.device)
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"bench_gpu: {name}, {device_memory / GiB:.1f} GiB, torch {torch.__version__}, "
          f"precisions {','.join(precisions)}, sections {','.join(sections)}")
    for b in benches:
        params = training_memory(b.config, 1)["gradients"] // 4  # one fp32 gradient per parameter
        print(f"  {b.name}: {b.config.name} @{b.config.image_size}², {b.config.num_tokens} tokens, "
              f"{params / 1e6:.2f}M parameters, "
              f"{b.config.flops_per_image(training=True) / 1e9:.1f} GFLOP per training image, batch {b.batch}/GPU")

    rows: list[Row] = []
    started = time.perf_counter()
    run = lambda fn, label: guarded(fn, rows, started, args.budget_s, label, args.device)
    order = [s for s in SECTIONS if s in sections]
    for section in order:
        for b in benches:
            if section == "attention":
                for prec in precisions:
                    run(lambda: attention_backends(args, b, prec), f"attention {b.name} {prec}")
            elif section == "train":
                for prec in precisions:
                    run(lambda: run_training(args, b, prec, False, device_memory), f"train {b.name} {prec}")
            elif section == "sample":
                run(lambda: run_sampling(args, b), f"sample {b.name} bf16")
            elif section == "compile":
                run(lambda: run_training(args, b, "bf16", True, device_memory), f"compile {b.name} bf16")
    print(f"\nsummary ({time.perf_counter() - started:.0f} s; MFU: model FLOPs, HFU: with the checkpointing "
          f"recompute; ratio: peak allocated / training_memory total)")
    print(summary(rows))
    print(cost_model_inputs(rows, benches, name))
    return rows


def cost_model_inputs(rows: list[Row], benches: list[Bench], device_name: str) -> str:
    """Each training run's images/s per GPU as the override the dry run's cost model takes in place of its
    FLOPs estimate: valid for that GPU, precision, per-GPU batch and knobs."""
    by_name = {b.name: b for b in benches}
    lines = [f"\nfor the cost model (python -m orchestrator.run ... --dry-run): images/s per GPU on {device_name}; "
             "paste a line as an override of an experiment with that model, precision, per-GPU batch and knobs"]
    for r in rows:
        if r.section not in ("train", "compile") or r.status != "ok" or not r.images_per_s:
            continue
        b = by_name[r.bench]
        settings = CONFIG_OF[r.precision] + (", train.compile=true" if r.section == "compile" else "")
        knobs = f", knobs {r.knobs}" if r.knobs != "none" else ""
        lines.append(f"  {b.config.name} @{b.config.image_size}², {r.precision}, {b.batch}/GPU{knobs}: "
                     f"cluster.images_per_sec_per_gpu={r.images_per_s:.4g}   # with {settings}")
    if len(lines) == 1:
        lines.append("  (no training run finished)")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
