"""Extract MediaPipe Holistic landmarks from sign videos into the Kaggle ISLR parquet layout.

`isaret extract VIDEO_OR_FOLDER... --out DIR` writes one parquet per clip under
`DIR/landmarks/<sign>/` (543 rows per frame: face 468, left_hand 21, pose 33, right_hand 21,
NaN where MediaPipe found nothing) and `DIR/train.csv`, so that
`isaret train --data DIR --format kaggle-islr` reads the result directly.

Each parquet has a JSON sidecar (`<clip>.extract.json`) with the input file's size and
modification time and the extraction settings. A clip whose sidecar matches is skipped, so a
stopped run continues where it was. Parquet, sidecar and train.csv are each written to a
temporary file in the same folder, flushed to disk and renamed into place. The sidecar is
written only after its parquet, so a killed run never leaves an output that a later run trusts.

mediapipe and OpenCV are optional (`pip install "isaret[video]"`) and are imported only inside
the functions that need them.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import csv
import io
import json
import logging
import multiprocessing
import os
import queue
import re
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm import tqdm

from isaret.data.readers import KAGGLE_POINTS, KAGGLE_TYPE_OFFSETS, KAGGLE_TYPE_SIZES, KAGGLE_TYPES
from isaret.errors import DataError, IsaretError

log = logging.getLogger(__name__)

VIDEO_EXTENSIONS = (".mp4", ".webm", ".avi", ".mov")
EXTRA_INSTALL = 'pip install "isaret[video]"'
# Bump when the parquet written for the same video and settings changes, so that old outputs
# are extracted again instead of being reused.
OUTPUT_VERSION = 1
LANDMARK_FOLDER = "landmarks"
SIDECAR_SUFFIX = ".extract.json"
TMP_MARKER = ".tmp-"
MAX_FRAMES = int(np.iinfo(np.int16).max) + 1  # the Kaggle ISLR `frame` column is int16
# Pose landmark models of mediapipe.solutions.holistic by model_complexity. The mediapipe 0.10.21
# wheel ships only the `full` model, and MediaPipe would download the other two on first use.
POSE_MODEL_FILES = {0: "pose_landmark_lite.tflite", 1: "pose_landmark_full.tflite", 2: "pose_landmark_heavy.tflite"}
FRAMES_PER_PROGRESS_MESSAGE = 8
# A part counts as detected in a frame when its first point is finite, because MediaPipe returns
# all points of a part or none. Maps each part to that point's index in the 543-point frame.
DETECTED_PARTS = {name: int(KAGGLE_TYPE_OFFSETS[KAGGLE_TYPES.index(name)])
                  for name in ("pose", "left_hand", "right_hand", "face")}


class VideoReadError(DataError):
    """A video that cannot be opened or decoded, or that has no frames."""


# ----------------------------------------------------------------------------- settings and records

@dataclass(frozen=True)
class Settings:
    """MediaPipe Holistic options. Every field is part of each clip's fingerprint."""

    mirror: bool = False
    model_complexity: int = 1
    min_detection_confidence: float = 0.5
    min_tracking_confidence: float = 0.5

    def fingerprint(self, mediapipe_version: str, opencv_version: str) -> dict:
        """Return the settings, package versions and output version that a reusable output must match."""
        return {**asdict(self), "refine_face_landmarks": False, "mediapipe": mediapipe_version,
                "opencv": opencv_version, "output_version": OUTPUT_VERSION}


@dataclass(frozen=True)
class Clip:
    """One input video and where its landmarks go."""

    video: Path
    sign: str
    signer: str
    output: str  # parquet path relative to the output folder, with '/' separators
    label_source: str  # "folder", "csv" or "file name"


@dataclass
class ClipResult:
    """The outcome of one clip: its frame and detection counts, or the reason it failed."""

    clip: Clip
    frames: int = 0
    detected: dict[str, int] = field(default_factory=dict)
    reused: bool = False
    error: str = ""


@dataclass
class Summary:
    """Counts over one `extract` run."""

    results: list[ClipResult]
    seconds: float

    @property
    def failed(self) -> list[ClipResult]:
        return [r for r in self.results if r.error]

    @property
    def succeeded(self) -> list[ClipResult]:
        return [r for r in self.results if not r.error]

    @property
    def extracted_frames(self) -> int:
        return sum(r.frames for r in self.succeeded if not r.reused)


# ----------------------------------------------------------------------------- MediaPipe and OpenCV

def import_video_packages():
    """Import and return (cv2, mediapipe), raising DataError that names the `video` extra if either is missing."""
    try:
        import cv2
        import mediapipe
    except ImportError as error:
        raise DataError(
            f"video support is not installed ({error}); install the video extra: {EXTRA_INSTALL}"
        ) from None
    if not hasattr(mediapipe, "solutions"):
        raise DataError(
            f"mediapipe {getattr(mediapipe, '__version__', '?')} has no mediapipe.solutions.holistic; "
            f"install the version that the video extra pins: {EXTRA_INSTALL}"
        )
    return cv2, mediapipe


def check_pose_model(mediapipe, model_complexity: int) -> None:
    """Raise DataError unless the pose model for `model_complexity` is inside the mediapipe package.

    MediaPipe downloads a missing model from the internet when Holistic starts. isaret runs only
    from the models that the installed package contains.
    """
    if model_complexity not in POSE_MODEL_FILES:
        raise DataError(f"invalid model complexity {model_complexity}; use 0, 1 or 2")
    model = Path(mediapipe.__file__).parent / "modules" / "pose_landmark" / POSE_MODEL_FILES[model_complexity]
    if not model.is_file():
        raise DataError(
            f"--model-complexity {model_complexity} needs {model}, which mediapipe {mediapipe.__version__} "
            "does not ship, and isaret does not download models; use --model-complexity 1"
        )


def _open_video(cv2, path: Path):
    if not path.is_file():
        raise VideoReadError(f"{path}: file not found")
    if path.stat().st_size == 0:
        raise VideoReadError(f"{path}: empty file (0 bytes); re-copy or re-record the video")
    capture = cv2.VideoCapture(str(path))
    if not capture.isOpened():
        capture.release()
        raise VideoReadError(
            f"{path}: cannot open the video (corrupt file or a container/codec that OpenCV's FFmpeg cannot "
            "read); check that it plays, or re-encode it to H.264 MP4"
        )
    return capture


def _landmarks_to_frame(result) -> np.ndarray:
    """Convert one Holistic result into a (543, 3) float32 frame, NaN for parts that were not found."""
    frame = np.full((KAGGLE_POINTS, 3), np.nan, dtype=np.float32)
    parts = (result.face_landmarks, result.left_hand_landmarks, result.pose_landmarks, result.right_hand_landmarks)
    for name, landmarks, first, size in zip(KAGGLE_TYPES, parts, KAGGLE_TYPE_OFFSETS, KAGGLE_TYPE_SIZES, strict=True):
        if landmarks is None:
            continue
        points = [(p.x, p.y, p.z) for p in landmarks.landmark]
        if len(points) != size:
            raise RuntimeError(f"MediaPipe returned {len(points)} {name} landmarks; expected {size}")
        frame[first:first + size] = points
    return frame


def extract_clip(video_path: str | os.PathLike, mirror: bool = False, model_complexity: int = 1,
                 on_frame: Callable[[], None] | None = None,
                 min_detection_confidence: float = 0.5, min_tracking_confidence: float = 0.5) -> np.ndarray:
    """Run MediaPipe Holistic on every decoded frame of a video, in decoding order.

    Returns float32 frames shaped (T, 543, 3) in the Kaggle ISLR point order (face, left_hand,
    pose, right_hand), x and y normalised to the image size, NaN where nothing was detected.
    `mirror` flips each frame horizontally before MediaPipe processes it. `on_frame` is called after
    each frame. Raises VideoReadError (a DataError) for a missing, empty, unreadable or
    frameless video, and DataError when the video extra is not installed.
    """
    cv2, mediapipe = import_video_packages()
    check_pose_model(mediapipe, model_complexity)
    path = Path(video_path)
    capture = _open_video(cv2, path)
    frames: list[np.ndarray] = []
    try:
        ok, image = capture.read()
        if not ok:
            raise VideoReadError(f"{path}: no frames could be decoded (zero-frame or truncated video)")
        holistic = mediapipe.solutions.holistic.Holistic(
            static_image_mode=False,
            model_complexity=model_complexity,
            refine_face_landmarks=False,  # 468 face points, as in the Kaggle ISLR layout
            min_detection_confidence=min_detection_confidence,
            min_tracking_confidence=min_tracking_confidence,
        )
        with holistic:
            while ok:
                if len(frames) == MAX_FRAMES:
                    raise VideoReadError(f"{path}: more than {MAX_FRAMES} frames, the maximum of the int16 "
                                         "`frame` column; split the video into shorter clips")
                if mirror:
                    image = cv2.flip(image, 1)
                result = holistic.process(cv2.cvtColor(image, cv2.COLOR_BGR2RGB))
                frames.append(_landmarks_to_frame(result))
                if on_frame is not None:
                    on_frame()
                ok, image = capture.read()
    finally:
        capture.release()
    return np.stack(frames)


def count_detected(frames: np.ndarray) -> dict[str, int]:
    """Count the frames in which each part (pose, hands, face) was detected."""
    return {name: int(np.isfinite(frames[:, first, 0]).sum()) for name, first in DETECTED_PARTS.items()}


# ----------------------------------------------------------------------------- Kaggle ISLR parquet

def frames_to_table(frames: np.ndarray) -> pa.Table:
    """Convert (T, 543, 3) frames into a long Kaggle ISLR table with one row per frame and landmark."""
    count = frames.shape[0]
    if frames.shape[1:] != (KAGGLE_POINTS, 3):
        raise ValueError(f"frames shaped {frames.shape}; expected (T, {KAGGLE_POINTS}, 3)")
    point_type = np.repeat(np.array(KAGGLE_TYPES, dtype=object), KAGGLE_TYPE_SIZES)
    point_index = np.concatenate([np.arange(size, dtype=np.int16) for size in KAGGLE_TYPE_SIZES])
    frame = pa.array(np.repeat(np.arange(count, dtype=np.int16), KAGGLE_POINTS))
    kind = pa.array(np.tile(point_type, count), type=pa.string())
    index = pa.array(np.tile(point_index, count))
    row_id = pc.binary_join_element_wise(pc.cast(frame, pa.string()), kind, pc.cast(index, pa.string()), "-")
    flat = frames.reshape(-1, 3).astype(np.float32, copy=False)
    return pa.table({
        "frame": frame,
        "row_id": row_id,
        "type": kind,
        "landmark_index": index,
        "x": flat[:, 0],
        "y": flat[:, 1],
        "z": flat[:, 2],
    })


def _fsync_folder(folder: Path) -> None:
    # An fsync of the folder makes the rename durable on POSIX. Windows cannot open a folder for fsync.
    if os.name != "posix":
        return
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def write_atomic(path: Path, write: Callable[[object], None]) -> None:
    """Write a file through a temporary file in the same folder, fsync, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}{TMP_MARKER}{os.getpid()}")
    try:
        with open(tmp, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_folder(path.parent)


def write_parquet(frames: np.ndarray, path: Path) -> None:
    """Write frames as a Kaggle ISLR parquet, atomically."""
    table = frames_to_table(frames)
    write_atomic(path, lambda handle: pq.write_table(table, handle))


def write_json(data: dict, path: Path) -> None:
    text = json.dumps(data, indent=2, sort_keys=True) + "\n"
    write_atomic(path, lambda handle: handle.write(text.encode("utf-8")))


# ----------------------------------------------------------------------------- inputs and labels

def _safe_name(text: str) -> str:
    """Turn a label or file name into one path component (letters of any script, digits, . _ -)."""
    name = re.sub(r"[^\w.-]+", "_", text.strip()).strip(".")
    return name or "_"


def _output_for(sign: str, video: Path) -> str:
    return f"{LANDMARK_FOLDER}/{_safe_name(sign)}/{_safe_name(video.stem)}.parquet"


def _videos_in_folder(root: Path) -> list[tuple[Path, str, str]]:
    """List (video, sign, label source) in a folder: `<root>/<sign>/.../<clip>` or `<root>/<clip>`.

    Hidden files and folders (names starting with '.') are skipped, such as the `._clip.mp4`
    metadata files that macOS writes on some drives.
    """
    found = []
    for path in sorted(root.rglob("*")):
        parts = path.relative_to(root).parts
        if any(part.startswith(".") for part in parts):
            continue
        if path.suffix.lower() not in VIDEO_EXTENSIONS or not path.is_file():
            continue
        if len(parts) == 1:
            found.append((path, path.stem, "file name"))
        else:
            found.append((path, parts[0], "folder"))
    return found


def _videos_in_inputs(inputs: list[str]) -> list[tuple[Path, str, str]]:
    found = []
    for text in inputs:
        path = Path(text)
        if path.is_dir():
            videos = _videos_in_folder(path)
            if not videos:
                log.warning("%s: no %s files found in this folder", path, ", ".join(VIDEO_EXTENSIONS))
            found.extend(videos)
        elif path.is_file():
            if path.suffix.lower() not in VIDEO_EXTENSIONS:
                raise DataError(f"{path}: unsupported file type {path.suffix!r}; expected "
                                f"{', '.join(VIDEO_EXTENSIONS)} or a folder of them")
            found.append((path, path.stem, "file name"))
        else:
            raise DataError(f"input not found: {path}; pass video files or folders of videos")
    return found


def read_labels_csv(csv_path: Path) -> dict[Path, tuple[str, str]]:
    """Read a labels CSV (columns path, sign, optional signer) into {absolute video path: (sign, signer)}.

    Relative paths are taken relative to the CSV's own folder.
    """
    if not csv_path.is_file():
        raise DataError(f"labels CSV not found: {csv_path}; check --labels")
    try:
        with csv_path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            missing = [name for name in ("path", "sign") if name not in (reader.fieldnames or [])]
            if missing:
                raise DataError(f"{csv_path}: missing column(s) {', '.join(missing)}; "
                                "expected path,sign and optionally signer")
            rows = list(reader)
    except UnicodeDecodeError as error:
        raise DataError(f"{csv_path}: not valid UTF-8 text ({error})") from None
    except csv.Error as error:
        raise DataError(f"{csv_path}: invalid CSV ({error})") from None
    labels: dict[Path, tuple[str, str]] = {}
    for line, row in enumerate(rows, start=2):
        relative = (row.get("path") or "").strip()
        sign = (row.get("sign") or "").strip()
        if not relative or not sign:
            raise DataError(f"{csv_path}, line {line}: empty 'path' or 'sign'")
        video = (csv_path.parent / relative).resolve()
        if video in labels:
            raise DataError(f"{csv_path}, line {line}: {relative} is listed twice")
        labels[video] = (sign, (row.get("signer") or "").strip())
    if not labels:
        raise DataError(f"{csv_path}: no rows; expected one row per video")
    return labels


def _apply_labels(found: list[tuple[Path, str, str]], labels: dict[Path, tuple[str, str]],
                  csv_path: Path) -> list[tuple[Path, str, str, str]]:
    labelled, unlisted = [], []
    for video, _, _ in found:
        entry = labels.get(video.resolve())
        if entry is None:
            unlisted.append(str(video))
        else:
            labelled.append((video, entry[0], entry[1], "csv"))
    if unlisted:
        raise DataError(f"{csv_path}: no row for {len(unlisted)} video(s), e.g. {', '.join(unlisted[:5])}; "
                        "add a row per video or leave these videos out of the inputs")
    return labelled


def collect_clips(inputs: list[str], labels_csv: str = "") -> list[Clip]:
    """List the clips to extract, sorted by output path, with their signs and output paths.

    Without a labels CSV, a video in `<folder>/<sign>/` gets that sign and a video directly in
    an input folder (or given as a file) gets its file name without the extension. With a CSV,
    every video must have a row; with a CSV and no inputs, the CSV's rows are the clips.
    """
    labels = read_labels_csv(Path(labels_csv)) if labels_csv else {}
    if not inputs and not labels:
        raise DataError("no inputs; pass video files or folders, or --labels with a CSV of videos")
    if inputs:
        found = _videos_in_inputs(inputs)
        entries = (_apply_labels(found, labels, Path(labels_csv)) if labels
                   else [(video, sign, "", source) for video, sign, source in found])
    else:
        entries = [(video, sign, signer, "csv") for video, (sign, signer) in labels.items()]
    clips: dict[str, Clip] = {}
    seen: set[Path] = set()
    for video, sign, signer, source in entries:
        if video.resolve() in seen:
            continue
        seen.add(video.resolve())
        output = _output_for(sign, video)
        if output in clips:
            raise DataError(f"{clips[output].video} and {video} would both be written to {output}; "
                            "rename one of them, or give them different signs")
        clips[output] = Clip(video=video, sign=sign, signer=signer, output=output, label_source=source)
    if not clips:
        raise DataError(f"no videos found in {', '.join(inputs)}; expected {', '.join(VIDEO_EXTENSIONS)} files")
    return [clips[key] for key in sorted(clips)]


# ----------------------------------------------------------------------------- resume

def _sidecar_path(parquet: Path) -> Path:
    return parquet.with_name(parquet.name[: -len(".parquet")] + SIDECAR_SUFFIX)


def video_fingerprint(video: Path, settings: dict) -> dict:
    stat = video.stat()
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "settings": settings}


def load_current_record(clip: Clip, out_dir: Path, settings: dict) -> dict | None:
    """Return the sidecar record of a clip whose parquet is current, or None to extract it again."""
    parquet = out_dir / clip.output
    sidecar = _sidecar_path(parquet)
    try:
        record = json.loads(sidecar.read_text(encoding="utf-8"))
        current = video_fingerprint(clip.video, settings)
        parquet_bytes = parquet.stat().st_size
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("fingerprint") != current:
        return None
    if record.get("parquet_bytes") != parquet_bytes:
        return None
    return record


def remove_stale_temporary_files(out_dir: Path) -> None:
    """Delete temporary files left by a killed run (only names that write_atomic creates)."""
    stale = [p for p in (out_dir / LANDMARK_FOLDER).rglob(f".*{TMP_MARKER}*") if p.is_file()]
    stale += [p for p in out_dir.glob(f".train.csv{TMP_MARKER}*") if p.is_file()]
    for path in stale:
        path.unlink(missing_ok=True)
    if stale:
        log.info("removed %d temporary file(s) left by an interrupted run", len(stale))


# ----------------------------------------------------------------------------- one clip

def write_clip_outputs(clip: Clip, out_dir: Path, frames: np.ndarray, fingerprint: dict) -> ClipResult:
    """Write a clip's parquet, then its sidecar, which marks the parquet as complete."""
    parquet = out_dir / clip.output
    write_parquet(frames, parquet)
    detected = count_detected(frames)
    record = {"video": str(clip.video), "fingerprint": fingerprint, "frames": int(frames.shape[0]),
              "detected": detected, "parquet_bytes": parquet.stat().st_size}
    write_json(record, _sidecar_path(parquet))
    return ClipResult(clip=clip, frames=int(frames.shape[0]), detected=detected)


def process_clip(clip: Clip, out_dir: Path, settings: Settings, fingerprint_settings: dict,
                 on_frame: Callable[[], None] | None = None) -> ClipResult:
    """Extract one clip into its parquet and sidecar, returning (not raising) any Exception as the clip's error."""
    try:
        # Taken before decoding, so that a video changed during extraction is extracted again next time.
        fingerprint = video_fingerprint(clip.video, fingerprint_settings)
        frames = extract_clip(clip.video, mirror=settings.mirror, model_complexity=settings.model_complexity,
                              on_frame=on_frame, min_detection_confidence=settings.min_detection_confidence,
                              min_tracking_confidence=settings.min_tracking_confidence)
        return write_clip_outputs(clip, out_dir, frames, fingerprint)
    except VideoReadError as error:
        return ClipResult(clip=clip, error=str(error))
    except Exception as error:  # noqa: BLE001 - one clip's failure must not stop the other clips
        return ClipResult(clip=clip, error=f"{clip.video}: {type(error).__name__}: {error}")


_progress_queue = None  # set in each worker process by _init_worker
PARENT_CHECK_INTERVAL_S = 0.5


def _exit_when_parent_dies(parent_pid: int) -> None:
    # A worker whose parent was killed would otherwise keep extracting queued clips and then wait
    # for work forever. Killing it mid-clip is safe, because its outputs are written atomically.
    while os.getppid() == parent_pid:
        time.sleep(PARENT_CHECK_INTERVAL_S)
    os._exit(1)


def _init_worker(progress_queue, parent_pid: int) -> None:
    global _progress_queue
    _progress_queue = progress_queue
    threading.Thread(target=_exit_when_parent_dies, args=(parent_pid,), daemon=True).start()


def _process_clip_in_worker(clip: Clip, out_dir: Path, settings: Settings, fingerprint_settings: dict) -> ClipResult:
    counter = {"frames": 0}

    def report_frame() -> None:
        counter["frames"] += 1
        if counter["frames"] % FRAMES_PER_PROGRESS_MESSAGE == 0:
            _progress_queue.put(FRAMES_PER_PROGRESS_MESSAGE)

    result = process_clip(clip, out_dir, settings, fingerprint_settings, on_frame=report_frame)
    _progress_queue.put(counter["frames"] % FRAMES_PER_PROGRESS_MESSAGE)
    return result


# ----------------------------------------------------------------------------- many clips

def _run_in_process(todo: list[Clip], out_dir: Path, settings: Settings, fingerprint_settings: dict,
                    clip_bar: tqdm, frame_bar: tqdm, on_result: Callable[[ClipResult], None]) -> None:
    for clip in todo:
        on_result(process_clip(clip, out_dir, settings, fingerprint_settings, on_frame=lambda: frame_bar.update()))
        clip_bar.update()


def _drain(progress_queue, frame_bar: tqdm) -> None:
    while True:
        try:
            frame_bar.update(progress_queue.get_nowait())
        except queue.Empty:
            return


def _run_in_workers(todo: list[Clip], out_dir: Path, settings: Settings, fingerprint_settings: dict,
                    workers: int, clip_bar: tqdm, frame_bar: tqdm,
                    on_result: Callable[[ClipResult], None]) -> None:
    # spawn, not fork: forking a process that has loaded MediaPipe's threads can deadlock.
    context = multiprocessing.get_context("spawn")
    progress_queue = context.Queue()
    pool = concurrent.futures.ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=_init_worker,
                                                  initargs=(progress_queue, os.getpid()))
    with pool:
        futures = {pool.submit(_process_clip_in_worker, clip, out_dir, settings, fingerprint_settings): clip
                   for clip in todo}
        pending = set(futures)
        try:
            while pending:
                done, pending = concurrent.futures.wait(pending, timeout=0.2,
                                                        return_when=concurrent.futures.FIRST_COMPLETED)
                _drain(progress_queue, frame_bar)
                for future in done:
                    on_result(_future_result(future, futures[future]))
                    clip_bar.update()
        except KeyboardInterrupt:
            pool.shutdown(wait=False, cancel_futures=True)
            raise
    _drain(progress_queue, frame_bar)


def _future_result(future: concurrent.futures.Future, clip: Clip) -> ClipResult:
    try:
        return future.result()
    except concurrent.futures.process.BrokenProcessPool as error:
        return ClipResult(clip=clip, error=f"{clip.video}: worker process died ({error}); "
                                           "retry with --workers 1 to find the clip that crashes it")


def extract_videos(clips: list[Clip], out_dir: Path, settings: Settings, workers: int = 1) -> Summary:
    """Extract every clip not already current in `out_dir`, then write `out_dir/train.csv`."""
    cv2, mediapipe = import_video_packages()
    check_pose_model(mediapipe, settings.model_complexity)
    if out_dir.exists() and not out_dir.is_dir():
        raise DataError(f"--out {out_dir} is a file; pass a folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temporary_files(out_dir)
    fingerprint_settings = settings.fingerprint(mediapipe.__version__, cv2.__version__)
    start = time.perf_counter()
    results: dict[str, ClipResult] = {}
    todo = []
    for clip in clips:
        record = load_current_record(clip, out_dir, fingerprint_settings)
        if record is None:
            todo.append(clip)
        else:
            results[clip.output] = ClipResult(clip=clip, frames=int(record["frames"]),
                                              detected=dict(record["detected"]), reused=True)
    if len(todo) < len(clips):
        log.info("skipping %d of %d clip(s) already extracted with the same video and settings",
                 len(clips) - len(todo), len(clips))

    def on_result(result: ClipResult) -> None:
        results[result.clip.output] = result
        if result.error:
            log.error("failed: %s", result.error)

    with tqdm(total=len(clips), initial=len(clips) - len(todo), desc="clips", unit="clip", position=0,
              disable=None) as clip_bar, \
            tqdm(desc="frames", unit="frame", position=1, disable=None) as frame_bar:
        if workers <= 1 or len(todo) <= 1:
            _run_in_process(todo, out_dir, settings, fingerprint_settings, clip_bar, frame_bar, on_result)
        else:
            _run_in_workers(todo, out_dir, settings, fingerprint_settings, min(workers, len(todo)),
                            clip_bar, frame_bar, on_result)
    summary = Summary(results=[results[clip.output] for clip in clips], seconds=time.perf_counter() - start)
    write_train_csv(summary.succeeded, out_dir)
    return summary


def write_train_csv(results: list[ClipResult], out_dir: Path) -> None:
    """Write train.csv (path, participant_id, sequence_id, sign) for the clips of this run.

    sequence_id is the row number, starting at 1.
    """
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["path", "participant_id", "sequence_id", "sign"])
    for number, result in enumerate(results, start=1):
        writer.writerow([result.clip.output, result.clip.signer, number, result.clip.sign])
    text = buffer.getvalue()
    write_atomic(out_dir / "train.csv", lambda handle: handle.write(text.encode("utf-8")))


# ----------------------------------------------------------------------------- summary and CLI

def _share(count: int, total: int) -> str:
    return f"{100.0 * count / total:.1f}%" if total else "n/a"


def format_summary(summary: Summary, out_dir: Path) -> str:
    """Describe a run: clips, frames, frames per second, detection shares and failures."""
    done = summary.succeeded
    reused = sum(r.reused for r in done)
    frames = sum(r.frames for r in done)
    rate = summary.extracted_frames / summary.seconds if summary.seconds > 0 else 0.0
    lines = [
        f"clips: {len(summary.results)} ({len(done) - reused} extracted, {reused} already done, "
        f"{len(summary.failed)} failed)",
        f"frames: {frames} in the {len(done)} clip(s); {summary.extracted_frames} extracted in "
        f"{summary.seconds:.1f} s ({rate:.1f} frames/s)",
    ]
    if frames:
        shares = ", ".join(f"{name} {_share(sum(r.detected.get(name, 0) for r in done), frames)}"
                           for name in DETECTED_PARTS)
        lines.append(f"frames with landmarks: {shares}")
    by_name = [r.clip for r in summary.results if r.clip.label_source == "file name"]
    if by_name:
        lines.append(f"labels: {len(by_name)} clip(s) labelled by file name (no <sign>/ folder and no --labels), "
                     f"e.g. {by_name[0].video.name} -> {by_name[0].sign}")
    lines.append(f"output: {out_dir / 'train.csv'} ({len(done)} row(s)); train with "
                 f"isaret train --data {out_dir} --format kaggle-islr")
    for result in summary.failed:
        lines.append(f"failed: {result.error}")
    return "\n".join(lines)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid integer {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options of `isaret extract` to a parser."""
    parser.add_argument("inputs", nargs="*", metavar="VIDEO_OR_FOLDER",
                        help=f"video files ({', '.join(VIDEO_EXTENSIONS)}) or folders of <sign>/<clip> videos; "
                             "a video directly in a folder is labelled by its file name")
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="output folder for train.csv and landmarks/<sign>/<clip>.parquet")
    parser.add_argument("--labels", default="", metavar="CSV",
                        help="CSV with columns path,sign and optionally signer (paths relative to the CSV); "
                             "with no VIDEO_OR_FOLDER, its rows are the videos")
    parser.add_argument("--workers", type=_positive_int, default=1, metavar="N",
                        help="worker processes that extract clips in parallel (default 1)")
    parser.add_argument("--mirror", action="store_true",
                        help="flip every frame horizontally before MediaPipe, for mirrored (selfie-view) recordings")
    parser.add_argument("--model-complexity", type=int, choices=sorted(POSE_MODEL_FILES), default=1,
                        help="MediaPipe pose model: 0 lite, 1 full, 2 heavy (default 1, the only one that "
                             "the mediapipe wheel ships)")


def run(args: argparse.Namespace) -> int:
    """Run `isaret extract`; return 0 when every clip succeeded, 1 when any failed."""
    out_dir = Path(args.out)
    clips = collect_clips(list(args.inputs), args.labels)
    settings = Settings(mirror=args.mirror, model_complexity=args.model_complexity)
    log.info("extracting %d clip(s) into %s with %d worker(s)", len(clips), out_dir, args.workers)
    summary = extract_videos(clips, out_dir, settings, workers=args.workers)
    print(format_summary(summary, out_dir))
    return 1 if summary.failed else 0


def main(argv: list[str] | None = None) -> int:
    """Run `extract` without the rest of the CLI; returns the exit status."""
    parser = argparse.ArgumentParser(prog="isaret extract", description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        return run(args)
    except IsaretError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code
