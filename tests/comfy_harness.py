"""Real-ComfyUI test harness: tiny real models and sampling helpers on ComfyUI imported by
``reuse_bench.comfyui_env`` (which says where ComfyUI is looked up)."""

from __future__ import annotations

import os

from reuse_bench.comfyui_env import REPO_DIR as PACK_DIR
from reuse_bench.comfyui_env import comfyui_version, find_comfyui, import_comfy, load_pack

__all__ = ["PACK_DIR", "comfyui_version", "find_comfyui", "import_comfy", "load_pack"]


def pack_families():
    """The pack's ``nodes/families.py`` (it imports nothing), loaded by path: ``import nodes.families`` would put this
    repository's ``nodes`` package in place of ComfyUI's ``nodes`` module for the rest of the session."""
    import importlib.util
    import sys

    name = "comfyui_reuse_families"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, PACK_DIR / "nodes" / "families.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up while the file runs
        spec.loader.exec_module(module)
    return sys.modules[name]


def comfyui_unavailable_reason() -> str | None:
    """Why real ComfyUI cannot be used here, or None. Under ``CI=true`` the tests fail on it instead of skipping."""
    try:
        import_comfy()  # raises FileNotFoundError, naming where it looked, when there is no ComfyUI
    except Exception as exc:  # surfaced as the skip/failure reason, never swallowed silently
        where = f" (COMFYUI_PATH={os.environ['COMFYUI_PATH']})" if os.environ.get("COMFYUI_PATH") else ""
        return f"real ComfyUI unusable{where}: {type(exc).__name__}: {exc}"
    return None


def running_version() -> str:
    """The version of the ComfyUI the tests run against, for skip reasons (e.g. "0.3.64")."""
    return comfyui_version(find_comfyui())


# Why the bench's own tests skip in the newer versions' environments (scripts/test.sh runs them in the oldest's).
NOT_IN_THIS_ENVIRONMENT = (
    "not installed here: the bench and its dependencies live in the oldest tested ComfyUI's environment "
    "(requirements/bench.txt; diffusers 0.39 needs huggingface_hub<1, which ComfyUI 0.33's transformers 5 refuses)"
)


def require_comfyui(reason: str | None) -> None:
    """Skip with ``reason`` where real ComfyUI (or its server or browser) is unusable; under ``CI=true`` that is a
    failure, never a skip: CI must prove the integration on every tested version."""
    import pytest

    if reason is None:
        return
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI=true: {reason}", pytrace=False)
    pytest.skip(reason)


def pack_node(name: str):
    """A node class from the pack, e.g. ``pack_node("AttentionMapReuse")``."""
    import asyncio

    extension = asyncio.run(load_pack().comfy_entrypoint())
    for node in asyncio.run(extension.get_node_list()):
        if node.define_schema().node_id == name:
            return node
    raise KeyError(name)


def node_inputs(node, **overrides) -> dict:
    """Every widget input of ``node`` at its schema default, with ``overrides`` (an unknown name is an error)."""
    values = {i.id: i.default for i in node.define_schema().inputs if i.id != "model"}
    unknown = set(overrides) - set(values)
    if unknown:
        raise KeyError(f"{node.__name__} has no inputs {sorted(unknown)}")
    return {**values, **overrides}


def sharpen_attention(patcher, factor=10.0):
    """The tiny test nets start with near-uniform attention; scale q/k so maps carry information."""
    import torch

    with torch.no_grad():
        for name, param in patcher.model.named_parameters():
            if name.endswith(("to_q.weight", "to_k.weight")):
                param.mul_(factor)
            elif name.endswith(".scale"):  # DiT q/k RMSNorm scales: random init would flatten the maps
                param.fill_(1.0)
    return patcher


def _init_weights(model, seed: int, std: float = 0.02):
    import torch

    gen = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if "norm" in name and name.endswith("weight"):
            param.data.fill_(1.0)
        elif "norm" in name or name.endswith("bias"):
            param.data.zero_()
        else:
            param.data.copy_(torch.randn(param.shape, generator=gen) * std)
    # Checkpoint-loaded buffers (SD3's pos_embed) are torch.empty too: garbage or NaN until initialised.
    for name, buffer in model.named_buffers():
        if name.endswith("pos_embed") and buffer.is_floating_point():
            buffer.copy_(torch.randn(buffer.shape, generator=gen) * std)


TINY_SD15_CONFIG = dict(
    image_size=32,
    in_channels=4,
    out_channels=4,
    model_channels=32,
    num_res_blocks=[1, 1],
    channel_mult=[1, 2],
    transformer_depth=[1, 1],
    transformer_depth_output=[1, 1, 1, 1],
    transformer_depth_middle=1,
    context_dim=64,
    use_linear_in_transformer=False,
    adm_in_channels=None,
    use_temporal_resblock=False,
    use_temporal_attention=False,
    num_heads=2,
    num_head_channels=-1,
    use_spatial_transformer=True,
    legacy=False,
)

TINY_SDXL_CONFIG = dict(
    TINY_SD15_CONFIG,
    context_dim=64,
    adm_in_channels=2816,
    num_classes="sequential",
    use_linear_in_transformer=True,
    transformer_depth=[0, 1],
    transformer_depth_output=[0, 0, 1, 1],
)


def tiny_model(kind: str = "sd15", seed: int = 0):
    """A real ComfyUI ``BaseModel``/``SDXL`` around ComfyUI's own ``UNetModel``, in a ``ModelPatcher``."""
    import torch

    import_comfy()
    import comfy.model_base
    import comfy.model_patcher
    import comfy.supported_models

    if kind == "sd15":
        config = comfy.supported_models.SD15(dict(TINY_SD15_CONFIG))
        config.set_inference_dtype(torch.float32, None)
        model = comfy.model_base.BaseModel(config, device=torch.device("cpu"))
    elif kind == "sdxl":
        config = comfy.supported_models.SDXL(dict(TINY_SDXL_CONFIG))
        config.set_inference_dtype(torch.float32, None)
        model = comfy.model_base.SDXL(config, device=torch.device("cpu"))
    else:
        raise ValueError(kind)
    _init_weights(model, seed)
    device = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=device)


def conditioning(kind: str = "sd15", seed: int = 1, batch: int = 1, tokens: int = 7):
    """(positive, negative) CONDITIONING lists for the tiny models."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    dim = TINY_SD15_CONFIG["context_dim"]
    extra_pos, extra_neg = {}, {}
    if kind == "sdxl":
        for extra in (extra_pos, extra_neg):
            extra.update(
                pooled_output=torch.randn(batch, 1280, generator=gen),
                width=128,
                height=128,
                crop_w=0,
                crop_h=0,
                target_width=128,
                target_height=128,
            )
    positive = [[torch.randn(batch, tokens, dim, generator=gen), extra_pos]]
    negative = [[torch.randn(batch, tokens, dim, generator=gen) * 0.1, extra_neg]]
    return positive, negative


def sample(
    patcher,
    *,
    steps=6,
    cfg=5.0,
    sampler="euler",
    scheduler="normal",
    seed=0,
    batch=1,
    size=16,
    kind="sd15",
    denoise=1.0,
    positive=None,
    negative=None,
    latent=None,
    **kwargs,
):
    """Run ``comfy.sample.sample`` on the tiny model; returns the final latent."""
    import torch

    comfy = import_comfy()
    if latent is None:
        latent = torch.zeros(batch, 4, size, size)
    noise = comfy.sample.prepare_noise(latent, seed)
    if positive is None or negative is None:
        positive, negative = conditioning(kind, batch=1)
    return comfy.sample.sample(
        patcher,
        noise,
        steps,
        cfg,
        sampler,
        scheduler,
        positive,
        negative,
        latent,
        denoise=denoise,
        seed=seed,
        disable_pbar=True,
        **kwargs,
    )
