"""comfyui-reuse: ComfyUI entry point (V3 schema).

Only ``comfy_entrypoint`` is exported: ComfyUI's loader ignores the V3 entry point of a
pack that also exports ``NODE_CLASS_MAPPINGS``. The node modules are imported when ComfyUI
calls the entry point, so importing this package outside ComfyUI (pytest collects the repo
root as a package) does not need ``comfy_api``.
"""


async def comfy_entrypoint():
    from .nodes import ReuseExtension

    return ReuseExtension()


__all__ = ["comfy_entrypoint"]
