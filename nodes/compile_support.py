"""The nodes on a ``torch.compile``'d model (ComfyUI's ``TorchCompileModel``, ``comfy_api.torch_helpers``).

``TorchCompileModel`` compiles the whole diffusion model: its ``APPLY_MODEL`` wrapper (key ``"torch.compile"``)
swaps ``BaseModel.diffusion_model`` for the compiled module during each model call, so everything that runs inside
the model's forward is traced by dynamo, the pack's attention override and ``DIFFUSION_MODEL`` wrappers included.
Traced, the pack's per-step decisions go wrong two ways (measured with tiny Flux models and PyTorch attention):

* dynamo guards on the pack's per-run state (cache contents, counters, the conds' UUIDs, the step): the guards fail
  at every run, so the model recompiles at every run until dynamo's recompile limit (8 per function), after which
  it runs that code uncompiled (ComfyUI 0.3.64);
* ComfyUI 0.33's ``TorchCompileModel`` drops every guard whose name contains ``transformer_options``
  (``guard_filter_fn``), where the pack's per-call state lives: the decisions of the first traced call are baked
  into the graph, and Attention Map Reuse then reused nothing and gave another image than the uncompiled model.

So the pack's own logic never runs under dynamo (``outside_dynamo``: the attention overrides, the
``DIFFUSION_MODEL`` wrappers), and the model compute it starts runs compiled again:

* the attention override runs eagerly between two compiled graphs (the attention itself is one kernel);
* Encoder Feature Propagation's full and decoder-only passes go through ``CompiledPasses``: the forward, compiled
  with the settings ``TorchCompileModel`` stored (``model_options["torch_compile_kwargs"]``) but with dynamo's
  guards kept (a pass type is one guard set: one compilation each, reused at every step and run);
* Reuse Calibrate samples its one recording run uncompiled (``without_compile``), with one log line.

What the pack cannot prevent: on ComfyUI 0.33, once the same model was sampled compiled *without* the node in the
process, dynamo runs that graph for the patched model too (``warn_if_bypassed`` says so after the run).
"""

from __future__ import annotations

import logging
import types
import weakref

import torch

COMPILE_WRAPPER_KEY = "torch.compile"  # comfy_api.torch_helpers.torch_compile.COMPILE_KEY
COMPILE_KWARGS = "torch_compile_kwargs"  # comfy_api.torch_helpers.torch_compile.TORCH_COMPILE_KWARGS


def outside_dynamo(fn):
    """``fn`` run eagerly even when called from a compiled forward (a graph break around the call)."""
    return torch.compiler.disable(fn)


def compiled_by_comfy(model) -> bool:
    """Whether ``model`` (a ``ModelPatcher``) carries ComfyUI's torch.compile wrapper (``TorchCompileModel``)."""
    import comfy.patcher_extension

    return bool(model.get_wrappers(comfy.patcher_extension.WrappersMP.APPLY_MODEL, COMPILE_WRAPPER_KEY))


def _settings(model_options: dict) -> dict | None:
    """``torch.compile`` keyword arguments of the model's ``TorchCompileModel`` (without its guard filter)."""
    stored = model_options.get(COMPILE_KWARGS)
    if not isinstance(stored, dict):
        return None
    options = {k: v for k, v in (stored.get("options") or {}).items() if k != "guard_filter_fn"}
    return {
        "backend": stored.get("backend", "inductor"),
        "options": options or None,
        "mode": stored.get("mode"),
        "fullgraph": bool(stored.get("fullgraph", False)),
        "dynamic": stored.get("dynamic"),
    }


def warn_if_bypassed(model, who: str, what: str, seen: bool) -> None:
    """After a sampler run of ``model``: one warning when it is torch.compile'd and no ``what`` reached the node.

    ComfyUI 0.33's ``TorchCompileModel`` drops dynamo's guards on ``transformer_options``, and dynamo keeps its
    compiled graphs per Python function, shared by every compiled copy of the model in the process: after the model
    was sampled compiled without the node (same latent size), its graph runs for the patched model too, and the
    node never sees a call. The image is then the model's own, without reuse.
    """
    if seen or not compiled_by_comfy(model):
        return
    logging.warning(
        f"{who}: no {what} reached the node in this run, so nothing was reused: the model is torch.compile'd "
        "(TorchCompileModel) and runs a graph compiled earlier in this session without the node (ComfyUI drops "
        "torch.compile's checks on transformer_options). The image is the model's without the node. Restart "
        "ComfyUI, or remove TorchCompileModel, to sample with the node."
    )


def without_compile(patched, who: str) -> None:
    """Remove ComfyUI's torch.compile wrapper from ``patched`` (a clone), logging one line."""
    import comfy.patcher_extension

    if not compiled_by_comfy(patched):
        return
    patched.remove_wrappers_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, COMPILE_WRAPPER_KEY)
    patched.model_options.pop(COMPILE_KWARGS, None)
    logging.info(
        f"{who}: the model is torch.compile'd (TorchCompileModel); the recording run samples it uncompiled (one run "
        "gains nothing from compiling it, and the recording must see every step). The result equals the compiled "
        "model's within float rounding."
    )


def _run_forward(executor, args, kwargs):
    return executor(*args, **kwargs)


# One compiled forward per compiled diffusion model, released with it. Each has a code object of its own: dynamo
# keeps its compilations (and their limit) per code object.
_COMPILED_FORWARDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _compiled_forward(compiled_module, settings: dict | None):
    forward = _COMPILED_FORWARDS.get(compiled_module)
    if forward is None:
        code = _run_forward.__code__.replace()
        fresh = types.FunctionType(code, _run_forward.__globals__, "comfyui_reuse_compiled_pass")
        if settings is None:  # compiled some other way: the module's own dynamo context
            forward = compiled_module.dynamo_ctx(fresh)
        else:
            forward = torch.compile(fresh, **{**settings, "fullgraph": False})
        _COMPILED_FORWARDS[compiled_module] = forward
    return forward


class _CompiledExecutor:
    """A ``DIFFUSION_MODEL`` executor whose calls run the rest of the forward compiled."""

    def __init__(self, executor, forward):
        self._executor = executor
        self._forward = forward

    def __call__(self, *args, **kwargs):
        return self._forward(self._executor, args, kwargs)

    def __getattr__(self, name):
        return getattr(self._executor, name)


class CompiledPasses:
    """Per sampler run: runs a ``DIFFUSION_MODEL`` wrapper's passes compiled while ``TorchCompileModel``'s compiled
    module is swapped in for ``BaseModel.diffusion_model`` (that is, inside its ``APPLY_MODEL`` wrapper)."""

    def __init__(self, guider):
        self.model = guider.model_patcher.model
        self.settings = _settings(guider.model_options or {})

    def executor(self, executor):
        compiled = getattr(self.model, "diffusion_model", None)
        if not isinstance(compiled, torch._dynamo.eval_frame.OptimizedModule):
            return executor
        return _CompiledExecutor(executor, _compiled_forward(compiled, self.settings))
