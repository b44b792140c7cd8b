"""The example workflow in ComfyUI's own frontend, in headless Chromium: open it from the Templates source,
set the checkpoint and the folder, queue it, get the LoRA; and the memory plan as the frontend shows it under
the Check memory and Train nodes. Skipped unless COMFYUI_PATH is set (see tests/test_comfyui_real.py) and
chromium and the playwright package are installed.

The frontend is the comfyui-frontend-package that COMFYUI_PYTHON has (the one the ComfyUI checkout pins):
it lays out the widgets itself, so a workflow file whose widgets_values do not fit them fails here.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time

import pytest
import test_comfyui_real as real

from lora_trainer.lora.kohya import read_lora_file

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(not real.COMFY, reason="set COMFYUI_PATH to a ComfyUI checkout to run these")
server = real.server  # the same ComfyUI set-up as the real-host tests, started for this module
# the "control after generate" mode a fresh Train LoRA node starts at: frontends before ~1.38 ignore the node's "fixed"
FRESH_CONTROL = {"1.27.10": "randomize", "1.48.7": "fixed"}

LOAD_TEMPLATE = """async () => {
    // what the Templates dialog does for a custom node's example_workflows/ file
    const listing = await (await fetch(app.api.apiURL('/workflow_templates'))).json();
    if (!(listing.lora_trainer || []).includes('train_lora_from_folder')) return {listing};
    const url = app.api.apiURL('/workflow_templates/lora_trainer/train_lora_from_folder.json');
    await app.loadGraphData(await (await fetch(url)).json(), true, true, 'train_lora_from_folder');
    const train = app.graph.nodes.find(n => n.type === 'LoraTrainerTrainLora');
    return {listing, widgets: train.widgets.map(w => [w.name, w.value])};
}"""

SET_AND_QUEUE = """async (settings) => {
    for (const [type, name, value] of settings) {
        const node = app.graph.nodes.find(n => n.type === type);
        const widget = node.widgets.find(w => w.name === name);
        widget.value = value;
        widget.callback?.(value);
    }
    await app.queuePrompt(0, 1);
}"""

FRESH_NODE = """() => {
    const node = LiteGraph.createNode('LoraTrainerTrainLora');
    const names = node.widgets.map(w => w.name);
    return {values: Object.fromEntries(node.widgets.map(w => [w.name, w.value])),
            control: node.widgets[names.indexOf('seed') + 1].value};
}"""


CHECK_MEMORY = """async () => {
    // the nodes a user drops onto an empty canvas and wires: checkpoint and dataset into Check memory
    app.graph.clear();
    const add = (type, x, y) => { const node = LiteGraph.createNode(type); node.pos = [x, y]; app.graph.add(node);
                                  return node; };
    const checkpoint = add('CheckpointLoaderSimple', 0, 0), data = add('LoraTrainerDatasetFromFolder', 0, 300);
    const plan = add('LoraTrainerMemoryPlan', 450, 0);
    ['model', 'clip', 'vae'].forEach((name, i) => checkpoint.connect(i, plan, plan.findInputSlot(name)));
    data.connect(0, plan, plan.findInputSlot('dataset'));
    const set = (node, name, value) => { node.widgets.find(w => w.name === name).value = value; };
    set(checkpoint, 'ckpt_name', 'tiny_sd15.safetensors');
    set(data, 'folder', 'lora_data'); set(data, 'resolution', 64);
    set(plan, 'output_name', 'browser_plan'); set(plan, 'max_steps', 2);
    await app.queuePrompt(0, 1);
    return plan.id;
}"""

# the text ComfyUI's frontend shows under a node (the widget it adds for the server's progress text)
NODE_TEXT = """(id) => app.graph.getNodeById(id)?.widgets?.find(w => w.name === '$$node-text-preview')?.value || ''"""


def _node_text(page, node_id: int, expected: str) -> str:
    """The text the frontend shows under node `node_id` once it holds `expected` ('' if it does not within 60 s)."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    try:
        page.wait_for_function(f"([id, expected]) => ({NODE_TEXT})(id).includes(expected)", arg=[node_id, expected],
                               timeout=60_000)
    except PlaywrightTimeout:
        return ""
    return page.evaluate(NODE_TEXT, node_id)


def _open_frontend(p, server, messages: list[str]):
    """Headless Chromium on the server's page, once ComfyUI's app is up; (browser, page)."""
    browser = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                                args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                                      "--disable-background-networking"])
    page = browser.new_page(viewport={"width": 1600, "height": 1000})
    page.on("console", lambda m: messages.append(f"{m.type}: {m.text}"))
    page.goto(f"http://127.0.0.1:{server.port}/")
    page.wait_for_function("() => window.app && window.app.graph && window.LiteGraph", timeout=120_000)
    return browser, page


def _need_browser() -> None:
    try:
        import playwright  # noqa: F401
    except ImportError:
        pytest.skip("the playwright package is not installed")
    if CHROMIUM is None:
        pytest.skip("chromium is not installed")


def _frontend_version() -> str:
    python = os.environ.get("COMFYUI_PYTHON", "python")
    return subprocess.run([python, "-c", "import importlib.metadata as m; print(m.version('comfyui-frontend-package'))"],
                          capture_output=True, text=True, check=True).stdout.strip()


def test_example_workflow_runs_from_comfyuis_own_frontend(server):
    _need_browser()
    from playwright.sync_api import sync_playwright

    before = set(server.call("/history"))
    messages = []
    with sync_playwright() as p:
        browser, page = _open_frontend(p, server, messages)
        loaded = page.evaluate(LOAD_TEMPLATE)
        assert "widgets" in loaded, f"not among the templates: {loaded['listing']}"
        names = [name for name, _ in loaded["widgets"]]
        values = [value for _, value in loaded["widgets"]]
        seed = names.index("seed")
        assert values[seed:seed + 2] == [42, "fixed"]  # the seed's "control after generate" widget comes next
        widgets = dict(loaded["widgets"])
        assert widgets["save_every_n_steps"] == 0 and widgets["advanced"] == ""
        assert widgets["optimizer"] == widgets["lr_scheduler"] == "preset"

        fresh = page.evaluate(FRESH_NODE)
        assert fresh["values"]["optimizer"] == fresh["values"]["lr_scheduler"] == "preset"
        expected = FRESH_CONTROL.get(_frontend_version())
        if expected:
            assert fresh["control"] == expected

        page.evaluate(SET_AND_QUEUE, [
            ["CheckpointLoaderSimple", "ckpt_name", "tiny_sd15.safetensors"],
            ["LoraTrainerDatasetFromFolder", "folder", "lora_data"],  # as typed: a folder in ComfyUI's input folder
            ["LoraTrainerDatasetFromFolder", "resolution", 64],
            ["LoraTrainerTrainLora", "output_name", "browser_lora"],
            ["LoraTrainerTrainLora", "max_steps", 2],
            ["EmptyLatentImage", "width", 64], ["EmptyLatentImage", "height", 64],
            ["KSampler", "steps", 2]])
        deadline = time.time() + 600
        while True:
            history = server.call("/history")
            done = [v for k, v in history.items() if k not in before and v.get("status", {}).get("completed") is not None]
            if done or time.time() > deadline:
                break
            time.sleep(1)
        train = page.evaluate("() => app.graph.nodes.find(n => n.type === 'LoraTrainerTrainLora').id")
        shown = _node_text(page, train, "Saved ") if done else ""
        browser.close()
    assert done, "nothing was queued:\n" + "\n".join(messages[-30:])
    assert done[0]["status"]["status_str"] == "success", json.dumps(done[0]["status"])[:3000]
    assert "Predicted peak GPU memory of this run" in shown  # the Train node's text: the LoRA saved, and its plan
    _, metadata = read_lora_file(server.base / "models" / "loras" / "browser_lora.safetensors")
    assert metadata["ss_steps"] == "2" and metadata["ss_lr_scheduler"] == "cosine" and metadata["ss_seed"] == "42"
    assert list((server.base / "output").glob("lora_trainer_example*.png"))


def test_check_memory_node_shows_the_plan_on_the_node(server):
    _need_browser()
    from playwright.sync_api import sync_playwright

    messages = []
    with sync_playwright() as p:
        browser, page = _open_frontend(p, server, messages)
        plan = page.evaluate(CHECK_MEMORY)
        shown = _node_text(page, plan, "GiB")
        browser.close()
    assert shown, "no plan on the node:\n" + "\n".join(messages[-30:])
    assert shown.startswith("Predicted peak GPU memory of this run (4 images, 64 px") and "No CUDA GPU here" in shown
