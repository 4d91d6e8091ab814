"""AdamW with decoupled weight decay on weight matrices only, and the warmup-then-cosine schedule.

The learning rate is a pure function of the optimizer step and the current config:
    lr(step) = lr * (step + 1) / (warmup_steps + 1)                      for step < warmup_steps
    lr(step) = lr * (r + (1 - r) * (1 + cos(pi * p)) / 2)                 after, with
    p = min(1, (step - warmup_steps) / (total_steps - warmup_steps)),  r = min_lr_ratio,
    total_steps = num_epochs * steps_per_epoch.
After the last step the rate stays at lr * r, so steps past the planned end keep a valid rate.
On resume the schedule is rebuilt from the current config at the stored step: a new `lr`
scales the whole curve, and a new `num_epochs` stretches the cosine to end at the new last step.
"""

from __future__ import annotations

import logging
import math

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from isaret.config import TrainConfig

log = logging.getLogger(__name__)


class WarmupCosine:
    """The LR multiplier as a function of the step; a class so LambdaLR stores its fields."""

    def __init__(self, warmup_steps: int, total_steps: int, min_lr_ratio: float):
        self.warmup_steps = warmup_steps
        self.total_steps = max(total_steps, warmup_steps + 1)
        self.min_lr_ratio = min_lr_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        progress = min(1.0, (step - self.warmup_steps) / (self.total_steps - self.warmup_steps))
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Split parameters into decayed weight matrices and undecayed norms, biases and 1-D tensors."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (decay if param.ndim >= 2 and "norm" not in name else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    return torch.optim.AdamW(parameter_groups(model, cfg.weight_decay), lr=cfg.lr)


def schedule_steps(cfg: TrainConfig, steps_per_epoch: int) -> tuple[int, int]:
    """Return (warmup_steps, total_steps) for this config."""
    warmup = int(round(cfg.warmup_epochs * steps_per_epoch))
    return warmup, cfg.num_epochs * steps_per_epoch


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int,
                    step: int = 0) -> LambdaLR:
    """Build the per-step schedule positioned at `step` (the number of optimizer steps taken)."""
    warmup, total = schedule_steps(cfg, steps_per_epoch)
    for group in optimizer.param_groups:
        group["initial_lr"] = cfg.lr
    scheduler = LambdaLR(optimizer, WarmupCosine(warmup, total, cfg.min_lr_ratio))
    if step:
        scheduler.last_epoch = step
        for group, lr in zip(optimizer.param_groups, _rates(scheduler)):
            group["lr"] = lr
        scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
    return scheduler


def _rates(scheduler: LambdaLR) -> list[float]:
    return [base * rule(scheduler.last_epoch) for base, rule in zip(scheduler.base_lrs, scheduler.lr_lambdas)]


def restore_scheduler(optimizer: torch.optim.Optimizer, state: dict, cfg: TrainConfig, steps_per_epoch: int,
                      step: int) -> LambdaLR:
    """Rebuild the schedule from the current config at `step`, checking the stored one against it.

    The stored state is not loaded with `load_state_dict`, because that would silently bring back
    the old LR and length. A differing stored plan is logged instead, so the new values apply on purpose.
    """
    stored_step = state.get("last_epoch")
    if stored_step is not None and stored_step != step:
        log.warning("scheduler state is at step %s but the checkpoint's global step is %s; using %s",
                    stored_step, step, step)
    scheduler = build_scheduler(optimizer, cfg, steps_per_epoch, step)
    stored_rule = (state.get("lr_lambdas") or [None])[0] or {}
    current_rule = scheduler.lr_lambdas[0]
    if stored_rule.get("total_steps") not in (None, current_rule.total_steps):
        log.info("  LR schedule: total steps %s -> %s (cosine now ends at the new last step)",
                 stored_rule["total_steps"], current_rule.total_steps)
    return scheduler


def apply_hyperparameters(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> None:
    """Set weight decay from the config after `optimizer.load_state_dict` restored the stored values."""
    optimizer.param_groups[0]["weight_decay"] = cfg.weight_decay
    optimizer.param_groups[1]["weight_decay"] = 0.0
