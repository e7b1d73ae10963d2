"""What reproducing the paper costs: one table over several experiment files, from what their dry runs compute.

    python -m orchestrator.run experiments/*.yaml --dry-run [key=value ...]

One row per experiment: its GPUs, runs (a sweep's trials), precision, memory per GPU against the GPU, checkpoint
size and share of training time, wall-clock days, GPU-hours and, with cluster.price_per_gpu_hour, the price;
then a total. The overrides apply to every experiment. Nothing is started or touched: no Ray, storage or
tracking; absent data is sized from data.train_images.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from tarflow.memory import GiB

from .cost import Bill, CheckpointBill, checkpoint_bills, costliest, estimate_bill, size_text
from .gpu_memory import MemoryEstimate, estimate_memory
from .lifecycle import load_experiment
from .plan import RunPlan
from .sweep import sweep_of


@dataclass
class BudgetRow:
    name: str                   # the experiment file's stem
    plan: RunPlan
    bill: Bill | None           # None: the training-set size is unknown
    memory: list[MemoryEstimate]  # gpu_memory.estimate_memory: the largest first; [] for a CPU run
    checkpoints: list[CheckpointBill]  # one per run or trial


def split_experiments(args: list[str]) -> tuple[list[str], list[str]]:
    """Experiment files and Hydra overrides from one command line (an override has '=', a file ends in .yaml)."""
    experiments = [a for a in args if "=" not in a and a.endswith((".yaml", ".yml"))]
    if not experiments:  # not a YAML: compose_experiment says what is wrong with it
        experiments = args[:1]
    return experiments, [a for a in args if a not in experiments]


def budget_rows(experiments: list[str], overrides: list[str]) -> list[BudgetRow]:
    rows = []
    for path in experiments:
        plan, _, _ = load_experiment(path, overrides, require_data=False)
        sweep = sweep_of(plan, require_data=False)
        bill = estimate_bill(plan, sweep)
        rows.append(BudgetRow(Path(path).stem, plan, bill, estimate_memory(plan, sweep),
                              checkpoint_bills(plan, sweep, bill)))
    return rows


def memory_cell(memory: list[MemoryEstimate]) -> str:
    if not memory:
        return "CPU run"
    worst = memory[0]
    if worst.fit is None:
        return f"{worst.need / GiB:.1f} GiB, not checked"
    verdict = "fits" if worst.fit.fits else "does NOT fit"
    return f"{verdict}: {worst.need / GiB:.1f} of {worst.fit.budget_bytes / GiB:.1f} GiB"


def checkpoint_cell(row: BudgetRow) -> str:
    worst = costliest(row.checkpoints)
    size = size_text(worst.size_bytes)
    if row.plan.cfg.train.steps == 0:
        return f"{size}, written once"
    return f"{size}, {worst.share:.1%}" if worst.interval_seconds else size


def gpus_cell(row: BudgetRow) -> str:
    c = row.plan.cfg.cluster
    if not c.use_gpu:
        return f"CPU × {c.num_workers} workers"
    gpus = row.bill.gpus if row.bill else c.num_workers
    return f"{gpus} × {c.gpu_type or 'GPU'}"


def runs_cell(row: BudgetRow) -> str:
    if row.plan.cfg.train.steps == 0:
        return "evaluate only"
    n = len(row.checkpoints)
    if not row.plan.cfg.sweep.train_axes and not row.plan.cfg.sweep.sample_axes:
        return "1"
    return f"{n} trial{'s' if n > 1 else ''}" + (f", {row.bill.concurrent} at a time" if n > 1 and row.bill else "")


def budget_table(rows: list[BudgetRow]) -> pd.DataFrame:
    priced = any(r.bill and r.bill.price is not None for r in rows)
    out = []
    for r in rows:
        b, gpu = r.bill, r.plan.cfg.cluster.use_gpu
        cells = {"experiment": r.name, "GPUs": gpus_cell(r), "runs": runs_cell(r),
                 "precision": b.precision if b else "?", "memory per GPU": memory_cell(r.memory),
                 "checkpoint, share of time": checkpoint_cell(r),
                 "days": f"{b.days:,.1f}" if b and gpu else "?" if gpu else "-",
                 "GPU-hours": f"{b.gpu_hours:,.0f}" if b and gpu else "?" if gpu else "-"}
        if priced:
            cells["price"] = f"{b.price:,.0f}" if b and b.price is not None else "?"
        out.append(cells)
    known = [r.bill for r in rows if r.bill]
    fit = sum(bool(r.memory) and r.memory[0].fit is not None and r.memory[0].fit.fits for r in rows)
    total = {"experiment": "total", "GPUs": "", "runs": f"{sum(len(r.checkpoints) for r in rows)} runs",
             "precision": "", "memory per GPU": f"{fit} of {len(rows)} fit", "checkpoint, share of time": "",
             "days": f"{sum(b.days for b in known):,.1f}", "GPU-hours": f"{sum(b.gpu_hours for b in known):,.0f}"}
    if priced:
        total["price"] = f"{sum(b.price or 0 for b in known):,.0f}"
    return pd.DataFrame([*out, total])


def describe_budget(experiments: list[str], overrides: list[str]) -> str:
    rows = budget_rows(experiments, overrides)
    table = budget_table(rows)
    numeric = {"days", "GPU-hours", "price"}
    text = table.to_markdown(index=False, disable_numparse=True,
                             colalign=["right" if c in numeric else "left" for c in table.columns])
    unknown = [r.name for r in rows if r.bill is None]
    notes = [
        f"budget of {len(rows)} experiment(s){' with ' + ' '.join(overrides) if overrides else ''}: training only "
        "(the final evaluation, FID-50K sampling, is not counted)",
        "days: wall-clock, a sweep's trials one at a time unless sweep.max_concurrent says more; the total runs the "
        "experiments one after another. GPU-hours count every trial to its end (ASHA may stop some early)",
        "throughput: cluster.images_per_sec_per_gpu where set, else the model's FLOPs at cluster.mfu (per "
        "precision) of the peak of the precision (fp32: without TF32); an experiment's own --dry-run says what "
        "TF32 or bf16 would cost",
        "checkpoint: one checkpoint's size and the share of training time spent waiting for it, for the costliest "
        "run; memory: the largest run's peak per GPU against 90% of the GPU's (gpu_memory)",
    ]
    if unknown:
        notes.append(f"unknown length (set data.train_images): {', '.join(unknown)}")
    return text + "\n\n" + "\n".join(f"- {n}" for n in notes)
