"""The studio's shared rules, each decided here once and nowhere else (no torch import: the CLI and the app's first
page read them cheaply):

* the allowed values of every choice a user makes (methods, activations, data formats and file types, dtypes, ...);
* whether a name is a local path or a Hugging Face Hub id (models, datasets, adapters);
* what to do when the Hub does not answer (use the local Hugging Face cache, or say why not, at once).

The standalone ``denselora/`` package that published adapters carry keeps its own copies of the activations and
the default target modules (it must import nothing from the studio); tests/test_rules.py asserts the copies agree.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from huggingface_hub import constants as hub_constants
from huggingface_hub import get_session, snapshot_download
from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError
from huggingface_hub.utils import validate_repo_id

log = logging.getLogger(__name__)

# ---- allowed values ------------------------------------------------------------------------------------------------

METHODS: tuple[str, ...] = ("denselora", "lora")
ACTIVATIONS: tuple[str, ...] = ("gelu", "silu", "identity")
SCHEDULERS: tuple[str, ...] = ("linear", "cosine", "constant", "constant_with_warmup")
DATA_FORMATS: tuple[str, ...] = ("alpaca", "messages", "sharegpt", "prompt_completion", "text")  # row layouts
DATA_FILE_TYPES: tuple[str, ...] = (".jsonl", ".json", ".csv", ".parquet", ".txt")  # what data.py reads
DTYPES: tuple[str, ...] = ("float32", "bfloat16", "float16")  # besides "auto"
QUANTIZATIONS: tuple[str, ...] = ("none", "4bit", "8bit")  # of the frozen base, with bitsandbytes
DEVICE_KINDS: tuple[str, ...] = ("auto", "cpu", "cuda", "mps")  # and "cuda:N"
DEVICE_PATTERN = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
# The paper adapts these five projections of every decoder layer.
PAPER_TARGETS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "up_proj", "down_proj")

# ---- path or Hub id ------------------------------------------------------------------------------------------------

# A file extension starts with a letter: "notes.xlsx" is a (missing) file, "owner/Model-2.5" a Hub id.
_EXTENSION = re.compile(r"\.[A-Za-z][A-Za-z0-9]{0,7}$")
_WINDOWS_DRIVE = re.compile(r"^[A-Za-z]:[\\/]")


def looks_like_path(name: str) -> bool:
    """True when ``name`` is written as a path (whether or not it exists): it starts like one (/ . ~ \\ or a
    drive letter), has more than one '/', or ends with a file extension. Such a name is never sent to the Hub."""
    name = str(name).strip()
    return bool(
        name.startswith(("/", ".", "~", "\\"))
        or "\\" in name
        or _WINDOWS_DRIVE.match(name)
        or name.count("/") > 1
        or _EXTENSION.search(name)
    )


def hub_id(name: str, namespaced: bool = False) -> str | None:
    """``name`` as a Hugging Face Hub repository id, or None when it names a local file or folder (existing or
    written as a path) or is not a valid id. The one rule for models, datasets and adapters alike; ``namespaced``
    also requires an owner (``owner/name``), as every repository made since the Hub's early models has."""
    name = str(name).strip()
    if not name or looks_like_path(name) or Path(name).expanduser().exists() or (namespaced and "/" not in name):
        return None
    try:
        validate_repo_id(name)
    except HFValidationError:
        return None
    return name


# ---- the Hub when it does not answer ---------------------------------------------------------------------------------

# One short request decides whether the Hub is reachable; huggingface_hub's own calls retry for ~25 s per file.
HUB_PROBE_TIMEOUT_S = 5.0


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def hub_unreachable_reason() -> str | None:
    """Why the Hub cannot be used right now, or None when it answers."""
    # huggingface_hub reads HF_HUB_OFFLINE once, at import, so the environment is checked here too.
    if _env_flag("HF_HUB_OFFLINE") or _env_flag("TRANSFORMERS_OFFLINE") or hub_constants.HF_HUB_OFFLINE:
        return "offline mode is on: HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE is set"
    try:
        get_session().head(hub_constants.ENDPOINT, timeout=HUB_PROBE_TIMEOUT_S)
    except Exception as error:  # any failure to get an HTTP answer (DNS, refused, timeout, proxy) means unreachable
        return f"{hub_constants.ENDPOINT} did not answer: {error}"
    return None


class HubUnreachable(Exception):
    """The Hub does not answer and the local Hugging Face cache has no copy of the repository; ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def cached_copy_if_offline(repo_id: str, repo_type: str = "model") -> str | None:
    """None when the Hub answers. When it does not: the folder of ``repo_id`` in the local Hugging Face cache, or
    HubUnreachable when there is none (asked up front, so offline use never waits on the Hub client's retries)."""
    reason = hub_unreachable_reason()
    if reason is None:
        return None
    try:
        folder = snapshot_download(repo_id, repo_type=repo_type, local_files_only=True)
    except LocalEntryNotFoundError:
        raise HubUnreachable(reason) from None
    log.warning("The Hugging Face Hub is unreachable (%s); using the cached copy of %s.", reason, repo_id)
    return folder
