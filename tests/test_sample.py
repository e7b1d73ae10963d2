"""Sampling as a job of its own (python -m orchestrator.sample) and weights from elsewhere (model.init_from):
the authors' layout, the released-model experiment, reproducible samples whatever the number of workers."""


import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import EXPERIMENTS, run_main
from mlflow.tracking import MlflowClient

import tarflow
from orchestrator.config import compose_experiment
from orchestrator.errors import ExperimentError
from orchestrator.plan import config_hash, plan_run
from orchestrator.run import main as run_main_
from orchestrator.sample import main as sample_main
from orchestrator.storage import RunStorage
from orchestrator.weights import check_weights, find_weights

RELEASED = str(EXPERIMENTS / "afhq256_released.yaml")
TEST = ["scale=test", "cluster.num_workers=1"]


def authors_checkpoint(path, overrides=()):
    """A state_dict in the authors' layout, made from one of our models of the experiment's test-scale shape
    (the released file cannot be downloaded here); its output projections are not zero, so it is no identity."""
    plan = plan_run(compose_experiment(RELEASED, [*TEST, *overrides, "model.init_from=x.pth"]))
    torch.manual_seed(0)
    model = tarflow.TarFlow(plan.model)
    with torch.no_grad():
        for block in model.blocks:
            block.proj_out.weight.normal_(0, 0.02)
    torch.save(model.to_reference(), path)
    return plan


def test_weights_of_another_shape_are_named_before_any_work(tmp_path):
    pth = tmp_path / "released.pth"
    plan = authors_checkpoint(pth)
    source = find_weights(str(pth), RunStorage(str(tmp_path)))
    assert source.kind == "reference"
    check_weights(source, plan.model)  # fits
    other = plan_run(compose_experiment(RELEASED, [*TEST, "model.arch=4-128-2-2", f"model.init_from={pth}"]))
    with pytest.raises(ExperimentError, match=r"tensor 'blocks.0.proj_in.weight' has shape \(64, 16\).*needs "
                                              r"\(128, 16\)"):
        check_weights(source, other.model)
    with pytest.raises(ExperimentError, match="model.init_from=nowhere.pth: no such file"):
        find_weights("nowhere.pth", RunStorage(str(tmp_path)))
    with pytest.raises(ExperimentError, match="train.steps=0 .* needs model.init_from"):
        compose_experiment(str(EXPERIMENTS / "afhq256.yaml"), ["scale=test", "train.steps=0"])
    base = compose_experiment(str(EXPERIMENTS / "afhq256.yaml"), ["scale=test"])
    assert config_hash(compose_experiment(str(EXPERIMENTS / "afhq256.yaml"),
                                          ["scale=test", f"model.init_from={pth}"])) != config_hash(base)


def test_the_command_names_a_run_that_is_not_there(tmp_path):
    """`python -m orchestrator.sample` as users run it (the slow test below drives its main() in-process)."""
    proc = subprocess.run([sys.executable, "-m", "orchestrator.sample", "no-such-run"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith(f"error: {tmp_path / 'runs' / 'no-such-run'} is not a "
                                                           "finished run (no result.json)"), proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_released_model_evaluated_into_the_table_then_sampled_reproducibly(tmp_path, local_ray):
    pth = tmp_path / "afhq_model_8_768_8_8_0.07.pth"
    authors_checkpoint(pth)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = [RELEASED, *TEST, f"model.init_from={pth}", f"tracking.uri={uri}"]
    r = run_main(run_main_, args, tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("afhq256")  # the AFHQ table's experiment
    (run,) = [x for x in client.search_runs([exp.experiment_id]) if x.data.tags.get("tarflow.kind") == "run"]
    assert run.info.run_name == "afhq256/released 8-768-8-8-0.07" and 0 < run.data.metrics["fid"] < 1000
    assert not client.get_metric_history(run.info.run_id, "loss")  # nothing trained
    assert "| TarFlow (authors' released model) |" in r.stdout  # its row in the AFHQ table
    run_dir = next((tmp_path / "runs").glob("afhq256-*"))
    assert (run_dir / "checkpoint_00000000" / "state.pt").is_file()  # the given weights, as the run's checkpoint

    # many samples of that run, on 2 workers
    sample_args = [run_dir.name, "sample.num_samples=10", "sample.batch_size=4", "sample.grid=9",
                   f"tracking.uri={uri}", "cluster.num_workers=2"]
    r = run_main(sample_main, sample_args, tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    (out,) = (run_dir / "samples").iterdir()
    with np.load(out / "samples.npz") as z:
        two_workers = z["arr_0"].copy()
        labels = z["arr_1"].copy()
    assert two_workers.shape == (10, 16, 16, 1) and two_workers.dtype == np.uint8
    assert labels.tolist() == [i % 10 for i in range(10)]  # class-balanced
    assert (out / "grid.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (sampled,) = [x for x in client.search_runs([exp.experiment_id]) if x.data.tags.get("tarflow.kind") == "sample"]
    assert sampled.data.tags["mlflow.parentRunId"] == run.info.run_id and sampled.info.status == "FINISHED"
    assert [a.path for a in client.list_artifacts(sampled.info.run_id, "samples")] == ["samples/grid.png"]

    r = run_main(sample_main, sample_args, tmp_path)  # the same settings again: done, skipped
    assert r.returncode == 0 and "already drawn with these settings" in r.stdout

    # the same weights as a checkpoint file, on 1 worker, with the experiment's settings: a run of its own,
    # and the same samples (a class list that cycles as the balanced labels do)
    r = run_main(sample_main, [RELEASED, *TEST, "--reference-checkpoint", run_dir / "checkpoint_00000000" / "state.pt",
                               "sample.num_samples=10", "sample.batch_size=4", "sample.grid=0",
                               "sample.classes=[0,1,2,3,4,5,6,7,8,9]", f"tracking.uri={uri}", f"model.init_from={pth}"],
                 tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    (out,) = (tmp_path / "runs" / "samples").iterdir()
    with np.load(out / "samples.npz") as z:
        assert np.array_equal(z["arr_0"], two_workers) and z["arr_1"].tolist() == labels.tolist()
    assert not (out / "grid.png").exists()
