"""Causal language models (any `AutoModelForCausalLM` folder, loaded offline): LoRA through peft.

The same config, loop and events as images. What differs lives here: the model and tokenizer, the LoRA (peft's
`LoraConfig(task_type=CAUSAL_LM)`), the data (lora_trainer.data.text: token rows, packed or padded), the
objective (next-token cross-entropy on the tokens that carry a loss), held-out perplexity before and after, and
the output: a peft adapter folder that `PeftModel.from_pretrained` loads, optionally a merged model folder.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Hashable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from lora_trainer import __version__
from lora_trainer.atomic import folder_replaced_atomically
from lora_trainer.config import TrainConfig
from lora_trainer.data.text import IGNORE, Example, TextDataset, build_dataset
from lora_trainer.errors import CheckpointError, ConfigError
from lora_trainer.lora.inject import keep_lora_input_dtype

log = logging.getLogger(__name__)

MIN_TRANSFORMERS = (4, 40)


def _check_transformers() -> None:
    import transformers

    version = tuple(int(p) for p in transformers.__version__.split(".")[:2])
    if version < MIN_TRANSFORMERS:
        raise ConfigError(f"Language-model training needs transformers >= {'.'.join(map(str, MIN_TRANSFORMERS))} "
                          f"(this environment has {transformers.__version__}): pip install -U transformers peft. "
                          "(Inside the WebUI keep its own version; train language models from the command line.)")


def load_causal_lm(folder: Path, config: TrainConfig, dtype: torch.dtype):
    """The model in the folder, offline, its frozen weights in `dtype` (or NF4 with load_in_4bit)."""
    from transformers import AutoModelForCausalLM

    safetensors = any(folder.glob("*.safetensors"))
    kwargs: dict = {"local_files_only": True, "use_safetensors": True if safetensors else None}
    import transformers

    kwargs["dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"] = dtype
    if config.load_in_4bit:
        kwargs.update(_four_bit(dtype))
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(f"Cannot load a causal language model from {folder}: {exc}") from None
    return model


def _four_bit(dtype: torch.dtype) -> dict:
    """from_pretrained arguments for a frozen NF4 model (QLoRA)."""
    if not torch.cuda.is_available():
        raise ConfigError("load_in_4bit needs a CUDA GPU (bitsandbytes' 4-bit kernels); set load_in_4bit: false.")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ConfigError("load_in_4bit needs the bitsandbytes package: pip install bitsandbytes "
                          "(or set load_in_4bit: false).") from None
    from transformers import BitsAndBytesConfig

    compute = dtype if dtype != torch.float32 else torch.bfloat16
    return {"quantization_config": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                      bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute),
            "device_map": {"": torch.cuda.current_device()}}


def attach_lora(model, config: TrainConfig):
    """The model with peft LoRA layers: new ones as the config says, or the adapter folder `init_lora`."""
    from peft import LoraConfig, PeftModel, get_peft_model

    if config.load_in_4bit:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=config.gradient_checkpointing)
    if config.init_lora:
        folder = Path(config.init_lora).expanduser()
        if not (folder / "adapter_config.json").is_file():
            raise ConfigError(f"init_lora for a language model must be a peft adapter folder (adapter_config.json, "
                              f"adapter_model.safetensors); {folder.resolve()} is not one.")
        return PeftModel.from_pretrained(model, str(folder), is_trainable=True)
    if config.target_modules.strip().replace("-", "_") == "all_linear":
        targets = "all-linear"
    else:
        targets = [name.strip() for name in config.target_modules.split(",") if name.strip()]
        present = {name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                   if isinstance(module, torch.nn.Linear) or type(module).__name__ in ("Conv1D", "Linear4bit")}
        missing = [name for name in targets if name not in present]
        if missing or not targets:
            raise ConfigError(f"target_modules {', '.join(missing) or '(empty)'} not found in this model; its linear "
                              f"layers are called {', '.join(sorted(present))} (or use all_linear).")
    lora = LoraConfig(task_type="CAUSAL_LM", r=config.lora_rank, lora_alpha=config.lora_alpha,
                      lora_dropout=config.lora_dropout, target_modules=targets)
    return get_peft_model(model, lora)


def collate(examples: list[Example], pad_id: int, device) -> dict[str, torch.Tensor]:
    """Right-padded input ids and labels; an attention mask only when some row is padded."""
    length = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), length), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), length), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        ids[row, :n] = torch.tensor(example.input_ids)
        labels[row, :n] = torch.tensor(example.labels)
        mask[row, :n] = 1
    batch = {"input_ids": ids, "labels": labels}
    if not bool(mask.all()):
        batch["attention_mask"] = mask
    if torch.device(device).type == "cuda":
        # from pinned memory without waiting: a plain copy would make the CPU wait for the GPU every step, and the
        # next step's kernels could not be queued while this one runs (measured: 17% slower at 1B, seq 1024)
        return {k: v.pin_memory().to(device, non_blocking=True) for k, v in batch.items()}
    return {k: v.to(device) for k, v in batch.items()}


@torch.no_grad()
def perplexity(model, examples: list[Example], batch_size: int, pad_id: int, device, autocast) -> float | None:
    """exp(mean negative log-likelihood) over the held-out tokens that carry a loss; None without any."""
    if not examples:
        return None
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = 0
    ordered = sorted(examples, key=lambda e: len(e.input_ids))
    for k in range(0, len(ordered), batch_size):
        batch = collate(ordered[k:k + batch_size], pad_id, device)
        with autocast():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                           use_cache=False).logits
        labels = batch["labels"][:, 1:]
        total += F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                 ignore_index=IGNORE, reduction="sum").double()
        count += int((labels != IGNORE).sum())
    model.train(was_training)
    return math.exp(float(total) / count) if count else None


@dataclass
class TextData:
    """The tokenized examples and the tokenizer that made them."""

    dataset: TextDataset
    tokenizer: Any
    pad_id: int

    def summary(self) -> str:
        return self.dataset.summary()


@dataclass
class CausalLMBackbone:
    """A causal language model folder; its weights load in `prepare`, where the device and precision are known."""

    folder: Path
    tokenizer: Any
    pad_id: int
    family: str = "causal_lm"
    name: str = "model"
    model: Any = None  # the peft model once `add_lora` ran, the plain one before
    run: dict = field(default_factory=dict, repr=False)
    model_type = "causal_lm"
    can_compile = False  # not measured for language models: torch_compile is ignored with a warning
    compile_pays_after = 0

    @classmethod
    def detect(cls, config: TrainConfig) -> str | None:
        """Every `model_type: causal_lm` config is ours; `load` says what a folder lacks."""
        return "causal_lm"

    @classmethod
    def read_data(cls, config: TrainConfig) -> TextData:
        """Tokenize the examples (the tokenizer and the model's context come from base_model, offline).
        `max_seq_length: 0` becomes 1024, or the model's context where that is shorter."""
        _check_transformers()
        from transformers import AutoConfig

        if config.base_weights in ("fp8", "nf4"):
            raise ConfigError(f"base_weights: {config.base_weights} is for image models; a language model's base is made smaller with "
                              "load_in_4bit: true. Set base_weights: auto.")
        if config.validation_dir or config.use_best:
            raise ConfigError("validation_dir and use_best are for image LoRAs; a language model holds out "
                              "validation_split of its examples, and the result names its best checkpoint folder. Set "
                              "validation_dir: '' and use_best: false.")
        if config.stream_blocks:
            raise ConfigError("stream_blocks is for the diffusion transformers (Flux.1, Z-Image, klein); a language model "
                              "is made smaller with load_in_4bit: true and gradient_checkpointing. Set stream_blocks: 0.")
        folder = _model_folder(config)
        tokenizer = _tokenizer(folder)
        model_config = AutoConfig.from_pretrained(folder, local_files_only=True)
        context = getattr(model_config, "max_position_embeddings", None) or getattr(model_config, "n_positions", None)
        if not config.max_seq_length:
            config.max_seq_length = min(1024, context or 1024)  # resolved here: the model's context decides it
        if context and config.max_seq_length > context:
            raise ConfigError(f"max_seq_length {config.max_seq_length} is longer than this model's context ({context} "
                              f"tokens): set max_seq_length to {context} or less.")
        pad_id = next(t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0) if t is not None)
        dataset = build_dataset(config.train_data_dir, tokenizer, max_seq_length=config.max_seq_length,
                                validation_split=config.validation_split, seed=config.seed, packing=config.packing,
                                pad_id=pad_id)
        if dataset.split_documents:
            log.info("%d documents longer than max_seq_length %d were cut into pieces.", dataset.split_documents,
                     config.max_seq_length)
        return TextData(dataset, tokenizer, pad_id)

    @classmethod
    def load(cls, config: TrainConfig, data: TextData) -> CausalLMBackbone:
        """The model folder, checked; its weights load in `prepare`."""
        folder = _model_folder(config)
        return cls(folder=folder, tokenizer=data.tokenizer, pad_id=data.pad_id, name=folder.name)

    def prepare(self, config: TrainConfig, data: TextData, accelerator, bus) -> list[tuple[Hashable, int]]:
        """Load the frozen model in the run's precision onto the device; rows of one length batch together."""
        device = accelerator.device
        frozen = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
        self.run.update(config=config, accelerator=accelerator, device=device, frozen=frozen, data=data.dataset)
        self.model = load_causal_lm(self.folder, config, frozen)
        if not config.load_in_4bit:
            self.model.to(device)
        self.model.config.use_cache = False
        return [(len(e.input_ids) if config.packing else 0, 1) for e in data.dataset.train]

    def settle(self, config: TrainConfig) -> TrainConfig:
        """Nothing left to the model (max_seq_length was settled with the data)."""
        return config

    def add_lora(self, config: TrainConfig) -> list[dict]:
        """peft LoRA layers as the config says, or the adapter folder `init_lora`, trained in fp32."""
        self.model = attach_lora(self.model, config)
        params = [p for p in self.model.parameters() if p.requires_grad]
        for p in params:
            p.data = p.data.float()  # the LoRA trains in fp32 under autocast; the frozen model stays in `frozen`
        if self.run["frozen"] != torch.float32 and self.run["device"].type in ("cuda", "cpu"):
            keep_lora_input_dtype(self.model)  # every forward there runs under autocast
        if config.gradient_checkpointing:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            self.model.enable_input_require_grads()
        self.run["names"] = [name for name, p in self.model.named_parameters() if p.requires_grad]
        return [{"params": params, "lr": config.learning_rate}]

    def trained_modules(self) -> list[torch.nn.Module]:
        return [self.model]

    def capture_blockers(self, config: TrainConfig) -> list[str]:
        """A captured step needs rows of a few fixed lengths, plain (not 4-bit) weights, and no checkpointing
        (transformers' restores the random state for its attention dropout, which capture refuses)."""
        reasons = ["4-bit weights"] if config.load_in_4bit else []
        if config.gradient_checkpointing:
            reasons.append("gradient checkpointing")
        return reasons + ([] if config.packing else ["without packing every batch has its own length (set packing: true)"])

    def batch(self, indices: list[int], gen: torch.Generator, device_gen: torch.Generator) -> dict[str, torch.Tensor]:
        """The examples' token rows, padded to the longest (no random draws)."""
        return collate([self.run["data"].train[i] for i in indices], self.pad_id, self.run["device"])

    def loss(self, network: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Next-token cross-entropy over the tokens whose label is not IGNORE (transformers computes it)."""
        return network(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"),
                       labels=inputs["labels"], use_cache=False).loss

    def evaluate(self) -> dict[str, float]:
        """Held-out perplexity and its validation loss, the mean negative log-likelihood ({} without held-out
        examples)."""
        run = self.run
        value = perplexity(self.model, run["data"].held_out, max(1, run["config"].batch_size), self.pad_id,
                           run["device"], run["accelerator"].autocast)
        return {} if value is None else {"perplexity": value, "validation_loss": math.log(value)}

    @property
    def can_sample(self) -> bool:
        return False

    def sample(self, prompts: list[str], config: TrainConfig) -> list:
        return []

    def lora_state(self) -> list[dict[str, torch.Tensor]]:
        """The trainable (LoRA) parameters by their peft names."""
        trainable = dict(self.model.named_parameters())
        return [{name: trainable[name].detach() for name in self.run["names"]}]

    def load_lora_state(self, state: list[dict[str, torch.Tensor]]) -> None:
        """Copy checkpointed LoRA parameters back, refusing a checkpoint of other layers."""
        if len(state) != 1 or sorted(state[0]) != sorted(self.run["names"]):
            raise CheckpointError("it was saved with other LoRA layers (target_modules, lora_rank or init_lora "
                                  "differ); resume with the same config.")
        with torch.no_grad():
            for name, p in self.model.named_parameters():
                if name in state[0]:
                    p.copy_(state[0][name])

    def checkpoint_lora(self, folder: Path, out_dir: Path, config: TrainConfig, meta: dict) -> Path | None:
        """A checkpoint holds its adapter (and tokenizer): the folder loads in peft as it is."""
        _write_adapter(folder, self.model, self.tokenizer, config)
        return None

    def export(self, target: Path, config: TrainConfig, meta: dict) -> dict[str, Path]:
        """The adapter folder `target`, and with save_merged_model the full model folder `target`-merged."""
        with folder_replaced_atomically(target) as tmp:
            _write_adapter(tmp, self.model, self.tokenizer, config)
        outputs = {"final": target}
        if config.save_merged_model:
            merged = target.with_name(f"{target.name}-merged")
            with folder_replaced_atomically(merged) as tmp:
                _write_merged(tmp, config, target, self.tokenizer, self.run["frozen"])
            outputs["merged"] = merged
        return outputs


def _model_folder(config: TrainConfig) -> Path:
    """`base_model` as a Hugging Face model folder with safetensors weights, or a clear error."""
    folder = Path(config.base_model).expanduser()
    if not folder.is_dir() or not (folder / "config.json").is_file():
        raise ConfigError(f"base_model must be a Hugging Face model folder with config.json, weights and tokenizer "
                          f"files; {folder.resolve()} {'has no config.json' if folder.is_dir() else 'does not exist'}. "
                          "Get one with `huggingface-cli download ORG/NAME --local-dir FOLDER` on a machine online.")
    if not any(folder.glob("*.safetensors")) and not config.allow_pickle:
        found = sorted(p.name for p in folder.glob("*.bin"))[:3]
        raise ConfigError(f"{folder} has no .safetensors weights{' (only ' + ', '.join(found) + ')' if found else ''}. "
                          "Pickle weights can run code when loaded: set allow_pickle: true only for a model you trust.")
    return folder


def _tokenizer(folder: Path):
    """The model folder's tokenizer, offline."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"Cannot load the tokenizer from {folder}: {exc}") from None

def _write_adapter(folder: Path, model, tokenizer, config: TrainConfig) -> None:
    """peft's adapter files (weights in save_dtype) and the tokenizer, so the folder loads on its own."""
    from safetensors.torch import load_file, save_file

    unwrapped = getattr(model, "module", model)
    unwrapped.save_pretrained(str(folder), safe_serialization=True)
    weights = folder / "adapter_model.safetensors"
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[config.save_dtype]
    tensors = {k: v.to(dtype).contiguous() for k, v in load_file(str(weights)).items()}
    save_file(tensors, str(weights), metadata={"format": "pt", "lora_trainer": __version__})
    tokenizer.save_pretrained(str(folder))


def _write_merged(folder: Path, config: TrainConfig, adapter: Path, tokenizer, dtype: torch.dtype) -> None:
    """A full model folder with the LoRA merged in: the base reloaded unquantized on the CPU, so the GPU's model
    (possibly 4-bit) is not touched and the merge is exact."""
    import transformers
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    key = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    base = AutoModelForCausalLM.from_pretrained(Path(config.base_model).expanduser(), local_files_only=True,
                                                **{key: dtype if dtype != torch.float32 or not config.load_in_4bit
                                                   else torch.bfloat16})
    merged = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()
    merged.save_pretrained(str(folder), safe_serialization=True)
    tokenizer.save_pretrained(str(folder))
