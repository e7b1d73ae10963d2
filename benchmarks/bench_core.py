"""Core throughput of tarflow against the authors' reference code: training images/s, guided-sampling
images/s, FLOPs per image, achieved FLOP/s and MFU against a matmul peak measured in the same run.

    python benchmarks/bench_core.py [--reference DIR] [--arch 2-128-4-2] [--image-size 16] [--channels 3]
                                    [--classes 10] [--batch 16] [--device cpu|cuda] [--bf16] [--repeats 5]

DIR holds the authors' transformer_flow.py (e.g. a checkout of apple/ml-tarflow); without it only our
figures are printed. Ours and the reference get identical weights (TarFlow.from_reference) and are timed
interleaved in one process, so background load hits both alike; medians over --repeats. Prints figures;
asserts nothing. The default config runs on a 2-core CPU in a few minutes.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import tarflow  # noqa: E402
from tarflow import TarFlow, TarFlowConfig  # noqa: E402


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: str) -> float:
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


def matmul_peak(device: str, bf16: bool, repeats: int) -> float:
    """FLOP/s of a large square matmul: fp32 on CPU, bf16 on cuda (or fp32 there without --bf16)."""
    n = 1024 if device == "cpu" else 8192
    dtype = torch.bfloat16 if (device == "cuda" and bf16) else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b  # warm-up
    best = min(timed(lambda: a @ b, device) for _ in range(repeats))
    return 2 * n**3 / best


def reference_training_step(ref, opt, x, y, noise_std, bf16, device):
    """The reference training recipe (train.py): Gaussian noise, forward, get_loss, AdamW step."""
    x = x + noise_std * torch.randn_like(x)
    with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=bf16):
        z, _, logdets = ref(x, y)
    loss = ref.get_loss(z, logdets)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    ref.update_prior(z.detach())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reference", type=Path, default=None, help="directory with the authors' transformer_flow.py")
    p.add_argument("--arch", default="2-128-4-2", help="P-Ch-T-K")
    p.add_argument("--image-size", type=int, default=16)
    p.add_argument("--channels", type=int, default=3)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (training and sampling)")
    p.add_argument("--guidance", type=float, default=2.0)
    p.add_argument("--train-steps", type=int, default=5, help="timed training steps per repeat")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    dev = args.device

    torch.manual_seed(0)
    cfg = TarFlowConfig.from_string(args.arch, image_size=args.image_size, in_channels=args.channels,
                                    num_classes=args.classes)
    cfg_dict = dict(in_channels=cfg.in_channels, img_size=cfg.image_size, patch_size=cfg.patch_size,
                    channels=cfg.width, num_blocks=cfg.num_blocks, layers_per_block=cfg.layers_per_block,
                    nvp=cfg.nvp, num_classes=cfg.num_classes)
    ref = None
    if args.reference is not None:
        sys.path.insert(0, str(args.reference.resolve()))
        import transformer_flow

        ref = transformer_flow.Model(**cfg_dict).to(dev)
        for block in ref.blocks:  # zero proj_out would make every block the identity: nothing to compare
            torch.nn.init.normal_(block.proj_out.weight, std=0.02)
        ours = TarFlow.from_reference(ref.state_dict(), cfg_dict).to(dev)
    else:
        ours = TarFlow(cfg).to(dev)
        for block in ours.blocks:
            torch.nn.init.normal_(block.proj_out.weight, std=0.02)

    B = args.batch
    gen = torch.Generator().manual_seed(1)
    x = (torch.randint(0, 256, (B, cfg.in_channels, cfg.image_size, cfg.image_size), generator=gen) / 127.5 - 1).to(dev)
    y = torch.randint(0, max(cfg.num_classes, 1), (B,), generator=gen).to(dev) if cfg.num_classes else None
    z = torch.randn(B, cfg.in_channels, cfg.image_size, cfg.image_size, generator=gen).to(dev)
    autocast = (lambda: torch.autocast(device_type=dev, dtype=torch.bfloat16)) if args.bf16 else contextlib.nullcontext

    print(f"config {cfg.name} image {cfg.image_size}x{cfg.image_size}x{cfg.in_channels} patch {cfg.patch_size} "
          f"-> {cfg.num_tokens} tokens, {cfg.num_classes} classes, {ours.num_params() / 1e6:.2f}M params; "
          f"batch {B}, {dev}, {'bf16 autocast' if args.bf16 else 'fp32'}, threads {torch.get_num_threads()}, "
          f"torch {torch.__version__}")

    peaks = [matmul_peak(dev, args.bf16, args.repeats)]  # measured again at the end: the best of both

    # -- training: forward + backward + AdamW ------------------------------------------------------
    tcfg = tarflow.TrainConfig(lr=1e-4, total_steps=10**6, bf16=args.bf16, label_drop=0.1)
    state = tarflow.make_train_state(ours.train(), tcfg)
    jobs = {"ours": lambda: tarflow.train_step(state, x, y)}
    if ref is not None:
        ref.train()
        ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=1e-4)
        jobs["reference"] = lambda: reference_training_step(ref, ref_opt, x, y, tcfg.noise_std, args.bf16, dev)
    train_s = {k: [] for k in jobs}
    for f in jobs.values():  # warm-up
        f()
    for _ in range(args.repeats):
        for k, f in jobs.items():
            train_s[k].append(timed(lambda: [f() for _ in range(args.train_steps)], dev) / args.train_steps)
    train_ips = {k: B / statistics.median(v) for k, v in train_s.items()}

    # -- guided sampling (w, class-conditional, annealed) ---------------------------------------------
    ours.eval()
    w = args.guidance

    def sample_ours():
        with autocast():
            return ours.reverse(z, y, guidance=w, annealed_guidance=True)

    jobs = {"ours": sample_ours}
    if ref is not None:
        ref.eval()
        # identical weights for the comparison (training above moved both apart)
        ours.load_state_dict(TarFlow.from_reference(ref.state_dict(), cfg_dict).state_dict())

        def sample_ref():  # the reference reverse takes (B, N, D) and writes into it
            with torch.no_grad(), autocast():
                return ref.reverse(ref.patchify(z).clone(), y, guidance=w, annealed_guidance=True)

        jobs["reference"] = sample_ref
    samples = {k: f() for k, f in jobs.items()}  # warm-up, and the samples to compare
    sample_s = {k: [] for k in jobs}
    for _ in range(args.repeats):
        for k, f in jobs.items():
            sample_s[k].append(timed(f, dev))
    sample_ips = {k: B / statistics.median(v) for k, v in sample_s.items()}

    # -- FLOPs and MFU --------------------------------------------------------------------------------
    peak = max(peaks + [matmul_peak(dev, args.bf16, args.repeats)])
    flops = cfg.flops_per_image(training=True)
    print(f"FLOPs/image (training, fwd+bwd) {flops / 1e9:.3f} GFLOP; sampling (one forward's worth, "
          f"x2 branches) {2 * cfg.flops_per_image() / 1e9:.3f} GFLOP")
    print(f"matmul peak ({'bf16' if dev == 'cuda' and args.bf16 else 'fp32'}, measured) {peak / 1e9:.1f} GFLOP/s")
    print(f"{'':12s}{'train img/s':>13s}{'TFLOP/s':>10s}{'MFU':>8s}{'sample img/s':>15s}")
    for k in jobs:
        achieved = train_ips[k] * flops
        print(f"{k:12s}{train_ips[k]:13.1f}{achieved / 1e12:10.4f}{achieved / peak:8.1%}{sample_ips[k]:15.2f}")
    if ref is not None:
        diff = (samples["ours"].float() - samples["reference"].float()).abs().max().item()
        print(f"ratio ours/reference: training {train_ips['ours'] / train_ips['reference']:.2f}x, "
              f"guided sampling {sample_ips['ours'] / sample_ips['reference']:.2f}x")
        print(f"max |ours - reference| sample from the same noise (w={w}, annealed): {diff:.2e}")


if __name__ == "__main__":
    main()
