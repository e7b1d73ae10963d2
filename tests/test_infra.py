"""Submitting experiments to a Ray cluster through the Jobs API (`python -m orchestrator.submit`)."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from orchestrator.services import free_port

ROOT = Path(__file__).resolve().parents[1]
TABLE2 = "experiments/table2.yaml"
TINY = ["scale=smoke", "data.limit=256", "data.val_limit=64", "eval.num_samples=4", "eval.sample_batch_size=4",
        "train.batch_size=32", "train.steps=10", "train.checkpoint_every=10", "train.log_every=5",
        "cluster.num_workers=1"]


def submit(args, cwd=ROOT, timeout=600, **env):
    return subprocess.run([sys.executable, "-m", "orchestrator.submit", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **env})


def test_unreachable_address_fails_fast_and_clearly():
    port = free_port()
    start = time.time()
    r = submit([TABLE2, *TINY, "--address", f"http://127.0.0.1:{port}"])
    assert r.returncode == 2 and time.time() - start < 60
    assert r.stderr.startswith(f"error: cannot reach the Ray Jobs API at http://127.0.0.1:{port}"), r.stderr
    assert "Traceback" not in r.stderr


def test_bad_config_fails_before_contacting_the_cluster(tmp_path):
    port = free_port()
    r = submit([TABLE2, "train.lerning_rate=1", "--address", f"http://127.0.0.1:{port}"])
    assert r.returncode == 2 and "unknown key 'train.lerning_rate'" in r.stderr and "Jobs API" not in r.stderr
    outside = tmp_path / "mine.yaml"
    outside.write_text((ROOT / TABLE2).read_text())
    r = submit([str(outside), "--address", f"http://127.0.0.1:{port}"])
    assert r.returncode == 2 and "is outside the project" in r.stderr


@pytest.fixture(scope="module")
def jobs_cluster():
    """A Ray head with the dashboard (the Jobs API), as on a real cluster's head node."""
    from ray.cluster_utils import Cluster

    port = free_port()
    # the job's `python` must be this environment's, as it is on a cluster where the project is installed
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 3, "include_dashboard": True,
                                                           "dashboard_port": port})
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        cluster.shutdown()


@pytest.mark.slow
def test_submitted_job_trains_and_resubmitting_resumes(tmp_path, jobs_cluster, mlflow_server):
    exp = f"submit-{time.time_ns()}"
    args = [TABLE2, *TINY, f"experiment.name={exp}", f"storage.uri={tmp_path / 'store'}", "--address", jobs_cluster,
            "--follow"]
    r = submit(args, MLFLOW_TRACKING_URI=mlflow_server)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-3000:]
    assert f"submitted {exp}-" in r.stdout and "SUCCEEDED" in r.stdout
    client = MlflowClient(mlflow_server)
    runs = client.search_runs([client.get_experiment_by_name(exp).experiment_id])
    train = [x for x in runs if x.data.tags.get("tarflow.kind") != "table"]
    assert len(train) == 1 and train[0].info.status == "FINISHED" and "bpd" in train[0].data.metrics
    assert train[0].data.tags["ray_job_id"]
    assert list((tmp_path / "store").glob(f"{exp}-*/checkpoint_00000010/state.pt"))

    again = submit(args, MLFLOW_TRACKING_URI=mlflow_server)  # the stable entrypoint: same run, not retrained
    assert again.returncode == 0 and "already finished" in again.stdout, again.stdout[-3000:]
