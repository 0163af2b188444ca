"""Real ComfyUI server for end-to-end tests: tiny checkpoints, an isolated server process, an HTTP client.

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

# The names users have on disk, so the example workflows run unchanged against the tiny files.
CHECKPOINT_NAMES = {"sd15": "v1-5-pruned-emaonly.safetensors", "sdxl": "sd_xl_base_1.0.safetensors"}
PACK_FOLDER_NAME = "comfyui-reuse"
# Bump when build_tiny_checkpoint_state_dict changes what it writes (invalidates cached files).
CHECKPOINT_FORMAT_VERSION = 1

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


def checkpoint_cache_key(kind: str) -> str:
    """Changes whenever the generated file would: tiny config, ComfyUI version, this generator."""
    import hashlib

    root = find_comfyui()
    version = (root / "comfyui_version.py").read_text(encoding="utf-8") if root else ""
    config = TINY_SD15_UNET if kind == "sd15" else TINY_SDXL_UNET
    key = f"{kind}|{sorted(config.items())}|{version}|{CHECKPOINT_FORMAT_VERSION}"
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def ensure_tiny_checkpoints(cache_dir: Path, kinds: tuple[str, ...]) -> dict[str, Path]:
    """Tiny checkpoints in ``cache_dir`` (generated once, in a subprocess so pytest's memory stays small)."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    paths = {kind: cache_dir / f"tiny_{kind}_{checkpoint_cache_key(kind)}.safetensors" for kind in kinds}
    missing = [kind for kind, path in paths.items() if not path.is_file()]
    if missing:
        args = [sys.executable, str(Path(__file__).resolve()), "make-checkpoints"]
        args += [f"{kind}={paths[kind]}" for kind in missing]
        env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PACK_DIR), env.get("PYTHONPATH", "")) if p)
        result = subprocess.run(args, env=env, capture_output=True, text=True, timeout=900)
        if result.returncode != 0:
            raise RuntimeError(f"generating tiny checkpoints failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}")
    return paths


def write_tiny_checkpoint(path: Path, kind: str, seed: int = 0) -> Path:
    """Write the tiny checkpoint to ``path`` (fp16 safetensors) and check ComfyUI detects the right family."""
    import safetensors.torch

    sd = build_tiny_checkpoint_state_dict(kind, seed)
    expected = {"sd15": "SD15", "sdxl": "SDXL"}[kind]
    found = detected_model_class(sd)
    if found != expected:
        raise RuntimeError(f"tiny {kind} checkpoint is detected as {found!r}, expected {expected!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".partial")
    safetensors.torch.save_file(sd, str(tmp))
    tmp.replace(path)
    return path


# --------------------------------------------------------------------------------------------------
# Server process


def free_port() -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class ServerDirs:
    """Temporary ComfyUI tree: everything the server may write lives here."""

    root: Path
    base: Path = field(init=False)
    checkpoints: Path = field(init=False)
    custom_nodes: Path = field(init=False)

    def __post_init__(self):
        self.base = self.root / "base"
        self.checkpoints = self.root / "models" / "checkpoints"
        self.custom_nodes = self.root / "custom_nodes"
        # ``base`` stands in for the ComfyUI checkout's own folders (its empty custom_nodes/ and models/).
        folders = ("base/custom_nodes", "base/models", "input", "output", "temp", "user", "models/checkpoints",
                   "custom_nodes")  # fmt: skip
        for name in folders:
            (self.root / name).mkdir(parents=True, exist_ok=True)
        link = self.custom_nodes / PACK_FOLDER_NAME
        if not link.exists():
            link.symlink_to(PACK_DIR, target_is_directory=True)

    @property
    def output(self) -> Path:
        return self.root / "output"

    def write_extra_model_paths(self) -> Path:
        yaml_path = self.root / "extra_model_paths.yaml"
        yaml_path.write_text(
            f"comfyui_reuse_test:\n    checkpoints: {self.checkpoints}\n    custom_nodes: {self.custom_nodes}\n",
            encoding="utf-8",
        )
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
            # keep loaders and text encodings cached across prompts: every test prompt shares them
            "--cache-lru", "64",
        ]  # fmt: skip

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


# Test-time speed settings: a 64x64 image (8x8 latent) and few steps; the pack nodes' own settings are
# left as the example ships them (they scale with the step count).
TEST_IMAGE_SIZE = 64
TEST_STEPS = 6
REPO_DIR = PACK_DIR
EXAMPLES_DIR = PACK_DIR / "example_workflows"
PACK_NODE_TYPES = ("AttentionMapReuse", "EncoderFeaturePropagation")


def example_workflow_paths() -> list[Path]:
    return sorted(EXAMPLES_DIR.glob("*.json"))


def shrink_prompt(prompt: dict, size: int = TEST_IMAGE_SIZE, steps: int = TEST_STEPS) -> dict:
    """A copy of an API prompt with small latents and few sampler steps (and nothing else changed)."""
    out = json.loads(json.dumps(prompt))
    for node in out.values():
        inputs = node["inputs"]
        if node["class_type"] == "EmptyLatentImage":
            inputs["width"] = inputs["height"] = size
        if node["class_type"] in ("KSampler", "KSamplerAdvanced") and not isinstance(inputs.get("steps"), list):
            inputs["steps"] = min(inputs["steps"], steps)
    return out


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
        write_tiny_checkpoint(Path(path), kind)
    return 0


if __name__ == "__main__":
    raise SystemExit(_main(sys.argv[1:]))
