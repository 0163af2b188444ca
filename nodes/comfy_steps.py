"""Shared ComfyUI glue: find ``transformer_options`` in a wrapper's arguments, the step of a call, and the pack's
place in the ``optimized_attention_override`` slot."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from ..reuse_core.steps import StepMatch, match_step

# Set by Encoder Feature Propagation on the transformer_options of a decoder-only pass that decodes several
# sampling steps in one batch (parallel decoding), and only there: a tuple with the step index of each block of
# rows. The batch holds len(steps) equal blocks of rows in that order (block j = rows [j*R, (j+1)*R) with
# R = rows // len(steps), one copy of the call's cond batch each); an entry is None where the step is unknown.
# Attention Map Reuse applies step steps[j]'s schedule to block j instead of the call's own step.
DECODER_STEPS_KEY = "comfyui_reuse.decoder_steps"

# Set by Encoder Feature Propagation on the transformer_options of a diffusion transformer's decoder-only pass
# (its encoder blocks make no attention calls there): Attention Map Reuse names such a pass's attention layers
# apart from a full forward's, whose layer ordinals they would otherwise take.
ENCODER_SKIPPED_KEY = "comfyui_reuse.encoder_skipped"


def transformer_options_of(args: tuple, kwargs: dict) -> dict:
    """``transformer_options`` of a DIFFUSION_MODEL / APPLY_MODEL wrapper call.

    Its position differs between model families and releases, so look for it by name first.
    """
    options = kwargs.get("transformer_options")
    if isinstance(options, dict):
        return options
    for arg in reversed(args):
        if isinstance(arg, dict) and ("sample_sigmas" in arg or "sigmas" in arg or "patches" in arg):
            return arg
    return {}


def with_transformer_options(args: tuple, kwargs: dict, options: dict) -> tuple:
    """``(args, kwargs)`` of a wrapper call with its ``transformer_options`` replaced by ``options``, to pass to
    ``executor(*args, **kwargs)``."""
    if isinstance(kwargs.get("transformer_options"), dict):
        return args, {**kwargs, "transformer_options": options}
    original = transformer_options_of(args, kwargs)
    i = next(i for i in reversed(range(len(args))) if args[i] is original)  # the caller found it there
    return (*args[:i], options, *args[i + 1 :]), kwargs


@dataclass(frozen=True)
class AttentionArgs:
    """One call of ComfyUI's optimized attention as the nodes' overrides read it."""

    q: Any
    k: Any
    v: Any
    heads: int
    mask: Any
    layout: str  # "bnc" ([B, N, H*D]) or "bhnd" (skip_reshape)
    output_layout: str  # the layout the call returns (skip_output_reshape)


def attention_args(args: tuple, kwargs: dict) -> AttentionArgs | None:
    """``optimized_attention(q, k, v, heads, mask=None, ..., skip_reshape=False, skip_output_reshape=False)``'s
    arguments, or None for a call that is not one (fewer than three tensors, or no head count)."""
    heads = args[3] if len(args) > 3 else kwargs.get("heads")
    if len(args) < 3 or heads is None:
        return None
    return AttentionArgs(
        args[0],
        args[1],
        args[2],
        heads,
        kwargs.get("mask", args[4] if len(args) > 4 else None),
        "bhnd" if kwargs.get("skip_reshape", False) else "bnc",
        "bhnd" if kwargs.get("skip_output_reshape", False) else "bnc",
    )


@contextmanager
def run_scope(guider, state_key: str, state, attention_override=None):
    """One sampler run's model options, for the ``OUTER_SAMPLE`` wrappers of all three nodes: a clone of the
    guider's options holding ``state`` under ``state_key`` in ``transformer_options`` (and ``attention_override``
    chained in, unless a pack override is there already), the guider's own options restored when the run ends, so
    a run's state never outlives it nor reaches another model. Yields the run's ``transformer_options``."""
    import comfy.model_patcher

    original = guider.model_options
    guider.model_options = comfy.model_patcher.create_model_options_clone(original)
    options = guider.model_options.setdefault("transformer_options", {})
    options[state_key] = state
    if attention_override is not None and not holds_pack_override(options):
        chain_attention_override(options, attention_override)
    try:
        yield options
    finally:
        guider.model_options = original


def sigmas_of_sample(args: tuple, kwargs: dict):
    """The ``sigmas`` of an OUTER_SAMPLE wrapper call (``noise, latent, sampler, sigmas, ...``).

    A run with fewer than two sigmas makes no sampling step (SplitSigmas can hand SamplerCustom a one-value
    tail): the wrappers then pass it through untouched.
    """
    return args[3] if len(args) > 3 else kwargs["sigmas"]


def step_of_call(transformer_options: dict) -> StepMatch | None:
    """The sampling step of the current model call, or None outside a sampler run."""
    sigmas = transformer_options.get("sigmas")
    sample_sigmas = transformer_options.get("sample_sigmas")
    if sigmas is None or sample_sigmas is None:
        return None
    return match_step(sigmas, sample_sigmas)


OVERRIDE_SLOT = "optimized_attention_override"
_PREVIOUS = "comfyui_reuse_previous"  # set on the pack's overrides: the override each one chains


def chain_attention_override(transformer_options: dict, make_override) -> None:
    """Put ``make_override(previous)`` in the override slot, ``previous`` being another node's override (called from
    ours, never dropped) or None; an earlier override of this pack is replaced, not stacked.

    Called when the node patches the model and again at the start of each run: a node applied after ours (e.g.
    ComfyUI's ModelAttentionBackend) replaces the slot, and its override is then chained under ours for the run."""
    previous = transformer_options.get(OVERRIDE_SLOT)
    if hasattr(previous, _PREVIOUS):
        previous = getattr(previous, _PREVIOUS)
    override = make_override(previous)
    setattr(override, _PREVIOUS, previous)
    transformer_options[OVERRIDE_SLOT] = override


def holds_pack_override(transformer_options: dict) -> bool:
    return hasattr(transformer_options.get(OVERRIDE_SLOT), _PREVIOUS)
