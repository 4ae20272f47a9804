"""What one participant's local training costs: FLOPs and peak tensor memory, measured.

FLOPs come from ``torch.utils.flop_counter.FlopCounterMode``; peak memory from
:class:`PeakTensorMemory`, a ``TorchDispatchMode`` that follows tensor storage.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode


@dataclass
class ResourceMeter:
    """Measured cost of one participant's local training.

    FLOPs come from ``torch.utils.flop_counter.FlopCounterMode`` on the first
    step (forward, backward and the extra forward passes of the contrastive term and codistillation;
    the counter covers matmul/conv-like operators, not element-wise ones),
    scaled by the number of examples trained on. Peak memory comes from
    :class:`PeakTensorMemory` (parameters, gradients, optimizer state, the
    batch, activations and temporaries, frozen copies included) on the first
    two steps, the second one with optimizer state in place.
    """

    flops_per_example: float = 0.0
    peak_memory_bytes: int = 0

    def count_flops(self, step: Callable[[], None], batch_size: int) -> None:
        with FlopCounterMode(display=False) as counter:
            step()
        self.flops_per_example = counter.get_total_flops() / batch_size

    def track_memory(self, step: Callable[[], None], resident: Iterable[Tensor]) -> None:
        """Peak bytes of tensor storage alive during one step (``resident``: what exists before it)."""
        with PeakTensorMemory(resident) as tracker:
            step()
        self.peak_memory_bytes = max(self.peak_memory_bytes, tracker.peak)


class PeakTensorMemory(TorchDispatchMode):
    """Peak bytes of live tensor storage while the mode is active.

    Starts from the storages of ``resident`` (parameters, gradients, optimizer
    state, the batch) and adds every storage an operator creates, releasing it
    when PyTorch frees it (storages keep their Python object, so a weakref
    finalizer fires on the real free). Views share their base's storage and are
    counted once.
    """

    def __init__(self, resident: Iterable[Tensor] = ()) -> None:
        super().__init__()
        self._live: dict[int, int] = {}
        self.current = self.peak = 0
        for tensor in resident:
            self._track(tensor)

    def _track(self, tensor: Tensor) -> None:
        storage = tensor.untyped_storage()
        key = id(storage)
        if key in self._live:
            return
        self._live[key] = storage.nbytes()
        self.current += self._live[key]
        self.peak = max(self.peak, self.current)
        weakref.finalize(storage, self._release, key)

    def _release(self, key: int) -> None:
        self.current -= self._live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        out = func(*args, **(kwargs or {}))
        for leaf in tree_leaves(out):
            if isinstance(leaf, Tensor):
                self._track(leaf)
        return out


def resident_tensors(models: Iterable[nn.Module], optimizer: torch.optim.Optimizer, batch: Iterable[Tensor]) -> list[Tensor]:
    """Tensors that live across a training step: parameters, gradients, optimizer state, the batch."""
    tensors = list(batch)
    for model in models:
        for p in model.parameters():
            tensors.append(p)
            if p.grad is not None:
                tensors.append(p.grad)
    for state in optimizer.state.values():
        tensors += [v for v in state.values() if isinstance(v, Tensor)]
    return tensors
