"""Encoder Feature Propagation for diffusers' ``FluxTransformer2DModel``: the engine's host interface.

The transformer has no encoder/decoder shape; following Faster Diffusion's DiT form, the *encoder* is the first
``encoder_blocks`` blocks of the sequence double-stream blocks then single-stream blocks (default
``encoder_block_count(DIT_PAPER_ENCODER_FRACTION, depth)``, at least one block on each side), and the *decoder*
is the remaining blocks plus ``norm_out``/``proj_out``. ``encode`` returns the image hidden state after the split
as ``middle`` and the text hidden state there as ``streams["txt"]`` (diffusers' single-stream blocks also keep
the two streams apart between blocks, so the text state is needed wherever the split falls); ``decode`` runs the
remaining blocks with the time/pooled embedding recomputed from the decode timesteps, so a batch of several
steps' decoders gets each step's own embedding. Both follow ``FluxTransformer2DModel.forward`` operation for
operation, so encode-then-decode equals the native forward and a run where every step is a key step is
bit-identical to the unpatched model.

Call arguments are the transformer's own: ``x`` is the packed ``hidden_states`` ``[B, tokens, in_channels]``,
``timesteps`` the ``timestep`` ``[B]`` (sigma in [0, 1]; the model scales it by 1000), ``context`` the
``encoder_hidden_states``, and the extras ``pooled_projections`` (required), ``img_ids``/``txt_ids`` (required,
``[tokens, 3]``) and ``guidance`` (guidance-distilled models only). The rotary embedding is computed once at
encode time and carried in ``features.meta`` (positions do not change between the steps of a run; the engine's
cache key includes the latent shape), so ``decode`` ignores ``img_ids``/``txt_ids``. ControlNet residuals,
IP-Adapter image embeddings and ``joint_attention_kwargs`` are not supported (a clear error says so).

Usage::

    host = DiffusersFluxHost(transformer)
    engine = EncoderPropagationEngine(plan, sigmas[:-1].tolist(), parallel=True)
    v = engine.predict(host, packed, sigma.expand(b), text, step=StepMatch(i, True), cache_key="cfg",
                       pooled_projections=pooled, img_ids=img_ids, txt_ids=txt_ids)
"""

from __future__ import annotations

from typing import Any

import torch

from ..encoder_engine import DIT_PAPER_ENCODER_FRACTION, EncoderFeatures, encoder_block_count

_SUPPORTED_EXTRAS = ("pooled_projections", "img_ids", "txt_ids", "guidance")
_REQUIRED_MODULES = ("x_embedder", "time_text_embed", "context_embedder", "pos_embed", "transformer_blocks",
                     "single_transformer_blocks", "norm_out", "proj_out")  # fmt: skip


class DiffusersFluxHost:
    """Adapts one ``FluxTransformer2DModel`` to ``EncoderDecoderHost``."""

    def __init__(
        self,
        transformer: torch.nn.Module,
        encoder_blocks: int | None = None,
        encoder_fraction: float = DIT_PAPER_ENCODER_FRACTION,
    ):
        """``encoder_blocks``: how many leading blocks form the encoder; by default ``encoder_fraction`` of them."""
        for name in _REQUIRED_MODULES:
            if not hasattr(transformer, name):
                raise TypeError(
                    f"transformer: {type(transformer).__name__} is not a FluxTransformer2DModel-like transformer "
                    f"(no `{name}`); this host supports diffusers' FluxTransformer2DModel"
                )
        self.transformer = transformer
        self.blocks = [*transformer.transformer_blocks, *transformer.single_transformer_blocks]
        depth = len(self.blocks)
        if encoder_blocks is None:
            encoder_blocks = encoder_block_count(encoder_fraction, depth)
        if isinstance(encoder_blocks, bool) or not isinstance(encoder_blocks, int) or not 1 <= encoder_blocks < depth:
            raise ValueError(
                f"encoder_blocks: must be an integer from 1 to {depth - 1} (this transformer has {depth} blocks: "
                f"{len(transformer.transformer_blocks)} double + {len(transformer.single_transformer_blocks)} "
                f"single), got {encoder_blocks!r}"
            )
        self.encoder_blocks = encoder_blocks

    def _check_extra(self, extra: dict) -> None:
        unknown = set(extra) - set(_SUPPORTED_EXTRAS)
        if unknown:
            raise ValueError(
                f"encoder propagation (diffusers Flux): unsupported transformer inputs {sorted(unknown)}; "
                f"supported: {', '.join(_SUPPORTED_EXTRAS)}"
            )
        if extra.get("pooled_projections") is None:
            raise ValueError("pooled_projections: required (the Flux time/text embedding reads it)")

    def _temb(self, dtype: torch.dtype, timesteps: torch.Tensor, extra: dict) -> torch.Tensor:
        tf = self.transformer
        timestep = timesteps.to(dtype) * 1000
        guidance = extra.get("guidance")
        if guidance is None:
            return tf.time_text_embed(timestep, extra["pooled_projections"])
        return tf.time_text_embed(timestep, guidance.to(dtype) * 1000, extra["pooled_projections"])

    def _rotary(self, extra: dict):
        txt_ids, img_ids = extra.get("txt_ids"), extra.get("img_ids")
        if txt_ids is None or img_ids is None:
            raise ValueError("img_ids and txt_ids: required ([tokens, 3] position ids, as the Flux pipeline makes)")
        # The model accepts the deprecated batched [1, tokens, 3] ids the same way.
        txt_ids = txt_ids[0] if txt_ids.ndim == 3 else txt_ids
        img_ids = img_ids[0] if img_ids.ndim == 3 else img_ids
        return self.transformer.pos_embed(torch.cat((txt_ids, img_ids), dim=0))

    def _run(self, blocks, hidden, txt, temb, rotary):
        for block in blocks:
            txt, hidden = block(
                hidden_states=hidden,
                encoder_hidden_states=txt,
                temb=temb,
                image_rotary_emb=rotary,
                joint_attention_kwargs=None,
            )
        return hidden, txt

    def _encode_with(self, hidden: torch.Tensor, context: torch.Tensor, temb: torch.Tensor, rotary) -> EncoderFeatures:
        if context is None:
            raise ValueError("context: Flux needs encoder_hidden_states (text tokens), got None")
        txt = self.transformer.context_embedder(context)
        hidden, txt = self._run(self.blocks[: self.encoder_blocks], hidden, txt, temb, rotary)
        return EncoderFeatures(skips=(), middle=hidden, streams={"txt": txt}, meta={"rotary": rotary})

    def _decode_with(self, features: EncoderFeatures, temb: torch.Tensor) -> torch.Tensor:
        tf = self.transformer
        hidden, _ = self._run(
            self.blocks[self.encoder_blocks :], features.middle, features.streams["txt"], temb, features.meta["rotary"]
        )
        return tf.proj_out(tf.norm_out(hidden, temb))

    def encode(self, x: torch.Tensor, timesteps: torch.Tensor, context, **extra: Any) -> EncoderFeatures:
        self._check_extra(extra)
        hidden = self.transformer.x_embedder(x)
        return self._encode_with(hidden, context, self._temb(hidden.dtype, timesteps, extra), self._rotary(extra))

    def decode(self, features: EncoderFeatures, timesteps: torch.Tensor, context, **extra: Any) -> torch.Tensor:
        self._check_extra(extra)
        return self._decode_with(features, self._temb(features.middle.dtype, timesteps, extra))

    def full_forward(self, x: torch.Tensor, timesteps: torch.Tensor, context, *, capture: bool, **extra: Any):
        """Encode then decode with one time embedding and one rotary embedding (the engine's optional fast path)."""
        self._check_extra(extra)
        hidden = self.transformer.x_embedder(x)
        temb = self._temb(hidden.dtype, timesteps, extra)
        features = self._encode_with(hidden, context, temb, self._rotary(extra))
        return self._decode_with(features, temb), features if capture else None
