"""ComfyUI glue for attention reuse: the attention override, the per-run and per-forward wrappers.

How a sampler run flows through it:

* ``OUTER_SAMPLE`` (``outer_sample_wrapper``): swaps the guider's ``model_options`` for a nested copy (the
  EasyCache pattern), resolves the schedule against the run's real step count ``len(sigmas) - 1``, puts a
  fresh ``AttentionReuseRun`` on a run copy of the ``ReusePatch`` held in ``transformer_options``; in
  ``finally`` logs the one summary line, drops the maps and restores the options.
* ``APPLY_MODEL`` (``apply_model_wrapper``): one model forward (one batch chunk). Opens a ``ForwardContext``:
  the step of the call by sigma (``nodes.comfy_steps``), the chunk key (the chunk's cond UUIDs and
  cond/uncond order) and a fresh call counter, closed in ``finally``. Attention outside a forward
  (ControlNet's own forward, a bare ``apply_model`` call) passes through untouched.
* ``transformer_options["optimized_attention_override"]`` (``attention_override``): every attention call of
  the diffusion model. Inside a forward it hands the call to the engine with a layer key (below), else it
  passes through. A previously installed override is chained: the engine's "fused" path calls it.

Layer keys: on a U-Net (the attention call carries ``block``/``block_index``) a layer is
``(block, block_index, position within that transformer block)``, so a decoder layer keeps its key at Encoder
Feature Propagation's decoder-only steps, where the encoder's attention calls do not happen. Models without block
information (DiTs) use the call's ordinal within the forward.

Chained with Encoder Feature Propagation: a decoder-only pass at one step is an ordinary forward of that step
(decoder layers follow the step's bit; encoder layers simply do not run). A parallel decoder batch carries
``comfy_steps.DECODER_STEPS_KEY`` (the step of each block of rows); its attention calls go through
``AttentionReuseRun.attention_steps``: each block of rows follows its own step's bit, in step order, so parallel
and sequential decoding make the same reuse decisions.

Steps and multi-evaluation samplers: a call whose sigma equals ``sample_sigmas[i]`` belongs to step ``i``
and follows bit ``i`` of the schedule. Heun-type samplers evaluate a second time at the next step's sigma;
that evaluation is an evaluation at step ``i + 1``'s noise level and follows bit ``i + 1`` (if that step
reuses, it reuses the maps of the last compute step, exactly as the step itself will; if it stores, the
step's own evaluation overwrites the entry right after). Evaluations at sigmas strictly between two schedule
points (dpm_2, dpmpp_2s_ancestral, dpmpp_sde midpoints, ...) compute fresh fused attention and never read or
write the cache.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Hashable
from dataclasses import dataclass, field

from ..reuse_core.attention_math import attention_kind
from ..reuse_core.attention_reuse import AttentionReuseConfig, AttentionReuseRun
from ..reuse_core.schedules import ScheduleSpec
from .comfy_steps import DECODER_STEPS_KEY, sigmas_of_sample, step_of_call, transformer_options_of

OPTIONS_KEY = "comfyui_reuse_attention"
WRAPPER_KEY = "comfyui_reuse_attention"

# Diffusion-model classes (matched along the MRO) whose attention goes through ComfyUI's optimized
# attention with transformer_options in v0.3.64. Tested here: UNetModel (SD1.5, SDXL), Flux, SD3.
SUPPORTED_DIFFUSION_MODELS = {
    "UNetModel": "U-Net (SD1.x/2.x/SDXL/SVD)",
    "Flux": "Flux",
    "Chroma": "Chroma",
    "OpenAISignatureMMDITWrapper": "SD3 (MMDiT)",
    "WanModel": "Wan",
    "QwenImageTransformer2DModel": "Qwen-Image",
    "HunyuanVideo": "HunyuanVideo",
    "LTXVModel": "LTX-Video",
    "HiDreamImageTransformer2DModel": "HiDream",
    "NextDiT": "Lumina 2",
    "AsymmDiTJoint": "Mochi",
    "GeneralDIT": "Cosmos",
    "MiniTrainDIT": "Cosmos Predict2",
}


def supported_family(diffusion_model) -> str | None:
    for cls in type(diffusion_model).__mro__:
        if cls.__name__ in SUPPORTED_DIFFUSION_MODELS and cls.__module__.startswith("comfy."):
            return SUPPORTED_DIFFUSION_MODELS[cls.__name__]
    return None


@dataclass
class ForwardContext:
    step: int | None
    chunk_key: Hashable
    calls: int = 0
    block_calls: dict = field(default_factory=dict)


@dataclass
class ReusePatch:
    """Node-time settings (deep-copied by ``ModelPatcher.clone``); run state lives on a per-run copy."""

    config: AttentionReuseConfig
    spec: ScheduleSpec
    verbose: bool = False
    run: AttentionReuseRun | None = None
    forward: ForwardContext | None = None

    def for_run(self, run: AttentionReuseRun) -> ReusePatch:
        return ReusePatch(self.config, self.spec, self.verbose, run=run)

    def __deepcopy__(self, memo):
        # Clones of a patched model share nothing mutable: a run copy is never cloned mid-run.
        return ReusePatch(self.config, self.spec, self.verbose)


def _patch_of(options: dict | None) -> ReusePatch | None:
    if not options:
        return None
    return options.get(OPTIONS_KEY)


def make_attention_override(previous=None):
    """The ``optimized_attention_override`` callable, chaining ``previous`` (another pack's override)."""

    def call_through(func, args, kwargs):
        if previous is not None:
            return previous(func, *args, **kwargs)
        return func(*args, **kwargs)

    def attention_override(func, *args, **kwargs):
        options = kwargs.get("transformer_options")
        patch = _patch_of(options)
        if patch is None or patch.run is None or patch.forward is None or len(args) < 3:
            return call_through(func, args, kwargs)
        forward = patch.forward
        q, k, v = args[0], args[1], args[2]
        heads = args[3] if len(args) > 3 else kwargs.get("heads")
        if heads is None:
            return call_through(func, args, kwargs)
        mask = kwargs.get("mask", args[4] if len(args) > 4 else None)
        layout = "bhnd" if kwargs.get("skip_reshape", False) else "bnc"
        output_layout = "bhnd" if kwargs.get("skip_output_reshape", False) else "bnc"
        ordinal = forward.calls
        forward.calls += 1
        block = options.get("block")
        kind = None
        if block is not None:
            # U-Net: the layer is named by where it sits, never by how many calls came before it, so a decoder
            # layer has the same key whether or not the encoder ran in this forward (Encoder Feature
            # Propagation). attn1 then attn2 inside each transformer block (same block/block_index);
            # self-attention always has as many keys as queries.
            where = (tuple(block), options.get("block_index", 0))
            position = forward.block_calls.get(where, 0)
            forward.block_calls[where] = position + 1
            kind = "self" if position == 0 and attention_kind(q, k, layout) == "self" else "cross"
            layer_key = (*where, position)
        else:
            layer_key = (ordinal,)
        row_steps = options.get(DECODER_STEPS_KEY)
        if row_steps is not None and len(row_steps) > 1:
            return patch.run.attention_steps(
                lambda q, k, v, mask: call_through(func, *_with_rows(args, kwargs, q, k, v, mask)),
                q,
                k,
                v,
                heads=heads,
                row_steps=row_steps,
                layer_key=layer_key,
                chunk_key=forward.chunk_key,
                layout=layout,
                output_layout=output_layout,
                kind=kind,
                mask=mask,
            )
        return patch.run.attention(
            lambda: call_through(func, args, kwargs),
            q,
            k,
            v,
            heads=heads,
            step=forward.step,
            layer_key=layer_key,
            chunk_key=forward.chunk_key,
            layout=layout,
            output_layout=output_layout,
            kind=kind,
            mask=mask,
        )

    attention_override.comfyui_reuse_previous = previous
    return attention_override


def _with_rows(args: tuple, kwargs: dict, q, k, v, mask) -> tuple[tuple, dict]:
    """The attention call's arguments with q/k/v (and the mask, where the call has one) replaced."""
    args = (q, k, v, *args[3:])
    if len(args) > 4:
        args = (*args[:4], mask, *args[5:])
    elif kwargs.get("mask") is not None:
        kwargs = {**kwargs, "mask": mask}
    return args, kwargs


def install_override(transformer_options: dict) -> None:
    """Install the override, chaining whatever was there (replacing an earlier copy of ours)."""
    previous = transformer_options.get("optimized_attention_override")
    if previous is not None and hasattr(previous, "comfyui_reuse_previous"):
        previous = previous.comfyui_reuse_previous
    transformer_options["optimized_attention_override"] = make_attention_override(previous)


def apply_model_wrapper(executor, *args, **kwargs):
    options = transformer_options_of(args, kwargs)
    patch = _patch_of(options)
    if patch is None or patch.run is None:
        return executor(*args, **kwargs)
    match = step_of_call(options)
    step = match.index if match is not None and match.exact else None
    chunk_key = (tuple(options.get("cond_or_uncond", ())), tuple(str(u) for u in options.get("uuids", ())))
    outer = patch.forward
    patch.forward = ForwardContext(step, chunk_key)
    try:
        return executor(*args, **kwargs)
    finally:
        patch.forward = outer


def outer_sample_wrapper(executor, *args, **kwargs):
    import comfy.model_patcher

    guider = executor.class_obj
    original_options = guider.model_options
    run_patch = None
    start = time.perf_counter()
    try:
        guider.model_options = comfy.model_patcher.create_model_options_clone(original_options)
        options = guider.model_options["transformer_options"]
        patch = _patch_of(options)
        sigmas = sigmas_of_sample(args, kwargs)
        if patch is None or len(sigmas) < 2:
            return executor(*args, **kwargs)
        resolved = patch.spec.resolve(len(sigmas) - 1)
        if resolved.note:
            logging.info(f"Attention Map Reuse: {resolved.note}")
        if patch.verbose:
            logging.info(
                f"Attention Map Reuse: {patch.spec.describe()}, {len(sigmas) - 1} steps -> schedule "
                f"{resolved.schedule} (1 = compute), mode {patch.config.mode}, "
                f"attention {patch.config.targets}"
            )
        run_patch = patch.for_run(AttentionReuseRun(patch.config, resolved.schedule))
        options[OPTIONS_KEY] = run_patch
        return executor(*args, **kwargs)
    finally:
        if run_patch is not None:
            logging.info(run_patch.run.summary(time.perf_counter() - start))
            run_patch.run.reset()
            run_patch.run = None
        guider.model_options = original_options


def patch_model(model, config: AttentionReuseConfig, spec: ScheduleSpec, verbose: bool = False):
    """Clone ``model`` (a ModelPatcher) and install attention reuse on the clone."""
    import comfy.patcher_extension

    diffusion_model = getattr(getattr(model, "model", None), "diffusion_model", None)
    if diffusion_model is None or supported_family(diffusion_model) is None:
        target = diffusion_model if diffusion_model is not None else getattr(model, "model", model)
        name = type(target).__name__
        raise ValueError(
            f"model: Attention Map Reuse cannot patch {name}: its attention does not go through ComfyUI's "
            f"optimized attention with transformer_options. Supported: "
            f"{', '.join(sorted(set(SUPPORTED_DIFFUSION_MODELS.values())))}."
        )
    patched = model.clone()
    options = patched.model_options.setdefault("transformer_options", {})
    options[OPTIONS_KEY] = ReusePatch(config, spec, verbose)
    install_override(options)
    for kind, wrapper in (
        (comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, outer_sample_wrapper),
        (comfy.patcher_extension.WrappersMP.APPLY_MODEL, apply_model_wrapper),
    ):
        patched.remove_wrappers_with_key(kind, WRAPPER_KEY)
        patched.add_wrapper_with_key(kind, WRAPPER_KEY, wrapper)
    return patched
