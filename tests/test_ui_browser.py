"""The standalone app in a real headless Chromium: fill the form, caption, train the tiny model, see the result.

Needs Debian's chromium (apt-get install chromium) and the playwright package; skipped without them,
except in CI (CI=true), where .ci/run installs both and a missing browser is a failure.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
from conftest import make_dataset

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _need_browser():
    missing = []
    try:
        import playwright  # noqa: F401
    except ImportError:
        missing.append("the playwright package")
    if CHROMIUM is None:
        missing.append("chromium")
    if missing and os.environ.get("CI"):
        pytest.fail(f"CI must run the browser test: {' and '.join(missing)} missing (see .ci/run).")
    if missing:
        pytest.skip(f"{' and '.join(missing)} not installed")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def app(tmp_path, sd1_checkpoint):
    """`python -m lora_trainer ui` on a free port, with an uncaptioned image folder and a tiny BLIP."""
    _need_browser()
    pytest.importorskip("gradio")
    from lora_trainer.caption.synthetic import random_blip

    data = make_dataset(tmp_path / "cats")
    for caption in data.glob("*.txt"):
        caption.unlink()
    model, processor = random_blip("tiny")
    model.save_pretrained(tmp_path / "blip")
    processor.save_pretrained(tmp_path / "blip")
    port = _free_port()
    log = (tmp_path / "server.log").open("w")
    server = subprocess.Popen([sys.executable, "-m", "lora_trainer", "ui", "--port", str(port),
                               "--lora-dir", str(tmp_path / "loras"), "--output-dir", str(tmp_path / "out")],
                              cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"{url}/lora_trainer/status", timeout=2)
            break
        except OSError:
            if server.poll() is not None:
                pytest.fail(f"the app exited: {(tmp_path / 'server.log').read_text()[-3000:]}")
            time.sleep(0.5)
    else:
        server.kill()
        pytest.fail("the app did not start in 180 s")
    yield {"url": url, "data": data, "blip": tmp_path / "blip", "loras": tmp_path / "loras",
           "checkpoint": sd1_checkpoint, "shots": tmp_path}
    server.terminate()
    server.wait(30)
    log.close()


def _box(page, elem_id: str):
    return page.locator(f"#{elem_id} textarea, #{elem_id} input").first


def _tab(page, name: str):
    """A tab button (role 'tab' in Gradio 4 and later, a plain button in 3.x)."""
    tab = page.get_by_role("tab", name=name)
    return tab if tab.count() else page.get_by_role("button", name=name, exact=True)


def _text(page, elem_id: str):
    """A Markdown/Dataframe by id (Gradio 3.41 repeats a Markdown's id on its inner element)."""
    return page.locator(f"#{elem_id}").first


@pytest.mark.slow  # 25 s: the default run's time budget; CI runs it with -m slow on every UI stack
def test_fill_caption_train_and_see_the_result(app):
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(app["url"])

        # 1. dataset
        _box(page, "lora_trainer_base_model").fill(str(app["checkpoint"]))
        _box(page, "lora_trainer_train_data_dir").fill(str(app["data"]))
        page.locator("#lora_trainer_check").click()
        expect(_text(page, "lora_trainer_dataset_report")).to_contain_text("4 usable images", timeout=30_000)
        expect(_text(page, "lora_trainer_dataset_report")).to_contain_text("captions found: 0 of 4")

        # 2. captions with the tiny BLIP, then review them
        _tab(page, "2. Captions").click()
        _box(page, "lora_trainer_caption_prefix").fill("zkcat")
        _box(page, "lora_trainer_caption_model").fill(str(app["blip"]))
        page.locator("#lora_trainer_caption").click()
        expect(_text(page, "lora_trainer_caption_status")).to_contain_text("Captioned 4 images", timeout=120_000)
        expect(_text(page, "lora_trainer_tags")).to_contain_text("zkcat")
        assert all((app["data"] / f"img{i}.txt").read_text().startswith("zkcat") for i in range(4))

        # 3. settings
        _tab(page, "3. Settings").click()
        _box(page, "lora_trainer_output_name").fill("browser_lora")
        for key, value in {"max_steps": "4", "resolution": "64", "lora_rank": "4", "batch_size": "2",
                           "learning_rate": "0.001"}.items():
            _box(page, f"lora_trainer_{key}").fill(value)
            _box(page, f"lora_trainer_{key}").press("Tab")
        page.locator("#lora_trainer_advanced").get_by_text("Advanced").first.click()
        log_every = _box(page, "lora_trainer_log_every_n_steps")
        expect(log_every).to_be_visible()
        for _ in range(10):  # Gradio 6 may still be rendering the opened accordion and put the default back
            log_every.fill("1")
            log_every.press("Tab")
            if log_every.input_value() == "1":
                break
            page.wait_for_timeout(500)
        expect(log_every).to_have_value("1")

        # 4. train, watch the loss plot appear
        _tab(page, "4. Train").click()
        page.locator("#lora_trainer_train").click()
        expect(_text(page, "lora_trainer_status")).to_contain_text("step", timeout=300_000)  # live progress
        deadline = time.time() + 300
        while json.load(urllib.request.urlopen(f"{app['url']}/lora_trainer/status"))["running"]:
            assert time.time() < deadline, "training did not finish in 300 s"
            time.sleep(0.5)
        try:
            expect(_text(page, "lora_trainer_status")).to_contain_text("done", timeout=30_000)
        except AssertionError:
            # seen once in ~15 runs: the live stream stopped at the last step while the job finished (cause not
            # found); "Show progress" re-attaches to the job, as a user would
            page.locator("#lora_trainer_watch").click()
            expect(_text(page, "lora_trainer_status")).to_contain_text("done", timeout=30_000)
        expect(_text(page, "lora_trainer_status")).to_contain_text("<lora:browser_lora:0.8>")
        expect(page.locator("#lora_trainer_loss_plot img")).to_be_visible(timeout=20_000)
        page.screenshot(path=str(app["shots"] / "train.png"), full_page=True)

        # 5. the result is listed
        _tab(page, "5. Result").click()
        expect(_text(page, "lora_trainer_results")).to_contain_text("browser_lora", timeout=20_000)
        browser.close()

    assert (app["loras"] / "browser_lora.safetensors").is_file()
    assert not [p for p in app["loras"].iterdir() if p.name.endswith(".tmp")]
    status = json.load(urllib.request.urlopen(f"{app['url']}/lora_trainer/status"))
    assert status["state"] == "done" and status["step"] == 4 and len(status["losses"]) == 4
    bad = urllib.request.Request(f"{app['url']}/lora_trainer/train", method="POST",
                                 data=json.dumps({"config": {"base_model": str(app["checkpoint"]), "train_data_dir": str(app["data"]),
                                                            "lora_rank": -1}}).encode())
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(bad)
    assert refused.value.code == 422 and "lora_rank" in json.load(refused.value)["error"]
