"""How every tab words a problem for the page: a warning line, and the caller's refusal for an action."""

from __future__ import annotations

from typing import Any

import gradio as gr

from .. import access
from ..access import AccessError, Action


def warn(message: Any) -> str:
    """A problem (an exception's message or a sentence) as the one-line warning the tabs show."""
    return f"⚠️ {message}"


def refusal(profile: gr.OAuthProfile | None, action: Action) -> str | None:
    """Why the caller may not do ``action`` here, as a warning; None when they may."""
    try:
        access.require(access.identify(profile), action)
    except AccessError as err:
        return warn(err)
    return None
