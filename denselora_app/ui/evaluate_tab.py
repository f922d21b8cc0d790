"""The Evaluate tab: score adapters against their base model on a multiple-choice set (accuracy) and, optionally,
held-out data in a training format (loss, perplexity). Uses the Chat tab's engine, so a base model already loaded
for chatting is not loaded again.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import gradio as gr
import pandas as pd

from denselora_app.hub import access
from denselora_app.hub.access import AccessError, Action
from denselora_app.hub.hosting import GPU_MAX_SECONDS, GPU_MAX_STEPS, on_gpu, on_zerogpu
from denselora_app.ui import chat_tab
from denselora_app.ui.messages import refusal, warn

if TYPE_CHECKING:
    from denselora_app.serving.evaluate import EvalTable

RESULT_COLUMNS = ["model", "accuracy", "loss", "perplexity", "trainable %"]
DETAIL_COLUMNS = ["model", "question", "expected", "predicted", "correct", "output"]
FORMATS = {"accuracy": "{:.1%}", "loss": "{:.4f}", "perplexity": "{:.2f}", "trainable %": "{:.4f}"}
MODES = ("generate", "loglik")  # evaluate.MODES, named here so that building the tab imports no torch


def refresh_adapters(chosen: list[str] | None, profile: gr.OAuthProfile | None = None) -> Any:
    """Every run's adapter and checkpoints, keeping the ones chosen that still exist; with none, the newest run's
    final adapter is chosen. A caller who may not evaluate gets none, and the reason."""
    if refused := refusal(profile, Action.EVALUATE):
        return gr.Dropdown(choices=[], value=[], multiselect=True, info=refused)
    refs = chat_tab.adapters_module().available_adapters()
    locations = [ref.location for ref in refs]
    kept = [c for c in chosen or [] if c in locations]
    newest = next((ref.location for ref in refs if ref.checkpoint is None), None)
    return gr.Dropdown(choices=[(ref.label, ref.location) for ref in refs], value=kept or ([newest] if newest else []),
                       multiselect=True)


def results_frame(table: EvalTable) -> pd.DataFrame:
    """One row per model (the base first), numbers formatted for reading; '-' where a metric does not apply."""
    rows = [[row["model"], *(("-" if row[key] is None else FORMATS[key].format(row[key])) for key in FORMATS)]
            for row in table.rows()]
    return pd.DataFrame(rows, columns=RESULT_COLUMNS)


def details_frame(table: EvalTable) -> pd.DataFrame:
    """Every question's expected and predicted answer, per model (a base result reused from eval.json has none)."""
    rows = [[row["model"], item.question, item.expected, "-" if item.predicted is None else item.predicted,
             "yes" if item.correct else "no", item.output]
            for row, result in zip(table.rows(), table.results) for item in result.items]
    return pd.DataFrame(rows, columns=DETAIL_COLUMNS)


def run_evaluation(adapters: list[str] | None, data_file: str | None, loss_file: str | None, mode: str,
                   limit: int | None, progress: gr.Progress = gr.Progress(),
                   profile: gr.OAuthProfile | None = None) -> tuple[str, Any, Any]:
    """Evaluate the chosen adapters and their base: the message, the results table and the per-question details.

    Results of runs are saved to each run's eval.json by the engine. Evaluating writes into run folders and spends
    compute: the owner's (access.py); its data files must be uploads.
    """
    try:
        access.require(access.identify(profile), Action.EVALUATE)
        access.check_uploaded(data_file)
        access.check_uploaded(loss_file)
    except AccessError as err:
        return warn(err), None, None
    chat_tab.chat_module()  # first: it imports the engine's modules in a safe order
    from denselora_app.serving.evaluate import gpu_steps

    if not adapters:
        return warn("Choose at least one run's adapter or checkpoint to evaluate."), None, None
    limit = None if limit is None else int(limit)
    if on_zerogpu() and gpu_steps(len(adapters), data_file or None, loss_data=loss_file or None, mode=mode,
                                  limit=limit) > GPU_MAX_STEPS:
        return warn(f"This evaluation is more than one ZeroGPU call can do (at most {GPU_MAX_SECONDS} s of GPU "
                     "time): set a Limit (fewer questions and examples), evaluate fewer adapters at once, or use "
                     "loglik mode (one model step per question instead of a generated reply)."), None, None
    return _evaluate(adapters, data_file or None, loss_file or None, mode, limit, *chat_tab.engine_settings(),
                     progress)


def _evaluate(adapters: list[str], data_file: str | None, loss_file: str | None, mode: str, limit: int | None,
              quantization: str | None, compiled: bool, progress: gr.Progress) -> tuple[str, Any, Any]:
    """``run_evaluation``'s work on the device. On ZeroGPU this is the call that holds the GPU (hosting.on_gpu),
    so it takes everything as arguments and returns its problems."""
    chat = chat_tab.chat_module()
    from denselora_app.serving.evaluate import EvalError, evaluate

    try:
        table = evaluate(adapters, data_file, loss_data=loss_file, mode=mode, limit=limit,
                         engine=chat_tab.engine_with(quantization, compiled), progress=progress)
    except (EvalError, chat.ChatError) as err:
        return warn(err), None, None
    # A base result read back from a run's eval.json carries no per-question items.
    reused = any(r.trainable_percent is None and r.accuracy is not None and not r.items for r in table.results)
    message = (f"Evaluated {len(adapters)} adapter(s) on **{table.dataset}** ({table.mode}). Results of runs are "
               "saved in each run's eval.json." + (" The base model's result was reused from an earlier evaluation "
                                                   "on the same data." if reused else ""))
    return message, results_frame(table), details_frame(table)


def _evaluate_steps(adapters: list[str], data_file: str | None, loss_file: str | None, mode: str, limit: int | None,
                    *_: Any) -> int:
    from denselora_app.serving.evaluate import gpu_steps

    return gpu_steps(len(adapters), data_file, loss_data=loss_file, mode=mode, limit=limit)


_evaluate = on_gpu(_evaluate, steps=_evaluate_steps)


@dataclass
class EvaluateTab:
    refresh_inputs: list[Any]
    refresh_outputs: list[Any]


def build(demo: gr.Blocks) -> EvaluateTab:
    """The Evaluate tab's components and events; call inside ``demo``'s context (and a gr.Tab)."""
    with gr.Row(equal_height=False):
        adapters = gr.Dropdown([], value=[], multiselect=True, label="Adapters to evaluate",
                               info="Each is compared with its base model", scale=5, elem_id="eval-adapters")
        with gr.Column(scale=1, min_width=140):
            refresh_button = gr.Button("Refresh list", size="sm", elem_id="eval-refresh")
    with gr.Row():
        data_file = gr.File(label="Multiple-choice set (.jsonl of question, choices, answer), or held-out "
                                  "preference pairs (prompt, chosen, rejected: pairwise accuracy); empty: the set "
                                  "shipped with the app", file_types=[".jsonl", ".json"], height=130,
                            elem_id="eval-data", elem_classes=["dl-upload"])
        loss_file = gr.File(label="Optional held-out data in a training format, for loss and perplexity",
                            file_types=[".jsonl", ".json", ".csv", ".parquet"], height=130,
                            elem_id="eval-loss-data", elem_classes=["dl-upload"])
    with gr.Row(equal_height=True):
        mode = gr.Radio(list(MODES), value="generate", label="Mode",
                        info="generate: the model replies with a label (greedy); loglik: the most likely choice",
                        elem_id="eval-mode")
        limit = gr.Number(None, label="Limit", info="Only the first N questions and examples (empty: all)",
                          precision=0, minimum=1, elem_id="eval-limit")
    run_button = gr.Button("Run evaluation", variant="primary", elem_id="eval-run")
    message = gr.Markdown(elem_id="eval-message")
    results = gr.Dataframe(headers=RESULT_COLUMNS, interactive=False, label="Results", elem_id="eval-results")
    with gr.Accordion("Per question", open=False):
        details = gr.Dataframe(headers=DETAIL_COLUMNS, interactive=False, wrap=True, max_height=420,
                               elem_id="eval-details")

    refresh_button.click(refresh_adapters, inputs=[adapters], outputs=[adapters], api_name="eval_adapters")
    run_button.click(run_evaluation, inputs=[adapters, data_file, loss_file, mode, limit],
                     outputs=[message, results, details], api_name="evaluate", **chat_tab.ENGINE_QUEUE)
    return EvaluateTab(refresh_inputs=[adapters], refresh_outputs=[adapters])
