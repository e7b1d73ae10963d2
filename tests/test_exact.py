"""A run's result is a function of its config and seed: resumed from any checkpoint, or trained on any number of
workers, it ends with the weights the uninterrupted run ends with (bit for bit on one CPU process; up to the
order of float reductions across processes). The elastic and preemptible cases are in test_run.py, on the
multi-node cluster."""

import json
import os
import signal
import time

import pytest
import torch
from conftest import EXPERIMENTS, run_main
from loop_harness import train_directly

import tarflow
from orchestrator.run import main

TABLE2 = str(EXPERIMENTS / "table2.yaml")
NOISY = ["train.noise=gaussian", "model.conditional=true", "train.label_drop=0.3", "model.nvp=false"]


def worst_relative(a: dict, b: dict) -> float:
    """The largest max|a − b| / max|b| over the tensors of two state dicts."""
    return max(((a[k].double() - b[k].double()).abs().max() / b[k].double().abs().max().clamp_min(1e-30)).item()
               for k in b if b[k].is_floating_point())


@pytest.mark.parametrize("crash_at", [4, 8])
def test_resumed_from_any_checkpoint_the_loop_ends_bit_for_bit_where_it_would_have(tmp_path, monkeypatch, crash_at):
    """Noise, flips and label drops come from (seed, step, position): a restart draws what the first attempt
    would have, with no RNG state saved; the VP prior and the EMA (buffers too) resume with the rest."""
    _, whole, _ = train_directly(tmp_path / "a", monkeypatch, NOISY)
    _, _, checkpoints = train_directly(tmp_path / "b", monkeypatch, NOISY, crash_at=crash_at)
    _, resumed, _ = train_directly(tmp_path / "b", monkeypatch, NOISY, resume=checkpoints[crash_at])
    for a, b in [(resumed.model, whole.model), (resumed.ema, whole.ema)]:
        assert worst_relative(a.state_dict(), b.state_dict()) == 0.0
    assert not torch.equal(whole.model.prior_var, torch.ones_like(whole.model.prior_var))
    assert torch.equal(whole.ema.prior_var, whole.model.prior_var)


def final_state(store) -> dict:
    run_dir = next(p for p in store.iterdir() if (p / "result.json").is_file())
    done = json.loads((run_dir / "result.json").read_text())
    return tarflow.load_checkpoint(run_dir / done["checkpoint"] / "state.pt")


@pytest.mark.slow
def test_one_and_two_workers_train_the_same_model(tmp_path, local_ray):
    """The same global batch on 1 and on 2 Ray workers: the same weights up to the order of float sums."""
    args = [TABLE2, "scale=test", *NOISY, "train.batch_size=64", "train.steps=200", "train.checkpoint_every=200",
            "eval.num_samples=0", "eval.bpd=false", "train.log_every=50"]
    finals = {}
    for workers in (1, 2):
        store = tmp_path / f"w{workers}"
        r = run_main(main, [*args, f"cluster.num_workers={workers}", f"storage.uri={store}",
                            f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", f"experiment.name=w{workers}"],
                     tmp_path)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        finals[workers] = final_state(store)
    difference = worst_relative(finals[2]["model"], finals[1]["model"])
    one, two = finals[1]["model"], finals[2]["model"]
    worst = max((k for k in one if one[k].is_floating_point()), key=lambda k: worst_relative({k: two[k]}, {k: one[k]}))
    print(f"1 vs 2 workers, 200 steps: worst relative weight difference {difference:.2e} ({worst})")
    assert difference < 1e-4
    assert worst_relative(finals[2]["ema"] or finals[2]["model"], finals[1]["ema"] or finals[1]["model"]) < 1e-4


@pytest.mark.slow
@pytest.mark.soak
def test_a_driver_killed_after_checkpoint_300_of_600_resumes_to_the_same_weights(tmp_path, local_ray):
    from test_faults import start, wait_for

    args = [TABLE2, "scale=test", *NOISY, "model.arch=4-128-2-2", "train.steps=600", "train.checkpoint_every=300",
            "train.log_every=100", "eval.num_samples=0", "eval.bpd=false", "storage.async_upload=false",
            "cluster.num_workers=2", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"]
    whole = tmp_path / "whole"
    r = run_main(main, [*args, f"storage.uri={whole}", "experiment.name=whole"], tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]

    killed = tmp_path / "killed"
    kill_args = [*args, f"storage.uri={killed}", "experiment.name=killed"]
    log = tmp_path / "killed.log"
    proc = start(kill_args, tmp_path, log)
    wait_for(lambda: any(killed.glob("killed-*/checkpoint_00000300/state.pt.sha256")), proc, log)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and its process group
    proc.wait()
    time.sleep(1)
    assert not any(killed.glob("killed-*/result.json")), "the run ended before the kill: make it longer"
    r = run_main(main, kill_args, tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "took over the stale lease" in r.stdout
    difference = worst_relative(final_state(killed)["model"], final_state(whole)["model"])
    print(f"killed at 300 of 600 and resumed: worst relative weight difference {difference:.2e}")
    assert difference < 1e-6
