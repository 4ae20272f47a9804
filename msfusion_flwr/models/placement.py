"""Where a process runs its tensors: the ``torch-device`` key, resolved per process.

``"cpu"`` (the default) keeps runs bit-for-bit reproducible on any machine;
``"auto"`` takes CUDA where this process sees it, else the CPU, so one run
config serves a CPU-only server and GPU devices alike; any other value names a
PyTorch device (``"cuda"``, ``"cuda:1"``, ``"mps"``) that must be present.
Participants train there and the server evaluates there; the arrays that travel
are always CPU tensors.
"""

from __future__ import annotations

import torch


def is_device_name(name: str) -> bool:
    """Whether ``name`` is ``"auto"`` or a device string PyTorch parses (checked before a run starts)."""
    if name == "auto":
        return True
    try:
        torch.device(name)
    except (RuntimeError, ValueError):
        return False
    return True


def resolve_device(name: str) -> torch.device:
    """The device ``name`` means in this process; raises ``RuntimeError`` (one line) when it is absent here."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"torch-device = {name!r}, but this process sees no CUDA device (use 'auto' or 'cpu')")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise RuntimeError(f"torch-device = {name!r}, but this process sees {torch.cuda.device_count()} CUDA device(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise RuntimeError(f"torch-device = {name!r}, but MPS is not available in this process (use 'auto' or 'cpu')")
    return device
