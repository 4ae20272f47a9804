"""Ensemble distillation on unlabeled server data: the fusion step of FedDF.

FedDF (Lin et al., NeurIPS 2020) fuses the participants' models by
distillation: starting from the averaged model, the server trains the fused
(student) model to match the ensemble of the participants' models (teacher)
on unlabeled data it holds. Here:

* **teacher** = the uniform average of the participants' *logits* (FedDF's
  AVGLOGITS; for a language model, at every token position), computed once
  per round on the whole server set, in chunks of the model's
  ``eval_batch_size``; every participant's model
  is its own narrow architecture run as it was trained (:func:`teacher_mode`);
* **student** = the fused full model, trained with Adam (fresh every round,
  no weight decay, constant learning rate) for ``steps`` steps on batches of
  ``batch_size`` server examples drawn without replacement within a batch
  from a seeded generator, minimising ``T^2 KL(softmax(t/T) || softmax(s/T))``
  (batch mean; ``t`` teacher logits, ``s`` student logits, ``T`` the temperature).

Only inputs reach this module: :func:`unlabeled_inputs` drops the labels of a
dataset before anything else sees it.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset, TensorDataset
from torch.utils.flop_counter import FlopCounterMode

from ..config import DistillSettings
from ..models.evaluation import EVAL_BATCH_SIZE
from ..models.layers import Scaler


def unlabeled_inputs(dataset: Dataset) -> Tensor:
    """The inputs of ``dataset`` (first element of every example), stacked; labels are dropped."""
    if isinstance(dataset, TensorDataset):
        return dataset.tensors[0]
    return torch.stack([dataset[i][0] for i in range(len(dataset))])  # type: ignore[arg-type]


def teacher_mode(model: nn.Module) -> nn.Module:
    """Eval mode, except the HeteroFL :class:`~msfusion_flwr.models.layers.Scaler`s, which stay on.

    A narrow participant model trained with its activations divided by its rate
    r; with the scalers off (plain eval mode) its logits would shrink by about r
    (the classifier's input is not renormalised), softening narrow teachers.
    BatchNorm uses batch statistics in either mode (no running stats).
    """
    model.eval()
    for module in model.modules():
        if isinstance(module, Scaler):
            module.train()
    return model


@torch.no_grad()
def model_logits(model: nn.Module, inputs: Tensor, batch_size: int | None = None) -> Tensor:
    """``model``'s logits on ``inputs``, in chunks of ``batch_size`` (default: the model's
    ``eval_batch_size``), in the model's current mode."""
    size = batch_size or getattr(model, "eval_batch_size", EVAL_BATCH_SIZE)
    return torch.cat([model(chunk) for chunk in inputs.split(size)])


def ensemble_logits(teachers: Sequence[nn.Module], inputs: Tensor, batch_size: int | None = None) -> Tensor:
    """AVGLOGITS: the uniform mean of the teachers' logits (each in :func:`teacher_mode`)."""
    if not teachers:
        raise ValueError("ensemble of no teachers")
    total = sum(model_logits(teacher_mode(t), inputs, batch_size) for t in teachers)
    return total / len(teachers)  # type: ignore[operator]


def distillation_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """``T^2 KL(softmax(t/T) || softmax(s/T))``, mean over predictions (one per image, or per token of a sequence)."""
    classes = student_logits.shape[-1]
    log_s = F.log_softmax(student_logits.reshape(-1, classes) / temperature, dim=1)
    log_t = F.log_softmax(teacher_logits.reshape(-1, classes) / temperature, dim=1)
    return F.kl_div(log_s, log_t, reduction="batchmean", log_target=True) * temperature**2


@torch.no_grad()
def kl_to_teacher(student: nn.Module, teacher_logits: Tensor, inputs: Tensor, temperature: float = 1.0) -> float:
    """Mean ``T^2 KL(teacher || student)`` over ``inputs`` (student in eval mode, chunked)."""
    student.eval()
    logits = model_logits(student, inputs)
    return float(distillation_loss(logits, teacher_logits, temperature))


def distill(
    student: nn.Module,
    teacher_logits: Tensor,
    inputs: Tensor,
    settings: DistillSettings,
    generator: torch.Generator,
) -> dict[str, float]:
    """Train ``student`` in place toward ``teacher_logits`` on ``inputs``; returns losses and cost.

    Metrics: ``distill-loss-first``/``-last`` (the first and last batch's
    loss), ``distill-steps``, ``distill-flops`` (FlopCounterMode on the first
    step, times the number of steps; matmul/conv-like operators only) and
    ``distill-time-s``.
    """
    n = len(inputs)
    if n < 2 or len(teacher_logits) != n:
        raise ValueError(f"distillation needs >= 2 inputs with one teacher row each, got {n} and {len(teacher_logits)}")
    batch_size = min(settings.batch_size, n)
    if batch_size < 2:  # BatchNorm on batch statistics needs two examples
        batch_size = 2
    optimizer = torch.optim.Adam(student.parameters(), lr=settings.learning_rate)
    losses: list[float] = []

    def step() -> None:
        idx = torch.randperm(n, generator=generator)[:batch_size]
        loss = distillation_loss(student(inputs[idx]), teacher_logits[idx], settings.temperature)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())

    start = time.perf_counter()
    student.train()
    with FlopCounterMode(display=False) as counter:
        step()
    for _ in range(settings.steps - 1):
        step()
    return {
        "distill-loss-first": losses[0],
        "distill-loss-last": losses[-1],
        "distill-steps": float(settings.steps),
        "distill-flops": float(counter.get_total_flops() * settings.steps),
        "distill-time-s": time.perf_counter() - start,
    }


def ensemble_distillation(
    student: nn.Module,
    teachers: Sequence[nn.Module],
    inputs: Tensor,
    settings: DistillSettings,
    generator: torch.Generator,
) -> dict[str, float]:
    """FedDF's fusion: teacher logits once, then :func:`distill`; cost includes the teacher pass.

    ``distill-teacher-flops`` counts the teachers' forward passes over the server set.
    """
    start = time.perf_counter()
    with FlopCounterMode(display=False) as counter:
        targets = ensemble_logits(teachers, inputs)
    teacher_flops = float(counter.get_total_flops())
    metrics = distill(student, targets, inputs, settings, generator)
    metrics["distill-teacher-flops"] = teacher_flops
    metrics["distill-flops"] += teacher_flops
    metrics["distill-time-s"] = time.perf_counter() - start
    return metrics
