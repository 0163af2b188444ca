"""Test-only ComfyUI node pack (V3) for the compatibility tests' in-process executor.

Supplies what a real workflow would load from disk: the tiny real U-Net (``CompatTinyModel``, i.e.
``compat_support.compat_model``), its
conditioning (``CompatConditioning``), and an output node that hands the final latent back to the test
(``CompatLatentStash``). Loaded with ``nodes.load_custom_node`` by ``tests/compat_support.py``; never shipped.
"""

import compat_support
from comfy_api.latest import ComfyExtension, io
from comfy_harness import conditioning


def _count(name: str) -> None:
    compat_support.EXECUTION_COUNTS[name] = compat_support.EXECUTION_COUNTS.get(name, 0) + 1


class CompatTinyModel(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CompatTinyModel",
            category="testing/compat",
            inputs=[
                io.Combo.Input("kind", options=["sd15", "sdxl"], tooltip="U-Net shape."),
                io.Int.Input("seed", default=0, min=0, max=2**31, tooltip="Weight initialisation seed."),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, kind: str, seed: int) -> io.NodeOutput:
        _count("CompatTinyModel")
        return io.NodeOutput(compat_support.compat_model(kind, seed))


class CompatConditioning(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CompatConditioning",
            category="testing/compat",
            inputs=[
                io.Combo.Input("kind", options=["sd15", "sdxl"], tooltip="U-Net shape."),
                io.Int.Input("seed", default=1, min=0, max=2**31, tooltip="Embedding seed."),
            ],
            outputs=[io.Conditioning.Output(display_name="positive"), io.Conditioning.Output(display_name="negative")],
        )

    @classmethod
    def execute(cls, kind: str, seed: int) -> io.NodeOutput:
        _count("CompatConditioning")
        return io.NodeOutput(*conditioning(kind, seed=seed))


class CompatLatentStash(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CompatLatentStash",
            category="testing/compat",
            inputs=[
                io.Latent.Input("samples", tooltip="Latent to hand back to the test."),
                io.String.Input("key", default="out", tooltip="Name the test reads it back under."),
            ],
            outputs=[],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, samples: dict, key: str) -> io.NodeOutput:
        _count("CompatLatentStash")
        compat_support.LATENT_STASH[key] = samples["samples"].clone()
        return io.NodeOutput()


class CompatLatentFromStash(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CompatLatentFromStash",
            category="testing/compat",
            inputs=[io.String.Input("key", default="out", tooltip="Name a CompatLatentStash node stored it under.")],
            outputs=[io.Latent.Output()],
        )

    @classmethod
    def execute(cls, key: str) -> io.NodeOutput:
        _count("CompatLatentFromStash")
        return io.NodeOutput({"samples": compat_support.LATENT_STASH[key].clone()})


class CompatNodesExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [CompatTinyModel, CompatConditioning, CompatLatentStash, CompatLatentFromStash]


async def comfy_entrypoint() -> CompatNodesExtension:
    return CompatNodesExtension()
