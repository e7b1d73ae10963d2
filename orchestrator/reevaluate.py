"""New evaluation settings of finished runs, evaluated on their final checkpoints by one Ray Train job: nothing
is retrained, each setting is a nested MLflow run of its own, and the result marker records it.

    driver:  start_evaluation_run (the nested run) -> evaluate_many (the job, then the result markers)
    workers: evaluate_checkpoints_per_worker (each rank loads every model and takes its share)
"""

from __future__ import annotations

import json
import time

from omegaconf import DictConfig, OmegaConf

from .config import with_values
from .datacache import on_this_node
from .delivery import DRAIN_S, RunLogger
from .evaluation import FIDContext, evaluate_settings
from .plan import RunPlan, evaluation_key, plan_run, short_hash
from .records import (
    ARCH_TAG,
    EVAL_KEY_TAG,
    EVALUATION,
    KIND_TAG,
    PARENT_TAG,
    SCALE_TAG,
    SETTING_TAG,
    flat_params,
    setting_label,
)
from .rundir import RunDir
from .storage import RunStorage
from .tracking import Tracker
from .trainer import fit, this_worker, torch_trainer
from .weights import checkpoint_source, load_model


def start_evaluation_run(tracker: Tracker, plan: RunPlan, train_run_id: str, cfg: DictConfig, setting: dict,
                         bpd: bool, extra_tags: dict | None = None) -> dict:
    """A nested MLflow run for one evaluation of a trained model: {"eval", "run_id", "key", "setting", "bpd"}.
    bpd: whether it computes held-out BPD too (a sweep's settings share the trial's)."""
    key = evaluation_key(cfg)
    run_id = tracker.start_run(
        tracker.experiment_id(plan.experiment_name), f"{plan.run_key}-{key}",
        f"{plan.display_name}/{setting_label(setting)}",
        {k: v for k, v in flat_params(cfg).items() if k.startswith("eval.")},
        tags={PARENT_TAG: train_run_id, KIND_TAG: EVALUATION, SETTING_TAG: json.dumps(setting), EVAL_KEY_TAG: key,
              ARCH_TAG: plan.arch, SCALE_TAG: plan.cfg.experiment.scale, **(extra_tags or {})})
    return {"eval": OmegaConf.to_container(cfg.eval, resolve=True), "run_id": run_id, "key": key,
            "setting": setting, "bpd": bpd}


def missing_evaluations(plan: RunPlan, done: dict, settings: list[dict]) -> list[dict]:
    """The sample-time settings (eval.* overrides; {} = the eval section as it is) not yet evaluated."""
    have = done.get("evaluations", {})
    return [s for s in settings if evaluation_key(with_values(plan.cfg, s, plan.source)) not in have]


def evaluate_many(cfg: DictConfig, storage: RunStorage, tracker: Tracker, runs: list[tuple], bpd: bool,
                  extra_tags: dict | None = None) -> list[list[dict]]:
    """Finished runs [(plan, result marker, settings)] evaluated on cfg's workers, each setting (eval.* overrides;
    {} = the eval section as it is) recorded in the run's result marker. Returns each setting's metrics, the
    run's own underneath."""
    jobs, started = [], []
    for plan, done, settings in runs:
        evaluations = [start_evaluation_run(tracker, plan, done["mlflow_run_id"],
                                            with_values(plan.cfg, s, plan.source), s, bpd, extra_tags)
                       for s in settings]
        started.append(evaluations)
        jobs.append({"cfg": OmegaConf.to_container(plan.cfg, resolve=True), "source": plan.source,
                     "run_name": plan.run_name, "checkpoint": done["checkpoint"], "evaluations": evaluations})
    name = f"evaluate-{short_hash([j['run_name'] for j in jobs])}-{time.strftime('%Y%m%d-%H%M%S')}"
    try:
        fit(torch_trainer(evaluate_checkpoints_per_worker, {"jobs": jobs, "tracking_uri": tracker.uri}, cfg, storage,
                          name))
    except Exception:
        for (plan, _, _), evaluations in zip(runs, started):
            RunDir(storage, plan.run_name).backlog.deliver_or_keep(
                tracker, [{"kind": "status", "run_id": e["run_id"], "status": "FAILED"} for e in evaluations])
        raise
    return [record_evaluations(RunDir(storage, plan.run_name), done, evaluations, tracker)
            for (plan, done, _), evaluations in zip(runs, started)]


def record_evaluations(run: RunDir, done: dict, evaluations: list[dict], tracker: Tracker) -> list[dict]:
    """The evaluations' metrics (written by rank 0) into the run's result marker; their runs FINISHED."""
    metrics = []
    for e in evaluations:
        m = {**done["metrics"], **(run.read_evaluation(e["run_id"]) or {})}
        done.setdefault("evaluations", {})[e["key"]] = {"run_id": e["run_id"], "eval": e["eval"], "metrics": m}
        metrics.append(m)
    behind = not run.backlog.deliver_or_keep(
        tracker, [{"kind": "status", "run_id": e["run_id"], "status": "FINISHED"} for e in evaluations])
    done["tracking_behind"] = done.get("tracking_behind") or behind
    run.write_result(done)
    if behind:
        print(run.backlog.behind_message(tracker.uri), flush=True)
    return metrics


def evaluate_checkpoints_per_worker(config: dict) -> None:
    """Ray Train entry: config["jobs"] lists finished runs ({"cfg", "source", "run_name", "checkpoint",
    "evaluations"}); each rank loads every model and takes its share of every evaluation."""
    import ray.train

    rank, world, device, storage = this_worker(config)
    fid_by_data, results = {}, {}
    for job in config["jobs"]:
        cfg = OmegaConf.create(job["cfg"])
        plan = plan_run(cfg, source=job["source"])
        plan.data = on_this_node(plan.data, cfg.storage.endpoint_url, cfg.data.cache_dir)
        run = RunDir(storage, job["run_name"])
        model, step = load_model(checkpoint_source(run, job["checkpoint"]), plan.model, device)
        fid = fid_by_data.setdefault(repr(plan.data), FIDContext(cfg, plan, storage, rank, world, device))
        results[job["run_name"]] = evaluate_settings(model, cfg, plan, job["evaluations"], step, device, rank, world,
                                                     config["tracking_uri"], fid)
    pending = []
    if rank == 0:  # storage first, the record of truth; then MLflow, which may be behind
        for run_name, metrics in results.items():
            for run_id, values in metrics.items():
                RunDir(storage, run_name).write_evaluation(run_id, values)
        pending = RunLogger(config["tracking_uri"], "").queue.close(DRAIN_S)
        for job in config["jobs"]:
            mine = {e["run_id"] for e in job["evaluations"]}
            RunDir(storage, job["run_name"]).backlog.merge([r for r in pending if r["run_id"] in mine])
    ray.train.report({"evaluated": len(config["jobs"]), "tracking_pending": len(pending)})
