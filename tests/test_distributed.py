"""Training under torchrun with two CPU processes (gloo), shown with real launches and signals.

Every launch trains a small model on the embedded demo data. A baseline run trains three
epochs without interruption. The other runs stop, crash or change the number of processes,
and the tests compare their checkpoints with the baseline's. Launches go through
`python -m torch.distributed.run --standalone`, which binds only to localhost.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist

from checks import assert_same_tensors, without_timings
from isaret.checkpoint import load_checkpoint
from isaret.config import Config
from isaret.data.dataset import EpochSampler
from isaret.distributed import DistContext, choose_backend, launch_command
from isaret.errors import ConfigError
from isaret.trainer import Trainer

pytestmark = pytest.mark.skipif(not dist.is_gloo_available(), reason="this torch build has no gloo backend")

REPO = Path(__file__).resolve().parents[1]
EPOCHS = 3
STEPS_PER_EPOCH = 4  # 59 training samples, 8 per process and batch, 2 processes
SMALL_MODEL = ["--set", "d_model=32", "--set", "nhead=2", "--set", "num_layers=1", "--set", "dim_feedforward=64"]
LAUNCH_TIMEOUT = 180

# The script that torchrun starts in the driven runs. Through Python's audit hooks, it records
# every file that its rank creates, writes, renames or deletes under the checkpoint folder.
# It can also hold one rank after a chosen optimizer step until that rank gets a stop signal,
# so that the test sends its signal at a known step.
DRIVER = textwrap.dedent("""
    import atexit, os, sys, time
    from pathlib import Path
    from isaret import trainer
    from isaret.cli import main

    workdir, folder = Path(sys.argv[1]), os.path.realpath(sys.argv[2])
    hold_rank, hold_step = int(sys.argv[3]), int(sys.argv[4])
    rank = int(os.environ["RANK"])
    writes = []

    def is_write(event, args):
        if event == "open":
            mode, flags = args[1], args[2]
            if isinstance(mode, str) and any(letter in mode for letter in "wax+"):
                return True
            return isinstance(flags, int) and bool(flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
        return event in ("os.rename", "os.remove", "os.link", "os.mkdir", "os.rmdir", "os.truncate")

    def record(event, args):
        if not is_write(event, args):
            return
        # os.rename and os.link name the source and the target. A file descriptor is not a path.
        named = args[:2] if event in ("os.rename", "os.link") else args[:1]
        paths = [os.fsdecode(os.fspath(arg)) for arg in named if isinstance(arg, (str, bytes, os.PathLike))]
        if any(path.startswith(folder) for path in paths):
            writes.append(f"{event} {' '.join(paths)}")

    sys.addaudithook(record)
    atexit.register(lambda: (workdir / f"writes-rank{rank}.txt").write_text("\\n".join(writes)))

    original = trainer.Trainer._optimizer_step
    def step_then_hold(self):
        original(self)
        if self.progress.global_step == hold_step and self.ctx.rank == hold_rank:
            (workdir / f"held-rank{rank}").write_text(str(os.getpid()))
            deadline = time.monotonic() + 120
            while not self.stop.requested and time.monotonic() < deadline:
                time.sleep(0.01)
    trainer.Trainer._optimizer_step = step_then_hold
    sys.exit(main(["train", *sys.argv[5:]]))
""")


# ----------------------------------------------------------------------------- launching

def train_args(folder: Path, cache: Path, *extra: str) -> list[str]:
    return ["--checkpoint-dir", str(folder), "--epochs", str(EPOCHS), "--batch-size", "8", "--no-progress",
            "--set", f"cache_dir={cache}", *SMALL_MODEL, *extra]


def child_env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(REPO / "src"))


def torchrun_command(*program: str, launcher_options: tuple[str, ...] = ()) -> list[str]:
    """Return the command that runs PROGRAM (a script, or -m and a module) in 2 processes."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            *launcher_options, *program]


def run_torchrun(*program: str, launcher_options: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    return subprocess.run(torchrun_command(*program, launcher_options=launcher_options), capture_output=True,
                          text=True, env=child_env(), cwd=REPO, timeout=LAUNCH_TIMEOUT)


def start_torchrun(*program: str) -> subprocess.Popen:
    return subprocess.Popen(torchrun_command(*program), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, env=child_env(), cwd=REPO)


def run_single(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "isaret", "train", *args], capture_output=True, text=True,
                          env=child_env(), cwd=REPO, timeout=LAUNCH_TIMEOUT)


def driven(driver: Path, workdir: Path, folder: Path, hold_rank: int = -1, hold_step: int = 0) -> list[str]:
    return [str(driver), str(workdir), str(folder), str(hold_rank), str(hold_step)]


def wait_for(path: Path, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + LAUNCH_TIMEOUT
    while not path.exists():
        if process.poll() is not None:
            pytest.fail(f"torchrun exited with {process.returncode} before {path.name} appeared:\n"
                        f"{process.stderr.read()}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"timed out waiting for {path}")
        time.sleep(0.05)


def worker_pid(launcher_pid: int, rank: int) -> int:
    """Return the pid of the torchrun worker of `rank`: a child of the launcher with RANK=rank."""
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(line.split(":", 1) for line in status.read_text().splitlines() if ":" in line)
            environ = (status.parent / "environ").read_bytes().split(b"\0")
        except OSError:
            continue  # the process ended while we looked
        if int(fields["PPid"]) == launcher_pid and f"RANK={rank}".encode() in environ:
            return int(status.parent.name)
    raise AssertionError(f"no worker with RANK={rank} under torchrun pid {launcher_pid}")


# ----------------------------------------------------------------------------- comparing

def final_state(folder: Path) -> dict:
    return load_checkpoint(folder / "last_model.pth")


# ----------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def driver(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("driver") / "driver.py"
    path.write_text(DRIVER, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def baseline(tmp_path_factory, cache, driver) -> Path:
    """An uninterrupted 2-process run; its workdir contains the per-rank write records and logs."""
    workdir = tmp_path_factory.mktemp("baseline")
    folder = workdir / "run"
    result = run_torchrun(*driven(driver, workdir, folder), *train_args(folder, cache),
                          launcher_options=("--log-dir", str(workdir / "logs"), "--tee", "3"))
    assert result.returncode == 0, result.stderr
    return workdir


@pytest.fixture(scope="module")
def stopped(tmp_path_factory, cache, driver) -> Path:
    """A 2-process run stopped by SIGTERM to torchrun while rank 0 is held after step 6 (epoch 2).

    The interrupt checkpoint is copied to interrupted.pth before any test resumes the run.
    """
    workdir = tmp_path_factory.mktemp("stopped")
    folder = workdir / "run"
    process = start_torchrun(*driven(driver, workdir, folder, hold_rank=0, hold_step=6), *train_args(folder, cache))
    wait_for(workdir / "held-rank0", process)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=LAUNCH_TIMEOUT)
    (workdir / "stderr.txt").write_text(stderr, encoding="utf-8")
    (workdir / "returncode.txt").write_text(str(process.returncode), encoding="utf-8")
    shutil.copy2(folder / "last_model.pth", workdir / "interrupted.pth")
    return workdir


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory, stopped, cache) -> Path:
    """The 2-process interrupt checkpoint, resumed in 1 process and trained to the end of epoch 2."""
    folder = tmp_path_factory.mktemp("one-process") / "run"
    result = run_single("--resume", str(stopped / "interrupted.pth"), "--checkpoint-dir", str(folder),
                        "--epochs", "2", "--no-progress")
    assert result.returncode == 0, result.stderr
    (folder.parent / "stderr.txt").write_text(result.stderr, encoding="utf-8")
    return folder


# ----------------------------------------------------------------------------- only rank 0 writes

def test_checkpoint_folder_written_by_rank0_only(baseline):
    rank0 = (baseline / "writes-rank0.txt").read_text().splitlines()
    rank1 = (baseline / "writes-rank1.txt").read_text().splitlines()
    assert any(line.endswith("last_model.pth") for line in rank0), rank0
    assert any(line.endswith("train.log") for line in rank0), rank0
    assert rank1 == []


def test_checkpoint_folder_listing_complete(baseline, cache):
    names = sorted(path.name for path in (baseline / "run").iterdir())
    assert names == [".lock", "accuracy.png", "best_model.pth", "config.toml", "epoch_001.pth", "epoch_002.pth",
                     "epoch_003.pth", "f1.png", "history.csv", "history.json", "last_model.pth", "loss.png",
                     "lr.png", "train.log"]
    cache_entries = [path.name for path in cache.iterdir()]
    assert len(cache_entries) == 1, cache_entries
    assert not cache_entries[0].startswith(".tmp-")


def test_rank1_logs_no_info_lines(baseline):
    rank1_logs = list((baseline / "logs").glob("*/attempt_0/1/stderr.log"))
    assert len(rank1_logs) == 1
    rank1 = rank1_logs[0].read_text()
    for info in ("Joined process group", "training in", "Data:", "Epoch 1/3", "Training finished"):
        assert info not in rank1
    train_log = (baseline / "run" / "train.log").read_text()
    assert "Epoch 3/3" in train_log
    assert "[rank 1]" not in train_log
    assert train_log.count("Training finished") == 1


def test_checkpoint_stores_every_rank(baseline):
    state = final_state(baseline / "run")
    assert state["world_size"] == 2
    assert len(state["rng_states"]) == 2
    assert state["global_step"] == EPOCHS * STEPS_PER_EPOCH
    assert not torch.equal(state["rng_states"][0]["torch"], state["rng_states"][1]["torch"])


# ----------------------------------------------------------------------------- validation

def test_validation_metrics_equal_single_process(baseline):
    """Each epoch's metrics, reduced over 2 ranks, equal a 1-process evaluation of its checkpoint."""
    history = final_state(baseline / "run")["history"]
    for epoch in range(1, EPOCHS + 1):
        path = baseline / "run" / f"epoch_{epoch:03d}.pth"
        checkpoint = load_checkpoint(path)
        cfg = Config.from_dict(checkpoint["config"], source=str(path))
        trainer = Trainer(cfg, DistContext(), show_progress=False)
        trainer.setup(checkpoint, path)
        val_loss, val_acc, val_f1 = trainer.evaluate()
        row = history[epoch - 1]
        assert val_acc == row["val_acc"], f"epoch {epoch}"
        assert val_f1 == row["val_f1"], f"epoch {epoch}"
        assert val_loss == pytest.approx(row["val_loss"], abs=1e-6), f"epoch {epoch}"


# ----------------------------------------------------------------------------- SIGTERM and resume

def test_sigterm_stops_all_ranks_same_step(stopped):
    stderr = (stopped / "stderr.txt").read_text()
    interrupted = load_checkpoint(stopped / "interrupted.pth")
    # torch 2.13's torchrun forwards SIGTERM to every worker, waits for them (30 s by default),
    # then re-raises the signal as SignalException and exits with 1.
    assert int((stopped / "returncode.txt").read_text()) != 0
    assert stderr.count("training stopped by SIGTERM at epoch 2, step 6") == 2, stderr
    assert "[rank 1] training stopped by SIGTERM" in stderr
    assert f"resume with: torchrun --nproc_per_node=2 -m isaret train --resume {stopped / 'run'}" in stderr
    assert interrupted["global_step"] == 6
    assert interrupted["batch_in_epoch"] == 2
    assert interrupted["world_size"] == 2
    assert not [path for path in (stopped / "run").iterdir() if path.name.startswith(".tmp-")]


def test_sigterm_auto_resume_identical(stopped, baseline, cache):
    folder = stopped / "run"
    resumed = run_torchrun("-m", "isaret", "train", *train_args(folder, cache), "--auto-resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from epoch 2 (step 6), batch 3" in resumed.stderr
    assert "Checkpoint was written by" not in resumed.stderr
    result, reference = final_state(folder), final_state(baseline / "run")
    assert result["global_step"] == reference["global_step"]
    assert_same_tensors(result["model_state_dict"], reference["model_state_dict"], "model")
    assert_same_tensors(result["optimizer_state_dict"], reference["optimizer_state_dict"], "optimizer")
    assert without_timings(result["history"]) == without_timings(reference["history"])


# ----------------------------------------------------------------------------- other world sizes

def test_two_process_checkpoint_resumes_in_one(one_process_run):
    stderr = (one_process_run.parent / "stderr.txt").read_text()
    state = final_state(one_process_run)
    assert "Checkpoint was written by 2 process(es), this run has 1" in stderr
    # Epoch 2 was 2 batches of 2 x 8 samples in, which is 4 batches of 8 in one process (8 per epoch).
    assert "batch 2 -> 4, optimizer step 6 -> 12" in stderr
    assert state["world_size"] == 1
    assert state["epoch"] == 2
    assert state["global_step"] == 2 * 2 * STEPS_PER_EPOCH
    assert len(state["history"]) == 2


def test_one_process_checkpoint_resumes_in_two(one_process_run, tmp_path):
    folder = tmp_path / "run"
    result = run_torchrun("-m", "isaret", "train", "--resume", str(one_process_run / "last_model.pth"),
                          "--checkpoint-dir", str(folder), "--epochs", str(EPOCHS), "--no-progress")
    assert result.returncode == 0, result.stderr
    assert "Checkpoint was written by 1 process(es), this run has 2" in result.stderr
    assert "optimizer step 16 -> 8" in result.stderr
    state = final_state(folder)
    assert state["world_size"] == 2
    assert state["epoch"] == EPOCHS
    assert state["global_step"] == EPOCHS * STEPS_PER_EPOCH
    assert [row["epoch"] for row in state["history"]] == [1, 2, 3]


# ----------------------------------------------------------------------------- failures

def test_sigkill_rank_ends_job(tmp_path, cache, driver):
    folder = tmp_path / "run"
    args = train_args(folder, cache, "--set", "save_every_steps=1")
    process = start_torchrun(*driven(driver, tmp_path, folder, hold_rank=1, hold_step=5), *args)
    wait_for(tmp_path / "held-rank1", process)
    os.kill(worker_pid(process.pid, rank=1), signal.SIGKILL)
    _, stderr = process.communicate(timeout=LAUNCH_TIMEOUT)
    assert process.returncode != 0
    assert "SIGKILL" in stderr
    # Rank 1 died after step 5 and before the save of step 5, so step 4 is the newest save.
    committed = load_checkpoint(folder / "last_model.pth")
    assert committed["global_step"] == 4
    assert not [path for path in folder.iterdir() if path.name.startswith(".tmp-")]


def test_save_failure_stops_all_ranks(tmp_path, cache):
    folder = tmp_path / "run"
    (folder / "last_model.pth").mkdir(parents=True)  # os.replace onto a folder fails on rank 0
    started = time.monotonic()
    result = run_torchrun("-m", "isaret", "train", *train_args(folder, cache, "--set", "save_every_steps=1"))
    assert result.returncode != 0
    assert f"error: failed to write checkpoint {folder / 'last_model.pth'}" in result.stderr
    assert "error: rank 0 failed: failed to write checkpoint" in result.stderr
    assert time.monotonic() - started < 90


# ----------------------------------------------------------------------------- units

@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_epoch_sampler_shards_partition_order(world_size):
    size, batch_size = 23, 4
    single = [key[0] for batch in EpochSampler(size, batch_size, seed=7, epoch=3) for key in batch]
    shards = [[key[0] for batch in EpochSampler(size, batch_size, seed=7, epoch=3, rank=rank,
                                                   world_size=world_size) for key in batch]
              for rank in range(world_size)]
    assert len({len(shard) for shard in shards}) == 1
    interleaved = [shard[i] for i in range(len(shards[0])) for shard in shards]
    # Round-robin over the ranks gives back the 1-process order, then the wrap-around padding.
    assert interleaved[:size] == single
    assert interleaved[size:] == single[: len(interleaved) - size]


def test_epoch_sampler_steps_match_across_world_sizes():
    """With batch_size x processes x accum_steps fixed, each optimizer step trains the same samples."""
    size, batch_size, global_batch = 64, 4, 16

    def step_samples(world_size: int) -> list[set[int]]:
        accum = global_batch // (batch_size * world_size)
        per_rank = [list(EpochSampler(size, batch_size, seed=1, epoch=2, rank=rank, world_size=world_size))
                    for rank in range(world_size)]
        steps = len(per_rank[0]) // accum
        return [{key[0] for rank in per_rank for batch in rank[step * accum:(step + 1) * accum] for key in batch}
                for step in range(steps)]

    single_process = step_samples(1)
    assert len(single_process) == size // global_batch
    assert step_samples(2) == single_process
    assert step_samples(4) == single_process


def test_validation_shards_disjoint_without_padding():
    size = 17
    shards = [np.asarray(EpochSampler(size, 5, seed=0, epoch=0, shuffle=False, rank=rank, world_size=4,
                                      pad=False).rank_positions()) for rank in range(4)]
    assert sorted(np.concatenate(shards).tolist()) == list(range(size))


def test_choose_backend_auto_on_cpu_is_gloo():
    assert choose_backend("auto", torch.device("cpu"), 2) == "gloo"


def test_choose_backend_nccl_on_cpu_rejected():
    with pytest.raises(ConfigError, match="dist_backend=nccl needs CUDA"):
        choose_backend("nccl", torch.device("cpu"), 2)


def test_launch_command_single_machine():
    ctx = DistContext(rank=0, world_size=4, local_world_size=4)
    assert launch_command(ctx) == "torchrun --nproc_per_node=4 -m isaret train"


def test_launch_command_multi_node():
    ctx = DistContext(rank=0, world_size=8, local_world_size=4)
    command = launch_command(ctx)
    assert command.startswith("torchrun --nnodes=2 --nproc_per_node=4 ")
    assert "--rdzv_endpoint=HOST:PORT" in command
