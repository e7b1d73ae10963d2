"""What an experiment costs before it is launched: runs, GPUs and GPU-hours, from the configured epochs
and a throughput figure (measured, or the model's FLOPs, plus the recompute of activation checkpointing,
at an assumed utilisation)."""

from __future__ import annotations

from dataclasses import dataclass

from tarflow.memory import recompute_flops_per_image

from .plan import RunPlan


@dataclass
class Cost:
    runs: int
    gpus_per_run: int
    images_per_run: float
    images_per_sec: float       # the whole run's throughput
    throughput_source: str
    hours_per_run: float

    @property
    def gpu_hours(self) -> float:
        return self.runs * self.gpus_per_run * self.hours_per_run


def estimate_cost(plan: RunPlan, runs: int = 1, train_size: int | None = None) -> Cost | None:
    """None when the training-set size is unknown (data absent and data.train_images unset)."""
    cfg = plan.cfg
    size = train_size or cfg.data.train_images
    if cfg.train.steps is not None:
        images = cfg.train.steps * cfg.train.batch_size
    elif size:
        images = cfg.train.epochs * (size // cfg.train.batch_size) * cfg.train.batch_size
    else:
        return None
    c = cfg.cluster
    gpus = c.num_workers if c.use_gpu else 0
    if c.images_per_sec_per_gpu:  # measured as configured (with checkpointing on, if it is)
        per_gpu, source = c.images_per_sec_per_gpu, "cluster.images_per_sec_per_gpu"
    else:
        flops = plan.model.flops_per_image(training=True)
        recompute = ""
        if cfg.train.activation_checkpointing:  # one more forward of every layer, done by the GPU all the same
            extra = recompute_flops_per_image(plan.model)
            flops += extra
            recompute = f" (+{extra / 1e9:.1f} recomputed: activation checkpointing)"
        per_gpu = c.gpu_peak_tflops * 1e12 * c.assumed_mfu / flops
        source = f"{flops / 1e9:.1f} GFLOP/image{recompute} at {c.assumed_mfu:.0%} of {c.gpu_peak_tflops:g} TFLOP/s"
    rate = per_gpu * max(gpus, 1)
    return Cost(runs=runs, gpus_per_run=gpus, images_per_run=images, images_per_sec=rate,
                throughput_source=source, hours_per_run=images / rate / 3600)


def describe_cost(cost: Cost | None) -> str:
    if cost is None:
        return "cost        unknown: set data.train_images (the training-set size) for an estimate"
    if cost.gpus_per_run == 0:
        return f"cost        {cost.runs} CPU run(s) of {cost.images_per_run:,.0f} training images each"
    return (f"cost        {cost.runs} run(s) × {cost.gpus_per_run} GPU × {cost.hours_per_run:,.1f} h = "
            f"{cost.gpu_hours:,.0f} GPU-hours ({cost.images_per_run:,.0f} images per run at "
            f"{cost.images_per_sec:,.0f} images/s; throughput from {cost.throughput_source})")
