"""Evaluating a trained model on the Ray workers, every rank a share: held-out bits/dim, a sample grid, and FID
against reference statistics cached in storage. Used at the end of training (train_loop.py), periodically
during it (periodic.py), on the final checkpoint of a finished run (reevaluate.py) and by the sample job."""

from __future__ import annotations

import dataclasses
import io
import os
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

import tarflow
from tarflow.data import DataConfig, ImageDataset, load_dataset, to_uint8
from tarflow.model import ConfigError
from tarflow.prepared import sha256_file

from .config import Sha256
from .delivery import RunLogger
from .errors import ExperimentError
from .lineage import dataset_digest
from .plan import RunPlan
from .rundir import fid_stats_path
from .storage import RunStorage, file_lock


def heldout_bpd(model: tarflow.TarFlow, val: ImageDataset, batch_size: int, device: torch.device,
                rank: int = 0, world: int = 1, seed: int = 0) -> float:
    """Mean BPD over the held-out split, one dequantisation sample per image, each rank a shard."""
    sampler = DistributedSampler(val, num_replicas=world, rank=rank, shuffle=False, drop_last=False)
    loader = DataLoader(val, batch_size=batch_size, sampler=sampler)
    gen = torch.Generator(device=device).manual_seed(seed + rank)
    total = torch.zeros(2, dtype=torch.float64, device=device)  # sum of BPD, count
    model.eval()
    with torch.no_grad():
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            bpd = tarflow.bits_per_dim(model, to_uint8(x), y if model.config.num_classes else None, generator=gen)
            total += torch.stack([bpd.double().sum(), torch.tensor(float(len(bpd)), device=device)])
    if world > 1:
        # DistributedSampler pads shards to equal length by repeating images: a negligible bias
        dist.all_reduce(total)
    return (total[0] / total[1]).item()


def training_noise_std(cfg) -> float | None:
    """The σ the model was trained with (what denoising takes), or None for uniform dequantization noise."""
    return cfg.train.noise_std if cfg.train.noise == "gaussian" else None


def draw(model: tarflow.TarFlow, eval_cfg, noise_std: float | None, n: int, y: torch.Tensor | None,
         generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """n samples with the eval section's sampling knobs (guidance, annealing, attention temperature, denoising
    with the training σ, sequential or Jacobi inversion). (n, C, H, W) on the [-1, 1] scale."""
    return tarflow.sample(model, n, y=y, guidance=eval_cfg.guidance, annealed_guidance=eval_cfg.annealed_guidance,
                          attn_temp=eval_cfg.attn_temp, denoise_sigma=noise_std if eval_cfg.denoise else None,
                          denoise_step=eval_cfg.denoise_step, generator=generator, device=device,
                          sampler=eval_cfg.sampler, jacobi_tol=eval_cfg.jacobi.tol,
                          jacobi_max_iters=eval_cfg.jacobi.max_iters)


def save_grid(images: torch.Tensor, path: Path) -> Path:
    from PIL import Image

    grid = tarflow.sample_grid(images, nrow=max(1, int(len(images) ** 0.5)))
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid.numpy()).save(path)
    return path


def sample_grid_png(model: tarflow.TarFlow, path: Path, eval_cfg, noise_std: float | None, device: torch.device,
                    seed: int = 0) -> Path:
    """eval.num_samples samples (labels cycling through the classes for conditional models) as one PNG grid."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    n, batch, classes = eval_cfg.num_samples, eval_cfg.sample_batch_size, model.config.num_classes
    images = []
    for start in range(0, n, batch):
        b = min(batch, n - start)
        y = (torch.arange(start, start + b) % classes).to(device) if classes else None
        images.append(draw(model, eval_cfg, noise_std, b, y, gen, device).cpu())
    return save_grid(torch.cat(images), path)


# ---------------------------------------------------------------------------------------------
# FID: reference statistics cached in storage, samples drawn in parallel on every worker


class FeatureMoments:
    """Running sums of features, so ranks combine statistics with one all-reduce instead of shipping
    every feature vector (50K × 2048 floats) to rank 0."""

    def __init__(self, dim: int, device: torch.device):
        self.s1 = torch.zeros(dim, dtype=torch.float64, device=device)
        self.s2 = torch.zeros(dim, dim, dtype=torch.float64, device=device)
        self.n = torch.zeros((), dtype=torch.float64, device=device)

    def add(self, feats: torch.Tensor) -> None:
        f = feats.to(self.s1.device, torch.float64)
        self.s1 += f.sum(0)
        self.s2 += f.T @ f
        self.n += len(f)

    def all_reduce(self, world: int) -> FeatureMoments:
        if world > 1:
            for t in (self.s1, self.s2, self.n):
                dist.all_reduce(t)
        return self

    def statistics(self):
        from tarflow.fid import FIDStatistics

        n = self.n.item()
        mu = self.s1 / n
        sigma = (self.s2 - n * torch.outer(mu, mu)) / (n - 1)
        return FIDStatistics(mu.cpu().numpy(), sigma.cpu().numpy(), int(n))


def inception_weights_file(spec: str | None, storage, sha256: str | None = None) -> str | None:
    """A local weights file for torch-fidelity's Inception, from the config's eval.fid.inception_weights (a local
    path, s3://... or fid-helper), checked against eval.fid.inception_sha256 when that pins it.

    An s3:// file is cached on the node under its content's sha256 (an object replaced under the same name is
    never served stale), written under a temporary name and renamed; a pinned copy already in the cache is not
    fetched again. tarflow.fid.load_inception_weights reads the file: tensors only, nothing in it runs."""
    if not spec:
        return None
    if not Sha256().accepts(sha256):
        raise ExperimentError(f"eval.fid.inception_sha256 {sha256!r} is not a sha256 (64 lowercase hex digits)")
    cache = Path(os.environ.get("TARFLOW_CACHE", Path.home() / ".cache" / "tarflow"))
    if spec == "fid-helper":
        from tarflow.fid import convert_fid_helper_weights

        path = cache / "inception-fid-helper.pth"
        if not path.exists():
            cache.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            convert_fid_helper_weights(tmp)
            os.replace(tmp, path)  # atomic: workers on one node may convert at the same time
    elif spec.startswith("s3://"):
        return str(_fetched_weights(spec, sha256, storage.endpoint_url if storage else None, cache))
    else:
        path = Path(spec)
        if not path.is_file():
            raise ExperimentError(f"eval.fid.inception_weights {spec} does not exist")
    _check_pin(path, sha256, spec)
    return str(path)


def _check_pin(path: Path, sha256: str | None, where: str, digest: str | None = None) -> None:
    """digest: the file's, when already computed."""
    if sha256 and (digest := digest or sha256_file(path)) != sha256:
        raise ExperimentError(f"eval.fid.inception_weights {where}: its sha256 is {digest[:12]}…, "
                              f"eval.fid.inception_sha256 says {sha256[:12]}…: the file changed, or the pin is wrong")


def _fetched_weights(uri: str, sha256: str | None, endpoint_url: str | None, cache: Path) -> Path:
    """This node's copy of an s3:// weights file, named by its sha256 and checked against the pin."""
    cache.mkdir(parents=True, exist_ok=True)
    with file_lock(cache / "inception.lock"):  # the ranks of a node fetch once
        if sha256 and (cached := cache / f"inception-{sha256}.pth").is_file():
            if sha256_file(cached) == sha256:
                return cached
            cached.unlink()  # damaged: fetched again below
        parent, name = uri.rstrip("/").rsplit("/", 1)
        part = cache / f".inception-{os.getpid()}.part"
        try:
            RunStorage(parent, endpoint_url).download(name, part)
        except FileNotFoundError:
            raise ExperimentError(f"eval.fid.inception_weights {uri} does not exist") from None
        try:
            digest = sha256_file(part)
            _check_pin(part, sha256, uri, digest)
            path = cache / f"inception-{digest}.pth"
            os.replace(part, path)
        finally:
            part.unlink(missing_ok=True)
    return path


def uses_fid(cfg) -> bool:
    return bool(cfg.eval.fid.enabled or cfg.eval.periodic_fid_samples or cfg.sample.fid)


def check_inception_weights(spec: str | None, sha256: str | None, require_file: bool) -> None:
    """On the driver, before any work: a local weights file must exist (when require_file), match its pin and hold
    only tensors. s3:// and fid-helper weights, and a local file absent here (a path on the cluster's nodes, for a
    dry run or a submission), are checked where they are read, on the workers."""
    if not spec or spec == "fid-helper" or spec.startswith("s3://") or not (require_file or Path(spec).is_file()):
        return
    from tarflow.fid import load_inception_weights

    path = inception_weights_file(spec, None, sha256)
    try:
        load_inception_weights(path)
    except ConfigError as e:
        raise ExperimentError(f"eval.fid.inception_weights: {e}") from None


def reference_stats_relpath(data_cfg: DataConfig, fid_cfg) -> str:
    """Where a data set's reference statistics are cached in storage: keyed by its content digest (lineage.py),
    the transform and the reference protocol, so other data under the same root never reuses them."""
    from tarflow.fid import reference_stats_key

    plain = dataclasses.replace(data_cfg, flip=False)
    _, digest = dataset_digest(plain)
    return fid_stats_path(reference_stats_key(plain.name, plain.image_size or 0, {
        "data": digest, "fit": plain.fit, "channels": plain.channels, "limit": plain.limit,
        "reference_images": fid_cfg.reference_images, "flips": fid_cfg.flips, "split": "train"}))


def reference_statistics(data_cfg: DataConfig, fid_cfg, storage, extractor, rank: int, world: int,
                         device: torch.device):
    """Training-set statistics (with flips), computed once per data set × resolution × transform and
    cached in storage; each rank featurises its shard. Returns the statistics on every rank."""
    from tarflow.fid import FEATURE_DIM, FIDStatistics

    if data_cfg.name == "prepared" and fid_cfg.flips and not fid_cfg.reference_images:
        from tarflow.fid import prepared_fid_statistics

        stored = prepared_fid_statistics(data_cfg.root)  # made where the data was prepared, on the paper's protocol
        if stored is not None:
            return stored
    relpath = reference_stats_relpath(data_cfg, fid_cfg) if rank == 0 else None
    cached = [storage.read_bytes(relpath) if rank == 0 else None]
    if world > 1:  # one rank decides: two ranks reading while another run writes could part ways and hang
        dist.broadcast_object_list(cached, src=0)
    if cached[0] is not None:
        return FIDStatistics.load(io.BytesIO(cached[0]))
    train = load_dataset(dataclasses.replace(data_cfg, flip=False), "train")
    if fid_cfg.reference_images:
        train = torch.utils.data.Subset(train, range(min(fid_cfg.reference_images, len(train))))
    shard = torch.utils.data.Subset(train, range(rank, len(train), world))
    moments = FeatureMoments(FEATURE_DIM, device)
    for x, _ in DataLoader(shard, batch_size=fid_cfg.batch_size):
        moments.add(extractor(x))
        if fid_cfg.flips:
            moments.add(extractor(x.flip(-1)))
    stats = moments.all_reduce(world).statistics()
    if rank == 0:
        buf = io.BytesIO()
        stats.save(buf)
        storage.write_bytes(relpath, buf.getvalue())
    return stats


def sample_fid(model: tarflow.TarFlow, eval_cfg, noise_std: float | None, reference, extractor, rank: int,
               world: int, device: torch.device, seed: int) -> float:
    """FID of eval.fid.num_samples samples, each rank drawing its share; samples clipped to [−1, 1]."""
    from tarflow.fid import FEATURE_DIM, frechet_distance

    fid_cfg = eval_cfg.fid
    share = fid_cfg.num_samples // world + (rank < fid_cfg.num_samples % world)
    gen = torch.Generator(device="cpu").manual_seed(seed * 7919 + rank)
    moments = FeatureMoments(FEATURE_DIM, device)
    classes = model.config.num_classes
    for start in range(0, share, fid_cfg.batch_size):
        b = min(fid_cfg.batch_size, share - start)
        y = torch.randint(classes, (b,), generator=gen).to(device) if classes else None
        moments.add(extractor(draw(model, eval_cfg, noise_std, b, y, gen, device).clamp(-1, 1)))
    return frechet_distance(moments.all_reduce(world).statistics(), reference)


# ---------------------------------------------------------------------------------------------
# One evaluation of a model: what the eval section asks for


class FIDContext:
    """The Inception network and the reference statistics, built on first use and shared by every
    evaluation of the same data (the base one and each sample-time setting of a sweep)."""

    def __init__(self, cfg: DictConfig, plan: RunPlan, storage: RunStorage, rank: int, world: int,
                 device: torch.device):
        self.cfg, self.plan, self.storage = cfg, plan, storage
        self.rank, self.world, self.device = rank, world, device
        self._extractor = self._reference = None

    def parts(self):
        if self._extractor is None:
            from tarflow.fid import InceptionFeatures

            fid_cfg = self.cfg.eval.fid
            weights = inception_weights_file(fid_cfg.inception_weights, self.storage, fid_cfg.inception_sha256)
            self._extractor = InceptionFeatures(weights, device=self.device)
            self._reference = reference_statistics(self.plan.data, self.cfg.eval.fid, self.storage, self._extractor,
                                                   self.rank, self.world, self.device)
        return self._extractor, self._reference


def evaluate_model(model: tarflow.TarFlow, cfg: DictConfig, eval_cfg: DictConfig, plan: RunPlan,
                   device: torch.device, rank: int, world: int, logger: RunLogger | None, fid: FIDContext,
                   bpd: bool, samples: bool = True, seed_offset: int = 0) -> dict:
    """Held-out BPD and FID on all ranks (each a share), the sample grid on rank 0 logged as an artifact.
    bpd/samples: whether to compute them here (a sweep's sample-time settings share one BPD)."""
    out = {}
    noise_std = training_noise_std(cfg)
    if samples and eval_cfg.fid.enabled:
        extractor, reference = fid.parts()
        out["fid"] = sample_fid(model, eval_cfg, noise_std, reference, extractor, rank, world, device,
                                seed=cfg.train.seed + seed_offset)
    if bpd:
        val = load_dataset(plan.data, "val")
        if cfg.data.val_limit:
            val = torch.utils.data.Subset(val, range(min(cfg.data.val_limit, len(val))))
        out["bpd"] = heldout_bpd(model, val, plan.per_worker_batch, device, rank, world, seed=cfg.train.seed)
    if samples and logger and eval_cfg.num_samples > 0:
        with tempfile.TemporaryDirectory() as tmp:
            path = sample_grid_png(model, Path(tmp) / "samples.png", eval_cfg, noise_std, device, seed=cfg.train.seed)
            logger.log_artifact(path, "samples")
    return out


def evaluate_settings(model: tarflow.TarFlow, cfg: DictConfig, plan: RunPlan, evaluations: list[dict], step: int,
                      device: torch.device, rank: int, world: int, tracking_uri: str, fid: FIDContext) -> dict:
    """Each evaluation ({"eval": eval section, "run_id": its MLflow run, "bpd"}) of one model, logged to its own
    run. Returns {run_id: metrics}."""
    out = {}
    for i, evaluation in enumerate(evaluations):
        logger = RunLogger(tracking_uri, evaluation["run_id"]) if rank == 0 else None
        eval_cfg = OmegaConf.create(evaluation["eval"])
        metrics = evaluate_model(model, cfg, eval_cfg, plan, device, rank, world, logger, fid,
                                 bpd=evaluation.get("bpd", False), seed_offset=1 + i)
        if logger and metrics:
            logger.log_metrics(metrics, step=step)
        out[evaluation["run_id"]] = metrics
    return out
