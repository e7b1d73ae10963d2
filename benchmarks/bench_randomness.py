"""What keyed per-sample randomness costs a training step (tarflow/randomness.py), and how exactly training
repeats itself across ranks, micro-batches and restarts.

    python benchmarks/bench_randomness.py [--device cpu|cuda] [--configs smoke,larger] [--bf16]
                                          [--steps 20] [--repeats 5] [--equivalence]

For each config, tarflow.train_step with its draws keyed by (seed, step, position) (one generator seeding
and one noise kernel per sample; with and without flips) against the same step drawing its noise and label
drops from the global RNG in two batched calls (what train_step did before); and the draws alone. Timed
interleaved, medians over --repeats of --steps steps.

--equivalence: the largest relative weight difference, in fp32 on the device, of 1 rank (batch 8) vs 2
simulated ranks (4 each, gradients and the VP prior statistic averaged; tests/test_randomness.py's
train_ranks), of grad_accum_steps 1 vs 2, and of a restart from a checkpoint vs the uninterrupted run.
Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import tarflow  # noqa: E402
import tarflow.training as training  # noqa: E402
from tarflow.randomness import sample_draws  # noqa: E402

CONFIGS = {  # name: (arch, image size, channels, batch, classes)
    "smoke": ("4-64-2-2", 16, 1, 32, 10),
    "larger": ("2-128-4-2", 32, 3, 32, 10),
    "table2": ("2-768-8-8", 64, 3, 32, 1000),  # ImageNet 64 at the paper's 256 / 8 GPUs per GPU
}
KEYED = training.training_inputs


def global_rng_inputs(x, y, cfg, step, positions=None):
    """The draws as train_step made them before: two batched calls on the global RNG, no flips."""
    x = training.augment(x, cfg)
    return x, (training.drop_labels(y, cfg.label_drop) if y is not None else None)


def timed(fn, steps: int, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps


def bench(name: str, args, device: torch.device) -> None:
    arch, size, channels, batch, classes = CONFIGS[name]
    config = tarflow.TarFlowConfig.from_string(arch, image_size=size, in_channels=channels, num_classes=classes)
    g = torch.Generator().manual_seed(0)
    x = (torch.randint(0, 256, (batch, channels, size, size), generator=g) / 127.5 - 1).to(device)
    y = torch.randint(0, classes, (batch,), generator=g).to(device)
    states = {}
    for label, flip in (("keyed, flips", True), ("keyed, no flips", False), ("global RNG", False)):
        model = tarflow.initial_model(config, seed=0).to(device)
        states[label] = tarflow.make_train_state(model, tarflow.TrainConfig(total_steps=10**6, flip=flip,
                                                                            bf16=args.bf16))

    def step(label):
        training.training_inputs = global_rng_inputs if label == "global RNG" else KEYED
        try:
            tarflow.train_step(states[label], x, y)
        finally:
            training.training_inputs = KEYED

    draws = {
        "keyed draws": lambda: sample_draws(0, 0, range(batch), tuple(x.shape[1:]), "gaussian", x.dtype, device),
        "global RNG draws": lambda: (torch.randn(x.shape, device=device), torch.rand(batch, device=device)),
    }
    jobs = {**{label: (lambda label=label: step(label)) for label in states}, **draws}
    for fn in jobs.values():  # warm-up
        timed(fn, 2, device)
    seconds = {label: [] for label in jobs}
    for _ in range(args.repeats):
        for label, fn in jobs.items():
            seconds[label].append(timed(fn, args.steps, device))
    med = {label: statistics.median(s) * 1e3 for label, s in seconds.items()}
    base = med["global RNG"]
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} CPU threads"
    print(f"\n{name}: {arch} on {size}x{size}x{channels}, batch {batch}, {'bf16' if args.bf16 else 'fp32'}, {where}")
    for label in states:
        print(f"  train_step {label:16s} {med[label]:8.2f} ms  ({med[label] / base - 1:+.1%} vs global RNG)")
    for label in draws:
        print(f"  {label:27s} {med[label]:8.3f} ms")


def relative_differences(a: dict, b: dict) -> str:
    """max |a − b| / max |b| per tensor: the largest, and the largest apart from the qkv biases, whose key
    part has an exactly zero gradient (softmax ignores a shift shared by all keys) that Adam turns from
    rounding noise into updates of up to ~lr."""
    from test_randomness import max_relative_difference

    rest = max_relative_difference({k: v for k, v in a.items() if not k.endswith("qkv.bias")}, b)
    return f"{max_relative_difference(a, b):.1e} ({rest:.1e} without qkv biases)"


def equivalence(device: torch.device) -> None:
    sys.path.insert(0, str(ROOT / "tests"))
    from test_randomness import batches, config, make_model, train_ranks

    print(f"\nlargest relative weight difference after 3 steps, fp32 on {device.type} (2-64-2-1 on 8x8x1, batch 8, "
          "flips, noise, label drop, clipping, EMA):")
    data = [(x.to(device), y.to(device)) for x, y in batches(6, dtype=torch.float32)]
    for nvp in (False, True):
        model = make_model(nvp, dtype=torch.float32).to(device)
        runs = {}
        for k in (1, 2):
            runs[k] = tarflow.make_train_state(copy.deepcopy(model), config(grad_accum_steps=k))
            for x, y in data[:3]:
                tarflow.train_step(runs[k], x, y)
        want = runs[1].model.state_dict()
        ranks = "n/a on cuda (the simulated ranks' backward passes would share CUDA's one autograd thread)"
        if device.type == "cpu":
            ranks = relative_differences(train_ranks(model, config(), data[:3], world=2)[0].model.state_dict(), want)
        print(f"  {'nvp' if nvp else 'vp'}: 2 ranks vs 1 {ranks}; "
              f"grad_accum_steps 2 vs 1 {relative_differences(runs[2].model.state_dict(), want)}")
        print(f"  {'nvp' if nvp else 'vp'}: restart after 3 of 6 steps vs uninterrupted (weights and EMA) "
              f"{restart_difference(model, data)}")


def restart_difference(model, data) -> str:
    from test_randomness import config

    full = tarflow.make_train_state(copy.deepcopy(model), config())
    for x, y in data:
        tarflow.train_step(full, x, y)
    first = tarflow.make_train_state(copy.deepcopy(model), config())
    for x, y in data[:3]:
        tarflow.train_step(first, x, y)
    with tempfile.TemporaryDirectory() as tmp:
        path = tarflow.save_checkpoint(Path(tmp) / "ckpt.pt", first)
        resumed = tarflow.restore(tarflow.make_train_state(copy.deepcopy(model), config()),
                                  tarflow.load_checkpoint(path, map_location=data[0][0].device))
    for x, y in data[3:]:
        tarflow.train_step(resumed, x, y)
    both = lambda state: {**state.model.state_dict(), **{f"ema.{k}": v for k, v in state.ema.state_dict().items()}}
    return relative_differences(both(resumed), both(full))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--configs", default="smoke,larger", help=f"comma-separated, of {', '.join(CONFIGS)}")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--equivalence", action="store_true")
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.equivalence:
        equivalence(device)
    for name in filter(None, args.configs.split(",")):
        bench(name, args, device)


if __name__ == "__main__":
    main()
