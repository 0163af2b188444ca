"""Map a model call to the sampling step it belongs to, by sigma (never by counting calls).

Counting calls breaks on samplers that evaluate the model more than once per step (heun,
dpm_2, dpmpp_sde, uni_pc ...), on split cond batches and on img2img runs that start part
way down the schedule. Matching the call's sigma against the run's own sigma schedule is
robust to all of these.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Bound on a per-step text input (custom schedule, custom key steps), far above any real run (ComfyUI's samplers take
# at most 10000 steps): it keeps a pasted or generated string from costing time and memory at every sampler run.
MAX_CUSTOM_CHARS = 100_000


@dataclass(frozen=True)
class StepMatch:
    """Where a model call's sigma sits in the run's schedule.

    ``index`` is the sampling step whose start sigma equals the call's sigma, or, for an
    intermediate evaluation of a multi-evaluation sampler, the step whose interval
    ``(sigmas[i+1], sigmas[i]]`` contains it. ``exact`` tells the two apart.
    """

    index: int
    exact: bool


def match_step(sigma: float | torch.Tensor, sample_sigmas: torch.Tensor, rtol: float = 1e-4) -> StepMatch:
    """Locate ``sigma`` in ``sample_sigmas`` (length steps + 1, descending, usually ending at 0)."""
    if isinstance(sigma, torch.Tensor):
        sigma = float(sigma.flatten()[0])
    schedule = sample_sigmas.flatten().tolist()  # one device sync per call, not one per sigma
    if len(schedule) < 2:
        raise ValueError("sample_sigmas must hold at least two values (steps + 1)")
    steps = len(schedule) - 1
    for i in range(steps):
        if abs(sigma - schedule[i]) <= rtol * max(abs(schedule[i]), 1e-8):
            return StepMatch(i, True)
    for i in range(steps):
        high, low = schedule[i], schedule[i + 1]
        if low < sigma < high:
            return StepMatch(i, False)
    # Outside the schedule: above its start (rounding) or at/below its end.
    return StepMatch(0 if sigma > schedule[0] else steps - 1, False)
