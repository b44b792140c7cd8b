"""The standalone app: the WebUI tab's Blocks on 127.0.0.1, training on a checkpoint file.

`python -m lora_trainer ui` starts it; the /lora_trainer/ API routes are served beside the page.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from lora_trainer.config import TrainConfig, safe_name
from lora_trainer.errors import ConfigError
from lora_trainer.events import CancelToken, Listener
from lora_trainer.jobs import BusyError

log = logging.getLogger(__name__)
T = TypeVar("T")


class StandaloneHost:
    """Trains on a checkpoint file path and writes LoRAs into one folder."""

    needs_base_model = True
    can_send_to_txt2img = False
    hidden_keys: tuple[str, ...] = ()

    def __init__(self, lora_dir: str | Path, output_root: str | Path, *, base_model: str = "",
                 train_data_dir: str = "") -> None:
        self.loras = Path(lora_dir).expanduser().absolute()
        self.output_root = Path(output_root).expanduser().absolute()
        self.defaults = {"base_model": base_model, "train_data_dir": train_data_dir}
        self._busy = threading.Lock()  # one model on the GPU at a time: training, captioning or a test render

    def model_line(self) -> str:
        return (f"**LoRA Trainer** (standalone): trains on the checkpoint file given on the Dataset tab; "
                f"finished LoRAs go to `{self.loras}`.")

    def default_values(self) -> dict[str, Any]:
        return dict(self.defaults)

    def lora_dir(self) -> Path:
        return self.loras

    def prepare(self, values: dict[str, Any]) -> dict[str, Any]:
        values = dict(values)
        if not str(values.get("base_model", "")).strip():
            raise ConfigError("Give the base model: the path of an SD1.x/SD2.x/SDXL .safetensors checkpoint.")
        if not str(values.get("train_data_dir", "")).strip():
            raise ConfigError("Give the image folder on the Dataset tab.")
        if not str(values.get("output_dir", "")).strip():
            values["output_dir"] = str(self.output_root / values["output_name"])
        return values

    def memory_plan(self, config: TrainConfig) -> str:
        """The memory plan of `config` (the checkpoint is read into CPU memory for its shapes)."""
        import torch

        from lora_trainer.backbones import memory_report
        from lora_trainer.memory.plan import free_memory

        if not torch.cuda.is_available() or config.device.startswith(("cpu", "mps")):
            return memory_report(config, None)
        return memory_report(config, free_memory(torch.device("cuda" if config.device == "auto" else config.device)))

    def run(self, config: TrainConfig, listeners: list[Listener], cancel: CancelToken, job_id: str = ""):
        from lora_trainer.train.loop import train_lora

        with self._busy:
            return train_lora(config, listeners=listeners, cancel=cancel)

    def run_exclusive(self, work: Callable[[], T], task: str = "") -> T:
        if not self._busy.acquire(blocking=False):
            raise BusyError("Training is running; captioning and test renders wait until it ends.")
        try:
            return work()
        finally:
            self._busy.release()

    def publish(self, lora_file: Path, name: str) -> Path:
        from lora_trainer.lora.kohya import publish_lora

        return publish_lora(lora_file, self.loras, name)

    def test_grid(self, name: str, prompt: str, negative: str, weights: list[float], seed: int, steps: int, *,
                  size: int = 0, base_model: str = ""):
        from lora_trainer.ui.render import render_strengths

        lora_file = self.loras / f"{safe_name(name)}.safetensors"
        if not lora_file.is_file():
            raise ConfigError(f"No LoRA {lora_file.name} in {self.loras}.")
        if not base_model:
            raise ConfigError("Give the base model on the Dataset tab: the test renders on it.")
        return render_strengths(base_model, str(lora_file), prompt, negative, weights, seed=seed, steps=steps,
                                size=size or None)


def make_app(host: StandaloneHost):
    """The FastAPI app: the Blocks at / and the API routes under /lora_trainer/; (app, blocks, trainer)."""
    import gradio as gr
    from fastapi import FastAPI

    from lora_trainer.jobs import Trainer
    from lora_trainer.ui.api import register_api
    from lora_trainer.ui.blocks import build_blocks

    trainer = Trainer(host)
    blocks = build_blocks(host, trainer)
    blocks.queue()
    app = FastAPI(title="LoRA Trainer")
    register_api(app, trainer)
    app = gr.mount_gradio_app(app, blocks, path="")
    return app, blocks, trainer


def serve(host: StandaloneHost, *, listen: str = "127.0.0.1", port: int = 7861) -> None:
    """Run the app until Ctrl-C."""
    import uvicorn

    app, _, _ = make_app(host)
    log.info("LoRA Trainer UI on http://%s:%d", listen, port)
    print(f"LoRA Trainer UI: http://{listen}:{port}", flush=True)
    uvicorn.run(app, host=listen, port=port, log_level="warning")
