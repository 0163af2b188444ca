"""Compatibility matrix, part 4: bad input.

Every bad value gets an error that names the field and says how to fix it, raised when the node executes
(not deep inside sampling), and the input MODEL is left exactly as it was. Two checks can only happen when
sampling starts, because the node cannot know the run's sampler before then: prior noise injection with a sampler it
cannot be exact for. It must fail at the start of the run, before any model call, with the same kind of message,
and leave the patched model usable.

Schedules that do not fit the run are documented as rescaled (attention: resampled by relative position, or half
the run reused where ``reuse_steps`` >= the run's steps; encoder propagation: key steps beyond the run dropped),
each logged; those are asserted as such.
"""

from __future__ import annotations

import math

import pytest
import torch
from comfy_harness import pack_node, sample
from compat_support import (
    METHODS,
    LogCapture,
    Trajectory,
    assert_finite,
    compat_model,
    first_altered_step,
    matrix_inputs,
    one_run,
    patcher_snapshot,
)

FIX_HINTS = ("must", "use ", "set ", "give ", "choose", "e.g.", "supported", "remove", "write", "lower")


@pytest.fixture(scope="module")
def sd15(comfy):
    return compat_model("sd15", seed=0)


def assert_refused_at_execution(node_id: str, model, field: str, **bad):
    """The node raises a clear ``ValueError`` naming ``field`` (or saying all of ``field``, "name: what") and
    leaves ``model`` as it was."""
    before = patcher_snapshot(model)
    with pytest.raises(ValueError) as raised:
        pack_node(node_id).execute(model=model, **matrix_inputs(node_id, **bad))
    message = str(raised.value)
    assert field in message, f"error does not name the field {field!r}: {message}"
    assert any(hint in message.lower() for hint in FIX_HINTS), f"error does not say how to fix it: {message}"
    assert patcher_snapshot(model) == before, "a refused node call changed the input model"


ATTENTION_BAD = [
    ("custom_schedule", dict(strategy="custom", custom_schedule="11x00")),
    ("custom_schedule", dict(strategy="custom", custom_schedule="")),
    ("custom_schedule: must start with 1", dict(strategy="custom", custom_schedule="0111")),
    ("custom_schedule", dict(strategy="custom", custom_schedule="1 1 2 0")),
    ("reuse_steps", dict(reuse_steps=-1)),
    ("reuse_fraction", dict(reuse_fraction=math.nan)),
    ("reuse_fraction", dict(reuse_fraction=-0.2)),
    ("reuse_fraction", dict(reuse_fraction=1.0)),
    ("memory_budget_mb", dict(memory_budget_mb=-1)),
    ("memory_budget_mb", dict(memory_budget_mb=math.nan)),
    ("strategy", dict(strategy="fastest")),
    ("mode", dict(mode="maps")),
    ("attention", dict(attention="all")),
    ("cache_device", dict(cache_device="gpu")),
]


@pytest.mark.parametrize(
    ("field", "bad"), ATTENTION_BAD, ids=[f"{f.split(':')[0]}-{i}" for i, (f, _) in enumerate(ATTENTION_BAD)]
)
def test_attention_bad_input(sd15, field, bad):
    assert_refused_at_execution("AttentionMapReuse", sd15, field, **bad)


ENCODER_BAD = [
    ("custom_key_steps", dict(key_steps="custom", custom_key_steps="0,a,4")),
    ("custom_key_steps", dict(key_steps="custom", custom_key_steps="0,-1")),
    ("custom_key_steps", dict(key_steps="custom", custom_key_steps="")),
    ("custom_key_steps", dict(key_steps="custom", custom_key_steps="0, 1.5")),
    ("key_steps", dict(key_steps="fastest")),
    ("uniform_k", dict(uniform_k=0)),
    ("uniform_k", dict(uniform_k=-3)),
    ("max_decoders_per_batch", dict(max_decoders_per_batch=0)),
    ("start_percent", dict(start_percent=math.nan)),
    ("start_percent", dict(start_percent=-0.1)),
    ("end_percent", dict(end_percent=1.5)),
    ("end_percent", dict(end_percent=math.nan)),
    ("start_percent", dict(start_percent=0.6, end_percent=0.4)),
    ("noise_alpha", dict(noise_alpha=-0.003)),
    ("noise_alpha", dict(noise_alpha=math.nan)),
    ("noise_alpha", dict(noise_alpha=math.inf)),
    ("noise_tau", dict(noise_tau=-1.0)),
    ("noise_tau", dict(noise_tau=math.nan)),
    ("noise_tau", dict(noise_tau=5000.0)),
    ("encoder_fraction", dict(encoder_fraction=0.0)),
    ("encoder_fraction", dict(encoder_fraction=1.0)),
    ("encoder_fraction", dict(encoder_fraction=math.nan)),
]


@pytest.mark.parametrize(("field", "bad"), ENCODER_BAD, ids=[f"{f}-{i}" for i, (f, _) in enumerate(ENCODER_BAD)])
def test_encoder_bad_input(sd15, field, bad):
    assert_refused_at_execution("EncoderFeaturePropagation", sd15, field, **bad)


class UnsupportedNet(torch.nn.Module):
    """A diffusion model class neither node knows."""

    def forward(self, x, *args, **kwargs):
        return x


@pytest.mark.parametrize("node_id", ["AttentionMapReuse", "EncoderFeaturePropagation"])
def test_unsupported_model_type_names_the_class(comfy, node_id):
    model = compat_model("sd15", seed=0)
    model.model.diffusion_model = UnsupportedNet()
    before = patcher_snapshot(model)
    with pytest.raises((ValueError, TypeError)) as raised:
        pack_node(node_id).execute(model=model, **matrix_inputs(node_id))
    assert "UnsupportedNet" in str(raised.value), str(raised.value)
    assert "model" in str(raised.value).lower()
    assert patcher_snapshot(model) == before


def test_refused_inputs_leave_input_model_sampling_unchanged(sd15):
    reference = sample(sd15, steps=4)
    for node_id, bad in (("AttentionMapReuse", ATTENTION_BAD), ("EncoderFeaturePropagation", ENCODER_BAD)):
        for _, inputs in bad:
            with pytest.raises((ValueError, TypeError)):
                pack_node(node_id).execute(model=sd15, **matrix_inputs(node_id, **inputs))
    assert torch.equal(sample(sd15, steps=4), reference)


# --------------------------------------------------------------------------------- errors only a run can show
class CallCounter:
    def __init__(self):
        self.calls = 0

    def __call__(self, executor, *args, **kwargs):
        self.calls += 1
        return executor(*args, **kwargs)


def counted(patcher):
    import comfy.patcher_extension

    counter = CallCounter()
    patcher.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "compat_count", counter)
    return counter


def test_reuse_steps_not_below_run_steps_reuses_half_the_run_and_says_so(sd15):
    before = patcher_snapshot(sd15)
    patched = METHODS[0].apply(sd15, reuse_steps=6)
    with LogCapture() as log:
        short = sample(patched, steps=6)
    assert_finite(short)
    assert one_run(log).reused_steps == 3
    assert log.matching("reuse_steps 6 leaves no compute step in this 6-step run: reusing 3 (half the run")
    assert patcher_snapshot(sd15) == before
    # The same patched model on a longer run uses reuse_steps as given, exactly like a fresh one.
    with LogCapture() as log:
        out = sample(patched, steps=8)
    assert one_run(log).reused_steps == 6
    assert torch.equal(out, sample(METHODS[0].apply(sd15, reuse_steps=6), steps=8))


@pytest.mark.parametrize("sampler", ["heun", "dpmpp_2m", "euler_ancestral"])
def test_noise_injection_with_inexact_sampler_fails_before_any_model_call(sd15, sampler):
    patched = METHODS[2].apply(sd15, noise_alpha=0.003)
    counter = counted(patched)
    with pytest.raises(ValueError, match="noise_alpha") as raised:
        sample(patched, steps=6, sampler=sampler)
    assert "euler" in str(raised.value), str(raised.value)
    assert counter.calls == 0


@pytest.mark.parametrize("sampler", ["euler", "ddim"])
def test_noise_injection_runs_with_exact_samplers(sd15, sampler):
    without = sample(METHODS[2].apply(sd15), steps=6, sampler=sampler)
    with LogCapture() as log:
        out = sample(METHODS[2].apply(sd15, noise_alpha=0.003, noise_tau=1000.0), steps=6, sampler=sampler)
    assert torch.isfinite(out).all()
    assert one_run(log).noise_injection
    assert not torch.equal(out, without), "noise injection changed nothing"


# ------------------------------------------------------------------------------ schedule length vs step count
@pytest.mark.parametrize(
    ("written", "steps", "resolved"),
    [("1100", 8, "11110000"), ("111111110000", 6, "111100"), ("111000", 6, "111000")],
)
def test_attention_custom_schedule_of_another_length_is_resampled(sd15, written, steps, resolved):
    reference = Trajectory()
    sample(sd15, steps=steps, callback=reference)
    patched = METHODS[1].apply(sd15, strategy="custom", custom_schedule=written)
    trajectory = Trajectory()
    with LogCapture() as log:
        sample(patched, steps=steps, callback=trajectory)
    stats = one_run(log)
    assert stats.schedule == resolved and stats.steps == steps
    if len(written) != steps:
        assert log.matching("custom_schedule", "resampled"), "the rescaling was not logged"
    else:
        assert not log.matching("resampled")
    assert first_altered_step(trajectory, reference)[0] == resolved.index("0")


@pytest.mark.parametrize(
    ("written", "keys"), [("0,2,50", (0, 2)), ("2,4", (0, 2, 4)), ("0 1 2 3 4 5 6 7 8 9", (0, 1, 2, 3, 4, 5))]
)
def test_encoder_custom_key_steps_beyond_the_run_are_ignored(sd15, written, keys):
    patched = METHODS[3].apply(sd15, key_steps="custom", custom_key_steps=written)
    with LogCapture() as log:
        out = sample(patched, steps=6)
    assert torch.isfinite(out).all()
    assert one_run(log).key_steps == keys
    if len(keys) == 6:  # every step a key step: documented bit-identical to the unpatched model
        assert torch.equal(out, sample(sd15, steps=6))
