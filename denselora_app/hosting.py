"""Where the studio runs: on a Hugging Face Space or not. Every front end asks here, never the environment."""

from __future__ import annotations

import os


def on_space() -> bool:
    """True when running as a Hugging Face Space (the Hub sets SPACE_ID in every Space's environment)."""
    return bool(os.environ.get("SPACE_ID"))
