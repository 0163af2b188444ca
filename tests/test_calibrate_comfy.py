"""Reuse Calibrate and adaptive key steps in real ComfyUI: tiny SD1.5/SDXL U-Nets and a tiny Flux.

The calibration run is the unpatched model's run (bit for bit), its schedules have the requested budget, are the
same for the same seed, and run in the two nodes with every sampler family (single-evaluation, Heun-type,
midpoint, multistep). Adaptive key steps with threshold 0 are the full model bit for bit.
"""

import comfy_harness as h
import pytest
import tiny_dits
import torch
from run_records import ATTENTION, ENCODER

STEPS = 8
SAMPLERS = ["euler", "heun", "dpmpp_2m", "dpmpp_2s_ancestral", "uni_pc", "ddim"]


@pytest.fixture(scope="module")
def nodes(comfy):
    return {name: h.pack_node(name) for name in ("ReuseCalibrate", "EncoderFeaturePropagation", "AttentionMapReuse")}


@pytest.fixture(scope="module")
def models(comfy):
    built = {"sd15": h.tiny_model("sd15", seed=0), "sdxl": h.tiny_model("sdxl", seed=0)}
    yield built
    built.clear()


def inputs_for(kind):
    positive, negative = h.conditioning(kind)
    return positive, negative, {"samples": torch.zeros(1, 4, 16, 16)}


def calibrate(node, model, positive, negative, latent, **overrides):
    settings = dict(seed=3, steps=STEPS, cfg=5.0, sampler_name="euler", scheduler="normal", target=3.0)
    settings.update(overrides)
    inputs = {i.id: i.default for i in node.define_schema().inputs if hasattr(i, "default")}  # widgets only
    assert set(settings) <= set(inputs), set(settings) - set(inputs)
    inputs.update(settings)
    return node.execute(model=model, positive=positive, negative=negative, latent_image=latent, **inputs).result


def sample(model, positive, negative, latent, sampler="euler"):
    return h.sample(
        model, steps=STEPS, cfg=5.0, sampler=sampler, seed=3, positive=positive, negative=negative,
        latent=latent["samples"].clone(),
    )  # fmt: skip


def apply(node, model, **overrides):
    return node.execute(model=model, **h.node_inputs(node, **overrides)).result[0]


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_calibration_is_the_full_run_has_the_budget_and_is_deterministic(nodes, models, kind):
    positive, negative, latent = inputs_for(kind)
    keys, schedule, report, out = calibrate(nodes["ReuseCalibrate"], models[kind], positive, negative, latent)
    assert torch.equal(out["samples"], sample(models[kind], positive, negative, latent))
    key_list = [int(s) for s in keys.split(",")]
    assert key_list[0] == 0 and len(key_list) == STEPS - 3 and key_list == sorted(set(key_list))
    assert len(schedule) == STEPS and schedule[0] == "1" and schedule.count("0") == 3
    assert keys in report and schedule in report
    again = calibrate(nodes["ReuseCalibrate"], models[kind], positive, negative, latent)
    assert again[:3] == (keys, schedule, report)


def test_another_nodes_attention_override_is_chained(nodes, models):
    positive, negative, latent = inputs_for("sd15")
    calls = []

    def other(func, *args, **kwargs):  # e.g. ComfyUI's ModelAttentionBackend, installed before the calibration
        calls.append(1)
        return func(*args, **kwargs)

    model = models["sd15"].clone()
    model.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = other
    _, _, report, out = calibrate(nodes["ReuseCalibrate"], model, positive, negative, latent)
    assert calls, "the other node's override was dropped"
    assert "no attention call was recorded" not in report
    assert model.model_options["transformer_options"]["optimized_attention_override"] is other
    assert torch.equal(out["samples"], sample(models["sd15"], positive, negative, latent))


def test_speedup_target_and_attention_mode_change_the_budget(nodes, models):
    positive, negative, latent = inputs_for("sd15")
    node = nodes["ReuseCalibrate"]
    keys, schedule, _, _ = calibrate(
        node, models["sd15"], positive, negative, latent, target_kind="speedup", target=1.25,
        encoder_reuse_cost=0.5, attention_reuse_cost=0.5, attention_mode="map",
    )  # fmt: skip
    # 8 steps, reuse step = half a step: K + (8 - K) / 2 <= 8 / 1.25 -> K <= 4.8
    assert len(keys.split(",")) == 4 and schedule.count("1") == 4


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_calibrated_schedules_run_in_both_nodes(nodes, models, runs, sampler):
    positive, negative, latent = inputs_for("sd15")
    model = models["sd15"]
    keys, schedule, _, _ = calibrate(nodes["ReuseCalibrate"], model, positive, negative, latent, sampler_name=sampler)
    efp = apply(nodes["EncoderFeaturePropagation"], model, key_steps="custom", custom_key_steps=keys)
    both = apply(nodes["AttentionMapReuse"], efp, strategy="custom", custom_schedule=schedule, mode="output")
    out = sample(both, positive, negative, latent, sampler)
    assert torch.isfinite(out).all()
    assert runs.last(ENCODER).key_steps == tuple(int(s) for s in keys.split(","))
    assert runs.last(ATTENTION).schedule == schedule


def test_refuses_a_patched_model_and_bad_targets(nodes, models):
    positive, negative, latent = inputs_for("sd15")
    node = nodes["ReuseCalibrate"]
    for reuse_node in ("AttentionMapReuse", "EncoderFeaturePropagation"):
        patched = apply(nodes[reuse_node], models["sd15"])
        with pytest.raises(ValueError, match="model: Reuse Calibrate needs the model before"):
            calibrate(node, patched, positive, negative, latent)
    with pytest.raises(ValueError, match="target: with target_kind = reuse_steps"):
        calibrate(node, models["sd15"], positive, negative, latent, target=2.5)
    with pytest.raises(ValueError, match=f"target: {STEPS} reused steps"):
        calibrate(node, models["sd15"], positive, negative, latent, target=float(STEPS))
    with pytest.raises(ValueError, match="target: a 5x speed-up is out of reach"):
        calibrate(node, models["sd15"], positive, negative, latent, target_kind="speedup", target=5.0)


def test_flux_calibration_and_its_schedules(nodes, runs):
    dit = tiny_dits.build("flux")
    latent = {"samples": dit.latent.clone()}
    keys, schedule, report, out = calibrate(nodes["ReuseCalibrate"], dit.patcher, dit.positive, dit.negative, latent)
    assert torch.equal(out["samples"], sample(dit.patcher, dit.positive, dit.negative, latent))
    assert len(keys.split(",")) == STEPS - 3 and schedule.count("0") == 3
    assert "cannot split" not in report
    again = calibrate(nodes["ReuseCalibrate"], dit.patcher, dit.positive, dit.negative, latent)
    assert again[:2] == (keys, schedule)
    efp = apply(nodes["EncoderFeaturePropagation"], dit.patcher, key_steps="custom", custom_key_steps=keys)
    both = apply(nodes["AttentionMapReuse"], efp, strategy="custom", custom_schedule=schedule, mode="output")
    assert torch.isfinite(sample(both, dit.positive, dit.negative, latent)).all()
    assert runs.last(ENCODER).key_steps == tuple(int(s) for s in keys.split(","))


@pytest.mark.parametrize("sampler", ["euler", "heun", "dpmpp_2m"])
def test_adaptive_threshold_zero_is_bit_identical_and_positive_reuses(nodes, models, runs, sampler):
    positive, negative, latent = inputs_for("sd15")
    model = models["sd15"]
    full = sample(model, positive, negative, latent, sampler)
    node = nodes["EncoderFeaturePropagation"]
    zero = sample(apply(node, model, key_steps="adaptive", adaptive_threshold=0.0), positive, negative, latent, sampler)
    assert torch.equal(zero, full)
    assert runs.last(ENCODER).key_steps == tuple(range(STEPS))
    adaptive = apply(node, model, key_steps="adaptive", adaptive_threshold=0.5)
    out = sample(adaptive, positive, negative, latent, sampler)
    record = runs.last(ENCODER)
    assert record.encoder_passes_saved > 0 and 1 < len(record.key_steps) < STEPS, record
    assert record.largest_batch <= 1  # adaptive decodes sequentially
    assert torch.isfinite(out).all() and not torch.equal(out, full)


def test_adaptive_on_flux_and_its_input_validation(nodes, runs):
    dit = tiny_dits.build("flux")
    latent = {"samples": dit.latent.clone()}
    full = sample(dit.patcher, dit.positive, dit.negative, latent)
    node = nodes["EncoderFeaturePropagation"]
    zero = apply(node, dit.patcher, key_steps="adaptive", adaptive_threshold=0.0)
    assert torch.equal(sample(zero, dit.positive, dit.negative, latent), full)
    with pytest.raises(ValueError, match="adaptive_threshold"):
        apply(node, dit.patcher, key_steps="adaptive", adaptive_threshold=-1.0)
