"""The Chat tab: talk to an adapter (a run's final adapter or one of its checkpoints, any adapter folder, or a Hub
adapter id), streamed, optionally side by side with its base model.

The engine modules (torch, transformers, peft) are imported inside the functions, through chat_module(): the app
must serve its first page before any of them is loaded.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import gradio as gr

from denselora_app.hub import access
from denselora_app.hub.access import AccessError, Action
from denselora_app.hub.hosting import on_gpu, on_zerogpu
from denselora_app.ui.messages import refusal, warn

if TYPE_CHECKING:
    from denselora_app.serving.adapters import AdapterRef
    from denselora_app.serving.chat import ChatEngine, GenerationSettings, LoadedAdapter

CHOOSE = "Choose a run's adapter or checkpoint above, or type an adapter folder or a Hub adapter id, then **Load**."
# Every event that uses the one model waits its turn in one queue (chat, loading an adapter, evaluation).
ENGINE_QUEUE: dict[str, Any] = dict(concurrency_id="chat-engine", concurrency_limit=1)

# The one ChatEngine of the app, shared by every browser session and by the Evaluate tab. It is module-level
# (rather than in gr.State) because it owns the single copy of the base model in memory: a per-session engine would
# load one model per visitor. It is created on first use so that building the app imports no torch.
_engine: ChatEngine | None = None
_engine_lock = threading.Lock()
# The stop signal of the answer each browser session is being given (keyed by gr.Request.session_hash; None for a
# call made without a page): Stop ends the caller's own answer, never another visitor's.
_stops: dict[str | None, threading.Event] = {}


def chat_module() -> ModuleType:
    """``denselora_app.serving.chat``, imported on first use after ``denselora_app.engine.models``, as the Train
    tab's loaders do.

    transformers and peft import each other. Two events importing them for the first time at once from opposite
    ends (this tab through peft, the Train tab's first parameter count through transformers) can each be handed the
    other's half-initialised module: "cannot import name 'AutoModel' from 'transformers'". One order avoids that.
    """
    from denselora_app.engine import models  # noqa: F401  (first: see above)
    from denselora_app.serving import chat

    return chat


def adapters_module() -> ModuleType:
    """``denselora_app.serving.adapters``, imported on first use in the same order as ``chat_module``."""
    chat_module()
    from denselora_app.serving import adapters

    return adapters


def engine() -> ChatEngine:
    """The app-wide ChatEngine (device and dtype "auto"; runs from $DENSELORA_RUNS at each call)."""
    global _engine
    with _engine_lock:
        if _engine is None:
            _engine = chat_module().ChatEngine()
        return _engine


# ---- which adapter -------------------------------------------------------------------------------------------------


def adapter_choices() -> list[tuple[str, str]]:
    """(label, adapter folder) of every run's final adapter and checkpoints, newest run first."""
    return [(ref.label, ref.location) for ref in adapters_module().available_adapters()]


def training_line() -> str:
    """A warning when a run is training on the chat's device (replies are slower, memory is shared), else ""."""
    notice = engine().training_notice()
    return warn(notice) if notice else ""


def _kept(chosen: str | None, choices: list[tuple[str, str]]) -> bool:
    """Whether a value already in the box stays: one of the listed adapters, or something the user typed (a folder
    or a Hub id). Only a folder that has gone (a deleted run's adapter) is dropped."""
    if not chosen or not chosen.strip():
        return False
    path = Path(chosen).expanduser()
    return chosen in {location for _, location in choices} or not path.is_absolute() or path.exists()


def selected_line(ref: AdapterRef | None) -> str:
    """The status line of an adapter put in the box without loading it (loading takes a while)."""
    if ref is None:
        return CHOOSE
    loaded = _engine.selected if _engine is not None else None
    if loaded is not None and loaded.adapter.location == ref.location:
        return describe(loaded)
    return f"Selected **{ref.label}**: it loads with your first message, or now with **Load**."


def _select(ref: AdapterRef | None, choices: list[tuple[str, str]]) -> tuple[Any, str, str]:
    return (gr.Dropdown(choices=choices, value=ref.location if ref else None), training_line(),
            selected_line(ref))


def _offered(who: access.Caller) -> list[AdapterRef]:
    """The adapters the caller may chat with (access.may_chat): every one the runs folder holds for the owner, the
    final adapters of the public runs for a visitor."""
    return [ref for ref in adapters_module().available_adapters() if access.may_chat(who, ref.location)]


def refresh_adapters(chosen: str | None = None, profile: gr.OAuthProfile | None = None) -> tuple[Any, str, Any]:
    """The adapter list as the runs folder holds it now (what the caller may chat with), the training notice and
    the status line.

    A value already chosen (or, by the owner, typed) is kept; otherwise the newest run's final adapter is put in the
    box, without loading it: that happens on the first message or with Load.
    """
    who = access.identify(profile)
    refs = _offered(who)
    choices = [(ref.label, ref.location) for ref in refs]
    if _kept(chosen, choices) and access.may_chat(who, chosen or ""):
        return gr.Dropdown(choices=choices), training_line(), gr.skip()
    return _select(next((ref for ref in refs if ref.checkpoint is None), None), choices)


def select_run(run_id: str | None, profile: gr.OAuthProfile | None = None) -> tuple[Any, str, str]:
    """The list with the final adapter of run ``run_id`` chosen (not loaded), the training notice and the status
    line: what "Chat with this adapter" in the Train tab leaves in the Chat tab."""
    who = access.identify(profile)
    refs = _offered(who)
    choices = [(ref.label, ref.location) for ref in refs]
    ref = next((r for r in refs if r.checkpoint is None and r.run_dir and Path(r.run_dir).name == run_id), None)
    if ref is None:
        public = "" if who.owner else " that is public on this Space"
        return gr.Dropdown(choices=choices), training_line(), warn(f"Run {run_id} has no final adapter{public}.")
    return _select(ref, choices)


def describe(loaded: LoadedAdapter) -> str:
    """The status line of a selected adapter: what it is, its base, trainable share, dtype and device."""
    ref = loaded.adapter
    line = (f"**{ref.label}** · {ref.method} adapter of `{ref.base_model}` · trainable "
            f"{loaded.trainable_percent:.4f}% of the base ({loaded.adapter_parameters:,} parameters) · "
            f"{loaded.dtype} on {loaded.device}" + (" · compiled decoding" if loaded.compiled else ""))
    return f"{line}\n\n{warn(loaded.notice)}" if loaded.notice else line


def load_adapter(adapter: str | None, profile: gr.OAuthProfile | None = None) -> str:
    """Load the adapter (and its base, unless the engine holds it already) and describe it; a visitor only a public
    run's final adapter."""
    if not adapter or not adapter.strip():
        return warn(CHOOSE)
    try:
        access.require_chat(access.identify(profile), adapter)
    except AccessError as err:
        return warn(err)
    return _load(adapter, *engine_settings())


def code_panel(request: gr.Request) -> str:
    """How to call the app's /v1 (ui/openai_api.py) with the models the engine serves now: its base, its adapters."""
    from denselora_app.ui.openai_api import code_panel as panel

    headers = request.headers if request is not None else {}
    host = headers.get("x-forwarded-host") or headers.get("host") or "127.0.0.1:7860"
    scheme = headers.get("x-forwarded-proto") or ("https" if host.endswith(".hf.space") else "http")
    served = []
    if _engine is not None:  # no engine yet: nothing is loaded, and nothing need be imported to say so
        from denselora_app.serving.api import engine_catalog

        served = [model.name for model in engine_catalog(_engine)()]
    return panel(f"{scheme}://{host}", served)


def engine_settings() -> tuple[str | None, bool]:
    """How the engine loads bases (quantization) and decodes (compiled): handed to the work on the device as
    arguments, since on ZeroGPU that work runs on the engine's copy in a process forked for the GPU, possibly before
    a setting changed (see hosting.on_gpu)."""
    return engine().quantization, engine().compile_decoding


def engine_with(quantization: str | None, compiled: bool) -> ChatEngine:
    """The engine, with the settings chosen on the page (the engine itself unchanged, except in a GPU process)."""
    chosen = engine()
    if chosen.quantization != quantization:
        chosen.quantization = quantization
    if chosen.compile_decoding != compiled:
        chosen.compile_decoding, chosen.compile_failure = compiled, None
    return chosen


def _load(adapter: str, quantization: str | None, compiled: bool) -> str:
    try:
        return describe(engine_with(quantization, compiled).select(adapter))
    except adapters_module().ChatError as err:
        return warn(err)


_load = on_gpu(_load, steps=lambda *_: 0)  # loading only: the load allowance


AS_TRAINED = "as trained"
BASE_PRECISIONS = [(AS_TRAINED, AS_TRAINED), ("full precision", "none"), ("4-bit (NF4)", "4bit"), ("8-bit", "8bit")]
_LABELS = {value: label for label, value in BASE_PRECISIONS}


def set_base_precision(precision: str, adapter: str | None, profile: gr.OAuthProfile | None = None) -> str:
    """Load base models in ``precision`` from now on ('as trained': as each adapter's run did); the selected
    adapter is loaded again on a base loaded that way."""
    if refused := refusal(profile, Action.CHAT_SETTINGS):
        return refused
    engine().quantization = None if precision == AS_TRAINED else precision
    if engine().selected is None or not adapter or not adapter.strip():
        how = "as their adapter was trained" if precision == AS_TRAINED else f"in {_LABELS[precision]}"
        return f"Base models will load {how}."
    return load_adapter(adapter, profile)


def set_compiled_decoding(compiled: bool, adapter: str | None, profile: gr.OAuthProfile | None = None) -> str:
    """Decode through torch.compile from now on (or not); the selected adapter is compiled for at once."""
    if refused := refusal(profile, Action.CHAT_SETTINGS):
        return refused
    engine().compile_decoding, engine().compile_failure = compiled, None
    if engine().selected is None or not adapter or not adapter.strip():
        return f"Compiled decoding {'on: the next adapter loaded is compiled for' if compiled else 'off'}."
    return load_adapter(adapter, profile)


# ---- talking -------------------------------------------------------------------------------------------------------


def _turn(role: str, content: str) -> dict[str, str]:
    return {"role": role, "content": content}


def _stats_line() -> str:
    stats = engine().last_stats
    if stats is None:
        return ""
    ended = " · stopped" if stats.stopped else ""
    line = (f"Last answer: {stats.tokens} tokens in {stats.seconds:.1f} s "
            f"({stats.tokens_per_second:.1f} tokens/s){ended}")
    return f"{line}\n\n{warn(stats.notice)}" if stats.notice else line


def send(
    message: str,
    history: list[dict[str, Any]] | None,
    base_history: list[dict[str, Any]] | None,
    adapter: str | None,
    compare: bool,
    system_prompt: str,
    temperature: float,
    top_p: float,
    max_new_tokens: int,
    seed: int | None,
    profile: gr.OAuthProfile | None = None,
    request: gr.Request | None = None,
) -> Iterator[tuple[Any, ...]]:
    """Answer ``message`` with the adapter, streaming; with ``compare``, the base model answers first in its own
    column, with the same seed and settings. A negative (or no) seed draws a new one for each answer. A visitor
    chats only with a public run's final adapter; Stop from the same browser session ends the answer.

    Yields the message box, the adapter's chat, the base's chat and the status line. A problem leaves the history
    as it was (and the message in its box) and is shown in the status line.
    """
    core = chat_module()
    history, base_history = list(history or []), list(base_history or [])
    if not message or not message.strip():
        yield gr.skip(), gr.skip(), gr.skip(), warn("Type a message first.")
        return
    try:
        settings = core.GenerationSettings(max_new_tokens=int(max_new_tokens), temperature=float(temperature),
                                           top_p=float(top_p), seed=None if seed is None or seed < 0 else int(seed),
                                           system_prompt=system_prompt or "")
        if not adapter or not adapter.strip():
            raise core.ChatError(CHOOSE)
        access.require_chat(access.identify(profile), adapter)
    except (core.ChatError, AccessError) as err:
        yield gr.skip(), gr.skip(), gr.skip(), warn(err)
        return
    session = _session(request)
    stop = _stops[session] = threading.Event()  # this answer's own: stop_chat from the same session sets it
    answer = _answer(adapter, *engine_settings(), message, history, base_history, compare, settings, session)
    try:
        for update in answer:
            yield update
            if stop.is_set() and on_zerogpu():
                # The answer streams from ZeroGPU's GPU process, which no Event of this one reaches: closing the
                # stream ends the GPU call there.
                answer.close()
                yield gr.skip(), gr.skip(), gr.skip(), "Stopped."
                return
    finally:
        if _stops.get(session) is stop:
            del _stops[session]


def _session(request: gr.Request | None) -> str | None:
    """The browser session a call comes from (gradio's session hash), whose Stop ends its own answer only."""
    return request.session_hash if request is not None else None


def _answer(adapter: str, quantization: str | None, compiled: bool, message: str, history: list[dict[str, Any]],
            base_history: list[dict[str, Any]], compare: bool, settings: GenerationSettings,
            session: str | None = None) -> Iterator[tuple[Any, ...]]:
    """``send``'s work on the device: select the adapter, then stream the answer. On ZeroGPU this is the call that
    holds the GPU (hosting.on_gpu), so it takes everything as arguments and yields its problems."""
    core = chat_module()
    try:
        # Cheap when the adapter is loaded already; it also picks it again if another tab switched the engine.
        status = describe(engine_with(quantization, compiled).select(adapter))
    except core.ChatError as err:
        yield gr.skip(), gr.skip(), gr.skip(), warn(err)
        return

    def with_reply(past: list[dict[str, Any]], text: str) -> list[dict[str, Any]]:
        return [*past, _turn("user", message), _turn("assistant", text)]  # a new list per update

    chat, base_chat = with_reply(history, ""), (with_reply(base_history, "") if compare else gr.skip())
    yield "", chat, base_chat, status
    stop = _stops.get(session)  # send's, in this process; in a ZeroGPU process none (send closes the stream)
    try:
        if compare:
            for base_text, text in engine().stream_compare(message, history, settings, base_history=base_history,
                                                           stop=stop):
                chat, base_chat = with_reply(history, text), with_reply(base_history, base_text)
                yield gr.skip(), chat, base_chat, gr.skip()
        else:
            for text in engine().stream_reply(message, history, settings, stop=stop):
                chat = with_reply(history, text)
                yield gr.skip(), chat, gr.skip(), gr.skip()
    except core.ChatError as err:
        yield gr.skip(), chat, base_chat, f"{status}\n\n{warn(err)}"
        return
    yield gr.skip(), chat, base_chat, f"{status}\n\n{_stats_line()}"


def _answer_steps(adapter: str, quantization: str | None, compiled: bool, message: str, history: Any,
                  base_history: Any, compare: bool, settings: GenerationSettings, session: str | None = None) -> int:
    """The most tokens ``_answer`` generates: one answer, or two when the base answers too."""
    return settings.max_new_tokens * (2 if compare else 1)


_answer = on_gpu(_answer, steps=_answer_steps)


def stop_chat(request: gr.Request | None = None) -> None:
    """End the answer being generated for the caller's own browser session after its current token (in compare
    mode, the adapter's answer is skipped); another visitor's answer goes on."""
    if (stop := _stops.get(_session(request))) is not None:
        stop.set()


def toggle_compare(compare: bool, history: list[dict[str, Any]] | None) -> Any:
    """Show the base model's column; it starts from the conversation so far and then keeps its own answers."""
    return gr.Chatbot(value=list(history or []) if compare else [], visible=compare)


def clear_history() -> tuple[list, list]:
    return [], []


# ---- layout --------------------------------------------------------------------------------------------------------


@dataclass
class ChatTab:
    refresh_inputs: list[Any]  # what refresh_adapters reads, when the tab is opened
    refresh_outputs: list[Any]  # what refresh_adapters and select_run fill


def build(demo: gr.Blocks) -> ChatTab:
    """The Chat tab's components and events; call inside ``demo``'s context (and a gr.Tab)."""
    with gr.Row(equal_height=False):
        adapter = gr.Dropdown([], value=None, label="Adapter", allow_custom_value=True, scale=5,
                              info="A run's final adapter or a checkpoint; or type an adapter folder or a Hub "
                                   "adapter id", elem_id="chat-adapter")
        with gr.Column(scale=1, min_width=140):
            load_button = gr.Button("Load", variant="primary", elem_id="chat-load")
            refresh_button = gr.Button("Refresh list", size="sm", elem_id="chat-refresh")
    notice = gr.Markdown(elem_id="chat-notice")
    status = gr.Markdown(CHOOSE, elem_id="chat-status")
    with gr.Row(equal_height=False):
        with gr.Column(scale=4):
            compare = gr.Checkbox(False, label="Compare with base",
                                  info="The base model (adapter off) answers too, side by side, with the same seed "
                                       "and settings", elem_id="chat-compare")
            with gr.Row():
                base_chatbot = gr.Chatbot(label="Base model (adapter off)", visible=False, height=460,
                                          elem_id="chat-base")
                chatbot = gr.Chatbot(label="Adapter", height=460, elem_id="chat-adapter-reply")
            with gr.Row():
                message = gr.Textbox(placeholder="Type a message and press Enter", show_label=False, scale=5,
                                     elem_id="chat-message")
                send_button = gr.Button("Send", variant="primary", scale=0, elem_id="chat-send")
                stop_button = gr.Button("Stop", variant="stop", scale=0, elem_id="chat-stop")
            clear_button = gr.Button("Clear history", size="sm", elem_id="chat-clear")
        with gr.Column(scale=1, min_width=240):
            system_prompt = gr.Textbox(label="System prompt", placeholder="Optional", lines=3,
                                       elem_id="chat-system")
            temperature = gr.Slider(0.0, 2.0, value=0.7, step=0.05, label="Temperature",
                                    info="0: greedy (deterministic)", elem_id="chat-temperature")
            top_p = gr.Slider(0.05, 1.0, value=0.9, step=0.05, label="Top-p", elem_id="chat-top-p")
            max_new_tokens = gr.Slider(1, 2048, value=256, step=1, label="Max new tokens",
                                       elem_id="chat-max-new-tokens")
            seed = gr.Number(-1, label="Seed", info="-1: a new random seed for each answer", precision=0,
                             minimum=-1, elem_id="chat-seed")
            base_precision = gr.Dropdown(BASE_PRECISIONS, value=AS_TRAINED, label="Base model in",
                                         info="4-bit or 8-bit needs less memory; 'as trained' matches the run",
                                         elem_id="chat-base-precision")
            compiled = gr.Checkbox(False, label="Compiled decoding",
                                   info="torch.compile: a slow first compile when the adapter loads, faster "
                                        "answers after it", elem_id="chat-compiled")
    with gr.Accordion("Use it from your code", open=False, elem_id="chat-code"):
        code = gr.Markdown(elem_id="chat-code-panel")

    refresh_button.click(refresh_adapters, inputs=[adapter], outputs=[adapter, notice, status],
                         api_name="chat_adapters")
    gr.on([load_button.click, adapter.select], load_adapter, inputs=[adapter], outputs=[status],
          api_name="chat_load", **ENGINE_QUEUE).then(code_panel, outputs=[code], api_visibility="private")
    demo.load(code_panel, outputs=[code], api_visibility="private")
    gr.on([send_button.click, message.submit], send,
          inputs=[message, chatbot, base_chatbot, adapter, compare, system_prompt, temperature, top_p,
                  max_new_tokens, seed],
          outputs=[message, chatbot, base_chatbot, status], api_name="chat", show_progress="minimal",
          **ENGINE_QUEUE)
    base_precision.input(set_base_precision, inputs=[base_precision, adapter], outputs=[status],
                         api_name="chat_base_precision", **ENGINE_QUEUE)
    compiled.input(set_compiled_decoding, inputs=[compiled, adapter], outputs=[status], api_name="chat_compiled",
                   **ENGINE_QUEUE)
    # Not in the engine's queue: Stop must run while an answer is being generated.
    stop_button.click(stop_chat, api_name="chat_stop")
    compare.input(toggle_compare, inputs=[compare, chatbot], outputs=[base_chatbot], api_visibility="private")
    clear_button.click(clear_history, outputs=[chatbot, base_chatbot], api_visibility="private")
    return ChatTab(refresh_inputs=[adapter], refresh_outputs=[adapter, notice, status])
