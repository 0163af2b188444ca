"""Real ComfyUI server for end-to-end tests: tiny model files, an isolated server process, an HTTP client.

Nothing is written into the ComfyUI checkout: the server runs with a temporary base directory
(models, custom_nodes, input, output, temp, user, database) and ``PYTHONDONTWRITEBYTECODE=1``.
The pack is linked into the temporary ``custom_nodes/`` folder, exactly where ComfyUI-Manager would
clone it, so ComfyUI imports it through its own custom-node loader.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from comfy_harness import PACK_DIR, find_comfyui

from reuse_bench.comfyui_env import STANDIN_DIR, standins_needed

PACK_FOLDER_NAME = "comfyui-reuse"
# Bump when build_tiny_checkpoint_state_dict changes what it writes (invalidates cached files).
CHECKPOINT_FORMAT_VERSION = 2

# SD1.5 widths (what ComfyUI's detection compares) at the smallest depth: one level, one res block,
# one transformer per block. ``model_detection`` recovers exactly this from the saved keys.
TINY_SD15_UNET = dict(
    image_size=32,
    in_channels=4,
    out_channels=4,
    model_channels=320,
    num_res_blocks=[1],
    channel_mult=[1],
    transformer_depth=[1],
    transformer_depth_output=[1, 1],
    transformer_depth_middle=1,
    context_dim=768,
    use_linear_in_transformer=False,
    adm_in_channels=None,
    use_temporal_resblock=False,
    use_temporal_attention=False,
    use_spatial_transformer=True,
    legacy=False,
)

# SDXL detection compares model_channels, context_dim, adm_in_channels, linear transformers and the
# *input* transformer depths [0, 0, 2, 2, 10, 10]; channel multipliers, output and middle depths are free,
# so all three levels stay at 320 channels and the decoder/middle get one transformer each.
TINY_SDXL_UNET = dict(
    image_size=32,
    in_channels=4,
    out_channels=4,
    model_channels=320,
    num_res_blocks=[2, 2, 2],
    channel_mult=[1, 1, 1],
    transformer_depth=[0, 0, 2, 2, 10, 10],
    transformer_depth_output=[0, 0, 0, 1, 1, 1, 1, 1, 1],
    transformer_depth_middle=1,
    context_dim=2048,
    use_linear_in_transformer=True,
    adm_in_channels=2816,
    num_classes="sequential",
    use_temporal_resblock=False,
    use_temporal_attention=False,
    use_spatial_transformer=True,
    legacy=False,
)


def server_unavailable_reason() -> str | None:
    """Why the real-server tests cannot run here, or ``None``."""
    from comfy_harness import comfyui_unavailable_reason

    reason = comfyui_unavailable_reason()
    if reason:
        return reason
    try:
        import comfyui_frontend_package  # noqa: F401
    except ImportError:
        return "comfyui-frontend-package is missing (ComfyUI's server needs it): pip install -r requirements-dev.txt"
    return None


# --------------------------------------------------------------------------------------------------
# Tiny checkpoints


def _fill_random_(module, seed: int, std: float = 0.02) -> None:
    """Random weights for every parameter: ComfyUI's ops leave weights as ``torch.empty`` (garbage/NaN)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if ("norm" in name or "ln_" in name) and name.endswith("weight"):
                param.fill_(1.0)
            elif name.endswith("bias") or "norm" in name:
                param.zero_()
            else:
                # uniform with the same standard deviation: filling ~1e9 fp16 values stays fast
                param.uniform_(-std * 3**0.5, std * 3**0.5, generator=gen)


def build_tiny_checkpoint_state_dict(kind: str, seed: int = 0) -> dict:
    """A full checkpoint state dict (U-Net + text encoder(s) + VAE) keyed exactly as ComfyUI saves one.

    The U-Net is ComfyUI's own ``UNetModel`` at the tiny config above, the text encoders are ComfyUI's
    CLIP-L (SD1.5) or CLIP-L + CLIP-G (SDXL) at their real sizes (their configs are fixed), and the VAE
    is a TAESD autoencoder, which ComfyUI's ``VAE`` recognises from its keys inside a checkpoint.
    Keys are produced by ``state_dict_for_saving``, the path ComfyUI's CheckpointSave uses.
    """
    import torch
    from comfy_harness import import_comfy

    import_comfy()
    import comfy.model_patcher
    import comfy.sd1_clip
    import comfy.sdxl_clip
    import comfy.supported_models
    import comfy.taesd.taesd

    dtype = torch.float16
    if kind == "sd15":
        config = comfy.supported_models.SD15(dict(TINY_SD15_UNET))
        text_encoder = comfy.sd1_clip.SD1ClipModel(device="cpu", dtype=dtype)
    elif kind == "sdxl":
        config = comfy.supported_models.SDXL(dict(TINY_SDXL_UNET))
        text_encoder = comfy.sdxl_clip.SDXLClipModel(device="cpu", dtype=dtype)
    else:
        raise ValueError(f"kind must be 'sd15' or 'sdxl', got {kind!r}")
    config.set_inference_dtype(dtype, None)
    model = config.get_model({}, device=torch.device("cpu"))
    _fill_random_(model.diffusion_model, seed)
    _fill_random_(text_encoder, seed + 1)
    vae = comfy.taesd.taesd.TAESD()
    _fill_random_(vae, seed + 2, std=0.05)
    vae.vae_scale.data.fill_(1.0)
    vae_sd = {k: v.to(dtype) for k, v in vae.state_dict().items()}
    patcher = comfy.model_patcher.ModelPatcher(model, torch.device("cpu"), torch.device("cpu"))
    if hasattr(patcher, "state_dict_for_saving"):  # ComfyUI after 0.3.64: the patcher collects the U-Net's keys
        sd = patcher.state_dict_for_saving(text_encoder.state_dict(), vae_sd)
    else:
        sd = model.state_dict_for_saving(text_encoder.state_dict(), vae_sd)
    return {k: v.contiguous() for k, v in sd.items()}


def detected_model_class(sd: dict) -> str | None:
    """Name of the ``comfy.supported_models`` class ComfyUI's detection picks for a checkpoint state dict."""
    import comfy.model_detection

    prefix = comfy.model_detection.unet_prefix_from_state_dict(sd)
    config = comfy.model_detection.model_config_from_unet(sd, prefix)
    return None if config is None else type(config).__name__


# --------------------------------------------------------------------------------------------------
# Standalone model files of the transformer examples (diffusion model, text encoder, VAE loaded separately)

# Diffusion models. ComfyUI's detection (``comfy.model_detection``) derives each architecture from the keys and shapes
# of the weights, but fixes some sizes: ComfyUI 0.3.64 reads Flux's depth only (hidden size 3072, text width 4096),
# 0.33.0 its widths too; Z-Image is 3840 wide in every version that has it. Each kind lists configs from the smallest
# up: the first one the running ComfyUI reads back unchanged (same class, same keys and shapes) is written. Every model
# has two blocks, the least Encoder Feature Propagation splits. Text widths: 4096 (the stand-in text encoder below);
# Flux's pooled vector: 2048.
TINY_DITS = {
    "flux": ("Flux", (
        dict(image_model="flux", in_channels=16, out_channels=16, vec_in_dim=2048, context_in_dim=4096,
             hidden_size=256, mlp_ratio=4.0, num_heads=2, depth=1, depth_single_blocks=1, axes_dim=[16, 56, 56],
             theta=10000, patch_size=2, qkv_bias=True, guidance_embed=True, txt_ids_dims=[]),
        dict(image_model="flux", in_channels=16, out_channels=16, vec_in_dim=2048, context_in_dim=4096,
             hidden_size=3072, mlp_ratio=4.0, num_heads=24, depth=1, depth_single_blocks=1, axes_dim=[16, 56, 56],
             theta=10000, patch_size=2, qkv_bias=True, guidance_embed=True, txt_ids_dims=[]),
    )),
    "zimage": ("ZImage", (
        dict(image_model="lumina2", patch_size=2, in_channels=16, dim=3840, cap_feat_dim=4096, n_layers=2,
             qk_norm=True, n_heads=30, n_kv_heads=30, axes_dims=[32, 48, 48], axes_lens=[1536, 512, 512],
             rope_theta=256.0, ffn_dim_multiplier=8.0 / 3.0, z_image_modulation=True, time_scale=1000.0,
             pad_tokens_multiple=32),
    )),
    "wan21": ("WAN21_T2V", (
        dict(image_model="wan2.1", model_type="t2v", patch_size=(1, 2, 2), text_len=512, in_dim=16, dim=128,
             ffn_dim=256, freq_dim=256, text_dim=4096, out_dim=16, num_heads=1, num_layers=2, window_size=(-1, -1),
             qk_norm=True, cross_attn_norm=True, eps=1e-6),
    )),
}  # fmt: skip
# The VAEs: ComfyUI's loader builds Flux's (16-channel AutoencoderKL) and Wan 2.1's at their real sizes whatever the
# file holds (84 M and 127 M parameters, cheap at the test's 64x64 images), so they are written at those sizes.
FLUX_VAE_CONFIG = {"double_z": True, "z_channels": 16, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
                   "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}  # fmt: skip
WAN21_VAE_CONFIG = {"dim": 96, "z_dim": 16, "dim_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_scales": [],
                    "temperal_downsample": [False, True, True], "dropout": 0.0}  # fmt: skip
# Text encoders: ComfyUI builds every text encoder at its real, fixed size whatever the file holds (T5-XXL 4.7 B
# parameters, Qwen3-4B, UMT5-XXL 5.7 B): no tiny file can stand in for the examples' text encoders. The runs load the
# real-size CLIP-L (123 M parameters, random weights) instead, as SD3's text encoder without T5 (type sd3): ComfyUI
# pads its output to T5-XXL's 4096 channels, the text width the Flux and Wan loaders build, and adds the 2048-wide
# pooled vector Flux reads. The examples' own text encoder files are placeholders (listed, never loaded).
TEXT_ENCODER_STAND_INS = {
    "CLIPLoader": {"clip_name": "clip_l.safetensors", "type": "sd3"},
    "DualCLIPLoader": {"clip_name1": "clip_l.safetensors", "clip_name2": "clip_l.safetensors", "type": "sd3"},
}
MODEL_KINDS = ("sd15", "sdxl", *TINY_DITS, "clip_l", "flux_vae", "wan21_vae")


def model_files() -> dict[str, tuple[str, str]]:
    """kind -> (ComfyUI models folder, file name the examples use)."""
    gen = load_tools_module("make_example_workflows")
    names = {"sd15": gen.SD15_CHECKPOINT, "sdxl": gen.SDXL_CHECKPOINT, "flux": gen.FLUX_DIT,
             "zimage": gen.ZIMAGE_DIT, "wan21": gen.WAN21_DIT, "clip_l": gen.CLIP_L, "flux_vae": gen.FLUX_VAE,
             "wan21_vae": gen.WAN21_VAE}  # fmt: skip
    return {kind: (gen.MODEL_FILES[name][0], name) for kind, name in names.items()}


def placeholder_files() -> dict[str, str]:
    """The examples' text encoders, which the runs replace (``TEXT_ENCODER_STAND_INS``): file name -> folder."""
    gen = load_tools_module("make_example_workflows")
    return {name: gen.MODEL_FILES[name][0] for name in (gen.T5XXL, gen.QWEN3_4B, gen.UMT5_XXL)}


def _dit_state_dict(kind: str, seed: int) -> dict:
    """A diffusion model file's state dict (bf16, keys as in the released files), or ``ModelUnavailable``."""
    import torch
    from comfy_harness import import_comfy, running_version

    import_comfy()
    import comfy.model_detection
    import comfy.supported_models

    class_name, configs = TINY_DITS[kind]
    config_cls = getattr(comfy.supported_models, class_name, None)
    if config_cls is None:
        raise ModelUnavailable(
            f"ComfyUI {running_version()} has no {class_name} model (comfy.supported_models.{class_name}): its "
            "loader cannot load this family"
        )
    for unet in configs:
        unet = _accepted(kind, unet)
        config = config_cls(dict(unet))
        config.unet_config.update(unet)
        config.set_inference_dtype(torch.bfloat16, None)
        net = config.get_model({}, device=torch.device("cpu")).diffusion_model
        shapes = {k: v.shape for k, v in net.state_dict().items()}
        found = comfy.model_detection.model_config_from_unet(shapes_only(shapes), "")
        if found is None or type(found).__name__ != class_name:
            continue
        loaded = found.get_model({}, "", device=torch.device("meta")).diffusion_model.state_dict()
        if {k: v.shape for k, v in loaded.items()} != shapes:
            continue
        _fill_random_(net, seed)
        return {k: v.contiguous() for k, v in net.state_dict().items()}
    raise ModelUnavailable(f"ComfyUI {running_version()}'s detection reads none of the tiny {kind} configs back")


def _accepted(kind: str, unet: dict) -> dict:
    """``unet`` without the keys this ComfyUI's model does not take (Flux's parameters grew between versions)."""
    if kind != "flux":
        return dict(unet)
    import dataclasses

    from comfy.ldm.flux.model import FluxParams

    names = {f.name for f in dataclasses.fields(FluxParams)} | {"image_model"}
    return {k: v for k, v in unet.items() if k in names}


class ModelUnavailable(RuntimeError):
    """The running ComfyUI's loaders cannot load this kind of model (the reason is the message)."""


def shapes_only(shapes: dict) -> dict:
    """A stand-in state dict for ``model_detection``: meta tensors of the right shapes (no memory)."""
    import torch

    return {k: torch.empty(shape, device="meta") for k, shape in shapes.items()}


def _clip_l_state_dict(seed: int) -> dict:
    import torch
    from comfy_harness import import_comfy

    import_comfy()
    import comfy.sd
    import comfy.sd1_clip

    encoder = comfy.sd1_clip.SDClipModel(device="cpu", dtype=torch.float16)
    _fill_random_(encoder, seed)
    sd = {k: v.contiguous() for k, v in encoder.transformer.state_dict().items()}
    if comfy.sd.detect_te_model(shapes_only({k: v.shape for k, v in sd.items()})) != comfy.sd.TEModel.CLIP_L:
        raise RuntimeError("the generated CLIP-L file is not detected as CLIP-L")
    return sd


def _vae_state_dict(kind: str, seed: int) -> dict:
    import torch
    from comfy_harness import import_comfy

    import_comfy()
    import comfy.sd

    if kind == "flux_vae":
        from comfy.ldm.models.autoencoder import AutoencodingEngine

        part = {"params": FLUX_VAE_CONFIG}
        vae = AutoencodingEngine(
            regularizer_config={"target": "comfy.ldm.models.autoencoder.DiagonalGaussianRegularizer"},
            encoder_config={"target": "comfy.ldm.modules.diffusionmodules.model.Encoder", **part},
            decoder_config={"target": "comfy.ldm.modules.diffusionmodules.model.Decoder", **part},
        )
    else:
        from comfy.ldm.wan.vae import WanVAE

        vae = WanVAE(**WAN21_VAE_CONFIG)
    _fill_random_(vae, seed, std=0.05)
    sd = {k: v.to(torch.float16).contiguous() for k, v in vae.state_dict().items()}
    loaded = comfy.sd.VAE(sd=dict(sd))  # ComfyUI's VAELoader path: it must build the same model from the keys
    if type(loaded.first_stage_model) is not type(vae) or loaded.latent_channels != 16:
        raise RuntimeError(f"ComfyUI reads the generated {kind} as {type(loaded.first_stage_model).__name__}")
    if {k: v.shape for k, v in loaded.first_stage_model.state_dict().items()} != {k: v.shape for k, v in sd.items()}:
        raise RuntimeError(f"ComfyUI builds another {kind} than the generated one")
    return sd


def model_cache_key(kind: str) -> str:
    """Changes whenever the generated file would: its config, ComfyUI version, this generator."""
    import hashlib

    root = find_comfyui()
    version = (root / "comfyui_version.py").read_text(encoding="utf-8") if root else ""
    config = {"sd15": TINY_SD15_UNET, "sdxl": TINY_SDXL_UNET, "flux_vae": FLUX_VAE_CONFIG,
              "wan21_vae": WAN21_VAE_CONFIG}.get(kind) or TINY_DITS.get(kind) or kind  # fmt: skip
    key = f"{kind}|{config!r}|{version}|{CHECKPOINT_FORMAT_VERSION}"
    return hashlib.sha256(key.encode()).hexdigest()[:16]


@dataclass
class TinyModels:
    """The generated files (kind -> path) and the kinds the running ComfyUI cannot load (kind -> why)."""

    paths: dict[str, Path]
    unavailable: dict[str, str]


def ensure_tiny_models(cache_dir: Path, kinds: tuple[str, ...] = MODEL_KINDS) -> TinyModels:
    """Tiny model files in ``cache_dir`` (generated once, in a subprocess so pytest's memory stays small)."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    paths = {kind: cache_dir / f"tiny_{kind}_{model_cache_key(kind)}.safetensors" for kind in kinds}

    def why_not(kind: str) -> Path:
        return paths[kind].with_suffix(".unavailable")

    missing = [kind for kind, path in paths.items() if not path.is_file() and not why_not(kind).is_file()]
    if missing:
        args = [sys.executable, str(Path(__file__).resolve()), "make-checkpoints"]
        args += [f"{kind}={paths[kind]}" for kind in missing]
        env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PACK_DIR), env.get("PYTHONPATH", "")) if p)
        result = subprocess.run(args, env=env, capture_output=True, text=True, timeout=1200)
        if result.returncode != 0:
            raise RuntimeError(f"generating tiny models failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}")
    unavailable = {kind: why_not(kind).read_text(encoding="utf-8") for kind in kinds if why_not(kind).is_file()}
    return TinyModels({k: p for k, p in paths.items() if k not in unavailable}, unavailable)


def write_tiny_model(path: Path, kind: str, seed: int = 0) -> Path:
    """Write the tiny file of ``kind`` to ``path``, checked as ComfyUI's loaders read it; where the running ComfyUI
    cannot load that kind, write the reason to ``path.with_suffix('.unavailable')`` instead."""
    import safetensors.torch

    if kind in ("sd15", "sdxl"):
        sd = build_tiny_checkpoint_state_dict(kind, seed)
        expected = {"sd15": "SD15", "sdxl": "SDXL"}[kind]
        found = detected_model_class(sd)
        if found != expected:
            raise RuntimeError(f"tiny {kind} checkpoint is detected as {found!r}, expected {expected!r}")
    elif kind in TINY_DITS:
        try:
            sd = _dit_state_dict(kind, seed)
        except ModelUnavailable as reason:
            path.with_suffix(".unavailable").write_text(str(reason), encoding="utf-8")
            return path
    elif kind == "clip_l":
        sd = _clip_l_state_dict(seed)
    elif kind in ("flux_vae", "wan21_vae"):
        sd = _vae_state_dict(kind, seed)
    else:
        raise ValueError(f"unknown model kind {kind!r}; known: {MODEL_KINDS}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".partial")
    safetensors.torch.save_file(sd, str(tmp))
    tmp.replace(path)
    return path


def write_placeholder(path: Path) -> Path:
    """A file that only lists a model name to the frontend; the runs never load it (``TEXT_ENCODER_STAND_INS``)."""
    import safetensors.torch
    import torch

    metadata = {"comfyui_reuse_test": "placeholder: listed for the frontend, never loaded"}
    safetensors.torch.save_file({"placeholder": torch.zeros(1)}, str(path), metadata=metadata)
    return path


# --------------------------------------------------------------------------------------------------
# Server process


def free_port() -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ComfyUI's model folders the examples load from (the folder names of ``folder_paths`` in every tested version).
MODEL_FOLDERS = ("checkpoints", "diffusion_models", "text_encoders", "vae")


@dataclass
class ServerDirs:
    """Temporary ComfyUI tree: everything the server may write lives here."""

    root: Path
    base: Path = field(init=False)
    models: Path = field(init=False)
    custom_nodes: Path = field(init=False)

    def __post_init__(self):
        self.base = self.root / "base"
        self.models = self.root / "models"
        self.custom_nodes = self.root / "custom_nodes"
        # ``base`` stands in for the ComfyUI checkout's own folders (its empty custom_nodes/ and models/).
        folders = ("base/custom_nodes", "base/models", "input", "output", "temp", "user", "custom_nodes",
                   *(f"models/{folder}" for folder in MODEL_FOLDERS))  # fmt: skip
        for name in folders:
            (self.root / name).mkdir(parents=True, exist_ok=True)
        link = self.custom_nodes / PACK_FOLDER_NAME
        if not link.exists():
            link.symlink_to(PACK_DIR, target_is_directory=True)

    @property
    def output(self) -> Path:
        return self.root / "output"

    def model_path(self, folder: str, name: str) -> Path:
        return self.models / folder / name

    def write_extra_model_paths(self) -> Path:
        yaml_path = self.root / "extra_model_paths.yaml"
        lines = ["comfyui_reuse_test:", *(f"    {folder}: {self.models / folder}" for folder in MODEL_FOLDERS)]
        lines.append(f"    custom_nodes: {self.custom_nodes}")
        yaml_path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        return yaml_path


class ComfyServer:
    """``python main.py --cpu`` on a loopback port, started and stopped by the test that owns it."""

    def __init__(self, dirs: ServerDirs, port: int | None = None, startup_timeout: float = 180.0):
        self.dirs = dirs
        self.port = port or free_port()
        self.startup_timeout = startup_timeout
        self.process: subprocess.Popen | None = None
        self.log_path = dirs.root / "server.log"
        self.client_id = uuid.uuid4().hex
        # model file name -> why this ComfyUI cannot load it (the file is a placeholder); filled by the fixture
        self.unavailable: dict[str, str] = {}

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        root = find_comfyui()
        d = self.dirs.root
        return [
            sys.executable, str(root / "main.py"),
            "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
            "--base-directory", str(self.dirs.base),
            "--output-directory", str(d / "output"),
            "--input-directory", str(d / "input"),
            "--temp-directory", str(d / "temp"),
            "--user-directory", str(d / "user"),
            "--database-url", "sqlite:///:memory:",
            "--extra-model-paths-config", str(self.dirs.write_extra_model_paths()),
            "--disable-auto-launch", "--disable-api-nodes", "--preview-method", "none",
            *self.cache_arguments(root),
        ]  # fmt: skip

    @staticmethod
    def cache_arguments(root: Path) -> list[str]:
        """Keep loaders and text encodings cached across prompts (every test prompt shares them), within the machine's
        memory: where ComfyUI has its RAM-pressure cache (0.33.0's default), that cache, which drops old models first
        when free memory runs short (the examples' tiny models take ~10 GB in memory there, Z-Image's 4.4 GB of them);
        else (0.3.64) an LRU cache of 64 node results (the server peaks at ~8 GB)."""
        if "--cache-ram" in (root / "comfy" / "cli_args.py").read_text(encoding="utf-8"):
            return []
        return ["--cache-lru", "64"]

    def environment(self) -> dict:
        env = dict(os.environ)
        env["PYTHONDONTWRITEBYTECODE"] = "1"  # never write __pycache__ into the ComfyUI checkout
        # One torch thread: the tiny models run thousands of small ops, where a second thread only adds
        # synchronisation; on a busy 2-core machine 2 threads measured 6-8x slower per U-Net call.
        env["OMP_NUM_THREADS"] = os.environ.get("COMFYUI_REUSE_SERVER_THREADS", "1")
        paths = [env.get("PYTHONPATH", "")]
        if standins_needed():
            # ComfyUI imports torchvision/torchaudio at module level; the stand-ins only satisfy those imports.
            paths.insert(0, str(STANDIN_DIR))
        env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
        return env

    def start(self) -> ComfyServer:
        log = open(self.log_path, "wb")  # noqa: SIM115  (closed in stop())
        self.process = subprocess.Popen(
            self.command(), cwd=str(self.dirs.root), env=self.environment(), stdout=log, stderr=subprocess.STDOUT
        )
        self._log = log
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.process.returncode} during startup:\n{self.log_tail()}")
            try:
                self.get_json("/system_stats", timeout=2)
                return self
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                time.sleep(0.5)
        raise RuntimeError(f"ComfyUI did not answer within {self.startup_timeout:.0f} s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=20)
        if getattr(self, "_log", None) is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> ComfyServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def log_tail(self, chars: int = 6000) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")[-chars:]
        except OSError:
            return "<no server log>"

    # ---- HTTP ----

    def _request(self, method: str, path: str, body: dict | None = None, timeout: float = 30) -> tuple[int, bytes]:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as err:
            return err.code, err.read()

    def get_json(self, path: str, timeout: float = 30):
        status, payload = self._request("GET", path, timeout=timeout)
        if status != 200:
            raise RuntimeError(f"GET {path} -> {status}: {payload[:500]!r}")
        return json.loads(payload)

    def get_bytes(self, path: str, timeout: float = 30) -> bytes:
        status, payload = self._request("GET", path, timeout=timeout)
        if status != 200:
            raise RuntimeError(f"GET {path} -> {status}")
        return payload

    def post_prompt(self, prompt: dict) -> tuple[int, dict]:
        """``POST /prompt``; returns (HTTP status, JSON answer) without raising on 400."""
        status, payload = self._request("POST", "/prompt", {"prompt": prompt, "client_id": self.client_id})
        return status, json.loads(payload)

    def wait_for_history(self, prompt_id: str, timeout: float = 180.0) -> dict:
        """Poll ``/history/<id>`` until the prompt finished (successfully or not); returns its entry."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI died while running {prompt_id}:\n{self.log_tail()}")
            history = self.get_json(f"/history/{prompt_id}")
            entry = history.get(prompt_id)
            if entry and entry.get("status", {}).get("completed") is not None:
                status = entry["status"]
                if status.get("status_str") in ("success", "error"):
                    return entry
            time.sleep(0.25)
        raise TimeoutError(f"prompt {prompt_id} not finished after {timeout:.0f} s:\n{self.log_tail()}")


def history_images(entry: dict) -> list[dict]:
    """Every image record (filename, subfolder, type) in a ``/history`` entry's outputs."""
    return [image for output in entry.get("outputs", {}).values() for image in output.get("images", [])]


def history_error(entry: dict) -> str | None:
    """The execution error message in a ``/history`` entry, if the prompt failed."""
    for kind, data in entry.get("status", {}).get("messages", []):
        if kind == "execution_error":
            return f"{data.get('node_type')} (node {data.get('node_id')}): {data.get('exception_message')}"
    if entry.get("status", {}).get("status_str") == "error":
        return "prompt failed without an execution_error message"
    return None


# Test-time speed settings: a 64x64 image (8x8 latent), 5 video frames (2 latent frames) and few steps; the pack nodes'
# own settings are left as the example ships them (they scale with the step count).
TEST_IMAGE_SIZE = 64
TEST_VIDEO_LENGTH = 5
TEST_STEPS = 6
REPO_DIR = PACK_DIR
EXAMPLES_DIR = PACK_DIR / "example_workflows"
PACK_NODE_TYPES = ("AttentionMapReuse", "EncoderFeaturePropagation")
# The latent sources whose size the tests shrink, and the nodes that sample (their step counts are capped).
LATENT_NODES = ("EmptyLatentImage", "EmptySD3LatentImage", "EmptyHunyuanLatentVideo")
STEP_NODES = ("KSampler", "KSamplerAdvanced", "ReuseCalibrate")
# The output nodes whose images (animated WebP included) the tests look for.
IMAGE_OUTPUT_NODES = ("SaveImage", "PreviewImage", "SaveAnimatedWEBP")


def example_workflow_paths() -> list[Path]:
    return sorted(EXAMPLES_DIR.glob("*.json"))


def shrink_prompt(prompt: dict, size: int = TEST_IMAGE_SIZE, steps: int = TEST_STEPS) -> dict:
    """A copy of an API prompt with small latents and few sampler steps (and nothing else changed)."""
    out = json.loads(json.dumps(prompt))
    for node in out.values():
        inputs = node["inputs"]
        if node["class_type"] in LATENT_NODES:
            inputs["width"] = inputs["height"] = size
            if "length" in inputs:
                inputs["length"] = TEST_VIDEO_LENGTH
        if node["class_type"] in STEP_NODES and not isinstance(inputs.get("steps"), list):
            inputs["steps"] = min(inputs["steps"], steps)
    return out


def text_encoder_stand_ins(prompt: dict) -> dict[str, dict]:
    """node id -> the inputs that load the stand-in text encoder (``TEXT_ENCODER_STAND_INS``), for every loader of a
    text encoder the runs cannot load."""
    placeholders = set(placeholder_files())
    changes = {}
    for node_id, node in prompt.items():
        stand_in = TEXT_ENCODER_STAND_INS.get(node["class_type"])
        if stand_in and placeholders & {v for v in node["inputs"].values() if isinstance(v, str)}:
            changes[node_id] = dict(stand_in)
    return changes


def run_prompt(prompt: dict) -> dict:
    """The prompt the tests run for an example: shrunk (``shrink_prompt``) and with the stand-in text encoder."""
    out = shrink_prompt(prompt)
    for node_id, inputs in text_encoder_stand_ins(out).items():
        out[node_id]["inputs"].update(inputs)
    return out


def unloadable_models(prompt: dict, unavailable: dict[str, str]) -> dict[str, str]:
    """The model files ``prompt`` loads that this ComfyUI cannot load (file name -> why)."""
    names = {v for node in prompt.values() for v in node["inputs"].values() if isinstance(v, str)}
    return {name: why for name, why in unavailable.items() if name in names}


def load_tools_module(name: str):
    """Import a module from the repository's ``tools/`` folder (not a package)."""
    import importlib

    tools = str(REPO_DIR / "tools")
    if tools not in sys.path:
        sys.path.insert(0, tools)
    return importlib.import_module(name)


def _main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[0] != "make-checkpoints":
        print("usage: server_support.py make-checkpoints KIND=PATH [KIND=PATH ...]", file=sys.stderr)
        return 2
    for item in argv[1:]:
        kind, _, path = item.partition("=")
        write_tiny_model(Path(path), kind)
    return 0


if __name__ == "__main__":
    raise SystemExit(_main(sys.argv[1:]))
