"""Stable Diffusion WebUI installer for the lora_trainer extension: installs only what is missing.

The WebUI runs this file in its own Python process at start (and after "Install from URL"). It never
changes the host's torch, numpy, gradio, transformers, pydantic or protobuf: every pip call is
constrained to the versions already installed, and the versions asked for fit what the hosts pin
(AUTOMATIC1111 1.10: transformers 4.30.2, huggingface-hub < 1.0; Forge: diffusers 0.31, peft 0.13.2).
"""

import importlib.metadata
import os
import tempfile

import launch

PROTECTED = ("torch", "torchvision", "numpy", "gradio", "transformers", "pydantic", "protobuf",
             "huggingface-hub", "accelerate", "safetensors", "fastapi", "pillow")
# (distribution, what to install when it is missing or older than the minimum, the minimum)
NEEDED = (
    ("diffusers", "diffusers==0.31.0", (0, 31)),  # 0.31 runs with transformers 4.30 and huggingface-hub < 1.0
    ("peft", "peft==0.13.2", (0, 13)),
    ("tensorboard", "tensorboard", (0,)),
)


def version_of(name):
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def as_tuple(version):
    parts = []
    for piece in version.split(".")[:3]:
        digits = "".join(c for c in piece if c.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def constraints_file():
    """Pin every protected package that is installed to its installed version for the pip runs."""
    lines = [f"{name}=={version}" for name in PROTECTED if (version := version_of(name))]
    handle, path = tempfile.mkstemp(prefix="lora_trainer_constraints_", suffix=".txt")
    with os.fdopen(handle, "w") as out:
        out.write("\n".join(lines) + "\n")
    return path


def main():
    todo = [spec for name, spec, minimum in NEEDED
            if version_of(name) is None or as_tuple(version_of(name)) < minimum]
    clip_vocab = version_of("open-clip-torch") is None  # the CLIP tokenizer's vocabulary ships in its wheel
    if not todo and not clip_vocab:
        return
    constraints = constraints_file()
    try:
        for spec in todo:
            launch.run_pip(f'install -c "{constraints}" "{spec}"', f"{spec} for lora_trainer")
        if clip_vocab:  # without its dependencies: they would pull another torchvision
            launch.run_pip("install --no-deps open-clip-torch", "open-clip-torch (CLIP vocabulary) for lora_trainer")
    finally:
        os.remove(constraints)


main()
