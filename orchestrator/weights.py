"""Weights from elsewhere: what `model.init_from` and `orchestrator.sample --reference-checkpoint` name, found
before any cluster work and loaded on the workers.

Three kinds: a finished or running run of ours (its name in the storage: its latest checkpoint), one of
our checkpoint files (state.pt, a local path or s3://), or a state_dict in the authors' layout (a .pth of
apple/ml-tarflow, such as the released afhq_model_8_768_8_8_0.07.pth), loaded through
TarFlow.from_reference with the run's model config.
"""

from __future__ import annotations

import posixpath
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

import tarflow

from .errors import ExperimentError
from .rundir import CHECKPOINT_FILE, RunDir
from .storage import RunStorage


@dataclass(frozen=True)
class WeightsSource:
    kind: str       # "checkpoint" (ours) or "reference" (the authors' layout)
    storage: dict   # RunStorage fields of the directory holding the file
    file: str       # the file's name in it

    def describe(self) -> str:
        return f"{self.storage['uri'].rstrip('/')}/{self.file}"


def checkpoint_source(rundir: RunDir, checkpoint: str) -> WeightsSource:
    """A checkpoint of one of our runs."""
    home = RunStorage(f"{rundir.storage.uri.rstrip('/')}/{rundir.path(checkpoint)}", rundir.storage.endpoint_url)
    return WeightsSource("checkpoint", {"uri": home.uri, "endpoint_url": home.endpoint_url}, CHECKPOINT_FILE)


@dataclass
class Weights:
    model: dict                 # state_dict of a model of the config it was loaded for, on the CPU
    ema: dict | None            # the EMA copy's, when the run kept one
    step: int | None            # the training step of our checkpoints; None for the authors' layout

    def best(self) -> dict:
        """What to sample and evaluate: the EMA weights when the run kept them."""
        return self.ema if self.ema is not None else self.model


def find_weights(spec: str, storage: RunStorage, what: str = "model.init_from") -> WeightsSource:
    """The weights a spec names; an ExperimentError naming the spec when there are none."""
    if spec.startswith("s3://") or Path(spec).suffix in (".pt", ".pth", ".ckpt", ".bin"):
        where, file = posixpath.split(spec.rstrip("/")) if spec.startswith("s3://") else (
            str(Path(spec).expanduser().resolve().parent), Path(spec).name)
        home = RunStorage(where, storage.endpoint_url)
        if not home.exists(file):
            raise ExperimentError(f"{what}={spec}: no such file")
        kind = "checkpoint" if file == CHECKPOINT_FILE or home.read_bytes(file + ".sha256") is not None \
            else "reference"
        return WeightsSource(kind, {"uri": home.uri, "endpoint_url": home.endpoint_url}, file)
    # a run: its latest checkpoint, in the given storage or as a directory
    for run in (RunDir(storage, spec), RunDir(RunStorage(str(Path(spec).expanduser().resolve().parent)),
                                              Path(spec).name)):
        latest = run.latest_checkpoint()
        if latest:
            return checkpoint_source(run, latest)
    raise ExperimentError(f"{what}={spec}: not a run with checkpoints in {storage.describe()} nor a checkpoint "
                          "file (a run's name, a state.pt, an authors' .pth, a path or s3://)")


def load_model(source: WeightsSource, model_config: tarflow.TarFlowConfig, device) -> tuple[tarflow.TarFlow, int]:
    """The model to sample and evaluate (EMA weights when the run kept them), in eval mode on device, and its
    training step (0 for the authors' layout)."""
    weights = load_weights(source, model_config)
    model = tarflow.TarFlow(model_config)
    model.load_state_dict(weights.best())
    return model.to(device).eval(), weights.step or 0


def load_weights(source: WeightsSource, model_config: tarflow.TarFlowConfig) -> Weights:
    """The weights for a model of model_config, on the CPU. A shape or key that does not fit the config is an
    ExperimentError naming the tensor."""
    home = RunStorage(**source.storage)
    with tempfile.TemporaryDirectory() as tmp:
        local = home.download(source.file, Path(tmp) / source.file)
        if home.read_bytes(source.file + ".sha256") is not None:
            home.download(source.file + ".sha256", Path(tmp) / (source.file + ".sha256"))
        if source.kind == "checkpoint":
            try:
                ckpt = tarflow.load_checkpoint(local)
            except tarflow.CheckpointError as e:
                raise ExperimentError(f"{source.describe()}: {e}") from None
            if ckpt["model_config"] != model_config.to_dict():
                diff = {k: (v, model_config.to_dict().get(k)) for k, v in ckpt["model_config"].items()
                        if model_config.to_dict().get(k) != v}
                raise ExperimentError(f"{source.describe()} holds a model of another shape: (its value, this "
                                      f"run's) = {diff}")
            return Weights(ckpt["model"], ckpt.get("ema"), int(ckpt["step"]))
        state = torch.load(local, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]  # some reproductions wrap the state_dict
    try:
        model = tarflow.TarFlow.from_reference(state, model_config)
    except (KeyError, ValueError) as e:
        raise ExperimentError(f"{source.describe()} does not fit model {model_config.name} (image "
                              f"{model_config.in_channels}x{model_config.image_size}², {model_config.num_classes} "
                              f"classes, {'NVP' if model_config.nvp else 'VP'}): {e.args[0] if e.args else e}") \
            from None
    return Weights(model.state_dict(), None, None)


def check_weights(source: WeightsSource, model_config: tarflow.TarFlowConfig) -> None:
    """Before any cluster work: do the weights fit the model? Local files only (memory-mapped, nothing read
    but the shapes); files in S3 are checked by the workers when they load them."""
    if str(source.storage["uri"]).startswith("s3://"):
        return
    path = Path(source.storage["uri"]) / source.file
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # torch raises many kinds for foreign or damaged files
        raise ExperimentError(f"{path} cannot be read as a checkpoint ({type(e).__name__}: {e})") from None
    if source.kind == "checkpoint":
        have = state.get("model_config") if isinstance(state, dict) else None
        if have is not None and have != model_config.to_dict():
            want = model_config.to_dict()
            diff = {k: (v, want.get(k)) for k, v in have.items() if want.get(k) != v}
            raise ExperimentError(f"{path} holds a model of another shape: (its value, this run's) = {diff}")
        return
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    with torch.device("meta"):  # the model's shapes without its memory
        model = tarflow.TarFlow(model_config)
    ours = model.state_dict()
    for key, ref_key in model.reference_key_map().items():
        if ref_key not in state:
            raise ExperimentError(f"{path} has no tensor {ref_key!r}, which model {model_config.name} with "
                                  f"{model_config.num_classes} classes ({'NVP' if model_config.nvp else 'VP'}) needs")
        shape = tuple(state[ref_key].shape)
        want = tuple(ours[key].shape)
        if key.endswith("class_embed"):
            shape = (shape[0], shape[-1]) if len(shape) == 3 else shape
        if shape != want:
            raise ExperimentError(f"{path}: tensor {ref_key!r} has shape {shape}, model {model_config.name} at "
                                  f"{model_config.in_channels}x{model_config.image_size}² needs {want}")
