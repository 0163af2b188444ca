"""Forecasting (reuse_core.forecast) and both engines with it, on toy hosts (no ComfyUI)."""

import pytest
import torch
from test_encoder_engine import SIGMAS, CapturingHost, ToyHost, euler_run, timestep_of

from reuse_core.attention_engine import AttentionReuseConfig, AttentionReuseRun
from reuse_core.encoder_engine import EncoderFeatures, EncoderPropagationEngine
from reuse_core.forecast import Forecast, ForecastSpec, extrapolate, newton_weights
from reuse_core.key_steps import KeyStepSpec, make_plan
from reuse_core.schedules import ReuseSchedule
from reuse_core.steps import StepMatch


def test_newton_weights_reproduce_polynomials_of_their_order():
    times = [2.0, 5.0, 6.0]
    for t in (7.0, 9.5, 13.0):
        w = newton_weights(times, t)
        assert sum(w) == pytest.approx(1.0)  # constants are kept
        assert sum(wi * ti for wi, ti in zip(w, times, strict=True)) == pytest.approx(t)
        assert sum(wi * ti**2 for wi, ti in zip(w, times, strict=True)) == pytest.approx(t**2)
    # order 1 in Newton form: v1 + (t - t1) (v1 - v0) / (t1 - t0)
    assert newton_weights([3.0, 5.0], 8.0) == pytest.approx([-1.5, 2.5])


@pytest.mark.parametrize("order", [1, 2])
def test_a_feature_polynomial_in_time_is_forecast_exactly_by_that_order(order):
    gen = torch.Generator().manual_seed(0)
    a, b, c = (torch.randn(3, 5, generator=gen) for _ in range(3))

    def feature(t):
        return a + b * t + (c * t * t if order == 2 else 0)

    history = Forecast(order)
    for t in (0.0, 2.0, 3.0, 5.0):
        history.push(t, feature(t))
    assert len(history) == order + 1
    for t in (6.0, 8.0):
        torch.testing.assert_close(history.at(t), feature(t), rtol=1e-5, atol=1e-5)
    if order == 2:  # a linear forecast of a quadratic feature is off: the test can fail
        linear = Forecast(1)
        for t in (2.0, 3.0, 5.0):
            linear.push(t, feature(t))
        assert (linear.at(8.0) - feature(8.0)).abs().max() > 1e-2


def test_order_zero_and_short_histories_fall_back_to_what_is_kept():
    value = torch.randn(4)
    history = Forecast(2)
    with pytest.raises(LookupError):
        history.at(1.0)
    history.push(0.0, value)
    assert history.order_used() == 0 and history.at(3.0) is value  # the kept value itself: reuse, bit for bit
    history.push(1.0, value * 2)
    assert history.order_used() == 1
    torch.testing.assert_close(history.at(3.0), value * 4)
    history.push(1.0, value * 3)  # the same time again: replaced
    torch.testing.assert_close(history.at(2.0), value * 5)
    history.push(0.5, value)  # time went back: a new trajectory
    assert len(history) == 1
    assert extrapolate([1.0], [value], 9.0) is value


def test_bf16_values_are_combined_in_fp32_and_keep_their_dtype():
    v0, v1 = torch.full((3,), 1.0, dtype=torch.bfloat16), torch.full((3,), 1.5, dtype=torch.bfloat16)
    out = extrapolate([0.0, 1.0], [v0, v1], 2.0)
    assert out.dtype == torch.bfloat16 and torch.equal(out, torch.full((3,), 2.0, dtype=torch.bfloat16))
    ints = torch.arange(3)
    assert extrapolate([0.0, 1.0], [ints, ints + 1], 2.0) is not None  # integer tensors: the last value kept


def test_bad_forecast_input_names_the_field():
    with pytest.raises(ValueError, match="forecast: must be one of reuse, linear, quadratic"):
        ForecastSpec.from_input("cubic")
    with pytest.raises(ValueError, match="forecast: linear forecasts attention outputs only; set mode to output"):
        AttentionReuseConfig(mode="map", forecast=ForecastSpec(1))


# Encoder Feature Propagation --------------------------------------------------------------------------------


def forecast_engine(order, preset="uniform", k=3, parallel=True):
    plan = make_plan(KeyStepSpec(preset, k), 10, max_batch=4)
    return EncoderPropagationEngine(plan, [timestep_of(s) for s in SIGMAS[:-1]], parallel, ForecastSpec(order))


@pytest.fixture(scope="module")
def net():
    from test_encoder_engine import ToyUNet

    return ToyUNet().eval()


def test_encoder_order_zero_is_the_engine_without_forecasting_bit_for_bit(net):
    plain = EncoderPropagationEngine(make_plan(KeyStepSpec("uniform", 3), 10, max_batch=4),
                                     [timestep_of(s) for s in SIGMAS[:-1]], True)  # fmt: skip
    reuse = forecast_engine(0)
    assert torch.equal(euler_run(ToyHost(net), plain), euler_run(ToyHost(net), reuse))
    assert reuse.stats.forecast_orders == {} and "forecast" not in reuse.stats.summary()


@pytest.mark.parametrize("heun", [False, True])
def test_encoder_parallel_forecast_equals_sequential(net, heun):
    outs = {}
    for parallel in (True, False):
        engine = forecast_engine(1, parallel=parallel)
        outs[parallel] = euler_run(ToyHost(net), engine, heun=heun)
        assert engine.stats.forecast_orders.get(1, 0) > 0
    torch.testing.assert_close(outs[True], outs[False], rtol=1e-4, atol=1e-5)


def test_encoder_forecast_changes_the_output_and_counts_orders(net):
    reuse = euler_run(ToyHost(net), forecast_engine(0))
    engine = forecast_engine(2)
    out = euler_run(ToyHost(net), engine)
    assert not torch.allclose(out, reuse)
    # uniform k=3 on 10 steps: keys 0, 3, 6, 9; steps 1-2 have one key step, 4-5 two, 7-8 three
    assert engine.stats.forecast_orders == {0: 2, 1: 2, 2: 2}
    assert engine.stats.history_peak_bytes > 0 and "forecasts by order" in engine.stats.summary()


class LinearFeatureHost(ToyHost):
    """Encoder features exactly linear in the step (read from the input); the decoder returns the middle feature."""

    def encode(self, x, timesteps, context, **extra):
        self.encodes += 1
        step = x[:, :1]
        return EncoderFeatures((3.0 * step,), 1.0 + 2.0 * step)

    def decode(self, features, timesteps, context, **extra):
        torch.testing.assert_close(features.skips[0], 1.5 * (features.middle[:, :1] - 1.0))  # members forecast alike
        return features.middle


@pytest.mark.parametrize("parallel", [True, False])
def test_encoder_linear_forecast_of_linear_features_is_exact(net, parallel):
    engine = forecast_engine(1, parallel=parallel)  # uniform k=3: key steps 0, 3, 6, 9
    host = LinearFeatureHost(net)
    for i in range(10):
        out = engine.predict(host, torch.full((1, 1), float(i)), torch.zeros(1), None, step=StepMatch(i, True),
                             cache_key="k")  # fmt: skip
        expected = 1.0 if i < 3 else 1.0 + 2.0 * i  # before step 3 only step 0 is kept: reuse
        assert float(out[0, 0]) == pytest.approx(expected, abs=1e-5), i
    assert engine.stats.forecast_orders == {0: 2, 1: 4}


def test_encoder_capture_at_every_key_step_before_a_decoded_one(net):
    # paper-like plan: keys 0,1,2,3,5; order 1 must keep step 2's features too (order 0 keeps only 3)
    plan = make_plan(KeyStepSpec("custom", custom=(0, 1, 2, 3, 5)), 8, max_batch=1)
    for order, expected in ((0, [False, False, False, True, False, True, False, False]),
                            (1, [True, True, True, True, False, True, False, False])):  # fmt: skip
        host = CapturingHost(net)
        engine = EncoderPropagationEngine(plan, [timestep_of(s) for s in SIGMAS[:8]], False, ForecastSpec(order))
        x, ctx = torch.zeros(1, 4, 8, 8), torch.zeros(1, 5, 6)
        for i in range(8):
            engine.predict(host, x, torch.full((1,), timestep_of(SIGMAS[i])), ctx, step=StepMatch(i, True),
                           cache_key="k")  # fmt: skip
        assert host.captures == [c for c, i in zip(expected, range(8), strict=True) if i in plan.full_steps]


# Attention Map Reuse ------------------------------------------------------------------------------------------


def attention_run(order, bits, budget_mb=64.0):
    config = AttentionReuseConfig(mode="output", memory_budget_mb=budget_mb, forecast=ForecastSpec(order))
    return AttentionReuseRun(config, ReuseSchedule(tuple(bits)))


def drive(run, bits, value_at):
    """One attention layer through every step; the fused output at step s is ``value_at(s)``."""
    q = k = v = torch.zeros(1, 3, 4)
    outs = []
    for s in range(len(bits)):
        outs.append(run.attention(lambda s=s: value_at(s), q, k, v, heads=2, step=s, layer_key="a", kind="self"))
    return outs


def test_attention_linear_forecast_of_linear_outputs_is_exact_and_order_zero_is_reuse():
    bits = (1, 1, 0, 1, 1, 0, 0, 1, 0)
    gen = torch.Generator().manual_seed(1)
    a, b = torch.randn(1, 3, 4, generator=gen), torch.randn(1, 3, 4, generator=gen)

    def line(s):
        return a + b * s

    run = attention_run(1, bits)
    for s, out in enumerate(drive(run, bits, line)):
        torch.testing.assert_close(out, line(s), rtol=1e-5, atol=1e-5)
    assert run.stats.forecast_orders == {1: 4} and "forecast linear" in run.summary()
    reuse = attention_run(0, bits)
    outs = drive(reuse, bits, line)
    schedule = ReuseSchedule(bits)
    for s, out in enumerate(outs):
        assert torch.equal(out, line(schedule.source_step(s)))  # the kept output itself
    assert reuse.stats.forecast_orders == {}


def test_attention_forecast_falls_back_to_the_history_it_has():
    bits = (1, 0, 0, 1, 0)  # step 1-2 have one compute step before them, step 4 two
    run = attention_run(2, bits)
    drive(run, bits, lambda s: torch.full((1, 3, 4), float(s)))
    assert run.stats.forecast_orders == {0: 2, 1: 1}
    assert "order" in run.stats.warned


def test_attention_memory_budget_counts_every_kept_step():
    bits = (1, 1, 1, 0, 0)
    entry_mb = 1 * 3 * 4 * 4 / 2**20
    # room for two snapshots, not three: the quadratic forecast keeps two and says it falls back
    run = attention_run(2, bits, budget_mb=2.5 * entry_mb)
    drive(run, bits, lambda s: torch.full((1, 3, 4), float(s)))
    assert run.cache.peak_bytes <= run.cache.budget_bytes
    assert run.stats.reused == 2 and run.stats.forecast_orders == {1: 2}  # steps 1 and 2 kept, step 0 dropped
