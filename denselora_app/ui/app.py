"""The whole app: the Train, Runs, Chat, Evaluate and Publish tabs in one gr.Blocks, and what a page does when it
(re)loads."""

from __future__ import annotations

from typing import Any

import gradio as gr

from denselora_app.hub import access
from denselora_app.hub.hosting import on_space, space_owner, storage_notice
from denselora_app.ui import chat_tab, evaluate_tab, publish_tab, runs_tab, server, train_tab
from denselora_app.ui.messages import warn

TITLE = "DenseLoRA Studio"
CSS = """
.dl-progress { height: 12px; border-radius: 6px; background: var(--neutral-200); overflow: hidden; }
.dl-progress-bar { height: 100%; background: var(--color-accent); transition: width 0.5s; }
.dl-progress-text { margin-top: 4px; font-size: var(--text-sm); }
#app-header p { margin-top: 4px; }  /* the tagline under the title: the Train tab's Start must fit the window */
.dl-warning { border-left: 4px solid #dc2626; padding-left: 8px; }
/* Start stays in view: the Train tab's action bar sticks to the window's foot until its own place scrolls up.
   gradio's container hides its overflow, which would make it the bar's scroll container; clip cuts the same. */
.gradio-container { overflow: clip !important; }
html { scroll-padding-bottom: 120px; }  /* a field scrolled to (the keyboard's focus) stays above the bar */
.dl-action-bar { position: sticky; bottom: 0; z-index: 20; padding: 8px 0; gap: 4px;
                 background: var(--background-fill-primary); border-top: 1px solid var(--border-color-primary);
                 box-shadow: 0 -6px 12px -8px rgb(0 0 0 / 25%); }
/* gradio floats a File's label over its drop zone, onto the upload icon: give the label its own line. */
.dl-upload > label[data-testid="block-label"] { position: static; }
.dl-tight { gap: 6px; }
.dl-end { align-self: flex-end; }
"""


def build_app() -> gr.Blocks:
    """Build the app (no model is loaded here: the first page must be served within seconds)."""
    with gr.Blocks(title=TITLE, analytics_enabled=False, delete_cache=server.CACHE_CLEANUP) as demo:
        gr.Markdown(f"# {TITLE}\nFine-tune a language model with **DenseLoRA**: about 30x fewer trainable "
                    "parameters than LoRA at the same rank.", elem_id="app-header")
        if on_space():
            space_notice(demo)
        if (lost_on_restart := storage_notice()) is not None:
            with gr.Row(elem_classes="dl-warning"):
                gr.Markdown(warn(lost_on_restart), elem_id="storage-notice")
        with gr.Tabs(elem_id="tabs") as tabs:
            with gr.Tab("Train", id="train", elem_id="tab-train"):
                train = train_tab.build(demo)
            with gr.Tab("Runs", id="runs", elem_id="tab-runs") as runs_tab_item:
                runs = runs_tab.build(demo)
            with gr.Tab("Chat", id="chat", elem_id="tab-chat") as chat_tab_item:
                chat = chat_tab.build(demo)
            with gr.Tab("Evaluate", id="evaluate", elem_id="tab-evaluate") as evaluate_tab_item:
                evaluation = evaluate_tab.build(demo)
            with gr.Tab("Publish", id="publish", elem_id="tab-publish") as publish_tab_item:
                publishing = publish_tab.build(demo)

        # The runs table follows what happens elsewhere: opening the tab, starting or stopping a run.
        runs_tab_item.select(runs_tab.runs_table, inputs=runs.refresh_inputs, outputs=runs.refresh_outputs,
                             api_visibility="private")
        for event in (train.start_event, train.search_event, train.stop_event):
            event.then(runs_tab.runs_table, inputs=runs.refresh_inputs, outputs=runs.refresh_outputs,
                       api_visibility="private")
        # The adapter and run lists are read when their tab opens: new runs finish while the page stays open.
        chat_tab_item.select(chat_tab.refresh_adapters, inputs=chat.refresh_inputs, outputs=chat.refresh_outputs,
                             api_visibility="private")
        evaluate_tab_item.select(evaluate_tab.refresh_adapters, inputs=evaluation.refresh_inputs,
                                 outputs=evaluation.refresh_outputs, api_visibility="private")
        publish_tab_item.select(publish_tab.refresh_runs, inputs=publishing.refresh_inputs,
                                outputs=publishing.refresh_outputs, api_visibility="private")
        # After a run: straight to the Chat tab with its adapter chosen (loaded on the first message or with Load).
        train.chat_button.click(open_in_chat, inputs=[train.run_state], outputs=[tabs, *chat.refresh_outputs],
                                api_visibility="private")
    return demo


def open_in_chat(run_id: str | None, profile: gr.OAuthProfile | None = None) -> tuple[Any, ...]:
    """The Chat tab, selected, with the final adapter of run ``run_id`` in its adapter box."""
    return gr.Tabs(selected="chat"), *chat_tab.select_run(run_id, profile)


def access_notice(profile: gr.OAuthProfile | None = None) -> str:
    """What the caller can do on this Space (access.py decides), and how to do more."""
    who, owner = access.identify(profile), space_owner()
    if who.owner:
        return (f"Signed in as **{who.username}**, this Space's owner: you can train, evaluate and publish here. "
                "Visitors see, and chat with, only the runs you mark **Public on this Space** in the Runs tab.")
    duplicate = "duplicate this Space to train on your own hardware"
    if who.signed_in:
        return (f"Signed in as **{who.username}**. This Space belongs to **{owner}**: you can see, and chat with, "
                f"the runs {owner} made public. Training, evaluating and publishing are for the owner: {duplicate}.")
    return (f"This Space belongs to **{owner}**: visitors can see, and chat with, the runs {owner} made public. "
            f"Training, evaluating and publishing are for the owner: **sign in** if that is you, or {duplicate}.")


def space_notice(demo: gr.Blocks) -> None:
    """On a Hugging Face Space: who the visitor is and what they may do, sign-in, and the way to a copy of their
    own."""
    with gr.Row(equal_height=True, elem_classes="dl-warning", elem_id="space-notice"):
        notice = gr.Markdown(access_notice(None), elem_id="access-notice")
        gr.LoginButton(size="md", elem_id="space-login")
        gr.DuplicateButton("Duplicate this Space", size="md")
    demo.load(access_notice, outputs=[notice], api_name="access_notice")
