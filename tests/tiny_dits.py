"""Tiny real DiTs of the families people run, built from ComfyUI's own classes (no checkpoint, no download).

Each builder makes ``comfy.supported_models.<Config>(unet_config)`` + ``comfy.model_base.<Class>`` from a small
config of our own (hidden sizes ~64, 1-2 blocks, fp32), initialises the weights (ComfyUI leaves them
``torch.empty``), wraps the model in a CPU ``ModelPatcher``, and returns a ``TinyDiT``: the patcher, positive and
negative CONDITIONING shaped as each family's ``extra_conds`` reads them, and an empty latent of the family's
latent shape. The configs follow what ``comfy.model_detection`` derives from a real checkpoint, scaled down.

A family that the running ComfyUI does not have skips the test with the version and the family
(``pytest.skip("Flux.2 is not in ComfyUI 0.3.64")``). Keyword arguments a version does not know are dropped
(checked against the constructor / params dataclass), so one config works on every tested version.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from typing import NamedTuple

import comfy_harness as h
import pytest
import torch

CPU = torch.device("cpu")
TEXT_TOKENS = 8


class TinyDiT(NamedTuple):
    patcher: object
    positive: list
    negative: list
    latent: torch.Tensor


@dataclasses.dataclass(frozen=True)
class Family:
    label: str  # what people call it ("Flux.2"), used in skip reasons
    build: Callable[[int], TinyDiT]
    diffusion_model: str  # class name of the diffusion model (the name the pack matches)


def _require(label: str, *names: str, module=None) -> None:
    """Skip unless every ``names`` is an attribute of ``module`` (default ``comfy.model_base``)."""
    import comfy.model_base

    module = module or comfy.model_base
    missing = [n for n in names if not hasattr(module, n)]
    if missing:
        pytest.skip(f"{label} is not in ComfyUI {h.running_version()} (no {module.__name__}.{missing[0]})")


def _known(target, config: dict) -> dict:
    """``config`` without the keys ``target`` (a params dataclass or a constructor) does not take here."""
    if dataclasses.is_dataclass(target):
        names = {f.name for f in dataclasses.fields(target)}
    else:
        params = inspect.signature(target).parameters
        if any(p.kind is p.VAR_KEYWORD for p in params.values()):
            return dict(config)
        names = set(params)
    return {k: v for k, v in config.items() if k in names or k == "image_model"}


def init_weights(model: torch.nn.Module, seed: int, std: float = 0.1) -> None:
    """``comfy_harness._init_weights``, then random matrices for the modulation linears it set to 1.0.

    ``_init_weights`` fills every ``*norm*.weight`` with 1 (right for norm scales); DiTs also name adaLN
    projections ``norm1.linear.weight`` / ``norm_out.linear.weight``: all-ones matrices there would blow the
    modulation up, so weights of two or more dimensions get random values like every other linear.
    """
    h._init_weights(model, seed, std)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name and name.endswith("weight") and param.ndim >= 2:
                param.copy_(torch.randn(param.shape, generator=gen) * std)


def _patcher(config_cls, model_cls, unet: dict, seed: int, std: float = 0.1, **model_kwargs):
    import comfy.model_patcher

    config = config_cls(unet)
    config.unet_config.update(unet)  # over the config class's unet_extra_config (real checkpoint sizes)
    config.set_inference_dtype(torch.float32, None)
    model = model_cls(config, device=CPU, **model_kwargs)
    init_weights(model, seed, std)
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=CPU, offload_device=CPU)
    return h.sharpen_attention(patcher)


def _conds(seed: int, dim: int, tokens: int = TEXT_TOKENS, **extra) -> tuple[list, list]:
    """(positive, negative): text embeddings [1, tokens, dim] plus ``extra`` (callables are made per cond)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for scale in (1.0, 0.5):
        fields = {k: (v(gen) if callable(v) else v) for k, v in extra.items()}
        out.append([[torch.randn(1, tokens, dim, generator=gen) * scale, fields]])
    return out[0], out[1]


def _pooled(dim: int):
    return lambda gen: torch.randn(1, dim, generator=gen)


def _text_mask(padding: int = 2) -> torch.Tensor:
    """A text encoder's integer attention mask [1, tokens]: 1 = token, 0 = padding at the end."""
    mask = torch.ones(1, TEXT_TOKENS, dtype=torch.long)
    mask[:, TEXT_TOKENS - padding :] = 0
    return mask


# --- Flux family -------------------------------------------------------------------------------------------


def _flux_unet(**overrides) -> dict:
    from comfy.ldm.flux.model import FluxParams

    unet = dict(
        image_model="flux",
        in_channels=16,
        out_channels=16,
        vec_in_dim=32,
        context_in_dim=32,
        hidden_size=64,
        mlp_ratio=2.0,
        num_heads=2,
        depth=1,
        depth_single_blocks=2,  # 3 blocks: Encoder Feature Propagation can split in either kind
        axes_dim=[8, 12, 12],
        theta=10000,
        patch_size=2,
        qkv_bias=True,
        guidance_embed=False,
        txt_ids_dims=[],  # v0.33+: which txt_ids axes carry positions (none for Flux.1)
    )
    unet.update(overrides)
    return _known(FluxParams, unet)


def flux(seed: int = 0) -> TinyDiT:
    """Flux.1 (dev-style: guidance embedding, CLIP pooled vector)."""
    import comfy.model_base
    import comfy.supported_models

    unet = _flux_unet(guidance_embed=True)
    patcher = _patcher(comfy.supported_models.Flux, comfy.model_base.Flux, unet, seed)
    positive, negative = _conds(seed, 32, pooled_output=_pooled(32), guidance=3.5)
    return TinyDiT(patcher, positive, negative, torch.zeros(1, 16, 8, 8))


def flux2(seed: int = 0) -> TinyDiT:
    """Flux.2 (global modulation, SiLU MLP, no biases, 128-channel latent at patch 1, 4 rope axes)."""
    import comfy.model_base
    import comfy.supported_models

    _require("Flux.2", "Flux2")
    unet = _flux_unet(
        image_model="flux2",
        in_channels=128,
        out_channels=128,
        vec_in_dim=None,
        axes_dim=[8, 8, 8, 8],
        theta=2000,
        patch_size=1,
        qkv_bias=False,
        global_modulation=True,
        mlp_silu_act=True,
        ops_bias=False,
        default_ref_method="index",
        ref_index_scale=10.0,
        txt_ids_dims=[3],
    )
    patcher = _patcher(comfy.supported_models.Flux2, comfy.model_base.Flux2, unet, seed)
    # Flux2.extra_conds pads the text to 512 tokens (as the real text encoder output is).
    positive, negative = _conds(seed, 32, guidance=4.0)
    return TinyDiT(patcher, positive, negative, torch.zeros(1, 128, 4, 4))


def chroma(seed: int = 0) -> TinyDiT:
    """Chroma (Flux-schnell derived: no vector_in, distilled guidance approximator feeding every block)."""
    import comfy.model_base
    import comfy.supported_models
    from comfy.ldm.chroma.model import ChromaParams

    unet = dict(
        image_model="chroma",
        in_channels=64,
        out_channels=64,
        context_in_dim=32,
        hidden_size=64,
        mlp_ratio=2.0,
        num_heads=2,
        depth=1,
        depth_single_blocks=2,  # 3 blocks: Encoder Feature Propagation can split in either kind
        axes_dim=[8, 12, 12],
        theta=10000,
        patch_size=2,
        qkv_bias=True,
        in_dim=64,
        out_dim=64,
        hidden_dim=64,
        n_layers=1,
        txt_ids_dims=[],
        vec_in_dim=None,
    )
    patcher = _patcher(comfy.supported_models.Chroma, comfy.model_base.Chroma, _known(ChromaParams, unet), seed)
    # 0.3.64's Flux.encode_adm reads pooled_output unconditionally (Chroma itself ignores it).
    positive, negative = _conds(seed, 32, pooled_output=_pooled(32))
    return TinyDiT(patcher, positive, negative, torch.zeros(1, 16, 8, 8))


# --- SD3 / SD3.5 (MMDiT) -----------------------------------------------------------------------------------


def _mmdit(seed: int, **overrides) -> TinyDiT:
    import comfy.model_base
    import comfy.supported_models

    unet = dict(
        in_channels=16,
        out_channels=16,
        patch_size=2,
        depth=2,  # hidden size 64 * depth, depth heads
        adm_in_channels=32,
        input_size=None,
        context_embedder_config={"target": "torch.nn.Linear", "params": {"in_features": 32, "out_features": 128}},
        pos_embed_max_size=16,
        num_patches=256,
        pos_embed_scaling_factor=None,
    )
    unet.update(overrides)
    patcher = _patcher(comfy.supported_models.SD3, comfy.model_base.SD3, unet, seed)
    positive, negative = _conds(seed, 32, pooled_output=_pooled(32))
    return TinyDiT(patcher, positive, negative, torch.zeros(1, 16, 8, 8))


def sd3(seed: int = 0) -> TinyDiT:
    """SD3 Medium (MMDiT, joint attention)."""
    return _mmdit(seed)


def sd35(seed: int = 0) -> TinyDiT:
    """SD3.5 Medium (MMDiT-X: RMS q/k norm, an extra image self-attention in the first block)."""
    return _mmdit(seed, qk_norm="rms", x_block_self_attn=True, x_block_self_attn_layers=[0])


# --- Lumina 2 / Z-Image (NextDiT) --------------------------------------------------------------------------


def _nextdit(seed: int, config_cls, unet: dict, pad: bool = False) -> TinyDiT:
    import comfy.model_base
    from comfy.ldm.lumina.model import NextDiT

    patcher = _patcher(config_cls, comfy.model_base.Lumina2, _known(NextDiT.__init__, unet), seed)
    # The text encoder's attention mask, 0.3.64 reads num_tokens only from it. Without padding: 0.3.64's own
    # sub-quadratic attention cannot broadcast a padded mask over a CFG batch (fails unpatched).
    positive, negative = _conds(seed, unet["cap_feat_dim"], attention_mask=_text_mask(padding=0))
    return TinyDiT(patcher, positive, negative, torch.zeros(1, 16, 8, 8))


def lumina2(seed: int = 0) -> TinyDiT:
    """Lumina Image 2.0 (NextDiT with grouped-query attention: 4 query heads, 2 key/value heads)."""
    import comfy.supported_models

    unet = dict(
        image_model="lumina2",
        patch_size=2,
        in_channels=16,
        dim=64,
        cap_feat_dim=32,
        n_layers=2,
        n_refiner_layers=1,
        n_heads=4,
        n_kv_heads=2,
        qk_norm=True,
        axes_dims=[4, 6, 6],
        axes_lens=[300, 512, 512],
        rope_theta=10000.0,
        ffn_dim_multiplier=4.0,
        multiple_of=16,
    )
    return _nextdit(seed, comfy.supported_models.Lumina2, unet)


def zimage(seed: int = 0) -> TinyDiT:
    """Z-Image (NextDiT with Z-Image modulation (needs dim >= 256), token padding to a multiple of 32)."""
    import comfy.supported_models

    _require("Z-Image", "ZImage", module=comfy.supported_models)
    unet = dict(
        image_model="lumina2",
        patch_size=2,
        in_channels=16,
        dim=256,
        cap_feat_dim=32,
        n_layers=2,
        n_refiner_layers=1,
        n_heads=4,
        n_kv_heads=4,
        qk_norm=True,
        axes_dims=[16, 24, 24],
        axes_lens=[1536, 512, 512],
        rope_theta=256.0,
        ffn_dim_multiplier=8.0 / 3.0,
        multiple_of=16,
        z_image_modulation=True,
        time_scale=1000.0,
        pad_tokens_multiple=32,
    )
    return _nextdit(seed, comfy.supported_models.ZImage, unet)


# --- Qwen-Image / MageFlow ---------------------------------------------------------------------------------


def qwen_image(seed: int = 0) -> TinyDiT:
    """Qwen-Image (dual-stream MMDiT, 5-D Wan 2.1 latent with one frame)."""
    import comfy.model_base
    import comfy.supported_models
    from comfy.ldm.qwen_image.model import QwenImageTransformer2DModel

    unet = dict(
        image_model="qwen_image",
        patch_size=2,
        in_channels=64,
        out_channels=16,
        num_layers=2,
        attention_head_dim=32,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        axes_dims_rope=(8, 12, 12),
    )
    unet = _known(QwenImageTransformer2DModel.__init__, unet)
    patcher = _patcher(comfy.supported_models.QwenImage, comfy.model_base.QwenImage, unet, seed)
    positive, negative = _conds(seed, 32)
    return TinyDiT(patcher, positive, negative, torch.zeros(1, 16, 1, 8, 8))


def mage_flow(seed: int = 0) -> TinyDiT:
    """MageFlow (Qwen-Image transformer blocks on a 128-channel Flux.2 latent at patch 1)."""
    import comfy.model_base
    import comfy.supported_models

    _require("MageFlow", "MageFlow")
    unet = dict(
        image_model="mage_flow",
        in_channels=128,
        out_channels=128,
        num_layers=2,
        attention_head_dim=32,
        num_attention_heads=2,
        joint_attention_dim=32,
        axes_dims_rope=(8, 12, 12),
    )
    patcher = _patcher(comfy.supported_models.MageFlow, comfy.model_base.MageFlow, unet, seed)
    positive, negative = _conds(seed, 32)
    return TinyDiT(patcher, positive, negative, torch.zeros(1, 128, 4, 4))


# --- Wan 2.1 / 2.2 -----------------------------------------------------------------------------------------


def _wan_unet(**overrides) -> dict:
    unet = dict(
        image_model="wan2.1",
        model_type="t2v",
        patch_size=(1, 2, 2),
        text_len=16,
        in_dim=16,
        dim=64,
        ffn_dim=128,
        freq_dim=64,
        text_dim=32,
        out_dim=16,
        num_heads=2,
        num_layers=2,
        window_size=(-1, -1),
        qk_norm=True,
        cross_attn_norm=True,
        eps=1e-6,
    )
    unet.update(overrides)
    return unet


def wan21(seed: int = 0) -> TinyDiT:
    """Wan 2.1 text-to-video (3 latent frames: self-attention over space-time, cross-attention to the text)."""
    import comfy.model_base
    import comfy.supported_models

    patcher = _patcher(comfy.supported_models.WAN21_T2V, comfy.model_base.WAN21, _wan_unet(), seed)
    positive, negative = _conds(seed, 32)
    return TinyDiT(patcher, positive, negative, torch.zeros(1, 16, 3, 8, 8))


def wan22(seed: int = 0) -> TinyDiT:
    """Wan 2.2 TI2V-5B style (48-channel Wan 2.2 latent, per-token timesteps)."""
    import comfy.model_base
    import comfy.supported_models

    unet = _wan_unet(in_dim=48, out_dim=48)
    patcher = _patcher(comfy.supported_models.WAN22_T2V, comfy.model_base.WAN22, unet, seed, image_to_video=True)
    positive, negative = _conds(seed, 32)
    return TinyDiT(patcher, positive, negative, torch.zeros(1, 48, 3, 8, 8))


# --- HunyuanVideo 1.0 / 1.5 --------------------------------------------------------------------------------


def _hunyuan_unet(**overrides) -> dict:
    from comfy.ldm.hunyuan_video.model import HunyuanVideoParams

    unet = dict(
        image_model="hunyuan_video",
        in_channels=16,
        out_channels=16,
        vec_in_dim=32,
        context_in_dim=32,
        hidden_size=64,
        mlp_ratio=2.0,
        num_heads=2,
        depth=1,
        depth_single_blocks=2,  # 3 blocks: Encoder Feature Propagation can split in either kind
        axes_dim=[8, 12, 12],
        theta=256,
        patch_size=[1, 2, 2],
        qkv_bias=True,
        guidance_embed=True,
        byt5=False,
        meanflow=False,
        use_cond_type_embedding=False,
        vision_in_dim=None,
        meanflow_sum=False,
    )
    unet.update(overrides)
    return _known(HunyuanVideoParams, unet)


def hunyuan_video(seed: int = 0) -> TinyDiT:
    """HunyuanVideo 1.0 (token refiner + double/single stream blocks, 3 latent frames)."""
    import comfy.model_base
    import comfy.supported_models

    patcher = _patcher(comfy.supported_models.HunyuanVideo, comfy.model_base.HunyuanVideo, _hunyuan_unet(), seed)
    positive, negative = _conds(seed, 32, pooled_output=_pooled(32), guidance=6.0)
    return TinyDiT(patcher, positive, negative, torch.zeros(1, 16, 3, 8, 8))


def hunyuan_video15(seed: int = 0) -> TinyDiT:
    """HunyuanVideo 1.5 (32-channel latent + image/mask concat, cond-type embedding, vision projection)."""
    import comfy.model_base
    import comfy.supported_models

    _require("HunyuanVideo 1.5", "HunyuanVideo15")
    unet = _hunyuan_unet(
        in_channels=65,  # noise 32 + image condition 32 + mask 1
        out_channels=32,
        vec_in_dim=None,
        guidance_embed=False,
        use_cond_type_embedding=True,
        vision_in_dim=32,
    )
    patcher = _patcher(comfy.supported_models.HunyuanVideo15, comfy.model_base.HunyuanVideo15, unet, seed)
    # HunyuanVideo.encode_adm reads pooled_output unconditionally (1.5 has no vector_in: it is unused).
    positive, negative = _conds(seed, 32, pooled_output=_pooled(32))
    return TinyDiT(patcher, positive, negative, torch.zeros(1, 32, 3, 8, 8))


# --- LTX-Video ---------------------------------------------------------------------------------------------


def ltxv(seed: int = 0) -> TinyDiT:
    """LTX-Video (one token per latent pixel, integer text attention mask with padding)."""
    import comfy.model_base
    import comfy.supported_models

    unet = dict(
        image_model="ltxv",
        in_channels=128,
        cross_attention_dim=64,
        attention_head_dim=32,
        num_attention_heads=2,
        caption_channels=32,
        num_layers=2,
    )
    patcher = _patcher(comfy.supported_models.LTXV, comfy.model_base.LTXV, unet, seed)
    positive, negative = _conds(seed, 32, attention_mask=_text_mask(), frame_rate=25)
    return TinyDiT(patcher, positive, negative, torch.zeros(1, 128, 2, 4, 4))


# --- Families new in v0.33 ---------------------------------------------------------------------------------


def kandinsky5(seed: int = 0) -> TinyDiT:
    """Kandinsky 5 video (text encoder blocks, visual blocks with self- and cross-attention, 3 latent frames)."""
    import comfy.model_base
    import comfy.supported_models

    _require("Kandinsky 5", "Kandinsky5")
    unet = dict(
        image_model="kandinsky5",
        in_visual_dim=16,
        out_visual_dim=16,
        in_text_dim=32,
        in_text_dim2=32,
        time_dim=32,
        model_dim=64,
        ff_dim=128,
        visual_embed_dim=33 * 4,  # (latent 16 + image condition 16 + mask 1 (concat_cond)) x 2x2 patch
        patch_size=(1, 2, 2),
        num_text_blocks=1,
        num_visual_blocks=2,
        axes_dims=(8, 12, 12),
    )
    patcher = _patcher(comfy.supported_models.Kandinsky5, comfy.model_base.Kandinsky5, unet, seed)
    positive, negative = _conds(seed, 32, pooled_output=_pooled(32))
    return TinyDiT(patcher, positive, negative, torch.zeros(1, 16, 3, 8, 8))


def cogvideox(seed: int = 0) -> TinyDiT:
    """CogVideoX 5B style (joint text+video attention, 3-D rotary embedding, v-prediction)."""
    import comfy.model_base
    import comfy.supported_models

    _require("CogVideoX", "CogVideoX")
    unet = dict(
        image_model="cogvideox",
        num_attention_heads=2,
        attention_head_dim=32,
        in_channels=16,
        out_channels=16,
        time_embed_dim=32,
        text_embed_dim=32,
        num_layers=2,
        sample_width=8,
        sample_height=8,
        sample_frames=9,
        max_text_seq_length=TEXT_TOKENS,
        use_rotary_positional_embeddings=True,
        use_learned_positional_embeddings=False,
    )
    patcher = _patcher(comfy.supported_models.CogVideoX_T2V, comfy.model_base.CogVideoX, unet, seed)
    positive, negative = _conds(seed, 32)
    return TinyDiT(patcher, positive, negative, torch.zeros(1, 16, 3, 8, 8))


def lens(seed: int = 0) -> TinyDiT:
    """Microsoft Lens (dual-stream MMDiT over multi-layer text features, 128-channel Flux.2 latent)."""
    import comfy.model_base
    import comfy.supported_models

    _require("Lens", "Lens")
    unet = dict(
        image_model="lens",
        in_channels=128,
        out_channels=32,
        num_layers=2,
        attention_head_dim=32,
        num_attention_heads=2,
        enc_hidden_dim=16,
        axes_dims_rope=(8, 12, 12),
        multi_layer_encoder_feature=True,
        selected_layer_index=(0, 1),
    )
    patcher = _patcher(comfy.supported_models.Lens, comfy.model_base.Lens, unet, seed)
    positive, negative = _conds(seed, 32)  # two text-encoder layers of 16 features each
    return TinyDiT(patcher, positive, negative, torch.zeros(1, 128, 4, 4))


def krea2(seed: int = 0) -> TinyDiT:
    """Krea 2 (single-stream DiT; a text-fusion transformer attends across the text encoder's layers first)."""
    import comfy.model_base
    import comfy.supported_models

    _require("Krea 2", "Krea2")
    unet = dict(
        image_model="krea2",
        features=64,
        tdim=32,
        txtdim=32,
        heads=2,
        kvheads=1,  # grouped-query attention (Krea 2 repeats the K/V heads before the attention call)
        multiplier=2,
        layers=2,
        patch=2,
        channels=16,
        txtlayers=2,
        txtheads=2,
        txtkvheads=2,
    )
    patcher = _patcher(comfy.supported_models.Krea2, comfy.model_base.Krea2, unet, seed)
    positive, negative = _conds(seed, 2 * 32)  # two text-encoder layers of 32 features, concatenated
    return TinyDiT(patcher, positive, negative, torch.zeros(1, 16, 1, 8, 8))


def joyimage(seed: int = 0) -> TinyDiT:
    """JoyImage (dual-stream MMDiT over a 5-D Wan 2.1 latent, joint attention)."""
    import comfy.model_base
    import comfy.supported_models

    _require("JoyImage", "JoyImage")
    unet = dict(
        image_model="joyimage",
        patch_size=[1, 2, 2],
        in_channels=16,
        out_channels=16,
        hidden_size=64,
        num_attention_heads=2,
        text_dim=32,
        mlp_width_ratio=2.0,
        num_layers=2,
        rope_dim_list=[8, 12, 12],
        theta=10000,
    )
    patcher = _patcher(comfy.supported_models.JoyImage, comfy.model_base.JoyImage, unet, seed)
    positive, negative = _conds(seed, 32)
    return TinyDiT(patcher, positive, negative, torch.zeros(1, 16, 1, 8, 8))


def ideogram4(seed: int = 0) -> TinyDiT:
    """Ideogram 4 (single-stream DiT over packed [text, image] tokens, multimodal RoPE, 128-channel latent)."""
    import comfy.model_base
    import comfy.supported_models

    _require("Ideogram 4", "Ideogram4")
    unet = dict(
        image_model="ideogram4",
        in_channels=128,
        num_layers=2,
        num_attention_heads=2,
        attention_head_dim=32,
        intermediate_size=128,
        adaln_dim=32,
        llm_features_dim=32,
        rope_theta=10000,
        mrope_section=[6, 5, 5],
        norm_eps=1e-5,
    )
    patcher = _patcher(comfy.supported_models.Ideogram4, comfy.model_base.Ideogram4, unet, seed)
    positive, negative = _conds(seed, 32)
    return TinyDiT(patcher, positive, negative, torch.zeros(1, 128, 4, 4))


def boogu(seed: int = 0) -> TinyDiT:
    """Boogu (OmniGen2-style refiners + double/single stream blocks, grouped-query attention via enable_gqa)."""
    import comfy.model_base
    import comfy.supported_models

    _require("Boogu", "Boogu")
    unet = dict(
        image_model="boogu",
        patch_size=2,
        in_channels=16,
        hidden_size=64,
        num_layers=1,
        num_double_stream_layers=1,
        num_refiner_layers=1,
        num_attention_heads=4,
        num_kv_heads=2,  # fewer K/V heads: the attention call carries enable_gqa=True
        multiple_of=16,
        axes_dim_rope=(4, 6, 6),
        axes_lens=(300, 512, 512),
        instruction_feat_dim=32,
    )
    patcher = _patcher(comfy.supported_models.Boogu, comfy.model_base.Boogu, unet, seed)
    positive, negative = _conds(seed, 32, attention_mask=_text_mask(padding=0))  # num_tokens comes from it
    return TinyDiT(patcher, positive, negative, torch.zeros(1, 16, 8, 8))


def ernie_image(seed: int = 0) -> TinyDiT:
    """ERNIE-Image: its attention calls ComfyUI's optimized_attention without transformer_options (unhookable)."""
    import comfy.model_base
    import comfy.supported_models

    _require("ERNIE-Image", "ErnieImage")
    unet = dict(
        image_model="ernie",
        hidden_size=64,
        num_attention_heads=2,
        num_layers=1,
        ffn_hidden_size=128,
        in_channels=128,
        out_channels=128,
        text_in_dim=32,
        rope_axes_dim=(8, 12, 12),
    )
    patcher = _patcher(comfy.supported_models.ErnieImage, comfy.model_base.ErnieImage, unet, seed)
    positive, negative = _conds(seed, 32)
    return TinyDiT(patcher, positive, negative, torch.zeros(1, 128, 4, 4))


# Families whose attention goes through ComfyUI's attention hook: Attention Map Reuse supports them.
FAMILIES = {
    "flux": Family("Flux.1", flux, "Flux"),
    "flux2": Family("Flux.2", flux2, "Flux"),
    "chroma": Family("Chroma", chroma, "Chroma"),
    "sd3": Family("SD3", sd3, "OpenAISignatureMMDITWrapper"),
    "sd35": Family("SD3.5", sd35, "OpenAISignatureMMDITWrapper"),
    "lumina2": Family("Lumina 2", lumina2, "NextDiT"),
    "zimage": Family("Z-Image", zimage, "NextDiT"),
    "qwen_image": Family("Qwen-Image", qwen_image, "QwenImageTransformer2DModel"),
    "wan21": Family("Wan 2.1", wan21, "WanModel"),
    "wan22": Family("Wan 2.2", wan22, "WanModel"),
    "hunyuan_video": Family("HunyuanVideo 1.0", hunyuan_video, "HunyuanVideo"),
    "hunyuan_video15": Family("HunyuanVideo 1.5", hunyuan_video15, "HunyuanVideo"),
    "ltxv": Family("LTX-Video", ltxv, "LTXVModel"),
    "kandinsky5": Family("Kandinsky 5", kandinsky5, "Kandinsky5"),
    "cogvideox": Family("CogVideoX", cogvideox, "CogVideoXTransformer3DModel"),
    "lens": Family("Lens", lens, "LensTransformer2DModel"),
    "mage_flow": Family("MageFlow", mage_flow, "MageFlowTransformer2DModel"),
    "krea2": Family("Krea 2", krea2, "SingleStreamDiT"),
    "joyimage": Family("JoyImage", joyimage, "JoyImageTransformer3DModel"),
    "ideogram4": Family("Ideogram 4", ideogram4, "Ideogram4Transformer2DModel"),
    "boogu": Family("Boogu", boogu, "BooguTransformer2DModel"),
}

# Families whose attention does not go through the hook: the pack refuses them, naming the class.
REFUSED = {
    "ernie_image": Family("ERNIE-Image", ernie_image, "ErnieImageModel"),
}


def build(name: str, seed: int = 0) -> TinyDiT:
    family = FAMILIES.get(name) or REFUSED[name]
    return family.build(seed)


def sample(dit: TinyDiT, model, steps: int = 6, **kwargs) -> torch.Tensor:
    """``model`` (``dit``'s patcher or a patched clone) sampled on ``dit``'s latent and conditioning, cfg 3."""
    return h.sample(
        model, steps=steps, cfg=3.0, latent=dit.latent.clone(), positive=dit.positive, negative=dit.negative, **kwargs
    )


class References:
    """Per family: the tiny model and its unpatched output, built on first use (a test module's fixture)."""

    def __init__(self, steps: int):
        self.steps = steps
        self.cache: dict[str, tuple[TinyDiT, torch.Tensor]] = {}

    def __call__(self, name: str) -> tuple[TinyDiT, torch.Tensor]:
        if name not in self.cache:
            dit = build(name)
            self.cache[name] = dit, sample(dit, dit.patcher, self.steps)
        return self.cache[name]
