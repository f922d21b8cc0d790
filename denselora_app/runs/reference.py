"""Naming a run: what a user types (an id, ``runs/<id>``, a folder) becomes a ``Run`` here, for every command and the
app alike; and which folders are runs at all.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import NamedTuple

from denselora_app.runs.files import (
    ADAPTER_DIR,
    CHECKPOINTS_DIR,
    RUN_FILES,
    RunError,
    checkpoint_step,
    runs_dir,
)
from denselora_app.runs.run import Run

log = logging.getLogger(__name__)


def is_run_folder(path: Path) -> bool:
    """Whether ``path`` is a run folder: the one rule for listing runs, finding one, and what may be deleted."""
    return path.is_dir() and any((path / name).exists() for name in RUN_FILES)


class AdapterPlace(NamedTuple):
    """Where an adapter folder sits in a run folder: the run's folder, and the checkpoint's step (None: the final
    adapter)."""

    run_folder: Path
    checkpoint: int | None


def adapter_place(path: Path) -> AdapterPlace | None:
    """The run folder whose adapter/ or checkpoints/checkpoint-N ``path`` is (by its place, not yet checked to be a
    run), or None for a folder that is neither."""
    path = path.absolute()
    if path.name == ADAPTER_DIR:
        return AdapterPlace(path.parent, None)
    step = checkpoint_step(path) if path.parent.name == CHECKPOINTS_DIR else None
    return AdapterPlace(path.parent.parent, step) if step is not None else None


def list_runs(root: Path | None = None) -> list[Run]:
    """Every run folder in the runs folder, newest first. Reads only."""
    root = root or runs_dir()
    try:
        folders = [p for p in root.iterdir() if _is_run_id(p.name)]
    except OSError:
        return []
    runs = [Run(p) for p in folders if is_run_folder(p)]
    return sorted(runs, key=lambda r: (r.raw_status().created_at or 0.0, r.id), reverse=True)


def resolve_run(ref: str, root: Path | None = None, *, outside_root: bool = False) -> Run:
    """The run that ``ref``, as a user typed it, names: a run id in the runs folder ``root``, or the path of a run
    folder (relative to the current directory, ``~`` expanded; ``runs/<id>`` also names run <id> of ``root``). The
    one place every command and the app's pickers find a run; anything else is a RunError saying what was typed and
    what a run reference looks like.

    Only with ``outside_root`` (the CLI: a local user's own disk) may the folder be elsewhere, e.g. copied from
    another machine. Without it (the app, whose callers may be anonymous visitors of a Space) only the runs in
    ``root`` are reached, and a path outside it is refused without being looked at, so the answer tells nothing
    about the server's disk.
    """
    text = str(ref).strip()
    root = (root or runs_dir()).resolve()
    path = typed_folder(text) if text else None
    inside = path is not None and path.parent == root and _is_run_id(path.name)  # where list_runs looks
    by_id = [root / run_id for run_id in dict.fromkeys((text, runs_folder_form(text, root)))
             if run_id and _is_run_id(run_id)]
    typed = [path] if path is not None and path not in by_id and (inside or outside_root) else []
    candidates = by_id + typed
    try:
        if (found := next((folder for folder in candidates if is_run_folder(folder)), None)) is not None:
            return Run(found)
        seen = next((folder for folder in candidates if folder.exists()), None)
    except OSError as err:  # a path the system will not look up: a name too long, a folder it may not enter
        raise RunError(_not_a_run(text, f"it cannot be looked up ({err.strerror or err})")) from None
    if not text:
        why = "nothing was given"
    elif seen is not None:
        why = (f"the folder {seen} holds no run files ({' or '.join(RUN_FILES)})" if seen.is_dir()
               else f"{seen} is a file, not a run folder")
    elif path is None and outside_root:
        why = "it cannot be a path on this system"
    elif not candidates:  # a path outside the runs folder, without outside_root: never looked at
        why = f"here only the runs in the runs folder {root} can be used"
    else:
        missing = ([f"no run of that id in {root}"] if by_id else []) + ([f"no folder {path}"] if typed else [])
        why = "there is " + ", and ".join(missing)
    raise RunError(_not_a_run(text, why))


def runs_folder_form(text: str, root: Path | None = None) -> str | None:
    """The run id in ``runs/<id>`` (or ``<name of root>/<id>``): a run of the runs folder written as its path from
    the folder above it, as the docs and messages write it, whatever the current directory. None for other text."""
    parts = Path(str(text).strip()).parts
    names = {"runs", (root or runs_dir()).resolve().name}
    return parts[1] if len(parts) == 2 and parts[0] in names and _is_run_id(parts[1]) else None


def _is_run_id(text: str) -> bool:
    # Only ever one folder name inside the runs folder: no separator, not '..', not hidden. Any other name a folder
    # was given (spaces, accents, copied from elsewhere) is the id of the run in it.
    return (0 < len(text) <= 255 and text.isprintable() and not text.startswith(".")
            and not any(sep in text for sep in ("/", "\\")))


def typed_folder(text: str) -> Path | None:
    """The absolute folder a typed path names; None when it cannot be one here (a control character, '~user' with
    no such user, a link loop). Everything above its last part is resolved (links, '..'), the last part is not: a
    run folder that is a symbolic link stays one, so deleting it can refuse to follow it. The one reading of a typed
    path for every front end: whatever the text, it raises nothing."""
    if not text.isprintable():  # NUL, newlines: no folder a user means, and a message must stay one line
        return None
    try:
        path = Path(text).expanduser().absolute()
        return path.resolve() if path.name in ("", "..") else path.parent.resolve() / path.name
    except (OSError, ValueError, RuntimeError):
        return None



def _not_a_run(text: str, why: str) -> str:
    typed = repr(text[:80]) + ("..." if len(text) > 80 else "")  # one line, however long or odd the input
    return (f"{typed} is not a run: {why}. A run is given by its run id or by the path of its folder "
            "(e.g. runs/<id>); list the runs with: python -m denselora_app runs")
