"""The driver's side of MLflow: one experiment per YAML, one run per training run, found again by the run's
config hash so that a restarted or repeated command continues the same MLflow run. The workers' side, which
never waits on MLflow, is delivery.py.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlparse

from mlflow.entities import Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from .config import redact_uri
from .delivery import deliver, say_refused
from .errors import ExperimentError
from .records import RUN_KEY_TAG, SUPERSEDED_TAG
from .storage import file_lock


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
        raise ExperimentError(f"MLflow tracking server {redact_uri(uri)} is unreachable ({type(e).__name__}); start "
                              "it or set tracking.uri / MLFLOW_TRACKING_URI to a running server") from None



class Tracker:
    """Driver-side: experiments and runs."""

    def __init__(self, uri: str):
        self.uri = uri
        if urlparse(uri).scheme == "sqlite":
            # a new SQLite store is created (schema migrations) by the first client: two drivers starting at
            # once must not both migrate it
            db = Path(urlparse(uri).path)
            db.parent.mkdir(parents=True, exist_ok=True)
            with file_lock(db.with_name(db.name + ".lock")):
                self.client = MlflowClient(uri)
                self.client.search_experiments(max_results=1)
        else:
            self.client = MlflowClient(uri)

    def experiment_id(self, name: str) -> str:
        exp = self.client.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
        artifact_location = None
        if urlparse(self.uri).scheme == "sqlite":
            # absolute, so that Ray workers (other working directories) write to the same place
            artifact_location = (Path(urlparse(self.uri).path).parent / "mlartifacts" / name).resolve().as_uri()
        try:
            return self.client.create_experiment(name, artifact_location=artifact_location)
        except MlflowException:  # created meanwhile by another driver (RESOURCE_ALREADY_EXISTS, a unique index)
            exp = self.client.get_experiment_by_name(name)
            if exp is None:
                raise
            return exp.experiment_id

    def find_run(self, experiment_id: str, run_key: str):
        runs = self.client.search_runs([experiment_id], filter_string=f"tags.`{RUN_KEY_TAG}` = '{run_key}'",
                                       max_results=100)
        runs = [r for r in runs if not r.data.tags.get(SUPERSEDED_TAG)]
        return runs[0] if runs else None

    def start_run(self, experiment_id: str, run_key: str, run_name: str, params: dict[str, str],
                  tags: dict[str, str], continue_existing: bool = True) -> str:
        """The run of this config: the existing one (reopened) or a new one with its params. With
        continue_existing=False an existing run is marked superseded by the new one (a fresh start)."""
        old = self.find_run(experiment_id, run_key)
        if old is not None and continue_existing:
            self.client.update_run(old.info.run_id, status="RUNNING")
            return old.info.run_id
        run = self.client.create_run(experiment_id, run_name=run_name, tags={RUN_KEY_TAG: run_key, **tags})
        items = [Param(k, v[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow's batch limit
            self.client.log_batch(run.info.run_id, params=items[i : i + 100])
        if old is not None:
            self.set_tags(old.info.run_id, {SUPERSEDED_TAG: run.info.run_id})
            if old.info.status == "RUNNING":
                self.finish(old.info.run_id, "KILLED")
        return run.info.run_id

    def has_metrics(self, run_id: str) -> bool:
        return bool(self.client.get_run(run_id).data.metrics)

    def set_tags(self, run_id: str, tags: dict[str, str]) -> None:
        self.client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def finish(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status=status)

    def deliver(self, records: list[dict]) -> None:
        """Records a job could not deliver itself (a backlog), in order; raises while MLflow is unreachable.
        Records MLflow refuses for good are set aside with one line."""
        say_refused(deliver(self.client, records, {}))
