"""Configuration: compose an experiment YAML with Hydra, check it against the typed schema and every
value against its allowed range, before any work starts.

What a config means for a run (model, data, identity) is orchestrator/plan.py.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import yaml
from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .errors import ExperimentError
from .schema import ExperimentConfig
from .storage import STORAGE_KEYS, check_uri, local_path

CONF_SEARCHPATH = "pkg://orchestrator.conf"


def register_schema() -> None:
    # base.yaml starts from this node, so Hydra itself knows every key and type while composing
    ConfigStore.instance().store(name="tarflow_schema", node=ExperimentConfig)


def compose_experiment(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """experiment YAML + Hydra overrides -> a typed, read-only config whose values are all in range."""
    path = Path(path).expanduser().resolve()
    if path.is_dir():
        raise ExperimentError(f"experiment {path} is a directory; give one of its .yaml files")
    if not path.is_file():
        raise ExperimentError(f"experiment file {path} does not exist")
    if path.suffix not in (".yaml", ".yml"):
        raise ExperimentError(f"experiment file {path} is not a .yaml file")
    check_yaml_syntax(path)
    register_schema()
    try:
        with initialize_config_dir(config_dir=str(path.parent), version_base="1.3"):
            raw = compose(config_name=path.stem, overrides=[f"hydra.searchpath=[{CONF_SEARCHPATH}]", *overrides])
        cfg = OmegaConf.merge(OmegaConf.structured(ExperimentConfig), raw)  # also for YAMLs without base
    except yaml.MarkedYAMLError as e:  # a config group file (or smoke.yaml) Hydra loaded for us
        raise ExperimentError(yaml_error_paragraph(e, "a file it includes")) from None
    except (HydraException, OmegaConfBaseException) as e:
        raise ExperimentError(f"{path.name}: {_explain(e, overrides)}") from None
    check_values(cfg, path.name)
    OmegaConf.set_readonly(cfg, True)
    return cfg


def check_yaml_syntax(path: Path) -> None:
    """A YAML syntax error as file, line and column, not a parser traceback."""
    try:
        yaml.safe_load(path.read_text())
    except yaml.MarkedYAMLError as e:
        raise ExperimentError(yaml_error_paragraph(e, str(path))) from None
    except yaml.YAMLError as e:
        raise ExperimentError(f"{path} is not valid YAML: {' '.join(str(e).split())}") from None


def yaml_error_paragraph(e: yaml.MarkedYAMLError, where: str) -> str:
    mark = e.problem_mark or e.context_mark
    name = mark.name if mark is not None and mark.name not in (None, "<unicode string>") else where
    at = f" line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    what = " ".join(x for x in (e.context, e.problem) if x)
    return f"{name}:{at}: YAML syntax error: {what}"


def with_values(cfg: DictConfig | dict, values: dict | list[str], source: str = "config") -> DictConfig:
    """A typed, read-only copy of cfg with dotted keys set: a {key: value} dict (sweep trials, sample settings)
    or key=value strings (the command line over a run's stored config)."""
    dotlist = [f"{k}={_yaml_value(v)}" for k, v in values.items()] if isinstance(values, dict) else list(values)
    try:
        base = cfg if isinstance(cfg, dict) else OmegaConf.to_container(cfg)
        out = OmegaConf.merge(OmegaConf.structured(ExperimentConfig), base, OmegaConf.from_dotlist(dotlist))
    except OmegaConfBaseException as e:
        raise ExperimentError(f"{source}: {_explain(e, dotlist)}") from None
    check_values(out, source)
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
    key = next((x.full_key for x in chain if getattr(x, "full_key", None)), None) \
        or next(iter(re.findall(r"full_key: (\S+)", text)), None)
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
# Value ranges: every key of the schema, checked at composition (dry runs and real runs alike)


@dataclass(frozen=True)
class Range:
    """A number in [lo, hi] (an end is excluded when open); optional: null is allowed too."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    integer: bool = False
    optional: bool = False

    def accepts(self, v) -> bool:
        if v is None:
            return self.optional
        if isinstance(v, bool) or not isinstance(v, (int, float)) or (isinstance(v, float) and not math.isfinite(v)):
            return False
        if self.integer and not isinstance(v, int):
            return False
        if self.lo is not None and (v <= self.lo if self.lo_open else v < self.lo):
            return False
        return not (self.hi is not None and (v >= self.hi if self.hi_open else v > self.hi))

    def describe(self) -> str:
        kind = "an integer" if self.integer else "a number"
        if self.lo is not None and self.hi is not None:
            text = f"{kind} in {'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}{')' if self.hi_open else ']'}"
        elif self.lo is not None:
            text = f"{kind} {'>' if self.lo_open else '>='} {self.lo:g}"
        elif self.hi is not None:
            text = f"{kind} {'<' if self.hi_open else '<='} {self.hi:g}"
        else:
            text = kind
        return f"null or {text}" if self.optional else text

    def bad_example(self):
        if self.lo is not None:
            return self.lo - 1 if not self.lo_open else self.lo
        return self.hi + 1 if not self.hi_open else self.hi


@dataclass(frozen=True)
class OneOf:
    values: tuple
    optional: bool = False

    def accepts(self, v) -> bool:
        return (v is None and self.optional) or (v is not None and v in self.values)

    def describe(self) -> str:
        return ("null or " if self.optional else "") + "one of " + ", ".join(map(str, self.values))

    def bad_example(self):
        return "bogus" if isinstance(self.values[0], str) else -99


@dataclass(frozen=True)
class Text:
    """A string: non-empty unless optional (null allowed), and a URL of one of `schemes` when given."""

    optional: bool = False
    schemes: tuple = ()

    def accepts(self, v) -> bool:
        if v is None:
            return self.optional
        if not isinstance(v, str) or not v.strip():
            return False
        return not self.schemes or urlsplit(v).scheme in self.schemes

    def describe(self) -> str:
        what = f"a {'/'.join(self.schemes)} URL" if self.schemes else "a non-empty string"
        return f"null or {what}" if self.optional else what

    def bad_example(self):
        return "ftp://nowhere" if self.schemes else ""


@dataclass(frozen=True)
class Sha256:
    """null, or a sha256 as `sha256sum` prints it."""

    def accepts(self, v) -> bool:
        return v is None or (isinstance(v, str) and re.fullmatch(r"[0-9a-f]{64}", v) is not None)

    def describe(self) -> str:
        return "null or a sha256: 64 lowercase hex digits, as `sha256sum FILE` prints it"

    def bad_example(self):
        return "abc"


POSITIVE_INT = Range(lo=1, integer=True)
NONNEG_INT = Range(lo=0, integer=True)
POSITIVE = Range(lo=0, lo_open=True)
NONNEG = Range(lo=0)
FRACTION_OPEN = Range(lo=0, hi=1, lo_open=True, hi_open=True)

# Every leaf key of the schema has a rule here, or is one of FREE_FORM (booleans and sections whose shape
# the code that reads them checks: sweep axes, the paper's reference block). tests/test_config.py holds
# the schema to this.
VALUE_RULES = {
    "experiment.name": Text(),
    "experiment.scale": Text(),
    "experiment.label": Text(),
    "model.arch": Text(),
    "model.patch_size": Range(lo=1, integer=True, optional=True),
    "model.width": Range(lo=1, integer=True, optional=True),
    "model.num_blocks": Range(lo=1, integer=True, optional=True),
    "model.layers_per_block": Range(lo=1, integer=True, optional=True),
    "model.head_dim": POSITIVE_INT,
    "model.init_from": Text(optional=True),
    "data.name": OneOf(("fashion_mnist", "mnist", "digits", "imagenet_npz", "image_folder", "prepared")),
    "data.root": Text(optional=True),
    "data.image_size": Range(lo=1, integer=True, optional=True),
    "data.fit": OneOf(("pad", "resize")),
    "data.channels": OneOf((1, 3), optional=True),
    "data.limit": Range(lo=1, integer=True, optional=True),
    "data.val_limit": Range(lo=1, integer=True, optional=True),
    "data.num_workers": NONNEG_INT,
    "data.num_classes": Range(lo=0, integer=True, optional=True),
    "data.train_images": Range(lo=1, integer=True, optional=True),
    "data.cache_dir": Text(optional=True),
    "train.batch_size": POSITIVE_INT,
    "train.epochs": POSITIVE,
    "train.steps": Range(lo=0, integer=True, optional=True),
    "train.lr": POSITIVE,
    "train.min_lr": NONNEG,
    "train.weight_decay": NONNEG,
    "train.warmup_epochs": NONNEG,
    "train.noise": OneOf(("gaussian", "uniform")),
    "train.noise_std": NONNEG,
    "train.label_drop": Range(lo=0, hi=1, hi_open=True),
    "train.precision": OneOf(("auto", "fp32", "bf16")),
    "train.grad_clip": Range(lo=0, lo_open=True, optional=True),
    "train.ema_decay": Range(lo=0, hi=1, lo_open=True, hi_open=True, optional=True),
    "train.grad_accum_steps": POSITIVE_INT,
    "train.seed": NONNEG_INT,
    "train.log_every": POSITIVE_INT,
    "train.checkpoint_every": POSITIVE_INT,
    "eval.num_samples": NONNEG_INT,
    "eval.guidance": NONNEG,
    "eval.attn_temp": POSITIVE,
    "eval.denoise_step": POSITIVE,
    "eval.sample_batch_size": POSITIVE_INT,
    "eval.sampler": OneOf(("sequential", "jacobi")),
    "eval.jacobi.tol": POSITIVE,
    "eval.jacobi.max_iters": Range(lo=1, integer=True, optional=True),
    "eval.fid.num_samples": POSITIVE_INT,
    "eval.fid.batch_size": POSITIVE_INT,
    "eval.fid.inception_weights": Text(optional=True),
    "eval.fid.inception_sha256": Sha256(),
    "eval.fid.reference_images": Range(lo=1, integer=True, optional=True),
    "sample.num_samples": POSITIVE_INT,
    "sample.batch_size": POSITIVE_INT,
    "sample.seed": NONNEG_INT,
    "sample.grid": NONNEG_INT,
    "eval.every_steps": Range(lo=1, integer=True, optional=True),
    "eval.periodic_val_images": NONNEG_INT,
    "eval.periodic_samples": NONNEG_INT,
    "eval.periodic_fid_samples": NONNEG_INT,
    "storage.uri": Text(),
    "storage.endpoint_url": Text(optional=True, schemes=("http", "https")),
    "storage.keep_checkpoints": POSITIVE_INT,
    "storage.retry_seconds": Range(lo=0, hi=3600),
    "storage.write_mb_per_s": Range(lo=0, lo_open=True, optional=True),
    "storage.local_write_mb_per_s": Range(lo=0, lo_open=True, optional=True),
    "tracking.uri": Text(optional=True),
    "tracking.experiment": Text(optional=True),
    "tracking.run_name": Text(optional=True),
    "tracking.system_metrics_interval": Range(lo=0, lo_open=True, optional=True),
    "cluster.address": Text(optional=True),
    "cluster.num_workers": POSITIVE_INT,
    "cluster.cpus_per_worker": POSITIVE,
    "cluster.gpus_per_worker": POSITIVE,
    "cluster.num_cpus": Range(lo=1, integer=True, optional=True),
    "cluster.max_failures": Range(lo=-1, integer=True),
    "cluster.min_workers": Range(lo=1, integer=True, optional=True),
    "cluster.resize_interval_s": POSITIVE,
    "cluster.max_preemption_failures": Range(lo=-1, integer=True),
    "cluster.preemption_check_every": NONNEG_INT,
    "cluster.worker_group_start_timeout_s": Range(lo=0, lo_open=True, optional=True),
    "cluster.images_per_sec_per_gpu": Range(lo=0, lo_open=True, optional=True),
    "cluster.gpu_type": Text(optional=True),
    "cluster.peak_tflops.bf16": POSITIVE,
    "cluster.peak_tflops.tf32": POSITIVE,
    "cluster.peak_tflops.fp32": POSITIVE,
    "cluster.gpu_peak_tflops": Range(lo=0, lo_open=True, optional=True),
    "cluster.price_per_gpu_hour": Range(lo=0, optional=True),
    "cluster.assumed_mfu": Range(lo=0, hi=1, lo_open=True, optional=True),
    "cluster.mfu.bf16": Range(lo=0, hi=1, lo_open=True),
    "cluster.mfu.tf32": Range(lo=0, hi=1, lo_open=True),
    "cluster.mfu.fp32": Range(lo=0, hi=1, lo_open=True),
    "cluster.gpu_memory_gb": Range(lo=1, hi=1024, optional=True),  # GiB: catches a figure given in MiB
    "sweep.search": OneOf(("grid", "random")),
    "sweep.num_samples": POSITIVE_INT,
    "sweep.max_concurrent": Range(lo=1, integer=True, optional=True),
    "sweep.metric": Text(),
    "sweep.mode": OneOf(("min", "max")),
    "sweep.scheduler.type": OneOf(("asha", "fifo")),
    "sweep.scheduler.metric": Text(),
    "sweep.scheduler.mode": OneOf(("min", "max")),
    "sweep.scheduler.grace_period": POSITIVE_INT,
    "sweep.scheduler.reduction_factor": Range(lo=1, lo_open=True),
}
FREE_FORM = {"experiment.title", "train.betas", "sweep.train_axes", "sweep.sample_axes", "reference", "sample.classes"}


def check_values(cfg: DictConfig, source: str) -> None:
    """Every value in its range (VALUE_RULES), every storage location one this code can use (file:// URIs
    become the plain paths the code reads), and the few rules that tie two keys together."""
    for key, rule in VALUE_RULES.items():
        value = OmegaConf.select(cfg, key, default=None)
        if not rule.accepts(value):
            raise ExperimentError(f"{source}: {key}={value!r} is out of range: it must be {rule.describe()}")
    check_storage_keys(cfg, source)
    betas = list(cfg.train.betas)
    if len(betas) != 2 or not all(Range(lo=0, hi=1, hi_open=True).accepts(b) for b in betas):
        raise ExperimentError(f"{source}: train.betas={betas} is out of range: it must be two numbers in [0, 1)")
    if cfg.train.min_lr > cfg.train.lr:
        raise ExperimentError(f"{source}: train.min_lr={cfg.train.min_lr:g} is above train.lr={cfg.train.lr:g}; the "
                              "schedule decays from lr down to min_lr")
    if cfg.train.steps == 0 and not cfg.model.init_from:
        raise ExperimentError(f"{source}: train.steps=0 (evaluate only) needs model.init_from, the weights to "
                              "evaluate")
    if cfg.eval.fid.inception_sha256 and not cfg.eval.fid.inception_weights:
        raise ExperimentError(f"{source}: eval.fid.inception_sha256 pins the file eval.fid.inception_weights names, "
                              "and it names none (torch-fidelity's download is checked by torch-fidelity)")
    if cfg.eval.periodic_fid_samples == 1:
        raise ExperimentError(f"{source}: eval.periodic_fid_samples=1 is out of range: a FID needs at least 2 "
                              "samples (0 turns it off)")
    gpus = cfg.cluster.gpus_per_worker
    if cfg.cluster.use_gpu and gpus != int(gpus):
        raise ExperimentError(f"{source}: cluster.gpus_per_worker={gpus:g} is not a whole GPU: each training worker "
                              "is one NCCL rank on one device, and two ranks on one GPU fail at the first collective "
                              "(after the cluster has started); give each worker 1 GPU (more are not used)")
    check_elastic(cfg, source)
    if cfg.train.batch_size % cfg.cluster.num_workers:
        raise ExperimentError(f"{source}: train.batch_size={cfg.train.batch_size} is not divisible by "
                              f"cluster.num_workers={cfg.cluster.num_workers}")
    per_worker = cfg.train.batch_size // cfg.cluster.num_workers
    if per_worker % cfg.train.grad_accum_steps:
        raise ExperimentError(f"{source}: the per-worker batch ({per_worker} = train.batch_size={cfg.train.batch_size} "
                              f"/ cluster.num_workers={cfg.cluster.num_workers}) is not divisible by "
                              f"train.grad_accum_steps={cfg.train.grad_accum_steps}: each optimizer step splits it "
                              "into that many equal micro-batches")


def check_storage_keys(cfg: DictConfig, source: str) -> None:
    """Each key that names storage, checked by storage.check_uri (naming the environment variable a value came
    from); a file:// location is rewritten as its path."""
    raw = OmegaConf.to_container(cfg, resolve=False)
    for key in STORAGE_KEYS:
        value = OmegaConf.select(cfg, key, default=None)
        if not isinstance(value, str):
            continue
        spelled = raw
        for part in key.split("."):
            spelled = spelled.get(part) if isinstance(spelled, dict) else None
        env = [v for v in re.findall(r"oc\.env:([A-Za-z0-9_]+)", str(spelled)) if v in os.environ]
        try:
            shown = redact_uri(value) + (f" (from the environment: {', '.join(env)})" if env else "")
            check_uri(value, key, shown)
            if value.startswith("file://"):
                OmegaConf.update(cfg, key, local_path(value))
        except ExperimentError as e:
            raise ExperimentError(f"{source}: {e}") from None


def min_workers(cfg: DictConfig) -> int:
    """The smallest world size a run may train at: cluster.min_workers for an elastic run, else num_workers."""
    c = cfg.cluster
    return c.min_workers if c.min_workers is not None else c.num_workers


def check_elastic(cfg: DictConfig, source: str) -> None:
    """An elastic run's range of world sizes, and a failure budget a lost node can use."""
    c, low = cfg.cluster, min_workers(cfg)
    if low > c.num_workers:
        raise ExperimentError(f"{source}: cluster.min_workers={low} is above cluster.num_workers={c.num_workers}: an "
                              "elastic run trains on between min_workers and num_workers workers")
    if low > cfg.train.batch_size:
        raise ExperimentError(f"{source}: cluster.min_workers={low} is above train.batch_size="
                              f"{cfg.train.batch_size}: a worker without an image of the global batch")
    if low < c.num_workers and c.max_failures == 0:
        raise ExperimentError(f"{source}: cluster.min_workers={low} < cluster.num_workers={c.num_workers} makes the "
                              "run elastic, but cluster.max_failures=0: Ray Train counts a lost node against "
                              "max_failures, so the first loss would end the run instead of continuing on the workers "
                              "that remain; set cluster.max_failures to the node losses to survive (-1: any number)")


# ---------------------------------------------------------------------------------------------
# Credentials in URIs never leave the process: what is printed, logged or stored is redacted

REDACTED_KEYS = ("tracking.uri", "storage.uri", "storage.endpoint_url", "cluster.address", "data.root",
                 "model.init_from")


def redact_uri(uri: str | None) -> str | None:
    """http://user:secret@host/x -> http://user:***@host/x (a password or token in a URI's user part)."""
    if not uri or "@" not in uri or "://" not in uri:
        return uri
    parts = urlsplit(uri)
    if parts.password is None and not parts.username:
        return uri
    host = parts.netloc.rsplit("@", 1)[1]
    user = f"{parts.username}:***" if parts.password is not None else "***"
    return urlunsplit(parts._replace(netloc=f"{user}@{host}"))


URI_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"]+")


def redact_text(text: str) -> str:
    """Every URI in a text (a command line) with its user part masked and its query cut (tokens ride there too)."""
    def one(m: re.Match) -> str:
        uri, _, query = m.group(0).partition("?")
        return redact_uri(uri) + ("?***" if query else "")

    return URI_IN_TEXT.sub(one, text)


def redacted(cfg: DictConfig) -> dict:
    """The resolved config as a plain dict, with credentials in its URIs masked: for printing and storing."""
    out = OmegaConf.to_container(cfg, resolve=True)
    for key in REDACTED_KEYS:
        section, name = key.split(".")
        if isinstance(out.get(section), dict) and isinstance(out[section].get(name), str):
            out[section][name] = redact_uri(out[section][name])
    return out


def credentials(cfg: DictConfig) -> dict:
    """{dotted key: value} of the config's URIs that carry a credential: what `redacted` masks, for a channel that
    is never stored (a sweep passes them to its trials by Ray's object store, not in Tune's saved state)."""
    out = OmegaConf.to_container(cfg, resolve=True)
    values = {key: (out.get(key.split(".")[0]) or {}).get(key.split(".")[1]) for key in REDACTED_KEYS}
    return {k: v for k, v in values.items() if isinstance(v, str) and redact_uri(v) != v}


def with_credentials(container: dict, values: dict) -> dict:
    """A `redacted` config with the `credentials` it lost put back: the config as it was."""
    out = {section: dict(v) if isinstance(v, dict) else v for section, v in container.items()}
    for key, value in values.items():
        section, name = key.split(".")
        out[section][name] = value
    return out


def redacted_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.create(redacted(cfg)))
