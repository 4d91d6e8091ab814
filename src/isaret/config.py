"""Training configuration: dataclasses with documented defaults, TOML loading and `--set` overrides.

Field names are lower case and unique across the four sections, so `--set d_model=256`,
`--set model.d_model=256` and `--set D_MODEL=256` all name the same field.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

from isaret.errors import ConfigError


def _field(default, help: str, *, choices=None, min=None, max=None, min_exclusive=False):
    """Declare a config field with its help text and the values it accepts."""
    metadata = {"help": help, "choices": choices, "min": min, "max": max, "min_exclusive": min_exclusive}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class DataConfig:
    data_path: str = _field("", "data set folder; empty means the demo data set shipped with isaret")
    data_format: str = _field("auto", "reader of data_path", choices=["auto", "kaggle-islr", "npy-folder"])
    signer_csv: str = _field("", "npy-folder only: CSV with columns path,signer mapping files to signer ids")
    landmarks: str = _field(
        "default",
        "landmark groups, comma-separated (e.g. 'left_hand,right_hand,lips'); 'default' or 'all'",
    )
    coords: str = _field("xyz", "coordinates kept per landmark", choices=["xy", "xyz"])
    normalize: bool = _field(True, "centre and scale each clip on a body reference (shoulders, else wrists)")
    max_seq_len: int = _field(64, "frames per clip after resampling or truncation", min=1, max=4096)
    seq_policy: str = _field(
        "resample", "how clips longer than max_seq_len are shortened", choices=["resample", "truncate"]
    )
    bad_file_policy: str = _field(
        "error", "what an unreadable or invalid sample does: stop with an error or skip it", choices=["error", "skip"]
    )
    split: str = _field(
        "auto", "validation split: by signer, stratified by class, or by signer where signer ids exist",
        choices=["auto", "signer", "stratified"],
    )
    val_fraction: float = _field(0.2, "share of samples (or signers) held out for validation", min=0.0, max=1.0,
                                 min_exclusive=True)
    cache_dir: str = _field("", "preprocessed-sample cache; empty means $XDG_CACHE_HOME/isaret or ~/.cache/isaret")
    num_workers: int = _field(0, "DataLoader worker processes (0 = load in the training process)", min=0, max=64)
    augment: bool = _field(True, "augment training samples (never validation samples)")
    aug_flip_prob: float = _field(0.5, "probability of a horizontal flip that swaps left and right", min=0.0, max=1.0)
    aug_scale: float = _field(0.1, "maximum relative scale change of the affine augmentation", min=0.0, max=0.9)
    aug_rotate_deg: float = _field(10.0, "maximum in-plane rotation of the affine augmentation, degrees",
                                   min=0.0, max=180.0)
    aug_shift: float = _field(0.05, "maximum shift of the affine augmentation, in normalised units", min=0.0, max=1.0)
    aug_time_scale: float = _field(0.2, "maximum relative change of clip length by temporal resampling",
                                   min=0.0, max=0.9)


@dataclass
class ModelConfig:
    d_model: int = _field(128, "transformer width", min=8, max=4096)
    nhead: int = _field(4, "attention heads; must divide d_model", min=1, max=64)
    num_layers: int = _field(3, "transformer encoder layers", min=1, max=48)
    dim_feedforward: int = _field(256, "hidden size of each encoder layer's feed-forward block", min=8, max=16384)
    dropout: float = _field(0.1, "dropout probability in the encoder and before the head", min=0.0, max=0.9)
    motion_features: bool = _field(True, "add each frame's difference from the previous frame to its features")


@dataclass
class TrainConfig:
    num_epochs: int = _field(30, "epochs to train", min=1, max=100000)
    batch_size: int = _field(32, "samples per process per forward pass", min=1, max=65536)
    accum_steps: int = _field(1, "forward passes whose gradients are summed before one optimizer step", min=1,
                              max=1024)
    lr: float = _field(1e-3, "peak learning rate of AdamW after warmup", min=0.0, max=10.0, min_exclusive=True)
    weight_decay: float = _field(0.05, "AdamW weight decay of weight matrices; norms and biases get none", min=0.0,
                                 max=10.0)
    warmup_epochs: float = _field(2.0, "linear warmup length in epochs (converted to optimizer steps)", min=0.0,
                                  max=1000.0)
    min_lr_ratio: float = _field(0.01, "final learning rate of the cosine decay as a share of lr", min=0.0,
                                 max=1.0)
    label_smoothing: float = _field(0.1, "label smoothing of the cross-entropy loss", min=0.0, max=0.99)
    grad_clip: float = _field(1.0, "maximum gradient norm; 0 turns clipping off", min=0.0, max=1e6)
    early_stopping_patience: int = _field(
        15, "epochs without a better validation accuracy before stopping; 0 turns early stopping off",
        min=0, max=100000,
    )
    seed: int = _field(42, "seed of the split, weight initialisation, data order, augmentation and dropout",
                       min=0, max=2**31 - 1)
    device: str = _field("auto", "training device; auto picks cuda when available", choices=["auto", "cpu", "cuda"])
    amp: bool = _field(True, "mixed precision (bfloat16 autocast) on CUDA; ignored on CPU")
    dist_backend: str = _field("auto", "torch.distributed backend under torchrun; auto is nccl on CUDA, gloo on CPU",
                               choices=["auto", "nccl", "gloo"])


@dataclass
class CheckpointConfig:
    checkpoint_dir: str = _field("checkpoints", "folder of checkpoints, config, history, plots and train.log")
    save_frequency: int = _field(1, "write last_model.pth and epoch_NNN.pth every this many epochs", min=1,
                                 max=100000)
    keep_last_k: int = _field(3, "epoch_NNN.pth files kept; older ones are deleted; 0 keeps none", min=0,
                              max=100000)
    save_every_steps: int = _field(0, "also write last_model.pth every this many optimizer steps; 0 = off", min=0,
                                   max=10**9)
    auto_resume: bool = _field(False, "resume from the newest valid checkpoint in checkpoint_dir, if any")
    resume_checkpoint: str = _field("", "checkpoint to resume from, as --resume")
    save_history_in_checkpoint: bool = _field(True, "store the per-epoch history inside each checkpoint")
    async_save: bool = _field(False, "write checkpoints in a background thread while training goes on (one process "
                                     "only; under torchrun every rank waits for each commit)")


SECTIONS = {"data": DataConfig, "model": ModelConfig, "train": TrainConfig, "checkpoint": CheckpointConfig}

# Fields that define the model's input, output or architecture: a resume must not change them.
ARCHITECTURE_FIELDS = ("d_model", "nhead", "num_layers", "dim_feedforward", "motion_features")
DATA_FIELDS = ("landmarks", "coords", "normalize", "max_seq_len", "seq_policy")


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS}

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> Config:
        config = cls()
        config.update(values, source)
        return config

    def update(self, values: dict[str, Any], source: str) -> None:
        """Apply a nested ({section: {field: value}}) or flat ({field: value}) dict of values."""
        for key, value in values.items():
            if isinstance(value, dict):
                if key.lower() not in SECTIONS:
                    raise ConfigError(f"{source}: unknown config section [{key}]; sections are "
                                      f"{', '.join(SECTIONS)}")
                for name, item in value.items():
                    self.set(f"{key}.{name}", item, source)
            else:
                self.set(key, value, source)

    def set(self, name: str, value: Any, source: str) -> None:
        """Set one field, given as 'field' or 'section.field' (any case), converting and validating the value."""
        section, field_info = _find_field(name, source)
        converted = _convert(value, field_info, source)
        setattr(getattr(self, section), field_info.name, converted)

    def validate(self) -> None:
        for section in SECTIONS:
            for field_info in dataclasses.fields(getattr(self, section)):
                value = getattr(getattr(self, section), field_info.name)
                _convert(value, field_info, "config")
        if self.model.d_model % self.model.nhead != 0:
            raise ConfigError(
                f"invalid config: d_model={self.model.d_model} is not divisible by nhead={self.model.nhead}; "
                "choose an nhead that divides d_model"
            )

    def flat(self) -> dict[str, Any]:
        """Return every field as {field: value}, without sections."""
        return {name: value for section in self.to_dict().values() for name, value in section.items()}


def _all_fields() -> dict[str, tuple[str, dataclasses.Field]]:
    return {f.name: (section, f) for section, cls in SECTIONS.items() for f in dataclasses.fields(cls)}


def field_names() -> list[str]:
    return list(_all_fields())


def field_help(name: str) -> str:
    return _all_fields()[name][1].metadata["help"]


def describe_field(name: str) -> str:
    """Return 'help (default D, allowed A)' for the --help listing."""
    field_info = _all_fields()[name][1]
    default = field_info.default if field_info.default is not dataclasses.MISSING else field_info.default_factory()
    return f"{field_info.metadata['help']} (default {default!r}{_allowed(field_info.metadata)})"


def _find_field(name: str, source: str) -> tuple[str, dataclasses.Field]:
    key = name.strip().lower()
    section_name = None
    if "." in key:
        section_name, key = key.split(".", 1)
        if section_name not in SECTIONS:
            raise ConfigError(
                f"{source}: unknown config section '{section_name}' in '{name}'; sections are "
                f"{', '.join(SECTIONS)}"
            )
    fields = _all_fields()
    if key not in fields or (section_name is not None and fields[key][0] != section_name):
        close = difflib.get_close_matches(key, list(fields), n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else "; run 'isaret train --help' for the list"
        raise ConfigError(f"{source}: unknown config field '{name}'{hint}")
    return fields[key]


def _convert(value: Any, field_info: dataclasses.Field, source: str) -> Any:
    """Convert a TOML or command-line value to the field's type and check its allowed values."""
    kind = type(field_info.default)
    name = field_info.name
    meta = field_info.metadata
    try:
        converted = _coerce(value, kind)
    except (TypeError, ValueError):
        raise ConfigError(
            f"{source}: invalid value {value!r} for '{name}': expected {kind.__name__}{_allowed(meta)} "
            f"({meta['help']})"
        ) from None
    if meta["choices"] is not None and converted not in meta["choices"]:
        raise ConfigError(
            f"{source}: invalid value {converted!r} for '{name}'; allowed: {', '.join(meta['choices'])}"
        )
    if kind in (int, float):
        low, high = meta["min"], meta["max"]
        below = low is not None and (converted <= low if meta["min_exclusive"] else converted < low)
        if below or (high is not None and converted > high) or (kind is float and not math.isfinite(converted)):
            low_bracket = "(" if meta["min_exclusive"] else "["
            raise ConfigError(
                f"{source}: invalid value {converted!r} for '{name}'; allowed range {low_bracket}{low}, {high}]"
            )
    return converted


def _allowed(meta) -> str:
    """Describe a field's allowed choices or range for an error message, e.g. ' in [8, 4096]'."""
    if meta["choices"] is not None:
        return f" (one of {', '.join(meta['choices'])})"
    if meta["min"] is None and meta["max"] is None:
        return ""
    low_bracket = "(" if meta["min_exclusive"] else "["
    return f" in {low_bracket}{meta['min']}, {meta['max']}]"


def _coerce(value: Any, kind: type) -> Any:
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(value, str) and value.strip().lower() in ("false", "0", "no", "off"):
            return False
        raise ValueError(value)
    if kind is int:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError(value)
        return int(value)
    if kind is float:
        if isinstance(value, bool):
            raise ValueError(value)
        return float(value)
    if kind is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ValueError(value)
        return str(value)
    raise TypeError(kind)


def load_toml(path: str | Path) -> Config:
    """Read a TOML config file; unknown fields and invalid values raise ConfigError."""
    path = Path(path)
    try:
        with path.open("rb") as handle:
            values = tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(f"--config: file not found: {path}") from None
    except IsADirectoryError:
        raise ConfigError(f"--config: {path} is a folder; pass a TOML file") from None
    except OSError as error:
        raise ConfigError(f"--config: cannot read {path}: {error.strerror or error}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"--config: {path} is not UTF-8 text; save it as UTF-8 TOML") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"--config: invalid TOML in {path}: {error}") from None
    config = Config.from_dict(values, source=str(path))
    config.validate()
    return config


def save_toml(config: Config, path: str | Path) -> None:
    Path(path).write_text(tomli_w.dumps(config.to_dict()), encoding="utf-8")


def parse_assignment(text: str) -> tuple[str, str]:
    """Split a `--set FIELD=VALUE` argument."""
    if "=" not in text:
        raise ConfigError(f"--set: expected FIELD=VALUE, got {text!r}")
    name, value = text.split("=", 1)
    return name.strip(), value.strip()
