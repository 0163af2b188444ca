"""The built-in DiT: a tiny class-conditional Flux transformer trained on real MNIST digits (pixel space).

The denoiser is diffusers' own ``FluxTransformer2DModel`` (double-stream then single-stream blocks, RoPE,
adaLN), so ComfyUI can run the same weights through its own Flux classes (``load_comfy_model``). The image is
the 32x32 one-channel digit in [-1, 1], packed like Flux latents (2x2 patches -> 256 tokens of 4 values). The
class enters as Flux's two conditions: ``TEXT_TOKENS`` "text" tokens of ``JOINT_DIM`` (ComfyUI's
``c_crossattn``) and one pooled vector of ``POOLED_DIM`` (ComfyUI's ``y``), one learned row per class plus a null
row for classifier-free guidance, stored in the same safetensors file. Objective: rectified flow in Flux's
convention, ``x_s = (1 - s) x0 + s noise``, the model predicts ``noise - x0`` at timestep ``s`` (sigma in [0, 1]).

Weights: ``reuse_bench/assets/mnist_dit.safetensors`` (fp16, upcast to fp32 on load) with ``mnist_dit.json``
beside it, written by ``python -m reuse_bench.train_mnist_dit``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .builtin_model import ASSETS, IMAGE_SIZE, NULL_CLASS, NUM_CLASSES
from .sampling import initial_noise as unet_noise

WEIGHTS_PATH = ASSETS / "mnist_dit.safetensors"
CONFIG_PATH = ASSETS / "mnist_dit.json"

TEXT_TOKENS = 4
JOINT_DIM = 32
POOLED_DIM = 32
PATCH = 2
TOKENS_PER_SIDE = IMAGE_SIZE // PATCH

TRANSFORMER_CONFIG = {
    # Flux packs the 2x2 patches outside the transformer, so the transformer's own patch size is 1.
    "patch_size": 1,
    "in_channels": PATCH * PATCH,
    "num_layers": 2,
    "num_single_layers": 4,
    "attention_head_dim": 24,
    "num_attention_heads": 4,
    "joint_attention_dim": JOINT_DIM,
    "pooled_projection_dim": POOLED_DIM,
    "guidance_embeds": False,
    # (index, row, column) rotary dims: they must sum to attention_head_dim and be even (ComfyUI's rope).
    "axes_dims_rope": [4, 10, 10],
}

# Set before training, then checked on seeds 100-199 (not the bench's): the classifier recognised 86/96/98/100% of
# samples at guidance 1/1.5/2/3 (docs/builtin-models.md).
DEFAULT_GUIDANCE = 2.0
DEFAULT_STEPS = 24


class ClassConditioning(nn.Module):
    """Class label -> (``[B, TEXT_TOKENS, JOINT_DIM]`` text tokens, ``[B, POOLED_DIM]`` pooled vector).

    Row ``NULL_CLASS`` is the unconditional pair for classifier-free guidance."""

    def __init__(self) -> None:
        super().__init__()
        self.tokens = nn.Embedding(NUM_CLASSES + 1, TEXT_TOKENS * JOINT_DIM)
        self.pooled = nn.Embedding(NUM_CLASSES + 1, POOLED_DIM)
        nn.init.normal_(self.tokens.weight, std=0.5)
        nn.init.normal_(self.pooled.weight, std=0.5)

    def forward(self, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.tokens(labels).view(labels.shape[0], TEXT_TOKENS, JOINT_DIM), self.pooled(labels)


def build_transformer():
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(**TRANSFORMER_CONFIG)


def pack(images: torch.Tensor) -> torch.Tensor:
    """``[B, 1, 32, 32]`` -> ``[B, 256, 4]`` (Flux's packing: row-major 2x2 patches, channel-major within)."""
    b, c, h, w = images.shape
    x = images.view(b, c, h // PATCH, PATCH, w // PATCH, PATCH).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // PATCH) * (w // PATCH), c * PATCH * PATCH)


def unpack(tokens: torch.Tensor, size: int = IMAGE_SIZE) -> torch.Tensor:
    b, _, d = tokens.shape
    c, n = d // (PATCH * PATCH), size // PATCH
    return tokens.view(b, n, n, c, PATCH, PATCH).permute(0, 3, 1, 4, 2, 5).reshape(b, c, size, size)


def position_ids() -> tuple[torch.Tensor, torch.Tensor]:
    """``(img_ids [256, 3], txt_ids [TEXT_TOKENS, 3])`` as the Flux pipeline builds them (and ComfyUI does)."""
    img = torch.zeros(TOKENS_PER_SIDE, TOKENS_PER_SIDE, 3)
    img[..., 1] = torch.arange(TOKENS_PER_SIDE)[:, None]
    img[..., 2] = torch.arange(TOKENS_PER_SIDE)[None, :]
    return img.view(-1, 3), torch.zeros(TEXT_TOKENS, 3)


@dataclass
class BuiltinDiT:
    """The trained transformer and its class-conditioning table, in eval mode, fp32, on CPU."""

    transformer: nn.Module
    conditioning: ClassConditioning
    metadata: dict

    def conds(self, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            return self.conditioning(labels)

    def velocity(self, x: torch.Tensor, sigma: torch.Tensor, text: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        """The plain transformer call on images ``[B, 1, 32, 32]`` at ``sigma`` ([B] or scalar): ``noise - x0``."""
        sigma = sigma.expand(x.shape[0]) if sigma.ndim == 0 else sigma
        return unpack(packed_velocity(self.transformer, pack(x), sigma, text, pooled))


def packed_velocity(transformer: nn.Module, tokens: torch.Tensor, sigma: torch.Tensor, text, pooled) -> torch.Tensor:
    """The transformer on packed image tokens at ``sigma`` ``[B]``: the packed ``noise - x0`` (the training target)."""
    img_ids, txt_ids = position_ids()
    return transformer(
        hidden_states=tokens,
        encoder_hidden_states=text,
        pooled_projections=pooled,
        timestep=sigma,
        img_ids=img_ids,
        txt_ids=txt_ids,
        return_dict=False,
    )[0]


def state_dict_for_saving(transformer: nn.Module, conditioning: ClassConditioning, dtype=torch.float16) -> dict:
    tensors = {f"transformer.{k}": v.detach().to(dtype).contiguous() for k, v in transformer.state_dict().items()}
    tensors.update(
        {f"conditioning.{k}": v.detach().to(dtype).contiguous() for k, v in conditioning.state_dict().items()}
    )
    return tensors


def _read_weights(weights: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if not weights.is_file():
        raise FileNotFoundError(
            f"built-in DiT weights not found at {weights}; they ship with the repo "
            "(re-create them with `python -m reuse_bench.train_mnist_dit`)"
        )
    return {k: v.float() for k, v in load_file(str(weights)).items()}


def _split(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


def load_conditioning(weights: Path | str = WEIGHTS_PATH) -> ClassConditioning:
    """The class table alone (no diffusers needed): what ComfyUI is fed as conds."""
    conditioning = ClassConditioning()
    conditioning.load_state_dict(_split(_read_weights(Path(weights)), "conditioning."))
    return conditioning.eval().requires_grad_(False)


def load_builtin_dit(weights: Path | str = WEIGHTS_PATH, config: Path | str = CONFIG_PATH) -> BuiltinDiT:
    """Load the shipped weights with safetensors into diffusers' class; a clear error if they are missing."""
    weights, config = Path(weights), Path(config)
    tensors = _read_weights(weights)
    metadata = json.loads(config.read_text()) if config.is_file() else {}
    transformer = build_transformer()
    transformer.load_state_dict(_split(tensors, "transformer."))
    conditioning = ClassConditioning()
    conditioning.load_state_dict(_split(tensors, "conditioning."))
    transformer.eval().requires_grad_(False)
    conditioning.eval().requires_grad_(False)
    return BuiltinDiT(transformer=transformer, conditioning=conditioning, metadata=metadata)


def flow_sigmas(steps: int) -> torch.Tensor:
    """``steps + 1`` sigmas from 1 to 0, evenly spaced: the schedule the DiT is sampled with (no shift)."""
    if steps < 1:
        raise ValueError(f"steps: must be >= 1, got {steps}")
    return torch.linspace(1.0, 0.0, steps + 1)


def initial_noise(seeds: Sequence[int]) -> torch.Tensor:
    """``[N, 1, 32, 32]``: the U-Net's per-seed noise, so a seed means the same starting image for both models."""
    return unet_noise(seeds)


# --- ComfyUI: the same weights through ComfyUI's own Flux classes ---------------------------------------------

COMFY_UNET_CONFIG = {
    # What comfy.model_detection would derive from these weights (it cannot: it assumes Flux's 16-channel latent).
    "image_model": "flux",
    "in_channels": 1,
    "out_channels": 1,
    "patch_size": PATCH,
    "vec_in_dim": POOLED_DIM,
    "context_in_dim": JOINT_DIM,
    "hidden_size": TRANSFORMER_CONFIG["num_attention_heads"] * TRANSFORMER_CONFIG["attention_head_dim"],
    "mlp_ratio": 4.0,  # diffusers' Flux blocks have no other
    "num_heads": TRANSFORMER_CONFIG["num_attention_heads"],
    "depth": TRANSFORMER_CONFIG["num_layers"],
    "depth_single_blocks": TRANSFORMER_CONFIG["num_single_layers"],
    "axes_dim": list(TRANSFORMER_CONFIG["axes_dims_rope"]),
    "theta": 10000,
    "qkv_bias": True,
    "guidance_embed": False,
    "txt_ids_dims": [],  # ComfyUI 0.33+: no txt_ids axis carries positions (Flux.1 behaviour)
}


def comfy_model_classes():
    """``(latent format, model config)`` classes for ComfyUI: Flux.1-schnell's config (rectified flow, shift 1, no
    guidance embedding) with a one-channel, unscaled pixel "latent" instead of Flux's 16-channel VAE latent."""
    import comfy.latent_formats
    import comfy.supported_models

    class MnistPixels(comfy.latent_formats.LatentFormat):
        latent_channels = 1
        scale_factor = 1.0
        spacial_downscale_ratio = 1

    class MnistFlux(comfy.supported_models.FluxSchnell):
        latent_format = MnistPixels

    return MnistPixels, MnistFlux


def load_comfy_model(weights: Path | str = WEIGHTS_PATH, dtype: torch.dtype = torch.float32, device=None):
    """The shipped DiT as a ComfyUI ``ModelPatcher`` (``comfy.model_base.Flux``), on CPU unless ``device`` says.

    ComfyUI must already be importable (``reuse_bench.comfyui_env.import_comfy()``). The diffusers-format weights
    are converted with ComfyUI's own ``comfy.model_detection.convert_diffusers_mmdit`` (``flux_to_diffusers`` key
    map: fused qkv, swapped final scale/shift), then loaded strictly.
    """
    import dataclasses

    import comfy.model_patcher
    from comfy.ldm.flux.model import FluxParams

    device = torch.device("cpu") if device is None else device
    known = {f.name for f in dataclasses.fields(FluxParams)} | {"image_model"}
    unet = {k: v for k, v in COMFY_UNET_CONFIG.items() if k in known}
    _, config_cls = comfy_model_classes()
    config = config_cls(unet)
    config.unet_config.update(unet)
    config.set_inference_dtype(dtype, None)
    model = config.get_model({}, device=device)
    state = comfy_state_dict(weights)
    missing, unexpected = model.diffusion_model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise RuntimeError(
            f"{weights}: the converted weights do not fit ComfyUI's Flux (missing {missing[:4]}, unexpected "
            f"{unexpected[:4]}); COMFY_UNET_CONFIG must match TRANSFORMER_CONFIG"
        )
    model.diffusion_model.to(device=device, dtype=dtype)
    return comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=torch.device("cpu"))


def comfy_state_dict(weights: Path | str = WEIGHTS_PATH) -> dict[str, torch.Tensor]:
    """The transformer's weights in ComfyUI's Flux key layout (fp32)."""
    import comfy.model_detection

    diffusers_sd = _split(_read_weights(Path(weights)), "transformer.")
    converted = comfy.model_detection.convert_diffusers_mmdit(dict(diffusers_sd), "")
    if converted is None:
        raise RuntimeError(f"{weights}: ComfyUI did not recognise the transformer weights as diffusers Flux")
    return converted


def comfy_conditioning(labels: Sequence[int], weights: Path | str = WEIGHTS_PATH) -> tuple[list, list]:
    """``(positive, negative)`` CONDITIONING for ``comfy.sample.sample``: per image the class's text tokens as
    ``c_crossattn`` and its pooled vector as ``pooled_output`` (-> ``y``); negative = the null class."""
    conditioning = load_conditioning(weights)
    labels = torch.tensor(list(labels))
    text, pooled = conditioning(labels)
    null_text, null_pooled = conditioning(torch.full_like(labels, NULL_CLASS))
    return [[text, {"pooled_output": pooled}]], [[null_text, {"pooled_output": null_pooled}]]


def sample_comfy(
    patcher,
    labels: Sequence[int],
    seeds: Sequence[int],
    steps: int = DEFAULT_STEPS,
    guidance: float = DEFAULT_GUIDANCE,
    weights: Path | str = WEIGHTS_PATH,
) -> torch.Tensor:
    """ComfyUI's ``euler`` with CFG on ``flow_sigmas(steps)`` from ``initial_noise(seeds)``: the sampling
    ``sampling_dit.sample_dit`` does with diffusers, so the two give the same images (``[N, 1, 32, 32]``)."""
    import comfy.sample

    noise = initial_noise(seeds)
    positive, negative = comfy_conditioning(labels, weights)
    with torch.no_grad():
        return comfy.sample.sample(
            patcher,
            noise,
            steps,
            guidance,
            "euler",
            "simple",
            positive,
            negative,
            torch.zeros_like(noise),
            sigmas=flow_sigmas(steps),
            disable_pbar=True,
            seed=int(seeds[0]),
        )
