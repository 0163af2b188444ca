"""ComfyUI's ``UNetModel`` as an encoder/decoder host for ``reuse_core.encoder_engine``.

Full passes run ComfyUI's own forward (the ``DIFFUSION_MODEL`` executor) with two patches added for that call
only: an ``input_block_patch`` placed last (its return value is what enters ``hs``, after ControlNet input
residuals and every other pack's input patches) and an ``output_block_patch`` placed first (at
``("output", 0)`` it sees the middle output, ControlNet middle residual included, before other packs' output
patches such as FreeU rewrite it). Captured tensors are cloned: ComfyUI adds ControlNet output residuals to
skips in place, and FreeU scales the middle output in place.

Decoder-only passes walk ``output_blocks`` exactly as ``UNetModel._forward`` does, with ComfyUI's own
``forward_timestep_embed`` and ``apply_control``, running other packs' ``emb_patch`` and ``output_block_patch``
patches, ControlNet output residuals, SDXL's ``label_emb(y)`` and the ``block`` / ``transformer_index`` /
``original_shape`` keys that block and attention patches read. The time embedding is recomputed for the
decoder's own timesteps. Nothing else of ``_forward`` is repeated. A parallel decoder batch carries
``comfy_steps.DECODER_STEPS_KEY``.
"""

from __future__ import annotations

import torch

from ..reuse_core.encoder_engine import EncoderFeatures
from .comfy_steps import DECODER_STEPS_KEY

UNET_ARG_NAMES = ("x", "timesteps", "context", "y", "control", "transformer_options")


def unet_class():
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    return UNetModel


def is_unet(net) -> bool:
    return isinstance(net, unet_class())


def unet_unsupported_reason(net) -> str | None:
    """Why encoder propagation cannot drive ``net`` (a ``UNetModel``), or None."""
    if getattr(net, "use_temporal_resblocks", False):
        return "Encoder Feature Propagation does not support video U-Nets (temporal blocks, e.g. SVD)."
    if getattr(net, "predict_codebook_ids", False):
        return "Encoder Feature Propagation does not support U-Nets that predict codebook ids."
    return None


def bind_unet_call(args: tuple, kwargs: dict) -> tuple[dict, dict]:
    """Split a ``UNetModel.forward`` wrapper call into its named arguments and the remaining extras."""
    named = dict(zip(UNET_ARG_NAMES, args, strict=False))
    extras = dict(kwargs)
    for name in UNET_ARG_NAMES:
        if name in extras:
            named[name] = extras.pop(name)
        named.setdefault(name, None)
    if named["transformer_options"] is None:
        named["transformer_options"] = {}
    if len(args) > len(UNET_ARG_NAMES):
        raise TypeError(f"UNetModel.forward got {len(args)} positional arguments; expected at most 6")
    return named, extras


def has_output_control(control) -> bool:
    return bool(control) and len(control.get("output") or []) > 0


class FeatureCapture:
    """Call-local block patches recording what enters ``hs`` and the middle-block output."""

    def __init__(self):
        self.skips: list[torch.Tensor] = []
        self.middle: torch.Tensor | None = None
        self.transformer_index: int | None = None

    def input_patch(self, h, transformer_options):
        self.skips.append(h.clone())
        return h

    def output_patch(self, h, hsp, transformer_options):
        if self.middle is None and transformer_options.get("block") == ("output", 0):
            self.middle = h.clone()
            self.transformer_index = transformer_options.get("transformer_index")
        return h, hsp

    def patches_with_capture(self, patches: dict | None) -> dict:
        patched = dict(patches or {})
        patched["input_block_patch"] = [*patched.get("input_block_patch", []), self.input_patch]
        patched["output_block_patch"] = [self.output_patch, *patched.get("output_block_patch", [])]
        return patched

    def features(self, net, x: torch.Tensor) -> EncoderFeatures | None:
        # Incomplete when something inside the wrapper chain skipped the real forward (another cache).
        if self.middle is None or len(self.skips) != len(net.input_blocks):
            return None
        meta = {"dtype": x.dtype, "input_shape": tuple(x.shape), "transformer_index": self.transformer_index or 0}
        return EncoderFeatures(tuple(self.skips), self.middle, meta=meta)


class ComfyUNetHost:
    """One ``DIFFUSION_MODEL`` call of a ComfyUI ``UNetModel`` seen through the engine's host interface."""

    def __init__(self, executor, net, control, transformer_options: dict, extras: dict):
        self.executor = executor
        self.net = net
        self.control = control
        self.options = transformer_options
        self.extras = extras

    def full_forward(self, x, timesteps, context, *, capture: bool, y=None, **extras):
        if not capture:
            return self.executor(x, timesteps, context, y, self.control, self.options, **extras), None
        recorder = FeatureCapture()
        had_patches = "patches" in self.options
        original = self.options.get("patches")
        self.options["patches"] = recorder.patches_with_capture(original)
        try:
            out = self.executor(x, timesteps, context, y, self.control, self.options, **extras)
        finally:
            if had_patches:
                self.options["patches"] = original
            else:
                self.options.pop("patches", None)
        return out, recorder.features(self.net, x)

    def encode(self, x, timesteps, context, **extra) -> EncoderFeatures:
        """ComfyUI has no encoder-only entry point, so this runs the full forward and keeps the features."""
        features = self.full_forward(x, timesteps, context, capture=True, **extra)[1]
        if features is None:
            raise RuntimeError("Encoder Feature Propagation: the U-Net forward did not run its blocks")
        return features

    def decode(self, features: EncoderFeatures, timesteps, context, y=None, **_extras) -> torch.Tensor:
        from comfy.ldm.modules.diffusionmodules.openaimodel import apply_control, forward_timestep_embed
        from comfy.ldm.modules.diffusionmodules.util import timestep_embedding

        net = self.net
        dtype = features.meta["dtype"]
        options = dict(self.options)
        rows = features.batch_size
        call_rows = features.meta["input_shape"][0]
        options.pop(DECODER_STEPS_KEY, None)
        if rows != call_rows:  # a parallel batch: n blocks of this call's cond chunks
            repeat = rows // call_rows
            for key in ("cond_or_uncond", "uuids"):
                if isinstance(options.get(key), list):
                    options[key] = options[key] * repeat
            # Per-step machinery inside the decoder (Attention Map Reuse) must know which rows are which step.
            known = features.steps is not None and len(features.steps) == repeat
            options[DECODER_STEPS_KEY] = tuple(features.steps) if known else (None,) * repeat
        options["original_shape"] = [rows, *features.meta["input_shape"][1:]]
        options["transformer_index"] = features.meta["transformer_index"]
        patches = options.get("patches", {})

        emb = net.time_embed(timestep_embedding(timesteps, net.model_channels, repeat_only=False).to(dtype))
        for patch in patches.get("emb_patch", []):
            emb = patch(emb, net.model_channels, options)
        if net.num_classes is not None:
            emb = emb + net.label_emb(y)

        output_patches = patches.get("output_block_patch", [])
        # Output patches (FreeU) and ControlNet residuals modify h / hsp in place: never touch the cache.
        copy_inputs = bool(output_patches) or has_output_control(self.control)
        hs = list(features.skips)
        h = features.middle.clone() if copy_inputs else features.middle
        for block_id, module in enumerate(net.output_blocks):
            options["block"] = ("output", block_id)
            hsp = hs.pop()
            if copy_inputs:
                hsp = hsp.clone()
            hsp = apply_control(hsp, self.control, "output")
            for patch in output_patches:
                h, hsp = patch(h, hsp, options)
            h = torch.cat([h, hsp], dim=1)
            del hsp
            output_shape = hs[-1].shape if hs else None
            h = forward_timestep_embed(module, h, emb, context, options, output_shape)
        return net.out(h.type(dtype))
