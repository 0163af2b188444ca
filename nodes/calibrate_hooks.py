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
* ``APPLY_MODEL`` (``apply_model_wrapper``): around it, for the diffusion models whose forward has no
  ``DIFFUSION_MODEL`` wrapper point (SD3 / SD3.5, Boogu, Mochi): it marks each exact step for the attention override
  and, when the run's first exact step never reached the inner wrapper, records the model's output (denoised) as
  the stand-in at every step. Where the first step reached it, a later step that does not was skipped by another
  node's cache: it stays unrecorded, and the node says so after the run.
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
from ..reuse_core.calibration import DEFAULT_MAX_ELEMENTS, ChangeRecorder
from .comfy_steps import (
    attention_args,
    chain_attention_override,
    run_scope,
    sigmas_of_sample,
    step_of_call,
    transformer_options_of,
    with_transformer_options,
)
from .compile_support import without_compile
from .dit_host import BlockSplit, ComfyDiTHost, object_patches
from .encoder_hooks import unsupported_reason
from .families import attention_family
from .unet_decoder import ComfyUNetHost, bind_unet_call, is_unet

WRAPPER_KEY = "comfyui_reuse.calibrate"
RUN_STATE_KEY = "comfyui_reuse.calibrate.run"
FORWARD_KEY = "comfyui_reuse.calibrate.forward"
APPLY_KEY = "comfyui_reuse.calibrate.apply"
# Other nodes' caches that skip model calls (their wrapper keys, ComfyUI's comfy_extras/nodes_easycache.py): a run
# behind them never computes some steps in full, so nothing can be fitted to it.
SKIPPING_CACHES = {"easycache": "EasyCache", "lazycache": "LazyCache"}
# Values recorded per tensor and step: 4096 up to 200 steps (the calibration's estimate, ~60 MB for a 50-step SDXL
# run), fewer on longer runs so that the recording stays within about what 200 steps take (never below 256).
RECORDED_VALUES = 4096 * 200
MIN_RECORDED_VALUES = 256


def recorded_values(steps: int) -> int:
    """Values kept per tensor and step on a run of ``steps`` steps."""
    return max(MIN_RECORDED_VALUES, min(DEFAULT_MAX_ELEMENTS, RECORDED_VALUES // max(1, steps)))


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
    # True: the diffusion model has no DIFFUSION_MODEL wrapper point, the stand-in is recorded around apply_model
    # (decided at the run's first exact step; None before)
    direct: bool | None = None


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
    reached: bool = False  # APPLY_MODEL's: the DIFFUSION_MODEL wrapper ran inside it


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
        call = attention_args(args, kwargs)
        if forward is None or run is None or call is None:
            return out
        ordinal = forward.calls
        forward.calls += 1
        run.attention_calls += 1
        q = to_heads(call.q, call.heads, call.layout)
        k = kv_to_heads(call.k, call.heads, q.shape[-1], call.layout)
        run.attention.record_attention(forward.step, (forward.chunk, ordinal), q, k, out)
        return out

    return override


def make_outer_sample_wrapper(session: CalibrationSession):
    def outer_sample_wrapper(executor, *args, **kwargs):

        sigmas = sigmas_of_sample(args, kwargs)
        if len(sigmas) < 2:
            return executor(*args, **kwargs)
        guider = executor.class_obj
        net = guider.model_patcher.get_model_object("diffusion_model")
        reason = unsupported_reason(net)
        split = None if is_unet(net) or reason else BlockSplit.of(net, session.encoder_fraction)
        steps = len(sigmas) - 1
        values = recorded_values(steps)
        run = CalibrationRun(
            steps,
            [float(s) for s in sigmas],
            split,
            features_stand_in=reason is not None,
            encoder=ChangeRecorder(values),
            attention=ChangeRecorder(values),
        )
        try:
            with run_scope(guider, RUN_STATE_KEY, run, make_recording_override):
                return executor(*args, **kwargs)
        finally:
            session.runs.append(run)

    return outer_sample_wrapper


def apply_model_wrapper(executor, *args, **kwargs):
    options = transformer_options_of(args, kwargs)
    run: CalibrationRun | None = options.get(RUN_STATE_KEY)
    step = step_of_call(options) if run is not None else None
    if step is None or not step.exact:
        return executor(*args, **kwargs)
    forward = _Forward(step.index, _chunk_of(options))
    args, kwargs = with_transformer_options(args, kwargs, {**options, FORWARD_KEY: forward, APPLY_KEY: forward})
    out = executor(*args, **kwargs)
    if run.direct is None:
        run.direct = not forward.reached
    if run.direct:  # no DIFFUSION_MODEL wrapper point: the model's output (denoised) stands in
        run.encoder.record(step.index, (forward.chunk, "prediction"), out)
    return out


def diffusion_model_wrapper(executor, *args, **kwargs):
    options = transformer_options_of(args, kwargs)
    run: CalibrationRun | None = options.get(RUN_STATE_KEY)
    step = step_of_call(options) if run is not None else None
    if step is None or not step.exact:
        return executor(*args, **kwargs)
    outer: _Forward | None = options.get(APPLY_KEY)
    if outer is not None:
        outer.reached = True
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


def check_model(model) -> None:
    """Refuse, before sampling, a model whose run could not be recorded in full or whose schedules no node uses."""
    import comfy.patcher_extension

    from . import attention_hooks, encoder_hooks

    wrappers = comfy.patcher_extension.WrappersMP
    if any(model.get_wrappers(wrappers.OUTER_SAMPLE, hooks.WRAPPER_KEY) for hooks in (attention_hooks, encoder_hooks)):
        raise ValueError(
            "model: Reuse Calibrate needs the model before Attention Map Reuse / Encoder Feature Propagation (its run "
            "must compute every step in full); connect the loader's MODEL to it"
        )
    for key, node in SKIPPING_CACHES.items():
        if any(model.get_wrappers(kind, key) for kind in (wrappers.OUTER_SAMPLE, wrappers.DIFFUSION_MODEL)):
            raise ValueError(
                f"model: Reuse Calibrate needs the model before {node}: {node} skips model calls, so its run never "
                f"computes some steps in full and no schedule can be fitted to them; connect the model to Reuse "
                f"Calibrate before {node} (or without it)"
            )
    net = model.get_model_object("diffusion_model")
    if attention_family(net) is None and unsupported_reason(net) is not None:
        name = f"{type(net).__module__}.{type(net).__name__}"
        raise ValueError(
            f"model: neither Encoder Feature Propagation nor Attention Map Reuse supports this model's diffusion model "
            f"({name}), so there is nothing to calibrate for it"
        )


def recording_clone(model, session: CalibrationSession):
    """A clone of ``model`` that records into ``session`` when sampled; refuses what ``check_model`` refuses."""
    import comfy.patcher_extension

    wrappers = comfy.patcher_extension.WrappersMP
    check_model(model)
    patched = model.clone()
    without_compile(patched, "Reuse Calibrate")  # after TorchCompileModel: the one recording run, uncompiled
    net = model.get_model_object("diffusion_model")
    if not is_unet(net) and unsupported_reason(net) is None:
        for name, patch in object_patches(net).items():
            patched.add_object_patch(name, patch)
    chain_attention_override(patched.model_options.setdefault("transformer_options", {}), make_recording_override)
    for wrapper_type in (wrappers.OUTER_SAMPLE, wrappers.APPLY_MODEL, wrappers.DIFFUSION_MODEL):
        patched.remove_wrappers_with_key(wrapper_type, WRAPPER_KEY)
    patched.add_wrapper_with_key(wrappers.OUTER_SAMPLE, WRAPPER_KEY, make_outer_sample_wrapper(session))
    patched.add_wrapper_with_key(wrappers.APPLY_MODEL, WRAPPER_KEY, apply_model_wrapper)
    patched.add_wrapper_with_key(wrappers.DIFFUSION_MODEL, WRAPPER_KEY, diffusion_model_wrapper)
    return patched


def log_run(run: CalibrationRun) -> None:
    logging.info(
        f"Reuse Calibrate: recorded {run.steps} steps, {len(run.encoder.names())} encoder tensors, "
        f"{run.attention_calls} attention calls"
        + (" (model not splittable: prediction change stands in for encoder features)" if run.features_stand_in else "")
    )
