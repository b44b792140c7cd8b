"""The one training config: every key's type, bounds, default and help text, declared once.

YAML files, `--set key=value` overrides, the README's key table and (later) the WebUI form and the
ComfyUI node inputs are all generated from `TrainConfig`'s fields. A plain dataclass rather than a
pydantic model: the WebUI ships pydantic 1 and Forge pydantic 2, and this must import under both.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lora_trainer.errors import ConfigError

log = logging.getLogger(__name__)

FAMILIES = ("sd1", "sd2", "sdxl", "flux1", "zimage", "klein")


def _field(default: Any, help: str, *, group: str, choices: tuple | None = None,
           min: float | None = None, max: float | None = None, preset: bool = False, label: str = "") -> Any:
    """A dataclass field whose metadata carries its help, bounds, choices and form label."""
    meta = {"help": help, "group": group, "choices": choices, "min": min, "max": max, "preset": preset,
            "label": label}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    """Everything that decides a training run. `None` means "from the model family's preset"."""

    # model
    model_type: str = _field("image", "What base_model is: an image model (SD1.x/SD2.x/SDXL, Flux.1, Z-Image, Flux.2 klein), or a causal language model (causal_lm: a local Hugging Face model folder such as LLaMA, Mistral, Qwen or GPT-2). Only the keys of its kind matter.", group="model", choices=("image", "causal_lm"))
    base_model: str = _field("", "Base model: an SD1.x/SD2.x/SDXL single-file .safetensors, a Flux.1 / Z-Image / Flux.2 klein transformer or all-in-one .safetensors (ComfyUI's diffusion_models/ and checkpoints/ files), or a diffusers folder; for causal_lm, a Hugging Face model folder (config.json, *.safetensors, tokenizer files).", group="model", label="Base model")
    family: str = _field("auto", "Model family; 'auto' reads it from the checkpoint's keys.", group="model", choices=("auto", *FAMILIES))
    text_encoders: list = _field([], "Text-encoder files of a transformer-only model (Flux.1: clip_l and t5xxl .safetensors; Z-Image: qwen_3_4b; klein 4B/9B: qwen_3_4b / qwen_3_8b). Empty: taken from the base file if it holds them, else found in ComfyUI's models/text_encoders (or models/clip) beside the base model.", group="model", label="Text encoder files")  # noqa: RUF009 - _field returns a default_factory for lists
    vae: str = _field("", "Autoencoder file of a transformer-only model (Flux.1 and Z-Image: ae.safetensors; klein: flux2-vae.safetensors). Empty: from the base file, else ComfyUI's models/vae beside the base model.", group="model", label="Autoencoder file")
    tokenizers: str = _field("", "Where the tokenizers of the transformer families' text encoders are, offline (Flux.1's T5; Qwen for Z-Image and klein): your ComfyUI or Forge folder, a diffusers folder of the model, or a folder holding the tokenizer files (tokenizer.json, or vocab.json + merges.txt). Empty: the ComfyUI/Forge installation the base model lies in.", group="model", label="Tokenizer folder")
    training_adapter: str = _field("", "Z-Image-Turbo: a LoRA merged into the frozen model while training and left out of the saved LoRA (ostris' zimage_turbo_training_adapter_v2.safetensors), so the LoRA learns on the un-distilled model and is used on plain Turbo; previews take it back out. Empty: none.", group="model", label="Training adapter")
    prediction_type: str = _field("auto", "What the UNet predicts; 'auto' reads the checkpoint: v_prediction for SD2 (768-v) and for SDXL checkpoints marked v_pred (NoobAI-XL v-pred and its merges), else epsilon. A host's model says it itself.", group="model", choices=("auto", "epsilon", "v_prediction"), label="Prediction type")
    zero_terminal_snr: str = _field("auto", "Train with the noise schedule rescaled to zero terminal SNR (the last timestep is pure noise), as v-prediction models marked ztsnr were made; 'auto' reads the checkpoint's ztsnr marker. Needs v_prediction.", group="model", choices=("auto", "on", "off"), label="Zero terminal SNR")
    allow_pickle: bool = _field(False, "Allow loading .ckpt/.pt/.bin files, which can run code when opened. Only for files you trust.", group="model")
    max_token_length: int = _field(75, "Caption tokens the text encoder sees: 75, or 150/225 for long tag lists (encoded in 75-token chunks, as the WebUI does with long prompts).", group="model", choices=(75, 150, 225), label="Caption tokens")
    clip_skip: int | None = _field(None, "Use the text encoder's output this many layers from the end (1 = last layer; 2 is common for anime SD1 models). Ignored for SD2/SDXL, which use their own layer.", group="model", min=1, max=12, preset=True, label="CLIP skip")

    # data
    train_data_dir: str = _field("", "Folder of training images with captions (.txt sidecars, metadata.csv/jsonl, kohya N_name repeat folders).", group="data", label="Image folder")
    resolution: int | None = _field(None, "Training resolution in pixels (the side of a square of the same area).", group="data", min=64, max=4096, preset=True)
    enable_buckets: bool = _field(True, "Keep aspect ratios: group images into buckets of similar shape instead of square crops.", group="data")
    min_bucket_reso: int | None = _field(None, "Smallest bucket side in pixels.", group="data", min=32, max=4096, preset=True, label="Smallest bucket side")
    max_bucket_reso: int | None = _field(None, "Largest bucket side in pixels.", group="data", min=64, max=8192, preset=True, label="Largest bucket side")
    repeats: int = _field(1, "How often each image is seen per epoch (kohya N_name folders set their own).", group="data", min=1, max=1000)
    caption_extension: str = _field(".txt", "Extension of caption sidecar files.", group="data")
    missing_caption: str = _field("trigger", "What an image without a caption gets: the trigger word, an empty caption, or an error.", group="data", choices=("trigger", "empty", "error"))
    trigger_word: str = _field("", "Word put at the start of every caption (unless already there); use it in prompts to call up the LoRA.", group="data")
    shuffle_captions: bool = _field(False, "Shuffle comma-separated tags each time a caption is used.", group="data")
    keep_tokens: int = _field(1, "With shuffling, keep this many leading tags in place (e.g. the trigger word).", group="data", min=0, max=255)
    caption_dropout: float = _field(0.0, "Probability of training on an empty caption (helps unconditional quality).", group="data", min=0.0, max=1.0)
    flip_aug: bool = _field(False, "Also train on mirrored images (not for subjects whose sides differ, e.g. text or asymmetric faces).", group="data", label="Mirror images")
    cache_latents_to_disk: bool = _field(False, "Keep the encoded images in output_dir/cache so the next run starts at once.", group="data", label="Keep encoded images on disk")

    # lora
    lora_rank: int | None = _field(None, "LoRA rank (dim): capacity of the LoRA. 4-16 suits styles and characters on small GPUs.", group="lora", min=1, max=1024, preset=True, label="LoRA rank")
    lora_alpha: float | None = _field(None, "LoRA alpha: the LoRA's output is scaled by alpha/rank. Fixed, never trained.", group="lora", min=0.0, max=4096.0, preset=True, label="LoRA alpha")
    lora_dropout: float = _field(0.0, "Dropout inside the LoRA layers during training.", group="lora", min=0.0, max=0.9, label="LoRA dropout")
    lora_targets: str = _field("attention_ff", "Which UNet layers get a LoRA: attention only; attention + feed-forward + projections (kohya's default); or those plus the ResNet convolutions (LoCon).", group="lora", choices=("attention", "attention_ff", "locon"), label="LoRA layers")
    train_text_encoder: bool = _field(False, "Also train a LoRA on the text encoder(s).", group="lora")
    text_encoder_lr: float | None = _field(None, "Learning rate of the text-encoder LoRA (default: half the UNet's).", group="lora", min=0.0, max=10.0, label="Text encoder learning rate")
    init_lora: str = _field("", "Continue from this LoRA file (kohya format, ours or another tool's) instead of starting from zero.", group="lora", label="Continue from LoRA")

    # training
    epochs: int | None = _field(None, "Passes over the dataset.", group="training", min=1, max=100000, preset=True)
    max_steps: int = _field(0, "Stop after this many optimizer steps (0 = run all epochs).", group="training", min=0, max=10_000_000, label="Max steps")
    batch_size: int | None = _field(None, "Images (language models: sequences) per step. 1-4 images on 8-12 GB GPUs.", group="training", min=1, max=1024, preset=True, label="Batch size")
    gradient_accumulation_steps: int = _field(1, "Add up gradients over this many batches before each optimizer step.", group="training", min=1, max=1024, label="Gradient accumulation")
    learning_rate: float | None = _field(None, "LoRA learning rate (of the UNet's LoRA for images; 1.0 is usual for Prodigy).", group="training", min=0.0, max=10.0, preset=True)
    optimizer: str | None = _field(None, "Optimizer. adamw8bit needs bitsandbytes, prodigy needs prodigyopt, lion needs lion-pytorch.", group="training", choices=("adamw", "adamw8bit", "prodigy", "lion"), preset=True)
    weight_decay: float = _field(0.01, "Weight decay.", group="training", min=0.0, max=1.0)
    lr_scheduler: str | None = _field(None, "Learning-rate schedule after warm-up.", group="training", choices=("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"), preset=True, label="Learning-rate schedule")
    lr_warmup_steps: int | None = _field(None, "Steps of linear warm-up at the start.", group="training", min=0, max=1_000_000, preset=True, label="Warm-up steps")
    max_grad_norm: float = _field(1.0, "Clip gradients to this norm (0 = off).", group="training", min=0.0, max=1000.0, label="Gradient clipping")
    min_snr_gamma: float = _field(5.0, "Min-SNR loss weighting gamma (5 is usual; 0 = off). SD families only.", group="training", min=0.0, max=100.0, label="Min-SNR gamma")
    timestep_sampling: str | None = _field(None, "Flow-matching families (Flux.1): how training times are drawn. logit_normal: most steps at medium noise; shift: logit-normal moved towards noise by discrete_flow_shift; resolution_shift: moved by an amount that grows with the image size, as the Flux.1 pipeline samples; uniform: evenly. SD families draw uniformly.", group="training", choices=("uniform", "logit_normal", "shift", "resolution_shift"), preset=True, label="Timestep sampling")
    discrete_flow_shift: float | None = _field(None, "The shift of timestep_sampling: shift (3.0 moves most steps towards noise; 1.0 = none).", group="training", min=0.1, max=20.0, preset=True, label="Flow shift")
    sigmoid_scale: float = _field(1.0, "Spread of the logit-normal timestep draw (larger: more steps near pure noise and near the image).", group="training", min=0.1, max=10.0, label="Logit-normal scale")
    loss_weighting: str = _field("none", "Flow-matching families: weight each example's loss by its time (sigma_sqrt: more weight near the image; cosmap: as SD3's paper). SD families use min_snr_gamma.", group="training", choices=("none", "sigma_sqrt", "cosmap"), label="Loss weighting")
    train_guidance: float = _field(1.0, "Flux.1-dev's distilled guidance input while training: 1.0, as kohya sd-scripts and ai-toolkit train dev LoRAs.", group="training", min=0.0, max=20.0, label="Training guidance (Flux.1-dev)")
    noise_offset: float = _field(0.0, "Noise offset (0.05-0.1 helps very dark/bright images).", group="training", min=0.0, max=1.0)
    mixed_precision: str = _field("auto", "Compute precision; 'auto' is bf16 on GPUs that have it, else fp16 on GPU, fp32 on CPU.", group="training", choices=("auto", "no", "fp16", "bf16"), label="Mixed precision")
    gradient_checkpointing: bool = _field(False, "Recompute activations in the backward pass: much less memory, ~30% slower. Image models keep the captured CUDA graph step with it.", group="training")
    base_weights: str = _field("auto", "How the frozen base model is held on the GPU. 'fp8': its linear layers in 8 bits with a scale (half the memory of bf16: Flux.1 12 GB instead of 24); each layer dequantizes for its own matmul, the LoRA trains in full precision. 'nf4': 4 bits (bitsandbytes' NF4, a quarter of bf16; moves the LoRA more). 'full': in the training precision. 'auto': as the file stores them (ComfyUI's fp8 and scaled-fp8 files, GGUF files: their values kept exactly), else full. For models loaded from files; a host's model trains as the host holds it.", group="training", choices=("auto", "full", "fp8", "nf4"), label="Base weights")
    fp8_compute: str = _field("off", "Models loaded from files: the frozen base's matmuls in fp8 on GPUs with fp8 tensor cores (RTX 40xx and 50xx, Ada, Hopper, Blackwell): each layer's input is rounded to fp8 for its matmul, which runs at twice bf16's rate. 'on' holds the base in fp8 (base_weights: fp8, or an fp8 file as it is stored); the gradients and the LoRA stay in the training precision. On Flux.1 it was 9% faster than fp8 storage alone, with a LoRA as close to the bf16 one (README, Performance). 'off': the fp8 weights are dequantized for a bf16 matmul.", group="training", choices=("off", "on"), label="fp8 matmuls")
    memory: str = _field("auto", "Fit the run to the GPU's free memory. 'auto': before the model moves to the GPU, its peak memory is predicted from its shapes (see 'plan'), and where it would not fit, the fastest levers that make it fit are turned on: gradient_checkpointing, then stream_blocks, then base_weights: fp8 (never turning off one you set); a run that does not fit even with all of them is refused with the numbers (inside a host: a warning). 'off': train as configured.", group="training", choices=("auto", "off"), label="Fit to GPU memory")
    stream_blocks: int = _field(0, "Diffusion transformers (Flux.1, Z-Image, klein) loaded from files: keep this many of the transformer's blocks in CPU memory and copy each onto the GPU just before it runs, overlapped with the blocks before it (one way: nothing is copied back). Each saves its weights' GPU memory (Flux.1 in fp8: 0.14 or 0.34 GB a block, of 57) for some speed; needs gradient_checkpointing: true. 0: every block stays on the GPU.", group="training", min=0, max=1000, label="Streamed blocks")
    cuda_graphs: str = _field("auto", "Replay each training step as one CUDA graph (several times faster on fast GPUs, where issuing thousands of small kernels is the bottleneck). 'auto' uses it on a CUDA GPU when the run is long enough to pay back the capture and nothing rules it out (adamw; no accumulation, LoRA dropout or text-encoder training; language models: packing, no 4-bit, no checkpointing).", group="training", choices=("auto", "on", "off"), label="CUDA graphs")
    torch_compile: str = _field("auto", "Compile the network with torch.compile for the training step (CUDA GPU with Triton; once per image shape, in the first step of that shape). 'auto' compiles where it pays back within the run: the transformer families (Flux.1, Z-Image, klein) compile their repeated blocks, 30-50 s on an H200 for 1.35x faster steps and less memory, when the run has enough steps per image shape (200-400, the family's own number); SD's whole UNet takes minutes and pays back only after about 10,000, so 'auto' leaves it. 'on' compiles in any case, 'off' never.", group="training", choices=("auto", "on", "off"), label="torch.compile")
    device: str = _field("auto", "Where to train: auto, cpu, cuda, cuda:N or mps.", group="training")
    seed: int = _field(42, "Random seed: same seed and data give the same LoRA.", group="training", min=0, max=2**32 - 1, label="Training seed")

    # output
    output_name: str = _field("", "Name of the LoRA file and of <lora:NAME:weight> (default: the data folder's name + '_lora'). Letters, digits, '-', '_', '.' and spaces; other characters become '_' and a folder part is dropped, so the files stay in their folders.", group="output", label="LoRA name")
    output_dir: str = _field("", "Folder for the run's checkpoints, samples, logs and a copy of the LoRA (empty: output/<LoRA name> from the command line, outputs/lora_trainer/<LoRA name> in the WebUI, lora_trainer/<LoRA name> in ComfyUI's output folder).", group="output", label="Run folder")
    save_dtype: str = _field("fp16", "Precision of the saved LoRA weights.", group="output", choices=("fp16", "bf16", "fp32"), label="Save precision")
    save_every_n_steps: int = _field(0, "Also save a resumable checkpoint every N steps (0 = off).", group="output", min=0, max=10_000_000, label="Save every N steps")
    save_every_n_epochs: int = _field(1, "Save a resumable checkpoint every N epochs (0 = only at the end).", group="output", min=0, max=100000, label="Save every N epochs")
    keep_last_n_checkpoints: int = _field(3, "How many periodic checkpoints to keep (older ones are deleted).", group="output", min=1, max=1000, label="Checkpoints to keep")
    sample_prompts: list = _field([], "Prompts rendered as preview images while training (PNG files and TensorBoard).", group="output")  # noqa: RUF009 - _field returns a default_factory for lists
    sample_every_n_steps: int = _field(0, "Render the sample prompts every N steps (0 = at each save and at the end, so that each saved LoRA has its previews).", group="output", min=0, max=10_000_000, label="Sample every N steps")
    sample_steps: int | None = _field(None, "Denoising steps per sample image.", group="output", min=1, max=200, preset=True, label="Sample steps")
    sample_guidance_scale: float | None = _field(None, "Guidance of sample images: classifier-free guidance for SD, the guidance input for Flux.1-dev.", group="output", min=0.0, max=50.0, preset=True, label="Sample guidance (CFG)")
    log_every_n_steps: int = _field(10, "Read the loss back and log it every N steps.", group="output", min=1, max=100000, label="Log every N steps")

    # validation: which checkpoint is good
    validation_split: float | None = _field(None, "Share of the images (language models: examples) held out of training to measure the validation loss on: a seeded choice, never trained on (0 = none). Preset: 0 for images (every image trains; set 0.1-0.2 to find the best checkpoint), 0.1 for language models.", group="validation", min=0.0, max=0.5, preset=True, label="Validation share")
    validation_dir: str = _field("", "A folder of validation images of its own (same caption rules as the training folder), used instead of validation_split. Empty: none.", group="validation", label="Validation folder")
    validate_every_n_steps: int = _field(0, "Measure the validation loss every N steps (0 = at each save: every save_every_n_epochs/steps and at the end). It is also measured before the first step.", group="validation", min=0, max=10_000_000, label="Validate every N steps")
    early_stop_patience: int = _field(3, "When the validation loss has not improved on its best for this many evaluations while the training loss fell, the run says the LoRA is overfitting (and stops, with early_stop).", group="validation", min=1, max=1000, label="Overfitting patience")
    early_stop: bool = _field(False, "Stop the run when it is overfitting (see early_stop_patience); the LoRA of that step is the finished one.", group="validation", label="Stop when overfitting")
    use_best: bool = _field(False, "At the end, the saved LoRA with the lowest validation loss becomes NAME.safetensors and the last one NAME-last.safetensors. Off: NAME is the last, and the result names the best.", group="validation", label="Use the best checkpoint")

    # language models (model_type: causal_lm)
    target_modules: str = _field("q_proj,v_proj", "Language model layers that get a LoRA: comma-separated module names (q_proj,v_proj as in the lora-scripts article; GPT-2 calls its attention c_attn), or all_linear for every linear layer but the output head.", group="language model")
    max_seq_length: int = _field(0, "Tokens per training sequence (0 = 1024, or the model's context if shorter). Longer .txt documents are cut into pieces; a longer prompt/completion or chat example is an error.", group="language model", min=0, max=1_048_576)
    packing: bool = _field(False, "Concatenate examples into rows of exactly max_seq_length tokens (no padding: faster on many short examples; examples in one row see each other).", group="language model")
    load_in_4bit: bool = _field(False, "QLoRA: keep the frozen model in 4-bit NF4 (needs bitsandbytes and a CUDA GPU): about a quarter of the memory.", group="language model")
    save_merged_model: bool = _field(False, "Also write the model with the LoRA merged in, as a full Hugging Face folder beside the adapter.", group="language model")

    def __post_init__(self) -> None:
        _check(self)


@dataclass
class CaptionConfig:
    """How to caption a folder with BLIP."""

    model: str = _field("Salesforce/blip-image-captioning-base", "BLIP model: a local folder, or a Hugging Face id found in the local cache (base or -large).", group="caption", label="BLIP model")
    output: str = _field("txt", "Where captions go: a .txt file beside each image, metadata.csv (file_name,text) or metadata.jsonl.", group="caption", choices=("txt", "csv", "jsonl"), label="Write captions to")
    caption_extension: str = _field(".txt", "Extension of the caption files written beside the images (output: txt).", group="caption", label="Caption file extension")
    existing: str = _field("keep", "Images that already have a caption: keep it (skip them), overwrite it, or append the new caption to it.", group="caption", choices=("keep", "overwrite", "append"), label="Existing captions")
    prefix: str = _field("", "Text put in front of every caption, e.g. your trigger word.", group="caption", label="Caption prefix")
    suffix: str = _field("", "Text put at the end of every caption.", group="caption", label="Caption suffix")
    prompt: str = _field("", "Conditional start that BLIP continues, e.g. 'a painting of'.", group="caption", label="BLIP start text")
    min_length: int = _field(5, "Fewest new tokens per caption.", group="caption", min=0, max=200, label="Min caption tokens")
    max_length: int = _field(30, "Most new tokens per caption.", group="caption", min=1, max=300, label="Max caption tokens")
    num_beams: int = _field(3, "Beam search width (1 = greedy; more is slower and a little better).", group="caption", min=1, max=16, label="Beams")
    sampling: bool = _field(False, "Sample words instead of searching for the likeliest caption (more varied captions).", group="caption", label="Sample words")
    top_p: float = _field(0.9, "With sampling: keep the smallest set of words whose probability adds up to this.", group="caption", min=0.0, max=1.0, label="Top-p")
    batch_size: int = _field(32, "Images per batch on the GPU.", group="caption", min=1, max=1024, label="Captioning batch size")
    workers: int = _field(0, "Threads decoding images while the GPU works (0 = automatic).", group="caption", min=0, max=64, label="Decoding threads")
    device: str = _field("auto", "Where to run BLIP: auto, cpu, cuda, cuda:N or mps.", group="caption", label="Captioning device")
    dtype: str = _field("auto", "Precision: auto is bf16/fp16 on a GPU and fp32 on the CPU.", group="caption", choices=("auto", "fp32", "fp16", "bf16"), label="Captioning precision")
    seed: int = _field(0, "Seed for sampling.", group="caption", min=0, max=2**32 - 1, label="Captioning seed")
    allow_pickle: bool = _field(False, "Allow a BLIP folder with pytorch_model.bin (pickle) weights.", group="caption", label="Allow pickle BLIP weights")

    def __post_init__(self) -> None:
        _check(self)


# The lora-scripts article's and kohya's names for the same keys.
ALIASES = {
    "pretrained_model_name_or_path": "base_model",
    "model": "base_model",
    "data_dir": "train_data_dir",
    "network_dim": "lora_rank",
    "rank": "lora_rank",
    "network_alpha": "lora_alpha",
    "alpha": "lora_alpha",
    "network_dropout": "lora_dropout",
    "train_batch_size": "batch_size",
    "max_train_epochs": "epochs",
    "num_epochs": "epochs",
    "max_train_steps": "max_steps",
    "lr": "learning_rate",
    "unet_lr": "learning_rate",
    "optimizer_type": "optimizer",
    "lr_warmup": "lr_warmup_steps",
    "shuffle_caption": "shuffle_captions",
    "save_model_as": None,
    "save_precision": "save_dtype",
    "v_parameterization": None,
}

PRESETS: dict[str, dict[str, Any]] = {
    "sd1": {"resolution": 512, "min_bucket_reso": 256, "max_bucket_reso": 1024, "lora_rank": 16, "lora_alpha": 8.0,
                "learning_rate": 1e-4, "optimizer": "adamw", "lr_scheduler": "cosine", "lr_warmup_steps": 0,
                "epochs": 10, "batch_size": 2, "clip_skip": 1, "validation_split": 0.0,
                "timestep_sampling": "uniform", "discrete_flow_shift": 1.0, "sample_steps": 20, "sample_guidance_scale": 7.0},
    "sd2": {"resolution": 768, "min_bucket_reso": 384, "max_bucket_reso": 1536, "lora_rank": 16, "lora_alpha": 8.0,
                "learning_rate": 1e-4, "optimizer": "adamw", "lr_scheduler": "cosine", "lr_warmup_steps": 0,
                "epochs": 10, "batch_size": 2, "clip_skip": 1, "validation_split": 0.0,
                "timestep_sampling": "uniform", "discrete_flow_shift": 1.0, "sample_steps": 20, "sample_guidance_scale": 7.0},
    "causal_lm": {"lora_rank": 8, "lora_alpha": 16.0, "learning_rate": 2e-4, "optimizer": "adamw",
                  "lr_scheduler": "cosine", "lr_warmup_steps": 0, "epochs": 3, "batch_size": 4, "validation_split": 0.1},
    "sdxl": {"resolution": 1024, "min_bucket_reso": 512, "max_bucket_reso": 2048, "lora_rank": 16, "lora_alpha": 8.0,
                 "learning_rate": 1e-4, "optimizer": "adamw", "lr_scheduler": "cosine", "lr_warmup_steps": 0,
                 "epochs": 10, "batch_size": 1, "clip_skip": 1, "validation_split": 0.0,
                "timestep_sampling": "uniform", "discrete_flow_shift": 1.0, "sample_steps": 20, "sample_guidance_scale": 7.0},
    "flux1": {"resolution": 1024, "min_bucket_reso": 256, "max_bucket_reso": 2048, "lora_rank": 16, "lora_alpha": 16.0,
              "learning_rate": 1e-4, "optimizer": "adamw", "lr_scheduler": "constant", "lr_warmup_steps": 0,
              "epochs": 10, "batch_size": 1, "clip_skip": 1, "validation_split": 0.0, "timestep_sampling": "resolution_shift",
              "discrete_flow_shift": 3.0},  # sample_steps and sample_guidance_scale: the loaded model's (dev, schnell)
    "zimage": {"resolution": 1024, "min_bucket_reso": 256, "max_bucket_reso": 2048, "lora_rank": 16, "lora_alpha": 16.0,
               "learning_rate": 1e-4, "optimizer": "adamw", "lr_scheduler": "constant", "lr_warmup_steps": 0,
               "epochs": 10, "batch_size": 1, "clip_skip": 1, "validation_split": 0.0, "timestep_sampling": "shift", "discrete_flow_shift": 3.0},
    "klein": {"resolution": 1024, "min_bucket_reso": 256, "max_bucket_reso": 2048, "lora_rank": 16, "lora_alpha": 16.0,
              "learning_rate": 1e-4, "optimizer": "adamw", "lr_scheduler": "constant", "lr_warmup_steps": 0,
              "epochs": 10, "batch_size": 1, "clip_skip": 1, "validation_split": 0.0, "timestep_sampling": "resolution_shift",
              "discrete_flow_shift": 3.0},
}


def config_fields(cls: type = TrainConfig) -> list[dataclasses.Field]:
    """A config's fields in declaration order (the source for every form and flag)."""
    return list(dataclasses.fields(cls))


def field_kind(f: dataclasses.Field) -> str:
    """A field's value type without its None: "int" for `int | None` (annotations are strings here)."""
    return str(f.type).removesuffix(" | None")


def is_optional(f: dataclasses.Field) -> bool:
    """Whether a field may hold None (left to the model family's preset, or to a default derived from others)."""
    return str(f.type).endswith("| None")


def _check(config: Any) -> None:
    """Coerce and check every field of a config in place: an invalid config cannot be built."""
    for f in dataclasses.fields(config):
        setattr(config, f.name, _coerce(f, getattr(config, f.name)))


def _coerce(f: dataclasses.Field, value: Any) -> Any:
    """Turn a YAML, command-line or form value into the field's type, checking choices and bounds."""
    name, meta, kind = f.name, f.metadata, field_kind(f)
    if value is None:
        if is_optional(f):
            return None
        raise ConfigError(f"'{name}' needs a value. {meta['help']}")
    try:
        if kind == "bool":
            if isinstance(value, str):
                lowered = value.strip().lower()
                if lowered not in ("true", "false", "yes", "no", "1", "0", "on", "off"):
                    raise ValueError(value)
                value = lowered in ("true", "yes", "1", "on")
            elif not isinstance(value, bool):
                raise ValueError(value)
        elif kind == "int":
            number = float(value) if isinstance(value, str) else value
            if isinstance(number, bool) or not float(number).is_integer():
                raise ValueError(value)
            value = int(number)
        elif kind == "float":
            if isinstance(value, bool):
                raise ValueError(value)
            value = float(value)
            if not math.isfinite(value):
                raise ValueError(value)
        elif kind == "list":
            if isinstance(value, str):
                value = [line for line in value.splitlines() if line.strip()]
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ValueError(value)
            value = list(value)
        else:
            if isinstance(value, bool) and {"on", "off"} <= set(meta["choices"] or ()):
                value = "on" if value else "off"  # YAML reads a bare on/off (and true/false) as a boolean
            elif not isinstance(value, (str, int, float)) or isinstance(value, bool):
                raise ValueError(value)
            value = str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"'{name}' must be {_describe_type(f)}, got {value!r}. {meta['help']}") from None
    if name == "device" and not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", value):
        raise ConfigError(f"'device' must be auto, cpu, cuda, cuda:N or mps; got {value!r}.")
    if meta["choices"] and value not in meta["choices"]:
        raise ConfigError(f"'{name}' must be one of {', '.join(map(str, meta['choices']))}; got {value!r}.")
    low, high = meta["min"], meta["max"]
    if (low is not None and value < low) or (high is not None and value > high):
        raise ConfigError(f"'{name}' must be between {low:g} and {high:g}; got {value!r}. {meta['help']}")
    return value


def _describe_type(f: dataclasses.Field) -> str:
    """'an integer', 'a number', ... for error messages."""
    return {"str": "text", "int": "a whole number", "float": "a number", "bool": "true or false",
            "list": "a list of text lines"}[field_kind(f)]


def make_config(values: dict[str, Any], cls: type = TrainConfig) -> Any:
    """Build a config from a mapping, accepting aliases and refusing unknown keys by name."""
    names = [f.name for f in dataclasses.fields(cls)]
    aliases = ALIASES if cls is TrainConfig else {}
    clean: dict[str, Any] = {}
    for key, value in values.items():
        key = str(key)  # YAML reads keys such as `on:` or `1:` as booleans or numbers
        name = aliases.get(key, key)
        if key in aliases and name is None:
            continue  # kohya keys with no meaning here (e.g. save_model_as) are accepted and ignored
        if name not in names:
            close = [n for n in names if n.startswith(key[:4])][:3]
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            raise ConfigError(f"Unknown config key '{key}'.{hint} 'train --help-config' lists every key.")
        clean[name] = value
    return cls(**clean)  # the config checks its own values


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """Read a YAML config file (optional) and apply `key=value` overrides on top."""
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"Config file not found: {path.resolve()}")
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path} is not valid YAML: {exc}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"{path} is not UTF-8 text; save it as UTF-8.") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path} must be a mapping of key: value lines.")
        values.update(loaded)
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ConfigError(f"--set expects key=value, got {item!r}.")
        try:
            values[key.strip()] = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            values[key.strip()] = raw  # not YAML (e.g. "@me"): take the text as typed
    return make_config(values)


def resolve(config: TrainConfig, family: str) -> TrainConfig:
    """Fill the preset values of `family` (or causal_lm) into every key left at None, and derive names and folders."""
    if family not in PRESETS:
        raise ConfigError(f"Unknown model family {family!r}; expected one of {', '.join(FAMILIES)}.")
    values = dataclasses.asdict(config)
    for key, value in PRESETS[family].items():
        if values[key] is None:
            values[key] = value
    typed = values["output_name"].strip()
    values["output_name"] = lora_name(typed, values["train_data_dir"])
    if typed and (note := renamed_note(typed, values["output_name"])):
        log.warning(note)
    values["output_dir"] = values["output_dir"] or str(Path("output") / values["output_name"])
    if family == "causal_lm":
        return TrainConfig(**values)
    values["family"] = family  # prediction_type and zero_terminal_snr 'auto' are settled by the loaded model
    if values["text_encoder_lr"] is None:
        values["text_encoder_lr"] = values["learning_rate"] / 2
    values["min_bucket_reso"] = min(values["min_bucket_reso"], values["resolution"])
    values["max_bucket_reso"] = max(values["max_bucket_reso"], values["resolution"])
    return TrainConfig(**values)


def lora_name(typed: str, train_data_dir: str) -> str:
    """The LoRA's name, for every front door: the typed name, else the data's name + '_lora'; a safe file name."""
    if str(typed).strip():
        return safe_name(typed)
    data = Path(str(train_data_dir).strip())
    stem = data.stem if data.is_file() else data.name  # a language model's data may be one file
    return safe_name(f"{stem or 'my'}_lora")


def safe_name(name: str) -> str:
    """A file name that cannot leave its folder: no separators, no dots in front, no reserved characters."""
    cleaned = re.sub(r"[^\w\-. ]+", "_", Path(str(name).replace("\\", "/")).name).strip(" .")
    cleaned = re.sub(r"\.(safetensors|ckpt|pt)$", "", cleaned, flags=re.IGNORECASE)
    if not cleaned:
        raise ConfigError(f"{name!r} is not a usable file name: use letters, digits, '-', '_' or '.'.")
    return cleaned[:120]


def renamed_note(typed: str, cleaned: str) -> str:
    """What a user is told when their name was changed to stay inside its folder ("" when it was not)."""
    if str(typed).strip() == cleaned:
        return ""
    return f"The name {str(typed).strip()!r} was changed to {cleaned!r}, so its files stay inside their folders."


def step_name(name: str, step: int) -> str:
    """The name of a LoRA saved at `step` (a checkpoint or an interrupted run), the same in every folder."""
    return f"{name}-step{step:08d}"


def to_yaml(config: TrainConfig) -> str:
    """The config as YAML, in field order, for --print-config and for saving beside the LoRA."""
    return yaml.safe_dump(dataclasses.asdict(config), sort_keys=False, allow_unicode=True)


def markdown_table(cls: type = TrainConfig) -> str:
    """Every key as a Markdown table (the README's reference sections are generated from this)."""
    rows = ["| key | default | allowed | what it does |", "| --- | --- | --- | --- |"]
    for f in config_fields(cls):
        meta = f.metadata
        if meta["preset"]:
            values = {family: PRESETS[family].get(f.name, "the model's") for family in FAMILIES}
            same = len(set(values.values())) == 1
            default = f"{values['sd1']!r}" if same else " / ".join(f"{k} {v!r}" for k, v in values.items())
            if f.name in PRESETS["causal_lm"]:
                default += f"; causal_lm {PRESETS['causal_lm'][f.name]!r}"
        else:
            default = repr(f.default if f.default is not dataclasses.MISSING else [])
        if meta["choices"]:
            allowed = ", ".join(map(str, meta["choices"]))
        elif meta["min"] is not None:
            allowed = f"{meta['min']:g} to {meta['max']:g}"
        else:
            allowed = _describe_type(f)
        rows.append(f"| `{f.name}` | {default} | {allowed} | {meta['help']} |")
    return "\n".join(rows)
