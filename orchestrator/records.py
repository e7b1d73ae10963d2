"""What the orchestrator writes into MLflow and reads back: tag names, params, and an experiment's or a
sweep's runs as one table (training runs joined to the nested runs that evaluated them).

MLflow is the record the tables and the UI share, so every reader goes through runs_frame.
"""

from __future__ import annotations

import json
import re

import pandas as pd
from omegaconf import DictConfig, OmegaConf

from .config import redacted

PARENT_TAG = "mlflow.parentRunId"
KIND_TAG = "tarflow.kind"            # one of the kinds below
RUN_KEY_TAG = "tarflow.run_key"      # a training run: its config hash; an evaluation: run key + setting hash
ARCH_TAG = "tarflow.arch"            # the P-Ch-T-K that was built and trained
EVAL_KEY_TAG = "tarflow.eval_key"    # the evaluation settings a run's metrics come from (plan.evaluation_key)
SWEEP_TAG = "tarflow.sweep"          # the sweep a parent, trial or evaluation run belongs to
TRIAL_TAG = "tarflow.trial"          # Tune's trial id
OVERRIDES_TAG = "tarflow.overrides"  # a trial's train-axis values, JSON
SETTING_TAG = "tarflow.setting"      # an evaluation's sample-time values, JSON
STOPPED_TAG = "tarflow.stopped_early"
SUPERSEDED_TAG = "tarflow.superseded_by"  # a stale run of the same config, replaced by a fresh start
BEST_RUN_TAG = "tarflow.best_run"
BEST_OVERRIDES_TAG = "tarflow.best_overrides"
BEST_TAG = "tarflow.best"              # the best trial and setting in words, with its value
FAILURE_TAG = "tarflow.failure"      # why a run ended FAILED, in one paragraph
STORAGE_TAG = "tarflow.storage"     # where a run's directory is: {"uri", "endpoint_url", "run_name"}, JSON
ATTEMPTS_TAG = "tarflow.attempts"   # each start of the workers: [{"from": step, "to": last step, "workers": n}], JSON
SCALE_TAG = "scale"
CONFIG_HASH_TAG = "config_hash"

RUN, SWEEP, EVALUATION, TABLE, SAMPLE = "run", "sweep", "evaluation", "table", "sample"

# characters MLflow refuses in a param name; a joint sweep axis ("model.num_blocks,model.layers_per_block") has one
MLFLOW_UNSAFE_KEY = re.compile(r"[^\w\-. :/]+")


def flat_params(cfg: DictConfig) -> dict[str, str]:
    """Dotted keys -> string values, for MLflow params (credentials in URIs redacted)."""
    out = {}

    def walk(prefix, node):
        if isinstance(node, dict):
            for k, v in node.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        else:
            out[MLFLOW_UNSAFE_KEY.sub(" ", prefix)] = str(node)

    container = redacted(cfg)
    container.pop("reference", None)
    if not (container["sweep"]["train_axes"] or container["sweep"]["sample_axes"]):
        container.pop("sweep")
    walk("", container)
    return out


def setting_label(setting: dict) -> str:
    """guidance=2.0,denoise=True: a sample-time setting as the tables and run names show it."""
    return ",".join(f"{k.split('.')[-1]}={v}" for k, v in setting.items()) or "default"


def runs_frame(client, experiment: str, sweep: str | None = None) -> pd.DataFrame:
    """One row per result of an experiment (or of one sweep): a training run on its own, or each nested
    evaluation of it with the training run's params and metrics underneath its own. Superseded and table
    runs are left out. Columns: run_id (the row's run), train_run_id, run_name (the training run's),
    status (the training run's), kind, scale, arch, started, trial, overrides, setting, the params by
    dotted key and the metrics as metric.<name>; run_dir, the training run's directory in storage. Rows in the
    order the training runs started."""
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return pd.DataFrame()
    query = f"tags.`{SWEEP_TAG}` = '{sweep}'" if sweep else ""
    runs = client.search_runs([exp.experiment_id], filter_string=query, max_results=50_000)
    runs = [r for r in runs if not r.data.tags.get(SUPERSEDED_TAG)]
    trainings = {r.info.run_id: r for r in runs if r.data.tags.get(KIND_TAG, RUN) == RUN
                 and RUN_KEY_TAG in r.data.tags}
    evaluations: dict[str, list] = {}
    for r in runs:
        if r.data.tags.get(KIND_TAG) == EVALUATION and r.data.tags.get(PARENT_TAG) in trainings:
            evaluations.setdefault(r.data.tags[PARENT_TAG], []).append(r)
    rows = []
    for run_id, t in trainings.items():
        tags = t.data.tags
        base = {"train_run_id": run_id, "run_name": t.info.run_name, "status": t.info.status,
                "run_dir": json.loads(tags.get(STORAGE_TAG) or "{}").get("run_name"),
                "scale": tags.get(SCALE_TAG, ""), "arch": tags.get(ARCH_TAG) or t.data.params.get("model.arch"),
                "started": t.info.start_time, "trial": tags.get(TRIAL_TAG),
                "overrides": overrides_label(json.loads(tags.get(OVERRIDES_TAG) or "{}")),
                **json.loads(tags.get(OVERRIDES_TAG) or "{}")}
        # the training run's own metrics are a row when they include its evaluation (not a sweep trial whose
        # sample-time settings each have a run of their own)
        if EVAL_KEY_TAG in tags or run_id not in evaluations:
            rows.append({**base, **t.data.params, "run_id": run_id, "kind": RUN, "setting": "default",
                         **{f"metric.{k}": v for k, v in t.data.metrics.items()}})
        for e in sorted(evaluations.get(run_id, []), key=lambda e: e.info.start_time):
            setting = json.loads(e.data.tags.get(SETTING_TAG) or "{}")
            rows.append({**base, **t.data.params, **e.data.params, "run_id": e.info.run_id,
                         "kind": EVALUATION, "eval_status": e.info.status, "setting": setting_label(setting),
                         **{f"metric.{k}": v for k, v in {**t.data.metrics, **e.data.metrics}.items()}})
    if not rows:
        return pd.DataFrame()
    return pd.DataFrame(rows).sort_values("started", kind="stable").reset_index(drop=True)


def overrides_label(overrides: dict) -> str:
    return ",".join(f"{k.split('.')[-1]}={v}" for k, v in overrides.items())


def resolved_config(cfg: DictConfig) -> str:
    """The resolved config as YAML, credentials redacted: what is stored beside the checkpoints."""
    return OmegaConf.to_yaml(OmegaConf.create(redacted(cfg)))
