"""What an experiment costs before it is launched, as the dry run prints it.

Compute: GPUs × hours from the configured epochs and a throughput per GPU: cluster.images_per_sec_per_gpu when
measured (benchmarks/bench_gpu.py prints it per precision), else the model's FLOPs per training image (plus the
recompute of activation checkpointing) at cluster.mfu (per precision) of the GPU's peak for the precision the run
computes in: bf16 (autocast), tf32 (fp32 with train.tf32) or fp32 (without TF32 an A100 runs fp32 matmuls at a
sixteenth of its bf16 peak). An fp32 run also lists what TF32 and bf16 would cost, and what they change.

Checkpoints: one checkpoint's bytes from the model's shapes (tarflow.checkpoint_bytes), the time training waits
for it (rank 0 writes it to local disk; with synchronous upload it also waits for the upload) as a share of the
training time between two checkpoints, and above CHECKPOINT_SHARE_LIMIT the interval, or asynchronous upload,
that keeps it under.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

from tarflow import checkpoint_bytes
from tarflow.memory import GiB, recompute_flops_per_image, training_memory

from .plan import RunPlan, plan_run, schedule, train_config

PRECISIONS = ("bf16", "tf32", "fp32")
CHECKPOINT_SHARE_LIMIT = 0.03  # of training time: above it the dry run says how to get under
MB = 1e6
# MB/s measured by benchmarks/bench_storage.py on this project's 2-core build machine (medians over a 1.4 GB and
# a 5.5 GB checkpoint): the defaults when storage.local_write_mb_per_s / storage.write_mb_per_s are null.
# SeaweedFS on 127.0.0.1 stands in for S3: for a real bucket the figure is an assumption (measure yours).
LOCAL_WRITE_MB_PER_S = 290.0          # tarflow.save_checkpoint (torch.save + sha256) to the worker's temp dir
S3_WRITE_MB_PER_S = 180.0             # Ray Train's upload through pyarrow's S3 filesystem
LOCAL_STORAGE_WRITE_MB_PER_S = 750.0  # Ray Train's copy into a local storage.uri
# what each faster precision changes, for an fp32 run's alternatives
TRADE_OFFS = {
    "tf32": "TF32 matmuls: inputs rounded to 10-bit mantissas, fp32 sums, so the likelihood is no longer computed "
            "in full fp32 as the authors' code computes it; the same memory; a new run (train.tf32 is part of the "
            "run identity)",
    "bf16": "bf16 autocast: 8-bit mantissas between the matmuls, the numerics change most (the paper trains its "
            "likelihood models in fp32); less memory; a new run",
}
OVERRIDE = {"tf32": "train.tf32=true", "bf16": "train.precision=bf16"}


def compute_precision(cfg) -> str:
    """What a GPU run's matmuls compute in: bf16 (train.precision, "auto" resolved as the workers resolve it on
    a GPU: bf16 for Gaussian noise), else tf32 with train.tf32, else fp32."""
    if train_config(cfg, on_gpu=True).bf16:
        return "bf16"
    return "tf32" if cfg.train.tf32 else "fp32"


def peak_tflops(cluster, precision: str, run_precision: str) -> float:
    """One GPU's dense peak for a precision; cluster.gpu_peak_tflops, when set, is the run's own precision's."""
    if cluster.gpu_peak_tflops is not None and precision == run_precision:
        return cluster.gpu_peak_tflops
    return cluster.peak_tflops[precision]


def utilisation(cluster, precision: str, run_precision: str) -> float:
    """The assumed MFU of a precision; cluster.assumed_mfu, when set, is the run's own precision's."""
    if cluster.assumed_mfu is not None and precision == run_precision:
        return cluster.assumed_mfu
    return cluster.mfu[precision]


@dataclass
class Cost:
    """Training one config (a run, or one trial of a sweep) at one precision."""

    plan: RunPlan
    precision: str              # bf16, tf32, fp32; "cpu" for a CPU run
    gpus: int                   # 0 for a CPU run: no throughput, no hours
    images: int                 # training images seen (steps × global batch)
    images_per_sec: float       # the whole run's
    source: str                 # where the throughput comes from
    peak_tflops: float | None = None
    mfu: float | None = None    # the assumed utilisation, when estimated from the FLOPs

    @property
    def hours(self) -> float:
        return self.images / self.images_per_sec / 3600 if self.gpus else 0.0

    @property
    def gpu_hours(self) -> float:
        return self.gpus * self.hours

    @property
    def step_seconds(self) -> float:
        return self.plan.cfg.train.batch_size / self.images_per_sec if self.gpus else 0.0


def training_steps(cfg) -> int | None:
    """Optimizer steps of a run; None when the training-set size is unknown (data absent, data.train_images
    unset) and train.steps does not say."""
    size = cfg.data.train_images
    if cfg.train.steps is None and not size:
        return None
    return schedule(cfg, size or 1)[1]


def estimate_cost(plan: RunPlan, precision: str | None = None) -> Cost | None:
    """One config's training cost; None when its length is unknown. precision: another than the run's own (a
    faster alternative), costed from the FLOPs: a measured throughput holds for the precision it was measured in
    only (on an H200 fp32 ran at 69% of its peak, bf16 and TF32 at 25-39% of theirs: benchmarks/README.md)."""
    cfg = plan.cfg
    steps = training_steps(cfg)
    if steps is None:
        return None
    c = cfg.cluster
    images = steps * cfg.train.batch_size
    if not c.use_gpu:
        return Cost(plan, "cpu", 0, images, 0.0, "")
    run_precision = compute_precision(cfg)
    precision = precision or run_precision
    peak = peak_tflops(c, precision, run_precision)
    cost_mfu = None
    if c.images_per_sec_per_gpu and precision == run_precision:  # measured as configured (checkpointing too)
        per_gpu = c.images_per_sec_per_gpu
        source = f"cluster.images_per_sec_per_gpu={per_gpu:g}, measured in {run_precision}"
    else:
        flops = plan.model.flops_per_image(training=True)
        recompute = ""
        if cfg.train.activation_checkpointing:  # one more forward of every layer, done by the GPU all the same
            extra = recompute_flops_per_image(plan.model)
            flops += extra
            recompute = f" (+{extra / 1e9:.1f} recomputed: activation checkpointing)"
        mfu = utilisation(c, precision, run_precision)
        per_gpu = peak * 1e12 * mfu / flops
        source = f"{flops / 1e9:.1f} GFLOP/image{recompute} at {mfu:.0%} of {peak:g} TFLOP/s, the {precision} peak"
        cost_mfu = mfu
    return Cost(plan, precision, c.num_workers, images, per_gpu * c.num_workers, source, peak, cost_mfu)


@dataclass
class Bill:
    """An experiment's training: one Cost per run (a sweep: per trial), `concurrent` trials at a time."""

    costs: list[Cost]
    concurrent: int = 1
    price_per_gpu_hour: float | None = None

    @property
    def gpu_hours(self) -> float:
        return sum(c.gpu_hours for c in self.costs)

    @property
    def days(self) -> float:
        return sum(c.hours for c in self.costs) / min(self.concurrent, len(self.costs)) / 24

    @property
    def gpus(self) -> int:
        return max(c.gpus for c in self.costs) * min(self.concurrent, len(self.costs))

    @property
    def price(self) -> float | None:
        return None if self.price_per_gpu_hour is None else self.gpu_hours * self.price_per_gpu_hour

    @property
    def precision(self) -> str:
        return self.costs[0].precision

    def at(self, precision: str) -> Bill:
        """The same runs at another precision."""
        return Bill([estimate_cost(c.plan, precision) for c in self.costs], self.concurrent, self.price_per_gpu_hour)


def trial_plans(sweep) -> list[RunPlan]:
    """The config of every trial a sweep trains: each combination of its grid axes, sweep.num_samples times
    (the other axes at the experiment's own values: a random draw is not known before the sweep runs)."""
    from .config import with_values
    from .sweep import expand

    base, grid = sweep.base, [a for a in sweep.train_axes if a.kind == "grid"]
    plans = [plan_run(with_values(base.cfg, expand(dict(zip([a.key for a in grid], combo))), base.source),
                      source=base.source, require_data=False)
             for combo in itertools.product(*[a.values for a in grid])]
    return plans * base.cfg.sweep.num_samples


def estimate_bill(plan: RunPlan, sweep=None) -> Bill | None:
    """An experiment's training cost (a sweep: every trial at its own config); None when a length is unknown."""
    costs = [estimate_cost(p) for p in (trial_plans(sweep) if sweep else [plan])]
    if any(c is None for c in costs):
        return None
    concurrent = (plan.cfg.sweep.max_concurrent or 1) if sweep else 1
    return Bill(costs, concurrent, plan.cfg.cluster.price_per_gpu_hour)


def faster_precisions(plan: RunPlan) -> list[str]:
    """The precisions faster than a GPU run's own: tf32 and bf16 for fp32, bf16 for tf32."""
    if not plan.cfg.cluster.use_gpu:
        return []
    own = compute_precision(plan.cfg)
    return [p for p in ("tf32", "bf16") if PRECISIONS.index(p) < PRECISIONS.index(own)]


def describe_cost(plan: RunPlan, sweep=None, bill: Bill | None = None) -> str:
    bill = bill or estimate_bill(plan, sweep)
    if bill is None:
        return "cost        unknown: set data.train_images (the training-set size) for an estimate"
    first, runs = bill.costs[0], len(bill.costs)
    what = f"{runs} trial{'s' if runs > 1 else ''}" if sweep else "1 run"
    if plan.cfg.train.steps == 0:
        return "cost        no training (train.steps=0): the run evaluates the given weights (not costed here)"
    if not first.gpus:
        return f"cost        {what} on CPU, {first.images:,} training images each"
    c = plan.cfg.cluster
    gpus = f"{first.gpus} GPU{'s' if first.gpus > 1 else ''}" + (f" ({c.gpu_type})" if c.gpu_type else "")
    hours = (f"{first.hours:,.1f} h" if runs == 1 else
             f"{sum(x.hours for x in bill.costs):,.1f} h in all ({', '.join(f'{x.hours:,.0f}' for x in bill.costs)})")
    at_once = f", {bill.concurrent} at a time" if runs > 1 else ""
    price = f", {bill.price:,.0f} at {bill.price_per_gpu_hour:g} per GPU-hour" if bill.price is not None else ""
    lines = [f"cost        {what} × {gpus} × {hours} = {bill.gpu_hours:,.0f} GPU-hours, {bill.days:,.1f} days"
             f"{at_once}, in {first.precision}{price} ({first.images:,} images per {'run' if runs == 1 else 'trial'} "
             f"at {first.images_per_sec:,.0f} images/s{'' if runs == 1 else ' for the first'}; throughput from "
             f"{first.source})"]
    faster = [(p, bill.at(p)) for p in faster_precisions(plan)]
    if faster:
        own = "fp32 without TF32" if first.precision == "fp32" else "fp32 with TF32 matmuls"
        lines.append(f"            {own}, as configured; faster, with other numerics (paste as overrides):")
        width = max(len(OVERRIDE[p]) for p, _ in faster)
        lines += [f"              {OVERRIDE[p]:<{width}}  {b.gpu_hours:>9,.0f} GPU-hours {b.days:6,.1f} days  "
                  f"{bill.gpu_hours / b.gpu_hours:.1f}x faster ({b.costs[0].mfu:.0%} of {b.costs[0].peak_tflops:g} "
                  f"TFLOP/s): "
                  f"{TRADE_OFFS[p]}" for p, b in faster]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# The checkpoint bill


@dataclass
class CheckpointBill:
    """What writing a run's checkpoints costs, from one checkpoint's size and the write rates."""

    size_bytes: int
    parts: dict                 # weights, optimizer, ema: bytes
    every: int                  # train.checkpoint_every
    step_seconds: float         # predicted; 0 when unknown (a CPU run)
    local_rate: float           # MB/s of the local write, and where the figure comes from
    local_source: str
    upload_rate: float
    upload_source: str
    async_upload: bool
    destination: str            # "S3" or "local storage"
    keep: int

    @property
    def local_seconds(self) -> float:
        return self.size_bytes / (self.local_rate * MB)

    @property
    def upload_seconds(self) -> float:
        return self.size_bytes / (self.upload_rate * MB)

    @property
    def waited_seconds(self) -> float:
        """What training waits for per checkpoint: the local write, and the upload when synchronous."""
        return self.local_seconds + (0.0 if self.async_upload else self.upload_seconds)

    @property
    def interval_seconds(self) -> float:
        return self.every * self.step_seconds

    @property
    def share(self) -> float:
        return self.waited_seconds / self.interval_seconds if self.interval_seconds else 0.0

    @property
    def local_disk_bytes(self) -> int:
        """Local disk for checkpoints: asynchronous, the one being written and the one still uploading."""
        return (2 if self.async_upload else 1) * self.size_bytes

    @property
    def falls_behind(self) -> bool:
        """Asynchronous uploads slower than the interval queue up on local disk (Ray Train uploads one at a time)."""
        return self.async_upload and self.upload_seconds > self.interval_seconds > 0

    @property
    def suggested_every(self) -> int:
        """The smallest round interval (1, 2 or 5 × 10^k steps) whose share is at most CHECKPOINT_SHARE_LIMIT
        and which an asynchronous upload keeps up with."""
        seconds = max(self.waited_seconds / CHECKPOINT_SHARE_LIMIT, self.upload_seconds if self.async_upload else 0)
        steps = max(1, math.ceil(seconds / self.step_seconds))
        return min(r for r in (m * 10**k for k in range(12) for m in (1, 2, 5)) if r >= steps)


def checkpoint_bill(plan: RunPlan, cost: Cost | None) -> CheckpointBill:
    cfg = plan.cfg
    s = cfg.storage
    ema = cfg.train.ema_decay is not None
    state = training_memory(plan.model, 1)
    parts = {"weights": state["params"], "optimizer": state["optimizer"], "ema": state["params"] if ema else 0}
    s3 = s.uri.startswith("s3://")
    measured = "measured here by benchmarks/bench_storage.py"
    local = (s.local_write_mb_per_s, "storage.local_write_mb_per_s") if s.local_write_mb_per_s else (
        LOCAL_WRITE_MB_PER_S, f"{measured}; storage.local_write_mb_per_s")
    if s.write_mb_per_s:
        upload = (s.write_mb_per_s, "storage.write_mb_per_s")
    elif s3:
        upload = (S3_WRITE_MB_PER_S, f"{measured} against SeaweedFS, an assumption for S3; storage.write_mb_per_s")
    else:
        upload = (LOCAL_STORAGE_WRITE_MB_PER_S, f"{measured}; storage.write_mb_per_s")
    return CheckpointBill(checkpoint_bytes(plan.model, ema), parts, cfg.train.checkpoint_every,
                          cost.step_seconds if cost else 0.0, *local, *upload, s.async_upload,
                          "S3" if s3 else "local storage", s.keep_checkpoints)


def describe_checkpoints(bills: list[CheckpointBill], training: bool = True) -> str:
    """The checkpoint bill of a run, or of a sweep's costliest trial."""
    b = costliest(bills)
    p = {k: size_text(v) for k, v in b.parts.items()}
    which = " (the costliest trial)" if len(bills) > 1 else ""
    interval = f" ({b.interval_seconds / 3600:,.2f} h of training)" if b.interval_seconds else ""
    lines = [f"checkpoints {size_text(b.size_bytes)} each{which}: weights {p['weights']} + AdamW moments "
             f"{p['optimizer']} + EMA {p['ema']} (tarflow.checkpoint_bytes), every {b.every:,} steps"
             f"{interval}; {b.keep} kept in {b.destination}: {size_text(b.keep * b.size_bytes)}"]
    upload = f"{b.upload_seconds:,.1f} s at {b.upload_rate:g} MB/s ({b.upload_source})"
    local = (f"            training waits {b.waited_seconds:,.1f} s for each: rank 0 writes it to local disk, "
             f"{b.local_seconds:,.1f} s at {b.local_rate:g} MB/s ({b.local_source})")
    if b.async_upload:
        lines.append(f"{local}; the upload to {b.destination} runs in the background (storage.async_upload=true), "
                     f"{upload}, with {size_text(b.local_disk_bytes)} of local disk for the checkpoint written "
                     "and the one uploading")
    else:
        lines.append(f"{local}, then uploads it to {b.destination} (storage.async_upload=false), {upload}")
    if not training:
        lines.append("            no training (train.steps=0): the given weights are written once")
    elif b.interval_seconds:
        lines.append("            " + checkpoint_share_text(b))
    return "\n".join(lines)


def checkpoint_bills(plan: RunPlan, sweep, bill: Bill | None) -> list[CheckpointBill]:
    """The checkpoint bill of every run that trains (a sweep's trials), with its share of training time when the
    bill knows how long each trains."""
    if bill is not None:
        return [checkpoint_bill(c.plan, c) for c in bill.costs]
    return [checkpoint_bill(p, None) for p in (trial_plans(sweep) if sweep else [plan])]


def costliest(bills: list[CheckpointBill]) -> CheckpointBill:
    """The trial whose checkpoints cost the largest share of its training time (the largest, at a tie)."""
    return max(bills, key=lambda b: (b.share, b.size_bytes))


def checkpoint_share_text(b: CheckpointBill) -> str:
    text = f"{b.share:.1%} of training time"
    if b.falls_behind:
        return (text + f", but each upload ({b.upload_seconds:,.0f} s) outlasts the interval and they pile up on local "
                f"disk: train.checkpoint_every={b.suggested_every} keeps up")
    if b.share <= CHECKPOINT_SHARE_LIMIT:
        return text
    every = b.suggested_every
    text += (f", over {CHECKPOINT_SHARE_LIMIT:.0%}: train.checkpoint_every={every} keeps it under "
             f"({b.waited_seconds / (every * b.step_seconds):.1%})")
    if not b.async_upload:
        async_share = b.local_seconds / b.interval_seconds
        text += (f", or storage.async_upload=true ({async_share:.1%} of training time, "
                 f"{size_text(2 * b.size_bytes)} of local disk)")
    return text


def size_text(n: int) -> str:
    return "0" if n == 0 else f"{n / GiB:.2f} GiB" if n >= GiB else f"{n / 2**20:.1f} MiB"


def describe_bill(plan: RunPlan, sweep=None) -> str:
    """The dry run's cost and checkpoint sections."""
    bill = estimate_bill(plan, sweep)
    return (describe_cost(plan, sweep, bill) + "\n"
            + describe_checkpoints(checkpoint_bills(plan, sweep, bill), plan.cfg.train.steps != 0))
