"""Calibration (reuse_core.calibration): the DP is the exhaustive optimum (reuse and forecasts), budgets, bounded and
interruptible fits, determinism, the recorder."""

import itertools
import math
import random

import pytest
import torch

from reuse_core.calibration import (
    Budget,
    ChangeRecorder,
    FitLimits,
    attention_probe,
    calibrate,
    compute_steps_for_speedup,
    drift_from_consecutive,
    fit_compute_steps,
    forecast_cost,
    optimal_compute_steps,
    schedule_cost,
    sigma_step_weights,
    subsample,
)
from reuse_core.forecast import extrapolate


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


# --------------------------------------------------------------------------------------- forecast fits (recordings)
def recorded(n: int, seed: int, tensors: int = 3, size: int = 40) -> ChangeRecorder:
    """A curved trajectory (a forecast of every order errs on it) with some noise, recorded at every step."""
    gen = torch.Generator().manual_seed(seed)
    base, velocity = torch.randn(tensors, size, generator=gen), torch.randn(tensors, size, generator=gen)
    recorder = ChangeRecorder()
    for s in range(n):
        values = base + velocity * math.sin(0.4 * s) + 0.05 * torch.randn(tensors, size, generator=gen)
        for t in range(tensors):
            recorder.record(s, ("tensor", t), values[t])
    return recorder


def independent_cost(recorder: ChangeRecorder, n: int, keys, order: int, weights) -> float:
    """The objective from first principles: each skipped step's relative L1 to the forecast (reuse_core.forecast)."""
    samples = [{name: value.double() for name, value in recorder._samples[s].items()} for s in range(n)]
    keys, total = sorted(keys), 0.0
    for j in range(n):
        history = [k for k in keys if k <= j][-(order + 1) :]
        if history[-1] == j:
            continue
        errors = []
        for name, value in samples[j].items():
            forecast = extrapolate([float(h) for h in history], [samples[h][name] for h in history], float(j))
            errors.append(float((value - forecast).abs().mean() / (value.abs().mean() + 1e-12)))
        total += weights[j] * sum(errors) / len(errors)
    return total


@pytest.mark.parametrize("order", [0, 1, 2])
@pytest.mark.parametrize("n", [6, 8])
def test_forecast_fit_reproduces_the_exhaustive_optimum(order, n):
    recorder = recorded(n, seed=10 * n + order)
    weights = [random.Random(n).uniform(0.1, 2.0) for _ in range(n)]
    trajectory = recorder.trajectory(n)
    for budget in range(1, n + 1):
        found = fit_compute_steps(trajectory, budget, order, weights=weights)
        assert len(found.steps) == budget and found.steps[0] == 0 and found.steps == tuple(sorted(set(found.steps)))
        cost = independent_cost(recorder, n, found.steps, order, weights)
        assert found.cost == pytest.approx(cost, rel=1e-5, abs=1e-9)
        assert cost == pytest.approx(forecast_cost(trajectory, found.steps, order, weights), rel=1e-5, abs=1e-9)
        best = min(
            independent_cost(recorder, n, {0, *rest}, order, weights)
            for rest in itertools.combinations(range(1, n), budget - 1)
        )
        assert cost == pytest.approx(best, rel=1e-5, abs=1e-9), (budget, found)


@pytest.mark.parametrize("seed", range(3))
def test_order_0_fit_is_the_drift_fit(seed):
    n = 12 + 6 * seed
    recorder = recorded(n, seed)
    weights = sigma_step_weights(sorted((random.Random(seed).uniform(0, 15) for _ in range(n + 1)), reverse=True))
    drift = recorder.drift(n)
    for budget, required in ((3, ()), (n // 2, (5,)), (n - 2, (1, n - 1))):
        found = fit_compute_steps(recorder.trajectory(n), budget, 0, required, weights)
        expected = optimal_compute_steps(drift, budget, required, weights)
        assert found.fit == "exact"
        assert found.steps == expected.steps and found.cost == pytest.approx(expected.cost, rel=1e-12)


def test_a_linear_forecast_is_fitted_to_its_own_error():
    # exactly linear in the step index: a linear forecast from steps 0 and 1 is exact everywhere, reuse is not
    recorder = ChangeRecorder()
    gen = torch.Generator().manual_seed(0)
    base, slope = torch.randn(2, 30, generator=gen), torch.randn(2, 30, generator=gen)
    for s in range(10):
        for t in range(2):
            recorder.record(s, t, base[t] + s * slope[t])
    trajectory = recorder.trajectory(10)
    linear = fit_compute_steps(trajectory, 2, order=1)
    assert linear.steps == (0, 1) and linear.cost == pytest.approx(0.0, abs=1e-5)
    reuse = fit_compute_steps(trajectory, 2, order=0)
    assert reuse.steps != (0, 1) and reuse.cost > 0.1
    quadratic = fit_compute_steps(trajectory, 3, order=2)
    assert quadratic.cost == pytest.approx(0.0, abs=1e-5) and quadratic.steps[:2] == (0, 1)


def smooth_recording(n: int, seed: int, tensors: int = 4, size: int = 64) -> ChangeRecorder:
    """Fast change early, slow late, as in sampling."""
    gen = torch.Generator().manual_seed(seed)
    base, velocity, curve = (torch.randn(tensors, size, generator=gen) for _ in range(3))
    recorder = ChangeRecorder()
    for s in range(n):
        t = s / n
        values = base + velocity * math.sqrt(t) + curve * t * t + 0.01 * torch.randn(tensors, size, generator=gen)
        for i in range(tensors):
            recorder.record(s, ("tensor", i), values[i])
    return recorder


@pytest.mark.parametrize("order", [0, 1, 2])
def test_bounded_fits_keep_the_budget_and_stay_near_the_exact_one(order):
    n = 120
    trajectory = smooth_recording(n, seed=3 + order).trajectory(n)
    weights = sigma_step_weights([14.6 * (1 - i / n) ** 3 for i in range(n + 1)])
    tight = FitLimits(cells=3e5, states=2e4, coarse_steps=60)  # what forces the gap-limited and coarse plans
    fits = set()
    for budget, required in ((60, (7,)), (24, (50, 51)), (6, ())):
        exact = fit_compute_steps(trajectory, budget, order, required, weights)
        bounded = fit_compute_steps(trajectory, budget, order, required, weights, limits=tight)
        fits.add(bounded.fit.split(":")[0].split(" ")[0])
        steps = bounded.steps
        assert len(steps) == budget and steps[0] == 0 and steps == tuple(sorted(set(steps))) and steps[-1] < n
        assert set(required) <= set(steps)
        uniform = [round(i * n / budget) for i in range(budget)]
        uniform = sorted(set(uniform[: budget - len(set(required) - set(uniform))]) | set(required))
        cost = forecast_cost(trajectory, steps, order, weights)
        assert cost <= 1.6 * forecast_cost(trajectory, exact.steps, order, weights), (budget, bounded)
        assert cost < 0.8 * forecast_cost(trajectory, uniform, order, weights), (budget, bounded)
    assert fits - {"exact"}, fits


@pytest.mark.parametrize("order", [0, 1, 2])
def test_long_runs_are_fitted_within_bounds(order):
    # ComfyUI's longest run: the fit coarsens instead of growing with the steps squared
    n = 10000
    recorder = ChangeRecorder()
    for s in range(n):
        recorder.record(s, "a", torch.linspace(-1, 1, 8) * (1 + math.sin(s / 900)) + s / n)
    trajectory = recorder.trajectory(n)
    weights = sigma_step_weights([14.6 * (1 - i / n) ** 3 for i in range(n + 1)])
    for budget in (5000, 37):
        found = fit_compute_steps(trajectory, budget, order, (4321,), weights)
        assert found.fit.startswith("coarse"), found.fit
        assert len(found.steps) == budget and found.steps == tuple(sorted(set(found.steps))) and 4321 in found.steps


class Interrupted(Exception):
    pass


@pytest.mark.parametrize(
    "order, limits",
    [(0, None), (1, None), (2, None), (0, FitLimits(cells=2e4, states=600)), (2, FitLimits(cells=2e4, states=600))],
)
def test_an_interrupt_stops_the_fit(order, limits):
    trajectory = recorded(60, seed=1).trajectory(60)
    calls = []

    def check():
        calls.append(1)

    fit_compute_steps(trajectory, 20, order, check=check, limits=limits)
    assert len(calls) >= 4, "the fit must check for interrupts while it works"
    stop_at = len(calls) // 2

    def interrupt():
        calls.append(1)
        if len(calls) > stop_at:
            raise Interrupted

    calls.clear()
    with pytest.raises(Interrupted):
        fit_compute_steps(trajectory, 20, order, check=interrupt, limits=limits)
    assert len(calls) == stop_at + 1  # nothing after the interrupt


def test_calibrate_with_recordings_fits_both_orders_and_reports_them():
    recorder = recorded(12, seed=4)
    trajectory = recorder.trajectory(12)
    result = calibrate(trajectory, trajectory, Budget(reuse_steps=5), 0.5, 0.5, forecast=1, attention_forecast=0)
    assert (result.forecast, result.attention_forecast, result.forecast_name) == (1, 0, "linear")
    assert len(result.key_steps) == 7 and result.attention.reuse_count == 5
    assert result.key_cost == pytest.approx(forecast_cost(trajectory, result.key_steps, 1), rel=1e-5)
    drift = recorder.drift(12)
    assert result.attention.steps == 12
    assert tuple(i for i, b in enumerate(result.attention.bits) if b) == optimal_compute_steps(drift, 7).steps
    report = result.report()
    assert "linear forecast error" in report and "reuse steps, drift" in report
    assert "forecast: Encoder Feature Propagation linear, Attention Map Reuse reuse" in report
    with pytest.raises(ValueError, match="a drift matrix holds the errors of reuse only"):
        calibrate(drift, drift, Budget(reuse_steps=5), 0.5, 0.5, forecast=1)
    with pytest.raises(ValueError, match="forecast"):
        fit_compute_steps(trajectory, 3, order=3)
    with pytest.raises(ValueError, match=r"FitLimits\.work"):
        FitLimits(work=float("nan"))


def test_trajectory_needs_every_step_and_the_values():
    recorder = ChangeRecorder()
    recorder.record(0, "a", torch.ones(10))
    recorder.record(2, "a", torch.ones(10))
    with pytest.raises(ValueError, match=r"steps \[1\] were never recorded"):
        recorder.trajectory(3)
    with pytest.raises(ValueError, match="pairwise"):
        ChangeRecorder(pairwise=False).trajectory(1)
    recorder.record(1, "a", torch.ones(10))
    recorder.record(1, "once", torch.ones(10))  # seen at one step only: measures nothing
    recorder.record(0, "resized", torch.ones(10))
    recorder.record(1, "resized", torch.ones(12))
    assert recorder.trajectory(3).names == ("a",)


def test_a_recording_that_is_not_finite_is_refused():
    recorder = recorded(8, seed=2)
    recorder.record(5, ("tensor", 1), torch.full((40,), float("nan")))
    for order in (0, 1):
        with pytest.raises(ValueError, match="not all finite"):
            fit_compute_steps(recorder.trajectory(8), 4, order)
