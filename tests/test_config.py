"""Config: TOML round trip, `--set` names, and rejection of unknown fields and invalid values."""

from __future__ import annotations

import dataclasses

import pytest

from isaret.config import SECTIONS, Config, field_names, load_toml, parse_assignment, save_toml
from isaret.errors import ConfigError


def changed_config() -> Config:
    config = Config()
    config.set("d_model", 64, "test")
    config.set("nhead", 8, "test")
    config.set("lr", 3e-4, "test")
    config.set("coords", "xy", "test")
    config.set("normalize", False, "test")
    config.set("landmarks", "left_hand,right_hand", "test")
    config.set("checkpoint_dir", "runs/ğüşiöç", "test")
    config.set("save_every_steps", 250, "test")
    return config


def test_config_toml_round_trip(tmp_path):
    config = changed_config()
    path = tmp_path / "config.toml"
    save_toml(config, path)
    loaded = load_toml(path)

    assert loaded.to_dict() == config.to_dict()
    assert loaded == config


def test_config_default_toml_round_trip(tmp_path):
    path = tmp_path / "config.toml"
    save_toml(Config(), path)

    assert load_toml(path) == Config()


def test_field_names_unique_across_sections():
    total = sum(len(dataclasses.fields(cls)) for cls in SECTIONS.values())

    assert len(field_names()) == total
    assert all(name == name.lower() for name in field_names())


@pytest.mark.parametrize("name", ["d_model", "D_MODEL", "model.d_model", "Model.D_Model", " model.d_model "])
def test_set_name_forms(name):
    config = Config()
    config.set(name, "256", "--set")

    assert config.model.d_model == 256


def test_parse_assignment_strips_spaces():
    assert parse_assignment(" LR = 0.002 ") == ("LR", "0.002")
    assert parse_assignment("landmarks=left_hand,lips") == ("landmarks", "left_hand,lips")
    with pytest.raises(ConfigError, match="expected FIELD=VALUE"):
        parse_assignment("lr")


def test_set_string_values_converted():
    config = Config()
    config.set("lr", "0.002", "--set")
    config.set("normalize", "off", "--set")
    config.set("augment", "Yes", "--set")
    config.set("num_epochs", "7", "--set")

    assert config.train.lr == 0.002
    assert config.data.normalize is False
    assert config.data.augment is True
    assert config.train.num_epochs == 7


def test_update_nested_and_flat():
    config = Config.from_dict({"model": {"d_model": 64}, "LR": 0.5, "train": {"num_epochs": 3}})

    assert config.model.d_model == 64
    assert config.train.lr == 0.5
    assert config.train.num_epochs == 3


def test_unknown_field_rejected():
    with pytest.raises(ConfigError) as error:
        Config().set("d_modle", "8", "--set")

    assert "unknown config field 'd_modle'" in str(error.value)
    assert str(error.value).startswith("--set:")


def test_unknown_field_close_names_suggested():
    with pytest.raises(ConfigError, match="did you mean") as error:
        Config().set("model", "8", "--set")

    assert "d_model" in str(error.value)


def test_field_in_wrong_section_rejected():
    with pytest.raises(ConfigError, match="unknown config field 'data.d_model'"):
        Config().set("data.d_model", "64", "--set")


def test_unknown_section_rejected():
    with pytest.raises(ConfigError) as error:
        Config().set("optim.lr", "0.1", "--set")

    assert "unknown config section 'optim'" in str(error.value)
    assert "data, model, train, checkpoint" in str(error.value)


def test_toml_unknown_field_names_file(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text("[model]\nd_model = 64\nwidth = 3\n", encoding="utf-8")

    with pytest.raises(ConfigError) as error:
        load_toml(path)
    assert str(path) in str(error.value)
    assert "'model.width'" in str(error.value)


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("d_model", "abc", "expected int in [8, 4096]"),
        ("d_model", 4, "allowed range [8, 4096]"),
        ("max_seq_len", 5000, "allowed range [1, 4096]"),
        ("num_epochs", 2.5, "expected int in [1, 100000]"),
        ("batch_size", True, "expected int in [1, 65536]"),
        ("lr", 0.0, "allowed range (0.0, 10.0]"),
        ("lr", "nan", "allowed range (0.0, 10.0]"),
        ("lr", "fast", "expected float in (0.0, 10.0]"),
        ("val_fraction", 0, "allowed range (0.0, 1.0]"),
        ("dropout", -0.1, "allowed range [0.0, 0.9]"),
        ("coords", "xyzw", "allowed: xy, xyz"),
        ("seq_policy", "crop", "allowed: resample, truncate"),
        ("device", 3, "allowed: auto, cpu, cuda"),
        ("normalize", "maybe", "expected bool"),
        ("landmarks", ["lips"], "expected str"),
    ],
)
def test_invalid_value_rejected(name, value, expected):
    with pytest.raises(ConfigError) as error:
        Config().set(name, value, "--set")

    assert f"'{name}'" in str(error.value)
    assert expected in str(error.value)
    assert repr(value) in str(error.value) or str(value) in str(error.value)


def test_toml_invalid_value_names_field(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text('[train]\nbatch_size = "many"\n', encoding="utf-8")

    with pytest.raises(ConfigError) as error:
        load_toml(path)
    assert "'batch_size'" in str(error.value)
    assert str(path) in str(error.value)


def test_d_model_not_divisible_by_nhead():
    config = Config()
    config.set("d_model", 100, "--set")
    config.set("nhead", 3, "--set")

    with pytest.raises(ConfigError) as error:
        config.validate()
    assert "d_model=100" in str(error.value)
    assert "nhead=3" in str(error.value)


def test_toml_d_model_not_divisible_rejected(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text("[model]\nd_model = 30\nnhead = 4\n", encoding="utf-8")

    with pytest.raises(ConfigError, match="not divisible by nhead=4"):
        load_toml(path)


def test_validate_catches_direct_assignment():
    config = Config()
    config.train.batch_size = 0

    with pytest.raises(ConfigError, match="'batch_size'"):
        config.validate()


def test_load_toml_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="file not found") as error:
        load_toml(tmp_path / "absent.toml")
    assert "absent.toml" in str(error.value)


def test_load_toml_invalid_syntax(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text("[model\nd_model = 64\n", encoding="utf-8")

    with pytest.raises(ConfigError, match="invalid TOML") as error:
        load_toml(path)
    assert str(path) in str(error.value)


def test_config_unknown_section_rejected(tmp_path):
    from isaret.config import load_toml
    from isaret.errors import ConfigError

    path = tmp_path / "typo.toml"
    path.write_text("[modle]\nd_model = 64\n", encoding="utf-8")
    with pytest.raises(ConfigError) as error:
        load_toml(path)
    assert "unknown config section [modle]" in str(error.value)
    assert "data, model, train, checkpoint" in str(error.value)
