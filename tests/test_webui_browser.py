"""The LoRA Train tab inside a real WebUI page, driven in headless Chromium as a user would.

Skipped unless WEBUI_PATH points at an AUTOMATIC1111 checkout (see test_webui_real.py for what the environment
needs) and Debian's chromium and the playwright package are installed. It proves what only the real page shows:
the WebUI's saved defaults (ui-config.json, keyed by label), a refused Train keeping its reason, a reloaded page
showing the running job, the caption grid filled when its tab opens, and Train -> Test -> Train.
"""

from __future__ import annotations

import json
import shutil
import time
import urllib.request

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
        expect(status).to_contain_text("Step", timeout=300_000)
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
