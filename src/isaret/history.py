"""The per-epoch history: JSON and CSV files and PNG training curves."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

from isaret.errors import CheckpointError

HISTORY_FIELDS = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "val_f1", "lr", "seconds")
PLOTS = (
    ("loss", "Loss", ("train_loss", "val_loss")),
    ("accuracy", "Accuracy", ("train_acc", "val_acc")),
    ("f1", "Validation macro-F1", ("val_f1",)),
    ("lr", "Learning rate", ("lr",)),
)


def _write_text_atomic(path: Path, text: str) -> None:
    temp = path.with_name(f".tmp-{path.name}.{os.getpid()}")
    try:
        temp.write_text(text, encoding="utf-8")
        os.replace(temp, path)
    except OSError as error:
        with contextlib.suppress(OSError):
            temp.unlink(missing_ok=True)
        raise CheckpointError(
            f"failed to write {path}: {error.strerror or error}; the checkpoints written before are intact. "
            "Free disk space or choose another --checkpoint-dir, then resume with --auto-resume"
        ) from None


def write_history(folder: Path, history: list[dict], resume_points: list[dict]) -> None:
    """Write history.json (rows and resume points) and history.csv (one row per epoch)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise CheckpointError(f"cannot use checkpoint folder {folder}: {error.strerror or error}; "
                              "choose another --checkpoint-dir") from None
    _write_text_atomic(folder / "history.json",
                       json.dumps({"epochs": history, "resume_points": resume_points}, indent=1))
    lines = [",".join(HISTORY_FIELDS)]
    for row in history:
        lines.append(",".join(_csv_value(row.get(name)) for name in HISTORY_FIELDS))
    _write_text_atomic(folder / "history.csv", "\n".join(lines) + "\n")


def _csv_value(value) -> str:
    if value is None:
        return ""
    return repr(value) if isinstance(value, float) else str(value)


def read_history(folder: Path) -> tuple[list[dict], list[dict]]:
    data = json.loads((folder / "history.json").read_text(encoding="utf-8"))
    return data["epochs"], data.get("resume_points", [])


def plot_history(folder: Path, history: list[dict], resume_points: list[dict]) -> list[Path]:
    """Draw one PNG per curve (loss, accuracy, F1, LR against epoch); dashed lines mark resumes."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    if not history:
        return []
    epochs = [row["epoch"] for row in history]
    written = []
    for name, title, keys in PLOTS:
        figure, axis = plt.subplots(figsize=(6, 4))
        for key in keys:
            axis.plot(epochs, [row[key] for row in history], marker="o", markersize=3,
                      label=key.replace("_", " "))
        for point in resume_points:
            axis.axvline(point["epoch"] + 0.5, color="grey", linestyle="--", linewidth=0.8)
        axis.set_xlabel("epoch")
        axis.set_title(title)
        if name == "lr":
            axis.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
        axis.legend()
        axis.grid(alpha=0.3)
        figure.tight_layout()
        path = folder / f"{name}.png"
        figure.savefig(path, dpi=100)
        plt.close(figure)
        written.append(path)
    return written
