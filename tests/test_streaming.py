"""Block streaming: the transformer families train the same LoRA, bit for bit, when their blocks' frozen weights
come through two shared buffers instead of each sitting in its own place."""

from __future__ import annotations

import importlib
import inspect

import diffusers
import pytest
import torch
from conftest import transformer_config

from lora_trainer.backbones.flow import repeated_blocks
from lora_trainer.backbones.flux import FluxBackbone
from lora_trainer.backbones.tiny_flow import build_tiny_flux
from lora_trainer.errors import ConfigError, LoraTrainerError
from lora_trainer.lora.kohya import read_lora_file
from lora_trainer.memory.fp8 import Fp8Linear
from lora_trainer.memory.streaming import BlockStreamer
from lora_trainer.train.loop import train_lora

# (tiny builder, backbone class) per family, imported when asked: klein and Z-Image need newer diffusers
FAMILIES = {"flux1": ("tiny_flow:build_tiny_flux", "flux:FluxBackbone"),
            "zimage": ("tiny_zimage:build_tiny_zimage", "zimage:ZImageBackbone"),
            "klein4b": ("tiny_flux2:build_tiny_klein", "flux2:KleinBackbone")}
# streaming needs checkpointing, which a flow transformer gets from diffusers 0.32 on (our checkpoint function)
needs_checkpointing = pytest.mark.skipif(
    "gradient_checkpointing_func" not in inspect.signature(diffusers.ModelMixin.enable_gradient_checkpointing).parameters,
    reason="checkpointing a diffusion transformer needs diffusers >= 0.32")


def family_parts(family: str) -> tuple:
    """The family's tiny builder and backbone class; the test is skipped where this diffusers lacks the family."""
    try:
        parts = tuple(getattr(importlib.import_module(f"lora_trainer.backbones.{module}"), name)
                      for module, name in (entry.split(":") for entry in FAMILIES[family]))
        if family == "zimage":
            importlib.import_module("lora_trainer.backbones.zimage").zimage_classes()
    except (ImportError, AttributeError, LoraTrainerError) as exc:
        pytest.skip(f"{family} needs newer diffusers/transformers: {exc}")
    return parts


def trained(family, checkpoint, dataset, out, **options):
    """The LoRA a 3-step checkpointed run gives, and the backbone it ran on."""
    config = transformer_config(checkpoint, dataset, out, max_steps=3, gradient_checkpointing=True, seed=3, **options)
    backbone = family_parts(family)[1].load(config, None)
    result = train_lora(config, backbone=backbone)
    return read_lora_file(result.lora_file)[0], backbone


def shares_buffers(stream: BlockStreamer) -> bool:
    """Whether every streamed block's frozen tensors are views into one of the two slots."""
    slots = {buffer.untyped_storage().data_ptr() for buffer in stream.buffers}
    assert len(slots) == stream.slots
    return all(tensor.untyped_storage().data_ptr() in slots
               for block in stream.blocks for tensor in [*block.parameters(), *block.buffers()]
               if not tensor.requires_grad)


SLOW = pytest.mark.slow  # the default run's time budget; CI runs it with -m slow


@pytest.mark.parametrize("family", [pytest.param(family, marks=() if family == "flux1" else SLOW) for family in FAMILIES])
@needs_checkpointing
def test_streamed_blocks_train_the_same_lora_bit_for_bit(family, dataset, tmp_path, monkeypatch):
    build, backbone_class = family_parts(family)
    checkpoint = build(tmp_path / "model")
    plain, _ = trained(family, checkpoint, dataset, tmp_path / "plain")
    total = len(repeated_blocks(backbone_class.load(transformer_config(checkpoint, dataset, tmp_path), None).transformer))
    # some blocks (spread out) through the two buffers; every block (99: more than there are) through one buffer,
    # so that the tiny models' few blocks take turns in it, in the forward pass and again in the backward pass
    for count, slots in ((2, 2), (99, 1)):
        monkeypatch.setattr(BlockStreamer, "slots", slots)
        streamed, backbone = trained(family, checkpoint, dataset, tmp_path / f"streamed{count}", stream_blocks=count)
        stream = backbone.run["stream"]
        assert stream.count == min(count, total) and shares_buffers(stream)
        assert streamed.keys() == plain.keys()
        for key in plain:
            assert torch.equal(streamed[key], plain[key]), (count, key)
        assert any(v.abs().max() > 0 for k, v in streamed.items() if "lora_up" in k or "lora_B" in k)


@SLOW
@needs_checkpointing
def test_streaming_holds_fp8_blocks_as_their_bytes(dataset, tmp_path):
    checkpoint = build_tiny_flux(tmp_path / "model")
    plain, _ = trained("flux1", checkpoint, dataset, tmp_path / "plain", base_weights="fp8")
    streamed, backbone = trained("flux1", checkpoint, dataset, tmp_path / "streamed", base_weights="fp8",
                                 stream_blocks=99)
    stream = backbone.run["stream"]
    layers = [m for block in stream.blocks for m in block.modules() if isinstance(m, Fp8Linear)]
    assert layers and all(m.weight.dtype == torch.uint8 and m.scale.dtype == torch.float32 for m in layers)
    assert shares_buffers(stream)
    assert all(torch.equal(streamed[k], plain[k]) for k in plain)


def test_blocks_run_out_of_order_still_get_their_own_weights():
    """A block that runs when its slot holds another block's weights (an order the prefetch did not foresee) has
    its own copied in first."""
    torch.manual_seed(0)
    blocks = [torch.nn.Linear(8, 8) for _ in range(5)]
    expected = [block.weight.detach().clone() for block in blocks]
    for block in blocks:
        block.requires_grad_(False)
    stream = BlockStreamer(blocks, 5, torch.device("cpu"), torch.float32)
    stream.finish()
    seen = []
    for block in blocks:
        block.register_forward_hook(lambda module, args, out: seen.append(module.weight.clone()))
    order = [0, 3, 1, 4, 4, 2, 0]
    x = torch.ones(1, 8)
    for j in order:
        blocks[j](x)
    assert all(torch.equal(weight, expected[j]) for weight, j in zip(seen, order))
    assert shares_buffers(stream)


def test_streaming_is_refused_without_checkpointing_and_on_the_sd_families(sd1_checkpoint, dataset, tmp_path):
    from conftest import quick_config

    from lora_trainer.backbones.sd import DiffusionBackbone

    checkpoint = build_tiny_flux(tmp_path / "model")
    with pytest.raises(ConfigError, match="gradient_checkpointing: true"):
        FluxBackbone.read_data(transformer_config(checkpoint, dataset, tmp_path / "a", stream_blocks=4))
    with pytest.raises(ConfigError, match="NF4"):
        FluxBackbone.read_data(transformer_config(checkpoint, dataset, tmp_path / "a", stream_blocks=4,
                                                  gradient_checkpointing=True, base_weights="nf4"))
    with pytest.raises(ConfigError, match="diffusion transformers"):
        DiffusionBackbone.read_data(quick_config(sd1_checkpoint, dataset, tmp_path / "b", stream_blocks=4,
                                                 gradient_checkpointing=True))


def test_an_out_of_memory_error_names_streaming_for_the_transformer_families_only(sd1_checkpoint, dataset, tmp_path):
    from conftest import quick_config

    from lora_trainer.config import resolve
    from lora_trainer.memory.levers import levers_off

    flux = resolve(transformer_config(tmp_path, dataset, tmp_path, stream_blocks=8, gradient_checkpointing=True),
                   "flux1")
    assert any(lever.startswith("stream_blocks: N (more than 8)") for lever in levers_off(flux))
    assert not any("stream_blocks" in lever for lever in levers_off(flux, in_host=True))
    sd = resolve(quick_config(sd1_checkpoint, dataset, tmp_path), "sd1")
    assert not any("stream_blocks" in lever for lever in levers_off(sd))


@SLOW
@needs_checkpointing
def test_previews_render_the_same_with_streamed_blocks(dataset, tmp_path, monkeypatch):
    """A preview runs the transformer without gradients, between training steps: the same image when its blocks take
    turns in one buffer."""
    import numpy as np
    from PIL import Image

    checkpoint = build_tiny_flux(tmp_path / "model")
    monkeypatch.setattr(BlockStreamer, "slots", 1)
    images = []
    for count in (0, 99):
        config = transformer_config(checkpoint, dataset, tmp_path / f"run{count}", max_steps=2, seed=3,
                                    gradient_checkpointing=True, stream_blocks=count, sample_prompts=["zkblob"],
                                    sample_every_n_steps=1)
        result = train_lora(config, backbone=FluxBackbone.load(config, None))
        assert len(result.samples) >= 2
        images.append([np.asarray(Image.open(path)) for path in result.samples])
    assert all(np.array_equal(a, b) for a, b in zip(*images))


def test_a_text_encoder_too_large_for_the_gpu_encodes_the_same_with_its_layers_on_demand(tmp_path, monkeypatch):
    from lora_trainer.backbones import flow
    from lora_trainer.memory.streaming import LayersOnDemand

    config = transformer_config(build_tiny_flux(tmp_path / "model"), tmp_path, tmp_path / "out")
    backbone = FluxBackbone.load(config, None)
    backbone.run["dtype"] = torch.float32
    t5 = backbone.text_encoders[1]
    before = {name: p.data_ptr() for name, p in t5.named_parameters()}
    plain = backbone._encode_once(["zkblob, a red square", ""], torch.device("cpu"))
    seen = []
    monkeypatch.setattr(flow, "text_placement", lambda encoders, budget: [False, True])
    monkeypatch.setattr(LayersOnDemand, "_move", lambda self, tensors, move=LayersOnDemand._move: (
        seen.append(len(tensors)), move(self, tensors)))
    on_demand = backbone._encode_once(["zkblob, a red square", ""], torch.device("cpu"))
    assert len(seen) > len(t5.encoder.block)  # the rest of T5 once, then each layer as it ran
    for text in plain:
        for key in plain[text]:
            assert torch.equal(plain[text][key], on_demand[text][key])
    assert {name: p.data_ptr() for name, p in t5.named_parameters()} == before  # its own tensors back
