"""Loss functions by name, adapted to the task's targets (class indices, multi-hot, real values)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from engine.config import LossConfig


def balanced_class_weights(counts: Sequence[int]) -> list[float]:
    """n / (k * count_c) per class, so each class contributes equally to the loss (scikit-learn's rule)."""
    total = sum(counts)
    k = len(counts)
    return [total / (k * c) if c > 0 else 0.0 for c in counts]


class TaskLoss(nn.Module):
    """A loss that takes the model's raw outputs and the dataset's targets as they come from the loader.

    Classification targets are class indices; losses that need a vector per sample (MSE, L1,
    smooth-L1, BCE) get them one-hot. NLL gets log-softmax of the outputs, since every backbone
    here ends in a plain linear layer.
    """

    weight: torch.Tensor | None  # a registered buffer: it follows the module to its device

    def __init__(self, cfg: LossConfig, task: str, num_outputs: int, class_counts: Sequence[int] = ()):
        super().__init__()
        self.name = cfg.name
        self.task = task
        self.num_outputs = num_outputs
        weight = None
        if cfg.class_weights is not None:
            values = (
                balanced_class_weights(class_counts) if cfg.class_weights == "balanced" else list(cfg.class_weights)
            )
            if len(values) != num_outputs:
                raise ValueError(
                    f"loss.class_weights has {len(values)} values but the dataset has "
                    f"{num_outputs} classes: give one weight per class, or 'balanced'"
                )
            weight = torch.tensor(values, dtype=torch.float32)
        self.register_buffer("weight", weight)
        self.label_smoothing = cfg.label_smoothing
        # Where a multi-label output means "yes": logits cross 0, regression-style losses aim at 0/1.
        self.threshold = 0.0 if cfg.name == "bce_with_logits" else 0.5
        self.beta = cfg.beta
        self._fn: Callable = {
            "cross_entropy": self._cross_entropy,
            "nll": self._nll,
            "mse": lambda out, tgt: F.mse_loss(out, self._vector(out, tgt)),
            "l1": lambda out, tgt: F.l1_loss(out, self._vector(out, tgt)),
            "smooth_l1": lambda out, tgt: F.smooth_l1_loss(out, self._vector(out, tgt), beta=self.beta),
            "bce_with_logits": lambda out, tgt: F.binary_cross_entropy_with_logits(out, self._vector(out, tgt)),
        }[cfg.name]

    def _cross_entropy(self, out: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(out, tgt, weight=self.weight, label_smoothing=self.label_smoothing)

    def _nll(self, out: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
        return F.nll_loss(F.log_softmax(out, dim=1), tgt, weight=self.weight)

    def _vector(self, out: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
        if self.task == "classification":
            return F.one_hot(tgt, self.num_outputs).to(out.dtype)
        return tgt.to(out.dtype).reshape(out.shape)

    def forward(self, out: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
        return self._fn(out.float(), tgt)
