"""Flux.1 LoRA files inside the real hosts: ComfyUI (COMFYUI_PATH, COMFYUI_PYTHON) and lllyasviel's Forge (WEBUI_PATH,
WEBUI_PYTHON); each test is skipped unless its host's checkout is named.

The LoRAs are trained here on the tiny Flux.1-dev of `build_tiny_flux` (hidden 128, 1 double + 1 single block): one
with `lora_targets: locon` (every linear layer of the blocks, modulation included), one with `attention_ff`. A script
then runs in the host's own Python with the host's checkout as cwd and loads them the way the host does:

- ComfyUI: `comfy.sd.load_diffusion_model` (what UNETLoader calls) on the transformer file as ComfyUI's
  `models/diffusion_models` holds it (BFL layout, no prefix), then `comfy.utils.load_torch_file` +
  `comfy.sd.load_lora_for_models(model, None, lora, 1.0, 0)` (LoraLoaderModelOnly). ComfyUI 0.33 reads the widths
  from the weights; 0.3.64's detection fixes hidden 3072 / context 4096 / 24 heads, so there (and only there) the
  script corrects those three values of the detected config from the weights and lets the loader do the rest.
- Forge: `backend.loader.split_state_dict` (huggingface_guess) and `load_huggingface_component` for the transformer,
  wrapped in a `UnetPatcher` as `backend/diffusion_engine/flux.py` does, then what
  `extensions-builtin/sd_forge_lora/networks.py: load_lora_for_models` does for the UNet
  (`model_lora_keys_unet`, `load_lora`, `add_patches`) and `refresh_loras` (Forge merges the LoRA into the weights).
  huggingface_guess fixes every Flux size (hidden 3072, 19 + 38 blocks, context 4096, vector 768), so Forge cannot load
  a tiny Flux unaided: the script corrects those values of the guess from the weights; the rest is Forge's.

Asserted for each file: no key the host leaves out ("lora key not loaded" in ComfyUI's log; Forge's unmatched and
skipped keys), one patch per module of the file, on exactly the weight the module names; the host's model output
(`apply_model` on fixed latents, sigmas, T5 states, pooled vector and guidance) differs with the LoRA, and equals
what this project's own FluxBackbone (`apply_lora_file` + `predict`) gives, with and without the LoRA; after the LoRA
is taken off, the host's output is the base one again.

At Flux.1-dev's real sizes (19 double + 38 single blocks, hidden 3072), both hosts also detect the model from its
shapes unaided, build it on the meta device and map every module of a LoRA file this project's exporter writes at
those sizes (`FlowBackbone.to_file`), with each patch's shapes fitting the weight it lands on.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_dataset, quick_config
from safetensors import safe_open
from safetensors.torch import load_file, save_file

COMFY = os.environ.get("COMFYUI_PATH")
WEBUI = os.environ.get("WEBUI_PATH")
FORGE = bool(WEBUI) and (Path(WEBUI) / "backend" / "loader.py").is_file()
BLOCKS = (1, 1, 128, 512)  # the tiny model: double blocks, single blocks, hidden, MLP width
REAL = (19, 38, 3072, 12288)

COMFY_SCRIPT = r'''
import json, logging, sys
job = json.load(open(sys.argv[1]))
sys.path.insert(0, job["root"])
sys.argv = [sys.argv[0], "--cpu"]
import comfy.options
comfy.options.enable_args_parsing()
records = []
class Keep(logging.Handler):
    def emit(self, record):
        records.append(record.getMessage())
logging.getLogger().addHandler(Keep())
logging.getLogger().setLevel(logging.DEBUG)
import torch
torch.set_num_threads(1)
from safetensors.torch import load_file, save_file
import comfy.sd, comfy.utils, comfy.model_management, comfy.model_detection, comfy.model_patcher
report = {"loras": {}}
try:
    import comfyui_version
    report["version"] = comfyui_version.__version__
except ImportError:
    report["version"] = "?"
detect = comfy.model_detection.detect_unet_config
def widths_from_weights(state_dict, key_prefix, *args, **kwargs):
    config = detect(state_dict, key_prefix, *args, **kwargs)
    if config and config.get("image_model") == "flux" and key_prefix + "txt_in.weight" in state_dict:
        w = state_dict[key_prefix + "txt_in.weight"]
        fixed = {"hidden_size": w.shape[0], "context_in_dim": w.shape[1], "num_heads": w.shape[0] // sum(config["axes_dim"])}
        changed = {k: [config[k], v] for k, v in fixed.items() if config[k] != v}
        if changed:
            report["widths_fixed"] = changed
            config.update(fixed)
    return config
comfy.model_detection.detect_unet_config = widths_from_weights
model = comfy.sd.load_diffusion_model(job["unet"])
comfy.model_detection.detect_unet_config = detect
report["model_class"] = type(model.model).__name__
report["dtype"] = str(model.model.get_dtype())
inputs = load_file(job["inputs"])
def velocity(patcher):
    comfy.model_management.load_models_gpu([patcher])
    x, sigma = inputs["x"], inputs["sigma"]
    with torch.no_grad():
        denoised = patcher.model.apply_model(x, sigma, c_crossattn=inputs["context"], y=inputs["y"], guidance=inputs["guidance"])
    return ((x - denoised.float()) / sigma.view(-1, 1, 1, 1)).contiguous()
outputs = {"base": velocity(model)}
for index, path in enumerate(job["loras"]):
    start = len(records)
    lora = comfy.utils.load_torch_file(path, safe_load=True)
    patched, _ = comfy.sd.load_lora_for_models(model, None, lora, 1.0, 0)
    outputs[f"lora{index}"] = velocity(patched)
    report["loras"][path] = {"patches": {k: len(v) for k, v in patched.patches.items()}, "log": records[start:]}
outputs["base_again"] = velocity(model)
save_file(outputs, job["outputs"])

# real sizes, on the meta device
shapes = json.load(open(job["real_shapes"]))
meta = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
config = comfy.model_detection.model_config_from_unet(meta, "")
real = {"class": type(config).__name__ if config else None}
if config is not None:
    real["unet_config"] = {k: v for k, v in config.unet_config.items() if isinstance(v, (int, float, str, bool))}
    config.set_inference_dtype(torch.bfloat16, None)
    big = config.get_model(meta, "", device=torch.device("meta"))
    patcher = comfy.model_patcher.ModelPatcher(big, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))
    start = len(records)
    lora = comfy.utils.load_torch_file(job["real_lora"], safe_load=True)
    patched, _ = comfy.sd.load_lora_for_models(patcher, None, lora, 1.0, 0)
    weights = big.state_dict()
    bad = []
    for key, entries in patched.patches.items():
        for entry in entries:
            value = entry[1]
            parts = value.weights if hasattr(value, "weights") else value[1]
            up, down = parts[0], parts[1]
            rows, cols = weights[key].shape[:2]
            if entry[3] is not None or up.shape[0] != rows or down.shape[1] != cols:
                bad.append([key, list(up.shape), list(down.shape), [rows, cols]])
    real.update(patches=sorted(patched.patches), shape_mismatches=bad, log=records[start:])
report["real"] = real
report["not_loaded"] = [r for r in records if "lora key not loaded" in r]
json.dump(report, open(job["report"], "w"), indent=1)
'''

FORGE_SCRIPT = r'''
import json, os, sys
job = json.load(open(sys.argv[1]))
forge = job["root"]
sys.path[:0] = [forge, os.path.join(forge, "packages_3rdparty"), os.path.join(forge, "repositories", "huggingface_guess")]
sys.argv = [sys.argv[0], "--always-cpu"]
import torch
torch.set_num_threads(1)
from safetensors.torch import load_file, save_file
import huggingface_guess
from huggingface_guess import detection
report = {"loras": {}}
detect = detection.detect_unet_config
def widths_from_weights(state_dict, key_prefix, *args, **kwargs):
    config = detect(state_dict, key_prefix, *args, **kwargs)
    if config and config.get("image_model") == "flux":
        depth = key_prefix.count(".")
        blocks = lambda name: len({k.split(".")[depth + 1] for k in state_dict if k.startswith(key_prefix + name + ".")})
        txt = state_dict[key_prefix + "txt_in.weight"]
        fixed = {"hidden_size": txt.shape[0], "context_in_dim": txt.shape[1], "num_heads": txt.shape[0] // 128,
                 "vec_in_dim": state_dict[key_prefix + "vector_in.in_layer.weight"].shape[1],
                 "depth": blocks("double_blocks"), "depth_single_blocks": blocks("single_blocks")}
        changed = {k: [config[k], v] for k, v in fixed.items() if config[k] != v}
        if changed:
            report["widths_fixed"] = changed
            config.update(fixed)
    return config
from backend.loader import split_state_dict, load_huggingface_component
from backend.operations import using_forge_operations
from backend.patcher.unet import UnetPatcher
from backend.patcher.lora import model_lora_keys_unet, load_lora
from backend.modules.k_model import KModel
from backend.modules.k_prediction import PredictionFlux
from backend.nn.flux import IntegratedFluxTransformer2DModel
from backend.state_dict import load_state_dict
from backend.utils import load_torch_file
dev_predictor = lambda: PredictionFlux(seq_len=4096, base_seq_len=256, max_seq_len=4096, base_shift=0.5, max_shift=1.15)
detection.detect_unet_config = widths_from_weights
state_dicts, guess = split_state_dict(job["unet"])
detection.detect_unet_config = detect
report["repo"] = guess.huggingface_repo
repo = os.path.join(forge, "backend", "huggingface", guess.huggingface_repo)
model = load_huggingface_component(guess, "transformer", "diffusers", "FluxTransformer2DModel", repo, state_dicts["transformer"])
report["dtype"] = str(model.storage_dtype)
unet = UnetPatcher.from_model(model=model, diffusers_scheduler=None, config=guess, k_predictor=dev_predictor())
inputs = load_file(job["inputs"])
def velocity(patcher):
    patcher.refresh_loras()
    x, sigma = inputs["x"], inputs["sigma"]
    with torch.no_grad():
        denoised = patcher.model.apply_model(x, sigma, c_crossattn=inputs["context"], y=inputs["y"], guidance=inputs["guidance"])
    return ((x - denoised.float()) / sigma.view(-1, 1, 1, 1)).contiguous()
def forge_lora(patcher, path):
    """extensions-builtin/sd_forge_lora/networks.py: load_lora_for_models, for the UNet."""
    lora = load_torch_file(path, safe_load=True)
    patches, unmatched = load_lora(lora, model_lora_keys_unet(patcher.model))
    patched = patcher.clone()
    loaded = patched.add_patches(filename=path, patches=patches, strength_patch=1.0, online_mode=False)
    skipped = [str(k) for k in patches if k not in loaded]
    return patched, patches, {"unmatched": sorted(unmatched), "skipped": skipped,
                              "patches": {str(k): 1 for k in loaded}}
outputs = {"base": velocity(unet)}
for index, path in enumerate(job["loras"]):
    patched, _, found = forge_lora(unet, path)
    report["loras"][path] = found
    outputs[f"lora{index}"] = velocity(patched)
outputs["base_again"] = velocity(unet)
save_file(outputs, job["outputs"])

# real sizes, on the meta device: Forge's own guess, its Flux module and its key map
shapes = json.load(open(job["real_shapes"]))
meta = {"model.diffusion_model." + k: torch.empty(s, device="meta") for k, s in shapes.items()}
guess = huggingface_guess.guess(meta)
real = {"repo": guess.huggingface_repo, "unet_config": dict(guess.unet_config)}
with torch.device("meta"), using_forge_operations(device=torch.device("meta"), dtype=torch.bfloat16):
    net = IntegratedFluxTransformer2DModel(**guess.unet_config)
# as load_huggingface_component does: Forge's Linear gets its weight from the state dict
load_state_dict(net, {k.removeprefix("model.diffusion_model."): v for k, v in meta.items()})
net.config = guess.unet_config
net.storage_dtype = net.computation_dtype = torch.bfloat16
net.load_device = net.offload_device = net.initial_device = torch.device("cpu")
big = UnetPatcher(KModel(model=net, diffusers_scheduler=None, k_predictor=dev_predictor(), config=guess),
                  load_device=torch.device("cpu"), offload_device=torch.device("cpu"))
patched, patches, found = forge_lora(big, job["real_lora"])
weights = dict(big.model.named_parameters())
bad = []
for key, value in patches.items():
    up, down = value[1][0], value[1][1]
    rows, cols = weights[key].shape[:2]
    if up.shape[0] != rows or down.shape[1] != cols:
        bad.append([key, list(up.shape), list(down.shape), [rows, cols]])
real.update(found, shape_mismatches=bad)
report["real"] = real
json.dump(report, open(job["report"], "w"), indent=1)
'''


def _modules(path: Path) -> dict[str, str]:
    """The file's LoRA modules -> the BFL weight each one names (this project's own name table)."""
    from lora_trainer.backbones.flux import names

    with safe_open(str(path), "pt") as f:
        stored = list(f.keys())
    keys = {k.removesuffix(".lora_down.weight") for k in stored if k.endswith(".lora_down.weight")}
    double, single, hidden, mlp = REAL if any("blocks_37" in k for k in keys) else BLOCKS
    bfl = {f"lora_unet_{m.replace('.', '_')}": m for m, _, _, _ in names(double, single, hidden, mlp).values()}
    assert keys <= bfl.keys(), sorted(keys - bfl.keys())
    return {k: f"diffusion_model.{bfl[k]}.weight" for k in keys}


@pytest.fixture(scope="module")
def flux_loras(tmp_path_factory):
    """Two LoRAs trained on the tiny Flux.1-dev (locon, attention_ff), fixed inputs, this project's own outputs for
    them, and a LoRA file at Flux.1-dev's real sizes with the real model's weight shapes."""
    from diffusers import FluxTransformer2DModel

    from lora_trainer.backbones.files import read_weights
    from lora_trainer.backbones.flux import FluxBackbone, bfl_from_transformer, names, transformer_from_bfl
    from lora_trainer.backbones.tiny_flow import build_tiny_flux
    from lora_trainer.train.loop import train_lora

    root = tmp_path_factory.mktemp("flux_hosts")
    flux = build_tiny_flux(root / "comfy")
    data = make_dataset(root / "data", count=2)
    loras = []
    for kind in ("locon", "attention_ff"):
        config = quick_config(flux, data, root / kind, max_steps=3, batch_size=1, learning_rate=1e-2,
                              lora_targets=kind, sample_prompts=[])
        loras.append(train_lora(config).lora_file)

    torch.manual_seed(0)
    inputs = {"x": torch.randn(2, 16, 8, 8), "sigma": torch.tensor([0.3, 0.8]), "context": torch.randn(2, 5, 64),
              "y": torch.randn(2, 64), "guidance": torch.tensor([3.5, 3.5])}
    save_file(inputs, str(root / "inputs.safetensors"))
    expected = {}
    for name, lora in (("base", None), *((f"lora{i}", path) for i, path in enumerate(loras))):
        backbone = FluxBackbone(family="flux1", transformer=transformer_from_bfl(dict(read_weights(flux))), vae=None,
                                text_encoders=[], tokenizers=[], variant="dev")
        if lora:
            backbone.apply_lora_file(str(lora))
        with torch.no_grad():
            expected[name] = backbone.predict(backbone.transformer, inputs["x"], inputs["sigma"],
                                              {"t5": inputs["context"], "pooled": inputs["y"]}, guidance=3.5)

    with torch.device("meta"):
        real = FluxTransformer2DModel(guidance_embeds=True)  # Flux.1-dev's config
    shapes = {k: list(v.shape) for k, v in bfl_from_transformer(real).items()}
    (root / "real_shapes.json").write_text(json.dumps(shapes))
    targets = names(*REAL)
    writer = FluxBackbone.__new__(FluxBackbone)
    writer.file_targets = lambda: targets
    state = {}
    for name, (bfl, _, rows, _) in targets.items():  # every layer `locon` trains, rank 1
        state[f"{name}.lora_A.weight"] = torch.randn(1, shapes[f"{bfl}.weight"][1])
        state[f"{name}.lora_B.weight"] = torch.randn(rows, 1)
    real_lora = root / "flux1_dev_real_sizes.safetensors"
    save_file(writer.to_file(state, alpha=1.0, dtype="bf16"), str(real_lora))
    return {"root": root, "unet": flux, "loras": loras, "inputs": root / "inputs.safetensors", "expected": expected,
            "real_shapes": root / "real_shapes.json", "real_lora": real_lora}


def _run_host(python: str, root: str, script: str, flux_loras: dict, tmp_path: Path) -> tuple[dict, dict]:
    (tmp_path / "host.py").write_text(script)
    job = {"root": root, "unet": str(flux_loras["unet"]), "loras": [str(p) for p in flux_loras["loras"]],
           "inputs": str(flux_loras["inputs"]), "outputs": str(tmp_path / "outputs.safetensors"),
           "report": str(tmp_path / "report.json"), "real_shapes": str(flux_loras["real_shapes"]),
           "real_lora": str(flux_loras["real_lora"])}
    (tmp_path / "job.json").write_text(json.dumps(job))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("PYTHONPATH", None)
    done = subprocess.run([python, str(tmp_path / "host.py"), str(tmp_path / "job.json")], cwd=root, env=env,
                          capture_output=True, check=False, text=True, timeout=300)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    report = json.loads((tmp_path / "report.json").read_text())
    report["console"] = done.stdout + done.stderr
    return report, load_file(job["outputs"])


def _check(report: dict, outputs: dict, flux_loras: dict) -> None:
    expected = flux_loras["expected"]
    torch.testing.assert_close(outputs["base"], expected["base"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(outputs["base_again"], outputs["base"], rtol=0, atol=1e-6)  # the LoRA came off again
    for index, path in enumerate(flux_loras["loras"]):
        modules = _modules(path)
        found = report["loras"][str(path)]
        assert found.get("unmatched", []) == [] and found.get("skipped", []) == [], found
        assert sorted(found["patches"]) == sorted(modules.values())  # one patch per module, on the weight it names
        assert all(count == 1 for count in found["patches"].values())
        got, want = outputs[f"lora{index}"], expected[f"lora{index}"]
        effect = (want - expected["base"]).abs().max().item()
        assert effect > 1e-3, f"{path.name}: the trained LoRA does nothing"
        assert (got - outputs["base"]).abs().max().item() > 1e-3, f"{path.name}: the host's output did not change"
        torch.testing.assert_close(got, want, rtol=1e-4, atol=max(1e-5, effect * 1e-3))
    real = report["real"]
    modules = _modules(flux_loras["real_lora"])
    assert real.get("unmatched", []) == [] and real.get("skipped", []) == [], real
    assert sorted(real["patches"]) == sorted(modules.values())
    assert real["shape_mismatches"] == []


@pytest.mark.skipif(not COMFY, reason="set COMFYUI_PATH (and COMFYUI_PYTHON) to a ComfyUI checkout to run")
def test_comfyui_loads_every_key_and_gives_the_trained_output(flux_loras, tmp_path):
    python = os.environ.get("COMFYUI_PYTHON", sys.executable)
    report, outputs = _run_host(python, COMFY, COMFY_SCRIPT, flux_loras, tmp_path)
    assert report["model_class"] == "Flux"
    assert report["not_loaded"] == [] and "lora key not loaded" not in report["console"], report["not_loaded"]
    version = tuple(int(p) for p in report["version"].split(".")[:3] if p.isdigit())
    if version >= (0, 33):  # reads the widths from the weights: the tiny transformer loads exactly as UNETLoader does
        assert "widths_fixed" not in report, report["widths_fixed"]
    _check(report, outputs, flux_loras)
    real = report["real"]
    assert real["class"] == "Flux" and real["unet_config"]["hidden_size"] == 3072, real
    assert real["unet_config"]["depth"] == 19 and real["unet_config"]["depth_single_blocks"] == 38


@pytest.mark.skipif(not FORGE, reason="set WEBUI_PATH (and WEBUI_PYTHON) to a Forge checkout (backend/loader.py) to run")
def test_forge_loads_every_key_and_gives_the_trained_output(flux_loras, tmp_path):
    python = os.environ.get("WEBUI_PYTHON", str(Path(WEBUI) / "venv" / "bin" / "python"))
    report, outputs = _run_host(python, WEBUI, FORGE_SCRIPT, flux_loras, tmp_path)
    assert "Missing:" not in report["console"] and "Unexpected:" not in report["console"], report["console"]
    assert report["repo"] == "black-forest-labs/FLUX.1-dev"
    _check(report, outputs, flux_loras)
    real = report["real"]
    assert real["repo"] == "black-forest-labs/FLUX.1-dev" and real["unet_config"]["hidden_size"] == 3072, real
    assert real["unet_config"]["depth"] == 19 and real["unet_config"]["depth_single_blocks"] == 38
