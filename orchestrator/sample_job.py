"""The sample job's workers (python -m orchestrator.sample is its driver): many samples of one model drawn on
every Ray worker, assembled by rank 0 into one npz in the layout the ADM evaluation suite reads, a PNG grid,
and optionally their FID.

Samples come in chunks of sample.batch_size; chunk k holds samples k·B.. and is drawn from noise seeded by
(sample.seed, k), rank r drawing chunks r, r + world, ...: the same samples whatever the number of workers.
"""

from __future__ import annotations

import tempfile
import zipfile
from pathlib import Path

import numpy as np
import ray.train
import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from tarflow.data import to_uint8
from tarflow.fid import FEATURE_DIM, frechet_distance

from .datacache import on_this_node
from .evaluation import FeatureMoments, FIDContext, draw, save_grid, training_noise_std
from .plan import plan_run
from .rundir import SAMPLES_FILE, RunDir
from .trainer import this_worker
from .weights import WeightsSource, load_model


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
    """Ray Train entry. config: {"cfg", "source", "weights" (a WeightsSource dict), "storage", "out" (the job's
    directory in that storage), "need_data"}. Rank 0 writes the npz, the grid and the job's final metrics."""
    rank, world, device, storage = this_worker(config)
    cfg = OmegaConf.create(config["cfg"])
    plan = plan_run(cfg, source=config["source"], require_data=config["need_data"])
    out = RunDir(storage, config["out"])
    model, _ = load_model(WeightsSource(**config["weights"]), plan.model, device)
    fid = None
    if cfg.sample.fid:
        plan.data = on_this_node(plan.data, cfg.storage.endpoint_url, cfg.data.cache_dir)
        fid = FIDContext(cfg, plan, storage, rank, world, device)
    s = cfg.sample
    chunks = -(-s.num_samples // s.batch_size)
    with tempfile.TemporaryDirectory() as tmp:
        moments = draw_chunks(model, cfg, plan.model.num_classes, range(rank, chunks, world), out, Path(tmp), fid,
                              device)
        metrics = {}
        if fid is not None:
            metrics["fid"] = frechet_distance(moments.all_reduce(world).statistics(), fid.parts()[1])
        if world > 1:
            dist.barrier()
        if rank == 0:
            assemble(out, cfg, plan.model, chunks, Path(tmp))
            out.write_final({"metrics": metrics, "num_samples": s.num_samples})
    ray.train.report({"samples": s.num_samples, **metrics})


def draw_chunks(model, cfg, num_classes: int, chunks, out: RunDir, tmp: Path, fid: FIDContext | None,
                device: torch.device) -> FeatureMoments | None:
    """This rank's chunks, each drawn from its own seed and stored as out/parts/chunk-<k>.npz; their Inception
    feature moments when FID is asked for."""
    s = cfg.sample
    noise_std = training_noise_std(cfg)
    moments = FeatureMoments(FEATURE_DIM, device) if fid is not None else None
    for k in chunks:
        idx = torch.arange(k * s.batch_size, min(s.num_samples, (k + 1) * s.batch_size))
        y = sample_labels(idx, num_classes, s.classes)
        gen = torch.Generator(device="cpu").manual_seed(s.seed * 1_000_003 + k)
        x = draw(model, cfg.eval, noise_std, len(idx), None if y is None else y.to(device), gen, device).clamp(-1, 1)
        if moments is not None:
            moments.add(fid.parts()[0](x))
        part = tmp / f"chunk-{k:07d}.npz"
        np.savez(part, images=to_uint8(x).permute(0, 2, 3, 1).cpu().numpy(),
                 labels=(y if y is not None else torch.full_like(idx, -1)).numpy())
        out.storage.upload(part, out.sample_part(k))
    return moments


def assemble(out: RunDir, cfg, model_config, chunks: int, tmp: Path) -> None:
    """Rank 0: every chunk, in order, into one npz and a grid of the first sample.grid; the parts deleted."""
    s = cfg.sample
    parts = [out.storage.download(out.sample_part(k), tmp / "all" / f"{k:07d}.npz") for k in range(chunks)]
    shape = (model_config.image_size, model_config.image_size, model_config.in_channels)
    write_npz(tmp / SAMPLES_FILE, parts, s.num_samples, shape, bool(model_config.num_classes))
    out.storage.upload(tmp / SAMPLES_FILE, out.path(SAMPLES_FILE))
    if s.grid:
        shown = []
        for part in parts:
            if sum(len(p) for p in shown) >= s.grid:
                break
            with np.load(part) as chunk:
                shown.append(torch.from_numpy(chunk["images"]).permute(0, 3, 1, 2).float() / 127.5 - 1)
        grid = save_grid(torch.cat(shown)[: s.grid], tmp / "grid.png")
        out.write_grid(grid.read_bytes())
    out.delete_parts()
