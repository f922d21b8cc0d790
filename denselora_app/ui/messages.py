"""How every tab words a problem for the page: a warning line, and the caller's refusal for an action."""

from __future__ import annotations

from typing import Any

import gradio as gr

from denselora_app.hub import access
from denselora_app.hub.access import AccessError, Action


def warn(message: Any) -> str:
    """A problem (an exception's message or a sentence) as the one-line warning the tabs show."""
    return f"⚠️ {message}"


def require(profile: gr.OAuthProfile | None, action: Action) -> access.Caller:
    """The caller, who must be allowed to do ``action`` here; AccessError otherwise, for event functions that report
    it together with their other errors."""
    who = access.identify(profile)
    access.require(who, action)
    return who


def refusal(profile: gr.OAuthProfile | None, action: Action) -> str | None:
    """Why the caller may not do ``action`` here, as a warning; None when they may."""
    try:
        require(profile, action)
    except AccessError as err:
        return warn(err)
    return None
