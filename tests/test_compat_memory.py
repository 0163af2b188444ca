"""Compatibility matrix, part 5: memory.

* The attention cache never holds more than its budget, checked on the cache's own accounting after every
  model call of the run (a test-only APPLY_MODEL probe reads the run's cache), and the run's record agrees.
* Over budget it falls back to computing (logged once per run), never fails; with a budget of 0 nothing is
  kept, every reuse falls back, and the output is bit-identical to the unpatched model.
* ``cache_device = cpu`` keeps every cached tensor on the CPU. On this CPU-only test machine the model is on
  the CPU too, so what can be checked here is that the cache is configured for and holds its tensors on the
  CPU; that they are kept off a GPU model's device needs a GPU run.
* Nothing stays cached after a run, finished or interrupted (no growth across runs).
* Parallel decoding never batches more decoders than ``max_decoders_per_batch``.
"""

from __future__ import annotations

import pytest
import torch
from comfy_harness import load_pack, sample
from compat_support import (
    METHODS,
    LogCapture,
    assert_finite,
    compat_model,
    one_run,
)

STEPS = 6


@pytest.fixture(scope="module")
def sd15(comfy):
    return compat_model("sd15", seed=0)


@pytest.fixture(scope="module")
def hooks(comfy):
    load_pack()
    from comfyui_reuse.nodes import attention_hooks, comfy_steps, encoder_hooks

    return attention_hooks, encoder_hooks, comfy_steps


class AttentionCacheProbe:
    """Test-only APPLY_MODEL wrapper: after every model call, read the run's attention cache accounting."""

    def __init__(self, hooks):
        self.run_key = hooks[0].RUN_STATE_KEY
        self.options_of = hooks[2].transformer_options_of
        self.caches = []
        self.samples: list[tuple[int, int, int]] = []  # (bytes_used, peak_bytes, budget_bytes)
        self.devices: set[torch.device] = set()
        self.cache_devices: set = set()

    def __call__(self, executor, *args, **kwargs):
        out = executor(*args, **kwargs)
        runs = self.options_of(args, kwargs).get(self.run_key)
        assert runs is not None and len(runs.by_device) == 1, "no single-device attention reuse run inside sampling"
        cache = next(iter(runs.by_device.values())).cache
        if not self.caches or self.caches[-1] is not cache:
            self.caches.append(cache)
        self.samples.append((cache.bytes_used, cache.peak_bytes, cache.budget_bytes))
        self.cache_devices.add(cache.device)
        for key in list(cache._entries):  # no public iterator over entries; see compat-findings.md
            self.devices.add(cache.get(key).device)
        return out


def probed(patched, hooks):
    import comfy.patcher_extension

    probe = AttentionCacheProbe(hooks)
    patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "compat_probe", probe)
    return probe


@pytest.mark.parametrize("mode", ["map", "output"])
@pytest.mark.parametrize("budget_mb", [1, 256])
def test_attention_cache_stays_within_budget(sd15, hooks, mode, budget_mb):
    patched = METHODS[0].apply(sd15, mode=mode, memory_budget_mb=budget_mb)
    probe = probed(patched, hooks)
    with LogCapture() as log:
        out = sample(patched, steps=STEPS)
    assert_finite(out)
    stats = one_run(log)
    budget_bytes = budget_mb * 2**20
    assert probe.samples and all(used <= budget and peak <= budget for used, peak, budget in probe.samples)
    assert all(budget == budget_bytes for _, _, budget in probe.samples)
    peak = max(p for _, p, _ in probe.samples)
    assert peak > 0
    assert stats.memory_mib <= budget_mb and abs(stats.memory_mib - peak / 2**20) < 0.06, stats
    over_budget = mode == "map" and budget_mb == 1  # one 256-token map set for CFG is 1 MiB alone
    if over_budget:
        assert stats.refused > 0 and stats.fallbacks > 0, stats
        assert len(log.matching("memory budget")) == 1, "budget refusals must be logged once per run"
    else:
        assert stats.refused == 0 and stats.fallbacks == 0, stats
    # Dropped when the run ends.
    assert all(len(cache) == 0 and cache.bytes_used == 0 for cache in probe.caches)


@pytest.mark.parametrize("mode", ["map", "output"])
def test_zero_budget_keeps_nothing_and_changes_nothing(sd15, hooks, mode):
    patched = METHODS[0].apply(sd15, mode=mode, memory_budget_mb=0)
    probe = probed(patched, hooks)
    with LogCapture() as log:
        out = sample(patched, steps=STEPS)
    assert all(peak == 0 for _, peak, _ in probe.samples)
    stats = one_run(log)
    assert stats.fallbacks > 0 and stats.calls_reused == 0, stats
    assert torch.equal(out, sample(sd15, steps=STEPS)), "everything fell back to computing: must equal no reuse"


@pytest.mark.parametrize(("cache_device", "expected"), [("cpu", torch.device("cpu")), ("same as model", None)])
@pytest.mark.parametrize("mode", ["map", "output"])
def test_cache_device(sd15, hooks, mode, cache_device, expected):
    patched = METHODS[0].apply(sd15, mode=mode, cache_device=cache_device)
    probe = probed(patched, hooks)
    sample(patched, steps=STEPS)
    assert probe.cache_devices == {expected}
    model_device = sd15.load_device
    assert probe.devices == {expected if expected is not None else model_device}


def test_cache_is_empty_after_an_interrupted_run(sd15, hooks):
    import comfy.model_management

    patched = METHODS[0].apply(sd15)
    probe = probed(patched, hooks)

    def interrupt(step, x0, x, total_steps):
        if step == STEPS - 1:
            raise comfy.model_management.InterruptProcessingException()

    with pytest.raises(comfy.model_management.InterruptProcessingException):
        sample(patched, steps=STEPS, callback=interrupt)
    assert max(used for used, _, _ in probe.samples) > 0
    assert all(len(cache) == 0 and cache.bytes_used == 0 for cache in probe.caches)


def test_attention_cache_does_not_grow_across_runs(sd15, hooks):
    patched = METHODS[0].apply(sd15)
    probe = probed(patched, hooks)
    peaks = []
    for _ in range(3):
        probe.samples.clear()
        sample(patched, steps=STEPS)
        peaks.append(max(p for _, p, _ in probe.samples))
    assert peaks[0] > 0 and peaks == [peaks[0]] * 3
    assert len(probe.caches) == 3, "each run must get its own cache"


class EncoderProbe:
    """Test-only APPLY_MODEL wrapper keeping the encoder propagation run objects it sees."""

    def __init__(self, hooks):
        self.key = hooks[1].RUN_STATE_KEY
        self.options_of = hooks[2].transformer_options_of
        self.runs = []

    def __call__(self, executor, *args, **kwargs):
        run = self.options_of(args, kwargs).get(self.key)
        assert run is not None, "no encoder propagation run inside sampling"
        if not self.runs or self.runs[-1] is not run:
            self.runs.append(run)
        return executor(*args, **kwargs)


@pytest.mark.parametrize("max_batch", [1, 3])
def test_parallel_decoding_respects_max_decoders_per_batch(sd15, hooks, max_batch):
    import comfy.patcher_extension

    patched = METHODS[2].apply(sd15, key_steps="one_pass", max_decoders_per_batch=max_batch)
    probe = EncoderProbe(hooks)
    patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "compat_probe", probe)
    with LogCapture() as log:
        out = sample(patched, steps=8)
    assert_finite(out)
    stats = one_run(log)
    assert stats.largest_batch == max_batch, stats
    assert stats.served_from_parallel == (0 if max_batch == 1 else 7 - 3), stats  # 7 steps in batches of 3
    # Features and parallel predictions are dropped when the run ends.
    engine = probe.runs[0].engine
    assert not engine._features and not engine._predictions  # private; see compat-findings.md
