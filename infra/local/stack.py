"""A local stack laid out like a real deployment: a Ray head with the dashboard (Jobs API), an
S3-compatible object store (SeaweedFS) and `mlflow server` (SQLite backend, artifacts proxied into the
bucket). Everything binds 127.0.0.1 unless --host says otherwise.

    python infra/local/stack.py up [--dir DIR] [--num-cpus N] [--dashboard-port 8265] [--auth token|disabled]
    python infra/local/stack.py status [--dir DIR]
    python infra/local/stack.py env [--dir DIR]            # the env file's lines
    python infra/local/stack.py down [--dir DIR] [--purge]

(`infra/local/up`, `status` and `down` call these.) `up` writes DIR/env (default
infra/local/.stack/env): `source` it, then submit with `python -m orchestrator.submit`.

Stopping: other people on the same machine may run Ray too, and `ray stop` kills every Ray process of
the machine, so it is never used. Every process of this stack is found by what `up` recorded: each
service was started as the leader of its own session (setsid) and Ray's daemons and workers keep that
session id; job drivers (Ray puts them in sessions of their own) are found as descendants. Only
processes started after `up` began are considered, so a reused PID is never hit. They get SIGTERM, then
SIGKILL after a grace period; the Ray temp dir (a short private one, which also keeps this head's
`ray_current_cluster` file away from other people's `ray.init()`) is removed. Data (MLflow database,
bucket contents) stays in DIR for the next `up` unless --purge.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import devservers as services

DEFAULT_DIR = Path(__file__).resolve().parent / ".stack"
STATE = "state.json"
ENV_FILE = "env"
BUCKET = "tarflow"
ACCESS_KEY = "testkey"          # local test credentials, enforced by SeaweedFS; nothing secret
SECRET_KEY = "testsecret"
REGION = "us-east-1"
HZ = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


class StackError(RuntimeError):
    pass


# --------------------------------------------------------------------------------------------- #
# Processes (Linux /proc; no third-party dependency)
# --------------------------------------------------------------------------------------------- #


def _stat(pid: int) -> tuple[int, int, int] | None:
    """(ppid, session id, start time in clock ticks since boot) of pid, or None if it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()
    # fields[0] is state; ppid=1, pgrp=2, session=3, starttime=19 (0-based after the state)
    if fields[0] == "Z":  # a zombie is already dead; its parent reaps it
        return None
    return int(fields[1]), int(fields[3]), int(fields[19])


def _all_pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def _boot_ticks_now() -> int:
    """Now, in the clock ticks since boot that /proc/PID/stat uses for start times."""
    return int(float(Path("/proc/uptime").read_text().split()[0]) * HZ)


def stack_processes(state: dict) -> dict[int, str]:
    """pid -> command line of every live process that belongs to this stack."""
    sessions = {int(s) for s in state.get("sessions", {}).values()}
    since = int(state.get("started_ticks", 0))
    me = {os.getpid(), os.getppid()}
    table = {}
    for pid in _all_pids():
        st = _stat(pid)
        if st is not None:
            table[pid] = st
    ours = {pid for pid, (_, sid, start) in table.items() if sid in sessions and start >= since}
    # descendants: Ray's job drivers run in sessions of their own under the JobSupervisor actor
    grew = True
    while grew:
        grew = False
        for pid, (ppid, _, start) in table.items():
            if pid not in ours and ppid in ours and start >= since:
                ours.add(pid)
                grew = True
    return {pid: _cmdline(pid) for pid in sorted(ours - me)}


def _signal_all(pids, sig) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def stop_processes(state: dict, grace: float = 5.0) -> list[str]:
    """SIGTERM every process of the stack, SIGKILL what is left after `grace` s; returns survivors."""
    procs = stack_processes(state)
    if not procs:
        return []
    _signal_all(procs, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        procs = stack_processes(state)  # also catches children started meanwhile
        if not procs:
            return []
        time.sleep(0.2)
    for _ in range(3):
        procs = stack_processes(state)
        if not procs:
            return []
        _signal_all(procs, signal.SIGKILL)
        time.sleep(1.0)
    return [f"{pid} {cmd[:150]}" for pid, cmd in stack_processes(state).items()]


# --------------------------------------------------------------------------------------------- #
# State
# --------------------------------------------------------------------------------------------- #


def load_state(stack_dir: Path) -> dict | None:
    try:
        return json.loads((stack_dir / STATE).read_text())
    except (OSError, ValueError):
        return None


def save_state(stack_dir: Path, state: dict) -> None:
    tmp = stack_dir / f"{STATE}.tmp"
    tmp.write_text(json.dumps(state, indent=2))
    tmp.replace(stack_dir / STATE)


def _http_ok(url: str, headers: dict | None = None, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=timeout) as r:
            return 200 <= r.status < 300
    except (urllib.error.URLError, OSError, ValueError):
        return False


def _auth_headers(state: dict) -> dict:
    token_file = state.get("ray_auth_token_path")
    if not token_file:
        return {}
    try:
        return {"Authorization": "Bearer " + Path(token_file).read_text().strip()}
    except OSError:
        return {}


def health(state: dict) -> dict[str, bool]:
    """Is each service answering?"""
    return {
        "s3": bool(state.get("s3_url")) and _s3_ok(state["s3_url"]),
        "mlflow": bool(state.get("mlflow_url")) and _http_ok(f"{state['mlflow_url']}/health"),
        "ray": bool(state.get("ray_dashboard_url")) and _http_ok(f"{state['ray_dashboard_url']}/api/version",
                                                                 _auth_headers(state)),
    }


def _s3_ok(url: str) -> bool:
    try:
        client = services.s3_client(url, ACCESS_KEY, SECRET_KEY, connect_timeout=1, read_timeout=3,
                                    retries={"max_attempts": 1})
        client.head_bucket(Bucket=BUCKET)
        return True
    except Exception:
        return False


def env_lines(state: dict) -> list[str]:
    """What a client needs, as `export` lines (test credentials of the local S3 only)."""
    env = {
        "RAY_ADDRESS": state["ray_address"],                  # joining the cluster directly (orchestrator.run)
        "RAY_API_SERVER_ADDRESS": state["ray_dashboard_url"],  # the Jobs API (orchestrator.submit, ray job ...)
        "RAY_AUTH_MODE": state["ray_auth_mode"],
        "MLFLOW_TRACKING_URI": state["mlflow_url"],
        "AWS_ENDPOINT_URL": state["s3_url"],
        "AWS_ACCESS_KEY_ID": ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
        "AWS_DEFAULT_REGION": REGION,
        "TARFLOW_S3_URI": state["tarflow_s3_uri"],
    }
    if state.get("ray_auth_token_path"):
        env["RAY_AUTH_TOKEN_PATH"] = state["ray_auth_token_path"]
    return [f"export {k}={v}" for k, v in env.items()]


# --------------------------------------------------------------------------------------------- #
# up / down / status
# --------------------------------------------------------------------------------------------- #


def _port_taken(port: int) -> bool:
    """Something listens there (closed connections in TIME_WAIT don't count: servers bind with SO_REUSEADDR)."""
    if services.port_is_open(port):
        return True
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((services.HOST, port))
        except OSError:
            return True
    return False


def _check_port(requested: int) -> int:
    """A requested port that is taken fails before anything starts; 0 stays 0 (start_ray_head picks one)."""
    if requested and _port_taken(requested):
        raise StackError(f"port {requested} on 127.0.0.1 is taken (another Ray dashboard?): pass "
                         "--dashboard-port 0 for a free one, or another port")
    return requested


def _ray_exe() -> str:
    exe = Path(sys.executable).parent / "ray"
    return str(exe) if exe.is_file() else (shutil.which("ray") or "ray")


def up(stack_dir: Path, num_cpus: int, dashboard_port: int, host: str, auth: str, s3_kind: str,
       object_store_mb: int) -> dict:
    stack_dir = stack_dir.resolve()
    old = load_state(stack_dir)
    if old is not None and stack_processes(old):
        if all(health(old).values()):
            print(f"[stack] already up (state {stack_dir / STATE}); `down` first to restart it")
            return old
        raise StackError(f"a stack from {stack_dir / STATE} is partly running: run `down` first")
    dashboard_port = _check_port(dashboard_port)  # before anything starts
    stack_dir.mkdir(parents=True, exist_ok=True)
    logs = stack_dir / "logs"
    logs.mkdir(exist_ok=True)
    started = time.monotonic()

    state: dict = {
        "dir": str(stack_dir),
        "started_ticks": _boot_ticks_now() - HZ,  # one second of slack for rounding
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "sessions": {},
        "ray_auth_mode": auth,
        "host": host,
    }
    # credentials for the S3 server (it enforces them), mlflow's S3 client and the Ray head's workers
    os.environ.update(AWS_ACCESS_KEY_ID=ACCESS_KEY, AWS_SECRET_ACCESS_KEY=SECRET_KEY, AWS_DEFAULT_REGION=REGION)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    try:
        s3 = services.start_s3_server(stack_dir / "s3", kind=s3_kind, access_key=ACCESS_KEY, secret_key=SECRET_KEY)
        state["sessions"]["s3"] = s3.pid
        state.update(s3_url=s3.url, s3_kind=s3.kind, s3_ports=list(s3.ports), s3_log=str(s3.log_path),
                     tarflow_s3_uri=f"s3://{BUCKET}/runs", mlflow_artifacts=f"s3://{BUCKET}/mlartifacts")
        save_state(stack_dir, state)
        services.create_bucket(s3.url, BUCKET, ACCESS_KEY, SECRET_KEY)
        print(f"[stack] S3 ({s3.kind})   {s3.url}  bucket {BUCKET}  ({s3.info['startup_s']:.1f}s)", flush=True)

        mlflow = services.start_mlflow_server(stack_dir / "mlflow", artifacts_destination=state["mlflow_artifacts"],
                                              s3_endpoint=s3.url, host=host)
        state["sessions"]["mlflow"] = mlflow.pid
        state.update(mlflow_url=mlflow.url, mlflow_log=str(mlflow.log_path))
        save_state(stack_dir, state)
        print(f"[stack] MLflow         {mlflow.url}  artifacts {state['mlflow_artifacts']} (proxied)  "
              f"({mlflow.info['startup_s']:.1f}s)", flush=True)

        start_ray_head(stack_dir, state, num_cpus, dashboard_port, host, auth, object_store_mb)
        print(f"[stack] Ray head       {state['ray_address']}  Jobs API {state['ray_dashboard_url']}  "
              f"({state['ray_startup_s']:.1f}s, auth {auth})", flush=True)
    except BaseException as e:
        survivors = stop_processes(state)
        if state.get("ray_temp_dir"):
            shutil.rmtree(state["ray_temp_dir"], ignore_errors=True)
        if isinstance(e, (StackError, RuntimeError)):
            raise StackError(f"{e}" + (f"\nstill running: {survivors}" if survivors else "")) from None
        raise

    env_path = stack_dir / ENV_FILE
    env_path.write_text("# written by infra/local/stack.py up; `source` it\n" + "\n".join(env_lines(state)) + "\n")
    state["env_file"] = str(env_path)
    save_state(stack_dir, state)
    print(f"[stack] up in {time.monotonic() - started:.1f}s; environment: source {env_path}")
    return state


def start_ray_head(stack_dir: Path, state: dict, num_cpus: int, dashboard_port: int, host: str, auth: str,
                   object_store_mb: int, timeout: float = 120.0) -> None:
    # picked together, once S3 and MLflow listen: no port twice (Ray's fixed defaults collide with other heads)
    gcs_port, free_dashboard, *agent_ports = services.free_ports(7)
    dashboard_port = dashboard_port or free_dashboard
    # a short temp dir of our own: socket paths stay < 108 bytes, and the head's ray_current_cluster file
    # lives there instead of /tmp/ray (where other people's plain ray.init() would find it)
    temp_dir = tempfile.mkdtemp(prefix="tfstack-", dir="/tmp")
    state.update(ray_temp_dir=temp_dir, ray_gcs_port=gcs_port, ray_dashboard_port=dashboard_port)
    env = dict(os.environ)
    for key in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        env.pop(key, None)
    env.update(
        # the job's `python` is this environment's, as on a cluster where the project is installed
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        # what a real cluster's nodes carry in their environment (credentials included; they never travel
        # with a job): read by orchestrator/conf/storage/s3.yaml and tracking/server.yaml
        AWS_ENDPOINT_URL=state["s3_url"], TARFLOW_S3_URI=state["tarflow_s3_uri"],
        MLFLOW_TRACKING_URI=state["mlflow_url"],
        RAY_AUTH_MODE=auth, RAY_USAGE_STATS_ENABLED="0", MLFLOW_DISABLE_TELEMETRY="true",
    )
    if auth == "token":
        token_path = stack_dir / "ray_auth_token"
        if not token_path.exists():
            token_path.write_text(secrets.token_hex(32))
            token_path.chmod(0o600)
        env["RAY_AUTH_TOKEN_PATH"] = str(token_path)
        state["ray_auth_token_path"] = str(token_path)
    ports = dict(zip(("ray-client-server-port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                      "runtime-env-agent-port", "metrics-export-port"), agent_ports))
    cmd = [_ray_exe(), "start", "--head", f"--port={gcs_port}", f"--dashboard-host={host}",
           f"--dashboard-port={dashboard_port}", "--include-dashboard=true",
           f"--num-cpus={num_cpus}", f"--object-store-memory={object_store_mb * 1024 * 1024}",
           f"--temp-dir={temp_dir}", "--disable-usage-stats"] + [f"--{k}={v}" for k, v in ports.items()]
    log_path = stack_dir / "logs" / "ray-start.log"
    t0 = time.monotonic()
    with open(log_path, "ab") as log:
        log.write(f"\n$ {' '.join(cmd)}\n".encode())
        log.flush()
        proc = subprocess.Popen(cmd, env=env, cwd=str(stack_dir), stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    state["sessions"]["ray"] = proc.pid
    state.update(ray_address=f"{services.HOST}:{gcs_port}",
                 ray_dashboard_url=f"http://{services.HOST if host in ('0.0.0.0', '::') else host}:{dashboard_port}",
                 ray_log=str(log_path), ray_session_logs=f"{temp_dir}/session_latest/logs")
    save_state(stack_dir, state)
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        raise StackError(f"`ray start --head` did not finish within {timeout:.0f}s; log {log_path}:\n"
                         f"{services.tail_log(log_path)}") from None
    if rc != 0:
        raise StackError(f"`ray start --head` failed (exit {rc}); end of its log {log_path}:\n"
                         f"{services.tail_log(log_path, 8)}")
    # the dashboard (Jobs API) may come up a little after `ray start` returns
    deadline = time.monotonic() + 60
    while not _http_ok(f"{state['ray_dashboard_url']}/api/version", _auth_headers(state)):
        if time.monotonic() > deadline:
            raise StackError(f"the Ray dashboard at {state['ray_dashboard_url']} did not answer within 60s; logs "
                             f"in {temp_dir}/session_latest/logs")
        time.sleep(0.5)
    state["ray_startup_s"] = time.monotonic() - t0
    try:  # the address Ray chose for the node (it may be the machine's IP rather than 127.0.0.1)
        state["ray_address"] = (Path(temp_dir) / "ray_current_cluster").read_text().strip() or state["ray_address"]
    except OSError:
        pass


def down(stack_dir: Path, purge: bool = False) -> int:
    stack_dir = stack_dir.resolve()
    state = load_state(stack_dir)
    if state is None:
        print(f"[stack] nothing to stop: no {stack_dir / STATE}")
        if purge and stack_dir.exists():
            shutil.rmtree(stack_dir, ignore_errors=True)
        return 0
    n = len(stack_processes(state))
    survivors = stop_processes(state)
    # what the services leave behind outside DIR: the Ray temp dir and SeaweedFS's unix sockets
    temp_dir = state.get("ray_temp_dir")
    if temp_dir and Path(temp_dir).name.startswith("tfstack-"):
        shutil.rmtree(temp_dir, ignore_errors=True)
    for port in state.get("s3_ports", []):
        for sock in Path(tempfile.gettempdir()).glob(f"seaweedfs-*-{port}.sock"):
            sock.unlink(missing_ok=True)
    if survivors:
        print("[stack] could not stop:\n  " + "\n  ".join(survivors), file=sys.stderr)
        return 1
    (stack_dir / STATE).unlink(missing_ok=True)
    (stack_dir / ENV_FILE).unlink(missing_ok=True)
    if purge:
        shutil.rmtree(stack_dir, ignore_errors=True)
    print(f"[stack] stopped {n} processes" + ("; data removed" if purge else f"; data kept in {stack_dir}"))
    return 0


def status(stack_dir: Path) -> int:
    state = load_state(stack_dir.resolve())
    if state is None:
        print(f"[stack] down (no {stack_dir.resolve() / STATE})")
        return 3
    ok = health(state)
    procs = stack_processes(state)
    print(f"[stack] {len(procs)} processes since {state['started_at']}; env file {state.get('env_file')}")
    for name, url in (("s3", state.get("s3_url")), ("mlflow", state.get("mlflow_url")),
                      ("ray", state.get("ray_dashboard_url"))):
        print(f"  {name:7s} {'up  ' if ok.get(name) else 'DOWN'} {url}")
    return 0 if all(ok.values()) else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="infra/local/stack.py", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("up", "down", "status", "env"):
        p = sub.add_parser(name)
        p.add_argument("--dir", type=Path, default=Path(os.environ.get("TARFLOW_STACK_DIR", DEFAULT_DIR)),
                       help="where state, logs and data live (default infra/local/.stack)")
        if name == "up":
            p.add_argument("--num-cpus", type=int, default=max(4, os.cpu_count() or 1),
                           help="logical CPUs of the Ray head (default max(4, cores))")
            p.add_argument("--dashboard-port", type=int, default=8265, help="Jobs API port; 0 picks a free one")
            p.add_argument("--host", default="127.0.0.1", help="bind address of MLflow and the Ray dashboard")
            p.add_argument("--auth", choices=("token", "disabled"), default="token",
                           help="Ray token authentication (default token, as a deployed cluster should run)")
            p.add_argument("--s3", choices=("auto", "seaweedfs", "moto"), default="auto", dest="s3_kind")
            p.add_argument("--object-store-mb", type=int, default=256)
        if name == "down":
            p.add_argument("--purge", action="store_true", help="also delete the data (MLflow database, bucket)")
    args = parser.parse_args(argv)
    if not Path("/proc/self/stat").exists():
        print("error: infra/local/stack.py finds its processes through /proc: it runs on Linux", file=sys.stderr)
        return 2
    try:
        if args.command == "up":
            up(args.dir, args.num_cpus, args.dashboard_port, args.host, args.auth, args.s3_kind, args.object_store_mb)
            return 0
        if args.command == "down":
            return down(args.dir, args.purge)
        if args.command == "status":
            return status(args.dir)
        state = load_state(args.dir.resolve())
        if state is None:
            print("stack is down", file=sys.stderr)
            return 3
        print("\n".join(env_lines(state)))
        return 0
    except StackError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
