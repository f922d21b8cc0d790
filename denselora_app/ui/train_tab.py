"""The Train tab: model, data, method and training settings, presets, Start/Stop, and the live view of a run.

Event functions are plain functions that take control values and return new ones; the engine does the work
(``models``, ``data``, ``methods``, ``runs``). Functions that take the whole form receive it as keyword arguments
named like the RunConfig fields (gradio's ``inputs_kwargs``), which also names the API parameters after them.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

import gradio as gr
import pandas as pd

from .. import access, jobs, rules
from .. import config as C
from ..access import AccessError, Action
from ..config import ConfigError, RunConfig, StudioError, field_help
from ..hosting import space_id
from ..rules import DEVICE_KINDS
# resolve_run without outside_root: the app reaches only the runs in the runs folder (a Space's visitors call it).
from ..runs import RunError, format_rate, resolve_run
from . import charts, forms, loaders, run_view
from .messages import warn

log = logging.getLogger(__name__)

REFRESH_SECONDS = 2.0
# Offered until a model is checked: the Linear layers of LLaMA-style models, which the default model is.
LLAMA_LINEAR_NAMES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
QUANTIZATION_LABELS = ("full precision (dtype)", "4-bit (NF4)", "8-bit (LLM.int8)")  # for C.QUANTIZATIONS, in order
PREVIEW_FIELDS = ("model", "trust_remote_code", "data", "data_format", "cutoff_len", "train_on_inputs")
PREVIEW_OUTPUTS = 7  # data message, detected format, preview box, rows, examples, histogram, report
TRAINED = "trained"
CELL_CHARS = 300
ON_THIS_MACHINE, ON_JOBS = "this machine", "jobs"  # where a run trains ("Train on")


def _owner(profile: gr.OAuthProfile | None) -> access.Caller:
    """The caller, who must be allowed to train here (access.py): everything in this tab's form reads the server's
    files or models, writes runs or presets, or spends compute. AccessError otherwise."""
    who = access.identify(profile)
    access.require(who, Action.TRAIN)
    return who


# ---- model ---------------------------------------------------------------------------------------------------------


def check_model(model: str, trust_remote_code: bool, target_modules: list[str],
                profile: gr.OAuthProfile | None = None) -> tuple[str, Any]:
    """Resolve the model spec: its summary line, and the target-module choices from its own Linear layers."""
    try:
        _owner(profile)
        access.check_model(model)
        info = loaders.model_info(model, trust_remote_code)
    except (AccessError, *loaders.model_errors()) as err:
        return warn(err), gr.skip()
    names = list(info.linear_names)
    # Keep what the user chose where the model has it; otherwise the paper's targets, otherwise the first layer.
    kept = ([n for n in target_modules or [] if n in names] or [n for n in C.PAPER_TARGETS if n in names]
            or names[:1])
    context = f" · context {info.max_position_embeddings:,} tokens" if info.max_position_embeddings else ""
    layers = ", ".join(f"`{n}`" for n in names)
    text = f"**Model:** {info.summary()}{context}\n\nAdaptable Linear layers: {layers}"
    return text, gr.CheckboxGroup(choices=names, value=kept)


def parameter_line(profile: gr.OAuthProfile | None = None, **settings: Any) -> tuple[str, str, str]:
    """'Trainable parameters: N (x%) - LoRA at this rank: M (y%)', the memory planner's line for the current
    form on its device (with the changes that would make the run fit, when it does not), and what choosing
    DenseLoRA or LoRA means here (methods.method_comparison), shown by the Method choice."""
    try:
        _owner(profile)
        cfg = forms.config_from_settings(settings)
        access.check_model(cfg.model)
        model_config = loaders.model_config(cfg.model, cfg.trust_remote_code)
        from ..methods import count_parameters

        counts = count_parameters(model_config, cfg)
    except (ConfigError, AccessError) as err:
        return warn(err), "", ""
    except loaders.model_errors() as err:
        return warn(f"Cannot count parameters: {err}"), "", ""
    from ..methods import method_comparison

    try:
        from ..memory import plan_memory
        from ..models import resolve_device

        plan = plan_memory(model_config, cfg, counts, str(resolve_device(cfg.device)))
    except loaders.model_errors() as err:
        return (counts.summary(cfg.method), warn(f"Cannot plan the memory: {err}"),
                method_comparison(counts, rank=cfg.r, docs=benchmarks_link()))
    memory = {m: plan.for_method(m, n).total_text for m, n in counts.by_method.items()}
    comparison = method_comparison(counts, memory, rank=cfg.r, docs=benchmarks_link())
    if plan.fits:
        return counts.summary(cfg.method), plan.summary(), comparison
    return counts.summary(cfg.method), f"{warn(plan.summary())}\n\n{plan.advice(bullets=True)}", comparison


def benchmarks_link() -> str:
    """Where the method measurements are described: the Space's own copy of docs/benchmarks.md on a Space, the
    file in the studio's folder elsewhere."""
    from ..methods import BENCHMARKS_DOC

    space = space_id()
    if space:
        return f"[{BENCHMARKS_DOC}](https://huggingface.co/spaces/{space}/blob/main/{BENCHMARKS_DOC})"
    return f"`{BENCHMARKS_DOC}` in the studio's folder"


def checkpointing_for(quantization: str) -> Any:
    """A quantized base is for a model that barely fits: gradient checkpointing goes on with it (as RunConfig's
    default does); it can be turned off again."""
    return gr.skip() if quantization == "none" else True


# ---- data ----------------------------------------------------------------------------------------------------------


def _cell(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    return text if len(text) <= CELL_CHARS else text[:CELL_CHARS] + "…"


def _highlighted(examples: list[list[tuple[str, bool]]]) -> list[tuple[str, str | None]]:
    pieces: list[tuple[str, str | None]] = []
    for number, example in enumerate(examples, start=1):
        pieces.append((f"\n── example {number} ──\n" if number > 1 else "── example 1 ──\n", None))
        pieces.extend((text, TRAINED if trained else None) for text, trained in example)
    return pieces


def _no_preview(message: str) -> tuple[Any, ...]:
    return gr.Markdown(message, visible=bool(message)), "", gr.Column(visible=False), None, None, None, ""


def preview_data(
    profile: gr.OAuthProfile | None = None, *, model: str, trust_remote_code: bool, data: str, data_format: str,
    cutoff_len: int, train_on_inputs: bool
) -> tuple[Any, ...]:
    """What the data looks like to the model before any training.

    Returns the data message (an error, or the rows that will be dropped), the detected format, the preview's
    visibility, the first rows, examples with trained tokens highlighted, the token-length histogram, and the data
    report.
    """
    from ..data import DataError, render_preview

    try:
        who = _owner(profile)
        cfg = RunConfig(model=model, data=data, data_format=data_format, cutoff_len=cutoff_len,
                        train_on_inputs=train_on_inputs, trust_remote_code=trust_remote_code)
        access.check_config(who, cfg)
    except (ConfigError, AccessError) as err:
        return _no_preview(warn(err))
    if not cfg.data:
        return _no_preview(warn("Choose training data: upload a file, type a path or a Hub dataset name."))
    try:
        tokenizer = loaders.tokenizer(cfg.model, cfg.trust_remote_code)
    except loaders.model_errors() as err:
        return _no_preview(warn(f"Cannot preview the data without the model's tokenizer: {err}"))
    try:
        preview = render_preview(loaders.data_source(cfg), tokenizer, fmt=cfg.data_format,
                                 cutoff_len=cfg.cutoff_len, train_on_inputs=cfg.train_on_inputs)
    except DataError as err:
        return _no_preview(warn(err))
    report = preview["report"]
    message = ""
    if report.dropped:
        dropped = sum(report.dropped.values())
        message = warn(f"{dropped} of {report.rows_read} rows will be dropped:\n\n"
                        + "\n".join(f"- {problem}" for problem in report.problems))
    how = "detected" if cfg.data_format == "auto" else "chosen"
    detected = (f"Format: **{preview['format']}** ({how}) · columns: "
                + ", ".join(f"`{c}`" for c in preview["columns"]) + f" · {report.rows_used} rows usable")
    lengths = charts.length_histogram(preview["lengths"], cfg.cutoff_len)
    rows = pd.DataFrame([[_cell(row.get(c, "")) for c in preview["columns"]] for row in preview["rows"]],
                        columns=preview["columns"])
    return (
        gr.Markdown(message, visible=bool(message)),
        detected,
        gr.Column(visible=True),
        rows,
        _highlighted(preview["examples"]),
        gr.BarPlot(lengths, sort=list(dict.fromkeys(lengths["tokens"]))),  # bins in token order, not A-Z
        report.summary(),
    )


def upload_data(file: str | None, profile: gr.OAuthProfile | None = None, **settings: Any) -> tuple[Any, ...]:
    """Store an uploaded file in the caller's uploads (runs/uploads/, on a Space runs/uploads/<user>/) and preview
    it; the data box then points at the stored copy. Only a file gradio received as an upload is taken.

    The upload area is emptied again (first output), ready for another file: the data box shows which one is used.
    """
    from ..data import DataError

    if not file:
        return gr.skip(), gr.skip(), *_no_preview("")
    try:
        who = _owner(profile)
        access.check_uploaded(file)
        stored = str(loaders.store_upload(file, who))
    except (DataError, AccessError) as err:
        return None, gr.skip(), *_no_preview(warn(err))
    return None, stored, *preview_data(profile, **{**settings, "data": stored})


# ---- presets and the command ---------------------------------------------------------------------------------------


def load_preset(name: str | None, target_choices: list[str],
                profile: gr.OAuthProfile | None = None) -> tuple[Any, ...]:
    """Fill every control from a preset file, then a message and the preview of the preset's data."""
    if not name:
        return *[gr.skip()] * len(forms.FIELDS), warn("Choose a preset first."), *[gr.skip()] * PREVIEW_OUTPUTS
    try:
        _owner(profile)
        cfg = forms.load_preset(name)
    except (ConfigError, AccessError) as err:
        return *[gr.skip()] * len(forms.FIELDS), warn(err), *[gr.skip()] * PREVIEW_OUTPUTS
    values: list[Any] = []
    for field in forms.FIELDS:
        value = getattr(cfg, field)
        if field == "target_modules":  # the preset may name layers the checked model did not list
            value = gr.CheckboxGroup(choices=list(dict.fromkeys([*target_choices, *value])), value=value)
        values.append(value)
    preview = preview_data(profile, **{field: getattr(cfg, field) for field in PREVIEW_FIELDS})
    return *values, f"Loaded preset `{name}`.", *preview


def preset_choices(profile: gr.OAuthProfile | None = None) -> Any:
    """The preset files as they are now (a page built earlier would only know the ones there at start-up); a
    visitor's list is left as it is."""
    if not access.allowed(access.identify(profile), Action.TRAIN):
        return gr.skip()
    return gr.Dropdown(choices=forms.list_presets())


def save_preset(preset_name: str, profile: gr.OAuthProfile | None = None, **settings: Any) -> tuple[str, Any]:
    """Save the form as a preset in the user's presets folder (forms.save_preset: never over a shipped one)."""
    try:
        _owner(profile)
        path = forms.save_preset(forms.config_from_settings(settings), preset_name)
    except (ConfigError, AccessError, OSError) as err:
        return warn(err), gr.skip()
    return f"Saved `{path}`.", gr.Dropdown(choices=forms.list_presets(), value=path.name)


def show_command(preset: str | None, profile: gr.OAuthProfile | None = None, **settings: Any) -> str:
    try:
        _owner(profile)
        return forms.cli_command(forms.config_from_settings(settings), preset or None)
    except (ConfigError, AccessError) as err:
        return warn(err)


# ---- start, stop and the live view ---------------------------------------------------------------------------------


def _token(oauth_token: gr.OAuthToken | None) -> str | None:
    return oauth_token.token if oauth_token is not None else None


def start_training(profile: gr.OAuthProfile | None = None, oauth_token: gr.OAuthToken | None = None, *,
                   train_on: str = ON_THIS_MACHINE, jobs_flavor: str = rules.JOBS_DEFAULT_FLAVOR,
                   jobs_source: str = "", jobs_repo: str = "", jobs_timeout: str = rules.JOBS_DEFAULT_TIMEOUT,
                   **settings: Any) -> tuple[str, str | None, Any]:
    """Start the run the form describes, through the engine's launch (the same checks as the CLI: model, adapter,
    data, device), on this machine or on Hugging Face Jobs (with the signed-in user's token, else HF_TOKEN or the
    login). Returns the message, the run id to watch (unchanged when refused) and the live-view timer."""
    from ..launch import launch

    try:
        who = _owner(profile)
        cfg = forms.config_from_settings(settings)
        access.check_config(who, cfg)
        target = jobs.JobsTarget(jobs_flavor, jobs_source.strip() or None, jobs_repo.strip() or None,
                                 jobs_timeout) if train_on == ON_JOBS else None
        run = launch(cfg, jobs=target, token=_token(oauth_token), load_config=loaders.model_config,
                     load_tokenizer=loaders.tokenizer)
    except StudioError as err:  # ConfigError, AccessError, LaunchError, JobsError
        return warn(f"Not started. {err}"), gr.skip(), gr.skip()
    log.info("Started run %s", run.id)
    if (job := run.job()) is not None:
        return (f"Submitted run `{run.id}` to Hugging Face Jobs ({job.flavor}): [its job]({job.url}). It trains "
                f"there and uploads its results to `{job.repo_id}` (private); this page follows it."), run.id, \
            gr.Timer(active=True)
    return (f"Started run `{run.id}`. It trains in its own process: closing or reloading this page does not "
            "stop it."), run.id, gr.Timer(active=True)


def stop_training(run_id: str | None, profile: gr.OAuthProfile | None = None,
                  oauth_token: gr.OAuthToken | None = None) -> str:
    """Stop the watched run: a graceful stop here, or cancelling its job on Hugging Face Jobs."""
    from ..launch import stop_run

    try:
        _owner(profile)
        if not run_id:
            return warn("No run to stop.")
        return stop_run(resolve_run(run_id), token=_token(oauth_token))
    except StudioError as err:  # RunError, AccessError, JobsError
        return warn(err)


def find_learning_rate(profile: gr.OAuthProfile | None = None, **settings: Any) -> tuple[str, str | None, Any, Any]:
    """Start a learning-rate search with the form's settings (the method's default spread of rates), on this
    machine, through the same launch as Start. Returns the message, the run id to watch, the live-view timer and
    a cleared trials chart (a chart keeps the series it was first drawn with; another search has other rates)."""
    from ..launch import launch
    from ..lr_finder import plan_search

    try:
        who = _owner(profile)
        cfg = forms.config_from_settings(settings)
        access.check_config(who, cfg)
        plan = plan_search(cfg)
        run = launch(cfg, search=plan, load_config=loaders.model_config, load_tokenizer=loaders.tokenizer)
    except StudioError as err:  # ConfigError, AccessError, LaunchError
        return warn(f"Not started. {err}"), gr.skip(), gr.skip(), gr.skip()
    log.info("Started learning-rate search %s", run.id)
    rates = ", ".join(format_rate(rate) for rate in plan.rates)
    return (f"Started learning-rate search `{run.id}`: {len(plan.rates)} trials of {plan.steps} steps on this "
            f"machine, at {rates}. When it ends, **Use this rate** puts the best one in the form."), run.id, \
        gr.Timer(active=True), None


def use_found_rate(run_id: str | None, profile: gr.OAuthProfile | None = None) -> tuple[Any, str]:
    """"Use this rate": the watched search's chosen rate into the form's learning-rate field, and a message."""
    try:
        who = _owner(profile)
        run = resolve_run(run_id or "")
        access.require(who, Action.VIEW, run)
    except StudioError as err:  # RunError, AccessError
        return gr.skip(), warn(err)
    search = run.lr_search()
    if search is None or search.chosen is None:
        return gr.skip(), warn(f"Run `{run.id}` has no chosen learning rate.")
    return search.chosen, f"Learning rate set to {format_rate(search.chosen)}, found by `{run.id}`."


def live_status(run_id: str | None, profile: gr.OAuthProfile | None = None,
                oauth_token: gr.OAuthToken | None = None) -> tuple[Any, ...]:
    """Everything the live view shows for one run (one the caller may see); the timer keeps ticking only while the
    run is active."""
    nothing = (gr.Column(visible=False), None, None, None, None, "", "", gr.Timer(active=False),
               gr.LinePlot(visible=False), gr.Row(visible=False), None)
    if not run_id:
        return "No run yet: set things up above and press **Start training**.", "", *nothing
    try:
        run = resolve_run(run_id)
        who = access.identify(profile)
        access.require(who, Action.VIEW, run)
    except (RunError, AccessError) as err:
        return warn(err), "", *nothing
    problem = run_view.follow_job(run, who, _token(oauth_token))  # a run on Hugging Face Jobs: what its job says
    facts = run.facts()
    shown = run_view.run_charts(run.metrics())
    search = run_view.search_charts(run)  # a learning-rate search: one curve per trial instead of the loss chart
    return (
        run_view.header_markdown(facts) + (f"\n\n{warn(problem)}" if problem else ""),
        run_view.progress_html(facts.status, facts.job),
        gr.Column(visible=True),
        gr.LinePlot(shown.loss, visible=search is None),
        shown.learning_rate,
        shown.grad_norm,
        shown.tokens_per_second,
        run_view.outcome_markdown(run, facts),
        run.own_log_tail(run_view.LOG_LINES),
        gr.Timer(active=facts.state.active),
        gr.LinePlot(search.trials, color_map=search.colors, visible=True) if search else gr.LinePlot(visible=False),
        gr.Row(visible=search is not None and search.chosen is not None),
        search.chosen if search else None,
    )


def restore_run(profile: gr.OAuthProfile | None = None) -> str | None:
    """The run a freshly loaded page watches: of those the caller may see, the one training now, else the most
    recent."""
    runs = access.visible_runs(access.identify(profile))
    active = next((r for r in runs if r.status().active), None)
    chosen = active or (runs[0] if runs else None)
    return chosen.id if chosen else None


# ---- after the run -------------------------------------------------------------------------------------------------


def has_final_adapter(run_id: str | None) -> bool:
    """Whether the run has ended (completed or stopped: the worker saves the adapter before it says so) and its
    final adapter is on disk."""
    from ..runs import RunState

    if not run_id:
        return False
    try:
        run = resolve_run(run_id)
        return run.status().state in (RunState.COMPLETED, RunState.STOPPED) and run.has_adapter()
    except (RunError, OSError):
        return False


def chat_offer(run_id: str | None, profile: gr.OAuthProfile | None = None) -> Any:
    """The "Chat with this adapter" button: shown once the watched run has ended with its final adapter (and the
    caller may chat with it), hidden while it trains, when it failed, or when there is no run."""
    try:
        shown = has_final_adapter(run_id) and access.allowed(access.identify(profile), Action.CHAT,
                                                             resolve_run(run_id or ""))
    except RunError:
        shown = False
    return gr.Button(visible=shown)


# ---- layout --------------------------------------------------------------------------------------------------------


@dataclass
class TrainTab:
    start_event: Any  # other tabs refresh after these
    stop_event: Any
    run_state: Any = None  # the id of the run the live view watches
    chat_button: Any = None  # "Chat with this adapter" (app.py switches to the Chat tab with it)
    search_event: Any = None  # "Find learning rate" started a search


def build(demo: gr.Blocks) -> TrainTab:
    """The Train tab's components and events; call inside ``demo``'s context (and a gr.Tab)."""
    cfg, preset = forms.initial_config()
    controls: dict[str, Any] = {}

    def number(name: str, label: str, integer: bool = False) -> gr.Number:
        controls[name] = gr.Number(getattr(cfg, name), label=label, info=field_help(name),
                                   precision=0 if integer else None, elem_id=f"cfg-{name}")
        return controls[name]

    with gr.Row(equal_height=False):
        with gr.Column(scale=3):
            gr.Markdown("### 1 · Model")
            with gr.Row():
                controls["model"] = gr.Textbox(cfg.model, label="Base model", info=field_help("model"), scale=4,
                                               elem_id="cfg-model")
                check_button = gr.Button("Check model", scale=1, elem_id="check-model")
            model_info = gr.Markdown(elem_id="model-info")
        with gr.Column(scale=2):
            gr.Markdown("### Presets")
            with gr.Row():
                preset_choice = gr.Dropdown(forms.list_presets(), value=preset, label="Preset", scale=3,
                                            elem_id="preset")
                load_button = gr.Button("Load", scale=1, elem_id="load-preset")
            with gr.Row():
                preset_name = gr.Textbox(label="Save as", placeholder="my-preset", scale=3, elem_id="preset-name")
                save_button = gr.Button("Save preset", scale=1, elem_id="save-preset")
            with gr.Row():
                command_button = gr.Button("Show command", size="sm", elem_id="show-command")
            preset_message = gr.Markdown(elem_id="preset-message")
            command = gr.Markdown(elem_id="command")

    gr.Markdown("### 2 · Data")
    with gr.Row(equal_height=False):
        with gr.Column(scale=2):
            upload = gr.File(label="Upload a dataset (.jsonl .json .csv .parquet .txt)",
                             file_types=list(loaders.UPLOAD_TYPES), elem_id="upload", height=120)
            data_message = gr.Markdown(visible=False, line_breaks=True, elem_id="data-message",
                                       elem_classes=["dl-warning"])
        with gr.Column(scale=3):
            controls["data"] = gr.Textbox(cfg.data, label="Dataset", elem_id="cfg-data",
                                          info="A file path, a Hub dataset (owner/name or owner/name:split), or "
                                               f"{C.SAMPLE_DATA} (the shipped sample).")
            with gr.Row():
                controls["data_format"] = gr.Dropdown(list(C.DATA_FORMATS), value=cfg.data_format, label="Format",
                                                      info=field_help("data_format"), elem_id="cfg-data_format",
                                                      scale=2)
                preview_button = gr.Button("Preview data", scale=1, elem_id="preview-data")
            detected = gr.Markdown(elem_id="detected-format")
    with gr.Column(visible=False) as preview_box, gr.Row(equal_height=False):
        with gr.Column(scale=3):
            rows_table = gr.Dataframe(label="First rows", interactive=False, wrap=True, max_height=260,
                                      elem_id="data-rows")
            examples = gr.HighlightedText(label="Examples as the model sees them (highlighted: trained tokens)",
                                          color_map={TRAINED: "green"}, show_legend=True, elem_id="data-examples")
        with gr.Column(scale=2):
            histogram = gr.BarPlot(x="tokens", y="rows", color="fit", color_map=charts.LENGTH_COLORS,
                                   title="Tokens per row, up to the cutoff", x_title="tokens", y_title="rows",
                                   x_label_angle=-45, height=260, elem_id="length-histogram")
            report = gr.Textbox(label="Data report", lines=6, max_lines=14, interactive=False,
                                elem_id="data-report")

    gr.Markdown("### 3 · Method")
    with gr.Row():
        controls["method"] = gr.Radio([("DenseLoRA", "denselora"), ("LoRA", "lora")], value=cfg.method,
                                      label="Method", info=field_help("method"), elem_id="cfg-method")
        controls["r"] = gr.Slider(1, 256, value=cfg.r, step=1, label="Rank", elem_id="cfg-r",
                                  info="Width of the adapter: more rank, more trainable parameters (see below).")
        number("alpha", "Alpha")
        controls["dropout"] = gr.Slider(0, 0.9, value=cfg.dropout, step=0.01, label="Dropout",
                                        info=field_help("dropout"), elem_id="cfg-dropout")
        controls["dropout_placement"] = gr.Dropdown(list(C.DROPOUT_PLACEMENTS), value=cfg.dropout_placement,
                                                    label="Dropout placement", info=field_help("dropout_placement"),
                                                    elem_id="cfg-dropout_placement")
        controls["activation"] = gr.Dropdown(list(C.ACTIVATIONS), value=cfg.activation, label="Activation",
                                             info=field_help("activation"), elem_id="cfg-activation")
        number("init_scale", "Init scale of E, M")
        number("shared_lr_scale", "Shared E, D rate x")
        controls["quantization"] = gr.Dropdown(list(zip(QUANTIZATION_LABELS, C.QUANTIZATIONS, strict=True)),
                                               value=cfg.quantization, label="Base model in",
                                               info=field_help("quantization"), elem_id="cfg-quantization")
    with gr.Accordion("DenseLoRA or LoRA: this run's figures and the measured accuracy", open=True,
                      elem_id="method-accordion"):
        method_line = gr.Markdown(elem_id="method-comparison")
    controls["target_modules"] = gr.CheckboxGroup(
        list(dict.fromkeys([*LLAMA_LINEAR_NAMES, *cfg.target_modules])), value=cfg.target_modules,
        label="Target modules", info=field_help("target_modules") + " Check the model to list its own.",
        elem_id="cfg-target_modules")
    param_line = gr.Markdown("Trainable parameters: counting…", elem_id="parameter-line")
    memory_line = gr.Markdown(elem_id="memory-line")

    gr.Markdown("### 4 · Training")
    with gr.Row():
        number("learning_rate", "Learning rate")
        number("num_epochs", "Epochs")
        number("max_steps", "Max steps", integer=True)
        number("batch_size", "Batch size", integer=True)
        number("grad_accum", "Gradient accumulation", integer=True)
    with gr.Row():
        number("cutoff_len", "Cutoff (tokens)", integer=True)
        number("warmup_steps", "Warmup steps", integer=True)
        number("val_size", "Validation size")
        number("seed", "Seed", integer=True)
        controls["gradient_checkpointing"] = gr.Checkbox(cfg.checkpointing, label="Gradient checkpointing",
                                                         info=field_help("gradient_checkpointing"),
                                                         elem_id="cfg-gradient_checkpointing")
        controls["packing"] = gr.Checkbox(cfg.packing, label="Packing (no padding)", info=field_help("packing"),
                                          elem_id="cfg-packing")
    with gr.Accordion("Advanced settings", open=False, elem_id="advanced"):
        with gr.Row():
            controls["lr_scheduler"] = gr.Dropdown(list(C.SCHEDULERS), value=cfg.lr_scheduler, label="Scheduler",
                                                   info=field_help("lr_scheduler"), elem_id="cfg-lr_scheduler")
            number("weight_decay", "Weight decay")
            number("max_grad_norm", "Max gradient norm")
            number("logging_steps", "Log every (steps)", integer=True)
        with gr.Row():
            number("eval_steps", "Evaluate every (steps)", integer=True)
            number("save_steps", "Checkpoint every (steps)", integer=True)
            number("save_total_limit", "Checkpoints kept", integer=True)
            controls["run_name"] = gr.Textbox(cfg.run_name, label="Run name", info=field_help("run_name"),
                                              elem_id="cfg-run_name")
        with gr.Row():
            controls["device"] = gr.Dropdown(list(DEVICE_KINDS), value=cfg.device, label="Device",
                                             info=field_help("device"), allow_custom_value=True, elem_id="cfg-device")
            controls["dtype"] = gr.Dropdown(list(C.DTYPES), value=cfg.dtype, label="Weights dtype",
                                            info=field_help("dtype"), elem_id="cfg-dtype")
            controls["train_on_inputs"] = gr.Checkbox(cfg.train_on_inputs, label="Train on inputs",
                                                      info=field_help("train_on_inputs"), elem_id="cfg-train_on_inputs")
            controls["trust_remote_code"] = gr.Checkbox(cfg.trust_remote_code, label="Trust remote code",
                                                        info=field_help("trust_remote_code"),
                                                        elem_id="cfg-trust_remote_code")
    assert set(controls) == set(forms.FIELDS), "every RunConfig field needs exactly one control"
    controls = {name: controls[name] for name in forms.FIELDS}  # RunConfig order, for load_preset's outputs

    with gr.Row(equal_height=False):
        train_on = gr.Radio([("This machine", ON_THIS_MACHINE), ("Hugging Face Jobs", ON_JOBS)],
                            value=ON_THIS_MACHINE, label="Train on", scale=1, elem_id="train-on",
                            info="Hugging Face Jobs rents a GPU by the minute, billed to your Hugging Face account.")
        with gr.Row(visible=False, scale=3) as jobs_row:
            jobs_inputs = {
                "jobs_flavor": gr.Dropdown([(jobs.flavor_label(f), f) for f in rules.JOBS_GPU_FLAVORS],
                                           value=rules.JOBS_DEFAULT_FLAVOR, label="GPU", elem_id="jobs-flavor"),
                "jobs_source": gr.Textbox("", label="Install the studio from", placeholder=space_id() or "OWNER/SPACE",
                                          info="A Hub repository holding DenseLoRA Studio, or a git URL"
                                               + ("; empty: this Space" if space_id() else ""),
                                          elem_id="jobs-source"),
                "jobs_repo": gr.Textbox("", label="Results repository (private)", placeholder="YOUR_NAME/RUN_ID",
                                        elem_id="jobs-repo"),
                "jobs_timeout": gr.Textbox(rules.JOBS_DEFAULT_TIMEOUT, label="Time limit", info="e.g. 90m, 6h",
                                           elem_id="jobs-timeout"),
            }
    train_on.change(lambda where: gr.Row(visible=where == ON_JOBS), inputs=[train_on], outputs=[jobs_row],
                    api_visibility="private", show_progress="hidden")
    with gr.Row():
        start_button = gr.Button("Start training", variant="primary", elem_id="start")
        find_button = gr.Button("Find learning rate", elem_id="find-lr")
        stop_button = gr.Button("Stop", variant="stop", elem_id="stop")
    start_message = gr.Markdown(elem_id="start-message")

    gr.Markdown("### Live view")
    run_state = gr.State(None)
    timer = gr.Timer(REFRESH_SECONDS, active=False)
    run_header = gr.Markdown(elem_id="run-header")
    progress = gr.HTML(elem_id="run-progress")
    with gr.Column(visible=False) as run_box:  # shown once there is a run to show
        with gr.Row():
            loss_plot = gr.LinePlot(x="step", y="loss", color="series", color_map=charts.LOSS_COLORS,
                                    title="Loss (train and validation)", height=280, elem_id="loss-plot")
            trials_plot = gr.LinePlot(x="step", y="loss", color="rate", x_title="step of the trial", height=280,
                                      title="Loss of each trial (color: learning rate)", visible=False,
                                      elem_id="trials-plot")
            lr_plot = gr.LinePlot(x="step", y="learning_rate", title="Learning rate", height=280, elem_id="lr-plot")
        with gr.Row():
            grad_plot = gr.LinePlot(x="step", y="grad_norm", title="Gradient norm", height=220, elem_id="grad-plot")
            speed_plot = gr.LinePlot(x="step", y="tokens_per_second", title="Tokens per second", height=220,
                                     elem_id="speed-plot")
        with gr.Row(equal_height=True):
            outcome = gr.Markdown(elem_id="run-outcome")
            chat_button = gr.Button("Chat with this adapter", variant="primary", visible=False, scale=0,
                                    min_width=260, elem_id="chat-with-run")
        with gr.Row(visible=False, equal_height=True) as chosen_row:  # a search that chose a rate
            chosen_plot = gr.LinePlot(x="step", y="loss", title="The chosen rate's trial", x_title="step of the trial",
                                      height=220, elem_id="chosen-plot")
            use_rate_button = gr.Button("Use this rate", variant="primary", scale=0, min_width=200,
                                        elem_id="use-rate")
        log_box = gr.Textbox(label="Log (last lines)", lines=8, max_lines=12, interactive=False, autoscroll=True,
                             elem_id="run-log")
    live_outputs = [run_header, progress, run_box, loss_plot, lr_plot, grad_plot, speed_plot, outcome, log_box,
                    timer, trials_plot, chosen_row, chosen_plot]

    # ---- events
    preview_inputs = {name: controls[name] for name in PREVIEW_FIELDS}
    preview_outputs = [data_message, detected, preview_box, rows_table, examples, histogram, report]
    param_outputs = [param_line, memory_line, method_line]

    # Everything that renders the preview runs in one queue, in the order the user asked for it, and likewise
    # everything that counts parameters: a slow earlier result (the first read of the default model's tokenizer
    # takes ~10 s) can then never land after, and overwrite, what a later action showed. Each event reads the
    # form as it was when the user acted; none is chained after another event that changes the form it reads.
    preview_queue = dict(concurrency_id="preview", concurrency_limit=1, show_progress="minimal")
    count_queue = dict(concurrency_id="count", concurrency_limit=1, show_progress="minimal")

    # A reloaded page (or a restarted app) finds the run that is training, else the latest, with its history, and
    # shows the parameter line and the preview of the opening settings; a user action that recomputes one of them
    # first cancels it rather than waiting for it.
    demo.load(restore_run, outputs=[run_state], api_name="restore_run") \
        .then(live_status, inputs=[run_state], outputs=live_outputs, api_visibility="private",
              api_name="live_status_on_load", show_progress="hidden")
    demo.load(preset_choices, outputs=[preset_choice], api_visibility="private")
    count_on_load = demo.load(parameter_line, inputs_kwargs=controls, outputs=param_outputs,
                              api_visibility="private", api_name="parameter_line_on_load", **count_queue)
    preview_on_load = demo.load(preview_data, inputs_kwargs=preview_inputs, outputs=preview_outputs,
                                api_visibility="private", api_name="preview_data_on_load", **preview_queue)

    gr.on([preview_button.click, controls["data"].submit, controls["data_format"].input,
           controls["cutoff_len"].submit, controls["cutoff_len"].blur, controls["train_on_inputs"].input,
           check_button.click, controls["model"].submit],  # a new model renders the data with its own template
          preview_data, inputs_kwargs=preview_inputs, outputs=preview_outputs, api_name="preview_data",
          trigger_mode="always_last", cancels=[preview_on_load], **preview_queue)
    upload.upload(upload_data, inputs=[upload], inputs_kwargs=preview_inputs,
                  outputs=[upload, controls["data"], *preview_outputs], api_name="upload_data",
                  cancels=[preview_on_load], **preview_queue)
    controls["quantization"].input(checkpointing_for, inputs=[controls["quantization"]],
                                   outputs=[controls["gradient_checkpointing"]], api_visibility="private") \
        .then(parameter_line, inputs_kwargs=controls, outputs=param_outputs, api_visibility="private",
              api_name="parameter_line_after_quantization", **count_queue)
    gr.on([controls[name].input for name in ("method", "r", "target_modules", "dtype", "device",
                                               "gradient_checkpointing")]
          + [getattr(controls[name], event) for name in ("batch_size", "cutoff_len") for event in ("submit", "blur")],
          parameter_line, inputs_kwargs=controls, outputs=param_outputs, api_name="parameter_line",
          trigger_mode="always_last", cancels=[count_on_load], **count_queue)
    # The count depends on the target modules these two set, so it follows them.
    gr.on([check_button.click, controls["model"].submit], check_model,
          inputs=[controls["model"], controls["trust_remote_code"], controls["target_modules"]],
          outputs=[model_info, controls["target_modules"]], api_name="check_model", cancels=[count_on_load]) \
        .then(parameter_line, inputs_kwargs=controls, outputs=param_outputs, api_visibility="private",
              api_name="parameter_line_after_check", **count_queue)
    load_button.click(load_preset, inputs=[preset_choice, controls["target_modules"]],
                      outputs=[*controls.values(), preset_message, *preview_outputs], api_name="load_preset",
                      cancels=[count_on_load, preview_on_load], **preview_queue) \
        .then(parameter_line, inputs_kwargs=controls, outputs=param_outputs, api_visibility="private",
              api_name="parameter_line_after_preset", **count_queue)
    save_button.click(save_preset, inputs=[preset_name], inputs_kwargs=controls,
                      outputs=[preset_message, preset_choice], api_name="save_preset")
    command_button.click(show_command, inputs=[preset_choice], inputs_kwargs=controls, outputs=[command],
                         api_name="show_command")

    start_event = start_button.click(start_training, inputs_kwargs={**controls, "train_on": train_on, **jobs_inputs},
                                     outputs=[start_message, run_state, timer], api_name="start")
    start_event.then(live_status, inputs=[run_state], outputs=live_outputs, api_visibility="private",
                     api_name="live_status_after_start", show_progress="hidden")
    search_event = find_button.click(find_learning_rate, inputs_kwargs=controls,
                                     outputs=[start_message, run_state, timer, trials_plot], api_name="find_lr")
    search_event.then(live_status, inputs=[run_state], outputs=live_outputs, api_visibility="private",
                      api_name="live_status_after_search", show_progress="hidden")
    use_rate_button.click(use_found_rate, inputs=[run_state], outputs=[controls["learning_rate"], start_message],
                          api_name="use_rate")
    stop_event = stop_button.click(stop_training, inputs=[run_state], outputs=[start_message], api_name="stop")
    timer.tick(live_status, inputs=[run_state], outputs=live_outputs, api_name="status", show_progress="hidden")
    # "Chat with this adapter" follows the watched run: a new run (start, page load) and every tick of the live view,
    # the last of which sees the run end.
    gr.on([run_state.change, timer.tick], chat_offer, inputs=[run_state], outputs=[chat_button],
          api_name="chat_offer", show_progress="hidden")

    return TrainTab(start_event=start_event, stop_event=stop_event, run_state=run_state, chat_button=chat_button,
                    search_event=search_event)
