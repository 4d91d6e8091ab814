"""AdamW parameter groups and the warmup-then-cosine learning-rate schedule."""

from __future__ import annotations

import math

import pytest
import torch

from isaret.config import ModelConfig, TrainConfig
from isaret.model import build_model
from isaret.optim import (
    WarmupCosine,
    apply_hyperparameters,
    build_optimizer,
    build_scheduler,
    parameter_groups,
    restore_scheduler,
    schedule_steps,
)

STEPS_PER_EPOCH = 10


def small_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(6, 3, 16, ModelConfig(d_model=16, nhead=2, num_layers=2, dim_feedforward=32))


def train_config(**overrides) -> TrainConfig:
    values = dict(lr=0.01, num_epochs=5, warmup_epochs=1.0, min_lr_ratio=0.1, weight_decay=0.05)
    values.update(overrides)
    return TrainConfig(**values)


def lr_curve(cfg: TrainConfig, steps: int) -> list[float]:
    """Return the optimizer's lr before each of `steps` optimizer steps."""
    optimizer = build_optimizer(small_model(), cfg)
    scheduler = build_scheduler(optimizer, cfg, STEPS_PER_EPOCH)
    rates = []
    for _ in range(steps):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return rates


def test_schedule_steps_from_epochs():
    assert schedule_steps(train_config(warmup_epochs=1.5), STEPS_PER_EPOCH) == (15, 50)
    assert schedule_steps(train_config(warmup_epochs=0.0), STEPS_PER_EPOCH) == (0, 50)


def test_lr_warmup_linear_to_peak():
    cfg = train_config()
    rates = lr_curve(cfg, 11)
    slope = cfg.lr / (10 + 1)

    for step in range(10):
        assert rates[step] == pytest.approx(slope * (step + 1), rel=1e-9), f"step {step}"
    assert rates[10] == pytest.approx(cfg.lr, rel=1e-12)
    assert max(rates) == pytest.approx(cfg.lr, rel=1e-12)


def test_lr_cosine_ends_at_min_ratio():
    cfg = train_config()
    rates = lr_curve(cfg, 60)
    warmup, total = 10, 50

    middle = warmup + (total - warmup) // 2
    assert rates[middle] == pytest.approx(cfg.lr * (0.1 + 0.9 * 0.5), rel=1e-9)
    assert rates[total] == pytest.approx(cfg.lr * cfg.min_lr_ratio, rel=1e-9)
    for step in range(warmup, total):
        assert rates[step + 1] < rates[step], f"step {step}"
    for step in range(total, 60):
        assert rates[step] == pytest.approx(cfg.lr * cfg.min_lr_ratio, rel=1e-9), f"step {step}"


def test_lr_cosine_formula_per_step():
    rule = WarmupCosine(warmup_steps=4, total_steps=24, min_lr_ratio=0.2)
    for step in range(4, 24):
        progress = (step - 4) / 20
        expected = 0.2 + 0.8 * 0.5 * (1 + math.cos(math.pi * progress))

        assert rule(step) == pytest.approx(expected, rel=1e-12), f"step {step}"


def test_lr_no_warmup_starts_at_peak():
    rates = lr_curve(train_config(warmup_epochs=0.0), 2)

    assert rates[0] == pytest.approx(0.01, rel=1e-12)


def test_lr_total_not_after_warmup():
    rule = WarmupCosine(warmup_steps=10, total_steps=5, min_lr_ratio=0.1)

    assert rule(9) == pytest.approx(10 / 11)
    assert rule(10) == pytest.approx(1.0)
    assert rule(11) == pytest.approx(0.1)


@pytest.mark.parametrize("step", [0, 1, 7, 10, 23, 50, 61])
def test_scheduler_built_at_step_matches_stepping(step):
    cfg = train_config()
    optimizer = build_optimizer(small_model(), cfg)
    stepped = build_scheduler(optimizer, cfg, STEPS_PER_EPOCH)
    for _ in range(step):
        optimizer.step()
        stepped.step()
    fresh_optimizer = build_optimizer(small_model(), cfg)
    built = build_scheduler(fresh_optimizer, cfg, STEPS_PER_EPOCH, step=step)

    assert built.last_epoch == stepped.last_epoch
    assert built.get_last_lr() == pytest.approx(stepped.get_last_lr(), rel=1e-12)
    assert [g["lr"] for g in fresh_optimizer.param_groups] == pytest.approx(
        [g["lr"] for g in optimizer.param_groups], rel=1e-12)

    fresh_optimizer.step()
    built.step()
    optimizer.step()
    stepped.step()
    assert built.get_last_lr() == pytest.approx(stepped.get_last_lr(), rel=1e-12)


def test_restore_scheduler_uses_current_lr():
    cfg = train_config()
    optimizer = build_optimizer(small_model(), cfg)
    scheduler = build_scheduler(optimizer, cfg, STEPS_PER_EPOCH, step=20)
    state = scheduler.state_dict()
    new_cfg = train_config(lr=0.02, num_epochs=10)
    restored = restore_scheduler(build_optimizer(small_model(), new_cfg), state, new_cfg, STEPS_PER_EPOCH, step=20)

    assert restored.last_epoch == 20
    assert restored.lr_lambdas[0].total_steps == 100
    assert restored.get_last_lr()[0] == pytest.approx(0.02 * WarmupCosine(10, 100, 0.1)(20), rel=1e-12)


def test_weight_decay_not_on_norms_and_biases():
    model = small_model()
    groups = parameter_groups(model, 0.05)
    names = {id(param): name for name, param in model.named_parameters()}
    decayed = {names[id(p)] for p in groups[0]["params"]}
    undecayed = {names[id(p)] for p in groups[1]["params"]}

    assert groups[0]["weight_decay"] == 0.05
    assert groups[1]["weight_decay"] == 0.0
    assert decayed | undecayed == set(names.values())
    assert not decayed & undecayed
    assert all(not name.endswith("bias") for name in decayed)
    assert all("norm" not in name for name in decayed)
    assert "embed.weight" in decayed
    assert "head.weight" in decayed
    assert "encoder.layers.0.self_attn.in_proj_weight" in decayed
    assert "norm.weight" in undecayed
    assert "encoder.layers.0.norm1.weight" in undecayed
    assert "head.bias" in undecayed


def test_optimizer_groups_after_load_state_dict():
    cfg = train_config()
    optimizer = build_optimizer(small_model(), cfg)
    state = optimizer.state_dict()
    restored = build_optimizer(small_model(), train_config(weight_decay=0.3))
    restored.load_state_dict(state)
    apply_hyperparameters(restored, train_config(weight_decay=0.3))

    assert restored.param_groups[0]["weight_decay"] == 0.3
    assert restored.param_groups[1]["weight_decay"] == 0.0
