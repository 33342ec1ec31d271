"""The project's user-facing errors: each message is one line that names the file, folder, option or key.

The command line turns every one of them into ``error: MESSAGE`` on stderr and exit code 2.
"""

from __future__ import annotations


class InputError(Exception):
    """A user-facing problem with an input (file, folder or option); the message is one line."""


class ConfigError(InputError):
    """An invalid configuration value; the message names the key."""


class DefectError(InputError):
    """No defect with the required removed fraction could be cut into this skull."""


__all__ = ["InputError", "ConfigError", "DefectError"]
