"""`isaret plot` and the confusion-matrix figure."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest

from isaret.checkpoint import load_checkpoint, save_atomic
from isaret.cli import main
from isaret.errors import CheckpointError
from isaret.history import PLOTS, write_history
from isaret.plot import confusion_figure, save_confusion_matrix

CURVES = [f"{name}.png" for name, _, _ in PLOTS]
TURKISH_CLASSES = ["şeker", "ağaç", "üzüm", "ılık", "İstanbul", "çiçek", "göz"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def resave(checkpoint: dict, path: Path) -> Path:
    save_atomic({k: v for k, v in checkpoint.items() if k not in ("format", "format_version", "integrity")}, path)
    return path


# ----------------------------------------------------------------------------- training curves

def test_plot_folder_redraws_curves(demo_run, tmp_path, capsys):
    folder = tmp_path / "run"
    folder.mkdir()
    shutil.copyfile(demo_run / "history.json", folder / "history.json")
    status = main(["plot", str(folder)])
    printed = capsys.readouterr().out.split()
    assert status == 0
    assert printed == [str(folder / name) for name in CURVES]
    for name in CURVES:
        assert (folder / name).read_bytes().startswith(PNG_MAGIC)


def test_plot_checkpoint_file_uses_stored_history(demo_run, tmp_path):
    checkpoint = tmp_path / "best_model.pth"
    shutil.copyfile(demo_run / "best_model.pth", checkpoint)
    assert main(["plot", str(checkpoint)]) == 0
    for name in CURVES:
        assert (tmp_path / "best_model_curves" / name).is_file()


def test_plot_folder_without_history_reads_checkpoint(demo_run, tmp_path):
    shutil.copyfile(demo_run / "last_model.pth", tmp_path / "last_model.pth")
    assert main(["plot", str(tmp_path), "--out", str(tmp_path / "curves")]) == 0
    for name in CURVES:
        assert (tmp_path / "curves" / name).is_file()


def test_plot_empty_history_fails(demo_run, tmp_path, capsys):
    checkpoint = load_checkpoint(demo_run / "last_model.pth")
    checkpoint["history"] = []
    checkpoint["progress"]["history"] = []
    path = resave(checkpoint, tmp_path / "model.pth")
    status = main(["plot", str(path)])
    assert status == 1
    assert "the stored history has no epochs" in capsys.readouterr().err


def test_plot_empty_folder_fails(tmp_path, capsys):
    status = main(["plot", str(tmp_path)])
    assert status == 1
    assert "no history.json and no checkpoint found" in capsys.readouterr().err


def test_plot_missing_path_fails(tmp_path, capsys):
    status = main(["plot", str(tmp_path / "nowhere")])
    assert status == 1
    assert "not found" in capsys.readouterr().err


def test_plot_corrupt_history_fails(tmp_path, capsys):
    (tmp_path / "history.json").write_text("{not json", encoding="utf-8")
    status = main(["plot", str(tmp_path)])
    assert status == 1
    assert "unreadable history" in capsys.readouterr().err


# ----------------------------------------------------------------------------- confusion matrix

def test_confusion_figure_labels_axes_with_classes():
    confusion = np.arange(len(TURKISH_CLASSES) ** 2).reshape(len(TURKISH_CLASSES), -1)
    figure = confusion_figure(confusion, TURKISH_CLASSES, "test")
    axis = figure.axes[0]
    assert [label.get_text() for label in axis.get_xticklabels()] == TURKISH_CLASSES
    assert [label.get_text() for label in axis.get_yticklabels()] == TURKISH_CLASSES
    assert axis.get_xlabel() == "predicted class"
    assert axis.get_ylabel() == "true class"


def test_confusion_png_has_turkish_glyphs(tmp_path):
    confusion = np.eye(len(TURKISH_CLASSES), dtype=np.int64) * 3
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        path = save_confusion_matrix(confusion, TURKISH_CLASSES, tmp_path / "confusion.png", "ğüşıöçİ")
    missing = [str(w.message) for w in caught if "missing from" in str(w.message)]
    assert missing == []
    assert path.read_bytes().startswith(PNG_MAGIC)


def test_confusion_figure_many_classes_skips_counts():
    classes = [f"class {i}" for i in range(40)]
    figure = confusion_figure(np.ones((40, 40), dtype=np.int64), classes)
    assert len(figure.axes[0].texts) == 0
    assert len(figure.axes[0].get_xticklabels()) == 40


def test_confusion_figure_empty_row_is_zero():
    confusion = np.array([[2, 1], [0, 0]])
    figure = confusion_figure(confusion, ["a", "b"])
    shares = figure.axes[0].images[0].get_array()
    assert shares[1].tolist() == [0.0, 0.0]
    assert shares[0].tolist() == pytest.approx([2 / 3, 1 / 3])


def test_history_write_error_clean(tmp_path):
    (tmp_path / "history.json").mkdir()  # os.replace onto a folder fails

    with pytest.raises(CheckpointError, match=f"failed to write {tmp_path / 'history.json'}"):
        write_history(tmp_path, [{"epoch": 1, "val_acc": 0.5}], [])
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]
