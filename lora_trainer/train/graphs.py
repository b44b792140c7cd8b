"""A LoRA training step captured as one CUDA graph per input shape.

On a fast GPU an SD1.5 LoRA step is bound by Python issuing ~5,300 kernels (~190 ms at batch 4) in front of
~51 ms of GPU work (DESIGN.md, "Speed"). Captured once per bucket shape, the whole step (zero the grads,
forward under autocast, loss, backward, clip, the fused AdamW update) replays with one launch. What stays
eager is cheap and per-step: picking the batch's latents, drawing noise and timesteps, noising, the target.

What capture needs, and how it is met here:
- static tensors: every input is copied into buffers owned by the graph;
- a capturable optimizer: fused AdamW with `capturable=True` and its learning rates as GPU tensors, filled
  from a float "shadow" schedule each step (no host sync);
- warm-up steps on a side stream before capture (they allocate optimizer state and cuBLAS workspaces): they
  change the LoRA, so its weights and the optimizer state are put back exactly afterwards, and the run
  stays identical to one without warm-up;
- no `.item()` in the step: the loss stays on the GPU and is read every `log_every_n_steps`;
- fp16 (the WebUI keeps its UNet in fp16): a dynamic loss scale kept on the GPU, the gradients unscaled and
  checked for inf/NaN on the GPU, the fused AdamW told to skip its update where they are not finite, and the
  scale halved or grown on the GPU: GradScaler's arithmetic, with no host sync;
- several processes (one per GPU): the gradients are views of one flat buffer, averaged by one all-reduce
  inside the graph (NCCL collectives can be captured). The warm-up skips it, so a process capturing a new
  shape never waits on one that is replaying; every replay runs exactly one all-reduce on every process.

The same object runs eagerly (`capture=False`) through the same static buffers, tensor learning rates,
warm-up and restore: the CPU tests check that path against the plain loop.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable

import torch

log = logging.getLogger(__name__)

StepInputs = dict[str, torch.Tensor]


class CapturedStep:
    """Runs `loss_fn(inputs)` + backward + clip + optimizer step, replayed from a CUDA graph per input shape."""

    def __init__(self, loss_fn: Callable[[StepInputs], torch.Tensor], groups: list[dict],
                 weight_decay: float, max_grad_norm: float, *, capture: bool, warmup: int = 3,
                 reduce: Callable[[torch.Tensor], None] | None = None, loss_scale: bool = False) -> None:
        self.loss_fn = loss_fn
        self.params = [p for group in groups for p in group["params"]]
        device = self.params[0].device
        self.lrs = [torch.tensor(float(group["lr"]), device=device) for group in groups]
        tensor_groups = [{**group, "lr": lr} for group, lr in zip(groups, self.lrs)]
        # tensor learning rates need either the capturable fused kernel or the single-tensor one
        # (only the fused kernel can skip an update on the device when the loss scale overflowed)
        fused = capture or loss_scale
        self.optimizer = torch.optim.AdamW(tensor_groups, weight_decay=weight_decay, fused=fused or None,
                                           capturable=capture, foreach=False if not fused else None)
        self.scale = torch.full((), 2.0**16, device=device) if loss_scale else None  # GradScaler's defaults
        self.growth_tracker = torch.zeros((), dtype=torch.int32, device=device)
        self.found_inf = torch.zeros((), device=device)
        self.max_grad_norm = max_grad_norm
        self.capture = capture
        self.warmup = warmup
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph | None, StepInputs, torch.Tensor]] = {}
        self.pool = torch.cuda.graph_pool_handle() if capture else None
        # one side stream for every warm-up and capture: cuBLAS keeps a 32 MiB workspace per stream it has seen
        self.stream = torch.cuda.Stream() if capture else None
        # gradients live at fixed addresses, the graph writes into them: views of one flat buffer, so that
        # several processes average them with one all-reduce
        self.flat_grad = torch.zeros(sum(p.numel() for p in self.params), device=device, dtype=self.params[0].dtype)
        offset = 0
        for p in self.params:
            p.grad = self.flat_grad[offset:offset + p.numel()].view_as(p)
            offset += p.numel()
        self.reduce = reduce
        self._warming = False
        if reduce is not None:
            reduce(self.flat_grad)  # every process builds its step at the same point: set up the communicator
        # create the optimizer state now, before any activations exist: made lazily inside the warm-up, these
        # small tensors land in the middle of the warm-up's large blocks and keep them from being freed
        saved = self._snapshot()
        self.optimizer.step()
        self._restore(saved)

    def rebind_learning_rates(self) -> None:
        """After `optimizer.load_state_dict` (a resume), point the groups at our rate tensors again, with the
        loaded values (loading replaces each group's 'lr' with the tensor from the file)."""
        for group, lr in zip(self.optimizer.param_groups, self.lrs):
            if group["lr"] is not lr:
                lr.copy_(torch.as_tensor(group["lr"], dtype=lr.dtype))
                group["lr"] = lr

    def set_learning_rates(self, values: list[float]) -> None:
        """Put this step's learning rates into the tensors the optimizer reads (a fill, not a host sync)."""
        for lr, value in zip(self.lrs, values):
            lr.fill_(value)

    def __call__(self, inputs: StepInputs) -> torch.Tensor:
        """One optimizer step on `inputs`; returns the loss as a tensor on the device (valid until the next call)."""
        key = tuple((name, tuple(t.shape), t.dtype) for name, t in sorted(inputs.items()))
        if key not in self.graphs:
            self.graphs[key] = self._prepare(inputs)
        graph, static, loss = self.graphs[key]
        for name, tensor in inputs.items():
            static[name].copy_(tensor)
        if graph is not None:
            graph.replay()
            return loss
        return self._step(static)

    def _step(self, static: StepInputs) -> torch.Tensor:
        self.flat_grad.zero_()
        loss = self.loss_fn(static)
        (loss if self.scale is None else loss.float() * self.scale).backward()
        if self.reduce is not None and not self._warming:
            self.reduce(self.flat_grad)
        if self.scale is not None:
            self.found_inf.zero_()
            torch._amp_foreach_non_finite_check_and_unscale_([self.flat_grad], self.found_inf,
                                                            self.scale.double().reciprocal().float())
            self.optimizer.found_inf = self.found_inf  # read by the fused kernel: no update where it is 1
        if self.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm, foreach=True)
        self.optimizer.step()
        if self.scale is not None:
            torch._amp_update_scale_(self.scale, self.growth_tracker, self.found_inf, 2.0, 0.5, 2000)
        return loss.detach()

    def _prepare(self, inputs: StepInputs):
        """Static buffers for this shape; warm-up and (on CUDA) capture, leaving the LoRA as it was."""
        static = {name: tensor.clone() for name, tensor in inputs.items()}
        if not self.warmup and not self.capture:
            return None, static, torch.zeros(())
        saved = self._snapshot()
        stream = self.stream
        if stream is not None:
            # the allocator keeps cached blocks per stream: what the main stream has cached (e.g. from moving the
            # model) cannot serve the warm-up on its side stream, so hand it back first
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            stream.wait_stream(torch.cuda.current_stream())
        self._warming = True  # its steps are undone below; other processes are not taking part in them
        try:
            with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
                for _ in range(self.warmup):
                    self._step(static)
        finally:
            self._warming = False
        if stream is not None:
            torch.cuda.current_stream().wait_stream(stream)
        graph, loss = None, torch.zeros(())
        if self.capture:
            # the warm-up's activations sit in the allocator's cache, outside the pool the graph will use: hand
            # them back first, or capture holds a second set (measured: 9.4 GiB instead of 7.0 at SD1.5 batch 4).
            # The cuBLAS workspaces too (one per stream, outside the pool): cleared before and after capture, the
            # graph's own workspace is allocated inside its pool, as torch's cudagraph trees do it
            torch.cuda.synchronize()
            _clear_cublas_workspaces()
            torch.cuda.empty_cache()
            before = torch.cuda.memory_reserved()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool, stream=stream):
                loss = self._step(static)
            _clear_cublas_workspaces()
            log.info("Captured the training step for inputs %s (%.2f GiB more reserved)",
                     {k: tuple(v.shape) for k, v in inputs.items()}, (torch.cuda.memory_reserved() - before) / 2**30)
        self._restore(saved)
        return graph, static, loss

    def _snapshot(self) -> dict:
        """The LoRA weights and optimizer state before warm-up (a state not created yet is recorded as None).

        Kept in CPU memory: on the GPU these three copies of the LoRA (~150 MB for SD1.5 at rank 16) would sit
        beside the warm-up's and the capture's activations and raise the run's peak by as much.
        """
        def keep(tensor: torch.Tensor) -> torch.Tensor:
            return tensor.detach().to("cpu", copy=True)

        return {"params": [keep(p) for p in self.params],
                "scale": [] if self.scale is None else [keep(self.scale), keep(self.growth_tracker)],
                "state": [{k: keep(v) for k, v in self.optimizer.state[p].items()} if p in self.optimizer.state
                          else None for p in self.params]}

    def _restore(self, saved: dict) -> None:
        """Undo the warm-up in place (the graph keeps pointing at the same tensors)."""
        with torch.no_grad():
            for p, value, state in zip(self.params, saved["params"], saved["state"]):
                p.copy_(value)
                for name, tensor in self.optimizer.state[p].items():
                    if state is None:
                        tensor.zero_()  # a fresh AdamW state is all zeros, step 0 included
                    else:
                        tensor.copy_(state[name])
                p.grad.zero_()
            for tensor, value in zip((self.scale, self.growth_tracker), saved["scale"]):
                tensor.copy_(value)


def _clear_cublas_workspaces() -> None:
    """Drop cuBLAS's per-stream workspaces (32 MiB each on Hopper); the next matmul on a stream makes a new one.
    A private torch API, used the same way by torch's own cudagraph trees (torch._inductor.cudagraph_trees)."""
    clear = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
    if clear is not None:
        clear()


def average_across_processes(world: int) -> Callable[[torch.Tensor], None] | None:
    """What CapturedStep runs on its flat gradient when `world` processes train together (None for one): one
    all-reduce and a division, both capturable (DDP's bucketed hooks are not)."""
    if world <= 1:
        return None

    def reduce(flat: torch.Tensor) -> None:
        torch.distributed.all_reduce(flat)
        flat.div_(world)

    return reduce
