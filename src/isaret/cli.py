"""Command line: `isaret train|inspect|evaluate|predict|export|plot|extract`.

`main(argv)` returns the exit status; it is the one place where isaret's own errors become
`error: ...` on stderr and an exit code.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from tqdm import tqdm

from isaret import __version__
from isaret.config import Config, describe_field, field_names, load_toml, parse_assignment
from isaret.errors import CheckpointError, ConfigError, IsaretError, TrainingInterrupted

log = logging.getLogger("isaret")


# ----------------------------------------------------------------------------- logging

class TqdmHandler(logging.Handler):
    """Writes log records through tqdm, so that they do not break a progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)


def setup_logging(verbose: bool, rank: int = 0) -> None:
    """Send isaret's log to stderr: INFO on rank 0, warnings and errors only on other ranks."""
    root = logging.getLogger("isaret")
    for old in list(root.handlers):
        root.removeHandler(old)
        old.close()
    handler = TqdmHandler()
    prefix = f"[rank {rank}] " if rank else ""
    handler.setFormatter(logging.Formatter(prefix + "%(message)s"))
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    handler.setLevel(logging.WARNING if rank else logging.DEBUG)
    root.propagate = False


def add_log_file(folder: Path) -> logging.Handler:
    """Append this run's log to train.log in the checkpoint folder; the caller removes the handler."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(folder / "train.log", encoding="utf-8")
    except OSError as error:
        raise CheckpointError(f"cannot use checkpoint folder {folder}: {error.strerror or error}; "
                              "choose another --checkpoint-dir") from None
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger("isaret").addHandler(handler)
    return handler


# ----------------------------------------------------------------------------- train

def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = Config()
    parser.add_argument("--config", metavar="FILE.toml", help="TOML config file; command-line options override it")
    parser.add_argument("--data", metavar="PATH",
                        help="data set folder (Kaggle ISLR folder with train.csv, or a folder of class folders "
                             "of .npy files); default: the demo data shipped with isaret")
    parser.add_argument("--format", choices=["auto", "kaggle-islr", "npy-folder"],
                        help="reader of --data (default: auto, which detects train.csv)")
    parser.add_argument("--epochs", type=int, metavar="N",
                        help=f"epochs to train (default {defaults.train.num_epochs})")
    parser.add_argument("--batch-size", type=int, metavar="N",
                        help=f"samples per process per forward pass (default {defaults.train.batch_size})")
    parser.add_argument("--lr", type=float, metavar="X",
                        help=f"peak learning rate after warmup (default {defaults.train.lr})")
    parser.add_argument("--checkpoint-dir", metavar="DIR",
                        help=f"folder for checkpoints, config, history, plots and train.log "
                             f"(default {defaults.checkpoint.checkpoint_dir})")
    parser.add_argument("--seed", type=int, metavar="N", help=f"random seed (default {defaults.train.seed})")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], help="training device (default auto)")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="set any config field (names are case-insensitive; see the list below); repeatable")
    resume = parser.add_mutually_exclusive_group()
    resume.add_argument("--resume", metavar="PATH",
                        help="continue from this checkpoint (last_model.pth, epoch_NNN.pth or an interrupt "
                             "checkpoint)")
    resume.add_argument("--resume-from-best", action="store_true",
                        help="continue from CHECKPOINT_DIR/best_model.pth, with the state of that epoch")
    resume.add_argument("--auto-resume", action="store_true",
                        help="resume from the newest valid checkpoint in CHECKPOINT_DIR, or start fresh if "
                             "there is none")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    fields = "\n".join(f"  {name}: {describe_field(name)}" for name in field_names())
    parser.epilog = f"config fields (for --set and TOML files):\n{fields}"
    parser.formatter_class = argparse.RawDescriptionHelpFormatter


FLAG_FIELDS = {"data": "data_path", "format": "data_format", "epochs": "num_epochs", "batch_size": "batch_size",
               "lr": "lr", "checkpoint_dir": "checkpoint_dir", "seed": "seed", "device": "device"}


def collect_overrides(args: argparse.Namespace) -> list[tuple[str, object, str]]:
    """Return (field, value, source) in order of precedence: --config file, flags, then --set."""
    overrides: list[tuple[str, object, str]] = []
    if args.config:
        file_config = load_toml(args.config)
        explicit = explicit_toml_fields(Path(args.config))
        flat = file_config.flat()
        overrides += [(name, flat[name], args.config) for name in explicit]
    for flag, name in FLAG_FIELDS.items():
        value = getattr(args, flag)
        if value is not None:
            overrides.append((name, value, f"--{flag.replace('_', '-')}"))
    for text in args.set:
        name, value = parse_assignment(text)
        overrides.append((name, value, f"--set {text}"))
    checker = Config()
    for name, value, source in overrides:
        checker.set(name, value, source)
    checker.validate()
    return overrides


def explicit_toml_fields(path: Path) -> list[str]:
    """Field names written in a TOML file (so that its unset fields do not override a checkpoint)."""
    import tomllib

    with path.open("rb") as handle:
        values = tomllib.load(handle)
    names = []
    for key, value in values.items():
        names += [name.lower() for name in value] if isinstance(value, dict) else [key.lower()]
    return names


def run_train(args: argparse.Namespace) -> int:
    from isaret.distributed import init_distributed, shutdown
    from isaret.trainer import ResumeRequest, resolve_config, run_training

    overrides = collect_overrides(args)
    draft = Config()
    for name, value, source in overrides:
        draft.set(name, value, source)
    ctx = init_distributed(draft.train.device, draft.train.dist_backend)
    setup_logging(args.verbose, ctx.rank)
    log_file = None
    try:
        resume = ResumeRequest(path=Path(args.resume) if args.resume else None, from_best=args.resume_from_best,
                               auto=args.auto_resume)
        cfg, path, checkpoint = resolve_config(overrides, resume, ctx)
        if ctx.is_main:
            log_file = add_log_file(Path(cfg.checkpoint.checkpoint_dir))
        log.info("isaret %s: training in %s", __version__, cfg.checkpoint.checkpoint_dir)
        run_training(cfg, path, checkpoint, ctx, show_progress=not args.no_progress)
    except TrainingInterrupted as stop:
        log.warning("%s", stop)
        return stop.exit_code
    except IsaretError as error:
        if log_file is not None:
            # Only into train.log: main() prints the error on the console.
            log_file.handle(logging.makeLogRecord({"name": "isaret.cli", "levelname": "ERROR",
                                                   "levelno": logging.ERROR, "msg": f"error: {error}"}))
        raise
    finally:
        if log_file is not None:
            logging.getLogger("isaret").removeHandler(log_file)
            log_file.close()
        shutdown(ctx)
    return 0


# ----------------------------------------------------------------------------- inspect

def add_inspect_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", metavar="CHECKPOINT", help="checkpoint file (.pth)")
    parser.add_argument("--config", metavar="FILE.toml",
                        help="compare with this config: list differing fields and whether each blocks a resume")


def run_inspect(args: argparse.Namespace) -> int:
    from isaret.inspect import describe_checkpoint

    print(describe_checkpoint(Path(args.checkpoint), Path(args.config) if args.config else None))
    return 0


# ----------------------------------------------------------------------------- main

COMMANDS = {
    "train": ("train a classifier (resumable; see --resume and --auto-resume)", add_train_arguments, run_train),
    "inspect": ("describe a checkpoint and compare it with a config", add_inspect_arguments, run_inspect),
}


def register_optional_commands() -> None:
    """Add the commands whose modules exist; each module provides add_arguments() and run()."""
    optional = {
        "evaluate": ("measure a checkpoint on its validation split or another data set", "isaret.evaluate"),
        "predict": ("predict the signs of clips with a checkpoint", "isaret.predict"),
        "export": ("export a checkpoint to ONNX", "isaret.export"),
        "plot": ("redraw the training curves of a checkpoint folder", "isaret.plot"),
        "extract": ("turn sign videos into Kaggle ISLR landmark files with MediaPipe", "isaret.extract"),
    }
    import importlib.util

    for name, (help_text, module_name) in optional.items():
        if name in COMMANDS or importlib.util.find_spec(module_name) is None:
            continue

        def add(parser, module_name=module_name):
            importlib.import_module(module_name).add_arguments(parser)

        def run(args, module_name=module_name):
            return importlib.import_module(module_name).run(args)

        COMMANDS[name] = (help_text, add, run)


def build_parser() -> argparse.ArgumentParser:
    register_optional_commands()
    parser = argparse.ArgumentParser(prog="isaret", description="Train transformer classifiers of isolated signs "
                                     "from landmark sequences, with exact, crash-safe resume.")
    parser.add_argument("--version", action="version", version=f"isaret {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True
    for name, (help_text, add, _) in COMMANDS.items():
        add(commands.add_parser(name, help=help_text, description=help_text))
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if not logging.getLogger("isaret").handlers:
        setup_logging(getattr(args, "verbose", False))
    try:
        code = COMMANDS[args.command][2](args)
        sys.stdout.flush()  # a closed pipe shows up here, not at interpreter exit
        return code
    except BrokenPipeError:
        # The reader of stdout has gone (`isaret inspect FILE | head`): stop quietly, as Unix tools do.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE
    except TrainingInterrupted as stop:
        log.warning("%s", stop)
        return stop.exit_code
    except IsaretError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        if args.command == "train":
            print("error: interrupted by Ctrl+C outside a training step, or by a second Ctrl+C; no checkpoint "
                  "was saved for work in progress", file=sys.stderr)
        else:
            print(f"error: {args.command} aborted by Ctrl+C", file=sys.stderr)
        return 130


def train_script_main() -> int:
    """Entry point of `python train.py`: the train command's options without the word `train`."""
    return main(["train", *sys.argv[1:]])


__all__ = ["main", "build_parser", "ConfigError"]
