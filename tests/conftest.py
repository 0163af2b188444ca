import pytest

from comfy_harness import comfyui_unavailable_reason


@pytest.fixture(scope="session")
def comfy():
    """Real ComfyUI imported in CPU mode; skips with the reason when it is absent."""
    reason = comfyui_unavailable_reason()
    if reason:
        pytest.skip(reason)
    from comfy_harness import import_comfy

    return import_comfy()
