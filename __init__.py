"""comfyui-reuse: ComfyUI entry point (V3 schema).

Only ``comfy_entrypoint`` is exported: ComfyUI's loader ignores the V3 entry point of a
pack that also exports ``NODE_CLASS_MAPPINGS``.
"""

from .nodes import comfy_entrypoint

__all__ = ["comfy_entrypoint"]
