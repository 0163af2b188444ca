"""Compatibility matrix, part 2: per-run state never leaks.

* two samplers on the same patched model (hires fix), directly and as a ComfyUI workflow;
* several patched models of one base model in one workflow;
* ComfyUI's execution cache serving an already-used patched MODEL to a re-executed sampler (the
  "second run is silently not faster" bug of several caching packs): same image, same reuse statistics;
* interrupted runs (from the sampler callback, as ComfyUI's interrupt does, and from inside a model call):
  the next run equals a clean run.

Equality checks are bit-exact: a run must not depend on what ran before it.
"""

from __future__ import annotations

import pytest
import torch
from comfy_harness import sample
from compat_support import (
    LATENT_STASH,
    METHOD_IDS,
    METHODS,
    ComfyExecutor,
    LogCapture,
    PromptBuilder,
    assert_finite,
    compat_model,
    one_run,
    patcher_snapshot,
    runs_of,
)

STEPS = 6


@pytest.fixture(scope="module")
def sd15(comfy):
    return compat_model("sd15", seed=0)


def run_with_stats(patched, **kwargs):
    with LogCapture() as log:
        out = sample(patched, **kwargs)
    return out, one_run(log)


def same_stats(a, b) -> bool:
    """Two runs did the same work: every counter of their records (records never hold the wall time)."""
    return a == b


def upscale(latent: torch.Tensor, size: int) -> torch.Tensor:
    import comfy.utils

    return comfy.utils.common_upscale(latent, size, size, "nearest-exact", "disabled")


# ---------------------------------------------------------------------------------------------- direct calls
@pytest.mark.parametrize("method", METHODS, ids=METHOD_IDS)
def test_hires_fix_second_pass_on_same_patched_model(sd15, method):
    patched = method.apply(sd15)
    first, first_stats = run_with_stats(patched, steps=STEPS)
    hires_latent = upscale(first, 24)
    second, second_stats = run_with_stats(patched, steps=STEPS, denoise=0.5, latent=hires_latent, seed=1)
    assert_finite(second)
    method.check_stats(second_stats, STEPS)

    solo_first, solo_first_stats = run_with_stats(method.apply(sd15), steps=STEPS)
    solo_second, solo_second_stats = run_with_stats(
        method.apply(sd15), steps=STEPS, denoise=0.5, latent=hires_latent, seed=1
    )
    assert torch.equal(first, solo_first)
    assert torch.equal(second, solo_second), "the first pass left state that changed the second pass"
    assert same_stats(first_stats, solo_first_stats)
    assert same_stats(second_stats, solo_second_stats)


def test_patched_models_interleaved_never_share_state(sd15):
    """Four patched clones of one base model (both nodes, both modes) sampled alternately."""
    other_base = compat_model("sd15", seed=1)
    models = [method.apply(sd15) for method in METHODS] + [METHODS[0].apply(other_base, reuse_steps=3)]
    solo = [sample(method.apply(sd15), steps=STEPS, seed=5) for method in METHODS]
    solo.append(sample(METHODS[0].apply(other_base, reuse_steps=3), steps=STEPS, seed=5))
    for _ in range(2):
        for patched, expected in zip(models, solo, strict=True):
            assert torch.equal(sample(patched, steps=STEPS, seed=5), expected)


# ------------------------------------------------------------------------------------------------- interrupts
class InterruptAt:
    """A sampler callback that interrupts the run at ``step``, as ComfyUI's progress hook does on /interrupt."""

    def __init__(self, step: int):
        self.step = step

    def __call__(self, step, x0, x, total_steps):
        import comfy.model_management

        if step == self.step:
            raise comfy.model_management.InterruptProcessingException()


class FailingModelCall:
    """Test-only APPLY_MODEL wrapper raising at model call number ``at`` (an error inside a model call)."""

    def __init__(self, at: int):
        self.at = at
        self.calls = 0
        self.armed = True

    def __call__(self, executor, *args, **kwargs):
        self.calls += 1
        if self.armed and self.calls == self.at:
            raise RuntimeError("simulated failure inside the model call")
        return executor(*args, **kwargs)


@pytest.mark.parametrize("interrupt_step", [1, 4])
@pytest.mark.parametrize("method", METHODS, ids=METHOD_IDS)
def test_interrupted_run_leaves_no_state(sd15, method, interrupt_step):
    """Interrupted at a step whose cache is filled (and, for parallel decoding, with stored predictions)."""
    import comfy.model_management

    clean, clean_stats = run_with_stats(method.apply(sd15), steps=STEPS)
    patched = method.apply(sd15)
    snapshot = patcher_snapshot(patched)
    with pytest.raises(comfy.model_management.InterruptProcessingException):
        sample(patched, steps=STEPS, callback=InterruptAt(interrupt_step))
    assert patcher_snapshot(patched) == snapshot, "the interrupted run left changes on the patched model"
    again, again_stats = run_with_stats(patched, steps=STEPS)
    assert torch.equal(again, clean)
    assert same_stats(again_stats, clean_stats)


@pytest.mark.parametrize("method", METHODS, ids=METHOD_IDS)
def test_exception_inside_a_model_call_leaves_no_state(sd15, method):
    import comfy.patcher_extension

    clean, clean_stats = run_with_stats(method.apply(sd15), steps=STEPS)
    patched = method.apply(sd15)
    failing = FailingModelCall(at=5)  # step 4 of 6 (one call per step with CFG batched)
    patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "compat_fail", failing)
    with pytest.raises(RuntimeError, match="simulated failure"):
        sample(patched, steps=STEPS)
    failing.armed = False
    again, again_stats = run_with_stats(patched, steps=STEPS)
    assert torch.equal(again, clean)
    assert same_stats(again_stats, clean_stats)
    # The unpatched base model is untouched by all of it.
    assert torch.equal(sample(sd15, steps=STEPS), sample(compat_model("sd15", seed=0), steps=STEPS))


# ------------------------------------------------------------------------------------ ComfyUI workflows (executor)
@pytest.fixture(scope="module")
def executor(comfy):
    return ComfyExecutor()


def patch_node(builder: PromptBuilder, method, model, **overrides) -> tuple[str, int]:
    return (builder.add(method.node_id, model=model, **{**method.inputs, **overrides}), 0)


def run_prompt(executor, prompt) -> tuple[list[str], list]:
    with LogCapture() as log:
        cached = executor.run(prompt)
    return cached, runs_of(log)


@pytest.mark.parametrize("method", METHODS, ids=METHOD_IDS)
def test_execution_cache_serves_a_used_patched_model(executor, method):
    """Prompt, then a new seed (sampler re-runs on the cached MODEL), then the first seed again."""
    b = PromptBuilder()
    model = b.tiny_model()
    patched = patch_node(b, method, model)
    positive, negative = b.conditioning()
    sampler = b.ksampler(patched, positive, negative, b.empty_latent(), steps=STEPS, seed=0)
    key = f"cache-{method.id}"
    b.stash(sampler, key)

    _, first_runs = run_prompt(executor, b.prompt)
    assert len(first_runs) == 1
    first_image = LATENT_STASH[key].clone()
    method.check_stats(first_runs[0], STEPS)

    b.prompt[sampler[0]]["inputs"]["seed"] = 1
    cached, runs = run_prompt(executor, b.prompt)
    assert {model[0], patched[0]} <= set(cached), "the patched MODEL should come from ComfyUI's cache"
    assert len(runs) == 1 and same_stats(runs[0], first_runs[0])
    assert not torch.equal(LATENT_STASH[key], first_image)

    b.prompt[sampler[0]]["inputs"]["seed"] = 0
    cached, runs = run_prompt(executor, b.prompt)
    assert {model[0], patched[0]} <= set(cached)
    assert len(runs) == 1, "the sampler should have re-run on the cached patched model"
    assert same_stats(runs[0], first_runs[0]), "a cached patched model reused less than on its first run"
    assert torch.equal(LATENT_STASH[key], first_image)

    # The identical prompt once more: ComfyUI serves everything from its cache, the image stays the same.
    cached, runs = run_prompt(executor, b.prompt)
    assert runs == [] and torch.equal(LATENT_STASH[key], first_image)


@pytest.mark.parametrize("method", METHODS, ids=METHOD_IDS)
def test_hires_fix_workflow(comfy, method):
    """KSampler -> LatentUpscaleBy -> KSampler on one patched model equals the second pass run on its own."""
    b = PromptBuilder()
    patched = patch_node(b, method, b.tiny_model())
    positive, negative = b.conditioning()
    first = b.ksampler(patched, positive, negative, b.empty_latent(), steps=STEPS, seed=0)
    b.stash(first, f"hires-first-{method.id}")
    upscaled = (b.add("LatentUpscaleBy", samples=first, upscale_method="nearest-exact", scale_by=1.5), 0)
    second = b.ksampler(patched, positive, negative, upscaled, steps=STEPS, seed=1, denoise=0.5)
    b.stash(second, f"hires-final-{method.id}")
    _, runs = run_prompt(ComfyExecutor(), b.prompt)
    assert len(runs) == 2
    for stats in runs:
        method.check_stats(stats, STEPS)

    solo = PromptBuilder()
    patched = patch_node(solo, method, solo.tiny_model())
    positive, negative = solo.conditioning()
    loaded = (solo.add("CompatLatentFromStash", key=f"hires-first-{method.id}"), 0)
    upscaled = (solo.add("LatentUpscaleBy", samples=loaded, upscale_method="nearest-exact", scale_by=1.5), 0)
    second = solo.ksampler(patched, positive, negative, upscaled, steps=STEPS, seed=1, denoise=0.5)
    solo.stash(second, f"hires-solo-{method.id}")
    _, solo_runs = run_prompt(ComfyExecutor(), solo.prompt)
    assert torch.equal(LATENT_STASH[f"hires-final-{method.id}"], LATENT_STASH[f"hires-solo-{method.id}"])
    assert same_stats(runs[1], solo_runs[0])


def test_several_patched_models_in_one_workflow(comfy):
    """Every configuration patched from one loaded model, each with its own KSampler, in one prompt."""
    b = PromptBuilder()
    model = b.tiny_model()
    positive, negative = b.conditioning()
    latent = b.empty_latent()
    for method in METHODS:
        sampler = b.ksampler(patch_node(b, method, model), positive, negative, latent, steps=STEPS, seed=2)
        b.stash(sampler, f"multi-{method.id}")
    plain = b.ksampler(model, positive, negative, latent, steps=STEPS, seed=2)
    b.stash(plain, "multi-plain")
    _, runs = run_prompt(ComfyExecutor(), b.prompt)
    assert sorted(r.node for r in runs) == sorted(m.node_id for m in METHODS)

    for method in METHODS:
        solo = PromptBuilder()
        positive, negative = solo.conditioning()
        sampler = solo.ksampler(
            patch_node(solo, method, solo.tiny_model()), positive, negative, solo.empty_latent(), steps=STEPS, seed=2
        )
        solo.stash(sampler, f"multi-solo-{method.id}")
        _, solo_runs = run_prompt(ComfyExecutor(), solo.prompt)
        method.check_stats(solo_runs[0], STEPS)
        assert torch.equal(LATENT_STASH[f"multi-{method.id}"], LATENT_STASH[f"multi-solo-{method.id}"]), method.id
    unpatched = sample(compat_model("sd15", seed=0), steps=STEPS, seed=2)
    assert torch.equal(LATENT_STASH["multi-plain"], unpatched), "the unpatched sampler saw the patches"
