"""The CLIP tokenizer, built offline from the BPE vocabulary that the open-clip-torch wheel ships.

Every SD1/SD2/SDXL text encoder uses this same 49,408-token vocabulary; only the padding differs
(SD1 pads with end-of-text, OpenCLIP encoders with token 0, '!').
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import json
import tempfile
from pathlib import Path

from transformers import CLIPTokenizer

from lora_trainer.errors import CheckpointError

BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
MERGES = 49152 - 256 - 2  # open_clip and OpenAI CLIP use exactly this many merges


def _bpe_path() -> Path:
    """Where open-clip-torch's vocabulary lies, found without importing open_clip (and its torchvision)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError("The CLIP vocabulary comes from open-clip-torch: run `pip install --no-deps open-clip-torch`.")
    path = Path(next(iter(spec.submodule_search_locations))) / BPE_FILE
    if not path.is_file():
        raise CheckpointError(f"open-clip-torch is installed but {path} is missing; reinstall it.")
    return path


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from bytes to printable characters."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars)))


@functools.lru_cache(maxsize=1)
def _vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    """The 49,408-entry vocabulary and the merge list, as transformers' CLIPTokenizer files hold them."""
    with gzip.open(_bpe_path()) as f:
        lines = f.read().decode("utf-8").split("\n")[1:MERGES + 1]
    units = list(_bytes_to_unicode().values())
    vocab = units + [u + "</w>" for u in units] + ["".join(line.split()) for line in lines]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return {token: i for i, token in enumerate(vocab)}, lines


def clip_tokenizer(pad_token: str = "<|endoftext|>", max_length: int = 77) -> CLIPTokenizer:
    """A CLIP tokenizer identical to openai/clip-vit-large-patch14's, from files shipped on disk."""
    vocab, merges = _vocab_and_merges()
    with tempfile.TemporaryDirectory() as folder:
        vocab_file, merges_file = Path(folder) / "vocab.json", Path(folder) / "merges.txt"
        vocab_file.write_text(json.dumps(vocab), encoding="utf-8")
        merges_file.write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
        # from_pretrained reads these two files in transformers 4.x and 5.x alike
        return CLIPTokenizer.from_pretrained(folder, pad_token=pad_token, model_max_length=max_length)
