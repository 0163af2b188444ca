"""Fidelity metrics against the full-compute output of the same seed: PSNR and SSIM."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def psnr(image: torch.Tensor, reference: torch.Tensor, data_range: float | None = None) -> float:
    """Peak signal-to-noise ratio in dB; ``inf`` for identical inputs.

    ``data_range`` defaults to the reference's peak-to-peak range, which is what a latent
    (no fixed [0, 1] range) needs; pass 1.0 or 255.0 for images.
    """
    image = image.detach().double()
    reference = reference.detach().double()
    if image.shape != reference.shape:
        raise ValueError(f"shape mismatch: {tuple(image.shape)} vs {tuple(reference.shape)}")
    mse = torch.mean((image - reference) ** 2).item()
    if mse == 0.0:
        return math.inf
    if data_range is None:
        data_range = (reference.max() - reference.min()).item() or 1.0
    return 10.0 * math.log10(data_range**2 / mse)


def _gaussian_window(size: int, sigma: float, channels: int, dtype, device) -> torch.Tensor:
    coords = torch.arange(size, dtype=dtype, device=device) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = g / g.sum()
    window = torch.outer(g, g)
    return window.expand(channels, 1, size, size).contiguous()


def ssim(
    image: torch.Tensor, reference: torch.Tensor, data_range: float = 1.0, window_size: int = 11, sigma: float = 1.5
) -> float:
    """Mean structural similarity (Wang et al. 2004, Gaussian 11x11, sigma 1.5) over ``[B, C, H, W]``."""
    if image.shape != reference.shape:
        raise ValueError(f"shape mismatch: {tuple(image.shape)} vs {tuple(reference.shape)}")
    if image.dim() == 3:
        image, reference = image[None], reference[None]
    x = image.detach().double()
    y = reference.detach().double()
    channels = x.shape[1]
    size = min(window_size, x.shape[-1], x.shape[-2])
    window = _gaussian_window(size, sigma, channels, x.dtype, x.device)
    c1 = (0.01 * data_range) ** 2
    c2 = (0.03 * data_range) ** 2
    mu_x = F.conv2d(x, window, groups=channels)
    mu_y = F.conv2d(y, window, groups=channels)
    var_x = F.conv2d(x * x, window, groups=channels) - mu_x**2
    var_y = F.conv2d(y * y, window, groups=channels) - mu_y**2
    cov = F.conv2d(x * y, window, groups=channels) - mu_x * mu_y
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return float(ssim_map.mean())
