"""V3 node ``AttentionMapReuse``: MODEL -> MODEL, attention-map reuse across sampling steps (HURRY/PHAST).

The inputs are validated into an ``AttentionReuseConfig`` and a ``ScheduleSpec`` here; ``attention_hooks`` does
the rest.
"""

from __future__ import annotations

from comfy_api.latest import io

from ..reuse_core.attention_engine import AttentionReuseConfig
from ..reuse_core.forecast import ForecastSpec
from ..reuse_core.schedules import PHAST_RESULTS, ScheduleSpec
from .attention_hooks import apply_attention_reuse
from .encoder_node import forecast_input

CACHE_DEVICE_CHOICES = {"same as model": "model", "cpu": "cpu"}
PAPER_SCHEDULE = "".join(str(b) for b in PHAST_RESULTS[(20, 10)])


class AttentionMapReuse(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="AttentionMapReuse",
            display_name="Attention Map Reuse",
            category="model_patches/reuse",
            description=(
                "Reuses attention computed at earlier sampling steps at later steps (Hunter et al. 2024, "
                "HURRY/PHAST). A schedule of one bit per step (1 = compute, 0 = reuse) applies to every "
                "attention layer and both CFG branches. With 0 reuse steps the output is unchanged."
            ),
            inputs=[
                io.Model.Input(
                    "model",
                    tooltip="The diffusion model to patch (U-Net, Flux, SD3, ...). "
                    "The input model itself is not modified.",
                ),
                io.Combo.Input(
                    "strategy",
                    options=["phast", "hurry", "custom"],
                    default="phast",
                    tooltip="phast: the paper's searched schedule (20 steps / 10 reuse: 11111111010001000000), "
                    "rescaled for other step counts. hurry: compute the first steps, reuse the last "
                    "reuse_steps. custom: use custom_schedule.",
                ),
                io.Int.Input(
                    "reuse_steps",
                    default=10,
                    min=0,
                    max=10000,
                    step=1,
                    tooltip="How many steps reuse attention (hurry/phast). At or above the run's step count (a "
                    "few-step model), half the run reuses instead (logged). "
                    "Ignored when reuse_fraction > 0 or strategy is custom.",
                ),
                io.Float.Input(
                    "reuse_fraction",
                    default=0.0,
                    min=0.0,
                    max=0.95,
                    step=0.05,
                    tooltip="Reuse this fraction of the run's steps instead of a fixed count (0 = use "
                    "reuse_steps). Scales with img2img and KSamplerAdvanced segments.",
                ),
                io.String.Input(
                    "custom_schedule",
                    default=PAPER_SCHEDULE,
                    multiline=False,
                    tooltip="strategy=custom: one bit per step, 1 = compute, 0 = reuse; must start with 1. "
                    "Spaces and commas are ignored. A schedule of another length than the run is resampled "
                    "by relative position (logged).",
                ),
                io.Combo.Input(
                    "attention",
                    options=["both", "self", "cross"],
                    default="both",
                    tooltip="Which attention layers reuse: self-attention, cross-attention (text) or both "
                    "(the paper). DiT joint attention counts as self-attention.",
                ),
                io.Combo.Input(
                    "mode",
                    options=["map", "output"],
                    default="map",
                    tooltip="map: keep the softmax map P at a compute step and compute P @ V at reuse steps "
                    "(the paper; map memory grows with tokens squared). output: keep each layer's attention "
                    "output and skip attention entirely at reuse steps (cheaper, PAB/T-GATE style).",
                ),
                io.Combo.Input(
                    "cache_device",
                    options=list(CACHE_DEVICE_CHOICES),
                    default="same as model",
                    tooltip="Where kept maps/outputs live: on the model's device (fastest) or in CPU memory "
                    "(saves GPU memory, costs transfers).",
                ),
                io.Int.Input(
                    "memory_budget_mb",
                    default=2048,
                    min=0,
                    max=1048576,
                    step=64,
                    tooltip="Most memory the kept maps/outputs may use. Layers that do not fit compute "
                    "their attention normally (logged once); never runs out of memory because of the cache. "
                    "SD1.5 at 512x512 with CFG needs about 5.4 GB fp32 / 2.7 GB fp16 for all maps.",
                ),
                io.Boolean.Input(
                    "verbose",
                    default=False,
                    tooltip="Also log the resolved schedule at the start of each run.",
                ),
                forecast_input("attention (mode = output only: a forecast map could have negative weights)"),
            ],
            outputs=[io.Model.Output(tooltip="The patched copy of the model.")],
        )

    @classmethod
    def execute(
        cls,
        model,
        strategy,
        reuse_steps,
        reuse_fraction,
        custom_schedule,
        attention,
        mode,
        cache_device,
        memory_budget_mb,
        verbose=False,
        forecast="reuse",
    ) -> io.NodeOutput:
        if cache_device not in CACHE_DEVICE_CHOICES:
            raise ValueError(f"cache_device: must be one of {', '.join(CACHE_DEVICE_CHOICES)}, got {cache_device!r}")
        spec = ScheduleSpec(
            strategy=strategy, reuse_steps=reuse_steps, reuse_fraction=reuse_fraction, custom_schedule=custom_schedule
        )
        config = AttentionReuseConfig(
            mode=mode,
            targets=attention,
            memory_budget_mb=float(memory_budget_mb),
            cache_device=CACHE_DEVICE_CHOICES[cache_device],
            forecast=ForecastSpec.from_input(forecast),
        )
        return io.NodeOutput(apply_attention_reuse(model, config, spec, verbose=verbose))
