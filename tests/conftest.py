"""Shared fixtures: real S3 and MLflow servers on 127.0.0.1 (session-scoped, started on demand), and the
two ways tests drive a command: in-process (`main(argv)`, for what needs no process of its own) or as the
user does, `python -m orchestrator.<command>` in a subprocess."""

import contextlib
import io
import os
import subprocess
import sys
from pathlib import Path

# Before anything imports ray / mlflow.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("TARFLOW_TRACKING_DRAIN_S", "5")  # a run's end waits this long for a down MLflow
# Ray Train's controller polls its workers every 2 s by default: each report and the end of a run wait for
# the next poll (~5 s a run at test scale, where a run trains for one)
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")

import itertools
import uuid
from dataclasses import dataclass

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "infra" / "local"))  # the dev servers live beside the local stack, not in the product

from devservers import Service, create_bucket, s3_client, start_mlflow_server, start_s3_server  # noqa: E402

EXPERIMENTS = ROOT / "experiments"


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


def run_module(module: str, args, cwd, timeout: float = 900, **env) -> Result:
    """`python -m orchestrator.<module> args` in cwd, as a user runs it (on its own local Ray unless told)."""
    base = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_GCS_SERVER_PORT")}
    r = subprocess.run([sys.executable, "-m", f"orchestrator.{module}", *map(str, args)], cwd=cwd,
                       capture_output=True, text=True, timeout=timeout, env={**base, **env})
    return Result(r.returncode, r.stdout, r.stderr)


def run_main(main, args, cwd) -> Result:
    """A command's main(argv) in this process, in cwd, with its output captured (no 8 s of imports)."""
    out, err = io.StringIO(), io.StringIO()
    old = os.getcwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main([str(a) for a in args])
    finally:
        os.chdir(old)
    return Result(code, out.getvalue(), err.getvalue())

S3_ACCESS_KEY = "testkey"
S3_SECRET_KEY = "testsecret"
S3_REGION = "us-east-1"


@dataclass
class S3Server:
    """What tests need to talk to the session's S3 server."""

    endpoint_url: str
    access_key: str
    secret_key: str
    kind: str  # "seaweedfs" or "moto"
    service: Service
    region: str = S3_REGION

    def __post_init__(self) -> None:
        self._counter = itertools.count()

    def client(self, **kw):
        """boto3 S3 client with this server's credentials (override with access_key=/secret_key=)."""
        return s3_client(self.endpoint_url, kw.pop("access_key", self.access_key),
                         kw.pop("secret_key", self.secret_key), region=self.region, **kw)

    def make_bucket(self, prefix: str = "test") -> str:
        """Create and return a fresh, uniquely named bucket."""
        name = f"{prefix}-{next(self._counter)}-{uuid.uuid4().hex[:8]}".lower()
        create_bucket(self.endpoint_url, name, self.access_key, self.secret_key)
        return name


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3 server (SeaweedFS if available, else moto; force with TARFLOW_TEST_S3_KIND).

    Also exports AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_DEFAULT_REGION for the
    session (restored afterwards), so boto3 and servers started later pick them up.
    """
    kind = os.environ.get("TARFLOW_TEST_S3_KIND", "auto")
    svc = start_s3_server(tmp_path_factory.mktemp("s3"), kind=kind,
                          access_key=S3_ACCESS_KEY, secret_key=S3_SECRET_KEY)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("AWS_ACCESS_KEY_ID", S3_ACCESS_KEY)
            mp.setenv("AWS_SECRET_ACCESS_KEY", S3_SECRET_KEY)
            mp.setenv("AWS_DEFAULT_REGION", S3_REGION)
            yield S3Server(endpoint_url=svc.url, access_key=S3_ACCESS_KEY, secret_key=S3_SECRET_KEY,
                           kind=svc.kind, service=svc)
    finally:
        svc.stop()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """Tracking URI of a real `mlflow server` (sqlite backend, artifacts proxied to a local dir)."""
    svc = start_mlflow_server(tmp_path_factory.mktemp("mlflow"))
    try:
        yield svc.url
    finally:
        svc.stop()


@pytest.fixture(scope="session")
def mlflow_s3_bucket(s3_server):
    """The bucket that `mlflow_server_s3` stores artifacts in (under the prefix "mlartifacts")."""
    return s3_server.make_bucket("mlflow")


@pytest.fixture(scope="session")
def mlflow_server_s3(tmp_path_factory, s3_server, mlflow_s3_bucket):
    """Tracking URI of a real `mlflow server` whose artifacts go to s3://<mlflow_s3_bucket>/mlartifacts."""
    svc = start_mlflow_server(tmp_path_factory.mktemp("mlflow-s3"),
                              artifacts_destination=f"s3://{mlflow_s3_bucket}/mlartifacts",
                              s3_endpoint=s3_server.endpoint_url)
    try:
        yield svc.url
    finally:
        svc.stop()


@pytest.fixture(scope="session")
def local_ray(s3_server):
    """One local Ray instance for the session's in-process runs (run_main of orchestrator.run / sample):
    `orchestrator` commands join it instead of starting their own (seconds each). Started after the S3
    server, so its workers carry the S3 credentials as a real cluster's nodes do."""
    import ray

    from orchestrator.trainer import pin_local_address

    pin_local_address()
    ray.init(address="local", num_cpus=4, include_dashboard=True, object_store_memory=200_000_000,
             log_to_driver=True)
    # subprocesses started later must not join it by accident (commands run that way start their own)
    os.environ.pop("RAY_ADDRESS", None)
    os.environ.pop("RAY_GCS_SERVER_PORT", None)
    try:
        yield
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def ray_cluster_nodes(s3_server):
    """A real multi-node Ray cluster on this machine: a head with no CPUs and two 1-CPU nodes, so the
    two training workers of a run land on different nodes. Yields the ray.cluster_utils.Cluster (tests of node
    loss remove and add nodes on it). Module-scoped: idle, its processes would take CPU from every test after
    the module's.

    Started after the S3 server so that its nodes carry the S3 credentials in their environment, as the nodes
    of a real cluster do (credentials never travel in a job's config). Its address is pinned in RAY_ADDRESS and
    its head serves a dashboard of its own, so that Ray Train's helpers on it (the placement-group cleaner asks
    the state API whether a run's controller lives) never ask another Ray instance of this machine."""
    from devservers import free_ports
    from ray._private.services import get_node_ip_address
    from ray.cluster_utils import Cluster

    gcs_port, dashboard_port = free_ports(2)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_ADDRESS", f"{get_node_ip_address()}:{gcs_port}")
        mp.delenv("RAY_GCS_SERVER_PORT", raising=False)
        cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 0, "include_dashboard": True, "dashboard_port": dashboard_port, "gcs_server_port": gcs_port})
        try:
            for _ in range(2):
                cluster.add_node(num_cpus=1, object_store_memory=100_000_000)
            cluster.wait_for_nodes()
            yield cluster
        finally:
            cluster.shutdown()


@pytest.fixture(scope="module")
def ray_cluster(ray_cluster_nodes):
    """The multi-node cluster's address, for `cluster.address=`."""
    return ray_cluster_nodes.address
