"""Encoder Feature Propagation for diffusers' ``UNet2DConditionModel``: the engine's host interface.

``DiffusersUNetHost.encode`` runs the time embedding, ``conv_in``, the down blocks and the mid block and
returns the skips (in the order the down path produces them) and the mid output; ``decode`` runs the up
blocks and ``conv_norm_out``/``conv_act``/``conv_out`` on those features at any (batched) timesteps. Both
follow ``UNet2DConditionModel.forward`` operation for operation, so encode-then-decode equals the native
forward and a run where every step is a key step is bit-identical to the unpatched U-Net.

Supported extras (batch-first, tiled by the engine for parallel decoding): ``class_labels``,
``timestep_cond`` and SDXL's ``text_embeds``/``time_ids`` (``added_cond_kwargs``). Attention masks,
ControlNet/T2I-Adapter residuals and GLIGEN are not supported (a clear error says so).

Usage::

    host = DiffusersUNetHost(unet)
    engine = EncoderPropagationEngine(plan, scheduler.timesteps.tolist(), parallel=True)
    eps = engine.predict(host, x, t.expand(x.shape[0]), ctx, step=StepMatch(i, True), cache_key="cfg")
"""

from __future__ import annotations

from typing import Any

import torch

from ..encoder_engine import EncoderFeatures

_SUPPORTED_EXTRAS = ("class_labels", "timestep_cond", "text_embeds", "time_ids")


class DiffusersUNetHost:
    """Adapts one ``UNet2DConditionModel`` to ``EncoderDecoderHost``."""

    def __init__(self, unet: torch.nn.Module):
        for name in ("conv_in", "down_blocks", "mid_block", "up_blocks", "conv_out", "time_embedding"):
            if not hasattr(unet, name):
                raise TypeError(
                    f"unet: {type(unet).__name__} is not a UNet2DConditionModel-like U-Net "
                    f"(no `{name}`); encoder propagation supports diffusers' UNet2DConditionModel"
                )
        if unet.mid_block is None:
            raise ValueError("unet: has no mid block; the encoder (down blocks + mid block) cannot be split off")
        if unet.config.addition_embed_type == "image_hint":
            raise ValueError("unet: addition_embed_type 'image_hint' changes the input channels; not supported")
        self.unet = unet

    def _embedding(self, sample: torch.Tensor, timesteps: torch.Tensor, context, extra: dict) -> torch.Tensor:
        unknown = set(extra) - set(_SUPPORTED_EXTRAS)
        if unknown:
            raise ValueError(
                f"encoder propagation (diffusers): unsupported U-Net inputs {sorted(unknown)}; "
                f"supported: {', '.join(_SUPPORTED_EXTRAS)}"
            )
        unet = self.unet
        emb = unet.time_embedding(unet.get_time_embed(sample=sample, timestep=timesteps), extra.get("timestep_cond"))
        class_emb = unet.get_class_embed(sample=sample, class_labels=extra.get("class_labels"))
        if class_emb is not None:
            emb = torch.cat([emb, class_emb], dim=-1) if unet.config.class_embeddings_concat else emb + class_emb
        added = {k: extra[k] for k in ("text_embeds", "time_ids") if extra.get(k) is not None}
        aug_emb = unet.get_aug_embed(emb=emb, encoder_hidden_states=context, added_cond_kwargs=added)
        emb = emb + aug_emb if aug_emb is not None else emb
        if unet.time_embed_act is not None:
            emb = unet.time_embed_act(emb)
        return emb

    def _context(self, context, extra: dict):
        added = {k: extra[k] for k in ("text_embeds", "time_ids") if extra.get(k) is not None}
        return self.unet.process_encoder_hidden_states(encoder_hidden_states=context, added_cond_kwargs=added)

    def encode(self, x: torch.Tensor, timesteps: torch.Tensor, context, **extra: Any) -> EncoderFeatures:
        sample = self._input(x)
        emb = self._embedding(sample, timesteps, context, extra)
        return self._encode_with(sample, emb, self._context(context, extra))

    def decode(self, features: EncoderFeatures, timesteps: torch.Tensor, context, **extra: Any) -> torch.Tensor:
        emb = self._embedding(features.middle, timesteps, context, extra)
        return self._decode_with(features, emb, self._context(context, extra))

    def full_forward(self, x: torch.Tensor, timesteps: torch.Tensor, context, *, capture: bool, **extra: Any):
        """Encode then decode with one time embedding and one context projection (the engine's optional fast path)."""
        sample = self._input(x)
        emb, context = self._embedding(sample, timesteps, context, extra), self._context(context, extra)
        features = self._encode_with(sample, emb, context)
        return self._decode_with(features, emb, context), features if capture else None

    def _input(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * x - 1.0 if self.unet.config.center_input_sample else x

    def _encode_with(self, sample: torch.Tensor, emb: torch.Tensor, context) -> EncoderFeatures:
        unet = self.unet
        input_size = tuple(sample.shape[-2:])
        sample = unet.conv_in(sample)
        skips = (sample,)
        for block in unet.down_blocks:
            if getattr(block, "has_cross_attention", False):
                sample, res = block(hidden_states=sample, temb=emb, encoder_hidden_states=context)
            else:
                sample, res = block(hidden_states=sample, temb=emb)
            skips += res
        if getattr(unet.mid_block, "has_cross_attention", False):
            sample = unet.mid_block(sample, emb, encoder_hidden_states=context)
        else:
            sample = unet.mid_block(sample, emb)
        return EncoderFeatures(skips=skips, middle=sample, meta={"input_size": input_size})

    def _decode_with(self, features: EncoderFeatures, emb: torch.Tensor, context) -> torch.Tensor:
        unet = self.unet
        sample = features.middle
        # The native forward passes explicit upsample sizes when the input is not a multiple of the total factor.
        factor = 2**unet.num_upsamplers
        forward_upsample_size = any(d % factor != 0 for d in features.meta.get("input_size", (0, 0)))
        skips, upsample_size = features.skips, None
        for i, block in enumerate(unet.up_blocks):
            res = skips[-len(block.resnets) :]
            skips = skips[: -len(block.resnets)]
            if i < len(unet.up_blocks) - 1 and forward_upsample_size:
                upsample_size = skips[-1].shape[2:]
            if getattr(block, "has_cross_attention", False):
                sample = block(
                    hidden_states=sample,
                    temb=emb,
                    res_hidden_states_tuple=res,
                    encoder_hidden_states=context,
                    upsample_size=upsample_size,
                )
            else:
                sample = block(hidden_states=sample, temb=emb, res_hidden_states_tuple=res, upsample_size=upsample_size)
        if unet.conv_norm_out:
            sample = unet.conv_act(unet.conv_norm_out(sample))
        return unet.conv_out(sample)
