"""The per-worker training loop that Ray Train runs on every rank: resume -> train -> evaluate.

All math is tarflow's train_step; this file adds data sharding, resumption, checkpoint reports and metric
logging. Evaluation is evaluation.py. Rank 0 logs through a queue that never blocks training (delivery.py);
what it has not delivered travels inside every checkpoint.
"""

from __future__ import annotations

import json
import socket
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

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

    @property
    def run(self) -> RunDir:
        return RunDir(self.storage, self.plan.run_name)
    board: object = None             # the driver's RunBoard actor (progress lines), if any
    logger: RunLogger | None = None  # rank 0 only
    nodes: list = field(default_factory=list)  # the Ray node id of every rank
    last_logged: dict = field(default_factory=dict)


def epoch_batches(dataset, epoch: int, skip_batches: int, per_worker_batch: int, rank: int, world: int,
                  seed: int, num_workers: int) -> DataLoader:
    """This rank's batches of one epoch, starting after the first skip_batches (resume mid-epoch).

    Global step s of an epoch takes images perm[s·B : (s+1)·B] of one seeded permutation (B the global
    batch), split across ranks; so the data of a step does not depend on the number of workers."""
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=True)
    sampler.set_epoch(epoch)
    indices = list(sampler)[skip_batches * per_worker_batch :]
    return DataLoader(dataset, batch_size=per_worker_batch, sampler=indices, drop_last=True,
                      num_workers=num_workers, persistent_workers=False)


def checkpoint_and_report(w: Worker, metrics: dict, state: tarflow.TrainState, **extra) -> None:
    """Every rank reports; rank 0 attaches the checkpoint (model, optimizer, step, data position, and the
    tracking records not yet delivered)."""
    if w.rank != 0:
        ray.train.report(metrics)
        return
    tmp = Path(tempfile.mkdtemp(prefix="tarflow-ckpt-"))
    tarflow.save_checkpoint(tmp / CHECKPOINT_FILE, state, **extra)
    if w.logger:
        write_records(tmp, w.logger.queue.pending())
    mode = ray.train.CheckpointUploadMode.ASYNC if w.cfg.storage.async_upload else ray.train.CheckpointUploadMode.SYNC
    name = checkpoint_dir_name(state.step)
    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(tmp)), checkpoint_dir_name=name,
                     checkpoint_upload_mode=mode, delete_local_checkpoint_after_upload=True)
    if mode == ray.train.CheckpointUploadMode.SYNC and w.board is not None:
        # uploaded when report returns: the driver knows it is safe even if Ray's record of it is lost with the
        # storage (asynchronous uploads are told to the driver by Ray Train's controller, progress.py)
        w.board.persisted.remote(name)


def start_worker(config: dict) -> Worker:
    rank, world, device, storage = this_worker(config)
    cfg = OmegaConf.create(config["cfg"])
    torch.manual_seed(cfg.train.seed * 1000 + rank)
    plan = plan_run(cfg, source=config["source"])
    plan.data = on_this_node(plan.data, cfg.storage.endpoint_url, cfg.data.cache_dir)  # S3 data: fetched once
    return Worker(cfg, plan, rank, world, device, storage, config.get("board"))


def build_state(w: Worker, total_steps: int, warmup_steps: int) -> tarflow.TrainState:
    # an evaluate-only run (train.steps=0) still builds its optimizer: TrainConfig wants a schedule
    tcfg = train_config(w.cfg, total_steps=max(1, total_steps), warmup_steps=min(warmup_steps, max(1, total_steps)),
                        on_gpu=w.device.type == "cuda")
    model = tarflow.TarFlow(w.plan.model).to(w.device)
    wrap = (lambda m: ray.train.torch.prepare_model(m, move_to_device=False)) if w.world > 1 else None
    return tarflow.make_train_state(model, tcfg, wrap=wrap)


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
            state.ema.load_state_dict(weights.ema if weights.ema is not None else weights.model)
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


def train(w: Worker, state: tarflow.TrainState, train_set, steps_per_epoch: int, total_steps: int,
          periodic: PeriodicEvaluation | None = None) -> bool:
    """Steps until total_steps: metrics every train.log_every, a periodic evaluation every eval.every_steps (if
    on), a checkpoint every train.checkpoint_every (after the evaluation of its step, so a resume from it does
    not evaluate that step again). Each of them only while the run's lease is this launch's: False when it
    stopped because another launch took the run over."""
    cfg = w.cfg
    every_log, every_ckpt = cfg.train.log_every, cfg.train.checkpoint_every
    started, start_step = time.perf_counter(), state.step
    if total_steps == 0 and state.step == 0:  # evaluate only: the given weights become the run's checkpoint
        checkpoint_and_report(w, {"step": 0, "loss": float("nan")}, state, epoch=0)
    window = {"t": time.perf_counter(), "steps": 0, "loss": 0.0, "grad_norm": 0.0}
    while state.step < total_steps:
        epoch, offset = divmod(state.step, steps_per_epoch)
        for x, y in epoch_batches(train_set, epoch, offset, w.plan.per_worker_batch, w.rank, w.world,
                                  cfg.train.seed, cfg.data.num_workers):
            x, y = x.to(w.device, non_blocking=True), y.to(w.device, non_blocking=True)
            m = tarflow.train_step(state, x, y)
            state.extra["last_loss"] = m["loss"]
            window["steps"] += 1
            window["loss"] += m["loss"]
            window["grad_norm"] += m["grad_norm"]
            at_log = state.step % every_log == 0 or state.step == total_steps
            at_checkpoint = state.step % every_ckpt == 0 or state.step == total_steps
            evaluating = periodic is not None and periodic.due(state.step)
            if (at_log or at_checkpoint or evaluating) and not lease_kept(w, state.step):
                return False
            if at_log:
                stats = torch.tensor([window["loss"], window["grad_norm"]], device=w.device) / window["steps"]
                if w.world > 1:
                    dist.all_reduce(stats)
                    stats /= w.world
                elapsed = time.perf_counter() - window["t"]
                w.last_logged = {"loss": stats[0].item(), "grad_norm": stats[1].item(), "lr": m["lr"],
                                 "epoch": state.step / steps_per_epoch,
                                 "images_per_sec": window["steps"] * cfg.train.batch_size / elapsed}
                if w.logger:
                    w.logger.log_metrics(w.last_logged, step=state.step)
                if w.rank == 0 and w.board is not None:
                    w.board.progress.remote({**w.last_logged, "step": state.step, "total": total_steps,
                                             "start_step": start_step, "elapsed": time.perf_counter() - started})
                window.update(t=time.perf_counter(), steps=0, loss=0.0, grad_norm=0.0)
            if evaluating:
                seconds = periodic(state.ema if state.ema is not None else state.model, state.step, w.logger,
                                   w.board if w.rank == 0 else None)
                window["t"] += seconds  # images/s stays the training throughput
            if at_checkpoint:
                checkpoint_and_report(w, {"step": state.step, "loss": m["loss"]}, state, epoch=epoch)
            if state.step >= total_steps:
                break
    return True


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


def stop_writing(monitor) -> None:
    """The end of workers whose run another launch took over: their driver says why (lifecycle.py)."""
    if monitor is not None:
        monitor.finish()


def train_loop_per_worker(config: dict) -> None:
    """config: {"cfg", "source", "tracking_uri", "mlflow_run_id", "storage", "resolved_config", "resume_from",
    "init_from" (a WeightsSource as a dict), "board", "evaluations": sample-time settings evaluated on the
    final model in runs of their own}."""
    w = start_worker(config)
    train_set = load_dataset(w.plan.data, "train")
    steps_per_epoch, total_steps, warmup_steps = schedule(w.cfg, len(train_set))
    state = build_state(w, total_steps, warmup_steps)
    resumed, backlog = resume(w, state, config.get("resume_from"), config.get("init_from"))
    state.extra["mlflow_run_id"] = config["mlflow_run_id"]
    start_logging(w, config, state, resumed, backlog)
    monitor = None
    if w.nodes.index(w.nodes[w.rank]) == w.rank:  # one per Ray node: its first rank
        monitor = start_system_metrics(w.cfg.tracking.system_metrics_interval, config["tracking_uri"],
                                       config["mlflow_run_id"], w.nodes[w.rank])

    fid = FIDContext(w.cfg, w.plan, w.storage, w.rank, w.world, w.device)  # built on first use
    periodic = start_periodic(w.cfg, w.plan, w.device, w.rank, w.world, fid)
    if not train(w, state, train_set, steps_per_epoch, total_steps, periodic):
        return stop_writing(monitor)

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
        return stop_writing(monitor)
    pending = finish_tracking(w, final, evaluated, state.step)
    if monitor is not None:
        monitor.finish()
    # the loss too, since a sweep's scheduler needs its metric in every report
    ray.train.report({"step": state.step, "loss": float(state.extra.get("last_loss", "nan")), **final,
                      "tracking_pending": pending})
