"""The project's user-facing errors: each message is one line that names the file, folder, option or key.

The command line turns every one of them into ``error: MESSAGE`` on stderr and exit code 2.
"""

from __future__ import annotations

import reprlib
from collections.abc import Sequence
from typing import Any


class InputError(Exception):
    """A user-facing problem with an input (file, folder or option); the message is one line."""


class ConfigError(InputError):
    """An invalid configuration value; the message names the key."""


class DefectError(InputError):
    """No defect with the required removed fraction could be cut into this skull."""


def check_choice(label: str, value: str, choices: Sequence[str], error: type[InputError] = InputError) -> str:
    """``value`` if it is one of ``choices``; else ``error("LABEL: must be one of A, B, got 'VALUE'")``."""
    if value not in choices:
        raise error(f"{label}: must be one of {', '.join(map(str, choices))}, got {short_repr(value)}")
    return value


# How much of a value an error message shows. reprlib stops at these limits while it walks the value, so a
# YAML alias bomb (a list whose full repr is gigabytes) costs a few hundred nodes here, never its full repr.
_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxlist, _REPR.maxtuple, _REPR.maxdict, _REPR.maxset = 2, 6, 6, 4, 4
_REPR.maxstring, _REPR.maxother, _REPR.maxlong = 60, 60, 40
SHORT_REPR_CHARS = 80


def short_repr(value: Any, limit: int = SHORT_REPR_CHARS) -> str:
    """``repr(value)`` for an error message, at most ``limit`` characters, in time and memory bounded by the limits.

    Large or deeply nested values (a YAML alias bomb, a 10^6-entry list) are abbreviated with ``...``.
    """
    try:
        text = _REPR.repr(value)
    except Exception:  # noqa: BLE001 - e.g. an int over Python's 4300-digit str limit; the type still helps
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def clip(text: str, limit: int = 200) -> str:
    """``text`` cut to at most ``limit`` characters (``...`` marks a cut): a file's own string in an error message."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def one_line(message: str) -> str:
    """``message`` with every control character (newline, carriage return, tab, escape, ...) written as an escape.

    A file name holding a newline must not split ``error: ...`` into two lines, nor an escape sequence
    rewrite the terminal; printable text, non-ASCII letters included, is left as it is.
    """
    if message.isprintable():
        return message
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in message)


__all__ = ["InputError", "ConfigError", "DefectError", "check_choice", "describe_os_error", "short_repr", "clip", "one_line"]


def describe_os_error(exc: OSError) -> str:
    """``PATH: problem`` for an OS error (permission denied, read-only file system, disk full), in one line."""
    where = exc.filename if exc.filename is not None else "<unknown path>"
    what = exc.strerror or " ".join(str(exc).split()) or type(exc).__name__
    if exc.filename2 is not None:
        what += f" (and {exc.filename2})"
    return f"{where}: {what}"
