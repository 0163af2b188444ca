"""ComfyUI glue for Reuse Calibrate: one full-compute sampler run that records what the two methods would reuse.

The node samples a clone of the user's model carrying three additions, all removed with the clone:

* ``OUTER_SAMPLE`` (``outer_sample_wrapper``, bound to the node's ``CalibrationSession``): makes the run's
  ``CalibrationRun`` (two ``ChangeRecorder``s sized by the run's sigmas) in a copy of the guider's ``model_options``
  and hands it to the session in ``finally``.
* ``DIFFUSION_MODEL`` (``diffusion_model_wrapper``): at the exact call of each step it runs the model's own forward
  with Encoder Feature Propagation's capture (``unet_decoder.ComfyUNetHost``: skips and middle output;
  ``dit_host.ComfyDiTHost``: the state after the encoder blocks) and records the encoder features. Calls between
  steps (the intermediate evaluations of heun, dpm_2, ...) are not steps of any schedule and pass through, so every
  sampler works. On models Encoder Feature Propagation cannot split, the prediction stands in for the features.
* ``optimized_attention_override`` (``make_recording_override``): every attention call of an exact step's forward
  records a subsample of its output and of its map for a few query rows (``reuse_core.calibration.attention_probe``),
  keyed by its ordinal in the forward and the call's cond chunk. Another node's override is chained
  (``comfy_steps.chain_attention_override``).

Nothing changes what the model computes: the result is the unpatched model's output.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from ..reuse_core.attention_math import kv_to_heads, to_heads
from ..reuse_core.calibration import ChangeRecorder
from .comfy_steps import (
    chain_attention_override,
    holds_pack_override,
    sigmas_of_sample,
    step_of_call,
    transformer_options_of,
    with_transformer_options,
)
from .dit_host import BlockSplit, ComfyDiTHost, object_patches
from .encoder_hooks import unsupported_reason
from .unet_decoder import ComfyUNetHost, bind_unet_call, is_unet

WRAPPER_KEY = "comfyui_reuse.calibrate"
RUN_STATE_KEY = "comfyui_reuse.calibrate.run"
FORWARD_KEY = "comfyui_reuse.calibrate.forward"


@dataclass
class CalibrationRun:
    """What one sampler run recorded."""

    steps: int
    sigmas: list[float]  # the run's sample sigmas (steps + 1)
    split: BlockSplit | None  # transformers Encoder Feature Propagation can split
    features_stand_in: bool  # True: the model cannot be split, the prediction was recorded instead
    encoder: ChangeRecorder = field(default_factory=ChangeRecorder)
    attention: ChangeRecorder = field(default_factory=ChangeRecorder)
    attention_calls: int = 0


@dataclass
class CalibrationSession:
    """Filled by the node's sampler runs (a KSampler call is one run)."""

    encoder_fraction: float
    runs: list[CalibrationRun] = field(default_factory=list)


@dataclass
class _Forward:
    step: int
    chunk: tuple
    calls: int = 0


def _chunk_of(options: dict) -> tuple:
    return tuple(options.get("cond_or_uncond") or ())


def make_recording_override(previous=None):
    def call_through(func, args, kwargs):
        return previous(func, *args, **kwargs) if previous is not None else func(*args, **kwargs)

    def override(func, *args, **kwargs):
        out = call_through(func, args, kwargs)
        options = kwargs.get("transformer_options")
        forward: _Forward | None = options.get(FORWARD_KEY) if options else None
        run: CalibrationRun | None = options.get(RUN_STATE_KEY) if options else None
        heads = args[3] if len(args) > 3 else kwargs.get("heads")
        if forward is None or run is None or len(args) < 3 or heads is None:
            return out
        ordinal = forward.calls
        forward.calls += 1
        run.attention_calls += 1
        layout = "bhnd" if kwargs.get("skip_reshape", False) else "bnc"
        q = to_heads(args[0], heads, layout)
        k = kv_to_heads(args[1], heads, q.shape[-1], layout)
        run.attention.record_attention(forward.step, (forward.chunk, ordinal), q, k, out)
        return out

    return override


def make_outer_sample_wrapper(session: CalibrationSession):
    def outer_sample_wrapper(executor, *args, **kwargs):
        import comfy.model_patcher

        sigmas = sigmas_of_sample(args, kwargs)
        if len(sigmas) < 2:
            return executor(*args, **kwargs)
        guider = executor.class_obj
        net = guider.model_patcher.get_model_object("diffusion_model")
        reason = unsupported_reason(net)
        split = None if is_unet(net) or reason else BlockSplit.of(net, session.encoder_fraction)
        run = CalibrationRun(len(sigmas) - 1, [float(s) for s in sigmas], split, features_stand_in=reason is not None)
        original = guider.model_options
        guider.model_options = comfy.model_patcher.create_model_options_clone(original)
        options = guider.model_options.setdefault("transformer_options", {})
        options[RUN_STATE_KEY] = run
        if not holds_pack_override(options):
            chain_attention_override(options, make_recording_override)
        try:
            return executor(*args, **kwargs)
        finally:
            guider.model_options = original
            session.runs.append(run)

    return outer_sample_wrapper


def diffusion_model_wrapper(executor, *args, **kwargs):
    options = transformer_options_of(args, kwargs)
    run: CalibrationRun | None = options.get(RUN_STATE_KEY)
    step = step_of_call(options) if run is not None else None
    if step is None or not step.exact:
        return executor(*args, **kwargs)
    forward = _Forward(step.index, _chunk_of(options))
    args, kwargs = with_transformer_options(args, kwargs, {**options, FORWARD_KEY: forward})
    net = executor.class_obj
    if run.features_stand_in:
        out, features = executor(*args, **kwargs), None
    elif is_unet(net):
        named, extras = bind_unet_call(args, kwargs)
        host = ComfyUNetHost(executor, net, named["control"], named["transformer_options"], extras)
        out, features = host.full_forward(
            named["x"], named["timesteps"], named["context"], capture=True, y=named["y"], **extras
        )
    else:
        host = ComfyDiTHost(executor, net, run.split, args, kwargs)
        out, features = host.full_forward(host.x, host.timesteps, None, capture=True)
    if features is None:
        run.encoder.record(step.index, (forward.chunk, "prediction"), out)
    else:
        run.encoder.record_features(step.index, features, (forward.chunk,))
    return out


def recording_clone(model, session: CalibrationSession):
    """A clone of ``model`` that records into ``session`` when sampled; refuses a model already patched by the pack
    (its run would not be full compute)."""
    import comfy.patcher_extension

    from . import attention_hooks, encoder_hooks

    wrappers = comfy.patcher_extension.WrappersMP
    if any(model.get_wrappers(wrappers.OUTER_SAMPLE, hooks.WRAPPER_KEY) for hooks in (attention_hooks, encoder_hooks)):
        raise ValueError(
            "model: Reuse Calibrate needs the model before Attention Map Reuse / Encoder Feature Propagation (its run "
            "must compute every step in full); connect the loader's MODEL to it"
        )
    patched = model.clone()
    net = model.get_model_object("diffusion_model")
    if not is_unet(net) and unsupported_reason(net) is None:
        for name, patch in object_patches(net).items():
            patched.add_object_patch(name, patch)
    chain_attention_override(patched.model_options.setdefault("transformer_options", {}), make_recording_override)
    for wrapper_type in (wrappers.OUTER_SAMPLE, wrappers.DIFFUSION_MODEL):
        patched.remove_wrappers_with_key(wrapper_type, WRAPPER_KEY)
    patched.add_wrapper_with_key(wrappers.OUTER_SAMPLE, WRAPPER_KEY, make_outer_sample_wrapper(session))
    patched.add_wrapper_with_key(wrappers.DIFFUSION_MODEL, WRAPPER_KEY, diffusion_model_wrapper)
    return patched


def log_run(run: CalibrationRun) -> None:
    logging.info(
        f"Reuse Calibrate: recorded {run.steps} steps, {len(run.encoder.names())} encoder tensors, "
        f"{run.attention_calls} attention calls"
        + (" (model not splittable: prediction change stands in for encoder features)" if run.features_stand_in else "")
    )
