"""Tests of `isaret extract`: MediaPipe Holistic landmarks from videos into Kaggle ISLR parquet files.

Tests marked by the `video` fixture run MediaPipe on three real sign clips (37-51 frames each)
from the shared test data beside the repository, and skip when mediapipe, OpenCV or those clips
are missing. The clips show a real person: they are linked into temporary folders, never copied
into the repository.
"""

from __future__ import annotations

import argparse
import csv
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from isaret import extract
from isaret.data.readers import list_kaggle_islr, read_kaggle_parquet
from isaret.errors import DataError

REPO = Path(__file__).resolve().parents[1]
CLIPS_DIR = REPO.parent / "shared" / "data" / "sign-clips"
# sign -> clip file; sorted by sign, the shortest clip (afied4, 37 frames) is extracted first,
# and the last one (akilli, 51 frames) is queued behind the first two.
TEST_CLIPS = {"afiyet_olsun": "afied4.webm", "agac": "agac.webm", "akilli": "akilli.webm"}
MAIN = "import sys; from isaret.extract import main; sys.exit(main(sys.argv[1:]))"
POSE = 489  # first pose point in the 543-point layout
LEFT_SHOULDER, RIGHT_SHOULDER = POSE + 11, POSE + 12
SUBPROCESS_TIMEOUT_S = 300


@pytest.fixture(scope="module")
def video():
    """Skip unless mediapipe, OpenCV and the shared sign clips are available."""
    pytest.importorskip("cv2")
    pytest.importorskip("mediapipe")
    if not CLIPS_DIR.is_dir():
        pytest.skip(f"sign clips not found at {CLIPS_DIR}")


@pytest.fixture(scope="module")
def sign_folder(video, tmp_path_factory) -> Path:
    """A `<sign>/<clip>.webm` folder of symbolic links to the shared clips."""
    root = tmp_path_factory.mktemp("clips")
    for sign, name in TEST_CLIPS.items():
        (root / sign).mkdir()
        (root / sign / name).symlink_to(CLIPS_DIR / name)
    return root


@pytest.fixture(scope="module")
def reference(sign_folder, tmp_path_factory) -> Path:
    """An uninterrupted extraction of the test clips, with 2 worker processes."""
    out = tmp_path_factory.mktemp("reference")
    clips = extract.collect_clips([str(sign_folder)])
    summary = extract.extract_videos(clips, out, extract.Settings(), workers=2)
    assert not summary.failed, [r.error for r in summary.failed]
    return out


def _run_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    extract.add_arguments(parser)
    return parser.parse_args(list(argv))


def _decoded_frame_count(path: Path) -> int:
    import cv2

    capture = cv2.VideoCapture(str(path))
    count = 0
    while capture.read()[0]:
        count += 1
    capture.release()
    return count


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "src"), env.get("PYTHONPATH", "")]))
    return env


# ----------------------------------------------------------------------------- with MediaPipe

def test_extract_pose_every_frame(reference):
    for sign, name in TEST_CLIPS.items():
        frames = read_kaggle_parquet(reference / "landmarks" / sign / name.replace(".webm", ".parquet"))
        pose = frames[:, POSE:POSE + 33]
        assert len(frames) == _decoded_frame_count(CLIPS_DIR / name), name
        assert np.isfinite(pose).all(), f"{name}: pose missing in some frames"
        assert np.isfinite(frames[:, :468]).all(), f"{name}: face missing in some frames"


def test_extract_output_read_by_kaggle_reader(reference):
    samples = list_kaggle_islr(reference)
    assert [s.label for s in samples] == list(TEST_CLIPS)
    for sample in samples:
        frames = read_kaggle_parquet(sample.path)
        assert frames.dtype == np.float32
        assert frames.shape[1:] == (543, 3)
        assert frames.shape[0] >= 37

    table = pq.read_table(samples[0].path)
    assert table.schema.field("frame").type == pa.int16()
    assert table.schema.field("landmark_index").type == pa.int16()
    assert table.schema.field("row_id").type == pa.string()
    assert table.schema.field("type").type == pa.string()
    assert table.num_rows == 543 * read_kaggle_parquet(samples[0].path).shape[0]
    rows = table.slice(543 + 470, 1).to_pylist()[0]  # frame 1, left_hand point 2
    assert rows["row_id"] == "1-left_hand-2"
    assert (rows["frame"], rows["type"], rows["landmark_index"]) == (1, "left_hand", 2)


def test_extract_train_csv_columns(reference):
    with (reference / "train.csv").open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["path", "participant_id", "sequence_id", "sign"]
    assert [r["sequence_id"] for r in rows] == ["1", "2", "3"]
    assert rows[0]["path"] == "landmarks/afiyet_olsun/afied4.parquet"
    assert rows[0]["sign"] == "afiyet_olsun"


def test_extract_clip_matches_written_parquet(reference):
    frames = extract.extract_clip(CLIPS_DIR / "afied4.webm")
    written = read_kaggle_parquet(reference / "landmarks" / "afiyet_olsun" / "afied4.parquet")
    assert frames.dtype == np.float32
    np.testing.assert_array_equal(frames, written)


def test_extract_clip_mirror_swaps_sides(reference):
    plain = read_kaggle_parquet(reference / "landmarks" / "afiyet_olsun" / "afied4.parquet")
    mirrored = extract.extract_clip(CLIPS_DIR / "afied4.webm", mirror=True)
    # MediaPipe labels the body side on the image's right as "left" (the person's own left when
    # the image is not mirrored), so flipping the image swaps the labels.
    assert (plain[:, LEFT_SHOULDER, 0] > plain[:, RIGHT_SHOULDER, 0]).all()
    assert (mirrored[:, LEFT_SHOULDER, 0] > mirrored[:, RIGHT_SHOULDER, 0]).all()
    difference = np.abs(mirrored[:, LEFT_SHOULDER, 0] - (1.0 - plain[:, RIGHT_SHOULDER, 0]))
    assert difference.mean() < 0.05


def test_extract_clip_unshipped_model_rejected(video):
    import mediapipe

    model = Path(mediapipe.__file__).parent / "modules" / "pose_landmark" / "pose_landmark_lite.tflite"
    if model.is_file():
        pytest.skip(f"{model} exists in this installation")
    with pytest.raises(DataError, match="--model-complexity 1"):
        extract.extract_clip(CLIPS_DIR / "afied4.webm", model_complexity=0)


def test_run_killed_then_resumed_identical(sign_folder, reference, tmp_path):
    out = tmp_path / "out"
    command = [sys.executable, "-c", MAIN, str(sign_folder), "--out", str(out)]

    # Kill only the main process (as `kill -9 PID` does) when the first clip is done. Its two
    # worker processes must then stop too, leaving the last clip unfinished.
    with open(tmp_path / "killed.log", "wb") as log_file:
        process = subprocess.Popen([*command, "--workers", "2"], stdout=log_file, stderr=subprocess.STDOUT,
                                   env=_subprocess_env())
        deadline = time.monotonic() + SUBPROCESS_TIMEOUT_S
        while not list(out.rglob("*.extract.json")) and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        process.send_signal(signal.SIGKILL)
        process.wait()
    time.sleep(3)  # workers check for their parent every 0.5 s
    finished = sorted(out.rglob("*.extract.json"))
    time.sleep(2)
    assert process.returncode == -signal.SIGKILL
    assert finished, (tmp_path / "killed.log").read_text(errors="replace")
    assert sorted(out.rglob("*.extract.json")) == finished, "worker processes went on after the kill"
    assert len(finished) < len(TEST_CLIPS), "the run finished before it was killed"
    parquets = [sidecar.with_name(sidecar.name.replace(".extract.json", ".parquet")) for sidecar in finished]
    before = [(p.stat().st_ino, p.stat().st_mtime_ns) for p in parquets]

    resumed = subprocess.run([*command, "--workers", "1"], capture_output=True, text=True, env=_subprocess_env(),
                             timeout=SUBPROCESS_TIMEOUT_S)

    assert resumed.returncode == 0, resumed.stderr
    assert f"{len(finished)} already done" in resumed.stdout
    assert [(p.stat().st_ino, p.stat().st_mtime_ns) for p in parquets] == before
    assert _files(out) == _files(reference)


class _RecordList(logging.Handler):
    """Keeps the records of one logger, whether or not the CLI's logging setup stops propagation."""

    def __init__(self):
        super().__init__(level=logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def extract_log():
    handler = _RecordList()
    logger = logging.getLogger("isaret.extract")
    logger.addHandler(handler)
    yield handler.records
    logger.removeHandler(handler)


def test_run_bad_files_reported(video, tmp_path, capsys, extract_log):
    folder = tmp_path / "clips"
    folder.mkdir()
    (folder / "afied4.webm").symlink_to(CLIPS_DIR / "afied4.webm")
    (folder / "corrupt.webm").write_bytes(b"this is not a video\n" * 10)
    (folder / "empty.mp4").write_bytes(b"")
    # The first 300 bytes of a real clip: a valid WebM header with no frames after it.
    (folder / "header_only.webm").write_bytes((CLIPS_DIR / "agac.webm").read_bytes()[:300])
    out = tmp_path / "out"

    status = extract.run(_run_args(str(folder), "--out", str(out)))

    printed = capsys.readouterr().out
    assert status == 1
    assert "(1 extracted, 0 already done, 3 failed)" in printed
    assert f"{folder / 'corrupt.webm'}: cannot open the video" in printed
    assert f"{folder / 'empty.mp4'}: empty file (0 bytes)" in printed
    assert f"{folder / 'header_only.webm'}: no frames could be decoded" in printed
    assert "4 clip(s) labelled by file name" in printed
    errors = [record.getMessage() for record in extract_log if record.levelno == logging.ERROR]
    assert len(errors) == 3
    for name in ("corrupt.webm", "empty.mp4", "header_only.webm"):
        assert any(str(folder / name) in message for message in errors), name
    samples = list_kaggle_islr(out)
    assert [(s.sample_id, s.label) for s in samples] == [("landmarks/afied4/afied4.parquet", "afied4")]
    assert sorted(p.name for p in out.rglob("*.parquet")) == ["afied4.parquet"]


# ----------------------------------------------------------------------------- without MediaPipe

def test_import_video_packages_missing_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "mediapipe", None)
    with pytest.raises(DataError, match=r'pip install "isaret\[video\]"'):
        extract.extract_clip("clip.mp4")


def test_collect_clips_folder_labels(tmp_path):
    for relative in ("hello/a.mp4", "hello/b.MOV", "bye/take1/c.webm", "flat.avi", "notes.txt", "bye/d.mkv",
                     "hello/._a.mp4", ".trash/e.mp4"):
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / relative).write_bytes(b"")

    clips = extract.collect_clips([str(tmp_path)])

    found = {clip.video.relative_to(tmp_path).as_posix(): clip for clip in clips}
    assert sorted(found) == ["bye/take1/c.webm", "flat.avi", "hello/a.mp4", "hello/b.MOV"]
    assert found["hello/b.MOV"].sign == "hello"
    assert found["bye/take1/c.webm"].sign == "bye"
    assert found["bye/take1/c.webm"].output == "landmarks/bye/c.parquet"
    assert found["flat.avi"].sign == "flat"
    assert found["flat.avi"].label_source == "file name"
    assert found["hello/a.mp4"].label_source == "folder"


def test_collect_clips_labels_csv(tmp_path):
    (tmp_path / "videos").mkdir()
    for name in ("one.mp4", "two.webm"):
        (tmp_path / "videos" / name).write_bytes(b"")
    labels = tmp_path / "labels.csv"
    labels.write_text("path,sign,signer\nvideos/one.mp4,merhaba,s1\nvideos/two.webm,ağaç/yeşil,s2\n",
                      encoding="utf-8")

    clips = extract.collect_clips([], str(labels))

    found = {c.video.name: c for c in clips}
    assert sorted(found) == ["one.mp4", "two.webm"]
    assert (found["one.mp4"].sign, found["one.mp4"].signer) == ("merhaba", "s1")
    assert (found["two.webm"].sign, found["two.webm"].signer) == ("ağaç/yeşil", "s2")
    assert found["two.webm"].output == "landmarks/ağaç_yeşil/two.parquet"
    assert {c.label_source for c in clips} == {"csv"}


def test_collect_clips_unlisted_video_rejected(tmp_path):
    (tmp_path / "one.mp4").write_bytes(b"")
    (tmp_path / "two.mp4").write_bytes(b"")
    labels = tmp_path / "labels.csv"
    labels.write_text("path,sign\none.mp4,merhaba\n", encoding="utf-8")

    with pytest.raises(DataError, match=r"no row for 1 video\(s\), e.g. .*two\.mp4"):
        extract.collect_clips([str(tmp_path)], str(labels))


def test_collect_clips_output_collision_rejected(tmp_path):
    (tmp_path / "hello").mkdir()
    (tmp_path / "hello" / "a.mp4").write_bytes(b"")
    (tmp_path / "hello" / "a.webm").write_bytes(b"")

    with pytest.raises(DataError, match="would both be written to landmarks/hello/a.parquet"):
        extract.collect_clips([str(tmp_path)])


def test_collect_clips_missing_input_rejected(tmp_path):
    with pytest.raises(DataError, match="input not found"):
        extract.collect_clips([str(tmp_path / "missing")])


def _synthetic_frames(count: int = 4) -> np.ndarray:
    frames = np.random.default_rng(0).random((count, 543, 3), dtype=np.float32)
    frames[1, 468:489] = np.nan  # no left hand in frame 1
    frames[:, 522:543] = np.nan  # no right hand at all
    return frames


def test_write_parquet_kaggle_layout(tmp_path):
    frames = _synthetic_frames()
    path = tmp_path / "clip.parquet"

    extract.write_parquet(frames, path)

    np.testing.assert_array_equal(read_kaggle_parquet(path), frames)
    table = pq.read_table(path)
    assert table.column_names == ["frame", "row_id", "type", "landmark_index", "x", "y", "z"]
    assert table.num_rows == 4 * 543
    assert table.slice(543 * 3 + 542, 1).to_pylist()[0]["row_id"] == "3-right_hand-20"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.parquet"]


def _written_clip(tmp_path: Path):
    """Write the outputs of one synthetic clip; return (video, clip, output folder, settings fingerprint)."""
    video = tmp_path / "hello" / "a.mp4"
    video.parent.mkdir()
    video.write_bytes(b"not decoded in this test")
    clip = extract.collect_clips([str(tmp_path)])[0]
    out = tmp_path / "out"
    settings = extract.Settings().fingerprint("mediapipe-test", "opencv-test")
    extract.write_clip_outputs(clip, out, _synthetic_frames(), extract.video_fingerprint(video, settings))
    return video, clip, out, settings


def test_load_current_record_fingerprint(tmp_path):
    video, clip, out, settings = _written_clip(tmp_path)

    record = extract.load_current_record(clip, out, settings)
    assert record is not None
    assert record["frames"] == 4
    assert record["detected"] == {"pose": 4, "left_hand": 3, "right_hand": 0, "face": 4}

    mirrored = extract.Settings(mirror=True).fingerprint("mediapipe-test", "opencv-test")
    assert extract.load_current_record(clip, out, mirrored) is None
    os.utime(video, ns=(0, video.stat().st_mtime_ns + 1_000_000_000))
    assert extract.load_current_record(clip, out, settings) is None


def test_load_current_record_truncated_parquet(tmp_path):
    video, clip, out, settings = _written_clip(tmp_path)
    parquet = out / clip.output
    parquet.write_bytes(parquet.read_bytes()[:100])

    assert extract.load_current_record(clip, out, settings) is None


def test_remove_stale_temporary_files(tmp_path):
    folder = tmp_path / "landmarks" / "hello"
    folder.mkdir(parents=True)
    stale = folder / f".a.parquet{extract.TMP_MARKER}1234"
    stale.write_bytes(b"half a parquet")
    finished = folder / "a.parquet"
    finished.write_bytes(b"x")

    extract.remove_stale_temporary_files(tmp_path)

    assert not stale.exists()
    assert finished.exists()


def test_main_without_inputs_fails(tmp_path, capsys):
    status = extract.main(["--out", str(tmp_path / "out")])

    assert status == 1
    assert "error: no inputs" in capsys.readouterr().err



def test_extracted_folder_trains_and_predicts(reference, sign_folder, tmp_path, capsys):
    """`isaret train` reads the extracted folder, and `isaret predict` takes a video end to end."""
    import json
    import shutil

    from isaret.cli import main

    data = tmp_path / "data"
    shutil.copytree(reference, data)
    with (data / "train.csv").open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    # Each sign needs two clips for a stratified split: add a copy of every extracted clip.
    for row in list(rows):
        copy = row["path"].replace(".parquet", "_copy.parquet")
        shutil.copyfile(data / row["path"], data / copy)
        rows.append({**row, "path": copy, "sequence_id": row["sequence_id"] + "0"})
    with (data / "train.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    run = tmp_path / "run"
    status = main(["train", "--data", str(data), "--format", "kaggle-islr", "--checkpoint-dir", str(run),
                   "--epochs", "1", "--no-progress", "--set", "split=stratified", "--set", "val_fraction=0.5",
                   "--set", "d_model=32", "--set", "num_layers=1", "--set", "dim_feedforward=64",
                   "--set", f"cache_dir={tmp_path / 'cache'}"])
    assert status == 0
    assert (run / "last_model.pth").is_file()
    capsys.readouterr()

    clip = sign_folder / "afiyet_olsun" / TEST_CLIPS["afiyet_olsun"]
    status = main(["predict", str(run / "last_model.pth"), str(clip), "--json", "--top-k", "3"])
    output = json.loads(capsys.readouterr().out)
    result = output["results"][0]
    assert status == 0
    assert result["file"] == str(clip)
    assert len(result["predictions"]) == 3
    assert {item["label"] for item in result["predictions"]} == set(TEST_CLIPS)
    assert abs(sum(item["probability"] for item in result["predictions"]) - 1.0) < 1e-5
