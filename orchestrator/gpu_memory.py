"""Will it fit? The GPU memory a planned run needs per GPU (tarflow.memory, from the model's shapes), against
cluster.gpu_memory_gb: printed part by part by --dry-run, and checked before any cluster work, so that a run
which cannot fit is refused with the cheapest changes that do instead of failing with CUDA out of memory
after its nodes have started.

The estimate is for eager PyTorch as the workers run it: the per-worker batch (train.batch_size over the
smallest world size: cluster.num_workers, or an elastic run's min_workers) in train.grad_accum_steps
micro-batches, precision "auto" resolved as the workers resolve it on a GPU, an EMA copy when train.ema_decay
is set, DDP's gradient buckets with more than one worker, plus tarflow.memory.CUDA_OVERHEAD_BYTES for the CUDA
context, NCCL and library workspaces. A run fits when that is at most HEADROOM of the GPU's memory (the rest
is left to the caching allocator).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from tarflow.memory import CUDA_OVERHEAD_BYTES, FitOption, FitPlan, GiB, plan_fit, training_memory

from .config import min_workers, with_values
from .errors import ExperimentError
from .plan import RunPlan, plan_run, train_config

HEADROOM = 0.9
# training_memory's keys as the dry run names them, in the order it prints them
PARTS = {"params": "params", "gradients": "gradients", "optimizer": "optimizer", "ema": "ema",
         "activations": "activations", "ddp_buckets": "ddp buckets", "weight_casts": "weight casts",
         "transient": "transient"}
SKIP_OFF = "cluster.check_memory=false"


@dataclass
class MemoryEstimate:
    """One run's (or one sweep trial's) memory per GPU."""

    plan: RunPlan
    trial: dict                 # a sweep trial's train-axis overrides; {} for a single run
    precision: str              # fp32 or bf16, "auto" resolved as the workers resolve it
    memory: dict                # tarflow.memory.training_memory(...) as configured
    fit: FitPlan | None         # None when cluster.gpu_memory_gb is unset: nothing to compare with

    @property
    def need(self) -> int:
        return self.memory["total"] + CUDA_OVERHEAD_BYTES

    @property
    def label(self) -> str:
        return " ".join(f"{k}={_value(v)}" for k, v in self.trial.items())


def estimate(plan: RunPlan, trial: dict | None = None) -> MemoryEstimate:
    cfg = plan.cfg
    c, t = cfg.cluster, cfg.train
    precision = "bf16" if train_config(cfg, on_gpu=True).bf16 else "fp32"
    ema = t.ema_decay is not None
    memory = training_memory(plan.model, plan.per_worker_batch, precision, t.activation_checkpointing, ema,
                             t.grad_accum_steps, ddp=c.num_workers > 1)
    fit = None
    if c.gpu_memory_gb is not None:
        fit = plan_fit(plan.model, plan.per_worker_batch, int(c.gpu_memory_gb * GiB), precision, ema,
                       c.num_workers, t.activation_checkpointing, t.grad_accum_steps, headroom=HEADROOM)
    return MemoryEstimate(plan=plan, trial=trial or {}, precision=precision, memory=memory, fit=fit)


def estimate_memory(plan: RunPlan, sweep=None) -> list[MemoryEstimate]:
    """The estimates of every config that would train: the run itself, or each trial of a sweep (every
    combination of its train-axis values; the ends of a uniform or loguniform range), those that do not fit
    first, then by need, largest first. Empty for a CPU run."""
    if not plan.cfg.cluster.use_gpu:
        return []
    if sweep is None or not sweep.train_axes:
        return [estimate(plan)]
    from .sweep import expand

    keys = [a.key for a in sweep.train_axes]
    out = []
    for combo in itertools.product(*[a.probe_values() for a in sweep.train_axes]):
        trial = expand(dict(zip(keys, combo)))
        cfg = with_values(plan.cfg, trial, plan.source)
        if cfg.cluster.use_gpu:  # the sweep's probe has checked the data already
            out.append(estimate(plan_run(cfg, source=plan.source, require_data=False), trial))
    return sorted(out, key=lambda e: (e.fit is not None and e.fit.fits, -e.need))


# ---------------------------------------------------------------------------------------------
# What the dry run prints, and the launch check


def describe_memory(plan: RunPlan, estimates: list[MemoryEstimate]) -> str:
    c = plan.cfg.cluster
    if not estimates:
        return "gpu memory  not checked: a CPU run (cluster.use_gpu=false)"
    worst = estimates[0]
    t = worst.plan.cfg.train
    k, batch, workers = t.grad_accum_steps, worst.plan.per_worker_batch, min_workers(worst.plan.cfg)
    lines = [f"gpu memory  per GPU: {batch} images ({t.batch_size} / {workers} workers) in {k} "
             f"micro-batch{'es' if k > 1 else ''} of {batch // k}, {worst.precision}, activation checkpointing "
             f"{'on' if t.activation_checkpointing else 'off'} (eager PyTorch, tarflow.memory), GiB:"]
    if worst.trial:
        which = "the largest that does not fit" if worst.fit is not None and not worst.fit.fits else "the largest"
        lines.insert(0, f"gpu memory  of {len(estimates)} trial configs, {which}: {worst.label}")
        lines[1] = " " * 12 + lines[1][12:]
    parts = [f"{name} {worst.memory[key] / GiB:.1f}" for key, name in PARTS.items()]
    parts.append(f"CUDA overhead {CUDA_OVERHEAD_BYTES / GiB:.1f}")
    lines.append("            " + " + ".join(parts[:6]))
    lines.append("            + " + " + ".join(parts[6:]) + f" = total {worst.need / GiB:.1f}")
    if worst.fit is None:
        lines.append("            not checked against the GPU: cluster.gpu_memory_gb is not set; name a preset "
                     "(cluster=a100_40gb, a100_80gb, h100_80gb, h200) or set cluster.gpu_memory_gb=<GiB per GPU>")
        return "\n".join(lines)
    budget = usable(worst, c.gpu_memory_gb)
    if worst.fit.fits:
        spare = (worst.fit.budget_bytes - worst.need) / GiB
        lines.append(f"            fits: {budget}, {spare:.1f} GiB to spare"
                     + ("; every trial config fits" if worst.trial else ""))
        return "\n".join(lines)
    failing = [e for e in estimates if not e.fit.fits]
    lines.append(f"            does NOT fit: {budget}"
                 + (f"; {len(failing)} of {len(estimates)} trial configs do not fit" if worst.trial else ""))
    if worst.fit.options:
        width = max(len(overrides_text(o)) for o in worst.fit.options)
        lines.append("            cheapest changes that fit (paste as overrides):")
        lines += [f"              {overrides_text(o):<{width}}  {o.per_gpu_bytes / GiB:5.1f} GiB  {cost_text(o, worst)}"
                  for o in worst.fit.options]
    else:
        lines.append(f"            {NOTHING_FITS}")
    lines.append(f"            the launch is refused; to launch anyway: {SKIP_OFF}" if c.check_memory else
                 f"            the launch check is off ({SKIP_OFF}): it would launch anyway")
    return "\n".join(lines)


NOTHING_FITS = ("nothing fits: even one image per micro-batch with activation checkpointing is too much for this "
                "GPU (the weights, gradients and AdamW state alone); use a GPU with more memory")


def check_launch(plan: RunPlan, estimates: list[MemoryEstimate]) -> list[str]:
    """Refuse (ExperimentError) a GPU run that does not fit, before any cluster work. Returns the notes to
    print when it goes ahead without a check (no gpu_memory_gb, or cluster.check_memory=false)."""
    if not estimates:
        return []
    worst = estimates[0]
    c = plan.cfg.cluster
    if worst.fit is None:
        return [f"GPU memory not checked: cluster.gpu_memory_gb is not set (this run needs about "
                f"{worst.need / GiB:.1f} GiB per GPU); name a cluster preset (cluster=a100_80gb, ...) or set "
                "cluster.gpu_memory_gb to check it before launching"]
    if worst.fit.fits:
        return []
    if not c.check_memory:
        return [f"warning: the estimate says this run does not fit the GPU ({worst.need / GiB:.1f} GiB "
                f"per GPU needed, {worst.fit.budget_bytes / GiB:.1f} usable); launching anyway ({SKIP_OFF})"]
    raise ExperimentError(refusal(plan, estimates))


def refusal(plan: RunPlan, estimates: list[MemoryEstimate]) -> str:
    worst = estimates[0]
    c, t = plan.cfg.cluster, worst.plan.cfg.train
    failing = [e for e in estimates if not e.fit.fits]
    where = (f" [{len(failing)} of {len(estimates)} sweep trial configs do not fit; the largest of them: {worst.label}]"
             if worst.trial else "")
    micro = f", {t.grad_accum_steps} micro-batches" if t.grad_accum_steps > 1 else ""
    text = (f"{plan.source}{where}: training does not fit the GPU: it needs {worst.need / GiB:.1f} GiB per GPU "
            f"(activations {worst.memory['activations'] / GiB:.1f} GiB for {worst.plan.per_worker_batch} images per "
            f"GPU in {worst.precision}{micro}), and {usable(worst, c.gpu_memory_gb, verb=' is')}. "
            "Nothing was started. ")
    if worst.fit.options:
        text += "The cheapest changes that fit, as overrides: " + "; ".join(
            f"{overrides_text(o)} ({o.per_gpu_bytes / GiB:.1f} GiB: {cost_text(o, worst)})" for o in worst.fit.options)
        text += ". "
    else:
        text += NOTHING_FITS[0].upper() + NOTHING_FITS[1:] + ". "
    return (text + f"`--dry-run` shows the breakdown. The estimate is for eager PyTorch (tarflow.memory); to launch "
                   f"anyway, add {SKIP_OFF}.")


def usable(e: MemoryEstimate, gpu_memory_gb: float, verb: str = "") -> str:
    return (f"{e.fit.budget_bytes / GiB:.1f} GiB{verb} usable ({HEADROOM:.0%} of "
            f"cluster.gpu_memory_gb={gpu_memory_gb:g})")


def overrides_text(option: FitOption) -> str:
    return " ".join(f"{k}={_value(v)}" for k, v in option.overrides.items())


def cost_text(option: FitOption, current: MemoryEstimate) -> str:
    """What an option costs, in words."""
    t = current.plan.cfg.train
    workers = option.overrides.get("cluster.num_workers", current.plan.cfg.cluster.num_workers)
    batch = t.batch_size // workers
    k = option.overrides.get("train.grad_accum_steps", t.grad_accum_steps)
    words = []
    if "train.grad_accum_steps" in option.overrides:
        words.append(f"{k} micro-batches of {batch // k}, the same gradients, no extra FLOPs")
    if "train.activation_checkpointing" in option.overrides:
        words.append(f"+{option.extra_compute:.0%} training FLOPs to recompute the layers")
    if "cluster.num_workers" in option.overrides:
        words.append(f"{workers} GPUs at {batch} images each, global batch {t.batch_size} unchanged")
    if "train.precision" in option.overrides:
        words.append("bf16 autocast instead of fp32, which changes the numerics")
    return ", ".join(words)


def _value(v) -> str:
    return str(v).lower() if isinstance(v, bool) else str(v)
