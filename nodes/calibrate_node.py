"""V3 node ``ReuseCalibrate``: one full-compute KSampler run -> calibrated schedules for both reuse nodes.

The schedules leave as STRING outputs, wired into the existing ``custom_key_steps`` (Encoder Feature Propagation,
``key_steps = custom``) and ``custom_schedule`` (Attention Map Reuse, ``strategy = custom``) widgets: in the V3 API a
STRING output links to any STRING widget input, so saved workflows and the nodes' inputs stay as they are, the same
text can be pasted instead of linked, and there is no new type for other packs to learn. The forecast the schedules
were fitted to leaves as a COMBO output (type ``COMBO`` in every version: ComfyUI 0.3.64 and 0.33.0 both accept it
for a combo input, neither accepts a STRING there), linked into both nodes' ``forecast`` inputs. Everything that
needs only the inputs is checked before sampling. The core (``reuse_core.calibration``) does the optimisation,
calling ComfyUI's interrupt check while it fits; ``calibrate_hooks`` records the run.
"""

from __future__ import annotations

import logging
import math
from contextlib import contextmanager

import torch
from comfy_api.latest import io

from ..reuse_core.calibration import ATTENTION_MAP, ATTENTION_OUTPUT, Budget, calibrate, sigma_step_weights
from ..reuse_core.encoder_engine import DIT_PAPER_ENCODER_FRACTION, check_encoder_fraction
from ..reuse_core.forecast import FORECASTS, ForecastSpec
from .calibrate_hooks import CalibrationSession, log_run, recording_clone
from .encoder_node import encoder_fraction_input, forecast_input

TARGET_KINDS = ("reuse_steps", "speedup")
# Measured on the full-size SD1.5 U-Net in ComfyUI on CPU (docs/benchmarks.md): a decoder-only step of Encoder
# Feature Propagation costs ~0.66 of a full step (paper preset 1.25x, uniform k=4 1.35x, sequential), an output-mode
# attention reuse step ~0.8 (0.79-0.82 at 512x512).
ENCODER_REUSE_COST = 0.66
ATTENTION_REUSE_COST = 0.8
ATTENTION_MODES = (ATTENTION_OUTPUT, ATTENTION_MAP)  # Attention Map Reuse's modes, named as the recorder names them
# Samplers that choose their own sigmas (comfy.samplers.ksampler): their steps are never the run's steps.
OWN_STEP_SAMPLERS = ("dpm_fast", "dpm_adaptive")
COST_INPUTS = ("encoder_reuse_cost", "attention_reuse_cost")


def _reuse_cost_input(name: str, default: float, tooltip: str) -> io.Float.Input:
    return io.Float.Input(name, default=default, min=0.0, max=0.99, step=0.01, tooltip="speedup only: " + tooltip)


class _ForecastOutput(io.Combo.Output):
    """A COMBO output that links into combo inputs: ``io.Combo.Output`` is typed ``COMBO`` in ComfyUI 0.33.0 but by
    its option list in 0.3.64, which the server refuses for a combo input; ``COMBO`` passes both servers' checks and
    the frontend's (the types are compared by name)."""

    @property
    def io_type(self):
        return "COMBO"


def check_inputs(
    steps: int,
    sampler_name: str,
    budget: Budget,
    costs: dict[str, float],
    attention_mode: str,
    forecast: str,
) -> ForecastSpec:
    """Everything that needs only the inputs, before the (long) sampling run; each error names its input."""
    if sampler_name in OWN_STEP_SAMPLERS:
        raise ValueError(
            f"sampler_name: {sampler_name} picks its own steps instead of the run's {steps}, so no schedule can be "
            "fitted to them (and the reuse nodes could not follow one); calibrate with another sampler"
        )
    if attention_mode not in ATTENTION_MODES:
        raise ValueError(f"attention_mode: choose output or map, got {attention_mode!r}")
    for name, cost in costs.items():
        if not isinstance(cost, (int, float)) or isinstance(cost, bool) or not math.isfinite(cost) or not 0 <= cost < 1:
            raise ValueError(f"{name}: a reuse step's cost relative to a full step must lie in [0, 1), got {cost!r}")
    for name, cost in costs.items():
        try:
            budget.compute_steps(steps, float(cost))
        except ValueError as error:
            if "out of reach" not in str(error):
                raise
            raise ValueError(f"{error} (lower target or {name})") from None
    return ForecastSpec.from_input(forecast)


@contextmanager
def one_torch_thread():
    """The fit's torch work is small, memory-bound chunks: on one thread it takes a fraction of a second at 100 steps;
    on several threads of a busy CPU each chunk waits for the slowest (2 threads were 5-40x slower on a loaded 2-core
    machine). ComfyUI runs one node at a time, so the setting is restored before anything else samples."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def budget_of(target_kind: str, target: float) -> Budget:
    if target_kind not in TARGET_KINDS:
        raise ValueError(f"target_kind: unknown {target_kind!r}; choose one of {', '.join(TARGET_KINDS)}")
    if not isinstance(target, (int, float)) or isinstance(target, bool) or not math.isfinite(target):
        raise ValueError(f"target: must be a finite number, got {target!r}")
    if target_kind == "speedup":
        if target < 1:
            raise ValueError(f"target: with target_kind = speedup, give a speed-up >= 1 (1 = no reuse), got {target!r}")
        return Budget(speedup=float(target))
    if target != int(target) or target < 0:
        raise ValueError(f"target: with target_kind = reuse_steps, give a whole number of steps >= 0, got {target!r}")
    return Budget(reuse_steps=int(target))


def _calibration_forecast_input() -> io.Combo.Input:
    forecast = forecast_input("the encoder or the attention")
    forecast.tooltip = (
        "The forecast the reuse nodes will use: the key steps and the schedule are fitted to its error (reuse: the "
        "last computed value, the recorded change; linear / quadratic: extrapolated from the last two / three "
        "computed steps). Link the forecast output into both nodes' forecast inputs. Attention Map Reuse forecasts "
        "only in output mode: with attention_mode = map the schedule is fitted to reuse."
    )
    return forecast


class ReuseCalibrate(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        import comfy.samplers

        return io.Schema(
            node_id="ReuseCalibrate",
            display_name="Reuse Calibrate",
            category="model_patches/reuse",
            description=(
                "Samples once at full compute (like KSampler) while recording the encoder features and the attention "
                "at every step, and picks the key steps of Encoder Feature Propagation and the reuse schedule of "
                "Attention Map Reuse that keep the recorded error of the chosen forecast (reuse: the step-to-step "
                "change) smallest for the target. Wire key_steps into Encoder Feature Propagation's custom_key_steps "
                "(key_steps = custom), schedule into Attention Map Reuse's custom_schedule (strategy = custom) and "
                "forecast into both nodes' forecast, and sample with the same sampler, scheduler and steps."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The model as loaded (before the reuse nodes)."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True),
                io.Int.Input("steps", default=20, min=1, max=10000),
                io.Float.Input("cfg", default=8.0, min=0.0, max=100.0, step=0.1, round=0.01),
                io.Combo.Input("sampler_name", options=comfy.samplers.SAMPLER_NAMES),
                io.Combo.Input("scheduler", options=comfy.samplers.SCHEDULER_NAMES),
                io.Conditioning.Input("positive"),
                io.Conditioning.Input("negative"),
                io.Latent.Input("latent_image"),
                io.Combo.Input(
                    "target_kind",
                    options=list(TARGET_KINDS),
                    default="reuse_steps",
                    tooltip="reuse_steps: target = how many steps reuse (for both methods). speedup: target = the "
                    "speed-up to reach; each method converts it with its reuse cost below.",
                ),
                io.Float.Input("target", default=10.0, min=0.0, max=10000.0, step=0.05),
                _reuse_cost_input(
                    "encoder_reuse_cost",
                    ENCODER_REUSE_COST,
                    "time of an Encoder Feature Propagation decoder-only step over a full step (0.66 measured on "
                    "SD1.5).",
                ),
                _reuse_cost_input(
                    "attention_reuse_cost",
                    ATTENTION_REUSE_COST,
                    "time of an Attention Map Reuse step over a full step (0.8 measured for output mode on SD1.5 at "
                    "512x512).",
                ),
                io.Combo.Input(
                    "attention_mode",
                    options=list(ATTENTION_MODES),
                    default=ATTENTION_OUTPUT,
                    tooltip="The mode you will use in Attention Map Reuse: output fits the schedule to the change "
                    "of the attention outputs, map to the change of the attention maps.",
                ),
                encoder_fraction_input("Transformers only: as in Encoder Feature Propagation (use the same value)."),
                # Appended last: saved workflows list widget values by position.
                _calibration_forecast_input(),
            ],
            outputs=[
                io.String.Output(display_name="key_steps", tooltip="For Encoder Feature Propagation custom_key_steps."),
                io.String.Output(display_name="schedule", tooltip="For Attention Map Reuse custom_schedule."),
                io.String.Output(display_name="report", tooltip="Both schedules and what they were fitted to."),
                io.Latent.Output(display_name="latent", tooltip="The full-compute result of the calibration run."),
                _ForecastOutput(
                    display_name="forecast",
                    options=list(FORECASTS),
                    tooltip="The forecast the schedules were fitted to: link it into both nodes' forecast input.",
                ),
            ],
        )

    @classmethod
    def execute(
        cls,
        model,
        seed: int,
        steps: int,
        cfg: float,
        sampler_name: str,
        scheduler: str,
        positive,
        negative,
        latent_image,
        target_kind: str,
        target: float,
        encoder_reuse_cost: float,
        attention_reuse_cost: float,
        attention_mode: str,
        encoder_fraction: float = DIT_PAPER_ENCODER_FRACTION,
        forecast: str = "reuse",
    ) -> io.NodeOutput:
        import comfy.model_management
        import comfy.sample
        import comfy.utils

        budget = budget_of(target_kind, target)
        costs = {COST_INPUTS[0]: encoder_reuse_cost, COST_INPUTS[1]: attention_reuse_cost}
        spec = check_inputs(steps, sampler_name, budget, costs, attention_mode, forecast)
        # Attention Map Reuse forecasts attention outputs only (map mode refuses a forecast): fit maps to reuse.
        attention_order = spec.order if attention_mode == ATTENTION_OUTPUT else 0
        session = CalibrationSession(check_encoder_fraction(encoder_fraction))
        patched = recording_clone(model, session)
        # The KSampler path (nodes.common_ksampler), without its preview callback.
        latent = latent_image["samples"]
        latent = comfy.sample.fix_empty_latent_channels(patched, latent)
        noise = comfy.sample.prepare_noise(latent, seed, latent_image.get("batch_index"))
        samples = comfy.sample.sample(
            patched,
            noise,
            steps,
            cfg,
            sampler_name,
            scheduler,
            positive,
            negative,
            latent,
            denoise=1.0,
            noise_mask=latent_image.get("noise_mask"),
            disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED,
            seed=seed,
        )
        if len(session.runs) != 1:
            raise RuntimeError(f"Reuse Calibrate: expected one sampler run, saw {len(session.runs)}")
        run = session.runs[0]
        log_run(run)
        attention_names = run.attention.names(attention_mode)
        try:
            encoder = run.encoder.trajectory(run.steps)
            # no attention call went through ComfyUI's optimized attention: fall back to the encoder's recordings
            attention = run.attention.trajectory(run.steps, attention_names) if attention_names else encoder
        except ValueError as error:
            if "never recorded" not in str(error):
                raise
            raise ValueError(
                f"Reuse Calibrate: {error}. Something skipped model calls of the run (another node's cache, such as "
                "TeaCache or a step cache) or the sampler chose its own steps; calibrate the plain model"
            ) from None
        # Weighted by the sigma step: the same error costs more where the sampler moves further (on the built-in
        # model this gains 2-11 dB over unweighted drift; docs/benchmarks.md). The fit checks for /interrupt.
        with one_torch_thread():
            result = calibrate(
                encoder,
                attention,
                budget,
                encoder_reuse_cost,
                attention_reuse_cost,
                weights=sigma_step_weights(run.sigmas),
                forecast=spec.order,
                attention_forecast=attention_order,
                check=comfy.model_management.throw_exception_if_processing_interrupted,
            )
        notes = [f"sampler {sampler_name}, scheduler {scheduler}, seed {seed}, target {target_kind} {target:g}"]
        if run.features_stand_in:
            notes.append("Encoder Feature Propagation cannot split this model: key steps fitted to the prediction")
        if not attention_names:
            notes.append("no attention call was recorded: the schedule is fitted to the encoder's change")
        if attention_order != spec.order:
            notes.append(
                f"Attention Map Reuse forecasts only in output mode: the map schedule is fitted to reuse; set its "
                f"forecast to reuse (Encoder Feature Propagation: {spec.name})"
            )
        report = result.report() + "\n" + "\n".join(notes)
        logging.info("Reuse Calibrate: " + report.replace("\n", "; "))
        out = latent_image.copy()
        out["samples"] = samples
        return io.NodeOutput(result.key_steps_text, str(result.attention), report, out, spec.name)
