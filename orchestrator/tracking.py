"""Experiment tracking in MLflow: one experiment per YAML, one run per training run, found again by
the run's config hash so that a restarted or repeated command continues the same MLflow run.

The driver creates experiments and runs (SQLite stores must not see concurrent creation); rank 0 of
the workers logs metrics and artifacts through RunLogger, which never logs a step twice.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from urllib.parse import urlparse

from mlflow.entities import Metric, Param, RunStatus, RunTag
from mlflow.tracking import MlflowClient

from .errors import ExperimentError

RUN_KEY_TAG = "tarflow.run_key"


def resolve_tracking_uri(cfg) -> str:
    uri = cfg.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return f"sqlite:///{Path('mlflow.db').resolve()}"


def check_tracking(uri: str) -> None:
    """Fail early, naming the URI, if an MLflow server does not answer."""
    if urlparse(uri).scheme not in ("http", "https"):
        return
    import requests

    try:
        requests.get(uri.rstrip("/") + "/health", timeout=5).raise_for_status()
    except requests.RequestException as e:
        raise ExperimentError(f"MLflow tracking server {uri} is unreachable ({type(e).__name__}); start it or set "
                              "tracking.uri / MLFLOW_TRACKING_URI to a running server") from None


class Tracker:
    """Driver-side: experiments and runs."""

    def __init__(self, uri: str):
        self.uri = uri
        self.client = MlflowClient(uri)

    def experiment_id(self, name: str) -> str:
        exp = self.client.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
        artifact_location = None
        if urlparse(self.uri).scheme == "sqlite":
            # absolute, so that Ray workers (other working directories) write to the same place
            artifact_location = (Path(urlparse(self.uri).path).parent / "mlartifacts" / name).resolve().as_uri()
        return self.client.create_experiment(name, artifact_location=artifact_location)

    def find_run(self, experiment_id: str, run_key: str):
        runs = self.client.search_runs([experiment_id], filter_string=f"tags.`{RUN_KEY_TAG}` = '{run_key}'",
                                       max_results=2)
        return runs[0] if runs else None

    def start_run(self, experiment_id: str, run_key: str, run_name: str, params: dict[str, str],
                  tags: dict[str, str]) -> str:
        """The run of this config: the existing one (reopened) or a new one with its params."""
        run = self.find_run(experiment_id, run_key)
        if run is not None:
            self.client.update_run(run.info.run_id, status="RUNNING")
            return run.info.run_id
        run = self.client.create_run(experiment_id, run_name=run_name, tags={RUN_KEY_TAG: run_key, **tags})
        items = [Param(k, v[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow's batch limit
            self.client.log_batch(run.info.run_id, params=items[i : i + 100])
        return run.info.run_id

    def set_tags(self, run_id: str, tags: dict[str, str]) -> None:
        self.client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def finish(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status=status)

    def final_metrics(self, run_id: str) -> dict[str, float]:
        """The latest value of every metric of the run."""
        return dict(self.client.get_run(run_id).data.metrics)

    def run_status(self, run_id: str) -> str:
        return self.client.get_run(run_id).info.status


class RunLogger:
    """Worker-side (rank 0): metrics with integer steps, each (key, step) at most once across restarts."""

    def __init__(self, uri: str, run_id: str):
        self.client = MlflowClient(uri)
        self.run_id = run_id
        run = self.client.get_run(run_id)
        self.last_step = {key: max(m.step for m in self.client.get_metric_history(run_id, key))
                          for key in run.data.metrics}

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        fresh = [Metric(k, float(v), now, step) for k, v in metrics.items() if step > self.last_step.get(k, -1)]
        if fresh:
            self.client.log_batch(self.run_id, metrics=fresh)
            for m in fresh:
                self.last_step[m.key] = step

    def set_tags(self, tags: dict) -> None:
        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_artifact(self, local_path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(local_path), artifact_path)

    def log_dict(self, data: dict, artifact_file: str) -> None:
        self.client.log_dict(self.run_id, data, artifact_file)

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)


__all__ = ["Tracker", "RunLogger", "resolve_tracking_uri", "check_tracking", "RunStatus", "RUN_KEY_TAG"]
