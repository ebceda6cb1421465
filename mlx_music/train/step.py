"""One optimizer step: gradient accumulation, data-parallel averaging, clipping, AdamW.

The structure of mlx-lm's tuner (``mlx_lm/tuner/trainer.py``): gradients of the trainable (LoRA)
parameters only, through ``nn.value_and_grad``; micro-batch gradients summed then divided by their
number; ``mlx.nn.average_gradients`` (an all-reduce mean over the ``mx.distributed`` group, a no-op
with one process); then ``mlx.optimizers.clip_grad_norm`` and the optimizer update.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_map

from mlx_music.train.loss import batch_loss


@dataclass(frozen=True)
class OptimSettings:
    """AdamW with bias correction (torch's AdamW maths) and a linear-warmup + cosine schedule.

    lr: peak learning rate; warmup: steps of linear ramp from 0; steps: total optimizer steps
    (the cosine decays to lr * min_lr_ratio at the last one); clip: max global gradient norm
    (0 = off)."""

    lr: float = 1e-4
    steps: int = 2000
    warmup: int = 0
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    clip: float = 1.0
    min_lr_ratio: float = 0.0

    def schedule(self) -> Callable[[mx.array], mx.array] | float:
        decay = max(1, self.steps - self.warmup)
        cosine = optim.cosine_decay(self.lr, decay, self.lr * self.min_lr_ratio)
        if self.warmup <= 0:
            return cosine
        warm = optim.linear_schedule(0.0, self.lr, self.warmup)
        return optim.join_schedules([warm, cosine], [self.warmup])


def make_optimizer(s: OptimSettings, constant: bool = False) -> optim.AdamW:
    """AdamW from mlx.optimizers; `constant` uses s.lr at every step (tests against torch)."""
    return optim.AdamW(learning_rate=s.lr if constant else s.schedule(), betas=list(s.betas), eps=s.eps,
                       weight_decay=s.weight_decay, bias_correction=True)


def _loss(model, batch: dict) -> mx.array:
    return batch_loss(model, batch["inputs"], batch["labels"], batch["text"], batch["text_mask"], batch["drop"],
                      batch.get("chroma"))


class Stepper:
    """Runs optimizer steps on a model whose only trainable parameters are LoRA factors."""

    def __init__(self, model: nn.Module, optimizer: optim.Optimizer, clip: float = 1.0,
                 group: mx.distributed.Group | None = None):
        self.model, self.optimizer, self.clip = model, optimizer, clip
        self.group = group
        self.loss_and_grad = nn.value_and_grad(model, _loss)

    def gradients(self, micro_batches: Sequence[dict]) -> tuple[mx.array, dict]:
        """Mean loss and mean gradients over the micro-batches, averaged over the ranks."""
        total_loss, total = None, None
        for b in micro_batches:
            loss, g = self.loss_and_grad(self.model, b)
            total_loss = loss if total_loss is None else total_loss + loss
            total = g if total is None else tree_map(mx.add, total, g)
        n = len(micro_batches)
        if n > 1:
            total = tree_map(lambda x: x / n, total)
        total = nn.average_gradients(total, group=self.group)
        loss = total_loss / n
        size = self.group.size() if self.group is not None else 1
        if size > 1:
            loss = mx.distributed.all_sum(loss, group=self.group) / size
        return loss, total

    def step(self, micro_batches: Sequence[dict]) -> float:
        """One update; returns the (rank-averaged) loss. A NaN/Inf loss leaves the parameters
        and the optimizer untouched and is returned as is (the caller stops)."""
        loss, grads = self.gradients(micro_batches)
        mx.eval(loss, grads)
        value = float(loss)
        if not mx.isfinite(loss).item():
            return value
        if self.clip and self.clip > 0:
            grads, _ = optim.clip_grad_norm(grads, self.clip)
        self.optimizer.update(self.model, grads)
        mx.eval(self.model.trainable_parameters(), self.optimizer.state)
        return value

    def evaluate(self, batches: Sequence[dict]) -> float:
        """Mean loss over `batches` (no update, rank-averaged)."""
        if not batches:
            return float("nan")
        total = sum(_loss(self.model, b) for b in batches) / len(batches)
        size = self.group.size() if self.group is not None else 1
        if size > 1:
            total = mx.distributed.all_sum(total, group=self.group) / size
        return float(total)


__all__ = ["OptimSettings", "Stepper", "make_optimizer"]
