"""What every flow-matching diffusion transformer (Flux.1, Z-Image, Flux.2 klein) shares: the training objective,
the cached inputs, the timestep samplers, previews, and LoRA files onto the layouts hosts load.

A family (backbones/flux.py, ...) subclasses `FlowBackbone` with how its parts load, how images and captions
become its inputs (`encode_images`, `encode_prompts`), how the transformer is called (`predict`), which layers
a LoRA wraps, and where each of them lies in the file layout the hosts read (`file_targets`).

The objective is rectified flow, as the reference pipelines sample: x_t = (1 - t) x_0 + t noise, and the
transformer predicts the velocity noise - x_0 at t in (0, 1).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import math
import time
from collections.abc import Hashable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from lora_trainer.backbones import weights_identity
from lora_trainer.backbones.validation import validation_loss
from lora_trainer.config import TrainConfig
from lora_trainer.data import DatasetScan, scan_images, tag_frequency
from lora_trainer.data.cache import assign_buckets, encode_dataset
from lora_trainer.errors import CheckpointError, ConfigError
from lora_trainer.lora.inject import add_lora, fill_lora, keep_lora_input_dtype, load_lora_state, lora_state
from lora_trainer.lora.kohya import kohya_metadata, read_lora_file, save_lora_file
from lora_trainer.memory import capture_blockers, hold_base
from lora_trainer.memory.checkpointing import enable_checkpointing
from lora_trainer.memory.plan import RESERVE, MemoryParts, free_memory, text_placement
from lora_trainer.memory.streaming import BlockStreamer, LayersOnDemand

log = logging.getLogger(__name__)

# a part of a fused layer in the file layout: (the file's module name, first output row, rows, the layer's rows)
FileTarget = tuple[str, int, int, int]


@dataclass
class FlowBackbone:
    """A diffusion transformer to train plus the frozen parts that turn images and captions into its inputs."""

    family: str
    transformer: torch.nn.Module
    vae: torch.nn.Module | None
    text_encoders: list[torch.nn.Module]
    tokenizers: list
    name: str = "model"
    variant: str = ""  # "dev", "schnell", "turbo", "base", "4b", "9b": what the family's defaults follow
    # how the transformer's weights read from a quantized file were stored, by storage address (files.read_weights)
    stored: dict = field(default_factory=dict, repr=False)
    model_type = "image"
    can_compile = True
    # steps per image shape after which compiling has paid for itself; H200, Flux.1-dev 1024 px: 48 s to compile,
    # 0.155 s saved a step (1.68 -> 2.28 steps/s); a slower GPU saves more a step and pays back sooner
    compile_pays_after = 300
    # how the LoRA file names a module: "kohya" (lora_unet_<module with _>.lora_down/lora_up/alpha) or "peft"
    # (<file_prefix>.<module>.lora_A/lora_B/alpha, as ai-toolkit writes and ComfyUI reads for some families)
    file_style = "kohya"
    file_prefix = "lora_unet"
    run: dict = field(default_factory=dict, init=False, repr=False)
    prompt_cache: dict = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        for module in (self.transformer, self.vae, *self.text_encoders):
            if module is not None:
                module.eval()  # frozen: no dropout anywhere (built modules start in training mode)

    # -- what a family answers ---------------------------------------------------------------------

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Normalised latents of images in [-1, 1] (B, 3, H, W)."""
        raise NotImplementedError

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] from normalised latents."""
        raise NotImplementedError

    def encode_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """The transformer's text conditioning, batch first, fixed shapes."""
        raise NotImplementedError

    def predict(self, network: torch.nn.Module, noisy: torch.Tensor, sigmas: torch.Tensor,
                cond: dict[str, torch.Tensor], guidance: float | None = None) -> torch.Tensor:
        """The velocity (noise - x_0) the transformer `network` predicts for `noisy` latents at times `sigmas`;
        `guidance` is the distilled-guidance input where the model has one (None: the training value)."""
        raise NotImplementedError

    def lora_targets(self, kind: str) -> list[str]:
        """Full names of the transformer's layers a LoRA of `kind` wraps (attention, attention_ff, locon = all)."""
        raise NotImplementedError

    def file_targets(self) -> dict[str, FileTarget]:
        """Each LoRA-able layer's place in the file layout hosts load."""
        raise NotImplementedError

    def image_seq_len(self, height: int, width: int) -> int:
        """Tokens the transformer sees for latents of this size (the resolution shift reads it)."""
        return height * width // 4

    def latent_shape(self, size: int) -> tuple[int, int, int]:
        """(channels, height, width) of the latents `encode_images` makes of a `size` x `size` image."""
        return self.vae.config.latent_channels, size // 8, size // 8

    def group(self, entry) -> Hashable:
        """The batches a cached example may join: same key, same input shapes (the image's bucket)."""
        return entry.bucket

    def defaults(self) -> dict:
        """The config values this model decides where the config says None/'auto' (sampling, timesteps)."""
        return {}

    # -- training: what the loop asks (lora_trainer.backbones.Backbone) ----------------------------

    @classmethod
    def read_data(cls, config: TrainConfig) -> DatasetScan:
        """The image folder, scanned; options these models cannot honour are refused here, before any loading."""
        if config.train_text_encoder:
            raise ConfigError("train_text_encoder is for the SD families; the text encoders of diffusion transformers "
                              "(T5-XXL, Qwen3) stay frozen and their outputs are cached. Set train_text_encoder: false.")
        if config.stream_blocks and not config.gradient_checkpointing:
            raise ConfigError("stream_blocks needs gradient_checkpointing: true: the backward pass must run each streamed "
                              "block again, with its weights copied in again, rather than keep them on the GPU. Turn "
                              "gradient_checkpointing on, or set stream_blocks: 0.")
        if config.stream_blocks and config.base_weights == "nf4":
            raise ConfigError("stream_blocks does not stream bitsandbytes' NF4 layers: use base_weights: fp8 with "
                              "stream_blocks, or NF4 (a quarter of the memory) without it.")
        if config.shuffle_captions:
            raise ConfigError("shuffle_captions would need the large text encoder at every step; this family's caption "
                              "encodings are computed once and cached. Set shuffle_captions: false (caption_dropout works).")
        return scan_images(config)

    def prepare(self, config: TrainConfig, data: DatasetScan, accelerator, bus) -> list[tuple[Hashable, int]]:
        """Encode every image and every caption once, then send the encoders away: only the transformer stays."""
        device = accelerator.device
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
        run = self.run
        run.update(config=config, accelerator=accelerator, device=device, dtype=dtype, scan=data)
        run["init"] = self.read_lora(config.init_lora, config.lora_alpha) if config.init_lora else None
        if run["init"]:
            self._check_fits(config.init_lora, run["init"])
        buckets = assign_buckets(data.items, config.resolution, config.enable_buckets,
                                 config.min_bucket_reso, config.max_bucket_reso)
        run["buckets"] = buckets
        if self.vae is not None:
            self.vae.to(device)
        cache_file = Path(config.output_dir) / "cache" / "latents.safetensors" if config.cache_latents_to_disk else None
        vae_batch = max(1, 4 * 512 * 512 // (config.resolution * config.resolution))
        cache = encode_dataset(data.items, buckets, self.encode_images, flip=config.flip_aug, cache_file=cache_file,
                               batch_size=vae_batch, model_id=self.identity() if cache_file else "",
                               on_progress=lambda done, total: bus.emit("progress", done, total, phase="caching"))
        if self.vae is not None:
            self.vae.to("cpu")
        for entry in cache:
            entry.latents = entry.latents.to(device, dtype)
            if entry.latents_flipped is not None:
                entry.latents_flipped = entry.latents_flipped.to(device, dtype)
        run["cache"] = cache
        captions = sorted({entry.item.caption for entry in cache} | ({""} if config.caption_dropout else set()))
        prompts = list(config.sample_prompts) if self.can_sample else []
        texts = self._encode_once(captions + [p for p in prompts if p not in captions] + [""] * bool(prompts), device)
        run["text_cache"] = texts  # kept where the step reads it: on the device when small, else in CPU memory
        self.prompt_cache = {p: texts[p] for p in [*prompts, ""] if p in texts}
        self.transformer.requires_grad_(False)
        blocks = repeated_blocks(self.transformer)
        stream = BlockStreamer(blocks, config.stream_blocks, device, dtype) if config.stream_blocks else None
        hold_base(blocks, config.base_weights, device, dtype, self.stored, "transformer",
                  each=stream.adopt if stream else None, fp8_compute=config.fp8_compute == "on")
        self.stored = {}  # addresses of freed tensors from here on
        if stream:
            stream.finish()  # before the model moves: the streamed blocks' tensors are views into GPU buffers now
            run["stream"] = stream
        # a cast copies every weight: only when some differ (a file may mix dtypes: fp8 or NF4 blocks, fp32 rest)
        mixed = any(p.dtype != dtype for p in self.transformer.parameters() if p.is_floating_point())
        self.transformer.to(device, dtype) if mixed else self.transformer.to(device)
        return [(self.group(entry), 0 if entry.item.held_out else entry.item.repeats * config.repeats)
                for entry in cache]

    def _encode_once(self, texts: list[str], device: torch.device) -> dict[str, dict[str, torch.Tensor]]:
        """Each text's conditioning, computed with the encoders on the device, which then leave it. An encoder too
        large for the memory free (T5-XXL's 9.5 GB on an 8 GB card, or beside the transformer for a preview's new
        prompt) runs with its layers copied in one at a time (`memory.plan.text_placement`)."""
        budget = free_memory(device) - int(RESERVE) if device.type == "cuda" else None
        on_demand = text_placement(self.text_encoders, budget)
        out: dict[str, dict[str, torch.Tensor]] = {}
        with contextlib.ExitStack() as placed, torch.no_grad():
            for encoder, layer_by_layer in zip(self.text_encoders, on_demand):
                if layer_by_layer:
                    log.info("%s does not fit the GPU memory free: it encodes with its layers copied in one at a time.",
                             type(encoder).__name__)
                    placed.enter_context(LayersOnDemand(encoder, device))
                else:
                    encoder.to(device)
                    placed.callback(encoder.to, "cpu")
            for start in range(0, len(texts), 8):
                chunk = texts[start:start + 8]
                encoded = self.encode_prompts(chunk)
                for index, text in enumerate(chunk):
                    out[text] = {k: v[index] for k, v in encoded.items()}
        size = sum(t.numel() * t.element_size() for entry in out.values() for t in entry.values())
        where = device if size < 2**30 else torch.device("cpu")
        return {text: {k: v.to(where, self.run["dtype"]) for k, v in entry.items()} for text, entry in out.items()}

    def settle(self, config: TrainConfig) -> TrainConfig:
        """The config with what this model decides where it said None or 'auto'."""
        values = {key: value for key, value in self.defaults().items() if getattr(config, key) in (None, "auto")}
        return dataclasses.replace(config, **values) if values else config

    def identity(self) -> str:
        """What the latent cache is keyed by: the transformer's and the autoencoder's weights."""
        return weights_identity(self.transformer, self.vae)

    def add_lora(self, config: TrainConfig) -> list[dict]:
        """LoRA layers on the transformer, filled from init_lora if given."""
        init = self.run["init"]
        targets = sorted(set(self.lora_targets(config.lora_targets)) | set(init or ()))
        ranks = {name: parts["down"].shape[0] for name, parts in (init or {}).items()}
        params = add_lora(self.transformer, targets, config.lora_rank, config.lora_alpha, config.lora_dropout, ranks)
        for p in params:  # before filling: peft makes the LoRA of a quantized layer in its compute dtype
            p.data = p.data.float()
        if init:
            fill_lora(self.transformer, init)
        if self.run["dtype"] != torch.float32:
            keep_lora_input_dtype(self.transformer)
        self.run["checkpointing_captured"] = True
        if config.gradient_checkpointing:
            self.run["checkpointing_captured"] = enable_checkpointing(self.transformer, recompute_in=attention_kernels)
        return [{"params": params, "lr": config.learning_rate}]

    def trained_modules(self) -> list[torch.nn.Module]:
        """The transformer."""
        return [self.transformer]

    def compiled(self, network: torch.nn.Module) -> torch.nn.Module:
        """Regional compilation: each of the transformer's repeated blocks (diffusers' `_repeated_blocks`) compiled in
        place, one graph serving every block of a kind: on the H200 the captured Flux.1 step ran 1.35x faster so (its
        element-wise kernels fused), and compiling took 48 s where the whole 57-block model takes minutes. Previews run
        the blocks uncompiled (`render`): their shapes and no-grad mode would each cost a compile."""
        blocks = repeated_blocks(network)
        if self.run.get("stream"):
            log.warning("torch_compile is not used with stream_blocks yet (not measured together); training uncompiled.")
            return network
        if not hasattr(torch.compiler, "set_stance"):  # torch before 2.6: previews could not run the blocks plainly
            log.warning("torch_compile needs torch 2.6 or newer for %s models; training uncompiled.", self.family)
            return network
        if not blocks:
            return torch.compile(network)
        for block in blocks:
            block.compile()
        self.run["compiled_blocks"] = blocks
        return network

    def uncompiled(self):
        """A context in which the compiled blocks run as plain modules (torch's 'force_eager' stance)."""
        if not self.run.get("compiled_blocks"):
            return contextlib.nullcontext()
        return torch.compiler.set_stance("force_eager")

    def memory_parts(self, config: TrainConfig) -> MemoryParts:
        """What the run puts on the GPU (`memory.plan`): the transformer, its blocks (quantized, streamed), the text
        encoders and the autoencoder while the inputs are cached."""
        channels, height, width = self.latent_shape(config.resolution)
        return MemoryParts(family=self.family, network=self.transformer, targets=self.lora_targets(config.lora_targets),
                           blocks=repeated_blocks(self.transformer), encoders=[*self.text_encoders, self.vae],
                           tokens=self.image_seq_len(height, width) + self.text_tokens(),
                           latent_bytes=2 * channels * height * width, streams=True, stored=self.stored)

    def text_tokens(self) -> int:
        """Caption tokens the transformer sees with the image (the family's padded length; a typical caption where
        the length follows the caption)."""
        return 512

    def capture_blockers(self, config: TrainConfig) -> list[str]:
        """The memory levers' reasons (`memory.capture_blockers`)."""
        return capture_blockers(config.base_weights, self.run["checkpointing_captured"])

    def batch(self, indices: list[int], gen: torch.Generator, device_gen: torch.Generator,
              times: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Latents (mirrored by coin flips from `gen`), captions (dropped by draws from `gen`), noise and times (from
        `device_gen`), the noised latents and the velocity target. A validation batch gives `times` (quantiles of the
        training's time distribution, per example) and is neither mirrored nor has captions dropped."""
        run, config = self.run, self.run["config"]
        cache, device, dtype = run["cache"], run["device"], run["dtype"]
        augment = times is None
        flips = (torch.rand(len(indices), generator=gen) < 0.5).tolist() if augment else [False] * len(indices)
        latents = torch.stack([cache[i].latents_flipped if config.flip_aug and flip else cache[i].latents
                               for i, flip in zip(indices, flips)])
        captions = [cache[i].item.caption for i in indices]
        if config.caption_dropout and augment:
            dropped = (torch.rand(len(indices), generator=gen) < config.caption_dropout).tolist()
            captions = ["" if drop else caption for caption, drop in zip(captions, dropped)]
        texts = run["text_cache"]
        cond = {k: torch.stack([texts[c][k] for c in captions]).to(device, non_blocking=True) for k in texts[captions[0]]}
        noise = torch.randn(latents.shape, generator=device_gen, device=device, dtype=dtype)
        if config.noise_offset:
            noise = noise + config.noise_offset * torch.randn(latents.shape[:2] + (1, 1), generator=device_gen,
                                                              device=device, dtype=dtype)
        sigmas = self.sample_times(len(indices), latents.shape[-2:], device_gen, device, times)
        s = sigmas.view(-1, 1, 1, 1).to(dtype)
        inputs = {"noisy": (1 - s) * latents + s * noise, "sigmas": sigmas, "target": noise - latents,
                  **{f"cond_{k}": v for k, v in cond.items()}}
        if config.loss_weighting == "sigma_sqrt":
            inputs["weight"] = (sigmas.float() ** -2.0).clamp(max=100.0)
        elif config.loss_weighting == "cosmap":
            inputs["weight"] = 2.0 / (math.pi * (1 - 2 * sigmas.float() + 2 * sigmas.float() ** 2))
        return inputs

    def sample_times(self, count: int, latent_size: tuple[int, int], device_gen: torch.Generator,
                     device: torch.device, quantiles: torch.Tensor | None = None) -> torch.Tensor:
        """Times t in (0, 1) per example, as `timestep_sampling` says (the family's preset picks one): drawn, or at
        the given `quantiles` of that distribution (validation)."""
        config = self.run["config"]
        how = config.timestep_sampling
        uniform = torch.rand(count, generator=device_gen, device=device) if quantiles is None else quantiles.to(device)
        if how == "uniform":
            return uniform
        normal = torch.randn(count, generator=device_gen, device=device) if quantiles is None else \
            math.sqrt(2) * torch.erfinv(2 * uniform.float() - 1)
        t = torch.sigmoid(config.sigmoid_scale * normal)
        if how == "shift":
            return time_shift(t, "static", config.discrete_flow_shift)
        if how == "resolution_shift":
            return time_shift(t, "exponential", self.resolution_mu(self.image_seq_len(*latent_size)))
        return t  # logit_normal

    def resolution_mu(self, seq_len: int) -> float:
        """The log-shift the reference pipeline takes for an image of `seq_len` tokens (Flux.1's line through
        (256, 0.5) and (4096, 1.15))."""
        return 0.5 + (1.15 - 0.5) * (seq_len - 256) / (4096 - 256)

    def loss(self, network: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Mean squared error of the predicted velocity, per example weighted if asked."""
        cond = {k.removeprefix("cond_"): v for k, v in inputs.items() if k.startswith("cond_")}
        self.new_pass()
        with attention_kernels():
            pred = self.predict(network, inputs["noisy"], inputs["sigmas"], cond)
        loss = F.mse_loss(pred.float(), inputs["target"].float(), reduction="none").mean(dim=tuple(range(1, pred.ndim)))
        if "weight" in inputs:
            loss = loss * inputs["weight"]
        return loss.mean()

    def new_pass(self) -> None:
        """Before each call of the transformer: block streaming starts its copies afresh (`BlockStreamer.reset`)."""
        if self.run.get("stream"):
            self.run["stream"].reset()

    def evaluate(self) -> dict[str, float]:
        """The validation loss of the LoRA as it is now ({} without held-out images)."""
        return validation_loss(self)

    @property
    def can_sample(self) -> bool:
        """Whether previews can be drawn: the autoencoder and the text encoders are here."""
        return self.vae is not None and bool(self.text_encoders)

    def sample(self, prompts: list[str], config: TrainConfig) -> list:
        """The sample prompts rendered with the LoRA as it is now, at the training resolution."""
        self.transformer.eval()
        with self.run["accelerator"].autocast():
            images = [self.render(prompt, steps=config.sample_steps, guidance=config.sample_guidance_scale,
                                  seed=config.seed + index, size=config.resolution)
                      for index, prompt in enumerate(prompts)]
        self.transformer.train()
        return images

    def render(self, prompt: str, *, steps: int, guidance: float, seed: int, size: int, negative: str = ""):
        """One image of `prompt` as the model is now: Euler steps along the flow from noise, on the family's
        time schedule. Written out rather than through diffusers' pipelines, which take their device from the text
        encoders (in CPU memory here) and would re-encode every prompt."""
        from PIL import Image

        device = next(self.transformer.parameters()).device
        dtype = next(self.transformer.parameters()).dtype
        cond = self._prompt(prompt, device, dtype)
        uncond = self._prompt(negative, device, dtype) if guidance > 1 and self.uses_cfg() else None
        size = size // 16 * 16
        shape = self.latent_shape(size)
        generator = torch.Generator(device="cpu").manual_seed(seed)
        x = torch.randn((1, *shape), generator=generator).to(device, dtype)
        schedule = self.sampling_schedule(steps, self.image_seq_len(*shape[1:]))
        with torch.no_grad(), self.uncompiled():
            for sigma, sigma_next in itertools.pairwise(schedule):
                t = torch.full((1,), float(sigma), device=device)
                self.new_pass()
                velocity = self.predict(self.transformer, x, t, cond, guidance=guidance).float()
                if uncond is not None:
                    self.new_pass()
                    negative_v = self.predict(self.transformer, x, t, uncond, guidance=guidance).float()
                    velocity = negative_v + guidance * (velocity - negative_v)
                x = (x.float() + (float(sigma_next) - float(sigma)) * velocity).to(dtype)
            if self.vae is not None:
                self.vae.to(device)
            pixels = self.decode_latents(x.float())
            if self.vae is not None:
                self.vae.to("cpu")
        array = ((pixels[0].clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
        return Image.fromarray(array)

    def _prompt(self, text: str, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """A prompt's conditioning (batch of one), cached from `prepare` or encoded now."""
        if text not in self.prompt_cache:
            self.prompt_cache.update(self._encode_once([text], device))
        return {k: v.unsqueeze(0).to(device, dtype) for k, v in self.prompt_cache[text].items()}

    def uses_cfg(self) -> bool:
        """Whether previews mix in a negative prediction (classifier-free guidance) for guidance above 1."""
        return True

    def sampling_schedule(self, steps: int, seq_len: int) -> list[float]:
        """Times from 1 to 0 for `steps` Euler steps, shifted as the family's reference pipeline shifts them."""
        t = torch.linspace(1.0, 1.0 / steps, steps, dtype=torch.float64)
        config = self.run.get("config")
        how = config.timestep_sampling if config else "resolution_shift"
        shift = config.discrete_flow_shift if config else 3.0
        t = time_shift(t, "exponential", self.resolution_mu(seq_len)) if how == "resolution_shift" else \
            time_shift(t, "static", shift) if how == "shift" else t
        return [*t.tolist(), 0.0]

    # -- LoRA state and files ----------------------------------------------------------------------

    def lora_state(self) -> list[dict[str, torch.Tensor]]:
        """The transformer's LoRA weights (peft naming)."""
        return [lora_state(self.transformer)]

    def load_lora_state(self, state: list[dict[str, torch.Tensor]]) -> None:
        """Put checkpointed LoRA weights back."""
        load_lora_state(self.transformer, state[0])

    def checkpoint_lora(self, folder: Path, out_dir: Path, config: TrainConfig, meta: dict) -> Path | None:
        """The LoRA of a checkpoint goes beside it, as NAME-stepN.safetensors (ready to use)."""
        return self._write_lora(out_dir / f"{meta['name']}.safetensors", config, meta)

    def export(self, target: Path, config: TrainConfig, meta: dict) -> dict[str, Path]:
        """The finished LoRA, in the layout ComfyUI, Forge and diffusers load."""
        return {"final": self._write_lora(target.with_name(f"{target.name}.safetensors"), config, meta)}

    def _write_lora(self, path: Path, config: TrainConfig, meta: dict) -> Path:
        run = self.run
        tensors = self.to_file(lora_state(self.transformer), config.lora_alpha, config.save_dtype)
        info = {**meta, "scan": run["scan"], "tags": tag_frequency(run["scan"].training), "buckets": run["buckets"],
                "model_name": self.name, "finished_at": time.time(), "variant": self.variant}
        return save_lora_file(path, tensors, kohya_metadata(config, self.family, info))

    def to_file(self, state: dict[str, torch.Tensor], alpha: float, dtype: str = "fp16") -> dict[str, torch.Tensor]:
        """Peft LoRA weights as the file's modules. Parts of one fused layer of the file (q, k and v of `qkv`) become
        one module: their downs stacked, their ups placed block-diagonally at their rows, alpha scaled with the
        rank so the effect is exactly the trained one."""
        from lora_trainer.lora.kohya import DTYPES

        targets = self.file_targets()
        fused: dict[str, list] = {}
        for key, down in state.items():
            if not key.endswith(".lora_A.weight"):
                continue
            name = key.removesuffix(".lora_A.weight")
            up = state[f"{name}.lora_B.weight"]
            fused.setdefault(targets[name][0], []).append((targets[name], down.float(), up.float()))
        out: dict[str, torch.Tensor] = {}
        for module, parts in sorted(fused.items()):
            rank = sum(down.shape[0] for _, down, _ in parts)
            total_rows = parts[0][0][3]
            file_alpha = alpha * rank / parts[0][1].shape[0]
            down = torch.cat([d for _, d, _ in parts])
            up = torch.zeros(total_rows, rank)
            column = 0
            for (_, row, rows, _), d, u in parts:
                # each part's own scale is alpha / its rank; the file's is file_alpha / rank
                up[row:row + rows, column:column + d.shape[0]] = u * (alpha / d.shape[0]) / (file_alpha / rank)
                column += d.shape[0]
            key = self.file_key(module)
            down_name, up_name = ("lora_down", "lora_up") if self.file_style == "kohya" else ("lora_A", "lora_B")
            out[f"{key}.{down_name}.weight"] = down.to(DTYPES[dtype]).contiguous()
            out[f"{key}.{up_name}.weight"] = up.to(DTYPES[dtype]).contiguous()
            out[f"{key}.alpha"] = torch.tensor(float(file_alpha))
        return out

    def file_key(self, module: str) -> str:
        """A file-layout module's name in the LoRA file."""
        if self.file_style == "kohya":
            return f"{self.file_prefix}_{module.replace('.', '_')}"
        return f"{self.file_prefix}.{module}"

    def read_lora(self, path: str, alpha: float) -> dict[str, dict]:
        """A LoRA file for this family as {layer: {'down', 'up'}} in the transformer's names, `up` rescaled to `alpha`
        (the file's scale folded in). Read: kohya names (`lora_unet_double_blocks_0_img_attn_qkv`), the original
        layout's names (`diffusion_model.double_blocks.0.img_attn.qkv`) and diffusers names
        (`transformer.transformer_blocks.0.attn.to_q`), with lora_down/up or lora_A/B. A fused layer's LoRA gives
        each part the shared down and its rows of up."""
        tensors, _ = read_lora_file(path)
        by_file: dict[str, list[tuple[str, int, int]]] = {}
        for name, (module, row, rows, _) in self.file_targets().items():
            by_file.setdefault(module, []).append((name, row, rows))
        lookup: dict[str, list[tuple[str, int | None, int]]] = {}
        for module, parts in by_file.items():
            lookup[f"lora_unet_{module.replace('.', '_')}"] = parts
            lookup[self.file_key(module)] = parts
            lookup[module] = parts
        own = set(self.file_targets())
        modules: dict[str, dict[str, torch.Tensor]] = {}
        for key, value in tensors.items():
            for suffix, part in ((".lora_down.weight", "down"), (".lora_A.weight", "down"), (".lora_up.weight", "up"),
                                 (".lora_B.weight", "up"), (".alpha", "alpha")):
                if key.endswith(suffix):
                    modules.setdefault(key.removesuffix(suffix), {})[part] = value
                    break
            else:
                raise CheckpointError(f"{path}: '{key}' is not a LoRA weight this trainer reads (lora_down/lora_up/"
                                      "alpha or lora_A/lora_B).")
        out: dict[str, dict] = {}
        unknown = []
        for key, parts in modules.items():
            name = key
            for prefix in ("diffusion_model.", "model.diffusion_model.", "transformer.", "base_model.model."):
                name = name.removeprefix(prefix)
            if name in own:
                places = [(name, None, 0)]
            elif key in lookup or name in lookup:
                places = lookup.get(key) or lookup[name]
            else:
                unknown.append(key)
                continue
            if "down" not in parts or "up" not in parts:
                raise CheckpointError(f"{path}: module {key} lacks its down or up weight.")
            rank = parts["down"].shape[0]
            scale = float(parts["alpha"]) / rank if "alpha" in parts else 1.0
            for target, row, rows in places:
                up = parts["up"] if row is None else parts["up"][row:row + rows]
                out[target] = {"down": parts["down"].float(), "up": up.float() * scale / (alpha / rank)}
        if unknown:
            raise CheckpointError(f"{path} does not fit this {self.family} model: {len(unknown)} modules have no match "
                                  f"(e.g. {', '.join(unknown[:3])}). Was it trained on another model family?")
        if not out:
            raise CheckpointError(f"{path} holds no LoRA modules.")
        return out

    def _check_fits(self, path: str, init: dict[str, dict]) -> None:
        """Refuse an init_lora whose shapes are not this model's (a LoRA of a model with other layer sizes)."""
        wrong = []
        for name, parts in init.items():
            weight = self.transformer.get_submodule(name).weight
            if parts["down"].shape[1] != weight.shape[1] or parts["up"].shape[0] != weight.shape[0]:
                wrong.append(f"{name}: down {tuple(parts['down'].shape)}, up {tuple(parts['up'].shape)} for a layer "
                             f"of {tuple(weight.shape)}")
        if wrong:
            raise CheckpointError(f"init_lora {path} does not fit this model: {len(wrong)} of its {len(init)} modules "
                                  f"have other shapes (e.g. {wrong[0]}). Continue from a LoRA trained on this base model.")

    def apply_lora_file(self, path: str, strength: float = 1.0) -> None:
        """Put a LoRA file onto the transformer at `strength` (previews of a finished LoRA, tests)."""
        modules = self.read_lora(path, alpha=1.0)
        ranks = {name: parts["down"].shape[0] for name, parts in modules.items()}
        for parts in modules.values():
            parts["up"] = parts["up"] * strength
        add_lora(self.transformer, sorted(modules), max(ranks.values()), 1.0, 0.0, ranks)
        fill_lora(self.transformer, modules)
        self.transformer.requires_grad_(False)


def repeated_blocks(network: torch.nn.Module) -> list[torch.nn.Module]:
    """A transformer's repeated blocks: the classes diffusers names in `_repeated_blocks`, or (diffusers before 0.35
    names none) the members of the transformer's own block lists."""
    kinds = set(getattr(network, "_repeated_blocks", ()))
    if kinds:
        return [module for module in network.modules() if type(module).__name__ in kinds]
    return [block for child in network.children() if isinstance(child, torch.nn.ModuleList) for block in child]


def attention_kernels():
    """Scaled-dot-product attention without cuDNN's kernel, whose backward fails on an H200 (torch 2.11, CUDA 13)
    at Flux's 4,608-token sequences with "mha_graph.execute ... is_good()" and an illegal memory access; flash and
    memory-efficient attention serve the same shapes. A context, not a global switch: a host's own sampling keeps
    its kernels."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # torch before 2.3 has no cuDNN attention either
        return contextlib.nullcontext()
    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


def time_shift(t: torch.Tensor, kind: str, value: float) -> torch.Tensor:
    """Times moved towards noise as the reference schedules do: 'static' s*t / (1 + (s - 1) t) (shift s), or
    'exponential' e^mu / (e^mu + 1/t - 1) (Flux's resolution-dependent mu)."""
    if kind == "static":
        return value * t / (1 + (value - 1) * t)
    return math.exp(value) / (math.exp(value) + (1 / t - 1))
