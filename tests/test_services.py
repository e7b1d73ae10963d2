"""Real S3 and MLflow servers on 127.0.0.1: they start, serve, enforce credentials and stop cleanly.

These are the dev servers every slow test stands on (infra/local/devservers.py); their own checks go with
the local stack's, in the soak tier (-m soak)."""

import os

import pytest
from botocore.exceptions import ClientError
from devservers import port_is_open, s3_client, seaweedfs_binary, start_mlflow_server, start_s3_server

pytestmark = [pytest.mark.slow, pytest.mark.soak]


# --------------------------------------------------------------------------- S3
def test_s3_credentials_enforced(s3_server):
    if s3_server.kind == "moto":
        pytest.skip("moto_server accepts any credentials")
    bucket = s3_server.make_bucket()
    s3_server.client().put_object(Bucket=bucket, Key="secret.txt", Body=b"x")
    for kw in ({"secret_key": "wrong-secret"}, {"access_key": "nobody"}):
        bad = s3_server.client(**kw)
        with pytest.raises(ClientError) as e:
            bad.list_buckets()
        assert e.value.response["Error"]["Code"] in {"SignatureDoesNotMatch", "InvalidAccessKeyId", "AccessDenied"}
        with pytest.raises(ClientError):
            bad.get_object(Bucket=bucket, Key="secret.txt")
        with pytest.raises(ClientError):
            bad.put_object(Bucket=bucket, Key="intruder.txt", Body=b"y")
    keys = [o["Key"] for o in s3_server.client().list_objects_v2(Bucket=bucket)["Contents"]]
    assert keys == ["secret.txt"]


# ----------------------------------------------------------------------- MLflow
def _roundtrip(tracking_uri, tmp_path, name):
    """Experiment, run, stepped metric, param, artifact; read everything back. Returns (client, run)."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri)
    exp_id = client.create_experiment(name)
    run = client.create_run(exp_id, run_name="r0")
    rid = run.info.run_id
    for step in range(5):
        client.log_metric(rid, "loss", 1.0 / (step + 1), step=step)
    client.log_param(rid, "lr", "0.001")
    art = tmp_path / "notes.txt"
    art.write_text("tarflow artifact\n")
    client.log_artifact(rid, str(art), artifact_path="outputs")
    client.set_terminated(rid)

    got = client.get_run(rid)
    assert got.info.experiment_id == exp_id
    assert got.info.status == "FINISHED"
    assert got.data.params == {"lr": "0.001"}
    assert got.data.metrics["loss"] == pytest.approx(0.2)
    hist = sorted(client.get_metric_history(rid, "loss"), key=lambda m: m.step)
    assert [m.step for m in hist] == [0, 1, 2, 3, 4]
    assert [m.value for m in hist] == pytest.approx([1.0, 0.5, 1 / 3, 0.25, 0.2])
    assert client.get_experiment_by_name(name).experiment_id == exp_id
    assert [f.path for f in client.list_artifacts(rid, "outputs")] == ["outputs/notes.txt"]
    out = client.download_artifacts(rid, "outputs/notes.txt", str(tmp_path / "dl"))
    assert open(out).read() == "tarflow artifact\n"
    return client, got


def test_mlflow_tracking_roundtrip(mlflow_server, tmp_path):
    assert mlflow_server.startswith("http://127.0.0.1:")
    _, run = _roundtrip(mlflow_server, tmp_path, "services-local")
    assert run.info.artifact_uri.startswith("mlflow-artifacts:/")  # proxied by the server


def test_mlflow_s3_artifacts_land_in_bucket(mlflow_server_s3, mlflow_s3_bucket, s3_server, tmp_path):
    _, run = _roundtrip(mlflow_server_s3, tmp_path, "services-s3")
    assert run.info.artifact_uri.startswith("mlflow-artifacts:/")
    objs = s3_server.client().list_objects_v2(Bucket=mlflow_s3_bucket, Prefix="mlartifacts/")
    keys = [o["Key"] for o in objs.get("Contents", [])]
    ours = [k for k in keys if run.info.run_id in k and k.endswith("outputs/notes.txt")]
    assert len(ours) == 1, keys
    body = s3_server.client().get_object(Bucket=mlflow_s3_bucket, Key=ours[0])["Body"].read()
    assert body == b"tarflow artifact\n"


# ------------------------------------------------------------------------ stop
def _assert_stopped(svc):
    assert svc.proc.poll() is not None
    with pytest.raises(ProcessLookupError):
        os.killpg(svc.proc.pid, 0)  # no process of the group is left
    assert not [p for p in svc.ports if port_is_open(p)]


@pytest.mark.parametrize("kind", ["seaweedfs", "moto"])
def test_s3_service_stop_leaves_nothing(kind, tmp_path):
    if kind == "seaweedfs" and seaweedfs_binary() is None:
        pytest.skip("no working `weed` binary")
    svc = start_s3_server(tmp_path, kind=kind, access_key="k1", secret_key="s1-secret")
    try:
        assert svc.kind == kind and svc.alive()
        assert port_is_open(svc.ports[0])
        assert svc.info["startup_s"] < 30
        s3_client(svc.url, "k1", "s1-secret").list_buckets()
    finally:
        svc.stop()
    _assert_stopped(svc)
    svc.stop()  # idempotent
    if kind == "seaweedfs":
        leftovers = [f for f in os.listdir("/tmp") if f.startswith("seaweedfs-")
                     and any(f.endswith(f"-{p}.sock") for p in svc.ports)]
        assert leftovers == []


def test_mlflow_service_stop_leaves_nothing(tmp_path):
    svc = start_mlflow_server(tmp_path)
    try:
        assert svc.alive() and port_is_open(svc.ports[0])
        assert (tmp_path / "mlflow.db").exists()
    finally:
        svc.stop()
    _assert_stopped(svc)  # including mlflow's uvicorn child, which shares the group


def test_start_failures_are_reported(tmp_path, monkeypatch):
    import socket

    import devservers as services

    with pytest.raises(ValueError):
        start_s3_server(tmp_path, kind="minio")
    # The chosen port is taken: the server exits and the error carries its log tail.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        monkeypatch.setattr(services, "free_port", lambda: s.getsockname()[1])
        with pytest.raises(RuntimeError, match="s3-moto") as e:
            start_s3_server(tmp_path, kind="moto", timeout=20)
    assert "moto_server" in str(e.value) or "moto.server" in str(e.value)  # the logged command line


def test_ports_picked_together_are_distinct():
    """The local stack picks its Ray head's ports (GCS, dashboard, agents) at once: the OS hands a port that was
    just released out again (2000 one-at-a-time picks here: 125 repeats), and one repeat made `ray start` find its
    dashboard port taken by the MLflow server picked after it (a clean-clone CI run)."""
    import devservers as services

    ports = services.free_ports(300)
    assert len(set(ports)) == 300
    assert all(not port_is_open(p) for p in ports[:20])
