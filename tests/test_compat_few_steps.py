"""Compatibility matrix: short runs (few-step distilled models, 2-10 steps) and samplers that pick their own sigmas.

Every preset of both nodes runs at 2-10 steps on the tiny U-Net in real ComfyUI: the output is finite, the run
reuses what the core's schedule says (read from the engines' stats, ``run_records``) and, where that is nothing,
the node's one log line says so and why ("nothing to reuse at 3 steps: paper keeps steps 0-2 ..."). dpm_fast and
dpm_adaptive evaluate the model at sigmas of their own, never at the run's steps after step 0: both nodes name the
sampler in their log line instead of silently reusing nothing. A ``custom_key_steps`` entry beyond the run (an
attention bit string such as ``111100`` linked into it by mistake) is named in the log line too.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from comfy_harness import load_pack, sample
from compat_support import METHODS, LogCapture, assert_finite, compat_model, one_run

ATTENTION, ENCODER = METHODS[1], METHODS[3]  # output mode; sequential decoding (parallel: the same decisions)
SHORT_RUNS = (2, 3, 4, 5, 6, 8, 10)
ATTENTION_PRESETS = {
    "phast-half": dict(strategy="phast", reuse_fraction=0.5),
    "hurry-quarter": dict(strategy="hurry", reuse_fraction=0.25),
    "custom-20-bits": dict(strategy="custom"),  # the node's default: the paper's 20-step schedule, resampled
}
ENCODER_PRESETS = {
    "paper": dict(key_steps="paper"),
    "uniform-2": dict(key_steps="uniform", uniform_k=2),
    "uniform-4": dict(key_steps="uniform", uniform_k=4),
    "one_pass": dict(key_steps="one_pass"),
    "custom-default": dict(key_steps="custom"),  # the node's default list 0,1,2,3,5,10,15,25,35
    "adaptive": dict(key_steps="adaptive"),
}


@pytest.fixture(scope="module")
def sd15(comfy):
    return compat_model("sd15", seed=0)


@pytest.fixture(scope="module")
def core(comfy):
    load_pack()
    import comfyui_reuse.reuse_core.key_steps as key_steps
    import comfyui_reuse.reuse_core.schedules as schedules

    return SimpleNamespace(key_steps=key_steps, schedules=schedules)  # the pack's copy, as the nodes import it


def line_of(log: LogCapture, prefix: str) -> str:
    lines = [m for m in log.messages if m.startswith(prefix)]
    assert len(lines) == 1, log.messages
    return lines[0]


def run(method, model, steps: int, sampler: str = "euler", **inputs):
    with LogCapture() as log:
        out = sample(method.apply(model, **inputs), steps=steps, sampler=sampler)
    assert_finite(out)
    return one_run(log), log


@pytest.mark.parametrize("steps", SHORT_RUNS)
@pytest.mark.parametrize("preset", ATTENTION_PRESETS, ids=list(ATTENTION_PRESETS))
def test_attention_presets_on_short_runs(sd15, core, preset, steps):
    inputs = {**ATTENTION.inputs, **ATTENTION_PRESETS[preset]}
    spec = core.schedules.ScheduleSpec(
        inputs["strategy"], inputs["reuse_steps"], inputs["reuse_fraction"], inputs["custom_schedule"]
    )
    expected = spec.resolve(steps).schedule
    record, log = run(ATTENTION, sd15, steps, **ATTENTION_PRESETS[preset])
    line = line_of(log, "Attention Map Reuse: steps")
    assert (record.steps, record.schedule, record.reused_steps) == (steps, str(expected), expected.reuse_count)
    assert ("nothing to reuse at" in line) == (expected.reuse_count == 0), line
    assert "sigmas of its own" not in line, line


def test_short_run_with_nothing_to_reuse_says_why(sd15):
    record, log = run(ATTENTION, sd15, 4, strategy="phast", reuse_steps=0, reuse_fraction=0.1)
    assert record.reused_steps == 0
    assert line_of(log, "Attention Map Reuse: steps").endswith(
        "; nothing to reuse at 4 steps: reuse_fraction 0.1 of 4 steps rounds to 0 reuse steps"
    )
    record, log = run(ENCODER, sd15, 3, key_steps="paper")
    assert record.key_steps == (0, 1, 2) and record.encoder_passes_saved == 0
    assert line_of(log, "Encoder Feature Propagation: ").endswith(
        "; nothing to reuse at 3 steps: paper keeps steps 0-2 (runs of under 4 steps keep every step)"
    )


@pytest.mark.parametrize("steps", SHORT_RUNS)
@pytest.mark.parametrize("preset", ENCODER_PRESETS, ids=list(ENCODER_PRESETS))
def test_encoder_presets_on_short_runs(sd15, core, preset, steps):
    inputs = {**ENCODER.inputs, **ENCODER_PRESETS[preset]}
    spec = core.key_steps.KeyStepSpec.from_inputs(
        inputs["key_steps"], inputs["uniform_k"], inputs["custom_key_steps"], inputs["adaptive_threshold"]
    )
    record, log = run(ENCODER, sd15, steps, **ENCODER_PRESETS[preset])
    line = line_of(log, "Encoder Feature Propagation: ")
    assert record.steps == steps
    if not spec.adaptive:
        assert record.key_steps == spec.key_steps(steps)
    if preset == "paper" and steps >= 4:
        assert record.reused_steps >= steps // 4  # few-step runs keep a quarter of their steps decoder-only
    assert ("nothing to reuse at" in line) == (record.encoder_passes_saved == 0), line
    assert ("beyond this" in line) == bool(spec.beyond(steps)), line


@pytest.mark.parametrize("sampler", ["dpm_fast", "dpm_adaptive"])
@pytest.mark.parametrize("method", [ATTENTION, ENCODER], ids=["attention", "encoder"])
def test_samplers_with_sigmas_of_their_own_are_named(sd15, method, sampler):
    record, log = run(method, sd15, 6, sampler)
    prefix = "Attention Map Reuse: steps" if method is ATTENTION else "Encoder Feature Propagation: "
    line = line_of(log, prefix)
    said = (
        f"sampler {sampler} evaluated the model at sigmas of its own, at none of this 6-step run's steps after step 0"
    )
    assert said in line, line
    if method is ATTENTION:
        assert record.reused_steps == 0 and record.calls_reused == 0, record
        assert "; nothing reused: " in line, line
    else:
        assert "; key steps not followed: " in line, line


@pytest.mark.parametrize("sampler", ["euler", "heun", "dpm_2", "uni_pc"])
@pytest.mark.parametrize("method", [ATTENTION, ENCODER], ids=["attention", "encoder"])
def test_samplers_that_step_through_the_run_get_no_such_note(sd15, method, sampler):
    record, log = run(method, sd15, 6, sampler)
    prefix = "Attention Map Reuse: steps" if method is ATTENTION else "Encoder Feature Propagation: "
    assert record.reused_steps > 0
    assert "sigmas of its own" not in line_of(log, prefix)


def test_custom_key_steps_beyond_the_run_are_named(sd15):
    record, log = run(ENCODER, sd15, 6, key_steps="custom", custom_key_steps="111100")
    assert record.key_steps == (0,) and record.encoder_passes_saved == 5  # one pass, as one_pass
    assert line_of(log, "Encoder Feature Propagation: ").endswith(
        "; custom_key_steps 111100 beyond this 6-step run dropped (an Attention Map Reuse schedule? key steps are "
        "0-based step indices such as 0,1,2,5): only step 0 is left, one encoder pass for the whole run"
    )
    record, log = run(ENCODER, sd15, 6, key_steps="custom", custom_key_steps="0,2,4,10")
    assert record.key_steps == (0, 2, 4)
    assert line_of(log, "Encoder Feature Propagation: ").endswith(
        "; custom_key_steps 10 beyond this 6-step run dropped"
    )
