"""Exact, crash-safe resume, shown with real training processes and real signals.

Every run trains a small model on the embedded demo data. A baseline run trains without
interruption. Each test stops a run in another way, resumes it, and compares the final
model and optimizer tensors bit for bit and the history row for row (timings aside).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from checks import assert_same_tensors, without_timings
from isaret.checkpoint import load_checkpoint
from isaret.cli import main

REPO = Path(__file__).resolve().parents[1]
EPOCHS = 4
SMALL_MODEL = ["--set", "d_model=32", "--set", "nhead=2", "--set", "num_layers=1", "--set", "dim_feedforward=64"]

# A training process that signals itself after a chosen optimizer step, dies in the middle of
# writing a chosen checkpoint, or signals itself while a background save is slow on purpose,
# so that the stop lands at a known point.
DRIVER = textwrap.dedent("""
    import io, os, signal, sys, threading, time
    import torch
    from isaret import checkpoint, trainer
    from isaret.cli import main

    mode, at = sys.argv[1], int(sys.argv[2])
    if mode == "kill-during-save":
        real_save, calls = torch.save, [0]
        def dying_save(obj, stream, *args, **kwargs):
            calls[0] += 1
            if calls[0] == at:
                buffer = io.BytesIO()
                real_save(obj, buffer, *args, **kwargs)
                with open(stream, "wb") as handle:
                    handle.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
                    handle.flush()
                    os.fsync(handle.fileno())
                os.kill(os.getpid(), signal.SIGKILL)  # the half file is on disk under its temp name
            return real_save(obj, stream, *args, **kwargs)
        torch.save = dying_save
    elif mode in ("SIGINT-twice-during-save", "SIGTERM-during-save"):
        real_save_atomic, calls = checkpoint.save_atomic, [0]
        def slow_save(payload, *args, **kwargs):
            if threading.current_thread() is not threading.main_thread():
                calls[0] += 1
                if calls[0] == at:
                    print(f"slow save of step {payload['global_step']}", file=sys.stderr, flush=True)
                    if mode.startswith("SIGINT"):
                        os.kill(os.getpid(), signal.SIGINT)
                        time.sleep(0.3)  # the main thread handles the first signal meanwhile
                        os.kill(os.getpid(), signal.SIGINT)
                    else:
                        time.sleep(0.3)  # the main thread finishes its loop and waits for this save
                        os.kill(os.getpid(), signal.SIGTERM)
                    time.sleep(0.3)
            return real_save_atomic(payload, *args, **kwargs)
        checkpoint.save_atomic = slow_save
    else:
        original = trainer.Trainer._optimizer_step
        def step_then_signal(self):
            original(self)
            if self.progress.global_step == at:
                os.kill(os.getpid(), getattr(signal, mode))
        trainer.Trainer._optimizer_step = step_then_signal
    sys.exit(main(["train", *sys.argv[3:]]))
""")


def train_args(folder: Path, cache: Path, *extra: str) -> list[str]:
    return ["--checkpoint-dir", str(folder), "--epochs", str(EPOCHS), "--batch-size", "8", "--no-progress",
            "--set", f"cache_dir={cache}", *SMALL_MODEL, *extra]


def run_cli(*args: str, driver: tuple[str, int] | None = None, cwd: Path | None = None,
            timeout: float = 300) -> subprocess.CompletedProcess:
    """Run `isaret train ARGS` (or the self-signalling driver) in a new Python process."""
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    if driver is None:
        command = [sys.executable, "-m", "isaret", "train", *args]
    else:
        command = [sys.executable, "-c", DRIVER, driver[0], str(driver[1]), *args]
    return subprocess.run(command, capture_output=True, text=True, env=env, cwd=cwd or REPO, timeout=timeout)


def start_until_first_checkpoint(folder: Path, args: list[str], **popen_args) -> subprocess.Popen:
    """Start `isaret train ARGS` in a new process and return once folder/last_model.pth exists."""
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    process = subprocess.Popen([sys.executable, "-m", "isaret", "train", *args], cwd=REPO, env=env, **popen_args)
    deadline = time.monotonic() + 120
    while not (folder / "last_model.pth").exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    return process


def final_state(folder: Path) -> dict:
    return load_checkpoint(folder / "last_model.pth")


def assert_same_run(resumed: dict, baseline: dict) -> None:
    assert resumed["epoch"] == baseline["epoch"]
    assert resumed["global_step"] == baseline["global_step"]
    assert_same_tensors(resumed["model_state_dict"], baseline["model_state_dict"], "model")
    assert_same_tensors(resumed["optimizer_state_dict"], baseline["optimizer_state_dict"], "optimizer")
    assert without_timings(resumed["history"]) == without_timings(baseline["history"])


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def baseline(tmp_path_factory, cache) -> Path:
    """An uninterrupted run with an epoch file kept for every epoch."""
    folder = tmp_path_factory.mktemp("baseline")
    result = run_cli(*train_args(folder, cache, "--set", "keep_last_k=10"))
    assert result.returncode == 0, result.stderr
    return folder


def test_resume_epoch_boundary_identical(baseline, cache, tmp_path):
    folder = tmp_path / "run"
    result = run_cli(*train_args(folder, cache), "--resume", str(baseline / "epoch_002.pth"))
    assert result.returncode == 0, result.stderr
    assert "RESUMING TRAINING from epoch 3" in result.stderr
    assert "resuming from epoch 3 (step" in result.stderr
    assert_same_run(final_state(folder), final_state(baseline))


@pytest.mark.parametrize("saves", ["foreground", "background"])
def test_resume_after_sigint_mid_epoch(baseline, cache, tmp_path, saves):
    folder = tmp_path / "run"
    background = ["--set", f"async_save={saves == 'background'}"]
    stopped = run_cli(*train_args(folder, cache, *background), driver=("SIGINT", 10))
    assert stopped.returncode == 130, stopped.stderr
    assert f"resume with: isaret train --resume {folder / 'last_model.pth'}" in stopped.stderr
    interrupted = load_checkpoint(folder / "last_model.pth")
    assert interrupted["global_step"] == 10
    assert interrupted["batch_in_epoch"] > 0
    resumed = run_cli("--resume", str(folder / "last_model.pth"), "--no-progress")
    assert resumed.returncode == 0, resumed.stderr
    assert f"batch {interrupted['batch_in_epoch'] + 1}" in resumed.stderr
    assert_same_run(final_state(folder), final_state(baseline))


def test_resume_after_sigterm_with_workers(cache, tmp_path):
    workers = ["--set", "num_workers=2"]
    reference = tmp_path / "reference"
    assert run_cli(*train_args(reference, cache, *workers)).returncode == 0
    folder = tmp_path / "run"
    stopped = run_cli(*train_args(folder, cache, *workers), driver=("SIGTERM", 13))
    assert stopped.returncode == 143, stopped.stderr
    resumed = run_cli("--resume", str(folder / "last_model.pth"), "--no-progress")
    assert resumed.returncode == 0, resumed.stderr
    assert_same_run(final_state(folder), final_state(reference))


def test_resume_sigint_from_terminal_process_group(baseline, cache, tmp_path):
    """Ctrl+C in a terminal signals the whole process group, DataLoader workers included."""
    folder = tmp_path / "run"
    args = train_args(folder, cache, "--set", "num_workers=2", "--set", "save_every_steps=1")
    process = start_until_first_checkpoint(folder, args, stderr=subprocess.PIPE, text=True, start_new_session=True)
    os.killpg(process.pid, signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode in (0, 130), stderr
    assert "Traceback" not in stderr
    resumed = run_cli("--auto-resume", *train_args(folder, cache, "--set", "num_workers=2"))
    assert resumed.returncode == 0, resumed.stderr
    reference = tmp_path / "reference"
    assert run_cli(*train_args(reference, cache, "--set", "num_workers=2")).returncode == 0
    assert_same_run(final_state(folder), final_state(reference))


def test_resume_after_sigkill_at_random_time(baseline, cache, tmp_path):
    folder = tmp_path / "run"
    args = train_args(folder, cache, "--set", "save_every_steps=3")
    process = start_until_first_checkpoint(folder, args, stderr=subprocess.DEVNULL)
    time.sleep(0.3)
    process.kill()
    process.wait(timeout=60)
    resumed = run_cli(*args, "--auto-resume")
    assert resumed.returncode == 0, resumed.stderr
    assert_same_run(final_state(folder), final_state(baseline))


def test_sigkill_with_workers_leaves_folder_unlocked(baseline, cache, tmp_path):
    # The DataLoader workers outlive a SIGKILLed training process for a few seconds; they must
    # not hold the folder lock meanwhile.
    folder = tmp_path / "run"
    args = train_args(folder, cache, "--set", "num_workers=2", "--set", "save_every_steps=1")
    process = start_until_first_checkpoint(folder, args, stderr=subprocess.DEVNULL)
    process.kill()
    process.wait(timeout=60)
    resumed = run_cli(*args, "--auto-resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "another isaret run" not in resumed.stderr
    assert_same_run(final_state(folder), final_state(baseline))


def test_resume_after_sigkill_during_save(baseline, cache, tmp_path):
    folder = tmp_path / "run"
    args = train_args(folder, cache, "--set", "save_every_steps=4")
    killed = run_cli(*args, driver=("kill-during-save", 3))
    assert killed.returncode == -signal.SIGKILL
    leftovers = [p.name for p in folder.iterdir() if p.name.startswith(".tmp-")]
    assert leftovers, "the killed save should have left its temp file behind"
    committed = load_checkpoint(folder / "last_model.pth")
    assert committed["global_step"] == 8
    resumed = run_cli(*args, "--auto-resume")
    assert resumed.returncode == 0, resumed.stderr
    assert not [p for p in folder.iterdir() if p.name.startswith(".tmp-")]
    assert_same_run(final_state(folder), final_state(baseline))


def test_background_saves_same_run(baseline, cache, tmp_path):
    folder = tmp_path / "run"
    result = run_cli(*train_args(folder, cache, "--set", "async_save=true", "--set", "save_every_steps=3"))
    assert result.returncode == 0, result.stderr
    assert_same_run(final_state(folder), final_state(baseline))


def test_background_save_failure_stops_run(cache, tmp_path):
    folder = tmp_path / "run"
    (folder / "epoch_002.pth").mkdir(parents=True)  # the save of epoch 2 cannot rename onto a folder
    result = run_cli(*train_args(folder, cache, "--set", "async_save=true"))
    assert result.returncode == 1, result.stderr
    assert f"error: failed to write checkpoint {folder / 'epoch_002.pth'}" in result.stderr
    assert "Epoch 4/" not in result.stderr
    assert final_state(folder)["epoch"] == 1
    assert not [p for p in folder.iterdir() if p.name.startswith(".tmp-")]


def test_second_ctrl_c_during_background_save(baseline, cache, tmp_path):
    folder = tmp_path / "run"
    args = train_args(folder, cache, "--set", "async_save=true", "--set", "save_every_steps=2")
    stopped = run_cli(*args, driver=("SIGINT-twice-during-save", 3))
    assert stopped.returncode == 130, stopped.stderr
    assert "error: interrupted by Ctrl+C" in stopped.stderr
    assert "terminate called" not in stopped.stderr
    # The save in flight at the abort is committed before the process exits.
    assert "slow save of step 6" in stopped.stderr
    assert final_state(folder)["global_step"] == 6
    assert not [p for p in folder.iterdir() if p.name.startswith(".tmp-")]
    resumed = run_cli(*args, "--auto-resume")
    assert resumed.returncode == 0, resumed.stderr
    assert_same_run(final_state(folder), final_state(baseline))


def test_sigterm_during_last_background_save(baseline, cache, tmp_path):
    folder = tmp_path / "run"
    result = run_cli(*train_args(folder, cache, "--set", "async_save=true"), driver=("SIGTERM-during-save", EPOCHS))
    assert result.returncode == 0, result.stderr
    assert "SIGTERM received" in result.stderr
    assert_same_run(final_state(folder), final_state(baseline))
    assert not [p for p in folder.iterdir() if p.name.startswith(".tmp-")]


def test_resume_from_best_replays_later_epochs(cache, tmp_path):
    original = tmp_path / "original"
    args = train_args(original, cache, "--set", "keep_last_k=10", "--epochs", "6", "--lr", "0.003")
    assert run_cli(*args).returncode == 0
    baseline = final_state(original)
    best_epoch = baseline["progress"]["best_epoch"]
    assert best_epoch < 6, "setup: the best epoch must come before the last one"
    copy = tmp_path / "copy"
    shutil.copytree(original, copy, ignore=shutil.ignore_patterns("last_model.pth", "epoch_*.pth"))
    resumed = run_cli("--resume-from-best", "--checkpoint-dir", str(copy), "--no-progress")
    assert resumed.returncode == 0, resumed.stderr
    assert f"RESUMING TRAINING from epoch {best_epoch + 1}" in resumed.stderr
    assert_same_run(final_state(copy), baseline)
    assert load_checkpoint(copy / "best_model.pth")["epoch"] == best_epoch


def test_resume_early_stop_same_epoch(cache, tmp_path):
    original = tmp_path / "original"
    args = ["--set", "early_stopping_patience=2", "--set", "keep_last_k=20", "--epochs", "20", "--lr", "0.003"]
    assert run_cli(*train_args(original, cache, *args)).returncode == 0
    baseline = final_state(original)
    stop_epoch = baseline["epoch"]
    assert baseline["progress"]["stopped_early"], "setup: the run must stop early"
    resume_file = f"epoch_{stop_epoch - 1:03d}.pth"
    assert load_checkpoint(original / resume_file)["patience_counter"] == 1
    folder = tmp_path / "run"
    shutil.copytree(original, folder, ignore=shutil.ignore_patterns("last_model.pth", f"epoch_{stop_epoch:03d}.pth"))
    best_before = (folder / "best_model.pth").read_bytes()
    resumed = run_cli("--resume", str(folder / resume_file), "--no-progress")
    assert resumed.returncode == 0, resumed.stderr
    assert "early stopping patience 1/2" in resumed.stderr
    assert f"Early stopping at epoch {stop_epoch}" in resumed.stderr
    assert_same_run(final_state(folder), baseline)
    assert (folder / "best_model.pth").read_bytes() == best_before


def test_resume_lr_and_epochs_change(baseline, cache, tmp_path):
    folder = tmp_path / "run"
    result = run_cli("--resume", str(baseline / "epoch_002.pth"), "--checkpoint-dir", str(folder),
                     "--lr", "0.01", "--epochs", "7", "--no-progress")
    assert result.returncode == 0, result.stderr
    assert "lr: 0.001 -> 0.01" in result.stderr
    assert "num_epochs: 4 -> 7" in result.stderr
    state = final_state(folder)
    assert state["epoch"] == 7
    history = state["history"]
    assert len(history) == 7
    assert history[2]["lr"] > history[1]["lr"] * 5
    assert state["scheduler_state_dict"]["lr_lambdas"][0]["total_steps"] == 7 * 8


def test_resume_past_original_schedule(baseline, cache, tmp_path):
    folder = tmp_path / "run"
    shutil.copytree(baseline, folder)
    result = run_cli("--resume", str(folder / "last_model.pth"), "--epochs", "6", "--no-progress")
    assert result.returncode == 0, result.stderr
    state = final_state(folder)
    assert state["epoch"] == 6
    assert state["history"][-1]["lr"] > 0


def test_resume_architecture_mismatch_lists_fields(baseline, capsys):
    code = main(["train", "--resume", str(baseline / "last_model.pth"), "--set", "d_model=64",
                 "--set", "num_layers=2", "--set", "max_seq_len=32", "--no-progress"])
    message = capsys.readouterr().err
    assert code == 1
    assert "d_model: checkpoint 32, current 64" in message
    assert "num_layers: checkpoint 1, current 2" in message
    assert "max_seq_len: checkpoint 64, current 32" in message
    assert "--set d_model=32" in message


def test_resume_finished_run_trains_nothing(baseline, capsys):
    before = (baseline / "last_model.pth").stat().st_mtime_ns
    code = main(["train", "--resume", str(baseline / "last_model.pth"), "--no-progress"])
    message = capsys.readouterr().err
    assert code == 0
    assert "Nothing to train: the run ended at epoch 4 of 4" in message
    assert (baseline / "last_model.pth").stat().st_mtime_ns == before


def test_fresh_start_into_existing_run_refused(baseline, cache, capsys):
    code = main(["train", *train_args(baseline, cache)])
    message = capsys.readouterr().err
    assert code == 1
    assert "already contains a run" in message
    assert "--auto-resume" in message


@pytest.mark.parametrize("damage", ["truncated", "bitflip", "empty", "foreign", "code"])
def test_resume_damaged_checkpoint_reported(baseline, tmp_path, capsys, damage):
    folder = tmp_path / "run"
    shutil.copytree(baseline, folder)
    last = folder / "last_model.pth"
    marker = tmp_path / "code-ran"
    damage_file(last, damage, marker)
    code = main(["train", "--resume", str(last), "--no-progress"])
    message = capsys.readouterr().err
    assert code == 1
    assert str(last) in message
    assert not marker.exists()
    reasons = {"truncated": "corrupt", "bitflip": "corrupt", "empty": "empty", "foreign": "not an isaret checkpoint",
               "code": "pickled Python code or objects"}
    assert reasons[damage] in message


@pytest.mark.parametrize("damage", ["truncated", "bitflip", "empty", "foreign", "code"])
def test_auto_resume_falls_back(baseline, tmp_path, capsys, damage):
    folder = tmp_path / "run"
    shutil.copytree(baseline, folder)
    for newer in ("last_model.pth", "epoch_004.pth"):
        damage_file(folder / newer, damage, tmp_path / "code-ran")
        os.utime(folder / newer)
    code = main(["train", "--auto-resume", "--checkpoint-dir", str(folder), "--epochs", str(EPOCHS),
                 "--no-progress"])
    message = capsys.readouterr().err
    assert code == 0
    assert not (tmp_path / "code-ran").exists()
    assert f"Skipping checkpoint: invalid checkpoint {folder / 'last_model.pth'}" in message or \
        f"refused to load {folder / 'last_model.pth'}" in message
    assert "Falling back to the newest valid checkpoint" in message


def damage_file(path: Path, damage: str, marker: Path) -> None:
    data = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "bitflip":
        position = len(data) // 2
        path.write_bytes(data[:position] + bytes([data[position] ^ 0x01]) + data[position + 1:])
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "foreign":
        path.unlink()
        torch.save({"state_dict": {"weight": torch.ones(3)}}, path)
    elif damage == "code":
        path.unlink()
        torch.save({"payload": _WritesMarker(str(marker))}, path)


class _WritesMarker:
    """An object whose unpickling would create a file: a stand-in for malicious code."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_inspect_real_checkpoint(baseline, capsys):
    code = main(["inspect", str(baseline / "last_model.pth")])
    output = capsys.readouterr().out
    assert code == 0
    assert "format version: 2" in output
    assert f"epoch: {EPOCHS} completed" in output
    assert "mid-epoch: no" in output
    assert "classes (2): hello, thankyou" in output
    assert "best val acc:" in output
    assert f"history: {EPOCHS} epochs" in output


def test_inspect_into_closed_pipe_quiet(baseline, tmp_path):
    # `true` exits before isaret has imported torch, so every write meets a closed pipe.
    stderr_path = tmp_path / "stderr.txt"
    command = (f"{shlex.quote(sys.executable)} -m isaret inspect {shlex.quote(str(baseline / 'last_model.pth'))} "
               f"2> {shlex.quote(str(stderr_path))}; echo $? > {shlex.quote(str(tmp_path / 'status.txt'))}")
    subprocess.run(f"({command}) | true", shell=True, cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO / "src")),
                   timeout=120, check=True)

    assert stderr_path.read_text() == ""
    assert (tmp_path / "status.txt").read_text().strip() == "141"


def test_inspect_config_differences(baseline, tmp_path, capsys):
    config = tmp_path / "other.toml"
    config.write_text("[model]\nd_model = 64\n[train]\nlr = 0.01\n", encoding="utf-8")
    code = main(["inspect", str(baseline / "last_model.pth"), "--config", str(config)])
    output = capsys.readouterr().out
    assert code == 0
    assert "d_model: checkpoint 32, config 64 (blocks a resume)" in output
    assert "lr: checkpoint 0.001, config 0.01 (allowed on resume)" in output


def test_resume_history_outside_checkpoint(baseline, cache, tmp_path):
    folder = tmp_path / "run"
    args = train_args(folder, cache, "--set", "save_history_in_checkpoint=false", "--set", "keep_last_k=10")
    assert run_cli(*args).returncode == 0
    assert load_checkpoint(folder / "last_model.pth")["history"] == []
    resumed = run_cli("--resume", str(folder / "epoch_002.pth"), "--no-progress")
    assert resumed.returncode == 0, resumed.stderr
    rows = json.loads((folder / "history.json").read_text())["epochs"]
    expected = json.loads((baseline / "history.json").read_text())["epochs"]
    assert without_timings(rows) == without_timings(expected)


def test_resume_into_other_run_refused(baseline, cache, tmp_path, capsys):
    other = tmp_path / "other"
    shutil.copytree(baseline, other)
    code = main(["train", "--resume", str(baseline / "epoch_002.pth"), "--checkpoint-dir", str(other),
                 "--no-progress"])
    message = capsys.readouterr().err
    assert code == 1
    assert f"--checkpoint-dir {other} already contains another run" in message
    assert load_checkpoint(other / "last_model.pth")["epoch"] == EPOCHS


def test_auto_resume_ignores_file_times(baseline, tmp_path, capsys):
    folder = tmp_path / "copy"
    shutil.copytree(baseline, folder)
    os.utime(folder / "best_model.pth")
    os.utime(folder / "epoch_002.pth")
    code = main(["train", "--auto-resume", "--checkpoint-dir", str(folder), "--no-progress"])
    message = capsys.readouterr().err
    assert code == 0
    assert "Nothing to train: the run ended at epoch 4 of 4" in message
    assert f"Loading checkpoint from {folder / 'best_model.pth'}" not in message
    assert f"Loading checkpoint from {folder / 'epoch_002.pth'}" not in message


def test_resume_earlier_sets_later_aside(baseline, tmp_path):
    folder = tmp_path / "copy"
    shutil.copytree(baseline, folder, ignore=shutil.ignore_patterns("best_model.pth"))
    result = run_cli("--resume", str(folder / "epoch_002.pth"), "--no-progress")
    assert result.returncode == 0, result.stderr
    moved = sorted(p.name for p in folder.glob("superseded-*/*.pth"))
    assert moved == ["epoch_003.pth", "epoch_004.pth", "last_model.pth"]
    assert "moved 3 later checkpoint(s) of the abandoned continuation" in result.stderr
    assert_same_run(final_state(folder), final_state(baseline))


def test_second_run_same_folder_refused(tmp_path, capsys):
    from isaret.checkpoint import FolderLock

    folder = tmp_path / "run"
    lock = FolderLock.acquire(folder)
    try:
        code = main(["train", "--checkpoint-dir", str(folder), "--no-progress"])
    finally:
        lock.release()
    message = capsys.readouterr().err
    assert code == 1
    assert f"another isaret run (process {os.getpid()}) is writing to {folder}" in message
