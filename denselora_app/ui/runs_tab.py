"""The Runs tab: every run in a table, one run opened (charts, config, data report), loss curves overlaid, resume,
delete."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import gradio as gr
import pandas as pd

from denselora_app.config import ConfigError
from denselora_app.hub import access
from denselora_app.hub.access import AccessError, Action
from denselora_app.hub.hosting import on_space

# resolve_run without outside_root: the app reaches only the runs in the runs folder (a Space's visitors call it).
from denselora_app.runs import RunError, delete_run, resolve_run
from denselora_app.ui import charts, loaders, run_view
from denselora_app.ui.messages import refusal, warn


def runs_table(opened: str | None = None, compared: list[str] | None = None,
               profile: gr.OAuthProfile | None = None,
               oauth_token: gr.OAuthToken | None = None) -> tuple[pd.DataFrame, Any, Any]:
    """The table of the runs the caller may see (newest first; a damaged one says so) and the run pickers, keeping
    picks that still exist. Runs on Hugging Face Jobs are first brought up to date (with the caller's token)."""
    who = access.identify(profile)
    runs = access.visible_runs(who)
    for run in runs:
        run_view.follow_job(run, who, oauth_token.token if oauth_token else None)  # a problem shows in the live view
    facts = [run.facts() for run in runs]
    ids = [f.run_id for f in facts]
    table = pd.DataFrame([run_view.table_row(f) for f in facts], columns=run_view.TABLE_COLUMNS)
    return (
        table,
        gr.Dropdown(choices=ids, value=opened if opened in ids else None),
        gr.Dropdown(choices=ids, value=[i for i in compared or [] if i in ids], multiselect=True),
    )


def pick_row(table: pd.DataFrame, evt: gr.SelectData) -> str:
    """Clicking a row of the table opens that run."""
    return str(evt.row_value[0]) if evt.row_value else str(table.iloc[evt.index[0], 0])


def open_run(run_id: str | None, profile: gr.OAuthProfile | None = None) -> tuple[Any, ...]:
    """One run: its summary and outcome, loss and learning-rate charts, config (YAML) and data report."""
    if not run_id:
        return "Pick a run in the table or the list.", None, None, "", ""
    try:
        who = access.identify(profile)
        run = access.visible_run(who, run_id)
    except (RunError, AccessError) as err:
        return warn(err), None, None, "", ""
    facts = run.facts()
    shown = run_view.run_charts(run.metrics())
    row = dict(zip(run_view.TABLE_COLUMNS, run_view.table_row(facts), strict=True))
    details = (f"{run_view.header_markdown(facts)}\n\n"
               f"Trainable: {row['Trainable %']}% · steps {row['Steps']} · duration {row['Duration']} · "
               f"final loss {row['Train loss']} (validation {row['Validation loss']})\n\n"
               + (f"Folder: `{run.path}`\n\n" if who.owner else "")  # a visitor sees no path of the server
               + run_view.outcome_markdown(run, facts, paths=who.owner))
    report = run.data_report()
    report_text = "\n".join(f"{key}: {value}" for key, value in report.items()) if report else "No data report yet."
    config_text = facts.config.to_yaml() if facts.config else ""
    return details, shown.loss, shown.learning_rate, config_text, report_text


def compare_runs(run_ids: list[str] | None, profile: gr.OAuthProfile | None = None) -> pd.DataFrame | None:
    """Train and validation loss of several runs on one chart (e.g. DenseLoRA against LoRA at the same rank)."""
    who = access.identify(profile)
    curves = {}
    for run_id in run_ids or []:
        try:
            run = access.visible_run(who, run_id)
            cfg = run.config()
        except (RunError, AccessError, ConfigError):
            continue  # deleted meanwhile, damaged, or not the caller's to see: left out of the chart
        # The date is the same for most runs compared; the time and name tell them apart in a short legend.
        short_id = re.sub(r"^\d{8}-", "", run.id)
        curves[f"{cfg.method} r={cfg.r} · {short_id}"] = run.metrics()
    return charts.shown(charts.overlay_frame(curves), "loss")


def ask_delete(run_id: str | None, profile: gr.OAuthProfile | None = None) -> tuple[Any, str]:
    if refused := refusal(profile, Action.TRAIN):
        return gr.Row(visible=False), refused
    if not run_id:
        return gr.Row(visible=False), warn("Open a run first, then delete it.")
    return gr.Row(visible=True), f"Delete run `{run_id}` with its checkpoints and adapter? This cannot be undone."


def confirm_delete(run_id: str | None, profile: gr.OAuthProfile | None = None) -> tuple[Any, str]:
    """Delete the run; the engine refuses one that is still training, and that message is shown."""
    try:
        access.require(access.identify(profile), Action.TRAIN)
        delete_run(resolve_run(run_id or ""))
    except (RunError, AccessError) as err:
        return gr.Row(visible=False), warn(err)
    return gr.Row(visible=False), f"Deleted run `{run_id}`."


def public_mark(run_id: str | None, profile: gr.OAuthProfile | None = None) -> Any:
    """The "Public on this Space" box of the opened run: shown to the owner only, ticked when the run is public."""
    try:
        access.require(access.identify(profile), Action.TRAIN)
        run = resolve_run(run_id or "")
    except (RunError, AccessError):
        return gr.Checkbox(value=False, visible=False)
    return gr.Checkbox(value=run.is_public(), visible=True)


def set_public(run_id: str | None, public: bool, profile: gr.OAuthProfile | None = None) -> str:
    """Make the run public on this Space (visitors may see it and chat with its final adapter), or private again."""
    try:
        access.require(access.identify(profile), Action.TRAIN)
        run = resolve_run(run_id or "")
        run.set_public(bool(public))
    except (RunError, AccessError) as err:
        return warn(err)
    except OSError as err:
        return warn(f"Could not change run {run_id}: {err.strerror or err}.")
    if public:
        return f"Run `{run.id}` is public: visitors of this Space can see it and chat with its final adapter."
    return f"Run `{run.id}` is private again: only you see it."


def cancel_delete() -> tuple[Any, str]:
    return gr.Row(visible=False), ""


def resume(run_id: str | None, profile: gr.OAuthProfile | None = None) -> str:
    """Continue the opened run from its last checkpoint (a run stopped, or killed by a crash or a restart) through
    the one launch function, whose refusal (nothing to resume, the device busy, ...) is shown as it is."""
    from denselora_app.engine.launch import LaunchError, resume_run

    if refused := refusal(profile, Action.TRAIN):
        return refused
    if not run_id:
        return warn("Open a run first, then resume it.")
    try:
        run = resume_run(resolve_run(run_id), load_config=loaders.model_config, load_tokenizer=loaders.tokenizer)
    except (RunError, LaunchError) as err:
        return warn(err)
    checkpoint = run.last_checkpoint()
    return (f"Resumed run `{run_id}` from {checkpoint.name if checkpoint else 'its last checkpoint'}: it trains in "
            "the background (Refresh to follow it).")


@dataclass
class RunsTab:
    refresh_inputs: list[Any]
    refresh_outputs: list[Any]


def build(demo: gr.Blocks) -> RunsTab:
    """The Runs tab's components and events; call inside ``demo``'s context (and a gr.Tab)."""
    with gr.Row():
        refresh_button = gr.Button("Refresh", size="sm", scale=0, elem_id="runs-refresh")
    table = gr.Dataframe(headers=run_view.TABLE_COLUMNS, interactive=False, wrap=True, max_height=360,
                         column_widths=["22%", "8%", "8%", "5%", "9%", "8%", "9%", "8%", "7%", "8%", "8%"],
                         label="All runs (click a row to open it)", elem_id="runs-table")
    with gr.Row(equal_height=False):
        with gr.Column():
            opened = gr.Dropdown([], label="Open run", allow_custom_value=True, elem_id="open-run")
            details = gr.Markdown(elem_id="run-details")
            with gr.Row():
                loss_plot = gr.LinePlot(x="step", y="loss", color="series", color_map=charts.LOSS_COLORS,
                                        title="Loss", height=240, elem_id="open-loss-plot")
                lr_plot = gr.LinePlot(x="step", y="learning_rate", title="Learning rate", height=240,
                                      elem_id="open-lr-plot")
            with gr.Accordion("Config and data report", open=False):
                config_code = gr.Code(language="yaml", label="config.yaml", interactive=False,
                                      elem_id="open-config")
                report = gr.Textbox(label="Data report", lines=6, interactive=False, elem_id="open-report")
            with gr.Row():
                resume_button = gr.Button("Resume", size="sm", scale=0, elem_id="resume-run")
                delete_button = gr.Button("Delete run…", variant="stop", size="sm", scale=0, elem_id="delete-run")
                # Off a Space everyone is the owner and the mark means nothing: the box is not there.
                public_box = gr.Checkbox(False, label="Public on this Space", visible=False, render=on_space(),
                                         info="Visitors see this run as you do (charts, config, data report, "
                                              "log) and chat with its final adapter",
                                         elem_id="run-public")
            with gr.Row(visible=False) as confirm_row:
                confirm_button = gr.Button("Yes, delete it", variant="stop", size="sm", elem_id="confirm-delete")
                cancel_button = gr.Button("Cancel", size="sm", elem_id="cancel-delete")
            resume_message = gr.Markdown(elem_id="resume-message")
            delete_message = gr.Markdown(elem_id="delete-message")
        with gr.Column():
            compared = gr.Dropdown([], multiselect=True, allow_custom_value=True,
                                   label="Compare runs (overlay loss curves)", elem_id="compare-runs")
            overlay = gr.LinePlot(x="step", y="loss", color="series", title="Loss of the selected runs", height=360,
                                  elem_id="compare-plot")

    refresh_inputs = [opened, compared]
    refresh_outputs = [table, opened, compared]
    refresh_button.click(runs_table, inputs=refresh_inputs, outputs=refresh_outputs, api_name="list_runs")
    table.select(pick_row, inputs=[table], outputs=[opened], api_visibility="private")
    opened.change(open_run, inputs=[opened], outputs=[details, loss_plot, lr_plot, config_code, report],
                  api_name="open_run")
    if on_space():
        opened.change(public_mark, inputs=[opened], outputs=[public_box], api_visibility="private")
        public_box.input(set_public, inputs=[opened, public_box], outputs=[delete_message], api_name="set_public") \
            .then(public_mark, inputs=[opened], outputs=[public_box], api_visibility="private")
    # Cleared first: gradio's plot keeps the series (colors) it was first drawn with, so another choice of runs
    # must be drawn afresh.
    compared.change(lambda: None, outputs=[overlay], api_visibility="private", show_progress="hidden") \
        .then(compare_runs, inputs=[compared], outputs=[overlay], api_name="compare_runs")
    resume_button.click(resume, inputs=[opened], outputs=[resume_message], api_name="resume_run") \
        .then(runs_table, inputs=refresh_inputs, outputs=refresh_outputs, api_visibility="private") \
        .then(open_run, inputs=[opened], outputs=[details, loss_plot, lr_plot, config_code, report],
              api_visibility="private")
    delete_button.click(ask_delete, inputs=[opened], outputs=[confirm_row, delete_message],
                        api_visibility="private")
    cancel_button.click(cancel_delete, outputs=[confirm_row, delete_message], api_visibility="private")
    confirm_button.click(confirm_delete, inputs=[opened], outputs=[confirm_row, delete_message],
                         api_name="delete_run") \
        .then(runs_table, inputs=refresh_inputs, outputs=refresh_outputs, api_visibility="private")
    demo.load(runs_table, inputs=refresh_inputs, outputs=refresh_outputs, api_visibility="private")
    return RunsTab(refresh_inputs=refresh_inputs, refresh_outputs=refresh_outputs)
