"""The extension inside a real Stable Diffusion WebUI (AUTOMATIC1111 1.10, or Forge): start it offline on the CPU
with a tiny SD1, SD2 (v-prediction) or SDXL checkpoint (Forge: a random SD1.5 of the real shapes, which its model
detection needs), train through the /lora_trainer/ API on the loaded model, then render <lora:NAME:w> through
/sdapi/v1/txt2img.

Skipped unless WEBUI_PATH points at a WebUI checkout whose repositories/ are in place. WEBUI_PYTHON is its
Python (default WEBUI_PATH/venv/bin/python) with this project's dependencies installed (install.py does that),
and the environment must let it start offline (e.g. HF_HOME holding the CLIP-L tokenizer and config,
HF_HUB_OFFLINE=1). Everything the test writes goes to a temporary --data-dir: the checkpoint and its .yaml,
the Lora folder, a link to this extension, the WebUI's settings.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

WEBUI = os.environ.get("WEBUI_PATH")
pytestmark = pytest.mark.skipif(not WEBUI, reason="set WEBUI_PATH to a Stable Diffusion WebUI checkout to run")
REPO = Path(__file__).resolve().parents[1]


def _post(url: str, body: dict, timeout: float = 600) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.load(response)


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.load(response)


def _tiny_yaml(webui: Path, family: str) -> str:
    """The WebUI's config for the family with the UNet shrunk to the tiny checkpoint's (see tiny.host_state_dict)."""
    if family == "sdxl":
        text = (webui / "repositories" / "generative-models" / "configs" / "inference" / "sd_xl_base.yaml").read_text()
        text = text.replace("model_channels: 320", "model_channels: 64")
        text = re.sub(r"attention_resolutions: \[.*?\]", "attention_resolutions: [2]", text)
        text = re.sub(r"channel_mult: \[.*?\]", "channel_mult: [1, 2]", text)
        return re.sub(r"transformer_depth: \[.*?\]", "transformer_depth: [1, 2]", text)
    if family == "sd2":
        text = (webui / "repositories" / "stable-diffusion-stability-ai" / "configs" / "stable-diffusion" /
                "v2-inference-v.yaml").read_text()
    else:
        text = (webui / "configs" / "v1-inference.yaml").read_text()
    text = re.sub(r"attention_resolutions: \[.*?\]", "attention_resolutions: [ 1 ]", text)
    text = re.sub(r"num_res_blocks: \d+", "num_res_blocks: 1", text)
    return re.sub(r"channel_mult: \[.*?\]", "channel_mult: [ 1 ]", text)


FORGE = bool(WEBUI) and (Path(WEBUI) / "modules_forge").is_dir()


@pytest.fixture(scope="module", params=["sd1"] if FORGE else ["sd1", "sd2", "sdxl"])
def webui(request, tmp_path_factory):
    server = launch_webui(request.param, tmp_path_factory.mktemp(f"webui_{request.param}"))
    # live previews would make SDXL's first render download its preview decoder; we show none anyway
    _post(f"{server['url']}/sdapi/v1/options", {"live_previews_enable": False})
    yield server
    stop_webui(server)


def launch_webui(family: str, data_dir: Path, *, ui: bool = False) -> dict:
    """Start the WebUI on a tiny checkpoint of `family` with this extension linked into a fresh --data-dir;
    `ui` serves the page too (the API-only tests use --nowebui)."""
    from lora_trainer.backbones.tiny import build_tiny_checkpoint
    from lora_trainer.bench import real_shape_checkpoint

    webui = Path(WEBUI)
    python = os.environ.get("WEBUI_PYTHON", str(webui / "venv" / "bin" / "python"))
    models = data_dir / "models" / "Stable-diffusion"
    models.mkdir(parents=True)
    if FORGE:  # Forge tells models apart by their full tensor shapes and reads no .yaml
        checkpoint = real_shape_checkpoint(models / "sd15_random.safetensors", "sd15")
    else:
        checkpoint = build_tiny_checkpoint(models / f"tiny_{family}.safetensors", f"{family}-host")
        checkpoint.with_suffix(".yaml").write_text(_tiny_yaml(webui, family))
    (data_dir / "extensions").mkdir()
    (data_dir / "extensions" / "lora_trainer").symlink_to(REPO)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log_path = data_dir / "webui.log"
    args = [python, "launch.py", "--skip-torch-cuda-test", "--skip-python-version-check", "--skip-version-check",
            "--skip-install", "--no-download-sd-model", "--do-not-download-clip", "--api", "--port", str(port),
            "--data-dir", str(data_dir), "--ckpt", str(checkpoint)]
    if FORGE:  # its UI mode (binds 127.0.0.1); its page files live in the checkout, outside --data-dir
        args += ["--always-cpu", "--gradio-allowed-path", str(webui)]
    else:
        args += ["--use-cpu", "all", "--no-half", "--no-half-vae", "--precision", "full", "--server-name", "127.0.0.1"]
        args += [] if ui else ["--nowebui"]
    env = {**os.environ, "COMMANDLINE_ARGS": "", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PYTHONUNBUFFERED": "1"}
    with log_path.open("w") as log:
        server = subprocess.Popen(args, cwd=webui, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 600
    while True:
        try:
            # a request before the WebUI has added its API middleware makes its start fail (starlette builds the
            # stack on the first request): in UI mode wait for its start-up line first
            if ui and "Startup time" not in log_path.read_text(errors="replace"):
                raise OSError("starting")
            _get(f"{url}/lora_trainer/status")
            _get(f"{url}/sdapi/v1/options")
            if ui:
                urllib.request.urlopen(url, timeout=30).read()
            break
        except OSError:
            if server.poll() is not None or time.time() > deadline:
                server.kill()
                pytest.fail(f"the WebUI did not start:\n{log_path.read_text()[-4000:]}")
            time.sleep(1)
    return {"url": url, "data_dir": data_dir, "log": log_path, "family": family, "process": server}


def stop_webui(server: dict) -> None:
    server["process"].terminate()
    try:
        server["process"].wait(30)
    except subprocess.TimeoutExpired:
        server["process"].kill()


def _render(url: str, prompt: str) -> np.ndarray:
    body = {"prompt": prompt, "negative_prompt": "", "seed": 1, "steps": 2, "width": 64, "height": 64,
            "sampler_name": "Euler", "cfg_scale": 7}
    image = _post(f"{url}/sdapi/v1/txt2img", body)["images"][0]
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(image))).convert("RGB")).astype(np.float32)


def test_train_in_the_webui_and_render_with_the_lora(webui, tmp_path):
    url = webui["url"]
    data = _blobs(tmp_path / "blobs")
    base = _render(url, "zkblob, a red square")
    config = {"train_data_dir": str(data), "output_name": "webui_real", "resolution": 64, "enable_buckets": False,
              "batch_size": 2, "max_steps": 20, "learning_rate": 2e-3, "lora_rank": 4, "lora_alpha": 4,
              "save_every_n_epochs": 0, "log_every_n_steps": 5, "sample_prompts": ["zkblob"], "sample_steps": 2}
    job = _post(f"{url}/lora_trainer/train", {"config": config})
    assert job["state"] in ("starting", "waiting", "caching", "training"), job
    with pytest.raises(urllib.error.HTTPError) as busy:
        _post(f"{url}/lora_trainer/train", {"config": config})
    assert busy.value.code == 409
    deadline = time.time() + 600
    while (status := _get(f"{url}/lora_trainer/status"))["running"]:
        assert time.time() < deadline, status
        time.sleep(2)
    assert status["state"] == "done", status["message"] + "\n" + webui["log"].read_text()[-3000:]
    lora = webui["data_dir"] / "models" / "Lora" / "webui_real.safetensors"
    assert Path(status["lora_file"]) == lora and lora.is_file()
    assert len(status["losses"]) == 4
    assert len(status["samples"]) == 1 and Path(status["samples"][0]).is_file()  # rendered with the WebUI's VAE
    for written in (*status["saved"], *status["samples"]):  # everything under --data-dir, nothing in the checkout
        assert Path(written).is_relative_to(webui["data_dir"]), written
    assert "webui_real" in [r["name"] for r in _get(f"{url}/lora_trainer/results")]
    assert "webui_real" in [entry["name"] for entry in _get(f"{url}/sdapi/v1/loras")]  # listed without a restart

    with_lora = _render(url, "zkblob, a red square <lora:webui_real:1>")
    at_zero = _render(url, "zkblob, a red square <lora:webui_real:0>")
    after = _render(url, "zkblob, a red square")
    assert np.abs(with_lora - base).max() > 1, "the LoRA changed nothing"
    assert np.array_equal(at_zero, base)
    assert np.array_equal(after, base)  # the WebUI's model is as it was before training


def _train(webui: dict, data: Path, name: str, steps: int = 4, **extra) -> dict:
    config = {"train_data_dir": str(data), "output_name": name, "resolution": 64, "enable_buckets": False,
              "batch_size": 2, "max_steps": steps, "learning_rate": 2e-3, "lora_rank": 4, "lora_alpha": 4,
              "save_every_n_epochs": 0, "log_every_n_steps": 2, **extra}
    job = _post(f"{webui['url']}/lora_trainer/train", {"config": config})
    deadline = time.time() + 600
    while (status := _get(f"{webui['url']}/lora_trainer/status"))["running"]:
        assert time.time() < deadline, status
        time.sleep(1)
    assert status["state"] == "done", status["message"] + "\n" + webui["log"].read_text()[-3000:]
    return {**status, "accepted": job}


def test_train_render_with_the_lora_and_train_again(webui, tmp_path):
    """The WebUI merges a rendered LoRA into the weights and restores them in place on parameters that require
    grad: training after such a render failed ('a leaf Variable that requires grad ...') until a restart."""
    url, data = webui["url"], _blobs(tmp_path / "blobs")
    base = _render(url, "zkblob, a red square")
    for round_ in range(3):
        _train(webui, data, f"again{round_}")
        assert np.abs(_render(url, f"zkblob, a red square <lora:again{round_}:1>") - base).max() > 1
    _train(webui, data, "again_last")  # once more after the last LoRA render
    assert np.array_equal(_render(url, "zkblob, a red square"), base)
    assert "leaf Variable" not in webui["log"].read_text()


def _wait_for_step(url: str, step: int = 1, timeout: float = 600) -> dict:
    """The status once the job is training at `step` or later (fails if it ends first)."""
    deadline = time.time() + timeout
    while True:
        status = _get(f"{url}/lora_trainer/status")
        assert status["running"], f"the job ended before step {step}: {status['state']}: {status['message']}"
        if status["state"] == "training" and status["step"] >= step:
            return status
        assert time.time() < deadline, status
        time.sleep(0.05)


def test_save_and_sample_on_request_while_training_then_use_best(webui, tmp_path):
    """Save now / Sample now asked of a real run through the WebUI's API, between two of its steps: the LoRA saved on
    request lands in the WebUI's Lora folder as NAME-stepN and renders there; the preview is drawn by the WebUI's own
    model; validation is measured before the first step and at each save; the best checkpoint is named and Use best
    makes it NAME (the last NAME-last) when it is not the last step."""
    url, name, total, periodic = webui["url"], "ondemand", 16, 8
    loras = webui["data_dir"] / "models" / "Lora"
    # a large learning rate moves the validation loss enough that the best is not always the last step (which one
    # it is varies from run to run: the WebUI's VAE draws the cached latents at random)
    config = {"train_data_dir": str(_blobs(tmp_path / "blobs")), "output_name": name, "resolution": 64,
              "enable_buckets": False, "batch_size": 2, "max_steps": total, "learning_rate": 5e-2, "lora_rank": 4,
              "lora_alpha": 4, "save_every_n_epochs": 0, "save_every_n_steps": periodic, "log_every_n_steps": 4,
              "validation_split": 0.25, "sample_steps": 2}
    with pytest.raises(urllib.error.HTTPError) as idle:  # nothing to act on yet
        _post(f"{url}/lora_trainer/save_now", {})
    assert idle.value.code == 409
    _post(f"{url}/lora_trainer/train", {"config": config})
    _wait_for_step(url)
    prompt = "zkblob, a blue square"
    assert _post(f"{url}/lora_trainer/save_now", {}) == {"asked": True}
    assert _post(f"{url}/lora_trainer/sample_now", {"prompt": prompt}) == {"asked": True}
    deadline = time.time() + 600
    while (status := _get(f"{url}/lora_trainer/status"))["running"]:
        assert time.time() < deadline, status
        time.sleep(0.5)
    assert status["state"] == "done", status["message"] + "\n" + webui["log"].read_text()[-3000:]
    assert "held out for validation" in status["data_summary"], status["data_summary"]
    with pytest.raises(urllib.error.HTTPError) as ended:
        _post(f"{url}/lora_trainer/sample_now", {"prompt": prompt})
    assert ended.value.code == 409 and "Nothing is training" in json.load(ended.value)["error"]

    # the LoRA saved on request, in the WebUI's Lora folder as NAME-stepN (the periodic save stays in the outputs)
    requested = sorted(loras.glob(f"{name}-step*.safetensors"))
    assert len(requested) == 1, (requested, status["saved"], status["validation"])
    asked_at = int(requested[0].stem.rsplit("-step", 1)[1])
    assert 1 <= asked_at < total and asked_at != periodic, asked_at
    assert any(Path(p).read_bytes() == requested[0].read_bytes() for p in status["saved"]), status["saved"]
    assert requested[0].stem in [r["name"] for r in _get(f"{url}/lora_trainer/results")]

    # the preview asked for: its prompt, at a step of the run, a file under --data-dir drawn by the WebUI's model
    previews = [(step, path) for step, said, path in status["sample_grid"] if said == prompt]
    assert len(previews) == 1, status["sample_grid"]
    step, path = previews[0]
    assert 1 <= step < total and Path(path).is_file() and Path(path).is_relative_to(webui["data_dir"]), previews
    with Image.open(path) as image:
        assert image.size == (64, 64)
        assert np.asarray(image.convert("RGB")).std() > 0  # a picture, not a blank

    # validation: before the first step, at the save asked for, the periodic one and the end; the best of the saves
    measured = dict(status["validation"])
    assert sorted(measured) == sorted({0, asked_at, periodic, total}), status["validation"]
    assert all(np.isfinite(value) and value > 0 for value in measured.values()), measured
    best = status["best"]
    assert best is not None and best["step"] in (asked_at, periodic, total), best
    assert best["validation_loss"] == pytest.approx(min(v for s, v in measured.items() if s > 0)), (best, measured)
    assert measured[best["step"]] == pytest.approx(best["validation_loss"])
    best_bytes = Path(best["path"]).read_bytes()

    answer = _post(f"{url}/lora_trainer/use_best", {})
    job = answer["job"]
    if best["step"] == total:
        assert answer["message"] == f"The last step ({total}) is the best one: {name}.safetensors stays.", answer
        assert job["last_file"] is None and not (loras / f"{name}-last.safetensors").exists()
    else:
        assert answer["message"].startswith(f"{name}.safetensors is now the LoRA of step {best['step']} "), answer
        assert answer["message"].endswith(f"the last step's is {name}-last.safetensors."), answer
        assert Path(job["last_file"]) == loras / f"{name}-last.safetensors" and Path(job["last_file"]).is_file()
        assert (loras / f"{name}.safetensors").read_bytes() == best_bytes
        again = _post(f"{url}/lora_trainer/use_best", {})["message"]
        assert again.startswith(f"{name}.safetensors is already the best LoRA (step {best['step']})"), again
        assert f"{name}-last" in [r["name"] for r in _get(f"{url}/lora_trainer/results")]

    # the LoRA saved on request renders through the WebUI's own txt2img (its loader found it: its hash is in the info)
    body = {"prompt": f"zkblob, a red square <lora:{requested[0].stem}:1>", "negative_prompt": "", "seed": 1,
            "steps": 1, "width": 64, "height": 64, "sampler_name": "Euler", "cfg_scale": 7}
    info = json.loads(_post(f"{url}/sdapi/v1/txt2img", body)["info"])
    assert f"{requested[0].stem}: " in info["infotexts"][0] and "Lora not found" not in info["infotexts"][0], info
    assert "leaf Variable" not in webui["log"].read_text()


def test_a_typed_name_never_leaves_the_webuis_folders(webui, tmp_path):
    data = _blobs(tmp_path / "blobs")
    outside = tmp_path / "outside"
    for typed in ("../../../../../../" + str(outside).lstrip("/") + "/x1", str(outside / "x2")):
        status = _train(webui, data, typed, steps=1)
        name = Path(typed).name
        assert status["name"] == name and status["accepted"]["notice"].startswith(f"The name {typed!r} was changed")
        assert Path(status["lora_file"]) == webui["data_dir"] / "models" / "Lora" / f"{name}.safetensors"
        for written in status["saved"]:
            assert Path(written).is_relative_to(webui["data_dir"] / "outputs" / "lora_trainer" / name), written
    assert not outside.exists()
    assert "was changed to 'x1'" in webui["log"].read_text()


def test_the_memory_plan_of_a_run_on_the_loaded_model(webui, tmp_path):
    data = _blobs(tmp_path / "blobs")
    plan = _post(f"{webui['url']}/lora_trainer/plan", {"config": {"train_data_dir": str(data), "resolution": 64,
                                                                  "batch_size": 2}})["plan"]
    assert plan.startswith("Predicted peak GPU memory of this run (4 images, 64 px, batch 2")
    assert "with gradient_checkpointing: true" in plan and "fp8" not in plan  # the host's model stays as it is
    assert "No CUDA GPU here" in plan
    with pytest.raises(urllib.error.HTTPError) as refused:
        _post(f"{webui['url']}/lora_trainer/plan", {"config": {"train_data_dir": str(tmp_path / "nowhere")}})
    assert refused.value.code == 422 and "does not exist" in json.load(refused.value)["error"]


def test_a_missing_or_empty_image_folder_is_refused_before_the_job_starts(webui, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    for folder, says in ((tmp_path / "nowhere", "does not exist"), (empty, "No images found")):
        with pytest.raises(urllib.error.HTTPError) as refused:
            _post(f"{webui['url']}/lora_trainer/train", {"config": {"train_data_dir": str(folder), "output_name": "x"}})
        assert refused.value.code == 422
        assert says in json.load(refused.value)["error"]


def _blobs(folder: Path) -> Path:
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        pixels = np.zeros((64, 64, 3), np.uint8)
        pixels[..., 0] = 200
        pixels[16:48, 16:48] = rng.integers(0, 255, 3)
        Image.fromarray(pixels).save(folder / f"blob{i}.png")
        (folder / f"blob{i}.txt").write_text("zkblob, a red square", encoding="utf-8")
    return folder
