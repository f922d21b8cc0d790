"""What the web server enforces before any event function runs: how large an upload may be, who may upload on a
Space, and how long gradio keeps its temporary copies of uploads. ``app.py`` launches with ``launch_options()``;
``ui/app.py`` builds the Blocks with ``CACHE_CLEANUP``."""

from __future__ import annotations

import json
import os
from typing import Any

from starlette.middleware import Middleware
from starlette.types import ASGIApp, Receive, Scope, Send

from denselora_app.config import StudioError
from denselora_app.hub import access
from denselora_app.hub.hosting import on_space

MAX_UPLOAD_ENV = "DENSELORA_MAX_UPLOAD"
# Training data larger than this is better given as a path or a Hub dataset than sent through a browser.
DEFAULT_MAX_UPLOAD = "1gb"
# Every hour, gradio deletes its temporary files older than a day: an upload used for training was copied to the
# runs folder (ui/loaders.py) when it arrived, so nothing a run needs lives there.
CACHE_CLEANUP = (3600, 24 * 3600)
_UPLOAD_ROUTE = "/gradio_api/upload"


class UploadLimitError(StudioError):
    """DENSELORA_MAX_UPLOAD is not a size."""


def max_upload() -> str:
    """The largest upload accepted, as gradio reads it ("500mb", "2gb", or bytes): DENSELORA_MAX_UPLOAD, else 1 GB."""
    from gradio.utils import _parse_file_size

    value = os.environ.get(MAX_UPLOAD_ENV, "").strip() or DEFAULT_MAX_UPLOAD
    try:
        size = _parse_file_size(value if not value.isdigit() else int(value))
    except (ValueError, TypeError, AttributeError):
        size = None
    if not size or size <= 0:
        raise UploadLimitError(f"{MAX_UPLOAD_ENV}={value[:40]!r} is not a size: write it as a number and a unit, "
                               "e.g. 500mb or 2gb (or a number of bytes).")
    return value


class OwnerUploadsOnly:
    """On a Space, gradio's upload route answers only the owner: a visitor has nothing to upload (training and
    evaluation are the owner's), and so can neither fill the disk nor learn a path of the server from the answer."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].endswith(_UPLOAD_ROUTE) and on_space():
            session = scope.get("session") or {}
            profile = (session.get("oauth_info") or {}).get("userinfo")
            who = access.identify(profile if isinstance(profile, dict) else None)
            try:
                access.require(who, access.Action.TRAIN)  # uploading data is part of training
            except access.AccessError as err:
                await _refuse(send, 403, str(err))
                return
        await self.app(scope, receive, send)


async def _refuse(send: Send, status: int, message: str) -> None:
    body = json.dumps({"detail": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def launch_options() -> dict[str, Any]:
    """The keyword arguments of ``Blocks.launch`` that bound what the server accepts."""
    return {"max_file_size": max_upload(), "app_kwargs": {"middleware": [Middleware(OwnerUploadsOnly)]}}
