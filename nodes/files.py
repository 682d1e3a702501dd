"""File names that come from node inputs: confined to the pack's own folders, never overwritten silently.

Every node that reads or writes a file named by an input goes through `confined_file` (reading) or
`new_file` (writing). A name is a plain stem: no folder, no `..`, no absolute path, no separator, no Windows
reserved device name; the resolved path must stay inside the folder (symlinks resolved)."""
from __future__ import annotations

import os
import re
from pathlib import Path

_STEM = re.compile(r"[A-Za-z0-9][A-Za-z0-9_\-]{0,99}")
_RESERVED = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(10)), *(f"lpt{i}" for i in range(10))}


class FileNameError(ValueError):
    pass


def stem_problem(name) -> str | None:
    """Why `name` is not an allowed file stem (None when it is)."""
    if not isinstance(name, str) or not name:
        return f"a file name is needed, got {name!r}"
    if os.path.isabs(name) or "/" in name or "\\" in name or ".." in name or ":" in name:
        return f"{name!r} names a folder or an absolute path; give a plain name (letters, digits, '-' and '_')"
    if not _STEM.fullmatch(name):
        return f"{name!r} may hold letters, digits, '-' and '_' only (at most 100, starting with a letter or digit)"
    if name.lower() in _RESERVED:
        return f"{name!r} is a reserved device name"
    return None


def _inside(folder: Path, path: Path) -> Path:
    root = folder.resolve()
    resolved = path.resolve()
    if resolved != root and root not in resolved.parents:
        raise FileNameError(f"{path} resolves outside {root}")
    return resolved


def confined_file(folder: str | os.PathLike, name: str, suffix: str) -> Path:
    """`folder/name+suffix` for an allowed stem, resolved and checked to stay inside `folder`."""
    problem = stem_problem(name)
    if problem:
        raise FileNameError(problem)
    return _inside(Path(folder), Path(folder) / f"{name}{suffix}")


def confined_existing(folder: str | os.PathLike, relative: str) -> Path:
    """An existing file given relative to `folder` (as ComfyUI's file lists name them): must resolve inside it."""
    if not isinstance(relative, str) or not relative or os.path.isabs(relative) or ".." in Path(relative).parts:
        raise FileNameError(f"{relative!r} is not a file name inside {folder}")
    path = _inside(Path(folder), Path(folder) / relative)
    if not path.is_file():
        raise FileNameError(f"{relative!r} does not exist in {folder}")
    return path


def new_file(folder: str | os.PathLike, name: str, suffix: str, overwrite: bool = False) -> Path:
    """Where to write `name`: `name+suffix`, or, when that exists and `overwrite` is off, the first free
    `name_00001+suffix`, `name_00002+suffix`, … (as ComfyUI's SaveImage numbers its files)."""
    path = confined_file(folder, name, suffix)
    if overwrite or not path.exists():
        return path
    for counter in range(1, 100000):
        candidate = _inside(Path(folder), Path(folder) / f"{name}_{counter:05d}{suffix}")
        if not candidate.exists():
            return candidate
    raise FileNameError(f"no free file name left for {name!r} in {folder}")
