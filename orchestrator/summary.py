"""The few lines a command ends with: the final metrics, where the checkpoints and tables are, and how to look
at the run in the MLflow UI (the command for a local store, the run's address for a server; credentials
never printed)."""

from __future__ import annotations

from urllib.parse import urlparse

from .config import redact_uri
from .plan import RunPlan
from .records import BEST_TAG, KIND_TAG, SWEEP, SWEEP_TAG
from .rundir import RunDir, table_path
from .storage import RunStorage

SHOWN = ("step", "loss", "bpd", "fid", "images_per_sec", "periodic/bpd", "periodic/fid", "periodic/share")


def figures(metrics: dict) -> str:
    out = []
    for key in SHOWN:
        v = metrics.get(key)
        if v is None:
            continue
        out.append(f"{key} {v:.1%}" if key.endswith("share") else f"{key} {v:,.0f}" if key == "images_per_sec"
                   else f"{key} {v:.4g}" if isinstance(v, float) else f"{key} {v}")
    return "  ".join(out) or "(none)"


def mlflow_address(tracking_uri: str, experiment_id: str | None, run_id: str | None) -> str:
    """Where to see a run: its address on a server, or the command that serves a local store."""
    page = f"#/experiments/{experiment_id}" + (f"/runs/{run_id}" if run_id else "") if experiment_id else ""
    if urlparse(tracking_uri).scheme in ("http", "https"):
        return f"{redact_uri(tracking_uri).rstrip('/')}/{page}"
    return (f"mlflow ui --backend-store-uri {redact_uri(tracking_uri)}   then http://127.0.0.1:5000/{page}")


def run_summary(plan: RunPlan, storage: RunStorage, tracking_uri: str, sweep=None) -> str:
    from .tracking import Tracker

    where = f"{redact_uri(storage.describe())}"
    tracker = Tracker(tracking_uri)
    exp = tracker.client.get_experiment_by_name(plan.experiment_name)
    exp_id = exp.experiment_id if exp else None
    lines = []
    if sweep is None:
        run = RunDir(storage, plan.run_name)
        done = run.read_result() or {}
        run_id = done.get("mlflow_run_id")
        lines.append(f"[summary] {plan.display_name}: {figures(done.get('metrics', {}))}")
        lines.append(f"[summary] checkpoints  {run.describe(run.latest_checkpoint() or '(none)')}  (result.json "
                     "beside it)")
    else:
        runs = tracker.client.search_runs(
            [exp_id], filter_string=f"tags.`{SWEEP_TAG}` = '{sweep.name}' AND tags.`{KIND_TAG}` = '{SWEEP}'",
            max_results=1) if exp_id else []
        run_id = runs[0].info.run_id if runs else None
        best = runs[0].data.tags.get(BEST_TAG) if runs else None
        lines.append(f"[summary] {sweep.display_name}: best {best or '(none finished)'}; results table in the parent "
                     "run's artifacts (sweep/results.json, .md, .csv)")
        lines.append(f"[summary] checkpoints  {where}/<trial run>/ (one folder per trial)")
    if plan.cfg.reference is not None:
        lines.append(f"[summary] tables       {where}/{table_path(plan.experiment_name, '')} (table.md, table.csv, "
                     "table.tex)")
    lines.append(f"[summary] MLflow       {mlflow_address(tracking_uri, exp_id, run_id)}")
    return "\n".join(lines)
