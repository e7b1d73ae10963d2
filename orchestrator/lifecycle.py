"""The life of one run on the driver: load an experiment, take the run's lease, start (or find again) its
MLflow run, train it on Ray Train, evaluate it and record its result marker (rundir.py). A finished run is
never retrained: new evaluation settings are evaluated on its final checkpoint (reevaluate.py).
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import time
from contextlib import nullcontext
from pathlib import Path

import ray
from omegaconf import OmegaConf

from .config import compose_experiment, redact_uri, redacted
from .errors import RESUME_FAILED, ExperimentError, RunFailed
from .evaluation import check_inception_weights, uses_fid
from .lease import LeaseHeld, RunLease
from .lineage import log_data_input
from .plan import RunPlan, evaluation_key, plan_run
from .progress import CheckpointNotifier, ProgressPrinter, RunBoard
from .records import (
    ARCH_TAG,
    ATTEMPTS_TAG,
    CONFIG_HASH_TAG,
    EVAL_KEY_TAG,
    FAILURE_TAG,
    KIND_TAG,
    PARENT_TAG,
    RUN,
    SCALE_TAG,
    STORAGE_TAG,
    flat_params,
    resolved_config,
)
from .reevaluate import evaluate_many
from .rundir import LEASE_FILE, RunDir, runs_of
from .storage import RunStorage, storage_from_config
from .tracking import Tracker, resolve_tracking_uri
from .train_loop import train_loop_per_worker
from .trainer import fit, init_ray, torch_trainer
from .weights import check_weights, find_weights


def load_experiment(experiment: str, overrides: list[str], require_data: bool = True
                    ) -> tuple[RunPlan, RunStorage, str]:
    """An experiment YAML + overrides, composed, checked and planned: (plan, storage, tracking URI)."""
    cfg = compose_experiment(experiment, overrides)
    plan = plan_run(cfg, source=Path(experiment).name, require_data=require_data)
    if uses_fid(cfg):  # a weights file that would fail on the workers fails here, before any work
        check_inception_weights(cfg.eval.fid.inception_weights, cfg.eval.fid.inception_sha256, require_data)
    return plan, storage_from_config(cfg), resolve_tracking_uri(cfg)


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


# ---------------------------------------------------------------------------------------------
# Tracking: started by the driver; caught up from storage when it was behind


def start_tracked_run(plan: RunPlan, run: RunDir, tracker: Tracker, parent_run_id: str | None = None,
                      extra_tags: dict | None = None) -> str:
    """The MLflow run of this config, tagged, with the resolved config stored.

    An MLflow run of the same config is continued only when storage has checkpoints of it: a run whose
    storage is empty (wiped, or another storage) starts afresh, and the old MLflow run is tagged superseded,
    so its metrics never stand for the new training."""
    storage = run.storage
    tags = {"git_commit": git_commit(), CONFIG_HASH_TAG: plan.run_key, SCALE_TAG: plan.cfg.experiment.scale,
            ARCH_TAG: plan.arch, KIND_TAG: RUN, "storage": run.describe(),
            STORAGE_TAG: json.dumps({"uri": redact_uri(storage.uri), "endpoint_url": redact_uri(storage.endpoint_url),
                                     "run_name": run.name}),
            **(extra_tags or {})}
    if parent_run_id:
        tags[PARENT_TAG] = parent_run_id
    exp_id = tracker.experiment_id(plan.experiment_name)
    old = tracker.find_run(exp_id, plan.run_key) if run.latest_checkpoint() is None else None
    stale = old is not None and tracker.has_metrics(old.info.run_id)
    run_id = tracker.start_run(exp_id, plan.run_key, plan.display_name, flat_params(plan.cfg), tags=tags,
                               continue_existing=not stale)
    if stale:
        print(f"[orchestrator] MLflow run {old.info.run_id} of this config has no checkpoint in {run.describe()} "
              f"(storage wiped or changed): training starts afresh in a new MLflow run {run_id}; the old one is "
              "tagged superseded", flush=True)
    tracker.set_tags(run_id, {"ray_job_id": ray.get_runtime_context().get_job_id()})
    log_data_input(tracker.client, run_id, plan.data, plan.cfg.storage.endpoint_url)
    run.write_config(resolved_config(plan.cfg))
    return run_id


def replay_tracking(run: RunDir, tracker: Tracker) -> bool:
    """What MLflow missed of a run whose lease this process holds; the result marker says when it caught up."""
    if not run.backlog.replay(tracker):
        return False
    done = run.read_result()
    if done and done.get("tracking_behind"):
        run.write_result({**done, "tracking_behind": False})
    return True


def catch_up(run: RunDir, tracker: Tracker) -> bool:
    """Replay the backlogs of a run and of its sample jobs, each under its own lease: a directory a live
    driver holds is left to that driver. Returns whether MLflow has everything."""
    caught_up = True
    for d in [run, *run.sample_jobs()]:
        if not d.backlog.exists():
            continue
        try:
            with RunLease(d, "catching up MLflow"):
                caught_up &= replay_tracking(d, tracker)
        except LeaseHeld:
            print(f"[orchestrator] {d.name} is being driven by another launch: its driver delivers its tracking",
                  flush=True)
            caught_up = False
    return caught_up


def catch_up_experiment(storage: RunStorage, experiment: str, tracker: Tracker) -> None:
    """Every run directory of an experiment (experiment.name; its trials included) that left a backlog."""
    for run in runs_of(storage, experiment):
        catch_up(run, tracker)


# ---------------------------------------------------------------------------------------------
# Training and evaluating


def on_this_node(actor_class):
    """An actor class pinned to the driver's node: it must outlive the workers' nodes (an elastic run loses some,
    and a worker that asks a dead board fails every restart), and it goes with the driver anyway."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    node = ray.get_runtime_context().get_node_id()
    return actor_class.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False))


def explain_failure(e: Exception, plan: RunPlan, storage: RunStorage, last_checkpoint: str | None) -> Exception:
    """A failed fit as one paragraph where the cause is known; the exception itself otherwise."""
    if RESUME_FAILED in str(e):  # raised in a worker, it reaches us wrapped by Ray: keep its one line
        line = next(x for x in str(e).splitlines() if RESUME_FAILED in x)
        return ExperimentError(line[line.index(RESUME_FAILED):] + ". Nothing was deleted.")
    try:
        storage.check()
    except ExperimentError as gone:
        where = last_checkpoint.rstrip("/").rsplit("/", 1)[-1] if last_checkpoint else "none yet"
        return RunFailed(
            f"the run {plan.run_name} lost its storage for longer than its requests are retried (storage."
            f"retry_seconds={storage.retry_seconds:g}) and Ray Train ran out of restarts (cluster.max_failures="
            f"{plan.cfg.cluster.max_failures}): {gone}. The last checkpoint it saved is {where}; nothing up to it is "
            "lost. Rerun the same command when the storage answers: it resumes from there.")
    return e


def train_evaluate_and_record(plan: RunPlan, run: RunDir, tracker: Tracker, run_id: str, evaluations=(),
                              callbacks=(), resume_from: str | None = None, progress: bool = True,
                              lease: RunLease | None = None) -> dict:
    """Fit on Ray Train (resuming from resume_from, the checkpoint RunDir.checkpoint_to_resume chose), evaluate
    the final model, then write the result marker. Returns the final metrics.

    evaluations: sample-time settings (reevaluate.start_evaluation_run) evaluated on the final model in their own
    runs; without them the run's own eval section is evaluated into the run itself. lease: the run's, which the
    workers check before they write; once another launch takes it over, the launch ends in RunFailed."""
    started = time.time()
    step = fit_training(plan, run, tracker, run_id, evaluations, callbacks, resume_from, progress, lease)
    final = run.read_final() or {"metrics": {}, "evaluations": {}}
    metrics = {**final["metrics"], "step": step}
    own = [] if evaluations else [{"key": evaluation_key(plan.cfg), "run_id": run_id,
                                   "eval": OmegaConf.to_container(plan.cfg.eval, resolve=True)}]
    record = {"metrics": metrics, "mlflow_run_id": run_id, "run_key": plan.run_key,
              "checkpoint": run.latest_checkpoint(), "seconds": time.time() - started,
              "evaluations": {e["key"]: {"run_id": e["run_id"], "eval": e["eval"],
                                         "metrics": {**metrics, **final["evaluations"].get(e["run_id"], {})}}
                              for e in [*own, *evaluations]}}
    actions = ([{"kind": "tags", "run_id": run_id, "values": {EVAL_KEY_TAG: own[0]["key"]}}] if own else [])
    actions += [{"kind": "status", "run_id": e["run_id"], "status": "FINISHED"} for e in [*evaluations]]
    actions += [{"kind": "status", "run_id": run_id, "status": "FINISHED"}]
    raise_if_taken_over(plan, lease)
    record["tracking_behind"] = not run.backlog.deliver_or_keep(tracker, actions)
    run.write_result(record)
    if record["tracking_behind"]:
        print(run.backlog.behind_message(tracker.uri), flush=True)
    return metrics


def fit_training(plan: RunPlan, run: RunDir, tracker: Tracker, run_id: str, evaluations, callbacks,
                 resume_from: str | None, progress: bool, lease: RunLease | None = None) -> int:
    """The Ray Train job of a run, watched (progress lines, the last checkpoint known safe, the run's lease); a
    failure is recorded in MLflow and explained in one paragraph where its cause is known. Returns the final
    step."""
    init = dataclasses.asdict(find_weights(plan.cfg.model.init_from, run.storage)) if plan.cfg.model.init_from \
        else None
    board = on_this_node(RunBoard).remote(earlier_attempts(tracker, run_id))
    loop_config = {"cfg": OmegaConf.to_container(plan.cfg, resolve=True), "source": plan.source,
                   "tracking_uri": tracker.uri, "mlflow_run_id": run_id, "resolved_config": redacted(plan.cfg),
                   "resume_from": resume_from, "board": board, "init_from": init, "evaluations": list(evaluations)}
    trainer = torch_trainer(train_loop_per_worker, loop_config, plan.cfg, run.storage, plan.run_name,
                            plan.cfg.cluster.max_failures, [*callbacks, CheckpointNotifier(board)])
    printer = ProgressPrinter(board, plan.display_name, show=progress)
    watched = lease.watched(board.lease_held.remote, board.lease_lost.remote) if lease else nullcontext()
    try:
        with watched, printer:
            result = fit(trainer)
    except Exception as e:
        raise_if_taken_over(plan, lease)  # the MLflow run is the other launch's: nothing recorded
        failure = explain_failure(e, plan, run.storage, printer.last_checkpoint)
        run.backlog.deliver_or_keep(tracker, [
            {"kind": "tags", "run_id": run_id, "values": {FAILURE_TAG: str(failure)[:4000]}},
            {"kind": "status", "run_id": run_id, "status": "FAILED"}])
        if failure is e:
            raise
        raise failure from None
    finally:
        ray.kill(board)
    raise_if_taken_over(plan, lease)
    return result.metrics.get("step")


def earlier_attempts(tracker: Tracker, run_id: str) -> list[dict]:
    """The starts of the run's workers its earlier launches recorded; this launch's are added after them."""
    try:
        return json.loads(tracker.client.get_run(run_id).data.tags.get(ATTEMPTS_TAG, "[]"))
    except Exception:  # unreadable or unreachable: the tag starts again from this launch
        return []


def raise_if_taken_over(plan: RunPlan, lease: RunLease | None) -> None:
    """Once another launch took the run over, this one ends here, in one paragraph."""
    if lease is None or lease.still_ours():
        return
    raise RunFailed(
        f"the run {plan.run_name} was taken over by another launch ({lease.lost}): this launch's driver had not "
        f"renewed the run's lease ({lease.rundir.describe(LEASE_FILE)}) for longer than its {lease.ttl:.0f} s "
        "(the driver frozen or suspended, or cut off from the storage). That launch drives the run now, from its "
        "latest checkpoint and in the same MLflow run; this one stopped without writing more to either, so no "
        "step is lost or counted twice. Watch the other launch, or stop it and rerun this command to drive the "
        "run from here.") from None


def run_experiment(plan: RunPlan, storage: RunStorage, tracking_uri: str, set_aside_corrupt: bool = False) -> dict:
    """Train (or resume) one run to the end; returns its final metrics. A finished run is not retrained: if
    the eval section changed since, the new settings are evaluated on its final checkpoint."""
    run = RunDir(storage, plan.run_name)
    done = run.read_result()
    if done is not None and evaluation_key(plan.cfg) in done.get("evaluations", {}):
        metrics = done["evaluations"][evaluation_key(plan.cfg)]["metrics"]
        if done.get("tracking_behind") or run.backlog.exists():
            catch_up(run, Tracker(tracking_uri))
        print(f"[orchestrator] {plan.run_name} already finished and evaluated with these settings; not "
              f"retraining. Final metrics: {metrics}")
        return metrics

    with RunLease(run, f"orchestrator.run of {plan.display_name}") as lease:
        tracker = Tracker(tracking_uri)
        tracker.experiment_id(plan.experiment_name)  # created here, in the driver, never by workers
        replay_tracking(run, tracker)
        done = run.read_result()  # again, now that no other driver can change it
        resume_from = run.checkpoint_to_resume(set_aside_corrupt) if done is None else None
        if plan.cfg.model.init_from:  # a wrong name or shape fails here, before Ray starts
            check_weights(find_weights(plan.cfg.model.init_from, storage), plan.model)
        init_ray(plan.cfg)
        if done is not None:
            print(f"[orchestrator] {plan.run_name} already finished; evaluating the new eval settings on its final "
                  f"checkpoint {done['checkpoint']} (not retraining)", flush=True)
            metrics = evaluate_many(plan.cfg, storage, tracker, [(plan, done, [{}])], bpd=plan.cfg.eval.bpd)[0][0]
            print(f"[orchestrator] {plan.run_name} evaluated: {metrics}")
            return metrics
        run_id = start_tracked_run(plan, run, tracker)
        metrics = train_evaluate_and_record(plan, run, tracker, run_id, resume_from=resume_from, lease=lease)
    print(f"[orchestrator] {plan.run_name} finished: {metrics}")
    return metrics
