"""Configuration: compose an experiment YAML with Hydra, check it against the typed schema, and derive
everything a run needs (model, data and training configs, run identity) before any work starts."""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from tarflow import ConfigError, TarFlowConfig, TrainConfig
from tarflow.data import DataConfig, dataset_info

from .errors import ExperimentError, cli_entry  # noqa: F401  (re-exported for now)
from .schema import ExperimentConfig

CONF_SEARCHPATH = "pkg://orchestrator.conf"
CODE_VERSION = "0.1"  # bump when a change makes old checkpoints incompatible: it is part of the run identity


def register_schema() -> None:
    # base.yaml starts from this node, so Hydra itself knows every key and type while composing
    ConfigStore.instance().store(name="tarflow_schema", node=ExperimentConfig)


def compose_experiment(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """experiment YAML + Hydra overrides -> a typed, read-only config."""
    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise ExperimentError(f"experiment file {path} does not exist")
    if path.suffix not in (".yaml", ".yml"):
        raise ExperimentError(f"experiment file {path} is not a .yaml file")
    register_schema()
    try:
        with initialize_config_dir(config_dir=str(path.parent), version_base="1.3"):
            raw = compose(config_name=path.stem, overrides=[f"hydra.searchpath=[{CONF_SEARCHPATH}]", *overrides])
        cfg = OmegaConf.merge(OmegaConf.structured(ExperimentConfig), raw)  # also for YAMLs without base
    except (HydraException, OmegaConfBaseException) as e:
        raise ExperimentError(f"{path.name}: {_explain(e, overrides)}") from None
    OmegaConf.set_readonly(cfg, True)
    return cfg


def with_overrides(cfg: DictConfig, values: dict, source: str = "config") -> DictConfig:
    """A typed, read-only copy of cfg with dotted keys set (sweep trials and sample settings)."""
    try:
        dotlist = OmegaConf.from_dotlist([f"{k}={_yaml_value(v)}" for k, v in values.items()])
        out = OmegaConf.merge(OmegaConf.structured(ExperimentConfig), OmegaConf.to_container(cfg), dotlist)
    except OmegaConfBaseException as e:
        raise ExperimentError(f"{source}: {_explain(e, [f'{k}={v}' for k, v in values.items()])}") from None
    OmegaConf.set_readonly(out, True)
    return out


def _yaml_value(v) -> str:
    return "null" if v is None else str(v).lower() if isinstance(v, bool) else str(v)


def _explain(e: Exception, overrides) -> str:
    """Hydra's and OmegaConf's errors, reduced to the key at fault and what is wrong with it."""
    chain = [e]
    while chain[-1].__cause__ is not None:
        chain.append(chain[-1].__cause__)
    text = " ".join(" ".join(str(x).split()) for x in chain)
    key = next((x.full_key for x in chain if getattr(x, "full_key", None)), None) or next(iter(re.findall(r"full_key: (\S+)", text)), None)
    override = re.search(r"Could not override '([^']+)'", text)
    if override and "reference_type=Dict" in text:
        new_key = next(iter(re.findall(r"Key '([^']+)' is not in struct", text)), "?")
        return (f"'{new_key}' is not yet in '{override.group(1)}': to add an entry to a dict from the command "
                f"line write '++{override.group(1)}=...'")
    if override or "not in" in text or "is not in struct" in text:
        key = override.group(1) if override else key
        return (f"unknown key '{key}' (in the file or the overrides {list(overrides)}); the valid keys of each "
                "section are in orchestrator/schema.py")
    if key:
        return f"bad value for '{key}': {text.split(' full_key:')[0]}"
    return f"cannot compose the config with overrides {list(overrides)}: {text}"


# ---------------------------------------------------------------------------------------------
# What a config means


@dataclass
class RunPlan:
    """Everything derived from a config that the driver and the workers agree on."""

    cfg: DictConfig
    source: str                 # the YAML file name, for messages
    model: TarFlowConfig
    data: DataConfig
    train: TrainConfig          # total_steps / warmup_steps are filled in by the worker from the data size
    run_key: str                # hash of everything that changes the trained model
    run_name: str               # storage-safe and unique: <experiment>-<arch>-<key>
    display_name: str           # what MLflow shows: <experiment>/<arch>/<noise>
    per_worker_batch: int
    data_present: bool = True

    @property
    def experiment_name(self) -> str:
        return self.cfg.tracking.experiment or self.cfg.experiment.name


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
                       compile=t.compile)


def schedule(cfg: DictConfig, train_size: int) -> tuple[int, int, int]:
    """(steps per epoch, total steps, warm-up steps) for a training set of train_size images."""
    per_epoch = max(1, train_size // cfg.train.batch_size)
    total = cfg.train.steps or max(1, math.ceil(cfg.train.epochs * per_epoch))
    warmup = min(total, round(cfg.train.warmup_epochs * per_epoch))
    return per_epoch, total, warmup


def identity_of(cfg: DictConfig) -> dict:
    """The parts of a config that change the trained model (not where it runs, is stored or tracked)."""
    ident = OmegaConf.to_container(cfg, resolve=True)
    for section in ("storage", "tracking", "cluster", "eval", "reference", "sweep"):
        ident.pop(section, None)
    ident["experiment"] = {"name": cfg.experiment.name}
    for key in ("num_workers",):
        ident["data"].pop(key, None)
    for key in ("log_every", "checkpoint_every"):
        ident["train"].pop(key, None)
    ident["code_version"] = CODE_VERSION
    return ident


def config_hash(cfg: DictConfig) -> str:
    return hashlib.sha256(json.dumps(identity_of(cfg), sort_keys=True).encode()).hexdigest()[:10]


def plan_run(cfg: DictConfig, source: str = "config", require_data: bool = True) -> RunPlan:
    """Validate the meaning of a config (model against data, training values, workers) and derive the plan.

    require_data=False (dry runs) falls back to the sizes the config declares when the data is absent.
    """
    try:
        data = data_config(cfg)
        try:
            info = dataset_info(data)
        except ConfigError:
            if require_data or not data.image_size:
                raise
            info = {"channels": data.channels or 3, "image_size": data.image_size,
                    "num_classes": cfg.data.num_classes or 0, "absent": True}
        if cfg.data.num_classes is not None and info["num_classes"] != cfg.data.num_classes:
            raise ConfigError(f"data.num_classes={cfg.data.num_classes} but {data.name} at {data.root} has "
                              f"{info['num_classes']} classes")
        num_classes = info["num_classes"] if cfg.model.conditional else 0
        model = TarFlowConfig.from_string(arch_with_parts(cfg.model.arch, cfg.model), image_size=info["image_size"],
                                          in_channels=info["channels"], num_classes=num_classes, nvp=cfg.model.nvp,
                                          head_dim=cfg.model.head_dim)
        if cfg.train.noise == "gaussian":
            model.noise_std = cfg.train.noise_std
        train = train_config(cfg)
        if cfg.train.precision not in ("auto", "fp32", "bf16"):
            raise ConfigError(f"train.precision must be auto, fp32 or bf16, got {cfg.train.precision!r}")
        if cfg.eval.attn_temp <= 0:
            raise ConfigError(f"eval.attn_temp must be > 0, got {cfg.eval.attn_temp}")
    except ConfigError as e:
        raise ExperimentError(f"{source}: {e}") from None
    workers = cfg.cluster.num_workers
    if workers < 1:
        raise ExperimentError(f"{source}: cluster.num_workers must be >= 1, got {workers}")
    if cfg.train.batch_size % workers:
        raise ExperimentError(f"{source}: train.batch_size={cfg.train.batch_size} is not divisible by "
                              f"cluster.num_workers={workers}")
    key = config_hash(cfg)
    noise = f"{cfg.train.noise_std:g}" if cfg.train.noise == "gaussian" else "uniform"
    safe_name = storage_safe(cfg.experiment.name)
    return RunPlan(cfg=cfg, source=source, model=model, data=data, train=train, run_key=key,
                   run_name=f"{safe_name}-{arch_name(model)}-{key}",
                   display_name=cfg.tracking.run_name or f"{cfg.experiment.name}/{arch_name(model)}/{noise}",
                   per_worker_batch=cfg.train.batch_size // workers, data_present=not info.get("absent"))


def storage_safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "-" for ch in name)


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


# characters MLflow refuses in a param name; a joint sweep axis ("model.num_blocks,model.layers_per_block") has one
MLFLOW_UNSAFE_KEY = re.compile(r"[^\w\-. :/]+")


def flat_params(cfg: DictConfig) -> dict[str, str]:
    """Dotted keys -> string values, for MLflow params."""
    out = {}

    def walk(prefix, node):
        if isinstance(node, dict):
            for k, v in node.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        else:
            out[MLFLOW_UNSAFE_KEY.sub(" ", prefix)] = str(node)

    container = OmegaConf.to_container(cfg, resolve=True)
    container.pop("reference", None)
    if not (container["sweep"]["train_axes"] or container["sweep"]["sample_axes"]):
        container.pop("sweep")
    walk("", container)
    return out
