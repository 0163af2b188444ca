"""V3 node ``EncoderFeaturePropagation``: MODEL -> MODEL, Faster Diffusion encoder propagation (TiUE one-pass preset).

The inputs are validated into an ``EncoderPropagationConfig`` here; ``encoder_hooks`` does the rest.
"""

from __future__ import annotations

from comfy_api.latest import io

from ..reuse_core.encoder_engine import DIT_PAPER_ENCODER_FRACTION, EncoderPropagationConfig
from ..reuse_core.forecast import FORECASTS, ForecastSpec
from ..reuse_core.key_steps import ADAPTIVE_DEFAULT_THRESHOLD, PRESETS, KeyStepSpec
from ..reuse_core.noise_injection import PAPER_ALPHA, PAPER_TAU, PriorNoiseInjection
from .encoder_hooks import apply_encoder_propagation
from .families import transformer_labels


def encoder_fraction_input(tooltip: str) -> io.Float.Input:
    """The transformer split, an input of this node and of Reuse Calibrate (which must use the same value)."""
    return io.Float.Input(
        "encoder_fraction",
        default=round(DIT_PAPER_ENCODER_FRACTION, 3),
        min=0.05,
        max=0.95,
        step=0.01,
        tooltip=tooltip,
    )


def forecast_input(what: str) -> io.Combo.Input:
    """The forecast order, an input of both reuse nodes (appended last: saved workflows keep their values)."""
    return io.Combo.Input(
        "forecast",
        options=list(FORECASTS),
        default="reuse",
        tooltip=f"What a step that skips {what} gets. reuse: the last computed value unchanged (the paper). "
        "linear: extrapolated from the last two computed values (TaylorSeer-style; recommended with light reuse). "
        "quadratic: from the last three. Until a run has computed enough values, a lower order is used (logged).",
    )


class EncoderFeaturePropagation(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="EncoderFeaturePropagation",
            display_name="Encoder Feature Propagation",
            category="model_patches/reuse",
            description=(
                "Faster Diffusion (Li et al., NeurIPS 2024): run the encoder only at key steps and reuse its "
                "features in the decoder at the other steps, optionally decoding several steps in one batch. "
                "U-Nets (SD1.x / SD2.x / SDXL): the encoder is the input and middle blocks. Transformers "
                f"({transformer_labels()}): the leading blocks."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The model to speed up: a U-Net or a supported transformer."),
                io.Combo.Input(
                    "key_steps",
                    options=list(PRESETS),
                    default="paper",
                    tooltip=(
                        "Steps that run the whole model. paper: the paper's 50-step set {0,1,2,3,5,10,15,25,35} "
                        "scaled to the run's step count (steps 0-3 kept from 6 steps on). uniform: every k-th step. "
                        "one_pass: only step 0 (TiUE; for distilled loop-free models, degrades ordinary ones). "
                        "custom: the list below (paste a Reuse Calibrate key step list here). adaptive: no list; a "
                        "step runs the whole model once the latent has changed by adaptive_threshold since the last "
                        "one (decodes sequentially)."
                    ),
                ),
                io.Int.Input(
                    "uniform_k",
                    default=4,
                    min=1,
                    max=100,
                    tooltip="For key_steps=uniform: a key step every k steps (paper: 4 for community "
                    "checkpoints; 1 = every step, no reuse).",
                ),
                io.String.Input(
                    "custom_key_steps",
                    default="0,1,2,3,5,10,15,25,35",
                    tooltip="For key_steps=custom: 0-based step indices, comma separated. Step 0 is always a "
                    "key step; indices beyond the run's steps are ignored.",
                ),
                io.Boolean.Input(
                    "parallel_decoding",
                    default=True,
                    tooltip="Decode the non-key steps that follow a key step in one batch (same result, fewer "
                    "and larger decoder calls). Off: decode each step when the sampler reaches it.",
                ),
                io.Int.Input(
                    "max_decoders_per_batch",
                    default=4,
                    min=1,
                    max=64,
                    tooltip="Memory cap for parallel decoding: at most this many steps per decoder batch "
                    "(each step adds one copy of the decoder activations for the whole cond batch).",
                ),
                io.Float.Input(
                    "noise_alpha",
                    default=0.0,
                    min=0.0,
                    max=0.1,
                    step=0.0005,
                    tooltip=f"Prior noise injection: latent += alpha * initial noise at steps with timestep < tau "
                    f"(paper: {PAPER_ALPHA}). 0 = off. Exact only with the euler and ddim samplers; "
                    "other samplers stop with an error.",
                ),
                io.Float.Input(
                    "noise_tau",
                    default=PAPER_TAU,
                    min=0.0,
                    max=1000.0,
                    step=1.0,
                    tooltip="Prior noise injection applies once the timestep (0..1000) falls below this "
                    f"(paper: {PAPER_TAU:g}).",
                ),
                io.Float.Input(
                    "start_percent",
                    default=0.0,
                    min=0.0,
                    max=1.0,
                    step=0.01,
                    tooltip="Reuse starts at this point of the denoising process; earlier steps run the whole model.",
                ),
                io.Float.Input(
                    "end_percent",
                    default=1.0,
                    min=0.0,
                    max=1.0,
                    step=0.01,
                    tooltip="Reuse ends at this point of the denoising process; later steps run the whole model.",
                ),
                encoder_fraction_input(
                    "Transformers only: the share of the blocks, in execution order, that form the encoder "
                    "(rounded, at least one block on each side; Flux counts double then single blocks). The DiT "
                    "paper's 18 of 28 = 0.643. Lower: faster decoder-only steps, further from the full model."
                ),
                # Appended last: saved workflows list widget values by position.
                io.Float.Input(
                    "adaptive_threshold",
                    default=ADAPTIVE_DEFAULT_THRESHOLD,
                    min=0.0,
                    max=10.0,
                    step=0.01,
                    tooltip="For key_steps=adaptive: run the whole model once the model input has changed by this "
                    "much (summed relative L1 change per step) since the last key step. 0 = every step (no reuse); "
                    "higher = fewer key steps, faster, further from the full model. start/end_percent still apply.",
                ),
                forecast_input("the encoder (its key steps' features)"),
            ],
            outputs=[io.Model.Output(tooltip="A copy of the model with encoder feature propagation.")],
        )

    @classmethod
    def execute(
        cls,
        model,
        key_steps: str,
        uniform_k: int,
        custom_key_steps: str,
        parallel_decoding: bool,
        max_decoders_per_batch: int,
        noise_alpha: float,
        noise_tau: float,
        start_percent: float,
        end_percent: float,
        encoder_fraction: float = DIT_PAPER_ENCODER_FRACTION,
        adaptive_threshold: float = ADAPTIVE_DEFAULT_THRESHOLD,
        forecast: str = "reuse",
    ) -> io.NodeOutput:
        config = EncoderPropagationConfig(
            key_steps=KeyStepSpec.from_inputs(key_steps, uniform_k, custom_key_steps, adaptive_threshold),
            parallel_decoding=bool(parallel_decoding),
            max_decoders_per_batch=max_decoders_per_batch,
            start_percent=start_percent,
            end_percent=end_percent,
            injection=PriorNoiseInjection(noise_alpha, noise_tau),
            encoder_fraction=encoder_fraction,
            forecast=ForecastSpec.from_input(forecast),
        )
        return io.NodeOutput(apply_encoder_propagation(model, config))
