"""Compatibility matrix, part 3: other things patched into the same model run.

* ControlNet (core ``ControlNet`` around a tiny random ``cldm.ControlNet``, applied like "Apply ControlNet");
* a LoRA on the attention projections (ComfyUI's LoRA loader path, ``ModelPatcher.add_patches``), applied
  before and after our node;
* core FreeU and core EasyCache, chained before and after our node.

Our two nodes chained with each other: tests/test_chained_methods_comfy.py.

For each: it runs (finite output, one run whose recorded statistics match the schedule), the first altered
step against the run without our node is the schedule's first reuse step, and with our method switched off
the output is bit-identical to the run without our node. A combination our node refuses must fail with a
clear message instead; which one happens is asserted explicitly per combination.
"""

from __future__ import annotations

import pytest
import torch
from comfy_harness import conditioning, sample
from compat_support import (
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
    runs_of,
    tiny_controlnet,
    weights_checksum,
    with_controlnet,
    with_lora,
)

STEPS = 6


@pytest.fixture(scope="module")
def sd15(comfy):
    return compat_model("sd15", seed=0)


def check_against(method, patched, reference_model, *, steps=STEPS, **kwargs):
    """``patched`` (our node + something) vs ``reference_model`` (the same something, no node)."""
    ref_traj = Trajectory()
    ref_out = sample(reference_model, callback=ref_traj, steps=steps, **kwargs)
    trajectory = Trajectory()
    with LogCapture() as log:
        out = sample(patched, callback=trajectory, steps=steps, **kwargs)
    assert_finite(out)
    stats = one_run(log)
    method.check_stats(stats, steps)
    expected_first = method.expected_reuse_steps(steps)[0]
    altered_at, what = first_altered_step(trajectory, ref_traj)
    assert altered_at == expected_first, f"first altered step {altered_at} ({what}), expected {expected_first}"
    return out, ref_out, stats


# -------------------------------------------------------------------------------------------------- ControlNet
@pytest.fixture(scope="module")
def controlled_conds(comfy):
    positive, negative = conditioning("sd15")
    return with_controlnet(positive, negative, tiny_controlnet("sd15"))


@pytest.mark.parametrize("method", METHODS, ids=METHOD_IDS)
def test_controlnet(sd15, controlled_conds, method):
    positive, negative = controlled_conds
    _, ref_out, _ = check_against(method, method.apply(sd15), sd15, positive=positive, negative=negative)
    assert not torch.equal(ref_out, sample(sd15, steps=STEPS)), "the ControlNet had no effect on the image"
    off = sample(method.apply_off(sd15), steps=STEPS, positive=positive, negative=negative)
    assert torch.equal(off, ref_out)


def test_controlnet_parallel_decoding_equals_sequential(sd15, controlled_conds):
    """ControlNet residuals exist per step; parallel decoding must not hand a step another step's residuals."""
    positive, negative = controlled_conds
    parallel = sample(METHODS[2].apply(sd15), steps=STEPS, positive=positive, negative=negative)
    sequential = sample(METHODS[3].apply(sd15), steps=STEPS, positive=positive, negative=negative)
    assert max_abs_diff(parallel, sequential) <= 1e-4 * float(sequential.abs().max())


@pytest.mark.parametrize("method", NODE_METHODS, ids=NODE_METHOD_IDS)
def test_controlnet_sdxl(comfy, method):
    sdxl = compat_model("sdxl", seed=0)
    positive, negative = with_controlnet(*conditioning("sdxl"), tiny_controlnet("sdxl"))
    check_against(method, method.apply(sdxl), sdxl, positive=positive, negative=negative)
    ref = sample(sdxl, steps=STEPS, positive=positive, negative=negative)
    assert torch.equal(sample(method.apply_off(sdxl), steps=STEPS, positive=positive, negative=negative), ref)


# --------------------------------------------------------------------------------------------------------- LoRA
@pytest.mark.parametrize("method", METHODS, ids=METHOD_IDS)
def test_lora_before_and_after_the_node(sd15, method):
    base_weights = weights_checksum(sd15)
    base_out = sample(sd15, steps=STEPS)
    lora = with_lora(sd15)
    lora_before = method.apply(lora)
    lora_after = with_lora(method.apply(sd15))
    out_before, ref_out, _ = check_against(method, lora_before, lora)
    out_after, _, _ = check_against(method, lora_after, lora)
    assert not torch.equal(ref_out, base_out), "the LoRA had no effect on the image"
    assert torch.equal(out_before, out_after), "LoRA before vs after the node gave different images"
    assert torch.equal(sample(method.apply_off(lora), steps=STEPS), ref_out)
    assert torch.equal(sample(with_lora(method.apply_off(sd15)), steps=STEPS), ref_out)
    # The LoRA is unpatched again: the base model samples exactly as before.
    assert torch.equal(sample(sd15, steps=STEPS), base_out)
    assert weights_checksum(sd15) == base_weights


# -------------------------------------------------------------------------------------------------------- FreeU
def freeu(model):
    from comfy_extras.nodes_freelunch import FreeU

    return FreeU().patch(model, b1=1.3, b2=1.4, s1=0.9, s2=0.2)[0]


class RowCounter:
    """Wraps every output_block_patch of a model to count the batch rows it processed."""

    def __init__(self, patcher):
        self.rows = 0
        patches = patcher.model_options["transformer_options"]["patches"]
        patches["output_block_patch"] = [self.wrap(p) for p in patches["output_block_patch"]]

    def wrap(self, patch):
        def counted(h, hsp, transformer_options):
            self.rows += h.shape[0]
            return patch(h, hsp, transformer_options)

        return counted


@pytest.mark.parametrize("order", ["freeu_first", "node_first"])
@pytest.mark.parametrize("method", METHODS, ids=METHOD_IDS)
def test_freeu_chained(sd15, method, order):
    patched = method.apply(freeu(sd15)) if order == "freeu_first" else freeu(method.apply(sd15))
    reference = freeu(sd15)
    _, ref_out, _ = check_against(method, patched, reference)
    assert not torch.equal(ref_out, sample(sd15, steps=STEPS)), "FreeU had no effect on the image"
    off = method.apply_off(freeu(sd15)) if order == "freeu_first" else freeu(method.apply_off(sd15))
    assert torch.equal(sample(off, steps=STEPS), ref_out)
    if method.node_id == "EncoderFeaturePropagation":
        # Decoder-only steps still apply FreeU to every output block, on every row (parallel or not).
        counted_ref = freeu(sd15)
        ref_rows = RowCounter(counted_ref)
        sample(counted_ref, steps=STEPS)
        counted = method.apply(freeu(sd15)) if order == "freeu_first" else freeu(method.apply(sd15))
        rows = RowCounter(counted)
        sample(counted, steps=STEPS)
        assert rows.rows == ref_rows.rows, f"FreeU saw {rows.rows} rows with the node, {ref_rows.rows} without"


# ---------------------------------------------------------------------------------------------------- EasyCache
EASYCACHE_STEPS = 10


def easycache(model):
    from comfy_extras.nodes_easycache import EasyCacheNode

    output = EasyCacheNode.execute(model, reuse_threshold=0.5, start_percent=0.1, end_percent=0.95, verbose=False)
    return output.result[0]


# What each node does when chained with core EasyCache (update together with docs/compatibility.md).
EASYCACHE_BEHAVIOUR = {"AttentionMapReuse": "works", "EncoderFeaturePropagation": "works"}


@pytest.mark.parametrize("order", ["easycache_first", "node_first"])
@pytest.mark.parametrize("method", METHODS, ids=METHOD_IDS)
def test_easycache_chained(sd15, method, order):
    """Runs (finite, both summaries, off = EasyCache alone) or is refused with a message naming EasyCache."""

    def build(m):
        return m.apply(easycache(sd15)) if order == "easycache_first" else easycache(m.apply(sd15))

    if EASYCACHE_BEHAVIOUR[method.node_id] == "refused":
        with pytest.raises((ValueError, TypeError)) as raised:
            sample(build(method), steps=EASYCACHE_STEPS)
        assert "EasyCache" in str(raised.value), f"refusal does not name EasyCache: {raised.value}"
        return
    with LogCapture() as log:
        out = sample(build(method), steps=EASYCACHE_STEPS)
    assert_finite(out)
    runs = runs_of(log)
    assert len(runs) == 1 and runs[0].steps == EASYCACHE_STEPS, log.messages
    skipped = log.matching("EasyCache - skipped")
    assert len(skipped) == 1, log.messages
    with LogCapture() as alone_log:
        alone = sample(easycache(sd15), steps=EASYCACHE_STEPS)
    assert "skipped 0/" not in alone_log.matching("EasyCache - skipped")[0], "EasyCache skipped nothing here"
    off = method.apply_off(easycache(sd15)) if order == "easycache_first" else easycache(method.apply_off(sd15))
    assert torch.equal(sample(off, steps=EASYCACHE_STEPS), alone)


# ------------------------------------------------- another cache skipping forwards around / inside our node
class StepProbe:
    """Test-only DIFFUSION_MODEL wrapper recording the sampling steps (by sigma) of the calls that reach it."""

    def __init__(self):
        self.steps: list[int] = []

    def __call__(self, executor, *args, **kwargs):
        from comfyui_reuse.nodes.comfy_steps import step_of_call, transformer_options_of

        match = step_of_call(transformer_options_of(args, kwargs))
        assert match is not None and match.exact, "euler calls the model once per step, at the step's sigma"
        self.steps.append(match.index)
        return executor(*args, **kwargs)


def test_easycache_outside_encoder_propagation_never_decodes_from_a_skipped_key_step(sd15):
    """EasyCache outermost: when it skips a key step, the node must not keep decoding from older features."""
    import comfy.patcher_extension

    diffusion_model = comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL
    method = METHODS[3]
    outer = StepProbe()  # between EasyCache and our node: the calls EasyCache let through
    inner = StepProbe()  # inside our node: the real (full) U-Net forwards
    model = easycache(sd15)
    model.add_wrapper_with_key(diffusion_model, "compat_outer_probe", outer)
    patched = method.apply(model)
    patched.add_wrapper_with_key(diffusion_model, "compat_inner_probe", inner)
    assert_finite(sample(patched, steps=EASYCACHE_STEPS))

    planned_keys = method.expected_key_steps(EASYCACHE_STEPS)
    skipped_keys = [k for k in planned_keys if k not in outer.steps]
    assert skipped_keys, f"precondition: EasyCache should skip a key step here (reached {outer.steps})"
    for step in sorted(set(outer.steps) - set(inner.steps)):  # served decoder-only by our node
        key = max(k for k in planned_keys if k <= step)
        assert any(key <= full <= step for full in inner.steps), (
            f"step {step} was decoded from encoder features older than its key step {key} (EasyCache skipped "
            f"that key step; full U-Net passes ran at {sorted(set(inner.steps))})"
        )


class SkipSteps:
    """Test-only DIFFUSION_MODEL wrapper that, like EasyCache / TeaCache / FBCache, skips the forward at some
    steps and returns the previous output instead."""

    def __init__(self, skip: set[int]):
        self.skip = skip
        self.last = None

    def __call__(self, executor, *args, **kwargs):
        from comfyui_reuse.nodes.comfy_steps import step_of_call, transformer_options_of

        match = step_of_call(transformer_options_of(args, kwargs))
        if match is not None and match.index in self.skip and self.last is not None:
            return self.last.clone()
        self.last = executor(*args, **kwargs)
        return self.last


@pytest.mark.parametrize("mode", ["map", "output"])
def test_attention_reuse_never_uses_a_map_older_than_its_schedule(sd15, mode):
    """Schedule 1110110000: step 3 reuses step 2, steps 6-9 reuse step 5. A forward-skipping cache inside the
    model skips step 5; steps 6-9 must then compute (no entry from step 5), not reuse step 2's attention."""
    import comfy.patcher_extension

    def run(schedule):
        patched = METHODS[0].apply(sd15, strategy="custom", custom_schedule=schedule, mode=mode)
        patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "compat_skip", SkipSteps({5}))
        with LogCapture() as log:
            out = sample(patched, steps=10)
        return out, one_run(log)

    out, stats = run("1110110000")
    expected, _ = run("1110111111")
    assert torch.equal(out, expected), f"steps after the skipped store step reused stale attention: {stats}"
