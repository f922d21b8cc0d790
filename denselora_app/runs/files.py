"""The run folder's layout: the name of every file in it, the runs folder, and reading and writing its JSON safely.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from pathlib import Path
from typing import Any

from denselora_app.config import StudioError

log = logging.getLogger(__name__)


# Every name inside a run folder (the package docstring says what each holds). No other module spells one.
CONFIG_FILE = "config.yaml"
STATUS_FILE = "status.json"
METRICS_FILE = "metrics.jsonl"
DATA_REPORT_FILE = "data_report.json"
LOG_FILE = "train.log"
SUMMARY_FILE = "summary.json"
EVAL_FILE = "eval.json"
LR_SEARCH_FILE = "lr_search.json"
JOB_FILE = "job.json"
STOP_FILE = "STOP"
PUBLIC_FILE = "PUBLIC"
ADAPTER_DIR = "adapter"
CHECKPOINTS_DIR = "checkpoints"
CHECKPOINT_PREFIX = "checkpoint-"
CHECKPOINT_MARKER = "denselora_checkpoint.json"  # written last into a checkpoint: it lists the files and sizes
TRACKERS_DIR = "trackers"  # what experiment trackers write locally: tensorboard/, wandb/, mlruns/
# What a finished training leaves besides its adapter: the files a Hugging Face Jobs job hands back.
RESULT_FILES = (CONFIG_FILE, STATUS_FILE, METRICS_FILE, LOG_FILE, DATA_REPORT_FILE, SUMMARY_FILE)

# A PEFT adapter folder (a run's adapter/, each checkpoint): its config, and its weights in either format.
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
_MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit on the header


class RunError(StudioError, RuntimeError):
    """A run cannot be created, found, started or stopped; the message says why and what to do."""


def runs_dir() -> Path:
    """Where runs live: $DENSELORA_RUNS, else ./runs."""
    return Path(os.environ.get("DENSELORA_RUNS", "runs")).resolve()


def write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str), encoding="utf-8")
    os.replace(tmp, path)


def read_json(path: Path, default: Any = None) -> Any:
    """The file's JSON, or ``default`` when it is missing, unreadable or not JSON."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return default


def adapter_weights(folder: Path) -> Path | None:
    """The weights file of the PEFT adapter saved in ``folder``, or None when there is none."""
    return next((folder / name for name in ADAPTER_WEIGHTS if (folder / name).is_file()), None)


def adapter_complete(folder: Path) -> bool:
    """Whether ``folder`` holds a whole PEFT adapter (adapter_problem finds nothing wrong): the one rule for "this
    run has a final adapter", for chat, evaluation, publishing and the app."""
    return adapter_problem(folder) is None


def adapter_problem(folder: Path) -> str | None:
    """Why the PEFT adapter in ``folder`` cannot be used, or None when it is whole: its config is a JSON object that
    names a PEFT method and a rank; its weights are there, and safetensors weights are complete (every tensor the
    header lists lies inside the file) and shaped for that rank. Reads the config and the weights' header only."""
    config = read_json(folder / ADAPTER_CONFIG)
    if not isinstance(config, dict) or not config.get("peft_type"):
        return f"{ADAPTER_CONFIG} is missing or is not a PEFT adapter config"
    weights = adapter_weights(folder)
    if weights is None:
        return f"the weights ({' or '.join(ADAPTER_WEIGHTS)}) are missing"
    if weights.suffix != ".safetensors":
        return None  # a pickle: only loading it can tell
    try:
        with open(weights, "rb") as fh:
            size = int.from_bytes(fh.read(8), "little")
            if not 0 < size <= _MAX_HEADER:
                return f"{weights.name} is not a safetensors file (no header)"
            header = json.loads(fh.read(size))
        length = weights.stat().st_size
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        return f"{weights.name} cannot be read ({err})"
    tensors = {k: v for k, v in header.items() if k != "__metadata__"} if isinstance(header, dict) else {}
    if not tensors:
        return f"{weights.name} holds no tensors"
    end = 8 + size + max(int(t.get("data_offsets", [0, 0])[1]) for t in tensors.values())
    if length < end:
        return f"{weights.name} is cut short ({length:,} of {end:,} bytes): it was not saved whole"
    ranks = {config.get("r"), *(config.get("rank_pattern") or {}).values()}
    misshaped = [name for name, t in tensors.items() if len(t.get("shape", [])) == 2 and not ranks & set(t["shape"])]
    if misshaped:
        name = misshaped[0]
        return (f"{weights.name} does not fit {ADAPTER_CONFIG}: {name} has shape {tensors[name]['shape']}, with no "
                f"side of rank {config.get('r')}")
    return None


def mark_checkpoint_complete(folder: Path) -> None:
    """Record that ``folder`` is a whole checkpoint: its files and their sizes, written last and atomically."""
    files = {p.name: p.stat().st_size for p in folder.iterdir() if p.is_file() and p.name != CHECKPOINT_MARKER}
    write_json_atomic(folder / CHECKPOINT_MARKER, {"files": files})


def checkpoint_complete(folder: Path) -> bool:
    """A checkpoint counts only when its marker lists files that are all still there, with their sizes: a kill
    while it was written (no marker) or while it was deleted (files missing) leaves a partial one."""
    marker = read_json(folder / CHECKPOINT_MARKER)
    files = marker.get("files") if isinstance(marker, dict) else None
    if not isinstance(files, dict) or ADAPTER_CONFIG not in files:
        return False
    try:
        return all((folder / name).stat().st_size == size for name, size in files.items())
    except OSError:
        return False


def checkpoint_step(folder: Path) -> int | None:
    """The step a checkpoint folder was saved at, or None for a folder that is not one."""
    step = folder.name.removeprefix(CHECKPOINT_PREFIX)
    return int(step) if folder.name.startswith(CHECKPOINT_PREFIX) and step.isdigit() else None


def finite_number(value: Any) -> bool:
    """Whether a metrics value is a real number to show or compute with (not text, not a flag, not NaN or inf)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def safe_name(text: str) -> str:
    """A run name that can only ever be one folder name: no separators, no '..', no leading dot."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", text.strip()).strip("-.")
    return name[:64] or "run"


RUN_FILES = (CONFIG_FILE, STATUS_FILE)  # a folder holding either is a run (a damaged one, maybe)
