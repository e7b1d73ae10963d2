"""tarflow: a faithful, fast, pure-PyTorch TarFlow (Zhai et al., arXiv 2412.06329)."""

from .jacobi import BlockPlan, JacobiPlan, JacobiStats, jacobi_reverse, plan_jacobi
from .likelihood import bits_per_dim, dequantize_uniform, nll_per_dim
from .memory import FitOption, FitPlan, checkpoint_bytes, plan_fit, training_memory
from .model import ConfigError, TarFlow, TarFlowConfig
from .randomness import initial_model
from .sampling import denoise, sample, sample_grid, score
from .training import (
    CheckpointCorrupt,
    CheckpointError,
    TrainConfig,
    TrainState,
    flow_loss,
    load_checkpoint,
    lr_at,
    make_train_state,
    model_from_checkpoint,
    restore,
    save_checkpoint,
    train_step,
    verify_checkpoint,
)

__all__ = [
    "TarFlow", "TarFlowConfig", "ConfigError", "initial_model",
    "bits_per_dim", "nll_per_dim", "dequantize_uniform",
    "sample", "denoise", "score", "sample_grid",
    "jacobi_reverse", "plan_jacobi", "JacobiPlan", "BlockPlan", "JacobiStats",
    "TrainConfig", "TrainState", "flow_loss", "make_train_state", "train_step", "lr_at",
    "save_checkpoint", "load_checkpoint", "restore", "model_from_checkpoint", "CheckpointError",
    "CheckpointCorrupt", "verify_checkpoint",
    "training_memory", "checkpoint_bytes", "plan_fit", "FitPlan", "FitOption",
]
