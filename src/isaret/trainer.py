"""The training loop: data, model and optimizer setup, epochs, validation, checkpoints and resume.

The loop only calls `self.checkpointer.save(...)` and `Trainer.load_state_dict(...)`; what a
checkpoint contains is `Trainer.state_dict()`. Everything random is either a pure function of
(seed, epoch, sample) or a generator whose state the checkpoint stores, which makes a resumed
run end with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import logging
import math
import shlex
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from isaret import __version__
from isaret.checkpoint import BEST, Checkpointer, FolderLock, capture_rng_state, checkpoint_candidates, \
    close_inherited_folder_locks, remove_stale_temp_files, restore_rng_state, set_aside_later_checkpoints, \
    training_position
from isaret.config import Config, save_toml
from isaret.data.cache import CachedData, load_or_build
from isaret.data.dataset import Augmenter, EpochSampler, FeatureScaler, SignDataset, Split, batches_per_epoch, \
    make_split
from isaret.data.readers import list_samples
from isaret.distributed import DistContext, all_reduce_sum, any_rank, barrier, broadcast_object, gather_objects, \
    launch_command, run_on_main
from isaret.errors import CheckpointError, DataError, TrainingInterrupted
from isaret.history import plot_history, read_history, write_history
from isaret.interrupt import EXIT_CODES, StopRequest, ignore_stop_signals_in_worker, stop_signals_blocked
from isaret.metrics import accuracy, confusion_matrix, macro_f1
from isaret.model import build_model
from isaret.optim import apply_hyperparameters, build_optimizer, build_scheduler, restore_scheduler
from isaret.resume import check_compatible, check_same, log_changes

log = logging.getLogger(__name__)


def _init_worker(worker_id: int) -> None:
    """DataLoader worker_init_fn: leave stop signals and the folder lock to the training process."""
    ignore_stop_signals_in_worker(worker_id)
    close_inherited_folder_locks()


def demo_data_path() -> Path:
    return Path(__file__).resolve().parent / "demo_data"


@dataclass
class Progress:
    """Counters that move with training; saved in every checkpoint."""

    epoch: int = 0  # last completed epoch (1-based; 0 before the first)
    global_step: int = 0  # optimizer steps taken
    batch_in_epoch: int = 0  # micro-batches of epoch + 1 already trained (mid-epoch checkpoints)
    val_acc: float = 0.0  # last epoch's
    val_f1: float = 0.0
    best_val_acc: float = -1.0
    best_val_f1: float = 0.0  # macro-F1 of the best-accuracy epoch
    best_epoch: int = 0
    patience_counter: int = 0
    stopped_early: bool = False
    loss_sum: float = 0.0  # running sums of the epoch in progress
    correct: int = 0
    seen: int = 0
    last_lr: float = 0.0
    history: list[dict] = field(default_factory=list)
    resume_points: list[dict] = field(default_factory=list)

    def start_epoch(self) -> None:
        self.batch_in_epoch, self.loss_sum, self.correct, self.seen = 0, 0.0, 0, 0


class Trainer:
    def __init__(self, cfg: Config, ctx: DistContext, show_progress: bool = True):
        self.cfg = cfg
        self.ctx = ctx
        self.device = ctx.device
        self.show_progress = show_progress and ctx.is_main
        self.folder = Path(cfg.checkpoint.checkpoint_dir)
        self.checkpointer = Checkpointer(self.folder, cfg.checkpoint.keep_last_k, ctx,
                                         background=cfg.checkpoint.async_save)
        self.progress = Progress()
        self.resumed_from: Path | None = None

    # ------------------------------------------------------------------ setup

    def setup(self, checkpoint: dict | None, checkpoint_path: Path | None) -> None:
        """Build data, model and optimizer; with a checkpoint, restore them from it in order."""
        cfg = self.cfg
        if checkpoint is not None:
            log.info("Loading checkpoint from %s", checkpoint_path)
            changes = check_compatible(checkpoint["config"], cfg, str(checkpoint_path))
            log_changes(changes)
        self.data = self._load_data()
        self._setup_split_and_scaler(checkpoint, checkpoint_path)
        self._build_loaders()
        self._build_model()
        if checkpoint is not None:
            self.load_state_dict(checkpoint, checkpoint_path)
        self._wrap_distributed()

    def _load_data(self) -> CachedData:
        cfg = self.cfg.data
        root = Path(cfg.data_path) if cfg.data_path else demo_data_path()
        samples = list_samples(root, cfg.data_format, cfg.signer_csv, cfg.bad_file_policy)
        # Rank 0 builds the cache; the others wait and then read the finished entry.
        # NOTE: all ranks of a machine that does not share cache_dir with rank 0 build the entry at
        # once. That repeats the work, but the rename in load_or_build keeps one complete copy.
        data = run_on_main(lambda: load_or_build(samples, cfg, show_progress=self.show_progress), self.ctx)
        if not self.ctx.is_main:
            data = load_or_build(samples, cfg, show_progress=False)
        barrier(self.ctx)
        return data

    def _setup_split_and_scaler(self, checkpoint: dict | None, path: Path | None) -> None:
        data = self.data
        if checkpoint is None:
            self.classes = sorted(set(data.labels))
            if len(self.classes) < 2:
                raise DataError(f"found {len(self.classes)} class ({', '.join(self.classes)}); training needs at least 2")
            self.split = make_split(data, self.cfg.data, self.cfg.train.seed)
            self.scaler = FeatureScaler.fit(data.features(), self.split.train)
            return
        fix = "resume with the data set the run was trained on, or start a fresh run in another --checkpoint-dir"
        check_same("preprocessing", checkpoint["preprocessing"], data.preprocessing.to_dict(), str(path), fix)
        self.classes = list(checkpoint["label_map"])
        check_same("classes (names and order)", self.classes, sorted(set(data.labels)), str(path), fix)
        self.split = Split.from_dict(checkpoint["split"], data.sample_ids)
        self.scaler = FeatureScaler.from_state_dict(checkpoint["feature_scaler"])

    def _build_loaders(self) -> None:
        cfg, data = self.cfg, self.data
        label_index = {name: i for i, name in enumerate(self.classes)}
        selection = data.preprocessing.selection
        augmenter = None
        if cfg.data.augment:
            augmenter = Augmenter(cfg.data, selection.coord_count, selection.mirror)
        self.train_set = SignDataset(data, self.split.train, label_index, self.scaler, augmenter, cfg.train.seed)
        self.val_set = SignDataset(data, self.split.val, label_index, self.scaler, None, cfg.train.seed)
        self.micro_batches = batches_per_epoch(len(self.train_set), cfg.train.batch_size, self.ctx.world_size)
        self.steps_per_epoch = math.ceil(self.micro_batches / cfg.train.accum_steps)
        log.info("Data: %d classes, %d training and %d validation samples (%s split), %d features x %d frames",
                 len(self.classes), len(self.train_set), len(self.val_set), self.split.kind,
                 data.preprocessing.feature_dim, data.preprocessing.max_seq_len)
        if self.ctx.enabled or cfg.train.accum_steps > 1:
            log.info("Global batch: %d samples x %d process(es) x accum_steps %d = %d samples per optimizer "
                     "step", cfg.train.batch_size, self.ctx.world_size, cfg.train.accum_steps,
                     cfg.train.batch_size * self.ctx.world_size * cfg.train.accum_steps)

    def _batches(self, dataset: SignDataset, sampler: EpochSampler):
        """Return an iterator over the sampler's batches, with worker processes started safely."""
        workers = self.cfg.data.num_workers
        if workers:
            # Workers are forked: no checkpoint thread may hold a lock while the process is copied.
            self.checkpointer.wait()
        loader = DataLoader(dataset, batch_sampler=sampler, num_workers=workers,
                            worker_init_fn=_init_worker if workers else None,
                            # A private generator keeps the loader from drawing on the global torch RNG.
                            generator=torch.Generator(), pin_memory=self.device.type == "cuda")
        if not workers:
            return iter(loader)
        with stop_signals_blocked():
            return iter(loader)

    def _build_model(self) -> None:
        cfg = self.cfg
        torch.manual_seed(cfg.train.seed)
        prep = self.data.preprocessing
        self.model = build_model(prep.feature_dim, len(self.classes), prep.max_seq_len, cfg.model).to(self.device)
        self.optimizer = build_optimizer(self.model, cfg.train)
        self.scheduler = build_scheduler(self.optimizer, cfg.train, self.steps_per_epoch)
        self.criterion = nn.CrossEntropyLoss(label_smoothing=cfg.train.label_smoothing)
        self.amp_dtype = None
        if cfg.train.amp and self.device.type == "cuda":
            self.amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        self.grad_scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        parameters = sum(p.numel() for p in self.model.parameters())
        log.info("Model: %s parameters on %s%s", f"{parameters:,}", self.device,
                 f", autocast {self.amp_dtype}" if self.amp_dtype else "")
        # Dropout draws from the global torch RNG: start it from a known state on every rank.
        torch.manual_seed(cfg.train.seed + 1_000_003 * self.ctx.rank)
        np.random.seed(cfg.train.seed + self.ctx.rank)

    def _wrap_distributed(self) -> None:
        self.train_model = self.model
        if self.ctx.enabled:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self.train_model = DistributedDataParallel(self.model, device_ids=device_ids)

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict:
        """Everything a resume or a prediction needs, as tensors and primitives; call on every rank."""
        rng_states = gather_objects(capture_rng_state(), self.ctx)
        running_sums = gather_objects([self.progress.loss_sum, self.progress.correct, self.progress.seen], self.ctx)
        progress = asdict(self.progress)
        if not self.cfg.checkpoint.save_history_in_checkpoint:
            progress["history"] = []
        return {
            "isaret_version": __version__,
            "epoch": self.progress.epoch,
            "global_step": self.progress.global_step,
            "batch_in_epoch": self.progress.batch_in_epoch,
            "val_acc": self.progress.val_acc,
            "val_f1": self.progress.val_f1,
            "patience_counter": self.progress.patience_counter,
            "history": progress["history"],
            "progress": progress,
            "model_state_dict": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            "optimizer_state_dict": self.optimizer.state_dict(),
            "scheduler_state_dict": self.scheduler.state_dict(),
            "grad_scaler_state_dict": self.grad_scaler.state_dict(),
            "rng_states": rng_states,
            "running_sums": running_sums,  # every rank's [loss_sum, correct, seen] of the epoch in progress
            "world_size": self.ctx.world_size,
            "config": self.cfg.to_dict(),
            "label_map": list(self.classes),
            "feature_scaler": self.scaler.state_dict(),
            "preprocessing": self.data.preprocessing.to_dict(),
            "split": self.split.to_dict(self.data.sample_ids),
        }

    def load_state_dict(self, checkpoint: dict, path: Path) -> None:
        """Restore in order: model, optimizer, scheduler, grad scaler, counters, then RNG states."""
        self.model.load_state_dict(checkpoint["model_state_dict"])
        self.optimizer.load_state_dict(checkpoint["optimizer_state_dict"])
        apply_hyperparameters(self.optimizer, self.cfg.train)
        stored = dict(checkpoint["progress"])
        if not stored["history"] and stored["epoch"]:
            stored["history"] = self._history_from_folder(path.parent, stored["epoch"])
        self.progress = Progress(**stored)
        self.scheduler = restore_scheduler(self.optimizer, checkpoint["scheduler_state_dict"], self.cfg.train,
                                           self.steps_per_epoch, self.progress.global_step)
        self.grad_scaler.load_state_dict(checkpoint["grad_scaler_state_dict"])
        log.info("  model weights, optimizer, scheduler and RNG states loaded")
        self._restore_position(checkpoint)
        self.resumed_from = path
        p = self.progress
        log.info("  resuming from epoch %d (step %d)%s, best val acc %.4f at epoch %d, best val F1 %.4f",
                 p.epoch + 1, p.global_step, f", batch {p.batch_in_epoch + 1}" if p.batch_in_epoch else "",
                 max(p.best_val_acc, 0.0), p.best_epoch, p.best_val_f1)
        log.info("  training history restored (%d epochs); early stopping patience %d/%d", len(p.history),
                 p.patience_counter, self.cfg.train.early_stopping_patience)
        p.resume_points.append({"epoch": p.epoch, "step": p.global_step, "batch_in_epoch": p.batch_in_epoch,
                                "from": str(path), "time": time.time()})

    def _history_from_folder(self, folder: Path, epoch: int) -> list[dict]:
        """Read the rows up to `epoch` from history.json, for checkpoints saved without their history."""
        try:
            rows, _ = read_history(folder)
        except (OSError, ValueError, KeyError) as error:
            log.warning("  the checkpoint has no history (save_history_in_checkpoint=false) and %s could not "
                        "be read (%s): the history restarts at epoch %d", folder / "history.json", error, epoch + 1)
            return []
        return [row for row in rows if row["epoch"] <= epoch]

    def _restore_position(self, checkpoint: dict) -> None:
        stored_world = int(checkpoint.get("world_size", 1))
        states = checkpoint["rng_states"]
        same_world = stored_world == self.ctx.world_size and len(states) == self.ctx.world_size
        self._restore_running_sums(checkpoint, same_world)
        if same_world:
            restore_rng_state(states[self.ctx.rank])
            return
        log.warning("Checkpoint was written by %d process(es), this run has %d: model, optimizer, scheduler "
                    "and counters are restored, but data order and RNG streams differ from the uninterrupted run",
                    stored_world, self.ctx.world_size)
        # A rank without a stored state keeps the per-rank seed from _build_model, so that no two
        # ranks draw the same dropout masks.
        if self.ctx.rank < len(states):
            restore_rng_state(states[self.ctx.rank])
        stored_train = checkpoint["config"]["train"]
        self._warn_global_batch(stored_train, stored_world)
        self._map_position(stored_train, stored_world)

    def _restore_running_sums(self, checkpoint: dict, same_world: bool) -> None:
        """Give each rank its own running sums of the epoch. After a world-size change, rank 0 takes them all."""
        sums = checkpoint.get("running_sums")
        if not sums:
            return  # a checkpoint without them keeps rank 0's sums from "progress" on every rank
        if same_world:
            loss_sum, correct, seen = sums[self.ctx.rank]
        elif self.ctx.is_main:
            loss_sum, correct, seen = (sum(column) for column in zip(*sums))
        else:
            loss_sum, correct, seen = 0.0, 0, 0
        p = self.progress
        p.loss_sum, p.correct, p.seen = float(loss_sum), int(correct), int(seen)

    def _warn_global_batch(self, stored_train: dict, stored_world: int) -> None:
        cfg = self.cfg.train
        stored = stored_train["batch_size"] * stored_world * stored_train["accum_steps"]
        per_pass = cfg.batch_size * self.ctx.world_size
        current = per_pass * cfg.accum_steps
        if stored == current:
            return
        hint = f"; --set accum_steps={stored // per_pass} keeps {stored}" if stored % per_pass == 0 else ""
        log.warning("Global batch size changes from %d to %d samples per optimizer step (batch_size x processes x "
                    "accum_steps)%s", stored, current, hint)

    def _map_position(self, stored_train: dict, stored_world: int) -> None:
        """Move the mid-epoch position and the step counter to this run's batches per epoch.

        A mid-epoch resume starts at the first optimizer step whose samples were not all trained,
        so some samples of the epoch may be trained twice, but none is skipped. The step counter
        becomes that of an uninterrupted run with this layout, which keeps the LR schedule at the
        same point of training.
        """
        p, cfg = self.progress, self.cfg.train
        stored_micro = batches_per_epoch(len(self.train_set), stored_train["batch_size"], stored_world)
        if p.batch_in_epoch >= stored_micro:
            micro = self.micro_batches
        else:
            samples_done = p.batch_in_epoch * stored_train["batch_size"] * stored_world
            micro = samples_done // (cfg.batch_size * self.ctx.world_size)
            micro -= micro % cfg.accum_steps
        step = p.epoch * self.steps_per_epoch + math.ceil(micro / cfg.accum_steps)
        if (micro, step) != (p.batch_in_epoch, p.global_step):
            log.info("  position moved to this run's %d batches per epoch: batch %d -> %d, optimizer step %d -> %d",
                     self.micro_batches, p.batch_in_epoch, micro, p.global_step, step)
        p.batch_in_epoch, p.global_step = micro, step
        self.scheduler = build_scheduler(self.optimizer, cfg, self.steps_per_epoch, step)

    # ------------------------------------------------------------------ loop

    def fit(self) -> Progress:
        cfg, p = self.cfg, self.progress
        if self._already_finished():
            return p
        if p.epoch + 1 > 1 or p.batch_in_epoch:
            log.info("RESUMING TRAINING from epoch %d", p.epoch + 1)
        with StopRequest() as stop:
            self.stop = stop
            while p.epoch < cfg.train.num_epochs:
                epoch = p.epoch + 1
                started = time.perf_counter()

                # Train one epoch (or its rest, after a mid-epoch resume).
                self._train_epoch(epoch)

                # Validate on the whole validation split, across ranks.
                val_loss, val_acc, val_f1 = self.evaluate(epoch)

                # Record the epoch, keep the best, and decide on early stopping.
                self._finish_epoch(epoch, val_loss, val_acc, val_f1, time.perf_counter() - started)
                if p.stopped_early:
                    break

            # Commit the last background save while SIGINT and SIGTERM still only set a flag.
            self.checkpointer.wait()
        self._write_reports()
        return p

    def _already_finished(self) -> bool:
        p, cfg = self.progress, self.cfg.train
        patience_hit = cfg.early_stopping_patience and p.patience_counter >= cfg.early_stopping_patience
        if p.stopped_early and patience_hit:
            log.info("Nothing to train: the run stopped early at epoch %d, after %d epochs without a better "
                     "validation accuracy. Raise early_stopping_patience (--set early_stopping_patience=N, "
                     "0 turns it off) to train further.", p.epoch, p.patience_counter)
            return True
        if p.epoch >= cfg.num_epochs:
            log.info("Nothing to train: the run ended at epoch %d of %d. Raise num_epochs (--epochs) to train "
                     "further.", p.epoch, cfg.num_epochs)
            return True
        p.stopped_early = False
        return False

    def _train_epoch(self, epoch: int) -> None:
        cfg, p = self.cfg.train, self.progress
        if p.batch_in_epoch == 0:
            p.start_epoch()
        sampler = EpochSampler(len(self.train_set), cfg.batch_size, cfg.seed, epoch, rank=self.ctx.rank,
                               world_size=self.ctx.world_size, start_batch=p.batch_in_epoch)
        self.train_model.train()
        bar = tqdm(total=self.micro_batches, initial=p.batch_in_epoch, desc=f"Epoch {epoch}/{cfg.num_epochs} [Train]",
                   disable=not self.show_progress, leave=False, dynamic_ncols=True)
        micro = p.batch_in_epoch
        for x, valid, y in self._batches(self.train_set, sampler):
            step_start = micro - micro % cfg.accum_steps
            in_step = min(cfg.accum_steps, self.micro_batches - step_start)
            last_of_step = micro + 1 == step_start + in_step
            self._forward_backward(x, valid, y, in_step, sync=last_of_step)
            micro += 1
            bar.update(1)
            if last_of_step:
                self._optimizer_step()
                p.batch_in_epoch = micro
                bar.set_postfix(loss=f"{p.loss_sum / max(p.seen, 1):.4f}")
                self._after_step(epoch)
        bar.close()

    def _forward_backward(self, x, valid, y, in_step: int, sync: bool) -> None:
        x, valid, y = x.to(self.device), valid.to(self.device), y.to(self.device)
        context = nullcontext() if sync or not self.ctx.enabled else self.train_model.no_sync()
        autocast = torch.autocast("cuda", dtype=self.amp_dtype) if self.amp_dtype else nullcontext()
        with context:
            with autocast:
                logits = self.train_model(x, valid)
                loss = self.criterion(logits.float(), y)
            self.grad_scaler.scale(loss / in_step).backward()
        p = self.progress
        p.loss_sum += float(loss.detach()) * len(y)
        p.correct += int((logits.argmax(dim=-1) == y).sum())
        p.seen += len(y)

    def _optimizer_step(self) -> None:
        p = self.progress
        p.last_lr = self.optimizer.param_groups[0]["lr"]
        if self.cfg.train.grad_clip > 0:
            self.grad_scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.train.grad_clip)
        self.grad_scaler.step(self.optimizer)
        self.grad_scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        p.global_step += 1

    def _after_step(self, epoch: int) -> None:
        """Checkpoint mid-epoch on request: after SIGINT/SIGTERM (then stop) or every save_every_steps."""
        self.checkpointer.check()
        stop = any_rank(self.stop.requested, self.ctx)
        every = self.cfg.checkpoint.save_every_steps
        if stop or (every and self.progress.global_step % every == 0):
            path = self.checkpointer.save(self.state_dict(), epoch_file=None, protected=self._protected(), wait=stop)
            if stop:
                self._write_reports()
                name = self.stop.signal_name or "SIGTERM"
                command = resume_command(path, self.ctx)
                raise TrainingInterrupted(
                    name, EXIT_CODES.get(name, 143),
                    f"training stopped by {name} at epoch {epoch}, step {self.progress.global_step}; "
                    f"checkpoint saved to {path}\nresume with: {command}",
                )

    def evaluate(self, epoch: int | None = None) -> tuple[float, float, float]:
        """Return (loss, accuracy, macro-F1) over the whole validation split, summed across ranks."""
        cfg = self.cfg.train
        sampler = EpochSampler(len(self.val_set), cfg.batch_size * 2, cfg.seed, 0, shuffle=False,
                               rank=self.ctx.rank, world_size=self.ctx.world_size, pad=False)
        classes = len(self.classes)
        confusion = torch.zeros(classes, classes, dtype=torch.int64)
        loss_sum = torch.zeros(1, dtype=torch.float64)
        self.model.eval()
        desc = f"Epoch {epoch}/{cfg.num_epochs} [Val]" if epoch else "[Val]"
        batches = self._batches(self.val_set, sampler)
        with torch.no_grad():
            for x, valid, y in tqdm(batches, total=len(sampler), desc=desc, disable=not self.show_progress,
                                    leave=False):
                x, valid, y = x.to(self.device), valid.to(self.device), y.to(self.device)
                autocast = torch.autocast("cuda", dtype=self.amp_dtype) if self.amp_dtype else nullcontext()
                with autocast:
                    logits = self.model(x, valid).float()
                loss_sum += float(nn.functional.cross_entropy(logits, y, reduction="sum",
                                                              label_smoothing=cfg.label_smoothing))
                confusion += confusion_matrix(y.cpu(), logits.argmax(dim=-1).cpu(), classes)
        confusion = all_reduce_sum(confusion, self.ctx)
        loss_sum = all_reduce_sum(loss_sum, self.ctx)
        total = int(confusion.sum())
        return float(loss_sum) / max(total, 1), accuracy(confusion), macro_f1(confusion)

    def _finish_epoch(self, epoch: int, val_loss: float, val_acc: float, val_f1: float, seconds: float) -> None:
        cfg, p = self.cfg, self.progress
        sums = all_reduce_sum(torch.tensor([p.loss_sum, p.correct, p.seen], dtype=torch.float64), self.ctx)
        train_loss, train_acc = float(sums[0] / max(sums[2], 1)), float(sums[1] / max(sums[2], 1))
        p.history.append({"epoch": epoch, "train_loss": train_loss, "train_acc": train_acc, "val_loss": val_loss,
                          "val_acc": val_acc, "val_f1": val_f1, "lr": p.last_lr, "seconds": round(seconds, 3)})
        p.epoch, p.batch_in_epoch, p.val_acc, p.val_f1 = epoch, 0, val_acc, val_f1
        improved = val_acc > p.best_val_acc
        if improved:
            p.best_val_acc, p.best_val_f1, p.best_epoch, p.patience_counter = val_acc, val_f1, epoch, 0
        else:
            p.patience_counter += 1
        patience = cfg.train.early_stopping_patience
        p.stopped_early = bool(patience) and p.patience_counter >= patience and epoch < cfg.train.num_epochs
        log.info("Epoch %d/%d: train loss %.4f acc %.4f | val loss %.4f acc %.4f F1 %.4f | lr %.2e | %.1f s%s",
                 epoch, cfg.train.num_epochs, train_loss, train_acc, val_loss, val_acc, val_f1, p.last_lr, seconds,
                 " | best" if improved else "")
        self._save_epoch(epoch, improved)
        if p.stopped_early:
            log.info("Early stopping at epoch %d: no better validation accuracy for %d epochs (best %.4f at "
                     "epoch %d)", epoch, patience, p.best_val_acc, p.best_epoch)

    def _save_epoch(self, epoch: int, improved: bool) -> None:
        cfg, p = self.cfg, self.progress
        last = epoch == cfg.train.num_epochs or p.stopped_early
        regular = epoch % cfg.checkpoint.save_frequency == 0
        if not (improved or regular or last):
            if self.ctx.is_main:
                write_history(self.folder, p.history, p.resume_points)
            return
        state = self.state_dict()
        if regular or last:
            epoch_file = epoch if cfg.checkpoint.keep_last_k and regular else None
            self.checkpointer.save(state, epoch_file=epoch_file, protected=self._protected(),
                                   links=(BEST,) if improved else ())
        else:
            self.checkpointer.save(state, name=BEST, protected=self._protected())
        if self.ctx.is_main:
            write_history(self.folder, p.history, p.resume_points)

    def _protected(self) -> set[Path]:
        return {self.resumed_from.resolve()} if self.resumed_from else set()

    def _write_reports(self) -> None:
        if not self.ctx.is_main:
            return
        write_history(self.folder, self.progress.history, self.progress.resume_points)
        try:
            plot_history(self.folder, self.progress.history, self.progress.resume_points)
        except (OSError, ValueError) as error:
            log.warning("Could not draw the training curves in %s: %s", self.folder, error)


def resume_command(path: Path, ctx: DistContext) -> str:
    if ctx.enabled:
        return f"{launch_command(ctx)} --resume {shlex.quote(str(path))}"
    program = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else ""
    prefix = "python train.py" if program == "train.py" else "isaret train"
    return f"{prefix} --resume {shlex.quote(str(path))}"


@dataclass
class ResumeRequest:
    path: Path | None = None  # --resume, or resume_checkpoint in the config
    from_best: bool = False  # --resume-from-best
    auto: bool = False  # --auto-resume, or auto_resume in the config


def resolve_config(overrides: list[tuple[str, object, str]], resume: ResumeRequest,
                   ctx: DistContext) -> tuple[Config, Path | None, dict | None]:
    """Build the run's config and load the checkpoint to resume from, if any.

    A resumed run starts from the checkpoint's config, and only the fields given on the command
    line or in --config change it. A fresh run starts from the defaults.
    """
    draft = Config()
    for name, value, source in overrides:
        draft.set(name, value, source)
    if resume.path is None and draft.checkpoint.resume_checkpoint:
        resume.path = Path(draft.checkpoint.resume_checkpoint)
    resume.auto = resume.auto or draft.checkpoint.auto_resume
    checkpointer = Checkpointer(Path(draft.checkpoint.checkpoint_dir), draft.checkpoint.keep_last_k, ctx)
    # Rank 0 picks and loads the checkpoint and sends it to the other ranks. So all ranks resume from
    # the same file, and the other machines of a multi-node run need no copy of checkpoint_dir.
    found = run_on_main(lambda: checkpointer.load(resume.path, resume.from_best, resume.auto), ctx)
    found = broadcast_object(found, ctx)
    if found is None:
        cfg = draft
        path, payload = None, None
    else:
        path, payload = found
        cfg = Config.from_dict(payload["config"], source=f"{path} config")
        for name, value, source in overrides:
            cfg.set(name, value, source)
        if not any(name.lower().endswith("checkpoint_dir") for name, _, _ in overrides):
            # Keep writing next to the checkpoint the run continues from.
            cfg.checkpoint.checkpoint_dir = str(path.parent)
        _reject_other_run(Path(cfg.checkpoint.checkpoint_dir), path)
    cfg.checkpoint.resume_checkpoint = ""
    cfg.checkpoint.auto_resume = False
    if cfg.data.data_path:
        cfg.data.data_path = str(Path(cfg.data.data_path).resolve())
    if cfg.data.signer_csv:
        cfg.data.signer_csv = str(Path(cfg.data.signer_csv).resolve())
    cfg.validate()
    return cfg, path, payload


def _reject_other_run(folder: Path, path: Path) -> None:
    """Raise CheckpointError when resuming `path` would write into a folder that contains another run."""
    if folder.resolve() == path.parent.resolve():
        return
    existing = checkpoint_candidates(folder)
    if existing:
        raise CheckpointError(
            f"--checkpoint-dir {folder} already contains another run ({', '.join(p.name for p in existing[:3])}); "
            f"resuming {path} there would mix two runs. Choose an empty --checkpoint-dir, or leave the option "
            f"out to continue in {path.parent}"
        )


def _prepare_folder(cfg: Config, checkpoint_path: Path | None, checkpoint: dict | None) -> FolderLock:
    """Lock the checkpoint folder, clean up after killed saves, and write the resolved config (rank 0)."""
    folder = Path(cfg.checkpoint.checkpoint_dir)
    lock = FolderLock.acquire(folder)
    try:
        for stale in remove_stale_temp_files(folder):
            log.info("Removed %s, a temp file of a save that did not finish", stale)
        if checkpoint is not None and checkpoint_path.parent.resolve() == folder.resolve():
            moved = set_aside_later_checkpoints(folder, training_position(checkpoint))
            if moved:
                log.warning("Resuming from an earlier checkpoint: moved %d later checkpoint(s) of the abandoned "
                            "continuation to %s", len(moved), moved[0].parent)
        save_toml(cfg, folder / "config.toml")
    except BaseException:
        lock.release()
        raise
    return lock


def run_training(cfg: Config, checkpoint_path: Path | None, checkpoint: dict | None, ctx: DistContext,
                 show_progress: bool = True) -> Progress:
    """Train to the end (or to early stopping) and return the final counters and history."""
    lock = run_on_main(lambda: _prepare_folder(cfg, checkpoint_path, checkpoint), ctx)
    trainer = None
    try:
        trainer = Trainer(cfg, ctx, show_progress=show_progress)
        trainer.setup(checkpoint, checkpoint_path)
        progress = trainer.fit()
    except Exception:
        if trainer is not None:
            trainer.checkpointer.wait_after_error()
        raise
    finally:
        if lock is not None:
            lock.release()
    log.info("Training finished at epoch %d: best val acc %.4f (F1 %.4f) at epoch %d; checkpoints in %s",
             progress.epoch, max(progress.best_val_acc, 0.0), progress.best_val_f1, progress.best_epoch,
             cfg.checkpoint.checkpoint_dir)
    return progress
