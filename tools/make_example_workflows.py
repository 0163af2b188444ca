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
import json
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))

from workflow_api import FRONTEND_ONLY_NODES, has_control_widget, is_widget, ordered_inputs  # noqa: E402

OUT_DIR = REPO / "example_workflows"
GENERATED_WITH = "0.3.64"
PACK_ID = "comfyui-reuse"
SD15_CHECKPOINT = "v1-5-pruned-emaonly.safetensors"
SDXL_CHECKPOINT = "sd_xl_base_1.0.safetensors"
MODEL_URLS = {
    SD15_CHECKPOINT: "https://huggingface.co/stable-diffusion-v1-5/stable-diffusion-v1-5/resolve/main/"
    "v1-5-pruned-emaonly.safetensors?download=true",
    SDXL_CHECKPOINT: "https://huggingface.co/stabilityai/stable-diffusion-xl-base-1.0/resolve/main/"
    "sd_xl_base_1.0.safetensors?download=true",
}
PACK_NODES = ("AttentionMapReuse", "EncoderFeaturePropagation")
CORE_NODES = ("CheckpointLoaderSimple", "CLIPTextEncode", "EmptyLatentImage", "KSampler", "VAEDecode",
              "SaveImage", "PreviewImage")  # fmt: skip
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
    import nodes as comfy_nodes  # ComfyUI's nodes.py (the harness puts the ComfyUI root first on sys.path)

    info = {}
    for name in CORE_NODES:
        cls = comfy_nodes.NODE_CLASS_MAPPINGS[name]
        info[name] = _v1_node_info(name, cls, comfy_nodes.NODE_DISPLAY_NAME_MAPPINGS)
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
            if node_type == "CheckpointLoaderSimple" and values[0] in MODEL_URLS:
                properties["models"] = [{"name": values[0], "url": MODEL_URLS[values[0]], "directory": "checkpoints"}]
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
        specs = {name: input_type for name, input_type, _ in ordered_inputs(self.info[target.type])}
        if input_name not in specs:
            raise KeyError(f"{target.type} has no input {input_name!r}; inputs: {sorted(specs)}")
        if specs[input_name] != link_type and specs[input_name] != "*":
            raise TypeError(f"{source.type}.{output} ({link_type}) -> {target.type}.{input_name} ({specs[input_name]})")
        link_id = len(self.links) + 1
        target_socket = len(target.inputs)
        target.inputs.append({"name": input_name, "type": link_type, "link": link_id})
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


WORKFLOWS = (wf_sd15_attention, wf_sd15_encoder, wf_sdxl_encoder, wf_chained, wf_comparison)


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
        print(f"wrote {json_path.relative_to(REPO)} (+ .jpg)")
    if stale:
        print(f"out of date (run python tools/make_example_workflows.py): {', '.join(stale)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
