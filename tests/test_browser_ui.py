"""The example workflows in the real ComfyUI web frontend, driven in headless Chromium.

Each workflow is opened the way a user opens it: Templates sidebar -> "comfyui-reuse" -> card (the
frontend fetches it from ``/api/workflow_templates/comfyui-reuse/``). The test then checks that no node is
missing or red, that the pack's nodes show all their widgets with the saved values, that the frontend's own
"Export (API)" conversion equals ``tools/workflow_api.py``'s, and that queuing from the UI runs to
completion with the images shown. Before queuing it does what a user with other files would do: picks a smaller
image, fewer steps and, in the transformer examples, the stand-in text encoder the server test runs
(``server_support.TEXT_ENCODER_STAND_INS``: ComfyUI builds the examples' own text encoders at their real sizes). An
example whose diffusion model this ComfyUI cannot load (Z-Image in 0.3.64) is loaded and checked, then skipped
with the reason instead of queued. Screenshots go to ``tests/_artifacts/browser/`` (gitignored).

It runs against whichever frontend the server ships (1.27.10 with ComfyUI 0.3.64, 1.49.6 with 0.33.0): the
few places where their UIs differ are the ``FrontendUI`` entries in ``FRONTEND_UIS``.

Needs: Debian ``chromium`` (``/usr/bin/chromium`` or ``CHROMIUM_PATH``), ``playwright`` (the Python
package only; no downloaded browser), and the real server of ``test_server_workflows.py``.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from comfy_harness import require_comfyui
from server_support import (
    IMAGE_OUTPUT_NODES,
    LATENT_NODES,
    PACK_FOLDER_NAME,
    PACK_NODE_TYPES,
    REPO_DIR,
    STEP_NODES,
    TEST_STEPS,
    TEST_VIDEO_LENGTH,
    example_workflow_paths,
    history_error,
    load_tools_module,
    run_prompt,
    text_encoder_stand_ins,
    unloadable_models,
)

pytest_plugins = ["server_fixtures"]
pytestmark = pytest.mark.comfyui

CHROMIUM = Path(os.environ.get("CHROMIUM_PATH", "/usr/bin/chromium"))
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
ARTIFACTS = REPO_DIR / "tests" / "_artifacts" / "browser"
BROWSER_IMAGE_SIZE = 32  # not the server test's 64, so ComfyUI's cache cannot answer for the UI run
EXAMPLES = example_workflow_paths()
# Every node of the pack whose widgets the test checks; the frontend adds a "control after generate" widget after a
# seed (Reuse Calibrate's), which tools/workflow_api.py names "<input>:control".
PACK_NODES_WITH_WIDGETS = (*PACK_NODE_TYPES, "ReuseCalibrate")
CONTROL_WIDGET = "control_after_generate"
# Display-only widgets a frontend adds to a core node and writes into its API export (1.27.10: PreviewAny's "preview"
# text box, as ""); the server ignores inputs a node does not declare, so the comparison leaves them out.
FRONTEND_DISPLAY_WIDGETS = {"PreviewAny": ("preview",)}


@dataclass(frozen=True)
class FrontendUI:
    """What differs between the frontend versions the test drives (Playwright selectors)."""

    template_dialog: str  # the template browser while it is open
    missing_nodes_report: str  # what appears when a loaded workflow has node types nobody registered


FRONTEND_UIS = {
    # 1.27.10: PrimeVue dialogs; missing nodes (and models) open a "Some Nodes Are Missing" dialog.
    (1, 27): FrontendUI(
        template_dialog="text=Get Started with a Template",
        missing_nodes_report="text=Some Nodes Are Missing",
    ),
    # 1.49.6: the template browser is a reka-ui dialog titled "Templates"; missing nodes, models and media open
    # no dialog but an error overlay in the top right ("Missing node: <type>", "N errors found"), kept in sync
    # with the right side panel's Errors tab, and their nodes are marked red.
    (1, 49): FrontendUI(
        template_dialog='[role="dialog"][aria-labelledby="global-workflow-template-selector"]',
        missing_nodes_report='[data-testid="error-overlay"]',
    ),
}
# Everything the frontends show to report a problem: dialogs (1.27.10's missing nodes/models; any modal in 1.49.6)
# and 1.49.6's error overlay. Visibility is tested with getClientRects(): 1.49.6's dialogs are position: fixed,
# where offsetParent is always null.
REPORT_SELECTOR = '.p-dialog, [role="dialog"], [data-testid="error-overlay"]'


def frontend_ui(version: str) -> FrontendUI:
    """The UI of the newest listed frontend not newer than ``version`` (the version the server serves)."""
    running = tuple(int(part) for part in version.split(".")[:2])
    known = [v for v in FRONTEND_UIS if v <= running]
    assert known, f"frontend {version} is older than every frontend this test knows ({sorted(FRONTEND_UIS)})"
    return FRONTEND_UIS[max(known)]


# Both frontends' template browsers load the chosen workflow with app.loadGraphData, which checks for missing
# models/media (and, in 1.49.6, opens the error overlay) after the nodes are already in the graph. Counting the
# finished calls lets the test look for problems only once the frontend is done with the workflow.
COUNT_GRAPH_LOADS = """() => {
    const load = app.loadGraphData.bind(app);
    window.__reuseGraphLoads = {started: 0, finished: 0};
    app.loadGraphData = async (...args) => {
        window.__reuseGraphLoads.started++;
        try { return await load(...args); } finally { window.__reuseGraphLoads.finished++; }
    };
}"""


def browser_unavailable_reason() -> str | None:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright is not installed (pip install playwright==1.65.2; the test uses Debian's chromium)"
    if not CHROMIUM.is_file():
        return f"Chromium not found at {CHROMIUM} (apt-get install chromium chromium-driver, or set CHROMIUM_PATH)"
    return None


@pytest.fixture(scope="module")
def page(comfy_server, object_info, tmp_path_factory):
    require_comfyui(browser_unavailable_reason())
    if "UpscaleModelLoader" not in object_info:
        # Frontend 1.27.10 (pinned by ComfyUI 0.3.64) cannot build the ckpt_name widget of any loader node
        # when this core node is missing, so every workflow would load with a red checkpoint loader.
        require_comfyui(
            "ComfyUI's UpscaleModelLoader is not registered (its dependency spandrel is missing: "
            "pip install --no-deps spandrel==0.4.2); frontend 1.27.10 then breaks every loader widget"
        )
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            user_data_dir=str(tmp_path_factory.mktemp("chromium_profile")),
            executable_path=str(CHROMIUM),
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": 1800, "height": 1000},
        )
        try:
            tab = context.pages[0] if context.pages else context.new_page()
            tab.console_errors = []
            tab.on("pageerror", lambda err: tab.console_errors.append(f"{err.message}\n{err.stack}"))
            tab.goto(comfy_server.url + "/", wait_until="domcontentloaded")
            tab.wait_for_function("() => window.app && window.app.graph && window.LiteGraph", timeout=120_000)
            tab.frontend_version = tab.evaluate("() => window.__COMFYUI_FRONTEND_VERSION__")
            tab.ui = frontend_ui(tab.frontend_version)
            tab.evaluate(COUNT_GRAPH_LOADS)
            _close_first_start_templates(tab)
            yield tab
        finally:
            context.close()


def _close_first_start_templates(page) -> None:
    """A fresh profile opens the template browser by itself a moment after the app is ready (1.49.6): wait for it and
    close it, so that the first test does not click the Templates button while it opens (its overlay takes the
    click)."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeoutError

    dialog = page.locator(page.ui.template_dialog)
    try:
        dialog.wait_for(timeout=5_000)
    except PlaywrightTimeoutError:
        return
    page.keyboard.press("Escape")
    dialog.wait_for(state="hidden", timeout=10_000)


def _close_dialogs(page) -> None:
    """Close what a user would close before the next step: dialogs (Escape) and 1.49.6's error overlay (its X)."""
    for _ in range(5):
        if not _graph_state(page)["dialogs"]:
            return
        page.keyboard.press("Escape")
        for dismiss in page.locator('[data-testid="error-overlay-dismiss"]').all():
            if dismiss.is_visible():
                dismiss.click()
        page.wait_for_timeout(300)
    raise AssertionError(f"dialogs do not close: {_graph_state(page)['dialogs']}")


def _open_template(page, stem: str) -> None:
    """Templates sidebar -> comfyui-reuse category -> the workflow's card (as a user does)."""
    dialog = page.locator(page.ui.template_dialog)
    if not dialog.is_visible():  # a fresh profile may already show it on first start
        page.locator("button.templates-tab-button").click()
    dialog.wait_for(timeout=60_000)
    page.get_by_role("dialog").get_by_text(PACK_FOLDER_NAME, exact=True).first.click()
    loads = page.evaluate("() => window.__reuseGraphLoads.finished")
    page.locator(f'[data-testid="template-workflow-{stem}"]').click()
    dialog.wait_for(state="hidden", timeout=60_000)
    page.wait_for_function(
        "(n) => { const {started, finished} = window.__reuseGraphLoads; return finished > n && started === finished; }",
        arg=loads, timeout=60_000,
    )  # fmt: skip


def _graph_state(page) -> dict:
    return page.evaluate(
        """(reports) => ({
            nodes: app.graph.nodes.map(n => ({
                id: n.id, type: n.type, title: n.title,
                registered: !!LiteGraph.registered_node_types[n.type],
                has_errors: !!n.has_errors,
                widgets: (n.widgets || []).map(w => ({name: w.name, value: w.value})),
            })),
            dialogs: Array.from(document.querySelectorAll(reports))
                .filter(d => d.getClientRects().length > 0).map(d => d.innerText.slice(0, 500)),
        })""",
        REPORT_SELECTOR,
    )


def _problems(state: dict) -> list[str]:
    """Everything that makes a loaded workflow unusable: dialogs or error overlays (missing nodes/models),
    unknown or red nodes."""
    problems = [f"dialog/overlay open: {text!r}" for text in state["dialogs"]]
    for node in state["nodes"]:
        if not node["registered"]:
            problems.append(f"node {node['id']} type {node['type']!r} is not registered (missing node)")
        if node["has_errors"]:
            problems.append(f"node {node['id']} ({node['type']}) is marked red (has_errors)")
    return problems


def _wait_for_graph(page, workflow: dict) -> dict:
    expected = sorted(n["type"] for n in workflow["nodes"])
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        state = _graph_state(page)
        if sorted(n["type"] for n in state["nodes"]) == expected:
            return state
        time.sleep(0.25)
    raise AssertionError(f"the graph never showed the workflow's nodes; it shows {_graph_state(page)['nodes']}")


def test_missing_node_is_detected(page):
    """The checks below can fail: a workflow with an unknown node type is reported."""
    workflow = json.loads(EXAMPLES[0].read_text(encoding="utf-8"))
    workflow["nodes"][0]["type"] = "NoSuchNodeFromAnotherPack"
    _close_dialogs(page)
    page.evaluate("async (wf) => { await app.loadGraphData(wf, true, true, 'missing-node-check'); }", workflow)
    page.locator(page.ui.missing_nodes_report).first.wait_for(timeout=10_000)
    problems = _problems(_graph_state(page))
    assert any("NoSuchNodeFromAnotherPack" in p and "not registered" in p for p in problems), problems
    assert any("NoSuchNodeFromAnotherPack" in p and "dialog/overlay open" in p for p in problems), problems
    _close_dialogs(page)


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_workflow_in_the_web_ui(page, comfy_server, object_info, path):
    workflow_api = load_tools_module("workflow_api")
    workflow = json.loads(path.read_text(encoding="utf-8"))

    _close_dialogs(page)
    page.console_errors.clear()
    _open_template(page, path.stem)
    state = _wait_for_graph(page, workflow)
    assert not _problems(state), _problems(state)

    # the pack's nodes show every widget of their schema, holding the values saved in the file
    saved = {str(n["id"]): n for n in workflow["nodes"]}  # 1.49.6's graph holds the ids as strings
    for node in state["nodes"]:
        if node["type"] not in PACK_NODES_WITH_WIDGETS:
            continue
        names = workflow_api.widget_names(object_info[node["type"]])
        assert [w["name"] for w in node["widgets"]] == [CONTROL_WIDGET if ":" in w else w for w in names]
        values = [w["value"] for w in node["widgets"]]
        assert values == pytest.approx(saved[str(node["id"])]["widgets_values"]), node["type"]

    # the frontend's own UI->API conversion agrees with tools/workflow_api.py
    frontend_prompt = page.evaluate("async () => (await app.graphToPrompt()).output")
    for node in frontend_prompt.values():
        for name in FRONTEND_DISPLAY_WIDGETS.get(node["class_type"], ()):
            node["inputs"].pop(name, None)
    ours = workflow_api.ui_to_api(workflow, object_info)
    assert {k: (v["class_type"], v["inputs"]) for k, v in frontend_prompt.items()} == pytest.approx(
        {k: (v["class_type"], v["inputs"]) for k, v in ours.items()}
    )

    # what this ComfyUI cannot run is loaded and checked above, not queued
    unloadable = unloadable_models(run_prompt(ours), comfy_server.unavailable)
    if unloadable:
        page.screenshot(path=str(ARTIFACTS / f"{path.stem}.png"))
        reasons = "; ".join(f"{name}: {why}" for name, why in unloadable.items())
        pytest.skip(f"{path.stem} loads without problems; not queued: {reasons}")

    # queue from the UI (smaller image, fewer steps, the stand-in text encoder) and wait for the server to finish it
    page.evaluate(
        """([size, length, steps, latents, samplers, standIns]) => {
            for (const n of app.graph.nodes) {
                for (const w of n.widgets || []) {
                    if (latents.includes(n.type) && (w.name === 'width' || w.name === 'height')) w.value = size;
                    if (latents.includes(n.type) && w.name === 'length') w.value = length;
                    if (samplers.includes(n.type) && w.name === 'steps') w.value = Math.min(w.value, steps);
                    const standIn = standIns[String(n.id)];
                    if (standIn && w.name in standIn) w.value = standIn[w.name];
                }
            }
        }""",
        [BROWSER_IMAGE_SIZE, TEST_VIDEO_LENGTH, TEST_STEPS, LATENT_NODES, STEP_NODES, text_encoder_stand_ins(ours)],
    )
    before = set(comfy_server.get_json("/history"))
    page.evaluate("async () => { await app.queuePrompt(0, 1); }")
    deadline = time.monotonic() + 300
    new_ids: set = set()
    while time.monotonic() < deadline and not new_ids:
        new_ids = set(comfy_server.get_json("/history")) - before
        queue = comfy_server.get_json("/queue")
        if not new_ids and not queue["queue_running"] and not queue["queue_pending"]:
            time.sleep(1)  # the prompt may still be on its way; /history is checked again
        time.sleep(0.5)
    assert len(new_ids) == 1, f"queuing from the UI produced {len(new_ids)} prompts\n{comfy_server.log_tail()}"
    entry = comfy_server.wait_for_history(new_ids.pop(), timeout=300)
    assert history_error(entry) is None, history_error(entry)
    outputs = [n["id"] for n in workflow["nodes"] if n["type"] in IMAGE_OUTPUT_NODES]
    page.wait_for_function(
        "(ids) => ids.every(id => (app.nodeOutputs?.[String(id)]?.images || []).length > 0)", arg=outputs,
        timeout=30_000,
    )  # fmt: skip
    state = _graph_state(page)
    assert not _problems(state), _problems(state)
    assert not page.console_errors, page.console_errors
    page.screenshot(path=str(ARTIFACTS / f"{path.stem}.png"))
