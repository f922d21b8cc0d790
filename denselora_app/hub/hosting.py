"""Where the studio runs: on a Hugging Face Space or not, on ZeroGPU hardware or not, and whether its runs folder
outlives a restart. Every front end asks here, never the environment. Imports no torch: the app's first page uses it.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T", bound=Callable[..., Any])


def space_id() -> str | None:
    """This Space's repository id ('owner/name'), or None off a Space (the Hub sets SPACE_ID in every Space)."""
    return os.environ.get("SPACE_ID", "").strip() or None


def on_space() -> bool:
    """True when running as a Hugging Face Space."""
    return space_id() is not None


def space_owner() -> str | None:
    """The user or organisation that owns this Space: the namespace of SPACE_ID ('owner/name'; the Hub also sets
    SPACE_AUTHOR_NAME to it); None off a Space."""
    space = space_id()
    if not space:
        return None
    return space.partition("/")[0] if "/" in space else os.environ.get("SPACE_AUTHOR_NAME") or space


def on_zerogpu() -> bool:
    """True on ZeroGPU hardware. Read exactly as the ``spaces`` package reads it (SPACES_ZERO_GPU is 1, t or true,
    in any case), so the studio and ``spaces.GPU`` never disagree about whether a GPU call is needed."""
    return os.environ.get("SPACES_ZERO_GPU", "").lower() in ("1", "t", "true")


# ---- keeping runs across restarts ---------------------------------------------------------------------------------

MOUNT_TABLE = Path("/proc/self/mounts")
# Filesystems held in memory or in the container's own writable layer: a restart of the Space starts them empty.
EPHEMERAL_FILESYSTEMS = frozenset({"overlay", "aufs", "tmpfs", "ramfs", "devtmpfs", "rootfs"})


def _unescape(field: str) -> str:
    # The kernel writes a space, tab, newline or backslash in a mount path as a 3-digit octal escape (\040).
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), field)


def filesystem_of(path: Path, table: str | None = None) -> tuple[str, str]:
    """The mount point holding ``path`` (which need not exist yet) and its filesystem type, from the mount table
    (``table``: its text; default: this process's /proc/self/mounts). Without a readable table, the nearest
    ancestor that ``os.path.ismount`` names, with an empty type."""
    target = Path(os.path.realpath(path))
    if table is None:
        try:
            table = MOUNT_TABLE.read_text(encoding="utf-8", errors="replace")
        except OSError:
            table = ""
    found: tuple[str, str] | None = None
    for line in table.splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue
        point, fstype = _unescape(fields[1]), fields[2]
        inside = point == "/" or target == Path(point) or Path(point) in target.parents
        # The longest mount point that contains the path; of several on one point, the later one (mounted over).
        if inside and (found is None or len(point) >= len(found[0])):
            found = (point, fstype)
    if found is not None:
        return found
    folder = target
    while not os.path.ismount(folder) and folder != folder.parent:
        folder = folder.parent
    return str(folder), ""


def persistent(path: Path, table: str | None = None) -> bool:
    """Whether files under ``path`` outlive a restart of the container: they are on a mounted volume (a Storage
    Bucket, any disk mounted at a folder of its own), not on the container's root filesystem or in memory."""
    point, fstype = filesystem_of(path, table)
    return point != "/" and fstype not in EPHEMERAL_FILESYSTEMS


def runs_persistent() -> bool:
    """Whether runs survive a restart. Off a Space they are on the local disk; a Space resets its container's disk
    on every restart, so there only a runs folder on a mounted volume keeps them."""
    from denselora_app.runs import runs_dir

    return not on_space() or persistent(runs_dir())


def storage_notice() -> str | None:
    """What the app says when runs are lost on restart (a Space whose runs folder is on no volume), else None."""
    if runs_persistent():
        return None
    from denselora_app.runs import runs_dir

    return (f"**Runs are lost when this Space restarts**: its runs folder (`{runs_dir()}`) is on the container's own "
            "disk, which every restart (a new build, a settings change, a crash, sleep) starts empty. To keep runs, "
            "mount a Storage Bucket as a volume (Space settings, or `HfApi.set_space_volumes`) and set the Space "
            "variable `DENSELORA_RUNS` to a folder on it, e.g. `/data/runs`; a run training at a restart can then "
            "be resumed from its last checkpoint.")


# ---- ZeroGPU: a GPU lent for one call at a time ---------------------------------------------------------------------

# How long a call needs is estimated, not measured (no ZeroGPU hardware to measure on). One step is one forward pass
# of the model: a generated token, or one scored batch. transformers' generate runs a step per token, bound by
# kernel launches rather than arithmetic for the models a studio chats with (up to ~8B parameters); 15 steps/s is
# below what such models decode at on ZeroGPU's H200 slice, so the estimate errs long.
GPU_STEPS_PER_SECOND = 15
# The floor: loading the base model and adapter onto the GPU, which every call may need (a fresh GPU process
# holds no model yet).
GPU_LOAD_SECONDS = 30
# The cap: ZeroGPU refuses calls longer than a few minutes, and a visitor's remaining daily quota must cover what
# a call asks for, so asking for more than needed turns visitors away early.
GPU_MAX_SECONDS = 300
GPU_MAX_STEPS = (GPU_MAX_SECONDS - GPU_LOAD_SECONDS) * GPU_STEPS_PER_SECOND  # what one call can be asked to do


def gpu_seconds(steps: int) -> int:
    """The GPU time to ask ZeroGPU for, for a call that runs ``steps`` forward passes: the load allowance plus the
    steps at the estimated rate, at most GPU_MAX_SECONDS."""
    return min(GPU_LOAD_SECONDS + math.ceil(max(steps, 0) / GPU_STEPS_PER_SECOND), GPU_MAX_SECONDS)


def on_gpu(task: T, steps: Callable[..., int]) -> T:
    """``task`` as it is; on ZeroGPU, wrapped by ``spaces.GPU`` so that it runs with a GPU for the time its
    ``steps`` (called with the task's own arguments) need.

    Wrap at import time: ``spaces`` registers its GPU functions when the app launches. On ZeroGPU the task runs in a
    process forked for the GPU, possibly one forked a while ago and kept: its arguments and results (or, for a
    generator, each value it yields) are pickled across, what it changes in module state stays there, and an
    exception reaches the page only as "ZeroGPU worker error". So a task takes everything it uses as arguments and
    returns its problems as values. A generator's values stream back as they are yielded.
    """
    if not on_zerogpu():
        return task
    import spaces  # every ZeroGPU Space has it installed; nowhere else is it needed

    return spaces.GPU(task, duration=lambda *args, **kwargs: gpu_seconds(steps(*args, **kwargs)))
