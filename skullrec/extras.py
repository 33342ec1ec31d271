"""Optional parts of skullrec and the packages they need (the extras of pyproject.toml).

A core install (``pip install skullrec``) prepares, trains, predicts and evaluates. ``skullrec view``
and the experiment's figures need ``skullrec[viewer]``, ``skullrec federate`` needs
``skullrec[federated]``. A command checks its extra before it starts work, so a missing package is
one line at the start (not an ImportError traceback, nor a failure after hours of training).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence

from .errors import InputError

# extra -> the import names it provides (the distributions are listed in pyproject.toml)
EXTRAS: dict[str, tuple[str, ...]] = {
    "viewer": ("streamlit", "plotly", "matplotlib"),
    "federated": ("flwr",),
}


def missing_modules(modules: Sequence[str]) -> list[str]:
    """The names in ``modules`` that this Python cannot import (found without importing them)."""
    return [m for m in modules if importlib.util.find_spec(m) is None]


def require_extra(what: str, extra: str, modules: Sequence[str] | None = None) -> None:
    """InputError ``WHAT: needs the [EXTRA] extra (pip install 'skullrec[EXTRA]')`` when a package is missing.

    ``modules`` narrows the check to what ``what`` imports (default: every package of the extra).
    """
    missing = missing_modules(EXTRAS[extra] if modules is None else modules)
    if missing:
        raise InputError(f"{what}: needs the [{extra}] extra (pip install 'skullrec[{extra}]'); not installed: {', '.join(missing)}")


__all__ = ["EXTRAS", "missing_modules", "require_extra"]
