"""Block streaming: some of a transformer's blocks keep their frozen weights in (pinned) CPU memory and are copied
into one of two GPU buffers just before they run, on a side stream, overlapped with the blocks before them.

Host to device only: frozen weights never change, so nothing is copied back (kohya's `blocks_to_swap` moves each
block out and in again; musubi-tuner's one-way copy was ~25% faster). Every streamed block's tensors are views into
one buffer ("slot"), the same slot every step, so a captured CUDA graph replays the copies into the addresses it
saw: the whole step, copies included, stays one graph.

Gradient checkpointing is needed: without it, the backward pass would read weights the forward saved in a slot that
has since held another block. With it, each block's forward runs again in the backward pass (in reverse block
order), just before that block's own backward, and streams its weights in again then.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

log = logging.getLogger(__name__)

ALIGN = 256  # bytes: each tensor in a slot starts where cuBLAS and vectorised kernels want it


class BlockStreamer:
    """`count` of `blocks` (in the order they run) kept in CPU memory, evenly spread so that each copy overlaps the
    blocks on the GPU before it. Use: `adopt` each streamed block (after it is quantized), `finish`, then `reset`
    before every forward pass of the model (the copies a pass makes are then the same every step)."""

    slots = 2

    def __init__(self, blocks: Sequence[torch.nn.Module], count: int, device: torch.device, dtype: torch.dtype) -> None:
        self.blocks = [blocks[i] for i in picked(len(blocks), count)]
        self.position = {id(block): j for j, block in enumerate(self.blocks)}
        self.device, self.dtype = torch.device(device), dtype
        self.cuda = self.device.type == "cuda"
        self.layouts: list[list[tuple[torch.nn.Module, str, bool, torch.dtype, torch.Size, int]]] = []
        self.stored: list[torch.Tensor] = []  # each streamed block's frozen bytes, in CPU memory
        self.buffers: list[torch.Tensor] = []  # the slots, on the device
        self.holds: list[int | None] = [None] * self.slots  # which block a slot holds (or will, once its copy is done)
        self.last: int | None = None  # the streamed block that ran last in this pass
        if self.cuda:
            self.stream = torch.cuda.Stream(self.device)
            self.ready = [torch.cuda.Event() for _ in self.blocks]  # a block's copy is done
            self.free = [torch.cuda.Event() for _ in range(self.slots)]  # the work before a copy into a slot

    @property
    def count(self) -> int:
        return len(self.blocks)

    def adopt(self, block: torch.nn.Module) -> None:
        """If `block` is streamed (and not adopted yet): its frozen tensors cast to the training dtype (quantized bytes
        stay as they are), copied into one CPU buffer, and pointed at it; the copies on the device are freed."""
        j = self.position.get(id(block))
        if j is None or j < len(self.layouts):
            return
        if j != len(self.layouts):
            raise RuntimeError("streamed blocks are adopted in their order")
        block.to(self.dtype)  # floating tensors only; fp8 and GGUF layers keep their bytes and scales
        tensors: list[tuple[torch.nn.Module, str, bool, torch.Tensor]] = []
        seen: set[int] = set()
        for module in block.modules():
            for is_param, table in ((True, module._parameters), (False, module._buffers)):
                for name, tensor in table.items():
                    if tensor is None or id(tensor) in seen or (is_param and tensor.requires_grad):
                        continue
                    seen.add(id(tensor))
                    tensors.append((module, name, is_param, tensor))
        layout, offset = [], 0
        for module, name, is_param, tensor in tensors:
            layout.append((module, name, is_param, tensor.dtype, tensor.shape, offset))
            offset += -(-tensor.numel() * tensor.element_size() // ALIGN) * ALIGN
        stored = torch.empty(offset, dtype=torch.uint8, pin_memory=self.cuda)
        for (module, name, is_param, tensor), entry in zip(tensors, layout):
            view = _view(stored, entry)
            view.copy_(tensor.detach())
            _point(entry, view)
        self.layouts.append(layout)
        self.stored.append(stored)

    def finish(self) -> None:
        """The slots made on the device, every streamed block's tensors pointed into its own slot (block j in slot
        j % 2). The blocks' contents are valid only while they run."""
        for block in self.blocks:
            self.adopt(block)
        size = max((stored.numel() for stored in self.stored), default=0)
        self.buffers = [torch.empty(size, dtype=torch.uint8, device=self.device) for _ in range(self.slots)]
        for j, layout in enumerate(self.layouts):
            for entry in layout:
                _point(entry, _view(self.buffers[j % self.slots], entry))
        for block in self.blocks:
            block.register_forward_pre_hook(self._before)  # never compiled: streaming runs uncompiled
        log.info("Streaming %d of the transformer's blocks (%.2f GB) from CPU memory through %d GPU buffers of %.2f GB.",
                 self.count, sum(s.numel() for s in self.stored) / 1e9, self.slots, size / 1e9)

    def reset(self) -> None:
        """Before a forward pass: no slot is taken to hold anything, so every pass makes the same copies (a CUDA graph
        captured from one pass replays them whatever ran before it)."""
        self.holds = [None] * self.slots
        self.last = None

    def _before(self, block: torch.nn.Module, args) -> None:
        """Before a streamed block runs: its weights in its slot (waiting for their copy), the next streamed block's
        copy started. Blocks run in order in the forward pass and in reverse order when the backward pass recomputes
        them; a block at or before the last one to run means the backward pass."""
        j = self.position[id(block)]
        step = 1 if self.last is None or j > self.last else -1
        self.last = j
        if self.holds[j % self.slots] != j:
            self._copy(j)
        if self.cuda:
            torch.cuda.current_stream(self.device).wait_event(self.ready[j])
        ahead = j + step
        if 0 <= ahead < self.count and ahead % self.slots != j % self.slots and self.holds[ahead % self.slots] != ahead:
            self._copy(ahead)

    def _copy(self, j: int) -> None:
        """Block j's weights into its slot, once the work issued so far (the slot's previous block) is done."""
        slot = j % self.slots
        stored = self.stored[j]
        if self.cuda:
            self.free[slot].record(torch.cuda.current_stream(self.device))
            self.stream.wait_event(self.free[slot])
            with torch.cuda.stream(self.stream):
                self.buffers[slot][:stored.numel()].copy_(stored, non_blocking=True)
                self.ready[j].record(self.stream)
        else:
            self.buffers[slot][:stored.numel()].copy_(stored)
        self.holds[slot] = j


def picked(total: int, count: int) -> list[int]:
    """Which of `total` blocks `count` streamed ones are: spread evenly, so that each copy has the blocks before it
    to overlap with."""
    count = max(0, min(count, total))
    return sorted({min(total - 1, int((j + 0.5) * total / count)) for j in range(count)}) if count else []


def _view(flat: torch.Tensor, entry) -> torch.Tensor:
    """The tensor `entry` describes, as a view of the bytes `flat`."""
    _, _, _, dtype, shape, offset = entry
    size = shape.numel() * torch.empty((), dtype=dtype).element_size()
    return flat[offset:offset + size].view(dtype).view(shape)


def _point(entry, tensor: torch.Tensor) -> None:
    """The module's parameter or buffer `entry` names, now `tensor`."""
    module, name, is_param, _, _, _ = entry
    if is_param:
        module._parameters[name].data = tensor
    else:
        module._buffers[name] = tensor


def layers_of(module: torch.nn.Module) -> torch.nn.ModuleList | None:
    """A text encoder's repeated layers: its largest list of modules (T5's blocks, Qwen3's layers)."""
    lists = [m for m in module.modules() if isinstance(m, torch.nn.ModuleList) and len(m) > 1]
    return max(lists, key=lambda m: sum(p.numel() for p in m.parameters()), default=None)


class LayersOnDemand:
    """A frozen encoder too large for the GPU, run with its layers copied onto `device` one at a time, just before
    each runs (the rest of it stays there for the duration). Its CPU tensors are kept and put back afterwards: no
    copies back, and the model looks as before. Written here rather than with accelerate's `cpu_offload`, which puts
    the parameters on the meta device between uses, where the families read `encoder.device` for their inputs."""

    def __init__(self, encoder: torch.nn.Module, device: torch.device) -> None:
        self.encoder, self.device = encoder, device
        self.layers = layers_of(encoder)
        self.kept: dict[int, torch.Tensor] = {}
        self.hooks: list = []

    def __enter__(self) -> torch.nn.Module:
        in_layers = {id(p) for p in self.layers.parameters()} | {id(b) for b in self.layers.buffers()}
        self._move([t for t in [*self.encoder.parameters(), *self.encoder.buffers()] if id(t) not in in_layers])
        for layer in self.layers:
            self.hooks.append(layer.register_forward_pre_hook(self._before))
            self.hooks.append(layer.register_forward_hook(self._after))
        return self.encoder

    def _before(self, layer: torch.nn.Module, args) -> None:
        self._move([*layer.parameters(), *layer.buffers()])

    def _after(self, layer: torch.nn.Module, args, out) -> None:
        self._back([*layer.parameters(), *layer.buffers()])

    def __exit__(self, *exc) -> None:
        for hook in self.hooks:
            hook.remove()
        self._back([*self.encoder.parameters(), *self.encoder.buffers()])

    def _move(self, tensors: list[torch.Tensor]) -> None:
        for tensor in tensors:
            if id(tensor) not in self.kept:
                self.kept[id(tensor)] = tensor.data
                tensor.data = tensor.data.to(self.device)

    def _back(self, tensors: list[torch.Tensor]) -> None:
        for tensor in tensors:
            if id(tensor) in self.kept:
                tensor.data = self.kept.pop(id(tensor))
