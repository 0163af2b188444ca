"""ComfyUI glue for comfyui-reuse: V3 node schemas and model-patcher wrappers. No math here."""

from comfy_api.latest import ComfyExtension, io


class ReuseExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        from .attention_reuse import AttentionMapReuse
        from .encoder_propagation import EncoderFeaturePropagation

        return [AttentionMapReuse, EncoderFeaturePropagation]
