"""Chat with an adapter, side by side with its base model, from one copy of the base in memory.

    engine = ChatEngine()
    engine.select("20250101-120000-quickstart")          # a run id, a run's adapter/checkpoint folder,
                                                         # any adapter folder, or a Hub adapter id
    for text in engine.stream_reply("Who invented the cloudglass lens?"):
        ...                                              # the reply so far, growing as tokens arrive
    for base_text, adapter_text in engine.stream_compare("..."):
        ...                                              # base answer first, then the adapter's

One :class:`ChatEngine` holds one base model wrapped in one ``PeftModel``. Every adapter selected for that base is
loaded into it once under its own name and switched to with ``set_adapter``; the base's own answers come from the
same weights with the adapter disabled. Answers are decoded by the engine's :class:`~.generation.Decoder`, which
batches every request in flight (chat, evaluation, the OpenAI API of serving/api.py) into shared forward passes; one
lock serialises loading and each decoding step. Compiled decoding (a static cache, one fixed shape) keeps
transformers' ``generate`` one request at a time, in a thread feeding a ``TextIteratorStreamer``: a batch whose rows
come and go would recompile at every new shape.
"""

from __future__ import annotations

import gc
import itertools
import logging
import random
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from transformers import (
    CompileConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    StoppingCriteria,
    StoppingCriteriaList,
    TextIteratorStreamer,
)

from denselora_app import denselora  # noqa: F401  (registers DenseLoRA with PEFT, so its adapters load)
from denselora_app.engine import models
from denselora_app.serving import context
from denselora_app.rules import QUANTIZATIONS
from denselora_app.runs import adapter_weights
from denselora_app.serving.adapters import (
    MEMORY_HEADROOM,
    AdapterRef,
    ChatError,
    memory_problem,
    resolve_adapter,
    training_notice,
)
from denselora_app.serving.generation import Decoder, Handle, Request
from denselora_app.serving.prompts import build_messages, render_prompt

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GenerationSettings:
    max_new_tokens: int = 256
    temperature: float = 0.7  # 0 decodes greedily
    top_p: float = 0.9
    seed: int | None = None  # None: a fresh random seed per reply (compare still uses one seed for both answers)
    system_prompt: str = ""

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ChatError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}.")
        if self.temperature < 0:
            raise ChatError(f"temperature must be 0 (greedy) or more, got {self.temperature}.")
        if not 0 < self.top_p <= 1:
            raise ChatError(f"top_p must be in (0, 1], got {self.top_p}.")


@dataclass(frozen=True)
class GenerationStats:
    tokens: int  # new tokens generated
    seconds: float
    stopped: bool  # ended by stop() rather than by the model or max_new_tokens
    notice: str | None = None  # e.g. the oldest turns were left out to fit the model's context

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


@dataclass(frozen=True)
class LoadedAdapter:
    """What the engine holds after ``select``: plain data for a status line."""

    adapter: AdapterRef
    base_parameters: int
    adapter_parameters: int
    device: str
    dtype: str
    notice: str | None  # e.g. a run training on the same device
    compiled: bool = False  # decoding runs through a compiled model with a static cache

    @property
    def trainable_percent(self) -> float:
        return 100.0 * self.adapter_parameters / self.base_parameters if self.base_parameters else 0.0


class _StopOn(StoppingCriteria):
    """Ends generation at the next token once an event is set; also counts the new tokens."""

    def __init__(self, prompt_len: int, *events: threading.Event) -> None:
        self.prompt_len = prompt_len
        self.events = events
        self.generated = 0

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        self.generated = input_ids.shape[1] - self.prompt_len
        stop = any(event.is_set() for event in self.events)
        return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)


@dataclass
class _Base:
    spec: str
    location: str
    trust_remote_code: bool
    quantization: str
    model: PreTrainedModel  # the plain model, before PEFT wraps it (the same object, modified in place)
    tokenizer: PreTrainedTokenizerBase
    parameters: int


class ChatEngine:
    """One base model kept in memory, with every selected adapter of it loaded once; see the module docstring."""

    def __init__(self, device: str = "auto", dtype: str = "auto", runs_root: Path | None = None,
                 quantization: str | None = None, compile_decoding: bool = False) -> None:
        """``quantization``: how to load base models ('none', '4bit', '8bit'); None loads each as its adapter was
        trained. ``compile_decoding``: decode through ``torch.compile`` with a static KV cache (transformers' own
        path): a slow first compile when an adapter is selected, faster tokens after it; off again, with the
        reason, if compiling fails."""
        try:
            self.device = models.resolve_device(device)
            models.resolve_dtype(dtype, self.device)  # a bad dtype fails here, not at the first load
        except ValueError as err:
            raise ChatError(str(err)) from None
        if quantization not in (None, *QUANTIZATIONS):
            raise ChatError(f"Unknown quantization {quantization!r}: use one of {', '.join(QUANTIZATIONS)}.")
        self.dtype = dtype
        self.quantization = quantization
        self.compile_decoding = compile_decoding
        self.compile_failure: str | None = None  # why compiled decoding was turned off
        self.runs_root = runs_root
        self.selected: LoadedAdapter | None = None
        self.last_stats: GenerationStats | None = None
        self._lock = threading.Lock()  # loading, and each decoding step (one compiled generate at a time)
        self.decoder = Decoder(self._lock, lambda: self._peft)
        self._stop = threading.Event()
        self._base: _Base | None = None
        self._peft: PeftModel | None = None
        self._method: str | None = None  # the PEFT method of the loaded adapters (one PeftModel holds one)
        self._adapters: dict[str, tuple[str, float | None]] = {}  # location -> (adapter name, weights mtime)
        self._refs: dict[str, AdapterRef] = {}  # adapter name -> what it was loaded from
        self._names = itertools.count()

    # ---- loading

    def select(self, ref: str | AdapterRef, checkpoint: int | None = None) -> LoadedAdapter:
        """Make ``ref`` the active adapter, loading its base only when it is not the one held already."""
        if not isinstance(ref, AdapterRef):
            ref = resolve_adapter(ref, checkpoint, self.runs_root)
        with self._lock:
            notice = training_notice(self.device, self.runs_root)
            if not self._holds_base(ref):
                self._load_base(ref, notice)
            name = self._load_adapter(ref)
            self._peft.set_adapter(name)
            if self._compiled():
                self._warm_up()
            if self.compile_decoding and self.compile_failure:
                notice = " ".join(filter(None, [notice, f"Compiled decoding is off: {self.compile_failure}"]))
            self.selected = LoadedAdapter(
                adapter=ref, base_parameters=self._base.parameters,
                adapter_parameters=sum(p.numel() for n, p in self._peft.named_parameters() if f".{name}." in n),
                device=str(self.device), dtype=self._precision(), notice=notice, compiled=self._compiled(),
            )
            return self.selected

    def _compiled(self) -> bool:
        return self.compile_decoding and self.compile_failure is None

    def _warm_up(self) -> None:
        """Compile now, on two prompt lengths (the second gives the graph that serves every length), so the first
        answer is not the slow one; turn compiled decoding off, saying why, if it fails."""
        config = CompileConfig()
        config._compile_all_devices = True  # transformers compiles only on accelerators unless told otherwise
        self._base.model.generation_config.compile_config = config
        filler = self._base.tokenizer.eos_token_id or 0
        started = time.perf_counter()
        try:
            with torch.no_grad():
                for length in (4, 7):
                    ids = torch.full((1, length), filler, dtype=torch.long, device=self.device)
                    self._peft.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=2,
                                        do_sample=False, cache_implementation="static", pad_token_id=filler)
        except Exception as err:  # noqa: BLE001  (any compiler failure means: decode the standard way)
            self.compile_failure = f"{type(err).__name__}: {str(err).strip().splitlines()[0][:200]}"
            log.warning("Compiled decoding failed, using the standard decoding: %s", self.compile_failure)
            return
        log.info("Compiled the decoding step in %.1f s", time.perf_counter() - started)

    def _precision(self) -> str:
        dtype = str(self._base.model.dtype).removeprefix("torch.")
        return dtype if self._base.quantization == "none" else f"{self._base.quantization} ({dtype} compute)"

    def unload(self) -> None:
        """Free the base model and every adapter (the next ``select`` loads again)."""
        with self._lock:
            self._release()

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        return self._require().tokenizer

    @property
    def base_model(self) -> str | None:
        """The spec of the base model held, if any."""
        return self._base.spec if self._base is not None else None

    def loaded_adapters(self) -> dict[str, AdapterRef]:
        """Every adapter loaded on the base, by its name inside the PeftModel."""
        return dict(self._refs)

    @property
    def context_length(self) -> int:
        """How many tokens (prompt and answer) the base model attends to; the tokenizer's limit for a model whose
        config names none."""
        config = self._require().model.config
        config = getattr(config, "get_text_config", lambda: config)()
        length = getattr(config, "max_position_embeddings", None)
        return int(length) if length else int(min(self._base.tokenizer.model_max_length, 2**20))

    def training_notice(self) -> str | None:
        """Whether a run is training on this engine's device right now (for a status line that refreshes)."""
        return training_notice(self.device, self.runs_root)

    def base_quantization(self, ref: AdapterRef) -> str:
        """How ``ref``'s base is loaded: the engine's setting, else as the adapter was trained."""
        return self.quantization or ref.quantization

    def _holds_base(self, ref: AdapterRef) -> bool:
        base = self._base
        if (base is None or base.trust_remote_code != ref.trust_remote_code
                or base.quantization != self.base_quantization(ref)):
            return False
        # The same model can be named differently (the embedded spec, or its converted cache folder).
        return base.spec == ref.base_model or base.location == self._location(ref)

    @staticmethod
    def _location(ref: AdapterRef) -> str:
        try:
            location = models.ensure_local(ref.base_model)
        except models.ModelLoadError as err:
            raise _unloadable_base(ref, err) from None
        return str(Path(location).resolve()) if Path(location).exists() else location

    def _load_base(self, ref: AdapterRef, notice: str | None) -> None:
        self._release()  # the old base goes first: two models need not fit in memory at once
        if notice:
            self._check_memory(ref, notice)
        location = self._location(ref)
        quantization = self.base_quantization(ref)
        log.info("Loading base model %s on %s (quantization: %s)", ref.base_model, self.device, quantization)
        started = time.perf_counter()
        try:
            tokenizer = models.load_tokenizer(ref.base_model, trust_remote_code=ref.trust_remote_code)
            model = models.load_model(ref.base_model, device=str(self.device), dtype=self.dtype,
                                      trust_remote_code=ref.trust_remote_code, quantization=quantization)
        except models.ModelLoadError as err:
            raise _unloadable_base(ref, err) from None
        except (torch.OutOfMemoryError, MemoryError) as err:
            raise ChatError(f"Not enough memory on {self.device} to load {ref.base_model}: {err}") from None
        self._base = _Base(ref.base_model, location, ref.trust_remote_code, quantization, model, tokenizer,
                           model.num_parameters())
        log.info("Loaded %s in %.1f s", ref.base_model, time.perf_counter() - started)

    def _check_memory(self, ref: AdapterRef, notice: str) -> None:
        try:
            parameters = models.describe_model(ref.base_model, ref.trust_remote_code).num_parameters
        except models.ModelLoadError as err:
            raise _unloadable_base(ref, err) from None
        itemsize = models.resolve_dtype(self.dtype, self.device).itemsize
        problem = memory_problem(self.device, int(parameters * itemsize * MEMORY_HEADROOM))
        if problem:
            raise ChatError(f"{notice} Chat cannot load its base model now: {problem}. Wait for the run to finish "
                            "or stop it, or chat on another device.")

    def _load_adapter(self, ref: AdapterRef) -> str:
        stamp = _weights_mtime(ref.location)
        known = self._adapters.get(ref.location)
        if known and known[1] == stamp:
            return known[0]
        if known:  # the folder was written again (a resumed run finished): load the new weights
            self.decoder.reset(f"The adapter {ref.label} was reloaded: ask again.")
            self._peft.delete_adapter(known[0])
            del self._adapters[ref.location], self._refs[known[0]]
        if self._peft is not None and self._method != ref.method:
            # PEFT cannot mix methods in one PeftModel: take the adapters out, keeping the base weights.
            self.decoder.reset(f"The adapters were unloaded to load {ref.label}: ask again.")
            self._base.model = self._peft.unload()
            self._peft, self._adapters, self._refs = None, {}, {}
        name = f"studio_adapter_{next(self._names)}"
        try:
            if self._peft is None:
                self._peft = PeftModel.from_pretrained(self._base.model, ref.location, adapter_name=name)
                self._method = ref.method
            else:
                self._peft.load_adapter(ref.location, adapter_name=name)
        except Exception as err:  # a missing file, a shape mismatch (another base), the Hub: all mean "unusable"
            self._discard(name)
            raise ChatError(f"The adapter {ref.label} cannot be loaded onto {ref.base_model}: {err}") from None
        self._peft.eval()
        self._adapters[ref.location] = (name, stamp)
        self._refs[name] = ref
        return name

    def _discard(self, name: str) -> None:
        """Undo a failed adapter load; a base that PEFT had started to modify is dropped (reloaded next time)."""
        if self._peft is not None and name in self._peft.peft_config:
            try:
                self._peft.delete_adapter(name)
                return
            except Exception:  # cannot tell what state the model is in: start afresh
                pass
        if self._peft is None or name in self._peft.peft_config:
            self._release()

    def _release(self) -> None:
        self.decoder.reset("The model was unloaded: ask again once it is loaded.")
        self._base, self._peft, self._method, self._adapters, self.selected = None, None, None, {}, None
        self._refs = {}
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _require(self) -> _Base:
        if self._base is None or self._peft is None:
            raise ChatError("No adapter is selected: choose a run or an adapter first.")
        return self._base

    # ---- generating

    def stop(self) -> None:
        """End the generation in progress (and a compare's second answer) after the current token, unless it was
        given a stop signal of its own (``stop=`` of ``stream_reply``/``stream_compare``): only that one ends it."""
        self._stop.set()

    @contextmanager
    def using(self, adapter: bool = True) -> Iterator[PeftModel]:
        """Hold the model (the lock) with the selected adapter enabled, or disabled for the base's answers."""
        with self._lock:
            self._require()
            name = self.adapter_name(None)
            if adapter and self._peft.active_adapter != name:  # the decoder may have switched to another one
                self._peft.set_adapter(name)
            with self._adapter_enabled(adapter):
                yield self._peft

    def _adapter_enabled(self, enabled: bool):
        return nullcontext() if enabled else self._peft.disable_adapter()

    def stream_reply(self, message: str, history: Sequence[Mapping[str, Any]] | None = None,
                     settings: GenerationSettings | None = None, *, use_adapter: bool = True,
                     stop: threading.Event | None = None) -> Iterator[str]:
        """Yield the reply so far (the whole text each time, growing), from the adapter or (``use_adapter=False``)
        the base model. Setting ``stop`` (one caller's own signal, e.g. one visitor's) ends it after the current
        token; without one, ``stop()`` does."""
        settings = settings or GenerationSettings()
        messages = build_messages(message, history, settings.system_prompt)
        yield from self._stream(messages, settings, _seed(settings), self._begin(stop), use_adapter)

    def stream_compare(self, message: str, history: Sequence[Mapping[str, Any]] | None = None,
                       settings: GenerationSettings | None = None,
                       base_history: Sequence[Mapping[str, Any]] | None = None,
                       stop: threading.Event | None = None) -> Iterator[tuple[str, str]]:
        """Yield ``(base_text, adapter_text)`` as both grow: the base answers first (adapter disabled), then the
        adapter, with the same prompt, seed and settings. ``base_history`` (default: ``history``) lets the base
        column keep its own past answers. ``stop`` (or, without one, ``stop()``) ends the current answer and skips
        the adapter's."""
        settings = settings or GenerationSettings()
        seed = _seed(settings)  # one seed for both, so sampling differences come from the adapter alone
        base_messages = build_messages(message, history if base_history is None else base_history,
                                       settings.system_prompt)
        messages = build_messages(message, history, settings.system_prompt)
        signal = self._begin(stop)
        base_text = ""
        for base_text in self._stream(base_messages, settings, seed, signal, use_adapter=False):
            yield base_text, ""
        if signal.is_set():
            return
        for adapter_text in self._stream(messages, settings, seed, signal, use_adapter=True):
            yield base_text, adapter_text

    def complete(self, messages: list[dict[str, str]], settings: GenerationSettings, *,
                 use_adapter: bool = True) -> str:
        """The whole reply to ``messages`` at once."""
        return self.complete_many([messages], settings, use_adapter=use_adapter)[0]

    def complete_many(self, conversations: Sequence[list[dict[str, str]]], settings: GenerationSettings, *,
                      use_adapter: bool = True) -> list[str]:
        """The whole reply to each conversation, decoded together in batches (evaluation's ``generate`` mode)."""
        signal = self._begin(None)
        if self._compiled():
            return [_last(self._stream(m, settings, _seed(settings), signal, use_adapter)) for m in conversations]
        replies: list[str] = []
        fitted = [self.fit(m, settings.max_new_tokens)[:2] for m in conversations]
        step = self.decoder.max_batch  # one batch at a time, so the queue keeps room for other callers
        for start in range(0, len(conversations), step):
            handles = [self.submit(self.request(ids, replace(settings, max_new_tokens=budget), _seed(settings),
                                                use_adapter, signal))
                       for ids, budget in fitted[start:start + step]]
            replies += [self._base.tokenizer.decode([t.id for t in handle if not t.end], skip_special_tokens=True)
                        for handle in handles]
        return replies

    # ---- the decoder's requests (also used by serving/api.py)

    def encode(self, messages: list[dict[str, str]]) -> list[int]:
        """The prompt's token ids, rendered as in training."""
        tokenizer = self._require().tokenizer
        text, add_special_tokens = render_prompt(tokenizer, messages)
        return tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]

    def adapter_name(self, ref: AdapterRef | None) -> str | None:
        """The loaded adapter's name inside the PeftModel (None: the base model); ``ref`` None means the selected
        adapter."""
        ref = ref or (self.selected.adapter if self.selected else None)
        known = self._adapters.get(ref.location) if ref else None
        if known is None:
            raise ChatError(f"The adapter {ref.label if ref else ''} is not loaded: select it first.")
        return known[0]

    def request(self, prompt_ids: list[int], settings: GenerationSettings, seed: int, use_adapter: bool | str,
                *signals: threading.Event) -> Request:
        """A decoder request for ``prompt_ids``; ``use_adapter``: True for the selected adapter, False for the base,
        or a loaded adapter's name."""
        if isinstance(use_adapter, str):
            adapter = use_adapter
        else:
            adapter = self.adapter_name(None) if use_adapter else None
        return Request(prompt_ids, adapter, settings.max_new_tokens, self.eos_ids(), settings.temperature,
                       settings.top_p, seed, signals=signals)

    def eos_ids(self) -> tuple[int, ...]:
        """The model's own end tokens, plus the tokenizer's (a chat template's end-of-turn token, <|im_end|>)."""
        base = self._require()
        eos = base.model.generation_config.eos_token_id
        eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
        if base.tokenizer.eos_token_id is not None and base.tokenizer.eos_token_id not in eos_ids:
            eos_ids.append(base.tokenizer.eos_token_id)
        return tuple(eos_ids)

    def submit(self, request: Request) -> Handle:
        self._require()
        return self.decoder.submit(request)

    def _begin(self, stop: threading.Event | None) -> threading.Event:
        """What ends this generation: the caller's own signal, else the engine's, cleared (an earlier ``stop()``
        must not end a new answer)."""
        if stop is not None:
            return stop
        self._stop.clear()
        return self._stop

    @property
    def most_characters(self) -> int:
        return context.most_characters(self.context_length)

    def fit(self, messages: list[dict[str, str]], max_new_tokens: int) -> context.Fitted:
        """``messages`` fitted to the model's context (serving/context.py)."""
        return context.fit(messages, max_new_tokens, self.context_length, self.encode)

    def _stream(self, messages: list[dict[str, str]], settings: GenerationSettings, seed: int,
                stop: threading.Event, use_adapter: bool) -> Iterator[str]:
        """Yield the text as it grows, until done or ``stop`` is set."""
        ids, budget, notice = self.fit(messages, settings.max_new_tokens)
        settings = replace(settings, max_new_tokens=budget)
        if self._compiled():
            with self.using(use_adapter):
                yield from self._stream_compiled(ids, settings, seed, stop, notice)
            return
        started = time.perf_counter()
        handle = self.submit(self.request(ids, settings, seed, use_adapter, stop))
        tokenizer = self._base.tokenizer
        ids: list[int] = []
        text, generated = "", 0
        try:
            for token in handle:
                generated += 1
                if token.end:
                    continue
                ids.append(token.id)
                grown = tokenizer.decode(ids, skip_special_tokens=True)
                if grown != text and not grown.endswith("\ufffd"):  # not in the middle of a character
                    text = grown
                    yield text
        finally:
            handle.close()
            self.last_stats = GenerationStats(generated, time.perf_counter() - started, stop.is_set(), notice)
        if not text:  # an empty reply (the model ended at once) still reaches the UI
            yield text

    def _stream_compiled(self, prompt: list[int], settings: GenerationSettings, seed: int,
                         stop: threading.Event, notice: str | None) -> Iterator[str]:
        """Compiled decoding: ``generate`` in a thread, one request at a time; the caller holds the lock."""
        ids = torch.tensor([prompt], device=self.device)
        halt = threading.Event()  # set when the consumer goes away (e.g. the UI cancels), so the thread ends too
        criteria = _StopOn(ids.shape[1], stop, halt)
        streamer = TextIteratorStreamer(self._base.tokenizer, skip_prompt=True, skip_special_tokens=True)
        failure: list[BaseException] = []

        def work() -> None:
            try:
                self._peft.generate(**self._generate_kwargs(ids, settings, seed, criteria), streamer=streamer)
            except BaseException as err:  # re-raised in the consumer's thread below
                failure.append(err)
                streamer.end()  # unblock the consumer

        started = time.perf_counter()
        thread = threading.Thread(target=work, name="chat-generate", daemon=True)
        thread.start()
        text, yielded = "", False
        try:
            for piece in streamer:
                if piece:
                    text += piece
                    yielded = True
                    yield text
        finally:
            halt.set()
            thread.join()
            self.last_stats = GenerationStats(criteria.generated, time.perf_counter() - started, stop.is_set(),
                                              notice)
        if failure:
            raise ChatError(f"Generation failed: {failure[0]}") from failure[0]
        if not yielded:  # an empty reply (the model ended at once) still reaches the UI
            yield text

    def _generate_kwargs(self, ids: torch.Tensor, settings: GenerationSettings, seed: int,
                         criteria: _StopOn) -> dict[str, Any]:
        kwargs: dict[str, Any] = dict(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=settings.max_new_tokens,
            pad_token_id=self._base.tokenizer.pad_token_id, eos_token_id=list(self.eos_ids()) or None,
            stopping_criteria=StoppingCriteriaList([criteria]), do_sample=settings.temperature > 0,
            cache_implementation="static",  # with the compile config set in _warm_up: compiled decoding
        )
        if settings.temperature > 0:
            kwargs.update(temperature=settings.temperature, top_p=settings.top_p)
        torch.manual_seed(seed)  # under the lock, so the seed applies to this generate alone
        return kwargs


def _last(texts: Iterator[str]) -> str:
    text = ""
    for text in texts:
        pass
    return text


def _unloadable_base(ref: AdapterRef, err: Exception) -> ChatError:
    return ChatError(f"The base model of {ref.label} ({ref.base_model}) cannot be loaded: {err}")


def _seed(settings: GenerationSettings) -> int:
    return settings.seed if settings.seed is not None else random.randrange(2**31)


def _weights_mtime(location: str) -> float | None:
    """When the adapter's weights were written; None for a Hub id (the Hub cache does not change under us)."""
    weights = adapter_weights(Path(location))
    return weights.stat().st_mtime if weights is not None else None
