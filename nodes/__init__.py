"""ComfyUI glue for comfyui-reuse: V3 node schemas and model-patcher wrappers. No math here.

Imports nothing from ComfyUI, so that ``comfy_version`` can check the running ComfyUI before any of its APIs is
imported (the extension is in ``extension``).
"""
