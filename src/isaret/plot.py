"""`isaret plot` and the confusion-matrix figure of `isaret evaluate`.

Figures are drawn with matplotlib's Agg backend in DejaVu Sans, the font that matplotlib
ships, which has the Turkish letters (ç, ğ, ı, İ, ö, ş, ü) that class names may contain.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np

from isaret.checkpoint import checkpoint_candidates, load_checkpoint
from isaret.errors import DataError
from isaret.history import plot_history, read_history

log = logging.getLogger(__name__)

FONT = {"font.family": "DejaVu Sans"}
ANNOTATE_MAX_CLASSES = 30  # above this many classes, cells are too small for their counts


# ----------------------------------------------------------------------------- confusion matrix

def confusion_figure(confusion: np.ndarray, classes: list[str], title: str = ""):
    """Draw counts (true class, predicted class) as a heat map, coloured by the share of each true class."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    confusion = np.asarray(confusion, dtype=np.int64)
    count = len(classes)
    totals = confusion.sum(axis=1, keepdims=True)
    shares = np.divide(confusion, totals, out=np.zeros(confusion.shape, dtype=np.float64), where=totals > 0)
    side = min(60.0, max(6.0, 0.35 * count + 3.0))  # inches; capped so that 1000 classes still render
    label_size = max(4.0, min(10.0, 400.0 / max(count, 1)))
    with matplotlib.rc_context(FONT):
        figure, axis = plt.subplots(figsize=(side, side))
        image = axis.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0)
        figure.colorbar(image, ax=axis, fraction=0.046, pad=0.04, label="share of the true class")
        axis.set_xticks(range(count), labels=classes, rotation=90, fontsize=label_size)
        axis.set_yticks(range(count), labels=classes, fontsize=label_size)
        axis.set_xlabel("predicted class")
        axis.set_ylabel("true class")
        if title:
            axis.set_title(title)
        if count <= ANNOTATE_MAX_CLASSES:
            for row in range(count):
                for column in range(count):
                    if confusion[row, column]:
                        colour = "white" if shares[row, column] > 0.5 else "black"
                        axis.text(column, row, str(confusion[row, column]), ha="center", va="center",
                                  color=colour, fontsize=label_size)
        figure.tight_layout()
    return figure


def save_confusion_matrix(confusion: np.ndarray, classes: list[str], path: Path, title: str = "") -> Path:
    """Write the confusion matrix as a PNG with the class names on both axes; return its path."""
    import matplotlib

    from matplotlib import pyplot as plt

    figure = confusion_figure(confusion, classes, title)
    path.parent.mkdir(parents=True, exist_ok=True)
    with matplotlib.rc_context(FONT):
        figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


# ----------------------------------------------------------------------------- training curves

def history_of(path: Path) -> tuple[list[dict], list[dict], Path]:
    """Return (history rows, resume points, source) of a checkpoint folder or a checkpoint file.

    A folder's history.json is preferred; without it, the newest checkpoint in the folder is read.
    """
    if path.is_dir():
        if (path / "history.json").is_file():
            try:
                history, resume_points = read_history(path)
            except (OSError, ValueError, KeyError, TypeError) as error:
                raise DataError(f"{path / 'history.json'}: unreadable history ({error}); pass a checkpoint file "
                                "to draw its stored history instead") from None
            return history, resume_points, path / "history.json"
        candidates = checkpoint_candidates(path)
        if not candidates:
            raise DataError(f"{path}: no history.json and no checkpoint found; pass a checkpoint folder written by "
                            "'isaret train' or a checkpoint file")
        path = candidates[0]
    checkpoint = load_checkpoint(path)
    progress = checkpoint.get("progress") or {}
    history = checkpoint.get("history") or progress.get("history") or []
    return list(history), list(progress.get("resume_points") or []), path


def default_plot_dir(path: Path) -> Path:
    """Return where the curves go: a folder's own curves are redrawn in place, a checkpoint file's go beside it."""
    return path if path.is_dir() else path.parent / f"{path.stem}_curves"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", metavar="CHECKPOINT_DIR",
                        help="checkpoint folder (its history.json) or a checkpoint file (its stored history)")
    parser.add_argument("--out", metavar="DIR",
                        help="folder for the PNG files (default: the checkpoint folder itself, or "
                             "<checkpoint name>_curves beside a checkpoint file)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")


def run(args: argparse.Namespace) -> int:
    path = Path(args.path)
    if not path.exists():
        raise DataError(f"{path}: not found; pass a checkpoint folder or a checkpoint file")
    history, resume_points, source = history_of(path)
    if not history:
        raise DataError(f"{source}: the stored history has no epochs (the run saved no history or has not finished "
                        "an epoch); train at least one epoch, with save_history_in_checkpoint=true for a file")
    out = Path(args.out) if args.out else default_plot_dir(path)
    out.mkdir(parents=True, exist_ok=True)
    written = plot_history(out, history, resume_points)
    log.debug("Drew %d epochs from %s", len(history), source)
    for image in written:
        print(image)
    return 0
