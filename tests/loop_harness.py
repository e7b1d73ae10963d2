"""The real training loop (orchestrator.train_loop.train) driven in this process, world size 1, without Ray: what
it logs and reports, and its checkpoints, for tests of what the loop does between them."""

import dataclasses

import torch
from conftest import EXPERIMENTS

import orchestrator.train_loop as loop
import tarflow
from orchestrator.config import compose_experiment
from orchestrator.evaluation import FIDContext
from orchestrator.periodic import start_periodic
from orchestrator.plan import plan_run, schedule
from orchestrator.storage import RunStorage
from tarflow.data import load_dataset

TABLE2 = str(EXPERIMENTS / "table2.yaml")

SMALL = ["scale=test", "train.steps=12", "train.log_every=1", "train.checkpoint_every=4", "cluster.num_workers=1",
         "train.noise=gaussian", "model.conditional=true", "train.ema_decay=0.9", "eval.periodic_val_images=16",
         "eval.periodic_samples=3", "eval.sample_batch_size=2",
         "cluster.preemption_check_every=0"]  # no Ray here: nobody to ask for a preemption notice


class Recorder:
    """Stands for rank 0's RunLogger: what the loop logs, by step."""

    def __init__(self):
        self.metrics, self.images = {}, []

    def log_metrics(self, metrics, step):
        self.metrics.setdefault(step, {}).update(metrics)

    def log_image(self, png, key, step):
        self.images.append((key, step, png))


class Crash(Exception):
    pass


def train_directly(tmp_path, monkeypatch, overrides, crash_at=None, resume=None):
    """The real loop (train_loop.train) in this process, world size 1; checkpoint reports kept in memory.
    crash_at: stop right after the checkpoint of that step. resume: a checkpoint to start from."""
    cfg = compose_experiment(TABLE2, [*SMALL, *overrides])
    plan = plan_run(cfg)
    checkpoints = {}

    def report(w, metrics, state, **extra):
        checkpoints[state.step] = tarflow.training.checkpoint_dict(state)
        w.reported = {**getattr(w, "reported", {}), state.step: metrics}
        if state.step == crash_at:
            raise Crash

    monkeypatch.setattr(loop, "checkpoint_and_report", report)
    w = loop.Worker(cfg, plan, 0, 1, torch.device("cpu"), RunStorage(str(tmp_path / "store")), logger=Recorder())
    train_set = load_dataset(dataclasses.replace(plan.data, flip=False), "train")  # as the worker loads it
    steps_per_epoch, total, warmup = schedule(cfg, len(train_set))
    state = loop.build_state(w, total, warmup)
    if resume is not None:
        tarflow.restore(state, resume)
    fid = FIDContext(cfg, plan, w.storage, 0, 1, w.device)
    periodic = start_periodic(cfg, plan, w.device, 0, 1, fid)
    try:
        loop.train(w, state, train_set, steps_per_epoch, total, periodic)
    except Crash:
        pass
    w.logger.worker = w
    return w.logger, state, checkpoints
