"""Attention Map Reuse in real ComfyUI: tiny real U-Nets (SD1.5/SDXL), comfy.sample.sample. The DiT families
(Flux, SD3, Wan, ...) are in test_attention_families_comfy.py."""

import importlib
import logging
import math

import comfy_harness as h
import pytest
import torch
from compat_support import LogCapture

from reuse_core.metrics import psnr

# Off by default here: each test states the reuse it wants.
NO_REUSE = dict(strategy="hurry", reuse_steps=0, custom_schedule="1")


@pytest.fixture(scope="module")
def node(comfy):
    h.load_pack()
    return importlib.import_module("comfyui_reuse.nodes.attention_node").AttentionMapReuse


@pytest.fixture(scope="module")
def sd15(comfy):
    return h.sharpen_attention(h.tiny_model("sd15", seed=3))


def patched(node, model, **overrides):
    return node.execute(model, **h.node_inputs(node, **{**NO_REUSE, **overrides})).result[0]


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m", "ddim"])
def test_reuse_end_to_end(node, sd15, runs, sampler):
    before = h.sample(sd15, steps=6, sampler=sampler)
    zero = h.sample(patched(node, sd15, mode="map"), steps=6, sampler=sampler)
    assert runs.last().reused_steps == 0
    reused = {}
    for mode in ("map", "output"):
        reused[mode] = h.sample(patched(node, sd15, mode=mode, reuse_steps=2), steps=6, sampler=sampler)
        stats = runs.last()
        assert stats.reused_steps == 2 and stats.calls_reused > 0 and stats.memory_mib > 0, stats
    after = h.sample(sd15, steps=6, sampler=sampler)

    assert torch.equal(zero, before), "zero reuse must be bit-identical to the unpatched model"
    assert torch.equal(after, before), "the input MODEL must be unchanged by patching and by patched runs"
    for mode, out in reused.items():
        assert torch.isfinite(out).all(), mode
        assert not torch.equal(out, before), mode
        assert 25.0 < psnr(out, before) < math.inf, mode
    assert not torch.equal(reused["map"], reused["output"])


def test_phast_preset_and_custom_schedule(node, sd15, runs, caplog):
    caplog.set_level(logging.INFO)
    h.sample(patched(node, sd15, strategy="phast", reuse_steps=10), steps=20, size=8)
    assert runs.last().schedule == "11111111010001000000"
    assert runs.last().reused_steps == 10
    h.sample(patched(node, sd15, strategy="custom", custom_schedule="1100 1100"), steps=4, size=8)
    assert any("resampled to 1010" in r.getMessage() for r in caplog.records)
    assert runs.last().schedule == "1010" and runs.last().reused_steps == 2


def test_cond_and_uncond_never_mix(node, sd15, runs, monkeypatch):
    """CFG batch (uncond+cond in one forward) vs ComfyUI splitting them into two forwards: same result."""
    model = patched(node, sd15, reuse_steps=3)
    batched = h.sample(model, steps=6, cfg=6.0)
    batched_calls = runs.last().calls_reused
    monkeypatch.setattr(type(sd15.model), "memory_required", lambda self, *a, **k: 1e18)
    split = h.sample(model, steps=6, cfg=6.0)
    split_calls = runs.last().calls_reused
    assert split_calls == 2 * batched_calls  # really one forward per cond
    assert torch.allclose(split, batched, atol=1e-4, rtol=1e-4)


def test_budget_exceeded_falls_back(node, sd15, runs):
    """Refusals logged once per run and a budget of 0 changing nothing: tests/test_compat_memory.py."""
    full = h.sample(sd15, steps=6)
    roomy = h.sample(patched(node, sd15, reuse_steps=3), steps=6)
    assert runs.last().memory_mib > 1.0
    tight = h.sample(patched(node, sd15, reuse_steps=3, memory_budget_mb=1), steps=6)
    stats = runs.last()
    assert stats.refused > 0 and 0 < stats.memory_mib <= 1.0, stats
    assert torch.isfinite(tight).all()
    # Fewer layers reuse, so the result sits between the full run and the all-layers reuse run.
    assert psnr(tight, full) > psnr(roomy, full)


def test_cache_device_cpu_and_cross_only(node, sd15):
    model_side = h.sample(patched(node, sd15, reuse_steps=3, mode="output"), steps=6, size=8)
    cpu_side = h.sample(patched(node, sd15, reuse_steps=3, mode="output", cache_device="cpu"), steps=6, size=8)
    assert torch.equal(model_side, cpu_side)
    both = h.sample(patched(node, sd15, reuse_steps=3), steps=6, size=8)
    cross = h.sample(patched(node, sd15, reuse_steps=3, attention="cross"), steps=6, size=8)
    self_only = h.sample(patched(node, sd15, reuse_steps=3, attention="self"), steps=6, size=8)
    assert not torch.equal(cross, both) and not torch.equal(self_only, both) and not torch.equal(cross, self_only)


@pytest.mark.parametrize("sampler", ["heun", "dpm_2"])
def test_multi_evaluation_samplers(node, sd15, runs, sampler):
    full = h.sample(sd15, steps=4, sampler=sampler, size=8)
    assert torch.equal(h.sample(patched(node, sd15), steps=4, sampler=sampler, size=8), full)
    reused = h.sample(patched(node, sd15, reuse_steps=2), steps=4, sampler=sampler, size=8)
    assert runs.last().reused_steps == 2
    assert torch.isfinite(reused).all() and 20.0 < psnr(reused, full) < math.inf


def test_partial_runs_resolve_against_actual_steps(node, sd15, runs):
    model = patched(node, sd15, reuse_fraction=0.5)
    h.sample(model, steps=10, denoise=0.6, size=8)  # img2img: KSampler still runs 10 steps
    assert (runs.last().reused_steps, runs.last().steps) == (5, 10)
    h.sample(model, steps=12, start_step=4, last_step=8, size=8)  # KSamplerAdvanced segment: 4 steps
    assert (runs.last().reused_steps, runs.last().steps) == (2, 4)
    # The default 10 on a 4-step (distilled) run: half the run reuses, and the log says why.
    with LogCapture() as log:
        h.sample(patched(node, sd15, reuse_steps=10), steps=4, size=8)
    assert (runs.last().reused_steps, runs.last().steps) == (2, 4)
    assert log.matching("reuse_steps 10 leaves no compute step in this 4-step run: reusing 2 (half the run")


def test_existing_override_is_chained(node, sd15):
    calls = []

    def counting_override(func, *args, **kwargs):
        calls.append(args[0].shape)
        return func(*args, **kwargs)

    base = sd15.clone()
    base.model_options["transformer_options"]["optimized_attention_override"] = counting_override
    reference = h.sample(base, steps=4)
    unpatched_calls = len(calls)
    calls.clear()
    out = h.sample(patched(node, base, reuse_steps=0), steps=4)
    assert torch.equal(out, reference) and len(calls) == unpatched_calls
    calls.clear()
    h.sample(patched(node, base, reuse_steps=2, mode="output"), steps=4)
    assert len(calls) == unpatched_calls // 2  # reuse steps skip attention entirely
    twice = patched(node, patched(node, base, reuse_steps=2, mode="output"), reuse_steps=0)
    calls.clear()
    assert torch.equal(h.sample(twice, steps=4), reference) and len(calls) == unpatched_calls  # later node wins


def test_sdxl(node, comfy, runs):
    model = h.sharpen_attention(h.tiny_model("sdxl", seed=4))
    full = h.sample(model, steps=6, kind="sdxl")
    assert torch.equal(h.sample(patched(node, model), steps=6, kind="sdxl"), full)
    reused = h.sample(patched(node, model, reuse_steps=2), steps=6, kind="sdxl")
    assert runs.last().reused_steps == 2
    assert 20.0 < psnr(reused, full) < math.inf


def test_unsupported_model_names_its_class(node, comfy):
    model = h.tiny_model("sd15", seed=6)
    model.model.diffusion_model = torch.nn.Identity()  # a net whose attention ComfyUI cannot hook
    with pytest.raises(ValueError, match="cannot patch Identity"):
        patched(node, model)
