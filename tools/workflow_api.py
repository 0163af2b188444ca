"""Convert a UI-format ComfyUI workflow (what the frontend saves) into the API prompt ``POST /prompt`` takes.

ComfyUI has no backend converter: the frontend's "Export (API)" does this in JavaScript. This module
follows the frontend's rules, using the node definitions from ``/object_info``:

* widget inputs are the INT/FLOAT/STRING/BOOLEAN/COMBO inputs without ``forceInput``, in the node's
  ``input_order`` (required, then optional); ``widgets_values`` holds one value per widget in that order,
  whether or not the widget is also fed by a link;
* an INT input gets an extra, unserialised "control after generate" widget value right after it when its
  spec says ``control_after_generate`` (or, when the spec does not say, when it is named ``seed`` or
  ``noise_seed``); a COMBO gets one only when its spec says ``control_after_generate``;
* links ``[id, from_node, from_slot, to_node, to_slot, type]`` become ``[str(from_node), from_slot]`` on the
  target input, overriding the widget value of a widget that was turned into a socket;
* frontend-only nodes (Note, MarkdownNote) are dropped.

Usage: ``python tools/workflow_api.py workflow.json --object-info object_info.json > prompt.json``
(``--object-info`` may also be a server URL such as ``http://127.0.0.1:8188``).
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.request
from pathlib import Path

FRONTEND_ONLY_NODES = frozenset({"Note", "MarkdownNote"})
WIDGET_TYPES = frozenset({"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"})
SEED_NAMES = ("seed", "noise_seed")
ACTIVE_MODE = 0  # LiteGraph node modes: 0 always, 2 never (muted), 4 bypass


class WorkflowConversionError(ValueError):
    """The workflow cannot be converted faithfully (unknown node, widget count mismatch, ...)."""


def ordered_inputs(node_info: dict) -> list[tuple[str, object, dict]]:
    """(name, type, options) for every required and optional input, in the node's declared order."""
    declared = node_info.get("input", {})
    order = node_info.get("input_order") or {section: list(declared.get(section, {})) for section in declared}
    result = []
    for section in ("required", "optional"):
        specs = declared.get(section, {}) or {}
        for name in order.get(section, []):
            spec = specs[name]
            input_type = spec[0]
            options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            result.append((name, input_type, options))
    return result


def is_widget(input_type, options: dict) -> bool:
    if options.get("forceInput"):
        return False
    return isinstance(input_type, list) or input_type in WIDGET_TYPES


def has_control_widget(name: str, input_type, options: dict) -> bool:
    """Whether the frontend adds a "control after generate" widget after this one."""
    if input_type == "INT":
        explicit = options.get("control_after_generate")
        return bool(explicit) if explicit is not None else name in SEED_NAMES
    if isinstance(input_type, list) or input_type == "COMBO":
        return bool(options.get("control_after_generate"))
    return False


def widget_names(node_info: dict) -> list[str]:
    """The widget slots of a node in ``widgets_values`` order; control widgets are ``<name>:control``."""
    names = []
    for name, input_type, options in ordered_inputs(node_info):
        if is_widget(input_type, options):
            names.append(name)
            if has_control_widget(name, input_type, options):
                names.append(f"{name}:control")
    return names


def _widget_inputs(node: dict, node_info: dict) -> dict:
    values = node.get("widgets_values")
    if values is None:
        values = []
    if isinstance(values, dict):  # some frontend versions save a name -> value mapping
        return {name: values[name] for name in widget_names(node_info) if ":" not in name and name in values}
    slots = widget_names(node_info)
    if len(values) != len(slots):
        raise WorkflowConversionError(
            f"node {node['id']} ({node['type']}): {len(values)} widgets_values for {len(slots)} widgets {slots}; "
            "the workflow was saved against a different version of this node"
        )
    return {name: value for name, value in zip(slots, values, strict=True) if ":" not in name}


def ui_to_api(workflow: dict, object_info: dict) -> dict:
    """The API prompt (``{node_id: {class_type, inputs, _meta}}``) for a UI-format workflow."""
    links = {}
    for link in workflow.get("links", []):
        try:
            if isinstance(link, dict):  # version 1 schema stores links as objects
                links[link["id"]] = (link["origin_id"], link["origin_slot"])
            else:
                link_id, from_node, from_slot = link[0], link[1], link[2]
                links[link_id] = (from_node, from_slot)
        except (KeyError, IndexError, TypeError) as exc:
            raise WorkflowConversionError(
                f"links: malformed entry {link!r}; expected [id, from_node, from_slot, to_node, to_slot, type] "
                "or an object with id, origin_id and origin_slot"
            ) from exc

    prompt = {}
    for node in workflow.get("nodes", []):
        node_type = node["type"]
        if node_type in FRONTEND_ONLY_NODES:
            continue
        if node.get("mode", ACTIVE_MODE) != ACTIVE_MODE:
            raise WorkflowConversionError(f"node {node['id']} ({node_type}) is muted or bypassed; not supported")
        if node_type not in object_info:
            raise WorkflowConversionError(f"node {node['id']}: type {node_type!r} is not registered on the server")
        info = object_info[node_type]
        inputs = _widget_inputs(node, info)
        for socket in node.get("inputs", []) or []:
            link_id = socket.get("link")
            if link_id is None:
                continue
            if link_id not in links:
                raise WorkflowConversionError(
                    f"node {node['id']} ({node_type}): input {socket.get('name')!r} uses link {link_id!r}, which is "
                    "not in the workflow's links; the file is inconsistent (reconnect the input and save it again)"
                )
            from_node, from_slot = links[link_id]
            inputs[socket["name"]] = [str(from_node), from_slot]
        prompt[str(node["id"])] = {
            "class_type": node_type,
            "inputs": inputs,
            "_meta": {"title": node.get("title") or info.get("display_name") or node_type},
        }
    return prompt


def _load_object_info(source: str) -> dict:
    if source.startswith(("http://", "https://")):
        with urllib.request.urlopen(source.rstrip("/") + "/object_info", timeout=60) as resp:
            return json.load(resp)
    return json.loads(Path(source).read_text(encoding="utf-8"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("workflow", type=Path, help="UI-format workflow JSON")
    parser.add_argument("--object-info", required=True, help="object_info JSON file or ComfyUI server URL")
    args = parser.parse_args(argv)
    prompt = ui_to_api(json.loads(args.workflow.read_text(encoding="utf-8")), _load_object_info(args.object_info))
    json.dump(prompt, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
