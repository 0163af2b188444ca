"""Shared ComfyUI glue: find ``transformer_options`` in a wrapper's arguments, and the step of a call."""

from __future__ import annotations

from ..reuse_core.steps import StepMatch, match_step


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


def step_of_call(transformer_options: dict) -> StepMatch | None:
    """The sampling step of the current model call, or None outside a sampler run."""
    sigmas = transformer_options.get("sigmas")
    sample_sigmas = transformer_options.get("sample_sigmas")
    if sigmas is None or sample_sigmas is None:
        return None
    return match_step(sigmas, sample_sigmas)
