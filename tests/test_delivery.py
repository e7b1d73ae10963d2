"""Tracking records on their way to MLflow (orchestrator/delivery.py, rundir.Backlog): a record MLflow refuses
for good is set aside and the rest keeps flowing; an outage is waited out without a request storm, also while
the queue drains at the end of a job; backlogs merge instead of overwriting."""

import time

import pytest
from devservers import free_port
from mlflow.tracking import MlflowClient

import orchestrator.delivery as delivery
from orchestrator.delivery import TrackingQueue, metric_record
from orchestrator.rundir import RunDir
from orchestrator.storage import RunStorage
from orchestrator.tracking import Tracker


@pytest.fixture
def tracker(tmp_path):
    return Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}")


def new_run(tracker, name="r"):
    return tracker.start_run(tracker.experiment_id("delivery"), name, name, {}, {})


def steps(client, run_id, key):
    return [m.step for m in client.get_metric_history(run_id, key)]


def test_a_record_mlflow_refuses_for_good_is_set_aside_and_the_rest_flows(tracker):
    run_id = new_run(tracker)
    deleted = new_run(tracker, "deleted")
    tracker.client.delete_run(deleted)
    said = []
    queue = TrackingQueue(tracker.uri, say=said.append)
    queue.put(metric_record(run_id, {"bad key!": 1.0}, 1))      # an invalid metric name
    queue.put(metric_record(deleted, {"loss": 1.0}, 1))          # a run that can no longer be logged to
    queue.put(metric_record("0" * 32, {"loss": 1.0}, 1))         # a run the store does not know
    for step in (1, 2, 3):
        queue.put(metric_record(run_id, {"loss": float(step)}, step))
    assert queue.close(timeout=20) == []
    assert steps(tracker.client, run_id, "loss") == [1, 2, 3]
    assert len(queue.rejected) == 3
    assert sum("refused" in line for line in said) >= 1 and not any("not answering" in line for line in said), said


def test_an_outage_is_not_stormed_while_the_queue_drains(monkeypatch):
    attempts = []
    real = delivery.deliver

    def counted(*args, **kwargs):
        attempts.append(time.monotonic())
        return real(*args, **kwargs)

    monkeypatch.setattr(delivery, "deliver", counted)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # as RunLogger sets it: the queue retries itself
    queue = TrackingQueue(f"http://127.0.0.1:{free_port()}", say=lambda _: None)  # nothing listens there
    queue.put(metric_record("0" * 32, {"loss": 1.0}, 1))
    time.sleep(0.5)
    pending = queue.close(timeout=3)
    time.sleep(2)  # after close() the thread gives up: what is pending is the caller's to keep
    assert len(pending) == 1
    assert 2 <= len(attempts) <= 6, f"{len(attempts)} attempts in 5.5 s"


def test_backlogs_merge_and_replay_once(tmp_path, tracker):
    run_id = new_run(tracker)
    backlog = RunDir(RunStorage(str(tmp_path / "store")), "run").backlog
    backlog.merge([metric_record(run_id, {"loss": 1.0}, 1)])
    backlog.merge([metric_record(run_id, {"loss": 2.0}, 2), metric_record(run_id, {"loss": 1.0}, 1)])
    assert [r["step"] for r in backlog.read()] == [1, 2]  # kept in order, nothing overwritten, no repeat
    assert backlog.replay(tracker) and not backlog.exists()
    assert steps(tracker.client, run_id, "loss") == [1, 2]


def test_a_backlog_record_refused_for_good_does_not_keep_the_backlog_forever(tmp_path, tracker):
    run_id = new_run(tracker)
    backlog = RunDir(RunStorage(str(tmp_path / "store")), "run").backlog
    backlog.merge([metric_record("0" * 32, {"loss": 1.0}, 1), metric_record(run_id, {"loss": 1.0}, 1)])
    assert backlog.replay(tracker) and not backlog.exists()
    assert steps(MlflowClient(tracker.uri), run_id, "loss") == [1]


def test_records_a_checkpoint_carried_follow_the_run_into_its_live_mlflow_run():
    """Resumed into another MLflow run (the old one deleted or superseded), what the checkpoint had not delivered
    goes to the live run instead of being refused for good."""
    from orchestrator.train_loop import retarget

    old, new, other = "a" * 32, "b" * 32, "c" * 32
    carried = [metric_record(old, {"loss": 1.0}, 5), {"kind": "status", "run_id": other, "status": "FINISHED"}]
    assert [r["run_id"] for r in retarget(carried, old, new)] == [new, other]
    assert retarget(carried, new, new) == carried and retarget(carried, None, new) == carried


def test_catching_up_replays_sample_jobs_too_and_leaves_a_driven_run_to_its_driver(tmp_path, tracker):
    """The sample job's backlogs are replayed with the run's; a run another launch holds is left to it (its
    result marker is only ever rewritten under the run's lease)."""
    import json

    from orchestrator.lease import RunLease
    from orchestrator.lifecycle import catch_up

    run_id = new_run(tracker)
    run = RunDir(RunStorage(str(tmp_path / "store")), "run")
    run.write_result({"metrics": {}, "tracking_behind": True})
    run.backlog.merge([metric_record(run_id, {"loss": 1.0}, 1)])
    run.samples("abc").backlog.merge([metric_record(run_id, {"fid": 9.0}, 0)])
    with RunLease(run, "another launch"):
        assert not catch_up(run, tracker)
        assert run.backlog.exists() and json.loads(run.storage.read_text("run/result.json"))["tracking_behind"]
    assert not run.samples("abc").backlog.exists()  # its own lease was free
    assert catch_up(run, tracker) and not run.backlog.exists()
    assert not run.read_result()["tracking_behind"]
    assert steps(tracker.client, run_id, "loss") == [1] and steps(tracker.client, run_id, "fid") == [0]


def test_report_finds_the_backlogs_of_runs_named_by_the_experiment_not_the_tracking_experiment(tmp_path):
    """Run directories are named from experiment.name; tracking.experiment only names the MLflow experiment."""
    from conftest import EXPERIMENTS, run_main

    from orchestrator.lifecycle import load_experiment
    from orchestrator.report import main as report

    args = [str(EXPERIMENTS / "table2.yaml"), "scale=test", f"storage.uri={tmp_path / 'store'}",
            f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", "tracking.experiment=elsewhere"]
    plan, storage, uri = load_experiment(args[0], args[1:], require_data=False)
    tracker = Tracker(uri)
    run_id = tracker.start_run(tracker.experiment_id("elsewhere"), plan.run_key, "r", {}, {})
    run = RunDir(storage, plan.run_name)
    run.backlog.merge([metric_record(run_id, {"loss": 2.0}, 7)])
    r = run_main(report, args, tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert not run.backlog.exists() and steps(tracker.client, run_id, "loss") == [7]
