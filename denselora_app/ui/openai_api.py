"""The studio's own server answers the OpenAI API at /v1 too, from the Chat tab's engine (one copy of the base model),
and the Chat tab's "Use it from your code" panel says how to call it.

    demo.launch(prevent_thread_lock=True); mount(demo.app); demo.block_thread()      # what app.py does

Who may call it: on a Hugging Face Space only its owner, with a Hugging Face token (serving/server.py
``space_owner_key``; anonymous calls get 401). Off a Space, ``DENSELORA_API_KEY`` sets a key clients must send; without
one the API answers only when the app listens on localhost (GRADIO_SERVER_NAME): on another address it refuses every
call, saying to set the key. The API and torch load on the first /v1 call, so the first page stays fast.
"""

from __future__ import annotations

import os
import threading
from typing import Any

import anyio
from starlette.routing import Mount
from starlette.types import ASGIApp, Receive, Scope, Send

from denselora_app.hub.hosting import on_space, space_id

KEY_VARIABLE = "DENSELORA_API_KEY"
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


def key_check(whoami: Any = None) -> Any:
    """How /v1 checks a key here (see the module docstring): a KeyCheck, None for none, or the string of why every
    call is refused. ``whoami`` stands in for the Hub's in tests."""
    from denselora_app.serving.server import fixed_key, space_owner_key

    if on_space():
        return space_owner_key(whoami)
    if key := os.environ.get(KEY_VARIABLE):
        return fixed_key(key)
    host = os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1")
    if host not in LOCAL_HOSTS:
        return (f"The app listens on {host}, so its API needs a key: restart it with {KEY_VARIABLE}=KEY set, and "
                "send that key as the client's API key.")
    return None


class _LazyApi:
    """The /v1 app, built on its first request (torch and the engine load then, not with the first page)."""

    def __init__(self, whoami: Any = None) -> None:
        self._whoami = whoami
        self._app: ASGIApp | None = None
        self._lock = threading.Lock()

    def _build(self) -> ASGIApp:
        from denselora_app.serving.api import create_app, engine_catalog
        from denselora_app.serving.schema import ApiError, ErrorType
        from denselora_app.ui import chat_tab

        engine = chat_tab.engine()
        check = key_check(self._whoami)
        if isinstance(check, str):
            refusal = check

            def check(token: str) -> bool:
                raise ApiError(401, refusal, ErrorType.AUTHENTICATION, code="api_key_required")
        return create_app(engine, engine_catalog(engine), check_key=check)

    def _built(self) -> ASGIApp:
        with self._lock:
            if self._app is None:
                self._app = self._build()
            return self._app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        app = self._app or await anyio.to_thread.run_sync(self._built)  # seconds of imports, off the event loop
        await app(scope, receive, send)


def mount(app: Any, whoami: Any = None) -> None:
    """Serve /v1 on the app's own FastAPI app, ahead of gradio's routes."""
    app.router.routes.insert(0, Mount("/v1", app=_LazyApi(whoami)))


def code_panel(base_url: str, models: list[str]) -> str:
    """The "Use it from your code" panel: the base URL, the model names, a curl line and an openai snippet."""
    url = base_url.rstrip("/") + "/v1"
    if on_space():
        key, where = "$HF_TOKEN", f"a Hugging Face token of this Space's owner ({space_id()})"
    elif os.environ.get(KEY_VARIABLE):
        key, where = f"${KEY_VARIABLE}", f"the key the app was started with ({KEY_VARIABLE})"
    else:
        key, where = "none", "any text (the app listens on this machine only)"
    if not models:
        return f"Base URL: `{url}`. Load an adapter above: it is then served here, next to its base model."
    model = models[-1]
    names = ", ".join(f"`{m}`" for m in models)
    python_key = f'os.environ["{key[1:]}"]' if key.startswith("$") else f'"{key}"'
    return f"""Base URL: `{url}` · models: {names} · API key: {where}

```bash
curl {url}/chat/completions -H "Authorization: Bearer {key}" -H "Content-Type: application/json" \\
  -d '{{"model": "{model}", "messages": [{{"role": "user", "content": "Hello!"}}]}}'
```

```python
import os
from openai import OpenAI

client = OpenAI(base_url="{url}", api_key={python_key})
reply = client.chat.completions.create(model="{model}", messages=[{{"role": "user", "content": "Hello!"}}])
print(reply.choices[0].message.content)
```"""
