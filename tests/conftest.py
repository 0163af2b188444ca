import pytest
import torch
from comfy_harness import comfyui_unavailable_reason


@pytest.fixture(scope="session")
def comfy():
    """Real ComfyUI imported in CPU mode; skips with the reason when it is absent."""
    reason = comfyui_unavailable_reason()
    if reason:
        pytest.skip(reason)
    from comfy_harness import import_comfy

    return import_comfy()


@pytest.fixture(autouse=True)
def single_torch_thread():
    """Every test starts on one torch thread, even after a test ran ``reuse_bench.main`` (which sets its own).

    The test models are tiny: one thread is faster than two (OpenMP barriers dominate, badly so on a busy 2-core
    CI machine), and it keeps results independent of the machine's thread count.
    """
    torch.set_num_threads(1)
