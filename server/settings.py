"""Settings declared once: each field of a settings dataclass is a CLI flag and an environment
variable, with one default and one help text, and nested settings dataclasses are walked.

    port: int = setting(50051, "gRPC port")                    # --port, TOKENWIRE_PORT
    keep_alive_s: float = setting(300.0, "...", flag="--keep-alive", env="KEEP_ALIVE",
                                  parse=parse_duration)

`Cls()` holds the declared defaults; `environment(Cls)` applies the TOKENWIRE_* variables;
`add_arguments` builds argparse flags from a settings class, `from_namespace` builds the
settings from the parsed flags (flag, else variable, else default), and `to_argv` turns
settings into the flags that give them again (how `tokenwire up` forwards its whole
configuration to its children). A field without `setting()` is not configurable from outside. Plain data and functions: every layer
may import this module (the engine and the bridge declare their settings with it).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

ENV_PREFIX = "TOKENWIRE_"
_META = "tokenwire.setting"


@dataclass(frozen=True)
class Spec:
    """One declared setting, as found by walking a settings class."""

    path: tuple[str, ...]  # attribute names from the root settings object
    flag: str
    env: str  # full variable name
    help: str
    parse: Callable[[str], Any]
    default: Any  # a value, or a zero-argument callable giving it
    choices: tuple[Any, ...] | None = None
    aliases: tuple[str, ...] = ()

    @property
    def dest(self) -> str:
        return "__".join(self.path)

    def default_value(self) -> Any:
        return self.default() if callable(self.default) else self.default

    def from_env(self) -> Any:
        """The environment's value (parsed), else the default."""
        raw = os.environ.get(self.env)
        if raw is None or raw == "":
            return self.default_value()
        try:
            return self.parse(raw)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{self.env}={raw!r}: {exc}") from None


def setting(default: Any, help: str, *, flag: str = "", env: str = "", parse: Callable[[str], Any] | None = None,
            choices: tuple[Any, ...] | None = None, aliases: tuple[str, ...] = ()) -> Any:
    """A dataclass field that is also a flag (default `--field-name`) and an environment variable
    (default TOKENWIRE_FIELD_NAME). `default` may be a zero-argument callable (computed when an
    instance is made); `parse` turns the text of a flag or variable into the value (default: the
    type of the default)."""
    meta = {"flag": flag, "env": env, "help": help, "parse": parse, "default": default, "choices": choices,
            "aliases": aliases}
    if callable(default):
        return field(default_factory=default, metadata={_META: meta})
    return field(default=default, metadata={_META: meta})


def _parser_for(default: Any) -> Callable[[str], Any]:
    if isinstance(default, bool):
        return _yes_no
    if isinstance(default, int):
        return int
    if isinstance(default, float):
        return float
    if isinstance(default, Path):
        return lambda text: Path(text).expanduser()
    return str


def _yes_no(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"not a yes/no value: {text!r} (use true or false)")


def walk(cls: type, prefix: tuple[str, ...] = ()) -> Iterator[Spec]:
    """Every setting of a settings class, nested settings classes included (depth first)."""
    for f in fields(cls):
        meta = f.metadata.get(_META)
        if meta is None:
            nested = f.default_factory if f.default_factory is not dataclasses.MISSING else None
            if isinstance(nested, type) and is_dataclass(nested):
                yield from walk(nested, (*prefix, f.name))
            continue
        default = meta["default"]
        yield Spec(
            path=(*prefix, f.name),
            flag=meta["flag"] or "--" + f.name.replace("_", "-"),
            env=ENV_PREFIX + (meta["env"] or f.name.upper()),
            help=meta["help"],
            parse=meta["parse"] or _parser_for(default() if callable(default) else default),
            default=default,
            choices=meta["choices"],
            aliases=meta["aliases"],
        )


def environment(cls: type) -> Any:
    """The settings the environment gives: each TOKENWIRE_* variable that is set, else the default.
    Raises ValueError naming a variable whose value does not parse."""
    config = cls()
    for spec in walk(cls):
        if os.environ.get(spec.env, "") != "":
            _set(config, spec.path, spec.from_env())
    return config


def add_arguments(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = ()) -> None:
    """One flag per setting of `cls` (not those whose flag is in `skip`); each flag's default is
    what the environment says, else the declared default."""
    for spec in walk(cls):
        if spec.flag in skip:
            continue
        shown = spec.from_env()
        # A yes/no setting is a switch (`--flag`), and takes a value too (`--flag false`, as to_argv writes).
        switch = {"nargs": "?", "const": True} if isinstance(spec.default_value(), bool) else {}
        parser.add_argument(
            spec.flag, *spec.aliases, dest=spec.dest, type=_argparse_type(spec), choices=spec.choices,
            default=argparse.SUPPRESS, metavar=None if spec.choices else spec.flag.lstrip("-").upper().replace("-", "_"),
            help=f"{spec.help} (env {spec.env}; default {shown if shown != '' else 'none'})", **switch,
        )


def _argparse_type(spec: Spec) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            return spec.parse(text)
        except (TypeError, ValueError) as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    parse.__name__ = spec.flag.lstrip("-")  # argparse names the flag in its error message
    return parse


def from_namespace(cls: type, namespace: argparse.Namespace, **fixed: Any) -> Any:
    """The settings: each flag given on the command line, else its environment variable, else its
    default. `fixed` sets top-level fields outright."""
    config = environment(cls)
    for spec in walk(cls):
        if hasattr(namespace, spec.dest):
            _set(config, spec.path, getattr(namespace, spec.dest))
    for name, value in fixed.items():
        setattr(config, name, value)
    return config


def _set(config: Any, path: tuple[str, ...], value: Any) -> None:
    target = config
    for name in path[:-1]:
        target = getattr(target, name)
    setattr(target, path[-1], value)


def value_of(config: Any, spec: Spec) -> Any:
    target = config
    for name in spec.path:
        target = getattr(target, name)
    return target


def to_argv(config: Any, skip: tuple[str, ...] = ()) -> list[str]:
    """The flags that give these settings again: every setting, skipping the flags in `skip`."""
    argv: list[str] = []
    for spec in walk(type(config)):
        if spec.flag not in skip:
            argv += [spec.flag, format_value(value_of(config, spec))]
    return argv


def format_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str | float) -> float:
    """Seconds from "300", "90s", "5m", "1h" or "-1" (as Ollama's keep_alive); ValueError otherwise."""
    if isinstance(text, int | float):
        return float(text)
    value = text.strip().lower()
    for unit in sorted(_UNITS, key=len, reverse=True):
        if value.endswith(unit) and value[: -len(unit)].strip():
            try:
                return float(value[: -len(unit)]) * _UNITS[unit]
            except ValueError:
                break
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"not a duration: {text!r} (use seconds, or 90s, 5m, 1h; negative = forever)") from None


_SIZES = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_bytes(text: str | int) -> int:
    """Bytes from "1073741824", "512M", "8G", "8GiB", "1.5g"; ValueError otherwise."""
    if isinstance(text, int):
        return text
    value = text.strip().lower().removesuffix("ib").removesuffix("b")
    scale = _SIZES.get(value[-1:], 1) if value else 1
    number = value[:-1] if scale != 1 else value
    try:
        return int(float(number) * scale)
    except ValueError:
        raise ValueError(f"not a size: {text!r} (use bytes, or 512M, 8G)") from None
