"""Z-Image (Turbo and Base): Tongyi-MAI's single-stream diffusion transformer, Qwen3-4B, the Flux.1 autoencoder.

Files as people have them: ComfyUI's split layout (`diffusion_models/z_image_turbo_bf16.safetensors`,
`text_encoders/qwen_3_4b.safetensors`, `vae/ae.safetensors`), all-in-one checkpoints (`model.diffusion_model.*`,
`text_encoders.qwen3_4b.transformer.*`, `vae.*`), transformer files in diffusers' names, and diffusers folders
(`ZImagePipeline`); bf16, fp16 or fp8 (plain or scaled).

The transformer trains as diffusers' `ZImageTransformer2DModel`; ComfyUI's (the original) layout fuses its q, k and
v into `attention.qkv`, which diffusers' own converter splits. The LoRA is written as ai-toolkit writes it:
`diffusion_model.<diffusers module>.lora_A/lora_B/alpha`, which ComfyUI (onto the fused qkv at its rows), Forge Neo
and diffusers load.

As the reference pipeline (diffusers' `ZImagePipeline`; ComfyUI the same): a caption goes into the Qwen3 chat
template, at most 512 tokens, and the states after Qwen3's next-to-last layer (`hidden_states[-2]`) of its real
tokens are the transformer's caption. The transformer takes the time as 1 - sigma (1 = clean) and predicts
x_0 - noise, the negated velocity. Previews use the pipeline's schedule: sigmas 1 .. 1/n, statically shifted by 3.

Turbo (step-distilled) and Base have the same keys; the file name tells them apart ("turbo" in it: Turbo). Turbo
previews take 8 steps without CFG (the pipeline's example); Base 30 steps at CFG 4 (ai-toolkit samples Base with 30
steps; 4 is the CFG musubi-tuner gives as Base's default). CFG here is negative + g x (positive - negative), as in
ComfyUI; diffusers' Z-Image pipeline writes positive + g' x (positive - negative), so its g' is our g - 1.

LoRAs for Turbo train as ai-toolkit trains them: ostris' training adapter (a LoRA that undoes the distillation) is
merged into the frozen transformer (`training_adapter`); the LoRA learns on top of it and is saved without it, to
be used on plain Turbo. Previews take the adapter back out (applied at -1, as ai-toolkit samples), so they show
what the LoRA does on plain Turbo.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL

from lora_trainer.backbones import flux
from lora_trainer.backbones.files import (
    Found,
    Part,
    block_count,
    find_parts,
    read_weights,
    safetensors_keys,
    shape_of,
)
from lora_trainer.backbones.flow import FileTarget, FlowBackbone, time_shift
from lora_trainer.backbones.qwen import qwen3_encoder, qwen3_layers, qwen3_weights, qwen_tokenizer, qwen_tokenizer_from
from lora_trainer.config import TrainConfig
from lora_trainer.errors import CheckpointError

if TYPE_CHECKING:
    from diffusers import ZImageTransformer2DModel

log = logging.getLogger(__name__)

PREFIXES = ("model.diffusion_model.", "diffusion_model.", "")  # where the transformer's keys start in a file
TEMPLATE = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"  # Qwen3's chat template, no thinking block
MAX_TOKENS = 512  # caption tokens the pipeline keeps (template included)
SEQ_MULTIPLE = 32  # the transformer pads its image and caption tokens to multiples of this
SAMPLE_SHIFT = 3.0  # the reference scheduler's static shift (diffusers and ComfyUI)
AXES_LENS = [1536, 512, 512]  # the rotary tables' sizes in the released config (diffusers' default differs)
# the keys that make a file a Z-Image transformer, in ComfyUI's layout and in diffusers' names; Lumina 2, whose
# layout is otherwise the same, modulates through `adaLN_modulation.1` (after a SiLU)
MARKERS = {
    "comfy": ("cap_embedder.1.weight", "x_embedder.weight", "layers.0.attention.qkv.weight",
              "layers.0.adaLN_modulation.0.weight", "noise_refiner.0.attention.k_norm.weight"),
    "diffusers": ("cap_embedder.1.weight", "all_x_embedder.2-1.weight", "layers.0.attention.to_q.weight",
                  "layers.0.adaLN_modulation.0.weight", "noise_refiner.0.attention.norm_k.weight"),
}
OTHER_MODELS = ("siglip_embedder.0.weight", "dec_net.cond_embed.weight")  # Z-Image Omni, the pixel-space variant

QWEN3 = Part("text_encoder", "Qwen3-4B", "qwen_3_4b* or *qwen3*4b* or *qwen*", ("text_encoders.qwen3_4b.transformer.",),
             lambda keys: "model.layers.0.self_attn.q_norm.weight" in keys and "model.embed_tokens.weight" in keys)
PARTS = [QWEN3, next(part for part in flux.PARTS if part.role == "vae")]


ZIMAGE_NEEDS = "Z-Image needs diffusers 0.36 or newer and transformers 4.51 or newer: pip install -U diffusers transformers."


def zimage_classes() -> tuple[type, type, type]:
    """diffusers' ZImageTransformer2DModel and transformers' Qwen3Config and Qwen3Model, or a clear error where the
    installed libraries are older than Z-Image (imported when asked: other families train on older ones)."""
    try:
        from diffusers import ZImageTransformer2DModel
        from transformers import Qwen3Config, Qwen3Model
    except ImportError:
        raise CheckpointError(ZIMAGE_NEEDS) from None
    return ZImageTransformer2DModel, Qwen3Config, Qwen3Model


def transformer_layout(keys: list[str] | set[str]) -> tuple[str, str] | None:
    """(prefix, 'comfy' or 'diffusers') of a Z-Image transformer's keys in a file, or None when it holds none."""
    keys = set(keys)
    for prefix in PREFIXES:
        for layout, markers in MARKERS.items():
            if all(prefix + k in keys for k in markers):
                return None if any(prefix + k in keys for k in OTHER_MODELS) else (prefix, layout)
    return None


def transformer_config(sd: dict[str, torch.Tensor]) -> dict:
    """`ZImageTransformer2DModel`'s arguments read from its weights (diffusers' names). The rotary axes split each
    head as the released model does (32 + 48 + 48 of 128); theta, time scale and table sizes are the release's."""
    dim, cap_feat_dim = sd["cap_embedder.1.weight"].shape
    head_dim = sd["layers.0.attention.norm_q.weight"].shape[0]
    if dim % head_dim or head_dim % 16:
        raise CheckpointError(f"This Z-Image transformer has {head_dim}-wide heads in a {dim}-wide model; Z-Image's "
                              "heads are 128 wide. Is it another model?")
    return {"all_patch_size": (2,), "all_f_patch_size": (1,), "in_channels": sd["all_x_embedder.2-1.weight"].shape[1] // 4,
            "dim": dim, "n_layers": block_count(sd, "layers"), "n_refiner_layers": block_count(sd, "noise_refiner"),
            "n_heads": dim // head_dim, "n_kv_heads": dim // head_dim, "norm_eps": 1e-5, "qk_norm": True,
            "cap_feat_dim": cap_feat_dim, "rope_theta": 256.0, "t_scale": 1000.0,
            "axes_dims": [head_dim // 4, 3 * head_dim // 8, 3 * head_dim // 8], "axes_lens": AXES_LENS}


def transformer_from_file(sd: dict[str, torch.Tensor], layout: str = "comfy") -> ZImageTransformer2DModel:
    """diffusers' Z-Image transformer from a file's weights (prefix removed; ComfyUI's layout converted by diffusers'
    own converter), config read from the shapes; the weights are moved, not copied (meta device, assign)."""
    zimage_classes()
    from diffusers.loaders.single_file_utils import convert_z_image_transformer_checkpoint_to_diffusers

    if layout == "comfy":
        sd = convert_z_image_transformer_checkpoint_to_diffusers(dict(sd))
    with torch.device("meta"):
        model = zimage_classes()[0](**transformer_config(sd))
    missing, unexpected = model.load_state_dict(sd, strict=False, assign=True)
    if missing or unexpected:
        raise CheckpointError(f"The Z-Image transformer did not load cleanly: missing {missing[:4]}, "
                              f"unexpected {unexpected[:4]}.")
    return model


def comfy_from_transformer(model: ZImageTransformer2DModel) -> dict[str, torch.Tensor]:
    """ComfyUI's (the original) layout of diffusers' Z-Image transformer: the inverse of diffusers' converter."""
    renames = (("all_final_layer.2-1.", "final_layer."), ("all_x_embedder.2-1.", "x_embedder."),
               (".attention.to_out.0.", ".attention.out."), (".attention.norm_q.", ".attention.q_norm."),
               (".attention.norm_k.", ".attention.k_norm."))
    out: dict[str, torch.Tensor] = {}
    sd = model.state_dict()
    for key, value in sd.items():
        if key.endswith((".attention.to_k.weight", ".attention.to_v.weight")):
            continue
        if key.endswith(".attention.to_q.weight"):
            block = key.removesuffix(".to_q.weight")
            out[f"{block}.qkv.weight"] = torch.cat([sd[f"{block}.to_{p}.weight"] for p in "qkv"])
            continue
        for old, new in renames:
            key = key.replace(old, new)
        out[key] = value
    return out


def names(config) -> dict[str, FileTarget]:
    """Every linear layer of diffusers' Z-Image transformer -> itself as the file names it (module, 0, rows, rows):
    the LoRA file uses diffusers' names, and hosts map q, k and v onto the fused qkv themselves."""
    dim, ffn = config.dim, int(config.dim / 3 * 8)
    rows: dict[str, int] = {}
    blocks = [f"layers.{i}" for i in range(config.n_layers)] + \
        [f"{kind}.{i}" for kind in ("noise_refiner", "context_refiner") for i in range(config.n_refiner_layers)]
    for block in blocks:
        for leaf, size in (("attention.to_q", dim), ("attention.to_k", dim), ("attention.to_v", dim),
                           ("attention.to_out.0", dim), ("feed_forward.w1", ffn), ("feed_forward.w2", dim),
                           ("feed_forward.w3", ffn)):
            rows[f"{block}.{leaf}"] = size
        if not block.startswith("context_refiner."):  # the caption's refiner is not modulated by the time
            rows[f"{block}.adaLN_modulation.0"] = 4 * dim
    rows.update({"all_x_embedder.2-1": dim, "all_final_layer.2-1.linear": 4 * config.in_channels,
                 "all_final_layer.2-1.adaLN_modulation.1": dim, "cap_embedder.1": dim, "t_embedder.mlp.0": 1024,
                 "t_embedder.mlp.2": min(dim, 256)})
    return {name: (name, 0, size, size) for name, size in rows.items()}


def qwen3_from_state(sd: dict[str, torch.Tensor]):
    """Qwen3 (Qwen3-4B for Z-Image) from its HF-named weights, config read from the shapes. Z-Image reads
    `hidden_states[-2]`, the output of the next-to-last layer: the last layer is not built and the final norm is an
    identity, so the model's `last_hidden_state` is exactly those states."""
    sd = qwen3_weights(sd)
    return qwen3_encoder(sd, qwen3_layers(sd) - 1, ZIMAGE_NEEDS)


def run_transformer(model: ZImageTransformer2DModel, latents: torch.Tensor, t: torch.Tensor, captions: torch.Tensor,
                    real: torch.Tensor) -> torch.Tensor:
    """`ZImageTransformer2DModel.forward` (one image and one caption per example) on tensors of fixed shapes.

    The model's own forward takes lists of captions of their own lengths and reads those lengths in Python, so a
    batch's shapes, masks and positions would change with its captions; a captured CUDA graph replays what it saw
    once. Here each caption comes padded to the batch's fixed `captions.shape[1]` tokens (a multiple of 32) with
    `real` marking its own tokens, and everything that depends on its length is computed as tensors: as in the
    model, a caption of n tokens is filled up to the next multiple of 32 with the learned pad token (attended, at
    the next positions), the image's tokens start at that position + 1, and the tokens beyond are masked out, as
    the model masks the shorter captions of a batch. The result is the model's own (tested against it), x_0 - noise
    for latents (B, C, H, W) at times `t` (1 = clean)."""
    b, c, h, w = latents.shape
    device = latents.device
    lengths = real.sum(1)
    filled = (lengths + SEQ_MULTIPLE - 1) // SEQ_MULTIPLE * SEQ_MULTIPLE  # the caption as the model pads it
    adaln = model.t_embedder(t * model.t_scale).type_as(latents)

    def rope(ids: torch.Tensor) -> torch.Tensor:
        return model.rope_embedder(ids.reshape(-1, 3)).view(*ids.shape[:2], -1)

    def block(layer, *args):
        if torch.is_grad_enabled() and model.gradient_checkpointing:
            return model._gradient_checkpointing_func(layer, *args)
        return layer(*args)

    # the image: 2x2 patches, padded to a multiple of 32 with the learned x_pad_token at position (0, 0, 0)
    ht, wt = h // 2, w // 2
    tokens = ht * wt
    pad = (-tokens) % SEQ_MULTIPLE
    patches = latents.view(b, c, ht, 2, wt, 2).permute(0, 2, 4, 3, 5, 1).reshape(b, tokens, 4 * c)
    x = model.all_x_embedder["2-1"](patches)
    x = torch.cat([x, model.x_pad_token.to(x.dtype).expand(b, pad, -1)], dim=1)
    rows = torch.arange(ht, device=device).repeat_interleave(wt).expand(b, -1)
    cols = torch.arange(wt, device=device).repeat(ht).expand(b, -1)
    img_ids = F.pad(torch.stack([(filled + 1)[:, None].expand(-1, tokens), rows, cols], dim=-1), (0, 0, 0, pad))
    img_freqs = rope(img_ids)
    for layer in model.noise_refiner:
        x = block(layer, x, None, img_freqs, adaln)

    # the caption: its tokens at positions 1, 2, ..., the learned cap_pad_token after them
    position = torch.arange(captions.shape[1], device=device)
    cap = model.cap_embedder(captions)
    cap = torch.where((position[None] >= lengths[:, None])[..., None], model.cap_pad_token.to(cap.dtype), cap)
    cap_freqs = rope(F.pad((position + 1)[None, :, None].expand(b, -1, 1), (0, 2)))
    cap_mask = position[None] < filled[:, None]
    for layer in model.context_refiner:
        cap = block(layer, cap, cap_mask, cap_freqs)

    # both in one sequence, image first
    unified = torch.cat([x, cap], dim=1)
    freqs = torch.cat([img_freqs, cap_freqs], dim=1)
    mask = torch.cat([torch.ones(b, tokens + pad, dtype=torch.bool, device=device), cap_mask], dim=1)
    for layer in model.layers:
        unified = block(layer, unified, mask, freqs, adaln)
    out = model.all_final_layer["2-1"](unified, c=adaln)[:, :tokens]
    return out.reshape(b, ht, wt, 2, 2, c).permute(0, 5, 1, 3, 2, 4).reshape(b, c, h, w)


def variant_of(name: str) -> str:
    """'turbo' for the step-distilled Z-Image-Turbo, else 'base': the weights do not tell them apart, the file
    name does ('z_image_turbo_bf16', 'Z-Image-Turbo'); ostris' De-Turbo (un-distilled) samples like Base."""
    lowered = name.lower().replace("-", "_")
    return "turbo" if "turbo" in lowered and "de_turbo" not in lowered and "deturbo" not in lowered else "base"


def _check_width(path: Path, prefix: str, encoder: Found) -> None:
    """Refuse a text encoder whose states are not as wide as the transformer's caption input (Qwen3-8B for 4B),
    naming the file, before anything loads."""
    width = shape_of(encoder.path, encoder.prefix + "model.embed_tokens.weight")
    wanted = shape_of(path, prefix + "cap_embedder.1.weight")
    if width and wanted and width[1] != wanted[1]:
        raise CheckpointError(f"{encoder.path.name} is not the text encoder this Z-Image transformer takes: it makes "
                              f"states {width[1]} wide where {path.name} needs {wanted[1]}. Use Z-Image's own Qwen3-4B "
                              "(qwen_3_4b.safetensors, in models/text_encoders).")


def _adapter_hook(down: torch.Tensor, up: torch.Tensor):
    """A forward hook that takes a merged LoRA's update (up @ down) back out of a linear layer's output."""
    def hook(module, args, output):
        x = args[0]
        return output - F.linear(F.linear(x, down.to(x.dtype)), up.to(x.dtype))
    return hook


@dataclass
class ZImageBackbone(FlowBackbone):
    """Z-Image Turbo / Base."""

    file_style = "peft"
    file_prefix = "diffusion_model"
    compile_pays_after = 200  # H200, 1024 px: 29 s to compile, 0.152 s saved a step (1.67 -> 2.25 steps/s)
    # tokens every cached caption is padded to: a multiple of 32, the longest caption's (`prepare`)
    caption_room: int = field(default=SEQ_MULTIPLE, init=False)
    # a merged training adapter: (linear layer's name, down, up scaled) each, to take it out of previews
    adapter: list = field(default_factory=list, init=False, repr=False)

    @classmethod
    def detect(cls, config: TrainConfig) -> str | None:
        """'zimage' when `base_model` is a Z-Image transformer file, all-in-one checkpoint or diffusers folder."""
        path = Path(config.base_model).expanduser()
        if path.is_dir():
            return "zimage" if is_zimage_folder(path) else None
        if not path.is_file() or path.suffix.lower() not in (".safetensors", ".gguf"):
            return None
        return "zimage" if transformer_layout(safetensors_keys(path)) is not None else None

    @classmethod
    def load(cls, config: TrainConfig, data) -> ZImageBackbone:
        """The transformer, Qwen3 and the autoencoder from the files or folder the config names, offline; with the
        training adapter merged when the config names one."""
        zimage_classes()
        path = Path(config.base_model).expanduser()
        adapter = config.training_adapter
        if adapter and not Path(adapter).expanduser().is_file():
            raise CheckpointError(f"training_adapter: {adapter} does not exist.")
        if path.is_dir():
            backbone = cls._from_diffusers(path)
        else:
            keys = safetensors_keys(path)
            where = transformer_layout(keys)
            if where is None:
                raise CheckpointError(f"{path.name} holds no Z-Image transformer (Z-Image Omni and the pixel-space "
                                      "variant are not supported).")
            prefix, layout = where
            found = find_parts(path, keys, PARTS, "Z-Image", given=config.text_encoders, vae=config.vae)
            _check_width(path, prefix, found[QWEN3.name])
            tokenizer = qwen_tokenizer(config.tokenizers, path, "Z-Image")  # before the slow loading: a missing tokenizer fails at once
            stored: dict = {}
            transformer = transformer_from_file(read_weights(path, prefix, stored=stored), layout)
            text_encoder = qwen3_from_state(read_weights(found[QWEN3.name].path, found[QWEN3.name].prefix))
            vae_part = found[PARTS[1].name]
            vae = flux.vae_from_state(read_weights(vae_part.path, vae_part.prefix))
            backbone = cls(family="zimage", transformer=transformer, vae=vae, text_encoders=[text_encoder],
                           tokenizers=[tokenizer], name=path.stem, variant=variant_of(path.stem), stored=stored)
        if adapter:
            if backbone.variant != "turbo":
                log.warning("training_adapter is made for Z-Image-Turbo; %s looks like %s by its name.",
                            backbone.name, backbone.variant)
            backbone.merge_training_adapter(str(Path(adapter).expanduser()))
        return backbone

    @classmethod
    def _from_diffusers(cls, folder: Path) -> ZImageBackbone:
        """A diffusers Z-Image folder (transformer/, vae/, text_encoder/, tokenizer/)."""
        options = {"use_safetensors": True, "local_files_only": True}
        try:
            transformer = zimage_classes()[0].from_pretrained(folder, subfolder="transformer", **options)
            vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", **options)
            text_encoder = qwen3_from_state(_folder_weights(folder / "text_encoder"))
            tokenizer = qwen_tokenizer_from(folder / "tokenizer")
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"Cannot load the diffusers folder {folder}: {exc}") from None
        # a hub cache names the snapshot by its hash: models--Tongyi-MAI--Z-Image-Turbo/snapshots/<hash>
        return cls(family="zimage", transformer=transformer, vae=vae, text_encoders=[text_encoder],
                   tokenizers=[tokenizer], name=folder.name, variant=variant_of(" ".join(folder.parts[-3:])))

    # -- the training adapter ----------------------------------------------------------------------

    def merge_training_adapter(self, path: str) -> None:
        """Merge a LoRA file into the frozen transformer at full strength (ostris' Z-Image-Turbo training adapter):
        the LoRA trains on the merged weights, the saved LoRA does not hold it, previews take it back out."""
        modules = self.read_lora(path, alpha=1.0)  # up is rescaled so that up @ down / rank is the update
        with torch.no_grad():
            for name, parts in sorted(modules.items()):
                layer = self.transformer.get_submodule(name)
                down, up = parts["down"], parts["up"] / parts["down"].shape[0]
                if (up.shape[0], down.shape[1]) != tuple(layer.weight.shape):
                    raise CheckpointError(f"training_adapter {path} does not fit this model: {name} is "
                                          f"{tuple(layer.weight.shape)}, the adapter's update {(up.shape[0], down.shape[1])}.")
                layer.weight.data = (layer.weight.float() + up @ down).to(layer.weight.dtype)
                self.adapter.append((name, down, up))
        log.info("Merged the training adapter %s (%d layers) into the transformer.", Path(path).name, len(modules))

    @contextmanager
    def adapter_removed(self) -> Iterator[None]:
        """The transformer as if the training adapter were not merged (its update subtracted from each layer's
        output), for previews of what the LoRA does on the model it is made for."""
        # looked up by name: the layer may since be held in fp8 (base_weights) or wrapped in the LoRA
        layers = [(self.transformer.get_submodule(name), down, up) for name, down, up in self.adapter]
        device = next(self.transformer.parameters()).device
        hooks = [layer.register_forward_hook(_adapter_hook(down.to(device), up.to(device))) for layer, down, up in layers]
        try:
            yield
        finally:
            for hook in hooks:
                hook.remove()

    def sample(self, prompts: list[str], config: TrainConfig) -> list:
        """The previews, on the model without the training adapter (plain Turbo + the LoRA, as used after)."""
        with self.adapter_removed():
            return super().sample(prompts, config)

    # -- the family's answers ----------------------------------------------------------------------

    def defaults(self) -> dict:
        """Sampling as the references do: Turbo 8 steps without CFG, Base 30 steps at CFG 4."""
        turbo = self.variant == "turbo"
        return {"sample_steps": 8 if turbo else 30, "sample_guidance_scale": 1.0 if turbo else 4.0}

    def sampling_schedule(self, steps: int, seq_len: int) -> list[float]:
        """The pipeline's sigmas: 1 .. 1/steps evenly, shifted by 3 (whatever the training times follow)."""
        t = torch.linspace(1.0, 1.0 / steps, steps, dtype=torch.float64)
        return [*time_shift(t, "static", SAMPLE_SHIFT).tolist(), 0.0]

    def prepare(self, config: TrainConfig, data, accelerator, bus):
        """As every flow model, with the captions' padded length fixed first (the longest caption's, the empty one
        too) so that every batch has the same shapes; sample prompts, drawn one at a time, keep their own."""
        captions = {item.caption for item in data.items} | {""}
        longest = max(len(ids) for ids in self.tokenizers[0]([TEMPLATE.format(c) for c in captions],
                                                               max_length=MAX_TOKENS, truncation=True).input_ids)
        self.caption_room = -(-longest // SEQ_MULTIPLE) * SEQ_MULTIPLE
        examples = super().prepare(config, data, accelerator, bus)
        texts = self.run["text_cache"]
        for caption in captions & texts.keys():  # encoded beside a longer sample prompt: cut to the room
            texts[caption] = {k: v[:self.caption_room].clone() for k, v in texts[caption].items()}
        return examples

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        vae = self.vae
        with torch.no_grad():
            latents = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.mean
        return (latents - flux.VAE_SHIFT) * flux.VAE_SCALING

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        vae = self.vae
        return vae.decode((latents / flux.VAE_SCALING + flux.VAE_SHIFT).to(vae.device, vae.dtype)).sample

    def encode_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Qwen3's states of each caption in the chat template (at most 512 tokens), zero after its own tokens and
        padded to `caption_room`; 'mask' marks its tokens (1.0: a float, to be cached in the run's dtype)."""
        encoder, tokenizer = self.text_encoders[0], self.tokenizers[0]
        tokens = tokenizer([TEMPLATE.format(p) for p in prompts], padding="longest", max_length=MAX_TOKENS,
                           truncation=True, return_tensors="pt")
        mask = tokens.attention_mask.to(encoder.device)
        states = encoder(input_ids=tokens.input_ids.to(encoder.device), attention_mask=mask).last_hidden_state
        room = max(self.caption_room, -(-states.shape[1] // SEQ_MULTIPLE) * SEQ_MULTIPLE)
        states = F.pad(states * mask[..., None].to(states.dtype), (0, 0, 0, room - states.shape[1]))
        return {"text": states, "mask": F.pad(mask.float(), (0, room - mask.shape[1]))}

    def predict(self, network: torch.nn.Module, noisy: torch.Tensor, sigmas: torch.Tensor,
                cond: dict[str, torch.Tensor], guidance: float | None = None) -> torch.Tensor:
        """The velocity noise - x_0: the transformer at time 1 - sigma, negated (it predicts x_0 - noise)."""
        return -run_transformer(network, noisy, 1.0 - sigmas.float(), cond["text"].to(noisy.dtype), cond["mask"] > 0.5)

    def file_targets(self) -> dict[str, FileTarget]:
        return names(self.transformer.config)

    def text_tokens(self) -> int:
        """A caption's tokens follow its length (at most 512, in steps of 32): a typical caption's 64."""
        return 64

    def lora_targets(self, kind: str) -> list[str]:
        """attention: q, k, v and out of the main layers; attention_ff: also their feed-forwards (musubi-tuner's
        default); locon: every linear layer, the refiners, modulations and embedders too (as ai-toolkit)."""
        picked = []
        for name in names(self.transformer.config):
            main = name.startswith("layers.")
            if (main and ".attention." in name) or (main and ".feed_forward." in name and kind != "attention") \
                    or kind == "locon":
                picked.append(name)
        return picked


def _folder_weights(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of a transformers model folder's .safetensors files (sharded or not)."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise OSError(f"no .safetensors weights in {folder}")
    return {k: v for file in files for k, v in read_weights(file).items()}


def is_zimage_folder(folder: Path) -> bool:
    """Whether a diffusers folder holds a Z-Image pipeline."""
    index = folder / "model_index.json"
    return index.is_file() and json.loads(index.read_text()).get("_class_name") == "ZImagePipeline"
