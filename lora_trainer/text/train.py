"""LoRA for causal language models through peft, with the image trainer's lifecycle.

The same config, command and events as images: accelerate for devices, precision and several GPUs; the same
schedules, accumulation, checkpoints every N steps/epochs with exact resume, `init_lora`, TensorBoard, progress
and Ctrl-C. What differs is the model (any `AutoModelForCausalLM` folder, loaded offline), the LoRA (peft's
`LoraConfig(task_type=CAUSAL_LM)`), the data (lora_trainer.data.text) and the output: a peft adapter folder
that `PeftModel.from_pretrained` loads, optionally a merged model folder, and held-out perplexity before and after.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

from lora_trainer import __version__
from lora_trainer.config import TrainConfig, resolve, to_yaml
from lora_trainer.data.text import IGNORE, Example, build_dataset
from lora_trainer.errors import CheckpointError, ConfigError, TrainingError
from lora_trainer.events import CancelToken, EventBus, Listener
from lora_trainer.train.graphs import CapturedStep, average_across_processes, graphs_wanted
from lora_trainer.train.optim import make_optimizer, make_scheduler

log = logging.getLogger(__name__)

MIN_TRANSFORMERS = (4, 40)


def _check_transformers() -> None:
    import transformers

    version = tuple(int(p) for p in transformers.__version__.split(".")[:2])
    if version < MIN_TRANSFORMERS:
        raise ConfigError(f"Language-model training needs transformers >= {'.'.join(map(str, MIN_TRANSFORMERS))} "
                          f"(this environment has {transformers.__version__}): pip install -U transformers peft. "
                          "(Inside the WebUI keep its own version; train language models from the command line.)")


def load_causal_lm(config: TrainConfig, dtype: torch.dtype):
    """(tokenizer, model) from the local folder `base_model`, offline; clear errors for what is missing."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(config.base_model).expanduser()
    if not folder.is_dir() or not (folder / "config.json").is_file():
        raise ConfigError(f"base_model must be a Hugging Face model folder with config.json, weights and tokenizer "
                          f"files; {folder.resolve()} {'has no config.json' if folder.is_dir() else 'does not exist'}. "
                          "Get one with `huggingface-cli download ORG/NAME --local-dir FOLDER` on a machine online.")
    safetensors = any(folder.glob("*.safetensors"))
    if not safetensors and not config.allow_pickle:
        found = sorted(p.name for p in folder.glob("*.bin"))[:3]
        raise ConfigError(f"{folder} has no .safetensors weights{' (only ' + ', '.join(found) + ')' if found else ''}. "
                          "Pickle weights can run code when loaded: set allow_pickle: true only for a model you trust.")
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"Cannot load the tokenizer from {folder}: {exc}") from None
    kwargs: dict = {"local_files_only": True, "use_safetensors": True if safetensors else None}
    import transformers

    kwargs["dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"] = dtype
    if config.load_in_4bit:
        kwargs.update(_four_bit(dtype))
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(f"Cannot load a causal language model from {folder}: {exc}") from None
    return tokenizer, model


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


def plan_batches(examples: list[Example], config: TrainConfig, epochs: int) -> list[tuple[int, list[int]]]:
    """(epoch, example indices) of every batch; rows of one length together (packed rows are all one length)."""
    from lora_trainer.train.loop import _rng

    plan = []
    for epoch in range(epochs):
        gen = _rng(config.seed, 1, epoch)
        order = torch.randperm(len(examples), generator=gen).tolist()
        groups: dict[int, list[int]] = {}
        for index in order:
            groups.setdefault(len(examples[index].input_ids) if config.packing else 0, []).append(index)
        batches = [members[k:k + config.batch_size] for members in groups.values()
                   for k in range(0, len(members), config.batch_size)]
        plan += [(epoch, batches[j]) for j in torch.randperm(len(batches), generator=gen).tolist()]
    return plan


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


def train_causal_lm(config: TrainConfig, *, listeners: list[Listener] | tuple[Listener, ...] = (),
                    cancel: CancelToken | None = None, resume: str | Path | None = None):
    """Train a peft LoRA on a causal language model as `config` says; see TrainResult (lora_file is the adapter
    folder, metrics holds the held-out perplexity before and after)."""
    from lora_trainer.train.loop import (
        LossLog,
        TrainResult,
        _accelerator,
        _rng,
        _tensorboard,
        periodic_save_due,
        stops_cleanly,
    )
    from lora_trainer.train.state import read_state

    bus = EventBus(listeners)
    cancel = cancel or CancelToken()
    _check_transformers()
    config = resolve(config, "causal_lm")
    out_dir = Path(config.output_dir)
    accelerator = _accelerator(config, out_dir / "logs")
    device = accelerator.device
    frozen = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    if config.torch_compile:
        log.warning("torch_compile is for image models; the language model trains without it.")

    # 1. model, data, LoRA
    tokenizer, model = load_causal_lm(config, frozen)
    context = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    if not config.max_seq_length:
        config.max_seq_length = min(1024, context or 1024)
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
    bus.emit("start", data_summary=dataset.summary(), config=to_yaml(config))
    if not config.load_in_4bit:
        model.to(device)
    model.config.use_cache = False
    torch.manual_seed(config.seed)
    model = attach_lora(model, config)
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()  # the LoRA trains in fp32 under autocast; the frozen model stays in `frozen`
    if frozen != torch.float32 and device.type in ("cuda", "cpu"):  # where every forward runs under autocast
        from lora_trainer.lora.inject import keep_lora_input_dtype

        keep_lora_input_dtype(model)
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    names = [name for name, p in model.named_parameters() if p.requires_grad]

    # 2. plan, optimizer, schedule
    epochs = config.epochs
    plan = plan_batches(dataset.train, config, epochs)
    accumulation = config.gradient_accumulation_steps
    if config.max_steps:
        epochs = max(epochs, math.ceil(config.max_steps * accumulation / max(len(plan) / epochs, 1)))
        plan = plan_batches(dataset.train, config, epochs)[:config.max_steps * accumulation]
    total_steps = math.ceil(len(plan) / accumulation)
    shapes = {len(dataset.train[indices[0]].input_ids) for _, indices in plan} if config.packing else set()
    groups = [{"params": params, "lr": config.learning_rate}]
    use_stepper, capture, why = graphs_wanted(config, device, num_processes=accelerator.num_processes,
                                              text_encoder_trained=False, mixed_precision=accelerator.mixed_precision,
                                              total_steps=total_steps, buckets=max(len(shapes), 1))
    if use_stepper and (not config.packing or config.load_in_4bit):
        use_stepper, capture = False, False
        why = "not captured: " + ("4-bit weights" if config.load_in_4bit else
                                  "without packing every batch has its own length (set packing: true)")
    log.info("Training step: %s.", why)
    autocast = accelerator.autocast

    def step_loss(inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        with autocast():
            return runner(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"),
                          labels=inputs["labels"], use_cache=False).loss

    stepper = None
    if use_stepper:
        runner = model
        stepper = CapturedStep(step_loss, groups, config.weight_decay, config.max_grad_norm, capture=capture,
                               reduce=average_across_processes(accelerator.num_processes),
                               loss_scale=accelerator.mixed_precision == "fp16")
        optimizer = stepper.optimizer
        shadow = torch.optim.SGD([{"params": [torch.zeros(1, requires_grad=True)], "lr": config.learning_rate}])
        scheduler = make_scheduler(config.lr_scheduler, shadow, config.lr_warmup_steps, total_steps)
    else:
        optimizer = make_optimizer(config.optimizer, groups, config.weight_decay, device)
        scheduler = make_scheduler(config.lr_scheduler, optimizer, config.lr_warmup_steps, total_steps)
        if accelerator.num_processes > 1:
            runner, optimizer = accelerator.prepare(model, optimizer)
        else:  # in one process accelerate's wrappers only copy the logits to fp32 and add ~0.5 ms to each step;
            runner = model  # the optimizer's wrapper is needed for fp16's loss scaler only
            optimizer = accelerator.prepare(optimizer) if accelerator.mixed_precision == "fp16" else optimizer

    micro, step = 0, 0
    if resume:
        folder, state = read_state(resume)
        if sorted(state["lora"]) != sorted(names):
            raise CheckpointError(f"{folder} was saved with other LoRA layers (target_modules, lora_rank or "
                                  "init_lora differ); resume with the same config.")
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name in state["lora"]:
                    p.copy_(state["lora"][name])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        micro, step = state["micro"], state["step"]
        log.info("Resumed from %s at step %d", folder, step)
    if stepper is not None:
        stepper.rebind_learning_rates()
        stepper.set_learning_rates(scheduler.get_last_lr())

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.yaml").write_text(to_yaml(config), encoding="utf-8")
    writer = _tensorboard(out_dir / "logs") if accelerator.is_main_process else None
    result = TrainResult(None, out_dir, step, total_steps)
    eval_batch = max(1, config.batch_size)

    def evaluate(when: str) -> None:
        value = perplexity(model, dataset.held_out, eval_batch, pad_id, device, autocast)
        if value is None:
            return
        result.metrics[f"perplexity_{when}"] = value
        bus.emit("eval", step, total_steps, perplexity=value, when=when)
        log.info("Held-out perplexity %s: %.3f (%d examples)", when, value, len(dataset.held_out))
        if writer:
            writer.add_scalar("eval/perplexity", value, step)

    def save(kind: str) -> Path | None:
        if not accelerator.is_main_process:
            return None
        done = min(step * accumulation, len(plan))
        folder = _save_checkpoint(out_dir, config, model, tokenizer, optimizer, scheduler, names, micro=done, step=step)
        bus.emit("saved", step, total_steps, path=str(folder), checkpoint=str(folder), what=kind)
        return folder

    # 3. the loop
    if step == 0:
        evaluate("before")
    model.train()
    losses = LossLog(device, config, bus, writer, result)
    with stops_cleanly(result, bus, cancel, lambda: save("interrupted"), "adapter", writer):
        while micro < len(plan):
            if cancel.is_set() and micro % accumulation == 0:
                raise KeyboardInterrupt
            epoch, indices = plan[micro]
            indices = indices[accelerator.process_index::accelerator.num_processes] or indices
            if config.lora_dropout:  # its masks come from the global generators (seeding them all costs ~0.6 ms)
                torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=_rng(config.seed, 2, micro))))
            inputs = collate([dataset.train[i] for i in indices], pad_id, device)
            if stepper is not None:
                losses.add(stepper(inputs))
                micro += 1
                shadow.step()
                scheduler.step()
                stepper.set_learning_rates(scheduler.get_last_lr())
            else:
                loss = step_loss(inputs)
                accelerator.backward(loss / accumulation)
                losses.add(loss)
                micro += 1
                if (micro % accumulation) and micro != len(plan):
                    continue
                if config.max_grad_norm:
                    accelerator.clip_grad_norm_(params, config.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            step += 1
            result.steps = step
            losses.step_done(step, total_steps, epoch, scheduler.get_last_lr()[0], last=micro == len(plan))
            if periodic_save_due(config, plan, micro, step, epoch):
                save("periodic")
        accelerator.wait_for_everyone()
        evaluate("after")
    if result.interrupted:
        return result

    # 4. the finished adapter (and merged model)
    if accelerator.is_main_process:
        result.lora_file = _publish(out_dir / config.output_name, lambda tmp: _write_adapter(tmp, model, tokenizer, config))
        bus.emit("saved", step, total_steps, path=str(result.lora_file), what="final")
        if config.save_merged_model:
            merged = _publish(out_dir / f"{config.output_name}-merged",
                              lambda tmp: _write_merged(tmp, config, result.lora_file, tokenizer, frozen))
            result.metrics["merged_model"] = str(merged)
            bus.emit("saved", step, total_steps, path=str(merged), what="merged")
    bus.emit("done", step, total_steps, interrupted=False, lora_file=str(result.lora_file), **result.metrics)
    return result


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


def _publish(final: Path, write) -> Path:
    """Write a folder under a temporary name beside `final`, then swap it in: never a half-written folder."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
    try:
        write(tmp)
        old = None
        if final.exists():
            old = final.with_name(f".{final.name}-old-{os.getpid()}")
            os.replace(final, old)
        os.replace(tmp, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _save_checkpoint(out_dir: Path, config: TrainConfig, model, tokenizer, optimizer, scheduler, names: list[str],
                     *, micro: int, step: int) -> Path:
    """checkpoints/step-N: state.pt (LoRA in fp32, optimizer, schedule, position) and the usable adapter of
    that step; older ones beyond keep_last_n_checkpoints are removed."""
    root = out_dir / "checkpoints"
    trainable = dict(getattr(model, "module", model).named_parameters())
    state = {"lora": {n: trainable[n].detach().float().cpu() for n in names}, "optimizer": optimizer.state_dict(),
             "scheduler": scheduler.state_dict(), "micro": micro, "step": step, "version": __version__}

    def write(tmp: Path) -> None:
        torch.save(state, tmp / "state.pt")
        (tmp / "config.yaml").write_text(to_yaml(config), encoding="utf-8")
        _write_adapter(tmp, model, tokenizer, config)

    try:
        folder = _publish(root / f"step-{step:08d}", write)
    except OSError as exc:
        raise TrainingError(f"Saving the checkpoint in {root} failed ({exc.strerror}); earlier checkpoints are "
                            "intact.") from None
    for old in sorted(p for p in root.glob("step-*") if p.is_dir())[:-config.keep_last_n_checkpoints]:
        shutil.rmtree(old, ignore_errors=True)
    return folder
