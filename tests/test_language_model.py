"""Causal-LM LoRA (model_type: causal_lm) on a tiny random LLaMA with a word-level tokenizer built in code."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
if tuple(int(p) for p in transformers.__version__.split(".")[:2]) < (4, 40):
    pytest.skip("language-model training needs transformers >= 4.40", allow_module_level=True)

from safetensors.torch import load_file

from lora_trainer.backbones.tiny_lm import build_tiny_lm, word_tokenizer
from lora_trainer.config import make_config
from lora_trainer.data.text import IGNORE, build_dataset, pack, tokenize_record
from lora_trainer.errors import ConfigError, DatasetError
from lora_trainer.events import CancelToken
from lora_trainer.train.loop import train_lora

COLOURS, SIZES, FOODS = ["red", "blue", "green", "black"], ["big", "small"], ["one", "two"]
CORPUS = [f"the {c} cat sat on the {s} mat and ate {f} fish ." for c in COLOURS for s in SIZES for f in FOODS]


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory) -> Path:
    words = CORPUS + ["what colour is ? hello answer question user assistant system be nice"]
    return build_tiny_lm(tmp_path_factory.mktemp("lm") / "model", words, context=256)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("corpus")
    for i, text in enumerate(CORPUS):
        (folder / f"{i:02d}.txt").write_text(text, encoding="utf-8")
    return folder


def lm_config(model: Path, data: Path, out: Path, **overrides):
    values = {"model_type": "causal_lm", "base_model": str(model), "train_data_dir": str(data), "output_dir": str(out),
              "device": "cpu", "max_steps": 6, "batch_size": 4, "learning_rate": 1e-2, "target_modules": "all_linear",
              "log_every_n_steps": 1, "save_every_n_epochs": 0, "save_dtype": "fp32", "validation_split": 0.25,
              "max_seq_length": 64}
    values.update(overrides)
    return make_config(values)


def logits_of(model, text_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=text_ids).logits


def test_loss_and_held_out_perplexity_fall_and_the_adapter_loads_in_peft(tiny_lm, corpus, tmp_path):
    from peft import PeftModel, get_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    result = train_lora(lm_config(tiny_lm, corpus, tmp_path / "out", max_steps=40, save_every_n_steps=20))
    losses = [loss for _, loss in result.losses]
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5
    assert result.metrics["perplexity_after"] < 0.5 * result.metrics["perplexity_before"]
    # measured on the images' schedule (before, at each save, after); its validation loss is the log-perplexity
    assert [step for step, _ in result.validation] == [0, 20, 40]
    assert result.validation[-1][1] == pytest.approx(math.log(result.metrics["perplexity_after"]))
    assert result.best is not None and result.best[0] in (20, 40)
    adapter = result.lora_file
    assert adapter.parent == tmp_path / "out" and adapter.name.endswith("_lora")
    assert {"adapter_model.safetensors", "adapter_config.json", "tokenizer.json"} <= {p.name for p in adapter.iterdir()}
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["task_type"] == "CAUSAL_LM" and config["r"] == 8 and config["lora_alpha"] == 16
    assert {t.rsplit(".", 1)[-1] for t in config["target_modules"]} == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}

    base = AutoModelForCausalLM.from_pretrained(tiny_lm, local_files_only=True)
    ids = torch.tensor([[2, 6, 7, 8, 9, 6, 10]])
    before = logits_of(base, ids)
    loaded = PeftModel.from_pretrained(base, str(adapter))
    on_file = load_file(str(adapter / "adapter_model.safetensors"))
    in_model = get_peft_model_state_dict(loaded)
    assert on_file.keys() == in_model.keys() and all(torch.equal(on_file[k], in_model[k]) for k in on_file)
    assert not torch.allclose(logits_of(loaded, ids), before)


def test_a_checkpoints_adapter_gives_the_trained_weights_logits_and_resume_is_exact(tiny_lm, corpus, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    options = {"max_steps": 7, "lr_scheduler": "cosine", "lr_warmup_steps": 2, "lora_dropout": 0.1}
    whole = train_lora(lm_config(tiny_lm, corpus, tmp_path / "a", **options))
    cancel = CancelToken()
    stop_at_3 = lambda e: cancel.set() if e.kind == "progress" and e.step == 3 else None
    first = train_lora(lm_config(tiny_lm, corpus, tmp_path / "b", **options), listeners=[stop_at_3], cancel=cancel)
    assert first.interrupted and first.steps == 3 and (first.lora_file / "state.pt").is_file()

    # the checkpoint's adapter, loaded by peft, is exactly the trained state (fp32 in state.pt)
    state = torch.load(first.lora_file / "state.pt", weights_only=True)
    trained = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_lm, local_files_only=True),
                             LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16, target_modules="all-linear"))
    with torch.no_grad():
        for name, p in trained.named_parameters():
            if name in state["loras"][0]:
                p.copy_(state["loras"][0][name])
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_lm, local_files_only=True),
                                         str(first.lora_file))
    trained.eval()
    ids = torch.tensor([[2, 6, 7, 8, 9, 6, 10, 11]])
    assert torch.equal(logits_of(trained, ids), logits_of(reloaded, ids))

    resumed = train_lora(lm_config(tiny_lm, corpus, tmp_path / "b", **options), resume=tmp_path / "b")
    a = load_file(str(whole.lora_file / "adapter_model.safetensors"))
    b = load_file(str(resumed.lora_file / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.steps == whole.steps == 7


def test_init_lora_continues_and_the_merged_model_equals_base_plus_adapter(tiny_lm, corpus, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    first = train_lora(lm_config(tiny_lm, corpus, tmp_path / "first", max_steps=3, target_modules="q_proj,v_proj"))
    second = train_lora(lm_config(tiny_lm, corpus, tmp_path / "second", max_steps=3, init_lora=str(first.lora_file),
                                  save_merged_model=True))
    start = load_file(str(first.lora_file / "adapter_model.safetensors"))
    end = load_file(str(second.lora_file / "adapter_model.safetensors"))
    assert start.keys() == end.keys()  # the init adapter's own layers (q_proj, v_proj), not target_modules
    assert any(not torch.equal(start[k], end[k]) for k in start)
    assert second.metrics["perplexity_before"] == pytest.approx(first.metrics["perplexity_after"], rel=1e-5)

    ids = torch.tensor([[2, 6, 7, 8, 9, 6, 10, 11]])
    with_adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_lm, local_files_only=True),
                                             str(second.lora_file))
    merged = AutoModelForCausalLM.from_pretrained(second.metrics["merged_model"], local_files_only=True)
    torch.testing.assert_close(logits_of(merged, ids), logits_of(with_adapter, ids), rtol=1e-4, atol=1e-4)


def test_completion_only_and_assistant_only_masks():
    tokenizer = word_tokenizer(["hello", "the", "cat", "what", "is", "it", "a", "dog", "be", "nice"])
    tokens = tokenizer.convert_ids_to_tokens

    example = tokenize_record({"prompt": "what is it", "completion": " a dog"}, tokenizer)
    assert tokens(example.input_ids) == ["<s>", "what", "is", "it", "a", "dog", "</s>"]
    assert tokens([t for t in example.labels if t != IGNORE]) == ["a", "dog", "</s>"]
    assert example.labels[:4] == [IGNORE] * 4

    chat = {"messages": [{"role": "system", "content": "be nice"}, {"role": "user", "content": "hello"},
                         {"role": "assistant", "content": "the cat"}, {"role": "user", "content": "what is it"},
                         {"role": "assistant", "content": "a dog"}]}
    example = tokenize_record(chat, tokenizer)
    learned = [tokens(t) if t != IGNORE else None for t in example.labels]
    assert [t for t in learned if t] == ["the", "cat", "<|im_end|>", "a", "dog", "<|im_end|>"]
    assert all(label in (IGNORE, token) for label, token in zip(example.labels, example.input_ids))
    assert tokens(example.input_ids).count("<|im_start|>") == 5  # every turn is in the input

    text = tokenize_record({"text": "the cat"}, tokenizer)
    assert text.labels == text.input_ids and tokens(text.input_ids) == ["<s>", "the", "cat", "</s>"]


def test_data_formats_skips_packing_and_splits(tmp_path):
    tokenizer = word_tokenizer(["the", "cat", "sat", "a", "dog", "hello", "x"])
    (tmp_path / "doc.txt").write_text("the cat sat " * 20, encoding="utf-8")  # 61 tokens: cut into pieces of 16
    (tmp_path / "empty.txt").write_text("  ", encoding="utf-8")
    lines = [json.dumps({"text": "a dog"}), "{broken", json.dumps({"prompt": "hello", "completion": " the cat"}),
             json.dumps({"other": 1}), json.dumps({"messages": [{"role": "user", "content": "hello"},
                                                                {"role": "assistant", "content": "a dog"}]})]
    (tmp_path / "data.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (tmp_path / "more.json").write_text(json.dumps([{"text": "the dog"}, {"completion": 3}]), encoding="utf-8")
    data = build_dataset(tmp_path, tokenizer, max_seq_length=16, validation_split=0.0, seed=0, packing=False)
    assert data.formats == {"text": 3, "prompt/completion": 1, "chat": 1}
    assert sorted(reason for _, reason in data.skipped) == sorted([
        "empty", "not valid JSON (Expecting property name enclosed in double quotes)",
        "no 'text', 'prompt'/'completion' or 'messages' field", "'prompt' and 'completion' must both be text"])
    assert any(source.endswith("data.jsonl:2") for source, _ in data.skipped)
    assert data.split_documents == 1 and max(len(e.input_ids) for e in data.train) == 16
    assert len(data.train) == 4 + 4  # the long document in 4 pieces, plus the other four

    packed = build_dataset(tmp_path, tokenizer, max_seq_length=16, validation_split=0.0, seed=0, packing=True)
    assert all(len(e.input_ids) == 16 for e in packed.train)  # one shape: the last row is padded at its end
    learned = sum(t != IGNORE for e in packed.train for t in e.labels)
    assert learned == sum(t != IGNORE for e in data.train for t in e.labels)
    assert packed.train[-1].input_ids[-1] == 0 and packed.train[-1].labels[-1] == IGNORE
    assert pack([], 16) == []

    split = build_dataset(tmp_path, tokenizer, max_seq_length=16, validation_split=0.4, seed=0, packing=False)
    assert 1 <= len({e.source for e in split.held_out}) <= 3
    assert not {e.source.split("#")[0] for e in split.train} & {e.source for e in split.held_out}


def test_bad_inputs_get_clear_messages(tiny_lm, corpus, tmp_path):
    with pytest.raises(ConfigError, match="config.json"):
        train_lora(lm_config(tmp_path / "nowhere", corpus, tmp_path / "o"))
    with pytest.raises(ConfigError, match="context"):
        train_lora(lm_config(tiny_lm, corpus, tmp_path / "o", max_seq_length=4096))
    with pytest.raises(ConfigError, match="load_in_4bit"):
        train_lora(lm_config(tiny_lm, corpus, tmp_path / "o", base_weights="fp8"))
    with pytest.raises(ConfigError, match="not found in this model.*q_proj"):
        train_lora(lm_config(tiny_lm, corpus, tmp_path / "o", target_modules="c_attn"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetError, match="No .txt, .jsonl or .json files"):
        train_lora(lm_config(tiny_lm, empty, tmp_path / "o"))
    (empty / "bad.jsonl").write_text("nope\n", encoding="utf-8")
    with pytest.raises(DatasetError, match="No usable text.*bad.jsonl:1"):
        train_lora(lm_config(tiny_lm, empty, tmp_path / "o"))
    long = tmp_path / "long"
    long.mkdir()
    (long / "a.jsonl").write_text(json.dumps({"prompt": "the " * 70, "completion": " cat"}) + "\n", encoding="utf-8")
    with pytest.raises(DatasetError, match="longer than max_seq_length 64.*a.jsonl:1"):
        train_lora(lm_config(tiny_lm, long, tmp_path / "o"))

    no_template = build_tiny_lm(tmp_path / "base-model", CORPUS, chat_template=None, context=128)
    chat = tmp_path / "chat"
    chat.mkdir()
    (chat / "c.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "the"},
                                                           {"role": "assistant", "content": "cat"}]}) + "\n")
    with pytest.raises(ConfigError, match="no chat template"):
        train_lora(lm_config(no_template, chat, tmp_path / "o"))


def test_the_graph_ready_step_trains_the_same_adapter_on_packed_rows(tiny_lm, corpus, tmp_path, caplog):
    caplog.set_level("INFO", logger="lora_trainer")
    adapters = {}
    for mode in ("off", "on"):
        result = train_lora(lm_config(tiny_lm, corpus, tmp_path / mode, cuda_graphs=mode, packing=True,
                                      max_seq_length=32, max_steps=5, validation_split=0.0))
        adapters[mode] = load_file(str(result.lora_file / "adapter_model.safetensors"))
    assert "the graph-ready step runs eagerly" in caplog.text
    for key in adapters["off"]:
        torch.testing.assert_close(adapters["on"][key], adapters["off"][key], rtol=1e-3, atol=1e-5)  # rounding


def test_the_command_line_trains_a_language_model(tiny_lm, corpus, tmp_path, capsys):
    from lora_trainer.hosts.cli import main

    config = tmp_path / "lm.yaml"
    config.write_text(f"model_type: causal_lm\nbase_model: {tiny_lm}\ntrain_data_dir: {corpus}\n"
                      f"output_dir: {tmp_path / 'out'}\noutput_name: cats\ndevice: cpu\nmax_steps: 3\n"
                      "max_seq_length: 32\n", encoding="utf-8")
    assert main(["train", "--config", str(config)]) == 0
    printed = capsys.readouterr().out
    assert "Held-out perplexity:" in printed and f"Adapter written: {tmp_path / 'out' / 'cats'}" in printed
    assert main(["train", "--config", str(config), "--print-config"]) == 0
    assert "lora_rank: 8" in capsys.readouterr().out


def test_gradient_checkpointing_gives_the_same_adapter_and_accumulation_counts_steps(tiny_lm, corpus, tmp_path):
    plain = train_lora(lm_config(tiny_lm, corpus, tmp_path / "plain", max_steps=4))
    checkpointed = train_lora(lm_config(tiny_lm, corpus, tmp_path / "ckpt", max_steps=4, gradient_checkpointing=True))
    a = load_file(str(plain.lora_file / "adapter_model.safetensors"))
    b = load_file(str(checkpointed.lora_file / "adapter_model.safetensors"))
    for key in a:  # recomputing the activations changes nothing but memory
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-7)

    accumulated = train_lora(lm_config(tiny_lm, corpus, tmp_path / "acc", max_steps=3, batch_size=2,
                                       gradient_accumulation_steps=2))
    assert accumulated.steps == accumulated.total_steps == 3 and [s for s, _ in accumulated.losses] == [1, 2, 3]
    assert all(torch.isfinite(torch.tensor(loss)) for _, loss in accumulated.losses)


def test_bf16_autocast_trains_with_the_lora_input_kept_in_bf16(tiny_lm, corpus, tmp_path):
    """Under mixed precision the LoRA layers take the bf16 hidden states as they come (no fp32 copy per layer):
    the run still learns and the adapter is saved in fp32."""
    result = train_lora(lm_config(tiny_lm, corpus, tmp_path / "out", max_steps=30, mixed_precision="bf16"))
    assert result.metrics["perplexity_after"] < 0.1 * result.metrics["perplexity_before"]
    adapter = load_file(str(result.lora_file / "adapter_model.safetensors"))
    assert all(t.dtype == torch.float32 for t in adapter.values())


def test_a_finished_run_keeps_a_checkpoint_that_continues_with_more_steps(tiny_lm, corpus, tmp_path):
    """The one loop gives language models what images had: a resumable checkpoint at the end of every run."""
    first = train_lora(lm_config(tiny_lm, corpus, tmp_path / "out", max_steps=3, lr_scheduler="constant"))
    assert (tmp_path / "out" / "checkpoints" / "step-00000003" / "state.pt").is_file() and not first.interrupted
    before = load_file(str(first.lora_file / "adapter_model.safetensors"))
    more = train_lora(lm_config(tiny_lm, corpus, tmp_path / "out", max_steps=5, lr_scheduler="constant"),
                      resume=tmp_path / "out")
    assert more.steps == 5 and [step for step, _ in more.losses] == [4, 5]
    after = load_file(str(more.lora_file / "adapter_model.safetensors"))
    assert before.keys() == after.keys() and any(not torch.equal(before[k], after[k]) for k in before)
