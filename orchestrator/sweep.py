"""Sweeps: Ray Tune over train-time axes (each trial a Ray Train run, early-stopped by ASHA), sample-time
axes evaluated on each trial's final checkpoint, nested MLflow runs, and a pandas table of the results.

A sweep is an experiment YAML with a `sweep:` section (orchestrator/schema.py: SweepSection). Rerunning
the same command continues an interrupted sweep: Tune restores its state, finished trials are skipped
and unfinished ones resume their Ray Train run from its last checkpoint.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import posixpath
import re
from dataclasses import dataclass

import pandas as pd
from omegaconf import DictConfig, OmegaConf

from . import trainer
from .config import credentials, redacted, with_credentials, with_values
from .delivery import quick_failing_http
from .errors import ExperimentError
from .lease import RunLease
from .lifecycle import catch_up_experiment, start_tracked_run, train_evaluate_and_record
from .plan import RunPlan, plan_run, short_hash
from .progress import TrialEvents
from .records import (
    BEST_OVERRIDES_TAG,
    BEST_RUN_TAG,
    BEST_TAG,
    KIND_TAG,
    OVERRIDES_TAG,
    STOPPED_TAG,
    SWEEP,
    SWEEP_TAG,
    TRIAL_TAG,
    flat_params,
    overrides_label,
    runs_frame,
    setting_label,
)
from .reevaluate import evaluate_many, missing_evaluations, start_evaluation_run
from .rundir import RunDir, sweep_dir_name
from .storage import RunStorage
from .tables import log_table
from .tracking import Tracker
from .trainer import init_ray, set_verbose

SAMPLE_KEYS = {"eval.guidance", "eval.annealed_guidance", "eval.attn_temp", "eval.denoise", "eval.denoise_step",
               "eval.sampler", "eval.jacobi.tol", "eval.jacobi.max_iters"}
KINDS = ("grid", "choice", "uniform", "loguniform")


@dataclass
class Axis:
    key: str
    kind: str        # grid, choice, uniform, loguniform
    values: list     # the listed values, or [lo, hi]

    def tune_domain(self):
        from ray import tune

        return {"grid": tune.grid_search, "choice": tune.choice}[self.kind](self.values) if self.kind in (
            "grid", "choice") else getattr(tune, self.kind)(*self.values)

    def probe_values(self) -> list:
        """Values whose configs are checked before any trial starts (the ends of a range)."""
        return list(self.values)


def expand(overrides: dict) -> dict:
    """Axes over several keys at once ("model.num_blocks,model.layers_per_block": [4, 4]) -> one per key."""
    out = {}
    for key, value in overrides.items():
        keys = key.split(",")
        out.update(zip(keys, value) if len(keys) > 1 else [(key, value)])
    return out


def parse_axis(key: str, spec, source: str) -> Axis:
    if isinstance(spec, (list, tuple)):
        kind, values = "grid", list(spec)
    elif isinstance(spec, dict) and len(spec) == 1 and next(iter(spec)) in KINDS:
        kind, values = next(iter(spec.items()))
        values = list(values) if isinstance(values, (list, tuple)) else [values]
    else:
        raise ExperimentError(f"{source}: sweep axis '{key}' must be a list or one of "
                              f"{{grid|choice: [...]}}, {{uniform|loguniform: [lo, hi]}}; got {spec!r}")
    if not values:
        raise ExperimentError(f"{source}: sweep axis '{key}' has an empty {kind} list")
    width = len(key.split(","))
    if width > 1 and (kind not in ("grid", "choice") or
                      not all(isinstance(v, (list, tuple)) and len(v) == width for v in values)):
        raise ExperimentError(f"{source}: sweep axis '{key}' moves {width} keys together: its values must be "
                              f"lists of {width}, e.g. [[2, 8], [4, 4]]; got {values}")
    if kind in ("uniform", "loguniform"):
        if len(values) != 2 or not all(isinstance(v, (int, float)) for v in values) or not values[0] < values[1]:
            raise ExperimentError(f"{source}: sweep axis '{key}': {kind} needs [lo, hi] with lo < hi, got {values}")
        if kind == "loguniform" and values[0] <= 0:
            raise ExperimentError(f"{source}: sweep axis '{key}': loguniform needs lo > 0, got {values[0]}")
    return Axis(key, kind, values)


@dataclass
class SweepPlan:
    base: RunPlan
    train_axes: list[Axis]
    sample_settings: list[dict]     # each a dict of eval.* values; [] when there are no sample axes
    sweep_key: str
    name: str                       # storage-safe: <experiment>-sweep-<key>
    display_name: str


def plan_sweep(base: RunPlan, require_data: bool = True) -> SweepPlan:
    """Check the whole search space before any trial starts: keys exist, values are valid configs."""
    cfg, source = base.cfg, base.source
    spec = OmegaConf.to_container(cfg.sweep, resolve=True)
    train_axes = [parse_axis(k, v, source) for k, v in spec["train_axes"].items()]
    sample_axes = [parse_axis(k, v, source) for k, v in spec["sample_axes"].items()]
    for axis in train_axes:
        if axis.key.startswith("eval.") or axis.key.startswith("sweep."):
            raise ExperimentError(f"{source}: '{axis.key}' is a sample-time setting; put it under sweep.sample_axes "
                                  "(sampling knobs never retrain a model)")
    for axis in sample_axes:
        if axis.key not in SAMPLE_KEYS:
            raise ExperimentError(f"{source}: sweep.sample_axes key '{axis.key}' is not a sampling knob; "
                                  f"allowed: {sorted(SAMPLE_KEYS)}")
        if axis.kind != "grid":
            raise ExperimentError(f"{source}: sample axis '{axis.key}' must be a list of values (a grid)")
    if spec["search"] not in ("grid", "random"):
        raise ExperimentError(f"{source}: sweep.search must be grid or random, got {spec['search']!r}")
    if spec["search"] == "grid" and any(a.kind in ("uniform", "loguniform") for a in train_axes):
        raise ExperimentError(f"{source}: sweep.search=grid cannot enumerate uniform/loguniform axes; "
                              "use search: random")
    if spec["scheduler"]["type"] not in ("asha", "fifo") or spec["scheduler"]["mode"] not in ("min", "max") \
            or spec["mode"] not in ("min", "max"):
        raise ExperimentError(f"{source}: sweep.scheduler.type must be asha or fifo, modes min or max")
    noise_keys = [a.key for a in train_axes if {"train.noise", "train.noise_std"} & set(a.key.split(","))]
    if spec["scheduler"]["type"] == "asha" and spec["scheduler"]["metric"] in ("loss", "bpd") and noise_keys:
        # the likelihood of data noised with a larger σ is lower whatever the model's quality
        raise ExperimentError(
            f"{source}: ASHA on '{spec['scheduler']['metric']}' would compare trials trained at different noise "
            f"levels ({noise_keys[0]}): a larger σ always gives a worse likelihood, so it would stop those trials for "
            "their σ, not their quality. Use sweep.scheduler.type=fifo (and sweep.metric=fid) for a σ axis")
    # every value of every axis must make a valid run on its own (one axis at a time keeps this cheap)
    for axis in train_axes + sample_axes:
        for value in axis.probe_values():
            plan_run(with_values(cfg, expand({axis.key: value}), source),
                     source=f"{source} [sweep {axis.key}={value}]", require_data=require_data)
    # no sample axes: no sample-time settings (product() of nothing would be one empty setting, a second
    # evaluation of every trial identical to its own)
    settings = [dict(zip([a.key for a in sample_axes], combo))
                for combo in itertools.product(*[a.values for a in sample_axes])] if sample_axes else []
    key = short_hash([base.run_key, spec["train_axes"], spec["search"], spec["num_samples"]])
    return SweepPlan(base=base, train_axes=train_axes, sample_settings=settings, sweep_key=key,
                     name=sweep_dir_name(cfg.experiment.name, key),
                     display_name=f"{cfg.experiment.name}/sweep")


def sweep_of(plan: RunPlan, require_data: bool = True) -> SweepPlan | None:
    """The SweepPlan of an experiment with a sweep: section, its whole search space checked before anything
    starts; None for a single run."""
    if not (plan.cfg.sweep.train_axes or plan.cfg.sweep.sample_axes):
        return None
    return plan_sweep(plan, require_data=require_data)


def num_trials(sweep: SweepPlan) -> int:
    grid = 1
    for a in sweep.train_axes:
        grid *= len(a.values) if a.kind == "grid" else 1
    return grid * sweep.base.cfg.sweep.num_samples


def describe_sweep(sweep: SweepPlan) -> str:
    axes = "; ".join(f"{a.key} {a.kind} {a.values}" for a in sweep.train_axes) or "(none)"
    s = sweep.base.cfg.sweep
    trials = num_trials(sweep)
    return (f"sweep       {sweep.name}: {trials} trial(s) over {axes}\n"
            f"            scheduler {s.scheduler.type} on {s.scheduler.metric} ({s.scheduler.mode}); best by "
            f"{s.metric} ({s.mode})\n"
            f"            {len(sweep.sample_settings)} sample-time setting(s) per trial"
            + (": " + "; ".join(setting_label(x) for x in sweep.sample_settings) if sweep.sample_settings else ""))


# ---------------------------------------------------------------------------------------------
# The trial: one Ray Train run launched from a Tune function trainable


def trial_plan(config: dict, secrets: dict) -> tuple[RunPlan, dict]:
    """The run of one trial: the base config (its credentials back from `secrets`) with the trial's train-axis
    values."""
    overrides = expand(config["overrides"])
    cfg = with_values(with_credentials(config["base"], secrets["config"]), overrides, config["source"])
    plan = plan_run(cfg, source=config["source"])
    if overrides:  # a sample-time-only sweep has one trial: the plain run
        plan.display_name = f"{plan.display_name}[{overrides_label(overrides)}]"
    return plan, overrides


def run_trial(config: dict, secrets: dict) -> None:
    """Tune trainable. config: {"base": redacted cfg container, "source", "overrides": {key: value}, ...}, what
    Tune stores; secrets: {"tracking_uri", "storage", "config": credentials(cfg)}, what it must not (sweep_to_end)."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    set_verbose(config.get("verbose", False))
    quick_failing_http()  # as on the driver: a trial runs in a Ray worker, which need not share its environment
    plan, overrides = trial_plan(config, secrets)
    run = RunDir(RunStorage(**secrets["storage"]), plan.run_name)
    done = run.read_result()
    if done is not None:  # finished before: report, don't reopen or retrain (new settings: run_sweep's catch-up)
        ray.tune.report(done["metrics"])
        return
    with RunLease(run, f"trial of sweep {config['sweep_name']}") as lease:
        tracker = Tracker(secrets["tracking_uri"])
        resume_from = run.checkpoint_to_resume(set_aside_corrupt=False)
        run_id = start_tracked_run(plan, run, tracker, parent_run_id=config["parent_run_id"],
                                   extra_tags={SWEEP_TAG: config["sweep_name"],
                                               TRIAL_TAG: ray.tune.get_context().get_trial_id(),
                                               OVERRIDES_TAG: json.dumps(overrides)})
        evaluations = [start_evaluation_run(tracker, plan, run_id, with_values(plan.cfg, s, config["source"]),
                                            s, bpd=False, extra_tags={SWEEP_TAG: config["sweep_name"]})
                       for s in config["sample_settings"]]
        train_evaluate_and_record(plan, run, tracker, run_id, evaluations=evaluations,
                                  callbacks=[TuneReportCallback()], resume_from=resume_from, progress=False,
                                  lease=lease)


# ---------------------------------------------------------------------------------------------
# The driver


def trial_resources(cfg: DictConfig) -> dict:
    c = cfg.cluster
    cpus = c.num_workers * c.cpus_per_worker + 1  # + the trial's own driver (the Tune trainable)
    return {"CPU": cpus, **({"GPU": c.num_workers * c.gpus_per_worker} if c.use_gpu else {})}


def max_concurrent(cfg: DictConfig) -> int:
    import ray

    if cfg.sweep.max_concurrent:
        return cfg.sweep.max_concurrent
    have = ray.cluster_resources()
    need = trial_resources(cfg)
    return max(1, min(int(have.get(k, 0) // v) for k, v in need.items()))


def run_sweep(sweep: SweepPlan, storage: RunStorage, tracking_uri: str) -> pd.DataFrame:
    """The whole sweep, under one lease: a second launch of it is refused."""
    with RunLease(RunDir(storage, sweep.name), f"sweep {sweep.display_name}"):
        return sweep_to_end(sweep, storage, tracking_uri)


def sweep_to_end(sweep: SweepPlan, storage: RunStorage, tracking_uri: str) -> pd.DataFrame:
    base, cfg = sweep.base, sweep.base.cfg
    tracker = Tracker(tracking_uri)
    exp_id = tracker.experiment_id(base.experiment_name)
    catch_up_experiment(storage, cfg.experiment.name, tracker)
    parent_id = tracker.start_run(exp_id, sweep.sweep_key, sweep.display_name, flat_params(cfg),
                                  tags={SWEEP_TAG: sweep.name, KIND_TAG: SWEEP})
    init_ray(cfg, min_cpus=int(trial_resources(cfg)["CPU"] + 0.999))
    # Tune stores param_space (its state, every trial's params and results): credentials in URIs stay out of it and
    # reach the trials through Ray's object store (tune.with_parameters), which nothing writes to storage
    param_space = {
        "base": redacted(cfg), "source": base.source, "overrides": {a.key: a.tune_domain() for a in sweep.train_axes},
        "parent_run_id": parent_id, "sweep_name": sweep.name, "sample_settings": sweep.sample_settings,
        "verbose": trainer.VERBOSE,
    }
    secrets = {"tracking_uri": tracking_uri, "config": credentials(cfg), "storage": dataclasses.asdict(storage)}
    grid = tuner_of(sweep, storage, param_space, secrets).fit()
    errored = {trial_id_of(r) for r in grid if r.error is not None}
    catch_up_evaluations(sweep, storage, tracker, param_space, secrets)
    return publish_results(sweep, storage, tracker, parent_id, errored)


def tuner_of(sweep: SweepPlan, storage: RunStorage, param_space: dict, secrets: dict):
    """The sweep's Tuner: restored from storage when an earlier launch left its state there."""
    from ray import tune

    s = sweep.base.cfg.sweep
    concurrency = max_concurrent(sweep.base.cfg)
    print(f"[sweep] {sweep.name}: {len(sweep.train_axes)} train axes, {len(sweep.sample_settings)} sample "
          f"settings per trial, up to {concurrency} trials at once", flush=True)
    # the trial driver asks for one CPU; its Train workers ask for their own
    trainable = tune.with_resources(tune.with_parameters(run_trial, secrets=secrets), {"CPU": 1})
    fs, root = storage.filesystem_and_root()
    path = f"{root}/{sweep.name}"
    if tune.Tuner.can_restore(path, storage_filesystem=fs):
        print(f"[sweep] continuing {sweep.name} from {storage.describe()}", flush=True)
        return tune.Tuner.restore(path, trainable, resume_unfinished=True, resume_errored=True,
                                  param_space=param_space, storage_filesystem=fs)
    scheduler = None
    if s.scheduler.type == "asha":
        scheduler = tune.schedulers.ASHAScheduler(metric=s.scheduler.metric, mode=s.scheduler.mode, max_t=10**6,
                                                  grace_period=s.scheduler.grace_period,
                                                  reduction_factor=s.scheduler.reduction_factor)
    return tune.Tuner(
        trainable, param_space=param_space,
        tune_config=tune.TuneConfig(scheduler=scheduler, num_samples=s.num_samples, max_concurrent_trials=concurrency),
        run_config=tune.RunConfig(name=sweep.name, storage_path=root, storage_filesystem=fs,
                                  verbose=1 if trainer.VERBOSE else 0, callbacks=[TrialEvents(sweep.name)]),
    )


def publish_results(sweep: SweepPlan, storage: RunStorage, tracker: Tracker, parent_id: str, errored: set
                    ) -> pd.DataFrame:
    """The results table into the parent run (CSV, markdown, an MLflow table), the best trial tagged; what
    MLflow missed of the trials is replayed first, so the table reads what storage holds."""
    catch_up_experiment(storage, sweep.base.cfg.experiment.name, tracker)
    catch_up_unfinished_trials(sweep, storage, tracker)
    s = sweep.base.cfg.sweep
    table = results_table(tracker, sweep.base.experiment_name, sweep, storage, errored)
    close_runs(tracker, table, sweep)
    best = best_trial(table, s.metric, s.mode)
    report = table_markdown(table, best, s.metric, s.mode)
    tracker.client.log_text(parent_id, table.to_csv(index=False), "sweep/results.csv")
    tracker.client.log_text(parent_id, report, "sweep/results.md")
    if len(table):
        log_table(tracker.client, parent_id, table, "sweep/results.json")  # shown as a table in the UI
    if best is not None:
        tracker.set_tags(parent_id, {BEST_RUN_TAG: best["run_id"], BEST_OVERRIDES_TAG: best["overrides"],
                                     BEST_TAG: describe_best(best)})
    tracker.finish(parent_id, "FINISHED")
    print(report, flush=True)
    return table


# ---------------------------------------------------------------------------------------------
# Results: built from MLflow, the record of truth, so the table and the UI agree


def catch_up_evaluations(sweep: SweepPlan, storage: RunStorage, tracker: Tracker, param_space: dict,
                         secrets: dict) -> None:
    """Sample-time settings added since a trial finished (a rerun with new sample-axis values) are evaluated
    on its final checkpoint, all in one Ray Train job; nothing is retrained, nothing evaluated twice."""
    frame = runs_frame(tracker.client, sweep.base.experiment_name, sweep.name)
    if not len(frame) or not sweep.sample_settings:
        return
    todo = []
    for _, trial in frame[frame["trial"].notna()].drop_duplicates("train_run_id").iterrows():
        overrides = json.loads(tracker.client.get_run(trial["train_run_id"]).data.tags.get(OVERRIDES_TAG) or "{}")
        plan, _ = trial_plan({**param_space, "overrides": overrides}, secrets)
        done = RunDir(storage, plan.run_name).read_result()
        if done is not None and (missing := missing_evaluations(plan, done, sweep.sample_settings)):
            todo.append((plan, done, missing))
    if todo:
        print(f"[sweep] evaluating {sum(len(m) for _, _, m in todo)} new sample-time setting(s) on the final "
              f"checkpoints of {len(todo)} finished trial(s)", flush=True)
        evaluate_many(sweep.base.cfg, storage, tracker, todo, bpd=False, extra_tags={SWEEP_TAG: sweep.name})


def catch_up_unfinished_trials(sweep: SweepPlan, storage: RunStorage, tracker: Tracker) -> None:
    """A trial that ended without a result (ASHA stopped it, or it failed) ended where Tune killed its workers:
    what its rank 0 had queued for MLflow then is in its last checkpoint only (ASHA stops a trial at the report of
    a checkpoint, so on a busy machine that can be every loss it logged). It is delivered now (steps MLflow has
    are skipped), or kept in the run's backlog for the next command that reaches MLflow."""
    frame = runs_frame(tracker.client, sweep.base.experiment_name, sweep.name)
    if not len(frame):
        return
    for name in frame.loc[frame["trial"].notna(), "run_dir"].dropna().unique():
        run = RunDir(storage, name)
        if run.read_result() is not None or (latest := run.latest_checkpoint()) is None:
            continue
        if not run.backlog.deliver_or_keep(tracker, run.checkpoint_records(latest)):
            print(run.backlog.behind_message(tracker.uri), flush=True)


def results_table(tracker: Tracker, experiment: str, sweep: SweepPlan, storage: RunStorage,
                  errored: set = frozenset()) -> pd.DataFrame:
    """One row per trial × sample-time setting, with the trial's train-axis values, the setting's values and
    the metrics (the trial's, and the setting's own on top). A trial is finished (its result marker is in
    storage, the record of truth, whatever MLflow's status says yet), failed (Tune saw an error) or stopped
    (ASHA ended it early)."""
    frame = runs_frame(tracker.client, experiment, sweep.name)
    if not len(frame):
        return frame
    frame = frame[frame["trial"].notna()]
    axis_keys = [k for a in sweep.train_axes for k in a.key.split(",")]
    setting_keys = list(sweep.sample_settings[0]) if sweep.sample_settings else []
    rows = []
    finished = {d for d in frame["run_dir"].dropna().unique() if RunDir(storage, d).read_result() is not None}
    for _, r in frame.iterrows():
        status = "finished" if r["run_dir"] in finished else "failed" if r["trial"] in errored else "stopped"
        rows.append({"trial": r["trial"], "run_id": r["train_run_id"], "overrides": r["overrides"],
                     **{k: r.get(k) for k in axis_keys}, "status": status, "stopped_early": status == "stopped",
                     "setting": r["setting"], **{k: r.get(k) for k in setting_keys},
                     "eval_run_id": r["run_id"] if r["kind"] == "evaluation" else None,
                     **{c[len("metric."):]: r[c] for c in frame.columns if c.startswith("metric.") and pd.notna(r[c])}})
    table = pd.DataFrame(rows)
    return table.sort_values(["overrides", "setting"], kind="stable").reset_index(drop=True)


def trial_id_of(result) -> str | None:
    if result.metrics and result.metrics.get("trial_id"):
        return result.metrics["trial_id"]
    m = re.search(r"_([0-9a-f]{5}_\d{5})_", posixpath.basename(result.path or ""))  # run_trial_<id>_<n>_...
    return m.group(1) if m else None


def best_trial(table: pd.DataFrame, metric: str, mode: str) -> dict | None:
    if metric not in table or not table[metric].notna().any():
        return None
    ranked = table[table["status"] == "finished"].dropna(subset=[metric])
    if not len(ranked):
        return None
    row = ranked.loc[ranked[metric].idxmin() if mode == "min" else ranked[metric].idxmax()]
    return {"run_id": row["run_id"], "overrides": row["overrides"], "setting": row["setting"], "metric": metric,
            "value": float(row[metric])}


def describe_best(best: dict) -> str:
    """"patch_size=2 with guidance=1.0 -> 12.3 (MLflow run ...)": a sweep over sample-time settings alone has no
    train-axis overrides, one without sample axes no setting."""
    what = " with ".join(x for x in (best["overrides"], best["setting"]) if x) or "the base config"
    return f"{what} -> {best['value']:.4g} (MLflow run {best['run_id']})"


def table_markdown(table: pd.DataFrame, best: dict | None, metric: str, mode: str) -> str:
    shown = table.drop(columns=[c for c in ("run_id", "eval_run_id", "trial") if c in table])
    text = shown.to_markdown(index=False) if len(shown) else "(no trials)"
    if best:
        text += f"\n\nBest ({mode} {best['metric']}): {describe_best(best)}"
    return text


def close_runs(tracker: Tracker, table: pd.DataFrame, sweep: SweepPlan) -> None:
    """ASHA-stopped trials leave their MLflow runs RUNNING: give them a final status and a tag."""
    for _, row in table.iterrows():
        if row["status"] == "stopped":
            for run_id in filter(lambda x: isinstance(x, str), (row["run_id"], row.get("eval_run_id"))):
                tracker.set_tags(run_id, {STOPPED_TAG: "true"})
                tracker.finish(run_id, "KILLED")
