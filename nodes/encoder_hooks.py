"""ComfyUI glue for Encoder Feature Propagation (Faster Diffusion, TiUE one-pass): the per-run and per-call wrappers.

The per-call host is ``unet_decoder.ComfyUNetHost`` for U-Nets and ``dit_host.ComfyDiTHost`` for the supported
diffusion transformers (the encoder is their leading blocks: ``EncoderPropagationConfig.encoder_fraction``).

Data flow: node inputs -> ``EncoderPropagationConfig`` (validated at node execution) -> per-run
``EncoderPropagationRun`` made in the ``OUTER_SAMPLE`` wrapper (plan from the run's ``sample_sigmas``, engine,
optional noise-injecting sampler) and dropped in ``finally`` -> one engine call per ``DIFFUSION_MODEL`` call
-> one log line per run.

Chained with Attention Map Reuse: see ``attention_hooks``. Predictions served from a parallel batch run no attention
at all (the batch already applied their steps' schedule bits).
"""

from __future__ import annotations

import functools
import logging
import time

from ..reuse_core.encoder_engine import EncoderPropagationConfig, EncoderPropagationEngine
from ..reuse_core.key_steps import reuse_window
from ..reuse_core.noise_injection import PriorNoiseInjection, sample_euler_prior_noise
from ..reuse_core.schedules import StepCoverage
from .attention_hooks import sampler_name
from .comfy_steps import run_scope, sigmas_of_sample, step_of_call, transformer_options_of
from .compile_support import CompiledPasses, outside_dynamo, warn_if_bypassed
from .dit_host import BlockSplit, ComfyDiTHost, dit_unsupported_reason, object_patches
from .unet_decoder import ComfyUNetHost, bind_unet_call, has_output_control, is_unet, unet_unsupported_reason

WRAPPER_KEY = "comfyui_reuse.encoder_propagation"
RUN_STATE_KEY = "comfyui_reuse.encoder_propagation.run"
LOG_NAME = "Encoder Feature Propagation"


class EncoderPropagationRun:
    """State of one sampler run: the engine (feature cache, stored predictions, stats) and its timing."""

    def __init__(
        self, config: EncoderPropagationConfig, sample_sigmas, model_sampling, split: BlockSplit | None, sampler=""
    ):
        steps = len(sample_sigmas) - 1
        step_sigmas = sample_sigmas[:-1]
        window = reuse_window(
            [float(s) for s in step_sigmas],
            model_sampling.percent_to_sigma(config.start_percent),
            model_sampling.percent_to_sigma(config.end_percent),
        )
        self.config = config
        self.plan = config.plan(steps, window)
        step_timesteps = model_sampling.timestep(step_sigmas).float().tolist()
        self.engine = EncoderPropagationEngine(self.plan, step_timesteps, config.parallel_decoding, config.forecast)
        self.split = split  # transformers only
        self.sampler = sampler  # its name, for the log line
        self.coverage = StepCoverage(steps)  # which steps the model calls fell on
        self.started = time.perf_counter()

    def log_line(self) -> str:
        wall = time.perf_counter() - self.started
        mode = f"parallel, max {self.config.max_decoders_per_batch}" if self.config.parallel_decoding else "sequential"
        injection = self.config.injection
        noise = f", noise injection alpha={injection.alpha} tau={injection.tau}" if injection.enabled else ""
        split = f", {self.split.describe()}" if self.split else ""
        forecast = f", forecast {self.config.forecast.name}" if self.config.forecast.order else ""
        return (
            f"{LOG_NAME}: {self.config.key_steps.label}, {self.plan.steps} steps{split}, {mode}{noise}{forecast}: "
            f"{self.engine.stats.summary()}, wall {wall:.2f} s{self.notes()}"
        )

    def notes(self) -> str:
        """What the log line adds: custom key steps the run dropped, and why a run reused nothing (its length, the
        reuse window, the adaptive threshold) or could not follow its key steps (a sampler with sigmas of its own)."""
        spec, steps, stats = self.config.key_steps, self.plan.steps, self.engine.stats
        notes = []
        beyond = spec.beyond(steps)
        if beyond:
            note = f"custom_key_steps {', '.join(map(str, beyond))} beyond this {steps}-step run dropped"
            if any(len(str(s)) >= 3 and set(str(s)) <= set("01") for s in beyond):
                note += " (an Attention Map Reuse schedule? key steps are 0-based step indices such as 0,1,2,5)"
            if spec.key_steps(steps) == (0,) and steps > 1:
                note += ": only step 0 is left, one encoder pass for the whole run"
            notes.append(note)
        off_steps = self.coverage.note(self.sampler)
        why = spec.nothing_to_reuse(steps)
        if not why and not self.plan.decoder_only_steps:
            why = (
                f"every step lies outside start_percent {self.config.start_percent:g} .. end_percent "
                f"{self.config.end_percent:g}, where the whole model runs"
            )
        if not why and spec.adaptive and not off_steps and not stats.encoder_passes_saved:
            why = f"adaptive threshold {spec.threshold:g} made every step a key step"
        if why:
            notes.append(f"nothing to reuse at {steps} steps: {why}")
        if off_steps:
            notes.append(f"key steps not followed: {off_steps}")
        return "".join(f"; {note}" for note in notes)

    def reset(self) -> None:
        self.engine.reset()


def unsupported_reason(net) -> str | None:
    """Why encoder propagation cannot drive ``net`` (a U-Net or a diffusion transformer), or None."""
    return unet_unsupported_reason(net) if is_unet(net) else dit_unsupported_reason(net)


def cond_key(transformer_options: dict, x):
    """Which cond batch a call is: its cond uuids in batch order, plus the latent's shape, dtype and device."""
    uuids = tuple(transformer_options.get("uuids") or ())
    return uuids, tuple(x.shape), x.dtype, x.device


def injecting_sampler(sampler, injection: PriorNoiseInjection, model_sampling):
    """The run's sampler with prior noise injection, or a ``ValueError`` where it cannot be exact."""
    import comfy.k_diffusion.sampling as k_sampling
    import comfy.model_sampling
    import comfy.samplers

    function = getattr(sampler, "sampler_function", None)
    options = getattr(sampler, "extra_options", None) or {}
    if (
        not isinstance(sampler, comfy.samplers.KSAMPLER)
        or function is not k_sampling.sample_euler
        or float(options.get("s_churn", 0.0)) > 0
    ):
        name = getattr(function, "__name__", type(sampler).__name__)
        raise ValueError(
            f"{LOG_NAME}: noise_alpha > 0 (prior noise injection) is exact only for the euler and ddim samplers; "
            f"this run uses {name}. Set noise_alpha to 0, or sample with euler or ddim."
        )
    discrete = isinstance(model_sampling, comfy.model_sampling.ModelSamplingDiscrete) and not isinstance(
        model_sampling, comfy.model_sampling.ModelSamplingDiscreteEDM
    )
    if (
        not discrete
        or not isinstance(model_sampling, comfy.model_sampling.EPS)
        or float(model_sampling.sigma_data) != 1.0
    ):
        raise ValueError(
            f"{LOG_NAME}: noise_alpha > 0 (prior noise injection) needs a discrete 0..1000-timestep eps or "
            f"v-prediction model (SD1.x/SD2.x/SDXL); this model samples with {type(model_sampling).__name__}. "
            "Set noise_alpha to 0."
        )

    def timestep_of(sigma) -> float:
        return float(model_sampling.timestep(sigma.reshape(1)).item())

    function = functools.partial(sample_euler_prior_noise, injection=injection, timestep_of=timestep_of)
    return comfy.samplers.KSAMPLER(function, {}, getattr(sampler, "inpaint_options", {}))


def make_outer_sample_wrapper(config: EncoderPropagationConfig):
    def outer_sample_wrapper(executor, *args, **kwargs):

        guider = executor.class_obj
        patcher = guider.model_patcher
        reason = unsupported_reason(patcher.get_model_object("diffusion_model"))
        if reason:
            raise TypeError(reason)
        args = list(args)
        sigmas = sigmas_of_sample(args, kwargs)
        sampler = sampler_name(args[2] if len(args) > 2 else kwargs.get("sampler"))
        model_sampling = patcher.get_model_object("model_sampling")
        if config.injection.enabled:
            if len(args) > 2:
                args[2] = injecting_sampler(args[2], config.injection, model_sampling)
            else:
                kwargs["sampler"] = injecting_sampler(kwargs["sampler"], config.injection, model_sampling)
        if len(sigmas) < 2:
            return executor(*args, **kwargs)
        net = patcher.get_model_object("diffusion_model")
        split = None if is_unet(net) else BlockSplit.of(net, config.encoder_fraction)
        run = EncoderPropagationRun(config, sigmas, model_sampling, split, sampler)
        run.compiled = CompiledPasses(guider)  # under TorchCompileModel: the passes run compiled
        with run_scope(guider, RUN_STATE_KEY, run):
            try:
                return executor(*args, **kwargs)
            finally:
                logging.info(run.log_line())
                stats = run.engine.stats
                warn_if_bypassed(patcher, LOG_NAME, "model call", stats.full_passes + stats.encoder_passes_saved > 0)
                run.reset()

    return outer_sample_wrapper


@outside_dynamo  # never traced into a compiled graph (compile_support)
def diffusion_model_wrapper(executor, *args, **kwargs):
    options = transformer_options_of(args, kwargs)
    run: EncoderPropagationRun | None = options.get(RUN_STATE_KEY)
    if run is None:  # not inside a sampler run of this model
        return executor(*args, **kwargs)
    executor = run.compiled.executor(executor)
    net = executor.class_obj  # checked once per run by the OUTER_SAMPLE wrapper
    step = step_of_call(options)
    run.coverage.record(step)
    if run.split is not None:
        host = ComfyDiTHost(executor, net, run.split, args, kwargs)
        return run.engine.predict(
            host,
            host.x,
            host.timesteps,
            None,
            step=step,
            cache_key=cond_key(options, host.x),
            batchable=host.batchable,
        )
    named, extras = bind_unet_call(args, kwargs)
    x, control = named["x"], named["control"]
    host = ComfyUNetHost(executor, net, control, options, extras)
    return run.engine.predict(
        host,
        x,
        named["timesteps"],
        named["context"],
        step=step,
        cache_key=cond_key(options, x),
        # ControlNet output residuals exist per step: a future step's decoder cannot receive them.
        batchable=not has_output_control(control),
        y=named["y"],
        **extras,
    )


def apply_encoder_propagation(model, config: EncoderPropagationConfig):
    """A clone of ``model`` (a ``ModelPatcher``) with encoder propagation; re-applying replaces the settings."""
    import comfy.patcher_extension

    reason = unsupported_reason(model.get_model_object("diffusion_model"))
    if reason:
        raise ValueError(reason)
    patched = model.clone()
    net = model.get_model_object("diffusion_model")
    if not is_unet(net):
        for name, patch in object_patches(net).items():
            patched.add_object_patch(name, patch)
    wrappers = comfy.patcher_extension.WrappersMP
    for wrapper_type in (wrappers.OUTER_SAMPLE, wrappers.DIFFUSION_MODEL):
        patched.remove_wrappers_with_key(wrapper_type, WRAPPER_KEY)
    patched.add_wrapper_with_key(wrappers.OUTER_SAMPLE, WRAPPER_KEY, make_outer_sample_wrapper(config))
    patched.add_wrapper_with_key(wrappers.DIFFUSION_MODEL, WRAPPER_KEY, diffusion_model_wrapper)
    return patched
