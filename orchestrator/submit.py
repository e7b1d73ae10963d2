"""python -m orchestrator.submit EXPERIMENT.yaml [key=value ...] --address http://HEAD:8265 [--follow | --no-wait]

Submits an experiment to a Ray cluster through the Ray Jobs API. The config is composed and checked
here first, so a bad key, or a GPU run that does not fit cluster.gpu_memory_gb, fails before the cluster
is contacted. The job runs the same stable command as a local run (`python -m orchestrator.run
EXPERIMENT.yaml ...`) in an upload of this checkout, so resubmitting an experiment resumes it (a run is
identified by its config hash) and a finished one is not retrained. Only non-secret settings travel
with the job (MLflow and S3 endpoints, storage URI, data path, RAY_TRAIN_*/RAY_TUNE_* flags);
credentials come from the cluster's own environment. A URI with a credential in it (user:password@) in an
override, a forwarded variable or the experiment's config is refused before the cluster is contacted: it would
be in the job's entrypoint or environment, which anyone who can list jobs sees.

By default it waits for the job and exits 0 if it SUCCEEDED, 1 otherwise; --follow also streams the
job's logs; --no-wait returns once the job is accepted. Exit 2: a bad config (a GPU run that does not
fit included), an unreachable or refusing cluster. With token authentication on the head (Ray's
default for new clusters) set RAY_AUTH_MODE=token and the token (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or
~/.ray/auth_token).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import re
import shlex
import socket
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

from .config import credentials, redact_uri
from .errors import ExperimentError
from .gpu_memory import check_launch, estimate_memory
from .lifecycle import load_experiment
from .rundir import storage_safe
from .sweep import sweep_of

ROOT = Path(__file__).resolve().parents[1]

# Non-secret settings forwarded from this shell to the job (read by orchestrator/conf/*)
FORWARDED_ENV = ("MLFLOW_TRACKING_URI", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "MLFLOW_S3_ENDPOINT_URL",
                 "AWS_DEFAULT_REGION", "AWS_REGION", "TARFLOW_S3_URI", "TARFLOW_DATA", "TARFLOW_DATA_URI",
                 "TARFLOW_CACHE")
# Ray behaviour flags that make sense to forward (never RAY_ADDRESS, RAY_AUTH_*, RAY_TMPDIR, ...)
FORWARDED_RAY_PREFIXES = ("RAY_TRAIN_", "RAY_TUNE_", "RAY_DATA_")
FORWARDED_RAY_FLAGS = ("RAY_USAGE_STATS_ENABLED", "RAY_DEDUP_LOGS", "RAY_CHDIR_TO_TRIAL_DIR")
SECRET_WORDS = re.compile(r"SECRET|TOKEN|PASSWORD|PASSWD|CREDENTIAL|PRIVATE|ACCESS_KEY|API_KEY|AUTH", re.I)
CREDENTIAL_IN_URI = re.compile(r"://([^/\s@:]*)(:[^/\s@]*)?@")  # the user[:password]@ of a URI
NODES_HOLD_CREDENTIALS = (
    "credentials never travel with a job (its entrypoint and environment are visible to anyone who can list jobs): "
    "give the URI without them here, and the cluster's nodes the credential in their environment "
    "(MLflow: MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD or MLFLOW_TRACKING_TOKEN, or MLFLOW_TRACKING_URI "
    "with the credential set on the nodes; S3: the nodes' AWS credentials)")

# Not uploaded as the job's working directory (Ray also skips what .gitignore lists)
EXCLUDES = [".venv", "venv", ".git", "runs", "mlruns", "mlartifacts", "mlflow.db", "outputs", "**/__pycache__",
            "*.egg-info", ".pytest_cache", "infra/local/.stack", "*.pt", "*.pth", "*.ckpt"]

TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


class ClusterError(ExperimentError):
    """The cluster could not be reached or refused the request."""


def refuse_credentials(what: str, value: str) -> None:
    """An ExperimentError if value holds a URI with a credential; it names `what` with the credential masked."""
    if CREDENTIAL_IN_URI.search(value):
        # masked as config.redact_uri does: user:***@, or ***@ for a bare token
        masked = CREDENTIAL_IN_URI.sub(lambda m: f"://{m[1]}:***@" if m[2] is not None else "://***@", value)
        raise ExperimentError(f"{what}={masked}: {NODES_HOLD_CREDENTIALS}")


def entrypoint(experiment: Path, overrides: list[str]) -> str:
    """`python -m orchestrator.run <experiment relative to the project> <overrides>`: the same every time.
    An override holding a URI with a credential is refused (refuse_credentials)."""
    for override in overrides:
        key, _, value = override.partition("=")
        refuse_credentials(key, value)
    try:
        rel = experiment.resolve().relative_to(ROOT)
    except ValueError:
        raise ExperimentError(f"{experiment} is outside the project ({ROOT}); the job's working directory is the "
                              "project, so the experiment must live in it") from None
    return " ".join(["python", "-m", "orchestrator.run", shlex.quote(rel.as_posix()), *map(shlex.quote, overrides)])


def job_env(environ: dict[str, str], extra: list[str] = ()) -> dict[str, str]:
    """The job's env_vars: the forwarded non-secret settings, plus --env NAME[=VALUE] (refused if secret, or if
    any value holds a URI with a credential)."""
    out = {k: environ[k] for k in FORWARDED_ENV if environ.get(k)}
    out.update({k: v for k, v in environ.items()
                if (k.startswith(FORWARDED_RAY_PREFIXES) or k in FORWARDED_RAY_FLAGS) and not SECRET_WORDS.search(k)})
    for item in extra:
        name, eq, value = item.partition("=")
        if SECRET_WORDS.search(name):
            raise ExperimentError(f"--env {name}: secrets never travel with a job (they would be visible in the "
                                  "job's runtime environment to anyone who can list jobs); give the cluster's "
                                  "nodes the credential instead (instance role, Kubernetes Secret, node env)")
        if not eq:
            if name not in environ:
                raise ExperimentError(f"--env {name}: not set in this environment (use --env {name}=VALUE)")
            value = environ[name]
        refuse_credentials(f"--env {name}", value)
        out[name] = value
    for name, value in out.items():
        refuse_credentials(name, value)
    return out


def submission_id(plan) -> str:
    """A readable job id: <experiment>-<config hash>-<UTC time>, e.g. table2-3f2a9c0d1e-20250101-120000."""
    return f"{storage_safe(plan.cfg.experiment.name)}-{plan.run_key}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"


def normalize_address(address: str) -> str:
    if "://" not in address:
        address = f"http://{address}"
    scheme = urlparse(address).scheme
    if scheme not in ("http", "https"):
        raise ClusterError(f"--address {address}: the Ray Jobs API is the head's dashboard address, "
                           "http://HEAD:8265 (not ray:// or a GCS address)")
    return address.rstrip("/")


def connect(address: str, timeout: float = 5.0):
    """A JobSubmissionClient, or a one-paragraph ClusterError within about `timeout` seconds."""
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    parsed = urlparse(address)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    hint = ("check the head node's dashboard address (port 8265 by default), that the cluster is up and that the "
            "dashboard listens on an address you can reach (ray start --dashboard-host)")
    try:  # requests has no connect timeout here: a silent host would hang for minutes
        with socket.create_connection((parsed.hostname, port), timeout=timeout):
            pass
    except OSError as e:
        raise ClusterError(f"cannot reach the Ray Jobs API at {address} ({e.strerror or type(e).__name__}): "
                           f"{hint}") from None
    try:
        return JobSubmissionClient(address)
    except AuthenticationError:
        mode = os.environ.get("RAY_AUTH_MODE", "unset")
        raise ClusterError(f"the Ray cluster at {address} requires token authentication and refused this client "
                           f"(RAY_AUTH_MODE is {mode}): set RAY_AUTH_MODE=token and give the cluster's token as "
                           "RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token") from None
    except Exception as e:  # requests' and Ray's errors alike: all mean "no Jobs API there"
        raise ClusterError(f"cannot reach the Ray Jobs API at {address} ({type(e).__name__}: "
                           f"{' '.join(str(e).split())[:200]}): {hint}") from None


def running_duplicate(client, run_key: str) -> str | None:
    """The id of a job of this same run that is still pending or running, if any."""
    try:
        jobs = client.list_jobs()
    except Exception:
        return None
    for job in jobs:
        if (job.metadata or {}).get("tarflow.run_key") == run_key and str(job.status).split(".")[-1] in (
                "PENDING", "RUNNING"):
            return job.submission_id or job.job_id
    return None


def quiet_ray_logs() -> None:
    """Ray's packaging logs every ignore file at INFO and warns about its own default excludes."""
    for name, level in (("ray._private.runtime_env.working_dir", logging.ERROR),
                        ("ray._private.runtime_env.packaging", logging.WARNING),
                        ("ray.dashboard.modules.dashboard_sdk", logging.WARNING),
                        ("ray.dashboard.modules.job.sdk", logging.WARNING)):
        logging.getLogger(name).setLevel(level)


def status_of(client, job_id: str) -> str:
    return str(client.get_job_status(job_id)).split(".")[-1]


def wait(client, job_id: str, poll: float = 2.0) -> str:
    last = None
    while True:
        status = status_of(client, job_id)
        if status != last:
            print(f"[submit] {job_id}: {status}", flush=True)
            last = status
        if status in TERMINAL:
            return status
        time.sleep(poll)


def follow(client, job_id: str) -> str:
    async def tail():
        async for lines in client.tail_job_logs(job_id):
            print(lines, end="", flush=True)

    asyncio.run(tail())
    deadline = time.time() + 30  # the log stream may close a moment before the status turns final
    while (status := status_of(client, job_id)) not in TERMINAL and time.time() < deadline:
        time.sleep(0.5)
    return status


def parse_args(argv: list[str] | None):
    parser = argparse.ArgumentParser(prog="python -m orchestrator.submit", description=__doc__.split("\n\n")[1])
    parser.add_argument("experiment", help="experiment YAML inside this project, e.g. experiments/table2.yaml")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. scale=smoke storage=s3 tracking=server")
    parser.add_argument("--address", default=os.environ.get("RAY_API_SERVER_ADDRESS", "http://127.0.0.1:8265"),
                        help="the Ray head's dashboard (Jobs API) address (default $RAY_API_SERVER_ADDRESS or "
                             "http://127.0.0.1:8265)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--follow", action="store_true", help="stream the job's logs until it ends")
    mode.add_argument("--no-wait", action="store_true", help="return as soon as the job is accepted")
    parser.add_argument("--env", action="append", default=[], metavar="NAME[=VALUE]",
                        help="forward one more non-secret environment variable to the job")
    parser.add_argument("--force", action="store_true",
                        help="submit even if a job of the same run is still running")
    return parser.parse_intermixed_args(argv)


def submit(args, submitted: list) -> int:
    """Check the config here, submit the job, then wait for it as asked; its id is appended to `submitted`."""
    # the data is on the cluster, not necessarily here
    plan, storage, tracking_uri = load_experiment(args.experiment, args.overrides, require_data=False)
    sweep = sweep_of(plan, require_data=False)  # a sweep's whole search space, as orchestrator.run checks it
    notes = check_launch(plan, estimate_memory(plan, sweep))  # a GPU run that cannot fit: refused here
    command = entrypoint(Path(args.experiment), args.overrides)
    env_vars = job_env(dict(os.environ), args.env)
    for key, value in credentials(plan.cfg).items():  # from the experiment's YAML, uploaded with the project
        if key != "cluster.address":  # the job runs on the cluster's own Ray, whatever this one says
            refuse_credentials(f"{key} (in {plan.source})", value)
    address = normalize_address(args.address)
    for note in notes:
        print(f"[submit] {note}", flush=True)
    client = connect(address)
    if not args.force and (other := running_duplicate(client, plan.run_key)):
        raise ClusterError(f"job {other} is already running this run ({plan.run_name}); follow it with "
                           f"`ray job logs {other} --address {address} --follow`, or pass --force")
    quiet_ray_logs()
    print(f"[submit] uploading {ROOT} as the job's working directory (without {', '.join(EXCLUDES[:6])}, ...)",
          flush=True)
    job_id = client.submit_job(
        entrypoint=command, submission_id=submission_id(plan),
        runtime_env={"working_dir": str(ROOT), "excludes": EXCLUDES, "env_vars": env_vars},
        metadata={"tarflow.experiment": plan.cfg.experiment.name, "tarflow.run_key": plan.run_key,
                  "tarflow.run_name": plan.run_name},
    )
    submitted.append(job_id)
    print(f"[submit] submitted {job_id} to {address}: {command}", flush=True)
    print(f"[submit] MLflow run '{plan.display_name}' in experiment '{plan.experiment_name}' at "
          f"{redact_uri(tracking_uri)}", flush=True)
    for note in where_results_go(redact_uri(plan.cfg.storage.uri), storage.is_s3, tracking_uri):
        print(f"[submit] note: {note}", flush=True)
    if not args.follow:
        print(f"[submit] logs: ray job logs {job_id} --address {address} --follow", flush=True)
    if args.no_wait:
        return 0
    status = follow(client, job_id) if args.follow else wait(client, job_id)
    print(f"[submit] job {job_id}: {status}", flush=True)
    if status != "SUCCEEDED":
        message = (client.get_job_info(job_id).message or "").strip()
        if message:
            print(f"[submit] {message[-2000:]}", file=sys.stderr)
    return 0 if status == "SUCCEEDED" else 1


def where_results_go(storage_uri: str, is_s3: bool, tracking_uri: str) -> list[str]:
    """What a user should know when the results stay on the cluster's nodes."""
    notes = []
    if not is_s3:
        notes.append(f"storage is the path {storage_uri!r} on the cluster's nodes; use storage=s3 (or "
                     "storage.uri=s3://...) to keep checkpoints beyond the job")
    if urlparse(tracking_uri).scheme not in ("http", "https"):
        notes.append("tracking is a local MLflow store on the cluster's nodes; use tracking=server "
                     "(MLFLOW_TRACKING_URI) to see the run in your MLflow")
    return notes


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    submitted = []
    try:
        return submit(args, submitted)
    except ExperimentError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if submitted:
            print(f"\n[submit] interrupted; job {submitted[0]} keeps running on the cluster. Stop it with: "
                  f"ray job stop {submitted[0]} --address {args.address}", file=sys.stderr)
        return 130
    except Exception as e:  # the cluster refused the job, or was lost while waiting: say so in one paragraph
        if not submitted:
            print(f"error: the Ray Jobs API at {args.address} did not accept the job ({type(e).__name__}: "
                  f"{' '.join(str(e).split())[:300]})", file=sys.stderr)
            return 2
        print(f"error: lost the Ray Jobs API at {args.address} while waiting for job {submitted[0]} "
              f"({type(e).__name__}: {' '.join(str(e).split())[:200]}); the job may still be running: "
              f"ray job status {submitted[0]} --address {args.address}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
