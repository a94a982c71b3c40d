"""Config: params.yaml parses into frozen typed sections; a typo is an error naming the key."""

from pathlib import Path

import pytest
from pydantic import ValidationError

from visiontune.components.config import ConfigError, Params, load_params

ROOT = Path(__file__).resolve().parents[1]


def test_repo_params_parse_with_required_keys():
    params = load_params(ROOT / "params.yaml")
    flat = params.flat()
    for key in [
        "data.source",
        "model.name",
        "model.image_size",
        "model.pretrained",
        "model.weights",
        "train.method",
        "train.epochs",
        "train.batch_size",
        "train.lr",
        "train.patience",
        "base.seed",
    ]:
        assert key in flat
    assert params.data.source == "builtin:digits"
    assert params.model.name == "tf_efficientnet_lite0"


def test_unknown_key_is_an_error_naming_it(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("train:\n  epochz: 3\n")
    with pytest.raises(ConfigError, match=r"train\.epochz: unknown key"):
        load_params(path)


def test_unknown_section_is_an_error(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("trian:\n  epochs: 3\n")
    with pytest.raises(ConfigError, match="trian"):
        load_params(path)


def test_invalid_value_names_field(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("train:\n  lr: -1\n")
    with pytest.raises(ConfigError, match=r"train\.lr"):
        load_params(path)


def test_overrides_apply_and_sections_are_frozen(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("train:\n  epochs: 3\n")
    params = load_params(path, {"train.lr": 3e-4, "validate.on_fail": "warn"})
    assert params.train.lr == 3e-4 and params.train.epochs == 3
    assert params.validate_.on_fail == "warn"
    with pytest.raises(ValidationError, match="frozen"):
        params.train.lr = 1.0  # type: ignore[misc]


def test_split_fractions_must_leave_training_data():
    with pytest.raises(ValueError, match="val_fraction"):
        Params.model_validate({"data": {"val_fraction": 0.5, "test_fraction": 0.5}})


def test_missing_params_file_says_where(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_params(tmp_path / "nope.yaml")


def test_nested_overrides_and_empty_sections(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("train:\n  epochs: 3\n  lora:\n    r: 4\nserve:\n")  # `serve:` alone parses as None
    params = load_params(path, {"train.lora.r": 8, "serve.port": 9001, "register.min_metrics.test_f1": 0.9})
    assert params.train.lora.r == 8 and params.train.lora.alpha == 8.0
    assert params.serve.port == 9001
    assert params.register_.min_metrics == {"test_f1": 0.9}
    with pytest.raises(ConfigError, match=r"train\.lora\.rank: unknown key"):
        load_params(path, {"train.lora.rank": 8})
    with pytest.raises(ConfigError, match=r"train\.epochs is a value, not a section"):
        load_params(path, {"train.epochs.x": 1})
    with pytest.raises(ConfigError, match="write it as section.key"):
        load_params(path, {"train": 1})
    assert load_params(path).serve.port == 8000  # an empty section takes every default
