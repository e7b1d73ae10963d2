"""What the orchestration costs: time to the first training step, and the throughput of the orchestrated
run (Ray Train, MLflow logging, checkpoints) against the bare tarflow loop doing the same steps.

    python benchmarks/bench_orchestrator.py [--steps 300] [--workers 1]

Prints figures; asserts nothing. Runs on a CPU in a few minutes (the smoke scale of table2).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import tarflow  # noqa: E402
from orchestrator.config import compose_experiment  # noqa: E402
from orchestrator.plan import plan_run, schedule, train_config  # noqa: E402
from tarflow.data import load_dataset  # noqa: E402


def bare_loop(overrides: list[str], steps: int) -> dict:
    """The same model, data and steps as the orchestrated run, in one plain process."""
    t0 = time.perf_counter()
    cfg = compose_experiment(ROOT / "experiments" / "table2.yaml", overrides)
    plan = plan_run(cfg)
    data = load_dataset(plan.data, "train")
    _, total, warmup = schedule(cfg, len(data))
    torch.manual_seed(0)
    state = tarflow.make_train_state(tarflow.TarFlow(plan.model), train_config(cfg, total, warmup))
    loader = torch.utils.data.DataLoader(data, batch_size=cfg.train.batch_size, shuffle=True, drop_last=True)
    first = None
    done = 0
    t_start = None
    while done < steps:
        for x, y in loader:
            tarflow.train_step(state, x, y)
            done += 1
            if first is None:
                first = time.perf_counter() - t0
                t_start = time.perf_counter()  # throughput excludes the first (warm-up) step
            if done == steps:
                break
    elapsed = time.perf_counter() - t_start
    return {"first_step_s": first, "images_per_s": (steps - 1) * cfg.train.batch_size / elapsed}


def orchestrated(overrides: list[str], steps: int) -> dict:
    from mlflow.tracking import MlflowClient

    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled",
               "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0", "MLFLOW_DISABLE_TELEMETRY": "true"}
        start = time.time()
        r = subprocess.run([sys.executable, "-m", "orchestrator.run", str(ROOT / "experiments" / "table2.yaml"),
                            *overrides], cwd=tmp, env=env, capture_output=True, text=True)
        wall = time.time() - start
        if r.returncode != 0:
            raise SystemExit(r.stdout[-2000:] + r.stderr[-2000:])
        client = MlflowClient(f"sqlite:///{tmp}/mlflow.db")
        exp = client.get_experiment_by_name("table2")
        run = next(r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("tarflow.kind") != "table")
        loss = client.get_metric_history(run.info.run_id, "loss")
        ips = [m.value for m in client.get_metric_history(run.info.run_id, "images_per_sec")]
        # the first logged step marks training under way; its timestamp minus the command's start
        # bounds the time to the first step from above by one log interval
        first_log = min(m.timestamp for m in loss) / 1000 - start
        return {"first_log_s": first_log, "images_per_s": statistics.median(ips[1:] or ips), "wall_s": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    overrides = ["scale=smoke", f"train.steps={args.steps}", f"cluster.num_workers={args.workers}",
                 "train.log_every=10", f"train.checkpoint_every={args.steps // 3}", "eval.bpd=false",
                 "eval.num_samples=0"]
    # Ray gives each worker cluster.cpus_per_worker CPUs (1 here) and sets its thread count to match:
    # the bare loop gets the same, so the ratio measures the orchestration, not the thread count
    torch.set_num_threads(1)
    bare = bare_loop(overrides, args.steps)
    orch = orchestrated(overrides, args.steps)
    print(f"table2 at smoke scale: {args.steps} steps, global batch 64, {args.workers} Ray worker(s), "
          f"{os.cpu_count()} CPUs, torch {torch.__version__}")
    print(f"{'':28s}{'bare tarflow loop':>20s}{'orchestrated':>16s}")
    print(f"{'time to first step (s)':28s}{bare['first_step_s']:>20.1f}{orch['first_log_s']:>16.1f}"
          "   (orchestrated: first logged step, incl. Ray start)")
    print(f"{'training images/s':28s}{bare['images_per_s']:>20.0f}{orch['images_per_s']:>16.0f}")
    print(f"throughput ratio orchestrated/bare: {orch['images_per_s'] / bare['images_per_s']:.2f}; "
          f"orchestrated wall time {orch['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
