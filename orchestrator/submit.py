"""python -m orchestrator.submit EXPERIMENT.yaml [key=value ...] --address http://HEAD:8265 [--follow]

Submits an experiment to a Ray cluster through the Ray Jobs API. The config is composed and checked
here first, so a bad key fails before the cluster is contacted. The job runs the same stable command
as a local run (`python -m orchestrator.run ...`), so resubmitting an experiment resumes it. Only
non-secret settings travel with the job; credentials come from the cluster's own environment.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import sys
import time
from pathlib import Path

from .config import ExperimentError, storage_safe

ROOT = Path(__file__).resolve().parents[1]
FORWARDED_ENV = ("MLFLOW_TRACKING_URI", "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION", "TARFLOW_S3_URI", "TARFLOW_DATA")
EXCLUDES = [".venv", ".git", "runs", "mlruns", "mlartifacts", "mlflow.db", "**/__pycache__", "infra/local/.stack"]


def entrypoint(experiment: Path, overrides: list[str]) -> str:
    try:
        rel = experiment.resolve().relative_to(ROOT)
    except ValueError:
        raise ExperimentError(f"{experiment} is outside the project ({ROOT}); the job's working directory is the "
                              "project, so the experiment must live in it") from None
    return " ".join(["python", "-m", "orchestrator.run", shlex.quote(str(rel)), *map(shlex.quote, overrides)])


def connect(address: str):
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except Exception as e:  # requests' and Ray's errors alike: all mean "no Jobs API there"
        raise ExperimentError(f"cannot reach the Ray Jobs API at {address} ({type(e).__name__}): check the head "
                              "node's dashboard address (port 8265 by default) and that the cluster is up") from None


def follow(client, job_id: str) -> str:
    async def tail():
        async for lines in client.tail_job_logs(job_id):
            print(lines, end="", flush=True)

    asyncio.run(tail())
    return str(client.get_job_status(job_id))


def main(argv: list[str] | None = None) -> int:
    from .run import prepare

    parser = argparse.ArgumentParser(prog="python -m orchestrator.submit", description=__doc__.split("\n\n")[1])
    parser.add_argument("experiment")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--address", default=os.environ.get("RAY_JOBS_ADDRESS", "http://127.0.0.1:8265"),
                        help="the Ray head's dashboard (Jobs API) address")
    parser.add_argument("--follow", action="store_true", help="stream the job's logs; exit code follows the job")
    args = parser.parse_intermixed_args(argv)
    try:
        plan, _, _ = prepare(args.experiment, args.overrides, require_data=False)  # the data lives on the cluster
        command = entrypoint(Path(args.experiment), args.overrides)
        client = connect(args.address)
        job_id = client.submit_job(
            entrypoint=command,
            submission_id=f"{storage_safe(plan.cfg.experiment.name)}-{time.strftime('%Y%m%d-%H%M%S')}",
            runtime_env={"working_dir": str(ROOT), "excludes": EXCLUDES,
                         "env_vars": {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}},
        )
        print(f"submitted {job_id}: {command}", flush=True)
        if not args.follow:
            return 0
        status = follow(client, job_id)
        print(f"job {job_id}: {status}")
        return 0 if status.endswith("SUCCEEDED") else 1
    except ExperimentError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
