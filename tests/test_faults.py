"""A long run survives its faults, injected for real: the MLflow server killed mid-run (and back, or not), an
S3 server gone for good or for 30 s, a driver frozen while a second launch takes its run over. (A lost worker, a
killed driver, a second launch, a corrupt checkpoint and a wiped storage are in test_run.py.)"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import EXPERIMENTS, run_main
from devservers import create_bucket, s3_client, start_mlflow_server, start_s3_server
from mlflow.tracking import MlflowClient

from orchestrator.report import main as report_main

pytestmark = [pytest.mark.slow, pytest.mark.soak]

TABLE2 = str(EXPERIMENTS / "table2.yaml")
TEST = ["scale=test", "cluster.num_workers=1", "eval.num_samples=0"]


def start(args, cwd, log, **env):
    base = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_GCS_SERVER_PORT")}
    return subprocess.Popen([sys.executable, "-m", "orchestrator.run", *args], cwd=cwd, stdout=log.open("w"),
                            stderr=subprocess.STDOUT, start_new_session=True, env={**base, **env})


def finish(proc, log, timeout=600):
    proc.wait(timeout=timeout)
    return proc.returncode, log.read_text()


def wait_for(predicate, proc, log, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, log.read_text()[-3000:]
        if predicate():
            return
        time.sleep(0.5)
    raise TimeoutError(log.read_text()[-3000:])


def training_run(client, experiment):
    exp = client.get_experiment_by_name(experiment)
    runs = [] if exp is None else client.search_runs([exp.experiment_id])
    return [r for r in runs if r.data.tags.get("tarflow.kind") == "run"]


def loss_steps(client, run_id):
    return [m.step for m in sorted(client.get_metric_history(run_id, "loss"), key=lambda m: m.timestamp)]


S3_ENV = {"AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "secret-k", "AWS_DEFAULT_REGION": "us-east-1"}


def s3_with_bucket(tmp_path, bucket, **server):
    """An S3 server of the tests' credentials (S3_ENV) holding an empty bucket."""
    s3 = start_s3_server(tmp_path / "s3", access_key="k", secret_key="secret-k", **server)
    create_bucket(s3.url, bucket, "k", "secret-k")
    return s3


def stored(s3, bucket, part):
    """Whether an object whose key contains part is in the bucket."""
    listing = s3_client(s3.url, "k", "secret-k").list_objects_v2(Bucket=bucket)
    return any(part in o["Key"] for o in listing.get("Contents", []))


def test_mlflow_outage_never_stalls_training_and_every_step_arrives_once(tmp_path):
    server = start_mlflow_server(tmp_path / "mlflow")
    port = server.ports[0]
    secret_uri = server.url.replace("http://", "http://alice:s3cret@")  # credentials in a URI never leak
    client = MlflowClient(server.url)
    try:
        # 1. killed at step ~20 and back ~10 s later, while training goes on
        # a model and run long enough to go on after the server is back (~35 s of training on a 2-core CPU)
        args = [TABLE2, *TEST, "model.arch=4-128-2-2", "train.steps=360", "train.log_every=5",
                "train.checkpoint_every=120", f"tracking.uri={secret_uri}", "experiment.name=outage"]
        log = tmp_path / "outage.log"
        proc = start(args, tmp_path, log)
        wait_for(lambda: training_run(client, "outage") and max(
            loss_steps(client, training_run(client, "outage")[0].info.run_id) or [0]) >= 20, proc, log)
        server.stop()
        down_at = time.time()
        time.sleep(5)
        server = start_mlflow_server(tmp_path / "mlflow", port=port)
        assert proc.poll() is None, "the run ended during the outage: make it longer"
        code, out = finish(proc, log)
        assert code == 0, out[-4000:]
        assert out.count("is not answering") == 1 and out.count("is back after") == 1, out[-4000:]
        (run,) = training_run(client, "outage")
        assert loss_steps(client, run.info.run_id) == list(range(5, 361, 5))  # in order, each once
        assert run.info.status == "FINISHED"
        assert "s3cret" not in out and "s3cret" not in json.dumps(run.data.params)
        stored = next((tmp_path / "runs").glob("outage-*/config.yaml")).read_text()
        assert "alice:***@" in stored and "s3cret" not in stored
        print(f"finished {time.time() - down_at:.0f} s after the server was killed")

        # 2. killed at step ~20 and still down at the end: training completes, MLflow catches up later
        args = [TABLE2, *TEST, "train.steps=120", "train.log_every=5", "train.checkpoint_every=40",
                f"tracking.uri={secret_uri}", "experiment.name=outage-end"]
        log = tmp_path / "outage-end.log"
        proc = start(args, tmp_path, log)
        wait_for(lambda: training_run(client, "outage-end") and max(
            loss_steps(client, training_run(client, "outage-end")[0].info.run_id) or [0]) >= 20, proc, log)
        server.stop()
        code, out = finish(proc, log)
        assert code == 0, out[-4000:]
        assert "MLflow at http://alice:***@127.0.0.1" in out and "is behind" in out, out[-3000:]
        run_dir = next((tmp_path / "runs").glob("outage-end-*"))
        result = json.loads((run_dir / "result.json").read_text())
        assert result["tracking_behind"] and result["metrics"]["step"] == 120 and "bpd" in result["metrics"]
        assert (run_dir / "tracking_backlog.json").is_file()

        server = start_mlflow_server(tmp_path / "mlflow", port=port)
        r = run_main(report_main, [*args], tmp_path)  # replays what MLflow missed, then builds the table
        assert r.returncode == 0, r.stderr[-3000:]
        assert "MLflow caught up" in r.stdout
        (run,) = training_run(client, "outage-end")
        assert loss_steps(client, run.info.run_id) == list(range(5, 121, 5))
        assert run.info.status == "FINISHED" and run.data.metrics["bpd"] == pytest.approx(result["metrics"]["bpd"])
        assert not (run_dir / "tracking_backlog.json").exists()
        assert not json.loads((run_dir / "result.json").read_text())["tracking_behind"]
    finally:
        server.stop()


def test_storage_gone_for_good_ends_in_one_paragraph(tmp_path):
    s3 = s3_with_bucket(tmp_path, "gone")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = [TABLE2, *TEST, "train.steps=400", "train.checkpoint_every=20", "cluster.max_failures=1",
            "storage.uri=s3://gone/runs", f"storage.endpoint_url={s3.url}", f"tracking.uri={uri}",
            "experiment.name=gone", "storage.async_upload=false", "storage.retry_seconds=3"]  # not 3 min a try
    log = tmp_path / "gone.log"
    proc = start(args, tmp_path, log, **S3_ENV)
    try:
        wait_for(lambda: stored(s3, "gone", "/checkpoint_00000040/state.pt.sha256"), proc, log)
    finally:
        s3.stop()
    code, out = finish(proc, log, timeout=900)
    assert code == 1, out[-4000:]
    err = next(line for line in out.splitlines() if line.startswith("error: "))
    assert "lost its storage" in err and s3.url in err and "cluster.max_failures=1" in err, err
    assert "storage.retry_seconds=3" in err, err
    assert "The last checkpoint it saved is checkpoint_000000" in err and "resumes from there" in err, err
    assert "Traceback" not in out.split("error: ")[-1]
    client = MlflowClient(uri)
    (run,) = training_run(client, "gone")
    assert run.info.status == "FAILED" and "lost its storage" in run.data.tags["tarflow.failure"]


def test_a_storage_hiccup_during_a_checkpoint_upload_is_waited_out_in_place(tmp_path):
    """S3 stopped for 30 s right after a checkpoint, then back on the same port: the next upload waits for it
    (storage.retry_seconds) instead of failing in Ray's upload thread and restarting the workers from the last
    checkpoint (one of max_failures spent, the steps since trained twice)."""
    s3 = s3_with_bucket(tmp_path, "hiccup", kind="seaweedfs")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = [TABLE2, *TEST, "train.steps=300", "train.log_every=10", "train.checkpoint_every=50",
            "cluster.max_failures=1", "storage.uri=s3://hiccup/runs", f"storage.endpoint_url={s3.url}",
            f"tracking.uri={uri}", "experiment.name=hiccup", "storage.async_upload=false"]
    log = tmp_path / "hiccup.log"
    proc = start(args, tmp_path, log, **S3_ENV)
    try:
        wait_for(lambda: stored(s3, "hiccup", "/checkpoint_00000050/state.pt.sha256"), proc, log)
        ports = s3.info["ports"]
        s3.stop()
        time.sleep(30)
        assert proc.poll() is None, log.read_text()[-3000:]
        client = MlflowClient(uri)
        (run,) = training_run(client, "hiccup")
        assert max(loss_steps(client, run.info.run_id)) < 300  # an upload (synchronous here) waits for the storage
        s3 = start_s3_server(tmp_path / "s3", kind="seaweedfs", access_key="k", secret_key="secret-k", ports=ports)
        code, out = finish(proc, log)
    finally:
        s3.stop()
    assert code == 0, out[-4000:]
    (run,) = training_run(client, "hiccup")
    assert loss_steps(client, run.info.run_id) == list(range(10, 301, 10))  # each once
    assert client.get_metric_history(run.info.run_id, "resumed_from_step") == []  # no restart of the workers
    assert json.loads(run.data.tags["tarflow.attempts"]) == [{"from": 0, "workers": 1, "to": 300}]
    assert "RayTrainWorker" not in out and "Traceback" not in out, out[-4000:]


def test_a_frozen_driver_whose_run_another_launch_took_over_stops_and_says_so(tmp_path):
    """A driver frozen past its lease's ttl (a suspended laptop, a paused VM) finds, once it runs again, that a
    second launch drives its run: it ends with exit 1 and one paragraph, having written nothing more, and its
    workers waited as soon as the lease could no longer be trusted. The second launch finishes the run; MLflow
    has every step once."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    lease = {"TARFLOW_LEASE_TTL_S": "6", "TARFLOW_LEASE_INTERVAL_S": "1"}
    args = [TABLE2, *TEST, "train.steps=600", "train.log_every=10", "train.checkpoint_every=50",
            f"tracking.uri={uri}", "experiment.name=takeover"]
    first_log, second_log = tmp_path / "first.log", tmp_path / "second.log"
    client = MlflowClient(uri)
    client.search_experiments()  # the store created here, not by the driver while this test reads it
    first = start(args, tmp_path, first_log, **lease)
    wait_for(lambda: training_run(client, "takeover") and max(
        loss_steps(client, training_run(client, "takeover")[0].info.run_id) or [0]) >= 60, first, first_log)
    os.kill(first.pid, signal.SIGSTOP)  # the driver only: its Ray instance and workers go on
    try:
        time.sleep(7)  # past the ttl, as its heartbeat's age on this host shows
        second = start(args, tmp_path, second_log, **lease)
        wait_for(lambda: "took over the stale lease" in second_log.read_text(), second, second_log)
    finally:
        os.kill(first.pid, signal.SIGCONT)
    code, out = finish(first, first_log)
    assert code == 1, out[-4000:]
    err = next(line for line in out.splitlines() if line.startswith("error: "))
    assert "was taken over by another launch (orchestrator.run of takeover/" in err and "drives the run now" in err, err
    assert f"pid {second.pid} on" in err and "Traceback" not in out.split("error: ")[-1]
    assert "has not renewed the run's lease in time" in out and "another launch took this run over" in out
    code, out = finish(second, second_log)
    assert code == 0, out[-4000:]
    assert "watching it for up to 6 s" in out and "unchanged for 6 s" in out  # by its own clock, for the ttl
    (run,) = training_run(client, "takeover")
    assert run.info.status == "FINISHED"
    assert loss_steps(client, run.info.run_id) == list(range(10, 601, 10))  # each once
    attempts = json.loads(run.data.tags["tarflow.attempts"])
    assert [a["from"] for a in attempts][0] == 0 and len(attempts) == 2 and attempts[1]["from"] % 50 == 0, attempts


def test_a_killed_run_whose_mlflow_run_was_deleted_resumes_into_a_live_run(tmp_path, local_ray):
    """Killed after a checkpoint, its MLflow run deleted meanwhile: the relaunch delivers every step after the
    checkpoint (and what the checkpoint carried) to a new, live MLflow run and leaves no backlog behind."""
    from orchestrator.run import main

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = [TABLE2, *TEST, "model.arch=4-128-2-2", "train.steps=600", "train.checkpoint_every=200",
            "train.log_every=50", "storage.async_upload=false", f"tracking.uri={uri}", "experiment.name=deleted"]
    log = tmp_path / "first.log"
    proc = start(args, tmp_path, log)
    wait_for(lambda: any((tmp_path / "runs").glob("deleted-*/checkpoint_00000200/state.pt.sha256")), proc, log)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    client = MlflowClient(uri)
    (old,) = training_run(client, "deleted")
    client.delete_run(old.info.run_id)

    r = run_main(main, args, tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    (run,) = training_run(client, "deleted")
    assert run.info.run_id != old.info.run_id and run.info.status == "FINISHED"
    (resumed,) = [m.step for m in client.get_metric_history(run.info.run_id, "resumed_from_step")]
    logged = loss_steps(client, run.info.run_id)
    assert 200 <= resumed < 600 and [s for s in logged if s > resumed] == list(range(resumed + 50, 601, 50)), \
        (resumed, logged)
    run_dir = next((tmp_path / "runs").glob("deleted-*"))
    assert not (run_dir / "tracking_backlog.json").exists()
    assert "bpd" in run.data.metrics
