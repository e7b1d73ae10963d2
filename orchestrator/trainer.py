"""Ray: joining or starting a cluster, and the TorchTrainers that run a training run or evaluate finished
runs on the workers."""

from __future__ import annotations

import os
import socket

import ray
import ray.train
from omegaconf import OmegaConf
from ray.train.torch import TorchConfig, TorchTrainer

from .config import redacted
from .errors import ExperimentError
from .evaluation import evaluate_checkpoints_per_worker, sample_per_worker
from .plan import RunPlan
from .storage import RunStorage
from .train_loop import train_loop_per_worker

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
    c = cfg.cluster
    resources = {"CPU": c.cpus_per_worker}
    if c.use_gpu:
        resources["GPU"] = c.gpus_per_worker
    return ray.train.ScalingConfig(num_workers=c.num_workers, use_gpu=c.use_gpu, resources_per_worker=resources)


def build_trainer(plan: RunPlan, storage: RunStorage, tracking_uri: str, mlflow_run_id: str,
                  evaluations: list | tuple = (), callbacks: list | tuple = (), resume_from: str | None = None,
                  board=None, init_from: dict | None = None) -> TorchTrainer:
    """evaluations: sample-time settings evaluated on the final model ({"eval": ..., "run_id": ...});
    resume_from: the checkpoint the driver verified (used when Ray Train has no record of one); board: the
    driver's progress actor."""
    cfg = plan.cfg
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": OmegaConf.to_container(cfg, resolve=True), "source": plan.source,
                           "tracking_uri": tracking_uri, "mlflow_run_id": mlflow_run_id,
                           "storage": {"uri": storage.uri, "endpoint_url": storage.endpoint_url},
                           "resolved_config": redacted(cfg), "resume_from": resume_from, "board": board,
                           "init_from": init_from,
                           "evaluations": list(evaluations), "verbose": VERBOSE},
        torch_config=TorchConfig(backend="nccl" if cfg.cluster.use_gpu else "gloo"),
        scaling_config=scaling_config(cfg),
        run_config=run_config(cfg, storage, plan.run_name, cfg.cluster.max_failures, callbacks),
    )


def build_evaluator(cfg, storage: RunStorage, tracking_uri: str, jobs: list[dict], name: str) -> TorchTrainer:
    """Evaluate finished runs from their final checkpoints on cfg's workers; nothing is trained."""
    return TorchTrainer(
        evaluate_checkpoints_per_worker,
        train_loop_config={"jobs": jobs, "tracking_uri": tracking_uri, "verbose": VERBOSE,
                           "storage": {"uri": storage.uri, "endpoint_url": storage.endpoint_url}},
        torch_config=TorchConfig(backend="nccl" if cfg.cluster.use_gpu else "gloo"),
        scaling_config=scaling_config(cfg),
        run_config=run_config(cfg, storage, name, 0, ()),
    )


def build_sampler(cfg, storage: RunStorage, job: dict, name: str) -> TorchTrainer:
    """Draw many samples of one model on cfg's workers (evaluation.sample_per_worker); nothing is trained."""
    return TorchTrainer(
        sample_per_worker,
        train_loop_config={**job, "storage": {"uri": storage.uri, "endpoint_url": storage.endpoint_url}},
        torch_config=TorchConfig(backend="nccl" if cfg.cluster.use_gpu else "gloo"),
        scaling_config=scaling_config(cfg),
        run_config=run_config(cfg, storage, name, 0, ()),
    )


def run_config(cfg, storage: RunStorage, name: str, max_failures: int, callbacks) -> ray.train.RunConfig:
    fs, root = storage.filesystem_and_root()
    return ray.train.RunConfig(
        name=name,
        storage_path=root,
        storage_filesystem=fs,
        checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.storage.keep_checkpoints),
        failure_config=ray.train.FailureConfig(max_failures=max_failures),
        callbacks=list(callbacks),
        # the driver prints one progress line per log interval (progress.py) instead
        logging_config=ray.train.LoggingConfig(log_level="INFO" if VERBOSE else "WARNING"),
    )
