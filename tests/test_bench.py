"""The benchmarks run end to end at tiny size on the CPU (their numbers come from the GPU machine)."""

import json

import pytest

from lora_trainer.bench import bench_caption, bench_lm, bench_train


def test_caption_benchmark_runs_at_tiny_size(tmp_path):
    report = bench_caption("tiny", images=8, batch_size=4, plain_images=2, device="cpu", out=tmp_path / "b.json")
    assert report["ours_images_per_s"] > 0 and report["plain_loop_images_per_s"] > 0
    assert json.loads((tmp_path / "b.json").read_text())["images"] == 8


@pytest.mark.slow
def test_training_benchmark_runs_at_tiny_size(tmp_path):
    report = bench_train("sd15", batch=2, steps=3, size="tiny", device="cpu", out=tmp_path / "t.json", processes=2,
                         levers=True)
    assert [row["trainer"] for row in report["rows"]] == ["plain eager diffusers + peft", "lora_trainer, eager step",
                                                         "lora_trainer (cuda_graphs: auto)",
                                                         "lora_trainer on a host's model (WebUI/ComfyUI path)",
                                                         "lora_trainer on a host's fp16 model (WebUI path, fp16)",
                                                         "lora_trainer, 2 processes, eager step (DDP)",
                                                         "lora_trainer, 2 processes (cuda_graphs: auto)"]
    assert report["multi_process_captured_vs_eager_lora_difference"] < 1e-5  # on a CPU both run eagerly: the same
    levers = {row["lever"]: row for row in report["levers"]}
    assert {"baseline", "channels_last", "SDPA math only", "latents copied from the CPU each step"} <= levers.keys()
    assert all(isinstance(levers["baseline"][f"{mode}_steps_per_s"], float) for mode in ("eager", "captured"))
    assert all(row["steps_per_s"] > 0 for row in report["rows"]) and report["lora_modules"] == 84
    assert json.loads((tmp_path / "t.json").read_text())["batch"] == 2


@pytest.mark.slow  # the default run's time budget; CI runs it with -m slow
def test_language_model_benchmark_runs_at_tiny_size(tmp_path):
    import transformers

    if tuple(int(p) for p in transformers.__version__.split(".")[:2]) < (4, 40):
        pytest.skip("language-model training needs transformers >= 4.40")
    report = bench_lm("tiny", batch=2, seq=64, steps=6, device="cpu", out=tmp_path / "lm.json")
    assert [row["trainer"] for row in report["rows"]] == ["plain transformers + peft", "lora_trainer, eager step",
                                                         "lora_trainer (cuda_graphs: auto)"]
    assert all(row["tokens_per_s"] > 0 for row in report["rows"])
    assert json.loads((tmp_path / "lm.json").read_text())["seq"] == 64
    assert report["eager_vs_eager_adapter_difference"] == 0.0  # the same seed on a CPU: the same adapter
