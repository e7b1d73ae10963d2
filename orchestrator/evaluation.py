"""Evaluation of a trained model on the Ray workers: held-out bits/dim (sharded over ranks), a sample grid,
and FID with samples drawn on every worker. Called at the end of training (train_loop.py) and on the final
checkpoint of a finished run (`evaluate_checkpoints_per_worker`: new eval settings, never a retrain)."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

import tarflow
from tarflow.data import DataConfig, ImageDataset, load_dataset, to_uint8

from .datacache import on_this_node
from .plan import RunPlan, plan_run
from .storage import RunStorage
from .tracking import BACKLOG_FILE, DRAIN_S, RunLogger
from .weights import WeightsSource, load_weights

CHECKPOINT_FILE = "state.pt"
FINAL_FILE = "final_metrics.json"  # <run>/final_metrics.json: a training run's final metrics, written by rank 0
EVALUATED_PREFIX = "evaluated-"  # <run>/evaluated-<evaluation run id>.json: an evaluation's metrics, in storage


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


def inception_weights_file(spec: str | None, storage) -> str | None:
    """A local weights file for torch-fidelity's Inception, from the config's eval.fid.inception_weights."""
    if not spec:
        return None
    cache = Path(os.environ.get("TARFLOW_CACHE", Path.home() / ".cache" / "tarflow"))
    if spec == "fid-helper":
        from tarflow.fid import convert_fid_helper_weights

        path = cache / "inception-fid-helper.pth"
        if not path.exists():
            cache.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            convert_fid_helper_weights(tmp)
            os.replace(tmp, path)  # atomic: workers on one node may convert at the same time
        return str(path)
    if spec.startswith("s3://"):
        remote = RunStorage(spec.rsplit("/", 1)[0], storage.endpoint_url)
        path = cache / ("inception-" + spec.replace("/", "_").replace(":", ""))
        if not path.exists():
            data = remote.read_bytes(spec.rsplit("/", 1)[1])
            if data is None:
                raise FileNotFoundError(f"eval.fid.inception_weights {spec} does not exist")
            cache.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        return str(path)
    if not Path(spec).is_file():
        raise FileNotFoundError(f"eval.fid.inception_weights {spec} does not exist")
    return spec


def reference_statistics(data_cfg: DataConfig, fid_cfg, storage, extractor, rank: int, world: int,
                         device: torch.device):
    """Training-set statistics (with flips), computed once per data set × resolution × transform and
    cached in storage; each rank featurises its shard. Returns the statistics on every rank."""
    from tarflow.fid import FEATURE_DIM, FIDStatistics, reference_stats_key

    if data_cfg.name == "prepared" and fid_cfg.flips and not fid_cfg.reference_images:
        from tarflow.prepared import prepared_fid_statistics

        stored = prepared_fid_statistics(data_cfg.root)  # made where the data was prepared, on the paper's protocol
        if stored is not None:
            return stored
    plain = dataclasses.replace(data_cfg, flip=False)
    key = reference_stats_key(plain.name, plain.image_size or 0, {
        "root": plain.root, "fit": plain.fit, "channels": plain.channels, "limit": plain.limit,
        "reference_images": fid_cfg.reference_images, "flips": fid_cfg.flips, "split": "train"})
    relpath = f"fid_stats/{key}"
    cached = storage.read_bytes(relpath)
    if cached is not None:
        return FIDStatistics.load(io.BytesIO(cached))
    train = load_dataset(plain, "train")
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

            weights = inception_weights_file(self.cfg.eval.fid.inception_weights, self.storage)
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


# ---------------------------------------------------------------------------------------------
# Evaluating finished runs on the Ray workers, from their final checkpoints


def load_final_model(storage: RunStorage, run_name: str, checkpoint: str, device: torch.device) -> tuple:
    """(model to evaluate (EMA weights when the run kept them), training step) of a stored checkpoint."""
    with tempfile.TemporaryDirectory() as tmp:
        local = storage.download(f"{run_name}/{checkpoint}/{CHECKPOINT_FILE}", Path(tmp) / CHECKPOINT_FILE)
        ckpt = tarflow.load_checkpoint(local, map_location="cpu")
    return tarflow.model_from_checkpoint(ckpt).to(device), int(ckpt["step"])


def evaluate_checkpoints_per_worker(config: dict) -> None:
    """Ray Train entry: config["jobs"] lists finished runs ({"cfg", "source", "run_name", "checkpoint",
    "evaluations"}); each rank loads every model and takes its share of every evaluation."""
    import ray.train
    import ray.train.torch

    from .progress import quiet_ray_train_logs

    if not config.get("verbose"):
        quiet_ray_train_logs()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    storage = RunStorage(**config["storage"])
    fid_by_data, results = {}, {}
    for job in config["jobs"]:
        cfg = OmegaConf.create(job["cfg"])
        plan = plan_run(cfg, source=job["source"])
        plan.data = on_this_node(plan.data, cfg.storage.endpoint_url, cfg.data.cache_dir)
        model, step = load_final_model(storage, job["run_name"], job["checkpoint"], device)
        data_key = repr(plan.data)
        fid = fid_by_data.setdefault(data_key, FIDContext(cfg, plan, storage, rank, world, device))
        results[job["run_name"]] = evaluate_settings(model, cfg, plan, job["evaluations"], step, device, rank, world,
                                                     config["tracking_uri"], fid)
    pending = []
    if rank == 0:  # storage first, the record of truth; then MLflow, which may be behind
        for run_name, metrics in results.items():
            for run_id, values in metrics.items():
                storage.write_text(f"{run_name}/{EVALUATED_PREFIX}{run_id}.json", json.dumps(values))
        queue = RunLogger(config["tracking_uri"], "").queue
        pending = queue.close(DRAIN_S)
        for job in config["jobs"]:
            mine = {e["run_id"] for e in job["evaluations"]}
            records = [r for r in pending if r["run_id"] in mine]
            if records:
                storage.write_text(f"{job['run_name']}/{BACKLOG_FILE}", json.dumps(records))
    ray.train.report({"evaluated": len(config["jobs"]), "tracking_pending": len(pending)})


# ---------------------------------------------------------------------------------------------
# Many samples of one model (python -m orchestrator.sample), drawn on every worker


SAMPLES_FILE = "samples.npz"  # arr_0: uint8 (N, H, W, C), arr_1: int64 labels (conditional models): ADM's layout


def sample_labels(indices: torch.Tensor, num_classes: int, classes) -> torch.Tensor | None:
    """Sample i's label: the given classes cycled through, else class-balanced (i mod num_classes)."""
    if not num_classes:
        return None
    if classes:
        pool = torch.tensor(list(classes), dtype=torch.int64)
        if int(pool.min()) < 0 or int(pool.max()) >= num_classes:
            raise ValueError(f"sample.classes {list(classes)} are not all in [0, {num_classes - 1}]")
        return pool[indices % len(pool)]
    return indices % num_classes


def write_npz(path: Path, parts: list[Path], count: int, image_shape: tuple, with_labels: bool) -> None:
    """Chunk files (each an npz of "images" (b, H, W, C) uint8 and "labels") into one npz, streamed: the
    whole array is never in memory (50,000 samples at 256² are 9.8 GB)."""
    members = [("arr_0", "images", "|u1", (count, *image_shape))]
    if with_labels:
        members.append(("arr_1", "labels", "<i8", (count,)))
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as z:
        for member, key, descr, shape in members:
            with z.open(f"{member}.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array_header_1_0(f, {"descr": descr, "fortran_order": False, "shape": shape})
                for part in parts:
                    with np.load(part) as chunk:
                        f.write(np.ascontiguousarray(chunk[key]).tobytes())


def sample_per_worker(config: dict) -> None:
    """Ray Train entry of orchestrator.sample. config: {"cfg", "source", "weights" (a WeightsSource dict),
    "storage", "out" (a directory in that storage), "need_data"}.

    Samples come in chunks of sample.batch_size; chunk k holds samples k·B.. and is drawn from noise seeded by
    (sample.seed, k), rank r drawing chunks r, r + world, ...: the same samples whatever the number of workers.
    Rank 0 assembles them, in order, into one npz, a PNG grid and result.json in storage."""
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    cfg = OmegaConf.create(config["cfg"])
    plan = plan_run(cfg, source=config["source"], require_data=config["need_data"])
    storage, out = RunStorage(**config["storage"]), config["out"]
    weights, ema = load_weights(WeightsSource(**config["weights"]), plan.model)
    model = tarflow.TarFlow(plan.model)
    model.load_state_dict(ema if ema is not None else weights)
    model.to(device).eval()
    s = cfg.sample
    noise_std = training_noise_std(cfg)
    fid = None
    if s.fid:
        plan.data = on_this_node(plan.data, cfg.storage.endpoint_url, cfg.data.cache_dir)
        fid = FIDContext(cfg, plan, storage, rank, world, device)
        extractor, reference = fid.parts()
        from tarflow.fid import FEATURE_DIM

        moments = FeatureMoments(FEATURE_DIM, device)
    chunks = -(-s.num_samples // s.batch_size)
    with tempfile.TemporaryDirectory() as tmp:
        for k in range(rank, chunks, world):
            idx = torch.arange(k * s.batch_size, min(s.num_samples, (k + 1) * s.batch_size))
            y = sample_labels(idx, plan.model.num_classes, s.classes)
            gen = torch.Generator(device="cpu").manual_seed(s.seed * 1_000_003 + k)
            x = draw(model, cfg.eval, noise_std, len(idx), None if y is None else y.to(device), gen, device)
            x = x.clamp(-1, 1)
            if fid is not None:
                moments.add(extractor(x))
            images = to_uint8(x).permute(0, 2, 3, 1).cpu().numpy()
            part = Path(tmp) / f"chunk-{k:07d}.npz"
            np.savez(part, images=images, labels=(y if y is not None else torch.full_like(idx, -1)).numpy())
            storage.write_bytes(f"{out}/parts/{part.name}", part.read_bytes())
        metrics = {}
        if fid is not None:
            from tarflow.fid import frechet_distance

            metrics["fid"] = frechet_distance(moments.all_reduce(world).statistics(), reference)
        if world > 1:
            dist.barrier()
        if rank == 0:
            parts = []
            for k in range(chunks):
                parts.append(storage.download(f"{out}/parts/chunk-{k:07d}.npz", Path(tmp) / "all" / f"{k:07d}.npz"))
            shape = (plan.model.image_size, plan.model.image_size, plan.model.in_channels)
            write_npz(Path(tmp) / SAMPLES_FILE, parts, s.num_samples, shape, bool(plan.model.num_classes))
            storage.upload(Path(tmp) / SAMPLES_FILE, f"{out}/{SAMPLES_FILE}")
            shown = []
            for part in parts:
                if sum(len(p) for p in shown) >= s.grid:
                    break
                with np.load(part) as chunk:
                    shown.append(torch.from_numpy(chunk["images"]).permute(0, 3, 1, 2).float() / 127.5 - 1)
            if s.grid:
                grid = save_grid(torch.cat(shown)[: s.grid], Path(tmp) / "grid.png")
                storage.write_bytes(f"{out}/grid.png", grid.read_bytes())
            storage.delete_dir(f"{out}/parts")
            storage.write_text(f"{out}/{FINAL_FILE}", json.dumps({"metrics": metrics, "num_samples": s.num_samples}))
    ray.train.report({"samples": s.num_samples, **metrics})
