"""comfyui-reuse: ComfyUI entry point (V3 schema).

Only ``comfy_entrypoint`` is exported: ComfyUI's loader ignores the V3 entry point of a
pack that also exports ``NODE_CLASS_MAPPINGS``. The node modules are imported when ComfyUI
calls the entry point, so importing this package outside ComfyUI (a tool or a test; pytest
itself never imports this file, ``tests/conftest.py``) does not need ``comfy_api``.

An unsupported ComfyUI gets one message, no traceback (``nodes.comfy_version``). The entry point raises it:
ComfyUI logs an exception from ``comfy_entrypoint`` as that one line (one from the package import comes with
its traceback). A ComfyUI without ``comfy_api.latest`` has a loader that never calls the entry point, so
there the import logs the message, and the loader then skips the pack for lacking ``NODE_CLASS_MAPPINGS``.
"""

import logging
import sys

from .nodes.comfy_version import has_v3_api, require_supported_comfyui, unsupported_reason

if "comfy" in sys.modules and not has_v3_api():  # an old ComfyUI, not an import outside ComfyUI
    logging.error(unsupported_reason())


async def comfy_entrypoint():
    require_supported_comfyui()
    from .nodes.extension import ReuseExtension

    return ReuseExtension()


__all__ = ["comfy_entrypoint"]
