"""`isaret export`: ONNX model and sidecar, compared with torch on real clips."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest

from isaret.checkpoint import load_checkpoint, save_atomic
from isaret.cli import main
from isaret.config import Config
from isaret.data.dataset import FeatureScaler
from isaret.data.preprocess import Preprocessing, preprocess_clip
from isaret.data.readers import read_kaggle_parquet, read_npy
from isaret.evaluate import checkpoint_data_root
from isaret.predict import Predictor

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
THAI = SHARED_DATA / "thai-tsl-leapmotion"


@pytest.fixture(scope="session")
def exported(tmp_path_factory, demo_run, thai_run) -> dict[str, Path]:
    """Export each tiny run's last checkpoint once; return {run name: ONNX path}."""
    folder = tmp_path_factory.mktemp("onnx")
    paths = {}
    for name, run in (("demo", demo_run), ("thai", thai_run)):
        paths[name] = folder / f"{name}.onnx"
        assert main(["export", str(run / "last_model.pth"), "--onnx", str(paths[name])]) == 0
    return paths


def raw_val_clips(checkpoint_path: Path, count: int) -> list[np.ndarray]:
    """Read the first `count` validation clips of a checkpoint from their files, unprocessed."""
    checkpoint = load_checkpoint(checkpoint_path)
    root = checkpoint_data_root(Config.from_dict(checkpoint["config"]))
    paths = [root / sample_id for sample_id in checkpoint["split"]["val"][:count]]
    return [read_kaggle_parquet(p) if p.suffix == ".parquet" else read_npy(p) for p in paths]


# ----------------------------------------------------------------------------- agreement with torch

@pytest.mark.parametrize("name", ["demo", "thai"])
def test_export_onnx_matches_torch_on_real_clips(exported, demo_run, thai_run, name):
    run = {"demo": demo_run, "thai": thai_run}[name]
    predictor = Predictor.from_checkpoint(run / "last_model.pth")
    prepared = [predictor.prepare(clip) for clip in raw_val_clips(run / "last_model.pth", 12)]
    x = np.stack([item[0] for item in prepared])
    valid = np.stack([item[1] for item in prepared])
    session = onnxruntime.InferenceSession(str(exported[name]), providers=["CPUExecutionProvider"])
    found = session.run(["probabilities"], {"x": x, "valid": valid})[0]
    expected = predictor.probabilities(x, valid)
    assert found.shape == expected.shape
    assert np.abs(found - expected).max() <= 1e-4
    assert (found.argmax(axis=1) == expected.argmax(axis=1)).all()


@pytest.mark.parametrize(("batch", "time"), [(1, 1), (1, 17), (3, 40), (5, 64)])
def test_export_onnx_has_dynamic_batch_and_time(exported, thai_run, batch, time):
    predictor = Predictor.from_checkpoint(thai_run / "last_model.pth")
    x, valid = predictor.prepare(raw_val_clips(thai_run / "last_model.pth", 1)[0])
    x = np.repeat(x[None, :time], batch, axis=0)
    valid = np.repeat(valid[None, :time], batch, axis=0)
    valid[:, 0] = True
    valid[1:, time // 2 + 1:] = False
    session = onnxruntime.InferenceSession(str(exported["thai"]), providers=["CPUExecutionProvider"])
    found = session.run(["probabilities"], {"x": x, "valid": valid})[0]
    assert found.shape == (batch, len(predictor.classes))
    assert np.abs(found - predictor.probabilities(x, valid)).max() <= 1e-4


def test_export_graph_declares_symbolic_axes(exported):
    graph = onnx.load(str(exported["thai"])).graph
    shapes = {value.name: [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]
              for value in [*graph.input, *graph.output]}
    assert shapes["x"] == ["batch", "time", 126]
    assert shapes["valid"] == ["batch", "time"]
    assert shapes["probabilities"] == ["batch", 20]


def test_export_prints_check_result(demo_run, tmp_path, capsys):
    status = main(["export", str(demo_run / "last_model.pth"), "--onnx", str(tmp_path / "model.onnx")])
    output = capsys.readouterr().out
    assert status == 0
    assert "check: max abs difference of probabilities, ONNX Runtime vs torch: " in output
    assert "clips of the validation split of" in output
    assert output.rstrip().endswith("passed")


# ----------------------------------------------------------------------------- sidecar

def test_export_sidecar_matches_checkpoint(exported, thai_run):
    checkpoint = load_checkpoint(thai_run / "last_model.pth")
    sidecar = json.loads(exported["thai"].with_suffix(".json").read_text(encoding="utf-8"))
    assert sidecar["onnx"] == "thai.onnx"
    assert sidecar["label_map"] == checkpoint["label_map"]
    assert sidecar["preprocessing"] == checkpoint["preprocessing"]
    assert sidecar["feature_scaler"]["mean"] == checkpoint["feature_scaler"]["mean"].tolist()
    assert sidecar["feature_scaler"]["std"] == checkpoint["feature_scaler"]["std"].tolist()
    assert list(sidecar["output"]) == ["probabilities"]
    assert sidecar["check"]["max_abs_difference"] <= sidecar["check"]["tolerance"]


def test_export_sidecar_alone_reproduces_predict(exported, thai_run):
    """A runtime with only the ONNX file and its sidecar gets the probabilities of `isaret predict`."""
    sidecar = json.loads(exported["thai"].with_suffix(".json").read_text(encoding="utf-8"))
    prep = Preprocessing.from_dict(sidecar["preprocessing"])
    scaler = FeatureScaler(mean=np.asarray(sidecar["feature_scaler"]["mean"], dtype=np.float32),
                           std=np.asarray(sidecar["feature_scaler"]["std"], dtype=np.float32))
    frames = raw_val_clips(thai_run / "last_model.pth", 1)[0]
    clip, _ = preprocess_clip(frames, prep)
    valid = np.isfinite(clip).any(axis=-1)
    session = onnxruntime.InferenceSession(str(exported["thai"]), providers=["CPUExecutionProvider"])
    probabilities = session.run(["probabilities"], {"x": scaler.transform(clip)[None], "valid": valid[None]})[0][0]
    expected = Predictor.from_checkpoint(thai_run / "last_model.pth").predict(frames, top_k=3)
    assert [sidecar["label_map"][i] for i in np.argsort(-probabilities)[:3]] == expected.labels
    assert probabilities.max() == pytest.approx(expected.probability, abs=1e-4)


# ----------------------------------------------------------------------------- failures

def test_export_without_data_checks_random_inputs(demo_run, tmp_path, capsys):
    checkpoint = load_checkpoint(demo_run / "last_model.pth")
    checkpoint["config"]["data"]["data_path"] = str(tmp_path / "deleted-data")
    stored = {k: v for k, v in checkpoint.items() if k not in ("format", "format_version", "integrity")}
    save_atomic(stored, tmp_path / "model.pth")
    status = main(["export", str(tmp_path / "model.pth"), "--onnx", str(tmp_path / "model.onnx")])
    captured = capsys.readouterr()
    assert status == 0
    assert "random inputs (validation data unavailable: data path not found" in captured.out
    assert "checking the ONNX model on random inputs instead" in captured.err


def test_export_disagreement_writes_nothing(demo_run, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("isaret.export.TOLERANCE", -1.0)
    status = main(["export", str(demo_run / "last_model.pth"), "--onnx", str(tmp_path / "model.onnx")])
    error = capsys.readouterr().err
    assert status == 1
    assert "the ONNX model differs from torch by" in error
    assert list(tmp_path.iterdir()) == []


def test_export_without_onnxruntime_names_extra(demo_run, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    status = main(["export", str(demo_run / "last_model.pth"), "--onnx", str(tmp_path / "model.onnx")])
    error = capsys.readouterr().err
    assert status == 1
    assert "pip install 'isaret[export]'" in error
    assert not (tmp_path / "model.onnx").exists()


def test_export_requires_onnx_option(demo_run, capsys):
    with pytest.raises(SystemExit) as stop:
        main(["export", str(demo_run / "last_model.pth")])
    assert stop.value.code == 2
    assert "--onnx" in capsys.readouterr().err
