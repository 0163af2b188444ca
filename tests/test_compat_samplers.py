"""Compatibility matrix, part 1: samplers, schedulers, sampler entry points, CFG layouts, batches, img2img.

Every case runs real ComfyUI sampling on the tiny U-Net for both nodes in both of their modes (Attention Map
Reuse: map / output; Encoder Feature Propagation: parallel decoding on / off) and checks:

* finite output;
* the run's statistics (from the engine's stats objects, ``run_records``): the schedule was resolved against the
  steps the sampler really ran and the expected number of steps reused (attention) or decoded without the encoder
  (encoder propagation);
* the step index, independently of the node: against the unpatched run's per-step trajectory (sampler callback)
  every step before the first scheduled reuse step is bit-identical, and that step is the first one altered.
  A step counted wrongly (heun's second evaluation, img2img offsets, split segments) moves that step;
* with the method switched off the output is bit-identical to the unpatched model.
"""

from __future__ import annotations

import pytest
import torch
from comfy_harness import conditioning, sample
from compat_support import (
    FORECAST_METHOD_IDS,
    FORECAST_METHODS,
    METHOD_IDS,
    METHODS,
    NODE_METHOD_IDS,
    NODE_METHODS,
    LogCapture,
    Trajectory,
    assert_finite,
    compat_model,
    first_altered_step,
    max_abs_diff,
    one_run,
)

STEPS = 6
SAMPLERS = [
    "euler",
    "euler_ancestral",
    "heun",
    "dpm_2",
    "dpmpp_2m",
    "dpmpp_2m_sde",
    "dpmpp_3m_sde",
    "dpmpp_sde",
    "ddim",
    "uni_pc",
    "lcm",
]
SCHEDULERS = ["normal", "karras", "exponential", "sgm_uniform", "simple", "beta"]

_reference_runs: dict[tuple, tuple[torch.Tensor, Trajectory]] = {}


@pytest.fixture(scope="module")
def sd15(comfy):
    return compat_model("sd15", seed=0)


@pytest.fixture(scope="module")
def sdxl(comfy):
    return compat_model("sdxl", seed=0)


def reference(model, key: tuple, **kwargs) -> tuple[torch.Tensor, Trajectory]:
    """The unpatched run (output, trajectory) for these sampling arguments, computed once per module."""
    full_key = (id(model), key)
    if full_key not in _reference_runs:
        trajectory = Trajectory()
        out = sample(model, callback=trajectory, **kwargs)
        _reference_runs[full_key] = (out, trajectory)
    return _reference_runs[full_key]


def check_patched_run(method, model, ref_traj: Trajectory, *, steps_run: int, run=sample, **kwargs):
    """Run ``method`` on ``model`` and assert finite output, run statistics and first altered step vs ``ref_traj``."""
    patched = method.apply(model)
    trajectory = Trajectory()
    with LogCapture() as log:
        out = run(patched, callback=trajectory, **kwargs)
    assert_finite(out)
    stats = one_run(log)
    method.check_stats(stats, steps_run)
    assert trajectory.steps == steps_run
    expected_first = method.expected_reuse_steps(steps_run)[0]
    altered_at, what = first_altered_step(trajectory, ref_traj)
    assert altered_at == expected_first, (
        f"{method.id}: first step that differs from the unpatched run is {altered_at} ({what}); the schedule's "
        f"first reuse step is {expected_first} of {steps_run} run steps. {stats}"
    )
    return out, stats


# ----------------------------------------------------------------------------------------- samplers, schedulers
@pytest.mark.parametrize("method", METHODS, ids=METHOD_IDS)
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_every_sampler(sd15, method, sampler):
    _, ref = reference(sd15, ("ks", sampler), steps=STEPS, sampler=sampler)
    check_patched_run(method, sd15, ref, steps_run=STEPS, steps=STEPS, sampler=sampler)


@pytest.mark.parametrize("method", FORECAST_METHODS, ids=FORECAST_METHOD_IDS)
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_every_sampler_with_a_linear_forecast(sd15, method, sampler):
    """``forecast = linear``: the same schedule and first altered step as reuse, and a forecast really made (uniform
    k=3 on 6 steps: steps 4-5 have two key steps behind them; hurry 2 of 6: steps 4-5 have four compute steps)."""
    _, ref = reference(sd15, ("ks", sampler), steps=STEPS, sampler=sampler)
    out, stats = check_patched_run(method, sd15, ref, steps_run=STEPS, steps=STEPS, sampler=sampler)
    assert stats.stats.forecast_orders.get(1, 0) > 0, stats.stats
    reused = sample(method.apply(sd15, forecast="reuse"), steps=STEPS, sampler=sampler)
    assert not torch.equal(out, reused), "forecast linear gave the reuse output"


@pytest.mark.parametrize("sampler", ["euler", "heun", "dpmpp_2m"])
def test_linear_forecast_parallel_decoding_equals_sequential(sd15, sampler):
    """Within 1e-4 of the output's scale, or (heun, whose second evaluations amplify the last-bit differences of a
    batch-4 against a batch-2 convolution) within twice what reuse itself shows between the two."""

    def difference(forecast: str) -> float:
        parallel, sequential = (
            sample(m.apply(sd15, forecast=forecast), steps=STEPS, sampler=sampler) for m in FORECAST_METHODS[1:]
        )
        return max_abs_diff(parallel, sequential) / float(sequential.abs().max())

    assert difference("linear") <= max(1e-4, 2 * difference("reuse"))


@pytest.mark.parametrize("method", NODE_METHODS, ids=NODE_METHOD_IDS)
def test_forecast_reuse_is_the_node_without_the_input(sd15, method):
    """A workflow saved before the input existed (no ``forecast``) and ``forecast = reuse`` sample bit-identically."""
    inputs = {k: v for k, v in method.inputs.items() if k != "forecast"}
    before = sample(method.node().execute(model=sd15, **inputs).result[0], steps=STEPS)
    assert torch.equal(sample(method.apply(sd15, forecast="reuse"), steps=STEPS), before)


@pytest.mark.parametrize("method", NODE_METHODS, ids=NODE_METHOD_IDS)
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_every_sampler_method_off_is_bit_identical(sd15, method, sampler):
    ref_out, _ = reference(sd15, ("ks", sampler), steps=STEPS, sampler=sampler)
    out = sample(method.apply_off(sd15), steps=STEPS, sampler=sampler)
    assert torch.equal(out, ref_out), f"max |diff| {max_abs_diff(out, ref_out)}"


@pytest.mark.parametrize("method", METHODS, ids=METHOD_IDS)
@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_every_scheduler(sd15, method, scheduler):
    _, ref = reference(sd15, ("sch", scheduler), steps=STEPS, scheduler=scheduler)
    check_patched_run(method, sd15, ref, steps_run=STEPS, steps=STEPS, scheduler=scheduler)


@pytest.mark.parametrize("method", NODE_METHODS, ids=NODE_METHOD_IDS)
@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_every_scheduler_method_off_is_bit_identical(sd15, method, scheduler):
    ref_out, _ = reference(sd15, ("sch", scheduler), steps=STEPS, scheduler=scheduler)
    out = sample(method.apply_off(sd15), steps=STEPS, scheduler=scheduler)
    assert torch.equal(out, ref_out), f"max |diff| {max_abs_diff(out, ref_out)}"


# ----------------------------------------------------------------------------- KSamplerAdvanced / SamplerCustom
@pytest.mark.parametrize("method", METHODS, ids=METHOD_IDS)
def test_ksampler_advanced_two_segments(sd15, method):
    """A 12-step schedule split 0-6 / 6-12 like two KSamplerAdvanced nodes (base + refiner pass)."""
    total, split = 12, 6
    first = dict(start_step=0, last_step=split, add_noise=True, force_full_denoise=False)
    ref_first_traj = Trajectory()
    ref_first = _sample_advanced(sd15, callback=ref_first_traj, **first)
    second = dict(start_step=split, last_step=10000, add_noise=False, force_full_denoise=True, latent=ref_first)
    ref_second_traj = Trajectory()
    ref_second = _sample_advanced(sd15, callback=ref_second_traj, **second)

    check_patched_run(method, sd15, ref_first_traj, steps_run=split, run=_sample_advanced, **first)
    # The second segment resolves its schedule against its own 6 steps, counted from its own step 0.
    check_patched_run(method, sd15, ref_second_traj, steps_run=total - split, run=_sample_advanced, **second)
    if method in NODE_METHODS:
        assert torch.equal(_sample_advanced(method.apply_off(sd15), **second), ref_second)


def _sample_advanced(
    patcher, *, start_step, last_step, add_noise, force_full_denoise, latent=None, callback=None, steps=12, seed=0
):
    """What the core ``KSamplerAdvanced`` node does (``nodes.common_ksampler``), on the tiny model."""
    import comfy.sample

    latent = torch.zeros(1, 4, 16, 16) if latent is None else latent
    noise = comfy.sample.prepare_noise(latent, seed) if add_noise else torch.zeros_like(latent)
    positive, negative = conditioning("sd15")
    return comfy.sample.sample(
        patcher,
        noise,
        steps,
        5.0,
        "euler",
        "normal",
        positive,
        negative,
        latent,
        start_step=start_step,
        last_step=last_step,
        force_full_denoise=force_full_denoise,
        callback=callback,
        disable_pbar=True,
        seed=seed,
    )


def _sample_custom(patcher, *, sigmas, callback=None, seed=0, cfg=5.0, sampler="euler"):
    import comfy.sample
    import comfy.samplers

    latent = torch.zeros(1, 4, 16, 16)
    noise = comfy.sample.prepare_noise(latent, seed)
    positive, negative = conditioning("sd15")
    return comfy.sample.sample_custom(
        patcher,
        noise,
        cfg,
        comfy.samplers.sampler_object(sampler),
        sigmas,
        positive,
        negative,
        latent,
        callback=callback,
        disable_pbar=True,
        seed=seed,
    )


# A hand-made schedule, not on the model's discrete sigma grid.
CUSTOM_SIGMAS = torch.tensor([12.0, 7.5, 4.0, 2.2, 1.1, 0.45, 0.12, 0.0])


@pytest.mark.parametrize("method", METHODS, ids=METHOD_IDS)
@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m", "heun"])
def test_sampler_custom_with_hand_made_sigmas(sd15, method, sampler):
    key = (id(sd15), "custom", sampler)
    if key not in _reference_runs:
        trajectory = Trajectory()
        _reference_runs[key] = (
            _sample_custom(sd15, sigmas=CUSTOM_SIGMAS, callback=trajectory, sampler=sampler),
            trajectory,
        )
    ref_out, ref_traj = _reference_runs[key]
    steps = len(CUSTOM_SIGMAS) - 1
    check_patched_run(
        method, sd15, ref_traj, steps_run=steps, run=_sample_custom, sigmas=CUSTOM_SIGMAS, sampler=sampler
    )
    if method in NODE_METHODS:
        assert torch.equal(_sample_custom(method.apply_off(sd15), sigmas=CUSTOM_SIGMAS, sampler=sampler), ref_out)


@pytest.mark.parametrize("method", METHODS, ids=METHOD_IDS)
def test_sampler_custom_with_a_single_sigma_runs_no_step(sd15, method):
    # SplitSigmas can hand SamplerCustom a one-value tail: zero sampling steps. Nothing to reuse, nothing to refuse.
    sigmas = CUSTOM_SIGMAS[-1:]
    assert torch.equal(_sample_custom(method.apply(sd15), sigmas=sigmas), _sample_custom(sd15, sigmas=sigmas))


# -------------------------------------------------------------------------------------------------- CFG, batch
@pytest.mark.parametrize("method", METHODS, ids=METHOD_IDS)
def test_cfg_one_runs_without_uncond(sd15, method):
    ref_out, ref = reference(sd15, ("cfg1",), steps=STEPS, cfg=1.0)
    check_patched_run(method, sd15, ref, steps_run=STEPS, steps=STEPS, cfg=1.0)
    if method in NODE_METHODS:
        assert torch.equal(sample(method.apply_off(sd15), steps=STEPS, cfg=1.0), ref_out)


@pytest.mark.parametrize("method", METHODS, ids=METHOD_IDS)
def test_batch_of_four(sd15, method):
    ref_out, ref = reference(sd15, ("batch4",), steps=STEPS, batch=4)
    check_patched_run(method, sd15, ref, steps_run=STEPS, steps=STEPS, batch=4)
    if method in NODE_METHODS:
        assert torch.equal(sample(method.apply_off(sd15), steps=STEPS, batch=4), ref_out)


def _chunk_conds(kind: str):
    """Two positive conds, one restricted to an area (a separate model call per step), plus the negative."""
    positive, negative = conditioning("sd15", seed=1)
    other, _ = conditioning("sd15", seed=9)
    area = dict(other[0][1], area=(8, 8, 0, 8), strength=1.0)
    # "multi": several full-size conds that ComfyUI batches into one chunk.
    extra = [other[0][0], area] if kind == "area" else [other[0][0], dict(other[0][1])]
    return [*positive, extra], negative


class ChunkCounter:
    """Test-only APPLY_MODEL wrapper counting model calls (batch chunks) per sigma."""

    def __init__(self):
        self.calls: list[tuple[float, int]] = []

    def __call__(self, executor, *args, **kwargs):
        x, t = args[0], args[1]
        self.calls.append((float(t.flatten()[0]), x.shape[0]))
        return executor(*args, **kwargs)

    def chunks_per_step(self) -> int:
        per_sigma: dict[float, int] = {}
        for sigma, _ in self.calls:
            per_sigma[sigma] = per_sigma.get(sigma, 0) + 1
        return max(per_sigma.values())


@pytest.mark.parametrize("kind", ["area", "multi"])
@pytest.mark.parametrize("method", METHODS, ids=METHOD_IDS)
def test_conds_split_into_several_chunks(sd15, method, kind):
    import comfy.patcher_extension

    positive, negative = _chunk_conds(kind)
    kwargs = dict(steps=STEPS, positive=positive, negative=negative)
    counted = sd15.clone()
    counter = ChunkCounter()
    counted.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "compat_count", counter)
    sample(counted, **kwargs)
    if kind == "area":
        assert counter.chunks_per_step() >= 2, "the area cond should make ComfyUI call the model in several chunks"
    ref_out, ref = reference(sd15, ("chunks", kind), **kwargs)
    check_patched_run(method, sd15, ref, steps_run=STEPS, **kwargs)
    if method in NODE_METHODS:
        assert torch.equal(sample(method.apply_off(sd15), **kwargs), ref_out)


# ------------------------------------------------------------------------------------------------------ img2img
@pytest.mark.parametrize("denoise", [0.3, 0.6])
@pytest.mark.parametrize("method", METHODS, ids=METHOD_IDS)
def test_img2img_denoise(sd15, method, denoise):
    """KSampler with denoise < 1 runs ``steps`` steps from the tail of a longer schedule: reuse refers to those."""
    gen = torch.Generator().manual_seed(3)
    init = torch.randn(1, 4, 16, 16, generator=gen)
    kwargs = dict(steps=8, denoise=denoise, latent=init)
    ref_out, ref = reference(sd15, ("img2img", denoise), **kwargs)
    check_patched_run(method, sd15, ref, steps_run=8, **kwargs)
    if method in NODE_METHODS:
        assert torch.equal(sample(method.apply_off(sd15), **kwargs), ref_out)


# --------------------------------------------------------------------------------------------------------- SDXL
@pytest.mark.parametrize("method", METHODS, ids=METHOD_IDS)
@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m", "heun"])
def test_sdxl_samplers(sdxl, method, sampler):
    positive, negative = conditioning("sdxl")
    kwargs = dict(steps=STEPS, sampler=sampler, positive=positive, negative=negative)
    _, ref = reference(sdxl, ("sdxl", sampler), **kwargs)
    check_patched_run(method, sdxl, ref, steps_run=STEPS, **kwargs)


@pytest.mark.parametrize("method", NODE_METHODS, ids=NODE_METHOD_IDS)
def test_sdxl_batch_cfg1_and_method_off(sdxl, method):
    positive, negative = conditioning("sdxl", batch=2)
    kwargs = dict(steps=STEPS, cfg=1.0, batch=2, positive=positive, negative=negative)
    ref_out, ref = reference(sdxl, ("sdxl", "batch2-cfg1"), **kwargs)
    check_patched_run(method, sdxl, ref, steps_run=STEPS, **kwargs)
    assert torch.equal(sample(method.apply_off(sdxl), **kwargs), ref_out)
