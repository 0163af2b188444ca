"""Generate ``example_workflows/*.json`` (UI format) and their ``.jpg`` thumbnails from the real node schemas.

The widget order in ``widgets_values`` must match each node's declared inputs exactly, so the values are
never typed by hand: every node is described by name -> value, unspecified widgets take the schema's
default, and the list is laid out with the same rules the frontend uses (``tools/workflow_api.py``).
Node definitions come from ComfyUI itself, imported in-process on the CPU (``reuse_bench/comfyui_env.py``),
so re-running this after a node gains or renames an input keeps the examples loadable. They are generated with
the oldest tested ComfyUI (``GENERATED_WITH``): newer ones describe the same core nodes differently (V3 schemas,
SaveImage's output), and the browser test loads the files in every tested version's own frontend.

Usage: ``python tools/make_example_workflows.py`` (writes into ``example_workflows/``);
``--check`` exits non-zero when the files on disk differ from what would be generated.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import json
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))

from workflow_api import FRONTEND_ONLY_NODES, has_control_widget, is_widget, ordered_inputs  # noqa: E402
from workflow_api import widget_names as widget_names_of  # noqa: E402

OUT_DIR = REPO / "example_workflows"
GENERATED_WITH = "0.3.64"
PACK_ID = "comfyui-reuse"
SD15_CHECKPOINT = "v1-5-pruned-emaonly.safetensors"
SDXL_CHECKPOINT = "sd_xl_base_1.0.safetensors"
# The transformer examples load diffusion model, text encoder(s) and VAE separately, under the file names of the
# official ComfyUI templates (Comfy-Org's repackaged files).
FLUX_DIT = "flux1-dev.safetensors"
CLIP_L = "clip_l.safetensors"
T5XXL = "t5xxl_fp16.safetensors"
FLUX_VAE = "ae.safetensors"
ZIMAGE_DIT = "z_image_turbo_bf16.safetensors"
QWEN3_4B = "qwen_3_4b.safetensors"
WAN21_DIT = "wan2.1_t2v_1.3B_fp16.safetensors"
UMT5_XXL = "umt5_xxl_fp8_e4m3fn_scaled.safetensors"
WAN21_VAE = "wan_2.1_vae.safetensors"
_ZIMAGE = "https://huggingface.co/Comfy-Org/z_image_turbo/resolve/main/split_files/"
_WAN21 = "https://huggingface.co/Comfy-Org/Wan_2.1_ComfyUI_repackaged/resolve/main/split_files/"
_FLUX_TE = "https://huggingface.co/comfyanonymous/flux_text_encoders/resolve/main/"
# file name -> (ComfyUI models folder, download URL); the frontend offers the download when a file is missing
MODEL_FILES = {
    SD15_CHECKPOINT: ("checkpoints", "https://huggingface.co/stable-diffusion-v1-5/stable-diffusion-v1-5/resolve/main/"
                      "v1-5-pruned-emaonly.safetensors?download=true"),
    SDXL_CHECKPOINT: ("checkpoints", "https://huggingface.co/stabilityai/stable-diffusion-xl-base-1.0/resolve/main/"
                      "sd_xl_base_1.0.safetensors?download=true"),
    FLUX_DIT: ("diffusion_models", "https://huggingface.co/black-forest-labs/FLUX.1-dev/resolve/main/flux1-dev.safetensors"),
    CLIP_L: ("text_encoders", f"{_FLUX_TE}clip_l.safetensors"),
    T5XXL: ("text_encoders", f"{_FLUX_TE}t5xxl_fp16.safetensors"),
    FLUX_VAE: ("vae", f"{_ZIMAGE}vae/ae.safetensors"),
    ZIMAGE_DIT: ("diffusion_models", f"{_ZIMAGE}diffusion_models/z_image_turbo_bf16.safetensors"),
    QWEN3_4B: ("text_encoders", f"{_ZIMAGE}text_encoders/qwen_3_4b.safetensors"),
    WAN21_DIT: ("diffusion_models", f"{_WAN21}diffusion_models/wan2.1_t2v_1.3B_fp16.safetensors"),
    UMT5_XXL: ("text_encoders", f"{_WAN21}text_encoders/umt5_xxl_fp8_e4m3fn_scaled.safetensors"),
    WAN21_VAE: ("vae", f"{_WAN21}vae/wan_2.1_vae.safetensors"),
}  # fmt: skip
# The loader widgets that name a model file.
MODEL_WIDGETS = {
    "CheckpointLoaderSimple": ("ckpt_name",),
    "UNETLoader": ("unet_name",),
    "CLIPLoader": ("clip_name",),
    "DualCLIPLoader": ("clip_name1", "clip_name2"),
    "VAELoader": ("vae_name",),
}
PACK_NODES = ("AttentionMapReuse", "EncoderFeaturePropagation", "ReuseCalibrate")
# Every core node an example uses; each exists in every tested ComfyUI (checked by the browser test, which loads
# every example in each version's frontend).
CORE_NODES = ("CheckpointLoaderSimple", "UNETLoader", "CLIPLoader", "DualCLIPLoader", "VAELoader", "CLIPTextEncode",
              "FluxGuidance", "ConditioningZeroOut", "EmptyLatentImage", "EmptySD3LatentImage",
              "EmptyHunyuanLatentVideo", "ModelSamplingAuraFlow", "ModelSamplingSD3", "KSampler", "VAEDecode",
              "SaveImage", "PreviewImage", "SaveAnimatedWEBP", "PreviewAny")  # fmt: skip
SEED = 123456789
POSITIVE = "a lighthouse on a rocky coast at sunset, dramatic clouds, detailed oil painting"
NEGATIVE = "blurry, low quality, watermark, text"

# LiteGraph colours the frontend offers in its colour menu (node title / body).
PACK_COLOR = ("#223", "#335")
POSITIVE_COLOR = ("#232", "#353")
NEGATIVE_COLOR = ("#322", "#533")
NOTE_COLOR = ("#432", "#653")


# --------------------------------------------------------------------------------------------------
# Node definitions, shaped like GET /object_info


def _v1_node_info(name: str, cls, display_names: dict) -> dict:
    """``/object_info`` of a V1 node, as ComfyUI's server builds it (``server.py``, ``node_info``)."""
    inputs = cls.INPUT_TYPES()
    return {
        "input": inputs,
        "input_order": {key: list(value.keys()) for key, value in inputs.items()},
        "output": list(cls.RETURN_TYPES),
        "output_name": list(getattr(cls, "RETURN_NAMES", None) or cls.RETURN_TYPES),
        "name": name,
        "display_name": display_names.get(name, name),
        "description": getattr(cls, "DESCRIPTION", ""),
        "category": getattr(cls, "CATEGORY", "sd"),
        "output_node": bool(getattr(cls, "OUTPUT_NODE", False)),
    }


@contextlib.contextmanager
def _comfyui_top_level(root: Path):
    """ComfyUI's own top-level ``nodes`` (nodes.py) and ``utils`` (package) under those names while inside, as in its
    server (main.py imports ``utils`` first, then ``nodes``). A test process may hold other modules there (ComfyUI's
    nodes.py puts ``comfy/`` first on ``sys.path``, where ``utils`` is comfy/utils.py; this repository has a
    ``nodes`` package): they are set aside and put back afterwards."""
    wanted = {"utils": root / "utils" / "__init__.py", "nodes": root / "nodes.py"}
    saved = {}
    for name, path in wanted.items():
        current = sys.modules.get(name)
        if current is not None and Path(getattr(current, "__file__", "") or "").resolve() == path.resolve():
            continue
        saved.update({n: m for n, m in sys.modules.items() if n == name or n.startswith(name + ".")})
        for n in [n for n in sys.modules if n == name or n.startswith(name + ".")]:
            del sys.modules[n]
        locations = [str(path.parent)] if path.name == "__init__.py" else None
        spec = importlib.util.spec_from_file_location(name, path, submodule_search_locations=locations)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    try:
        yield sys.modules["nodes"]
    finally:
        for name in saved:
            sys.modules[name] = saved[name]


def _core_node_info(root: Path) -> dict:
    """``/object_info`` of ``CORE_NODES``, with ComfyUI's built-in extra nodes (``comfy_extras``: Flux, SD3, video,
    ...) loaded as its server loads them."""
    import logging

    with _comfyui_top_level(root) as comfy_nodes:
        if not all(name in comfy_nodes.NODE_CLASS_MAPPINGS for name in CORE_NODES):
            # Extra modules with optional dependencies (kornia, ...) log an import failure each: not ours to report.
            previous = logging.root.manager.disable
            logging.disable(logging.WARNING)
            try:
                asyncio.run(comfy_nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
            finally:
                logging.disable(previous)
        missing = [name for name in CORE_NODES if name not in comfy_nodes.NODE_CLASS_MAPPINGS]
        if missing:
            raise RuntimeError(f"ComfyUI does not register the core node(s) {missing}")
        info = {}
        for name in CORE_NODES:
            cls = comfy_nodes.NODE_CLASS_MAPPINGS[name]
            if hasattr(cls, "GET_NODE_INFO_V1"):  # a V3 node (comfy_api): the server asks the schema
                info[name] = cls.GET_NODE_INFO_V1()
            else:
                info[name] = _v1_node_info(name, cls, comfy_nodes.NODE_DISPLAY_NAME_MAPPINGS)
        return info


def local_object_info() -> dict:
    """``/object_info`` for the core nodes the examples use and every node of this pack, computed in-process."""
    sys.path.insert(0, str(REPO))
    from reuse_bench.comfyui_env import comfyui_version, find_comfyui, import_comfy, load_pack

    import_comfy()
    if comfyui_version(find_comfyui()) != GENERATED_WITH:
        version = f"v{GENERATED_WITH}"
        raise SystemExit(
            f"generate the examples with ComfyUI {version}: COMFYUI_PATH=../shared/comfyui/{version} "
            f".venvs/comfyui-{version}/bin/python tools/make_example_workflows.py"
        )
    info = _core_node_info(find_comfyui())
    extension = asyncio.run(load_pack().comfy_entrypoint())
    for cls in asyncio.run(extension.get_node_list()):
        schema = cls.define_schema()
        info[schema.node_id] = cls.GET_NODE_INFO_V1()
    missing = [name for name in PACK_NODES if name not in info]
    if missing:
        raise RuntimeError(f"the pack does not register {missing}")
    return info


# --------------------------------------------------------------------------------------------------
# UI-format graph builder


@dataclass
class Node:
    id: int
    type: str
    pos: tuple[float, float]
    size: tuple[float, float]
    widgets_values: list
    title: str | None = None
    color: tuple[str, str] | None = None
    properties: dict = field(default_factory=dict)
    inputs: list = field(default_factory=list)
    outputs: list = field(default_factory=list)


class Graph:
    """A UI-format workflow under construction; node ids and link ids count up from 1."""

    def __init__(self, name: str, object_info: dict):
        self.name = name
        self.info = object_info
        self.nodes: list[Node] = []
        self.links: list[list] = []
        self.groups: list[dict] = []

    def _widget_values(self, node_type: str, widgets: dict) -> list:
        info = self.info[node_type]
        specs = ordered_inputs(info)
        known = {name for name, input_type, options in specs if is_widget(input_type, options)}
        unknown = set(widgets) - known - {f"{name}:control" for name in known}
        if unknown:
            raise KeyError(f"{node_type} has no widget(s) {sorted(unknown)}; its widgets are {sorted(known)}")
        values = []
        for name, input_type, options in specs:
            if not is_widget(input_type, options):
                continue
            if name in widgets:
                value = widgets[name]
            elif "default" in options:
                value = options["default"]
            elif isinstance(input_type, list) and input_type:
                value = input_type[0]
            elif input_type == "COMBO" and options.get("options"):
                value = options["options"][0]
            else:
                raise KeyError(f"{node_type}.{name} has no default; give a value")
            values.append(value)
            if has_control_widget(name, input_type, options):
                values.append(widgets.get(f"{name}:control", "fixed"))
        return values

    def _model_file(self, node_type: str, widget: str, values: list) -> dict:
        """The ``properties.models`` entry of a loader widget: the file, where it goes, where to download it."""
        name = values[widget_names_of(self.info[node_type]).index(widget)]
        if name not in MODEL_FILES:
            raise KeyError(f"{node_type}.{widget} = {name!r}: add the file to MODEL_FILES (folder and download URL)")
        directory, url = MODEL_FILES[name]
        return {"name": name, "url": url, "directory": directory}

    def add(self, node_type: str, pos, size, widgets: dict | None = None, title: str | None = None,
            color: tuple[str, str] | None = None) -> Node:  # fmt: skip
        node_id = len(self.nodes) + 1
        if node_type in ("Note", "MarkdownNote"):
            values = [widgets["text"]]
            outputs: list = []
            properties: dict = {}
        else:
            info = self.info[node_type]
            values = self._widget_values(node_type, widgets or {})
            outputs = [
                {"name": out_name, "type": out_type, "links": [], "slot_index": slot}
                for slot, (out_type, out_name) in enumerate(zip(info["output"], info["output_name"], strict=True))
            ]
            cnr_id = PACK_ID if node_type in PACK_NODES else "comfy-core"
            properties = {"cnr_id": cnr_id, "Node name for S&R": node_type}
            models = [self._model_file(node_type, widget, values) for widget in MODEL_WIDGETS.get(node_type, ())]
            if models:
                properties["models"] = models
        node = Node(node_id, node_type, pos, size, values, title, color, properties, outputs=outputs)
        self.nodes.append(node)
        return node

    def note(self, text: str, pos, size, title: str) -> Node:
        return self.add("Note", pos, size, {"text": text}, title=title, color=NOTE_COLOR)

    def connect(self, source: Node, output: str, target: Node, input_name: str) -> None:
        out_types = self.info[source.type]["output"]
        out_names = self.info[source.type]["output_name"]
        slot = out_names.index(output) if output in out_names else out_types.index(output)
        link_type = out_types[slot]
        specs = {name: (input_type, options) for name, input_type, options in ordered_inputs(self.info[target.type])}
        if input_name not in specs:
            raise KeyError(f"{target.type} has no input {input_name!r}; inputs: {sorted(specs)}")
        input_type, options = specs[input_name]
        accepted = "COMBO" if isinstance(input_type, list) else input_type
        if accepted not in (link_type, "*"):
            raise TypeError(f"{source.type}.{output} ({link_type}) -> {target.type}.{input_name} ({accepted})")
        link_id = len(self.links) + 1
        target_socket = len(target.inputs)
        socket = {"name": input_name, "type": link_type, "link": link_id}
        if is_widget(input_type, options):  # a link into a widget: the frontend pairs the socket with its widget
            socket = {"name": input_name, "type": link_type, "widget": {"name": input_name}, "link": link_id}
        target.inputs.append(socket)
        source.outputs[slot]["links"].append(link_id)
        self.links.append([link_id, source.id, slot, target.id, target_socket, link_type])

    def group(self, title: str, nodes: list[Node], color: str = "#3f789e", pad: float = 20) -> None:
        x0 = min(n.pos[0] for n in nodes) - pad
        y0 = min(n.pos[1] for n in nodes) - pad - 40
        x1 = max(n.pos[0] + n.size[0] for n in nodes) + pad
        y1 = max(n.pos[1] + n.size[1] for n in nodes) + pad
        self.groups.append({"id": len(self.groups) + 1, "title": title, "bounding": [x0, y0, x1 - x0, y1 - y0],
                            "color": color, "font_size": 24, "flags": {}})  # fmt: skip

    def _execution_order(self) -> dict[int, int]:
        """Topological order, as LiteGraph stores it in ``order`` (sources first)."""
        parents = {n.id: set() for n in self.nodes}
        for _, src, _, dst, _, _ in self.links:
            parents[dst].add(src)
        order, done = {}, set()
        while len(done) < len(self.nodes):
            ready = sorted(nid for nid, ps in parents.items() if nid not in done and ps <= done)
            for nid in ready:
                order[nid] = len(order)
                done.add(nid)
        return order

    def to_json(self) -> dict:
        order = self._execution_order()
        nodes = []
        for n in self.nodes:
            entry = {"id": n.id, "type": n.type, "pos": list(n.pos), "size": list(n.size), "flags": {},
                     "order": order[n.id], "mode": 0, "inputs": n.inputs, "outputs": n.outputs}  # fmt: skip
            if n.title:
                entry["title"] = n.title
            entry["properties"] = n.properties
            entry["widgets_values"] = n.widgets_values
            if n.color:
                entry["color"], entry["bgcolor"] = n.color
            nodes.append(entry)
        return {
            "id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"{PACK_ID}/example_workflows/{self.name}")),
            "revision": 0,
            "last_node_id": len(self.nodes),
            "last_link_id": len(self.links),
            "nodes": nodes,
            "links": self.links,
            "groups": self.groups,
            "config": {},
            "extra": {"ds": {"scale": 0.75, "offset": [60, 80]}},
            "version": 0.4,
        }


# --------------------------------------------------------------------------------------------------
# Explanations generated from the schemas (so the notes never disagree with the node)


def settings_text(info: dict, values: dict) -> str:
    """One line per widget of a pack node: name = value, then its tooltip."""
    lines = []
    widget_values = iter(values)
    for name, input_type, options in ordered_inputs(info):
        if not is_widget(input_type, options):
            continue
        value = next(widget_values)
        if has_control_widget(name, input_type, options):
            next(widget_values)
        tooltip = options.get("tooltip", "").strip()
        lines.append(f"- {name} = {value!r}: {tooltip}" if tooltip else f"- {name} = {value!r}")
    return "\n".join(lines)


def pack_note(graph: Graph, node: Node, intro: str, pos, size) -> Node:
    settings = settings_text(graph.info[node.type], node.widgets_values)
    text = f"{intro}\n\nSettings used here (hover a widget for its tooltip):\n{settings}"
    return graph.note(text, pos, size, title=f"About: {node.title or node.type}")


# --------------------------------------------------------------------------------------------------
# The example workflows

# Per-workflow settings of the pack nodes. Names are checked against the live schema; anything not
# listed keeps the node's default, which is what the node authors recommend.
# reuse_fraction instead of a fixed reuse_steps count: the example keeps working (and keeps the paper's
# 10-of-20 ratio) when a user changes the step count, where reuse_steps=10 would reject runs of <= 10 steps.
ATTENTION: dict = {"strategy": "phast", "reuse_fraction": 0.5}
ENCODER: dict = {"key_steps": "paper"}


@dataclass
class Pipeline:
    loader: Node
    positive: Node
    negative: Node
    latent: Node


def base_pipeline(g: Graph, checkpoint: str, width: int, height: int, x_prompt: float = 420) -> Pipeline:
    loader = g.add("CheckpointLoaderSimple", (20, 240), (320, 100), {"ckpt_name": checkpoint},
                   title="Load Checkpoint (pick your own file)")  # fmt: skip
    positive = g.add("CLIPTextEncode", (x_prompt, 330), (400, 160), {"text": POSITIVE}, title="Positive prompt",
                     color=POSITIVE_COLOR)  # fmt: skip
    negative = g.add("CLIPTextEncode", (x_prompt, 530), (400, 130), {"text": NEGATIVE}, title="Negative prompt",
                     color=NEGATIVE_COLOR)  # fmt: skip
    latent = g.add("EmptyLatentImage", (20, 420), (320, 110), {"width": width, "height": height, "batch_size": 1})
    g.connect(loader, "CLIP", positive, "clip")
    g.connect(loader, "CLIP", negative, "clip")
    return Pipeline(loader, positive, negative, latent)


def sampler_chain(g: Graph, p: Pipeline, model_source: Node, x: float, y: float, sampler: dict, title: str,
                  output: str, prefix: str) -> Node:  # fmt: skip
    ksampler = g.add("KSampler", (x, y), (320, 262), sampler, title=title)
    g.connect(model_source, "MODEL", ksampler, "model")
    g.connect(p.positive, "CONDITIONING", ksampler, "positive")
    g.connect(p.negative, "CONDITIONING", ksampler, "negative")
    g.connect(p.latent, "LATENT", ksampler, "latent_image")
    decode = g.add("VAEDecode", (x + 350, y), (210, 46))
    g.connect(ksampler, "LATENT", decode, "samples")
    g.connect(p.loader, "VAE", decode, "vae")
    widgets = {"filename_prefix": prefix} if output == "SaveImage" else {}
    image_title = f"{title}: image" if output == "PreviewImage" else None
    image = g.add(output, (x + 590, y), (420, 460), widgets, title=image_title)
    g.connect(decode, "IMAGE", image, "images")
    return ksampler


SD15_SAMPLER = dict(seed=SEED, steps=20, cfg=7.0, sampler_name="euler", scheduler="normal", denoise=1.0)
SDXL_SAMPLER = dict(seed=SEED, steps=30, cfg=7.0, sampler_name="dpmpp_2m", scheduler="karras", denoise=1.0)


@dataclass(frozen=True)
class SingleNodeExample:
    """A workflow that puts one pack node between the checkpoint loader and a KSampler."""

    name: str
    checkpoint: str
    size: int
    node_type: str
    settings: dict
    node_title: str
    sampler: dict
    prefix: str
    note: str

    def __call__(self, info: dict) -> Graph:
        g = Graph(self.name, info)
        p = base_pipeline(g, self.checkpoint, self.size, self.size)
        node = g.add(self.node_type, (420, 40), (400, 240), self.settings, title=self.node_title, color=PACK_COLOR)
        g.connect(p.loader, "MODEL", node, "model")
        sampler_chain(g, p, node, 880, 120, self.sampler, "KSampler", "SaveImage", self.prefix)
        pack_note(g, node, self.note, (880, 420), (430, 420))
        g.group("Speed-up: patch the model, then sample as usual", [node])
        return g


wf_sd15_attention = SingleNodeExample(
    "sd15_attention_map_reuse",
    SD15_CHECKPOINT,
    512,
    "AttentionMapReuse",
    ATTENTION,
    "Attention Map Reuse (late-step attention caching)",
    SD15_SAMPLER,
    "comfyui-reuse/attention_map_reuse",
    "Attention Map Reuse computes attention only on some sampling steps and reuses the kept maps on the "
    "others, mostly in the late, low-noise steps where they barely change. The MODEL it outputs is a "
    "patched copy: the loader's model is untouched, so you can wire a plain KSampler beside it to compare.",
)
wf_sd15_encoder = SingleNodeExample(
    "sd15_encoder_feature_propagation",
    SD15_CHECKPOINT,
    512,
    "EncoderFeaturePropagation",
    ENCODER,
    "Encoder Feature Propagation (skip the U-Net encoder)",
    SD15_SAMPLER,
    "comfyui-reuse/encoder_feature_propagation",
    "Encoder Feature Propagation runs the U-Net encoder only on key steps and feeds its cached features to the "
    "decoder on the steps in between (Faster Diffusion). The encoder changes slowly between adjacent steps, so "
    "the decoder still sees accurate features while about half of the U-Net is skipped on non-key steps.",
)
wf_sdxl_encoder = SingleNodeExample(
    "sdxl_encoder_feature_propagation",
    SDXL_CHECKPOINT,
    1024,
    "EncoderFeaturePropagation",
    ENCODER,
    "Encoder Feature Propagation (SDXL)",
    SDXL_SAMPLER,
    "comfyui-reuse/sdxl_encoder_feature_propagation",
    "Same node on SDXL: it reads the U-Net layout from the model, so no SDXL-specific settings are needed. "
    "SDXL works best at 1024x1024 (or another ~1 megapixel size); the sampler uses dpmpp_2m/karras, 30 steps.",
)


def wf_chained(info: dict) -> Graph:
    g = Graph("sd15_both_methods_chained", info)
    p = base_pipeline(g, SD15_CHECKPOINT, 512, 512, x_prompt=880)
    reuse = g.add("AttentionMapReuse", (420, 40), (400, 240), ATTENTION,
                  title="1. Attention Map Reuse", color=PACK_COLOR)  # fmt: skip
    prop = g.add("EncoderFeaturePropagation", (420, 330), (400, 240), ENCODER,
                 title="2. Encoder Feature Propagation", color=PACK_COLOR)  # fmt: skip
    g.connect(p.loader, "MODEL", reuse, "model")
    g.connect(reuse, "MODEL", prop, "model")
    sampler_chain(g, p, prop, 1340, 120, SD15_SAMPLER, "KSampler", "SaveImage", "comfyui-reuse/chained")
    g.note(
        "Both speed-ups stack: each node clones the MODEL and adds its own wrapper, so chaining them patches one "
        "copy with both. Encoder Feature Propagation skips the encoder on non-key steps; Attention Map Reuse then "
        "saves attention work in the blocks that still run (the decoder, and the encoder on key steps).\n\n"
        "If quality drops, relax one node at a time (fewer reused steps / more key steps).\n\n"
        f"Attention Map Reuse settings:\n{settings_text(info['AttentionMapReuse'], reuse.widgets_values)}\n\n"
        "Encoder Feature Propagation settings:\n"
        f"{settings_text(info['EncoderFeaturePropagation'], prop.widgets_values)}",
        (420, 620), (400, 520), title="About: chaining both methods",
    )  # fmt: skip
    g.group("Speed-ups, chained", [reuse, prop])
    return g


def wf_comparison(info: dict) -> Graph:
    g = Graph("sd15_side_by_side_comparison", info)
    p = base_pipeline(g, SD15_CHECKPOINT, 512, 512)
    reuse = g.add("AttentionMapReuse", (420, 720), (400, 240), ATTENTION,
                  title="Attention Map Reuse", color=PACK_COLOR)  # fmt: skip
    prop = g.add("EncoderFeaturePropagation", (420, 1010), (400, 240), ENCODER,
                 title="Encoder Feature Propagation", color=PACK_COLOR)  # fmt: skip
    g.connect(p.loader, "MODEL", reuse, "model")
    g.connect(reuse, "MODEL", prop, "model")
    baseline = sampler_chain(g, p, p.loader, 880, 80, SD15_SAMPLER, "Baseline (unpatched)", "PreviewImage", "")
    patched = sampler_chain(g, p, prop, 880, 720, SD15_SAMPLER, "Patched (both speed-ups)", "PreviewImage", "")
    g.note(
        "Side-by-side: both KSamplers use the same seed (control 'fixed'), prompt, latent and settings. The top one "
        "samples the original model, the bottom one the patched copy, so the two previews differ only by the "
        "speed-ups. Compare the images and the per-node times in the queue panel. To compare one method alone, "
        "bypass (Ctrl+B) the other node.",
        (20, 720), (360, 260), title="About: comparison",
    )  # fmt: skip
    g.group("Baseline", [baseline], color="#444")
    g.group("Patched", [patched, reuse, prop], color="#3f789e")
    return g


# --- Transformer examples: diffusion model, text encoder(s) and VAE loaded separately, as ComfyUI's own templates do

# The recommended settings for transformers (README): Attention Map Reuse in output mode (no softmax maps to keep),
# PHAST with half the steps reused; both nodes forecast linearly.
DIT_ATTENTION: dict = {"strategy": "phast", "reuse_fraction": 0.5, "mode": "output", "forecast": "linear"}
DIT_ENCODER: dict = {"key_steps": "paper", "forecast": "linear"}


def _sampling_output(g: Graph, sampler: Node, vae_loader: Node, x: float, y: float, output: str, widgets: dict,
                     title: str | None = None) -> Node:  # fmt: skip
    decode = g.add("VAEDecode", (x, y), (210, 46))
    g.connect(sampler, "LATENT", decode, "samples")
    g.connect(vae_loader, "VAE", decode, "vae")
    image = g.add(output, (x + 240, y), (420, 460), widgets, title=title)
    g.connect(decode, "IMAGE", image, "images")
    return image


def _ksampler(g: Graph, model: Node, positive: Node, negative: Node, latent: Node, pos, settings: dict) -> Node:
    ksampler = g.add("KSampler", pos, (320, 262), settings, title="KSampler")
    g.connect(model, "MODEL", ksampler, "model")
    g.connect(positive, "CONDITIONING", ksampler, "positive")
    g.connect(negative, "CONDITIONING", ksampler, "negative")
    g.connect(latent, "LATENT", ksampler, "latent_image")
    return ksampler


FLUX_SAMPLER = dict(seed=SEED, steps=20, cfg=1.0, sampler_name="euler", scheduler="simple", denoise=1.0)
# Reuse Calibrate fits both schedules for a speed-up rather than a step count, so the workflow keeps working when the
# step count changes; the reuse costs are those measured on a Flux.1-width transformer (docs/benchmarks.md, GPU
# check: a decoder-only step 0.36 of a full step, an output-mode attention reuse step 0.75).
FLUX_CALIBRATION = dict(target_kind="speedup", target=1.15, encoder_reuse_cost=0.36, attention_reuse_cost=0.75,
                        attention_mode="output", forecast="linear")  # fmt: skip


def wf_flux(info: dict) -> Graph:
    g = Graph("flux_dev_calibrated_reuse", info)
    unet = g.add("UNETLoader", (20, 60), (320, 82), {"unet_name": FLUX_DIT},
                 title="Load Diffusion Model (Flux.1 dev)")  # fmt: skip
    clip = g.add("DualCLIPLoader", (20, 190), (320, 130),
                 {"clip_name1": CLIP_L, "clip_name2": T5XXL, "type": "flux"})  # fmt: skip
    vae = g.add("VAELoader", (20, 370), (320, 58), {"vae_name": FLUX_VAE})
    latent = g.add("EmptySD3LatentImage", (20, 480), (320, 106), {"width": 1024, "height": 1024, "batch_size": 1})
    prompt = g.add("CLIPTextEncode", (380, 60), (400, 160), {"text": POSITIVE}, title="Prompt", color=POSITIVE_COLOR)
    guidance = g.add("FluxGuidance", (380, 260), (320, 58), {"guidance": 3.5})
    negative = g.add("ConditioningZeroOut", (380, 360), (320, 26), title="No negative prompt (cfg 1)")
    g.connect(clip, "CLIP", prompt, "clip")
    g.connect(prompt, "CONDITIONING", guidance, "conditioning")
    g.connect(prompt, "CONDITIONING", negative, "conditioning")

    sampling = {k: v for k, v in FLUX_SAMPLER.items() if k != "denoise"}  # KSampler's inputs but denoise
    calibrate = g.add("ReuseCalibrate", (820, 60), (360, 430), {**sampling, **FLUX_CALIBRATION},
                      title="Reuse Calibrate (one full-compute run)", color=PACK_COLOR)  # fmt: skip
    g.connect(unet, "MODEL", calibrate, "model")
    g.connect(guidance, "CONDITIONING", calibrate, "positive")
    g.connect(negative, "CONDITIONING", calibrate, "negative")
    g.connect(latent, "LATENT", calibrate, "latent_image")

    attention = g.add("AttentionMapReuse", (1220, 60), (380, 330),
                      {"strategy": "custom", "mode": "output", "forecast": "linear"},
                      title="Attention Map Reuse (calibrated schedule)", color=PACK_COLOR)  # fmt: skip
    encoder = g.add("EncoderFeaturePropagation", (1220, 430), (380, 420), DIT_ENCODER,
                    title="Encoder Feature Propagation", color=PACK_COLOR)  # fmt: skip
    g.connect(unet, "MODEL", attention, "model")
    g.connect(calibrate, "schedule", attention, "custom_schedule")
    g.connect(attention, "MODEL", encoder, "model")
    g.connect(calibrate, "key_steps", encoder, "custom_key_steps")
    ksampler = _ksampler(g, encoder, guidance, negative, latent, (1640, 60), FLUX_SAMPLER)
    _sampling_output(g, ksampler, vae, 1640, 360, "SaveImage", {"filename_prefix": "comfyui-reuse/flux"})

    report = g.add("PreviewAny", (820, 540), (360, 220), title="Calibration report")
    g.connect(calibrate, "report", report, "source")
    full = g.add("VAEDecode", (820, 800), (210, 46), title="Decode the calibration run")
    g.connect(calibrate, "latent", full, "samples")
    g.connect(vae, "VAE", full, "vae")
    preview = g.add("PreviewImage", (1060, 800), (420, 460), title="Full compute (the calibration run)")
    g.connect(full, "IMAGE", preview, "images")

    g.note(
        "Flux.1 dev with both speed-ups and Reuse Calibrate. Reuse Calibrate samples once at full compute (same "
        "seed, steps, sampler and scheduler as the KSampler) and fits a schedule for each node to this model and "
        "prompt: its schedule output drives Attention Map Reuse (strategy = custom), its key_steps output is wired "
        "into Encoder Feature Propagation's custom_key_steps, used once you set key_steps = custom (here the paper's "
        "key steps run). Both nodes forecast (forecast = linear: a skipped step gets the extrapolation of the last "
        "two computed ones), and the calibration is fitted to that forecast. The calibration run's image (full "
        "compute) and its report show beside the result, so you can compare. Calibrate once per model, sampler, "
        "step count and prompt: with the seed fixed, ComfyUI reuses its result until one of those changes.\n\n"
        "Flux.2, Chroma and Qwen-Image: put the same three nodes after their own loaders.\n\n"
        f"Reuse Calibrate settings:\n{settings_text(info['ReuseCalibrate'], calibrate.widgets_values)}\n\n"
        f"Attention Map Reuse settings:\n{settings_text(info['AttentionMapReuse'], attention.widgets_values)}\n\n"
        "Encoder Feature Propagation settings:\n"
        f"{settings_text(info['EncoderFeaturePropagation'], encoder.widgets_values)}",
        (20, 640), (760, 620), title="About: Flux with calibrated reuse",
    )  # fmt: skip
    g.group("Calibrate once, then sample with the calibrated schedules", [calibrate, attention, encoder])
    return g


ZIMAGE_SAMPLER = dict(seed=SEED, steps=8, cfg=1.0, sampler_name="res_multistep", scheduler="simple", denoise=1.0)


def wf_zimage(info: dict) -> Graph:
    g = Graph("z_image_turbo_encoder_feature_propagation", info)
    unet = g.add("UNETLoader", (20, 60), (320, 82), {"unet_name": ZIMAGE_DIT},
                 title="Load Diffusion Model (Z-Image-Turbo)")  # fmt: skip
    clip = g.add("CLIPLoader", (20, 190), (320, 106), {"clip_name": QWEN3_4B, "type": "lumina2"})
    vae = g.add("VAELoader", (20, 350), (320, 58), {"vae_name": FLUX_VAE})
    latent = g.add("EmptySD3LatentImage", (20, 460), (320, 106), {"width": 1024, "height": 1024, "batch_size": 1})
    shift = g.add("ModelSamplingAuraFlow", (380, 60), (320, 58), {"shift": 3.0})
    prompt = g.add("CLIPTextEncode", (380, 160), (400, 160), {"text": POSITIVE}, title="Prompt", color=POSITIVE_COLOR)
    negative = g.add("ConditioningZeroOut", (380, 360), (320, 26), title="No negative prompt (cfg 1)")
    g.connect(unet, "MODEL", shift, "model")
    g.connect(clip, "CLIP", prompt, "clip")
    g.connect(prompt, "CONDITIONING", negative, "conditioning")
    encoder = g.add("EncoderFeaturePropagation", (820, 60), (380, 420), DIT_ENCODER,
                    title="Encoder Feature Propagation", color=PACK_COLOR)  # fmt: skip
    g.connect(shift, "MODEL", encoder, "model")
    ksampler = _ksampler(g, encoder, prompt, negative, latent, (1240, 60), ZIMAGE_SAMPLER)
    _sampling_output(g, ksampler, vae, 1240, 360, "SaveImage", {"filename_prefix": "comfyui-reuse/z_image"})
    pack_note(
        g, encoder,
        "Z-Image-Turbo (a Lumina 2-style single-stream transformer) with Encoder Feature Propagation: the first "
        "layers (encoder_fraction) run only on key steps; the other steps run the remaining layers on the encoder's "
        "features forecast from the last two key steps (forecast = linear). A turbo model samples in 8 steps: the "
        "paper's key steps keep 0-4 and 6, so 2 of 8 steps skip the encoder. On few-step models running one step "
        "fewer did as well in our measurements (docs/benchmarks.md, few-step models): the node pays off with more "
        "steps, e.g. Lumina 2 or the Z-Image base model at 20-50 steps, which take this same graph (Lumina 2: its "
        "diffusion model, gemma_2_2b_fp16 as text encoder, shift 6, cfg 4).",
        (820, 520), (380, 560),
    )  # fmt: skip
    g.group("Speed-up: patch the model, then sample as usual", [encoder])
    return g


WAN21_SAMPLER = dict(seed=SEED, steps=30, cfg=6.0, sampler_name="uni_pc", scheduler="simple", denoise=1.0)
WAN_NEGATIVE = "static, blurry, low quality, overexposed, watermark, subtitles, text, deformed, extra limbs"


def wf_wan21(info: dict) -> Graph:
    g = Graph("wan21_text_to_video_both_methods", info)
    unet = g.add("UNETLoader", (20, 60), (320, 82), {"unet_name": WAN21_DIT},
                 title="Load Diffusion Model (Wan 2.1 T2V 1.3B)")  # fmt: skip
    clip = g.add("CLIPLoader", (20, 190), (320, 106), {"clip_name": UMT5_XXL, "type": "wan"})
    vae = g.add("VAELoader", (20, 350), (320, 58), {"vae_name": WAN21_VAE})
    video = {"width": 832, "height": 480, "length": 33, "batch_size": 1}
    latent = g.add("EmptyHunyuanLatentVideo", (20, 460), (320, 130), video, title="Empty video latent")
    shift = g.add("ModelSamplingSD3", (380, 60), (320, 58), {"shift": 8.0})
    positive = g.add("CLIPTextEncode", (380, 160), (400, 160),
                     {"text": "a lighthouse on a rocky coast at sunset, waves crashing, clouds drifting, cinematic"},
                     title="Positive prompt", color=POSITIVE_COLOR)  # fmt: skip
    negative = g.add("CLIPTextEncode", (380, 360), (400, 130), {"text": WAN_NEGATIVE}, title="Negative prompt",
                     color=NEGATIVE_COLOR)  # fmt: skip
    g.connect(unet, "MODEL", shift, "model")
    g.connect(clip, "CLIP", positive, "clip")
    g.connect(clip, "CLIP", negative, "clip")
    attention = g.add("AttentionMapReuse", (820, 60), (380, 330), DIT_ATTENTION,
                      title="1. Attention Map Reuse (output mode)", color=PACK_COLOR)  # fmt: skip
    encoder = g.add("EncoderFeaturePropagation", (820, 430), (380, 420), DIT_ENCODER,
                    title="2. Encoder Feature Propagation", color=PACK_COLOR)  # fmt: skip
    g.connect(shift, "MODEL", attention, "model")
    g.connect(attention, "MODEL", encoder, "model")
    ksampler = _ksampler(g, encoder, positive, negative, latent, (1240, 60), WAN21_SAMPLER)
    webp = {"filename_prefix": "comfyui-reuse/wan21", "fps": 16.0, "lossless": False, "quality": 90}
    _sampling_output(g, ksampler, vae, 1240, 360, "SaveAnimatedWEBP", webp)
    g.note(
        "Wan 2.1 text-to-video with both speed-ups. Video transformers attend over every frame's tokens, so "
        "Attention Map Reuse runs in output mode (it keeps each layer's attention output, never the maps); Encoder "
        "Feature Propagation runs the first layers only on key steps. Both forecast what they skip from the last two "
        "computed steps (forecast = linear). With parallel_decoding on, the steps after a "
        "key step are decoded in one batch: turn it off (or lower max_decoders_per_batch) when memory is tight. "
        "Wan 2.2 and HunyuanVideo take the same nodes.\n\n"
        f"Attention Map Reuse settings:\n{settings_text(info['AttentionMapReuse'], attention.widgets_values)}\n\n"
        "Encoder Feature Propagation settings:\n"
        f"{settings_text(info['EncoderFeaturePropagation'], encoder.widgets_values)}",
        (20, 640), (760, 600), title="About: Wan with both methods",
    )  # fmt: skip
    g.group("Speed-ups, chained", [attention, encoder])
    return g


WORKFLOWS = (wf_sd15_attention, wf_sd15_encoder, wf_sdxl_encoder, wf_chained, wf_comparison, wf_flux, wf_zimage,
             wf_wan21)  # fmt: skip


# --------------------------------------------------------------------------------------------------
# Thumbnails: the workflow's own layout, drawn with Pillow


def render_thumbnail(workflow: dict, title: str, path: Path, size=(400, 400)) -> None:
    """400x400: square like the template browser's cards, and within the registry's 800x400 icon limit."""
    from PIL import Image, ImageDraw, ImageFont

    width, height = size
    image = Image.new("RGB", size, (32, 33, 37))
    draw = ImageDraw.Draw(image)
    header = 78
    try:
        font = ImageFont.load_default(size=23)
        small = ImageFont.load_default(size=9)
    except TypeError:  # Pillow < 10.1 has no sized default font
        font = small = ImageFont.load_default()
    draw.rectangle([0, 0, width, header], fill=(44, 62, 92))
    words, lines = title.split(), [""]
    for word in words:  # wrap the title to the thumbnail width
        candidate = f"{lines[-1]} {word}".strip()
        if draw.textlength(candidate, font=font) > width - 32 and lines[-1]:
            lines.append(word)
        else:
            lines[-1] = candidate
    for row, line in enumerate(lines[:2]):
        draw.text((14, 10 + 30 * row), line, fill=(240, 240, 240), font=font)

    boxes = [(n["pos"][0], n["pos"][1], n["pos"][0] + n["size"][0], n["pos"][1] + n["size"][1])
             for n in workflow["nodes"]]  # fmt: skip
    x0, y0 = min(b[0] for b in boxes), min(b[1] for b in boxes)
    x1, y1 = max(b[2] for b in boxes), max(b[3] for b in boxes)
    margin = 16
    scale = min((width - 2 * margin) / (x1 - x0), (height - header - 2 * margin) / (y1 - y0))
    left_pad = (width - 2 * margin - (x1 - x0) * scale) / 2
    top_pad = (height - header - 2 * margin - (y1 - y0) * scale) / 2

    def to_px(x, y):
        return margin + left_pad + (x - x0) * scale, header + margin + top_pad + (y - y0) * scale

    by_id = {n["id"]: n for n in workflow["nodes"]}
    for _, src, src_slot, dst, dst_slot, _ in workflow["links"]:
        a, b = by_id[src], by_id[dst]
        sx, sy = to_px(a["pos"][0] + a["size"][0], a["pos"][1] + 30 + 20 * src_slot)
        dx, dy = to_px(b["pos"][0], b["pos"][1] + 30 + 20 * dst_slot)
        draw.line([(sx, sy), ((sx + dx) / 2, sy), ((sx + dx) / 2, dy), (dx, dy)], fill=(120, 150, 190), width=2)
    for node in workflow["nodes"]:
        left, top = to_px(*node["pos"])
        right, bottom = to_px(node["pos"][0] + node["size"][0], node["pos"][1] + node["size"][1])
        ours = node["type"] in PACK_NODES
        fill = (70, 70, 140) if ours else (120, 90, 40) if node["type"] in FRONTEND_ONLY_NODES else (58, 60, 66)
        outline = (255, 200, 80) if ours else (90, 92, 100)
        draw.rounded_rectangle([left, top, right, bottom], radius=4, fill=fill, outline=outline, width=2 if ours else 1)
        label = node.get("title") or node["type"]
        max_chars = max(4, int((right - left) / 5.2))
        draw.text((left + 4, top + 3), label[:max_chars], fill=(230, 230, 230), font=small)
    image.save(path, "JPEG", quality=88)


TITLES = {
    "sd15_attention_map_reuse": "SD1.5 + Attention Map Reuse",
    "sd15_encoder_feature_propagation": "SD1.5 + Encoder Feature Propagation",
    "sdxl_encoder_feature_propagation": "SDXL + Encoder Feature Propagation",
    "sd15_both_methods_chained": "SD1.5 + both methods chained",
    "sd15_side_by_side_comparison": "SD1.5: baseline vs. patched, same seed",
    "flux_dev_calibrated_reuse": "Flux.1 dev + Reuse Calibrate + both methods",
    "z_image_turbo_encoder_feature_propagation": "Z-Image-Turbo + Encoder Feature Propagation",
    "wan21_text_to_video_both_methods": "Wan 2.1 text-to-video + both methods",
}


def generate(object_info: dict) -> dict[str, dict]:
    return {(g := build(object_info)).name: g.to_json() for build in WORKFLOWS}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=OUT_DIR)
    parser.add_argument("--check", action="store_true", help="only compare with the files on disk")
    args = parser.parse_args(argv)
    workflows = generate(local_object_info())
    stale = []
    for name, workflow in workflows.items():
        text = json.dumps(workflow, indent=2) + "\n"
        json_path = args.out / f"{name}.json"
        if args.check:
            if not json_path.is_file() or json_path.read_text(encoding="utf-8") != text:
                stale.append(json_path.name)
            continue
        args.out.mkdir(parents=True, exist_ok=True)
        json_path.write_text(text, encoding="utf-8")
        render_thumbnail(workflow, TITLES[name], args.out / f"{name}.jpg")
        shown = json_path.relative_to(REPO) if json_path.is_relative_to(REPO) else json_path
        print(f"wrote {shown} (+ .jpg)")
    if stale:
        print(f"out of date (run python tools/make_example_workflows.py): {', '.join(stale)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
