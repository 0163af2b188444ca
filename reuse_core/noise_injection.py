"""Prior noise injection (Faster Diffusion, Li et al. NeurIPS 2024) and an Euler/DDIM sampler that applies it.

The rule (paper, official code): before the model is evaluated at a step whose timestep ``t`` (0..1000
units) satisfies ``t < tau``, the latent gains a small multiple of the initial noise:
``z_t <- z_t + alpha * z_T`` (paper: ``alpha = 0.003``, ``tau = 500``). ``z_T`` is the latent the run
started from, in the variance-preserving parametrisation the paper's DDIM pipeline works in.

k-diffusion / ComfyUI samplers work in the variance-exploding parametrisation ``x = z * sqrt(sigma^2 +
sigma_data^2)`` (``sigma_data = 1`` for SD1.x/SDXL). There the same rule reads
``x_t <- x_t + alpha * sqrt(sigma_t^2 + sigma_data^2) * z_T`` with ``z_T = x_start / sqrt(sigma_0^2 +
sigma_data^2)``, and DDIM (eta = 0) is exactly the Euler method, so ``sample_euler_prior_noise`` reproduces
the paper's DDIM loop with injection exactly (``tests/test_noise_injection.py`` checks it against a DDIM loop
written in the paper's parametrisation). For other samplers the paper defines nothing, so hosts should
refuse injection there rather than approximate it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

PAPER_ALPHA = 0.003
PAPER_TAU = 500.0
TIMESTEP_RANGE = 1000.0


@dataclass(frozen=True)
class PriorNoiseInjection:
    """``z_t += alpha * z_T`` while ``t < tau`` (``t`` in 0..1000 timestep units). ``alpha = 0`` disables it."""

    alpha: float = 0.0
    tau: float = PAPER_TAU

    def __post_init__(self):
        if not isinstance(self.alpha, (int, float)) or not math.isfinite(self.alpha) or self.alpha < 0:
            raise ValueError(f"noise_alpha: must be a finite number >= 0 (paper: 0.003, 0 = off), got {self.alpha!r}")
        if not isinstance(self.tau, (int, float)) or not 0.0 <= self.tau <= TIMESTEP_RANGE:
            raise ValueError(f"noise_tau: must lie in 0..1000 timestep units (paper: 500), got {self.tau!r}")

    @property
    def enabled(self) -> bool:
        return self.alpha > 0

    def applies(self, timestep: float) -> bool:
        """Is the latent injected before the model evaluation at ``timestep``?"""
        return self.enabled and float(timestep) < self.tau

    def inject_vp(self, z: torch.Tensor, z_T: torch.Tensor, timestep: float) -> torch.Tensor:
        """The paper's form, on a variance-preserving latent ``z``."""
        return z + self.alpha * z_T if self.applies(timestep) else z

    def inject_ve(
        self, x: torch.Tensor, sigma: float, z_T: torch.Tensor, timestep: float, sigma_data: float = 1.0
    ) -> torch.Tensor:
        """The same rule on a k-diffusion latent ``x = z * sqrt(sigma^2 + sigma_data^2)``."""
        if not self.applies(timestep):
            return x
        return x + (self.alpha * ve_scale(sigma, sigma_data)) * z_T


def ve_scale(sigma: float | torch.Tensor, sigma_data: float = 1.0) -> float:
    """``sqrt(sigma^2 + sigma_data^2)``: k-diffusion latent = variance-preserving latent times this."""
    sigma = float(sigma)
    return math.sqrt(sigma * sigma + sigma_data * sigma_data)


def initial_noise_vp(x_start: torch.Tensor, sigma_start: float | torch.Tensor, sigma_data: float = 1.0) -> torch.Tensor:
    """``z_T``: the run's starting k-diffusion latent in the variance-preserving parametrisation."""
    return x_start / ve_scale(sigma_start, sigma_data)


def sample_euler_prior_noise(
    model,
    x,
    sigmas,
    extra_args=None,
    callback=None,
    disable=None,
    *,
    injection: PriorNoiseInjection,
    timestep_of: Callable[[torch.Tensor], float],
    sigma_data: float = 1.0,
):
    """Euler (= DDIM with eta 0) with prior noise injection, in k-diffusion's sampler calling convention.

    ``model(x, sigma_batch, **extra_args) -> denoised``; ``timestep_of(sigma) -> t`` in 0..1000 units.
    With ``injection.alpha == 0`` every operation matches k-diffusion's ``sample_euler`` (no churn) one for
    one, so the result is bit-identical to it. ``disable`` (progress bar) is accepted and ignored.
    """
    extra_args = {} if extra_args is None else extra_args
    s_in = x.new_ones([x.shape[0]])
    z_T = initial_noise_vp(x, sigmas[0], sigma_data) if injection.enabled else None
    for i in range(len(sigmas) - 1):
        sigma = sigmas[i]
        if injection.enabled:
            x = injection.inject_ve(x, sigma, z_T, timestep_of(sigma), sigma_data)
        denoised = model(x, sigma * s_in, **extra_args)
        d = (x - denoised) / sigma.reshape([1] * x.ndim)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma, "denoised": denoised})
        x = x + d * (sigmas[i + 1] - sigma)
    return x
