"""Session fixtures for the real-server tests, shared by ``test_server_workflows.py`` and
``test_browser_ui.py`` (both load this plugin with ``pytest_plugins = ["server_fixtures"]``), so one
ComfyUI server and one set of tiny model files serve the whole session."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from comfy_harness import require_comfyui
from server_support import (
    ComfyServer,
    ServerDirs,
    ensure_tiny_models,
    model_files,
    placeholder_files,
    server_unavailable_reason,
    write_placeholder,
)


@pytest.fixture(scope="session")
def comfy_server(tmp_path_factory):
    """The real ComfyUI server with the pack and every model file the examples name: tiny SD1.5/SDXL checkpoints,
    tiny Flux, Z-Image and Wan 2.1 diffusion models, CLIP-L, the Flux and Wan VAEs, under the examples' file names.
    A file this ComfyUI cannot load, and the examples' big text encoders, are placeholders (listed, never loaded);
    ``server.unavailable`` says why, per file name. Stopped at the end of the session (``finally``), also when a test
    fails. ``COMFYUI_REUSE_CHECKPOINT_CACHE`` keeps the generated files across sessions."""
    require_comfyui(server_unavailable_reason())
    dirs = ServerDirs(tmp_path_factory.mktemp("comfyui_server"))
    kept_cache = os.environ.get("COMFYUI_REUSE_CHECKPOINT_CACHE")
    cache = Path(kept_cache) if kept_cache else tmp_path_factory.mktemp("tiny_checkpoints")
    server = ComfyServer(dirs)
    try:
        models = ensure_tiny_models(cache)
        server.unavailable = {}
        for kind, (folder, name) in model_files().items():
            if kind in models.paths:
                dirs.model_path(folder, name).symlink_to(models.paths[kind])
            else:
                write_placeholder(dirs.model_path(folder, name))
                server.unavailable[name] = models.unavailable[kind]
        for name, folder in placeholder_files().items():
            write_placeholder(dirs.model_path(folder, name))
        server.start()
        yield server
    finally:
        server.stop()
        if not kept_cache:  # ~4-5 GB; pytest would keep it in its last three base temp dirs
            shutil.rmtree(cache, ignore_errors=True)


@pytest.fixture(scope="session")
def object_info(comfy_server):
    """``GET /object_info`` of the running server."""
    return comfy_server.get_json("/object_info")
