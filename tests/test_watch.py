"""What a researcher watches during a run, checked without Ray where the real code allows: periodic evaluation
driven through the real training loop (one process), its exactly-once delivery to MLflow, data lineage and
the tables MLflow renders."""

import io

import pytest
import torch
from loop_harness import TABLE2, train_directly
from mlflow.tracking import MlflowClient
from PIL import Image

from orchestrator.config import compose_experiment
from orchestrator.delivery import RunLogger, deliver
from orchestrator.periodic import IMAGE_KEY
from orchestrator.plan import plan_run
from orchestrator.tracking import Tracker


# Gaussian noise and label drop: both draw from the global RNG that evaluation must leave alone; EMA on
def test_periodic_evaluation_leaves_the_training_trajectory_alone_and_keeps_its_schedule_over_a_restart(
        tmp_path, monkeypatch):
    plain, plain_state, _ = train_directly(tmp_path / "a", monkeypatch, [])
    watched, watched_state, _ = train_directly(tmp_path / "b", monkeypatch, ["eval.every_steps=4"])

    losses = {s: m["loss"] for s, m in plain.metrics.items()}
    assert sorted(losses) == list(range(1, 13))
    assert {s: m["loss"] for s, m in watched.metrics.items() if "loss" in m} == losses  # bit for bit
    for a, b in [(plain_state.model, watched_state.model), (plain_state.ema, watched_state.ema)]:
        assert a.training == b.training
        for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
            assert torch.equal(x, y), name

    evaluated = {s: m for s, m in watched.metrics.items() if "periodic/bpd" in m}
    assert sorted(evaluated) == [4, 8, 12]
    assert all(0 < m["periodic/bpd"] < 20 and 0 <= m["periodic/share"] < 1 for m in evaluated.values())
    assert [(k, s) for k, s, _ in watched.images] == [(IMAGE_KEY, 4), (IMAGE_KEY, 8), (IMAGE_KEY, 12)]
    assert all(png.startswith(b"\x89PNG") for _, _, png in watched.images)

    # stopped right after the checkpoint of step 8, resumed from it: steps 4, 8 before, 12 after, none twice
    first, _, checkpoints = train_directly(tmp_path / "c", monkeypatch, ["eval.every_steps=4"], crash_at=8)
    second, _, _ = train_directly(tmp_path / "c", monkeypatch, ["eval.every_steps=4"], resume=checkpoints[8])
    assert sorted(s for s, m in first.metrics.items() if "periodic/bpd" in m) == [4, 8]
    assert sorted(s for s, m in second.metrics.items() if "periodic/bpd" in m) == [12]
    assert [s for _, s, _ in first.images + second.images] == [4, 8, 12]
    # the same weights give the same figure: the subset and its dequantisation noise are fixed
    assert first.metrics[4]["periodic/bpd"] == evaluated[4]["periodic/bpd"]


def test_a_checkpoint_reports_the_mean_loss_since_the_last_one(tmp_path, monkeypatch):
    """What a sweep's scheduler (ASHA) compares trials by: the loss of every step since the last report, averaged
    over all ranks, not the last batch of rank 0."""
    logged, _, _ = train_directly(tmp_path, monkeypatch, [])
    w = logged.worker
    losses = {s: m["loss"] for s, m in logged.metrics.items()}  # log_every=1: every step's loss
    assert sorted(w.reported) == [4, 8, 12]
    for end in (4, 8, 12):
        mean = sum(losses[s] for s in range(end - 3, end + 1)) / 4
        assert w.reported[end]["loss"] == pytest.approx(mean, rel=1e-6), (end, w.reported[end], mean)


@pytest.fixture(scope="module")
def tracker(tmp_path_factory):
    return Tracker(f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}")


def new_run(tracker, name):
    return tracker.start_run(tracker.experiment_id("watch"), name, name, {}, {})


def test_a_step_evaluated_again_after_a_crash_reaches_mlflow_once(tracker):
    """A crash after an evaluation but before the checkpoint of its step: the restarted run evaluates that step
    again, and delivery keeps the first (images as metric steps)."""
    uri, run_id = tracker.uri, new_run(tracker, "once")
    logger = RunLogger.__new__(RunLogger)  # its records, without a delivery thread
    records = []
    logger.queue, logger.run_id = type("Q", (), {"put": staticmethod(records.append)})(), run_id
    def png(value):
        buf = io.BytesIO()
        Image.new("RGB", (8, 8), (value, 0, 0)).save(buf, format="PNG")
        return buf.getvalue()

    for step in (4, 8):
        logger.log_metrics({"periodic/bpd": 5.0 - step / 10}, step)
        logger.log_image(png(step), IMAGE_KEY, step)
    deliver(tracker.client, records, {})
    records.clear()
    for step in (8, 12):  # the new process: step 8 again
        logger.log_metrics({"periodic/bpd": 1.0}, step)
        logger.log_image(png(100 + step), IMAGE_KEY, step)
    deliver(tracker.client, records, {})  # a fresh process knows nothing yet: it asks MLflow

    client = MlflowClient(uri)
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "periodic/bpd")] == [
        (4, 4.6), (8, 4.2), (12, 1.0)]
    pngs = sorted(a.path for a in client.list_artifacts(run_id, "images") if a.path.endswith(".png"))
    assert [p.split("+step+")[1].split("+")[0] for p in pngs] == ["12", "4", "8"]
    assert client.get_run(run_id).data.tags.get("mlflow.loggedImages") == "True"


@pytest.mark.parametrize("every", [None, 500])
def test_the_dry_run_shows_what_periodic_evaluation_costs(every):
    from orchestrator.periodic import describe_watching, periodic_share

    cfg = compose_experiment(TABLE2, [f"eval.every_steps={every or 'null'}"])  # paper scale, 2-768-8-8
    plan = plan_run(cfg, require_data=False)
    line = describe_watching(cfg, plan.model)
    assert "system metrics of every node every 10 s" in line
    if every is None:
        assert "off" in line and periodic_share(cfg, plan.model) is None
        return
    share = periodic_share(cfg, plan.model)
    fwd = plan.model.flops_per_image()
    expected = (1024 + 16) * fwd / ((1024 + 16) * fwd + 500 * 256 * 3 * fwd)
    assert share == pytest.approx(expected) and f"{share:.2%}" in line


def test_the_data_set_is_an_mlflow_input_whose_digest_follows_the_data(tmp_path, tracker):
    from orchestrator.lineage import dataset_digest, log_data_input

    data = plan_run(compose_experiment(TABLE2, ["scale=test"])).data
    source, digest = dataset_digest(data)
    assert source == "/usr/share/datasets/fashion-mnist" and len(digest) == 16
    assert dataset_digest(data) == (source, digest)  # the same data, the same digest
    smaller = plan_run(compose_experiment(TABLE2, ["scale=test", "data.limit=256"])).data
    assert dataset_digest(smaller)[1] != digest  # what the model sees differs
    copy = tmp_path / "fmnist"
    copy.mkdir()
    for f in data.root_path.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    labels = bytearray((copy / "t10k-labels-idx1-ubyte.gz").read_bytes())
    labels[-5] ^= 1
    (copy / "t10k-labels-idx1-ubyte.gz").write_bytes(labels)
    other = plan_run(compose_experiment(TABLE2, ["scale=test", f"data.root={copy}"])).data
    assert dataset_digest(other)[1] != digest  # one byte of one file

    uri, run_id = tracker.uri, new_run(tracker, "lineage")
    for _ in range(2):  # a resumed run logs it again: still one input
        log_data_input(tracker.client, run_id, data)
    (inp,) = MlflowClient(uri).get_run(run_id).inputs.dataset_inputs
    assert (inp.dataset.name, inp.dataset.digest, inp.dataset.source_type) == ("fashion_mnist", digest, "local")
    assert '"/usr/share/datasets/fashion-mnist"' in inp.dataset.source
    assert [(t.key, t.value) for t in inp.tags] == [("mlflow.data.context", "training")]


def test_tables_are_logged_as_mlflow_tables_and_replaced_when_published_again(tracker, tmp_path):
    import pandas as pd

    from orchestrator.tables import log_table

    run_id = new_run(tracker, "table")
    first = pd.DataFrame({"model": ["Glow", "TarFlow (ours)"], "paper": [3.81, None], "ours": [None, 6.3]})
    log_table(tracker.client, run_id, first, "table/table.json")
    log_table(tracker.client, run_id, first.assign(ours=[None, 5.9]), "table/table.json")  # a rerun's table
    run = tracker.client.get_run(run_id)
    assert run.data.tags["mlflow.loggedArtifacts"] == '[{"path": "table/table.json", "type": "table"}]'
    shown = pd.read_json(tracker.client.download_artifacts(run_id, "table/table.json", str(tmp_path)), orient="split")
    assert shown["model"].tolist() == ["Glow", "TarFlow (ours)"] and shown["ours"].tolist()[1] == 5.9


def test_system_metrics_keep_sampling_through_a_tracking_outage_and_resume_their_steps(tracker, monkeypatch):
    import time

    from devservers import free_port

    from orchestrator.monitoring import start_system_metrics

    for key, value in [("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0"), ("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")]:
        monkeypatch.setenv(key, value)  # what start_system_metrics sets in a worker, undone after the test
    run_id = new_run(tracker, "system")
    started = time.perf_counter()
    down = start_system_metrics(0.2, f"http://127.0.0.1:{free_port()}", run_id, "node-a-and-the-rest")
    assert time.perf_counter() - started < 1  # nothing waits on MLflow before training

    time.sleep(1.5)
    assert down._process.is_alive() and len(down.mlflow_logger.data) >= 8  # kept, to be sent later
    down.finish()  # its last send fails too: not an error of the run

    for _ in range(2):  # a worker group that restarts: steps continue after those the run has
        up = start_system_metrics(0.2, tracker.uri, run_id, "node-a-and-the-rest")
        time.sleep(1.0)
        up.finish()
    cpu = "system/node-a-and-t/cpu_utilization_percentage"  # the node's name: its id's first 12 characters
    steps = [m.step for m in tracker.client.get_metric_history(run_id, cpu)]
    assert len(steps) >= 4 and steps == sorted(set(steps)) and steps[0] == 0, steps


def test_the_closing_summary_says_where_to_look_without_credentials():
    from orchestrator.summary import figures, mlflow_address

    assert mlflow_address("http://alice:s3cret@mlflow:5000/", "3", "abc") == \
        "http://alice:***@mlflow:5000/#/experiments/3/runs/abc"
    assert mlflow_address("sqlite:////w/mlflow.db", "1", "abc") == \
        "mlflow ui --backend-store-uri sqlite:////w/mlflow.db   then http://127.0.0.1:5000/#/experiments/1/runs/abc"
    assert figures({"step": 300, "loss": -1.42389, "bpd": 6.28695, "images_per_sec": 1145.9, "lr": 1e-5,
                    "periodic/share": 0.0153}) == "step 300  loss -1.424  bpd 6.287  images_per_sec 1,146  " \
                                                  "periodic/share 1.5%"


def test_a_sweep_prints_one_line_per_trial_event(capsys):
    from types import SimpleNamespace

    from orchestrator.progress import TrialEvents

    events = TrialEvents("s")
    a = SimpleNamespace(trial_id="t_00000", config={"overrides": {"model.patch_size": 2}}, last_result={})
    b = SimpleNamespace(trial_id="t_00001", config={"overrides": {"model.patch_size": 4}}, last_result={},
                        get_error=lambda: RuntimeError("Traceback ...\nValueError: boom"))
    for trial in (a, b):
        events.on_trial_start(0, [], trial)
    a.last_result = {"step": 10, "loss": 0.123456, "done": False}
    events.on_trial_result(0, [], a, a.last_result)
    b.last_result = {"step": 10, "loss": 0.9, "done": True}  # the result the scheduler stopped it at
    events.on_trial_result(0, [], b, b.last_result)
    events.on_trial_complete(0, [], b)
    a.last_result = {"step": 20, "loss": 0.1, "bpd": 6.3}
    events.on_trial_complete(0, [], a)
    events.on_trial_error(0, [], b)
    assert capsys.readouterr().out.splitlines() == [
        "[sweep] trial t_00000 (patch_size=2) started",
        "[sweep] trial t_00001 (patch_size=4) started",
        "[sweep] trial t_00000 (patch_size=2) reported step 10  loss 0.1235",
        "[sweep] trial t_00001 (patch_size=4) reported step 10  loss 0.9",
        "[sweep] trial t_00001 (patch_size=4) stopped early by the scheduler after step 10  loss 0.9",
        "[sweep] trial t_00000 (patch_size=2) finished: step 20  loss 0.1  bpd 6.3",
        "[sweep] trial t_00001 (patch_size=4) errored: ValueError: boom",
    ]
