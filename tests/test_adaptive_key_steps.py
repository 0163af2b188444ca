"""Adaptive key steps of Encoder Feature Propagation on the toy host of test_encoder_engine (no ComfyUI)."""

import math

import pytest
import torch
from test_encoder_engine import SIGMAS, CapturingHost, ToyHost, ToyUNet, euler_run, timestep_of

from reuse_core.encoder_engine import EncoderPropagationConfig, EncoderPropagationEngine
from reuse_core.key_steps import KeyStepSpec, make_plan


def adaptive_engine(threshold, window=None, parallel=True):
    plan = make_plan(KeyStepSpec("adaptive", threshold=threshold), 10, window, max_batch=4)
    return EncoderPropagationEngine(plan, [timestep_of(s) for s in SIGMAS[:-1]], parallel)


class PlainEngine:
    def __init__(self, net):
        self.net = net

    def predict(self, host, x, ts, context, **_):
        skips, middle = self.net.encode(x, ts, context)
        return self.net.decode(skips, middle, ts, context)


@pytest.fixture(scope="module")
def net():
    return ToyUNet().eval()


@torch.no_grad()
@pytest.mark.parametrize("heun", [False, True])
@pytest.mark.parametrize("host_cls", [ToyHost, CapturingHost])
def test_threshold_zero_is_the_full_model_bit_for_bit(net, heun, host_cls):
    reference = euler_run(None, PlainEngine(net), heun=heun)
    engine = adaptive_engine(0.0)
    out = euler_run(host_cls(net), engine, heun=heun)
    assert torch.equal(out, reference)
    assert engine.stats.full_steps == set(range(10)) and engine.stats.encoder_passes_saved == 0


class Spy(EncoderPropagationEngine):
    """Keeps the input of every exact call, to replay the documented rule independently."""

    def __init__(self, *args):
        super().__init__(*args)
        self.inputs = {}

    def observe_input(self, step, cache_key, x):
        if step is not None and step.exact:
            self.inputs[step.index] = x.clone()
        super().observe_input(step, cache_key, x)


def replay(inputs: dict, threshold: float, forced=frozenset({0})) -> set:
    keys, total = set(), 0.0
    for i in sorted(inputs):
        change = math.inf if i == 0 else float((inputs[i] - inputs[i - 1]).abs().mean() / inputs[i - 1].abs().mean())
        total += change
        if i in forced or total >= threshold:
            keys.add(i)
            total = 0.0
    return keys


@torch.no_grad()
@pytest.mark.parametrize("threshold", [0.05, 0.2, 0.6])
def test_key_steps_follow_the_accumulated_input_change(net, threshold):
    plan = make_plan(KeyStepSpec("adaptive", threshold=threshold), 10, max_batch=4)
    engine = Spy(plan, [timestep_of(s) for s in SIGMAS[:-1]], True)
    host = ToyHost(net)
    euler_run(host, engine)
    expected = replay(engine.inputs, threshold)
    assert engine.stats.full_steps == expected
    assert host.encodes == len(expected)
    # sequential despite parallel=True: every decoder-only step decoded alone
    assert engine.stats.decoder_batches == 10 - len(expected) and engine.stats.largest_batch == 1


@torch.no_grad()
def test_higher_threshold_fewer_key_steps_and_reuse_stays_close(net):
    reference = euler_run(None, PlainEngine(net))
    counts, errors = [], []
    for threshold in (0.05, 0.3, 1.0, 100.0):
        engine = adaptive_engine(threshold)
        out = euler_run(ToyHost(net), engine)
        counts.append(len(engine.stats.full_steps))
        errors.append(float((out - reference).norm() / reference.norm()))
    assert counts == sorted(counts, reverse=True) and counts[0] > counts[-1] == 1
    assert all(math.isfinite(e) for e in errors) and errors[0] < errors[-1]


@torch.no_grad()
def test_steps_outside_the_window_always_run_in_full(net):
    window = [i < 6 for i in range(10)]  # the last four steps may not reuse
    engine = adaptive_engine(100.0, window=window)
    euler_run(ToyHost(net), engine)
    assert engine.stats.full_steps == {0, 6, 7, 8, 9}


def test_adaptive_plan_and_validation():
    plan = make_plan(KeyStepSpec("adaptive", threshold=0.3), 8, [i > 1 for i in range(8)], max_batch=4)
    assert plan.full_steps == frozenset({0, 1}) and plan.decode_batches == () and plan.adaptive_threshold == 0.3
    assert make_plan(KeyStepSpec("paper"), 8).adaptive_threshold is None
    for bad in (-0.1, math.nan, math.inf, True, "0.2"):
        with pytest.raises(ValueError, match="adaptive_threshold"):
            KeyStepSpec("adaptive", threshold=bad)
    spec = KeyStepSpec.from_inputs("adaptive", 4, "not parsed", threshold=0.25)
    assert spec.adaptive and spec.threshold == 0.25
    with pytest.raises(ValueError, match="max_decoders_per_batch"):
        EncoderPropagationConfig(key_steps=spec, max_decoders_per_batch=0)
