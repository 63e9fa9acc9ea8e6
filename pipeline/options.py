"""Options declared once. A config dataclass field made with `option()` is at the same time a
TOML key, a CLI flag with its --help line, and a checked value:

    top_k: int = option(5, help="Labels kept per image.", check=positive_int)

gives the key `top_k`, the flag `--top-k` with the help "Labels kept per image [5].", and a
ConfigError naming the key for anything but a positive integer. A field that feeds one of the
narrow option types (types.py) takes the default written there, where the stage reads it:
`option(ReadLimits.max_pixels, feeds=ReadLimits)`; `narrow(config, ReadLimits)` builds the
narrow type from the fields that feed it.
"""
from __future__ import annotations

import dataclasses
import inspect
import math
import os
import types
import typing
from dataclasses import MISSING, dataclass
from typing import Any, Callable, Optional, TypeVar

from .exitcodes import ConfigError

Check = Callable[[str, Any], None]  # raises ConfigError naming the key
T = TypeVar("T")


@dataclass(frozen=True)
class Option:
    """How a config field shows up outside Python (kept in the field's metadata)."""

    help: str = ""  # may hold "{choices}" and "{default}" (where the [default] goes)
    default_help: str | None = None  # the bracket's text if not the default; "": no bracket
    flags: tuple[str, ...] = ()  # the flag(s) if not --name-with-dashes
    choices: tuple[str, ...] = ()
    checks: tuple[Check, ...] = ()
    expects: str | None = None  # a wrong type's wording, if not the declared type's
    auto_is_unset: bool = False  # the string "auto" (TOML) means None
    cli: bool = True  # False: a config file key only
    argument: str | None = None  # a positional argument: its metavar (INPUT, OUTPUT)


def option(default: Any = MISSING, *, help: str = "", feeds: type | tuple[type, ...] = (),
           as_name: str | None = None, check: Check | tuple[Check, ...] = (),
           default_factory: Any = MISSING, **shown: Any) -> Any:
    """A dataclass field declaring one option. `feeds`: the narrow type(s) whose field
    `as_name` (default: the same name) this value becomes; write the default as the narrow
    type's own (`ReadLimits.max_pixels`), so it is declared once."""
    targets = feeds if isinstance(feeds, tuple) else (feeds,)
    checks = check if isinstance(check, tuple) else (check,)
    meta = Option(help=help, checks=checks, **shown)
    return dataclasses.field(default=default, default_factory=default_factory,
                             metadata={"option": meta, "feeds": targets, "as_name": as_name})


def options_of(config: Any) -> list[tuple[dataclasses.Field, Option]]:
    """The declared fields of a config dataclass (or its class), in order."""
    return [(f, f.metadata["option"]) for f in dataclasses.fields(config)
            if "option" in f.metadata]


def narrow(config: Any, narrow_type: type[T]) -> T:
    """The narrow option type built from the config's fields that feed it."""
    values = {}
    for f in dataclasses.fields(config):
        if narrow_type in f.metadata.get("feeds", ()):
            values[f.metadata.get("as_name") or f.name] = getattr(config, f.name)
    return narrow_type(**values)


# ---- checks ---------------------------------------------------------------------------------

def check_options(config: Any) -> None:
    """Every field of a config dataclass: "auto" for unset where allowed, its declared type
    (check_types), its choices, then its own checks; ConfigError naming the key."""
    for f, opt in options_of(config):
        if opt.auto_is_unset and getattr(config, f.name) == "auto":
            object.__setattr__(config, f.name, None)
    check_types(config)
    for f, opt in options_of(config):
        value = getattr(config, f.name)
        if value is None:
            continue
        if opt.choices and value not in opt.choices:
            raise ConfigError(f"{f.name} must be one of {', '.join(opt.choices)}; got {value!r}")
        for check in opt.checks:
            check(f.name, value)


def positive_int(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")


def int_at_least(minimum: int) -> Check:
    def check(name: str, value: Any) -> None:
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return check


def positive_seconds(name: str, value: Any) -> None:
    if not isinstance(value, (int, float)) or value <= 0:
        raise ConfigError(f"{name} must be a positive number of seconds, got {value!r}")


def seconds_from_zero(name: str, value: Any) -> None:
    if not 0.0 <= value < math.inf:
        raise ConfigError(f"{name} must be a number of seconds >= 0, got {value!r}")


def below(limit: int, words: str) -> Check:
    def check(name: str, value: Any) -> None:
        if value >= limit:
            raise ConfigError(f"{name} must be below {words}, got {value}")
    return check


def within(low: float, high: float, words: str, low_open: bool = False,
           high_open: bool = False) -> Check:
    """`words` says the range, e.g. "between 0 and 1" or "in [0, 1)"."""
    def check(name: str, value: Any) -> None:
        above_low = value > low if low_open else value >= low
        under_high = value < high if high_open else value <= high
        if not (above_low and under_high):
            raise ConfigError(f"{name} must be {words}, got {value}")
    return check


def check_types(config: Any) -> None:
    """Check every field of a config dataclass against its declared type (ConfigError naming
    the key), so a TOML `overwrite = "false"` or `model = 5` stops before anything runs.

    Declared types may be bool, int, float, str, or one of them `| None`. An int is accepted
    (and stored) as a float where a float is declared; a path object as a str."""
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        opt = f.metadata.get("option")
        checked = _checked_value(f.name, value, hints[f.name], opt.expects if opt else None)
        if checked is not value:
            object.__setattr__(config, f.name, checked)


_TYPE_WORDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def _checked_value(name: str, value: Any, declared: Any, expects: str | None) -> Any:
    allowed = _allowed(declared)
    if value is None and type(None) in allowed:
        return value
    for kind in allowed:
        if kind is bool and isinstance(value, bool):
            return value
        if kind is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            if math.isnan(value):
                break
            return float(value)
        if kind is str and isinstance(value, (str, os.PathLike)):
            return value if isinstance(value, str) else os.fspath(value)
    if expects is None:
        words = [_TYPE_WORDS.get(k, getattr(k, "__name__", str(k)))
                 for k in allowed if k is not type(None)]
        expects = " or ".join(words + (["unset"] if type(None) in allowed else []))
    raise ConfigError(f"config key {name} must be {expects}, got {_describe(value)}")


def _allowed(declared: Any) -> tuple:
    union = typing.get_origin(declared) in (typing.Union, types.UnionType)
    return typing.get_args(declared) if union else (declared,)


def _describe(value: Any) -> str:
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if isinstance(value, (int, float)):
        return f"the number {value!r}"
    if isinstance(value, str):
        quoted = value.lower() in ("true", "false") or _is_number(value)
        return f"the string {value!r}" + (" (write it without quotes)" if quoted else "")
    return f"{type(value).__name__} {value!r}"


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


# ---- the command line -----------------------------------------------------------------------

def help_text(f: dataclasses.Field, opt: Option, help: str | None = None) -> str:
    """The --help line: the help with its choices, and the default in brackets (before the
    final period, or where "{default}" stands); a flag that is off by default shows none."""
    text = (opt.help if help is None else help).replace("{choices}", " | ".join(opt.choices))
    shown = _shown_default(f, opt)
    bracket = f"[{shown}]" if shown else ""
    if "{default}" in text:
        return text.replace(" {default}" if not bracket else "{default}", bracket)
    if not bracket:
        return text
    if text.endswith("."):
        return f"{text[:-1]} {bracket}."
    return f"{text} {bracket}".strip()


def _shown_default(f: dataclasses.Field, opt: Option) -> str:
    if opt.default_help is not None:
        return opt.default_help
    default = f.default
    if opt.argument:  # required on the command line
        return ""
    if default is MISSING or default is None or default == "":
        return ""
    if isinstance(default, bool):
        return ("on" if default else "off") if "/" in "".join(opt.flags) else ""
    if isinstance(default, float):
        return f"{default:g}"
    return str(default)


def cli_parameters(config_type: type) -> list[inspect.Parameter]:
    """typer parameters for the CLI fields of `config_type`: its arguments (INPUT, ...) and
    its --options, in declaration order."""
    hints = typing.get_type_hints(config_type)
    params = []
    for f, opt in options_of(config_type):
        if opt.cli:
            kind = _value_type(hints[f.name])
            annotation = kind if opt.argument else Optional[kind]
            params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY,
                                            default=cli_option(config_type, f.name),
                                            annotation=annotation))
    return params


def cli_option(config_type: type, name: str, help: str | None = None) -> Any:
    """The typer.Argument or typer.Option of one declared field (`help` to word it for another
    command). An option's default is None (not given), so a flag nobody passed does not
    override the config file."""
    import typer

    f, opt = next((f, opt) for f, opt in options_of(config_type) if f.name == name)
    text = help_text(f, opt, help)
    if opt.argument:
        return typer.Argument(..., metavar=opt.argument, help=text)
    return typer.Option(None, *opt.flags, help=text, show_default=False)


def _value_type(declared: Any) -> type:
    return next(k for k in _allowed(declared) if k is not type(None))


def with_cli_options(config_type: type):
    """Decorate a typer command taking `**flags`: its signature gains the CLI parameters of
    `config_type` (before its own), and it receives their values as `flags`."""
    def wrap(fn):
        hints = typing.get_type_hints(fn)
        own = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY,
                         annotation=hints.get(p.name, p.annotation))
               for p in inspect.signature(fn).parameters.values()
               if p.kind is not inspect.Parameter.VAR_KEYWORD]
        params = cli_parameters(config_type) + own
        fn.__signature__ = inspect.Signature(params)
        fn.__annotations__ = {p.name: p.annotation for p in params}
        return fn
    return wrap
