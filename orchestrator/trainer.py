"""Ray: joining or starting a cluster, and the one way a job (training, re-evaluation, sampling) becomes a
TorchTrainer on the workers."""

from __future__ import annotations

import dataclasses
import os
import socket

import ray
import ray.train
import ray.train.torch
import torch
from ray.train.torch import TorchConfig, TorchTrainer

from .config import min_workers
from .errors import ExperimentError
from .progress import quiet_ray_train_logs
from .storage import RunStorage

VERBOSE = False  # Ray Train's own INFO lines (worker group, every report, every checkpoint); errors always show


def set_verbose(verbose: bool) -> None:
    global VERBOSE
    VERBOSE = bool(verbose)


def ray_address(cfg) -> str:
    return cfg.cluster.address or os.environ.get("RAY_ADDRESS") or "local"


def init_ray(cfg, min_cpus: int = 0) -> None:
    """Join the configured cluster, or start a local instance with at least min_cpus logical CPUs."""
    if ray.is_initialized():
        return
    address = ray_address(cfg)
    kwargs = dict(address=address, log_to_driver=True)
    if address == "local":
        needed = max(min_cpus, int(cfg.cluster.num_workers * cfg.cluster.cpus_per_worker + 0.999))
        # logical CPUs may exceed the physical ones: small CPU runs still get all their workers
        kwargs.update(num_cpus=cfg.cluster.num_cpus or max(os.cpu_count() or 1, needed))
        pin_local_address()
    try:
        ray.init(**kwargs)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise ExperimentError(f"cannot reach the Ray cluster at {address}: {' '.join(str(e).split())[:300]}") from None


def pin_local_address() -> None:
    """Give the local instance a known GCS port and export its address before it starts.

    Ray's own helpers inside workers (Train's placement-group cleaner uses the state API) look for "the"
    cluster on this machine; with another Ray running they find two and fail, and stopped sweep trials
    then leak their resources. Workers inherit RAY_ADDRESS from the processes started here.
    """
    from ray._private.services import get_node_ip_address

    with socket.socket() as s:
        s.bind(("", 0))
        port = s.getsockname()[1]
    os.environ["RAY_GCS_SERVER_PORT"] = str(port)
    os.environ["RAY_ADDRESS"] = f"{get_node_ip_address()}:{port}"


def scaling_config(cfg) -> ray.train.ScalingConfig:
    """cfg's workers; a (min, max) range makes Ray Train V2 elastic: on with the workers that remain when a node is
    lost, grown back (a restart from the last checkpoint) when it finds capacity every resize_interval_s."""
    c = cfg.cluster
    resources = {"CPU": c.cpus_per_worker}
    if c.use_gpu:
        resources["GPU"] = c.gpus_per_worker
    low = min_workers(cfg)
    return ray.train.ScalingConfig(num_workers=c.num_workers if low == c.num_workers else (low, c.num_workers),
                                   use_gpu=c.use_gpu, resources_per_worker=resources,
                                   elastic_resize_monitor_interval_s=c.resize_interval_s)


def torch_trainer(loop, loop_config: dict, cfg, storage: RunStorage, name: str, max_failures: int = 0,
                  callbacks=()) -> TorchTrainer:
    """A TorchTrainer running `loop` on cfg's workers, its Ray Train state in `storage`/`name` (the same name
    again resumes it). loop_config gets the storage and Ray Train's verbosity added."""
    if cfg.cluster.worker_group_start_timeout_s:  # Train's controller reads it when it starts, in fit()
        os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = str(cfg.cluster.worker_group_start_timeout_s)
    return TorchTrainer(
        loop,
        train_loop_config={**loop_config, "verbose": VERBOSE, "storage": dataclasses.asdict(storage)},
        torch_config=TorchConfig(backend="nccl" if cfg.cluster.use_gpu else "gloo"),
        scaling_config=scaling_config(cfg),
        run_config=run_config(cfg, storage, name, max_failures, callbacks),
    )


def fit(trainer: TorchTrainer):
    """Run a trainer to its end; its error (Ray returns it in the result) is raised here."""
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    return result


def this_worker(config: dict) -> tuple[int, int, torch.device, RunStorage]:
    """Inside a Ray Train worker: (rank, world size, device, the job's storage), Ray Train's INFO lines off."""
    if not config.get("verbose"):
        quiet_ray_train_logs()
    ctx = ray.train.get_context()
    return ctx.get_world_rank(), ctx.get_world_size(), ray.train.torch.get_device(), RunStorage(**config["storage"])


def run_config(cfg, storage: RunStorage, name: str, max_failures: int, callbacks) -> ray.train.RunConfig:
    fs, root = storage.filesystem_and_root()
    return ray.train.RunConfig(
        name=name,
        storage_path=root,
        storage_filesystem=fs,
        checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.storage.keep_checkpoints),
        failure_config=ray.train.FailureConfig(max_failures=max_failures,
                                               max_preemption_failures=cfg.cluster.max_preemption_failures),
        callbacks=list(callbacks),
        # the driver prints one progress line per log interval (progress.py) instead
        logging_config=ray.train.LoggingConfig(log_level="INFO" if VERBOSE else "WARNING"),
    )
