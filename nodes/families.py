"""The model families the pack knows: one table, by the class name of ComfyUI's diffusion model (``comfy.ldm``).

Per family: the names users know it by, whether Attention Map Reuse hooks its attention (matched along the MRO:
the hook sits in ComfyUI's attention, not in the forward, so subclasses work alike), and what Encoder Feature
Propagation does with it: the block stacks that form a transformer's encoder (matched by exact class: a subclass
may change the forward around the blocks), the U-Net's own encoder, or the reason it refuses. The node description,
``docs/compatibility.md``'s tables and the tests' family lists are checked against this table
(``tests/test_families.py``); ``attention_hooks`` and ``dit_host`` read it.

Attention is checked on ComfyUI 0.3.64 and 0.33.0 with tiny real models of each family marked ``tested`` (those of
0.33.0 only where the class is new there); the others go through the same attention function but no test builds them.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BlockStack:
    attribute: str  # the diffusion model's ModuleList of blocks
    replace_key: str | None  # its name in patches_replace["dit"]; None: ComfyUI has no block replacement


@dataclass(frozen=True)
class Family:
    class_name: str
    names: tuple[str, ...]  # what users call the models of this class
    attention: bool = True  # Attention Map Reuse: its attention goes through optimized_attention_override
    stacks: tuple[BlockStack, ...] = ()  # Encoder Feature Propagation: a transformer's blocks, in execution order
    unet: bool = False  # Encoder Feature Propagation on the U-Net's own encoder (input and middle blocks)
    refused: str = ""  # why Encoder Feature Propagation refuses a family users may expect it to take
    tested: bool = True  # built by a test with a tiny real model (attention; encoder too where it has one)

    @property
    def label(self) -> str:
        return " / ".join(self.names)

    @property
    def encoder_supported(self) -> bool:
        return self.unet or bool(self.stacks)


_DOUBLE_THEN_SINGLE = (BlockStack("double_blocks", "double_block"), BlockStack("single_blocks", "single_block"))
_ONE_STACK = (BlockStack("transformer_blocks", "double_block"),)

FAMILIES = (
    Family("UNetModel", ("SD1.x", "SD2.x", "SDXL", "SVD"), unet=True),
    Family("Flux", ("Flux.1", "Flux.2"), stacks=_DOUBLE_THEN_SINGLE),
    Family("Chroma", ("Chroma",), stacks=_DOUBLE_THEN_SINGLE),
    Family("HunyuanVideo", ("HunyuanVideo 1.0", "HunyuanVideo 1.5"), stacks=_DOUBLE_THEN_SINGLE),
    Family("QwenImageTransformer2DModel", ("Qwen-Image",), stacks=_ONE_STACK),
    Family("WanModel", ("Wan 2.1", "Wan 2.2"), stacks=(BlockStack("blocks", "double_block"),)),
    Family("LTXVModel", ("LTX-Video",), stacks=_ONE_STACK),
    Family("NextDiT", ("Lumina 2", "Z-Image"), stacks=(BlockStack("layers", None),)),
    Family(
        "OpenAISignatureMMDITWrapper",
        ("SD3", "SD3.5"),
        refused="ComfyUI's MMDiT forward has no DIFFUSION_MODEL wrapper point, where Encoder Feature Propagation runs "
        "its decoder-only and batched passes (its block replacement alone cannot batch steps)",
    ),
    Family("Kandinsky5", ("Kandinsky 5",)),
    Family("CogVideoXTransformer3DModel", ("CogVideoX",)),
    Family("LensTransformer2DModel", ("Lens",)),
    Family("MageFlowTransformer2DModel", ("MageFlow",)),
    Family("SingleStreamDiT", ("Krea 2",)),
    Family("JoyImageTransformer3DModel", ("JoyImage",)),
    Family("Ideogram4Transformer2DModel", ("Ideogram 4",)),
    Family("BooguTransformer2DModel", ("Boogu",)),
    Family("HiDreamImageTransformer2DModel", ("HiDream",), tested=False),
    Family("AsymmDiTJoint", ("Mochi",), tested=False),
    Family("GeneralDIT", ("Cosmos",), tested=False),
    Family("MiniTrainDIT", ("Cosmos Predict2",), tested=False),
    Family("ErnieImageModel", ("ERNIE-Image",), attention=False),
)
BY_CLASS = {family.class_name: family for family in FAMILIES}


def attention_family(diffusion_model) -> Family | None:
    """The family whose attention Attention Map Reuse hooks, matched along ``diffusion_model``'s MRO, or None."""
    for cls in type(diffusion_model).__mro__:
        family = BY_CLASS.get(cls.__name__)
        if family is not None and family.attention and cls.__module__.startswith("comfy."):
            return family
    return None


def encoder_family(diffusion_model) -> Family | None:
    """The family of ``diffusion_model``'s exact class, or None."""
    return BY_CLASS.get(type(diffusion_model).__name__)


def transformer_labels() -> str:
    """The transformer families Encoder Feature Propagation splits, for messages and the node description."""
    return ", ".join(family.label for family in FAMILIES if family.stacks)
