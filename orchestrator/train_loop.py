"""The per-worker training loop that Ray Train runs on every rank: resume -> train -> evaluate.

All math is tarflow's train_step; this file adds data sharding, resumption, checkpoint reports and metric
logging. Evaluation is evaluation.py. Rank 0 logs through a queue that never blocks training (delivery.py);
what it has not delivered travels inside every checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import socket
import tempfile
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader

import tarflow
from tarflow.data import load_dataset

from .datacache import on_this_node
from .delivery import DRAIN_S, RunLogger, say
from .errors import RESUME_FAILED
from .evaluation import FIDContext, evaluate_model, evaluate_settings
from .monitoring import node_name, start_system_metrics
from .periodic import PeriodicEvaluation, start_periodic
from .plan import RunPlan, plan_run, schedule, train_config
from .progress import lease_lost
from .records import ATTEMPTS_TAG
from .rundir import CHECKPOINT_FILE, RunDir, checkpoint_dir_name, checkpoint_step, read_records, write_records
from .storage import RunStorage
from .trainer import this_worker
from .weights import WeightsSource, load_weights


@dataclass
class Worker:
    """Where this rank is and what it runs."""

    cfg: DictConfig
    plan: RunPlan
    rank: int
    world: int
    device: torch.device
    storage: RunStorage
    board: object = None             # the driver's RunBoard actor (progress lines, the lease, attempts), if any
    logger: RunLogger | None = None  # rank 0 only
    nodes: list = field(default_factory=list)  # the Ray node id of every rank
    last_logged: dict = field(default_factory=dict)
    checkpoint_seconds: float = 0.0  # rank 0: how long the last checkpoint took to write (and upload, when sync)
    reported_loss: float = float("nan")  # the mean loss of the last checkpoint's window, all ranks

    @property
    def run(self) -> RunDir:
        return RunDir(self.storage, self.plan.run_name)

    @cached_property
    def positions(self) -> torch.Tensor:
        """This rank's positions in every step's global batch (the same at every step)."""
        return rank_share(self.cfg.train.batch_size, self.rank, self.world)

    @property
    def share(self) -> int:
        return len(self.positions)


def rank_share(global_batch: int, rank: int, world: int) -> torch.Tensor:
    """This rank's positions in every step's global batch: rank, rank + world, ... (any world size; when it does
    not divide the batch the first ranks hold one more)."""
    return torch.arange(rank, global_batch, world)


def epoch_batches(dataset, epoch: int, skip_batches: int, global_batch: int, rank: int, world: int,
                  seed: int, num_workers: int) -> DataLoader:
    """This rank's batches of one epoch, starting after the first skip_batches (resume mid-epoch).

    Global step s of an epoch takes images perm[s·B : (s+1)·B] of one permutation seeded by (seed, epoch), B
    the global batch, and this rank its positions rank_share(B) of them: the images of a step, and the
    position of each in it (which keys its randomness), do not depend on the number of workers."""
    perm = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed + epoch)).tolist()
    mine = rank_share(global_batch, rank, world).tolist()
    steps = range(skip_batches, len(dataset) // global_batch)
    batches = [[perm[s * global_batch + p] for p in mine] for s in steps]
    return DataLoader(dataset, batch_sampler=batches, num_workers=num_workers, persistent_workers=False)


def checkpoint_and_report(w: Worker, metrics: dict, state: tarflow.TrainState, sync: bool = False, **extra) -> None:
    """Every rank reports (with the world size, which Ray Train's record of the checkpoints keeps); rank 0
    attaches the checkpoint (model, optimizer, step, data position, and the tracking records not yet delivered).
    sync: uploaded before this returns, whatever storage.async_upload says."""
    metrics = {**metrics, "world_size": w.world}
    if w.rank != 0:
        ray.train.report(metrics)
        return
    started = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="tarflow-ckpt-"))
    tarflow.save_checkpoint(tmp / CHECKPOINT_FILE, state, **extra)
    if w.logger:
        write_records(tmp, w.logger.queue.pending())
    asynchronous = w.cfg.storage.async_upload and not sync
    mode = ray.train.CheckpointUploadMode.ASYNC if asynchronous else ray.train.CheckpointUploadMode.SYNC
    name = checkpoint_dir_name(state.step)
    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(tmp)), checkpoint_dir_name=name,
                     checkpoint_upload_mode=mode, delete_local_checkpoint_after_upload=True)
    if mode == ray.train.CheckpointUploadMode.SYNC and w.board is not None:
        # uploaded when report returns: the driver knows it is safe even if Ray's record of it is lost with the
        # storage (asynchronous uploads are told to the driver by Ray Train's controller, progress.py)
        w.board.persisted.remote(name)
    w.checkpoint_seconds = time.perf_counter() - started


def heed_preemption(w: Worker, state: tarflow.TrainState, epoch: int, since_report: Window) -> bool | None:
    """On every rank at the same steps (Ray's notice is a barrier): when a node of the run is to be preempted,
    checkpoint now, uploaded before the deadline, and train on; at the deadline Ray Train restarts the group from
    it, against cluster.max_preemption_failures. Returns whether a notice came; None when the run's lease turned
    out lost (no checkpoint written)."""
    notice = ray.train.get_preemption_info()
    if notice is None:
        return False
    if not lease_kept(w, state.step):
        return None
    left = notice.deadline_ms / 1000 - time.time() if notice.deadline_ms else float("inf")
    if w.rank == 0:
        late = left < w.checkpoint_seconds
        say(f"[train] preemption notice: a node of this run goes in {left:.0f} s; checkpointing step {state.step} "
            f"now (the last checkpoint took {w.checkpoint_seconds:.1f} s)"
            + (": it may not be stored before the deadline, and the run then resumes from the checkpoint before, "
               "redoing the steps since" if late else ""))
        if w.logger:
            w.logger.log_metrics({"preemption_notice_s": left}, step=state.step)
    checkpoint_and_report(w, {"step": state.step, "loss": since_report.mean(w)[0]}, state, sync=True, epoch=epoch)
    return True


def start_worker(config: dict) -> Worker:
    rank, world, device, storage = this_worker(config)
    cfg = OmegaConf.create(config["cfg"])
    plan = plan_run(cfg, source=config["source"])
    plan.data = on_this_node(plan.data, cfg.storage.endpoint_url, cfg.data.cache_dir)  # S3 data: fetched once
    return Worker(cfg, plan, rank, world, device, storage, config.get("board"))


def build_state(w: Worker, total_steps: int, warmup_steps: int) -> tarflow.TrainState:
    # an evaluate-only run (train.steps=0) still builds its optimizer: TrainConfig wants a schedule
    tcfg = train_config(w.cfg, total_steps=max(1, total_steps), warmup_steps=min(warmup_steps, max(1, total_steps)),
                        on_gpu=w.device.type == "cuda")
    model = tarflow.initial_model(w.plan.model, w.cfg.train.seed).to(w.device)  # the seed alone: any rank, restart
    if w.world == 1:
        return tarflow.make_train_state(model, tcfg)
    return tarflow.make_train_state(model, tcfg, wrap=lambda m: ray.train.torch.prepare_model(m, move_to_device=False),
                                    all_reduce_mean=lambda t: global_mean(t, w))


def global_mean(t: torch.Tensor, w: Worker) -> torch.Tensor:
    """The global batch's mean of a per-rank mean (ranks weighted by their share of the batch)."""
    t = t * (w.share / w.cfg.train.batch_size)
    dist.all_reduce(t)
    return t


def resume(w: Worker, state: tarflow.TrainState, chosen: str | None, init: dict | None) -> tuple[bool, list]:
    """Which checkpoint, then the state restored from it; returns (resumed?, its undelivered tracking records).

    `chosen` is the checkpoint the driver picked and verified before the fit started (RunDir.checkpoint_to_resume:
    the latest complete one, the corrupt or incomplete ones set aside with Ray Train's record of them). Ray Train
    hands the worker a newer one when it restarted the worker group from a checkpoint of this fit. With neither,
    a new run starts from model.init_from's weights (weights.py), or else from its random initialisation."""
    ours = ray.train.get_checkpoint()
    if ours is not None and checkpoint_step(ours.path) > checkpoint_step(chosen):
        with ours.as_directory() as d:
            return True, load_into(state, Path(d), ours.path, w.device)
    if chosen is not None:
        with tempfile.TemporaryDirectory() as d:
            w.run.download_checkpoint(chosen, Path(d))
            return True, load_into(state, Path(d), w.run.describe(chosen), w.device)
    if init is not None:
        weights = load_weights(WeightsSource(**init), state.model.config)
        state.model.load_state_dict(weights.model)
        if state.ema is not None:
            state.ema.load_state_dict(weights.best())
    return False, []


def load_into(state: tarflow.TrainState, local: Path, stored: str, device: torch.device) -> list:
    try:
        tarflow.restore(state, tarflow.load_checkpoint(local / CHECKPOINT_FILE, map_location=device))
    except tarflow.CheckpointCorrupt as e:
        # the driver checked the stored copy before launch: bytes that differ here were cut short on the way
        raise OSError(f"checkpoint {stored} did not arrive intact ({e}); retrying as an I/O error") from None
    except tarflow.CheckpointError as e:  # name the stored checkpoint, not the temporary copy
        raise tarflow.CheckpointError(f"{RESUME_FAILED} {stored}: {e}") from None
    return read_records(local)


def retarget(records: list[dict], old_run_id: str | None, run_id: str) -> list[dict]:
    """A checkpoint's undelivered records for the MLflow run it was written under: when the run resumes into
    another MLflow run (the old one deleted, or superseded), they go to the live one."""
    if not old_run_id or old_run_id == run_id:
        return records
    return [{**r, "run_id": run_id} if r["run_id"] == old_run_id else r for r in records]


def start_logging(w: Worker, config: dict, state: tarflow.TrainState, resumed: bool, backlog: list) -> None:
    """Rank 0 logs; every rank says which node it is on."""
    mine = (ray.get_runtime_context().get_node_id(), socket.gethostname())
    hosts = [mine]
    if w.world > 1:
        hosts = [None] * w.world
        dist.all_gather_object(hosts, mine)
    nodes = w.nodes = [n for n, _ in hosts]
    if w.rank != 0:
        return
    w.logger = RunLogger(config["tracking_uri"], config["mlflow_run_id"])
    w.logger.queue.requeue(backlog)
    w.logger.set_tags({"ray.world_size": w.world, "ray.num_nodes": len(set(nodes)),
                       "ray.worker_nodes": ",".join(n[:12] for n in nodes),
                       **{f"ray.node.{node_name(n)}": host for n, host in hosts}})
    w.logger.log_metrics({"world_size": w.world}, step=state.step)
    if resumed:
        w.logger.log_metrics({"resumed_from_step": state.step}, step=state.step)
    else:
        w.logger.log_dict(config["resolved_config"], "config/resolved.json")
    if w.board is not None:  # which attempt the curves show: a restart redoes the steps after its checkpoint
        attempts = ray.get(w.board.attempt.remote(state.step, w.world))
        w.logger.set_tags({ATTEMPTS_TAG: json.dumps(attempts[-100:])})


def lease_kept(w: Worker, step: int) -> bool:
    """Every rank, at the same step: whether this launch still holds the run's lease (rank 0 asks the driver's
    board, progress.lease_lost, and may wait there). Once another launch took the run over, nothing more is
    written: not a checkpoint (the run's directory is that launch's now), not a metric."""
    lost = 0.0
    if w.rank == 0 and w.board is not None:
        holder = lease_lost(w.board)
        if holder is not None:
            say(f"[run] another launch took this run over ({holder}): stopping at step {step} without writing "
                "to the run's storage or MLflow run")
            lost = 1.0
    if w.world > 1:
        flag = torch.tensor([lost], device=w.device)
        dist.all_reduce(flag)
        lost = flag.item()
    return lost == 0


@dataclass
class Window:
    """Sums of a training metric over the steps since the window opened, averaged over all ranks on reading."""

    steps: int = 0
    loss: float = 0.0
    grad_norm: float = 0.0
    opened: float = field(default_factory=time.perf_counter)

    def add(self, m: dict) -> None:
        self.steps, self.loss, self.grad_norm = self.steps + 1, self.loss + m["loss"], self.grad_norm + m["grad_norm"]

    def mean(self, w: Worker) -> tuple[float, float]:
        """(loss, grad norm) averaged over the window's steps and the global batch (ranks weighted by their share)."""
        stats = torch.tensor([self.loss, self.grad_norm], device=w.device, dtype=torch.float64) / self.steps
        if w.world > 1:
            stats = global_mean(stats, w)
        return stats[0].item(), stats[1].item()


def train(w: Worker, state: tarflow.TrainState, train_set, steps_per_epoch: int, total_steps: int,
          periodic: PeriodicEvaluation | None = None) -> bool:
    """Steps until total_steps: metrics every train.log_every, a periodic evaluation every eval.every_steps (if
    on), a checkpoint every train.checkpoint_every (after the evaluation of its step, so a resume from it does
    not evaluate that step again), reporting the mean loss since the last checkpoint (what a sweep compares).
    Each of them only while the run's lease is this launch's: False when it stopped because another launch took
    the run over."""
    cfg = w.cfg
    every_log, every_ckpt = cfg.train.log_every, cfg.train.checkpoint_every
    started, start_step = time.perf_counter(), state.step
    if total_steps == 0 and state.step == 0:  # evaluate only: the given weights become the run's checkpoint
        checkpoint_and_report(w, {"step": 0, "loss": float("nan")}, state, epoch=0)
    window, since_report, noticed = Window(), Window(), False
    every_notice = cfg.cluster.preemption_check_every
    while state.step < total_steps:
        epoch, offset = divmod(state.step, steps_per_epoch)
        for x, y in epoch_batches(train_set, epoch, offset, cfg.train.batch_size, w.rank, w.world,
                                  cfg.train.seed, cfg.data.num_workers):
            x, y = x.to(w.device, non_blocking=True), y.to(w.device, non_blocking=True)
            m = tarflow.train_step(state, x, y, positions=w.positions,
                                   loss_weight=w.share * w.world / cfg.train.batch_size)
            window.add(m)
            since_report.add(m)
            at_log = state.step % every_log == 0 or state.step == total_steps
            at_checkpoint = state.step % every_ckpt == 0 or state.step == total_steps
            evaluating = periodic is not None and periodic.due(state.step)
            if (at_log or at_checkpoint or evaluating) and not lease_kept(w, state.step):
                return False
            if at_log:
                log_progress(w, window, m, state.step, steps_per_epoch, total_steps, start_step, started)
                window = Window()
            if evaluating:
                seconds = periodic(state.ema if state.ema is not None else state.model, state.step, w.logger,
                                   w.board if w.rank == 0 else None)
                window.opened += seconds  # images/s stays the training throughput
            if at_checkpoint:
                w.reported_loss = since_report.mean(w)[0]
                checkpoint_and_report(w, {"step": state.step, "loss": w.reported_loss}, state, epoch=epoch)
                since_report = Window()
            elif every_notice and state.step % every_notice == 0 and not noticed:
                noticed = heed_preemption(w, state, epoch, since_report)
                if noticed is None:  # taken over by another launch meanwhile: nothing more is written
                    return False
            if state.step >= total_steps:
                break
    return True


def log_progress(w: Worker, window: Window, m: dict, step: int, steps_per_epoch: int, total_steps: int,
                 start_step: int, started: float) -> None:
    """The window's metrics to MLflow (rank 0) and a progress line to the driver."""
    loss, grad_norm = window.mean(w)
    w.last_logged = {"loss": loss, "grad_norm": grad_norm, "lr": m["lr"], "epoch": step / steps_per_epoch,
                     "images_per_sec": window.steps * w.cfg.train.batch_size / (time.perf_counter() - window.opened)}
    if w.logger:
        w.logger.log_metrics(w.last_logged, step=step)
    if w.rank == 0 and w.board is not None:
        w.board.progress.remote({**w.last_logged, "step": step, "total": total_steps, "start_step": start_step,
                                 "elapsed": time.perf_counter() - started})


def finish_tracking(w: Worker, final: dict, evaluations: dict, step: int, timeout: float = DRAIN_S) -> int:
    """Rank 0: the final metrics into storage (the record of truth), then up to `timeout` s for MLflow to
    take the rest; what it did not take is kept in storage for the driver to replay. Returns that count."""
    if w.rank != 0:
        return 0
    if w.board is not None and w.logger:
        w.logger.set_tags({ATTEMPTS_TAG: json.dumps(ray.get(w.board.attempt_ended.remote(step))[-100:])})
    w.run.write_final({"step": step, "metrics": {**w.last_logged, **final}, "evaluations": evaluations})
    pending = w.logger.queue.close(timeout) if w.logger else []
    w.run.backlog.merge(pending)
    return len(pending)


def stop_monitor(monitor) -> None:
    if monitor is not None:
        monitor.finish()


def train_loop_per_worker(config: dict) -> None:
    """config: {"cfg", "source", "tracking_uri", "mlflow_run_id", "storage", "resolved_config", "resume_from",
    "init_from" (a WeightsSource as a dict), "board", "evaluations": sample-time settings evaluated on the
    final model in runs of their own}."""
    w = start_worker(config)
    train_set = load_dataset(dataclasses.replace(w.plan.data, flip=False), "train")  # flips: keyed, in train_step
    steps_per_epoch, total_steps, warmup_steps = schedule(w.cfg, len(train_set))
    state = build_state(w, total_steps, warmup_steps)
    resumed, backlog = resume(w, state, config.get("resume_from"), config.get("init_from"))
    backlog = retarget(backlog, state.extra.get("mlflow_run_id"), config["mlflow_run_id"])
    state.extra["mlflow_run_id"] = config["mlflow_run_id"]
    start_logging(w, config, state, resumed, backlog)
    monitor = None
    if w.nodes.index(w.nodes[w.rank]) == w.rank:  # one per Ray node: its first rank
        monitor = start_system_metrics(w.cfg.tracking.system_metrics_interval, config["tracking_uri"],
                                       config["mlflow_run_id"], w.nodes[w.rank])

    fid = FIDContext(w.cfg, w.plan, w.storage, w.rank, w.world, w.device)  # built on first use
    periodic = start_periodic(w.cfg, w.plan, w.device, w.rank, w.world, fid)
    if not train(w, state, train_set, steps_per_epoch, total_steps, periodic):
        return stop_monitor(monitor)  # another launch took the run over: its driver says why (lifecycle.py)

    model = state.ema if state.ema is not None else state.model
    settings = config.get("evaluations") or []
    # with sample-time settings the run itself keeps the one thing they share, held-out BPD
    final = evaluate_model(model, w.cfg, w.cfg.eval, w.plan, w.device, w.rank, w.world, w.logger, fid,
                           bpd=w.cfg.eval.bpd, samples=not settings)
    if w.logger:
        w.logger.log_metrics(final, step=state.step)
        w.logger.log_dict({"step": state.step, **final}, "metrics/final.json")
    evaluated = evaluate_settings(model, w.cfg, w.plan, settings, state.step, w.device, w.rank, w.world,
                                  config["tracking_uri"], fid)
    if not lease_kept(w, state.step):
        return stop_monitor(monitor)
    pending = finish_tracking(w, final, evaluated, state.step)
    stop_monitor(monitor)
    # the loss too, since a sweep's scheduler needs its metric in every report
    ray.train.report({"step": state.step, "loss": w.reported_loss, **final,
                      "tracking_pending": pending})
