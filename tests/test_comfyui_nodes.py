"""The ComfyUI nodes against ComfyUI's documented node interface, with stand-ins for its modules.

The stand-ins wrap our tiny SD1.5 model the way ComfyUI wraps a loaded checkpoint: a MODEL whose
diffusion_model holds LDM-named weights, a CLIP with tokenize/encode_from_tokens, a VAE whose encode
takes [B, H, W, C] pixels in 0..1 and returns unscaled latents.
"""

from __future__ import annotations

import importlib
import sys
import types
from pathlib import Path

import pytest
import torch

from lora_trainer.backbones.checkpoint import UNET_PREFIX
from lora_trainer.backbones.sd import DiffusionBackbone
from lora_trainer.backbones.tiny import tiny_state_dict
from lora_trainer.lora.kohya import read_lora_file

ROOT = Path(__file__).resolve().parents[1]


class Interrupted(Exception):
    """Stands in for comfy.model_management.InterruptProcessingException."""


@pytest.fixture
def comfy(request, tmp_path, monkeypatch, tiny_checkpoints):
    """Fake ComfyUI modules plus a MODEL/CLIP/VAE trio over a tiny model (SD1.5 unless parametrised)."""
    family = getattr(request, "param", "sd1")
    state = {"interrupt_after": None, "step": 0, "unloads": 0, "progress": []}
    loras = tmp_path / "models" / "loras"
    loras.mkdir(parents=True)

    mm = types.ModuleType("comfy.model_management")
    mm.unload_all_models = lambda: state.__setitem__("unloads", state["unloads"] + 1)
    mm.soft_empty_cache = lambda: None
    mm.processing_interrupted = lambda: state["interrupt_after"] is not None and state["step"] >= state["interrupt_after"]

    def throw():
        if mm.processing_interrupted():
            raise Interrupted

    mm.throw_exception_if_processing_interrupted = throw
    mm.InterruptProcessingException = Interrupted
    utils = types.ModuleType("comfy.utils")

    class ProgressBar:
        def __init__(self, total):
            self.total = total

        def update_absolute(self, value, total=None):
            state["step"] = value
            state["progress"].append((value, total))

    utils.ProgressBar = ProgressBar
    utils.load_torch_file = lambda path, safe_load=False: read_lora_file(path)[0]
    sd = types.ModuleType("comfy.sd")
    sd.load_lora_for_models = lambda model, clip, lora, sm, sc: (("patched", model, len(lora)), ("patched", clip))
    folder_paths = types.ModuleType("folder_paths")
    folder_paths.get_folder_paths = lambda kind: [str(loras)]
    folder_paths.get_output_directory = lambda: str(tmp_path / "output")
    folder_paths.get_temp_directory = lambda: str(tmp_path)
    folder_paths.get_filename_list = lambda kind: sorted(p.name for p in loras.glob("*.safetensors"))
    package = types.ModuleType("comfy")
    package.model_management, package.utils, package.sd = mm, utils, sd
    for name, module in {"comfy": package, "comfy.model_management": mm, "comfy.utils": utils, "comfy.sd": sd,
                         "folder_paths": folder_paths}.items():
        monkeypatch.setitem(sys.modules, name, module)

    checkpoint = tiny_state_dict(family)
    host_unet = {k[len(UNET_PREFIX):]: v for k, v in checkpoint.items() if k.startswith(UNET_PREFIX)}
    encoders = DiffusionBackbone.from_file(tiny_checkpoints[family])
    config = type({"sd1": "SD15", "sdxl": "SDXL"}[family], (), {})()
    scale = {"sd1": 0.18215, "sdxl": 0.13025}[family]
    model = types.SimpleNamespace(model=types.SimpleNamespace(
        model_config=config, diffusion_model=types.SimpleNamespace(state_dict=lambda: host_unet),
        latent_format=types.SimpleNamespace(process_in=lambda x: x * scale, process_out=lambda x: x / scale),
        model_type=types.SimpleNamespace(name="EPS")))

    def encode_from_tokens(tokens, return_pooled=False):
        cond = encoders.encode_prompts([tokens])
        return cond["hidden"], cond.get("pooled", torch.zeros(1, 64))

    clip = types.SimpleNamespace(tokenize=lambda text: text, encode_from_tokens=encode_from_tokens)
    vae = types.SimpleNamespace(
        encode=lambda pixels: encoders.vae.encode(pixels.movedim(-1, 1) * 2 - 1).latent_dist.mean,
        decode=lambda latents: ((encoders.vae.decode(latents).sample + 1) / 2).clamp(0, 1).movedim(1, -1))
    return types.SimpleNamespace(state=state, loras=loras, model=model, clip=clip, vae=vae, host_unet=host_unet)


def test_node_classes_follow_comfyuis_interface():
    package = importlib.import_module("lora_trainer.hosts.comfyui")
    assert set(package.NODE_CLASS_MAPPINGS) == set(package.NODE_DISPLAY_NAME_MAPPINGS)
    for node_id, cls in package.NODE_CLASS_MAPPINGS.items():
        assert node_id.startswith("LoraTrainer")
        assert cls.CATEGORY == "LoRA Trainer" and callable(getattr(cls(), cls.FUNCTION))
        assert len(cls.RETURN_TYPES) == len(cls.RETURN_NAMES)
        if cls.__name__ == "TestLoraGrid":
            continue  # lists ComfyUI's loras folder: checked with the fake folder_paths below
        for group in cls.INPUT_TYPES().values():
            for name, spec in group.items():
                assert isinstance(spec, tuple) and isinstance(spec[0], (str, list)), name
                if len(spec) > 1 and "default" in spec[1] and "min" in spec[1]:
                    assert spec[1]["min"] <= spec[1]["default"] <= spec[1]["max"], name
    assert package.TrainLora.IS_CHANGED() != package.TrainLora.IS_CHANGED()  # NaN: never cached


def test_root_init_is_the_comfyui_entry_point():
    spec = importlib.util.spec_from_file_location("lora_trainer_pack", ROOT / "__init__.py",
                                                  submodule_search_locations=[str(ROOT)])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert "LoraTrainerTrainLora" in module.NODE_CLASS_MAPPINGS
    assert not hasattr(module, "comfy_entrypoint")  # NODE_CLASS_MAPPINGS would win over it anyway


def test_train_node_saves_into_loras_and_leaves_the_graphs_model_untouched(comfy, dataset, tmp_path):
    from lora_trainer.hosts.comfyui import DatasetFromFolder, TestLoraGrid, TrainLora

    snapshot = {k: v.clone() for k, v in comfy.host_unet.items()}
    (data,) = DatasetFromFolder().make(str(dataset), resolution=64, enable_buckets=True, repeats=1, trigger_word="inkwash",
                                       shuffle_captions=False, keep_tokens=1, caption_dropout=0.0, flip_aug=False)
    model, clip, name, plot = TrainLora().train(
        comfy.model, comfy.clip, comfy.vae, data, "../../ink wash", max_steps=3, lora_rank=4, lora_alpha=4.0,
        learning_rate=1e-3, batch_size=0, lora_targets="attention_ff", optimizer="adamw", lr_scheduler="constant",
        seed=1, save_every_n_steps=0, advanced="device: cpu\nlog_every_n_steps: 1")
    assert name == "ink wash.safetensors"
    tensors, metadata = read_lora_file(comfy.loras / name)
    assert metadata["ss_output_name"] == "ink wash" and metadata["ss_steps"] == "3"
    assert model[0] == "patched" and model[2] == len(tensors) and clip[0] == "patched"
    assert plot.shape[0] == 1 and plot.shape[-1] == 3 and 0 <= float(plot.min()) <= float(plot.max()) <= 1
    assert all(torch.equal(comfy.host_unet[k], snapshot[k]) for k in snapshot)
    assert comfy.state["unloads"] == 2  # before taking the weights, and to free CLIP/VAE after encoding
    assert comfy.state["progress"][-1] == (3, 3)
    assert not list(comfy.loras.glob(".*.tmp"))
    assert "ink wash.safetensors" in TestLoraGrid.INPUT_TYPES()["required"]["lora_name"][0]


def test_sample_prompts_render_with_the_graphs_vae_and_clip(comfy, dataset, tmp_path):
    from PIL import Image

    from lora_trainer.hosts.comfyui import TrainLora

    TrainLora().train(comfy.model, comfy.clip, comfy.vae, {"train_data_dir": str(dataset), "resolution": 64},
                      "sampled", max_steps=2, lora_rank=4, lora_alpha=4.0, learning_rate=1e-3, batch_size=0,
                      lora_targets="attention", optimizer="adamw", lr_scheduler="constant", seed=1,
                      save_every_n_steps=0, advanced="device: cpu\nsample_prompts: [a mountain]\nsample_steps: 2")
    samples = sorted((tmp_path / "output" / "lora_trainer" / "sampled" / "samples").glob("*.png"))
    assert len(samples) == 1
    with Image.open(samples[0]) as image:
        assert image.size == (64, 64) and len(set(image.getdata())) > 1


def test_interrupt_keeps_a_usable_partial_lora_then_reraises(comfy, dataset):
    from lora_trainer.hosts.comfyui import TrainLora

    comfy.state["interrupt_after"] = 2
    with pytest.raises(Interrupted):
        TrainLora().train(comfy.model, comfy.clip, comfy.vae, {"train_data_dir": str(dataset), "resolution": 64},
                          "partial", max_steps=6, lora_rank=4, lora_alpha=4.0, learning_rate=1e-3, batch_size=0,
                          lora_targets="attention", optimizer="adamw", lr_scheduler="constant", seed=1,
                          save_every_n_steps=0, advanced="device: cpu")
    saved = list(comfy.loras.glob("partial-step*.safetensors"))
    assert [p.name for p in saved] == ["partial-step00000002.safetensors"]
    assert read_lora_file(saved[0])[1]["ss_steps"] == "2"


def test_dataset_from_images_writes_captioned_pngs(comfy):
    from lora_trainer.data import scan_dataset
    from lora_trainer.hosts.comfyui import DatasetFromImages

    images = torch.rand(2, 64, 80, 3)
    (data,) = DatasetFromImages().make(images, "a red fox\na blue bird", resolution=64, enable_buckets=True, repeats=2,
                                       trigger_word="", shuffle_captions=False, keep_tokens=1, caption_dropout=0.0,
                                       flip_aug=False)
    items = scan_dataset(data["train_data_dir"]).items
    assert [i.caption for i in items] == ["a red fox", "a blue bird"] and data["repeats"] == 2
    with pytest.raises(Exception, match="caption lines"):
        DatasetFromImages().make(images, "one\ntwo\nthree", resolution=64, enable_buckets=True, repeats=1,
                                 trigger_word="", shuffle_captions=False, keep_tokens=1, caption_dropout=0.0,
                                 flip_aug=False)


def test_caption_folder_node_writes_captions(comfy, tmp_path):
    from conftest import make_dataset

    from lora_trainer.caption.synthetic import random_blip
    from lora_trainer.hosts.comfyui import CaptionFolder

    model, processor = random_blip("tiny")
    model.save_pretrained(tmp_path / "blip")
    processor.save_pretrained(tmp_path / "blip")
    folder = make_dataset(tmp_path / "imgs", count=3)
    for caption in folder.glob("*.txt"):
        caption.unlink()
    count, preview = CaptionFolder().caption(str(folder), prefix="inkwash", existing="keep", output="txt",
                                             model=str(tmp_path / "blip"), num_beams=1, batch_size=2)
    assert count == 3 and preview.count("inkwash, ") == 3
    assert CaptionFolder.IS_CHANGED() != CaptionFolder.IS_CHANGED()


@pytest.mark.parametrize("comfy", ["sdxl"], indirect=True)
def test_train_node_trains_sdxl_with_the_graphs_pooled_text(comfy, dataset):
    from lora_trainer.hosts.comfyui import TrainLora

    TrainLora().train(comfy.model, comfy.clip, comfy.vae, {"train_data_dir": str(dataset), "resolution": 64}, "xl",
                      max_steps=2, lora_rank=4, lora_alpha=4.0, learning_rate=1e-3, batch_size=0,
                      lora_targets="attention", optimizer="adamw", lr_scheduler="constant", seed=1,
                      save_every_n_steps=0, advanced="device: cpu")
    tensors, metadata = read_lora_file(comfy.loras / "xl.safetensors")
    assert metadata["ss_base_model_version"] == "sdxl_base_v1-0"
    assert metadata["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert all(k.startswith("lora_unet_") for k in tensors)


def test_a_failed_copy_into_loras_keeps_the_old_file(comfy, tmp_path, monkeypatch):
    from lora_trainer.errors import HostError
    from lora_trainer.hosts import comfyui

    old = comfy.loras / "kept.safetensors"
    old.write_bytes(b"previous lora")
    new = tmp_path / "new.safetensors"
    new.write_bytes(b"new lora")

    def disk_full(src, dst):
        Path(dst).write_bytes(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("shutil.copyfile", disk_full)
    with pytest.raises(HostError, match="No space left"):
        comfyui.publish(new, "kept")
    assert old.read_bytes() == b"previous lora"
    assert sorted(p.name for p in comfy.loras.iterdir()) == ["kept.safetensors"]
