"""Random-weight LLaMA-shaped language models with a word-level tokenizer built in code (tests, demo, bench).

Nothing is downloaded: the tokenizer's vocabulary is the words of the given texts (or `w0 w1 ...`), its chat
template is a small ChatML one, and the model folder is written exactly as `save_pretrained` writes a real one,
so the trainer loads it through the same `AutoModelForCausalLM` / `AutoTokenizer` path as a user's model.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SPECIALS = ["<unk>", "<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]


def word_tokenizer(words: list[str], chat_template: str | None = CHATML):
    """A fast word-level tokenizer (whitespace and punctuation split) over `words`, with LLaMA-style specials."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIALS)}
    for word in words:
        vocab.setdefault(word, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    backend.add_special_tokens(SPECIALS)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                        unk_token="<unk>", pad_token="<pad>")
    if chat_template:
        tokenizer.chat_template = chat_template
    return tokenizer


def words_of(texts: list[str]) -> list[str]:
    """The distinct words and punctuation marks of `texts`, in order of first appearance."""
    seen: dict[str, None] = {}
    for text in texts:
        for word in re.findall(r"\w+|[^\w\s]", text):
            seen.setdefault(word, None)
    return list(seen)


def build_tiny_lm(folder: str | Path, texts: list[str] = (), *, vocab_size: int = 0, hidden: int = 64,
                  layers: int = 2, heads: int = 4, kv_heads: int = 2, intermediate: int = 128,
                  context: int = 512, chat_template: str | None = CHATML, seed: int = 0,
                  dtype: torch.dtype = torch.float32) -> Path:
    """A random-weight LlamaForCausalLM + tokenizer saved as a Hugging Face model folder; returns the folder.

    The vocabulary covers the words of `texts`, padded with `w0 w1 ...` up to `vocab_size` words.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    words = words_of(list(texts))
    words += [f"w{i}" for i in range(max(0, vocab_size - len(words) - len(SPECIALS)))]
    tokenizer = word_tokenizer(words, chat_template)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         max_position_embeddings=context, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(dtype)
    with torch.no_grad():
        # after the final RMSNorm the hidden state has norm sqrt(hidden); with the random head's 0.02 std the logits
        # stay within about +-1.3 and no LoRA can bring the loss under ~2. A trained head is far larger.
        model.lm_head.weight.mul_(25)
    folder = Path(folder)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder
