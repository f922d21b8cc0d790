"""Batched decoding: every request for a model shares its forward passes, whoever sent it.

    decoder = Decoder(lock, model=lambda: peft_model)
    handle = decoder.submit(Request(prompt_ids, adapter="studio_adapter_0", max_tokens=64, eos_ids=(2,)))
    for token in handle:                 # Token(id, logprob, top) as each is decoded
        ...
    handle.finish                        # Finish.STOP (an end token), LENGTH, CANCELLED, ...

One worker thread owns the decoding. Requests wait in a bounded queue; between two decoding steps the waiting ones
are prefilled together (one left-padded batch) and join the running batch of their adapter, and finished rows
leave it, so a request never waits for another to end. Rows of different adapters form separate batches (PEFT
applies one adapter per forward pass; DenseLoRA's shared encoder/decoder has no per-row mixed-adapter path), decoded
in turn; the base model's rows run with the adapters disabled.

Why our own batcher and not transformers' continuous batching (``generate_batch``/``ContinuousBatchingManager`` in
transformers 5): that one runs paged attention over its own cache and scheduler, which needs the attention
implementation swapped to a paged variant on the model (a PeftModel-wrapped DenseLoRA model included) and serves
one model configuration per manager; the adapter is fixed for the whole manager, so base and adapters could not
share it, and streaming a request's logprobs (which /v1/completions needs) is not part of its output. This batcher
uses the model's ordinary forward with a DynamicCache and the usual 2-D attention mask, the same path ``generate``
takes, so greedy answers match ``generate``'s one-at-a-time answers.

Left padding leaves answers unchanged: each row's position ids count only its real tokens (the cumulative sum of
its attention mask), and padded positions are masked out of attention, as ``generate`` does for padded batches.
A request's sampling uses its own ``torch.Generator`` seeded from its seed, so a sampled answer too does not depend
on what it was batched with.
"""

from __future__ import annotations

import enum
import logging
import queue
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from transformers import DynamicCache

from denselora_app.config import StudioError

log = logging.getLogger(__name__)

MAX_BATCH = 16  # rows decoded together per adapter; more wait for a free row
MAX_QUEUE = 64  # requests waiting or decoding; one more is refused (the API answers 503)
TOP_LOGPROBS = 20  # the most alternatives per token a request may ask for (OpenAI's own limit)


class GenerationError(StudioError, RuntimeError):
    """Decoding cannot go on: the model was unloaded, or a forward pass failed."""


class QueueFull(GenerationError):
    """Too many requests are waiting; the caller may retry later."""


class Finish(enum.Enum):
    STOP = "stop"  # the model wrote an end token
    LENGTH = "length"  # max_tokens reached
    CANCELLED = "cancelled"  # the caller's cancel event was set, or it went away
    TIMEOUT = "timeout"  # past the request's deadline


@dataclass(frozen=True)
class Token:
    id: int
    logprob: float  # of this token under the model's (untempered) distribution
    top: tuple[tuple[int, float], ...] = ()  # the most likely tokens and their logprobs, when asked for
    end: bool = False  # an end token (eos): counted, not shown


@dataclass
class Request:
    prompt_ids: list[int]
    adapter: str | None  # the PEFT adapter name; None decodes with the adapters disabled (the base model)
    max_tokens: int
    eos_ids: tuple[int, ...] = ()
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None  # None: a random one
    top_logprobs: int = 0  # alternatives per generated token
    prompt_logprobs: int | None = None  # not None: score the prompt's tokens too, with this many alternatives
    timeout: float | None = None  # seconds from submission
    signals: tuple[threading.Event, ...] = ()  # the caller's own stop signals (e.g. a chat's Stop button)
    cancel: threading.Event = field(default_factory=threading.Event)  # set when the caller goes away

    @property
    def cancelled(self) -> bool:
        return self.cancel.is_set() or any(signal.is_set() for signal in self.signals)


@dataclass(frozen=True)
class PromptToken:
    id: int
    logprob: float | None  # None for the first token (nothing before it)
    top: tuple[tuple[int, float], ...] = ()


class Handle:
    """A submitted request: iterate for its tokens; then ``finish`` says why it ended. Leaving the iteration early
    (``close``) cancels it, so its row is freed at the next step."""

    def __init__(self, request: Request) -> None:
        self.request = request
        self.finish: Finish | None = None
        self.prompt_logprobs: list[PromptToken] | None = None
        self.submitted = time.monotonic()
        self._events: queue.Queue[Token | Finish | BaseException] = queue.Queue()

    def __iter__(self) -> Iterator[Token]:
        try:
            while True:
                event = self._events.get()
                if isinstance(event, Token):
                    yield event
                elif isinstance(event, Finish):
                    self.finish = event
                    return
                else:
                    raise GenerationError(f"Generation failed: {event}") from event
        finally:
            self.request.cancel.set()  # a no-op after the end; frees the row when the caller leaves early

    def close(self) -> None:
        self.request.cancel.set()


@dataclass
class _Row:
    handle: Handle
    generator: torch.Generator
    generated: int = 0
    logprobs: torch.Tensor | None = None  # of the token just sampled's distribution
    finish: Finish | None = None


@dataclass
class _Batch:
    """The running rows of one adapter: their KV cache, attention mask over it, and each row's next input."""

    rows: list[_Row]
    cache: DynamicCache
    mask: torch.Tensor  # (rows, cached length), left-padded: zeros then ones
    next_ids: torch.Tensor  # (rows, 1): the token each row decodes from next (not yet in the cache)


class Decoder:
    """The batching worker; see the module docstring. ``lock`` is held for every step (the model's owner takes it to
    load or unload); ``model`` returns the PeftModel to decode with, or None when nothing is loaded."""

    def __init__(self, lock: threading.Lock, model: Callable[[], torch.nn.Module | None], *,
                 max_batch: int = MAX_BATCH, max_queue: int = MAX_QUEUE) -> None:
        self._lock = lock
        self._model = model
        self.max_batch = max_batch
        self.max_queue = max_queue
        self._waiting: deque[Handle] = deque()
        self._batches: dict[str | None, _Batch] = {}
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None

    @property
    def load(self) -> int:
        """Requests waiting or decoding."""
        return len(self._waiting) + sum(len(b.rows) for b in self._batches.values())

    def submit(self, request: Request) -> Handle:
        if request.max_tokens < 0:
            raise GenerationError(f"max_tokens must be 0 or more, got {request.max_tokens}.")
        if not request.prompt_ids:
            raise GenerationError("The prompt is empty: give at least one token.")
        handle = Handle(request)
        with self._wake:
            if self.load >= self.max_queue:
                raise QueueFull(f"The server is busy: {self.max_queue} requests are waiting or decoding. "
                                "Retry shortly, or start it with a larger --max-queue.")
            self._waiting.append(handle)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._work, name="batched-decoding", daemon=True)
                self._thread.start()
            self._wake.notify()
        return handle

    def reset(self, reason: str) -> None:
        """End every request (the model they decode with is going away); the caller holds the lock."""
        with self._wake:
            handles = list(self._waiting) + [row.handle for b in self._batches.values() for row in b.rows]
            self._waiting.clear()
            self._batches.clear()
        for handle in handles:
            handle._events.put(GenerationError(reason))

    # ---- the worker

    def _work(self) -> None:
        while True:
            with self._wake:
                while not self._waiting and not self._batches:
                    if not self._wake.wait(timeout=30):
                        self._thread = None  # idle: the next submit starts a fresh worker
                        return
            with self._lock, torch.no_grad():
                try:
                    self._step()
                except Exception as err:  # noqa: BLE001  (every request gets the failure; the worker goes on)
                    log.exception("Decoding step failed")
                    self._fail_all(err)

    def _fail_all(self, err: BaseException) -> None:
        with self._wake:
            handles = list(self._waiting) + [row.handle for b in self._batches.values() for row in b.rows]
            self._waiting.clear()
            self._batches.clear()
        for handle in handles:
            handle._events.put(err)

    def _step(self) -> None:
        model = self._model()
        if model is None:
            self._fail_all(GenerationError("No model is loaded."))
            return
        self._admit(model)
        for adapter in list(self._batches):
            self._decode(model, adapter)

    def _admit(self, model: torch.nn.Module) -> None:
        """Prefill the waiting requests that have room, grouped by adapter, and join them to their batch."""
        with self._wake:
            taken: dict[str | None, list[Handle]] = {}
            kept: deque[Handle] = deque()
            while self._waiting:
                handle = self._waiting.popleft()
                adapter = handle.request.adapter
                running = len(self._batches[adapter].rows) if adapter in self._batches else 0
                if running + len(taken.get(adapter, [])) < self.max_batch:
                    taken.setdefault(adapter, []).append(handle)
                else:
                    kept.append(handle)
            self._waiting = kept
        for adapter, handles in taken.items():
            live = [h for h in handles if not self._ended(h)]
            if live:
                self._prefill(model, adapter, live)

    def _ended(self, handle: Handle) -> bool:
        """Whether a request is to end now (cancelled or past its deadline); if so it is told why."""
        request = handle.request
        if request.cancelled:
            handle._events.put(Finish.CANCELLED)
            return True
        if request.timeout is not None and time.monotonic() - handle.submitted > request.timeout:
            handle._events.put(Finish.TIMEOUT)
            return True
        return False

    def _prefill(self, model: torch.nn.Module, adapter: str | None, handles: list[Handle]) -> None:
        device = _device(model)
        width = max(len(h.request.prompt_ids) for h in handles)
        ids = torch.zeros((len(handles), width), dtype=torch.long, device=device)
        mask = torch.zeros_like(ids)
        for n, h in enumerate(handles):
            prompt = h.request.prompt_ids
            ids[n, width - len(prompt):] = torch.tensor(prompt, device=device)
            mask[n, width - len(prompt):] = 1
        scoring = any(h.request.prompt_logprobs is not None for h in handles)
        cache = DynamicCache()  # passed as past_key_values: 5.25 also names it `cache`, earlier 5.x only so
        with _adapter(model, adapter):
            logits = model(input_ids=ids, attention_mask=mask, position_ids=_positions(mask), past_key_values=cache,
                           use_cache=True, logits_to_keep=0 if scoring else 1).logits
        rows, firsts = [], []
        for n, h in enumerate(handles):
            if h.request.prompt_logprobs is not None:
                h.prompt_logprobs = _prompt_logprobs(logits[n, width - len(h.request.prompt_ids):],
                                                     h.request.prompt_ids, h.request.prompt_logprobs)
            row = _Row(h, _generator(h.request.seed, device))
            if h.request.max_tokens == 0:
                h._events.put(Finish.LENGTH)
                continue
            token = _sample(logits[n, -1], row)
            rows.append((n, row))
            firsts.append(token)
        if not rows:
            return
        keep = torch.tensor([n for n, _ in rows], device=device)
        cache.batch_select_indices(keep)
        batch = _Batch([row for _, row in rows], cache, mask[keep],
                       torch.tensor([[t] for t in firsts], device=device))
        self._join(adapter, batch)
        # Emitted after joining, so a row that ends on its first token leaves through the same path as any other.
        for row, token in zip(batch.rows, firsts):
            self._emit(row, token)
        self._drop_finished(adapter)

    def _join(self, adapter: str | None, new: _Batch) -> None:
        old = self._batches.get(adapter)
        if old is None:
            self._batches[adapter] = new
            return
        width = max(old.mask.shape[1], new.mask.shape[1])
        for layer_old, layer_new in zip(old.cache.layers, new.cache.layers):
            layer_old.keys = torch.cat([_pad_left(layer_old.keys, width), _pad_left(layer_new.keys, width)])
            layer_old.values = torch.cat([_pad_left(layer_old.values, width), _pad_left(layer_new.values, width)])
        old.mask = torch.cat([_pad_left(old.mask, width, dim=1), _pad_left(new.mask, width, dim=1)])
        old.next_ids = torch.cat([old.next_ids, new.next_ids])
        old.rows.extend(new.rows)

    def _decode(self, model: torch.nn.Module, adapter: str | None) -> None:
        batch = self._batches[adapter]
        positions = batch.mask.sum(-1, keepdim=True)  # the count of real tokens before the new one
        batch.mask = torch.cat([batch.mask, torch.ones_like(batch.next_ids)], dim=1)
        with _adapter(model, adapter):
            logits = model(input_ids=batch.next_ids, attention_mask=batch.mask, position_ids=positions,
                           past_key_values=batch.cache, use_cache=True).logits[:, -1]
        tokens = [_sample(logits[n], row) for n, row in enumerate(batch.rows)]
        batch.next_ids = torch.tensor([[t] for t in tokens], device=batch.next_ids.device)
        for row, token in zip(batch.rows, tokens):
            self._emit(row, token)
        self._drop_finished(adapter)

    def _emit(self, row: _Row, token: int) -> None:
        """Hand the token to its request, with its logprobs (kept by ``_sample``)."""
        request = row.handle.request
        logprobs = row.logprobs
        top = ()
        if request.top_logprobs:
            values, ids = logprobs.topk(min(request.top_logprobs, logprobs.numel()))
            top = tuple(zip(ids.tolist(), values.tolist()))
        row.generated += 1
        end = token in request.eos_ids
        row.handle._events.put(Token(token, float(logprobs[token]), top, end))
        if end:
            row.finish = Finish.STOP
        elif row.generated >= request.max_tokens:
            row.finish = Finish.LENGTH

    def _drop_finished(self, adapter: str | None) -> None:
        batch = self._batches[adapter]
        keep = []
        for n, row in enumerate(batch.rows):
            if row.finish is not None:
                row.handle._events.put(row.finish)
            elif not self._ended(row.handle):
                keep.append(n)
        if len(keep) == len(batch.rows):
            return
        if not keep:
            del self._batches[adapter]
            return
        index = torch.tensor(keep, device=batch.mask.device)
        batch.cache.batch_select_indices(index)
        batch.mask, batch.next_ids = batch.mask[index], batch.next_ids[index]
        batch.rows = [batch.rows[n] for n in keep]
        # Columns that are padding in every remaining row (a long row left) are cut, so the cache stays small.
        lead = int((batch.mask.sum(0) == 0).long().cumprod(0).sum())
        if lead:
            batch.mask = batch.mask[:, lead:]
            for layer in batch.cache.layers:
                layer.keys, layer.values = layer.keys[..., lead:, :], layer.values[..., lead:, :]


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.cumsum(-1) - 1).clamp(min=0)


def _pad_left(tensor: torch.Tensor, width: int, dim: int = -2) -> torch.Tensor:
    missing = width - tensor.shape[dim]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


@contextmanager
def _adapter(model: torch.nn.Module, adapter: str | None) -> Iterator[None]:
    """The forward pass's adapter: the named one, or none (the base model). The base's rows switch the adapter
    layers off and on around each step through the layers themselves (found once per model): PeftModel's
    ``disable_adapter`` walks every module of the model both ways, about 20 ms a step on the embedded model, as
    long as a decoding step itself; the layers alone take about 3 ms."""
    if adapter is not None:
        if model.active_adapter != adapter:
            model.set_adapter(adapter)
        yield
        return
    layers = _tuner_layers(model)
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)


# Per model: the adapters it had when its layers were listed, and those layers (a new adapter may wrap new ones).
_LAYERS: weakref.WeakKeyDictionary[torch.nn.Module, tuple[tuple[str, ...], list[BaseTunerLayer]]] = \
    weakref.WeakKeyDictionary()


def _tuner_layers(model: torch.nn.Module) -> list[BaseTunerLayer]:
    adapters = tuple(getattr(model, "peft_config", {}))
    known = _LAYERS.get(model)
    if known is None or known[0] != adapters:
        known = _LAYERS[model] = (adapters, [m for m in model.modules() if isinstance(m, BaseTunerLayer)])
    return known[1]


def _generator(seed: int | None, device: torch.device) -> torch.Generator:
    generator = torch.Generator(device=device)
    generator.manual_seed(seed if seed is not None else random.randrange(2**31))
    return generator


def _sample(logits: torch.Tensor, row: _Row) -> int:
    """The row's next token: the most likely one, or one drawn with its temperature and top-p."""
    request = row.handle.request
    logits = logits.float()
    row.logprobs = logits.log_softmax(-1)
    if request.temperature <= 0:
        return int(logits.argmax())
    probs = (logits / request.temperature).softmax(-1)
    if request.top_p < 1:
        sorted_probs, order = probs.sort(descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs > request.top_p  # keep the smallest set reaching top_p
        sorted_probs[outside] = 0
        probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=row.generator))


def _prompt_logprobs(logits: torch.Tensor, prompt: list[int], top: int) -> list[PromptToken]:
    """Each prompt token's logprob given the tokens before it (``logits``: the prompt's positions)."""
    logprobs = logits.float().log_softmax(-1)
    targets = torch.tensor(prompt[1:], device=logits.device)
    picked = logprobs[:-1].gather(-1, targets.unsqueeze(-1)).squeeze(-1).tolist()
    tops: list[tuple[tuple[int, float], ...]] = [()] * (len(prompt) - 1)
    if top:
        values, ids = logprobs[:-1].topk(min(top, logprobs.shape[-1]), dim=-1)
        tops = [tuple(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]
    return [PromptToken(prompt[0], None)] + [PromptToken(t, lp, tp) for t, lp, tp in zip(prompt[1:], picked, tops)]
