"""The command line: `train`, `inspect` and `demo`, with a progress bar on the engine's events."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from lora_trainer import __version__
from lora_trainer.config import load_config, markdown_table, resolve, to_yaml
from lora_trainer.errors import LoraTrainerError
from lora_trainer.train.events import Event

log = logging.getLogger("lora_trainer")


class ProgressBar:
    """Shows the engine's progress events as a tqdm bar with loss, it/s and ETA."""

    def __init__(self) -> None:
        self.bar = None
        self.phase = None

    def __call__(self, event: Event) -> None:
        """Update the bar from one event."""
        from tqdm import tqdm

        if event.kind == "progress":
            phase = event.data.get("phase", "training")
            if phase != self.phase:
                self.close()
                self.phase = phase
                self.bar = tqdm(total=event.total, desc=phase, unit="img" if phase == "caching" else "step",
                                dynamic_ncols=True)
            self.bar.n = event.step
            self.bar.refresh()
        elif event.kind == "loss" and self.bar is not None:
            self.bar.set_postfix(loss=f"{event.data['loss']:.4f}", lr=f"{event.data['lr']:.2e}")
        elif event.kind == "saved":
            self._write(f"saved {event.data['path']}")
        elif event.kind == "sample":
            self._write(f"sample {event.data['path']}")
        elif event.kind == "start":
            self._write(event.data["data_summary"])
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
    from lora_trainer.backbones.sd import family_of
    from lora_trainer.train.loop import train_lora
    from lora_trainer.train.state import find_checkpoint

    config_file = args.config
    if args.resume and config_file is None:
        config_file = find_checkpoint(args.resume) / "config.yaml"
    if args.help_config:
        print(markdown_table())
        return 0
    if config_file is None and not args.set:
        raise LoraTrainerError("Give a config: `train --config my.yaml` (and/or --set key=value ...).")
    config = load_config(config_file, args.set)
    if not config.base_model:
        raise LoraTrainerError("base_model is not set: point it at an SD1.x/SD2.x/SDXL .safetensors file.")
    if not config.train_data_dir:
        raise LoraTrainerError("train_data_dir is not set: point it at your folder of images and captions.")
    if args.print_config:
        print(to_yaml(resolve(config, family_of(config.base_model, config.allow_pickle))), end="")
        return 0
    bar = ProgressBar()
    result = train_lora(config, listeners=[bar], resume=args.resume)
    bar.close()
    if result.interrupted:
        return 130
    if result.lora_file is None:
        return 0  # another process of a multi-GPU run: the main one writes and reports
    print(f"LoRA written: {result.lora_file}")
    print(f"Use it as <lora:{result.lora_file.stem}:0.8> (copy it into your WebUI's models/Lora or ComfyUI's models/loras).")
    print(f"Loss curve: tensorboard --logdir {result.output_dir / 'logs'}")
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

    inspect = commands.add_parser("inspect", help="Show what is inside a LoRA file.")
    inspect.add_argument("file", type=Path)
    inspect.set_defaults(run=_inspect)

    demo = commands.add_parser("demo", help="Train a LoRA on a built-in tiny model, offline, in a few minutes.")
    demo.add_argument("--workdir", default="lora_trainer_demo", help="Where the demo writes everything.")
    demo.add_argument("--steps", type=int, default=60, help="Training steps.")
    demo.set_defaults(run=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of `python -m lora_trainer` and the `lora-trainer` command."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s")
    for noisy in ("diffusers", "transformers", "accelerate"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    if not getattr(args, "command", None):
        args = parser.parse_args(["demo"])
    try:
        return args.run(args)
    except LoraTrainerError as exc:
        log.error("%s", exc)
        return 2
    except KeyboardInterrupt:
        log.error("Stopped.")
        return 130


if __name__ == "__main__":
    sys.exit(main())
