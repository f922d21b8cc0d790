"""The Train tab's data preview: what the training data looks like to the model, before any training."""

from __future__ import annotations

import json
from typing import Any, NamedTuple

import gradio as gr
import pandas as pd

from denselora_app.config import ConfigError, RunConfig
from denselora_app.hub import access
from denselora_app.hub.access import AccessError, Action
from denselora_app.ui import charts, loaders
from denselora_app.ui.messages import require, warn

# The form fields the preview reads (its events get them as keyword arguments named like the RunConfig fields).
PREVIEW_FIELDS = ("model", "trust_remote_code", "data", "data_format", "cutoff_len", "train_on_inputs", "stage")
TRAINED = "trained"  # the highlight class of trained tokens in the examples
CHOSEN, REJECTED = "chosen", "rejected"  # the highlight classes of a preference pair's answers
CELL_CHARS = 300


class DataPreview(NamedTuple):
    """The preview's outputs by name: the components in the layout, and the values an event returns for them (the
    outputs list is built from the components, so the two can never disagree on an order)."""

    message: Any  # the data's problem, or the rows that will be dropped; hidden when there is none
    detected: Any  # the format, columns and usable rows
    box: Any  # the column holding everything below; hidden until there is a preview
    rows: Any  # the first rows, as a table
    examples: Any  # examples as the model sees them, trained tokens highlighted
    histogram: Any  # tokens per row, up to the cutoff
    report: Any  # what the data pipeline read, used and dropped

    @classmethod
    def unchanged(cls) -> DataPreview:
        """Every output left as it is."""
        return cls(*[gr.skip()] * len(cls._fields))

    @classmethod
    def nothing(cls, message: str) -> DataPreview:
        """No preview: only ``message`` (shown when not empty)."""
        return cls(message=gr.Markdown(message, visible=bool(message)), detected="", box=gr.Column(visible=False),
                   rows=None, examples=None, histogram=None, report="")


def _cell(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    return text if len(text) <= CELL_CHARS else text[:CELL_CHARS] + "…"


def _highlighted(examples: list[list[tuple[str, bool]]]) -> list[tuple[str, str | None]]:
    pieces: list[tuple[str, str | None]] = []
    for number, example in enumerate(examples, start=1):
        pieces.append((f"\n── example {number} ──\n" if number > 1 else "── example 1 ──\n", None))
        pieces.extend((text, TRAINED if trained else None) for text, trained in example)
    return pieces


def _pair_pieces(examples: list[Any]) -> list[tuple[str, str | None]]:
    pieces: list[tuple[str, str | None]] = []
    for number, example in enumerate(examples, start=1):
        pieces.append((f"\n── example {number} ──\n" if number > 1 else "── example 1 ──\n", None))
        if hasattr(example, "label"):  # a kto completion
            pieces += [(example.prompt, None), (example.completion, CHOSEN if example.label else REJECTED)]
        else:
            pieces += [(example.prompt, None), (example.chosen, CHOSEN), ("\n   or\n", None),
                       (example.rejected, REJECTED)]
    return pieces


def _preview_pairs(cfg: RunConfig, tokenizer: Any) -> DataPreview:
    """Stage dpo's and kto's preview: the first pairs side by side as the model reads them (prompt, chosen,
    rejected through the chat template; for kto each completion with its label), what will be dropped with file
    and line, and the lengths of prompt + the longer answer."""
    from denselora_app.engine.preferences import preview_pairs

    preview = preview_pairs(loaders.data_source(cfg), tokenizer, cutoff_len=cfg.cutoff_len, stage=cfg.stage)
    report = preview["report"]
    message = _dropped(report)
    what = "pairs" if cfg.stage == "dpo" else "completions"
    detected = _found("Layout", preview["format"], "detected", preview["columns"], f"{report.rows_used} {what}")
    lengths = charts.length_histogram(preview["lengths"], cfg.cutoff_len)
    if cfg.stage == "kto":
        side_by_side = pd.DataFrame([[_cell(e.prompt), _cell(e.completion), CHOSEN if e.label else REJECTED]
                                     for e in preview["examples"]],
                                    columns=["prompt (as the model reads it)", "completion", "label"])
    else:
        side_by_side = pd.DataFrame([[_cell(p.prompt), _cell(p.chosen), _cell(p.rejected)]
                                     for p in preview["examples"]],
                                    columns=["prompt (as the model reads it)", CHOSEN, REJECTED])
    return DataPreview(message=gr.Markdown(message, visible=bool(message)), detected=detected,
                       box=gr.Column(visible=True), rows=side_by_side, examples=_pair_pieces(preview["examples"]),
                       histogram=gr.BarPlot(lengths, sort=list(dict.fromkeys(lengths["tokens"]))),
                       report=report.summary())


def preview_data(
    profile: gr.OAuthProfile | None = None, *, model: str, trust_remote_code: bool, data: str, data_format: str,
    cutoff_len: int, train_on_inputs: bool, stage: str = "sft"
) -> DataPreview:
    """What the data looks like to the model before any training: the rows that will be dropped (or why there is no
    preview), the detected format, the first rows, examples with trained tokens highlighted, the token-length
    histogram and the data report."""
    from denselora_app.engine.data import render_preview
    from denselora_app.engine.sources import DataError

    try:
        who = require(profile, Action.TRAIN)
        cfg = RunConfig(model=model, data=data, data_format=data_format if stage == "sft" else "auto",
                        cutoff_len=cutoff_len, train_on_inputs=train_on_inputs, trust_remote_code=trust_remote_code,
                        stage=stage)
        access.check_config(who, cfg)
    except (ConfigError, AccessError) as err:
        return DataPreview.nothing(warn(err))
    if not cfg.data:
        return DataPreview.nothing(warn("Choose training data: upload a file, type a path or a Hub dataset name."))
    try:
        tokenizer = loaders.tokenizer(cfg.model, cfg.trust_remote_code)
    except loaders.model_errors() as err:
        return DataPreview.nothing(warn(f"Cannot preview the data without the model's tokenizer: {err}"))
    if cfg.stage != "sft":
        try:
            return _preview_pairs(cfg, tokenizer)
        except DataError as err:
            return DataPreview.nothing(warn(err))
    try:
        preview = render_preview(loaders.data_source(cfg), tokenizer, fmt=cfg.data_format,
                                 cutoff_len=cfg.cutoff_len, train_on_inputs=cfg.train_on_inputs)
    except DataError as err:
        return DataPreview.nothing(warn(err))
    report = preview["report"]
    message = _dropped(report)
    how = "detected" if cfg.data_format == "auto" else "chosen"
    detected = _found("Format", preview["format"], how, preview["columns"], f"{report.rows_used} rows")
    lengths = charts.length_histogram(preview["lengths"], cfg.cutoff_len)
    rows = pd.DataFrame([[_cell(row.get(c, "")) for c in preview["columns"]] for row in preview["rows"]],
                        columns=preview["columns"])
    return DataPreview(
        message=gr.Markdown(message, visible=bool(message)),
        detected=detected,
        box=gr.Column(visible=True),
        rows=rows,
        examples=_highlighted(preview["examples"]),
        histogram=gr.BarPlot(lengths, sort=list(dict.fromkeys(lengths["tokens"]))),  # bins in token order, not A-Z
        report=report.summary(),
    )


def upload_data(file: str | None, profile: gr.OAuthProfile | None = None, **settings: Any) -> tuple[Any, ...]:
    """Store an uploaded file in the caller's uploads (runs/uploads/, on a Space runs/uploads/<user>/) and preview
    it; the data box then points at the stored copy. Only a file gradio received as an upload is taken.

    Returns the upload area, emptied again (ready for another file: the data box shows which one is used), the data
    box, then the preview (DataPreview).
    """
    from denselora_app.engine.sources import DataError

    if not file:
        return gr.skip(), gr.skip(), *DataPreview.nothing("")
    try:
        who = require(profile, Action.TRAIN)
        access.check_uploaded(file)
        stored = str(loaders.store_upload(file, who))
    except (DataError, AccessError) as err:
        return None, gr.skip(), *DataPreview.nothing(warn(err))
    return None, stored, *preview_data(profile, **{**settings, "data": stored})


def _dropped(report: Any) -> str:
    """The warning listing the rows a data report drops, or "" when it drops none."""
    if not report.dropped:
        return ""
    return warn(f"{sum(report.dropped.values())} of {report.rows_read} rows will be dropped:\n\n"
                + "\n".join(f"- {problem}" for problem in report.problems))


def _found(kind: str, layout: str, how: str, columns: list[str], usable: str) -> str:
    """The line under the preview saying what the data is: its layout, how it was picked, its columns, and how many
    rows (or pairs, completions) are usable."""
    return f"{kind}: **{layout}** ({how}) · columns: " + ", ".join(f"`{c}`" for c in columns) + f" · {usable} usable"
