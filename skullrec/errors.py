"""The project's user-facing errors: each message is one line that names the file, folder, option or key.

The command line turns every one of them into ``error: MESSAGE`` on stderr and exit code 2.
"""

from __future__ import annotations

import re
from collections.abc import Sequence


class InputError(Exception):
    """A user-facing problem with an input (file, folder or option); the message is one line."""


class ConfigError(InputError):
    """An invalid configuration value; the message names the key."""


class DefectError(InputError):
    """No defect with the required removed fraction could be cut into this skull."""


def check_choice(label: str, value: str, choices: Sequence[str], error: type[InputError] = InputError) -> str:
    """``value`` if it is one of ``choices``; else ``error("LABEL: must be one of A, B, got 'VALUE'")``."""
    if value not in choices:
        raise error(f"{label}: must be one of {', '.join(map(str, choices))}, got {value!r}")
    return value


__all__ = ["InputError", "ConfigError", "DefectError", "check_choice", "describe_os_error", "quote_controls"]

# Characters that would break or disguise a one-line message: C0/C1 controls (newline, carriage
# return, escape, ...), Unicode line/paragraph separators, and lone surrogates (undecodable bytes of
# a file name, which stderr cannot even encode).
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")


def quote_controls(text: str) -> str:
    """``text`` with every control character written as its Python escape (``\\n``, ``\\x1b``, ``\\udcff``).

    A file name may hold a newline or a terminal escape; quoted this way an error naming it stays one
    line and shows the name unambiguously instead of acting on the terminal.
    """
    return _CONTROL.sub(lambda m: ascii(m.group())[1:-1], text)


def describe_os_error(exc: OSError) -> str:
    """``PATH: problem`` for an OS error (permission denied, read-only file system, disk full), in one line."""
    where = exc.filename if exc.filename is not None else "<unknown path>"
    what = exc.strerror or " ".join(str(exc).split()) or type(exc).__name__
    if exc.filename2 is not None:
        what += f" (and {exc.filename2})"
    return f"{where}: {what}"
