"""The life of one run: load an experiment, take the run's lease, start (or find again) its tracked MLflow
run, train it to the end on Ray Train, and write its result marker; a finished run is never retrained, and
new evaluation settings for it are evaluated on its final checkpoint in nested MLflow runs.

Storage is the record of truth: the checkpoints say how far a run got, and `<run>/result.json` says what is
finished and evaluated: {"metrics", "mlflow_run_id", "run_key", "checkpoint", "seconds", "tracking_behind",
"evaluations": {evaluation key: {"run_id", "eval", "metrics"}}}. MLflow follows; when it was unreachable,
what it missed waits in `<run>/tracking_backlog.json` and is replayed by the next command that can reach it.
"""

from __future__ import annotations

import dataclasses
import json
import posixpath
import re
import subprocess
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from tarflow.training import CheckpointCorrupt

from .config import compose_experiment, redact_uri, with_dotlist, with_overrides
from .errors import RESUME_FAILED, ExperimentError, RunFailed
from .evaluation import CHECKPOINT_FILE, EVALUATED_PREFIX, FINAL_FILE
from .lease import RunLease
from .lineage import log_data_input
from .plan import RunPlan, evaluation_key, plan_run, short_hash, storage_safe
from .records import (
    ARCH_TAG,
    CONFIG_HASH_TAG,
    EVAL_KEY_TAG,
    EVALUATION,
    FAILURE_TAG,
    KIND_TAG,
    PARENT_TAG,
    RUN,
    SCALE_TAG,
    SETTING_TAG,
    STORAGE_TAG,
    flat_params,
    resolved_config,
    setting_label,
)
from .storage import RunStorage, storage_from_config
from .tracking import BACKLOG_FILE, Tracker, replay_backlog, resolve_tracking_uri
from .weights import check_weights, find_weights

RESULT_FILE = "result.json"
CONFIG_FILE = "config.yaml"
SET_ASIDE_DIR = "corrupt"  # <run>/corrupt/: checkpoints found corrupt, kept, not used


def load_experiment(experiment: str, overrides: list[str], require_data: bool = True
                    ) -> tuple[RunPlan, RunStorage, str]:
    """An experiment YAML + overrides, composed, checked and planned: (plan, storage, tracking URI)."""
    cfg = compose_experiment(experiment, overrides)
    plan = plan_run(cfg, source=Path(experiment).name, require_data=require_data)
    return plan, storage_from_config(cfg), resolve_tracking_uri(cfg)


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def read_result(storage: RunStorage, run_name: str) -> dict | None:
    return storage.read_json(f"{run_name}/{RESULT_FILE}")


def write_result(storage: RunStorage, run_name: str, result: dict) -> None:
    storage.write_text(f"{run_name}/{RESULT_FILE}", json.dumps(result, indent=1))


def latest_checkpoint(storage: RunStorage, run_name: str) -> str | None:
    names = storage.checkpoints(run_name)
    return names[-1] if names else None


# ---------------------------------------------------------------------------------------------
# Checkpoints: verified before a launch; a corrupt one is refused, or set aside when asked


def checkpoint_to_resume(plan: RunPlan, storage: RunStorage, set_aside_corrupt: bool) -> str | None:
    """The latest checkpoint of the run, checked against its checksum before any cluster work.

    A corrupt one stops the launch (it would fail the same way on every retry) with what to do; with
    set_aside_corrupt it is moved to <run>/corrupt/ and the one before it is used. A read that fails is an
    I/O problem of the storage, said as such."""
    names = storage.checkpoints(plan.run_name)
    while names:
        name = names[-1]
        try:
            storage.verify_file(f"{plan.run_name}/{name}/{CHECKPOINT_FILE}")
            return name
        except CheckpointCorrupt as e:
            previous = names[-2] if len(names) > 1 else None
            if not set_aside_corrupt:
                raise ExperimentError(
                    f"{RESUME_FAILED} {name} of run {plan.run_name}: {e}. It would fail the same way on every "
                    f"retry, so nothing was started, and nothing was deleted. To resume from "
                    + (f"the checkpoint before it ({previous})" if previous else "scratch (it is the only one)")
                    + ", rerun the same command with --set-aside-corrupt-checkpoint: the bad one is kept in "
                    f"{plan.run_name}/{SET_ASIDE_DIR}/") from None
            set_aside(plan, storage, name)
            names.pop()
        except OSError as e:
            raise RunFailed(f"could not read checkpoint {name} of run {plan.run_name} from "
                            f"{redact_uri(storage.describe())} to check it ({e}); this is an I/O problem of the "
                            "storage, not of the checkpoint: rerun when the storage answers") from None
    return None


def set_aside(plan: RunPlan, storage: RunStorage, name: str) -> None:
    """Move a corrupt checkpoint into <run>/corrupt/, with Ray Train's record of the run's checkpoints (which
    names it), so the next launch starts from the previous checkpoint (the driver passes it explicitly)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    storage.move_dir(f"{plan.run_name}/{name}", f"{plan.run_name}/{SET_ASIDE_DIR}/{name}-{stamp}")
    snapshot = "checkpoint_manager_snapshot.json"
    if storage.read_bytes(f"{plan.run_name}/{snapshot}") is not None:
        storage.move_file(f"{plan.run_name}/{snapshot}", f"{plan.run_name}/{SET_ASIDE_DIR}/{snapshot}-{stamp}")
    print(f"[orchestrator] set aside corrupt checkpoint {name} of {plan.run_name} in "
          f"{plan.run_name}/{SET_ASIDE_DIR}/{name}-{stamp}", flush=True)


# ---------------------------------------------------------------------------------------------
# Tracking: started by the driver; caught up from storage when it was behind


def start_tracked_run(plan: RunPlan, storage: RunStorage, tracker: Tracker, parent_run_id: str | None = None,
                      extra_tags: dict | None = None) -> str:
    """The MLflow run of this config, tagged, with the resolved config stored.

    An MLflow run of the same config is continued only when storage has checkpoints of it: a run whose
    storage is empty (wiped, or another storage) starts afresh, and the old MLflow run is tagged superseded,
    so its metrics never stand for the new training."""
    import ray

    tags = {"git_commit": git_commit(), CONFIG_HASH_TAG: plan.run_key, SCALE_TAG: plan.cfg.experiment.scale,
            ARCH_TAG: plan.arch, KIND_TAG: RUN, "storage": f"{redact_uri(storage.describe())}/{plan.run_name}",
            STORAGE_TAG: json.dumps({"uri": redact_uri(storage.uri), "endpoint_url": redact_uri(storage.endpoint_url),
                                     "run_name": plan.run_name}),
            **(extra_tags or {})}
    if parent_run_id:
        tags[PARENT_TAG] = parent_run_id
    exp_id = tracker.experiment_id(plan.experiment_name)
    fresh = latest_checkpoint(storage, plan.run_name) is None
    old = tracker.find_run(exp_id, plan.run_key) if fresh else None
    stale = old is not None and tracker.has_metrics(old.info.run_id)
    run_id = tracker.start_run(exp_id, plan.run_key, plan.display_name, flat_params(plan.cfg), tags=tags,
                               continue_existing=not stale)
    if stale:
        print(f"[orchestrator] MLflow run {old.info.run_id} of this config has no checkpoint in "
              f"{redact_uri(storage.describe())}/{plan.run_name} (storage wiped or changed): training starts afresh "
              f"in a new MLflow run {run_id}; the old one is tagged superseded", flush=True)
    tracker.set_tags(run_id, {"ray_job_id": ray.get_runtime_context().get_job_id()})
    log_data_input(tracker.client, run_id, plan.data, plan.cfg.storage.endpoint_url)
    storage.write_text(f"{plan.run_name}/{CONFIG_FILE}", resolved_config(plan.cfg))
    return run_id


def catch_up_tracking(storage: RunStorage, run_name: str, tracker: Tracker) -> bool:
    """Replay what MLflow missed of a run (its backlog in storage). Returns False if MLflow still misses it."""
    backlog = storage.read_json(f"{run_name}/{BACKLOG_FILE}")
    if backlog is None:
        return True
    try:
        replay_backlog(tracker, backlog)
    except Exception as e:  # still unreachable: the backlog stays for the next command
        print(f"[orchestrator] MLflow is still behind on {run_name} ({type(e).__name__}); "
              f"{len(backlog)} record(s) stay in {BACKLOG_FILE}", flush=True)
        return False
    storage.delete(f"{run_name}/{BACKLOG_FILE}")
    done = read_result(storage, run_name)
    if done and done.get("tracking_behind"):
        done["tracking_behind"] = False
        write_result(storage, run_name, done)
    print(f"[orchestrator] MLflow caught up on {run_name}: {len(backlog)} record(s) replayed", flush=True)
    return True


def catch_up_experiment(storage: RunStorage, experiment: str, tracker: Tracker) -> None:
    """Every run of an experiment (its trials included) that left a backlog."""
    own = re.compile(re.escape(storage_safe(experiment)) + r"-\d+-\d+-\d+-\d+-[0-9a-f]{10}")  # plan.run_name
    for name in storage.list(""):
        if own.fullmatch(name) and storage.read_bytes(f"{name}/{BACKLOG_FILE}") is not None:
            catch_up_tracking(storage, name, tracker)


def after_training(storage: RunStorage, run_name: str, tracker: Tracker, actions: list[dict]) -> bool:
    """The driver's own tracking after a fit (tags, final statuses): done now, or added to the run's
    backlog when MLflow does not answer. Returns whether MLflow is up to date."""
    try:
        backlog = storage.read_json(f"{run_name}/{BACKLOG_FILE}") or []
    except OSError:  # the storage itself is gone (a failed run may be why): MLflow gets what it can now
        backlog = None
    try:
        replay_backlog(tracker, [*(backlog or []), *actions])
    except Exception:  # an outage: everything waits in storage, in order
        if backlog is None:
            print(f"[orchestrator] neither MLflow nor the storage answers: {len(actions)} tracking record(s) of "
                  f"{run_name} are lost", flush=True)
            return False
        storage.write_text(f"{run_name}/{BACKLOG_FILE}", json.dumps([*backlog, *actions]))
        return False
    if backlog:
        storage.delete(f"{run_name}/{BACKLOG_FILE}")
    return True


def tracking_behind_message(storage: RunStorage, run_name: str, tracker: Tracker) -> str:
    return (f"[orchestrator] training finished and its result is in {redact_uri(storage.describe())}/{run_name}, but "
            f"MLflow at {redact_uri(tracker.uri)} is behind: what it missed is kept in {run_name}/{BACKLOG_FILE}. It "
            "catches up by itself at the next `python -m orchestrator.run` of this experiment, or now with "
            "`python -m orchestrator.report <experiment.yaml>` once the server answers.")


# ---------------------------------------------------------------------------------------------
# Training and evaluating


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
            f"the run {plan.run_name} lost its storage and Ray Train ran out of restarts (cluster.max_failures="
            f"{plan.cfg.cluster.max_failures}): {gone}. The last checkpoint it saved is {where}; nothing up to it is "
            "lost. Rerun the same command when the storage answers: it resumes from there.")
    return e


def train_to_end(plan: RunPlan, storage: RunStorage, tracker: Tracker, run_id: str, evaluations=(),
                 callbacks=(), resume_from: str | None = None, progress: bool = True) -> dict:
    """Fit on Ray Train (resuming from the run's last good checkpoint, see checkpoint_to_resume), then
    record the result.

    evaluations: sample-time settings (start_evaluation_run) evaluated on the final model in their own runs;
    without them the run's own eval section is evaluated into the run itself."""
    import ray

    from .progress import CheckpointNotifier, ProgressPrinter, RunBoard
    from .trainer import build_trainer

    started = time.time()
    init = dataclasses.asdict(find_weights(plan.cfg.model.init_from, storage)) if plan.cfg.model.init_from else None
    board = RunBoard.remote()
    trainer = build_trainer(plan, storage, tracker.uri, run_id, evaluations,
                            [*callbacks, CheckpointNotifier(board)], resume_from=resume_from,
                            board=board if progress else None, init_from=init)
    printer = ProgressPrinter(board, plan.display_name)
    try:
        with printer:
            result = trainer.fit()
        if result.error is not None:
            raise result.error
    except Exception as e:
        failure = explain_failure(e, plan, storage, printer.last_checkpoint)
        after_training(storage, plan.run_name, tracker, [
            {"kind": "tags", "run_id": run_id, "values": {FAILURE_TAG: str(failure)[:4000]}},
            {"kind": "status", "run_id": run_id, "status": "FAILED"}])
        if failure is e:
            raise
        raise failure from None
    finally:
        ray.kill(board)

    final = storage.read_json(f"{plan.run_name}/{FINAL_FILE}") or {"metrics": {}, "evaluations": {}}
    metrics = {**final["metrics"], "step": result.metrics.get("step")}
    own = [] if evaluations else [{"key": evaluation_key(plan.cfg), "run_id": run_id,
                                   "eval": OmegaConf.to_container(plan.cfg.eval, resolve=True)}]
    record = {"metrics": metrics, "mlflow_run_id": run_id, "run_key": plan.run_key,
              "checkpoint": latest_checkpoint(storage, plan.run_name), "seconds": time.time() - started,
              "evaluations": {e["key"]: {"run_id": e["run_id"], "eval": e["eval"],
                                         "metrics": {**metrics, **final["evaluations"].get(e["run_id"], {})}}
                              for e in [*own, *evaluations]}}
    actions = ([{"kind": "tags", "run_id": run_id, "values": {EVAL_KEY_TAG: own[0]["key"]}}] if own else [])
    actions += [{"kind": "status", "run_id": e["run_id"], "status": "FINISHED"} for e in [*evaluations]]
    actions += [{"kind": "status", "run_id": run_id, "status": "FINISHED"}]
    record["tracking_behind"] = not after_training(storage, plan.run_name, tracker, actions)
    write_result(storage, plan.run_name, record)
    if record["tracking_behind"]:
        print(tracking_behind_message(storage, plan.run_name, tracker), flush=True)
    return metrics


def run_experiment(plan: RunPlan, storage: RunStorage, tracking_uri: str, set_aside_corrupt: bool = False) -> dict:
    """Train (or resume) one run to the end; returns its final metrics. A finished run is not retrained: if
    the eval section changed since, the new settings are evaluated on its final checkpoint."""
    from .trainer import init_ray

    done = read_result(storage, plan.run_name)
    if done is not None and evaluation_key(plan.cfg) in done.get("evaluations", {}):
        metrics = done["evaluations"][evaluation_key(plan.cfg)]["metrics"]
        if done.get("tracking_behind") or storage.read_bytes(f"{plan.run_name}/{BACKLOG_FILE}") is not None:
            catch_up_tracking(storage, plan.run_name, Tracker(tracking_uri))
        print(f"[orchestrator] {plan.run_name} already finished and evaluated with these settings; not "
              f"retraining. Final metrics: {metrics}")
        return metrics

    with RunLease(storage, plan.run_name, f"orchestrator.run of {plan.display_name}"):
        tracker = Tracker(tracking_uri)
        tracker.experiment_id(plan.experiment_name)  # created here, in the driver, never by workers
        catch_up_tracking(storage, plan.run_name, tracker)
        done = read_result(storage, plan.run_name)  # again, now that no other driver can change it
        resume_from = checkpoint_to_resume(plan, storage, set_aside_corrupt) if done is None else None
        if plan.cfg.model.init_from:  # a wrong name or shape fails here, before Ray starts
            check_weights(find_weights(plan.cfg.model.init_from, storage), plan.model)
        init_ray(plan.cfg)
        if done is not None:
            print(f"[orchestrator] {plan.run_name} already finished; evaluating the new eval settings on its final "
                  f"checkpoint {done['checkpoint']} (not retraining)", flush=True)
            metrics = evaluate_many(plan.cfg, storage, tracker, [(plan, done, [{}])], bpd=plan.cfg.eval.bpd)[0][0]
            print(f"[orchestrator] {plan.run_name} evaluated: {metrics}")
            return metrics
        run_id = start_tracked_run(plan, storage, tracker)
        metrics = train_to_end(plan, storage, tracker, run_id, resume_from=resume_from)
    print(f"[orchestrator] {plan.run_name} finished: {metrics}")
    return metrics


def missing_evaluations(plan: RunPlan, done: dict, settings: list[dict]) -> list[dict]:
    """The sample-time settings (eval.* overrides; {} = the eval section as it is) not yet evaluated."""
    have = done.get("evaluations", {})
    return [s for s in settings if evaluation_key(with_overrides(plan.cfg, s, plan.source)) not in have]


def evaluate_many(cfg: DictConfig, storage: RunStorage, tracker: Tracker, runs: list[tuple], bpd: bool,
                  extra_tags: dict | None = None) -> list[list[dict]]:
    """Finished runs [(plan, result marker, settings)] evaluated from their final checkpoints by one Ray Train
    job on cfg's workers: each setting (eval.* overrides; {} = the eval section as it is) in a nested run of
    its own, recorded in the run's result marker. Returns each setting's metrics, the run's underneath."""
    from .trainer import build_evaluator

    jobs, started = [], []
    for plan, done, settings in runs:
        evaluations = [start_evaluation_run(tracker, plan, done["mlflow_run_id"],
                                            with_overrides(plan.cfg, s, plan.source), s, bpd, extra_tags)
                       for s in settings]
        started.append(evaluations)
        jobs.append({"cfg": OmegaConf.to_container(plan.cfg, resolve=True), "source": plan.source,
                     "run_name": plan.run_name, "checkpoint": done["checkpoint"], "evaluations": evaluations})
    name = f"evaluate-{short_hash([j['run_name'] for j in jobs])}-{time.strftime('%Y%m%d-%H%M%S')}"
    try:
        result = build_evaluator(cfg, storage, tracker.uri, jobs, name).fit()
        if result.error is not None:
            raise result.error
    except Exception:
        for (plan, _, _), evaluations in zip(runs, started):
            after_training(storage, plan.run_name, tracker,
                           [{"kind": "status", "run_id": e["run_id"], "status": "FAILED"} for e in evaluations])
        raise
    out = []
    for (plan, done, _), evaluations in zip(runs, started):
        metrics = []
        for e in evaluations:
            m = storage.read_json(f"{plan.run_name}/{EVALUATED_PREFIX}{e['run_id']}.json") or {}
            done.setdefault("evaluations", {})[e["key"]] = {"run_id": e["run_id"], "eval": e["eval"],
                                                            "metrics": {**done["metrics"], **m}}
            metrics.append({**done["metrics"], **m})
        behind = not after_training(storage, plan.run_name, tracker,
                                    [{"kind": "status", "run_id": e["run_id"], "status": "FINISHED"}
                                     for e in evaluations])
        done["tracking_behind"] = done.get("tracking_behind") or behind
        write_result(storage, plan.run_name, done)
        if behind:
            print(tracking_behind_message(storage, plan.run_name, tracker), flush=True)
        out.append(metrics)
    return out


# ---------------------------------------------------------------------------------------------
# A finished run, named the ways a user would name it


def find_finished_run(source: str, overrides: list[str]) -> tuple[DictConfig, RunStorage, str, dict]:
    """(its stored config with the overrides, the storage holding it, its run name, its result marker).

    source: a run's directory (a path, or s3://bucket/prefix/<run>), a run name in the storage the overrides
    name (storage.uri=..., default ./runs), or an MLflow run id (its tracking URI from tracking.uri=... or
    MLFLOW_TRACKING_URI)."""
    settings = with_dotlist({}, [o for o in overrides if o.split("=")[0].split(".")[0] in ("storage", "tracking")],
                            "command line")
    endpoint = settings.storage.endpoint_url
    if re.fullmatch(r"[0-9a-f]{32}", source):
        tracker = Tracker(resolve_tracking_uri(settings))
        try:
            tags = tracker.client.get_run(source).data.tags
        except Exception as e:
            raise ExperimentError(f"MLflow run {source} is not in {redact_uri(tracker.uri)} ({type(e).__name__})") \
                from None
        if STORAGE_TAG not in tags:
            raise ExperimentError(f"MLflow run {source} is not a training run of this project (no {STORAGE_TAG} tag)")
        where = json.loads(tags[STORAGE_TAG])
        if "***" in where["uri"]:
            raise ExperimentError(f"MLflow run {source} is stored at {where['uri']}, whose credentials were "
                                  "redacted: name its directory or storage instead")
        storage, run_name = RunStorage(where["uri"], endpoint or where["endpoint_url"]), where["run_name"]
    elif "/" in source.rstrip("/") or source.startswith("s3://") or Path(source).is_dir():
        parent, run_name = posixpath.split(source.rstrip("/"))
        storage = RunStorage(parent or ".", endpoint)
    else:
        storage, run_name = storage_from_config(settings), source
    done = read_result(storage, run_name)
    if done is None:
        raise ExperimentError(f"{redact_uri(storage.describe())}/{run_name} is not a finished run (no {RESULT_FILE}); "
                              "give a finished run's directory, its name in storage.uri=..., or its MLflow run id")
    stored = storage.read_text(f"{run_name}/{CONFIG_FILE}")
    cfg = OmegaConf.to_container(OmegaConf.create(stored), resolve=True)
    cfg["storage"] = {**cfg["storage"], "uri": storage.uri, "endpoint_url": storage.endpoint_url}
    return with_dotlist(cfg, overrides, f"{run_name}/{CONFIG_FILE}"), storage, run_name, done
