"""The OpenAI-compatible API over a ChatEngine: ``/v1/models``, ``/v1/chat/completions``, ``/v1/completions``.

    app = create_app(engine, catalog, check_key=keys.fixed("sk-..."))    # a FastAPI app; mount it at /v1

Served by ``python -m denselora_app serve`` (serving/server.py) and mounted on the studio's own server next to the
Chat tab (ui/app.py), so both answer from the one engine and its one copy of the base model. Every request goes
through the engine's batched decoder; prompts are rendered by the one renderer (serving/prompts.py), as in training.

Every request is bounded: a body over ``Limits.max_body_bytes`` is refused (413), a prompt longer than the model's
context is refused naming the limit (400), ``max_tokens`` is capped by what the context leaves, a full decoder queue
answers 503, and a request past ``Limits.timeout`` ends (504, or an error event in a stream). A streaming client that
disconnects cancels its rows, which leave the batch at the next step. Errors use OpenAI's shape (schema.ApiError).
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from denselora_app.serving.adapters import ChatError
from denselora_app.serving.chat import ChatEngine
from denselora_app.serving.generation import Finish, GenerationError, Handle, QueueFull, Token
from denselora_app.serving.generation import Request as DecodeRequest
from denselora_app.serving.schema import (
    ApiError,
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatDelta,
    ChoiceLogprobs,
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    ErrorType,
    ModelCard,
    ModelList,
    TokenLogprob,
    TopLogprob,
    Usage,
)

log = logging.getLogger(__name__)

KeyCheck = Callable[[str], bool]  # whether a bearer token may use the API


@dataclass(frozen=True)
class ServedModel:
    name: str  # what clients send as "model"
    adapter: str | None  # the adapter's name inside the engine's PeftModel; None: the base model
    base: str  # the base model's name


Catalog = Callable[[], Sequence[ServedModel]]  # the models served now (the app's changes as the Chat tab loads)


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int = 4 * 1024 * 1024
    timeout: float = 600.0  # seconds a request may take, queueing included
    max_tokens: int | None = None  # a server-wide cap on max_tokens (None: the context alone caps it)


def engine_catalog(engine: ChatEngine, names: dict[str, str] | None = None) -> Catalog:
    """The engine's base model and every adapter loaded on it; ``names`` renames adapters (adapter name -> served
    name), otherwise each is served under its label (the run id, folder or Hub id)."""
    def catalog() -> list[ServedModel]:
        base = engine.base_model
        if base is None:
            return []
        served = [ServedModel(base, None, base)]
        for adapter, ref in engine.loaded_adapters().items():
            served.append(ServedModel((names or {}).get(adapter, ref.label), adapter, base))
        return served
    return catalog


def create_app(engine: ChatEngine, catalog: Catalog, *, check_key: KeyCheck | None = None,
               limits: Limits = Limits()) -> ASGIApp:
    """The API as a FastAPI app whose routes are /models, /chat/completions and /completions: mount it at /v1.
    ``check_key`` None serves anyone (localhost); otherwise a request needs ``Authorization: Bearer KEY``."""
    app = FastAPI(title="DenseLoRA Studio OpenAI-compatible API", docs_url=None, redoc_url=None, openapi_url=None)

    async def authorized(request: Request) -> None:
        if check_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise ApiError(401, "No API key given: send it as 'Authorization: Bearer KEY'.",
                           ErrorType.AUTHENTICATION, code="invalid_api_key")
        if not await asyncio.to_thread(check_key, token.strip()):
            raise ApiError(401, "This API key is not accepted here.", ErrorType.AUTHENTICATION,
                           code="invalid_api_key")

    def model_named(name: str) -> ServedModel:
        served = list(catalog())
        for model in served:
            if model.name == name:
                return model
        names = ", ".join(m.name for m in served) or "none (load an adapter first)"
        raise ApiError(404, f"The model {name!r} does not exist here. Served models: {names}.",
                       ErrorType.NOT_FOUND, param="model", code="model_not_found")

    @app.get("/models", dependencies=[Depends(authorized)])
    async def models() -> ModelList:
        return ModelList(data=[ModelCard(id=m.name, root=m.base, parent=None if m.adapter is None else m.base)
                               for m in catalog()])

    @app.post("/chat/completions", dependencies=[Depends(authorized)], response_model=None)
    async def chat_completions(body: ChatCompletionRequest) -> ChatCompletion | StreamingResponse:
        model = model_named(body.model)
        conversation = body.conversation()
        _within_characters(engine, [turn["content"] for turn in conversation], "messages")
        try:
            prompt = engine.encode(conversation)
        except ChatError as err:
            raise ApiError(400, str(err), param="messages") from None
        budget = _budget(engine, limits, len(prompt), body.token_limit, "messages", "max_tokens")
        top = (body.top_logprobs or 0) if body.logprobs else 0
        handles = _submit(engine, limits, model, [prompt], body, budget, top=top)
        texts = [_Text(engine, body.stops) for _ in handles]
        if body.stream:
            return _sse(_chat_chunks(handles, texts, body, model, len(prompt), bool(body.logprobs)))
        finishes = await _collect(handles, texts)
        choices = [ChatChoice(index=n, message=AssistantMessage(content=text.final), finish_reason=finishes[n],
                              logprobs=ChoiceLogprobs(content=text.logprobs) if body.logprobs else None)
                   for n, text in enumerate(texts)]
        return ChatCompletion(model=model.name, choices=choices, usage=_usage(len(prompt), texts))

    @app.post("/completions", dependencies=[Depends(authorized)], response_model=None)
    async def completions(body: CompletionRequest) -> Completion | StreamingResponse:
        model = model_named(body.model)
        tokenizer = engine.tokenizer
        for text in (p for p in body.prompts() if not isinstance(p, list)):
            _within_characters(engine, [text], "prompt")
        prompts = [p if isinstance(p, list) else tokenizer(p)["input_ids"] for p in body.prompts()]
        vocab = len(tokenizer)
        for ids in prompts:
            if not ids:
                raise ApiError(400, "A prompt is empty: give at least one token.", param="prompt")
            if any(not 0 <= i < vocab for i in ids):
                raise ApiError(400, f"A prompt token id is outside the vocabulary (0-{vocab - 1}).", param="prompt")
        budgets = [_budget(engine, limits, len(ids), body.max_tokens, "prompt", "max_tokens", scoring=body.echo)
                   for ids in prompts]
        scored = body.echo and body.logprobs is not None
        handles = _submit(engine, limits, model, prompts, body, budgets, top=body.logprobs or 0,
                          prompt_logprobs=body.logprobs if scored else None)
        texts = [_Text(engine, body.stops) for _ in handles]
        prompt_tokens = sum(len(ids) for ids in prompts)
        if body.stream:
            return _sse(_completion_chunks(handles, texts, body, model, prompt_tokens))
        finishes = await _collect(handles, texts)
        choices = []
        for n, (handle, text) in enumerate(zip(handles, texts)):
            echoed = tokenizer.decode(handle.request.prompt_ids) if body.echo else ""
            logprobs = None
            if body.logprobs is not None:
                logprobs = _legacy_logprobs(engine, handle, text, echoed if scored else "")
            choices.append(CompletionChoice(index=n, text=echoed + text.final, finish_reason=finishes[n],
                                            logprobs=logprobs))
        return Completion(model=model.name, choices=choices, usage=_usage(prompt_tokens, texts))

    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
    return _BodyLimit(app, limits.max_body_bytes)


# ---- bounds and submission ---------------------------------------------------------------------------------


def _within_characters(engine: ChatEngine, texts: list[str], param: str) -> None:
    """A prompt longer in characters than the context could hold in any tokenization is refused before it is
    tokenized (ChatEngine.most_characters)."""
    if (chars := sum(len(text) for text in texts)) > engine.most_characters:
        raise ApiError(400, f"The prompt has {chars:,} characters, more than the model's context of "
                            f"{engine.context_length} tokens can hold (prompt and answer together): shorten it.",
                       param=param, code="context_length_exceeded")


def _budget(engine: ChatEngine, limits: Limits, prompt_tokens: int, asked: int | None, prompt_param: str,
            tokens_param: str, *, scoring: bool = False) -> int:
    """The max_tokens this request gets: what it asked for, capped by what the context leaves (and the server's
    cap); a prompt that leaves no room is refused naming the limit."""
    context = engine.context_length
    room = context - prompt_tokens
    if room < (0 if scoring and asked == 0 else 1):
        raise ApiError(400, f"The prompt has {prompt_tokens} tokens, but the model's context is {context} tokens "
                            f"(prompt and answer together): shorten it.", param=prompt_param,
                       code="context_length_exceeded")
    budget = room if asked is None else min(asked, room)
    return budget if limits.max_tokens is None else min(budget, limits.max_tokens)


def _submit(engine: ChatEngine, limits: Limits, model: ServedModel, prompts: list[list[int]],
            body: ChatCompletionRequest | CompletionRequest, budgets: int | list[int], *, top: int,
            prompt_logprobs: int | None = None) -> list[Handle]:
    """One decoder request per prompt and choice (``n`` each); choice i of a seeded request uses seed + i."""
    budgets = budgets if isinstance(budgets, list) else [budgets] * len(prompts)
    handles: list[Handle] = []
    try:
        eos = engine.eos_ids()
        for ids, budget in zip(prompts, budgets):
            for i in range(body.n):
                handles.append(engine.submit(DecodeRequest(
                    ids, model.adapter, budget, eos, body.temperature, body.top_p,
                    None if body.seed is None else body.seed + i, top_logprobs=top, prompt_logprobs=prompt_logprobs,
                    timeout=limits.timeout)))
    except QueueFull as err:
        for handle in handles:
            handle.close()
        raise ApiError(503, str(err), ErrorType.OVERLOADED, code="queue_full") from None
    except (ChatError, GenerationError) as err:
        for handle in handles:
            handle.close()
        raise ApiError(503, str(err), ErrorType.SERVER, code="model_not_loaded") from None
    return handles


class _Text:
    """One choice's answer as tokens arrive: the text safe to send so far (a stop sequence's first characters are
    held back until it is clear they are not one), and its logprobs."""

    def __init__(self, engine: ChatEngine, stops: list[str]) -> None:
        self.tokenizer = engine.tokenizer
        self.stops = stops
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.ids: list[int] = []
        self.tokens: list[Token] = []
        self.text = ""  # the decoded answer so far, cut at a stop sequence
        self.sent = 0  # characters of it handed out
        self.stopped = False  # a stop sequence ended it

    def add(self, token: Token) -> str:
        """Take a token; the new text that may be sent now."""
        if self.stopped:  # tokens decoded after a stop sequence, before the row left: not part of the answer
            return ""
        self.tokens.append(token)
        if token.end:
            return ""
        self.ids.append(token.id)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # in the middle of a character
            return ""
        cut = [i for i in (text.find(s, max(0, self.sent - len(s))) for s in self.stops) if i >= 0]
        if cut:
            self.text, self.stopped = text[:min(cut)], True
            return self.rest()
        self.text = text
        end = max(self.sent, len(text) - self.hold) if self.stops else len(text)
        new, self.sent = text[self.sent:end], end
        return new

    def rest(self) -> str:
        new, self.sent = self.text[self.sent:], len(self.text)
        return new

    @property
    def final(self) -> str:
        return self.text

    @property
    def logprobs(self) -> list[TokenLogprob]:
        return _token_logprobs(self.tokenizer, self.tokens)


def _token_logprobs(tokenizer: Any, tokens: list[Token]) -> list[TokenLogprob]:
    """Chat's logprobs: each token's text, bytes and logprob, with its alternatives."""
    def piece(token_id: int, logprob: float) -> TopLogprob:
        text = tokenizer.decode([token_id])
        return TopLogprob(token=text, logprob=logprob, bytes=list(text.encode()))
    return [TokenLogprob(**piece(t.id, t.logprob).model_dump(), top_logprobs=[piece(i, lp) for i, lp in t.top])
            for t in tokens]


def _finish(handle: Handle, text: _Text) -> str:
    if text.stopped or handle.finish is Finish.STOP:
        return "stop"
    if handle.finish is Finish.TIMEOUT:
        raise ApiError(504, f"The request took longer than {handle.request.timeout:.0f} s and was ended.",
                       ErrorType.TIMEOUT, code="timeout")
    return "length"


async def _events(handles: list[Handle]) -> AsyncIterator[tuple[int, Token | None]]:
    """Every choice's tokens as they come, as (choice, token), and (choice, None) when one ends. Each handle is
    drained by a thread of its own (the decoder's queues block); leaving early closes every handle, so a client
    that goes away frees its rows."""
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[tuple[int, Token | BaseException | None]] = asyncio.Queue()

    def put(item: tuple[int, Token | BaseException | None]) -> None:
        try:
            loop.call_soon_threadsafe(events.put_nowait, item)
        except RuntimeError:  # the loop is gone (the server is stopping)
            pass

    def drain(n: int, handle: Handle) -> None:
        try:
            for token in handle:
                put((n, token))
            put((n, None))
        except BaseException as err:  # noqa: BLE001  (handed to the request's task)
            put((n, err))

    for n, handle in enumerate(handles):
        threading.Thread(target=drain, args=(n, handle), name="api-drain", daemon=True).start()
    remaining = len(handles)
    try:
        while remaining:
            n, event = await events.get()
            if isinstance(event, BaseException):
                raise ApiError(500, f"Generation failed: {event}", ErrorType.SERVER) from event
            remaining -= event is None
            yield n, event
    finally:
        for handle in handles:
            handle.close()


async def _collect(handles: list[Handle], texts: list[_Text]) -> list[str]:
    finishes: list[str] = [""] * len(handles)
    async for n, token in _events(handles):
        if token is None:
            finishes[n] = _finish(handles[n], texts[n])
        else:
            texts[n].add(token)
            if texts[n].stopped:
                handles[n].close()
    return finishes


def _usage(prompt_tokens: int, texts: list[_Text]) -> Usage:
    completion = sum(len(t.tokens) for t in texts)
    return Usage(prompt_tokens=prompt_tokens, completion_tokens=completion, total_tokens=prompt_tokens + completion)


def _legacy_logprobs(engine: ChatEngine, handle: Handle, text: _Text, echoed: str) -> CompletionLogprobs:
    """Completions' logprobs: the prompt's tokens first when echoed, then the answer's; each top dict also holds the
    token itself (so a client can tell whether it was the most likely)."""
    tokenizer = engine.tokenizer
    out = CompletionLogprobs()
    offset = 0
    rows: list[tuple[int, float | None, tuple[tuple[int, float], ...]]] = []
    if echoed:
        rows += [(p.id, p.logprob, p.top) for p in handle.prompt_logprobs or []]
    rows += [(t.id, t.logprob, t.top) for t in text.tokens]
    for token_id, logprob, top in rows:
        piece = tokenizer.decode([token_id])
        out.tokens.append(piece)
        out.token_logprobs.append(logprob)
        alternatives = None if logprob is None else {tokenizer.decode([i]): lp for i, lp in top}
        if alternatives is not None:
            alternatives.setdefault(piece, logprob)
        out.top_logprobs.append(alternatives)
        out.text_offset.append(offset)
        offset += len(piece)
    return out


# ---- streaming ---------------------------------------------------------------------------------------------


def _sse(chunks: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(chunks, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _data(payload: Any) -> str:
    body = payload.model_dump_json(exclude_none=True) if hasattr(payload, "model_dump_json") else json.dumps(payload)
    return f"data: {body}\n\n"


async def _streamed(handles: list[Handle], texts: list[_Text], send: Callable[[int, str, list[Token] | None,
                    str | None], Any], usage: Callable[[], Any] | None) -> AsyncIterator[str]:
    """The events of a stream: ``send(choice, new_text, new_tokens, finish_reason)`` builds each chunk; then the
    usage chunk (if asked for) and [DONE]. A failure mid-stream becomes an error event."""
    try:
        async for n, token in _events(handles):
            text = texts[n]
            if token is None:
                yield _data(send(n, text.rest(), None, _finish(handles[n], text)))
                continue
            if text.stopped:
                continue
            new = text.add(token)
            if text.stopped:
                handles[n].close()
            if new:
                yield _data(send(n, new, [token], None))
        if usage is not None:
            yield _data(usage())
    except ApiError as err:
        yield _data(err.body())
    yield "data: [DONE]\n\n"


def _chat_chunks(handles: list[Handle], texts: list[_Text], body: ChatCompletionRequest, model: ServedModel,
                 prompt_tokens: int, logprobs: bool) -> AsyncIterator[str]:
    first = ChatCompletion(model=model.name, choices=[], usage=Usage(prompt_tokens=0, completion_tokens=0,
                                                                         total_tokens=0))
    started: set[int] = set()

    def send(n: int, new: str, tokens: list[Token] | None, finish: str | None) -> ChatCompletionChunk:
        delta = ChatDelta(content=new)
        if n not in started:
            started.add(n)
            delta.role = "assistant"
        content = ChoiceLogprobs(content=_token_logprobs(texts[n].tokenizer, tokens)) if logprobs and tokens else None
        return ChatCompletionChunk(id=first.id, created=first.created, model=model.name,
                                   choices=[ChatChunkChoice(index=n, delta=delta, finish_reason=finish,
                                                            logprobs=content)])

    def usage() -> ChatCompletionChunk:
        return ChatCompletionChunk(id=first.id, created=first.created, model=model.name, choices=[],
                                   usage=_usage(prompt_tokens, texts))

    return _streamed(handles, texts, send, usage if body.include_usage else None)


def _completion_chunks(handles: list[Handle], texts: list[_Text], body: CompletionRequest, model: ServedModel,
                       prompt_tokens: int) -> AsyncIterator[str]:
    first = Completion(model=model.name, choices=[])
    echoed: set[int] = set()

    def send(n: int, new: str, tokens: list[Token] | None, finish: str | None) -> Completion:
        if body.echo and n not in echoed:
            echoed.add(n)
            new = texts[n].tokenizer.decode(handles[n].request.prompt_ids) + new
        return Completion(id=first.id, created=first.created, model=model.name,
                          choices=[CompletionChoice(index=n, text=new, finish_reason=finish)])

    def usage() -> Completion:
        return Completion(id=first.id, created=first.created, model=model.name, choices=[],
                          usage=_usage(prompt_tokens, texts))

    return _streamed(handles, texts, send, usage if body.include_usage else None)


# ---- errors and the body limit ---------------------------------------------------------------------------------


async def _api_error(request: Request, err: ApiError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status)


async def _validation_error(request: Request, err: RequestValidationError) -> JSONResponse:
    problems = err.errors()
    first = problems[0] if problems else {}
    where = [str(part) for part in first.get("loc", ()) if part != "body"]
    param = ".".join(where) or None
    message = f"Invalid value for {param}: {first.get('msg', 'invalid')}." if param else \
        f"The request body is not valid: {first.get('msg', 'invalid JSON')}."
    return JSONResponse(ApiError(400, message, param=param).body(), status_code=400)


async def _http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
    kind = ErrorType.NOT_FOUND if err.status_code == 404 else ErrorType.INVALID_REQUEST
    code = "request_too_large" if err.status_code == 413 else None
    return JSONResponse(ApiError(err.status_code, str(err.detail), kind, code=code).body(), status_code=err.status_code)


async def _unexpected(request: Request, err: Exception) -> JSONResponse:
    log.exception("The API failed on %s", request.url.path)
    return JSONResponse(ApiError(500, f"Internal error: {type(err).__name__}", ErrorType.SERVER).body(),
                        status_code=500)


class _BodyLimit:
    """Refuses a request body over ``limit`` bytes (413) before the app reads it, by its Content-Length or, when
    sent in chunks, as soon as the bytes received pass the limit."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await self._refuse(scope, receive, send)
            return
        seen = 0

        async def bounded() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:  # an HTTPException: FastAPI turns any other error reading a body into a 400
                raise StarletteHTTPException(413, self._message())
            return message

        await self.app(scope, bounded, send)

    def _message(self) -> str:
        return f"The request body is larger than {self.limit} bytes: send less."

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = JSONResponse(ApiError(413, self._message(), code="request_too_large").body(), status_code=413)
        await response(scope, receive, send)
