"""Text datasets for causal-LM LoRA: what is read, how it is tokenized, which tokens carry the loss.

`train_data_dir` is a folder (searched recursively) or one file:
- `.txt`: one document per file; every token is trained on; a document longer than `max_seq_length` is cut
  into pieces of that length (without packing);
- `.jsonl` (one JSON object per line) or `.json` (a list of objects), each object one of:
  `{"text": ...}` (every token trained), `{"prompt": ..., "completion": ...}` (loss on the completion only),
  `{"messages": [{"role": ..., "content": ...}, ...]}` rendered with the tokenizer's chat template (loss on the
  assistant turns only, their end-of-turn marker included).
A line that is not JSON or has none of those fields is skipped and named; nothing else is lost.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path

from lora_trainer.errors import ConfigError, DatasetError

log = logging.getLogger(__name__)

IGNORE = -100  # the label of a token that carries no loss (transformers' and torch's ignore_index)
SUFFIXES = (".txt", ".jsonl", ".json")


@dataclass
class Example:
    """One tokenized training example; `labels` is IGNORE where the loss is off."""

    input_ids: list[int]
    labels: list[int]
    source: str


@dataclass
class TextDataset:
    """Tokenized examples, split into training and held-out parts, with what was skipped and why."""

    train: list[Example]
    held_out: list[Example]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    formats: dict[str, int] = field(default_factory=dict)
    split_documents: int = 0

    def summary(self) -> str:
        kinds = ", ".join(f"{n} {kind}" for kind, n in sorted(self.formats.items()))
        tokens = sum(len(e.input_ids) for e in self.train)
        return (f"{sum(self.formats.values())} examples read ({kinds}), {len(self.skipped)} skipped; training on "
                f"{len(self.train)} sequences ({tokens} tokens), {len(self.held_out)} held out")


def read_records(root: str | Path) -> tuple[list[tuple[str, dict]], list[tuple[str, str]]]:
    """(source, record) of every example under `root`, and (source, reason) of every one skipped."""
    root = Path(root).expanduser()
    if not root.exists():
        raise DatasetError(f"train_data_dir does not exist: {root.resolve()}")
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.suffix.lower() in SUFFIXES
                                                  and p.is_file() and not p.name.startswith("."))
    if not files:
        raise DatasetError(f"No .txt, .jsonl or .json files in {root.resolve()}: put your texts there, one document "
                           "per .txt file, or one JSON object per line of a .jsonl file.")
    records, skipped = [], []
    for path in files:
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            skipped.append((str(path), "not UTF-8 text"))
            continue
        if path.suffix.lower() == ".txt":
            if text.strip():
                records.append((str(path), {"text": text}))
            else:
                skipped.append((str(path), "empty"))
            continue
        if path.suffix.lower() == ".json":
            try:
                items = json.loads(text)
            except json.JSONDecodeError as exc:
                skipped.append((str(path), f"not valid JSON ({exc.msg}, line {exc.lineno})"))
                continue
            if not isinstance(items, list):
                skipped.append((str(path), "a .json file must hold a list of objects"))
                continue
            lines = [(f"{path}[{i}]", item) for i, item in enumerate(items)]
        else:
            lines = []
            for number, line in enumerate(text.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    lines.append((f"{path}:{number}", json.loads(line)))
                except json.JSONDecodeError as exc:
                    skipped.append((f"{path}:{number}", f"not valid JSON ({exc.msg})"))
        for source, item in lines:
            reason = _problem(item)
            if reason:
                skipped.append((source, reason))
            else:
                records.append((source, item))
    return records, skipped


def _problem(item) -> str:
    """Why a JSON record cannot be used, or ''."""
    if not isinstance(item, dict):
        return "not a JSON object"
    if "messages" in item:
        messages = item["messages"]
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in messages):
            return "'messages' must be a list of {\"role\": ..., \"content\": ...} objects"
        if not any(m["role"] == "assistant" for m in messages):
            return "no assistant message to learn"
        return ""
    if "prompt" in item or "completion" in item:
        if not isinstance(item.get("prompt"), str) or not isinstance(item.get("completion"), str):
            return "'prompt' and 'completion' must both be text"
        return "" if item["completion"].strip() else "empty completion"
    if "text" in item:
        return "" if isinstance(item["text"], str) and item["text"].strip() else "empty or non-text 'text'"
    return "no 'text', 'prompt'/'completion' or 'messages' field"


def kind_of(record: dict) -> str:
    return "chat" if "messages" in record else "prompt/completion" if "prompt" in record else "text"


def tokenize_record(record: dict, tokenizer) -> Example:
    """Input ids and labels of one record (see the module's docstring for which tokens carry the loss)."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    kind = kind_of(record)
    if kind == "text":
        ids = tokenizer(record["text"]).input_ids + eos
        return Example(ids, list(ids), "")
    if kind == "prompt/completion":
        prompt = tokenizer(record["prompt"]).input_ids
        completion = tokenizer(record["completion"], add_special_tokens=False).input_ids + eos
        return Example(prompt + completion, [IGNORE] * len(prompt) + completion, "")
    return _tokenize_chat(record["messages"], tokenizer)


def _tokenize_chat(messages: list[dict], tokenizer) -> Example:
    """The conversation as the chat template renders it; the loss on each assistant turn's characters."""
    render = lambda msgs, prompt=False: tokenizer.apply_chat_template(
        msgs, tokenize=False, add_generation_prompt=prompt)
    full = render(messages)
    spans = []  # character ranges of the assistant turns
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start, end = render(messages[:i], True) if i else "", render(messages[:i + 1])
        if not (full.startswith(start) and full.startswith(end)):
            spans = [(0, len(full))]  # a template that rewrites earlier turns: train on the whole conversation
            log.warning("The chat template renders earlier turns differently as the conversation grows; training "
                        "on every token of such conversations.")
            break
        spans.append((len(start), len(end)))
    if getattr(tokenizer, "is_fast", False):
        encoded = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
        ids = encoded.input_ids
        labels = [t if any(a <= s < b for a, b in spans) else IGNORE
                  for t, (s, _) in zip(ids, encoded["offset_mapping"])]
        return Example(ids, labels, "")
    ids, labels, position = [], [], 0  # slow tokenizers give no offsets: tokenize piece by piece
    for a, b in spans + [(len(full), len(full))]:
        for text, learn in ((full[position:a], False), (full[a:b], True)):
            if text:
                piece = tokenizer(text, add_special_tokens=False).input_ids
                ids += piece
                labels += piece if learn else [IGNORE] * len(piece)
        position = b
    return Example(ids, labels, "")


def build_dataset(root: str | Path, tokenizer, *, max_seq_length: int, validation_split: float, seed: int,
                  packing: bool, pad_id: int = 0) -> TextDataset:
    """Read, tokenize and split the data; raises DatasetError with the reasons when nothing is usable."""
    records, skipped = read_records(root)
    for source, reason in skipped:
        log.warning("Skipped %s: %s", source, reason)
    if not records:
        reasons = "; ".join(f"{s}: {r}" for s, r in skipped[:5])
        raise DatasetError(f"No usable text in {Path(root).expanduser().resolve()} ({reasons}).")
    if any(kind_of(r) == "chat" for _, r in records) and not getattr(tokenizer, "chat_template", None):
        chats = [s for s, r in records if kind_of(r) == "chat"][:3]
        raise ConfigError(f"The data has chat 'messages' (e.g. {', '.join(chats)}) but this model's tokenizer has no "
                          "chat template: use the instruct/chat version of the model (its tokenizer_config.json or "
                          "chat_template.jinja holds one), or write the data as prompt/completion pairs.")
    formats: dict[str, int] = {}
    examples = []
    for source, record in records:
        example = tokenize_record(record, tokenizer)
        example.source = source
        formats[kind_of(record)] = formats.get(kind_of(record), 0) + 1
        examples.append((kind_of(record), example))
    too_long = [(e.source, len(e.input_ids)) for kind, e in examples if kind != "text" and len(e.input_ids) > max_seq_length]
    if too_long:
        listed = "; ".join(f"{s} ({n} tokens)" for s, n in too_long[:5])
        raise DatasetError(f"{len(too_long)} example(s) are longer than max_seq_length {max_seq_length}: {listed}. "
                           "Raise max_seq_length (up to the model's context) or shorten them; cutting them would "
                           "train on answers without their end.")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    held = round(len(order) * validation_split) if validation_split else 0
    held = min(max(held, 1), len(order) - 1) if validation_split and len(order) > 1 else 0
    held_out = [examples[i][1] for i in sorted(order[:held])]
    train = [examples[i][1] for i in sorted(order[held:])]
    dataset = TextDataset([], [], skipped, formats)
    for example in train:
        if packing or len(example.input_ids) <= max_seq_length:
            dataset.train.append(example)
            continue
        dataset.split_documents += 1
        for k in range(0, len(example.input_ids), max_seq_length):
            dataset.train.append(Example(example.input_ids[k:k + max_seq_length], example.labels[k:k + max_seq_length],
                                         f"{example.source}#{k // max_seq_length}"))
    for example in held_out:  # held-out texts are scored in context-sized pieces too
        for k in range(0, len(example.input_ids), max_seq_length):
            dataset.held_out.append(Example(example.input_ids[k:k + max_seq_length],
                                            example.labels[k:k + max_seq_length], example.source))
    if packing:
        dataset.train = pack(dataset.train, max_seq_length, pad_id)
    if not dataset.train:
        raise DatasetError(f"No training examples left in {root} after holding out {held}; lower validation_split.")
    return dataset


def pack(examples: list[Example], length: int, pad_id: int = 0) -> list[Example]:
    """Concatenate the examples (each ends with EOS) and cut rows of exactly `length` tokens; the remainder is
    padded to `length` at its end (causal attention never looks ahead, so the pads change nothing and carry no
    loss): one shape for every row. Rows attend across example boundaries, as classic packing does."""
    ids = [t for e in examples for t in e.input_ids]
    labels = [t for e in examples for t in e.labels]
    pad = -len(ids) % length
    ids, labels = ids + [pad_id] * pad, labels + [IGNORE] * pad
    return [Example(ids[k:k + length], labels[k:k + length], f"packed row {k // length}")
            for k in range(0, len(ids), length) if any(t != IGNORE for t in labels[k:k + length])]
