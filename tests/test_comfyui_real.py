"""The node pack inside a real ComfyUI, started offline on the CPU; skipped unless COMFYUI_PATH is set.

COMFYUI_PATH points at a ComfyUI checkout; COMFYUI_PYTHON at the Python that runs it (with this
project's requirements installed), default: the one running the tests. The server gets its own base
directory (models, custom_nodes, input, output) in a temp folder and listens on 127.0.0.1 only.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from conftest import make_dataset
from PIL import Image

from lora_trainer.backbones.tiny import build_tiny_checkpoint
from lora_trainer.lora.kohya import read_lora_file

COMFY = os.environ.get("COMFYUI_PATH")
ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not COMFY, reason="set COMFYUI_PATH to a ComfyUI checkout to run these")
LINK_FREE = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")


class Server:
    """A running ComfyUI and the paths of its base directory."""

    def __init__(self, base: Path, port: int, log: Path, process: subprocess.Popen) -> None:
        self.base, self.port, self.log, self.process = base, port, log, process

    def call(self, path: str, payload: dict | None = None):
        data = json.dumps(payload).encode() if payload is not None else None
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", data=data,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as response:
            body = response.read()
        return json.loads(body) if body else None

    def post(self, path: str) -> tuple[int, dict]:
        """POST an empty JSON body to `path`: the status code and the JSON answer, errors included."""
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", data=b"{}", method="POST",
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, json.loads(response.read() or b"null")
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read() or b"null")

    def run(self, graph: dict, timeout: float = 600) -> dict:
        """Queue an API-format graph and wait for its history entry."""
        prompt_id = self.call("/prompt", {"prompt": graph, "client_id": "lora-trainer-tests"})["prompt_id"]
        deadline = time.time() + timeout
        while time.time() < deadline:
            history = self.call(f"/history/{prompt_id}")
            if prompt_id in history and history[prompt_id].get("status", {}).get("completed") is not None:
                return history[prompt_id]
            time.sleep(0.5)
        raise TimeoutError(f"ComfyUI did not finish in {timeout} s; log: {self.log}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = tmp_path_factory.mktemp("comfy_base")
    (base / "custom_nodes").mkdir()
    (base / "custom_nodes" / "lora_trainer").symlink_to(ROOT, target_is_directory=True)
    build_tiny_checkpoint(base / "models" / "checkpoints" / "tiny_sd15.safetensors", "sd1-host")
    build_tiny_checkpoint(base / "models" / "checkpoints" / "tiny_sd2.safetensors", "sd2-host")
    make_dataset(base / "input" / "lora_data", count=4)
    port, log = _free_port(), base / "comfyui.log"
    python = os.environ.get("COMFYUI_PYTHON", sys.executable)
    with open(log, "w") as out:
        process = subprocess.Popen([python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
                                    "--base-directory", str(base), "--disable-auto-launch", "--disable-api-nodes"],
                                   cwd=COMFY, stdout=out, stderr=subprocess.STDOUT)
    server = Server(base, port, log, process)
    try:
        deadline = time.time() + 240
        while True:
            try:
                server.info = server.call("/object_info")
                break
            except OSError:
                if process.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"ComfyUI did not start:\n{log.read_text()[-3000:]}") from None
                time.sleep(1)
        yield server
    finally:
        process.terminate()
        process.wait(timeout=60)


def to_api(workflow: dict, info: dict) -> dict:
    """A saved UI workflow as the API graph /prompt takes, using the inputs' order from /object_info.

    Widget values are matched as the frontend lays widgets out: an INT named seed or noise_seed, or one whose
    spec sets control_after_generate, has a second widget (its "control after generate" mode) after it.
    tests/test_comfyui_browser.py loads the same file in the real frontend.
    """
    links = {link[0]: link for link in workflow["links"]}
    graph = {}
    for node in workflow["nodes"]:
        spec = info[node["type"]]["input"]
        ordered = list(spec.get("required", {}).items()) + list(spec.get("optional", {}).items())
        inputs = {i["name"]: [str(links[i["link"]][1]), links[i["link"]][2]]
                  for i in node["inputs"] if i.get("link") is not None}
        values = iter(node.get("widgets_values", []))
        for name, input_spec in ordered:
            kind = input_spec[0]
            if name in inputs or (isinstance(kind, str) and kind not in LINK_FREE):
                continue
            inputs[name] = next(values)
            control = input_spec[1].get("control_after_generate") if len(input_spec) > 1 else None
            if kind == "INT" and (control if control is not None else name in ("seed", "noise_seed")):
                next(values)
        graph[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return graph


def _training_graph(server: Server, name: str, steps: int, advanced: str = "") -> dict:
    workflow = json.loads((ROOT / "example_workflows" / "train_lora_from_folder.json").read_text())
    graph = to_api(workflow, server.info)
    graph["1"]["inputs"]["ckpt_name"] = "tiny_sd15.safetensors"
    graph["2"]["inputs"].update(folder="lora_data", resolution=64)  # relative: read from ComfyUI's input folder
    graph["3"]["inputs"].update(output_name=name, max_steps=steps, advanced=f"log_every_n_steps: 1\n{advanced}")
    graph["7"]["inputs"].update(width=64, height=64)
    graph["8"]["inputs"]["steps"] = 2
    return graph


def test_nodes_are_registered(server):
    for node_id in ("LoraTrainerCaptionFolder", "LoraTrainerDatasetFromFolder", "LoraTrainerDatasetFromImages",
                    "LoraTrainerMemoryPlan", "LoraTrainerTrainLora", "LoraTrainerTestLoraGrid"):
        assert server.info[node_id]["category"] == "LoRA Trainer"


def test_example_workflow_trains_saves_and_samples_with_the_lora(server):
    result = server.run(_training_graph(server, "comfy_test", steps=6, advanced="learning_rate: 0.01"))
    assert result["status"]["status_str"] == "success", result["status"]
    lora = server.base / "models" / "loras" / "comfy_test.safetensors"
    _, metadata = read_lora_file(lora)
    assert metadata["ss_steps"] == "6" and metadata["ss_base_model_version"] == "sd_v1"
    assert list((server.base / "output").glob("lora_trainer_example*.png"))
    report = result["outputs"]["3"]["text"][0]
    assert report.startswith("Saved ") and "Predicted peak GPU memory of this run (4 images, 64 px" in report

    grid = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny_sd15.safetensors"}},
            "2": {"class_type": "LoraTrainerTestLoraGrid",
                  "inputs": {"model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "lora_name": "comfy_test.safetensors",
                             "prompt": "inkwash, mountains", "negative": "", "strengths": "0, 1", "seed": 3,
                             "steps": 2, "cfg": 5.0, "width": 64, "height": 64}},
            "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "grid"}}}
    result = server.run(grid)
    assert result["status"]["status_str"] == "success", result["status"]
    image = np.asarray(Image.open(next((server.base / "output").glob("grid*.png"))), dtype=np.int16)
    base, with_lora = image[:, :64], image[:, 64:]
    change = np.abs(base - with_lora).mean()
    assert change > 0.5, change
    assert "lora key not loaded" not in server.log.read_text()


def test_check_memory_node_gives_the_plan_without_training(server):
    graph = _training_graph(server, "comfy_plan", steps=2)
    graph = {node: graph[node] for node in ("1", "2", "3")}  # the Train node's inputs and settings, nothing after
    graph["3"]["class_type"] = "LoraTrainerMemoryPlan"
    result = server.run(graph)
    assert result["status"]["status_str"] == "success", result["status"]
    plan = result["outputs"]["3"]["text"][0]
    assert plan.startswith("Predicted peak GPU memory of this run (4 images, 64 px") and "No CUDA GPU here" in plan
    assert not list((server.base / "models" / "loras").glob("comfy_plan*"))
    assert not (server.base / "output" / "lora_trainer" / "comfy_plan").exists()


def test_interrupt_leaves_a_usable_partial_lora(server):
    graph = _training_graph(server, "comfy_stop", steps=400, advanced="save_every_n_steps: 2")
    prompt_id = server.call("/prompt", {"prompt": graph, "client_id": "lora-trainer-tests"})["prompt_id"]
    checkpoints = server.base / "output" / "lora_trainer" / "comfy_stop" / "checkpoints"
    deadline = time.time() + 300
    while not list(checkpoints.glob("step-*")) and time.time() < deadline:
        time.sleep(0.5)
    server.call("/interrupt", {})
    while prompt_id not in server.call(f"/history/{prompt_id}") and time.time() < deadline:
        time.sleep(0.5)
    status = server.call(f"/history/{prompt_id}")[prompt_id]["status"]
    assert status["status_str"] == "error"
    assert any(message[0] == "execution_interrupted" for message in status["messages"])
    partial = list((server.base / "models" / "loras").glob("comfy_stop-step*.safetensors"))
    assert len(partial) == 1
    assert int(read_lora_file(partial[0])[1]["ss_steps"]) >= 2
    assert not (server.base / "models" / "loras" / "comfy_stop.safetensors").exists()


ROUTES = ("/lora_trainer/save_now", "/lora_trainer/sample_now")


def test_save_now_and_sample_now_reach_the_running_training(server):
    """The Train node's routes (what its Save now / Sample now buttons call), also under /api/: 409 while no Train
    node runs; during a run with a held-out image, a LoRA of the step saved on request into models/loras as
    NAME-stepN, a preview of the first caption in the run's samples folder, and the validation loss in the node's text."""
    for route in ROUTES:
        for path in (route, "/api" + route):
            status, body = server.post(path)
            assert status == 409 and "No Train LoRA node is running" in body["error"], (path, status, body)

    # no scheduled saves: the one asked for is the only one (test_save_now_on_a_scheduled_save_step_... has both)
    graph = _training_graph(server, "comfy_ask", steps=20, advanced="save_every_n_epochs: 0")
    graph["3"]["inputs"].update(validation_split=0.34, use_best=True)  # 1 of the 4 images held out
    prompt_id = server.call("/prompt", {"prompt": graph, "client_id": "lora-trainer-tests"})["prompt_id"]
    answers, deadline = {}, time.time() + 600
    while time.time() < deadline:  # 409 until the Train node runs: asked as soon as it does
        status, body = server.post("/lora_trainer/save_now")
        if status == 200:
            answers["/lora_trainer/save_now"] = status, body
            for path in ("/api/lora_trainer/save_now", "/api/lora_trainer/sample_now", "/lora_trainer/sample_now"):
                answers[path] = server.post(path)
            break
        assert status == 409, (status, body)
        history = server.call(f"/history/{prompt_id}")
        assert prompt_id not in history, f"the run ended before it was asked: {history[prompt_id]['status']}"
        time.sleep(0.05)
    assert all(answer == (200, {"asked": True}) for answer in answers.values()) and len(answers) == 4, answers
    while prompt_id not in server.call(f"/history/{prompt_id}") and time.time() < deadline:
        time.sleep(0.5)
    result = server.call(f"/history/{prompt_id}")[prompt_id]
    assert result["status"]["status_str"] == "success", result["status"]
    for path in ("/lora_trainer/save_now", "/api/lora_trainer/sample_now"):
        assert server.post(path)[0] == 409  # idle again

    loras = server.base / "models" / "loras"
    asked = list(loras.glob("comfy_ask-step*.safetensors"))
    assert len(asked) == 1, sorted(p.name for p in loras.iterdir())
    step = int(asked[0].stem.rsplit("-step", 1)[1])
    assert asked[0].name == f"comfy_ask-step{step:08d}.safetensors" and 1 <= step < 20
    assert read_lora_file(asked[0])[1]["ss_steps"] == str(step)
    samples = server.base / "output" / "lora_trainer" / "comfy_ask" / "samples"
    previews = sorted(samples.glob("step*.png"))  # no sample_prompts: only the one asked for, of the first caption
    assert len(previews) == 1 and previews[0].name.startswith(f"step{step:08d}_00"), previews
    assert Image.open(previews[0]).size == (64, 64)

    report = result["outputs"]["3"]["text"][0]
    assert report.startswith(f"Saved {loras / 'comfy_ask.safetensors'} (20 steps).")
    assert "validation loss" in report, report
    final = read_lora_file(loras / "comfy_ask.safetensors")[1]["ss_steps"]
    if "use_best: it is the best checkpoint, step" in report:  # the asked-for LoRA was better than the last one
        assert final == str(step) and "the last step's is comfy_ask-last.safetensors" in report
        assert read_lora_file(loras / "comfy_ask-last.safetensors")[1]["ss_steps"] == "20"
    else:
        assert "The last step is the best one (validation loss" in report and final == "20", report
        assert not (loras / "comfy_ask-last.safetensors").exists()


def test_save_now_on_a_scheduled_save_step_still_lands_in_the_loras_folder(server):
    """Save now while every step saves on schedule anyway (any click falls on such a step)."""
    graph = _training_graph(server, "comfy_ask_sched", steps=4, advanced="save_every_n_steps: 1")
    prompt_id = server.call("/prompt", {"prompt": graph, "client_id": "lora-trainer-tests"})["prompt_id"]
    deadline = time.time() + 600
    while server.post("/lora_trainer/save_now")[0] != 200:  # asked as soon as the Train node runs: at its step 1
        assert prompt_id not in server.call(f"/history/{prompt_id}") and time.time() < deadline, "never asked"
        time.sleep(0.05)
    while prompt_id not in server.call(f"/history/{prompt_id}") and time.time() < deadline:
        time.sleep(0.5)
    assert server.call(f"/history/{prompt_id}")[prompt_id]["status"]["status_str"] == "success"
    loras = server.base / "models" / "loras"
    # the save asked for is published although a scheduled one fell on its step (it was once taken for periodic)
    assert len(list(loras.glob("comfy_ask_sched-step*.safetensors"))) == 1, sorted(os.listdir(loras))


def test_requeuing_trains_again_and_the_same_seed_gives_the_same_lora(server):
    lora = server.base / "models" / "loras" / "comfy_again.safetensors"
    first = server.run(_training_graph(server, "comfy_again", steps=3))
    assert first["status"]["status_str"] == "success"
    one = read_lora_file(lora)
    second = server.run(_training_graph(server, "comfy_again", steps=3))
    assert second["status"]["status_str"] == "success"
    two = read_lora_file(lora)
    assert one[1]["ss_training_started_at"] != two[1]["ss_training_started_at"]  # it really ran again
    assert all(np.array_equal(one[0][k].float().numpy(), two[0][k].float().numpy()) for k in one[0])


def test_sd2_trains_through_the_example_workflow(server):
    graph = _training_graph(server, "comfy_sd2", steps=2)
    graph["1"]["inputs"]["ckpt_name"] = "tiny_sd2.safetensors"
    result = server.run(graph)
    assert result["status"]["status_str"] == "success", result["status"]
    _, metadata = read_lora_file(server.base / "models" / "loras" / "comfy_sd2.safetensors")
    assert metadata["ss_base_model_version"] == "sd_v2" and metadata["ss_v2"] == "True"


def test_a_lora_from_loraloader_is_left_out_of_training_and_said(server):
    import torch
    from safetensors.torch import save_file

    plain = server.run(_training_graph(server, "comfy_plain", steps=2))
    assert plain["status"]["status_str"] == "success", plain["status"]
    loras = server.base / "models" / "loras"
    trained = read_lora_file(loras / "comfy_plain.safetensors")[0]
    generator = torch.Generator().manual_seed(0)
    stack = {k: torch.randn(v.shape, generator=generator) * 0.2 if v.ndim else v.float() for k, v in trained.items()}
    te = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"  # CLIP-L's first attention: captions change
    stack.update({f"{te}.lora_down.weight": torch.randn(4, 768, generator=generator),
                  f"{te}.lora_up.weight": torch.randn(768, 4, generator=generator), f"{te}.alpha": torch.tensor(4.0)})
    save_file({k: v.contiguous() for k, v in stack.items()}, str(loras / "stack.safetensors"))

    graph = _training_graph(server, "comfy_stacked", steps=2)
    graph["20"] = {"class_type": "LoraLoader", "inputs": {"model": ["1", 0], "clip": ["1", 1], "strength_model": 1.0,
                                                         "strength_clip": 1.0, "lora_name": "stack.safetensors"}}
    graph["3"]["inputs"].update(model=["20", 0], clip=["20", 1])
    stacked = server.run(graph)
    assert stacked["status"]["status_str"] == "success", stacked["status"]
    assert "already has a LoRA applied" in server.log.read_text()
    assert "already has a LoRA applied" in stacked["outputs"]["3"]["text"][0]
    again = read_lora_file(loras / "comfy_stacked.safetensors")[0]
    assert all(torch.equal(trained[k], again[k]) for k in trained)  # the same LoRA as from the plain checkpoint


@pytest.fixture(scope="module")
def sdxl(server) -> str:
    """A tiny SDXL that ComfyUI detects (~2.4 GB, built in about a minute), in the server's checkpoints folder."""
    build_tiny_checkpoint(server.base / "models" / "checkpoints" / "tiny_sdxl.safetensors", "sdxl-comfy-host")
    return "tiny_sdxl.safetensors"


def test_sdxl_trains_and_its_lora_maps_onto_comfyuis_sdxl(server, sdxl):
    graph = _training_graph(server, "comfy_sdxl", steps=1, advanced="learning_rate: 0.01")
    graph["1"]["inputs"]["ckpt_name"] = sdxl
    result = server.run(graph)
    assert result["status"]["status_str"] == "success", result["status"]
    _, metadata = read_lora_file(server.base / "models" / "loras" / "comfy_sdxl.safetensors")
    assert metadata["ss_base_model_version"] == "sdxl_base_v1-0" and metadata["ss_steps"] == "1"

    settings = {"seed": 3, "steps": 2, "cfg": 5.0}
    check = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": sdxl}},
             "2": {"class_type": "LoraTrainerTestLoraGrid",
                   "inputs": {"model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "lora_name": "comfy_sdxl.safetensors",
                              "prompt": "inkwash, mountains", "negative": "", "strengths": "0, 1",
                              "width": 64, "height": 64, **settings}},
             "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "sdxl_grid"}},
             "4": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "inkwash, mountains"}},
             "5": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": ""}},
             "6": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
             "7": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "positive": ["4", 0], "negative": ["5", 0],
                                                        "latent_image": ["6", 0], "sampler_name": "euler",
                                                        "scheduler": "normal", "denoise": 1.0, **settings}},
             "8": {"class_type": "VAEDecode", "inputs": {"samples": ["7", 0], "vae": ["1", 2]}},
             "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "sdxl_base"}}}
    result = server.run(check)
    assert result["status"]["status_str"] == "success", result["status"]
    grid = np.asarray(Image.open(next((server.base / "output").glob("sdxl_grid*.png"))), dtype=np.int16)
    base = np.asarray(Image.open(next((server.base / "output").glob("sdxl_base*.png"))), dtype=np.int16)
    assert np.abs(grid[:, :64] - base).max() <= 1  # strength 0 is the checkpoint itself
    assert np.abs(grid[:, 64:] - base).mean() > 0.5  # strength 1 changes the image
    assert "lora key not loaded" not in server.log.read_text()  # every key of the LoRA maps onto ComfyUI's SDXL


def test_an_sdxl_variant_trains_as_sdxl(server, sdxl):
    """ComfyUI detects SDXL with transformer depths 1, 1, 2 as Segmind Vega, its own subclass of SDXL."""
    from safetensors.torch import load_file, save_file

    from lora_trainer.backbones.ldm import unet_to_ldm
    from lora_trainer.backbones.tiny import comfy_sdxl_unet

    checkpoints = server.base / "models" / "checkpoints"
    tensors = {k: v for k, v in load_file(str(checkpoints / sdxl)).items() if not k.startswith("model.diffusion_model.")}
    unet = unet_to_ldm(comfy_sdxl_unet((1, 1, 2)).state_dict(), 2)
    tensors.update({f"model.diffusion_model.{k}": v.half().contiguous() for k, v in unet.items()})
    save_file(tensors, str(checkpoints / "tiny_vega.safetensors"))
    graph = _training_graph(server, "comfy_vega", steps=1)
    graph["1"]["inputs"]["ckpt_name"] = "tiny_vega.safetensors"
    result = server.run(graph)
    assert result["status"]["status_str"] == "success", result["status"]
    _, metadata = read_lora_file(server.base / "models" / "loras" / "comfy_vega.safetensors")
    assert metadata["ss_base_model_version"] == "sdxl_base_v1-0"
    assert "lora key not loaded" not in server.log.read_text()
