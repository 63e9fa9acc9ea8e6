import dataclasses
import re
import typing
from pathlib import Path

import pytest

from pipeline.config import RunConfig, build_config, read_toml
from pipeline.exitcodes import ConfigError
from pipeline.finetune.config import FinetuneConfig
from pipeline.options import narrow, option, positive_int, with_cli_options
from pipeline.types import DeviceRequest, ModelRequest, ReadLimits, S3Options

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


# ---- each option declared once (pipeline/options.py) ----------------------------------------

@dataclasses.dataclass(frozen=True)
class _WithWidgets(RunConfig):
    """A test-only option, declared the way every RunConfig field is."""

    max_widgets: int = option(7, check=positive_int, help="Widgets per image at most.")


def _help_of(app, *args) -> str:
    from typer.testing import CliRunner

    result = CliRunner().invoke(app, [*args, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    return " ".join(result.output.split())


def test_an_option_declared_once_is_a_flag_with_help_a_toml_key_and_checked(tmp_path):
    import typer
    from typer.testing import CliRunner

    app = typer.Typer(rich_markup_mode=None)
    given = {}

    @app.command()
    @with_cli_options(_WithWidgets)
    def label(**flags) -> None:
        given.update(flags)

    assert "--max-widgets <int> Widgets per image at most [7]." in _help_of(app)
    result = CliRunner().invoke(app, ["in", "out", "--max-widgets", "3"])
    assert result.exit_code == 0, result.output
    assert given["max_widgets"] == 3 and given["top_k"] is None  # not given: None
    f = tmp_path / "c.toml"
    f.write_text("max_widgets = 9\n")
    assert build_config(read_toml(f), {}, config_type=_WithWidgets).max_widgets == 9
    assert build_config(read_toml(f), given, config_type=_WithWidgets).max_widgets == 3
    assert build_config({}, {}, config_type=_WithWidgets).max_widgets == 7
    with pytest.raises(ConfigError, match="max_widgets must be a positive integer, got 0"):
        build_config({"max_widgets": 0}, {}, config_type=_WithWidgets)
    with pytest.raises(ConfigError, match="config key max_widgets must be an integer"):
        build_config(read_toml(_toml(tmp_path, 'max_widgets = "9"')), {}, config_type=_WithWidgets)


def _toml(tmp_path, line: str):
    f = tmp_path / "bad.toml"
    f.write_text(line + "\n")
    return f


# Keys a config file may set that have no flag: adding one is a decision made here.
CONFIG_FILE_ONLY = {"log_interval", "run_id"}
FINETUNE_NOT_ON_CLI = {"dropout", "max_pixels", "max_file_bytes"}


@pytest.mark.parametrize("command, config_type, not_on_cli, own_flags", [
    ("label", RunConfig, CONFIG_FILE_ONLY, {"-c", "--config", "--debug"}),
    ("finetune", FinetuneConfig, FINETUNE_NOT_ON_CLI, {"--json", "--debug"}),
])
def test_every_config_field_is_on_the_command_line_with_its_help(command, config_type,
                                                                  not_on_cli, own_flags):
    import typer

    from pipeline.cli import app

    fields = {f.name: f.metadata["option"] for f in dataclasses.fields(config_type)}
    assert {name for name, opt in fields.items() if not opt.cli} == not_on_cli
    params = {p.name: p for p in typer.main.get_command(app).commands[command].params}
    for name, opt in fields.items():
        if name in not_on_cli:
            assert name not in params
        elif opt.argument:
            assert params[name].metavar == opt.argument
        else:
            flag = (opt.flags or (f"--{name.replace('_', '-')}",))[0].split("/")[0]
            assert params[name].opts[0] == flag
    flags = {o for p in params.values() for o in (*p.opts, *p.secondary_opts)
             if o.startswith("-")}
    expected = {o for name, p in params.items() if name in fields
                for o in (*p.opts, *p.secondary_opts) if o.startswith("-")}
    assert flags - expected == own_flags  # nothing on the command line that is not a field
    shown = re.sub(r"\s+", "", _help_of(app, command))
    for name in set(fields) - not_on_cli:
        assert re.sub(r"\s+", "", params[name].help) in shown, name


NARROW_TYPES = (ReadLimits, DeviceRequest, ModelRequest, S3Options)


@pytest.mark.parametrize("narrow_type", NARROW_TYPES, ids=lambda t: t.__name__)
def test_each_narrow_type_is_built_from_the_run_config_and_keeps_its_defaults(narrow_type):
    fed = {}
    for f in dataclasses.fields(RunConfig):
        if narrow_type in f.metadata["feeds"]:
            fed[f.metadata["as_name"] or f.name] = f
    theirs = {f.name: f for f in dataclasses.fields(narrow_type)}
    assert set(fed) == set(theirs)  # a field of the narrow type without an option fails here
    hints = typing.get_type_hints(RunConfig)
    their_hints = typing.get_type_hints(narrow_type)
    for name, f in fed.items():
        assert hints[f.name] == their_hints[name], name
    assert narrow(RunConfig(), narrow_type) == narrow_type()  # one default for each
