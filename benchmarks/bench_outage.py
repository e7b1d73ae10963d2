"""What an MLflow outage costs a run: the wall time of a smoke run of table2 (900 steps, 2 workers) with and
without the tracking server killed for --outage-s seconds in the middle, and whether every logged step
reached MLflow. Prints figures; asserts nothing.

    python benchmarks/bench_outage.py [--steps 900] [--outage-s 60] [--at-step 300] [--checkout DIR]

--checkout runs another checkout of this project (e.g. a `git worktree` of an older commit) the same way,
for a before/after comparison; its code is only run, never imported here.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "infra" / "local"))

from devservers import start_mlflow_server  # noqa: E402


def loss_steps(uri: str, experiment: str) -> list[int]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    runs = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("tarflow.kind", "run") == "run"
            and "table" not in r.info.run_name]
    return sorted(m.step for r in runs for m in client.get_metric_history(r.info.run_id, "loss"))


def one_run(checkout: Path, work: Path, steps: int, outage_s: float, at_step: int) -> dict:
    server = start_mlflow_server(work / "mlflow")
    port, name = server.ports[0], f"outage-{int(outage_s)}"
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_GCS_SERVER_PORT")}
    env.update(PYTHONPATH=str(checkout), RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled")
    cmd = [sys.executable, "-m", "orchestrator.run", str(checkout / "experiments" / "table2.yaml"), "scale=smoke",
           f"train.steps={steps}", f"tracking.uri={server.url}", f"experiment.name={name}", "eval.num_samples=0"]
    log = (work / f"{name}.log").open("w")
    started = time.time()
    proc = subprocess.Popen(cmd, cwd=work, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    killed_at = back_at = None
    try:
        while proc.poll() is None:
            time.sleep(1)
            if outage_s and killed_at is None and max(loss_steps(server.url, name) or [0]) >= at_step:
                server.stop()
                killed_at = time.time()
            if killed_at and back_at is None and time.time() - killed_at >= outage_s:
                server = start_mlflow_server(work / "mlflow", port=port)
                back_at = time.time()
        wall = time.time() - started
        if killed_at and back_at is None:  # still down when the run ended
            server = start_mlflow_server(work / "mlflow", port=port)
        steps_seen = loss_steps(server.url, name)
        # what a later command catches up (the backlog the run left in storage, if any)
        report = [sys.executable, "-m", "orchestrator.report", *cmd[3:]]
        subprocess.run(report, cwd=work, env=env, capture_output=True, timeout=600)
        steps_after = loss_steps(server.url, name)
    finally:
        server.stop()
    return {"exit": proc.returncode, "wall_s": wall, "logged_steps": len(steps_seen),
            "distinct_steps": len(set(steps_seen)), "after_report": len(set(steps_after)),
            "duplicated_after": len(steps_after) - len(set(steps_after)), "log": str(work / f"{name}.log")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=900)
    p.add_argument("--outage-s", type=float, default=60)
    p.add_argument("--at-step", type=int, default=300)
    p.add_argument("--checkout", type=Path, default=ROOT, help="the project checkout to run (default: this one)")
    args = p.parse_args()
    expected = args.steps // 25  # smoke scale logs every 25 steps
    with tempfile.TemporaryDirectory(prefix="bench-outage-") as tmp:
        for outage in (0, args.outage_s):
            work = Path(tmp) / f"o{int(outage)}"
            work.mkdir()
            r = one_run(args.checkout.resolve(), work, args.steps, outage, args.at_step)
            dup = r["logged_steps"] - r["distinct_steps"]
            print(f"outage {outage:>4.0f} s at step {args.at_step}: exit {r['exit']}, wall {r['wall_s']:.0f} s, loss "
                  f"steps in MLflow {r['distinct_steps']}/{expected} at exit ({dup} duplicated), "
                  f"{r['after_report']}/{expected} after orchestrator.report "
                  f"({r['duplicated_after']} duplicated)", flush=True)


if __name__ == "__main__":
    main()
