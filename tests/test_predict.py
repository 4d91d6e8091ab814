"""`isaret predict` and `isaret.load_predictor` on tiny runs trained on real clips."""

from __future__ import annotations

import importlib.machinery
import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest

import isaret
from isaret.checkpoint import load_checkpoint, save_atomic
from isaret.cli import main
from isaret.config import Config
from isaret.data.readers import read_kaggle_parquet
from isaret.errors import CheckpointError, DataError
from isaret.evaluate import checkpoint_data_root

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
THAI = SHARED_DATA / "thai-tsl-leapmotion"


def val_files(checkpoint_path: Path, count: int) -> list[Path]:
    """Return the files of the first `count` validation samples of a checkpoint."""
    checkpoint = load_checkpoint(checkpoint_path)
    root = checkpoint_data_root(Config.from_dict(checkpoint["config"]))
    return [root / sample_id for sample_id in checkpoint["split"]["val"][:count]]


def predict_json(capsys, checkpoint: Path, files: list[Path], *extra: str) -> tuple[int, dict]:
    capsys.readouterr()
    status = main(["predict", str(checkpoint), *map(str, files), "--json", *extra])
    return status, json.loads(capsys.readouterr().out)


# ----------------------------------------------------------------------------- predictions

def test_predict_matches_evaluate(run_folder, tmp_path, capsys):
    checkpoint = run_folder / "last_model.pth"
    assert main(["evaluate", str(checkpoint), "--out", str(tmp_path), "--device", "cpu", "--no-progress"]) == 0
    evaluated = json.loads((tmp_path / "evaluation.json").read_text(encoding="utf-8"))["predictions"][:6]
    files = val_files(checkpoint, 6)
    status, document = predict_json(capsys, checkpoint, files, "--top-k", "3")
    assert status == 0
    for row, result in zip(evaluated, document["results"]):
        assert result["file"].endswith(row["sample_id"])
        assert result["predictions"][0]["label"] == row["prediction"]
        assert result["predictions"][0]["probability"] == pytest.approx(row["probability"], abs=1e-5)
        assert [p["label"] for p in result["predictions"]] == row["top_labels"][:3]


def test_predict_top_k_sorted_and_clipped(demo_run, capsys):
    status, document = predict_json(capsys, demo_run / "last_model.pth", val_files(demo_run / "last_model.pth", 1),
                                    "--top-k", "5")
    predictions = document["results"][0]["predictions"]
    probabilities = [p["probability"] for p in predictions]
    assert status == 0
    assert len(predictions) == 2
    assert probabilities == sorted(probabilities, reverse=True)
    assert sum(probabilities) == pytest.approx(1.0, abs=1e-5)


def test_predict_text_lists_ranked_labels(thai_run, capsys):
    files = val_files(thai_run / "last_model.pth", 2)
    status = main(["predict", str(thai_run / "last_model.pth"), *map(str, files), "--top-k", "3"])
    lines = capsys.readouterr().out.splitlines()
    assert status == 0
    assert lines[0] == str(files[0])
    assert lines[1].startswith("  1. ")
    assert lines[3].startswith("  3. ")
    assert lines[4] == str(files[1])
    assert len(lines) == 8


def test_predict_rejects_zero_top_k(demo_run, capsys):
    status = main(["predict", str(demo_run / "last_model.pth"), "clip.npy", "--top-k", "0"])
    assert status == 2
    assert "--top-k: invalid value 0" in capsys.readouterr().err


# ----------------------------------------------------------------------------- bad files

def write_bad_files(folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    garbage = folder / "garbage.npy"
    garbage.write_bytes(b"not an npy file at all")
    wrong_layout = folder / "hands.npy"
    np.save(wrong_layout, np.zeros((12, 2, 21, 3), dtype=np.float32))
    empty = folder / "empty.npy"
    np.save(empty, np.zeros((0, 543, 3), dtype=np.float32))
    all_nan = folder / "nan.npy"
    np.save(all_nan, np.full((5, 543, 3), np.nan, dtype=np.float32))
    text = folder / "notes.txt"
    text.write_text("not a clip\n")
    return {"missing": folder / "missing.parquet", "garbage": garbage, "wrong_layout": wrong_layout,
            "empty": empty, "all_nan": all_nan, "text": text}


def test_predict_reports_bad_files_per_file(demo_run, tmp_path, capsys):
    good = val_files(demo_run / "last_model.pth", 2)
    bad = write_bad_files(tmp_path)
    files = [good[0], *bad.values(), good[1]]
    status, document = predict_json(capsys, demo_run / "last_model.pth", files)
    results = document["results"]
    assert status == 1
    assert [result["file"] for result in results] == [str(path) for path in files]
    assert "predictions" in results[0]
    assert "predictions" in results[-1]
    assert all("error" in result for result in results[1:-1])


@pytest.mark.parametrize(("kind", "message"), [
    ("missing", "file not found"),
    ("garbage", "unreadable .npy file"),
    ("wrong_layout", "wrong landmark layout: frames shaped (2, 21, 3), but the checkpoint was trained on holistic"),
    ("empty", "empty sequence"),
    ("all_nan", "all frames are NaN"),
    ("text", "unsupported file type '.txt'"),
])
def test_predict_bad_file_message(demo_run, tmp_path, capsys, kind, message):
    path = write_bad_files(tmp_path)[kind]
    status, document = predict_json(capsys, demo_run / "last_model.pth", [path])
    error = document["results"][0]["error"]
    assert status == 1
    assert str(path) in error
    assert message in error


def test_predict_logs_failures_on_stderr(demo_run, tmp_path, capsys):
    path = write_bad_files(tmp_path)["garbage"]
    status = main(["predict", str(demo_run / "last_model.pth"), str(path)])
    captured = capsys.readouterr()
    assert status == 1
    assert f"{path}: unreadable .npy file" in captured.err
    assert "Failed to predict 1 of 1 file(s)" in captured.err
    assert "error: " in captured.out


def test_predict_error_names_file_once(demo_run, tmp_path, monkeypatch, capsys):
    """An error whose message lacks the path (as from the video extractor) gets it as a prefix."""
    video = tmp_path / "clip.mp4"
    video.write_bytes(b"\x00\x00\x00\x18ftypmp42")

    def fail(path):
        raise DataError("video support is not installed")

    fake = types.ModuleType("failing_isaret_extract")
    fake.__spec__ = importlib.machinery.ModuleSpec("failing_isaret_extract", None)
    fake.extract_clip = fail
    monkeypatch.setitem(sys.modules, "failing_isaret_extract", fake)
    monkeypatch.setattr("isaret.predict.EXTRACT_MODULE", "failing_isaret_extract")
    status, document = predict_json(capsys, demo_run / "last_model.pth", [video])
    assert status == 1
    assert document["results"][0]["error"] == f"{video}: video support is not installed"


# ----------------------------------------------------------------------------- video routing

def test_predict_video_without_extractor_names_extra(demo_run, tmp_path, monkeypatch, capsys):
    video = tmp_path / "clip.webm"
    video.write_bytes(b"\x1aE\xdf\xa3")
    monkeypatch.setattr("isaret.predict.EXTRACT_MODULE", "isaret_no_such_extract_module")
    status, document = predict_json(capsys, demo_run / "last_model.pth", [video])
    assert status == 1
    assert "pip install 'isaret[video]'" in document["results"][0]["error"]


def test_predict_video_uses_extractor(demo_run, tmp_path, monkeypatch, capsys):
    parquet = val_files(demo_run / "last_model.pth", 1)[0]
    video = tmp_path / "clip.mp4"
    video.write_bytes(b"\x00\x00\x00\x18ftypmp42")
    fake = types.ModuleType("fake_isaret_extract")
    fake.__spec__ = importlib.machinery.ModuleSpec("fake_isaret_extract", None)
    fake.extract_clip = lambda path: read_kaggle_parquet(parquet)
    monkeypatch.setitem(sys.modules, "fake_isaret_extract", fake)
    monkeypatch.setattr("isaret.predict.EXTRACT_MODULE", "fake_isaret_extract")
    status, document = predict_json(capsys, demo_run / "last_model.pth", [video, parquet])
    from_video, from_parquet = document["results"]
    assert status == 0
    assert from_video["predictions"] == from_parquet["predictions"]


# ----------------------------------------------------------------------------- Python API

def test_load_predictor_array_equals_path(demo_run):
    predictor = isaret.load_predictor(demo_run / "last_model.pth")
    path = val_files(demo_run / "last_model.pth", 1)[0]
    from_path = predictor.predict(path, top_k=2)
    from_array = predictor.predict(read_kaggle_parquet(path), top_k=2)
    assert from_path.labels == from_array.labels
    assert from_path.probabilities == pytest.approx(from_array.probabilities, abs=1e-7)
    assert from_path.label in predictor.classes
    assert from_path.source == str(path)


def test_load_predictor_needs_no_data_or_config(demo_run, tmp_path):
    """Prediction reads only the checkpoint, even when its data folder and cache are gone."""
    checkpoint = load_checkpoint(demo_run / "last_model.pth")
    checkpoint["config"]["data"]["data_path"] = str(tmp_path / "deleted-data")
    checkpoint["config"]["data"]["cache_dir"] = str(tmp_path / "deleted-cache")
    stored = {k: v for k, v in checkpoint.items() if k not in ("format", "format_version", "integrity")}
    save_atomic(stored, tmp_path / "alone" / "model.pth")
    path = val_files(demo_run / "last_model.pth", 1)[0]
    alone = isaret.load_predictor(tmp_path / "alone" / "model.pth").predict(path)
    original = isaret.load_predictor(demo_run / "last_model.pth").predict(path)
    assert alone.labels == original.labels
    assert not (tmp_path / "deleted-cache").exists()


def test_load_predictor_rejects_wrong_layout_array(thai_run):
    predictor = isaret.load_predictor(thai_run / "last_model.pth")
    with pytest.raises(DataError, match=r"wrong landmark layout: frames shaped \(543, 3\)"):
        predictor.predict(np.zeros((10, 543, 3), dtype=np.float32))


def test_load_predictor_accepts_stacked_hands(thai_run):
    predictor = isaret.load_predictor(thai_run / "last_model.pth")
    clip = np.load(sorted((THAI / "hello").glob("*.npy"))[0])
    stacked = predictor.predict(clip)
    merged = predictor.predict(clip.reshape(len(clip), 42, 3))
    assert clip.shape[1:] == (2, 21, 3)
    assert stacked.labels == merged.labels


def test_load_predictor_mismatched_weights_fails(demo_run, tmp_path):
    checkpoint = load_checkpoint(demo_run / "last_model.pth")
    checkpoint["config"]["model"]["d_model"] = 64
    stored = {k: v for k, v in checkpoint.items() if k not in ("format", "format_version", "integrity")}
    save_atomic(stored, tmp_path / "model.pth")
    with pytest.raises(CheckpointError, match="the model weights do not fit .* size mismatch for"):
        isaret.load_predictor(tmp_path / "model.pth")
