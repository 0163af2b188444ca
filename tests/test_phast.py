import itertools

import pytest
import torch

from reuse_core.phast import neighbours, phast_search
from reuse_core.schedules import ReuseSchedule, hurry

# Toy sampler: each reuse step i adds an error of weight WEIGHTS[i] to the final "latent". The best schedule
# with r reuse steps reuses at the r smallest weights, which is not HURRY.
WEIGHTS = torch.tensor([9.0, 8.0, 7.0, 0.5, 6.0, 5.0, 0.3, 4.0, 0.2, 3.0])
REFERENCE = torch.linspace(-1.0, 1.0, 64)


def toy_run(schedule: ReuseSchedule) -> torch.Tensor:
    error = sum(float(WEIGHTS[i]) for i, bit in enumerate(schedule.bits) if bit == 0)
    return REFERENCE + 0.01 * error * torch.cos(torch.arange(64.0))


def best_by_exhaustion(steps, reuse):
    best, best_error = None, float("inf")
    for chosen in itertools.combinations(range(1, steps), reuse):
        error = float(WEIGHTS[list(chosen)].sum())
        if error < best_error:
            best, best_error = chosen, error
    return ReuseSchedule(tuple(0 if i in best else 1 for i in range(steps)))


def test_neighbours_keep_reuse_count_and_step_zero():
    start = hurry(10, 3)
    found = neighbours(start)
    assert len(found) == 6 * 3  # computes other than step 0 times reuse steps
    assert all(n.reuse_count == 3 and n.bits[0] == 1 for n in found)
    assert len(set(found)) == len(found)


def test_search_finds_the_optimum_of_the_toy_objective():
    calls = []

    def run(schedule):
        calls.append(schedule)
        return toy_run(schedule)

    result = phast_search(run, lambda: REFERENCE, steps=10, reuse=3)
    assert result.best == best_by_exhaustion(10, 3)
    assert str(result.best) == "1110110101"
    assert result.best_utility > result.start_utility
    assert len(calls) == result.evaluations == len(set(calls))  # each schedule run once
    accepted = [e.utility for e in result.history if e.accepted]
    assert accepted == sorted(accepted) and accepted[0] == result.start_utility


def test_search_stops_when_start_is_optimal():
    # Weights falling with the step index (late reuse is cheap) make HURRY optimal: one round, no accepted swap.
    def run(schedule):
        error = sum(8 - i for i, bit in enumerate(schedule.bits) if bit == 0)
        return REFERENCE + 0.01 * error

    result = phast_search(run, REFERENCE, steps=8, reuse=3)
    assert result.best == hurry(8, 3)
    assert result.rounds == 1
    assert sum(e.accepted for e in result.history) == 1


def test_search_respects_max_rounds_and_validates_start():
    result = phast_search(toy_run, REFERENCE, steps=10, reuse=3, max_rounds=1)
    assert result.rounds == 1 and result.best != hurry(10, 3)
    with pytest.raises(ValueError, match="start"):
        phast_search(toy_run, REFERENCE, steps=10, reuse=3, start=hurry(10, 2))
