"""One training step, eager or replayed as a CUDA graph, behind one call: `step(inputs, sync)` returns the loss.

The loop does not know which it has: the options decide in `make_step` (train/graphs.py says what capture
needs). Both own the optimizer and the learning-rate schedule and advance them when `sync` ends an optimizer step.
"""

from __future__ import annotations

import logging

import torch

from lora_trainer.config import TrainConfig
from lora_trainer.train.graphs import CapturedStep, average_across_processes
from lora_trainer.train.optim import make_optimizer, make_scheduler

log = logging.getLogger(__name__)


class EagerStep:
    """Forward and backward on every batch; clip, update and schedule once per `sync` (gradient accumulation).
    Several processes: accelerate's DDP wrapper averages the network's gradients, the others are averaged here."""

    def __init__(self, backbone, groups: list[dict], config: TrainConfig, accelerator, network_fn, total_steps: int):
        self.backbone, self.accelerator, self.config = backbone, accelerator, config
        trained = backbone.trained_modules()
        optimizer = make_optimizer(config.optimizer, groups, config.weight_decay, accelerator.device)
        self.scheduler = make_scheduler(config.lr_scheduler, optimizer, config.lr_warmup_steps, total_steps)
        self.outside = []  # parameters of modules that run outside the network's DDP wrapper
        if accelerator.num_processes > 1:
            prepared = accelerator.prepare(*trained, optimizer)
            network, self.optimizer = prepared[0], prepared[-1]
            self.outside = [p for module in trained[1:] for p in module.parameters() if p.requires_grad]
        else:  # in one process accelerate's module wrappers only copy outputs to fp32 and add ~0.5 ms to each step;
            network = trained[0]  # the optimizer's wrapper is needed for fp16's loss scaler only
            self.optimizer = accelerator.prepare(optimizer) if accelerator.mixed_precision == "fp16" else optimizer
        self.network = network_fn(network)
        self.params = [p for group in groups for p in group["params"]]

    def __call__(self, inputs: dict[str, torch.Tensor], sync: bool) -> torch.Tensor:
        """Forward and backward on `inputs`; when `sync`, the optimizer step and the schedule's. The loss, on the device."""
        with self.accelerator.autocast():
            loss = self.backbone.loss(self.network, inputs)
        self.accelerator.backward(loss / self.config.gradient_accumulation_steps)
        if sync:
            for p in self.outside:
                p.grad = self.accelerator.reduce(p.grad, reduction="mean")
            if self.config.max_grad_norm:
                self.accelerator.clip_grad_norm_(self.params, self.config.max_grad_norm)
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        return loss

    def resumed(self) -> None:
        """Nothing to rebind after a checkpoint was loaded."""

    def learning_rate(self) -> float:
        return self.scheduler.get_last_lr()[0]


class GraphStep:
    """CapturedStep (forward, backward, clip and fused AdamW in one replay) with a float schedule beside it whose
    rates are copied into the step's GPU tensors after each step."""

    def __init__(self, backbone, groups: list[dict], config: TrainConfig, accelerator, network_fn, total_steps: int,
                 capture: bool):
        # no DDP wrapper: several processes average the flat gradient with one all-reduce inside the step
        self.network = network_fn(backbone.trained_modules()[0])
        autocast = accelerator.autocast

        def loss_fn(inputs: dict[str, torch.Tensor]) -> torch.Tensor:
            with autocast():
                return backbone.loss(self.network, inputs)

        self.stepper = CapturedStep(loss_fn, groups, config.weight_decay, config.max_grad_norm, capture=capture,
                                    reduce=average_across_processes(accelerator.num_processes),
                                    loss_scale=accelerator.mixed_precision == "fp16")
        self.optimizer = self.stepper.optimizer
        # the schedule runs on a stand-in optimizer with float rates; each step copies them into the GPU tensors
        self.shadow = torch.optim.SGD([{"params": [torch.zeros(1, requires_grad=True)], "lr": g["lr"]} for g in groups])
        self.scheduler = make_scheduler(config.lr_scheduler, self.shadow, config.lr_warmup_steps, total_steps)
        self.stepper.set_learning_rates(self.scheduler.get_last_lr())

    def __call__(self, inputs: dict[str, torch.Tensor], sync: bool) -> torch.Tensor:
        """One whole optimizer step (capture rules out accumulation, so every batch syncs)."""
        loss = self.stepper(inputs)
        self.shadow.step()  # a no-op (no gradients); keeps the schedule's step order check quiet
        self.scheduler.step()
        self.stepper.set_learning_rates(self.scheduler.get_last_lr())
        return loss

    def resumed(self) -> None:
        """After a checkpoint was loaded into the optimizer and schedule: point the step at their rates again."""
        self.stepper.rebind_learning_rates()
        self.stepper.set_learning_rates(self.scheduler.get_last_lr())

    def learning_rate(self) -> float:
        return self.scheduler.get_last_lr()[0]


def make_step(backbone, groups: list[dict], config: TrainConfig, accelerator, *, total_steps: int, shapes: int,
              network_fn=lambda network: network) -> EagerStep | GraphStep:
    """The step this run's options allow (logged with the reason); `network_fn` may wrap the network (compile)."""
    use_graph, capture, why = graphs_wanted(config, accelerator.device, num_processes=accelerator.num_processes,
                                            blockers=backbone.capture_blockers(config), total_steps=total_steps,
                                            shapes=shapes)
    log.info("Training step: %s.", why)
    if use_graph:
        return GraphStep(backbone, groups, config, accelerator, network_fn, total_steps, capture)
    return EagerStep(backbone, groups, config, accelerator, network_fn, total_steps)


def graphs_wanted(config: TrainConfig, device: torch.device, *, num_processes: int, blockers: list[str],
                  total_steps: int, shapes: int) -> tuple[bool, bool, str]:
    """(train through CapturedStep, capture it, why) for the log; `blockers` are the backbone's own reasons
    against capture, `shapes` the number of distinct input shapes (one graph each).

    `cuda_graphs: on` where there is no CUDA device runs CapturedStep eagerly: the same static buffers,
    tensor learning rates and warm-up, without the graph.
    """
    setting = config.cuda_graphs
    if setting == "off":
        return False, False, "cuda_graphs: off"
    reasons = []
    if device.type != "cuda" and setting == "auto":
        reasons.append("not on a CUDA GPU")
    if config.optimizer != "adamw":
        reasons.append(f"optimizer {config.optimizer} (only adamw is captured)")
    if config.gradient_accumulation_steps > 1:
        reasons.append("gradient accumulation")
    if config.lora_dropout:
        reasons.append("LoRA dropout")
    reasons += blockers
    if reasons:
        return False, False, "not captured: " + ", ".join(reasons)
    # capture costs about warm-up + 1 steps per bucket shape; below ~25 steps a shape it does not pay back
    if setting == "auto" and total_steps < 25 * shapes:
        return False, False, f"not captured: {total_steps} steps over {shapes} input shapes is too short to pay back"
    if device.type != "cuda":
        return True, False, "cuda_graphs: on without a CUDA device: the graph-ready step runs eagerly"
    return True, True, f"captured as CUDA graphs ({shapes} input shapes)"
