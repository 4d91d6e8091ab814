"""`isaret inspect`: a readable summary of a checkpoint, and its differences from a config."""

from __future__ import annotations

from pathlib import Path

from isaret.checkpoint import load_checkpoint
from isaret.config import Config, load_toml
from isaret.resume import config_changes


def _resumed_config(stored: dict, config_path: Path) -> Config:
    """Return the config a resume with `--config config_path` would use: the stored one plus the file's fields."""
    from isaret.cli import explicit_toml_fields

    file_values = load_toml(config_path).flat()
    config = Config.from_dict(stored, source="checkpoint config")
    for name in explicit_toml_fields(config_path):
        config.set(name, file_values[name.split(".")[-1]], str(config_path))
    return config


def describe_checkpoint(path: Path, config_path: Path | None = None) -> str:
    payload = load_checkpoint(path)
    progress = payload["progress"]
    history = payload.get("history") or progress.get("history") or []
    mid_epoch = payload["batch_in_epoch"] > 0
    classes = payload["label_map"]
    lines = [
        f"checkpoint: {path}",
        f"format version: {payload['format_version']} (isaret {payload.get('isaret_version', '?')})",
        f"epoch: {payload['epoch']} completed, global step {payload['global_step']}",
        f"mid-epoch: {'yes, ' + str(payload['batch_in_epoch']) + ' batches of epoch ' + str(payload['epoch'] + 1) + ' done' if mid_epoch else 'no'}",
        f"last val acc: {payload['val_acc']:.4f}, last val F1: {payload['val_f1']:.4f}",
        f"best val acc: {max(progress['best_val_acc'], 0.0):.4f} at epoch {progress['best_epoch']}, "
        f"best val F1: {progress['best_val_f1']:.4f}",
        f"early stopping patience: {payload['patience_counter']}/"
        f"{payload['config']['train']['early_stopping_patience']}",
        f"history: {len(history)} epochs, {len(progress.get('resume_points', []))} resume point(s)",
        f"world size: {payload.get('world_size', 1)}",
        f"classes ({len(classes)}): {', '.join(classes[:20])}{' ...' if len(classes) > 20 else ''}",
        f"preprocessing: {payload['preprocessing']['layout']} layout, groups "
        f"{payload['preprocessing']['landmarks']}, {payload['preprocessing']['feature_dim']} features, "
        f"max_seq_len {payload['preprocessing']['max_seq_len']}",
        f"split: {payload['split']['kind']}, {len(payload['split']['train'])} train / "
        f"{len(payload['split']['val'])} val samples",
        "config:",
    ]
    for section, values in payload["config"].items():
        lines.append(f"  [{section}]")
        lines += [f"    {name} = {value!r}" for name, value in values.items()]
    if config_path is not None:
        lines.append(f"differences from {config_path}:")
        changes = config_changes(payload["config"], _resumed_config(payload["config"], config_path))
        if not changes:
            lines.append("  none")
        for change in changes:
            verdict = "blocks a resume" if change.blocking else "allowed on resume"
            lines.append(f"  {change.name}: checkpoint {change.old!r}, config {change.new!r} ({verdict})")
    return "\n".join(lines)
