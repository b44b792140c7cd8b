"""Random-weight BLIP models of the real shapes (base, large) or tiny, with a made-up vocabulary.

For the captioning benchmark and the tests: no weights can be downloaded here, and the speed of a
model does not depend on its weights. Captions from these models are random words.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

WORDS = ["a", "an", "the", "of", "on", "in", "with", "and", "photo", "painting", "drawing", "picture", "ink",
         "wash", "mountain", "river", "tree", "cat", "dog", "woman", "man", "city", "street", "night", "red",
         "blue", "green", "black", "white", ",", "."]
SIZES = {
    # vision width, layers, heads, mlp; image size; text width, layers, heads, mlp; vocabulary
    "tiny": (32, 2, 2, 64, 32, 32, 2, 2, 64, len(WORDS) + 6),
    "base": (768, 12, 12, 3072, 384, 768, 12, 12, 3072, 30524),
    "large": (1024, 24, 16, 4096, 384, 768, 12, 12, 3072, 30524),
}


def random_blip(size: str = "tiny", seed: int = 0):
    """A BLIP captioning model with random weights and its processor, at the shapes of `size`."""
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

    v_width, v_layers, v_heads, v_mlp, image, t_width, t_layers, t_heads, t_mlp, vocab = SIZES[size]
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokens = specials + WORDS + [f"w{i}" for i in range(vocab - len(specials) - len(WORDS) - 1)] + ["[DEC]"]
    with tempfile.TemporaryDirectory() as folder:
        vocab_file = Path(folder) / "vocab.txt"
        vocab_file.write_text("\n".join(tokens) + "\n", encoding="utf-8")
        tokenizer = BertTokenizer(str(vocab_file), bos_token="[DEC]")
    text = {"vocab_size": len(tokens), "hidden_size": t_width, "num_hidden_layers": t_layers,
            "num_attention_heads": t_heads, "intermediate_size": t_mlp, "bos_token_id": tokenizer.bos_token_id,
            "sep_token_id": tokenizer.sep_token_id, "eos_token_id": tokenizer.sep_token_id, "pad_token_id": 0}
    vision = {"hidden_size": v_width, "num_hidden_layers": v_layers, "num_attention_heads": v_heads,
              "intermediate_size": v_mlp, "image_size": image, "patch_size": 16 if image >= 224 else 8}
    torch.manual_seed(seed)
    model = BlipForConditionalGeneration(BlipConfig(text_config=text, vision_config=vision, projection_dim=t_width))
    processor = BlipProcessor(BlipImageProcessor(size={"height": image, "width": image}), tokenizer)
    return model.eval(), processor
