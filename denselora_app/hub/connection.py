"""Whether the Hugging Face Hub can be reached, and the cached copy to use when it cannot.
"""

from __future__ import annotations

import logging
import os

from huggingface_hub import constants as hub_constants
from huggingface_hub import get_session, snapshot_download
from huggingface_hub.errors import LocalEntryNotFoundError

log = logging.getLogger(__name__)


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
