"""Running on a cluster: `python -m orchestrator.submit` through the Ray Jobs API, against the local stack
of `infra/local` (a Ray head with token authentication, SeaweedFS S3, `mlflow server` with artifacts in
the bucket), started and stopped the way a user does it."""

import importlib.util
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, run_main
from devservers import free_port, port_is_open, s3_client
from mlflow.tracking import MlflowClient

from orchestrator import submit as submit_mod

TABLE2 = "experiments/table2.yaml"
TEST = ["scale=test", "train.steps=10", "train.log_every=5", "cluster.num_workers=1"]
STACK_PY = ROOT / "infra" / "local" / "stack.py"


def submit(args, env=None, timeout=600):
    return subprocess.run([sys.executable, "-m", "orchestrator.submit", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env=env or dict(os.environ))


def stack_module():
    spec = importlib.util.spec_from_file_location("tarflow_local_stack", STACK_PY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# -- fast: no cluster ----------------------------------------------------------------------------------


def test_unreachable_address_fails_fast_and_clearly():
    port = free_port()
    start = time.time()
    r = run_main(submit_mod.main, [TABLE2, *TEST, "--address", f"http://127.0.0.1:{port}"], ROOT)
    assert r.returncode == 2 and time.time() - start < 60
    assert r.stderr.startswith(f"error: cannot reach the Ray Jobs API at http://127.0.0.1:{port}"), r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_bad_config_fails_before_contacting_the_cluster(tmp_path):
    port = free_port()

    def submit(args):
        return run_main(submit_mod.main, args, ROOT)

    r = submit([TABLE2, "train.lerning_rate=1", "--address", f"http://127.0.0.1:{port}"])
    assert r.returncode == 2 and "unknown key 'train.lerning_rate'" in r.stderr and "Jobs API" not in r.stderr
    r = submit(["experiments/sweep_patch_noise.yaml", "++sweep.train_axes.model.foo=[1,2]", "--address",
                f"http://127.0.0.1:{port}"])  # a sweep's whole search space is checked too
    assert r.returncode == 2 and "sweep axis" in r.stderr and "Jobs API" not in r.stderr, r.stderr
    outside = tmp_path / "mine.yaml"
    outside.write_text((ROOT / TABLE2).read_text())
    r = submit([str(outside), "--address", f"http://127.0.0.1:{port}"])
    assert r.returncode == 2 and "is outside the project" in r.stderr
    r = submit([TABLE2, "--address", f"ray://127.0.0.1:{port}"])
    assert r.returncode == 2 and "http://HEAD:8265" in r.stderr and "Traceback" not in r.stderr


def test_secrets_never_travel_with_the_job():
    environ = {"MLFLOW_TRACKING_URI": "http://mlflow:5000", "AWS_ENDPOINT_URL": "http://minio:9000",
               "TARFLOW_S3_URI": "s3://b/runs", "AWS_ACCESS_KEY_ID": "AKIA", "AWS_SECRET_ACCESS_KEY": "s3cr3t",
               "AWS_SESSION_TOKEN": "tok", "RAY_AUTH_TOKEN": "t", "RAY_ADDRESS": "10.0.0.1:6379",
               "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0", "MLFLOW_TRACKING_PASSWORD": "pw", "HOME": "/root"}
    env = submit_mod.job_env(environ, ["HOME", "MY_FLAG=1"])
    assert env == {"MLFLOW_TRACKING_URI": "http://mlflow:5000", "AWS_ENDPOINT_URL": "http://minio:9000",
                   "TARFLOW_S3_URI": "s3://b/runs", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0", "HOME": "/root",
                   "MY_FLAG": "1"}
    for name in ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "MLFLOW_TRACKING_TOKEN=x"):
        with pytest.raises(submit_mod.ExperimentError, match="secrets never travel"):
            submit_mod.job_env(environ, [name])


def test_credentials_in_uris_never_travel_with_the_job(monkeypatch):
    """A URI with user:password@ in an override, a forwarded variable or the experiment's config would be in the
    job's entrypoint or runtime environment (visible to anyone who can list jobs): refused, in one message that
    says where the credential belongs, before the cluster is contacted, and never printed."""
    port = free_port()
    address = ["--address", f"http://127.0.0.1:{port}"]
    hint = "MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD"
    r = run_main(submit_mod.main, [TABLE2, *TEST, "tracking.uri=http://alice:s3cret@mlflow:5000", *address], ROOT)
    assert r.returncode == 2 and r.stdout == "", r.stdout
    (line,) = r.stderr.splitlines()
    assert "tracking.uri=http://alice:***@mlflow:5000" in line and hint in line and "Jobs API" not in line, line
    assert "s3cret" not in r.stdout + r.stderr
    with pytest.raises(submit_mod.ExperimentError, match=r"storage.endpoint_url=http://\*\*\*@minio"):
        submit_mod.entrypoint(Path(TABLE2), ["scale=smoke", "storage.endpoint_url=http://token@minio:9000"])

    for name in ("MLFLOW_TRACKING_URI", "AWS_ENDPOINT_URL", "TARFLOW_DATA_URI"):
        with pytest.raises(submit_mod.ExperimentError, match=rf"{name}=https://u:\*\*\*@host/x: .*{hint}") as e:
            submit_mod.job_env({name: "https://u:s3cret@host/x"})
        assert "s3cret" not in str(e.value)
    with pytest.raises(submit_mod.ExperimentError, match=r"--env MY_URI=http://u:\*\*\*@h"):
        submit_mod.job_env({}, ["MY_URI=http://u:s3cret@h"])
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://alice:s3cret@mlflow:5000")
    r = run_main(submit_mod.main, [TABLE2, *TEST, "tracking=server", *address], ROOT)
    assert r.returncode == 2 and "MLFLOW_TRACKING_URI=http://alice:***@mlflow:5000" in r.stderr, r.stderr
    assert "s3cret" not in r.stdout + r.stderr


def test_the_entrypoint_is_stable_and_the_job_id_readable():
    from orchestrator.lifecycle import load_experiment as prepare

    rel = submit_mod.entrypoint(Path(TABLE2), ["scale=smoke", "train.steps=10"])
    absolute = submit_mod.entrypoint(ROOT / TABLE2, ["scale=smoke", "train.steps=10"])
    assert rel == absolute == "python -m orchestrator.run experiments/table2.yaml scale=smoke train.steps=10"
    plan, _, _ = prepare(str(ROOT / TABLE2), ["scale=smoke"], require_data=False)
    job_id = submit_mod.submission_id(plan)
    assert job_id.startswith(f"table2-{plan.run_key}-") and len(job_id.split("-")) == 4, job_id


def test_ray_launcher_config_is_valid_and_holds_no_secrets():
    import yaml
    from ray.autoscaler._private.util import prepare_config, validate_config

    text = (ROOT / "infra" / "ray" / "cluster.yaml").read_text()
    config = prepare_config(yaml.safe_load(text))  # Ray's own schema check, as `ray up` does it
    validate_config(config)
    assert config["available_node_types"]["gpu_worker"]["resources"]["GPU"] == 8
    assert config["available_node_types"]["gpu_worker"]["node_config"]["InstanceType"] == "p4de.24xlarge"
    assert config["available_node_types"]["head"]["resources"] == {"CPU": 0}
    assert any("pip install -q -e ~/tarflow-lab" in c for c in config["setup_commands"])
    assert "AWS_SECRET_ACCESS_KEY" not in text and "aws_secret_access_key" not in text


def test_rayjob_runs_the_stable_command_with_secrets_from_a_secret(monkeypatch):
    import yaml

    docs = {d["kind"]: d for d in yaml.safe_load_all((ROOT / "infra" / "ray" / "rayjob.yaml").read_text())}
    job, settings = docs["RayJob"], docs["ConfigMap"]["data"]
    command = job["spec"]["entrypoint"].split("&&")[-1].split()
    assert command[:4] == ["python", "-m", "orchestrator.run", TABLE2]
    # the entrypoint's config composes with the ConfigMap's settings (data absent here, as on a laptop)
    from orchestrator.lifecycle import load_experiment as prepare

    for key, value in settings.items():
        monkeypatch.setenv(key, value)
    plan, storage, tracking_uri = prepare(str(ROOT / command[3]), command[4:], require_data=False)
    assert storage.uri == settings["TARFLOW_S3_URI"] and tracking_uri == settings["MLFLOW_TRACKING_URI"]
    assert plan.cfg.cluster.use_gpu
    cluster = job["spec"]["rayClusterSpec"]
    pods = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
    assert any(c["resources"]["limits"].get("nvidia.com/gpu") for g in cluster["workerGroupSpecs"]
               for c in g["template"]["spec"]["containers"])
    def gpus(replicas):
        return sum(g[replicas] * int(c["resources"]["limits"].get("nvidia.com/gpu", 0))
                   for g in cluster["workerGroupSpecs"] for c in g["template"]["spec"]["containers"])

    c = plan.cfg.cluster  # elastic: the on-demand pods always give its smallest size, with spot pods its full size
    assert c.min_workers < c.num_workers and gpus("minReplicas") >= c.min_workers * c.gpus_per_worker
    assert gpus("replicas") >= c.num_workers * c.gpus_per_worker
    for pod in pods:
        for container in pod["spec"]["containers"]:
            env = {e["name"]: e for e in container["env"]}
            for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
                assert "value" not in env[name] and env[name]["valueFrom"]["secretKeyRef"]["name"] == "tarflow-s3"
            assert {"configMapRef": {"name": "tarflow-env"}} in container["envFrom"]
    assert not any(submit_mod.SECRET_WORDS.search(k) for k in settings)


def test_the_launcher_cluster_holds_every_paper_experiment():
    """Each paper experiment names the A100 80 GB preset (its memory is checked against it, tests/
    test_gpu_memory.py) and asks for no more GPUs than the launcher's nodes of that kind give."""
    import yaml

    from orchestrator.config import compose_experiment

    launcher = yaml.safe_load((ROOT / "infra" / "ray" / "cluster.yaml").read_text())
    gpu_nodes = launcher["available_node_types"]["gpu_worker"]
    for path in sorted((ROOT / "experiments").glob("*.yaml")):
        c = compose_experiment(path, []).cluster
        assert c.use_gpu and c.gpu_memory_gb == 79.2, path.name  # cluster=a100_80gb: p4de.24xlarge
        assert c.num_workers * c.gpus_per_worker <= gpu_nodes["max_workers"] * gpu_nodes["resources"]["GPU"], path.name


def test_stack_refuses_a_taken_dashboard_port_before_starting_anything(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = subprocess.run([sys.executable, str(STACK_PY), "up", "--dir", str(tmp_path / "stack"),
                            "--dashboard-port", str(port)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and f"port {port}" in r.stderr and "--dashboard-port 0" in r.stderr, r.stderr
    assert not (tmp_path / "stack" / "state.json").exists()


# -- slow: the local stack, end to end -----------------------------------------------------------------


def read_env_file(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        if line.startswith("export "):
            key, _, value = line[len("export "):].partition("=")
            out[key] = value
    return out


@pytest.fixture(scope="module")
def local_stack(tmp_path_factory):
    """`infra/local/up` on free ports in a temporary directory; `infra/local/down` at the end in any case."""
    stack_dir = tmp_path_factory.mktemp("stack")
    env = {**os.environ, "PYTHON": sys.executable}
    started = time.time()
    up = subprocess.run([str(ROOT / "infra" / "local" / "up"), "--dir", str(stack_dir), "--dashboard-port", "0",
                         "--num-cpus", "3"], capture_output=True, text=True, timeout=300, env=env)
    assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
    print(f"stack up in {time.time() - started:.1f}s:\n{up.stdout}")
    try:
        yield stack_dir
    finally:
        subprocess.run([str(ROOT / "infra" / "local" / "down"), "--dir", str(stack_dir)], timeout=120, env=env)


@pytest.mark.slow
@pytest.mark.soak
def test_local_stack_submit_resume_and_down(local_stack):
    stack = stack_module()
    state = stack.load_state(local_stack)
    stack_env = read_env_file(local_stack / "env")
    assert set(stack_env) >= {"RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "MLFLOW_TRACKING_URI", "AWS_ENDPOINT_URL",
                              "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "TARFLOW_S3_URI"}
    assert stack_env["RAY_AUTH_MODE"] == "token"
    # the user's shell after `source infra/local/.stack/env` (conftest's RAY_AUTH_MODE=disabled replaced)
    env = {**os.environ, **stack_env}
    address = stack_env["RAY_API_SERVER_ADDRESS"]

    again = subprocess.run([sys.executable, str(STACK_PY), "up", "--dir", str(local_stack)], capture_output=True,
                           text=True, timeout=60)
    assert again.returncode == 0 and "already up" in again.stdout, again.stdout + again.stderr

    # a client without the cluster's token is refused in one clear paragraph
    r = submit([TABLE2, *TEST, "storage=s3", "tracking=server", "--address", address],
               env={**env, "RAY_AUTH_MODE": "disabled"}, timeout=120)
    assert r.returncode == 2 and "requires token authentication" in r.stderr and "Traceback" not in r.stderr, \
        r.stderr[-2000:]

    exp = f"stack-{time.time_ns()}"
    args = [TABLE2, *TEST, "storage=s3", "tracking=server", f"experiment.name={exp}", "--address", address]
    started = time.time()
    r = submit([*args, "--follow"], env=env)
    took = time.time() - started
    assert r.returncode == 0, r.stdout[-5000:] + r.stderr[-3000:]
    assert f"submitted {exp}-" in r.stdout and "SUCCEEDED" in r.stdout and "finished:" in r.stdout
    print(f"submitted job ran in {took:.1f}s")

    client = MlflowClient(stack_env["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([client.get_experiment_by_name(exp).experiment_id])
    train = [x for x in runs if x.data.tags.get("tarflow.kind") == "run"]
    assert len(train) == 1 and train[0].info.status == "FINISHED" and "bpd" in train[0].data.metrics
    assert train[0].info.run_name == f"{exp}/4-64-2-2/uniform" and train[0].data.tags["ray_job_id"]
    run_name = train[0].data.tags["storage"].rsplit("/", 1)[-1]

    s3 = s3_client(stack_env["AWS_ENDPOINT_URL"], stack_env["AWS_ACCESS_KEY_ID"], stack_env["AWS_SECRET_ACCESS_KEY"])
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="tarflow").get("Contents", [])]
    assert f"runs/{run_name}/checkpoint_00000010/state.pt" in keys, keys
    assert f"runs/{run_name}/result.json" in keys
    # MLflow's artifacts are proxied by the server into the same bucket: the client had no S3 settings for them
    run_id = train[0].info.run_id
    assert any(k.startswith("mlartifacts/") and k.endswith(f"{run_id}/artifacts/samples/samples.png") for k in keys)
    result_before = s3.head_object(Bucket="tarflow", Key=f"runs/{run_name}/result.json")["LastModified"]

    # resubmitting (waiting without logs this time) resumes the same run: finished, so not retrained
    r = submit(args, env=env)
    assert r.returncode == 0 and "SUCCEEDED" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]
    job_id = r.stdout.split("submitted ", 1)[1].split()[0]
    logs = subprocess.run([str(Path(sys.executable).parent / "ray"), "job", "logs", job_id, "--address", address],
                          capture_output=True, text=True, timeout=120, env=env)
    assert "already finished and evaluated with these settings; not retraining" in logs.stdout, \
        logs.stdout[-3000:] + logs.stderr[-2000:]
    assert s3.head_object(Bucket="tarflow", Key=f"runs/{run_name}/result.json")["LastModified"] == result_before
    assert len([x for x in client.search_runs([train[0].info.experiment_id])
                if x.data.tags.get("tarflow.kind") == "run"]) == 1

    # a job that fails on the cluster (its data is missing there) makes the exit code 1, with the reason
    r = submit([*args[:-2], "data.root=/nonexistent/fashion-mnist", "--address", address], env=env, timeout=300)
    assert r.returncode == 1 and "FAILED" in r.stdout and "/nonexistent/fashion-mnist" in r.stderr, \
        r.stdout[-3000:] + r.stderr[-3000:]

    # --no-wait returns as soon as the job is accepted; while it runs, a second job of the same run is refused
    long = [a if a != "train.steps=10" else "train.steps=5000" for a in args]
    r = submit([*long, "--no-wait"], env=env, timeout=120)
    assert r.returncode == 0 and "ray job logs" in r.stdout, r.stdout + r.stderr
    job_id = r.stdout.split("submitted ", 1)[1].split()[0]
    r = submit(long, env=env, timeout=120)
    assert r.returncode == 2 and f"job {job_id} is already running this run" in r.stderr and "--force" in r.stderr, \
        r.stdout[-2000:] + r.stderr[-2000:]

    # down stops every process of the stack (the job just submitted included) and nothing else
    assert stack.stack_processes(state)
    started = time.time()
    down = subprocess.run([str(ROOT / "infra" / "local" / "down"), "--dir", str(local_stack)], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "PYTHON": sys.executable})
    assert down.returncode == 0 and "stopped" in down.stdout, down.stdout + down.stderr
    print(f"stack down in {time.time() - started:.1f}s")
    assert stack.stack_processes(state) == {}
    ports = [state["ray_gcs_port"], state["ray_dashboard_port"], *state["s3_ports"],
             int(state["mlflow_url"].rsplit(":", 1)[1])]
    assert not [p for p in ports if port_is_open(p)]
    assert not Path(state["ray_temp_dir"]).exists()
    status = subprocess.run([sys.executable, str(STACK_PY), "status", "--dir", str(local_stack)],
                            capture_output=True, text=True, timeout=60)
    assert status.returncode == 3 and "down" in status.stdout
    assert (local_stack / "mlflow" / "mlflow.db").exists()  # data kept for the next `up`
