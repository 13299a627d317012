"""Command-line flags that can also come from a config file and from the environment.

Each daemon declares its options once (``Option``); ``load_options`` builds the argparse parser
from them and resolves every value with the precedence: command line, then environment
(``<PREFIX>_<NAME>``, e.g. ``T2I_ORCHESTRATOR_PORT``), then the ``--config`` file (TOML or JSON,
keys as the flag names with ``_`` or ``-``), then the default.
"""

from __future__ import annotations

import argparse
import json
import os
import tomllib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .schemas import Limits


class ConfigError(Exception):
    """A configuration value that cannot be used; the message says which and why."""


@dataclass(frozen=True)
class Option:
    name: str  # the flag without dashes, with '-' between words
    help: str
    type: Callable[[str], Any] = str
    default: Any = None
    repeat: bool = False  # may be given several times; from the environment: comma-separated
    flag: bool = False  # a boolean switch: --name / --no-name

    @property
    def dest(self) -> str:
        return self.name.replace("-", "_")


def secret_options(name: str, help: str) -> tuple[Option, Option]:
    """``--NAME`` and ``--NAME-file``: a secret is best kept in a file or the environment, off command lines."""
    return Option(name, f"{help}; better given in the environment or with --{name}-file"), Option(
        f"{name}-file", f"file holding the {name.replace('-', ' ')} (first line)", type=Path
    )


def read_secret(values: dict[str, Any], name: str) -> str | None:
    """The secret from ``--NAME-file`` if given, else from ``--NAME`` (or its variable or config key)."""
    dest = name.replace("-", "_")
    path = values.get(f"{dest}_file")
    if path is None:
        return values.get(dest) or None
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as exc:
        raise ConfigError(f"--{name}-file: cannot read {path}: {exc.strerror}") from None
    if not lines or not lines[0].strip():
        raise ConfigError(f"--{name}-file: {path} is empty")
    return lines[0].strip()


MIN_SECRET_LENGTH = 32


def strong_secret(values: dict[str, Any], name: str) -> str | None:
    """``read_secret``, refusing a placeholder from the examples or a secret short enough to guess."""
    secret = read_secret(values, name)
    if secret is None:
        return None
    if "change-me" in secret.lower():
        raise ConfigError(f"--{name} is the placeholder from the examples; make a real one: openssl rand -hex 32")
    if len(secret) < MIN_SECRET_LENGTH:
        raise ConfigError(f"--{name} is {len(secret)} characters; use at least {MIN_SECRET_LENGTH}: openssl rand -hex 32")
    return secret


def parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"not a boolean: {text!r}")


def load_options(prog: str, description: str, options: Sequence[Option], argv: Sequence[str] | None, env_prefix: str) -> dict[str, Any]:
    """Resolve every option; raises ``ConfigError`` for a bad value, exits on a bad flag (argparse)."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--config", type=Path, help=f"TOML or JSON file with any of the options below (env {env_prefix}_CONFIG)")
    for option in options:
        env = f"{env_prefix}_{option.dest.upper()}"
        help_text = f"{option.help} (env {env}; default: {option.default!r})"
        if option.flag:
            parser.add_argument(f"--{option.name}", action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif option.repeat:
            parser.add_argument(f"--{option.name}", action="append", type=str, default=None, help=help_text)
        else:
            parser.add_argument(f"--{option.name}", type=str, default=None, help=help_text)
    args = parser.parse_args(argv)
    config_path = args.config or os.environ.get(f"{env_prefix}_CONFIG")
    from_file = _read_config_file(Path(config_path)) if config_path else {}
    known = {option.dest for option in options}
    unknown = sorted(set(from_file) - known)
    if unknown:
        raise ConfigError(f"{config_path}: unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")

    values: dict[str, Any] = {}
    for option in options:
        env = f"{env_prefix}_{option.dest.upper()}"
        raw: Any = getattr(args, option.dest)
        source = f"--{option.name}"
        if raw is None and env in os.environ:
            raw, source = os.environ[env], env
            if option.repeat:
                raw = [item.strip() for item in raw.split(",") if item.strip()]
        if raw is None and option.dest in from_file:
            raw, source = from_file[option.dest], f"{config_path}: {option.dest}"
        if raw is None:
            values[option.dest] = option.default
            continue
        values[option.dest] = _convert(option, raw, source)
    return values


def _convert(option: Option, raw: Any, source: str) -> Any:
    convert = parse_bool if option.flag else option.type
    items = raw if isinstance(raw, list) else [raw]
    try:
        if isinstance(raw, list) and not option.repeat:
            raise ValueError("expected one value, got a list")
        converted = [item if option.flag and isinstance(item, bool) else convert(str(item)) for item in items]
    except ValueError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    return converted if option.repeat else converted[0]


def _read_config_file(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    try:
        data = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except (ValueError, RecursionError) as exc:
        raise ConfigError(f"config file {path} is not valid {'JSON' if path.suffix == '.json' else 'TOML'}: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a table of options")
    return {key.replace("-", "_"): value for key, value in data.items()}


def positive(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    """A converter that also insists the number is above zero."""

    def convert(text: str) -> Any:
        value = kind(text)
        if value <= 0:
            raise ValueError(f"must be above 0, got {text}")
        return value

    convert.__name__ = f"positive {kind.__name__}"
    return convert


_LIMITS = Limits()

# The request limits, configurable the same way on every daemon.
LIMIT_OPTIONS = (
    Option("max-size", "largest width or height", type=positive(int), default=_LIMITS.max_size),
    Option("max-pixels", "largest width x height x num_images_per_prompt", type=positive(int), default=_LIMITS.max_pixels),
    Option("max-steps", "largest num_inference_steps", type=positive(int), default=_LIMITS.max_steps),
    Option("max-images", "largest num_images_per_prompt", type=positive(int), default=_LIMITS.max_images),
)


# Shared by both daemons.
COMMON_OPTIONS = (
    Option("shutdown-grace", "seconds that requests in flight get to finish after SIGTERM", type=positive(float), default=120.0),
    Option("log-prompts", "log prompts in full (by default only their length and a hash)", flag=True, default=False),
    Option("log-level", "debug, info, warning or error", default="info"),
)


# How a daemon reaches a shared registry (a file, or Redis: --registry/--register redis://host:6379/0).
REGISTRY_OPTIONS = (
    Option("registry-prefix", "key prefix in a Redis registry, so that several fleets can share one Redis", default="t2i"),
    *secret_options("registry-password", "password of a Redis registry (instead of one in its URL)"),
    Option("registry-ca", "CA certificate (PEM) that a rediss:// registry's certificate must chain to (default: the system's)", type=Path),
)


def limits_from(values: dict[str, Any]) -> Limits:
    return Limits(
        max_size=values["max_size"], max_pixels=values["max_pixels"], max_steps=values["max_steps"], max_images=values["max_images"]
    )
