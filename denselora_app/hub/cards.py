"""The model card of a published adapter: what it is, how it was trained, its loss curve and evaluation.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard, ModelCardData

from denselora_app.config import EMBEDDED_HUB_ID, EMBEDDED_MODEL, SAMPLE_DATA, SAMPLE_PAIRS, RunConfig
from denselora_app.hub.account import PublishError
from denselora_app.rules import hub_id as hub_id_of
from denselora_app.runs import Run, finite_number, read_json

log = logging.getLogger(__name__)


PAPER_URL = "https://arxiv.org/abs/2505.23808"
LOSS_CURVE = "loss_curve.png"


# Config keys that describe where and how the run was bookkept rather than the adapter; left out of the card.
_CARD_SKIPS = {"run_name", "device", "logging_steps", "save_steps", "save_total_limit", "trust_remote_code"}
_HUB_CACHE_FOLDER = re.compile(r"^models--([^/]+?)--([^/]+)$")  # huggingface_hub's cache layout


@dataclass(frozen=True)
class BaseModel:
    hub_id: str | None  # None: a local folder or file we cannot name on the Hub
    license: str | None
    label: str  # how the card names it when there is no Hub id


def base_model_of(cfg: RunConfig, override: str | None = None) -> BaseModel:
    """The base model's Hub id (and license when known) for the card and the Space; ``override`` wins."""
    if override:
        _check_model_id(override)
        return BaseModel(override, _known_license(override), override)
    if cfg.model == EMBEDDED_MODEL:
        return BaseModel(EMBEDDED_HUB_ID, _known_license(EMBEDDED_HUB_ID), EMBEDDED_HUB_ID)
    path = Path(cfg.model).expanduser()
    # A model loaded from huggingface_hub's cache (models--org--name/snapshots/<sha>) still has a Hub id.
    for part in path.parts:
        if match := _HUB_CACHE_FOLDER.match(part):
            hub_id = f"{match[1]}/{match[2]}"
            return BaseModel(hub_id, _known_license(hub_id), hub_id)
    if hub_id_of(cfg.model):
        return BaseModel(cfg.model, _known_license(cfg.model), cfg.model)
    return BaseModel(None, None, path.name or cfg.model)  # only the name: a local path says too much about a machine


def _known_license(hub_id: str) -> str | None:
    return "apache-2.0" if hub_id.startswith("HuggingFaceTB/SmolLM2-") else None


def _check_model_id(hub_id: str) -> None:
    if not hub_id_of(hub_id):
        raise PublishError(f"'{hub_id}' is not a Hugging Face model id (NAMESPACE/NAME) for the base model.")


def hub_dataset_of(cfg: RunConfig) -> str | None:
    """The Hub dataset the run trained on (``name`` of ``name:split``), or None for a file or the sample."""
    if cfg.data in (SAMPLE_DATA, SAMPLE_PAIRS):
        return None
    name = cfg.data.partition(":")[0]
    if not hub_id_of(name):
        return None
    return name


# How the card says what the run learnt from (RunConfig.stage).
_STAGE_TEXT = {"sft": "by supervised fine-tuning",
               "dpo": "by Direct Preference Optimization (TRL's DPOTrainer, {reference} as the reference) on "
                      "preference pairs",
               "kto": "by Kahneman-Tversky Optimization (TRL's KTOTrainer, {reference} as the reference) on "
                      "answers labelled desirable or not"}


def _stage_text(cfg: RunConfig) -> str:
    reference = (f"the adapter of run {cfg.init_adapter}, which it started from," if cfg.init_adapter
                 else "the base model")
    return _STAGE_TEXT[cfg.stage].format(reference=reference)


def _data_label(cfg: RunConfig) -> str:
    if cfg.data == SAMPLE_DATA:
        return "DenseLoRA Studio's sample data (studio_facts)"
    if cfg.data == SAMPLE_PAIRS:
        return "DenseLoRA Studio's sample preference pairs (ahoy_pairs)"
    return hub_dataset_of(cfg) or Path(cfg.data).name


def draw_loss_curve(metrics: list[dict[str, Any]], path: Path) -> bool:
    """Train and validation loss against step, as a PNG; False (and no file) when there is nothing to draw."""
    series = {
        label: [(m["step"], m[key]) for m in metrics if "step" in m and finite_number(m.get(key))]
        for label, key in (("train loss", "loss"), ("validation loss", "eval_loss"))
    }
    if not any(series.values()):
        return False
    from matplotlib.figure import Figure  # no pyplot: no global state, safe in the app's worker threads
    from matplotlib.ticker import MaxNLocator

    figure = Figure(figsize=(7, 3.6), dpi=110)
    axes = figure.add_subplot()
    for (label, points), color in zip(series.items(), ("#2563eb", "#f97316")):
        if points:
            steps, losses = zip(*points)
            axes.plot(steps, losses, label=label, color=color, marker="o" if len(points) < 20 else None)
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.savefig(path, format="png", bbox_inches="tight")
    return True


_CARD_TEMPLATE = """---
{{ card_data }}
---

# {{ title }}

{% if denselora %}A [DenseLoRA]({{ paper_url }}) adapter{% else %}A LoRA adapter{% endif %} for {{ base_text }}, \
trained with DenseLoRA Studio {{ stage_text }} on {{ data_label }}.
{% if embedded %}
It was trained on the 4-bit (Q4_1) GGUF copy of {{ base_text }} that DenseLoRA Studio ships for offline use, \
dequantized to float32; it loads on the original weights, which differ slightly from the quantized ones.
{% endif %}
{% if denselora %}
## What DenseLoRA is

DenseLoRA (Mu et al., ACL 2025, [arXiv:2505.23808]({{ paper_url }})) adapts a frozen model with far fewer \
parameters than LoRA. Instead of a pair of low-rank matrices per adapted layer, each module type t (for example \
`q_proj`) gets one encoder E_t (d_in -> r) and one decoder D_t (r -> d_out) shared by all layers, and every layer l \
gets only a small dense r x r matrix M_(l,t). A frozen linear layer W0 becomes

$$h = W_0 x + \\frac{\\alpha}{r}\\,\\sigma\\left(D_t\\, M_{l,t}\\, \\sigma(E_t\\, x)\\right)$$

with sigma = `{{ activation }}`, r = {{ r }} and alpha = {{ alpha }}. Only E_t, D_t and M_(l,t) are trained.
{% endif %}
## Use it

```bash
{{ install }}
```

```python
{% if denselora %}import sys

{% endif %}import torch
from huggingface_hub import snapshot_download
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

base_model_id = "{{ base_model_id }}"{% if not base_hub_id %}  # the base model this adapter was trained on{% endif %}
adapter_dir = snapshot_download("{{ adapter_id }}")
{% if denselora %}
# DenseLoRA is not built into PEFT: this repository carries the method as the package `denselora`, and importing
# it registers DenseLoRA (peft_type "DENSELORA") with PEFT. With DenseLoRA Studio installed,
# `import denselora_app.denselora` does the same.
sys.path.insert(0, adapter_dir)
import denselora  # noqa: E402,F401
{% endif %}
tokenizer = AutoTokenizer.from_pretrained({{ "adapter_dir" if has_tokenizer else "base_model_id" }})
{% if quantization_config %}# The base as it was trained: {{ quantization_text }} (needs `pip install bitsandbytes`; leave out
# quantization_config to load it unquantized).
from transformers import BitsAndBytesConfig

model = AutoModelForCausalLM.from_pretrained(base_model_id, dtype="auto", device_map="auto",
                                             quantization_config=BitsAndBytesConfig({{ quantization_config }}))
{% else %}model = AutoModelForCausalLM.from_pretrained(base_model_id, dtype="auto")
{% endif %}model = PeftModel.from_pretrained(model, adapter_dir).eval()

{% if chat %}messages = [{"role": "user", "content": "Hello! What can you help me with?"}]
inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
{% else %}inputs = tokenizer("Hello! What can you help me with?", return_tensors="pt")
{% endif %}with torch.no_grad():
    output = model.generate(**inputs, max_new_tokens=64, do_sample=False)
print(tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
```

## Training

{{ parameters }}
{% if quantization_text %}
Training quantization: the frozen base was loaded {{ quantization_text }}; the adapter itself was trained in full \
precision (float32).
{% endif %}
| Setting | Value |
|---|---|
{% for key, value in settings %}| `{{ key }}` | {{ value }} |
{% endfor %}
{% if loss_curve %}
![Train and validation loss]({{ loss_curve }})
{% endif %}{% if evaluation %}
## Evaluation

{{ evaluation }}
{% endif %}
## Citation

```bibtex
@inproceedings{mu2025denselora,
  title = {DenseLoRA: Dense Low-Rank Adaptation of Large Language Models},
  author = {Mu, Lin and others},
  booktitle = {Proceedings of the 63rd Annual Meeting of the Association for Computational Linguistics (ACL 2025)},
  year = {2025},
  eprint = {2505.23808},
  archivePrefix = {arXiv}
}
```
"""


def model_card(run: Run, repo_id: str, base: BaseModel, *, has_tokenizer: bool, loss_curve: str | None) -> ModelCard:
    """The model card: Hub metadata, what DenseLoRA is, a loading snippet, the training setup and results."""
    cfg = run.config()
    denselora = cfg.method == "denselora"
    versions = studio_versions()
    data = ModelCardData(
        base_model=base.hub_id,
        library_name="peft",
        license=base.license,
        datasets=[dataset] if (dataset := hub_dataset_of(cfg)) else None,
        pipeline_tag="text-generation",
        tags=(["denselora", "peft"] if denselora else ["lora", "peft"])
        + ([cfg.stage, "trl"] if cfg.stage != "sft" else []),
    )
    return ModelCard.from_template(
        data,
        template_str=_CARD_TEMPLATE,
        title=repo_id.split("/")[1],
        paper_url=PAPER_URL,
        denselora=denselora,
        embedded=cfg.model == EMBEDDED_MODEL,
        base_text=f"[{base.hub_id}](https://huggingface.co/{base.hub_id})" if base.hub_id else f"`{base.label}`",
        base_hub_id=base.hub_id,
        base_model_id=base.hub_id or base.label,
        adapter_id=repo_id,
        data_label=_data_label(cfg),
        stage_text=_stage_text(cfg),
        activation=cfg.activation,
        r=cfg.r,
        alpha=f"{cfg.alpha:g}",
        install=(f'pip install torch "transformers>={versions["transformers"]}" "peft=={versions["peft"]}" '
                 "huggingface_hub") if denselora else "pip install torch transformers peft huggingface_hub",
        has_tokenizer=has_tokenizer,
        chat=has_tokenizer and _has_chat_template(run.adapter_dir),
        parameters=_parameters_line(run),
        settings=_settings_rows(cfg, base),
        loss_curve=loss_curve,
        evaluation=evaluation_table(run.evaluation()),
        **_QUANTIZATION_CARD.get(cfg.quantization, {}),
    )


# How the card describes and reloads a quantized base (bitsandbytes settings as models.quantization_config uses).
_QUANTIZATION_CARD = {
    "4bit": {"quantization_text": "in 4-bit NF4 with double quantization (bitsandbytes)",
             "quantization_config": 'load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True'},
    "8bit": {"quantization_text": "in 8-bit (LLM.int8, bitsandbytes)", "quantization_config": "load_in_8bit=True"},
}


def _has_chat_template(folder: Path) -> bool:
    if any(folder.glob("chat_template.*")):
        return True
    return bool((read_json(folder / "tokenizer_config.json", default={}) or {}).get("chat_template"))


def _parameters_line(run: Run) -> str:
    facts = run.facts()
    if facts.trainable_percent is None:
        return ""
    line = (f"**Trainable parameters:** {facts.trainable_parameters:,} ({facts.trainable_percent:.4f}% of the base "
            f"model's {facts.total_parameters:,}).")
    if facts.steps:
        line += f" Trained for {facts.steps} steps."
    return line


def _settings_rows(cfg: RunConfig, base: BaseModel) -> list[tuple[str, str]]:
    rows = []
    for key, value in cfg.to_dict().items():
        if key in _CARD_SKIPS:
            continue
        if key == "model":
            value = base.hub_id or base.label
        elif key == "data":
            value = _data_label(cfg)
        elif isinstance(value, list):
            value = ", ".join(value)
        rows.append((key, _cell(value)))
    rows.append(("effective batch size", str(cfg.effective_batch_size)))
    return rows


def _cell(value: Any) -> str:
    if isinstance(value, float):
        value = f"{value:.4g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


# What the card shows of a result, in this order; the rest of eval.json (paths, hashes, times) stays out of it.
_EVAL_COLUMNS = ("model", "dataset", "mode", "accuracy", "loss", "perplexity", "exact_match", "f1", "score", "total",
                 "correct", "unanswered", "checkpoint")


_METRIC_KEYS = {"accuracy", "loss", "perplexity", "exact_match", "f1", "score"}
_MAX_EVAL_ROWS = 50


def evaluation_table(data: Any) -> str:
    """A Markdown table of a run's eval.json, whatever its exact shape; "" when there is nothing to show.

    Accepts a list of result rows, ``{"results": [...], "base": [...]}`` (what serving/evaluate.py writes), or results
    grouped under other keys. A row is a mapping with a metric (accuracy, loss, ...), or a dataset and a number;
    rows under "results" are the adapter's, rows under another key are labelled with it. Anything else is searched
    for rows, and what holds none is ignored.
    """
    rows = list(_result_rows(data, None))[:_MAX_EVAL_ROWS]
    columns = [c for c in _EVAL_COLUMNS if any(_scalar(r.get(c)) and r.get(c) is not None for r in rows)]
    if not rows or columns == ["model"]:
        return ""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = [row.get(c) if _scalar(row.get(c)) and row.get(c) is not None else "" for c in columns]
        if "dataset" in columns and isinstance(row.get("dataset"), str):
            cells[columns.index("dataset")] = _dataset_name(row["dataset"])
        lines.append("| " + " | ".join(_cell(cell) for cell in cells) + " |")
    return "\n".join(lines)


def _result_rows(data: Any, label: str | None) -> Iterator[dict[str, Any]]:
    if isinstance(data, list):
        for item in data:
            yield from _result_rows(item, label)
    elif isinstance(data, dict):
        if _METRIC_KEYS & data.keys() or ("dataset" in data and any(finite_number(v) for v in data.values())):
            yield {**data, "model": label or data.get("model") or "adapter"}
        else:
            for key, value in data.items():
                yield from _result_rows(value, label or ("adapter" if key == "results" else key))


def _scalar(value: Any) -> bool:
    return value is None or isinstance(value, (str, int, float, bool))


def _dataset_name(dataset: str) -> str:
    """A Hub dataset as it is; a file by its name only (its folder is a detail of the training machine)."""
    return dataset if hub_id_of(dataset) else Path(dataset).name


def studio_versions() -> dict[str, str]:
    """Version bounds for the Space, from what trained the adapter here."""
    transformers = version("transformers").split(".")
    return {
        "transformers": ".".join(transformers[:2]),
        # The DenseLoRA package plugs into PEFT's tuner internals: pin the release it was written against.
        "peft": version("peft"),
        "gradio": version("gradio"),
    }


# ---- the card of an exported model (export/: a standard LoRA adapter, a merged model, a GGUF file) -------------


@dataclass(frozen=True)
class ExportFacts:
    """What an export is and how faithful it is to the DenseLoRA adapter it came from (export/build.py fills it)."""

    run_id: str
    kind: str  # "lora", "merged" or "gguf" (rules.EXPORT_FORMATS)
    exact: bool  # identity activation: the export is the adapter itself, up to float rounding
    rank: int
    activation: str
    layers: int
    gguf_type: str | None = None
    relative_error: float | None = None  # held-out relative error of the fitted updates, all layers together
    max_logit_diff: float | None = None  # end to end, export against the adapter, on held-out calibration rows
    mean_logit_diff: float | None = None
    greedy_identical: float | None = None  # share of held-out rows answered identically (greedy)
    calibration_rows: int | None = None
    notes: list[str] = field(default_factory=list)


_EXPORT_WHAT = {
    "lora": "a standard [PEFT](https://github.com/huggingface/peft) LoRA adapter (`peft_type: LORA`)",
    "merged": "a merged model: the base's weights with the adapter's update added in",
    "gguf": "a GGUF file of the merged model, for llama.cpp, Ollama and LM Studio",
}

_EXPORT_TEMPLATE = """---
{{ card_data }}
---

# {{ title }}

This is {{ what }}, exported by DenseLoRA Studio from a [DenseLoRA]({{ paper_url }}) adapter (run \
`{{ facts.run_id }}`) for {{ base_text }}. It loads without DenseLoRA Studio and without the DenseLoRA package.

## How it was made

{% if facts.exact %}The adapter used `activation: identity`, so its update `(alpha/r) · D · M_l · E · x` is exactly a \
rank-{{ facts.rank }} LoRA in each of its {{ facts.layers }} adapted layers: `A_l = E`, `B_l = (alpha/r) · D · M_l`. \
The export is exact up to float rounding.
{% else %}The adapter used `activation: {{ facts.activation }}`, whose update `act(D · M_l · act(E · x))` no linear \
map reproduces exactly. A rank-{{ facts.rank }} LoRA was fitted in each of its {{ facts.layers }} adapted layers: the \
least-squares map from the inputs each layer saw on calibration data to the adapter's update, truncated to its best \
rank-{{ facts.rank }} part under the input covariance.
{% endif %}{% if facts.kind != "lora" %}The LoRA update `B_l A_l` was then added to each adapted weight of the base \
(`W_l + B_l A_l`){% if facts.gguf_type %} and the merged model written as GGUF ({{ facts.gguf_type }}){% endif %}.
{% endif %}{% for note in facts.notes %}
{{ note }}
{% endfor %}
## Fidelity

{% if fidelity %}Measured on {{ facts.calibration_rows }} held-out calibration rows, against the DenseLoRA adapter it \
came from:

| measure | value |
|---|---|
{% for key, value in fidelity %}| {{ key }} | {{ value }} |
{% endfor %}{% elif facts.exact %}Exact by construction (no calibration data was given to measure it end to end).
{% endif %}{% if facts.gguf_type == "q8_0" %}
The q8_0 weights round each block of 32 values to 8 bits, which adds its own small difference.
{% endif %}"""


def export_card(run: Run, base: BaseModel, facts: ExportFacts, *, title: str) -> ModelCard:
    """The model card of an exported folder: what it is, how it was made from the adapter, its measured fidelity."""
    cfg = run.config()
    data = ModelCardData(
        base_model=base.hub_id,
        library_name="peft" if facts.kind == "lora" else "transformers",
        license=base.license,
        datasets=[dataset] if (dataset := hub_dataset_of(cfg)) else None,
        pipeline_tag="text-generation",
        tags=["denselora", "denselora-export", *(["lora", "peft"] if facts.kind == "lora" else []),
              *(["gguf"] if facts.kind == "gguf" else [])],
    )
    measures = (("held-out relative error of the updates", facts.relative_error),
                ("max logit difference", facts.max_logit_diff), ("mean logit difference", facts.mean_logit_diff),
                ("identical greedy answers", facts.greedy_identical))
    fidelity = [(label, f"{value:.0%}" if "answers" in label else f"{value:.3g}") for label, value in measures
                if value is not None]
    return ModelCard.from_template(
        data, template_str=_EXPORT_TEMPLATE, title=title, what=_EXPORT_WHAT[facts.kind], paper_url=PAPER_URL,
        facts=facts, fidelity=fidelity,
        base_text=f"[{base.hub_id}](https://huggingface.co/{base.hub_id})" if base.hub_id else f"`{base.label}`",
    )
