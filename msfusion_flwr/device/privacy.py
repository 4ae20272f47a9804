"""The device's part of differential privacy: clip the update before it leaves (:mod:`msfusion_flwr.server.privacy`)."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from flwr.supercore.differential_privacy import compute_clip_model_update


def clip_update(received: Mapping[str, torch.Tensor], trained: Mapping[str, torch.Tensor], bound: float) -> dict[str, torch.Tensor]:
    """``trained`` with its update (trained - received, over the floating-point tensors, one L2 norm) clipped to ``bound``.

    Flower's own clipping (``compute_clip_model_update``, as ``fixedclipping_mod``
    uses it) on the sub-model's floating tensors; integer buffers are sent as
    trained (the server does not update them in a private run).
    """
    keys = [k for k, v in trained.items() if v.is_floating_point()]
    sent = [trained[k].detach().numpy().copy() for k in keys]
    compute_clip_model_update(sent, [received[k].numpy() for k in keys], bound)
    clipped = dict(trained)
    clipped.update({k: torch.from_numpy(a) for k, a in zip(keys, sent, strict=True)})
    return clipped
