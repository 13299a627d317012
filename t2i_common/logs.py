"""Logging set-up shared by the daemons, and how prompts appear in logs."""

from __future__ import annotations

import hashlib
import logging
import sys

from .config import ConfigError

LEVELS = ("debug", "info", "warning", "error")


def configure(level: str) -> None:
    if level.lower() not in LEVELS:
        raise ConfigError(f"--log-level must be one of {', '.join(LEVELS)}, got {level!r}")
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def prompt_for_log(prompt: str, full: bool) -> str:
    """Prompts are the users' words: by default only their length and a hash reach the log."""
    if full:
        return repr(prompt)
    # surrogatepass: JSON admits lone surrogates ("\ud800"), which strict UTF-8 cannot encode.
    return f"sha256:{hashlib.sha256(prompt.encode('utf-8', 'surrogatepass')).hexdigest()[:12]}/len:{len(prompt)}"
