"""Attention Map Reuse for diffusers models: an attention processor that routes every call through the engine.

``ReuseAttnProcessor`` does what diffusers' default ``AttnProcessor2_0`` does (same operations, same order)
and hands the scaled-dot-product step to ``AttentionReuseRun.attention``, so with no reuse step the output is
bit-identical to the unpatched model. ``FluxAttention`` layers (``FluxTransformer2DModel``) get
``ReuseFluxAttnProcessor`` instead, the same for diffusers' ``FluxAttnProcessor``: the joint text+image attention
after RoPE is one self-attention call of the engine. The host tells the adapter which sampling step the next U-Net call
belongs to, either directly (``set_step``) or from the timestep the U-Net is called with
(``track_timesteps``: the index of that value in the scheduler's timesteps, the diffusers analogue of
ComfyUI's sigma matching).

Usage::

    adapter = DiffusersAttentionReuse(unet, AttentionReuseConfig(mode="map"), schedule)
    with adapter:                      # installs the processors, restores the originals on exit
        for i, t in enumerate(scheduler.timesteps):
            adapter.set_step(i)
            eps = unet(x, t, encoder_hidden_states=ctx).sample
    print(adapter.run.summary())
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ..attention_engine import AttentionReuseConfig, AttentionReuseRun
from ..attention_math import from_heads
from ..schedules import ReuseSchedule


class ReuseAttnProcessor:
    """One attention layer's processor; ``owner`` holds the run and the current step."""

    def __init__(self, owner: DiffusersAttentionReuse, layer_key: str):
        self.owner = owner
        self.layer_key = layer_key

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        is_cross = encoder_hidden_states is not None
        batch_size, sequence_length, _ = hidden_states.shape if not is_cross else encoder_hidden_states.shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        inner_dim = key.shape[-1]
        head_dim = inner_dim // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        def fused() -> torch.Tensor:
            return F.scaled_dot_product_attention(
                query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False
            )

        hidden_states = self.owner.run.attention(
            fused,
            query,
            key,
            value,
            heads=attn.heads,
            step=self.owner.step,
            layer_key=self.layer_key,
            layout="bhnd",
            output_layout="bhnd",
            kind="cross" if is_cross else "self",
            mask=attention_mask,
        )
        hidden_states = from_heads(hidden_states, "bnc")
        hidden_states = hidden_states.to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


class ReuseFluxAttnProcessor(ReuseAttnProcessor):
    """``FluxAttnProcessor`` (diffusers' default for ``FluxAttention``) with the attention step through the engine."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        from diffusers.models.attention_dispatch import dispatch_attention_fn
        from diffusers.models.embeddings import apply_rotary_emb
        from diffusers.models.transformers.transformer_flux import _get_qkv_projections

        query, key, value, encoder_query, encoder_key, encoder_value = _get_qkv_projections(
            attn, hidden_states, encoder_hidden_states
        )
        query = attn.norm_q(query.unflatten(-1, (attn.heads, -1)))
        key = attn.norm_k(key.unflatten(-1, (attn.heads, -1)))
        value = value.unflatten(-1, (attn.heads, -1))
        if attn.added_kv_proj_dim is not None:
            encoder_query = attn.norm_added_q(encoder_query.unflatten(-1, (attn.heads, -1)))
            encoder_key = attn.norm_added_k(encoder_key.unflatten(-1, (attn.heads, -1)))
            encoder_value = encoder_value.unflatten(-1, (attn.heads, -1))
            query = torch.cat([encoder_query, query], dim=1)
            key = torch.cat([encoder_key, key], dim=1)
            value = torch.cat([encoder_value, value], dim=1)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)

        def fused() -> torch.Tensor:  # [B, N, H, D] in and out, as FluxAttnProcessor calls it; the engine wants bhnd
            return dispatch_attention_fn(query, key, value, attn_mask=attention_mask).transpose(1, 2)

        hidden_states = self.owner.run.attention(
            fused,
            query.transpose(1, 2),
            key.transpose(1, 2),
            value.transpose(1, 2),
            heads=attn.heads,
            step=self.owner.step,
            layer_key=self.layer_key,
            layout="bhnd",
            output_layout="bhnd",
            kind="self",  # text and image tokens attend jointly: queries and keys are the same sequence
            mask=attention_mask,
        )
        hidden_states = hidden_states.transpose(1, 2).flatten(2, 3).to(query.dtype)
        if encoder_hidden_states is None:
            return hidden_states
        text = encoder_hidden_states.shape[1]
        encoder_hidden_states, hidden_states = hidden_states.split_with_sizes(
            [text, hidden_states.shape[1] - text], dim=1
        )
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states.contiguous()))
        return hidden_states, attn.to_add_out(encoder_hidden_states.contiguous())


class DiffusersAttentionReuse:
    """Installs ``ReuseAttnProcessor`` on every attention layer of a diffusers model for one sampler run."""

    def __init__(self, model: torch.nn.Module, config: AttentionReuseConfig, schedule: ReuseSchedule):
        if not hasattr(model, "attn_processors") or not hasattr(model, "set_attn_processor"):
            raise TypeError(
                f"model: {type(model).__name__} has no diffusers attention processors "
                "(expected e.g. UNet2DConditionModel)"
            )
        self.model = model
        self.run = AttentionReuseRun(config, schedule)
        self.step: int | None = None
        self._original: dict | None = None
        self._timesteps: list[float] | None = None
        self._hook = None
        # By name: the timestep is the second positional argument of a U-Net but the fourth of a Flux transformer.
        self._forward_signature = inspect.signature(model.forward)

    def set_step(self, step: int | None) -> None:
        """The sampling step of the next U-Net call (None: an evaluation that is not a step's own)."""
        self.step = step

    def track_timesteps(self, timesteps: Sequence[float] | torch.Tensor) -> None:
        """Derive the step from the timestep each U-Net call receives (its index in ``timesteps``)."""
        self._timesteps = [float(t) for t in timesteps]

    def _pre_forward(self, module, args, kwargs):
        timestep = self._forward_signature.bind_partial(*args, **kwargs).arguments.get("timestep")
        t = torch.as_tensor(timestep).flatten()
        if t.numel() and bool((t == t[0]).all()) and float(t[0]) in self._timesteps:
            self.step = self._timesteps.index(float(t[0]))
        else:
            self.step = None  # mixed or unknown timesteps (e.g. a batched decoder): compute fresh

    def install(self) -> DiffusersAttentionReuse:
        if self._original is not None:
            raise RuntimeError("attention reuse is already installed on this model")
        self._original = dict(self.model.attn_processors)
        processors = {}
        for name, original in self._original.items():
            layer = name.removesuffix(".processor")
            flux = type(self.model.get_submodule(layer)).__name__ == "FluxAttention"
            if flux and type(original).__name__ != "FluxAttnProcessor":
                raise TypeError(
                    f"attention reuse: {layer} runs {type(original).__name__}; on Flux attention layers only "
                    "diffusers' default FluxAttnProcessor can be replaced (remove IP-Adapter/other processors first)"
                )
            processors[name] = (ReuseFluxAttnProcessor if flux else ReuseAttnProcessor)(self, layer)
        self.model.set_attn_processor(processors)
        if self._timesteps is not None:
            self._hook = self.model.register_forward_pre_hook(self._pre_forward, with_kwargs=True)
        return self

    def remove(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if self._original is not None:
            self.model.set_attn_processor(self._original)
            self._original = None
        self.run.reset()

    def __enter__(self) -> DiffusersAttentionReuse:
        return self.install()

    def __exit__(self, *exc) -> None:
        self.remove()
