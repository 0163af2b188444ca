"""Session fixtures for the real-server tests, shared by ``test_server_workflows.py`` and
``test_browser_ui.py`` (both load this plugin with ``pytest_plugins = ["server_fixtures"]``), so one
ComfyUI server and one set of tiny checkpoints serve the whole session."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from comfy_harness import require_comfyui
from server_support import CHECKPOINT_NAMES, ComfyServer, ServerDirs, ensure_tiny_checkpoints, server_unavailable_reason


@pytest.fixture(scope="session")
def comfy_server(tmp_path_factory):
    """The real ComfyUI server with the pack and tiny SD1.5/SDXL checkpoints; stopped at the end of the session
    (``finally``), also when a test fails. ``COMFYUI_REUSE_CHECKPOINT_CACHE`` keeps the checkpoints across
    sessions."""
    require_comfyui(server_unavailable_reason())
    dirs = ServerDirs(tmp_path_factory.mktemp("comfyui_server"))
    kept_cache = os.environ.get("COMFYUI_REUSE_CHECKPOINT_CACHE")
    cache = Path(kept_cache) if kept_cache else tmp_path_factory.mktemp("tiny_checkpoints")
    server = ComfyServer(dirs)
    try:
        for kind, path in ensure_tiny_checkpoints(cache, ("sd15", "sdxl")).items():
            (dirs.checkpoints / CHECKPOINT_NAMES[kind]).symlink_to(path)
        server.start()
        yield server
    finally:
        server.stop()
        if not kept_cache:  # ~2.3 GB; pytest would keep it in its last three base temp dirs
            shutil.rmtree(cache, ignore_errors=True)


@pytest.fixture(scope="session")
def object_info(comfy_server):
    """``GET /object_info`` of the running server."""
    return comfy_server.get_json("/object_info")
