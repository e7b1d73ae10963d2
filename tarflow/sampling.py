"""Sampling: the guided inverse (TarFlow.reverse, or its Jacobi form in jacobi.py) plus score-based denoising."""

from __future__ import annotations

import torch

from .jacobi import DEFAULT_TOL, JacobiPlan, jacobi_reverse
from .model import ConfigError, TarFlow

SAMPLERS = ("sequential", "jacobi")


def score(model: TarFlow, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
    """∇_x log p(x | y) from the flow's own exact log-density: one backward pass. (B, C, H, W)"""
    with torch.inference_mode(False), torch.enable_grad():
        x = x.detach().clone().requires_grad_(True)
        logp = model.log_prob(x, None if y is None else y.clone())
        (grad,) = torch.autograd.grad(logp.sum(), x)  # samples are independent: the sum's grad is per-sample
    return grad


def denoise(model: TarFlow, x: torch.Tensor, y: torch.Tensor | None = None, sigma: float = 0.05,
            step: float = 1.0) -> torch.Tensor:
    """One Tweedie step x̂ = x + step·σ²·∇_x log p(x). step=1 is the theoretical optimum."""
    return x + step * sigma**2 * score(model, x, y).to(x.dtype)


def sample(model: TarFlow, n: int, y: torch.Tensor | None = None, guidance: float = 0.0,
           annealed_guidance: bool = False, attn_temp: float = 1.0, denoise_sigma: float | None = None,
           denoise_step: float = 1.0, generator: torch.Generator | None = None,
           device: torch.device | str | None = None, sampler: str = "sequential", jacobi_tol: float = DEFAULT_TOL,
           jacobi_max_iters: int | None = None, jacobi_plan: JacobiPlan | None = None) -> torch.Tensor:
    """n images (n, C, H, W) on the [−1, 1] scale (not clipped: clip for display or FID).

    denoise_sigma: the training noise σ; when set, one denoising step follows the inverse.
    sampler: "sequential" (TarFlow.reverse, token by token with a KV cache) or "jacobi" (parallel
    fixed-point iteration per block, see jacobi.py: jacobi_tol, jacobi_max_iters and a jacobi_plan
    from plan_jacobi; its diagnostics come from calling jacobi_reverse directly).
    """
    if sampler not in SAMPLERS:
        raise ConfigError(f"unknown sampler {sampler!r}; valid samplers: {', '.join(SAMPLERS)}")
    c = model.config
    device = device or next(model.parameters()).device
    z = torch.randn(n, c.in_channels, c.image_size, c.image_size, generator=generator,
                    device=generator.device if generator is not None else device).to(device)
    if y is not None:
        y = y.to(device)
    was_training = model.training
    model.eval()
    try:
        if sampler == "jacobi":
            x, _ = jacobi_reverse(model, z, y, guidance=guidance, annealed_guidance=annealed_guidance,
                                  attn_temp=attn_temp, tol=jacobi_tol, max_iters=jacobi_max_iters, plan=jacobi_plan)
        else:
            x = model.reverse(z, y, guidance=guidance, annealed_guidance=annealed_guidance, attn_temp=attn_temp)
        if denoise_sigma:
            x = denoise(model, x, y, sigma=denoise_sigma, step=denoise_step)
    finally:
        model.train(was_training)
    return x


def sample_grid(images: torch.Tensor, nrow: int = 8) -> torch.Tensor:
    """(B, C, H, W) in [−1, 1] -> one uint8 image (H', W', 3) for saving as PNG."""
    import torchvision

    grid = torchvision.utils.make_grid(images.float().clamp(-1, 1).cpu(), nrow=nrow, padding=2, pad_value=1.0,
                                       normalize=True, value_range=(-1, 1))
    return (grid * 255).round().to(torch.uint8).permute(1, 2, 0)
