"""The pack's V3 extension: the node list ComfyUI asks ``comfy_entrypoint`` for."""

from comfy_api.latest import ComfyExtension, io


class ReuseExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        from .attention_node import AttentionMapReuse
        from .calibrate_node import ReuseCalibrate
        from .encoder_node import EncoderFeaturePropagation

        return [AttentionMapReuse, EncoderFeaturePropagation, ReuseCalibrate]
