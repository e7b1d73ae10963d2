"""Sweeps through `python -m orchestrator.run`: Tune trials of Ray Train runs, ASHA, sample-time axes,
nested MLflow runs, the results table, and resuming an interrupted sweep."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from conftest import EXPERIMENTS, run_main
from mlflow.tracking import MlflowClient

from orchestrator.run import main

SWEEP = str(EXPERIMENTS / "sweep_patch_noise.yaml")
ASHA_SWEEP = str(EXPERIMENTS / "sweep_patch_depth.yaml")
TEST = ["scale=test", "cluster.num_workers=1"]


def sweep_runs(uri, experiment):
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    return client, ([] if exp is None else client.search_runs([exp.experiment_id], max_results=1000))


@pytest.mark.parametrize("override,message", [
    ("sweep.train_axes={train.lerning_rate: [0.1, 0.2]}", "to add an entry to a dict from the command line"),
    ("++sweep.train_axes={train.lerning_rate: [0.1, 0.2]}", "unknown key 'train.lerning_rate'"),
    ("sweep.train_axes={train.noise_std: []}", "sweep axis 'train.noise_std' has an empty grid list"),
    ("sweep.train_axes={train.noise_std: [0.1, -0.2]}", "train.noise_std=-0.2 is out of range"),
    ("++sweep.train_axes={train.lr: {uniform: [0.2, 0.1]}}", "lo < hi"),
    ("++sweep.train_axes={eval.guidance: [1.0, 2.0]}", "sample-time setting"),
    ("++sweep.sample_axes={train.lr: [0.1]}", "not a sampling knob"),
    ("sweep.train_axes={model.patch_size: [3]}", "patch_size=3 does not divide image_size=16"),
    ("sweep.scheduler.type=asha", "ASHA on 'loss' would compare trials trained at different noise levels"),
])
def test_bad_search_space_fails_before_any_trial(tmp_path, override, message):
    r = run_main(main, [SWEEP, *TEST, override], tmp_path)
    assert r.returncode == 2 and message in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    assert list(tmp_path.iterdir()) == []


def test_sweep_dry_run_lists_trials_and_settings(tmp_path):
    r = run_main(main, [SWEEP, *TEST, "--dry-run"], tmp_path)
    assert r.returncode == 0, r.stderr
    assert "4 trial(s) over model.patch_size grid [2, 4]; train.noise_std grid [0.05, 0.15]" in r.stdout
    assert "2 sample-time setting(s) per trial: guidance=0.0; guidance=2.0" in r.stdout


def test_a_sweep_without_sample_axes_has_no_sample_time_settings():
    """Each trial is then evaluated once, by its own run (product() over no axes would add an empty setting,
    a second identical evaluation of every trial)."""
    from orchestrator.lifecycle import load_experiment
    from orchestrator.sweep import sweep_of

    plan, _, _ = load_experiment(str(EXPERIMENTS / "ablation_nvp_vp.yaml"), ["scale=test"], require_data=False)
    sweep = sweep_of(plan, require_data=False)
    assert sweep.sample_settings == [] and len(sweep.train_axes) == 1
    plan, _, _ = load_experiment(SWEEP, ["scale=test"], require_data=False)
    assert sweep_of(plan, require_data=False).sample_settings == [{"eval.guidance": 0.0}, {"eval.guidance": 2.0}]


def test_the_sampler_and_its_tolerance_are_sample_time_axes(tmp_path):
    axes = "++sweep.sample_axes={eval.sampler: [sequential, jacobi], eval.jacobi.tol: [0.01, 0.001]}"
    r = run_main(main, [SWEEP, *TEST, axes, "--dry-run"], tmp_path)
    assert r.returncode == 0, r.stderr
    assert "8 sample-time setting(s) per trial: guidance=0.0,sampler=sequential,tol=0.01;" in r.stdout  # × guidance
    assert "guidance=2.0,sampler=jacobi,tol=0.001" in r.stdout


@pytest.mark.slow
@pytest.mark.parametrize("scale", ["paper", "smoke"])
def test_every_experiment_logs_its_params_to_mlflow(tmp_path, scale):
    """Each experiment's config (a sweep's, with its axes, included) is accepted as MLflow params by a real
    store: a joint axis such as "model.num_blocks,model.layers_per_block" is not a valid MLflow name as is."""
    from orchestrator.lifecycle import load_experiment
    from orchestrator.records import flat_params
    from orchestrator.tracking import Tracker

    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiments = sorted(EXPERIMENTS.glob("*.yaml"))
    for path in experiments:
        plan, _, _ = load_experiment(str(path), [f"scale={scale}"], require_data=False)
        params = flat_params(plan.cfg)
        run_id = tracker.start_run(tracker.experiment_id(plan.experiment_name), plan.run_key, plan.display_name,
                                   params, tags={})
        logged = tracker.client.get_run(run_id).data.params
        assert len(logged) == len(params) and logged["model.arch"] == str(plan.cfg.model.arch), path.name
    blocks = tracker.client.search_runs([tracker.client.get_experiment_by_name("ablation_blocks_layers").experiment_id])
    assert blocks[0].data.params["sweep.train_axes.model.num_blocks model.layers_per_block"].startswith("[[1,")


@pytest.mark.slow
def test_sweep_with_asha_nested_runs_table_and_resume(tmp_path, mlflow_server, local_ray):
    exp = f"sweep-{time.time_ns()}"
    # two trials (patch 2 and 4) of one layer per block, so one finishes before the driver is killed
    args = [ASHA_SWEEP, *TEST, "train.steps=60", f"experiment.name={exp}", f"tracking.uri={mlflow_server}",
            "cluster.num_cpus=2", "sweep.train_axes={model.patch_size: [2, 4], model.layers_per_block: [1]}"]

    # start, wait until one trial has finished, then kill the driver
    log = (tmp_path / "first.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator.run", *args], cwd=tmp_path, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 600
    finished_first = []
    while time.time() < deadline and proc.poll() is None:
        client, runs = sweep_runs(mlflow_server, exp)
        finished_first = [r for r in runs if r.data.tags.get("tarflow.trial") and r.info.status == "FINISHED"]
        if finished_first:
            break
        time.sleep(1)
    assert finished_first, (tmp_path / "first.log").read_text()[-3000:]
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    first_steps = {r.info.run_id: [m.step for m in client.get_metric_history(r.info.run_id, "loss")]
                   for r in finished_first}

    r = run_main(main, args, tmp_path)  # the same command continues the sweep (here in-process)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-3000:]
    assert "continuing" in r.stdout

    client, runs = sweep_runs(mlflow_server, exp)
    parents = [x for x in runs if x.data.tags.get("tarflow.kind") == "sweep"]
    trials = [x for x in runs if x.data.tags.get("tarflow.trial")]
    evals = [x for x in runs if x.data.tags.get("tarflow.kind") == "evaluation"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(trials) == 2  # one MLflow run per trial, none duplicated by the restart
    assert all(t.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for t in trials)
    assert len(evals) == 4 and all(e.data.tags["mlflow.parentRunId"] in {t.info.run_id for t in trials} for e in evals)
    for t in trials:
        assert t.info.status in ("FINISHED", "KILLED")
        steps = [m.step for m in client.get_metric_history(t.info.run_id, "loss")]
        assert len(steps) == len(set(steps)), steps  # no step logged twice
        if t.info.status == "KILLED":
            assert t.data.tags["tarflow.stopped_early"] == "true"
    for run_id, steps in first_steps.items():  # finished trials were not retrained
        assert [m.step for m in client.get_metric_history(run_id, "loss")] == steps
        assert not client.get_metric_history(run_id, "resumed_from_step")
    finished = [t for t in trials if t.info.status == "FINISHED"]
    assert finished
    for t in finished:  # each finished model was evaluated at both guidance weights, with a sample grid
        mine = [e for e in evals if e.data.tags["mlflow.parentRunId"] == t.info.run_id]
        assert sorted(e.data.params["eval.guidance"] for e in mine) == ["0.0", "2.0"]
        for e in mine:
            assert [a.path for a in client.list_artifacts(e.info.run_id, "samples")] == ["samples/samples.png"]

    # the results table logged to the parent run matches MLflow
    path = client.download_artifacts(parents[0].info.run_id, "sweep/results.csv", str(tmp_path))
    table = pd.read_csv(path)
    assert len(table) == 4
    for t in trials:
        rows = table[table["run_id"] == t.info.run_id]
        assert len(rows) == 2
        assert set(rows["status"]) == {"finished" if t.info.status == "FINISHED" else "stopped"}
        if "bpd" in t.data.metrics:
            assert rows["bpd"].tolist() == pytest.approx([t.data.metrics["bpd"]] * 2)
    assert "Best (min bpd)" in r.stdout
    assert parents[0].data.tags["tarflow.best_run"] in {t.info.run_id for t in finished}

    # what the UI needs to compare trials (charts, parallel coordinates): every trial has its params and metrics,
    # and the parent's results are an MLflow table
    assert all(t.data.params["model.patch_size"] in ("2", "4") and "loss" in t.data.metrics for t in trials)
    assert json.loads(parents[0].data.tags["mlflow.loggedArtifacts"]) == [{"path": "sweep/results.json",
                                                                          "type": "table"}]
    # the terminal: a line per trial event instead of Tune's status tables and Ray Train's per-report lines
    events = [line for line in r.stdout.splitlines() if line.startswith("[sweep] trial ")]
    assert any(line.endswith(" started") for line in events), r.stdout[-3000:]
    assert any(" reported step " in line for line in events), r.stdout[-3000:]
    assert any(" finished: " in line or " stopped early " in line for line in events), r.stdout[-3000:]
    assert "Trial status:" not in r.stdout and "Reporting training result" not in r.stdout + r.stderr


def two_trials(tmp_path, finished: dict):
    """An ASHA sweep's plan, storage, a real MLflow store and a training run per trial (patch size 2 and 4), each
    with a first loss in MLflow; finished: patch size -> whether its result marker is in storage."""
    from omegaconf import OmegaConf

    from orchestrator.lifecycle import load_experiment
    from orchestrator.records import KIND_TAG, OVERRIDES_TAG, STORAGE_TAG, SWEEP_TAG, TRIAL_TAG, flat_params
    from orchestrator.rundir import RunDir
    from orchestrator.storage import RunStorage
    from orchestrator.sweep import sweep_of, trial_plan
    from orchestrator.tracking import Tracker

    plan, _, _ = load_experiment(ASHA_SWEEP, TEST, require_data=False)
    sweep = sweep_of(plan, require_data=False)
    storage = RunStorage(str(tmp_path / "store"))
    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp_id = tracker.experiment_id(plan.experiment_name)
    base = {"base": OmegaConf.to_container(plan.cfg, resolve=True), "source": plan.source}
    ids, runs = {}, {}
    for trial, (value, done) in enumerate(finished.items()):
        overrides = {sweep.train_axes[0].key: value}
        trial_run, _ = trial_plan({**base, "overrides": overrides}, {"config": {}})
        ids[value] = tracker.start_run(exp_id, trial_run.run_key, trial_run.display_name, flat_params(trial_run.cfg),
                                       tags={SWEEP_TAG: sweep.name, TRIAL_TAG: f"t{trial}", KIND_TAG: "run",
                                             OVERRIDES_TAG: json.dumps(overrides),
                                             STORAGE_TAG: json.dumps({"uri": storage.uri, "endpoint_url": None,
                                                                      "run_name": trial_run.run_name})})
        tracker.client.log_metric(ids[value], "loss", 1.0 + value, step=10)
        runs[value] = RunDir(storage, trial_run.run_name)
        if done:  # its result is in storage; MLflow's FINISHED is still in the queue: the run reads RUNNING
            runs[value].write_result({"metrics": {"loss": 3.0}})
    return sweep, storage, tracker, ids, runs


def test_a_trial_is_finished_when_storage_says_so_even_if_mlflow_is_behind(tmp_path):
    """The sweep's table classes a trial by its result marker, the record of truth: a trial whose FINISHED
    status is still queued for MLflow is finished, not stopped (nor tagged KILLED, nor left out of the best)."""
    from orchestrator.sweep import best_trial, close_runs, results_table

    sweep, storage, tracker, ids, _ = two_trials(tmp_path, {2: True, 4: False})
    table = results_table(tracker, sweep.base.experiment_name, sweep, storage)
    status = dict(zip(table[sweep.train_axes[0].key].astype(str), table["status"]))
    assert status == {"2": "finished", "4": "stopped"}, table
    close_runs(tracker, table, sweep)
    assert tracker.client.get_run(ids[2]).info.status == "RUNNING"  # not KILLED: its own driver finishes it
    assert tracker.client.get_run(ids[4]).info.status == "KILLED"
    assert best_trial(table, "loss", "min")["run_id"] == ids[2]


def test_a_stopped_trial_keeps_the_metrics_it_had_not_delivered(tmp_path):
    """ASHA stops a trial at a report, and Tune kills its workers at once: the losses its rank 0 had queued for
    MLflow then (on a busy machine, all of them) are only in the checkpoint of that report. The sweep's end
    delivers them before it builds the table."""
    from orchestrator.delivery import metric_record
    from orchestrator.records import SWEEP_TAG
    from orchestrator.rundir import BACKLOG_FILE, checkpoint_dir_name
    from orchestrator.sweep import publish_results

    sweep, storage, tracker, ids, runs = two_trials(tmp_path, {2: True, 4: False})
    undelivered = [metric_record(ids[4], {"loss": 4.5}, 20), metric_record(ids[4], {"loss": 4.25}, 30)]
    for step, records in ((20, undelivered[:1]), (30, undelivered)):  # each checkpoint: what was queued then
        storage.write_text(runs[4].checkpoint_file(checkpoint_dir_name(step), BACKLOG_FILE), json.dumps(records))
    parent = tracker.start_run(tracker.experiment_id(sweep.base.experiment_name), sweep.sweep_key,
                               sweep.display_name, {}, tags={SWEEP_TAG: sweep.name})

    table = publish_results(sweep, storage, tracker, parent, errored=set())
    history = tracker.client.get_metric_history(ids[4], "loss")
    assert sorted((m.step, m.value) for m in history) == [(10, 5.0), (20, 4.5), (30, 4.25)]
    stopped = table[table["run_id"] == ids[4]]
    assert set(stopped["status"]) == {"stopped"} and stopped["loss"].tolist() == [4.25] * len(stopped), table
    assert tracker.client.get_run(ids[4]).info.status == "KILLED"
    assert [m.step for m in tracker.client.get_metric_history(ids[2], "loss")] == [10]
    assert not runs[4].backlog.exists()


def files_holding(root, text: str) -> list[str]:
    """The files under root whose bytes contain text."""
    needle = text.encode()
    found = []
    for path in Path(root).rglob("*"):
        try:
            if path.is_file() and not path.is_symlink() and needle in path.read_bytes():
                found.append(str(path))
        except OSError:  # a socket, or a file removed meanwhile
            pass
    return found


@pytest.mark.slow
def test_a_sweep_stores_no_credential(tmp_path, mlflow_server, local_ray):
    """A tracking URI with a password reaches the trials (their runs are in MLflow) but none of the files Tune and
    Ray Train write under the storage path (Tune's experiment state, each trial's params and results), nor
    Ray's session directory, nor the command's output."""
    import ray

    secret = f"PASSWORD{time.time_ns()}"
    exp = f"sweep-secret-{time.time_ns()}"
    args = [ASHA_SWEEP, *TEST, "train.steps=10", "eval.num_samples=0", f"experiment.name={exp}",
            f"tracking.uri={mlflow_server.replace('http://', f'http://user:{secret}@')}", "cluster.num_cpus=2",
            "sweep.scheduler.type=fifo", "sweep.train_axes={model.patch_size: [2, 4], model.layers_per_block: [1]}"]
    r = run_main(main, args, tmp_path)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-3000:]
    _, runs = sweep_runs(mlflow_server, exp)
    trials = [(x.info.run_name, x.info.status) for x in runs if x.data.tags.get("tarflow.trial")]
    assert [s for _, s in trials] == ["FINISHED", "FINISHED"], (trials, r.stdout[-3000:], r.stderr[-2000:])
    assert secret not in r.stdout + r.stderr

    states = list(tmp_path.glob("runs/*-sweep-*/experiment_state-*.json"))
    params = list(tmp_path.glob("runs/*-sweep-*/*/params.json"))
    assert states and len(params) == 2  # what Tune saved is where this test looks, and it holds the redacted URI
    assert all("user:***@" in p.read_text() for p in params)
    session = ray._private.worker._global_node.get_session_dir_path()
    assert files_holding(tmp_path, secret) == [] and files_holding(session, secret) == []
