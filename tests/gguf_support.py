"""Tiny transformers as ``.gguf`` files, loaded by the unmodified ComfyUI-GGUF custom node (city96).

- ``comfyui_gguf``: ComfyUI-GGUF (``../shared/custom_nodes/ComfyUI-GGUF``, or ``COMFYUI_GGUF_PATH``) loaded the way
  ComfyUI loads a custom node, through ``nodes.load_custom_node``, from a link in a temporary ``custom_nodes/`` (the
  shared tree is never written: ComfyUI is imported without writing bytecode). Its ``unet_gguf`` folder gets a
  temporary models folder.
- ``write_gguf``: a diffusion model's state dict as a GGUF file with ComfyUI-GGUF's own conversion rules
  (``tools/convert.py``: the reference key layout, the ``general.architecture`` it detects, 1-D and small tensors
  (<= 1024 values) and the architecture's high-precision keys kept F32, the rest quantized with the ``gguf``
  package, F16 where a row does not fill the quant's blocks; 5-D tensors written as F32 like its
  ``fix_5d_tensors.py``).
- ``GGUF_FAMILIES``: tiny models whose sizes ComfyUI's model detection reads back from the file (Flux: the hidden
  size from ``img_in``, 128 channels per head; Wan 2.1: the width from ``head.modulation``, 128 per head).
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
from collections.abc import Callable
from pathlib import Path

import comfy_harness as h
import pytest
import tiny_dits
import torch

QUANTIZATION_THRESHOLD = 1024  # ComfyUI-GGUF tools/convert.py: tensors this small stay F32


def comfyui_gguf_dir() -> Path:
    explicit = os.environ.get("COMFYUI_GGUF_PATH")
    if explicit:
        return Path(explicit)
    return h.PACK_DIR.parent / "shared" / "custom_nodes" / "ComfyUI-GGUF"


def unavailable_reason() -> str | None:
    where = comfyui_gguf_dir()
    if not (where / "__init__.py").is_file():
        return f"ComfyUI-GGUF not found at {where} (set COMFYUI_GGUF_PATH)"
    try:
        import gguf  # noqa: F401
    except ImportError as exc:
        return f"the gguf package is not installed (requirements/test.txt): {exc}"
    return None


_LOADED: dict[str, object] = {}


def comfyui_gguf(custom_nodes: Path, models: Path) -> dict:
    """ComfyUI-GGUF's ``NODE_CLASS_MAPPINGS``, the pack loaded once per session by ComfyUI's own loader from a link in
    ``custom_nodes``; ``models`` becomes a ``diffusion_models`` (and so ``unet_gguf``) folder."""
    h.require_comfyui(unavailable_reason())
    h.import_comfy()
    import folder_paths

    import nodes

    if "mappings" not in _LOADED:
        link = custom_nodes / "ComfyUI-GGUF"
        link.symlink_to(comfyui_gguf_dir().resolve(), target_is_directory=True)
        before = set(nodes.NODE_CLASS_MAPPINGS)
        if not asyncio.run(nodes.load_custom_node(str(link))):
            raise RuntimeError(f"ComfyUI could not load ComfyUI-GGUF from {link}")
        mappings = {k: nodes.NODE_CLASS_MAPPINGS[k] for k in set(nodes.NODE_CLASS_MAPPINGS) - before}
        assert "UnetLoaderGGUF" in mappings, sorted(mappings)
        _LOADED["mappings"] = mappings
    folder_paths.add_model_folder_path("diffusion_models", str(models))
    return _LOADED["mappings"]


def forget_models_folder(models: Path) -> None:
    import folder_paths

    for key in ("diffusion_models", "unet_gguf"):
        paths = folder_paths.folder_names_and_paths.get(key, ([], set()))[0]
        while str(models) in paths:
            paths.remove(str(models))


def write_gguf(path: Path, state_dict: dict[str, torch.Tensor], arch: str, qtype_name: str, hiprec=()) -> dict:
    """Write ``state_dict`` as ``path`` (ComfyUI-GGUF's conversion rules, then ``qtype_name``); returns the type each
    tensor was written as."""
    import gguf

    qtype = getattr(gguf.GGMLQuantizationType, qtype_name)
    writer = gguf.GGUFWriter(path=None, arch=arch)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    written = {}
    for key, tensor in state_dict.items():
        data = tensor.detach().to(torch.float32).cpu().numpy()
        # F32: 1-D, small and high-precision tensors (convert.py), and 5-D ones (fix_5d_tensors.py writes them so)
        small = data.ndim <= 1 or data.size <= QUANTIZATION_THRESHOLD or any(k in key for k in hiprec)
        kind = gguf.GGMLQuantizationType.F32 if small or data.ndim > 4 else qtype
        try:
            raw = gguf.quants.quantize(data, kind)
        except (AttributeError, gguf.QuantError):  # rows not a multiple of the block: F16, as convert.py falls back
            kind = gguf.GGMLQuantizationType.F16
            raw = gguf.quants.quantize(data, kind)
        writer.add_tensor(key, raw, raw_dtype=kind)
        written[key] = kind.name
    writer.write_header_to_file(path=path)
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return written


# --- tiny models ComfyUI's detection reads back from the file --------------------------------------------------


@dataclasses.dataclass(frozen=True)
class GGUFFamily:
    label: str
    arch: str  # general.architecture, as ComfyUI-GGUF's converter writes it
    build: Callable[[int], tiny_dits.TinyDiT]
    hiprec: tuple[str, ...] = ()  # ComfyUI-GGUF's keys_hiprec for the architecture
    requires: Callable[[], str | None] = lambda: None  # why the running ComfyUI cannot load it


def _flux(seed: int = 0) -> tiny_dits.TinyDiT:
    """Flux.1 dev-style, 1 double + 2 single blocks, hidden 128 = 1 head of 128 (Flux's rope axes 16/56/56)."""
    import comfy.model_base
    import comfy.supported_models

    unet = tiny_dits._flux_unet(hidden_size=128, num_heads=1, axes_dim=[16, 56, 56], mlp_ratio=4.0, guidance_embed=True)
    patcher = tiny_dits._patcher(comfy.supported_models.Flux, comfy.model_base.Flux, unet, seed)
    positive, negative = tiny_dits._conds(seed, 32, pooled_output=tiny_dits._pooled(32), guidance=3.5)
    return tiny_dits.TinyDiT(patcher, positive, negative, torch.zeros(1, 16, 8, 8))


def _flux_detectable() -> str | None:
    import inspect

    import comfy.model_detection

    if '"hidden_size"] = w.shape[0]' not in inspect.getsource(comfy.model_detection.detect_unet_config):
        return (
            f"ComfyUI {h.running_version()} detects every Flux checkpoint as full width (hidden size 3072, 24 heads): "
            "a tiny Flux file cannot be loaded"
        )
    return None


def _wan21(seed: int = 0) -> tiny_dits.TinyDiT:
    """Wan 2.1 text-to-video, 2 blocks, width 128 = 1 head of 128, the 256 time frequencies detection assumes."""
    import comfy.model_base
    import comfy.supported_models

    unet = tiny_dits._wan_unet(dim=128, num_heads=1, ffn_dim=256, freq_dim=256)
    patcher = tiny_dits._patcher(comfy.supported_models.WAN21_T2V, comfy.model_base.WAN21, unet, seed)
    positive, negative = tiny_dits._conds(seed, 32)
    return tiny_dits.TinyDiT(patcher, positive, negative, torch.zeros(1, 16, 3, 8, 8))


GGUF_FAMILIES = {
    "flux": GGUFFamily("Flux.1", "flux", _flux, requires=_flux_detectable),
    "wan21": GGUFFamily("Wan 2.1", "wan", _wan21, hiprec=(".modulation",)),
}


def require_family(name: str) -> GGUFFamily:
    family = GGUF_FAMILIES[name]
    reason = family.requires()
    if reason:
        pytest.skip(reason)
    return family
