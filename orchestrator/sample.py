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
import sys
import time
from pathlib import Path

from omegaconf import OmegaConf

from .config import compose_experiment, redact_uri
from .errors import cli_entry
from .evaluation import FINAL_FILE, SAMPLES_FILE
from .lease import RunLease
from .lifecycle import after_training, find_finished_run
from .plan import plan_run, short_hash, storage_safe
from .records import KIND_TAG, PARENT_TAG, SAMPLE, SCALE_TAG, flat_params, setting_label
from .storage import storage_from_config
from .tracking import Tracker, quick_failing_http, resolve_tracking_uri
from .weights import CHECKPOINT_FILE, WeightsSource, check_weights, find_weights

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

    if args.reference_checkpoint:
        cfg = compose_experiment(args.source, args.overrides)
        storage = storage_from_config(cfg)
        weights = find_weights(args.reference_checkpoint, storage, "--reference-checkpoint")
        plan = plan_run(cfg, source=Path(args.source).name, require_data=cfg.sample.fid)
        check_weights(weights, plan.model)
        stem = storage_safe(Path(args.reference_checkpoint).stem)
        key = short_hash([weights.describe(), settings_of(cfg)])
        out, parent, display = f"samples/{stem}-{key}", None, f"{stem}/samples {label_of(cfg)}"
    else:
        cfg, storage, run_name, done = find_finished_run(args.source, args.overrides)
        if "***" in str(cfg.tracking.uri):  # stored redacted: the current environment says where MLflow is
            cfg = OmegaConf.merge(cfg, {"tracking": {"uri": None}})
        plan = plan_run(cfg, source=run_name, require_data=cfg.sample.fid)
        checkpoint = f"{storage.uri.rstrip('/')}/{run_name}/{done['checkpoint']}"
        weights = WeightsSource("checkpoint", {"uri": checkpoint, "endpoint_url": storage.endpoint_url},
                                CHECKPOINT_FILE)
        key = short_hash([done["checkpoint"], settings_of(cfg)])
        out, parent, display = (f"{run_name}/samples/{key}", done["mlflow_run_id"],
                                f"{plan.display_name}/samples {label_of(cfg)}")
    tracking_uri = resolve_tracking_uri(cfg)

    finished = storage.read_json(f"{out}/{FINAL_FILE}")
    if finished is not None:
        print(f"[sample] already drawn with these settings: {redact_uri(storage.describe())}/{out} "
              f"{finished['metrics']}")
        return 0
    storage.check()
    with RunLease(storage, out, f"orchestrator.sample of {display}"):
        tracker = Tracker(tracking_uri)
        run_id = tracker.start_run(
            tracker.experiment_id(plan.experiment_name), f"sample-{plan.run_key}-{key}", display,
            {k: v for k, v in flat_params(cfg).items() if k.startswith(("sample.", "eval."))},
            tags={KIND_TAG: SAMPLE, SCALE_TAG: cfg.experiment.scale, "tarflow.weights": redact_uri(weights.describe()),
                  "tarflow.samples": redact_uri(f"{storage.describe()}/{out}"),
                  **({PARENT_TAG: parent} if parent else {})})
        print(f"[sample] {cfg.sample.num_samples} samples of {plan.model.name} ({redact_uri(weights.describe())}) on "
              f"{cfg.cluster.num_workers} worker(s) into {redact_uri(storage.describe())}/{out}", flush=True)
        from .trainer import build_sampler, init_ray

        init_ray(cfg)
        job = {"cfg": OmegaConf.to_container(cfg, resolve=True), "source": plan.source,
               "weights": dataclasses.asdict(weights), "out": out, "need_data": bool(cfg.sample.fid)}
        started = time.time()
        try:
            result = build_sampler(cfg, storage, job, f"sample-{key}-{time.strftime('%Y%m%d-%H%M%S')}").fit()
            if result.error is not None:
                raise result.error
        except Exception:
            after_training(storage, out, tracker, [{"kind": "status", "run_id": run_id, "status": "FAILED"}])
            raise
        metrics = storage.read_json(f"{out}/{FINAL_FILE}")["metrics"]
        grid = storage.read_bytes(f"{out}/grid.png")
        actions = [{"kind": "metrics", "run_id": run_id, "step": 0, "ts": int(time.time() * 1000), "values": metrics}] \
            if metrics else []
        if grid is not None:
            actions.append({"kind": "artifact", "run_id": run_id, "path": "samples/grid.png",
                            "data": base64.b64encode(grid).decode()})
        actions.append({"kind": "status", "run_id": run_id, "status": "FINISHED"})
        if not after_training(storage, out, tracker, actions):
            print(f"[sample] MLflow is behind; the run catches up from {out}/tracking_backlog.json later", flush=True)
    print(f"[sample] {cfg.sample.num_samples} samples in {time.time() - started:.0f} s: "
          f"{redact_uri(storage.describe())}/{out}/{SAMPLES_FILE} and grid.png"
          + (f"; FID {metrics['fid']:.3f}" if "fid" in metrics else "")
          + f"\n[sample] MLflow run '{display}' ({run_id}) at {redact_uri(tracking_uri)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
