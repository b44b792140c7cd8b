"""The command line: `train`, `inspect` and `demo`, with a progress bar on the engine's events."""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
from pathlib import Path

from lora_trainer import __version__
from lora_trainer.config import (
    CaptionConfig,
    config_fields,
    field_kind,
    load_config,
    make_config,
    markdown_table,
    resolve,
    to_yaml,
)
from lora_trainer.errors import LoraTrainerError
from lora_trainer.events import Event

log = logging.getLogger("lora_trainer")


class ProgressBar:
    """Shows the engine's progress events as a tqdm bar with loss, it/s and ETA."""

    def __init__(self, enabled: bool = True) -> None:
        self.bar = None
        self.phase = None
        self.enabled = enabled
        self.stopped_checkpoint: str | None = None  # where a Ctrl-C saved the steps done
        self.validation: float | None = None  # the last validation loss, shown beside the training loss

    def __call__(self, event: Event) -> None:
        """Update the bar from one event."""
        from tqdm import tqdm

        if not self.enabled:
            return
        if event.kind == "progress":
            phase = event.data.get("phase", "training")
            if "images_per_second" in event.data and self.bar is not None:
                self.bar.set_postfix(images_per_s=f"{event.data['images_per_second']:.1f}")
            if phase != self.phase or self.bar is None:
                self.close()
                self.phase = phase
                # the work done before this event (a resumed run's steps) does not count towards the rate
                self.bar = tqdm(total=event.total, initial=event.step, desc=phase, dynamic_ncols=True,
                                unit="step" if phase == "training" else "img")
            self.bar.n = event.step
            self.bar.refresh()
            if phase != "training" and event.step >= event.total:
                self.close()  # caching or captioning is done: its time and rate stop here
        elif event.kind == "loss" and self.bar is not None:
            shown = {"loss": f"{event.data['loss']:.4f}", "lr": f"{event.data['lr']:.2e}"}
            if self.validation is not None:
                shown["val"] = f"{self.validation:.4f}"
            self.bar.set_postfix(**shown)
        elif event.kind == "saved":
            self._write(f"saved {event.data['path']}")
            if event.data.get("what") == "interrupted":
                self.stopped_checkpoint = event.data.get("checkpoint")
        elif event.kind == "sample":
            self._write(f"sample {event.data['path']}")
        elif event.kind == "eval":
            self.validation = event.data.get("validation_loss", self.validation)
            measures = ", ".join(f"{name.replace('_', ' ')} {value:.4f}" for name, value in event.data.items()
                                 if name != "when")
            self._write(f"step {event.step}: held-out {measures}")
        elif event.kind == "warning":
            self._write(f"warning: {event.data['message']}")
        elif event.kind == "start":  # the skipped files were logged one by one already
            self._write("\n".join(line for line in event.data["data_summary"].splitlines()
                                   if not line.startswith(("  skipped ", "  ... and "))))
        elif event.kind == "done":
            self.close()

    def _write(self, text: str) -> None:
        """A line above the bar."""
        from tqdm import tqdm

        tqdm.write(text)

    def close(self) -> None:
        """Finish the current bar."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _train(args: argparse.Namespace) -> int:
    """`train`: run (or resume) a training run from a YAML config and overrides."""
    if args.help_config:  # before the imports of torch and diffusers: seconds
        print(markdown_table())
        return 0
    from lora_trainer.backbones.sd import family_of
    from lora_trainer.train.loop import train_lora
    from lora_trainer.train.state import find_checkpoint

    config_file = args.config
    if args.resume and config_file is None:
        config_file = find_checkpoint(args.resume) / "config.yaml"
    if config_file is None and not args.set:
        raise LoraTrainerError("Give a config: `train --config my.yaml` (and/or --set key=value ...).")
    config = load_config(config_file, args.set)
    language = config.model_type == "causal_lm"
    if not config.base_model:
        raise LoraTrainerError("base_model is not set: point it at " + (
            "a Hugging Face model folder." if language else "an SD1.x/SD2.x/SDXL .safetensors file."))
    if not config.train_data_dir:
        raise LoraTrainerError("train_data_dir is not set: point it at your " + (
            ".txt/.jsonl files." if language else "folder of images and captions."))
    if args.print_config:
        family = "causal_lm" if language else family_of(config.base_model, config.allow_pickle)
        print(to_yaml(resolve(config, family)), end="")
        return 0
    # one progress bar per run: under `accelerate launch` / torchrun only the first process draws it
    bar = ProgressBar(enabled=os.environ.get("RANK", "0") == "0")
    try:
        result = train_lora(config, listeners=[bar], resume=args.resume)
    except KeyboardInterrupt:
        bar.close()
        if bar.stopped_checkpoint is None:
            raise
        output_dir = Path(bar.stopped_checkpoint).parent.parent
        log.error("Stopped. Continue with: %s train --resume %s", _program(), shlex.quote(str(output_dir)))
        return 130
    bar.close()
    if result.interrupted:
        return 130
    if result.lora_file is None:
        return 0  # another process of a multi-GPU run: the main one writes and reports
    if language:
        before, after = result.metrics.get("perplexity_before"), result.metrics.get("perplexity_after")
        if before is not None and after is not None:
            print(f"Held-out perplexity: {before:.3f} before, {after:.3f} after training.")
        print(f"Adapter written: {result.lora_file}")
        print(f"Load it with peft: PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained({config.base_model!r}), "
              f"{str(result.lora_file)!r})")
        if "merged_model" in result.metrics:
            print(f"Merged model: {result.metrics['merged_model']}")
        print(f"Loss curve: tensorboard --logdir {result.output_dir / 'logs'}")
        return 0
    print(f"LoRA written: {result.lora_file}")
    if result.stopped_early:
        print(f"Stopped early at step {result.steps} of {result.total_steps}: the validation loss had stopped improving.")
    if result.best is not None:
        best_step, value, best_file = result.best
        if result.last_file is not None:
            print(f"Best LoRA (use_best): step {best_step}, validation loss {value:.4f}, is {best_file.name}; the last "
                  f"step's is {result.last_file.name}.")
        else:
            print(f"Best LoRA: step {best_step}, validation loss {value:.4f}: {best_file}")
    print(f"Use it as <lora:{result.lora_file.stem}:0.8> (copy it into your WebUI's models/Lora or ComfyUI's models/loras).")
    print(f"Loss curve: tensorboard --logdir {result.output_dir / 'logs'}")
    return 0


def _program() -> str:
    """The command the user started us with: `lora-trainer` or `python -m lora_trainer`."""
    return "lora-trainer" if Path(sys.argv[0]).stem == "lora-trainer" else "python -m lora_trainer"


def add_config_flags(parser: argparse.ArgumentParser, cls: type) -> None:
    """One --flag per field of a config dataclass, with its help, type and choices (defaults stay in the config)."""
    kinds = {"str": str, "int": int, "float": float}
    for f in config_fields(cls):
        meta, kind = f.metadata, field_kind(f)
        flag = "--" + f.name.replace("_", "-")
        if kind == "bool":
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=meta["help"])
        elif kind == "list":  # one flag per item
            parser.add_argument(flag, dest=f.name, action="append", default=None, help=meta["help"])
        else:
            parser.add_argument(flag, dest=f.name, type=kinds[kind], choices=meta["choices"], default=None,
                                help=f"{meta['help']} (default: {f.default})")


def _plan(args: argparse.Namespace) -> int:
    """`plan`: the run's predicted peak GPU memory and the levers that make it fit (the model is read into CPU
    memory for its shapes; nothing goes to the GPU)."""
    import torch

    from lora_trainer.backbones import memory_report
    from lora_trainer.memory.plan import GIB, free_memory

    free = int(args.vram_gib * GIB) if args.vram_gib else \
        free_memory(torch.device("cuda")) if torch.cuda.is_available() else None
    print(memory_report(load_config(args.config, args.set), free))
    return 0


def _config_from_flags(args: argparse.Namespace, cls: type):
    """The config dataclass from the flags that were given."""
    return make_config({f.name: getattr(args, f.name) for f in config_fields(cls) if getattr(args, f.name) is not None}, cls)


def _caption(args: argparse.Namespace) -> int:
    """`caption DIR`: write BLIP captions for the images of a folder."""
    from lora_trainer.caption import caption_folder

    if args.overwrite or args.append:
        args.existing = "overwrite" if args.overwrite else "append"
    config = _config_from_flags(args, CaptionConfig)
    bar = ProgressBar()
    try:
        result = caption_folder(args.folder, config, listeners=[bar])
    except KeyboardInterrupt:
        bar.close()
        log.error("Stopped. Run the same command again to caption the rest.")
        return 130
    bar.close()
    print(f"{len(result.captioned)} captioned ({result.images_per_second:.1f} images/s), {len(result.kept)} kept "
          f"their caption, {len(result.skipped)} skipped.")
    return 130 if result.interrupted else 0


def _captions(args: argparse.Namespace) -> int:
    """`captions DIR`: review captions: list them, show tag counts, edit one, find/replace."""
    from lora_trainer.caption import edit_caption, list_captions, replace_in_captions, tag_table

    if args.edit:
        edit_caption(args.folder, args.edit[0], args.edit[1], args.caption_extension)
        print(f"caption of {args.edit[0]} set")
    elif args.replace:
        count = replace_in_captions(args.folder, args.replace[0], args.replace[1], regex=args.regex,
                                    caption_extension=args.caption_extension)
        print(f"{count} captions changed")
    elif args.tags:
        for tag, count in tag_table(args.folder, args.caption_extension):
            print(f"{count:6d}  {tag}")
    else:
        for image, caption in list_captions(args.folder, args.caption_extension):
            print(f"{image}\t{caption or '(no caption)'}")
    return 0


FLOW_BENCH_FAMILIES = ("flux1", "zimage", "klein4b")


def _bench(args: argparse.Namespace) -> int:
    """`bench caption`: time the captioner against a plain generate loop."""
    from lora_trainer.bench import bench_caption

    if args.what == "lm":
        from lora_trainer.bench import bench_lm

        bench_lm(size="tiny" if args.size == "tiny" else "real", batch=args.batch, seq=args.seq, steps=args.steps,
                 device=args.device, out=args.out, checkpointing=args.checkpointing)
        return 0
    if args.what == "train" and args.validate:
        from lora_trainer.bench.validation import bench_validation

        bench_validation(family=args.family, size=args.size if args.size != "base" else "real", device=args.device,
                         images=args.train_images, repeats=args.repeats, epochs=args.epochs, out=args.out)
        return 0
    if args.what == "train" and args.family in FLOW_BENCH_FAMILIES:
        from lora_trainer.bench.flow import bench_flow

        bench_flow(family=args.family, steps=args.steps, size=args.size if args.size != "base" else "real",
                   device=args.device, out=args.out, checkpointing=args.checkpointing, compile_model=args.compile,
                   fp8=args.fp8, vram_gib=args.vram_gib, lean=args.lean, gguf=args.gguf, nf4=args.nf4,
                   stream=args.stream, memory_auto=args.memory_auto, fp8_compute=args.fp8_compute, only=tuple(args.rows.split(",")) if args.rows else ())
        return 0
    if args.what == "train":
        from lora_trainer.bench import bench_train

        bench_train(family=args.family, batch=args.batch, steps=args.steps, size=args.size if args.size != "base" else "real",
                    device=args.device, out=args.out, checkpointing=args.checkpointing, processes=args.processes,
                    levers=args.levers, compile_unet=args.compile, fp8=args.fp8, lean=args.lean, vram_gib=args.vram_gib,
                    fp8_compute=args.fp8_compute)
        return 0
    bench_caption(size=args.size, images=args.images, batch_size=args.batch_size, plain_images=args.plain_images,
                  num_beams=args.num_beams, max_length=args.max_length, device=args.device, out=args.out)
    return 0


def _inspect(args: argparse.Namespace) -> int:
    """`inspect FILE`: print a LoRA's family, rank, alpha, modules and metadata."""
    from lora_trainer.lora.kohya import describe

    print(describe(args.file))
    return 0


def _demo(args: argparse.Namespace) -> int:
    """`demo`: train on the built-in tiny model and synthetic images, end to end."""
    from lora_trainer.demo import run_demo

    run_demo(Path(args.workdir), steps=args.steps, listeners=[ProgressBar()])
    return 0


def _ui(args: argparse.Namespace) -> int:
    try:
        from lora_trainer.hosts.app import StandaloneHost, serve
    except ImportError as exc:
        raise LoraTrainerError(f"The web app needs gradio: pip install 'lora-trainer[ui]' ({exc}).") from None
    host = StandaloneHost(args.lora_dir, args.output_dir, base_model=args.base_model, train_data_dir=args.data)
    serve(host, listen=args.listen, port=args.port)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `python -m lora_trainer`."""
    parser = argparse.ArgumentParser(prog="lora-trainer", description="Train LoRAs for Stable Diffusion.")
    parser.add_argument("--version", action="version", version=f"lora_trainer {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="Show debug logging.")
    commands = parser.add_subparsers(dest="command")

    train = commands.add_parser("train", help="Train a LoRA from a YAML config.")
    train.add_argument("--config", type=Path, help="YAML config file (keys: train --help-config).")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="Override one config key (repeatable), e.g. --set lora_rank=8.")
    train.add_argument("--resume", metavar="DIR", help="Continue from a checkpoint folder or an output folder.")
    train.add_argument("--print-config", action="store_true", help="Print the resolved config (presets filled in) and exit.")
    train.add_argument("--help-config", action="store_true", help="List every config key with its default and range.")
    train.set_defaults(run=_train)

    plan = commands.add_parser("plan", help="Predict a run's peak GPU memory and the levers that make it fit.")
    plan.add_argument("--config", type=Path, help="YAML config file, as for train.")
    plan.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="Override one config key.")
    plan.add_argument("--vram-gib", type=float, default=0, help="Plan for a card with this much free memory "
                      "(default: this machine's GPU).")
    plan.set_defaults(run=_plan)

    caption = commands.add_parser("caption", help="Caption a folder of images with BLIP.")
    caption.add_argument("folder", type=Path)
    add_config_flags(caption, CaptionConfig)
    caption.add_argument("--overwrite", action="store_true", help="Same as --existing overwrite.")
    caption.add_argument("--append", action="store_true", help="Same as --existing append.")
    caption.set_defaults(run=_caption)

    captions = commands.add_parser("captions", help="Review a folder's captions: list, tag counts, edit, find/replace.")
    captions.add_argument("folder", type=Path)
    captions.add_argument("--tags", action="store_true", help="Show how often each tag is used.")
    captions.add_argument("--edit", nargs=2, metavar=("IMAGE", "TEXT"), help="Set one image's caption.")
    captions.add_argument("--replace", nargs=2, metavar=("FIND", "REPLACE"), help="Find/replace in every caption.")
    captions.add_argument("--regex", action="store_true", help="FIND is a regular expression.")
    captions.add_argument("--caption-extension", default=".txt", help="Extension of caption files (default .txt).")
    captions.set_defaults(run=_captions)

    bench = commands.add_parser("bench", help="Benchmarks (random-weight models of real shapes; use a GPU).")
    bench.add_argument("what", choices=["caption", "train", "lm"])
    bench.add_argument("--size", choices=["tiny", "base", "large", "real"], default="base",
                       help="caption: BLIP size; train: real or tiny shapes (tiny for CPUs).")
    bench.add_argument("--family", choices=["sd15", "sdxl", "sdxl-vpred", *FLOW_BENCH_FAMILIES], default="sd15",
                       help="train: model family (sdxl-vpred: SDXL v-prediction with zero terminal SNR; flux1, zimage, "
                            "klein4b: Flux.1-dev, Z-Image-Turbo, Flux.2 klein 4B at 1024 px, batch 1, --steps timed steps).")
    bench.add_argument("--batch", type=int, default=4, help="train: images per step.")
    bench.add_argument("--steps", type=int, default=50, help="train: timed steps.")
    bench.add_argument("--images", type=int, default=512)
    bench.add_argument("--batch-size", type=int, default=64)
    bench.add_argument("--plain-images", type=int, default=64, help="Images for the plain one-at-a-time loop.")
    bench.add_argument("--num-beams", type=int, default=1)
    bench.add_argument("--max-length", type=int, default=20, help="New tokens per caption.")
    bench.add_argument("--device", default="auto")
    bench.add_argument("--checkpointing", action="store_true", help="train: also time our trainer with gradient checkpointing.")
    bench.add_argument("--seq", type=int, default=1024, help="lm: tokens per row.")
    bench.add_argument("--processes", type=int, default=1,
                       help="train: also time N processes, one GPU each, at --batch images per process.")
    bench.add_argument("--levers", action="store_true",
                       help="train: time each speed lever of the plain loop on its own, eager and captured.")
    bench.add_argument("--compile", action="store_true",
                       help="train: also time our trainer with torch_compile: true (minutes of compiling).")
    bench.add_argument("--fp8", action="store_true",
                       help="train: also time base_weights: fp8, with and without gradient checkpointing.")
    bench.add_argument("--vram-gib", type=float, default=None,
                       help="train: cap the fp8 + checkpointing row at this much GPU memory (a smaller card).")
    bench.add_argument("--rows", default="",
                       help="train, transformer families: only these rows, by name, comma-separated "
                            "(e.g. 'captured,fp8 + checkpointing').")
    bench.add_argument("--stream", type=int, default=0, metavar="N",
                       help="train, transformer families: also time base_weights: fp8 + checkpointing with N of the "
                            "transformer's blocks streamed from CPU memory (capped at --vram-gib).")
    bench.add_argument("--memory-auto", action="store_true",
                       help="train, transformer families: also time a row where memory: auto picks the levers for "
                            "the --vram-gib cap (every other row trains as set).")
    bench.add_argument("--fp8-compute", action="store_true",
                       help="train: also time fp8 + checkpointing with fp8_compute: on (the frozen base's matmuls in "
                            "fp8), its LoRA compared with fp8 storage alone and with the full-precision base.")
    bench.add_argument("--nf4", action="store_true",
                       help="train, transformer families: also time base_weights: nf4 with checkpointing.")
    bench.add_argument("--gguf", choices=["Q8_0", "Q4_K"], default="",
                       help="train, transformer families: also time the transformer held as a GGUF file of this type.")
    bench.add_argument("--lean", action="store_true",
                       help="train: leave out the host rows (SD) or the eager rows (transformer families).")
    bench.add_argument("--validate", action="store_true",
                       help="train: the same run without and with validation at its defaults (a validation folder of "
                            "a tenth as many images, measured at each save), and the training time it adds.")
    bench.add_argument("--train-images", type=int, default=0,
                       help="train --validate: training images (default 40 for SD, 10 for transformer families).")
    bench.add_argument("--repeats", type=int, default=5, help="train --validate: repeats of each image per epoch.")
    bench.add_argument("--epochs", type=int, default=3, help="train --validate: epochs, each saved.")
    bench.add_argument("--out", type=Path, help="Also write the numbers as JSON here.")
    bench.set_defaults(run=_bench)

    inspect = commands.add_parser("inspect", help="Show what is inside a LoRA file.")
    inspect.add_argument("file", type=Path)
    inspect.set_defaults(run=_inspect)

    ui = commands.add_parser("ui", help="Start the LoRA Train web app on this computer (the WebUI tab, standalone).")
    ui.add_argument("--port", type=int, default=7861, help="Port (default 7861).")
    ui.add_argument("--listen", default="127.0.0.1",
                    help="Address to serve on (default 127.0.0.1: this computer only). 0.0.0.0 exposes it to your network.")
    ui.add_argument("--lora-dir", default="loras", help="Where finished LoRAs are written (default ./loras).")
    ui.add_argument("--output-dir", default="output", help="Checkpoints, samples and logs (default ./output/NAME).")
    ui.add_argument("--base-model", default="", help="Checkpoint to fill in on the form.")
    ui.add_argument("--data", default="", help="Image folder to fill in on the form.")
    ui.set_defaults(run=_ui)

    demo = commands.add_parser("demo", help="Train a LoRA on a built-in tiny model, offline, in a few minutes.")
    demo.add_argument("--workdir", default="lora_trainer_demo", help="Where the demo writes everything.")
    demo.add_argument("--steps", type=int, default=60, help="Training steps.")
    demo.set_defaults(run=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of `python -m lora_trainer` and the `lora-trainer` command."""
    if "torch" not in sys.modules and sys.platform == "linux":  # read when CUDA starts (too late inside a host); Linux only
        # grows memory segments instead of caching fixed blocks; measured on the H200 (bench train/lm): peak
        # 7.52 -> 7.18 GiB for the captured SD1.5 step at batch 4, 9.86 -> 9.61 GiB for a 1.1B LM; speed the same
        os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s")
    for noisy in ("diffusers", "transformers", "accelerate", "huggingface_hub", "httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    if not getattr(args, "command", None):
        args = parser.parse_args(["demo"])
    try:
        code = args.run(args)
        sys.stdout.flush()  # a closed pipe shows here, not in a traceback at exit
        return code
    except BrokenPipeError:  # `... | head` read what it wanted and closed the pipe
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the exit's flush has nowhere to fail
        except (OSError, ValueError):
            pass
        return 141  # what a shell reports for a command ended by a closed pipe (128 + SIGPIPE)
    except LoraTrainerError as exc:
        log.error("%s", exc)
        return 2
    except KeyboardInterrupt:
        log.error("Stopped.")
        return 130


if __name__ == "__main__":
    sys.exit(main())
