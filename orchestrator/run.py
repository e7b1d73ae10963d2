"""python -m orchestrator.run EXPERIMENT.yaml [key=value ...] [--dry-run]

Composes the config, checks it and every target (data, storage, tracking) before any work, then trains
on Ray Train, tracks in MLflow and keeps checkpoints in local or S3-compatible storage. Running the same
command again resumes an interrupted run and skips a finished one.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from omegaconf import OmegaConf

from .cost import describe_cost, estimate_cost
from .config import ExperimentError, RunPlan, cli_entry, compose_experiment, flat_params, plan_run
from .storage import RunStorage, storage_from_config
from .tracking import Tracker, check_tracking, resolve_tracking_uri
from .train_loop import RESUME_FAILED

RESULT_FILE = "result.json"
CONFIG_FILE = "config.yaml"


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def describe_plan(plan: RunPlan, storage: RunStorage, tracking_uri: str) -> str:
    from .trainer import ray_address

    c = plan.cfg.cluster
    m = plan.model
    lines = [
        f"experiment  {plan.cfg.experiment.name} ({plan.cfg.experiment.scale} scale)  from {plan.source}",
        f"run         {plan.run_name}  (MLflow run '{plan.display_name}')",
        f"model       {m.name}  image {m.in_channels}x{m.image_size}x{m.image_size}, {m.num_tokens} tokens of "
        f"{m.token_dim}, classes {m.num_classes}, {'NVP' if m.nvp else 'VP'}",
        f"data        {plan.data.name} at {plan.data.root or '(package)'}"
        + ("" if plan.data_present else "  (ABSENT here: sizes taken from the config)"),
        f"training    global batch {plan.cfg.train.batch_size} ({plan.per_worker_batch}/worker), "
        + (f"{plan.cfg.train.steps} steps" if plan.cfg.train.steps else f"{plan.cfg.train.epochs:g} epochs")
        + f", noise {plan.cfg.train.noise}" + (f" σ={plan.cfg.train.noise_std:g}" if plan.cfg.train.noise == "gaussian"
                                                else ""),
        f"workers     {c.num_workers} × ({c.cpus_per_worker:g} CPU" + (f", {c.gpus_per_worker:g} GPU" if c.use_gpu else "")
        + f") on Ray at {ray_address(plan.cfg)}; max_failures {c.max_failures}",
        f"storage     {storage.describe()}/{plan.run_name}",
        f"tracking    {tracking_uri}  experiment '{plan.experiment_name}'",
    ]
    return "\n".join(lines)


def start_tracked_run(plan: RunPlan, storage: RunStorage, tracker: Tracker, parent_run_id: str | None = None,
                      extra_tags: dict | None = None) -> str:
    """The MLflow run of this config (found again by its hash), tagged, with the resolved config stored."""
    import ray

    tags = {"git_commit": git_commit(), "config_hash": plan.run_key, "scale": plan.cfg.experiment.scale,
            "storage": f"{storage.describe()}/{plan.run_name}", **(extra_tags or {})}
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    run_id = tracker.start_run(tracker.experiment_id(plan.experiment_name), plan.run_key, plan.display_name,
                               flat_params(plan.cfg), tags=tags)
    tracker.set_tags(run_id, {"ray_job_id": ray.get_runtime_context().get_job_id()})
    storage.write_text(f"{plan.run_name}/{CONFIG_FILE}", OmegaConf.to_yaml(plan.cfg, resolve=True))
    return run_id


def train_to_end(plan: RunPlan, storage: RunStorage, tracker: Tracker, run_id: str, sample_settings=(),
                 callbacks=()) -> dict:
    """Fit on Ray Train (resuming from the run's last checkpoint), then record the result."""
    from .trainer import build_trainer

    started = time.time()
    try:
        result = build_trainer(plan, storage, tracker.uri, run_id, sample_settings, callbacks).fit()
        if result.error is not None:
            raise result.error
    except Exception as e:
        tracker.finish(run_id, "FAILED")
        if RESUME_FAILED in str(e):  # raised in a worker, it reaches us wrapped by Ray: keep its one line
            line = next(x for x in str(e).splitlines() if RESUME_FAILED in x)
            raise ExperimentError(line[line.index(RESUME_FAILED):] + ". Nothing was deleted: remove that checkpoint "
                                  "directory to resume from the one before it.") from None
        raise
    metrics = tracker.final_metrics(run_id)
    storage.write_text(f"{plan.run_name}/{RESULT_FILE}", json.dumps(
        {"metrics": metrics, "mlflow_run_id": run_id, "run_key": plan.run_key, "seconds": time.time() - started}))
    for setting in sample_settings:
        tracker.finish(setting["run_id"], "FINISHED")
    tracker.finish(run_id, "FINISHED")
    return metrics


def run_experiment(plan: RunPlan, storage: RunStorage, tracking_uri: str) -> dict:
    """Train (or resume) one run to the end; returns its final metrics. Skips a finished run."""
    done = storage.read_json(f"{plan.run_name}/{RESULT_FILE}")
    if done is not None:
        print(f"[orchestrator] {plan.run_name} already finished; not retraining. Final metrics: {done['metrics']}")
        return done["metrics"]

    from .trainer import init_ray

    tracker = Tracker(tracking_uri)
    tracker.experiment_id(plan.experiment_name)  # created here, in the driver, never by workers
    init_ray(plan.cfg)
    run_id = start_tracked_run(plan, storage, tracker)
    metrics = train_to_end(plan, storage, tracker, run_id)
    print(f"[orchestrator] {plan.run_name} finished: {metrics}")
    return metrics


def prepare(experiment: str, overrides: list[str], require_data: bool = True) -> tuple[RunPlan, RunStorage, str]:
    cfg = compose_experiment(experiment, overrides)
    plan = plan_run(cfg, source=Path(experiment).name, require_data=require_data)
    return plan, storage_from_config(cfg), resolve_tracking_uri(cfg)


def sweep_of(plan: RunPlan, require_data: bool = True):
    """The SweepPlan of an experiment with a sweep: section, its whole search space checked before anything
    starts; None for a single run. (Ray Tune is imported only for sweeps.)"""
    if not (plan.cfg.sweep.train_axes or plan.cfg.sweep.sample_axes):
        return None
    from .sweep import plan_sweep

    return plan_sweep(plan, require_data=require_data)


@cli_entry
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m orchestrator.run", description=__doc__.split("\n\n")[1])
    parser.add_argument("experiment", help="experiment YAML, e.g. experiments/table2.yaml")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. scale=smoke train.steps=100")
    parser.add_argument("--dry-run", action="store_true", help="print the resolved config and the plan, then exit")
    args = parser.parse_intermixed_args(argv)
    plan, storage, tracking_uri = prepare(args.experiment, args.overrides, require_data=not args.dry_run)
    sweep = sweep_of(plan, require_data=not args.dry_run)
    if sweep:
        from .sweep import describe_sweep, num_trials, run_sweep

    description = describe_plan(plan, storage, tracking_uri) + (f"\n{describe_sweep(sweep)}" if sweep else "")
    description += "\n" + describe_cost(estimate_cost(plan, runs=num_trials(sweep) if sweep else 1))
    if args.dry_run:
        print(OmegaConf.to_yaml(plan.cfg, resolve=True))
        print(description)
        return 0
    storage.check()
    check_tracking(tracking_uri)
    print(description, flush=True)
    if sweep:
        run_sweep(sweep, storage, tracking_uri)
    else:
        run_experiment(plan, storage, tracking_uri)
    if plan.cfg.reference is not None:
        from .report import report

        report(plan, storage, tracking_uri)
    return 0


if __name__ == "__main__":
    sys.exit(main())
