"""The Hugging Face account behind a token: finding the token, what it may write, and Hub errors in plain words.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from huggingface_hub import HfApi, get_token
from huggingface_hub.errors import HfHubHTTPError

from denselora_app.config import StudioError
from denselora_app.hub.hosting import on_space

try:  # huggingface_hub 2.x speaks HTTP through httpx2, 1.x through httpx
    from httpx2 import TransportError
except ImportError:  # pragma: no cover - depends on the installed huggingface_hub
    from httpx import TransportError
from denselora_app.rules import hub_id_problem

log = logging.getLogger(__name__)


class HubError(StudioError, RuntimeError):
    """Something asked of the Hugging Face Hub cannot be done; the message says why and what to do, and never
    contains the token."""


class PublishError(HubError):
    """Publishing cannot go on."""


@dataclass(frozen=True)
class HubAccount:
    """Who a token belongs to, and the organizations where that user can create repositories."""

    name: str
    orgs: tuple[str, ...]

    @property
    def namespaces(self) -> tuple[str, ...]:
        return (self.name, *self.orgs)


def resolve_token(token: str | None = None) -> str:
    """The token to publish with: the one passed in (e.g. the Space's OAuth token), else HF_TOKEN, else the login.

    Running as a Hugging Face Space (SPACE_ID is set), only a token passed in counts: HF_TOKEN there is the Space
    owner's secret, and a visitor must never publish with it.
    """
    if on_space():
        if token and token.strip():
            return token.strip()
        raise PublishError("Sign in with the Hugging Face button first: on a Space, publishing uses your own "
                           "account (with write access), never the Space's token.")
    for source in (lambda: token, lambda: os.environ.get("HF_TOKEN"), get_token):  # lazily: the login is last
        candidate = source()
        if candidate and candidate.strip():
            return candidate.strip()
    raise PublishError(
        "No Hugging Face token. Sign in with the Hugging Face button, set the HF_TOKEN environment variable, or run "
        "`hf auth login`; create a token with write access at https://huggingface.co/settings/tokens."
    )


def hub_account(token: str | None = None, api: HfApi | None = None) -> HubAccount:
    """Who the token (see resolve_token) belongs to: e.g. to offer their namespaces for the repository id."""
    token = resolve_token(token)
    with repo_errors("look up the account of", "your token", token):
        return _account((api or HfApi()).whoami(token=token))[0]


def check_write_access(repo_id: str, token: str, api: HfApi | None = None) -> HubAccount:
    """The account behind ``token``, after checking that it may create and write ``repo_id``."""
    check_repo_id(repo_id)
    with repo_errors("check your account's access to", repo_id, token):
        info = (api or HfApi()).whoami(token=token)
    account, read_only_orgs = _account(info)
    namespace = repo_id.split("/")[0]
    if namespace in read_only_orgs:
        raise PublishError(
            f"You have only the 'read' role in the organization '{namespace}', so you cannot publish {repo_id} "
            f"there. Ask an admin of {namespace} for write access, or publish under {account.name}/."
        )
    if namespace not in account.namespaces:
        raise PublishError(
            f"{repo_id} belongs to '{namespace}', which is neither your account ({account.name}) nor one of your "
            f"organizations ({', '.join(account.orgs) or 'none'}). Choose a repository id such as "
            f"{account.name}/{repo_id.split('/')[1]}."
        )
    _check_token_can_write(info, namespace)
    return account


def _account(info: dict[str, Any]) -> tuple[HubAccount, set[str]]:
    orgs = [org for org in info.get("orgs") or [] if isinstance(org, dict) and org.get("name")]
    read_only = {org["name"] for org in orgs if org.get("roleInOrg") == "read"}
    writable = tuple(org["name"] for org in orgs if org["name"] not in read_only)
    return HubAccount(name=str(info.get("name", "")), orgs=writable), read_only


def _check_token_can_write(info: dict[str, Any], namespace: str) -> None:
    """Refuse tokens whose role or fine-grained permissions cannot write repositories in ``namespace``.

    whoami-v2 describes an access token as auth.accessToken.role: "read", "write" or "fineGrained" (then with
    fineGrained.global and fineGrained.scoped[{entity: {name}, permissions}]). Other shapes (OAuth tokens) are
    left to the Hub, which answers 403, explained by hub_errors, when they cannot write.
    """
    access = ((info.get("auth") or {}).get("accessToken")) or {}
    role = access.get("role")
    create_token = "Create one with write access at https://huggingface.co/settings/tokens and use it instead."
    if role == "read":
        raise PublishError(f"Your Hugging Face token is read-only: it cannot create or upload repositories. "
                           f"{create_token}")
    if role == "fineGrained":
        grants = access.get("fineGrained") or {}
        allowed = "repo.write" in (grants.get("global") or []) or any(
            (scope.get("entity") or {}).get("name") == namespace and "repo.write" in (scope.get("permissions") or [])
            for scope in grants.get("scoped") or []
        )
        if not allowed:
            raise PublishError(
                f"Your fine-grained Hugging Face token has no write access to repositories of '{namespace}'. Edit "
                "its permissions (\"Write access to contents/settings of all repos\" under that user or "
                f"organization) at https://huggingface.co/settings/tokens, or use a token with the 'write' role."
            )


def check_repo_id(repo_id: str) -> None:
    """PublishError unless ``repo_id`` is NAMESPACE/NAME (rules.hub_id_problem)."""
    if problem := hub_id_problem(repo_id, namespaced=True):
        raise PublishError(f"'{repo_id}' is not a valid Hugging Face repository id to publish to: {problem}.")


def _redact(text: str, token: str | None) -> str:
    return text.replace(token, "hf_***") if token else text


@contextmanager
def hub_errors(action: str, *, token: str | None, needs: str, error: type[HubError] = HubError,
               kept: str = "") -> Iterator[None]:
    """What huggingface_hub raises while it does ``action`` (e.g. "upload to alice/x"), as an ``error`` that says
    what to do, for every part that talks to the Hub: ``needs`` is what a refused token lacks; ``kept`` is said
    after each message (say, where the local files are). The token never appears in a message."""
    try:
        yield
    except HubError:
        raise
    except HfHubHTTPError as hub_error:
        status = hub_error.response.status_code if hub_error.response is not None else None
        if status == 401:
            message = ("The Hugging Face Hub rejected your token (invalid or expired): sign in again, or set a "
                       "valid HF_TOKEN.")
        elif status == 402:
            message = ("The Hugging Face Hub needs a positive credit balance on your account for this: add credits "
                       "or a payment method at https://huggingface.co/settings/billing, then try again.")
        elif status in (403, 404):  # the Hub answers 404 for repositories a token may not see
            message = f"Your token is not allowed to {action}: {needs}."
        else:
            message = f"The Hugging Face Hub refused to {action}: {_redact(str(hub_error), token)}"
        raise error(message + kept) from hub_error
    except (TransportError, ConnectionError, TimeoutError) as hub_error:  # ConnectionError covers HF_HUB_OFFLINE
        raise error(
            f"Could not reach the Hugging Face Hub to {action} ({type(hub_error).__name__}). Check your internet "
            f"connection (and that HF_HUB_OFFLINE is not set), then try again.{kept}"
        ) from hub_error
    except Exception as hub_error:  # noqa: BLE001  (hf_xet and friends raise their own types; all are explained)
        raise error(f"Could not {action}: {_redact(str(hub_error), token)}.{kept}") from hub_error


def repo_errors(action: str, repo_id: str, token: str | None, folder: Path | None = None):
    """``hub_errors`` while publishing: ``action`` on ``repo_id`` needs write access to its namespace; ``folder``, the
    local files the user keeps for a retry."""
    kept = (f" Nothing was deleted: the files are in {folder}; publish again to retry, or upload that folder by hand."
            if folder else "")
    needs = (f"it needs write access to '{repo_id.split('/')[0]}'. Use a token with the 'write' role, or another "
             "repository id")
    return hub_errors(f"{action} {repo_id}", token=token, needs=needs, error=PublishError, kept=kept)
