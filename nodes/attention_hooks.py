"""ComfyUI glue for attention reuse: the attention override, the per-run and per-forward wrappers.

How a sampler run flows through it:

* ``OUTER_SAMPLE`` (``outer_sample_wrapper``, bound to the node's settings, ``ReusePatch``): swaps the guider's
  ``model_options`` for a nested copy (the EasyCache pattern), resolves the schedule against the run's real step
  count ``len(sigmas) - 1`` and puts the run state (``AttentionRuns``: one engine run per device) in the copy's
  ``transformer_options``; in ``finally`` logs the summary line, drops the maps and restores the options.
* ``APPLY_MODEL`` (``apply_model_wrapper``): one model forward (one batch chunk). Hands the forward a shallow
  copy of ``transformer_options`` holding its own ``ForwardContext`` (``FORWARD_KEY``): the step of the call by
  sigma (``nodes.comfy_steps``), the chunk key (device, cond/uncond order, cond UUIDs) and the call counters.
  Per-call state travels with the call, never on a shared object, so threads computing conds on several devices
  at once (``_calc_cond_batch_multigpu``) cannot see each other's layer or step, and nothing depends on writes
  to the dict flowing back (ComfyUI >= 0.33 copies it in ``BaseModel._apply_model``). Attention outside a
  forward (ControlNet's own forward, a bare ``apply_model`` call) passes through untouched.
* ``transformer_options["optimized_attention_override"]`` (``attention_override``): every attention call of
  the diffusion model. Inside a forward it hands the call to the engine with a layer key (below), else it
  passes through. Another node's override, installed before or after ours, is chained
  (``comfy_steps.chain_attention_override``): the engine's "fused" path calls it. q/k/v that ComfyUI packs in
  ``AttentionTensorContainer``s reach us as tensors (we define no ``container_function``); grouped-query
  attention (``enable_gqa``, fewer K/V heads than Q heads) is expanded to the query heads only where a map or
  output is kept or reused.

Layer keys: on a U-Net (the attention call carries ``block``/``block_index``) a layer is
``(block, block_index, position within that transformer block)``, so a decoder layer keeps its key at Encoder
Feature Propagation's decoder-only steps, where the encoder's attention calls do not happen. Models without block
information (DiTs) use the call's ordinal within the forward, counted apart in a decoder-only pass of Encoder
Feature Propagation (``comfy_steps.ENCODER_SKIPPED_KEY``), which skips the encoder blocks' calls.

Chained with Encoder Feature Propagation (either order): a decoder-only pass at one step is an ordinary forward
of that step, so decoder layers follow the step's bit. Encoder layers run only at key steps: at a reuse step they
reuse what they kept at the last store step where they ran, or compute fresh (counted as fallbacks). A parallel
decoder batch carries ``comfy_steps.DECODER_STEPS_KEY``; its attention calls go through
``AttentionReuseRun.attention_steps``, so parallel and sequential decoding make the same reuse decisions.

Steps and multi-evaluation samplers: a call whose sigma equals ``sample_sigmas[i]`` belongs to step ``i``
and follows bit ``i`` of the schedule. Heun-type samplers evaluate a second time at the next step's sigma;
that evaluation is an evaluation at step ``i + 1``'s noise level and follows bit ``i + 1`` (if that step
reuses, it reuses the maps of the last compute step, exactly as the step itself will; if it stores, the
step's own evaluation overwrites the entry right after). Evaluations at sigmas strictly between two schedule
points (dpm_2, dpmpp_2s_ancestral, dpmpp_sde midpoints, ...) compute fresh fused attention and never read or
write the cache. dpm_fast and dpm_adaptive evaluate only at sigmas of their own after step 0, so they reuse nothing;
``AttentionRuns.coverage`` notices and the log line says so, as it says why a schedule with no reuse step (a short
run, a fraction that rounds to 0) reuses nothing.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Hashable
from dataclasses import dataclass, field

from ..reuse_core.attention_engine import AttentionReuseConfig, AttentionReuseRun
from ..reuse_core.attention_math import attention_kind
from ..reuse_core.schedules import ReuseSchedule, ScheduleSpec, StepCoverage
from .comfy_steps import (
    DECODER_STEPS_KEY,
    ENCODER_SKIPPED_KEY,
    attention_args,
    chain_attention_override,
    run_scope,
    sigmas_of_sample,
    step_of_call,
    transformer_options_of,
    with_transformer_options,
)
from .compile_support import outside_dynamo, warn_if_bypassed
from .families import FAMILIES, attention_family

WRAPPER_KEY = "comfyui_reuse.attention"
RUN_STATE_KEY = "comfyui_reuse.attention.run"
FORWARD_KEY = "comfyui_reuse.attention.forward"


@dataclass(frozen=True)
class ReusePatch:
    """Node-time settings, bound into the patched model's ``OUTER_SAMPLE`` wrapper."""

    config: AttentionReuseConfig
    spec: ScheduleSpec
    verbose: bool = False


class AttentionRuns:
    """State of one sampler run (``RUN_STATE_KEY``), made in ``OUTER_SAMPLE`` and dropped in its ``finally``: one
    engine run per device, so threads computing conds on several devices never share a cache entry or counter,
    and each device keeps its maps within its own memory budget."""

    def __init__(self, config: AttentionReuseConfig, schedule: ReuseSchedule, nothing_to_reuse: str = "", sampler=""):
        self.config = config
        self.schedule = schedule
        self.by_device: dict[str, AttentionReuseRun] = {}
        self._lock = threading.Lock()
        self.nothing_to_reuse = nothing_to_reuse  # why the schedule reuses at no step (ScheduleSpec.nothing_to_reuse)
        self.sampler = sampler  # its name, for the log line
        self.coverage = StepCoverage(schedule.steps)  # which steps the model calls fell on

    def on(self, device: str) -> AttentionReuseRun:
        with self._lock:
            run = self.by_device.get(device)
            if run is None:
                run = self.by_device[device] = AttentionReuseRun(self.config, self.schedule)
            return run

    def record_call(self, match) -> None:
        with self._lock:
            self.coverage.record(match)

    def notes(self) -> str:
        """What the summary line adds when the run reused nothing because of its length or its sampler."""
        steps = self.schedule.steps
        if self.nothing_to_reuse:
            return f"; nothing to reuse at {steps} steps: {self.nothing_to_reuse}"
        off_steps = self.coverage.note(self.sampler)
        return f"; nothing reused: {off_steps}" if off_steps else ""

    def summaries(self, wall_s: float) -> list[str]:
        notes = self.notes()
        if len(self.by_device) == 1:
            return [run.summary(wall_s) + notes for run in self.by_device.values()]
        return [f"[{device}] {run.summary(wall_s)}{notes}" for device, run in self.by_device.items()]

    def reset(self) -> None:
        for run in self.by_device.values():
            run.reset()
        self.by_device.clear()


@dataclass
class ForwardContext:
    """One model forward (one batch chunk on one device): travels in that call's ``transformer_options``."""

    run: AttentionReuseRun
    step: int | None
    chunk_key: Hashable
    calls: int = 0
    block_calls: dict = field(default_factory=dict)


def make_attention_override(previous=None):
    """The ``optimized_attention_override`` callable, chaining ``previous`` (another pack's override)."""

    def call_through(func, args, kwargs):
        if previous is not None:
            return previous(func, *args, **kwargs)
        return func(*args, **kwargs)

    def attention_override(func, *args, **kwargs):
        options = kwargs.get("transformer_options")
        forward = options.get(FORWARD_KEY) if options else None
        call = attention_args(args, kwargs)
        if forward is None or call is None:
            return call_through(func, args, kwargs)
        q, k, v, heads, mask = call.q, call.k, call.v, call.heads, call.mask
        layout, output_layout = call.layout, call.output_layout
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
        elif options.get(ENCODER_SKIPPED_KEY):
            layer_key = ("decoder", ordinal)
        else:
            layer_key = (ordinal,)
        row_steps = options.get(DECODER_STEPS_KEY)
        if row_steps is not None and len(row_steps) > 1:
            return forward.run.attention_steps(
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
        return forward.run.attention(
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

    return outside_dynamo(attention_override)  # never traced into a compiled graph (compile_support)


def _with_rows(args: tuple, kwargs: dict, q, k, v, mask) -> tuple[tuple, dict]:
    """The attention call's arguments with q/k/v (and the mask, where the call has one) replaced."""
    args = (q, k, v, *args[3:])
    if len(args) > 4:
        args = (*args[:4], mask, *args[5:])
    elif kwargs.get("mask") is not None:
        kwargs = {**kwargs, "mask": mask}
    return args, kwargs


def apply_model_wrapper(executor, *args, **kwargs):
    options = transformer_options_of(args, kwargs)
    runs: AttentionRuns | None = options.get(RUN_STATE_KEY)
    if runs is None:  # not inside a sampler run of this model
        return executor(*args, **kwargs)
    match = step_of_call(options)
    runs.record_call(match)
    step = match.index if match is not None and match.exact else None
    x = args[0] if args else kwargs.get("x")
    device = str(getattr(x, "device", ""))
    chunk_key = (tuple(options.get("cond_or_uncond", ())), tuple(str(u) for u in options.get("uuids", ())))
    forward = ForwardContext(runs.on(device), step, chunk_key)
    args, kwargs = with_transformer_options(args, kwargs, {**options, FORWARD_KEY: forward})
    return executor(*args, **kwargs)


def sampler_name(sampler) -> str:
    """The name ComfyUI lists a sampler under (``dpm_fast``), read from its function; ``""`` when unknown."""
    name = getattr(getattr(sampler, "sampler_function", None), "__name__", "")
    return name.removeprefix("sample_").removesuffix("_function") if isinstance(name, str) else ""


def make_outer_sample_wrapper(patch: ReusePatch):
    def outer_sample_wrapper(executor, *args, **kwargs):

        sigmas = sigmas_of_sample(args, kwargs)
        if len(sigmas) < 2:
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
        guider = executor.class_obj
        sampler = sampler_name(args[2] if len(args) > 2 else kwargs.get("sampler"))
        why = patch.spec.nothing_to_reuse(resolved)
        runs = AttentionRuns(patch.config, resolved.schedule, why, sampler)
        start = time.perf_counter()
        with run_scope(guider, RUN_STATE_KEY, runs, make_attention_override):
            try:
                return executor(*args, **kwargs)
            finally:
                for line in runs.summaries(time.perf_counter() - start):
                    logging.info(line)
                seen = any(run.stats.layers for run in runs.by_device.values())
                warn_if_bypassed(guider.model_patcher, "Attention Map Reuse", "attention call", seen)
                runs.reset()

    return outer_sample_wrapper


def apply_attention_reuse(model, config: AttentionReuseConfig, spec: ScheduleSpec, verbose: bool = False):
    """Clone ``model`` (a ModelPatcher) and install attention reuse on the clone."""
    import comfy.patcher_extension

    diffusion_model = getattr(getattr(model, "model", None), "diffusion_model", None)
    if diffusion_model is None or attention_family(diffusion_model) is None:
        target = diffusion_model if diffusion_model is not None else getattr(model, "model", model)
        name = type(target).__name__
        raise ValueError(
            f"model: Attention Map Reuse cannot patch {name}: its attention does not go through ComfyUI's "
            f"optimized attention with transformer_options. Supported: "
            f"{', '.join(f.label for f in FAMILIES if f.attention)}."
        )
    patched = model.clone()
    chain_attention_override(patched.model_options.setdefault("transformer_options", {}), make_attention_override)
    wrappers = comfy.patcher_extension.WrappersMP
    for wrapper_type in (wrappers.OUTER_SAMPLE, wrappers.APPLY_MODEL):
        patched.remove_wrappers_with_key(wrapper_type, WRAPPER_KEY)
    patched.add_wrapper_with_key(
        wrappers.OUTER_SAMPLE, WRAPPER_KEY, make_outer_sample_wrapper(ReusePatch(config, spec, verbose))
    )
    patched.add_wrapper_with_key(wrappers.APPLY_MODEL, WRAPPER_KEY, apply_model_wrapper)
    return patched
