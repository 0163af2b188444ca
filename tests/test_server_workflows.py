"""The pack in the real ComfyUI server: node definitions, served example workflows, prompts run end to end.

One ``python main.py --cpu`` per session (``server_fixtures.comfy_server``) with the pack linked into a
temporary ``custom_nodes/`` and tiny model files generated at test time under the standard file names (SD1.5/SDXL
checkpoints; Flux, Z-Image and Wan 2.1 diffusion models, CLIP-L, the Flux and Wan VAEs), so every example workflow
runs unchanged apart from its image size, step count and, in the transformer examples, the text encoder: ComfyUI
builds T5-XXL, Qwen3-4B and UMT5-XXL at their real sizes, so the runs load a real-size CLIP-L instead
(``server_support.TEXT_ENCODER_STAND_INS``). An example whose diffusion model the running ComfyUI cannot load
(Z-Image in 0.3.64) skips its run with the reason. Skips with the reason when ComfyUI or comfyui-frontend-package is
absent.
"""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
import urllib.parse

import pytest
from comfy_harness import find_comfyui, running_version
from server_support import (
    IMAGE_OUTPUT_NODES,
    PACK_FOLDER_NAME,
    PACK_NODE_TYPES,
    REPO_DIR,
    TEST_IMAGE_SIZE,
    TEST_VIDEO_LENGTH,
    example_workflow_paths,
    history_error,
    history_images,
    load_tools_module,
    run_prompt,
    shrink_prompt,
    unloadable_models,
)

pytest_plugins = ["server_fixtures"]
pytestmark = pytest.mark.comfyui

EXAMPLES = example_workflow_paths()
EXPECTED_EXAMPLES = {
    "sd15_attention_map_reuse",
    "sd15_encoder_feature_propagation",
    "sdxl_encoder_feature_propagation",
    "sd15_both_methods_chained",
    "sd15_side_by_side_comparison",
    "flux_dev_calibrated_reuse",
    "z_image_turbo_encoder_feature_propagation",
    "wan21_text_to_video_both_methods",
}


def _api_prompt(path, object_info) -> dict:
    workflow_api = load_tools_module("workflow_api")
    return workflow_api.ui_to_api(json.loads(path.read_text(encoding="utf-8")), object_info)


def _run(server, prompt: dict, timeout: float = 600.0) -> dict:
    status, answer = server.post_prompt(prompt)
    assert status == 200, f"POST /prompt refused the prompt: {json.dumps(answer)[:2000]}"
    assert answer["node_errors"] == {}, answer["node_errors"]
    return server.wait_for_history(answer["prompt_id"], timeout=timeout)


def test_examples_ship_with_thumbnails():
    assert {p.stem for p in EXAMPLES} == EXPECTED_EXAMPLES
    for path in EXAMPLES:
        workflow = json.loads(path.read_text(encoding="utf-8"))
        assert workflow["version"] == 0.4 and workflow["nodes"] and workflow["links"]
        assert path.with_suffix(".jpg").is_file(), f"{path.name} has no same-name .jpg thumbnail"
        types = {node["type"] for node in workflow["nodes"]}
        assert types & set(PACK_NODE_TYPES), f"{path.name} uses none of the pack's nodes"
        assert "Note" in types or "MarkdownNote" in types, f"{path.name} has no note explaining the settings"


def test_examples_are_generated_from_the_current_node_schemas(comfy):
    """example_workflows/ is what tools/make_example_workflows.py makes from the nodes' schemas today (widget
    order, defaults, tooltips quoted in the notes); after a node changes, re-run that script."""
    generator = load_tools_module("make_example_workflows")
    version = running_version()
    if version != generator.GENERATED_WITH:
        pytest.skip(
            f"the examples are generated with ComfyUI {generator.GENERATED_WITH}'s schemas, this is {version}; "
            "the browser test loads them in this version's frontend"
        )
    generated = generator.generate(generator.local_object_info())
    on_disk = {p.stem: json.loads(p.read_text(encoding="utf-8")) for p in EXAMPLES}
    stale = sorted(name for name in generated if generated[name] != on_disk.get(name))
    assert not stale, f"out of date: {stale}; run python tools/make_example_workflows.py"


def _requirements() -> list[str]:
    lines = (REPO_DIR / "requirements.txt").read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def _pack_config():
    """pyproject.toml as ComfyUI's own parser (comfy_config, used by the registry tooling) reads it."""
    root = find_comfyui()
    if root is None:
        pytest.skip("real ComfyUI not found (COMFYUI_PATH); its comfy_config parses pyproject.toml")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    from comfy_config import config_parser

    return config_parser.extract_node_configuration(str(REPO_DIR))


def test_pyproject_is_complete_for_the_registry():
    config = _pack_config()
    assert config is not None
    assert config.project.name == PACK_FOLDER_NAME and "comfyui" not in config.project.name.replace("comfyui-", "")
    assert re.fullmatch(r"\d+\.\d+\.\d+", config.project.version)
    assert config.project.description and config.project.license
    assert config.project.urls.repository.startswith("https://")
    assert config.tool_comfy.publisher_id and config.tool_comfy.display_name
    assert config.tool_comfy.icon.startswith("https://")
    assert config.project.supported_comfyui_version == ">=0.3.64"
    assert config.project.supported_comfyui_frontend_version.startswith(">=")
    # requirements.txt (what ComfyUI-Manager installs) = pyproject dependencies minus the frontend declaration
    deps = [d for d in config.project.dependencies if not d.startswith("comfyui-frontend-package")]
    assert sorted(_requirements()) == sorted(deps)
    assert not [r for r in _requirements() if re.match(r"torch(vision|audio)?\b", r)], "never list torch"


def test_installing_the_pack_installs_nothing_new():
    """Where ComfyUI's requirements are installed, the pack's requirements (and frontend declaration) are all
    satisfied: pip would install nothing, so in particular no second torch."""
    frontend = [d for d in _pack_config().project.dependencies if d.startswith("comfyui-frontend-package")]
    cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--no-index", "--quiet", "--report", "-",
           "-r", str(REPO_DIR / "requirements.txt"), *frontend]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    would_install = [item["metadata"]["name"] for item in json.loads(result.stdout)["install"]]
    assert would_install == []


def test_object_info_lists_pack_nodes_with_tooltips(object_info):
    for name in PACK_NODE_TYPES:
        assert name in object_info, f"{name} is not registered; server log may say why"
        info = object_info[name]
        assert info["python_module"].startswith("custom_nodes."), info["python_module"]
        assert info["output"] == ["MODEL"]
        assert info["description"]
        inputs = {**info["input"]["required"], **info["input"].get("optional", {})}
        assert "model" in inputs and inputs["model"][0] == "MODEL"
        assert len(inputs) > 1, f"{name} exposes no settings"
        for input_name, spec in inputs.items():
            options = spec[1] if len(spec) > 1 else {}
            assert options.get("tooltip", "").strip(), f"{name}.{input_name} has no tooltip"
        assert all(info.get("output_tooltips") or [None]), f"{name} output has no tooltip"


def test_example_workflows_are_served_as_templates(comfy_server):
    listing = comfy_server.get_json("/workflow_templates")
    assert sorted(listing.get(PACK_FOLDER_NAME, [])) == sorted(EXPECTED_EXAMPLES), listing
    for path in EXAMPLES:
        base = f"/api/workflow_templates/{PACK_FOLDER_NAME}/{path.stem}"
        assert json.loads(comfy_server.get_bytes(f"{base}.json")) == json.loads(path.read_text(encoding="utf-8"))
        assert comfy_server.get_bytes(f"{base}.jpg")[:3] == b"\xff\xd8\xff", f"{path.stem}.jpg is not served as JPEG"


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_workflow_runs_to_an_image(comfy_server, object_info, path):
    from PIL import Image

    prompt = run_prompt(_api_prompt(path, object_info))
    unloadable = unloadable_models(prompt, comfy_server.unavailable)
    if unloadable:
        pytest.skip(f"{path.stem} is not run on this ComfyUI: " + "; ".join(f"{k}: {v}" for k, v in unloadable.items()))
    entry = _run(comfy_server, prompt)
    assert history_error(entry) is None, f"{path.stem}: {history_error(entry)}\n{comfy_server.log_tail()}"
    assert entry["status"]["status_str"] == "success"
    images = history_images(entry)
    outputs = [n for n in prompt.values() if n["class_type"] in IMAGE_OUTPUT_NODES]
    assert len(images) == len(outputs) >= 1
    for image in images:
        query = urllib.parse.urlencode(image)
        picture = Image.open(io.BytesIO(comfy_server.get_bytes(f"/view?{query}")))
        assert picture.size == (TEST_IMAGE_SIZE, TEST_IMAGE_SIZE)
        if image["filename"].endswith(".webp"):  # the video: every frame decoded
            assert picture.n_frames == TEST_VIDEO_LENGTH
    # a text preview (Reuse Calibrate's report) shows text
    for node_id, node in prompt.items():
        if node["class_type"] == "PreviewAny":
            text = "".join(entry["outputs"][node_id]["text"])
            assert "key steps" in text.lower() or "key_steps" in text, text


def _workflow_with(path, object_info, node_type: str, **inputs) -> dict:
    prompt = shrink_prompt(_api_prompt(path, object_info))
    patched = [node for node in prompt.values() if node["class_type"] == node_type]
    assert patched, f"{path.stem} has no {node_type}"
    patched[0]["inputs"].update(inputs)
    return prompt


@pytest.mark.parametrize(
    ("node_type", "bad_inputs", "field"),
    [
        ("AttentionMapReuse", {"strategy": "custom", "custom_schedule": "1x0?"}, "custom_schedule"),
        ("EncoderFeaturePropagation", {"key_steps": "custom", "custom_key_steps": "0, two, 5"}, "custom_key_steps"),
    ],
    ids=["bad-attention-schedule", "bad-key-steps"],
)
def test_malformed_input_is_a_node_error_not_a_crash(comfy_server, object_info, node_type, bad_inputs, field):
    path = next(p for p in EXAMPLES if p.stem == "sd15_both_methods_chained")
    prompt = _workflow_with(path, object_info, node_type, **bad_inputs)
    status, answer = comfy_server.post_prompt(prompt)
    if status == 200:  # accepted by validation: the node itself must refuse it at execution
        entry = comfy_server.wait_for_history(answer["prompt_id"])
        assert entry["status"]["status_str"] == "error"
        error = history_error(entry)
        assert error is not None and node_type in error and field in error, error
    else:  # refused by validation: the error names the node and the field
        assert status == 400, answer
        text = json.dumps(answer)
        assert node_type in text and field in text, text
    # the server survived and still samples with the patched model (a new seed, so the sampler really runs
    # instead of ComfyUI answering from its cache)
    assert comfy_server.process.poll() is None
    good = shrink_prompt(_api_prompt(path, object_info))
    for node in good.values():
        if node["class_type"] == "KSampler":
            node["inputs"]["seed"] += 1 + len(field)
    entry = _run(comfy_server, good)
    assert entry["status"]["status_str"] == "success", history_error(entry)
    assert history_images(entry)


def test_out_of_range_widget_is_rejected_by_validation(comfy_server, object_info):
    path = next(p for p in EXAMPLES if p.stem == "sd15_attention_map_reuse")
    prompt = _workflow_with(path, object_info, "AttentionMapReuse", reuse_fraction=5.0)
    status, answer = comfy_server.post_prompt(prompt)
    assert status == 400, answer
    node_errors = answer["node_errors"]
    assert node_errors, answer
    (errors,) = node_errors.values()
    assert errors["class_type"] == "AttentionMapReuse"
    assert any(e.get("extra_info", {}).get("input_name") == "reuse_fraction" for e in errors["errors"]), errors
