"""The whole app: the Train and Runs tabs in one gr.Blocks, and what a page does when it (re)loads."""

from __future__ import annotations

import gradio as gr

from . import runs_tab, train_tab

TITLE = "DenseLoRA Studio"
CSS = """
.dl-progress { height: 12px; border-radius: 6px; background: var(--neutral-200); overflow: hidden; }
.dl-progress-bar { height: 100%; background: var(--color-accent); transition: width 0.5s; }
.dl-progress-text { margin-top: 4px; font-size: var(--text-sm); }
.dl-warning { border-left: 4px solid #dc2626; padding-left: 8px; }
"""


def build_app() -> gr.Blocks:
    """Build the app (no model is loaded here: the first page must be served within seconds)."""
    with gr.Blocks(title=TITLE, analytics_enabled=False) as demo:
        gr.Markdown(f"# {TITLE}\nFine-tune a language model with **DenseLoRA**: about 30x fewer trainable "
                    "parameters than LoRA at the same rank.")
        with gr.Tabs():
            with gr.Tab("Train", id="train", elem_id="tab-train"):
                train = train_tab.build(demo)
            with gr.Tab("Runs", id="runs", elem_id="tab-runs") as runs_tab_item:
                runs = runs_tab.build(demo)

        # The runs table follows what happens elsewhere: opening the tab, starting or stopping a run.
        runs_tab_item.select(runs_tab.runs_table, inputs=runs.refresh_inputs, outputs=runs.refresh_outputs,
                             api_visibility="private")
        for event in (train.start_event, train.stop_event):
            event.then(runs_tab.runs_table, inputs=runs.refresh_inputs, outputs=runs.refresh_outputs,
                       api_visibility="private")
    return demo
