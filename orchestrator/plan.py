"""What a config means for a run: the model, data and training configs, the schedule, and the run's
identity (the hash of everything that changes the trained model), derived before any work starts."""

from __future__ import annotations

import functools
import hashlib
import json
import math
from dataclasses import dataclass

from omegaconf import DictConfig, OmegaConf

from tarflow import ConfigError, TarFlowConfig, TrainConfig
from tarflow.data import DataConfig

from .config import min_workers
from .datacache import ManifestRefused, data_info
from .errors import ExperimentError
from .rundir import run_dir_name
from .schema import ExperimentConfig

CODE_VERSION = "0.2"  # bump when a change makes old checkpoints incompatible: it is part of the run identity


@dataclass
class RunPlan:
    """Everything derived from a config that the driver and the workers agree on."""

    cfg: DictConfig
    source: str                 # the YAML file name, for messages
    model: TarFlowConfig
    data: DataConfig
    run_key: str                # hash of everything that changes the trained model
    run_name: str               # storage-safe and unique: <experiment>-<arch>-<key>
    display_name: str           # what MLflow shows: <experiment>/<arch>/<noise>
    per_worker_batch: int       # the largest share of the global batch a worker holds (at the smallest world size)
    data_present: bool = True

    @property
    def experiment_name(self) -> str:
        return self.cfg.tracking.experiment or self.cfg.experiment.name

    @property
    def arch(self) -> str:
        return arch_name(self.model)


def data_config(cfg: DictConfig) -> DataConfig:
    d = cfg.data
    return DataConfig(name=d.name, root=d.root, image_size=d.image_size, fit=d.fit, channels=d.channels,
                      flip=d.flip, limit=d.limit)


def train_config(cfg: DictConfig, total_steps: int = 1, warmup_steps: int = 0, on_gpu: bool = False) -> TrainConfig:
    t = cfg.train
    bf16 = t.precision == "bf16" or (t.precision == "auto" and on_gpu and t.noise == "gaussian")
    return TrainConfig(lr=t.lr, min_lr=t.min_lr, betas=tuple(t.betas), weight_decay=t.weight_decay,
                       warmup_steps=warmup_steps, total_steps=total_steps, noise=t.noise, noise_std=t.noise_std,
                       label_drop=t.label_drop, bf16=bf16, grad_clip=t.grad_clip, ema_decay=t.ema_decay,
                       compile=t.compile, activation_checkpointing=t.activation_checkpointing,
                       grad_accum_steps=t.grad_accum_steps, tf32=t.tf32, seed=t.seed, flip=cfg.data.flip)


def schedule(cfg: DictConfig, train_size: int) -> tuple[int, int, int]:
    """(steps per epoch, total steps, warm-up steps) for a training set of train_size images."""
    per_epoch = max(1, train_size // cfg.train.batch_size)
    total = cfg.train.steps if cfg.train.steps is not None else max(1, math.ceil(cfg.train.epochs * per_epoch))
    warmup = min(total, round(cfg.train.warmup_epochs * per_epoch))
    return per_epoch, total, warmup


def identity_of(cfg: DictConfig) -> dict:
    """The parts of a config that change the trained model (not where it runs, is stored or tracked, nor how
    it is evaluated: a new evaluation of a finished model never retrains it), as dotted keys. Values at the
    schema's default are left out, so adding a key to the schema does not rename every existing run.

    cluster.num_workers is left out on purpose: the images of every global step are the same whatever the
    number of workers (each step takes the next batch_size indices of one seeded permutation, split across
    ranks), so a run can resume on a cluster of another size. What does change with it, the per-rank
    augmentation noise, is recorded: the world size of every (re)start is logged by step.
    """
    ident = {k: v for k, v in non_default_leaves(cfg).items()
             if k.split(".")[0] in ("model", "data", "train") and k not in NOT_IDENTITY}
    ident["experiment.name"] = cfg.experiment.name
    ident["code_version"] = CODE_VERSION
    return ident


# keys of the identity sections that do not change the trained model. The memory knobs are among them: gradient
# accumulation draws the noise of the whole batch first and averages the micro-batches' gradients, and
# checkpointing recomputes the same activations, so both give the same model for more time or less memory (up
# to the order of floating-point sums), and a run may resume with them changed to fit other GPUs.
NOT_IDENTITY = {"data.num_workers", "data.val_limit", "data.train_images", "data.num_classes", "data.cache_dir",
                "train.log_every", "train.checkpoint_every", "train.activation_checkpointing",
                "train.grad_accum_steps"}


def config_hash(cfg: DictConfig) -> str:
    return short_hash(identity_of(cfg))


def evaluation_of(cfg: DictConfig) -> dict:
    """What an evaluation of a trained model depends on: the eval section and the held-out subset (values
    at the schema's default left out, as for the run identity). The periodic-evaluation keys only act while
    training, so a finished run is not evaluated again for them."""
    leaves = non_default_leaves(cfg)
    return {k: v for k, v in leaves.items()
            if (k.startswith("eval.") or k == "data.val_limit") and k not in DURING_TRAINING}


# eval keys that only act during training (orchestrator/periodic.py)
DURING_TRAINING = {"eval.every_steps", "eval.periodic_val_images", "eval.periodic_samples",
                   "eval.periodic_fid_samples"}


def evaluation_key(cfg: DictConfig) -> str:
    return short_hash(evaluation_of(cfg))


def non_default_leaves(cfg: DictConfig) -> dict:
    defaults = schema_defaults()
    return {k: v for k, v in flatten(OmegaConf.to_container(cfg, resolve=True)).items()
            if k not in defaults or defaults[k] != v}


@functools.cache
def schema_defaults() -> dict:
    # built once: a structured config takes ~50 ms, and a sweep's dry run plans every trial
    return flatten(OmegaConf.to_container(OmegaConf.structured(ExperimentConfig)))


def flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict) and v:
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out


def short_hash(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:10]


def plan_run(cfg: DictConfig, source: str = "config", require_data: bool = True) -> RunPlan:
    """Validate the meaning of a config (model against data) and derive the plan.

    require_data=False (dry runs) falls back to the sizes the config declares when the data is absent (or cannot
    be reached from here); a manifest that is there and refused fails as it would in the run.
    """
    try:
        data = data_config(cfg)
        info = data_facts(cfg, data, source, require_data)
        if cfg.data.num_classes is not None and info["num_classes"] != cfg.data.num_classes:
            raise ConfigError(f"data.num_classes={cfg.data.num_classes} but {data.name} at {data.root} has "
                              f"{info['num_classes']} classes")
        num_classes = info["num_classes"] if cfg.model.conditional else 0
        model = TarFlowConfig.from_string(arch_with_parts(cfg.model.arch, cfg.model), image_size=info["image_size"],
                                          in_channels=info["channels"], num_classes=num_classes, nvp=cfg.model.nvp,
                                          head_dim=cfg.model.head_dim)
        if cfg.train.noise == "gaussian":
            model.noise_std = cfg.train.noise_std
        train_config(cfg)  # the training settings are checked here, before any work
    except ConfigError as e:
        raise ExperimentError(f"{source}: {e}") from None
    key = config_hash(cfg)
    noise = f"{cfg.train.noise_std:g}" if cfg.train.noise == "gaussian" else "uniform"
    return RunPlan(cfg=cfg, source=source, model=model, data=data, run_key=key,
                   run_name=run_dir_name(cfg.experiment.name, arch_name(model), key),
                   display_name=cfg.tracking.run_name or f"{cfg.experiment.name}/{arch_name(model)}/{noise}",
                   per_worker_batch=-(-cfg.train.batch_size // min_workers(cfg)),
                   data_present=not info.get("absent"))


def data_facts(cfg: DictConfig, data: DataConfig, source: str, require_data: bool) -> dict:
    """What the data holds (data_info: channels, image size, classes, training images), checked against the
    global batch; with require_data=False (dry runs) the sizes the config declares stand in for absent data."""
    try:
        info = data_info(data, cfg.storage.endpoint_url)  # prepared data in S3: its manifest only
    except (ConfigError, ExperimentError) as e:
        if require_data or not data.image_size or isinstance(e, ManifestRefused):  # a refused manifest is no absence
            raise ExperimentError(f"{source}: {e}") from None
        info = {"channels": data.channels or 3, "image_size": data.image_size,
                "num_classes": cfg.data.num_classes or 0, "train_images": cfg.data.train_images, "absent": True}
    images = info.get("train_images")
    if images is not None and images < cfg.train.batch_size:
        limit = f" (data.limit={cfg.data.limit})" if cfg.data.limit else ""
        raise ExperimentError(
            f"{source}: {data.name} has {images} training images{limit}, fewer than one global batch "
            f"(train.batch_size={cfg.train.batch_size}): every step takes a whole batch, so no step could ever be "
            "taken. Lower train.batch_size or give more data")
    return info


ARCH_PARTS = ("patch_size", "width", "num_blocks", "layers_per_block")  # P-Ch-T-K, in model.arch's order


def arch_with_parts(arch: str, parts) -> str:
    """model.arch with the single parts that are set (model.num_blocks=4, ...: a sweep over depth) put in
    their places: the architecture that is built. parts: model.* values by name, None where unset."""
    fields = arch.split("-")
    for i, key in enumerate(ARCH_PARTS[: len(fields)]):
        if parts.get(key) is not None:
            fields[i] = str(parts[key])
    return "-".join(fields)


def arch_name(model: TarFlowConfig) -> str:
    """P-Ch-T-K of the model actually built (σ is shown separately)."""
    return f"{model.patch_size}-{model.width}-{model.num_blocks}-{model.layers_per_block}"
