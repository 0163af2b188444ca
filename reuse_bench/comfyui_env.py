"""Find, import and prepare real ComfyUI in this process: the one place the tests and the bench do it.

ComfyUI is looked up in an explicit path, then ``COMFYUI_PATH``, then the upstream trees beside the repository
(``../shared/comfyui/<version>``, newest first), then the parent of the ``custom_nodes/`` folder the pack sits in.
It is imported in CPU mode without writing bytecode, with its folders (input, models, ...) in a temporary base
directory (the trees may be read-only), and with import-only stand-ins for torchvision/torchaudio when the real ones
cannot load beside the pinned CPU torch (``comfyui_standins/``).
"""

from __future__ import annotations

import atexit
import importlib.util
import os
import shutil
import sys
import tempfile
import warnings
from functools import cache
from pathlib import Path

REPO_DIR = Path(__file__).resolve().parents[1]
STANDIN_DIR = Path(__file__).resolve().parent / "comfyui_standins"
SHARED_TREES = REPO_DIR.parent / "shared" / "comfyui"
PACK_MODULE = "comfyui_reuse"
# The versions the pack is tested on: those with pinned requirements (scripts/venv.sh builds one environment each);
# each has its own tree in SHARED_TREES.
TESTED_VERSIONS = tuple(
    sorted(
        (p.stem.removeprefix("comfyui-") for p in (REPO_DIR / "requirements").glob("comfyui-v*.txt")),
        key=lambda v: tuple(int(n) for n in v[1:].split(".")),
    )
)


def is_comfyui(path: Path) -> bool:
    return (path / "comfy" / "model_patcher.py").is_file() and (path / "comfy_api").is_dir()


def _given(explicit: str | os.PathLike | None) -> list[Path]:
    return [Path(p) for p in (explicit, os.environ.get("COMFYUI_PATH")) if p]


def _defaults() -> list[Path]:
    found = [SHARED_TREES / version for version in reversed(TESTED_VERSIONS)]
    if REPO_DIR.parent.name == "custom_nodes":
        found.append(REPO_DIR.parent.parent)
    return found


def candidates(explicit: str | os.PathLike | None = None) -> list[Path]:
    return _given(explicit) + _defaults()


def find_comfyui(explicit: str | os.PathLike | None = None) -> Path | None:
    """The ComfyUI tree to use; an explicit path or ``COMFYUI_PATH`` that is not a ComfyUI tree is an error."""
    for path in _given(explicit):
        if not is_comfyui(path):
            raise FileNotFoundError(f"COMFYUI_PATH / --comfyui: {path} is not a ComfyUI checkout (no comfy/)")
        return path.resolve()
    for path in _defaults():
        if is_comfyui(path):
            return path.resolve()
    return None


def comfyui_version(root: Path) -> str:
    text = (root / "comfyui_version.py").read_text() if (root / "comfyui_version.py").is_file() else ""
    for line in text.splitlines():
        if line.startswith("__version__"):
            return line.split("=", 1)[1].strip().strip("\"'")
    return "unknown"


def _importable(name: str) -> bool:
    try:
        importlib.import_module(name)
    except Exception:
        for module in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
            del sys.modules[module]
        return False
    return True


@cache
def standins_needed() -> tuple[str, ...]:
    """The packages ComfyUI imports that cannot load here (they get import-only stand-ins)."""
    return tuple(name for name in ("torchvision", "torchaudio") if not _importable(name))


@cache
def import_comfy(explicit: str | os.PathLike | None = None, *, fused_attention: bool = False, cpu: bool = True):
    """Import ComfyUI in CPU mode (once per process) and return the ``comfy`` package.

    ``fused_attention``: use PyTorch SDPA (what GPU users get) instead of ComfyUI's CPU default (sub-quadratic):
    the bench times against it. It is fixed at ComfyUI's import, so a second call asking otherwise warns.
    ``cpu=False`` lets ComfyUI pick its device as it does when started (``reuse_bench.gpu_check`` on a GPU); like
    the attention, it is fixed at the first import.
    """
    if "comfy.model_patcher" in sys.modules:
        import comfy
        import comfy.cli_args

        if fused_attention and not comfy.cli_args.args.use_pytorch_cross_attention:
            warnings.warn(
                "ComfyUI was imported before with its CPU attention default, not PyTorch SDPA; timings would use "
                "it: run the benchmark in a fresh process",
                stacklevel=2,
            )
        return comfy
    root = find_comfyui(explicit)
    if root is None:
        looked = ", ".join(str(p) for p in candidates(explicit))
        raise FileNotFoundError(f"real ComfyUI not found (looked in: {looked}); set COMFYUI_PATH to a ComfyUI tree")
    sys.dont_write_bytecode = True  # the upstream trees may be read-only; never write into them
    if standins_needed():
        sys.path.insert(0, str(STANDIN_DIR))
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    import comfy.cli_args

    comfy.cli_args.args.cpu = cpu
    comfy.cli_args.args.use_pytorch_cross_attention = fused_attention
    if not comfy.cli_args.args.base_directory:
        # folder_paths creates <base>/input at import; by default <base> is the (read-only, upstream) tree.
        base = tempfile.mkdtemp(prefix="comfyui-reuse-base-")
        atexit.register(shutil.rmtree, base, ignore_errors=True)
        comfy.cli_args.args.base_directory = base
    import comfy.model_management  # after the CPU flag
    import comfy.model_patcher
    import comfy.sample
    import comfy.samplers

    return comfy


def load_pack():
    """Import the repository as the custom-node package ComfyUI would load (``comfyui_reuse``)."""
    import_comfy()
    if PACK_MODULE in sys.modules:
        return sys.modules[PACK_MODULE]
    spec = importlib.util.spec_from_file_location(
        PACK_MODULE, REPO_DIR / "__init__.py", submodule_search_locations=[str(REPO_DIR)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACK_MODULE] = module
    spec.loader.exec_module(module)
    return module
