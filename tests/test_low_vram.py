"""Low VRAM: frozen weights held in fp8 (quantized on load, or kept as an fp8 file stores them), and what a run
trained so gives."""

from __future__ import annotations

import importlib.util
import math
import re
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import quick_config, transformer_config
from safetensors.torch import load_file, save_file

from lora_trainer.backbones.flux import FluxBackbone
from lora_trainer.backbones.sd import DiffusionBackbone
from lora_trainer.backbones.tiny_flow import build_tiny_flux
from lora_trainer.config import resolve
from lora_trainer.errors import CheckpointError, ConfigError
from lora_trainer.lora.kohya import read_lora_file
from lora_trainer.memory import with_fp8_compute
from lora_trainer.memory.fp8 import FP8, Fp8Linear, compute_in_fp8, quantize
from lora_trainer.train.loop import train_lora


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    return build_tiny_flux(tmp_path_factory.mktemp("flux"))


def base_layer(module: torch.nn.Module) -> torch.nn.Module:
    """The frozen layer under a LoRA wrapper (or the layer itself)."""
    return module.get_base_layer() if hasattr(module, "get_base_layer") else module


def saved_into(saved: list) -> callable:
    """A saved-tensors pack hook that records what autograd keeps for the backward pass."""
    def pack(tensor):
        saved.append(tensor)
        return tensor
    return pack


def test_an_fp8_layer_multiplies_with_its_dequantized_weight_and_saves_only_its_bytes():
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 48)
    layer = Fp8Linear.of(linear, torch.device("cpu"))
    assert layer.weight.dtype == torch.uint8 and layer.scale.shape == (48, 1)  # one scale per row
    torch.testing.assert_close(layer.dequantized(), linear.weight, rtol=0.07, atol=1e-3)
    for module, keeps_input in ((linear, True), (layer, False)):  # a plain layer saves its input, ours only its bytes
        x = torch.randn(3, 5, 64, requires_grad=True)
        saved: list[torch.Tensor] = []
        with torch.autograd.graph.saved_tensors_hooks(saved_into(saved), lambda t: t):
            out = module(x)
        kept = sorted((str(t.dtype), t.numel()) for t in saved)
        if keeps_input:
            assert ("torch.float32", x.numel()) in kept
        else:
            assert kept == [("torch.float32", 48), ("torch.float8_e4m3fn", 48 * 64)]
    grad = torch.randn_like(out)
    out.backward(grad)
    weight = layer.dequantized()
    torch.testing.assert_close(out, F.linear(x, weight, linear.bias), rtol=0, atol=0)
    torch.testing.assert_close(x.grad, grad @ weight, rtol=1e-6, atol=1e-6)
    compiled_x = x.detach().requires_grad_()
    torch.compile(layer, backend="aot_eager")(compiled_x).backward(grad)  # the compiler sees two opaque ops
    torch.testing.assert_close(compiled_x.grad, x.grad, rtol=0, atol=0)


def test_an_fp8_compute_layer_multiplies_in_fp8_close_to_its_weight_and_keeps_the_same_backward():
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 48)
    layer = Fp8Linear.of(linear, torch.device("cpu"))
    assert compute_in_fp8([torch.nn.Sequential(layer, Fp8Linear.of(torch.nn.Linear(10, 8), torch.device("cpu")))]) \
        == 48 * 64  # a shape torch._scaled_mm does not take (10 inputs) keeps the bf16 matmul
    x = torch.randn(3, 5, 64, requires_grad=True)
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(saved_into(saved), lambda t: t):
        out = layer(x)
    assert sorted((str(t.dtype), t.numel()) for t in saved) == [("torch.float32", 48), ("torch.float8_e4m3fn", 48 * 64)]
    exact = F.linear(x, layer.dequantized(), linear.bias)
    assert not torch.equal(out, exact)  # the input is rounded to fp8 for the matmul ...
    assert (out - exact).abs().max() < 0.05 * exact.abs().max()  # ... to within a few percent of the result
    grad = torch.randn_like(out)
    out.backward(grad)
    torch.testing.assert_close(x.grad, grad @ layer.dequantized(), rtol=1e-6, atol=1e-6)  # the same input gradient
    compiled_x = x.detach().requires_grad_()
    compiled = torch.compile(layer, backend="aot_eager")(compiled_x)
    compiled.backward(grad)
    torch.testing.assert_close(compiled, out, rtol=0, atol=0)
    torch.testing.assert_close(compiled_x.grad, x.grad, rtol=0, atol=0)


def test_fp8_compute_trains_flux_on_an_fp8_base_and_is_refused_where_it_cannot_run(flux, dataset, tmp_path,
                                                                                    monkeypatch):
    loras = {}
    for compute in ("off", "on"):
        config = transformer_config(flux, dataset, tmp_path / compute, max_steps=4, fp8_compute=compute,
                                    base_weights="fp8" if compute == "off" else "auto")
        backbone = FluxBackbone.load(config, None)
        result, loras[compute] = train_and_keep(config, backbone)
        layer = base_layer(backbone.transformer.get_submodule("single_transformer_blocks.0.proj_out"))
        assert isinstance(layer, Fp8Linear) and layer.fp8_matmul is (compute == "on")  # auto became fp8
        assert result.losses and all(math.isfinite(loss) for _, loss in result.losses)
    off, on = loras["off"], loras["on"]
    assert on.keys() == off.keys()
    largest = max(v.abs().max() for v in off.values())
    difference = max((on[k] - off[k]).abs().max() for k in off)
    assert 0 < difference < 0.1 * largest  # it moves the LoRA, a little
    for settings, words in (({"base_weights": "full"}, "base_weights: fp8 (or auto)"),
                            ({"base_weights": "nf4"}, "base_weights: fp8 (or auto)")):
        config = transformer_config(flux, dataset, tmp_path / "refused", fp8_compute="on", **settings)
        with pytest.raises(ConfigError, match=re.escape(words)):
            train_lora(config)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 6))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA GeForce RTX 3090")
    config = transformer_config(flux, dataset, tmp_path / "ampere", fp8_compute="on")
    with pytest.raises(ConfigError, match="RTX 3090 is 8.6"):
        with_fp8_compute(config, torch.device("cuda"))


def test_casting_a_model_moves_the_fp8_bytes_but_never_converts_them():
    layer = Fp8Linear.of(torch.nn.Linear(16, 8), torch.device("cpu"))
    before = layer.weight.clone(), layer.scale.clone()
    model = torch.nn.Sequential(layer).to(torch.bfloat16)
    assert torch.equal(model[0].weight, before[0]) and torch.equal(model[0].scale, before[1])
    assert model[0].scale.dtype == torch.float32 and model[0].bias.dtype == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model(torch.randn(2, 16)).dtype == torch.bfloat16


def test_weights_read_from_fp8_files_get_their_stored_values_back():
    torch.manual_seed(0)
    stored = (torch.randn(32, 16) * 40).to(FP8)
    for scale in (torch.ones(()), torch.tensor(0.0123)):  # a plain fp8 file; ComfyUI's scaled fp8
        as_read = stored.to(torch.bfloat16) * scale.to(torch.bfloat16)
        values, kept = quantize(as_read, scale)
        assert torch.equal(values.view(torch.uint8), stored.view(torch.uint8)) and kept.numel() == 1
    values, kept = quantize(as_read, torch.tensor(0.5))  # a scale that does not reproduce it is not used
    assert kept.shape == (32, 1)


def train_and_keep(config, backbone):
    result = train_lora(config, backbone=backbone)
    return result, read_lora_file(result.lora_file)[0]


def test_sd_trains_on_an_fp8_unet_with_checkpointing_and_the_same_lora_keys(sd1_checkpoint, dataset, tmp_path):
    runs = {}
    for weights in ("full", "fp8"):
        config = quick_config(sd1_checkpoint, dataset, tmp_path / weights, base_weights=weights, max_steps=6,
                              gradient_checkpointing=True, cuda_graphs="on")
        backbone = DiffusionBackbone.load(resolve(config, "sd1"), None)
        runs[weights] = (*train_and_keep(config, backbone), backbone)
    (full, full_lora, _), (fp8, fp8_lora, backbone) = runs["full"], runs["fp8"]
    layers = [m for m in backbone.unet.modules() if isinstance(m, Fp8Linear)]
    assert len(layers) > 10 and all(type(base_layer(m)) is not torch.nn.Linear
                                    for n, m in backbone.unet.named_modules() if n.endswith("attn1.to_q"))
    assert fp8_lora.keys() == full_lora.keys()
    assert all(v.dtype == torch.float32 for v in fp8_lora.values())  # the LoRA trains in full precision
    changed = [k for k in fp8_lora if "lora_up" in k and fp8_lora[k].abs().max() > 0]
    assert changed
    # quantizing the base moves the LoRA a little: within 10% of its largest weight after 6 steps here
    largest = max(v.abs().max() for v in full_lora.values())
    assert max((fp8_lora[k] - full_lora[k]).abs().max() for k in full_lora) < 0.1 * largest
    for (step, a), (_, b) in zip(full.losses, fp8.losses):
        assert abs(a - b) < 0.05 * abs(a) + 1e-3, step


def test_flux_fp8_files_train_on_their_stored_bytes_and_bf16_files_stay_bf16(flux, dataset, tmp_path):
    weights = load_file(str(flux))
    stored, scales = {}, {}
    for key, value in weights.items():
        if key.endswith(".weight") and value.ndim == 2:  # ComfyUI's scaled fp8: a per-tensor scale beside each
            scales[key] = value.abs().max().float() / 448
            stored[key] = (value.float() / scales[key]).to(FP8)
            stored[key.removesuffix(".weight") + ".scale_weight"] = scales[key].reshape(1)
        else:
            stored[key] = value
    fp8_file = flux.with_name("flux1-dev-tiny-fp8-scaled.safetensors")
    save_file({"scaled_fp8": torch.zeros(0, dtype=FP8), **stored}, str(fp8_file))
    for path, weights_setting, held_in_fp8 in ((fp8_file, "auto", True), (fp8_file, "full", False),
                                               (flux, "auto", False), (flux, "fp8", True)):
        config = transformer_config(path, dataset, tmp_path / f"{path.stem}-{weights_setting}", max_steps=2,
                                    base_weights=weights_setting)
        backbone = FluxBackbone.load(config, None)
        result, lora = train_and_keep(config, backbone)
        layer = base_layer(backbone.transformer.get_submodule("single_transformer_blocks.0.proj_out"))
        assert isinstance(layer, Fp8Linear) is held_in_fp8, (path.name, weights_setting)
        assert result.lora_file.is_file() and any(k.endswith("lora_down.weight") for k in lora)
        if held_in_fp8 and path == fp8_file:  # the file's own fp8 values and scale, exactly
            key = "single_blocks.0.linear2.weight"
            assert torch.equal(layer.weight, stored[key].view(torch.uint8))
            assert torch.equal(layer.scale.reshape(()), scales[key])
        if held_in_fp8:
            assert not isinstance(backbone.transformer.x_embedder, Fp8Linear)  # only the repeated blocks


def fails_at(backbone, call: int):
    """Make `backbone`'s UNet run out of GPU memory on its `call`-th prediction, as a too-large step does."""
    calls = {"n": 0}
    original = backbone.predict

    def predict(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == call:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
        return original(*args, **kwargs)

    backbone.predict = predict
    return backbone


def test_running_out_of_memory_keeps_the_steps_done_and_names_the_levers(sd1_checkpoint, dataset, tmp_path):
    from lora_trainer.backbones.checkpoint import UNET_PREFIX
    from lora_trainer.backbones.host import HostBackbone
    from lora_trainer.backbones.tiny import tiny_state_dict
    from lora_trainer.errors import TrainingError

    options = {"max_steps": 5, "batch_size": 2}
    config = quick_config(sd1_checkpoint, dataset, tmp_path / "file", **options)
    backbone = fails_at(DiffusionBackbone.load(resolve(config, "sd1"), None), 4)
    with pytest.raises(TrainingError, match=r"Out of GPU memory at step 4 of 5\. The 3 steps done are saved") as error:
        train_lora(config, backbone=backbone)
    message = str(error.value)
    assert "gradient_checkpointing: true" in message and "batch_size: 1" in message and "train --resume" in message
    saved = sorted((tmp_path / "file" / "checkpoints").glob("step-*"))
    assert [p.name for p in saved] == ["step-00000003"]
    resumed = train_lora(quick_config(sd1_checkpoint, dataset, tmp_path / "file", **options), resume=tmp_path / "file")
    assert resumed.steps == 5 and resumed.lora_file.is_file()

    # a host's model: untouched, and the message does not offer what a host cannot do (base_weights: fp8)
    host_unet = {k[len(UNET_PREFIX):]: v for k, v in tiny_state_dict("sd1").items() if k.startswith(UNET_PREFIX)}
    snapshot = {k: v.clone() for k, v in host_unet.items()}
    encoders = DiffusionBackbone.from_file(sd1_checkpoint)
    host = fails_at(HostBackbone.from_ldm_unet(host_unet, "sd1", encode_images=encoders.encode_images,
                                               encode_prompts=encoders.encode_prompts, name="host"), 1)
    with pytest.raises(TrainingError, match="at step 1 of") as error:
        train_lora(quick_config("", dataset, tmp_path / "host", base_model="", gradient_checkpointing=True), backbone=host)
    assert "base_weights" not in str(error.value) and "saved" not in str(error.value)
    assert all(torch.equal(host_unet[k], snapshot[k]) for k in host_unet)


needs_gguf = pytest.mark.skipif(importlib.util.find_spec("gguf") is None, reason="needs the gguf package")


def q4_k_blocks(rows: int, columns: int, seed: int = 0) -> np.ndarray:
    """Q4_K blocks of random values (gguf-py cannot make K-quants): random bytes with sane fp16 scales."""
    generator = np.random.default_rng(seed)
    blocks = generator.integers(0, 256, size=(rows * columns // 256, 144), dtype=np.uint8)
    scales = np.array([0.01, 0.002], dtype=np.float16).view(np.uint8)  # d and dmin: each block's first 4 bytes
    blocks[:, :4] = scales
    return blocks.reshape(rows, -1)


@needs_gguf
def test_a_gguf_layer_multiplies_with_the_blocks_as_gguf_reads_them_and_saves_only_them():
    from gguf import GGMLQuantizationType as Q
    from gguf import quants

    from lora_trainer.memory.gguf_files import Packed
    from lora_trainer.memory.gguf_weights import GGUFLinear

    torch.manual_seed(0)
    for qtype, data in ((Q.Q8_0, quants.quantize(np.random.default_rng(0).standard_normal((48, 256)).astype(np.float32),
                                                  Q.Q8_0)),
                        (Q.Q4_K, q4_k_blocks(48, 256))):
        reference = torch.from_numpy(quants.dequantize(data, qtype).astype(np.float32))  # gguf-py's own reading
        layer = GGUFLinear(Packed(torch.from_numpy(data), int(qtype), 256), torch.randn(48))
        torch.testing.assert_close(layer.dequantized(), reference, rtol=1e-6, atol=1e-6)
        x = torch.randn(3, 256, requires_grad=True)
        saved: list[torch.Tensor] = []
        with torch.autograd.graph.saved_tensors_hooks(saved_into(saved), lambda t: t):
            out = layer(x)
        assert [(t.dtype, t.shape) for t in saved] == [(torch.uint8, layer.weight.shape)]  # the blocks only
        grad = torch.randn_like(out)
        out.backward(grad)
        torch.testing.assert_close(out, x @ reference.T + layer.bias, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(x.grad, grad @ reference, rtol=1e-5, atol=1e-5)


def write_gguf(path, tensors: dict[str, torch.Tensor], qtype) -> dict[str, np.ndarray]:
    """`tensors` as a GGUF file: 2-D weights whose rows fit `qtype`'s blocks quantized, the rest in F32; the
    quantized blocks by name."""
    from gguf import GGUFWriter, quants

    writer = GGUFWriter(str(path), "flux")
    packed = {}
    for name, value in tensors.items():
        array = value.float().numpy()
        if name.endswith(".weight") and value.ndim == 2 and value.shape[1] % 32 == 0:
            packed[name] = quants.quantize(array, qtype)
            writer.add_tensor(name, packed[name], raw_shape=packed[name].shape, raw_dtype=qtype)
        else:
            writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return packed


@needs_gguf
def test_flux_gguf_files_train_on_their_blocks(flux, dataset, tmp_path):
    from gguf import GGMLQuantizationType as Q

    from lora_trainer.memory.gguf_weights import GGUFLinear

    gguf_file = flux.with_name("flux1-dev-tiny-Q8_0.gguf")
    packed = write_gguf(gguf_file, load_file(str(flux)), Q.Q8_0)
    loras = {}
    for weights_setting, kind in (("auto", GGUFLinear), ("full", torch.nn.Linear), ("fp8", Fp8Linear)):
        config = transformer_config(gguf_file, dataset, tmp_path / weights_setting, max_steps=2,
                                    base_weights=weights_setting, save_dtype="fp32")
        backbone = FluxBackbone.load(config, None)
        loras[weights_setting] = train_and_keep(config, backbone)[1]
        layer = base_layer(backbone.transformer.get_submodule("single_transformer_blocks.0.proj_out"))
        assert type(layer) is kind, weights_setting
        if kind is GGUFLinear:  # the file's blocks, as they are; q, k and v each their rows of the fused qkv
            assert torch.equal(layer.weight, torch.from_numpy(packed["single_blocks.0.linear2.weight"]))
            to_k = base_layer(backbone.transformer.get_submodule("transformer_blocks.0.attn.to_k"))
            rows = to_k.out_features
            assert torch.equal(to_k.weight, torch.from_numpy(packed["double_blocks.0.img_attn.qkv.weight"][rows:2 * rows]))
    assert loras["auto"].keys() == loras["full"].keys() == loras["fp8"].keys()
    with pytest.MonkeyPatch.context() as patch:  # without the package: said before anything loads
        patch.setitem(sys.modules, "gguf", None)
        with pytest.raises(CheckpointError, match=r"needs the gguf package \(pip install gguf\)"):
            train_lora(transformer_config(gguf_file, dataset, tmp_path / "no-gguf"))
    # the GGUF layers compute what the dequantized model computes (here in fp32, the full model from its bf16 copy):
    # the same LoRA after 2 steps, to the rounding of bf16
    largest = max(v.abs().max() for v in loras["full"].values())
    for key in loras["full"]:
        torch.testing.assert_close(loras["auto"][key], loras["full"][key], rtol=0, atol=0.01 * largest)


def test_an_older_torch_refuses_fp8_and_holds_a_quantized_file_in_full_precision(monkeypatch):
    from lora_trainer.errors import ConfigError
    from lora_trainer.memory import holds_quantized

    assert holds_quantized("fp8", False) and holds_quantized("auto", True) and not holds_quantized("auto", False)
    monkeypatch.delattr(torch.library, "custom_op")  # torch before 2.4
    with pytest.raises(ConfigError, match="needs torch 2.4 or newer"):
        holds_quantized("fp8", False)
    assert not holds_quantized("auto", True)


@pytest.mark.slow  # the default run's time budget; CI runs it with -m slow
@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="needs bitsandbytes")
def test_nf4_bases_train_with_the_same_lora_keys(sd1_checkpoint, flux, dataset, tmp_path):
    import bitsandbytes as bnb

    for family, path, make, load in (("sd1", sd1_checkpoint, quick_config, DiffusionBackbone.load),
                                     ("flux1", flux, transformer_config, FluxBackbone.load)):
        loras = {}
        for weights in ("full", "nf4"):
            config = make(path, dataset, tmp_path / f"{family}-{weights}", base_weights=weights, max_steps=3,
                          gradient_checkpointing=True)
            backbone = load(resolve(config, family), None)
            result, loras[weights] = train_and_keep(config, backbone)
            network = backbone.trained_modules()[0]
            held = [m for m in network.modules() if isinstance(m, bnb.nn.Linear4bit)]
            assert bool(held) is (weights == "nf4") and all(m.weight.dtype == torch.uint8 for m in held)
            assert all(math.isfinite(loss) for _, loss in result.losses) and all(v.dtype == torch.float32 for v in loras[weights].values())
        assert loras["nf4"].keys() == loras["full"].keys()
        assert any(not torch.equal(loras["nf4"][k], loras["full"][k]) for k in loras["full"])  # 4 bits move it


def test_a_sudden_slowdown_is_reported_once_with_the_levers(monkeypatch):
    """Steps that become much slower than the run's best stretch (the driver lending system RAM) give one warning;
    saves and previews (`paused`) and the first stretch (capture, compile) do not count."""
    from lora_trainer.events import EventBus
    from lora_trainer.jobs import JobStatus, Trainer, describe
    from lora_trainer.train import loop

    clock = {"now": 0.0}
    monkeypatch.setattr(loop.time, "time", lambda: clock["now"])
    events = []
    config = quick_config("m", "d", "o", log_every_n_steps=2)
    log = loop.LossLog(torch.device("cpu"), config, EventBus([events.append]), None, loop.TrainResult(None, "o", 0, 20),
                       lambda: ["gradient_checkpointing: true"], watch_spill=True)  # as on a CUDA GPU
    step = 0
    for seconds, pause in ((30.0, 0), (0.5, 0), (0.4, 0), (0.5, 20.0), (5.0, 0), (5.0, 0)):  # per step, per stretch
        for _ in range(2):
            log.add(torch.tensor(1.0))
            clock["now"] += seconds
            step += 1
            if pause:
                with log.paused():
                    clock["now"] += pause
            log.step_done(step, 20, 0, 1e-4, last=False)
    warnings = [e for e in events if e.kind == "warning"]
    assert len(warnings) == 1 and warnings[0].step == 10  # the first slow stretch, not the paused one or the first
    assert "(5.00 s a step against 0.40 s before)" in warnings[0].data["message"] and "gradient_checkpointing: true" in warnings[0].data["message"]
    job = JobStatus("j", "name")
    Trainer._on_event(None, job, warnings[0])
    assert "Sysmem Fallback" in describe(job)  # the tab's status line and the API's JSON carry it
    on_cpu = loop.LossLog(torch.device("cpu"), config, EventBus([events.append]), None, loop.TrainResult(None, "o", 0, 20))
    assert not on_cpu.watch_spill  # a busy CPU is no GPU spilling into system RAM: no such warning there


@pytest.mark.slow  # the default run's time budget; CI runs it with -m slow
@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="needs bitsandbytes")
def test_forge_nf4_files_train_in_nf4(flux, dataset, tmp_path):
    """Forge's NF4 checkpoints (bitsandbytes' packed 4 bits with their state beside each weight): read, trained on
    NF4 layers again (`auto`), or in full precision (`full`); the LoRA has the usual keys."""
    import bitsandbytes as bnb

    saved = {}
    for key, value in load_file(str(flux)).items():
        if key.endswith(".weight") and value.ndim == 2 and key.startswith(("double_blocks", "single_blocks")):
            layer = bnb.nn.Linear4bit(value.shape[1], value.shape[0], bias=False, quant_type="nf4", device="meta")
            layer.weight = bnb.nn.Params4bit(value.to(torch.bfloat16), requires_grad=False, quant_type="nf4")
            saved.update({f"{key}{name.removeprefix('weight')}": v for name, v in layer.to("cpu").state_dict().items()})
        else:
            saved[key] = value
    nf4_file = flux.with_name("flux1-dev-tiny-bnb-nf4.safetensors")
    save_file(saved, str(nf4_file))
    loras = {}
    for weights, held in (("auto", bnb.nn.Linear4bit), ("full", torch.nn.Linear)):
        config = transformer_config(nf4_file, dataset, tmp_path / weights, base_weights=weights, max_steps=2)
        backbone = FluxBackbone.load(config, None)
        loras[weights] = train_and_keep(config, backbone)[1]
        assert type(base_layer(backbone.transformer.get_submodule("single_transformer_blocks.0.proj_out"))) is held
    assert loras["auto"].keys() == loras["full"].keys()
