"""`isaret evaluate` on tiny runs trained on the demo data and on the Thai Leap Motion data."""

from __future__ import annotations

import json
import shutil
import unicodedata
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, f1_score, precision_recall_fscore_support
from sklearn.metrics import confusion_matrix as sklearn_confusion_matrix

from isaret.checkpoint import load_checkpoint, save_atomic
from isaret.cli import main
from isaret.errors import CheckpointError, DataError
from isaret.evaluate import load_validation_set, match_labels

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
THAI = SHARED_DATA / "thai-tsl-leapmotion"


def evaluate_json(checkpoint: Path, out: Path, *extra: str) -> dict:
    status = main(["evaluate", str(checkpoint), "--out", str(out), "--device", "cpu", "--no-progress", *extra])
    assert status == 0
    return json.loads((out / "evaluation.json").read_text(encoding="utf-8"))


# ----------------------------------------------------------------------------- validation split

def test_evaluate_val_equals_trainer_history(run_folder, tmp_path):
    report = evaluate_json(run_folder / "last_model.pth", tmp_path)
    last_epoch = json.loads((run_folder / "history.json").read_text())["epochs"][-1]
    assert report["accuracy"] == last_epoch["val_acc"]
    assert report["macro_f1"] == last_epoch["val_f1"]
    assert report["loss"] == pytest.approx(last_epoch["val_loss"], rel=1e-5)


def test_evaluate_best_equals_stored_metrics(demo_run, tmp_path):
    checkpoint = load_checkpoint(demo_run / "best_model.pth")
    report = evaluate_json(demo_run / "best_model.pth", tmp_path)
    assert report["accuracy"] == checkpoint["val_acc"]
    assert report["macro_f1"] == checkpoint["val_f1"]
    assert report["epoch"] == checkpoint["epoch"]


def test_evaluate_val_uses_stored_split(run_folder, tmp_path):
    checkpoint = load_checkpoint(run_folder / "last_model.pth")
    report = evaluate_json(run_folder / "last_model.pth", tmp_path)
    assert [row["sample_id"] for row in report["predictions"]] == checkpoint["split"]["val"]
    assert report["samples"] == len(checkpoint["split"]["val"])
    assert report["split"] == "val"


def test_evaluate_scores_equal_sklearn(run_folder, tmp_path):
    report = evaluate_json(run_folder / "last_model.pth", tmp_path)
    classes = report["classes"]
    truth = [row["label"] for row in report["predictions"]]
    predicted = [row["prediction"] for row in report["predictions"]]
    precision, recall, f1, support = precision_recall_fscore_support(truth, predicted, labels=classes,
                                                                     zero_division=0)
    rows = report["per_class"]
    assert [row["class"] for row in rows] == classes
    assert [row["precision"] for row in rows] == pytest.approx(list(precision), abs=1e-12)
    assert [row["recall"] for row in rows] == pytest.approx(list(recall), abs=1e-12)
    assert [row["f1"] for row in rows] == pytest.approx(list(f1), abs=1e-12)
    assert [row["support"] for row in rows] == list(support)
    assert report["accuracy"] == pytest.approx(accuracy_score(truth, predicted), abs=1e-12)
    assert report["macro_f1"] == pytest.approx(f1_score(truth, predicted, average="macro", zero_division=0),
                                               abs=1e-12)
    assert report["confusion_matrix"] == sklearn_confusion_matrix(truth, predicted, labels=classes).tolist()


def test_evaluate_top_k_counts_top_labels(run_folder, tmp_path):
    report = evaluate_json(run_folder / "last_model.pth", tmp_path)
    k = report["top_k"]
    hits = [row["label"] in row["top_labels"][:k] for row in report["predictions"]]
    assert k == min(5, len(report["classes"]))
    assert report["top_k_accuracy"] == pytest.approx(np.mean(hits), abs=1e-12)
    assert report["top_k_accuracy"] >= report["accuracy"]


def test_evaluate_prints_summary_and_table(demo_run, tmp_path, capsys):
    evaluate_json(demo_run / "last_model.pth", tmp_path)
    output = capsys.readouterr().out
    assert "accuracy: " in output
    assert "top-2 accuracy: " in output
    assert "macro-F1: " in output
    assert "precision  recall      f1  support" in output
    assert "\nhello " in output
    assert "\nthankyou " in output
    assert str(tmp_path / "confusion_matrix.png") in output


def test_evaluate_writes_confusion_png(demo_run, tmp_path):
    evaluate_json(demo_run / "last_model.pth", tmp_path)
    image = (tmp_path / "confusion_matrix.png").read_bytes()
    assert image.startswith(b"\x89PNG\r\n\x1a\n")


def test_evaluate_default_out_beside_checkpoint(demo_run, tmp_path):
    checkpoint = tmp_path / "copy.pth"
    shutil.copyfile(demo_run / "last_model.pth", checkpoint)
    assert main(["evaluate", str(checkpoint), "--device", "cpu", "--no-progress"]) == 0
    assert (tmp_path / "eval_copy_val" / "evaluation.json").is_file()
    assert (tmp_path / "eval_copy_val" / "confusion_matrix.png").is_file()


def test_evaluate_missing_val_sample_raises(demo_run):
    checkpoint = load_checkpoint(demo_run / "last_model.pth")
    checkpoint["split"]["val"] = checkpoint["split"]["val"] + ["train_landmark_files/0/missing.parquet"]
    with pytest.raises(DataError, match="1 of the .* validation samples .* are not in"):
        load_validation_set(checkpoint)


def test_evaluate_checkpoint_without_split_raises(demo_run):
    checkpoint = load_checkpoint(demo_run / "last_model.pth")
    del checkpoint["split"]
    with pytest.raises(CheckpointError, match="stores no train/validation split; pass --data"):
        load_validation_set(checkpoint)


# ----------------------------------------------------------------------------- another data set

def copy_clips(target: Path, layout: dict[str, tuple[str, int]]) -> Path:
    """Build an npy-folder data set: {class folder: (Thai class to copy from, number of clips)}."""
    for folder, (source, count) in layout.items():
        (target / folder).mkdir(parents=True)
        for path in sorted((THAI / source).glob("*.npy"))[:count]:
            shutil.copyfile(path, target / folder / path.name)
    return target


def test_evaluate_data_reports_unknown_classes(thai_run, tmp_path, capsys):
    data = copy_clips(tmp_path / "data", {"hello": ("hello", 3), "father": ("father", 2),
                                          "unknown_sign": ("fever", 2)})
    report = evaluate_json(thai_run / "last_model.pth", tmp_path / "out", "--data", str(data))
    output = capsys.readouterr().out
    assert report["samples"] == 5
    assert report["unknown_classes"] == {"unknown_sign": 2}
    assert [row["label"] for row in report["unknown_class_predictions"]] == ["unknown_sign", "unknown_sign"]
    assert sorted({row["label"] for row in report["predictions"]}) == ["father", "hello"]
    assert "2 sample(s) of 1 class(es) unknown to the checkpoint: unknown_sign (2)" in output


def test_evaluate_data_supports_by_class_name(thai_run, tmp_path):
    data = copy_clips(tmp_path / "data", {"hello": ("hello", 3), "father": ("father", 1)})
    report = evaluate_json(thai_run / "last_model.pth", tmp_path / "out", "--data", str(data))
    support = {row["class"]: row["support"] for row in report["per_class"]}
    assert support["hello"] == 3
    assert support["father"] == 1
    assert sum(support.values()) == 4
    assert report["classes"] == load_checkpoint(thai_run / "last_model.pth")["label_map"]


def test_evaluate_data_skips_bad_files_on_request(thai_run, tmp_path, capsys):
    data = copy_clips(tmp_path / "data", {"hello": ("hello", 2)})
    (data / "hello" / "broken.npy").write_bytes(b"not an npy file")
    report = evaluate_json(thai_run / "last_model.pth", tmp_path / "out", "--data", str(data),
                           "--bad-file-policy", "skip")
    output = capsys.readouterr().out
    assert report["samples"] == 2
    assert [sample_id for sample_id, _ in report["skipped_files"]] == ["hello/broken.npy"]
    assert "skipped unreadable sample hello/broken.npy: " in output


def test_evaluate_data_bad_file_fails_by_default(thai_run, tmp_path, capsys):
    data = copy_clips(tmp_path / "data", {"hello": ("hello", 2)})
    (data / "hello" / "broken.npy").write_bytes(b"not an npy file")
    status = main(["evaluate", str(thai_run / "last_model.pth"), "--data", str(data), "--out", str(tmp_path / "out"),
                   "--device", "cpu", "--no-progress"])
    error = capsys.readouterr().err
    assert status == 1
    assert "broken.npy: unreadable .npy file" in error


def test_evaluate_data_without_known_class_fails(thai_run, tmp_path, capsys):
    data = copy_clips(tmp_path / "data", {"unknown_sign": ("fever", 2)})
    status = main(["evaluate", str(thai_run / "last_model.pth"), "--data", str(data), "--out", str(tmp_path / "out"),
                   "--device", "cpu", "--no-progress"])
    error = capsys.readouterr().err
    assert status == 1
    assert "none of the 2 samples belongs to a class of the checkpoint" in error


def test_evaluate_data_wrong_layout_fails(demo_run, thai_run, tmp_path, capsys):
    status = main(["evaluate", str(demo_run / "last_model.pth"), "--data", str(THAI), "--out", str(tmp_path),
                   "--device", "cpu", "--no-progress"])
    error = capsys.readouterr().err
    assert status == 1
    assert "but the checkpoint expects holistic frames (543, 3)" in error


def test_match_labels_normalizes_unicode():
    decomposed = unicodedata.normalize("NFD", "şeker")
    assert decomposed != "şeker"
    assert match_labels([decomposed, "ağaç", "üzüm"], ["ağaç", "şeker"]) == [1, 0, -1]


def test_evaluate_rejects_zero_batch_size(demo_run, tmp_path, capsys):
    status = main(["evaluate", str(demo_run / "last_model.pth"), "--batch-size", "0", "--out", str(tmp_path)])
    assert status == 2
    assert "--batch-size: invalid value 0" in capsys.readouterr().err


def test_evaluate_missing_checkpoint_fails(tmp_path, capsys):
    status = main(["evaluate", str(tmp_path / "none.pth"), "--out", str(tmp_path)])
    assert status == 1
    assert "checkpoint not found" in capsys.readouterr().err


def test_evaluate_rewritten_checkpoint_still_matches(demo_run, tmp_path):
    """A checkpoint re-saved elsewhere (other folder name) still finds its data through its config."""
    checkpoint = load_checkpoint(demo_run / "last_model.pth")
    save_atomic({k: v for k, v in checkpoint.items() if k not in ("format", "format_version", "integrity")},
                tmp_path / "moved" / "model.pth")
    report = evaluate_json(tmp_path / "moved" / "model.pth", tmp_path / "out")
    assert report["accuracy"] == checkpoint["val_acc"]
