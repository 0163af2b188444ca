"""ComfyUI's diffusion transformers as encoder/decoder hosts for ``reuse_core.encoder_engine`` (the DiT form).

The encoder is the model's first ``encoder_blocks`` transformer blocks in execution order (Flux-style models:
the double-stream blocks, then the single-stream blocks); the decoder is the remaining blocks and the output
head. The cache holds the output of the last encoder block exactly as the model hands it to the next block:

* double-stream blocks (Flux, Chroma, HunyuanVideo, Qwen-Image) read and write an image
  and a text stream; the remaining blocks read both, so both are cached (``middle`` = image tokens,
  ``streams["txt"]`` = text tokens). The text stream is cached too because the encoder blocks modulate and
  attend it with the key step's timestep: recomputing it would need the encoder.
* single-stream blocks (Flux-style models past the double blocks, Lumina 2 / Z-Image) carry one sequence
  (text and image tokens together in Flux); that tensor is the whole state.
* cross-attention models (Wan, LTX-Video) carry the image stream only; their text input is the conditioning
  itself, which the model's forward hands to every block at every step.

Everything else the remaining blocks read (timestep and guidance modulation, rotary embeddings, masks) is
recomputed by the model's own forward at the current step, as in the paper.

Mechanism (no forward is copied): every pass is the model's own forward (the ``DIFFUSION_MODEL`` executor),
given a shallow copy of ``transformer_options`` that names a ``SplitPass``. Families with ComfyUI's block
replacement get call-local ``patches_replace["dit"]`` entries for the encoder blocks (a replacement already
there, from another pack, is chained). Lumina 2 / Z-Image has no block replacement: ``NextDiT.layers`` is
object-patched with a ``SplitLayerList``, the same blocks (same state-dict keys) whose iteration yields them
wrapped. At a decoder-only pass the encoder blocks return their input untouched (no compute) and the last one
returns the cached state; the embeddings before the blocks still run (a few percent of a block at most).

A parallel decoder batch tiles every batch-first argument of the call (latent, conditioning, masks, reference
latents) once per decoded step, gives each block of rows its step's timestep and carries
``comfy_steps.DECODER_STEPS_KEY``. Calls with per-token timesteps (video models with frame conditioning) or
ControlNet input are decoded one step at a time. Every decoder-only pass carries ``ENCODER_SKIPPED_KEY`` so
that Attention Map Reuse, which names a DiT's attention layers by their order in the forward, keys the
decoder's layers apart from the full forward's.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch

from ..reuse_core.encoder_engine import EncoderFeatures, encoder_block_count, tile_rows
from .comfy_steps import DECODER_STEPS_KEY, ENCODER_SKIPPED_KEY
from .families import Family, encoder_family, transformer_labels

PASS_KEY = "comfyui_reuse.encoder_propagation.pass"


def dit_family(net) -> Family | None:
    """``net``'s family where Encoder Feature Propagation splits it (``families``: by exact class), else None."""
    family = encoder_family(net)
    return family if family is not None and family.stacks else None


def dit_unsupported_reason(net) -> str | None:
    """Why encoder propagation cannot split ``net`` (a diffusion transformer), or None."""
    family = dit_family(net)
    name = f"{type(net).__module__}.{type(net).__name__}"
    known = encoder_family(net)
    if known is not None and known.refused:
        return (
            f"Encoder Feature Propagation cannot split this model's diffusion model ({name}): "
            f"{known.label}: {known.refused}. Remove the node for this model."
        )
    if family is None:
        return (
            f"Encoder Feature Propagation cannot split this model's diffusion model ({name}): it is neither a U-Net "
            f"nor a transformer family it supports ({transformer_labels()}). Remove the node for this model."
        )
    depth = sum(len(getattr(net, stack.attribute)) for stack in family.stacks)
    if depth < 2:
        return f"Encoder Feature Propagation: this {family.label} model has {depth} block(s); a split needs 2 or more."
    return None


def object_patches(net) -> dict[str, Any]:
    """The ``ModelPatcher`` object patches the family needs (block lists without ComfyUI block replacement)."""
    patches, first = {}, 0
    for stack in dit_family(net).stacks:
        blocks = getattr(net, stack.attribute)
        if stack.replace_key is None:
            # _modules: the plain blocks, also when ``blocks`` is a SplitLayerList applied by an earlier node
            patches[f"diffusion_model.{stack.attribute}"] = SplitLayerList(blocks._modules.values(), first=first)
        first += len(blocks)
    return patches


@dataclass(frozen=True)
class BlockSplit:
    """Where one run splits the model: the family's block stacks and how many leading blocks are the encoder."""

    family: Family
    lengths: tuple[int, ...]  # blocks per stack
    encoder_blocks: int

    @classmethod
    def of(cls, net, fraction: float) -> BlockSplit:
        family = dit_family(net)
        lengths = tuple(len(getattr(net, stack.attribute)) for stack in family.stacks)
        return cls(family, lengths, encoder_block_count(fraction, sum(lengths)))

    @property
    def depth(self) -> int:
        return sum(self.lengths)

    def describe(self) -> str:
        return f"encoder = first {self.encoder_blocks} of {self.depth} blocks"


class SplitPass:
    """One forward seen block by block: capture the state after the encoder, or skip the encoder and emit a
    cached state (``emit``). Blocks report through ``block``."""

    def __init__(self, split: BlockSplit, emit: EncoderFeatures | None = None):
        self.split = split
        self.emit = emit
        self.captured: EncoderFeatures | None = None

    def block(self, index: int, run, passthrough):
        last = self.split.encoder_blocks - 1
        if index > last:
            return run()
        if self.emit is not None:
            return _state_of(self.emit) if index == last else passthrough()
        out = run()
        if index == last:
            self.captured = _features_of(out)
        return out


def _features_of(out) -> EncoderFeatures:
    # Cloned: the forward goes on to add ControlNet residuals or patch outputs in place.
    if isinstance(out, torch.Tensor):
        return EncoderFeatures((), out.clone(), meta={"form": "tensor"})
    streams = {k: v.clone() for k, v in out.items() if k != "img" and isinstance(v, torch.Tensor)}
    return EncoderFeatures((), out["img"].clone(), streams, meta={"form": "dict"})


def _state_of(features: EncoderFeatures):
    if features.meta["form"] == "tensor":
        return features.middle.clone()
    return {"img": features.middle.clone(), **{k: v.clone() for k, v in features.streams.items()}}


def _replacement(split_pass: SplitPass, index: int, previous):
    def replace(args: dict, extra: dict):
        if previous is not None:
            return split_pass.block(index, lambda: previous(args, extra), lambda: args)
        return split_pass.block(index, lambda: extra["original_block"](args), lambda: args)

    return replace


def options_for_pass(options: dict, split_pass: SplitPass) -> dict:
    """A shallow copy of ``transformer_options`` routing the encoder blocks through ``split_pass``."""
    split = split_pass.split
    options = {**options, PASS_KEY: split_pass}
    if all(stack.replace_key is None for stack in split.family.stacks):
        return options
    patches_replace = dict(options.get("patches_replace") or {})
    dit = dict(patches_replace.get("dit") or {})
    first = 0  # global index of the stack's first block
    for stack, count in zip(split.family.stacks, split.lengths, strict=True):
        if stack.replace_key is not None:
            for i in range(min(count, split.encoder_blocks - first)):
                dit[(stack.replace_key, i)] = _replacement(split_pass, first + i, dit.get((stack.replace_key, i)))
        first += count
    patches_replace["dit"] = dit
    options["patches_replace"] = patches_replace
    return options


class _SplitLayer:
    """One block of a ``SplitLayerList``, as its forward sees it."""

    def __init__(self, index: int, layer: torch.nn.Module):
        self.index = index
        self.layer = layer

    def __call__(self, *args, **kwargs):
        options = kwargs.get("transformer_options") or {}
        split_pass: SplitPass | None = options.get(PASS_KEY)
        if split_pass is None:
            return self.layer(*args, **kwargs)
        return split_pass.block(self.index, lambda: self.layer(*args, **kwargs), lambda: args[0])

    def __getattr__(self, name):  # code that iterates the list for other reasons sees the block's attributes
        return getattr(self.layer, name)


class SplitLayerList(torch.nn.ModuleList):
    """An object patch for a block list without ComfyUI block replacement: the same blocks under the same names
    (LoRA keys, state dict and device moves are unchanged); iterating yields each wrapped as ``_SplitLayer``."""

    def __init__(self, blocks, first: int = 0):
        super().__init__(blocks)
        self.first = first  # global index of the first block

    def __iter__(self):
        return (_SplitLayer(self.first + i, layer) for i, layer in enumerate(super().__iter__()))


class ComfyDiTHost:
    """One ``DIFFUSION_MODEL`` call of a supported ComfyUI diffusion transformer, for the engine."""

    def __init__(self, executor, net, split: BlockSplit, args: tuple, kwargs: dict):
        self.executor = executor
        self.split = split
        self.bound = inspect.signature(net._forward).bind(*args, **kwargs)
        params = list(self.bound.signature.parameters)
        self.x_name, self.t_name = params[0], params[1]
        self.x = self.bound.arguments[self.x_name]
        self.timesteps = self.bound.arguments[self.t_name]
        self.options = self._argument("transformer_options") or {}

    def _argument(self, name: str):
        arguments = self.bound.arguments
        if name in arguments:
            return arguments[name]
        var_keyword = next((p.name for p in self.bound.signature.parameters.values() if p.kind is p.VAR_KEYWORD), None)
        return arguments.get(var_keyword, {}).get(name) if var_keyword else None

    @property
    def batchable(self) -> bool:
        # A future step's decoder cannot get its ControlNet residuals, nor per-token timesteps.
        control = self._argument("control")
        has_control = bool(control) and any(control.get(k) for k in ("input", "middle", "output"))
        return not has_control and self.timesteps.ndim == 1

    def _pass(self, split_pass: SplitPass, n: int = 1, timesteps=None, extra_options: dict | None = None):
        options = options_for_pass({**self.options, **(extra_options or {})}, split_pass)
        rows = self.x.shape[0]
        call = inspect.BoundArguments(self.bound.signature, self.bound.arguments.copy())
        for name, param in call.signature.parameters.items():
            if name not in call.arguments:
                continue
            value = call.arguments[name]
            if param.kind is param.VAR_KEYWORD:
                value = {k: tile_rows(v, n, rows) for k, v in value.items()}
                if "transformer_options" in value:
                    value["transformer_options"] = options
            elif name == "transformer_options":
                value = options
            elif name == self.t_name and timesteps is not None:
                value = timesteps
            else:
                value = tile_rows(value, n, rows)
            call.arguments[name] = value
        if "transformer_options" not in call.arguments and not any(
            isinstance(v, dict) and "transformer_options" in v for v in call.arguments.values()
        ):
            raise RuntimeError("Encoder Feature Propagation: the model call carries no transformer_options")
        return self.executor(*call.args, **call.kwargs)

    def full_forward(self, x, timesteps, context, *, capture: bool, **_extra):
        if not capture:
            return self.executor(*self.bound.args, **self.bound.kwargs), None
        split_pass = SplitPass(self.split)
        out = self._pass(split_pass)
        return out, split_pass.captured

    def encode(self, x, timesteps, context, **extra) -> EncoderFeatures:
        features = self.full_forward(x, timesteps, context, capture=True, **extra)[1]
        if features is None:
            raise RuntimeError("Encoder Feature Propagation: the transformer forward did not run its blocks")
        return features

    def decode(self, features: EncoderFeatures, timesteps, context, **_extra) -> torch.Tensor:
        rows = self.x.shape[0]
        n = features.batch_size // rows
        extra_options: dict = {ENCODER_SKIPPED_KEY: True}
        if n > 1:  # a parallel batch: n blocks of this call's rows
            for key in ("cond_or_uncond", "uuids"):
                if isinstance(self.options.get(key), list):
                    extra_options[key] = self.options[key] * n
            known = features.steps is not None and len(features.steps) == n
            extra_options[DECODER_STEPS_KEY] = tuple(features.steps) if known else (None,) * n
        return self._pass(SplitPass(self.split, emit=features), n, timesteps, extra_options)
