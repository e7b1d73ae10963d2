"""python -m orchestrator.sample SOURCE [key=value ...]
python -m orchestrator.sample EXPERIMENT.yaml --reference-checkpoint PATH [key=value ...]

Draws many samples of a trained model on every Ray worker (GPU or CPU) and writes, to storage: all samples
as one .npz in the layout the ADM evaluation suite reads (arr_0 uint8 N×H×W×C, arr_1 labels of a
conditional model), a PNG grid, and FID against the data set's reference statistics when sample.fid=true.
It is logged as an MLflow run nested under the source run (its own run for a checkpoint file), named by its
settings: the same command again finds it done and skips it. The same seed and settings give the same
samples whatever the number of workers.

SOURCE is a finished run: its directory (a path or s3://.../<run>), its name in storage.uri (default ./runs),
or its MLflow run id. With --reference-checkpoint, SOURCE is an experiment YAML describing the model (arch,
image size, classes) and PATH a checkpoint: ours (state.pt) or the authors' layout (e.g. the released
afhq_model_8_768_8_8_0.07.pth). Settings: sample.num_samples, sample.classes (default class-balanced),
sample.batch_size, sample.seed, sample.grid, sample.fid, and the eval section's sampling knobs
(eval.guidance, eval.annealed_guidance, eval.attn_temp, eval.denoise, eval.denoise_step, eval.sampler,
eval.jacobi.tol).
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import json
import posixpath
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from .config import compose_experiment, redact_uri, with_values
from .delivery import quick_failing_http
from .errors import ExperimentError, cli_entry
from .lease import RunLease
from .plan import RunPlan, plan_run, short_hash
from .records import KIND_TAG, PARENT_TAG, SAMPLE, SCALE_TAG, STORAGE_TAG, flat_params, setting_label
from .rundir import CONFIG_FILE, RESULT_FILE, SAMPLES_FILE, RunDir, reference_samples
from .sample_job import sample_per_worker
from .storage import RunStorage, storage_from_config
from .tracking import Tracker, resolve_tracking_uri
from .trainer import fit, init_ray, torch_trainer
from .weights import WeightsSource, check_weights, checkpoint_source, find_weights

SAMPLING_KNOBS = ("guidance", "annealed_guidance", "attn_temp", "denoise", "denoise_step", "sampler")


def settings_of(cfg) -> dict:
    """What the samples depend on besides the weights: the sample section and the eval section's knobs."""
    knobs = {k: cfg.eval[k] for k in SAMPLING_KNOBS}
    if cfg.eval.sampler == "jacobi":
        knobs["jacobi"] = OmegaConf.to_container(cfg.eval.jacobi)
    if cfg.sample.fid:
        knobs["fid"] = OmegaConf.to_container(cfg.eval.fid)
    return {"sample": OmegaConf.to_container(cfg.sample), "eval": knobs}


def label_of(cfg) -> str:
    s = cfg.sample
    parts = {"n": s.num_samples, "guidance": cfg.eval.guidance, "seed": s.seed}
    if cfg.eval.denoise:
        parts["denoise"] = True
    if cfg.eval.sampler != "sequential":
        parts["sampler"] = cfg.eval.sampler
    return setting_label(parts)


@dataclass
class SampleJob:
    cfg: DictConfig
    plan: RunPlan
    weights: WeightsSource
    out: RunDir                 # the job's directory: <run>/samples/<key>, or samples/<checkpoint>-<key>
    key: str
    parent: str | None          # the MLflow run it is nested under (a finished run's), if any
    display: str


def find_finished_run(source: str, overrides: list[str]) -> tuple[DictConfig, RunDir, dict]:
    """(its stored config with the overrides, its directory, its result marker).

    source: a run's directory (a path, or s3://bucket/prefix/<run>), a run name in the storage the overrides
    name (storage.uri=..., default ./runs), or an MLflow run id (its tracking URI from tracking.uri=... or
    MLFLOW_TRACKING_URI)."""
    settings = with_values({}, [o for o in overrides if o.split("=")[0].split(".")[0] in ("storage", "tracking")],
                           "command line")
    endpoint = settings.storage.endpoint_url
    if re.fullmatch(r"[0-9a-f]{32}", source):
        run = run_of_mlflow_run(source, settings, endpoint)
    elif "/" in source.rstrip("/") or source.startswith("s3://") or Path(source).is_dir():
        parent, name = posixpath.split(source.rstrip("/"))
        run = RunDir(RunStorage(parent or ".", endpoint), name)
    else:
        run = RunDir(storage_from_config(settings), source)
    done = run.read_result()
    if done is None:
        raise ExperimentError(f"{run.describe()} is not a finished run (no {RESULT_FILE}); give a finished run's "
                              "directory, its name in storage.uri=..., or its MLflow run id")
    cfg = OmegaConf.to_container(OmegaConf.create(run.read_config()), resolve=True)
    cfg["storage"] = {**cfg["storage"], "uri": run.storage.uri, "endpoint_url": run.storage.endpoint_url}
    return with_values(cfg, overrides, run.path(CONFIG_FILE)), run, done


def run_of_mlflow_run(run_id: str, settings: DictConfig, endpoint: str | None) -> RunDir:
    """The run directory an MLflow training run of ours names in its storage tag."""
    tracker = Tracker(resolve_tracking_uri(settings))
    try:
        tags = tracker.client.get_run(run_id).data.tags
    except Exception as e:
        raise ExperimentError(f"MLflow run {run_id} is not in {redact_uri(tracker.uri)} ({type(e).__name__})") \
            from None
    if STORAGE_TAG not in tags:
        raise ExperimentError(f"MLflow run {run_id} is not a training run of this project (no {STORAGE_TAG} tag)")
    where = json.loads(tags[STORAGE_TAG])
    if "***" in where["uri"]:
        raise ExperimentError(f"MLflow run {run_id} is stored at {where['uri']}, whose credentials were "
                              "redacted: name its directory or storage instead")
    return RunDir(RunStorage(where["uri"], endpoint or where["endpoint_url"]), where["run_name"])


def plan_job(args) -> SampleJob:
    """What to sample, with which settings, and where the samples go."""
    if args.reference_checkpoint:
        cfg = compose_experiment(args.source, args.overrides)
        storage = storage_from_config(cfg)
        weights = find_weights(args.reference_checkpoint, storage, "--reference-checkpoint")
        plan = plan_run(cfg, source=Path(args.source).name, require_data=cfg.sample.fid)
        check_weights(weights, plan.model)
        stem = Path(args.reference_checkpoint).stem
        key = short_hash([weights.describe(), settings_of(cfg)])
        return SampleJob(cfg, plan, weights, reference_samples(storage, stem, key), key, None,
                         f"{stem}/samples {label_of(cfg)}")
    cfg, run, done = find_finished_run(args.source, args.overrides)
    if "***" in str(cfg.tracking.uri):  # stored redacted: the current environment says where MLflow is
        cfg = OmegaConf.merge(cfg, {"tracking": {"uri": None}})
    plan = plan_run(cfg, source=run.name, require_data=cfg.sample.fid)
    key = short_hash([done["checkpoint"], settings_of(cfg)])
    return SampleJob(cfg, plan, checkpoint_source(run, done["checkpoint"]), run.samples(key), key,
                     done["mlflow_run_id"], f"{plan.display_name}/samples {label_of(cfg)}")


def draw_samples(job: SampleJob, tracker: Tracker) -> dict:
    """The Ray Train job, then its MLflow run's metrics, grid and status (kept in the job's backlog when MLflow
    does not answer). Returns the metrics."""
    cfg, plan = job.cfg, job.plan
    run_id = tracker.start_run(
        tracker.experiment_id(plan.experiment_name), f"sample-{plan.run_key}-{job.key}", job.display,
        {k: v for k, v in flat_params(cfg).items() if k.startswith(("sample.", "eval."))},
        tags={KIND_TAG: SAMPLE, SCALE_TAG: cfg.experiment.scale, "tarflow.weights": redact_uri(job.weights.describe()),
              "tarflow.samples": job.out.describe(), **({PARENT_TAG: job.parent} if job.parent else {})})
    print(f"[sample] {cfg.sample.num_samples} samples of {plan.model.name} ({redact_uri(job.weights.describe())}) on "
          f"{cfg.cluster.num_workers} worker(s) into {job.out.describe()}", flush=True)
    init_ray(cfg)
    loop_config = {"cfg": OmegaConf.to_container(cfg, resolve=True), "source": plan.source,
                   "weights": dataclasses.asdict(job.weights), "out": job.out.name, "need_data": bool(cfg.sample.fid)}
    try:
        fit(torch_trainer(sample_per_worker, loop_config, cfg, job.out.storage,
                          f"sample-{job.key}-{time.strftime('%Y%m%d-%H%M%S')}"))
    except Exception:
        job.out.backlog.deliver_or_keep(tracker, [{"kind": "status", "run_id": run_id, "status": "FAILED"}])
        raise
    metrics = job.out.read_final()["metrics"]
    grid = job.out.read_grid()
    actions = [{"kind": "metrics", "run_id": run_id, "step": 0, "ts": int(time.time() * 1000), "values": metrics}] \
        if metrics else []
    if grid is not None:
        actions.append({"kind": "artifact", "run_id": run_id, "path": "samples/grid.png",
                        "data": base64.b64encode(grid).decode()})
    actions.append({"kind": "status", "run_id": run_id, "status": "FINISHED"})
    if not job.out.backlog.deliver_or_keep(tracker, actions):
        print(f"[sample] MLflow is behind; the run catches up from {job.out.backlog.relpath} at the next "
              "`python -m orchestrator.report` or `run` of its experiment", flush=True)
    print(f"[sample] MLflow run '{job.display}' ({run_id}) at {redact_uri(tracker.uri)}", flush=True)
    return metrics


@cli_entry
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m orchestrator.sample", description=__doc__.split("\n\n")[1])
    parser.add_argument("source", help="a finished run (directory, name, MLflow run id), or an experiment YAML "
                                       "with --reference-checkpoint")
    parser.add_argument("overrides", nargs="*", help="e.g. sample.num_samples=50000 eval.guidance=2.0")
    parser.add_argument("--reference-checkpoint", metavar="PATH",
                        help="sample this checkpoint file (ours or the authors' layout) with SOURCE's model settings")
    args = parser.parse_intermixed_args(argv)
    quick_failing_http()
    job = plan_job(args)
    finished = job.out.read_final()
    if finished is not None:
        print(f"[sample] already drawn with these settings: {job.out.describe()} {finished['metrics']}")
        return 0
    job.out.storage.check()
    started = time.time()
    with RunLease(job.out, f"orchestrator.sample of {job.display}"):
        metrics = draw_samples(job, Tracker(resolve_tracking_uri(job.cfg)))
    fid = f"; FID {metrics['fid']:.3f}" if "fid" in metrics else ""
    print(f"[sample] {job.cfg.sample.num_samples} samples in {time.time() - started:.0f} s: "
          f"{job.out.describe(SAMPLES_FILE)} and grid.png{fid}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
