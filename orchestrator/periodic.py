"""Periodic evaluation during training: what a researcher watches while a long run trains.

Every `eval.every_steps` training steps, all ranks together evaluate the model that the final evaluation
would (the EMA when the run keeps one) and rank 0 logs, at that training step:

- `periodic/bpd`: held-out bits/dim on a fixed validation subset (the first `eval.periodic_val_images` of the
  val split, each dequantised once with its own seed), so the curve moves only with the model;
- the image `samples` (MLflow's time-stepped images: the UI's step slider plays the run): a grid of
  `eval.periodic_samples` images from the same noise and labels at every step;
- `periodic/fid` with `eval.periodic_fid_samples` > 0: a small-sample FID (biased upwards; for trends only);
- `periodic/seconds` (this evaluation's wall time) and `periodic/share` (evaluation time so far over the
  run's time since this process started training).

These are named apart from the final evaluation's `bpd` and `fid`, which use the whole held-out set and
eval.fid.num_samples and are not comparable with them.

The training trajectory is exactly the same with and without it: training draws nothing from the global RNG
(its randomness is keyed by seed, step and position: tarflow.randomness), the evaluation's own draws use
explicit generators (and the global state is restored around it all, for library code that draws), the
model's mode and state are left as they were, and the wrapped (DDP) module is never called. Ranks share
the work: BPD by a stride over the subset, sample chunks round-robin, FID samples by count; every rank takes
part in each collective. Evaluation steps are the multiples of every_steps that a process trains through, so
a resume neither repeats nor skips one, and the logger delivers each (key, step) once if a step is
evaluated again after a crash.
"""

from __future__ import annotations

import io
import math
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from omegaconf import OmegaConf

import tarflow
from tarflow.data import load_dataset
from tarflow.likelihood import LOG_128

from .evaluation import FIDContext, draw, sample_fid, training_noise_std

IMAGE_KEY = "samples"
SEED = 20_241_206  # a fixed stream of its own, apart from the final evaluation's (train.seed based)
INCEPTION_FLOPS = 11.4e9  # TF-FID Inception-v3 on one 299×299 image: 5.7 G multiply-adds


@dataclass
class PeriodicEvaluation:
    every: int
    cfg: object
    model_config: tarflow.TarFlowConfig
    device: torch.device
    rank: int
    world: int
    batch_size: int
    fid: FIDContext
    val_x: torch.Tensor | None = None  # this rank's share of the fixed subset, dequantised once
    val_y: torch.Tensor | None = None
    val_count: int = 0                 # images in the whole subset
    started: float = field(default_factory=time.perf_counter)
    seconds: float = 0.0

    def due(self, step: int) -> bool:
        return step % self.every == 0

    def __call__(self, model: tarflow.TarFlow, step: int, logger=None, board=None) -> float:
        """Evaluate at `step` on every rank; rank 0 logs. Returns the seconds it took."""
        t0 = time.perf_counter()
        devices = [self.device] if self.device.type == "cuda" else []
        was_training = model.training
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            model.eval()
            try:
                metrics = {}
                if self.val_count:
                    metrics["periodic/bpd"] = self.bpd(model)
                grid = self.grid(model) if self.cfg.eval.periodic_samples else None
                if self.cfg.eval.periodic_fid_samples:
                    metrics["periodic/fid"] = self.small_fid(model)
            finally:
                model.train(was_training)
        seconds = time.perf_counter() - t0
        self.seconds += seconds
        metrics["periodic/seconds"] = seconds
        metrics["periodic/share"] = self.seconds / max(1e-9, time.perf_counter() - self.started)
        if logger is not None:
            logger.log_metrics(metrics, step=step)
            if grid is not None:
                logger.log_image(grid, IMAGE_KEY, step)
        if board is not None:
            board.progress.remote({"kind": "evaluation", "step": step, **metrics})
        return seconds

    def bpd(self, model: tarflow.TarFlow) -> float:
        total = torch.zeros(2, dtype=torch.float64, device=self.device)  # sum of BPD, count
        conditional = bool(model.config.num_classes)
        with torch.autocast(device_type=self.device.type, enabled=False):
            for start in range(0, len(self.val_x), self.batch_size):
                x = self.val_x[start : start + self.batch_size]
                y = self.val_y[start : start + self.batch_size] if conditional else None
                bpd = (tarflow.nll_per_dim(model, x, y) + LOG_128) / math.log(2.0)
                total += torch.stack([bpd.double().sum(), torch.tensor(float(len(bpd)), device=self.device)])
        if self.world > 1:
            dist.all_reduce(total)
        return (total[0] / total[1]).item()

    def grid(self, model: tarflow.TarFlow) -> bytes | None:
        """The grid as PNG bytes on rank 0 (None elsewhere). Chunk j of eval.sample_batch_size images always
        has the same noise and labels, whichever rank draws it, so frames compare across steps and restarts."""
        from PIL import Image

        e, n = self.cfg.eval, self.cfg.eval.periodic_samples
        chunk, classes = e.sample_batch_size, self.model_config.num_classes
        noise_std = training_noise_std(self.cfg)
        mine = []
        for j in range(self.rank, math.ceil(n / chunk), self.world):
            start = j * chunk
            b = min(chunk, n - start)
            y = torch.arange(start, start + b) % classes if classes else None
            x = draw(model, e, noise_std, b, None if y is None else y.to(self.device),
                     torch.Generator().manual_seed(SEED + j), self.device)
            mine.append((j, x.float().cpu()))
        chunks = [mine]
        if self.world > 1:
            chunks = [None] * self.world
            dist.all_gather_object(chunks, mine)
        if self.rank != 0:
            return None
        images = torch.cat([x for _, x in sorted(c for part in chunks for c in part)])
        buf = io.BytesIO()
        Image.fromarray(tarflow.sample_grid(images, nrow=max(1, int(n**0.5))).numpy()).save(buf, format="PNG")
        return buf.getvalue()

    def small_fid(self, model: tarflow.TarFlow) -> float:
        eval_cfg = OmegaConf.merge(self.cfg.eval, {"fid": {"num_samples": self.cfg.eval.periodic_fid_samples}})
        noise_std = training_noise_std(self.cfg)
        extractor, reference = self.fid.parts()  # built on first use, shared with the final evaluation
        return sample_fid(model, eval_cfg, noise_std, reference, extractor, self.rank, self.world, self.device,
                          seed=SEED)


def start_periodic(cfg, plan, device: torch.device, rank: int, world: int, fid: FIDContext
                   ) -> PeriodicEvaluation | None:
    """The periodic evaluation of a run (None when eval.every_steps is null), with this rank's share of the
    fixed validation subset loaded and dequantised once."""
    if not cfg.eval.every_steps:
        return None
    p = PeriodicEvaluation(every=cfg.eval.every_steps, cfg=cfg, model_config=plan.model, device=device, rank=rank,
                           world=world, batch_size=plan.per_worker_batch, fid=fid)
    if cfg.eval.periodic_val_images:
        val = load_dataset(plan.data, "val")
        n = min(cfg.eval.periodic_val_images, len(val), cfg.data.val_limit or len(val))
        mine = range(rank, n, world)
        # each image its own dequantisation noise, whichever rank holds it
        p.val_x = torch.cat([tarflow.dequantize_uniform(val.image(i)[None], torch.Generator().manual_seed(SEED + i))
                             for i in mine]).to(device) if len(mine) else torch.empty(0, device=device)
        p.val_y = torch.stack([val.labels[i] for i in mine]).to(device) if len(mine) else None
        p.val_count = n
    return p


# ---------------------------------------------------------------------------------------------
# What it costs, before a run starts


def periodic_flops(cfg, model: tarflow.TarFlowConfig) -> float:
    """Model FLOPs of one periodic evaluation: a forward per BPD image; sampling ≈ one forward per image
    (every token of every block once, through the KV cache), twice with guidance, plus a forward and a
    backward for the denoising step; FID adds Inception on each sample."""
    e = cfg.eval
    fwd = model.flops_per_image(training=False)
    per_sample = fwd * (2 if e.guidance else 1) + (3 * fwd if e.denoise and cfg.train.noise == "gaussian" else 0)
    return (e.periodic_val_images * fwd + e.periodic_samples * per_sample
            + e.periodic_fid_samples * (per_sample + INCEPTION_FLOPS))


def periodic_share(cfg, model: tarflow.TarFlowConfig) -> float | None:
    """Periodic evaluation's share of the run's FLOPs (training: forward + backward of every training image)."""
    if not cfg.eval.every_steps:
        return None
    train = cfg.eval.every_steps * cfg.train.batch_size * model.flops_per_image(training=True)
    flops = periodic_flops(cfg, model)
    return flops / (flops + train)


def describe_watching(cfg, model: tarflow.TarFlowConfig) -> str:
    """The dry run's line on what is watched during training and what the periodic evaluation costs."""
    e = cfg.eval
    interval = cfg.tracking.system_metrics_interval
    system = f"system metrics of every node every {interval:g} s" if interval else "system metrics off"
    if not e.every_steps:
        return f"watching    {system}; periodic evaluation off (eval.every_steps=null)"
    share = periodic_share(cfg, model)
    parts = [f"BPD on {e.periodic_val_images} held-out images" if e.periodic_val_images else "",
             f"a grid of {e.periodic_samples}" if e.periodic_samples else "",
             f"FID of {e.periodic_fid_samples} samples" if e.periodic_fid_samples else ""]
    return (f"watching    {system}; every {e.every_steps} steps {', '.join(p for p in parts if p) or 'nothing'}: "
            f"≈{share:.2%} of the run's FLOPs (sampling goes token by token at a lower utilisation than training, "
            "so its share of the time is larger: each evaluation logs the measured periodic/share)")
