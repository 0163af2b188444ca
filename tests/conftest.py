import pytest
import torch
from comfy_harness import comfyui_unavailable_reason, require_comfyui

# Tests that need these fixtures need real ComfyUI: they get the ``comfyui`` marker without saying so, so that
# ``pytest -m "not comfyui"`` is the quick inner loop.
COMFYUI_FIXTURES = {"comfy", "comfy_server", "object_info", "page"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if COMFYUI_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.comfyui)


@pytest.fixture(scope="session")
def comfy():
    """Real ComfyUI imported in CPU mode; skips with the reason when it is absent (fails under CI)."""
    require_comfyui(comfyui_unavailable_reason())
    from comfy_harness import import_comfy

    return import_comfy()


@pytest.fixture
def runs(comfy):
    """A ``run_records.RunRecorder`` active for the test: what every run of either node did, from its stats."""
    from run_records import RunRecorder

    with RunRecorder() as recorder:
        yield recorder


@pytest.fixture(autouse=True)
def single_torch_thread():
    """Every test starts on one torch thread, even after a test ran ``reuse_bench.main`` (which sets its own).

    The test models are tiny: one thread is faster than two (OpenMP barriers dominate, badly so on a busy 2-core
    CI machine), and it keeps results independent of the machine's thread count.
    """
    torch.set_num_threads(1)
