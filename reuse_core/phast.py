"""PHAST: greedy search for a reuse schedule (Hunter et al. 2024), as a plain function.

The search starts from HURRY(r) and repeatedly tries every neighbour that swaps one reuse step with one
compute step (the reuse count stays ``r``; step 0 always computes). A round evaluates all neighbours of
the current best and moves to the best one if its utility beats the current best by more than ``epsilon``;
the search stops after a round without gain (or after ``max_rounds``). Utility is PSNR of the final latent
against the full-compute reference, as in the paper. Each schedule is evaluated at most once.

``run(schedule)`` is the host's sampler: it runs the same prompt, seed and sampler with ``schedule`` and
returns the final latent. ``reference`` is the full-compute latent, or a callable returning it (called once).
Cost: about ``(steps - r - 1) * r`` sampler runs per round.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .metrics import psnr
from .schedules import ReuseSchedule, hurry


@dataclass(frozen=True)
class Evaluation:
    schedule: ReuseSchedule
    utility: float
    round: int
    accepted: bool


@dataclass
class PhastResult:
    best: ReuseSchedule
    best_utility: float
    start_utility: float
    rounds: int
    history: list[Evaluation] = field(default_factory=list)

    @property
    def evaluations(self) -> int:
        return len(self.history)


def neighbours(schedule: ReuseSchedule) -> list[ReuseSchedule]:
    """All schedules one compute/reuse swap away (step 0 stays a compute step), in a fixed order."""
    bits = schedule.bits
    found = []
    for on in range(1, len(bits)):
        if bits[on] != 1:
            continue
        for off in range(1, len(bits)):
            if bits[off] != 0:
                continue
            swapped = list(bits)
            swapped[on], swapped[off] = 0, 1
            found.append(ReuseSchedule(tuple(swapped)))
    return found


def phast_search(
    run: Callable[[ReuseSchedule], torch.Tensor],
    reference: torch.Tensor | Callable[[], torch.Tensor],
    steps: int,
    reuse: int,
    *,
    start: ReuseSchedule | None = None,
    epsilon: float = 0.0,
    max_rounds: int | None = None,
    utility: Callable[[torch.Tensor, torch.Tensor], float] = psnr,
) -> PhastResult:
    """Greedy PHAST search; returns the best schedule and every evaluation made."""
    if max_rounds is not None and max_rounds < 0:
        raise ValueError(f"max_rounds: must be >= 0, got {max_rounds}")
    if epsilon < 0:
        raise ValueError(f"epsilon: must be >= 0, got {epsilon}")
    current = start if start is not None else hurry(steps, reuse)
    if current.steps != steps or current.reuse_count != reuse:
        raise ValueError(f"start: expected {steps} steps with {reuse} reuse steps, got {current}")
    target = reference() if callable(reference) else reference

    seen: dict[ReuseSchedule, float] = {}
    history: list[Evaluation] = []

    def evaluate(schedule: ReuseSchedule, round_index: int) -> float:
        if schedule not in seen:
            value = float(utility(run(schedule), target))
            if math.isnan(value):
                raise ValueError(f"utility is NaN for schedule {schedule}")
            seen[schedule] = value
            history.append(Evaluation(schedule, value, round_index, accepted=False))
        return seen[schedule]

    best_value = evaluate(current, 0)
    history[-1] = Evaluation(current, best_value, 0, accepted=True)
    start_value = best_value
    rounds = 0
    while max_rounds is None or rounds < max_rounds:
        rounds += 1
        candidate, candidate_value = None, -math.inf
        for neighbour in neighbours(current):
            if neighbour in seen:
                continue
            value = evaluate(neighbour, rounds)
            if value > candidate_value:
                candidate, candidate_value = neighbour, value
        if candidate is None or not candidate_value > best_value + epsilon:
            break
        current, best_value = candidate, candidate_value
        index = next(i for i, e in enumerate(history) if e.schedule == candidate)
        history[index] = Evaluation(candidate, candidate_value, rounds, accepted=True)
    return PhastResult(current, best_value, start_value, rounds, history)
