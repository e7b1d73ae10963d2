"""Delivery of tracking records off the training path: rank 0 of a run (and the workers of an evaluation or
sample job) puts what it logs (metrics, tags, artifacts, images) on a queue that a background thread delivers
to MLflow in order, each metric step and image step exactly once (steps MLflow already has are skipped).

During an outage the queue keeps growing (bounded by what a run logs: one record per log interval), the
outage is said once, and delivery resumes when the server is back. What is undelivered travels with every
checkpoint, so a restart loses nothing; what is still undelivered at the end waits in the run directory's
backlog (rundir.Backlog) for the next command that reaches MLflow.
"""

from __future__ import annotations

import base64
import collections
import io
import logging
import os
import re
import sys
import tempfile
import threading
import time
from pathlib import Path

from mlflow.entities import Metric, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from .config import redact_uri

# how long the end of a job waits for MLflow to take what is queued before keeping the rest in storage
DRAIN_S = float(os.environ.get("TARFLOW_TRACKING_DRAIN_S", 30))

def quick_failing_http(retries: int = 1) -> None:
    """MLflow's HTTP client retries for minutes by default; ours fail within seconds and are handled (and
    urllib3's line per retry is not printed). MLflow's own "View run at <url>" lines are off: a tracking URI
    may hold credentials."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", str(retries))
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)


def say(message: str) -> None:
    """One line on stderr, as it is: inside Ray Train workers print() goes through a logger that echoes it."""
    sys.stderr.write(message + "\n")
    sys.stderr.flush()



# Delivery off the training path


def metric_record(run_id: str, metrics: dict, step: int) -> dict:
    return {"kind": "metrics", "run_id": run_id, "step": int(step), "ts": int(time.time() * 1000),
            "values": {k: float(v) for k, v in metrics.items()}}


# what MLflow answers for a record it will never take (a bad key or value, a run it does not know or that was
# deleted): retrying cannot help, and waiting on it would block every record behind it
REFUSED_FOR_GOOD = {"INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST", "INVALID_STATE", "BAD_REQUEST"}


def refused_for_good(e: Exception) -> bool:
    return isinstance(e, MlflowException) and e.error_code in REFUSED_FOR_GOOD


def deliver(client: MlflowClient, records: list[dict], last_step: dict) -> list[tuple[dict, str]]:
    """Send records in order, each metric step and image step exactly once; returns the records MLflow refused
    for good, with why (they are set aside). Raises on an outage (nothing is lost: what was sent is skipped
    when sent again)."""
    refused = []
    for rec in records:
        try:
            deliver_record(client, rec, last_step)
        except Exception as e:
            if not refused_for_good(e):
                raise
            refused.append((rec, f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"))
    return refused


def deliver_record(client: MlflowClient, rec: dict, last_step: dict) -> None:
    """One record. last_step: (run_id, key) -> last step MLflow has, filled in per run on first sight."""
    run_id = rec["run_id"]
    if rec["kind"] == "metrics":
        if (run_id, None) not in last_step:
            run = client.get_run(run_id)
            for key in run.data.metrics:
                last_step[(run_id, key)] = max(m.step for m in client.get_metric_history(run_id, key))
            last_step[(run_id, None)] = 0
        fresh = [Metric(k, v, rec["ts"], rec["step"]) for k, v in rec["values"].items()
                 if rec["step"] > last_step.get((run_id, k), -1)]
        if fresh:
            client.log_batch(run_id, metrics=fresh)
            for m in fresh:
                last_step[(run_id, m.key)] = m.step
    elif rec["kind"] == "tags":
        client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in rec["values"].items()])
    elif rec["kind"] == "artifact":
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / Path(rec["path"]).name
            path.write_bytes(base64.b64decode(rec["data"]))
            client.log_artifact(run_id, str(path), str(Path(rec["path"]).parent) or None)
    elif rec["kind"] == "image":
        deliver_image(client, rec, last_step)
    elif rec["kind"] == "status":
        client.set_terminated(run_id, status=rec["status"])


def say_refused(refused: list[tuple[dict, str]], say_line=say) -> None:
    """One line for records MLflow refused for good."""
    if refused:
        rec, why = refused[0]
        say_line(
            f"[tracking] MLflow refused {len(refused)} record(s) for good and they are set aside (the first: "
            f"{rec['kind']} of run {rec['run_id']}: {why}); the rest is delivered")


# what MlflowClient.log_image(key=, step=) names its files: images/<key, / as ~>+step+<step>+timestamp+...
# (older MLflow versions: % instead of +)
IMAGE_FILE = re.compile(r"images/(?P<key>.+?)[+%]step[+%](?P<step>\d+)[+%]timestamp[+%]")


def logged_image_steps(client: MlflowClient, run_id: str) -> dict[str, int]:
    """The last step of every time-stepped image key the run has, from its artifact listing."""
    last: dict[str, int] = {}
    for f in client.list_artifacts(run_id, "images"):
        if m := IMAGE_FILE.match(f.path):
            key = m["key"].replace("~", "/")
            last[key] = max(last.get(key, -1), int(m["step"]))
    return last


def deliver_image(client: MlflowClient, rec: dict, last_step: dict) -> None:
    """A time-stepped image (the UI's image step slider), each (key, step) once, as metric steps are."""
    from PIL import Image

    run_id = rec["run_id"]
    if (run_id, "image:") not in last_step:
        for key, step in logged_image_steps(client, run_id).items():
            last_step[(run_id, f"image:{key}")] = step
        last_step[(run_id, "image:")] = 0
    seen = (run_id, f"image:{rec['key']}")
    if rec["step"] <= last_step.get(seen, -1):
        return
    try:
        client.log_image(run_id, Image.open(io.BytesIO(base64.b64decode(rec["data"]))), key=rec["key"],
                         step=rec["step"], timestamp=rec["ts"], synchronous=True)
    except Exception:
        last_step.pop((run_id, "image:"), None)  # half delivered? list the run's images again on the retry
        raise
    last_step[seen] = rec["step"]


class TrackingQueue:
    """One per process: records of any run, delivered in order by a daemon thread. A record MLflow refuses for
    good is set aside (self.rejected) with one line; an outage is waited out with back-off (30 s at most, 2 s
    while close() drains), and close() ends the thread's attempts: what is pending then is the caller's."""

    def __init__(self, uri: str, say=say):
        self.uri, self.say = uri, say
        self.records: collections.deque = collections.deque()
        self.cond = threading.Condition()
        self.down_since: float | None = None
        self.closing = self.stopped = False
        self.wake = threading.Event()  # cuts an outage's wait short once, when close() starts draining
        self.last_step: dict = {}
        self.delivered = 0
        self.rejected: list[tuple[dict, str]] = []
        self.thread = threading.Thread(target=self._run, name="mlflow-delivery", daemon=True)
        self.thread.start()

    def put(self, record: dict) -> None:
        with self.cond:
            self.records.append(record)
            self.cond.notify()

    def requeue(self, records: list[dict]) -> None:
        """Records carried over from before a restart go first (steps MLflow has are skipped)."""
        with self.cond:
            self.records.extendleft(reversed(records))
            self.cond.notify()

    def pending(self) -> list[dict]:
        with self.cond:
            return list(self.records)

    def close(self, timeout: float) -> list[dict]:
        """Wait up to timeout for the queue to drain; returns what is still undelivered, which the thread no
        longer tries to send."""
        deadline = time.time() + timeout
        with self.cond:
            self.closing = True
            self.wake.set()
            self.cond.notify_all()
            while self.records and time.time() < deadline:
                self.cond.wait(min(1.0, max(0.01, deadline - time.time())))
            self.stopped = True
            self.wake.set()
            return list(self.records)

    def _run(self) -> None:
        client = MlflowClient(self.uri)
        wait = 1.0
        while True:
            with self.cond:
                while not self.records and not self.stopped:
                    self.cond.wait()
                if self.stopped:
                    return
                rec = self.records[0]
            try:
                refused = deliver(client, [rec], self.last_step)
            except Exception as e:  # an outage: keep the record, try later
                self._down(e)
                self.wake.wait(wait)  # new records do not shorten the wait: no request storm during an outage
                self.wake.clear()
                wait = min(wait * 2, 2.0 if self.closing else 30.0)
                continue
            with self.cond:
                if self.records and self.records[0] is rec:
                    self.records.popleft()
                self.delivered += 1
                self.cond.notify_all()
            if refused and not self.rejected:
                say_refused(refused, self.say)
            self.rejected += refused
            self._up()
            wait = 1.0

    def _down(self, e: Exception) -> None:
        if self.down_since is None:
            self.down_since = time.time()
            self.say(f"[tracking] MLflow at {redact_uri(self.uri)} is not answering ({type(e).__name__}); "
                     f"training goes on and {len(self.records)} record(s) wait in the queue")

    def _up(self) -> None:
        if self.down_since is not None:
            self.say(f"[tracking] MLflow is back after {time.time() - self.down_since:.0f} s; delivering "
                     f"{len(self.records)} queued record(s)")
            self.down_since = None


class RunLogger:
    """Worker-side (rank 0) logging into one MLflow run, through the process's TrackingQueue: never blocks."""

    _queues: dict[str, TrackingQueue] = {}

    def __init__(self, uri: str, run_id: str):
        quick_failing_http(retries=0)  # the queue retries, later, off the training path
        self.queue = self._queues.get(uri) or self._queues.setdefault(uri, TrackingQueue(uri))
        self.run_id = run_id

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if metrics:
            self.queue.put(metric_record(self.run_id, metrics, step))

    def set_tags(self, tags: dict) -> None:
        self.queue.put({"kind": "tags", "run_id": self.run_id, "values": {k: str(v) for k, v in tags.items()}})

    def log_bytes(self, data: bytes, artifact_file: str) -> None:
        self.queue.put({"kind": "artifact", "run_id": self.run_id, "path": artifact_file,
                        "data": base64.b64encode(data).decode()})

    def log_image(self, png: bytes, key: str, step: int) -> None:
        """A PNG at a training step: the MLflow UI shows a run's images of one key with a step slider."""
        self.queue.put({"kind": "image", "run_id": self.run_id, "key": key, "step": int(step),
                        "ts": int(time.time() * 1000), "data": base64.b64encode(png).decode()})

    def log_artifact(self, local_path: str | Path, artifact_path: str | None = None) -> None:
        local_path = Path(local_path)
        self.log_bytes(local_path.read_bytes(), f"{artifact_path}/{local_path.name}" if artifact_path
                       else local_path.name)

    def log_dict(self, data: dict, artifact_file: str) -> None:
        import json

        self.log_bytes(json.dumps(data, indent=1).encode(), artifact_file)

