"""The supported-ComfyUI check (nodes/comfy_version.py and the package entry point), on fake ComfyUI modules:
no old ComfyUI tree needed."""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import re
import sys
import types
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACK = "_reuse_pack_under_version_test"  # never ``nodes``: that top-level name belongs to ComfyUI's nodes.py


def _load(name: str, path: Path, package_dir: Path | None = None):
    locations = [str(package_dir)] if package_dir else None
    spec = importlib.util.spec_from_file_location(name, path, submodule_search_locations=locations)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def cv():
    yield _load(f"{PACK}_comfy_version", REPO / "nodes" / "comfy_version.py")
    sys.modules.pop(f"{PACK}_comfy_version", None)


@pytest.fixture
def fake_comfyui(monkeypatch):
    """Install a fake ComfyUI: ``fake_comfyui(version, v3_api=True, outer_sample=True)``; None = absent."""

    def install(version, v3_api=True, outer_sample=True):
        version_module = None
        if version is not None:
            version_module = types.ModuleType("comfyui_version")
            version_module.__version__ = version
        patcher_extension = types.ModuleType("comfy.patcher_extension")
        patcher_extension.WrappersMP = type("WrappersMP", (), {"OUTER_SAMPLE": "outer_sample"} if outer_sample else {})
        monkeypatch.setitem(sys.modules, "comfyui_version", version_module)  # None makes the import fail
        monkeypatch.setitem(sys.modules, "comfy_api.latest", types.ModuleType("comfy_api.latest") if v3_api else None)
        monkeypatch.setitem(sys.modules, "comfy.patcher_extension", patcher_extension)
        monkeypatch.setitem(sys.modules, "comfy", types.ModuleType("comfy"))

    return install


@pytest.fixture
def pack():
    """Import the repository as a fresh package (like ComfyUI's loader does): ``pack()`` returns the module."""
    yield lambda: _load(PACK, REPO / "__init__.py", REPO)
    for name in [m for m in sys.modules if m == PACK or m.startswith(PACK + ".")]:
        del sys.modules[name]


EXPECTED = "comfyui-reuse needs ComfyUI >= 0.3.64 (tested on 0.3.64 and 0.33.0); found {}: update ComfyUI"


@pytest.mark.parametrize("version", ["0.3.64", "0.3.100", "0.33.0", "1.0.0rc1"])
def test_supported_versions_pass(cv, fake_comfyui, version):
    fake_comfyui(version)
    assert cv.unsupported_reason() is None
    cv.require_supported_comfyui()


@pytest.mark.parametrize("version", ["0.3.63", "0.3.9", "0.2.99"])
def test_older_version_is_named_with_the_minimum(cv, fake_comfyui, version):
    fake_comfyui(version)  # even where the APIs happen to exist: the version is what was tested
    assert cv.unsupported_reason() == EXPECTED.format(version)
    with pytest.raises(RuntimeError, match=re.escape(EXPECTED.format(version))):
        cv.require_supported_comfyui()


def test_missing_api_is_refused_whatever_the_version_says(cv, fake_comfyui):
    fake_comfyui("0.3.50", v3_api=False, outer_sample=False)
    assert cv.unsupported_reason() == EXPECTED.format("0.3.50")
    fake_comfyui("0.3.64", outer_sample=False)
    assert cv.unsupported_reason() == EXPECTED.format("0.3.64 without comfy.patcher_extension.WrappersMP.OUTER_SAMPLE")
    fake_comfyui(None, v3_api=False)
    assert cv.unsupported_reason() == EXPECTED.format("an unknown version without comfy_api.latest")


def test_unknown_version_with_the_apis_passes(cv, fake_comfyui):
    fake_comfyui(None)
    assert cv.unsupported_reason() is None
    fake_comfyui("unknown")
    assert cv.unsupported_reason() is None


def test_entry_point_raises_the_message_for_an_old_v3_comfyui(fake_comfyui, pack):
    # ComfyUI logs an exception from comfy_entrypoint as one line: the message, no traceback.
    fake_comfyui("0.3.50")
    module = pack()
    with pytest.raises(RuntimeError, match=re.escape(EXPECTED.format("0.3.50"))):
        asyncio.run(module.comfy_entrypoint())


def test_import_logs_the_message_where_the_loader_predates_the_entry_point(fake_comfyui, pack, caplog):
    fake_comfyui("0.3.40", v3_api=False)
    with caplog.at_level(logging.ERROR):
        pack()
    assert [r.getMessage() for r in caplog.records] == [EXPECTED.format("0.3.40")]


def test_import_outside_comfyui_checks_nothing(fake_comfyui, pack, monkeypatch, caplog):
    fake_comfyui(None, v3_api=False)
    monkeypatch.delitem(sys.modules, "comfy")  # a tool or a test importing the pack outside ComfyUI
    with caplog.at_level(logging.ERROR):
        assert callable(pack().comfy_entrypoint)
    assert caplog.records == []


def test_pyproject_states_the_same_minimum(cv):
    text = (REPO / "pyproject.toml").read_text(encoding="utf-8")
    assert re.search(r'^requires-comfyui = ">=(\S+)"', text, re.M).group(1) == ".".join(map(str, cv.MINIMUM))
    assert f"tested on {' and '.join(cv.TESTED)}" in text


def test_the_message_names_the_versions_the_tests_run_on(cv):
    from reuse_bench.comfyui_env import TESTED_VERSIONS

    assert tuple(f"v{v}" for v in cv.TESTED) == TESTED_VERSIONS  # one environment per version (scripts/venv.sh)


def test_real_comfyui_is_supported(comfy, cv):
    assert cv.unsupported_reason() is None
