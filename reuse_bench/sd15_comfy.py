"""Full-size SD1.5 U-Net inside real ComfyUI (CPU mode, random weights) for timing benchmarks.

Random weights are fine for timing: the cost of a step does not depend on the weight values.
Nothing here downloads anything; ComfyUI must already be on disk (an explicit path, ``COMFYUI_PATH`` or the
trees ``reuse_bench.comfyui_env`` knows).

API
---
``import_comfy(comfy_path=None) -> module``
    Imports ComfyUI in CPU mode with PyTorch SDPA attention (``comfyui_env``) and returns the ``comfy``
    package. Idempotent.
``load_pack(comfy_path=None) -> module``
    Imports this repository as the custom-node package ComfyUI would load (``comfyui_reuse``), so its nodes
    can be used in-process: ``importlib.import_module("comfyui_reuse.nodes.attention_node")``.
``SD15_UNET_CONFIG``
    ComfyUI's own SD1.5 U-Net config (model_channels 320, channel_mult [1, 2, 4, 4], two res
    blocks per level, transformer depth 1, context 768, 8 heads).
``build_sd15(comfy_path=None, seed=0, std=0.02, dtype=torch.float32) -> ModelPatcher``
    ComfyUI's ``UNetModel`` (~860M parameters) in ``comfy.model_base.BaseModel`` + ``ModelPatcher``,
    weights normal(0, std), norm layers weight 1 / bias 0. About 3.4 GB in fp32.
``random_conditioning(seed=0, tokens=77, dim=768) -> (positive, negative)``
    CONDITIONING lists with one random ``[1, tokens, dim]`` embedding each.
``sample(patcher, *, steps, size=256, cfg=7.0, sampler="euler", scheduler="normal", seed=0, denoise=1.0,
         positive=None, negative=None, record_step_times=False, latent_channels=4) -> SampleResult``
    One ``comfy.sample.sample`` run on a ``size x size`` pixel image (latent ``size // 8``, 16 channels for
    Flux: ``latent_channels``); returns the final
    latent, the wall time, and, with ``record_step_times``, the U-Net time of every step (seconds, summed over
    the model calls of that step; CFG cond+uncond are one batch-2 call on the CPU). Step times come from an
    ``APPLY_MODEL`` wrapper on a clone, so wrapper- and override-based patches (this pack's nodes) are timed
    as they really run.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import torch

from . import comfyui_env

TIMING_WRAPPER_KEY = "reuse_bench_step_timing"
PACK_MODULE = comfyui_env.PACK_MODULE

SD15_UNET_CONFIG = dict(
    image_size=32,
    in_channels=4,
    out_channels=4,
    model_channels=320,
    num_res_blocks=[2, 2, 2, 2],
    channel_mult=[1, 2, 4, 4],
    transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0],
    transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
    transformer_depth_middle=1,
    context_dim=768,
    use_linear_in_transformer=False,
    adm_in_channels=None,
    use_temporal_resblock=False,
    use_temporal_attention=False,
    num_heads=8,
    num_head_channels=-1,
    use_spatial_transformer=True,
    legacy=False,
)


def import_comfy(comfy_path: str | os.PathLike | None = None):
    """ComfyUI in CPU mode with PyTorch SDPA (``comfyui_env.import_comfy``): on the CPU ComfyUI defaults to
    sub-quadratic attention while GPU users get the fused kernel, the baseline reuse has to beat."""
    return comfyui_env.import_comfy(comfy_path, fused_attention=True)


def load_pack(comfy_path=None):
    """Import the repository as the package ``comfyui_reuse`` (what ComfyUI's loader does)."""
    import_comfy(comfy_path)
    return comfyui_env.load_pack()


def init_weights(model: torch.nn.Module, seed: int, std: float) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                param.fill_(1.0)
            elif "norm" in name or name.endswith("bias"):
                param.zero_()
            else:
                param.normal_(0.0, std, generator=gen)


def build_sd15(comfy_path=None, seed: int = 0, std: float = 0.02, dtype: torch.dtype = torch.float32):
    """Full-size SD1.5 U-Net (random weights) as a ComfyUI ``ModelPatcher`` on the CPU."""
    import_comfy(comfy_path)
    import comfy.model_base
    import comfy.supported_models

    config = comfy.supported_models.SD15(dict(SD15_UNET_CONFIG))
    config.set_inference_dtype(dtype, None)
    model = comfy.model_base.BaseModel(config, device=torch.device("cpu"))
    init_weights(model, seed, std)
    model.eval()
    device = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=device)


def random_conditioning(seed: int = 0, tokens: int = 77, dim: int = 768):
    """(positive, negative) CONDITIONING with random ``[1, tokens, dim]`` embeddings."""
    gen = torch.Generator().manual_seed(seed)
    positive = [[torch.randn(1, tokens, dim, generator=gen), {}]]
    negative = [[torch.randn(1, tokens, dim, generator=gen) * 0.1, {}]]
    return positive, negative


@dataclass
class SampleResult:
    latent: torch.Tensor
    wall_s: float
    step_unet_s: list[float] = field(default_factory=list)


def _timing_wrapper(times: dict[int, float]):
    from reuse_core.steps import match_step

    def wrapper(executor, *args, **kwargs):
        options = kwargs.get("transformer_options")
        if not isinstance(options, dict):
            options = args[5] if len(args) > 5 and isinstance(args[5], dict) else {}
        start = time.perf_counter()
        try:
            return executor(*args, **kwargs)
        finally:
            elapsed = time.perf_counter() - start
            sigmas, sample_sigmas = options.get("sigmas"), options.get("sample_sigmas")
            step = match_step(sigmas, sample_sigmas).index if sigmas is not None and sample_sigmas is not None else -1
            times[step] = times.get(step, 0.0) + elapsed

    return wrapper


def sample(
    patcher,
    *,
    steps: int,
    size: int = 256,
    cfg: float = 7.0,
    sampler: str = "euler",
    scheduler: str = "normal",
    seed: int = 0,
    denoise: float = 1.0,
    positive=None,
    negative=None,
    record_step_times: bool = False,
    latent_channels: int = 4,
) -> SampleResult:
    """Run ``comfy.sample.sample`` once; see the module docstring."""
    import_comfy()
    import comfy.patcher_extension
    import comfy.sample

    if positive is None or negative is None:
        positive, negative = random_conditioning()
    times: dict[int, float] = {}
    if record_step_times:
        patcher = patcher.clone()
        patcher.add_wrapper_with_key(
            comfy.patcher_extension.WrappersMP.APPLY_MODEL, TIMING_WRAPPER_KEY, _timing_wrapper(times)
        )
    latent = torch.zeros(1, latent_channels, size // 8, size // 8)
    noise = comfy.sample.prepare_noise(latent, seed)
    start = time.perf_counter()
    with torch.inference_mode():
        out = comfy.sample.sample(
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
        )
    wall = time.perf_counter() - start
    step_times = [times.get(i, 0.0) for i in range(steps)] if record_step_times else []
    return SampleResult(out, wall, step_times)
