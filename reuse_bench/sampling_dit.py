"""Euler flow sampling of the built-in DiT with classifier-free guidance, and the hook point the methods use.

Mirrors ``sampling.py`` for the U-Net: one transformer call per step on the batch ``[uncond rows | cond rows]``;
a method changes sampling only through a ``DiTPredictor``: ``predict(step, x, sigma, text, pooled) -> velocity``
for the whole CFG batch (``x`` images ``[2N, 1, 32, 32]``, ``sigma`` a scalar tensor). The sampler is the
first-order Euler step of rectified flow, ``x <- x + (sigma_next - sigma) * v``, on ``builtin_dit.flow_sigmas``
(what ComfyUI's ``euler`` does with the same sigmas).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .builtin_dit import DEFAULT_GUIDANCE, DEFAULT_STEPS, NULL_CLASS, BuiltinDiT, flow_sigmas, initial_noise
from .sampling import SampleSpec


class DiTPredictor:
    """The plain transformer call; methods subclass this (or patch the transformer) and override ``predict``."""

    def __init__(self, model: BuiltinDiT):
        self.model = model

    def begin(self, sigmas: torch.Tensor) -> None:
        """Called once per sampling run, before the first step, with the run's sigmas (steps + 1 of them)."""

    def predict(
        self, step: int, x: torch.Tensor, sigma: torch.Tensor, text: torch.Tensor, pooled: torch.Tensor
    ) -> torch.Tensor:
        return self.model.velocity(x, sigma, text, pooled)

    def end(self) -> None:
        """Called once per sampling run, after the last step (also on error)."""


@dataclass(frozen=True)
class DiTSampleSpec(SampleSpec):
    """``SampleSpec`` with the DiT's default step count and guidance."""

    steps: int = DEFAULT_STEPS
    guidance: float = DEFAULT_GUIDANCE


@torch.no_grad()
def sample_dit(model: BuiltinDiT, spec: DiTSampleSpec, predictor: DiTPredictor | None = None) -> torch.Tensor:
    """Final images ``[N, 1, 32, 32]`` in about [-1, 1]."""
    predictor = predictor or DiTPredictor(model)
    sigmas = flow_sigmas(spec.steps)
    labels = torch.tensor(spec.labels)
    text, pooled = model.conds(torch.cat([torch.full_like(labels, NULL_CLASS), labels]))
    x = initial_noise(spec.seeds)
    predictor.begin(sigmas)
    try:
        for i in range(spec.steps):
            v = predictor.predict(i, torch.cat([x, x]), sigmas[i], text, pooled)
            v_uncond, v_cond = v.chunk(2)
            x = x + (sigmas[i + 1] - sigmas[i]) * (v_uncond + spec.guidance * (v_cond - v_uncond))
    finally:
        predictor.end()
    return x
