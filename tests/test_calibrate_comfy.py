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


def calibrate_all(node, model, positive, negative, latent, **overrides):
    """Every output: key_steps, schedule, report, latent, forecast."""
    settings = dict(seed=3, steps=STEPS, cfg=5.0, sampler_name="euler", scheduler="normal", target=3.0)
    settings.update(overrides)
    inputs = {i.id: i.default for i in node.define_schema().inputs if hasattr(i, "default")}  # widgets only
    assert set(settings) <= set(inputs), set(settings) - set(inputs)
    inputs.update(settings)
    return node.execute(model=model, positive=positive, negative=negative, latent_image=latent, **inputs).result


def calibrate(node, model, positive, negative, latent, **overrides):
    """The outputs the node had before forecasting: key_steps, schedule, report, latent."""
    return calibrate_all(node, model, positive, negative, latent, **overrides)[:4]


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


# ------------------------------------------------------------------------------------------------ forecasting
def test_the_forecast_input_fits_to_its_error_and_leaves_as_an_output(nodes, models):
    from comfy_execution.validation import validate_node_input

    positive, negative, latent = inputs_for("sd15")
    node = nodes["ReuseCalibrate"]
    schema = node.define_schema()
    assert schema.inputs[-1].id == "forecast" and list(schema.inputs[-1].options) == ["reuse", "linear", "quadratic"]
    assert schema.inputs[-1].default == "reuse"
    # the output links into both nodes' forecast combo, as ComfyUI's server validates a link (both versions)
    for target in ("EncoderFeaturePropagation", "AttentionMapReuse"):
        input_type = nodes[target].INPUT_TYPES()["required"]["forecast"][0]
        assert validate_node_input(node.RETURN_TYPES[-1], input_type), (node.RETURN_TYPES[-1], input_type)
    model = models["sd15"]
    keys, schedule, report, out, forecast = calibrate_all(node, model, positive, negative, latent, forecast="linear")
    assert forecast == "linear"
    assert torch.equal(out["samples"], sample(models["sd15"], positive, negative, latent))
    assert len(keys.split(",")) == STEPS - 3 and schedule.count("0") == 3
    assert "key steps, linear forecast error" in report and "reuse steps, linear forecast error" in report
    assert "forecast: Encoder Feature Propagation linear, Attention Map Reuse linear" in report
    *_, map_report, _, map_forecast = calibrate_all(
        node, models["sd15"], positive, negative, latent, forecast="quadratic", attention_mode="map"
    )
    assert map_forecast == "quadratic"
    assert "key steps, quadratic forecast error" in map_report and "reuse steps, drift" in map_report
    assert "the map schedule is fitted to reuse" in map_report
    *_, plain_forecast = calibrate_all(node, models["sd15"], positive, negative, latent)
    assert plain_forecast == "reuse"


def test_the_forecast_output_drives_both_nodes_in_a_workflow(comfy):
    from compat_support import ComfyExecutor, LogCapture, PromptBuilder, runs_of

    b = PromptBuilder()
    model = b.tiny_model("sd15")
    positive, negative = b.conditioning("sd15")
    latent = b.empty_latent()
    widgets = {i.id: i.default for i in h.pack_node("ReuseCalibrate").define_schema().inputs if hasattr(i, "default")}
    widgets.update(seed=3, steps=STEPS, cfg=5.0, sampler_name="euler", scheduler="normal", target=3.0)
    widgets.update(forecast="linear")
    calibration = b.add(
        "ReuseCalibrate", **widgets, model=model, positive=positive, negative=negative, latent_image=latent
    )
    efp = b.add(
        "EncoderFeaturePropagation",
        **h.node_inputs(
            h.pack_node("EncoderFeaturePropagation"), key_steps="custom", custom_key_steps=(calibration, 0),
            forecast=(calibration, 4),
        ),
        model=model,
    )  # fmt: skip
    amr = b.add(
        "AttentionMapReuse",
        **h.node_inputs(
            h.pack_node("AttentionMapReuse"), strategy="custom", custom_schedule=(calibration, 1), mode="output",
            forecast=(calibration, 4),
        ),
        model=(efp, 0),
    )  # fmt: skip
    b.stash(b.ksampler((amr, 0), positive, negative, latent, seed=3, steps=STEPS), "calibrated-forecast")
    executor = ComfyExecutor()  # loads the pack once more: before LogCapture, which wraps every loaded copy
    with LogCapture() as log:
        executor.run(b.prompt)  # fails on validation if a link is refused
    records = {r.node: r for r in runs_of(log)}
    assert set(records) == {ENCODER, ATTENTION}, runs_of(log)
    assert 1 in records[ENCODER].stats.forecast_orders, records[ENCODER].stats  # linear forecasts ran
    assert 1 in records[ATTENTION].stats.forecast_orders, records[ATTENTION].stats
    assert len(records[ENCODER].key_steps) == STEPS - 3 and records[ATTENTION].schedule.count("0") == 3


def test_an_interrupt_while_fitting_stops_the_node(nodes, models, monkeypatch):
    import sys

    import comfy.model_management

    positive, negative, latent = inputs_for("sd15")
    node_module = sys.modules[nodes["ReuseCalibrate"].__module__]
    log_run = node_module.log_run
    sampled = []

    def then_interrupt(run):  # called once sampling is done, before the fit
        log_run(run)
        sampled.append(run)
        comfy.model_management.interrupt_current_processing(True)

    monkeypatch.setattr(node_module, "log_run", then_interrupt)
    torch.set_num_threads(2)  # the fit runs on one thread and gives the setting back, interrupted or not
    try:
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            calibrate(nodes["ReuseCalibrate"], models["sd15"], positive, negative, latent, forecast="quadratic")
        assert sampled and not comfy.model_management.processing_interrupted()  # the fit took the interrupt
        assert torch.get_num_threads() == 2
    finally:
        comfy.model_management.interrupt_current_processing(False)
        torch.set_num_threads(1)


# ------------------------------------------------------------------------------------- refused before sampling
@pytest.fixture
def no_sampling(monkeypatch, comfy):
    import comfy.sample

    def refuse(*args, **kwargs):
        raise AssertionError("Reuse Calibrate sampled before refusing its inputs")

    monkeypatch.setattr(comfy.sample, "sample", refuse)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(target=float(STEPS)), f"target: {STEPS} reused steps leave no compute step"),
        (dict(target=2.5), "target: with target_kind = reuse_steps"),
        (dict(target_kind="speedup", target=5.0), r"target: a 5x speed-up is out of reach.*encoder_reuse_cost"),
        (
            dict(target_kind="speedup", target=1.4, encoder_reuse_cost=0.1, attention_reuse_cost=0.9),
            r"target: a 1.4x speed-up is out of reach.*attention_reuse_cost",
        ),
        (dict(target_kind="speedup", target=0.5), "target: with target_kind = speedup, give a speed-up >= 1"),
        (dict(encoder_reuse_cost=float("nan")), "encoder_reuse_cost: .* got nan"),
        (dict(target_kind="speedup", target=1.2, attention_reuse_cost=float("nan")), "attention_reuse_cost: .* nan"),
        (dict(sampler_name="dpm_fast"), "sampler_name: dpm_fast picks its own steps"),
        (dict(sampler_name="dpm_adaptive"), "sampler_name: dpm_adaptive picks its own steps"),
        (dict(forecast="cubic"), "forecast: must be one of"),
        (dict(attention_mode="maps"), "attention_mode"),
    ],
)
def test_input_errors_are_refused_before_sampling(nodes, models, no_sampling, overrides, message):
    positive, negative, latent = inputs_for("sd15")
    with pytest.raises(ValueError, match=message):
        calibrate(nodes["ReuseCalibrate"], models["sd15"], positive, negative, latent, **overrides)


@pytest.mark.parametrize("cache", ["EasyCache", "LazyCache"])
def test_a_model_behind_a_step_cache_is_refused_before_sampling(nodes, models, no_sampling, cache):
    from comfy_extras import nodes_easycache

    positive, negative, latent = inputs_for("sd15")
    cache_node = getattr(nodes_easycache, f"{cache}Node")
    cached = cache_node.execute(
        models["sd15"], reuse_threshold=0.2, start_percent=0.15, end_percent=0.95, verbose=False
    )
    with pytest.raises(ValueError, match=f"model: Reuse Calibrate needs the model before {cache}"):
        calibrate(nodes["ReuseCalibrate"], cached[0], positive, negative, latent)


def test_a_model_neither_node_supports_is_refused_before_sampling(nodes, no_sampling):
    dit = tiny_dits.build("ernie_image")  # skips where ComfyUI has no ERNIE-Image
    with pytest.raises(ValueError, match=r"model: neither .* supports .*ErnieImageModel"):
        calibrate(nodes["ReuseCalibrate"], dit.patcher, dit.positive, dit.negative, {"samples": dit.latent.clone()})


def test_steps_another_node_skipped_are_named_after_the_run(nodes, models):
    import comfy.patcher_extension

    positive, negative, latent = inputs_for("sd15")
    calls = []

    def skipping_cache(executor, *args, **kwargs):  # a cache the node does not know: returns step 2's call early
        calls.append(1)
        if len(calls) == 3:
            return previous[0]
        previous[:] = [executor(*args, **kwargs)]
        return previous[0]

    previous = []
    model = models["sd15"].clone()
    model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "some_cache", skipping_cache)
    with pytest.raises(ValueError, match=r"steps \[2\] were never recorded.*skipped model calls"):
        calibrate(nodes["ReuseCalibrate"], model, positive, negative, latent)


# --------------------------------------------------------------------- models without a DIFFUSION_MODEL wrapper point
@pytest.mark.parametrize("family", ["sd3", "sd35", "boogu"])
def test_models_without_a_diffusion_model_wrapper_point_are_calibrated(nodes, family):
    dit = tiny_dits.build(family)  # Boogu: skips where ComfyUI has none
    latent = {"samples": dit.latent.clone()}
    keys, schedule, report, out, forecast = calibrate_all(
        nodes["ReuseCalibrate"], dit.patcher, dit.positive, dit.negative, latent, forecast="linear"
    )
    assert torch.equal(out["samples"], sample(dit.patcher, dit.positive, dit.negative, latent))
    assert len(keys.split(",")) == STEPS - 3 and schedule.count("0") == 3 and forecast == "linear"
    assert "no attention call was recorded" not in report  # the schedule is fitted to the attention outputs
    assert "cannot split this model" in report
