"""python -m orchestrator.run EXPERIMENT.yaml [key=value ...] [--dry-run]

Composes the config, checks it and every target (data, storage, tracking) before any work, then trains
on Ray Train, tracks in MLflow and keeps checkpoints in local or S3-compatible storage. Running the same
command again resumes an interrupted run and skips a finished one (evaluating only new eval settings).
With several experiment files and --dry-run it prints one budget table over them (orchestrator/budget.py).
"""

from __future__ import annotations

import argparse
import sys

from .budget import describe_budget, split_experiments
from .config import min_workers, redact_uri, redacted_yaml
from .cost import describe_bill
from .delivery import quick_failing_http
from .errors import ExperimentError, cli_entry
from .gpu_memory import check_launch, describe_memory, estimate_memory
from .lifecycle import load_experiment, run_experiment
from .periodic import describe_watching
from .plan import RunPlan
from .storage import RunStorage
from .summary import run_summary
from .sweep import describe_sweep, run_sweep, sweep_of
from .tables import publish_table
from .tracking import check_tracking
from .trainer import set_verbose


def workers_text(plan: RunPlan) -> str:
    """"2", or an elastic run's range of world sizes and what each worker then holds of the global batch."""
    c, batch = plan.cfg.cluster, plan.cfg.train.batch_size
    low = min_workers(plan.cfg)
    if low == c.num_workers:
        return str(c.num_workers)
    uneven = [w for w in range(low, c.num_workers + 1) if batch % w]
    return (f"{low}..{c.num_workers} (elastic: {-(-batch // c.num_workers)}..{plan.per_worker_batch} images each of "
            f"the global {batch}" + (f"; at {', '.join(map(str, uneven))} the shares are unequal and weighted to the "
                                     "same step" if uneven else "") + ")")


def describe_plan(plan: RunPlan, storage: RunStorage, tracking_uri: str) -> str:
    from .trainer import ray_address

    c = plan.cfg.cluster
    m = plan.model
    t = plan.cfg.train
    lines = [
        f"experiment  {plan.cfg.experiment.name} ({plan.cfg.experiment.scale} scale)  from {plan.source}",
        f"run         {plan.run_name}  (MLflow run '{plan.display_name}')",
        f"model       {m.name}  image {m.in_channels}x{m.image_size}x{m.image_size}, {m.num_tokens} tokens of "
        f"{m.token_dim}, classes {m.num_classes}, {'NVP' if m.nvp else 'VP'}",
        f"data        {plan.data.name} at {redact_uri(plan.data.root) or '(package)'}"
        + ("" if plan.data_present else "  (ABSENT here: sizes taken from the config)"),
        f"training    global batch {t.batch_size} ({plan.per_worker_batch}/worker), "
        + ("none: evaluate only" if t.steps == 0 else f"{t.steps} steps" if t.steps else f"{t.epochs:g} epochs")
        + f", noise {t.noise}" + (f" σ={t.noise_std:g}" if t.noise == "gaussian" else ""),
        f"workers     {workers_text(plan)} × ({c.cpus_per_worker:g} CPU"
        + (f", {c.gpus_per_worker:g} GPU" if c.use_gpu else "")
        + f") on Ray at {redact_uri(ray_address(plan.cfg))}; max_failures {c.max_failures}, preemptions "
        + ("any number" if c.max_preemption_failures < 0 else str(c.max_preemption_failures)),
        *([f"weights     from {redact_uri(plan.cfg.model.init_from)}"] if plan.cfg.model.init_from else []),
        f"storage     {redact_uri(storage.describe())}/{plan.run_name}",
        f"tracking    {redact_uri(tracking_uri)}  experiment '{plan.experiment_name}'",
    ]
    return "\n".join(lines)


@cli_entry
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m orchestrator.run", description=__doc__.split("\n\n")[1])
    parser.add_argument("experiment", help="experiment YAML, e.g. experiments/table2.yaml (several, with "
                                           "--dry-run: one budget table over them)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. scale=smoke train.steps=100")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the resolved config and the plan (cost, checkpoints, GPU memory per GPU), then "
                             "exit")
    parser.add_argument("--verbose", action="store_true",
                        help="also print Ray Train's and Tune's own lines (every report, checkpoint, status table)")
    parser.add_argument("--set-aside-corrupt-checkpoint", action="store_true",
                        help="if the run's latest checkpoint is corrupt, move it to <run>/corrupt/ and resume from "
                             "the one before it")
    args = parser.parse_intermixed_args(argv)
    experiments, overrides = split_experiments([args.experiment, *args.overrides])
    if len(experiments) > 1:
        if not args.dry_run:
            raise ExperimentError(f"{len(experiments)} experiment files: several are read together only with "
                                  "--dry-run (one budget table over them); launch one experiment at a time")
        print(describe_budget(experiments, overrides))
        return 0
    plan, storage, tracking_uri = load_experiment(experiments[0], overrides, require_data=not args.dry_run)
    sweep = sweep_of(plan, require_data=not args.dry_run)
    memory = estimate_memory(plan, sweep)
    description = describe_plan(plan, storage, tracking_uri) + (f"\n{describe_sweep(sweep)}" if sweep else "")
    description += "\n" + describe_bill(plan, sweep)
    description += "\n" + describe_memory(plan, memory)
    description += "\n" + describe_watching(plan.cfg, plan.model)
    if args.dry_run:
        print(redacted_yaml(plan.cfg))
        print(description)
        return 0
    notes = check_launch(plan, memory)  # a GPU run that cannot fit stops here, before storage, tracking or Ray
    storage.check()
    check_tracking(tracking_uri)
    quick_failing_http()
    set_verbose(args.verbose)
    print(description, flush=True)
    for note in notes:
        print(f"[orchestrator] {note}", flush=True)
    if sweep:
        run_sweep(sweep, storage, tracking_uri)
    else:
        run_experiment(plan, storage, tracking_uri, set_aside_corrupt=args.set_aside_corrupt_checkpoint)
    if plan.cfg.reference is not None:
        try:
            publish_table(plan, storage, tracking_uri)
        except Exception:
            try:
                check_tracking(tracking_uri)
            except ExperimentError:  # the table is built from MLflow: later, when it answers
                print("[orchestrator] the table is not rebuilt while MLflow does not answer; "
                      f"`python -m orchestrator.report {experiments[0]}` builds it then", flush=True)
            else:
                raise
    try:
        print(run_summary(plan, storage, tracking_uri, sweep), flush=True)
    except Exception as e:  # MLflow behind: what matters is in storage, and was said above
        print(f"[summary] results in {redact_uri(storage.describe())}; MLflow did not answer ({type(e).__name__})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
