"""The LoRA Train tab inside a real WebUI page, driven in headless Chromium as a user would.

Skipped unless WEBUI_PATH points at an AUTOMATIC1111 checkout (see test_webui_real.py for what the environment
needs) and Debian's chromium and the playwright package are installed. It proves what only the real page shows:
the WebUI's saved defaults (ui-config.json, keyed by label), a refused Train keeping its reason, a reloaded page
showing the running job, the caption grid filled when its tab opens, Train -> Test -> Train, and Save now /
Sample now answered during a run while its status streams.
"""

from __future__ import annotations

import json
import re
import shutil
import time
import urllib.request
from pathlib import Path

import pytest
from test_webui_real import FORGE, WEBUI, _blobs, launch_webui, stop_webui

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(not WEBUI or FORGE or CHROMIUM is None,
                                reason="set WEBUI_PATH to an AUTOMATIC1111 checkout and install chromium to run")


@pytest.fixture(scope="module")
def page_server(tmp_path_factory):
    pytest.importorskip("playwright")
    server = launch_webui("sd1", tmp_path_factory.mktemp("webui_page"), ui=True)
    yield server
    stop_webui(server)


def _box(page, elem_id: str):
    return page.locator(f"#{elem_id} textarea, #{elem_id} input").first


def _status(url: str) -> dict:
    with urllib.request.urlopen(f"{url}/lora_trainer/status", timeout=30) as response:
        return json.load(response)


def _open_tab(page, url: str) -> None:
    page.goto(url)
    page.get_by_role("button", name="LoRA Train", exact=True).click(timeout=300_000)


def _sub_tab(page, name: str) -> None:
    page.locator("#lora_trainer_tabs").get_by_role("button", name=name, exact=True).click()


def _set(page, key: str, value: str) -> None:
    _box(page, f"lora_trainer_{key}").fill(value)
    _box(page, f"lora_trainer_{key}").press("Tab")


def test_the_tab_in_the_webui_page(page_server, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    url, data = page_server["url"], _blobs(tmp_path / "blobs")
    saved = json.loads((page_server["data_dir"] / "ui-config.json").read_text())
    # every field saved under its own label: the captioning batch size is not the training batch size
    assert saved["lora_trainer/Batch size/value"] == 0 and saved["lora_trainer/Captioning batch size/value"] == 32
    assert saved["lora_trainer/Training seed/value"] == 42 and saved["lora_trainer/Test seed/value"] == 0

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu",
                                                                    "--disable-background-networking"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        _open_tab(page, url)
        expect(_box(page, "lora_trainer_batch_size")).to_have_value("0")
        _box(page, "lora_trainer_train_data_dir").fill(str(data))
        _box(page, "lora_trainer_train_data_dir").press("Tab")

        # the caption grid is filled when its tab opens
        _sub_tab(page, "2. Captions")
        expect(page.locator("#lora_trainer_gallery img")).to_have_count(4, timeout=60_000)

        # a refused Train keeps its reason, with the field's label
        _sub_tab(page, "3. Settings")
        _set(page, "output_name", "page_lora")
        _set(page, "resolution", "32")
        _sub_tab(page, "4. Train")
        page.locator("#lora_trainer_train").click()
        status = page.locator("#lora_trainer_status").first
        expect(status).to_contain_text("Not started", timeout=60_000)
        expect(status).to_contain_text("Resolution")
        page.wait_for_timeout(3000)
        expect(status).to_contain_text("Not started")

        # a long run: the reloaded page shows it
        _sub_tab(page, "3. Settings")
        _set(page, "resolution", "64")
        _set(page, "max_steps", "400")
        _set(page, "batch_size", "2")
        _sub_tab(page, "4. Train")
        # the memory plan of these settings on the loaded model, before training (this CPU has no GPU to compare)
        page.locator("#lora_trainer_plan").click()
        plan = page.locator("#lora_trainer_memory_plan").first
        expect(plan).to_contain_text("Predicted peak GPU memory of this run (4 images, 64 px, batch 2", timeout=120_000)
        expect(plan).to_contain_text("with gradient_checkpointing: true")
        expect(plan).to_contain_text("No CUDA GPU here")
        page.locator("#lora_trainer_train").click()
        expect(status).to_contain_text(re.compile(r"step \d+/\d+"), timeout=300_000)  # training
        _open_tab(page, url)
        expect(page.locator("#lora_trainer_status").first).to_contain_text("page_lora", timeout=60_000)
        expect(page.locator("#lora_trainer_status").first).not_to_contain_text("No training job yet")
        _sub_tab(page, "4. Train")
        page.locator("#lora_trainer_interrupt").click()
        deadline = time.time() + 300
        while _status(url)["running"]:
            assert time.time() < deadline
            time.sleep(1)
        partial = _status(url)
        assert partial["state"] == "interrupted", partial["message"]

        # Test renders at the trained size through the WebUI, then training works again
        _sub_tab(page, "5. Result")
        _box(page, "lora_trainer_result_name").fill(partial["lora_file"].rsplit("/", 1)[1].removesuffix(".safetensors"))
        _box(page, "lora_trainer_test_prompt").fill("zkblob, a red square")
        _set(page, "test_strengths", "0, 1")
        _set(page, "test_steps", "2")
        started = time.time()
        page.locator("#lora_trainer_test").click()
        expect(page.locator("#lora_trainer_test_status").first).to_contain_text("at strengths 0, 1", timeout=300_000)
        rendered_in = time.time() - started
        grid = page.locator("#lora_trainer_test_grid img").first
        expect(grid).to_be_visible()
        assert grid.evaluate("img => img.naturalWidth") == 2 * 64, "rendered at the size the LoRA was trained at"

        _sub_tab(page, "1. Dataset")  # the reload above emptied the form
        _set(page, "train_data_dir", str(data))
        _sub_tab(page, "3. Settings")
        for key, value in {"max_steps": "2", "output_name": "page_lora_again", "resolution": "64",
                           "batch_size": "2"}.items():
            _set(page, key, value)
        _sub_tab(page, "4. Train")
        page.locator("#lora_trainer_train").click()
        page.wait_for_timeout(5000)
        page.screenshot(path=str(tmp_path / "webui_train_again.png"), full_page=True)
        expect(status).to_contain_text("page_lora_again", timeout=60_000)
        deadline = time.time() + 300
        while (again := _status(url))["running"] or again["name"] != "page_lora_again":
            assert time.time() < deadline, again
            time.sleep(1)
        assert again["state"] == "done", again["message"]
        page.screenshot(path=str(tmp_path / "webui_tab.png"), full_page=True)
        browser.close()
    assert rendered_in < 120, rendered_in
    assert "leaf Variable" not in page_server["log"].read_text()


# every text the status box shows, kept in the page: a message that the next streamed status replaces is seen too
RECORD_STATUS = """() => {
    window.loraTrainerSeen = [];
    const box = document.querySelector('#lora_trainer_status');
    new MutationObserver(() => window.loraTrainerSeen.push(box.textContent))
        .observe(box, {childList: true, subtree: true, characterData: true});
}"""


def _seen(page, *texts: str, timeout: float = 60_000) -> str:
    """The first status text the page showed (since RECORD_STATUS) holding one of `texts`."""
    page.wait_for_function("texts => window.loraTrainerSeen.some(seen => texts.some(t => seen.includes(t)))",
                           arg=list(texts), timeout=timeout)
    return next(seen for seen in page.evaluate("window.loraTrainerSeen") if any(t in seen for t in texts))


def test_save_now_and_sample_now_during_a_run_from_the_tab(page_server, tmp_path):
    """Save now and Sample now clicked while a run started from the tab trains, and while its status streams (the
    Train click's and Show progress's): both are answered at once, not when the run ends; the LoRA saved on request
    lands in the WebUI's Lora folder as NAME-stepN and the preview of the typed prompt shows in the samples grid."""
    from playwright.sync_api import expect, sync_playwright

    url, data, name = page_server["url"], _blobs(tmp_path / "blobs"), "page_on_request"
    loras = page_server["data_dir"] / "models" / "Lora"
    prompt = "zkblob, a green square"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu",
                                                                    "--disable-background-networking"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        _open_tab(page, url)
        _set(page, "train_data_dir", str(data))
        _sub_tab(page, "3. Settings")
        for key, value in {"output_name": name, "resolution": "64", "batch_size": "2", "max_steps": "400"}.items():
            _set(page, key, value)
        # no periodic saves (the tab saves every epoch, here every 2nd step): the LoRA the click asks for is then the
        # only NAME-stepN
        page.locator("#lora_trainer_advanced .label-wrap").first.click()
        _set(page, "save_every_n_epochs", "0")
        _sub_tab(page, "4. Train")
        page.locator("#lora_trainer_train").click()
        status = page.locator("#lora_trainer_status").first
        expect(status).to_contain_text(re.compile(r"step \d+/\d+"), timeout=300_000)  # training
        page.locator("#lora_trainer_watch").click()  # a second stream of the status: Show progress
        page.evaluate(RECORD_STATUS)
        page.wait_for_timeout(1500)
        assert _status(url)["running"]

        page.locator("#lora_trainer_save_now").click()
        said = _seen(page, "Saving after the current step", "Saved step")
        assert name in said, said
        asked = _status(url)
        assert asked["running"], "Save now was answered only when the run had ended"
        deadline = time.time() + 120
        while not (requested := sorted(loras.glob(f"{name}-step*.safetensors"))):
            assert time.time() < deadline and _status(url)["running"], _status(url)
            time.sleep(0.2)
        assert _status(url)["running"]  # saved on request between two steps: the run goes on
        step = int(requested[0].stem.rsplit("-step", 1)[1])
        assert asked["step"] <= step < 400

        _box(page, "lora_trainer_preview_prompt").fill(prompt)
        page.locator("#lora_trainer_sample_now").click()
        _seen(page, "Rendering a preview after the current step", "Preview of step")
        assert _status(url)["running"], "Sample now was answered only when the run had ended"
        # the still running stream shows the grid of the preview
        expect(page.locator("#lora_trainer_samples img").first).to_be_visible(timeout=120_000)
        grid = _status(url)
        assert grid["running"], "the samples grid showed only when the run had ended"
        assert [said for _, said, _ in grid["sample_grid"]] == [prompt], grid["sample_grid"]
        assert page.locator("#lora_trainer_samples img").first.evaluate("img => img.naturalWidth") > 64
        page.wait_for_function(  # the stream still runs: it shows the later steps
            "after => +(document.querySelector('#lora_trainer_status').textContent.match(/step (\\d+)\\/400/) || "
            "[0, 0])[1] > after", arg=grid["step"], timeout=60_000)

        page.locator("#lora_trainer_interrupt").click()
        deadline = time.time() + 300
        while (ended := _status(url))["running"]:
            assert time.time() < deadline
            time.sleep(1)
        assert ended["state"] == "interrupted", ended["message"]
        assert requested[0].is_file() and Path(ended["lora_file"]) != requested[0]  # the interrupt's is a later step
        # Use best needs a run that measured validation: the tab says so
        page.locator("#lora_trainer_make_best").click()
        expect(status).to_contain_text("measured no validation loss", timeout=60_000)
        page.screenshot(path=str(tmp_path / "webui_on_request.png"), full_page=True)
        browser.close()
    assert "leaf Variable" not in page_server["log"].read_text()
