"""The per-worker training loop that Ray Train runs on every rank. All math is tarflow's train_step;
this file adds data sharding, resumption, checkpoint reports, metric logging and the final evaluation.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import OmegaConf
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

import ray.train
import ray.train.torch
import tarflow
from tarflow.data import load_dataset

from .config import plan_run, schedule, train_config
from .evaluation import heldout_bpd, inception_weights_file, reference_statistics, sample_fid, sample_grid_png
from .storage import RunStorage
from .tracking import RunLogger

CHECKPOINT_FILE = "state.pt"
RESUME_FAILED = "cannot resume from checkpoint"


def epoch_batches(dataset, epoch: int, skip_batches: int, per_worker_batch: int, rank: int, world: int,
                  seed: int, num_workers: int) -> DataLoader:
    """This rank's batches of one epoch, starting after the first skip_batches (resume mid-epoch)."""
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=True)
    sampler.set_epoch(epoch)
    indices = list(sampler)[skip_batches * per_worker_batch :]
    return DataLoader(dataset, batch_size=per_worker_batch, sampler=indices, drop_last=True,
                      num_workers=num_workers, persistent_workers=False)


def report(metrics: dict, state: tarflow.TrainState | None, rank: int, async_upload: bool, **extra) -> None:
    """Every rank reports; rank 0 attaches the checkpoint (model, optimizer, step, data position)."""
    if state is None or rank != 0:
        ray.train.report(metrics)
        return
    tmp = tempfile.mkdtemp(prefix="tarflow-ckpt-")
    tarflow.save_checkpoint(Path(tmp) / CHECKPOINT_FILE, state, **extra)
    mode = ray.train.CheckpointUploadMode.ASYNC if async_upload else ray.train.CheckpointUploadMode.SYNC
    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                     checkpoint_dir_name=f"checkpoint_{state.step:08d}", checkpoint_upload_mode=mode,
                     delete_local_checkpoint_after_upload=True)


def train_loop_per_worker(config: dict) -> None:
    cfg = OmegaConf.create(config["cfg"])
    plan = plan_run(cfg, source=config["source"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(cfg.train.seed * 1000 + rank)

    train_set = load_dataset(plan.data, "train")
    steps_per_epoch, total_steps, warmup_steps = schedule(cfg, len(train_set))
    tcfg = train_config(cfg, total_steps=total_steps, warmup_steps=warmup_steps, on_gpu=device.type == "cuda")
    model = tarflow.TarFlow(plan.model).to(device)
    state = tarflow.make_train_state(model, tcfg, wrap=lambda m: ray.train.torch.prepare_model(m, move_to_device=False)
                                     if world > 1 else m)

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            try:
                tarflow.restore(state, tarflow.load_checkpoint(Path(d) / CHECKPOINT_FILE, map_location=device))
            except tarflow.CheckpointError as e:  # name the stored checkpoint, not the temporary copy
                raise tarflow.CheckpointError(f"{RESUME_FAILED} {checkpoint.path}: {e}") from None
    state.extra["mlflow_run_id"] = config["mlflow_run_id"]
    nodes = [None] * world
    node = ray.get_runtime_context().get_node_id()
    if world > 1:
        dist.all_gather_object(nodes, node)
    else:
        nodes = [node]
    logger = RunLogger(config["tracking_uri"], config["mlflow_run_id"]) if rank == 0 else None
    if logger:
        logger.set_tags({"ray.world_size": world, "ray.num_nodes": len(set(nodes)),
                         "ray.worker_nodes": ",".join(n[:12] for n in nodes)})
        if checkpoint is None:
            logger.log_dict(OmegaConf.to_container(cfg, resolve=True), "config/resolved.json")
        else:
            logger.log_metrics({"resumed_from_step": state.step}, step=state.step)

    every_log, every_ckpt = cfg.train.log_every, cfg.train.checkpoint_every
    window = {"t": time.perf_counter(), "steps": 0, "loss": 0.0, "grad_norm": 0.0}
    while state.step < total_steps:
        epoch, offset = divmod(state.step, steps_per_epoch)
        for x, y in epoch_batches(train_set, epoch, offset, plan.per_worker_batch, rank, world, cfg.train.seed,
                                  cfg.data.num_workers):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            m = tarflow.train_step(state, x, y)
            state.extra["last_loss"] = m["loss"]
            window["steps"] += 1
            window["loss"] += m["loss"]
            window["grad_norm"] += m["grad_norm"]
            if state.step % every_log == 0 or state.step == total_steps:
                stats = torch.tensor([window["loss"], window["grad_norm"]], device=device) / window["steps"]
                if world > 1:
                    dist.all_reduce(stats)
                    stats /= world
                elapsed = time.perf_counter() - window["t"]
                if logger:
                    logger.log_metrics({"loss": stats[0].item(), "grad_norm": stats[1].item(), "lr": m["lr"],
                                        "epoch": state.step / steps_per_epoch,
                                        "images_per_sec": window["steps"] * cfg.train.batch_size / elapsed},
                                       step=state.step)
                window.update(t=time.perf_counter(), steps=0, loss=0.0, grad_norm=0.0)
            if state.step % every_ckpt == 0 or state.step == total_steps:
                report({"step": state.step, "loss": m["loss"]}, state, rank, cfg.storage.async_upload,
                       epoch=epoch)
            if state.step >= total_steps:
                break

    fid = FIDContext(cfg, plan, RunStorage(**config["storage"]), rank, world, device)
    final = evaluate(cfg, cfg.eval, plan, state, device, rank, world, logger, bpd=cfg.eval.bpd, fid=fid)
    if logger:
        logger.log_metrics(final, step=state.step)
        logger.log_dict({"step": state.step, **final}, "metrics/final.json")
    # sample-time settings of a sweep: evaluated on this final model, never retrained
    for setting in config.get("sample_settings") or []:
        setting_logger = RunLogger(config["tracking_uri"], setting["run_id"]) if rank == 0 else None
        metrics = evaluate(cfg, OmegaConf.create(setting["eval"]), plan, state, device, rank, world, setting_logger,
                           bpd=False, fid=fid, seed_offset=1 + config["sample_settings"].index(setting))
        if setting_logger and metrics:
            setting_logger.log_metrics(metrics, step=state.step)
    # the loss too, since a sweep's scheduler needs its metric in every report
    ray.train.report({"step": state.step, "loss": float(state.extra.get("last_loss", "nan")), **final})


class FIDContext:
    """The Inception network and the reference statistics, built on first use and shared by every
    evaluation of the run (the base one and each sample-time setting of a sweep)."""

    def __init__(self, cfg, plan, storage, rank, world, device):
        self.cfg, self.plan, self.storage = cfg, plan, storage
        self.rank, self.world, self.device = rank, world, device
        self._extractor = self._reference = None

    def parts(self):
        if self._extractor is None:
            from tarflow.fid import InceptionFeatures

            weights = inception_weights_file(self.cfg.eval.fid.inception_weights, self.storage)
            self._extractor = InceptionFeatures(weights, device=self.device)
            self._reference = reference_statistics(self.plan.data, self.cfg.eval.fid, self.storage, self._extractor,
                                                   self.rank, self.world, self.device)
        return self._extractor, self._reference


def evaluate(cfg, eval_cfg, plan, state: tarflow.TrainState, device, rank: int, world: int,
             logger: RunLogger | None, bpd: bool, fid: FIDContext, seed_offset: int = 0) -> dict:
    """Held-out BPD and FID on all ranks; the sample grid on rank 0, logged as an artifact."""
    model = state.ema if state.ema is not None else state.model
    out = {}
    if eval_cfg.fid.enabled:
        extractor, reference = fid.parts()
        noise_std = cfg.train.noise_std if cfg.train.noise == "gaussian" else None
        out["fid"] = sample_fid(model, eval_cfg, noise_std, reference, extractor, rank, world, device,
                                seed=cfg.train.seed + seed_offset)
    if bpd:
        val = load_dataset(plan.data, "val")
        if cfg.data.val_limit:
            val = torch.utils.data.Subset(val, range(min(cfg.data.val_limit, len(val))))
        out["bpd"] = heldout_bpd(model, val, plan.per_worker_batch, device, rank, world, seed=cfg.train.seed)
    if logger and eval_cfg.num_samples > 0:
        e = eval_cfg
        with tempfile.TemporaryDirectory() as tmp:
            path = sample_grid_png(model, Path(tmp) / "samples.png", e.num_samples, e.sample_batch_size, device,
                                   plan.model.num_classes, e.guidance, e.annealed_guidance, e.attn_temp,
                                   cfg.train.noise_std if e.denoise and cfg.train.noise == "gaussian" else None,
                                   e.denoise_step, seed=cfg.train.seed)
            logger.log_artifact(path, "samples")
    return out
