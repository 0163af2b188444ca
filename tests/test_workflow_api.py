"""tools/workflow_api.py on small hand-written UI workflows (no ComfyUI: object_info is written here too)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

TOOLS_DIR = Path(__file__).resolve().parents[1] / "tools"


def _load_workflow_api():
    # By path under a private name: tools/ is not a package, and putting it on sys.path for one module is not needed.
    spec = importlib.util.spec_from_file_location("_workflow_api_under_test", TOOLS_DIR / "workflow_api.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


wa = _load_workflow_api()

OBJECT_INFO = {
    "Source": {
        "input": {"required": {"seed": ["INT", {"default": 0}], "name": ["STRING", {}]}},
        "input_order": {"required": ["seed", "name"]},
        "display_name": "Source node",
    },
    "Sink": {
        "input": {"required": {"value": ["LATENT", {}], "scale": ["FLOAT", {"default": 1.0}]}},
        "input_order": {"required": ["value", "scale"]},
    },
}


def _workflow(links, sink_link=1):
    return {
        "nodes": [
            {"id": 1, "type": "Source", "widgets_values": [7, "randomize", "a"], "inputs": []},
            {"id": 2, "type": "Sink", "widgets_values": [0.5], "inputs": [{"name": "value", "link": sink_link}]},
            {"id": 3, "type": "Note", "widgets_values": ["frontend only"]},
        ],
        "links": links,
    }


def test_converts_widgets_links_and_drops_frontend_only_nodes():
    prompt = wa.ui_to_api(_workflow([[1, 1, 0, 2, 0, "LATENT"]]), OBJECT_INFO)
    assert prompt == {
        "1": {"class_type": "Source", "inputs": {"seed": 7, "name": "a"}, "_meta": {"title": "Source node"}},
        "2": {"class_type": "Sink", "inputs": {"scale": 0.5, "value": ["1", 0]}, "_meta": {"title": "Sink"}},
    }
    # The version 1 schema stores links as objects; same result.
    as_objects = _workflow([{"id": 1, "origin_id": 1, "origin_slot": 0, "target_id": 2, "target_slot": 0}])
    assert wa.ui_to_api(as_objects, OBJECT_INFO) == prompt


def test_link_missing_from_links_is_a_conversion_error():
    with pytest.raises(wa.WorkflowConversionError, match=r"node 2 \(Sink\): input 'value' uses link 9, which is not"):
        wa.ui_to_api(_workflow([[1, 1, 0, 2, 0, "LATENT"]], sink_link=9), OBJECT_INFO)
    with pytest.raises(wa.WorkflowConversionError, match="uses link 1"):
        wa.ui_to_api(_workflow([]), OBJECT_INFO)


@pytest.mark.parametrize("link", [[1, 1], {"id": 1, "origin_id": 1}, 5])
def test_malformed_link_entry_is_a_conversion_error(link):
    with pytest.raises(wa.WorkflowConversionError, match="links: malformed entry"):
        wa.ui_to_api(_workflow([link]), OBJECT_INFO)


def test_link_into_a_widget_replaces_its_saved_value():
    """A STRING output wired into a widget input (Reuse Calibrate's schedule into custom_schedule): the widget keeps
    its slot in widgets_values, the link gives the input's value."""
    object_info = {
        **OBJECT_INFO,
        "Text": {"input": {"required": {}}, "input_order": {"required": []}},
        "Sink": {
            "input": {"required": {"value": ["LATENT", {}], "scale": ["FLOAT", {"default": 1.0}]},
                      "optional": {"schedule": ["STRING", {"default": "1111"}]}},
            "input_order": {"required": ["value", "scale"], "optional": ["schedule"]},
        },
    }  # fmt: skip
    workflow = _workflow([[1, 1, 0, 2, 0, "LATENT"], [2, 4, 0, 2, 1, "STRING"]])
    workflow["nodes"][1]["widgets_values"] = [0.5, "1111"]
    workflow["nodes"][1]["inputs"].append({"name": "schedule", "type": "STRING", "widget": {"name": "schedule"},
                                           "link": 2})  # fmt: skip
    workflow["nodes"].append({"id": 4, "type": "Text", "widgets_values": [], "inputs": []})
    prompt = wa.ui_to_api(workflow, object_info)
    assert prompt["2"]["inputs"] == {"scale": 0.5, "schedule": ["4", 0], "value": ["1", 0]}
