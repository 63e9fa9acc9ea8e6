from pathlib import Path

import pytest

from pipeline.config import ConfigError, RunConfig, build_config, read_toml

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def test_flags_override_file_and_file_overrides_defaults():
    cfg = build_config({"batch_size": 16, "top_k": 3}, {"batch_size": 8, "top_k": None})
    assert cfg.batch_size == 8  # flag wins
    assert cfg.top_k == 3  # file wins over the built-in default
    assert cfg.part_size == RunConfig().part_size


def test_unknown_key_is_an_error_that_names_it(tmp_path):
    f = tmp_path / "bad.toml"
    f.write_text("batch_size = 8\nbatchsize = 9\n")
    with pytest.raises(ConfigError, match="batchsize"):
        build_config(read_toml(f), {}, source=str(f))


@pytest.mark.parametrize("values, word", [
    ({"batch_size": 0}, "batch_size"),
    ({"max_error_rate": 2.0}, "max_error_rate"),
    ({"runtime": "onnx"}, "runtime"),
    ({"top_k": "five"}, "top_k"),
    ({"max_file_bytes": 0}, "max_file_bytes"),
    ({"max_file_bytes": 2**31}, "below 2 GiB"),
])
def test_bad_values_are_errors(values, word):
    with pytest.raises(ConfigError, match=word):
        build_config(values, {})


def test_default_toml_matches_builtin_defaults():
    values = read_toml(CONFIGS / "default.toml")
    defaults = RunConfig()
    for key, value in values.items():
        assert getattr(defaults, key) == value, key


def test_nightly_profile_loads():
    cfg = build_config(read_toml(CONFIGS / "nightly.toml"), {"input": "x", "output": "y"})
    assert cfg.progress == "log"


def test_label_table_and_dashes_are_accepted(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text("[label]\nbatch-size = 32\n")
    assert build_config(read_toml(f), {}).batch_size == 32


def test_invalid_toml_is_a_config_error(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text("batch_size = = 3")
    with pytest.raises(ConfigError, match="not valid TOML"):
        read_toml(f)
