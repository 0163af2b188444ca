"""Calibration (reuse_core.calibration): the DP is the exhaustive optimum, budgets, determinism, the recorder."""

import itertools
import math
import random

import pytest
import torch

from reuse_core.calibration import (
    Budget,
    ChangeRecorder,
    attention_probe,
    calibrate,
    compute_steps_for_speedup,
    drift_from_consecutive,
    optimal_compute_steps,
    schedule_cost,
    sigma_step_weights,
    subsample,
)


def random_drift(n: int, seed: int, consecutive: bool) -> list[list[float]]:
    rng = random.Random(seed)
    if consecutive:
        return drift_from_consecutive([0.0] + [rng.uniform(0, 1) ** 2 for _ in range(n - 1)])
    # arbitrary non-negative pairwise drifts (not even monotone in j): the DP must not rely on any structure
    return [[rng.uniform(0, 1) if j > i else 0.0 for j in range(n)] for i in range(n)]


def brute_force(drift, budget: int, required=(), weights=None) -> float:
    n = len(drift)
    must = {0, *required}
    best = math.inf
    for rest in itertools.combinations(range(1, n), budget - 1):
        keys = {0, *rest}
        if must <= keys:
            best = min(best, schedule_cost(drift, keys, weights))
    return best


@pytest.mark.parametrize("consecutive", [False, True])
@pytest.mark.parametrize("seed", range(6))
def test_dp_reproduces_the_exhaustive_optimum(seed, consecutive):
    n = 5 + seed % 5
    drift = random_drift(n, seed, consecutive)
    for budget in range(1, n + 1):
        found = optimal_compute_steps(drift, budget)
        assert len(found.steps) == budget and found.steps[0] == 0
        assert found.steps == tuple(sorted(set(found.steps)))
        assert found.cost == pytest.approx(schedule_cost(drift, found.steps))
        assert found.cost == pytest.approx(brute_force(drift, budget), abs=1e-12)


@pytest.mark.parametrize("seed", range(4))
def test_required_steps_are_kept_and_the_result_is_still_optimal(seed):
    drift = random_drift(8, 100 + seed, consecutive=False)
    required = (3, 6)
    for budget in range(3, 9):
        found = optimal_compute_steps(drift, budget, required)
        assert {0, 3, 6} <= set(found.steps) and len(found.steps) == budget
        assert found.cost == pytest.approx(brute_force(drift, budget, required), abs=1e-12)


@pytest.mark.parametrize("seed", range(4))
def test_weighted_dp_reproduces_the_exhaustive_optimum(seed):
    drift = random_drift(8, 200 + seed, consecutive=seed % 2 == 0)
    sigmas = [*sorted((random.Random(seed).uniform(0, 15) for _ in range(8)), reverse=True), 0.0]
    weights = sigma_step_weights(sigmas)
    for budget in range(1, 9):
        found = optimal_compute_steps(drift, budget, weights=weights)
        assert found.cost == pytest.approx(schedule_cost(drift, found.steps, weights))
        assert found.cost == pytest.approx(brute_force(drift, budget, weights=weights), abs=1e-12)
    with pytest.raises(ValueError, match="weights"):
        optimal_compute_steps(drift, 3, weights=[1.0] * 7)
    with pytest.raises(ValueError, match="weights"):
        optimal_compute_steps(drift, 3, weights=[-1.0] * 8)


def test_sigma_weights_move_compute_steps_to_where_the_sampler_moves_furthest():
    drift = drift_from_consecutive([0.0] + [1.0] * 9)  # equal change every step
    assert optimal_compute_steps(drift, 4).steps == (0, 2, 4, 7)  # unweighted: even segments, earliest on ties
    sigmas = [14.6, 8.0, 5.0, 3.0, 2.0, 1.3, 0.8, 0.5, 0.3, 0.15, 0.0]
    assert sigma_step_weights(sigmas)[:2] == pytest.approx([6.6, 3.0])
    weighted = optimal_compute_steps(drift, 4, weights=sigma_step_weights(sigmas)).steps
    assert weighted[:3] == (0, 1, 2)  # the big early sigma steps compute


def test_edge_budgets():
    drift = random_drift(7, 1, consecutive=True)
    assert optimal_compute_steps(drift, 7).steps == tuple(range(7))
    assert optimal_compute_steps(drift, 7).cost == 0
    assert optimal_compute_steps(drift, 1).steps == (0,)
    assert optimal_compute_steps([[0.0]], 1).steps == (0,)
    for bad in (0, 8, 2.5, True):
        with pytest.raises(ValueError, match="budget"):
            optimal_compute_steps(drift, bad)
    with pytest.raises(ValueError, match="budget"):
        optimal_compute_steps(drift, 2, required=(3, 5))
    with pytest.raises(ValueError, match="drift"):
        optimal_compute_steps([[0.0, -1.0], [0.0, 0.0]], 1)


def test_a_fast_changing_start_gets_the_key_steps():
    # big changes early, tiny ones late: the optimum spends its compute steps early (what the paper's set does)
    changes = [0.0] + [1.0 / (i * i) for i in range(1, 20)]
    keys = optimal_compute_steps(drift_from_consecutive(changes), 5).steps
    assert keys[:3] == (0, 1, 2) and max(keys) <= 10  # dense first steps, nothing in the slow second half


def test_speedup_budget_and_its_errors():
    # 20 steps, reuse step = half a compute step: K + (20 - K) / 2 <= 20 / 1.5 -> K <= 6.67
    assert compute_steps_for_speedup(20, 1.5, 0.5) == 6
    assert compute_steps_for_speedup(20, 1.0, 0.5) == 20
    assert compute_steps_for_speedup(20, 2.0, 0.0) == 10  # exact fit despite float rounding
    with pytest.raises(ValueError, match="target: a 3x speed-up is out of reach"):
        compute_steps_for_speedup(20, 3.0, 0.5)
    with pytest.raises(ValueError, match="target"):
        compute_steps_for_speedup(20, 0.5, 0.5)
    with pytest.raises(ValueError, match="reuse cost"):
        compute_steps_for_speedup(20, 1.5, 1.0)
    assert Budget(reuse_steps=8).compute_steps(20, 0.5) == 12
    with pytest.raises(ValueError, match="target: 20 reused steps"):
        Budget(reuse_steps=20).compute_steps(20, 0.5)
    with pytest.raises(ValueError, match="target"):
        Budget(reuse_steps=3, speedup=1.5)
    with pytest.raises(ValueError, match="target"):
        Budget(reuse_steps=-1)


def trajectory(seed: int, steps: int = 10) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    base = {"skip": torch.randn(2, 4, 8, 8, generator=gen), "middle": torch.randn(2, 8, 4, 4, generator=gen)}
    out = []
    for s in range(steps):
        scale = 1.0 / (s + 1)  # fast change early, slow late
        base = {k: v + scale * torch.randn(v.shape, generator=gen) for k, v in base.items()}
        out.append(dict(base))
    return out


def test_recorder_pairwise_drift_is_exact_for_small_tensors_and_bounded_by_consecutive():
    pairwise, consecutive = ChangeRecorder(), ChangeRecorder(pairwise=False)
    run = trajectory(0)
    for step, tensors in enumerate(run):
        for name, value in tensors.items():
            pairwise.record(step, name, value)
            consecutive.record(step, name, value)
    d = pairwise.drift(len(run))
    expected = 0.5 * sum(
        float((run[7][n] - run[2][n]).abs().mean() / run[7][n].abs().mean()) for n in ("skip", "middle")
    )
    assert d[2][7] == pytest.approx(expected, rel=1e-6)
    assert d[7][2] == 0 and d[4][4] == 0
    bound = consecutive.drift(len(run))
    assert bound[3][4] == pytest.approx(d[3][4], rel=1e-6)  # one step apart: the same quantity
    # triangle inequality in L1 (normalisations differ per step but change little here): the sum bounds the pair
    assert all(bound[i][j] >= 0.8 * d[i][j] for i in range(10) for j in range(i + 1, 10))
    only_middle = pairwise.drift(len(run), names=["middle"])
    assert only_middle[2][7] != pytest.approx(d[2][7])


def test_recorder_refuses_missing_steps_and_subsamples_deterministically():
    recorder = ChangeRecorder(max_elements=100)
    recorder.record(0, "a", torch.ones(1000))
    recorder.record(2, "a", torch.ones(1000))
    with pytest.raises(ValueError, match=r"steps \[1\] were never recorded"):
        recorder.drift(3)
    x = torch.arange(1000.0)
    assert torch.equal(subsample(x, 100), subsample(x.clone(), 100)) and subsample(x, 100).numel() == 100
    with pytest.raises(ValueError, match="max_elements"):
        ChangeRecorder(max_elements=0)


def test_attention_probe_rows_are_the_full_map_rows():
    gen = torch.Generator().manual_seed(3)
    q, k = torch.randn(2, 3, 64, 8, generator=gen), torch.randn(2, 3, 40, 8, generator=gen)
    full = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(8), dim=-1)
    probe = attention_probe(q, k, rows=16)
    assert probe.shape == (2, 3, 16, 40)
    assert torch.allclose(probe, full[:, :, ::4], atol=1e-6)
    gqa = attention_probe(q, k[:, :1], rows=16)  # one K head shared by three Q heads
    assert gqa.shape == (2, 3, 16, 40)


def test_calibration_is_deterministic_and_respects_each_budget():
    def once(seed):
        recorder = ChangeRecorder()
        for step, tensors in enumerate(trajectory(seed, 12)):
            for name, value in tensors.items():
                recorder.record(step, name, value)
        d = recorder.drift(12)
        return calibrate(d, d, Budget(speedup=1.5), encoder_reuse_cost=0.4, attention_reuse_cost=0.6)

    first, again, other = once(5), once(5), once(6)
    assert first == again
    assert len(first.key_steps) == compute_steps_for_speedup(12, 1.5, 0.4) == 5
    assert first.attention.steps == 12 and 12 - first.attention.reuse_count == compute_steps_for_speedup(12, 1.5, 0.6)
    assert "custom_key_steps: " + first.key_steps_text in first.report()
    assert str(first.attention) in first.report()
    assert other.key_cost != first.key_cost
    full = calibrate([[0.0] * 4] * 4, [[0.0] * 4] * 4, Budget(reuse_steps=0), 0.5, 0.5)
    assert full.key_steps == (0, 1, 2, 3) and str(full.attention) == "1111"
