"""``python -m denselora_app serve``: one base model, its adapters, the OpenAI API on one port; and who may call it.

    server = Server.load(["20250101-120000-quickstart"], ServeOptions(port=8000, api_key="sk-..."))
    server.run()                                   # uvicorn, until Ctrl-C

Every adapter is loaded onto one copy of the base (the engine's PeftModel); an adapter trained on another base is
refused before anything loads: two bases would need two models in memory, and serving one base is what keeps an
adapter's cost small. The base is served too, under its own name, so a client can compare.

Keys: off a Space, ``--api-key`` sets the one key (``fixed_key``); binding to anything but localhost without one is
refused unless ``--no-api-key`` says it is meant. On a Space (the app's /v1) only the owner's Hugging Face tokens
are accepted (``space_owner_key``): the token's account, as ``huggingface_hub.whoami`` reports it, must be the one
``hub.access.identify`` calls the owner; answers are cached so a client's requests cost one Hub call.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from denselora_app.config import StudioError
from denselora_app.hub import access
from denselora_app.serving.adapters import AdapterRef, resolve_adapter
from denselora_app.serving.api import KeyCheck, Limits, create_app, engine_catalog
from denselora_app.serving.chat import ChatEngine
from denselora_app.serving.generation import MAX_QUEUE

log = logging.getLogger(__name__)

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
KEY_CACHE_SECONDS = 600.0


class ServeError(StudioError, ValueError):
    """A serve command that cannot start; the message says what to change."""


@dataclass(frozen=True)
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    open_without_key: bool = False  # --no-api-key: serve a non-local address to anyone, as asked
    names: tuple[str, ...] = ()  # served names of the adapters, in order (default: their labels)
    device: str = "auto"
    quantization: str | None = None
    max_queue: int = MAX_QUEUE
    limits: Limits = field(default_factory=Limits)

    def problem(self) -> str | None:
        if self.host not in LOCAL_HOSTS and not self.api_key and not self.open_without_key:
            return (f"Serving on {self.host} lets anyone who can reach this machine use the model: set a key with "
                    "--api-key KEY (clients send it as their API key), or pass --no-api-key if that is what you "
                    "want.")
        if not 0 < self.port < 65536:
            return f"--port must be between 1 and 65535, got {self.port}."
        if self.max_queue < 1:
            return f"--max-queue must be at least 1, got {self.max_queue}."
        if self.limits.max_body_bytes < 1 or not self.limits.timeout > 0:
            return "--max-body-mb and --timeout must be more than 0."
        if self.limits.max_tokens is not None and self.limits.max_tokens < 1:
            return f"--max-tokens must be at least 1, got {self.limits.max_tokens}."
        return None


def fixed_key(key: str) -> KeyCheck:
    """Accepts exactly ``key`` (compared in constant time)."""
    expected = key.encode()
    return lambda token: hmac.compare_digest(token.encode(), expected)


def space_owner_key(whoami: Callable[[str], dict[str, Any]] | None = None) -> KeyCheck:
    """Accepts a Hugging Face token of the Space's owner (or a member of the owning organisation who may write to
    it), as ``hub.access.identify`` decides; ``whoami`` (default ``huggingface_hub.whoami``) is injectable for
    tests. Answers are cached per token for KEY_CACHE_SECONDS; a token the Hub refuses is simply not accepted."""
    if whoami is None:
        from huggingface_hub import whoami as hub_whoami

        def whoami(token: str) -> dict[str, Any]:
            return hub_whoami(token=token)

    cache: dict[str, tuple[float, bool]] = {}
    lock = threading.Lock()

    def check(token: str) -> bool:
        digest = hashlib.sha256(token.encode()).hexdigest()
        with lock:
            known = cache.get(digest)
        if known and time.monotonic() - known[0] < KEY_CACHE_SECONDS:
            return known[1]
        try:
            account = whoami(token)
        except Exception as err:  # noqa: BLE001  (an invalid token, or the Hub unreachable: not accepted now)
            log.info("An API key was refused: %s", type(err).__name__)
            return False
        profile = {"preferred_username": account.get("name"),
                   "orgs": [{"preferred_username": org.get("name"), "roleInOrg": org.get("roleInOrg")}
                            for org in account.get("orgs") or []]}
        accepted = access.identify(profile).owner
        with lock:
            cache[digest] = (time.monotonic(), accepted)
        return accepted

    return check


class Server:
    """The loaded engine and its API app, ready to run."""

    def __init__(self, engine: ChatEngine, names: dict[str, str], options: ServeOptions) -> None:
        self.engine = engine
        self.options = options
        engine.decoder.max_queue = options.max_queue
        check = fixed_key(options.api_key) if options.api_key else None
        self.catalog = engine_catalog(engine, names)
        self.api = create_app(engine, self.catalog, check_key=check, limits=options.limits)

    @classmethod
    def load(cls, references: list[str], options: ServeOptions, runs_root: Any = None) -> Server:
        """Resolve every adapter (runs, adapter folders, Hub ids), check they share one base, load them."""
        if problem := options.problem():
            raise ServeError(problem)
        if options.names and len(options.names) != len(references):
            raise ServeError(f"--name was given {len(options.names)} times for {len(references)} adapters: give "
                             "one name per adapter, in the same order, or none.")
        refs = [resolve_adapter(ref, None, runs_root, outside_root=True) for ref in references]
        _one_base(refs)
        engine = ChatEngine(device=options.device, quantization=options.quantization, runs_root=runs_root)
        names: dict[str, str] = {}
        for n, ref in enumerate(refs):
            engine.select(ref)
            served = options.names[n] if options.names else ref.label
            if served in names.values() or served == engine.base_model:
                raise ServeError(f"Two models would be served as {served!r}: give each adapter its own --name.")
            names[engine.adapter_name(ref)] = served
        return cls(engine, names, options)

    def app(self) -> Any:
        """The whole server: the API at /v1, and /health (the requests waiting or decoding: for probes and load
        balancers, as vLLM's /health)."""
        from fastapi import FastAPI

        root = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
        root.add_api_route("/health", lambda: {"status": "ok", "requests": self.engine.decoder.load}, methods=["GET"])
        root.mount("/v1", self.api)
        return root

    def run(self) -> None:
        import uvicorn

        uvicorn.run(self.app(), host=self.options.host, port=self.options.port, log_level="warning",
                    timeout_graceful_shutdown=5)


def _one_base(refs: list[AdapterRef]) -> None:
    bases = {ref.base_model for ref in refs}
    if len(bases) > 1:
        listed = "; ".join(f"{ref.label}: {ref.base_model}" for ref in refs)
        raise ServeError(f"These adapters were trained on different base models ({listed}). One server holds one "
                         "base model: serve each base's adapters with a serve command of their own, on another "
                         "--port.")
