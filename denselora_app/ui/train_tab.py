"""The Train tab's layout and wiring: the settings in the order a user decides them, Start, and the live view.

The event functions live beside it: ``train_form`` (model check, parameter line, presets, command), ``data_preview``,
``train_run`` (Start, Stop, Find learning rate) and ``live_view``; the engine does the work.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import gradio as gr

from denselora_app import config as C
from denselora_app import rules
from denselora_app.config import field_help
from denselora_app.hub import jobs
from denselora_app.hub.hosting import space_id
from denselora_app.rules import DEVICE_KINDS
from denselora_app.ui import charts, forms, loaders
from denselora_app.ui.data_preview import (
    CHOSEN,
    PREVIEW_FIELDS,
    REJECTED,
    TRAINED,
    DataPreview,
    preview_data,
    upload_data,
)
from denselora_app.ui.live_view import REFRESH_SECONDS, LiveView, chat_offer, live_status, restore_run
from denselora_app.ui.train_form import (
    METHOD_CHOICES,
    QUANTIZATION_CHOICES,
    STAGE_CHOICES,
    check_model,
    checkpointing_for,
    load_preset,
    parameter_line,
    preset_choices,
    save_preset,
    show_command,
    stage_changed,
)
from denselora_app.ui.train_run import (
    ON_JOBS,
    ON_THIS_MACHINE,
    TRAIN_ON_CHOICES,
    find_learning_rate,
    start_training,
    stop_training,
    use_found_rate,
)

JOBS_BILLING = "Hugging Face Jobs rents a GPU by the minute, billed to your Hugging Face account."


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
    controls: dict[str, Any] = {}  # one control per RunConfig field, named like it (forms.py)

    def number(name: str, label: str, integer: bool = False) -> gr.Number:
        controls[name] = gr.Number(getattr(cfg, name), label=label, info=field_help(name),
                                   precision=0 if integer else None, elem_id=f"cfg-{name}")
        return controls[name]

    def dropdown(name: str, label: str, choices: Any, **options: Any) -> gr.Dropdown:
        controls[name] = gr.Dropdown(choices, value=getattr(cfg, name), label=label, info=field_help(name),
                                     elem_id=f"cfg-{name}", **options)
        return controls[name]

    def checkbox(name: str, label: str, value: bool | None = None) -> gr.Checkbox:
        controls[name] = gr.Checkbox(getattr(cfg, name) if value is None else value, label=label,
                                     info=field_help(name), elem_id=f"cfg-{name}")
        return controls[name]

    # Two columns: on the left the choices, in the order a user makes them, compact enough that Start (in the
    # action bar below, which stays at the window's foot) is reached without scrolling; on the right the presets
    # and what the chosen data looks like to the model.
    with gr.Row(equal_height=False, elem_id="train-setup"):
        with gr.Column(scale=3, elem_id="train-choices"):
            with gr.Row():
                controls["model"] = gr.Textbox(cfg.model, label="Base model", info=field_help("model"), scale=4,
                                               elem_id="cfg-model")
                check_button = gr.Button("Check model", scale=1, min_width=120, elem_id="check-model",
                                         elem_classes=["dl-end"])
            model_info = gr.Markdown(elem_id="model-info")
            with gr.Row(equal_height=True):
                controls["data"] = gr.Textbox(cfg.data, label="Training data", scale=3, elem_id="cfg-data",
                                              info="A file path, a Hub dataset (owner/name or owner/name:split), "
                                                   f"or a shipped sample: {C.SAMPLE_DATA} (sft), "
                                                   f"{C.SAMPLE_PAIRS} (dpo).")
                upload = gr.File(label="Upload a dataset (.jsonl .json .csv .parquet .txt)",
                                 file_types=list(loaders.UPLOAD_TYPES), height=110, scale=2, min_width=200,
                                 elem_id="upload", elem_classes=["dl-upload"])
            data_message = gr.Markdown(visible=False, line_breaks=True, elem_id="data-message",
                                       elem_classes=["dl-warning"])
            with gr.Row(equal_height=False):
                controls["method"] = gr.Radio(METHOD_CHOICES, value=cfg.method, label="Method",
                                              info=field_help("method"), elem_id="cfg-method")
                controls["r"] = gr.Slider(1, 256, value=cfg.r, step=1, label="Rank", elem_id="cfg-r",
                                          info="More rank: more trainable parameters.")
                with gr.Column(min_width=160, elem_classes=["dl-tight"]):
                    number("learning_rate", "Learning rate")
                    find_button = gr.Button("Find learning rate", size="sm", elem_id="find-lr")
            with gr.Row(equal_height=False):
                number("max_steps", "Max steps", integer=True)
                number("num_epochs", "Epochs")
                number("batch_size", "Batch size", integer=True)
            param_line = gr.Markdown("Trainable parameters: counting…", elem_id="parameter-line")
            memory_line = gr.Markdown(elem_id="memory-line")
            with gr.Accordion("DenseLoRA or LoRA: this run's figures and the measured accuracy", open=False,
                              elem_id="method-accordion"):
                method_line = gr.Markdown(elem_id="method-comparison")

            with gr.Accordion("Advanced settings", open=False, elem_id="advanced"):
                gr.Markdown("**The adapter**")
                with gr.Row():
                    number("alpha", "Alpha")
                    controls["dropout"] = gr.Slider(0, 0.9, value=cfg.dropout, step=0.01, label="Dropout",
                                                    info=field_help("dropout"), elem_id="cfg-dropout")
                # Until a model is checked, the form's own targets; then the model's Linear layers (check_model).
                controls["target_modules"] = gr.CheckboxGroup(
                    cfg.target_modules, value=cfg.target_modules, label="Target modules",
                    info=field_help("target_modules") + " Check the model to list its own.",
                    elem_id="cfg-target_modules")
                gr.Markdown("**DenseLoRA's research knobs** (LoRA ignores them)")
                with gr.Row():
                    number("init_scale", "Init scale of E, M")
                    number("shared_lr_scale", "Shared E, D rate x")
                    dropdown("dropout_placement", "Dropout placement", list(C.DROPOUT_PLACEMENTS))
                    dropdown("activation", "Activation", list(C.ACTIVATIONS))
                gr.Markdown("**Optimisation**")
                with gr.Row():
                    number("grad_accum", "Gradient accumulation", integer=True)
                    dropdown("lr_scheduler", "Scheduler", list(C.SCHEDULERS))
                    number("warmup_steps", "Warmup steps", integer=True)
                with gr.Row():
                    number("weight_decay", "Weight decay")
                    number("max_grad_norm", "Max gradient norm")
                    number("seed", "Seed", integer=True)
                gr.Markdown("**Data**")
                with gr.Row():
                    number("cutoff_len", "Cutoff (tokens)", integer=True)
                    number("val_size", "Validation size")
                    checkbox("packing", "Packing (no padding)")
                    checkbox("train_on_inputs", "Train on inputs")
                gr.Markdown("**Checkpoints and logging**")
                with gr.Row():
                    number("save_steps", "Checkpoint every (steps)", integer=True)
                    number("save_total_limit", "Checkpoints kept", integer=True)
                    number("eval_steps", "Evaluate every (steps)", integer=True)
                    number("logging_steps", "Log every (steps)", integer=True)
                controls["run_name"] = gr.Textbox(cfg.run_name, label="Run name", info=field_help("run_name"),
                                                  elem_id="cfg-run_name")
                gr.Markdown("**The base model and the hardware**")
                with gr.Row():
                    dropdown("quantization", "Base model in", QUANTIZATION_CHOICES)
                    dropdown("dtype", "Weights dtype", list(C.DTYPES))
                    dropdown("device", "Device", list(DEVICE_KINDS), allow_custom_value=True)
                with gr.Row():
                    checkbox("gradient_checkpointing", "Gradient checkpointing", cfg.checkpointing)
                    checkbox("trust_remote_code", "Trust remote code")
                # Sharding takes several processes (torchrun or accelerate launch: Show command gives the line);
                # the app's own runs train in one.
                with gr.Row():
                    checkbox("fsdp", "Shard over GPUs (FSDP2, under torchrun)")
                    checkbox("fsdp_offload", "Offload shards to CPU")
                controls["report_to"] = gr.CheckboxGroup(list(C.TRACKERS), value=cfg.report_to,
                                                         label="Also report to", info=field_help("report_to"),
                                                         elem_id="cfg-report_to")

        with gr.Column(scale=2, elem_id="train-data"):
            with gr.Row():
                preset_choice = gr.Dropdown(forms.list_presets(), value=preset, label="Preset", scale=3,
                                            elem_id="preset")
                load_button = gr.Button("Load", scale=1, min_width=80, elem_id="load-preset", elem_classes=["dl-end"])
            preset_message = gr.Markdown(elem_id="preset-message")
            with gr.Accordion("Save as a preset, or show the command", open=False, elem_id="preset-tools"):
                with gr.Row():
                    preset_name = gr.Textbox(label="Save as", placeholder="my-preset", scale=3,
                                             elem_id="preset-name")
                    save_button = gr.Button("Save preset", scale=1, min_width=120, elem_id="save-preset",
                                            elem_classes=["dl-end"])
                command_button = gr.Button("Show command", size="sm", elem_id="show-command")
                command = gr.Markdown(elem_id="command")
            # The stage decides which data layouts the run reads: it sits above the data preview, and leaves the left
            # column to the settings that must fit the window above Start.
            controls["stage"] = gr.Radio(STAGE_CHOICES, value=cfg.stage, label="Stage", info=field_help("stage"),
                                         elem_id="cfg-stage")
            with gr.Row(visible=cfg.stage != "sft", elem_id="dpo-settings") as dpo_settings:
                number("beta", "Beta (DPO, KTO)")
                dropdown("dpo_loss", "DPO loss", list(C.DPO_LOSSES), visible=cfg.stage == "dpo")
                controls["init_adapter"] = gr.Textbox(cfg.init_adapter, label="Start from run (optional)",
                                                      info=field_help("init_adapter"), elem_id="cfg-init_adapter")
            gr.Markdown("**The data as the model sees it**", elem_id="preview-heading")
            with gr.Row():
                dropdown("data_format", "Data format", list(C.DATA_FORMATS), scale=2)
                preview_button = gr.Button("Preview data", scale=1, min_width=120, elem_id="preview-data",
                                           elem_classes=["dl-end"])
            detected = gr.Markdown(elem_id="detected-format")
            with gr.Column(visible=False) as preview_box:
                rows_table = gr.Dataframe(label="First rows", interactive=False, wrap=True, max_height=220,
                                          elem_id="data-rows")
                histogram = gr.BarPlot(x="tokens", y="rows", color="fit", color_map=charts.LENGTH_COLORS,
                                       title="Tokens per row, up to the cutoff", x_title="tokens", y_title="rows",
                                       x_label_angle=-45, height=220, elem_id="length-histogram")
                report = gr.Textbox(label="Data report", lines=5, max_lines=14, interactive=False,
                                    elem_id="data-report")
                examples = gr.HighlightedText(label="Examples as the model sees them (highlighted: trained tokens)",
                                              color_map={TRAINED: "green", CHOSEN: "green", REJECTED: "red"},
                                              show_legend=True, elem_id="data-examples")
    assert set(controls) == set(forms.FIELDS), "every RunConfig field needs exactly one control"
    controls = {name: controls[name] for name in forms.FIELDS}  # RunConfig order, for load_preset's outputs

    # The action bar stays at the foot of the window while the form is scrolled (CSS .dl-action-bar).
    with gr.Column(elem_id="action-bar", elem_classes=["dl-action-bar"]):
        with gr.Row(equal_height=True):
            train_on = gr.Radio(TRAIN_ON_CHOICES, value=ON_THIS_MACHINE, label="Train on", show_label=False,
                                container=False, scale=2, elem_id="train-on")
            start_button = gr.Button("Start training", variant="primary", scale=2, elem_id="start")
            stop_button = gr.Button("Stop", variant="stop", scale=1, elem_id="stop")
        with gr.Column(visible=False) as jobs_box:
            gr.Markdown(JOBS_BILLING, elem_id="jobs-billing")
            with gr.Row():
                jobs_inputs = {
                    "jobs_flavor": gr.Dropdown([(jobs.flavor_label(f), f) for f in rules.JOBS_GPU_FLAVORS],
                                               value=rules.JOBS_DEFAULT_FLAVOR, label="GPU", elem_id="jobs-flavor"),
                    "jobs_source": gr.Textbox("", label="Install the studio from",
                                              placeholder=space_id() or "OWNER/SPACE",
                                              info="A Hub repository holding DenseLoRA Studio, or a git URL"
                                                   + ("; empty: this Space" if space_id() else ""),
                                              elem_id="jobs-source"),
                    "jobs_repo": gr.Textbox("", label="Results repository (private)", placeholder="YOUR_NAME/RUN_ID",
                                            elem_id="jobs-repo"),
                    "jobs_timeout": gr.Textbox(rules.JOBS_DEFAULT_TIMEOUT, label="Time limit", info="e.g. 90m, 6h",
                                               elem_id="jobs-timeout"),
                }
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
        with gr.Row(visible=False) as preference_row:  # a dpo run
            rewards_plot = gr.LinePlot(x="step", y="reward", color="series", color_map=charts.REWARD_COLORS,
                                       title="Rewards (DPO): chosen, rejected and their margin", height=240,
                                       elem_id="rewards-plot")
            accuracy_plot = gr.LinePlot(x="step", y=charts.PREFERENCE_ACCURACY, height=240, elem_id="accuracy-plot",
                                        title="Preference accuracy (chosen reward above rejected)")
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

    # ---- events
    live_outputs = list(LiveView(
        header=run_header, progress=progress, run_box=run_box, loss_plot=loss_plot, lr_plot=lr_plot,
        grad_plot=grad_plot, speed_plot=speed_plot, outcome=outcome, log=log_box, timer=timer,
        trials_plot=trials_plot, chosen_row=chosen_row, chosen_plot=chosen_plot, preference_row=preference_row,
        rewards_plot=rewards_plot, accuracy_plot=accuracy_plot))
    preview_outputs = list(DataPreview(
        message=data_message, detected=detected, box=preview_box, rows=rows_table, examples=examples,
        histogram=histogram, report=report))
    preview_inputs = {name: controls[name] for name in PREVIEW_FIELDS}
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
    controls["stage"].input(stage_changed, inputs=[controls["stage"], controls["data"]],
                            outputs=[dpo_settings, controls["dpo_loss"], controls["data_format"], controls["packing"],
                                     controls["train_on_inputs"], controls["data"]], api_visibility="private") \
        .then(preview_data, inputs_kwargs=preview_inputs, outputs=preview_outputs, api_visibility="private",
              api_name="preview_data_after_stage", **preview_queue) \
        .then(parameter_line, inputs_kwargs=controls, outputs=param_outputs, api_visibility="private",
              api_name="parameter_line_after_stage", **count_queue)
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

    train_on.change(lambda where: gr.Column(visible=where == ON_JOBS), inputs=[train_on], outputs=[jobs_box],
                    api_visibility="private", show_progress="hidden")
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
