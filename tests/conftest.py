import pytest
import torch
from comfy_harness import comfyui_unavailable_reason

# The test models are tiny: one thread is faster than two (OpenMP barriers dominate, badly so on a busy
# 2-core CI machine), and it keeps results independent of the machine's thread count.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def comfy():
    """Real ComfyUI imported in CPU mode; skips with the reason when it is absent."""
    reason = comfyui_unavailable_reason()
    if reason:
        pytest.skip(reason)
    from comfy_harness import import_comfy

    return import_comfy()
