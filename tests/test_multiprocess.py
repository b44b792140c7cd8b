"""Two training processes on the CPU (gloo), launched the way `accelerate launch` / torchrun launch them.

Checks the multi-GPU code paths without GPUs: the eager step under accelerate's DDP and the graph-ready step,
whose gradients are averaged by one all-reduce of a flat buffer (the collective a captured graph replays).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import make_dataset


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(config: dict, folder: Path, processes: int = 2, pattern: str = "*.safetensors"):
    """Run `python -m lora_trainer train --config` in `processes` ranks; what the main rank wrote, and the logs."""
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    port = str(_free_port())
    workers = []
    for rank in range(processes):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(processes),
               "LOCAL_WORLD_SIZE": str(processes), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port,
               "OMP_NUM_THREADS": "1"}
        workers.append(subprocess.Popen([sys.executable, "-m", "lora_trainer", "train", "--config",
                                         str(folder / "config.yaml")], env=env, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True))
    logs = [w.communicate(timeout=300)[0] for w in workers]
    assert all(w.returncode == 0 for w in workers), "\n\n".join(logs)
    files = sorted(Path(config["output_dir"]).glob(pattern))
    assert len(files) == 1, (files, logs[0])
    return files[0], logs


def _assert_both_steps_train_one_lora(base: dict, tmp_path: Path) -> None:
    """Two processes train the same LoRA with accelerate's DDP eager step and with the graph-ready step, whose
    gradients one all-reduce of a flat buffer averages: the same averages as DDP's bucketed all-reduce."""
    from lora_trainer.lora.kohya import read_lora_file

    loras = {}
    for mode in ("off", "on"):
        lora, logs = _launch({**base, "cuda_graphs": mode, "output_dir": str(tmp_path / f"out-{mode}")},
                             tmp_path / f"run-{mode}")
        loras[mode] = read_lora_file(lora)[0]
    assert "graph-ready step runs eagerly" in logs[0]
    assert loras["on"].keys() == loras["off"].keys()
    for key in loras["off"]:
        torch.testing.assert_close(loras["on"][key], loras["off"][key], rtol=1e-4, atol=1e-6)
    assert any(v.abs().max() > 0 for k, v in loras["on"].items() if "lora_up" in k)


@pytest.mark.slow
def test_two_processes_train_one_lora_the_same_with_and_without_the_graph_ready_step(sd1_checkpoint, tmp_path):
    data = make_dataset(tmp_path / "data", count=8)
    base = {"base_model": str(sd1_checkpoint), "train_data_dir": str(data), "resolution": 64, "batch_size": 4,
            "max_steps": 4, "device": "cpu", "learning_rate": 1e-3, "lora_rank": 4, "lora_alpha": 4,
            "save_every_n_epochs": 0, "log_every_n_steps": 1, "save_dtype": "fp32", "enable_buckets": False,
            "output_name": "twoproc"}
    _assert_both_steps_train_one_lora(base, tmp_path)


@pytest.mark.slow
def test_two_processes_train_one_language_model_adapter_the_same_both_ways(tmp_path):
    transformers = pytest.importorskip("transformers")
    if tuple(int(p) for p in transformers.__version__.split(".")[:2]) < (4, 40):
        pytest.skip("language-model training needs transformers >= 4.40")
    from safetensors.torch import load_file

    from lora_trainer.backbones.tiny_lm import build_tiny_lm

    texts = [f"the {c} cat sat on the {s} mat ." for c in ("red", "blue", "green", "black") for s in ("big", "small")]
    model = build_tiny_lm(tmp_path / "model", texts, context=128)
    data = tmp_path / "data"
    data.mkdir()
    for i, text in enumerate(texts):
        (data / f"{i}.txt").write_text(text, encoding="utf-8")
    base = {"model_type": "causal_lm", "base_model": str(model), "train_data_dir": str(data), "device": "cpu",
            "max_steps": 4, "batch_size": 4, "packing": True, "max_seq_length": 16, "learning_rate": 1e-2,
            "validation_split": 0.0, "save_every_n_epochs": 0, "save_dtype": "fp32", "output_name": "cats"}
    adapters = {}
    for mode in ("off", "on"):
        out = tmp_path / f"out-{mode}"
        _launch({**base, "cuda_graphs": mode, "output_dir": str(out)}, tmp_path / f"run-{mode}", pattern="cats")
        adapters[mode] = load_file(str(out / "cats" / "adapter_model.safetensors"))
    for key in adapters["off"]:  # DDP's all-reduce vs ours over one flat buffer
        torch.testing.assert_close(adapters["on"][key], adapters["off"][key], rtol=1e-3, atol=1e-5)
    assert any(v.abs().max() > 0 for k, v in adapters["on"].items() if "lora_B" in k)


@pytest.mark.slow
def test_two_processes_train_one_flux_lora_the_same_with_and_without_the_graph_ready_step(tmp_path):
    """The transformer families on the same multi-process paths: each rank caches its share, the gradients are
    averaged, the main rank writes one LoRA."""
    from lora_trainer.backbones.tiny_flow import build_tiny_flux

    flux = build_tiny_flux(tmp_path / "comfy")
    data = make_dataset(tmp_path / "data", count=8)
    base = {"base_model": str(flux), "train_data_dir": str(data), "resolution": 64, "batch_size": 4, "max_steps": 4,
            "device": "cpu", "learning_rate": 1e-3, "lora_rank": 4, "lora_alpha": 4, "save_every_n_epochs": 0,
            "log_every_n_steps": 1, "save_dtype": "fp32", "enable_buckets": False, "output_name": "twoflux"}
    _assert_both_steps_train_one_lora(base, tmp_path)
