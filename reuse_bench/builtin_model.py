"""The built-in model: a small class-conditional diffusers U-Net trained on real MNIST digits.

The denoiser is diffusers' own ``UNet2DConditionModel`` (ResNet blocks, self- and cross-attention
transformer blocks), 32x32, one channel, epsilon prediction. The class label enters the U-Net as
context tokens through cross-attention: a learned table of 10 classes plus one null token (for
classifier-free guidance), each ``TOKENS_PER_CLASS`` tokens of ``CONTEXT_DIM`` dims, stored in the same
safetensors file as the U-Net. The noise schedule is diffusers' DDPM/DDIM built from a config dict, so
nothing touches the network.

Weights: ``reuse_bench/assets/mnist_unet.safetensors`` (fp16, upcast to fp32 on load) with
``mnist_unet.json`` beside it, written by ``python -m reuse_bench.train_mnist``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

ASSETS = Path(__file__).resolve().parent / "assets"
WEIGHTS_PATH = ASSETS / "mnist_unet.safetensors"
CONFIG_PATH = ASSETS / "mnist_unet.json"

NUM_CLASSES = 10
NULL_CLASS = NUM_CLASSES  # index of the unconditional (CFG) token row
TOKENS_PER_CLASS = 4
CONTEXT_DIM = 64
IMAGE_SIZE = 32

UNET_CONFIG = {
    "sample_size": IMAGE_SIZE,
    "in_channels": 1,
    "out_channels": 1,
    # 32x32 -> 16x16 -> 8x8; attention (self + cross) at 16x16 (256 tokens), 8x8 and in the mid block.
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "block_out_channels": [32, 64, 64],
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "cross_attention_dim": CONTEXT_DIM,
    # In UNet2DConditionModel this number is the head count (4 heads of 16 dims at 64 channels).
    "attention_head_dim": 4,
}

SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000,
    "beta_schedule": "squaredcos_cap_v2",
    "prediction_type": "epsilon",
    "clip_sample": True,
    "clip_sample_range": 1.0,
    "timestep_spacing": "trailing",
}


class ClassTokens(nn.Module):
    """Class label -> ``[B, TOKENS_PER_CLASS, CONTEXT_DIM]`` cross-attention context.

    Row ``NULL_CLASS`` is the null (unconditional) token set for classifier-free guidance."""

    def __init__(self) -> None:
        super().__init__()
        self.table = nn.Embedding(NUM_CLASSES + 1, TOKENS_PER_CLASS * CONTEXT_DIM)
        nn.init.normal_(self.table.weight, std=0.5)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        return self.table(labels).view(labels.shape[0], TOKENS_PER_CLASS, CONTEXT_DIM)


def build_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**UNET_CONFIG)


def build_scheduler(kind: str = "ddim"):
    """A fresh diffusers scheduler from ``SCHEDULER_CONFIG`` (``ddim`` for sampling, ``ddpm`` for training)."""
    from diffusers import DDIMScheduler, DDPMScheduler

    if kind == "ddim":
        return DDIMScheduler.from_config(SCHEDULER_CONFIG)
    if kind == "ddpm":
        return DDPMScheduler.from_config(SCHEDULER_CONFIG)
    raise ValueError(f"scheduler kind must be 'ddim' or 'ddpm', got {kind!r}")


@dataclass
class BuiltinModel:
    """The trained U-Net and its class-token table, in eval mode, fp32, on CPU."""

    unet: nn.Module
    class_tokens: ClassTokens
    metadata: dict

    def context(self, labels: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.class_tokens(labels)


def state_dict_for_saving(unet: nn.Module, class_tokens: ClassTokens, dtype=torch.float16) -> dict:
    tensors = {f"unet.{k}": v.detach().to(dtype).contiguous() for k, v in unet.state_dict().items()}
    tensors.update(
        {f"class_tokens.{k}": v.detach().to(dtype).contiguous() for k, v in class_tokens.state_dict().items()}
    )
    return tensors


def load_builtin_model(weights: Path | str = WEIGHTS_PATH, config: Path | str = CONFIG_PATH) -> BuiltinModel:
    """Load the shipped weights with safetensors; a clear error if they are missing."""
    from safetensors.torch import load_file

    weights, config = Path(weights), Path(config)
    if not weights.is_file():
        raise FileNotFoundError(
            f"built-in model weights not found at {weights}; they ship with the repo "
            "(re-create them with `python -m reuse_bench.train_mnist`)"
        )
    metadata = json.loads(config.read_text()) if config.is_file() else {}
    tensors = load_file(str(weights))
    unet = build_unet()
    unet.load_state_dict({k[5:]: v.float() for k, v in tensors.items() if k.startswith("unet.")})
    class_tokens = ClassTokens()
    class_tokens.load_state_dict({k[13:]: v.float() for k, v in tensors.items() if k.startswith("class_tokens.")})
    unet.eval().requires_grad_(False)
    class_tokens.eval().requires_grad_(False)
    return BuiltinModel(unet=unet, class_tokens=class_tokens, metadata=metadata)
