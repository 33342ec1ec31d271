"""The project's user-facing errors: each message is one line that names the file, folder, option or key.

The command line turns every one of them into ``error: MESSAGE`` on stderr and exit code 2.
"""

from __future__ import annotations

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


__all__ = ["InputError", "ConfigError", "DefectError", "check_choice", "describe_os_error"]


def describe_os_error(exc: OSError) -> str:
    """``PATH: problem`` for an OS error (permission denied, read-only file system, disk full), in one line."""
    where = exc.filename if exc.filename is not None else "<unknown path>"
    what = exc.strerror or " ".join(str(exc).split()) or type(exc).__name__
    if exc.filename2 is not None:
        what += f" (and {exc.filename2})"
    return f"{where}: {what}"
