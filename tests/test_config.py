import dataclasses
from pathlib import Path

import pytest

from pipeline.config import RunConfig, build_config, read_toml
from pipeline.exitcodes import ConfigError

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
    assert build_config(values, {}) == RunConfig()


def test_batch_size_auto_means_unset():
    assert RunConfig().batch_size is None
    assert build_config({"batch_size": "auto"}, {}).batch_size is None
    assert build_config({"batch_size": "auto"}, {"batch_size": 32}).batch_size == 32


def test_scaled_decode_is_on_by_default_and_false_in_toml_reaches_the_reader(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text("scaled_decode = false\n")
    assert RunConfig().read_limits().scaled_decode is True
    assert build_config(read_toml(f), {}).read_limits().scaled_decode is False
    assert build_config(read_toml(f), {"scaled_decode": True}).read_limits().scaled_decode is True


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


def _wrong_value(declared: str):
    """A value of the wrong type for a field declared as `declared` (its annotation text)."""
    if declared.startswith("bool"):
        return "false"
    if declared.startswith(("int", "float")):
        return "soon"
    return 5  # str and str | None


WRONG_TYPED = [(f.name, _wrong_value(str(f.type))) for f in dataclasses.fields(RunConfig)]


def test_every_key_has_a_wrong_typed_case():
    assert {name for name, _ in WRONG_TYPED} == {f.name for f in dataclasses.fields(RunConfig)}
    assert len(WRONG_TYPED) >= 29


@pytest.mark.parametrize("key, value", WRONG_TYPED, ids=[k for k, _ in WRONG_TYPED])
def test_every_key_is_checked_by_its_type(key, value):
    with pytest.raises(ConfigError, match=rf"\b{key}\b"):
        build_config({key: value}, {})


@pytest.mark.parametrize("values, words", [
    ({"overwrite": "false"}, ["overwrite", "true or false", "without quotes"]),
    ({"scaled_decode": "no"}, ["scaled_decode", "true or false"]),
    ({"json": 1}, ["json", "true or false"]),
    ({"top_k": 5.0}, ["top_k", "integer"]),
    ({"batch_size": "8"}, ["batch_size", '"auto"']),
    ({"log_interval": "soon"}, ["log_interval", "number", "'soon'"]),
    ({"log_interval": float("nan")}, ["log_interval"]),
    ({"log_interval": -1}, ["log_interval"]),
    ({"max_error_rate": float("nan")}, ["max_error_rate"]),
    ({"cache_dir": 5}, ["cache_dir", "string"]),
    ({"model": 5}, ["model", "string"]),
    ({"weights": ["a.h5"]}, ["weights", "string or unset"]),
])
def test_wrong_types_name_the_key_and_what_was_expected(values, words):
    with pytest.raises(ConfigError) as e:
        build_config(values, {})
    for word in words:
        assert word in str(e.value)


def test_right_types_are_kept_and_ints_become_floats():
    cfg = build_config({"log_interval": 5, "overwrite": False, "s3_lock_lease": 60,
                        "cache_dir": Path("/tmp/c")}, {})
    assert cfg.log_interval == 5.0 and isinstance(cfg.log_interval, float)
    assert cfg.overwrite is False
    assert isinstance(cfg.s3_lock_lease, float)
    assert cfg.cache_dir == "/tmp/c" and isinstance(cfg.cache_dir, str)


@pytest.mark.parametrize("line, key", [
    ('overwrite = "false"', "overwrite"),
    ('scaled_decode = "false"', "scaled_decode"),
    ('log_interval = "soon"', "log_interval"),
    ("cache_dir = 5", "cache_dir"),
    ("model = 5", "model"),
])
def test_cli_refuses_a_wrong_typed_config_key_before_anything_runs(cli, tmp_path, line, key):
    (tmp_path / "in").mkdir()
    config = tmp_path / "c.toml"
    config.write_text(line + "\n")
    out = tmp_path / "out"
    r = cli("label", tmp_path / "in", out, "--config", config, timeout=120)
    assert r.returncode == 2, r.stderr
    assert key in r.stderr and "Traceback" not in r.stderr
    assert not out.exists()
