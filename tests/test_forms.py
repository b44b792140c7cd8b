"""One form description of the config, rendered by every front door, and a config that checks itself."""

from __future__ import annotations

import dataclasses
import sys
import types
from pathlib import Path

import pytest

from lora_trainer.config import CaptionConfig, TrainConfig, is_optional, lora_name, make_config, resolve
from lora_trainer.errors import ConfigError
from lora_trainer.forms import PRESET, config_values, form_specs
from lora_trainer.hosts.app import StandaloneHost
from lora_trainer.jobs import Trainer

FAMILIES = ("sd1", "sd2", "sdxl")
REQUIRED = {"base_model": "models/base.safetensors", "train_data_dir": "data/ink"}


def command_line(family: str) -> TrainConfig:
    """What `train --set base_model=... --set train_data_dir=...` trains with."""
    return resolve(make_config(REQUIRED), family)


def assert_fresh_form_trains_like_the_command_line(door: str, shown: dict) -> None:
    values = {**config_values(shown), **REQUIRED}
    for family in FAMILIES:
        assert resolve(make_config(values), family) == command_line(family), (door, family)


# -- the config checks itself ------------------------------------------------------------------------


def test_an_invalid_config_cannot_be_built():
    with pytest.raises(ConfigError, match="'lora_rank' must be between 1 and 1024; got -1"):
        TrainConfig(lora_rank=-1)
    config = command_line("sd1")
    with pytest.raises(ConfigError, match="'resolution' must be between 64 and 4096; got 1"):
        dataclasses.replace(config, resolution=1)
    with pytest.raises(ConfigError, match="'optimizer' must be one of adamw"):
        dataclasses.replace(config, optimizer="sgd")
    with pytest.raises(ConfigError, match="'seed' needs a value"):
        TrainConfig(seed=None)
    with pytest.raises(ConfigError, match="'num_beams' must be between 1 and 16"):
        CaptionConfig(num_beams=0)
    assert TrainConfig(lora_rank="8", sample_prompts="a cat\nan owl").lora_rank == 8  # typed values are coerced
    assert TrainConfig(sample_prompts="a cat\nan owl").sample_prompts == ["a cat", "an owl"]


def test_a_resolved_config_is_a_valid_config_for_every_learning_rate():
    fast = resolve(make_config({**REQUIRED, "learning_rate": 10.0}), "sd1")
    assert fast.text_encoder_lr == 5.0  # half the UNet's, inside its own bounds


def test_annotations_say_which_keys_may_be_none():
    for cls in (TrainConfig, CaptionConfig):
        for f in dataclasses.fields(cls):
            assert is_optional(f) == (f.default is None), f.name
    assert {f.name: f.type for f in dataclasses.fields(TrainConfig)}["lora_rank"] == "int | None"


# -- the form description ------------------------------------------------------------------------------


def test_specs_carry_the_preset_rule_once():
    specs = form_specs(TrainConfig)
    assert specs["optimizer"].choices[0] == specs["optimizer"].default == PRESET
    assert specs["optimizer"].help.endswith(" 'preset' = the model family's choice.")
    assert (specs["lora_rank"].default, specs["lora_rank"].min, specs["lora_rank"].max) == (0, 0, 1024)
    assert specs["lora_rank"].help.endswith(" 0 = the model family's preset.")
    assert (specs["repeats"].default, specs["repeats"].min) == (1, 1)  # a fixed default keeps its bounds
    assert specs["sample_prompts"].kind == "lines" and specs["sample_prompts"].default == ""
    assert specs["max_token_length"].kind == "choice" and specs["max_token_length"].default in \
        specs["max_token_length"].choices
    for cls in (TrainConfig, CaptionConfig):
        labels = [spec.label for spec in form_specs(cls).values()]
        assert len(labels) == len(set(labels)), cls.__name__
        for spec in form_specs(cls).values():
            assert spec.help.count("preset") <= 2 and spec.help.count(" 0 = ") <= 1, spec.name
            if spec.kind == "choice":
                assert spec.default in spec.choices, spec.name
            if spec.kind in ("int", "float"):
                assert spec.min <= spec.default <= spec.max, spec.name


def test_widget_values_become_config_values():
    values = config_values({"lora_rank": 0, "learning_rate": 0.0, "optimizer": PRESET, "epochs": 4.0, "resolution": None,
                            "max_token_length": " 150 ", "sample_prompts": "a cat\n", "text_encoder_lr": 0,
                            "max_steps": 0, "trigger_word": " ink "})
    assert values == {"epochs": 4, "max_token_length": "150", "sample_prompts": "a cat\n", "max_steps": 0,
                      "trigger_word": " ink "}


# -- every front door renders it ------------------------------------------------------------------------


def _gradio_form(blocks) -> dict:
    """The training keys' widgets of a built tab, as the page first shows them."""
    import gradio as gr

    specs = form_specs(TrainConfig)
    shown = {}
    for block in blocks.blocks.values():
        name = (getattr(block, "elem_id", None) or "").removeprefix("lora_trainer_")
        if name not in specs or not isinstance(block, gr.components.Component):
            continue
        if isinstance(block, gr.Dropdown):
            choices = [c[1] if isinstance(c, (tuple, list)) else c for c in block.choices]
            assert block.value in choices, name
            assert specs[name].kind != "choice" or choices == [str(c) for c in specs[name].choices], name
        shown[name] = block.value
    return shown


@pytest.mark.slow  # the default run's time budget; CI runs it with -m slow
def test_the_standalone_apps_fresh_form_trains_like_the_command_line(tmp_path):
    pytest.importorskip("gradio")
    from lora_trainer.ui.blocks import build_blocks

    host = StandaloneHost(tmp_path / "loras", tmp_path / "out")
    shown = _gradio_form(build_blocks(host, Trainer(host)))
    assert {"optimizer", "lr_scheduler", "lora_rank", "output_name", "sample_prompts"} <= set(shown)
    assert (shown["optimizer"], shown["lora_rank"]) == (PRESET, 0)
    assert_fresh_form_trains_like_the_command_line("standalone app", shown)


@pytest.fixture
def webui_settings(monkeypatch):
    """Stand-ins for the WebUI's modules.shared: its options and OptionInfo as the settings page reads them."""

    class OptionInfo:
        def __init__(self, default=None, label="", component=None, component_args=None, section=None, **_):
            self.default, self.label, self.component_args, self.section = default, label, component_args, section

    infos: dict = {}
    opts = types.SimpleNamespace(data={})

    def add_option(key, info):
        infos[key] = info
        opts.data.setdefault(key, info.default)

    opts.add_option = add_option
    shared = types.SimpleNamespace(opts=opts, OptionInfo=OptionInfo)
    package = types.ModuleType("modules")
    package.shared = shared
    monkeypatch.setitem(sys.modules, "modules", package)
    monkeypatch.setitem(sys.modules, "modules.shared", shared)
    return infos


def test_the_webui_settings_and_tab_show_the_configs_defaults(webui_settings):
    pytest.importorskip("gradio")
    from lora_trainer.hosts import a1111
    from lora_trainer.ui.blocks import build_blocks

    a1111.on_ui_settings()
    specs = form_specs(TrainConfig)
    for name in a1111.SETTINGS:
        info = webui_settings[f"lora_trainer_{name}"]
        spec = specs[name]
        assert info.default == spec.default and info.label == f"Default for {spec.label}: {spec.help}"
        assert (info.component_args["minimum"], info.component_args["maximum"]) == (spec.min, spec.max)
    host = a1111.WebUIHost()
    assert host.default_values() == {name: specs[name].default for name in a1111.SETTINGS}
    host.model_line = lambda: "model"
    host.lora_dir = lambda: Path("models/Lora")
    shown = _gradio_form(build_blocks(host, Trainer(host)))
    assert not set(host.hidden_keys) & set(shown)
    assert_fresh_form_trains_like_the_command_line("WebUI tab", shown)


def _comfy_fresh(cls) -> dict:
    """A node's widget values as the frontend first sets them (a choice without a default: its first entry)."""
    values = {}
    for name, spec in cls.INPUT_TYPES()["required"].items():
        options = spec[1] if len(spec) > 1 else {}
        if isinstance(spec[0], list):
            assert options.get("default") in spec[0], (cls.__name__, name)
            values[name] = options["default"]
        elif spec[0] in ("INT", "FLOAT", "STRING", "BOOLEAN"):
            values[name] = options["default"]
    return values


def test_a_fresh_comfyui_graph_trains_like_the_command_line():
    from lora_trainer.hosts.comfyui import CaptionFolder, DatasetFromFolder, DatasetFromImages, TrainLora

    for cls in (CaptionFolder, DatasetFromImages):
        _comfy_fresh(cls)  # every choice's default is one of its choices
    dataset, node = _comfy_fresh(DatasetFromFolder), _comfy_fresh(TrainLora)
    shown = {k: v for k, v in {**dataset, **node}.items() if k in form_specs(TrainConfig)}
    assert shown["output_name"] == "" and shown["optimizer"] == shown["lr_scheduler"] == PRESET
    assert_fresh_form_trains_like_the_command_line("ComfyUI", shown)


# -- one name for an unnamed LoRA ------------------------------------------------------------------------


class _NoRunHost(StandaloneHost):
    def run(self, config, listeners, cancel, job_id=""):
        self.config = config
        return types.SimpleNamespace(lora_file=None, interrupted=True)


def test_an_unnamed_lora_gets_the_same_name_at_every_door(tmp_path, dataset):
    host = _NoRunHost(tmp_path / "loras", tmp_path / "out")
    trainer = Trainer(host)
    job = trainer.start({"base_model": "base.safetensors", "train_data_dir": str(dataset)})
    trainer.wait(30)
    cli = resolve(make_config({"base_model": "base.safetensors", "train_data_dir": str(dataset)}), "sd1")
    assert job.name == host.config.output_name == cli.output_name == lora_name("", str(dataset)) == \
        f"{dataset.name}_lora"
    assert host.config.output_dir == str(tmp_path / "out" / job.name) and not job.notice
    assert lora_name("  ", "data/ink wash/") == "ink wash_lora" and lora_name("a/../b?", "x") == "b_"
