"""Exact log-likelihood in the paper's units: nats per dimension and bits per dimension."""

from __future__ import annotations

import math

import torch

from .model import TarFlow

LOG_128 = math.log(128.0)  # the Jacobian of mapping integers in [0, 256) onto [−1, 1)


def dequantize(x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Integer images (as uint8, or as u8/127.5 − 1 in [−1, 1]) and u in [0, 1) -> (x_int + u)/128 − 1, fp32."""
    x_int = x.float() if x.dtype == torch.uint8 else torch.round((x.float() + 1) * 127.5)
    return (x_int + u) / 128.0 - 1.0


def dequantize_uniform(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """dequantize with u ~ U[0, 1)."""
    return dequantize(x, torch.rand(x.shape, generator=generator, device=x.device))


def nll_per_dim(model: TarFlow, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
    """−log p(x)/dims in nats for continuous x on the [−1, 1] scale (Gaussian constant included). (B,)"""
    return -model.log_prob(x, y) / x[0].numel()


def bits_per_dim(model: TarFlow, x_uint8: torch.Tensor, y: torch.Tensor | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """Per-sample BPD of integer images with one uniform dequantisation sample each, in fp32.

    BPD = (NLL in nats/dim on the [−1, 1] scale + log 128)/ln 2, i.e. the continuous figure + 7 bits.
    """
    with torch.autocast(device_type=x_uint8.device.type, enabled=False):
        x = dequantize_uniform(x_uint8, generator)
        return (nll_per_dim(model, x, y) + LOG_128) / math.log(2.0)
