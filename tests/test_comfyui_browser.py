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

# the Train LoRA node's buttons (web/lora_trainer_nodes.js) as the frontend made them, and how they serialize
BUTTONS = """() => {
    const node = app.graph.nodes.find(n => n.type === 'LoraTrainerTrainLora');
    return node.widgets.filter(w => w.type === 'button')
        .map(w => ({name: w.name, serialize: w.options?.serialize}));
}"""

# where a Train LoRA button is on the page, the node centred in view first (a real click goes there)
BUTTON_POINT = """(index) => {
    const node = app.graph.nodes.find(n => n.type === 'LoraTrainerTrainLora');
    const button = node.widgets.filter(w => w.type === 'button')[index];
    app.canvas.ds.scale = 1;
    app.canvas.centerOnNode(node);
    app.canvas.setDirty(true, true);
    app.canvas.draw(true, true);
    const y = (button.y ?? button.last_y) + (button.computedHeight ?? LiteGraph.NODE_WIDGET_HEIGHT) / 2;
    const [x, top] = app.canvas.ds.convertOffsetToCanvas([node.pos[0] + node.size[0] / 2, node.pos[1] + y]);
    const rect = app.canvas.canvas.getBoundingClientRect();
    return [rect.left + x, rect.top + top];
}"""

# the button's label now (it says what the server answered for 3 s after a click)
BUTTON_LABEL = """(index) => app.graph.nodes.find(n => n.type === 'LoraTrainerTrainLora').widgets
    .filter(w => w.type === 'button')[index].name"""

# what the server pushes to the page while a prompt runs: progress, node texts, preview images
RECORD = """() => {
    const seen = window.loraTrainerSeen = {progress: [], texts: [], previews: [], previewNodes: []};
    app.api.addEventListener('progress', e => seen.progress.push(e.detail));
    app.api.addEventListener('progress_text', e => seen.texts.push(e.detail));
    app.api.addEventListener('b_preview_with_metadata', e => seen.previewNodes.push(String(e.detail.nodeId)));
    app.api.addEventListener('b_preview', async e => {
        const image = await createImageBitmap(e.detail);
        seen.previews.push([e.detail.type, image.width, image.height]);
    });
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


def _click_button(page, index: int) -> str:
    """A real mouse click on the Train LoRA node's button `index` (0: Save now, 1: Sample now), the dialogs a fresh
    frontend opens (e.g. the Templates browser) closed first; the button's label once it says the server's answer."""
    for _ in range(3):
        page.keyboard.press("Escape")
    page.wait_for_timeout(300)
    page.mouse.click(*page.evaluate(BUTTON_POINT, index))
    page.wait_for_function(f"(i) => ({BUTTON_LABEL})(i).includes(':')", arg=index, timeout=10_000)
    return page.evaluate(BUTTON_LABEL, index)


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


def _finished_since(server, before: set, timeout: float = 600) -> list:
    """The history entries of prompts not in `before` once one has completed (empty if none did within `timeout`)."""
    deadline = time.time() + timeout
    while True:
        history = server.call("/history")
        done = [v for k, v in history.items() if k not in before and v.get("status", {}).get("completed") is not None]
        if done or time.time() > deadline:
            return done
        time.sleep(1)


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
        done = _finished_since(server, before)
        train = page.evaluate("() => app.graph.nodes.find(n => n.type === 'LoraTrainerTrainLora').id")
        shown = _node_text(page, train, "Saved ") if done else ""
        browser.close()
    assert done, "nothing was queued:\n" + "\n".join(messages[-30:])
    assert done[0]["status"]["status_str"] == "success", json.dumps(done[0]["status"])[:3000]
    assert "Predicted peak GPU memory of this run" in shown  # the Train node's text: the LoRA saved, and its plan
    _, metadata = read_lora_file(server.base / "models" / "loras" / "browser_lora.safetensors")
    assert metadata["ss_steps"] == "2" and metadata["ss_lr_scheduler"] == "cosine" and metadata["ss_seed"] == "42"
    assert list((server.base / "output").glob("lora_trainer_example*.png"))


def test_train_node_has_save_now_and_sample_now_buttons_left_out_of_the_workflow(server):
    """The buttons of web/lora_trainer_nodes.js on a loaded example workflow's Train node: serialized neither into
    the saved workflow nor into the prompt; clicked with no training running, the server's 409 on the button."""
    _need_browser()
    from playwright.sync_api import sync_playwright

    example = json.loads((real.ROOT / "example_workflows" / "train_lora_from_folder.json").read_text())
    saved_values = next(n["widgets_values"] for n in example["nodes"] if n["type"] == "LoraTrainerTrainLora")
    messages = []
    with sync_playwright() as p:
        browser, page = _open_frontend(p, server, messages)
        loaded = page.evaluate(LOAD_TEMPLATE)
        assert "widgets" in loaded, f"not among the templates: {loaded['listing']}"
        buttons = page.evaluate(BUTTONS)
        names = [name for name, _ in loaded["widgets"]]
        workflow = page.evaluate("() => app.graph.serialize()")
        prompt = page.evaluate("async () => (await app.graphToPrompt()).output")
        idle = _click_button(page, 0)
        page.wait_for_function(f"() => ({BUTTON_LABEL})(0) === 'Save now'", timeout=10_000)  # its label back
        browser.close()
    assert [b["name"] for b in buttons] == ["Save now", "Sample now"], buttons
    assert all(b["serialize"] is False for b in buttons), buttons
    assert names[-2:] == ["Save now", "Sample now"] and names[-4:-2] == ["validation_split", "use_best"], names
    train = next(n for n in workflow["nodes"] if n["type"] == "LoraTrainerTrainLora")
    assert train["widgets_values"] == saved_values  # the buttons add nothing to the saved workflow
    inputs = prompt[str(train["id"])]["inputs"]
    spec = server.info["LoraTrainerTrainLora"]["input"]
    assert set(inputs) <= set(spec["required"]) | set(spec["optional"]), sorted(inputs)
    assert inputs["validation_split"] == 0.0 and inputs["use_best"] is False
    assert idle == "Save now: No Train LoRA node is running.", idle


def test_save_now_and_sample_now_clicked_during_a_run_queued_from_the_frontend(server):
    """The example workflow queued from the frontend with a held-out image; once its training runs, a click on Save
    now and one on Sample now: the LoRA of that step in models/loras as NAME-stepN, its preview pushed to the page as
    the node's preview, and the node's text says both and the validation loss."""
    _need_browser()
    from playwright.sync_api import sync_playwright

    before = set(server.call("/history"))
    messages = []
    with sync_playwright() as p:
        browser, page = _open_frontend(p, server, messages)
        loaded = page.evaluate(LOAD_TEMPLATE)
        assert "widgets" in loaded, f"not among the templates: {loaded['listing']}"
        train = page.evaluate("() => app.graph.nodes.find(n => n.type === 'LoraTrainerTrainLora').id")
        page.evaluate(RECORD)
        page.evaluate(SET_AND_QUEUE, [
            ["CheckpointLoaderSimple", "ckpt_name", "tiny_sd15.safetensors"],
            ["LoraTrainerDatasetFromFolder", "folder", "lora_data"],
            ["LoraTrainerDatasetFromFolder", "resolution", 64],
            ["LoraTrainerTrainLora", "output_name", "browser_ask"],
            ["LoraTrainerTrainLora", "max_steps", 20],
            ["LoraTrainerTrainLora", "validation_split", 0.34],
            # no scheduled saves: the one the click asks for is the only step LoRA in models/loras
            ["LoraTrainerTrainLora", "advanced", "save_every_n_epochs: 0"],
            ["EmptyLatentImage", "width", 64], ["EmptyLatentImage", "height", 64],
            ["KSampler", "steps", 2]])
        # its training has taken a step: the Train node's progress (ComfyUI's bar under the node)
        page.wait_for_function("(id) => window.loraTrainerSeen.progress.some(p => String(p.node) === String(id))",
                               arg=train, timeout=300_000)
        # the last step the page saw before the clicks: the steps they are answered at come after it
        asked_at = page.evaluate("() => Math.max(...window.loraTrainerSeen.progress.map(p => p.value))")
        labels = [_click_button(page, index) for index in (0, 1)]
        done = _finished_since(server, before)
        page.wait_for_timeout(1000)  # the last messages of the run reach the page
        seen = page.evaluate("() => window.loraTrainerSeen")
        browser.close()
    assert labels == ["Save now: asked", "Sample now: asked"], labels
    assert done and done[0]["status"]["status_str"] == "success", json.dumps(done[0]["status"] if done else messages[-30:])
    _, _, queued, extra, _ = done[0]["prompt"]  # what the frontend sent: no button among the inputs or widget values
    inputs = queued[str(train)]["inputs"]
    assert not {"Save now", "Sample now"} & set(inputs) and inputs["validation_split"] == 0.34, sorted(inputs)
    example = json.loads((real.ROOT / "example_workflows" / "train_lora_from_folder.json").read_text())
    widgets_values = [node["widgets_values"] for workflow in (example, extra["extra_pnginfo"]["workflow"])
                      for node in workflow["nodes"] if node["type"] == "LoraTrainerTrainLora"]
    assert len(widgets_values[1]) == len(widgets_values[0]), widgets_values
    loras = server.base / "models" / "loras"
    asked = list(loras.glob("browser_ask-step*.safetensors"))
    assert len(asked) == 1, sorted(p.name for p in loras.iterdir())
    step = int(asked[0].stem.rsplit("-step", 1)[1])
    assert asked_at <= step < 20 and read_lora_file(asked[0])[1]["ss_steps"] == str(step)
    samples = server.base / "output" / "lora_trainer" / "browser_ask" / "samples"
    previews = list(samples.glob("step*.png"))
    assert len(previews) == 1, previews  # of the step its click was answered at: the Save now's, or a later one
    previewed = int(previews[0].name[4:12])
    assert step <= previewed < 20 and previews[0].name.endswith("_00_asked.png"), previews
    # the 64 px sample, as ComfyUI sends previews (scaled to its preview size, square kept)
    assert len(seen["previews"]) == 1 and seen["previews"][0][1] == seen["previews"][0][2], seen["previews"]
    if seen["previewNodes"]:  # the preview with its node (frontends that announce preview metadata)
        assert set(seen["previewNodes"]) == {str(train)}, seen["previewNodes"]
    texts = [t["text"] for t in seen["texts"] if str(t["nodeId"]) == str(train)]
    assert any(f"Saved step {step} as browser_ask-step{step:08d}.safetensors (Save now)." in t for t in texts), texts
    assert any(f"Preview of step {previewed}:" in t for t in texts), texts
    assert any("Validation loss" in t and "(best " in t for t in texts), texts
    assert "validation loss" in texts[-1] and texts[-1].startswith("Saved "), texts[-1]


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
