"""The one output-path rule of every command: an output never deletes, replaces or hides an input.

Every command passes the inputs named on its command line (data folders, checkpoints, the stage-2
checkpoint, truth and defective folders, configs) with its output to :func:`check_outside_inputs`.
Paths are compared after resolving symlinks, and so are the symlinks *inside* an input folder: a
volume of ``--in`` that links to a file elsewhere is an input at its target too, so an output that
holds that target would delete the real file on ``--overwrite``. The rule, whatever ``--overwrite``
says:

* an output **folder** may not be, contain or lie inside an input (folder or file);
* an output **file** may not be an input file, be an input folder or lie inside an input folder.

Messages keep one line: ``OUT: output folder contains the input folder D; choose an output folder
outside the inputs``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from .errors import InputError


@dataclass(frozen=True)
class Guarded:
    """One protected path.

    Attributes:
        real: the path with every symlink resolved (what an output would actually touch).
        shown: how the user named it (the option's value), or the resolved target of a link.
        folder: True for a folder (an output may not lie inside it).
        link: for a target reached through a symlink inside an input folder, that symlink.
    """

    real: Path
    shown: Path
    folder: bool
    link: Path | None = None

    def describe(self) -> str:
        """``input folder D`` / ``input file F`` / ``input file T (linked from D/a.nii.gz)``."""
        kind = "folder" if self.folder else "file" if self.real.exists() else "path"
        via = f" (linked from {self.link})" if self.link is not None else ""
        return f"input {kind} {self.shown}{via}"


def _linked_members(folder: Path, shown: Path) -> Iterator[Guarded]:
    """The targets of the symlinks anywhere inside ``folder`` that lead out of it.

    Symlinked sub-folders are protected at their target but not walked: one symlink to ``/`` in a
    data set must not make every command list the whole disk (it still protects everything below
    it, which is what that link makes an input).
    """
    stack = [folder]
    while stack:
        current = stack.pop()
        try:
            entries = list(os.scandir(current))
        except OSError:  # unreadable sub-folder: the command reading it reports that itself
            continue
        for entry in entries:
            if entry.is_symlink():
                target = _resolve(Path(entry.path))
                if target is not None and not target.is_relative_to(folder):
                    yield Guarded(target, target, target.is_dir(), link=shown / Path(entry.path).relative_to(folder))
            elif entry.is_dir(follow_symlinks=False):
                stack.append(Path(entry.path))


def _resolve(path: Path) -> Path | None:
    """``path`` with its symlinks resolved; None for a symlink loop (it leads to no file to protect)."""
    try:
        return path.resolve()
    except (OSError, RuntimeError):  # RuntimeError: Python < 3.13 reports a loop so
        return None


def guarded_paths(inputs: Iterable[str | Path | None]) -> list[Guarded]:
    """Every path ``inputs`` protect: each input resolved, and for folders the targets of the symlinks inside them."""
    out: list[Guarded] = []
    for inp in inputs:
        if inp is None:
            continue
        shown = Path(inp)
        real = _resolve(shown) or shown.absolute()
        out.append(Guarded(real, shown, real.is_dir()))
        if real.is_dir():
            out.extend(_linked_members(real, shown))
    return out


def _how(out: Path, g: Guarded, folder_output: bool) -> str | None:
    """How the resolved output ``out`` overlaps ``g`` (None when apart)."""
    if out == g.real:
        return f"is the {g.describe()}"
    if folder_output and g.real.is_relative_to(out):
        return f"contains the {g.describe()}"
    if g.folder and out.is_relative_to(g.real):
        return f"lies inside the {g.describe()}"
    return None


def check_outside_inputs(out: str | Path, inputs: Iterable[str | Path | None], *, folder: bool = True) -> None:
    """Refuse (InputError) an output that would delete, replace or hide one of ``inputs`` (module docstring).

    ``folder``: the output is a folder (replaced whole by --overwrite); False for an output file.
    """
    kind = "folder" if folder else "file"
    real = _resolve(Path(out)) or Path(out).absolute()
    for g in guarded_paths(inputs):
        how = _how(real, g, folder)
        if how is not None:
            raise InputError(f"{out}: output {kind} {how}; choose an output {kind} outside the inputs")


__all__ = ["Guarded", "guarded_paths", "check_outside_inputs"]
