"""Who is calling the web app, and what they may do: the one decision every endpoint asks for.

Off a Hugging Face Space everyone is the owner: the studio on your own machine is yours, and nothing here changes
what it does. On a Space the owner is the Space's namespace (``hosting.space_owner()``): the signed-in user of that
name, or a signed-in member of that organisation (a member with the read-only role excepted: they cannot change the
Space either). Everyone else (signed in or not) is a visitor, who may see the runs the owner marked public
(``Run.is_public``) and chat with their final adapters, and nothing else: training, stopping, deleting, uploading,
previewing data, presets, evaluating, publishing and the chat's model settings all spend the owner's compute or
change the owner's studio.

Who the caller is comes only from the OAuth identity that gradio keeps server-side: a handler parameter typed
``gr.OAuthProfile | None`` is filled from the signed session cookie (never from the request's data), and that
profile is what ``identify`` reads. Its ``orgs`` list is present when the Space asks for the ``read-orgs`` scope.

Server paths: on a Space a caller's data is a file they uploaded (kept apart per user in runs/uploads/<user>/) or a
Hugging Face Hub dataset name, and a base model is a Hub id or the embedded default. A typed path on the server's
disk, or a file handed to an endpoint that gradio did not receive as an upload, is refused (``check_data``,
``check_model``, ``check_uploaded``).
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from denselora_app.config import EMBEDDED_MODEL, SAMPLE_DATA, RunConfig, StudioError
from denselora_app.hub.hosting import on_space, space_owner
from denselora_app.rules import looks_like_path, on_disk
from denselora_app.runs import Run, RunError, list_runs, resolve_run, runs_dir, safe_name, typed_folder

READ_ONLY_ROLE = "read"  # an organisation member with this role cannot write to the organisation's repositories


class AccessError(StudioError, PermissionError):
    """The caller may not do this here; the message says why and what to do instead."""


class Action(enum.Enum):
    """What an endpoint does, as far as who may do it is concerned."""

    TRAIN = "Training"  # start, stop, delete, mark public; upload and preview data; check models; presets
    EVALUATE = "Evaluating"
    PUBLISH = "Publishing"
    CHAT_SETTINGS = "Changing the chat's model settings"  # they reload the one model every visitor chats with
    VIEW = "Seeing a run"  # everyone; visitors only public runs
    CHAT = "Chatting"  # with a run's final adapter: everyone; visitors only public runs


@dataclass(frozen=True)
class Caller:
    username: str | None  # the signed-in Hugging Face user name; None when not signed in
    owner: bool  # may do everything

    @property
    def signed_in(self) -> bool:
        return self.username is not None


def identify(profile: Mapping[str, Any] | None) -> Caller:
    """The caller described by gradio's OAuth profile (the session's OAuth userinfo; None when not signed in)."""
    username = (str(profile.get("preferred_username") or "") or None) if profile else None
    if not on_space():
        return Caller(username, owner=True)
    if username is None:
        return Caller(None, owner=False)
    owner = (space_owner() or "").casefold()
    if username.casefold() == owner:
        return Caller(username, owner=True)
    orgs = profile.get("orgs") if profile else None
    member = any(isinstance(org, Mapping) and str(org.get("preferred_username") or "").casefold() == owner
                 and org.get("roleInOrg") != READ_ONLY_ROLE for org in orgs or [])
    return Caller(username, owner=member)


def allowed(who: Caller, action: Action, run: Run | None = None) -> bool:
    """Whether ``who`` may do ``action`` (to ``run``, for VIEW and CHAT: None there means no run of this studio)."""
    if who.owner:
        return True
    if action in (Action.VIEW, Action.CHAT):
        return run is not None and run.is_public()
    return False


def seen_by_anyone(run: Run) -> bool:
    """Whether every caller, signed in or not, may see ``run``: what a display shared by all callers (the chat's
    training notice) may name. Off a Space every run; on one, the public runs."""
    return allowed(identify(None), Action.VIEW, run)


def require(who: Caller, action: Action, run: Run | None = None) -> None:
    """AccessError, saying what to do instead, unless ``who`` may do ``action`` (to ``run``)."""
    if allowed(who, action, run):
        return
    owner = space_owner()
    if action in (Action.VIEW, Action.CHAT):
        raise AccessError(not_public(owner))
    if who.signed_in:
        raise AccessError(f"{action.value} on this Space is for its owner, {owner}; you are signed in as "
                          f"{who.username}. Duplicate this Space (the Duplicate button at the top) to train on your "
                          "own hardware.")
    raise AccessError(f"{action.value} on this Space is for its owner, {owner}. Sign in with the Hugging Face "
                      "button at the top if that is you; otherwise duplicate this Space (the Duplicate button at "
                      "the top) to train on your own hardware.")


def not_public(owner: str | None) -> str:
    # One answer for a private run, a missing one and a path: a visitor learns nothing of which runs exist or where.
    return (f"That is not one of this Space's public runs: visitors see, and chat with, only the runs its owner, "
            f"{owner}, made public. Choose one from the list.")


def visible_run(who: Caller, ref: str) -> Run:
    """The run ``ref`` names (``runs.resolve_run``), if ``who`` may see it. The owner gets resolve_run's own
    RunError; a visitor gets the same AccessError for a private run as for a missing one."""
    try:
        run = resolve_run(ref)
    except RunError:
        if who.owner:
            raise
        run = None
    require(who, Action.VIEW, run)
    assert run is not None  # require lets a visitor through only to a public run
    return run


def shown_to(who: Caller, text: str) -> str:
    """``text`` (a run's log, an error) as ``who`` may see it: for a visitor, the server's folders (the runs folder,
    the working directory, the home folder) written as ``runs``, ``.`` and ``~``."""
    if who.owner:
        return text
    for folder, shown in ((runs_dir(), "runs"), (Path.cwd(), "."), (Path.home(), "~")):
        for spelled in dict.fromkeys((str(folder.resolve()), str(folder))):
            if spelled.strip("/"):  # "/" itself (a working directory at the root) is in every path: left alone
                # the whole folder name only: /home/user, not the start of /home/username
                text = re.sub(re.escape(spelled) + r"(?![\w.-])", shown, text)
    return text


def visible_runs(who: Caller) -> list[Run]:
    """The runs ``who`` may see, newest first: all of them for the owner, the public ones for a visitor."""
    return [run for run in list_runs() if allowed(who, Action.VIEW, run)]


def run_of_adapter(adapter: str) -> Run | None:
    """The run whose final adapter ``adapter`` names (its run id, or its adapter folder as the Chat tab lists it),
    or None: a checkpoint, a folder outside the runs, a Hub id."""
    text = adapter.strip()
    if not text:
        return None
    typed = typed_folder(text) if looks_like_path(text) else None
    target = typed.resolve() if typed is not None and on_disk(str(typed)) else None
    return next((run for run in list_runs()
                 if text == run.id or (target is not None and target == run.adapter_dir.resolve())), None)


def may_chat(who: Caller, adapter: str) -> bool:
    """Whether ``who`` may load ``adapter`` into the chat: the owner any adapter, a visitor only the final adapter
    of a public run."""
    return who.owner or allowed(who, Action.CHAT, run_of_adapter(adapter))


def require_chat(who: Caller, adapter: str) -> None:
    """AccessError, saying why, unless ``may_chat``."""
    if not may_chat(who, adapter):
        require(who, Action.CHAT, run_of_adapter(adapter))


# ---- no server path from a caller -----------------------------------------------------------------------------------


def uploads_dir(who: Caller) -> Path:
    """Where ``who``'s uploaded data files are kept: runs/uploads/, and on a Space runs/uploads/<user>/, so that
    callers' uploads stay apart."""
    root = runs_dir() / "uploads"
    if not on_space():
        return root
    if who.username is None:
        raise AccessError("Sign in with the Hugging Face button at the top to upload data.")
    return root / safe_name(who.username)


def _server_path(text: str) -> bool:
    # data.read_source's and models' own rule: an existing path, or a name written as one, is read from the disk;
    # anything else is a Hub name.
    return looks_like_path(text) or on_disk(text)


def check_data(who: Caller, data: str) -> None:
    """On a Space: AccessError unless ``data`` is the shipped sample, a Hub dataset name, or a file in ``who``'s own
    uploads."""
    text = data.strip()
    if not on_space() or not text or text == SAMPLE_DATA or not _server_path(text):
        return
    if who.signed_in and Path(text).expanduser().resolve().is_relative_to(uploads_dir(who).resolve()):
        return
    raise AccessError(f"On this Space, training data is a file you upload or a Hugging Face Hub dataset name "
                      f"(owner/name); '{text}' is a path on the Space's disk, which is not accepted. Upload the file "
                      "instead.")


def check_model(model: str) -> None:
    """On a Space: AccessError when ``model`` names a path on the server (a Hub id or the embedded default only)."""
    text = model.strip()
    if not on_space() or text == EMBEDDED_MODEL or not _server_path(text):
        return
    raise AccessError(f"On this Space, the base model is a Hugging Face Hub model id (owner/name) or the embedded "
                      f"default '{EMBEDDED_MODEL}'; '{text}' is a path on the Space's disk, which is not accepted.")


def check_config(who: Caller, cfg: RunConfig) -> None:
    """check_model and check_data for what a run configuration reads."""
    check_model(cfg.model)
    check_data(who, cfg.data)


def check_uploaded(path: str | None) -> None:
    """On a Space: AccessError unless ``path`` (a file an endpoint received) is in gradio's upload folder, i.e. a
    file a caller uploaded, never one already on the server. gradio refuses other paths itself when it receives
    them; this holds the rule here too, whatever reaches the handler."""
    if not on_space() or not path:
        return
    from gradio.utils import get_upload_folder  # the web app's own rule; gradio is loaded wherever this is called

    if Path(path).resolve().is_relative_to(Path(get_upload_folder()).resolve()):
        return
    raise AccessError(f"'{Path(path).name}' was not uploaded through this page: on this Space, files come only "
                      "from your uploads.")
