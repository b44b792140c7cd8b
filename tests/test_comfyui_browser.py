"""The example workflow in ComfyUI's own frontend, in headless Chromium: open it from the Templates source,
set the checkpoint and the folder, queue it, get the LoRA. Skipped unless COMFYUI_PATH is set (see
tests/test_comfyui_real.py) and chromium and the playwright package are installed.

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
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                                    args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                                          "--disable-background-networking"])
        page = browser.new_page(viewport={"width": 1600, "height": 1000})
        page.on("console", lambda m: messages.append(f"{m.type}: {m.text}"))
        page.goto(f"http://127.0.0.1:{server.port}/")
        page.wait_for_function("() => window.app && window.app.graph && window.LiteGraph", timeout=120_000)

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
        browser.close()
    assert done, "nothing was queued:\n" + "\n".join(messages[-30:])
    assert done[0]["status"]["status_str"] == "success", json.dumps(done[0]["status"])[:3000]
    _, metadata = read_lora_file(server.base / "models" / "loras" / "browser_lora.safetensors")
    assert metadata["ss_steps"] == "2" and metadata["ss_lr_scheduler"] == "cosine" and metadata["ss_seed"] == "42"
    assert list((server.base / "output").glob("lora_trainer_example*.png"))
