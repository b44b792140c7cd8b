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


def supported_models() -> types.ModuleType:
    """Stands in for comfy.supported_models: the families and a few of their subclasses, as ComfyUI declares them."""
    module = types.ModuleType("comfy.supported_models")

    def declare(name, base=object, adm=None):
        cls = type(name, (base,), {"unet_config": {"adm_in_channels": adm}})
        setattr(module, name, cls)
        return cls

    sd15, sd20, sdxl = declare("SD15"), declare("SD20"), declare("SDXL", adm=2816)
    declare("SD15_instructpix2pix", sd15)
    declare("SD21UnclipH", sd20, adm=2048)
    for name in ("SSD1B", "Segmind_Vega", "KOALA_700M", "SDXL_instructpix2pix"):
        declare(name, sdxl, adm=2816)
    return module


def model_config(module: types.ModuleType, name: str, in_channels: int = 4):
    """A detected model's config: an instance of the supported_models class with its unet_config filled in."""
    cls = getattr(module, name)
    config = cls()
    config.unet_config = {**cls.unet_config, "in_channels": in_channels}
    return config


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
    mm.get_torch_device = lambda: torch.device("cpu")
    mm.current_loaded_models = []
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
    folder_paths.get_input_directory = lambda: str(tmp_path / "input")
    supported = supported_models()
    package = types.ModuleType("comfy")
    package.model_management, package.utils, package.sd, package.supported_models = mm, utils, sd, supported
    for name, module in {"comfy": package, "comfy.model_management": mm, "comfy.utils": utils, "comfy.sd": sd,
                         "comfy.supported_models": supported, "folder_paths": folder_paths}.items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setitem(sys.modules, "server", None)  # no ComfyUI server to show text under a node (see node_text)

    checkpoint = tiny_state_dict(family)
    host_unet = {k[len(UNET_PREFIX):]: v for k, v in checkpoint.items() if k.startswith(UNET_PREFIX)}
    encoders = DiffusionBackbone.from_file(tiny_checkpoints[family])
    config = model_config(supported, {"sd1": "SD15", "sdxl": "SDXL"}[family])
    scale = {"sd1": 0.18215, "sdxl": 0.13025}[family]
    model = types.SimpleNamespace(model=types.SimpleNamespace(
        model_config=config, diffusion_model=types.SimpleNamespace(state_dict=lambda: host_unet),
        latent_format=types.SimpleNamespace(process_in=lambda x: x * scale, process_out=lambda x: x / scale),
        model_type=types.SimpleNamespace(name="EPS")))

    def encode_from_tokens(tokens, return_pooled=False):
        cond = encoders.encode_prompts([tokens])
        return cond["hidden"], cond.get("pooled", torch.zeros(1, 64))

    clip = types.SimpleNamespace(tokenize=lambda text: text, encode_from_tokens=encode_from_tokens)
    vae = types.SimpleNamespace(first_stage_model=encoders.vae,  # comfy.sd.VAE keeps its module there
        encode=lambda pixels: encoders.vae.encode(pixels.movedim(-1, 1) * 2 - 1).latent_dist.mean,
        decode=lambda latents: ((encoders.vae.decode(latents).sample + 1) / 2).clamp(0, 1).movedim(1, -1))
    return types.SimpleNamespace(state=state, loras=loras, model=model, clip=clip, vae=vae, host_unet=host_unet,
                                 supported=supported, encoders=encoders)


def test_node_classes_follow_comfyuis_interface():
    package = importlib.import_module("lora_trainer.hosts.comfyui")
    assert set(package.NODE_CLASS_MAPPINGS) == set(package.NODE_DISPLAY_NAME_MAPPINGS)
    for node_id, cls in package.NODE_CLASS_MAPPINGS.items():
        assert node_id.startswith("LoraTrainer")
        assert cls.CATEGORY == "LoRA Trainer" and callable(getattr(cls(), cls.FUNCTION))
        assert len(cls.RETURN_TYPES) == len(cls.RETURN_NAMES)
        if cls.__name__ == "TestLoraGrid":
            continue  # lists ComfyUI's loras folder: checked with the fake folder_paths below
        inputs = cls.INPUT_TYPES()
        assert inputs.pop("hidden", {}) in ({}, {"unique_id": "UNIQUE_ID"})
        for group in inputs.values():
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
    output = TrainLora().train(
        comfy.model, comfy.clip, comfy.vae, data, "../../ink wash", max_steps=3, lora_rank=4, lora_alpha=4.0,
        learning_rate=1e-3, batch_size=0, lora_targets="attention_ff", optimizer="adamw", lr_scheduler="constant",
        seed=1, save_every_n_steps=0, advanced="device: cpu\nlog_every_n_steps: 1")
    model, clip, name, plot = output["result"]
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


def train(comfy, data: dict, name: str = "run", **options):
    """TrainLora on the fake graph with quick settings; `options` override widget values."""
    from lora_trainer.hosts.comfyui import TrainLora

    values = {"max_steps": 2, "lora_rank": 4, "lora_alpha": 4.0, "learning_rate": 1e-3, "batch_size": 0,
              "lora_targets": "attention", "optimizer": "adamw", "lr_scheduler": "constant", "seed": 1,
              "save_every_n_steps": 0, "advanced": "device: cpu"}
    values.update(options)
    return TrainLora().train(comfy.model, comfy.clip, comfy.vae, data, name, **values)


def fresh_values(cls: type) -> dict:
    """The widget values of a node just dropped onto the canvas, as the frontend picks them.

    A number, text or switch takes the spec's default; a choice its default, or the first choice without one.
    """
    values = {}
    for name, spec in cls.INPUT_TYPES()["required"].items():
        options = spec[1] if len(spec) > 1 else {}
        if isinstance(spec[0], list):
            values[name] = options["default"] if options.get("default") is not None else spec[0][0]
        elif spec[0] in WIDGET_TYPES:
            values[name] = options.get("default")
    return values


WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN")
CONTROL_MODES = ["fixed", "increment", "decrement", "randomize"]


def frontend_widgets(cls: type) -> list[tuple[str, tuple]]:
    """The widgets the frontend makes for a node, in order: one per widget input, and a 'control after generate'
    combo after an INT named seed/noise_seed or one whose spec asks for it."""
    inputs = cls.INPUT_TYPES()
    widgets = []
    for name, spec in [*inputs["required"].items(), *inputs.get("optional", {}).items()]:
        if not (isinstance(spec[0], list) or spec[0] in WIDGET_TYPES):
            continue
        widgets.append((name, spec))
        options = spec[1] if len(spec) > 1 else {}
        control = options.get("control_after_generate")
        if spec[0] == "INT" and (control if control is not None else name in ("seed", "noise_seed")):
            widgets.append(("control_after_generate", (CONTROL_MODES, {"default": control})))
    return widgets


def test_a_fresh_train_node_resolves_to_the_command_lines_defaults():
    from lora_trainer.config import make_config, resolve
    from lora_trainer.hosts.comfyui import DATASET_WIDGETS, TRAIN_WIDGETS, DatasetFromFolder, TrainLora, _values

    specs = TrainLora.INPUT_TYPES()["required"]
    for name in ("optimizer", "lr_scheduler"):
        assert specs[name][0][0] == specs[name][1]["default"] == "preset", name
    names = TRAIN_WIDGETS + DATASET_WIDGETS
    fresh = _values(names, {**fresh_values(DatasetFromFolder), **fresh_values(TrainLora)})
    for family in ("sd1", "sd2", "sdxl"):
        node = resolve(make_config({"train_data_dir": "data", **fresh}), family)
        command_line = resolve(make_config({"train_data_dir": "data"}), family)
        assert {n: getattr(node, n) for n in names} == {n: getattr(command_line, n) for n in names}, family


def test_example_workflow_fits_the_widgets_the_frontend_makes():
    import json

    from lora_trainer.hosts.comfyui import NODE_CLASS_MAPPINGS

    workflow = json.loads((ROOT / "example_workflows" / "train_lora_from_folder.json").read_text())
    ours = [node for node in workflow["nodes"] if node["type"] in NODE_CLASS_MAPPINGS]
    assert {node["type"] for node in ours} == {"LoraTrainerDatasetFromFolder", "LoraTrainerTrainLora"}
    for node in ours:
        widgets = frontend_widgets(NODE_CLASS_MAPPINGS[node["type"]])
        assert len(node["widgets_values"]) == len(widgets), node["type"]
        for (name, spec), value in zip(widgets, node["widgets_values"]):
            options = spec[1] if len(spec) > 1 else {}
            if isinstance(spec[0], list):
                assert value in spec[0], name
            elif spec[0] == "INT":
                assert isinstance(value, int) and options["min"] <= value <= options["max"], name
            elif spec[0] == "FLOAT":
                assert isinstance(value, (int, float)) and options["min"] <= value <= options["max"], name
            else:
                assert isinstance(value, {"STRING": str, "BOOLEAN": bool}[spec[0]]), name
        values = dict(zip([name for name, _ in widgets], node["widgets_values"]))
        if "seed" in values:
            assert values["control_after_generate"] == "fixed"  # the same LoRA each time it is queued


def test_train_nodes_seed_control_starts_at_fixed():
    from lora_trainer.hosts.comfyui import TrainLora

    widgets = dict(frontend_widgets(TrainLora))
    assert widgets["control_after_generate"][1]["default"] == "fixed"
    assert "fixed" in widgets["seed"][1]["tooltip"]


def test_relative_dataset_folder_is_read_from_comfyuis_input_folder(comfy, tmp_path, monkeypatch):
    from conftest import make_dataset

    from lora_trainer.errors import DatasetError
    from lora_trainer.hosts.comfyui import CaptionFolder, DatasetFromFolder

    make_dataset(tmp_path / "input" / "ink", count=2)
    elsewhere = tmp_path / "elsewhere"
    make_dataset(elsewhere / "ink", count=3)
    monkeypatch.chdir(elsewhere)  # a folder of that name beside the process must not be picked instead
    options = {"resolution": 64, "enable_buckets": True, "repeats": 1, "trigger_word": "", "shuffle_captions": False,
               "keep_tokens": 1, "caption_dropout": 0.0, "flip_aug": False}
    (data,) = DatasetFromFolder().make("ink", **options)
    assert data["train_data_dir"] == str(tmp_path / "input" / "ink")
    with pytest.raises(DatasetError, match=f"looked for {tmp_path / 'input' / 'missing'}.*ComfyUI's input folder"):
        DatasetFromFolder().make("missing", **options)
    with pytest.raises(DatasetError, match="Set 'folder'"):
        DatasetFromFolder().make("  ", **options)
    with pytest.raises(DatasetError, match=f"looked for {tmp_path / 'input' / 'missing'}"):
        CaptionFolder().caption("missing", prefix="", existing="keep", output="txt", model="unused")


def test_same_seed_gives_the_same_lora_whatever_drew_random_numbers_before(comfy, dataset):
    """ComfyUI before 0.3.43 samples the VAE's latents with the global generator, which KSampler reseeds."""
    comfy.vae.encode = lambda pixels: comfy.encoders.vae.encode(pixels.movedim(-1, 1) * 2 - 1).latent_dist.sample()
    data = {"train_data_dir": str(dataset), "resolution": 64}
    loras = []
    for before in (1, 2):
        torch.manual_seed(before)  # what a sampler that ran before in the same process leaves behind
        train(comfy, data, "again", seed=7)
        loras.append(read_lora_file(comfy.loras / "again.safetensors")[0])
    assert loras[0].keys() == loras[1].keys()
    assert all(torch.equal(loras[0][k], loras[1][k]) for k in loras[0])


def test_a_lora_already_on_the_model_is_left_out_of_training_and_said(comfy, dataset, caplog):
    class Patcher:
        def __init__(self, patches):
            self.patches, self.patches_uuid = patches, "old"

    encoded_by = []
    clip = comfy.clip

    def clone():
        copy = types.SimpleNamespace(**vars(clip))
        copy.patcher = Patcher(dict(clip.patcher.patches))
        copy.encode_from_tokens = lambda tokens, return_pooled=False: (
            encoded_by.append(len(copy.patcher.patches)) or clip.encode_from_tokens(tokens, return_pooled))
        return copy

    data = {"train_data_dir": str(dataset), "resolution": 64}
    plain = train(comfy, data, "plain")["result"]
    clip.patcher, clip.clone = Patcher({"te.q": [1]}), clone
    comfy.model.patches = {"unet.q": [1], "unet.k": [1]}
    with caplog.at_level("WARNING"):
        output = train(comfy, data, "stacked")
    assert "already has a LoRA applied (2 UNet and 1 text encoder weights patched" in caplog.text
    assert "already has a LoRA applied" in output["ui"]["text"][0]
    assert encoded_by and set(encoded_by) == {0}  # captions went through the CLIP without its LoRA
    assert output["result"][0][1] is comfy.model and output["result"][1][1] is clip  # the outputs keep both LoRAs
    one = read_lora_file(comfy.loras / "plain.safetensors")[0]
    two = read_lora_file(comfy.loras / "stacked.safetensors")[0]
    assert all(torch.equal(one[k], two[k]) for k in one) and plain[2] == "plain.safetensors"


@pytest.mark.parametrize("comfy", ["sdxl"], indirect=True)
def test_sdxl_variants_train_as_sdxl_and_other_inputs_are_refused(comfy, dataset):
    from lora_trainer.errors import HostError
    from lora_trainer.hosts.comfyui import model_family

    comfy.model.model.model_config = model_config(comfy.supported, "Segmind_Vega")
    train(comfy, {"train_data_dir": str(dataset), "resolution": 64}, "vega", optimizer="preset", lr_scheduler="preset")
    metadata = read_lora_file(comfy.loras / "vega.safetensors")[1]
    assert metadata["ss_base_model_version"] == "sdxl_base_v1-0"
    assert metadata["ss_lr_scheduler"] == "cosine" and metadata["ss_optimizer"].startswith("adamw")  # sdxl preset
    for name in ("SSD1B", "KOALA_700M", "SDXL"):
        comfy.model.model.model_config = model_config(comfy.supported, name)
        assert model_family(comfy.model) == "sdxl"
    for name, channels in (("SDXL_instructpix2pix", 8), ("SDXL", 9), ("SD15_instructpix2pix", 8), ("SD21UnclipH", 4)):
        comfy.model.model.model_config = model_config(comfy.supported, name, channels)
        with pytest.raises(HostError, match=name):
            model_family(comfy.model)


def test_output_name_never_leaves_the_loras_or_output_folder(comfy, dataset, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path / "models")
    before = set(tmp_path.parent.rglob("*"))
    output = train(comfy, {"train_data_dir": str(dataset), "resolution": 64}, "../../../escape/x",
                   save_every_n_steps=1, advanced=f"device: cpu\noutput_name: ../up\noutput_dir: {tmp_path / 'elsewhere'}")
    written = {p for p in set(tmp_path.parent.rglob("*")) - before if p.is_file()}
    allowed = (comfy.loras, tmp_path / "output" / "lora_trainer" / "x")
    assert written and all(any(p.is_relative_to(folder) for folder in allowed) for p in written), written
    assert output["result"][2] == "x.safetensors"
    assert "The name '../../../escape/x' was changed to 'x'" in output["ui"]["text"][0]
    assert "Predicted peak GPU memory" in output["ui"]["text"][0]  # without ComfyUI's server: only not shown live


@pytest.fixture
def node_text(monkeypatch) -> list[tuple[str, str]]:
    """Stands in for ComfyUI's server module: the (text, node id) pairs sent to show under a running node."""
    shown = []
    server = types.ModuleType("server")
    instance = types.SimpleNamespace(client_id="tab", send_progress_text=lambda text, node_id, sid=None: shown.append(
        (text, node_id)))
    server.PromptServer = types.SimpleNamespace(instance=instance)
    monkeypatch.setitem(sys.modules, "server", server)
    return shown


def test_check_memory_node_shows_the_train_nodes_plan_and_moves_nothing(comfy, dataset, node_text):
    from lora_trainer.hosts.comfyui import MemoryPlan, TrainLora

    assert MemoryPlan.INPUT_TYPES() == TrainLora.INPUT_TYPES()
    data = {"train_data_dir": str(dataset), "resolution": 64}
    before = dict(comfy.host_unet)
    output = MemoryPlan().plan(comfy.model, comfy.clip, comfy.vae, data, "planned", unique_id="5", max_steps=2,
                               lora_rank=4, lora_alpha=4.0, learning_rate=1e-3, batch_size=0, lora_targets="attention",
                               optimizer="adamw", lr_scheduler="constant", seed=1, save_every_n_steps=0,
                               advanced="device: cpu")
    plan = output["result"][0]
    assert plan.startswith("Predicted peak GPU memory of this run (4 images, 64 px, batch 2, rank 4,")
    assert output["ui"]["text"] == [plan] and node_text == [(plan, "5")]
    assert comfy.state["unloads"] == 0 and not list(comfy.loras.iterdir())
    assert all(comfy.host_unet[k] is v for k, v in before.items())  # the MODEL's tensors, not copies or moved ones

    node_text.clear()
    train(comfy, data, "planned", unique_id="9")
    assert node_text[0] == (plan, "9")  # the Train node shows the same plan first


def test_train_node_shows_the_runs_warnings_under_it_and_lists_them_at_the_end(comfy, dataset, node_text, monkeypatch):
    from lora_trainer.events import Event
    from lora_trainer.train import loop

    real = loop.train_lora

    def slowed(config, *, listeners, **options):
        for listener in listeners:
            listener(Event("warning", 5, 10, {"message": "Steps slowed down 4x: the GPU's memory is spilling."}))
        return real(config, listeners=listeners, **options)

    monkeypatch.setattr(loop, "train_lora", slowed)
    output = train(comfy, {"train_data_dir": str(dataset), "resolution": 64}, "warned", unique_id="3")
    texts = [text for text, node in node_text if node == "3"]
    assert texts[0].startswith("Predicted peak GPU memory")
    assert texts[1].startswith("Warning: Steps slowed down 4x") and texts[0] in texts[1]
    report = output["ui"]["text"][0]
    assert report.startswith("Saved ") and "Warning: Steps slowed down 4x" in report and texts[0] in report
    assert texts[-1] == report
