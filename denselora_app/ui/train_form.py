"""The Train tab's form events: the model check, the parameter and memory lines, presets and the equivalent command.

Functions that take the whole form receive it as keyword arguments named like the RunConfig fields (gradio's
``inputs_kwargs``), which also names the API parameters after them.
"""

from __future__ import annotations

from typing import Any

import gradio as gr

from denselora_app import config as C
from denselora_app.config import ConfigError
from denselora_app.hub import access
from denselora_app.hub.access import AccessError, Action
from denselora_app.hub.hosting import space_id
from denselora_app.ui import forms, loaders
from denselora_app.ui.data_preview import PREVIEW_FIELDS, DataPreview, preview_data
from denselora_app.ui.messages import require, warn

# (label, value) pairs of the choice controls whose values are not words a newcomer reads.
METHOD_CHOICES = [("DenseLoRA", "denselora"), ("LoRA", "lora")]
STAGE_CHOICES = [("Supervised fine-tuning (SFT)", "sft"), ("Preference pairs (DPO)", "dpo"),
                 ("Good and bad answers (KTO)", "kto")]
QUANTIZATION_CHOICES = [("full precision (dtype)", "none"), ("4-bit (NF4)", "4bit"), ("8-bit (LLM.int8)", "8bit")]


def merge_targets(offered: list[str], wanted: list[str]) -> list[str]:
    """The target-module choices: those offered (the model's Linear layers once it is checked, else the form's own
    targets) and the ones ``wanted``, each once and in that order."""
    return list(dict.fromkeys([*offered, *wanted]))


def check_model(model: str, trust_remote_code: bool, target_modules: list[str],
                profile: gr.OAuthProfile | None = None) -> tuple[str, Any]:
    """Resolve the model spec: its summary line, and the target-module choices from its own Linear layers."""
    try:
        require(profile, Action.TRAIN)
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
        require(profile, Action.TRAIN)
        cfg = forms.config_from_settings(settings)
        access.check_model(cfg.model)
        model_config = loaders.model_config(cfg.model, cfg.trust_remote_code)
        from denselora_app.engine.methods import count_parameters

        counts = count_parameters(model_config, cfg)
    except (ConfigError, AccessError) as err:
        return warn(err), "", ""
    except loaders.model_errors() as err:
        return warn(f"Cannot count parameters: {err}"), "", ""
    from denselora_app.engine.methods import method_comparison

    try:
        from denselora_app.engine.memory import free_memory, plan_memory
        from denselora_app.engine.models import resolve_device

        device = str(resolve_device(cfg.device))
        plan = plan_memory(model_config, cfg, counts, device, free_memory(device))
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
    from denselora_app.engine.methods import BENCHMARKS_DOC

    space = space_id()
    if space:
        return f"[{BENCHMARKS_DOC}](https://huggingface.co/spaces/{space}/blob/main/{BENCHMARKS_DOC})"
    return f"`{BENCHMARKS_DOC}` in the studio's folder"


def stage_changed(stage: str, data: str) -> tuple[Any, ...]:
    """What the Stage choice shows: beta for dpo and kto, the DPO loss for dpo; the data format, packing and
    train-on-inputs for sft (dpo and kto detect their layout); the stage's own sample when the data is another
    stage's sample (kto trains on the sample pairs, unpaired). Returns updates for the preference settings row,
    dpo_loss, data_format, packing, train_on_inputs and data."""
    sft = stage == "sft"
    samples = {"sft": C.SAMPLE_DATA, "dpo": C.SAMPLE_PAIRS, "kto": C.SAMPLE_PAIRS}
    swapped = samples.get(stage) if data in samples.values() and data != samples.get(stage) else None
    return (gr.update(visible=not sft), gr.update(visible=stage == "dpo"),
            gr.update(visible=sft, **({} if sft else {"value": "auto"})),
            gr.update(visible=sft, **({} if sft else {"value": False})), gr.update(visible=sft),
            swapped if swapped else gr.skip())


def checkpointing_for(quantization: str) -> Any:
    """A quantized base is for a model that barely fits: gradient checkpointing goes on with it (as RunConfig's
    default does); it can be turned off again."""
    return gr.skip() if quantization == "none" else True


# ---- presets and the command ---------------------------------------------------------------------------------------


def load_preset(name: str | None, target_choices: list[str],
                profile: gr.OAuthProfile | None = None) -> tuple[Any, ...]:
    """Fill every control from a preset file. Returns a value per RunConfig field (forms.FIELDS order), a message,
    then the preview of the preset's data (DataPreview)."""
    unchanged = [gr.skip()] * len(forms.FIELDS)
    if not name:
        return *unchanged, warn("Choose a preset first."), *DataPreview.unchanged()
    try:
        require(profile, Action.TRAIN)
        cfg = forms.load_preset(name)
    except (ConfigError, AccessError) as err:
        return *unchanged, warn(err), *DataPreview.unchanged()
    values: list[Any] = []
    for field in forms.FIELDS:
        value = getattr(cfg, field)
        if field == "target_modules":  # the preset may name layers the checked model did not list
            value = gr.CheckboxGroup(choices=merge_targets(target_choices, value), value=value)
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
        require(profile, Action.TRAIN)
        path = forms.save_preset(forms.config_from_settings(settings), preset_name)
    except (ConfigError, AccessError, OSError) as err:
        return warn(err), gr.skip()
    return f"Saved `{path}`.", gr.Dropdown(choices=forms.list_presets(), value=path.name)


def show_command(preset: str | None, profile: gr.OAuthProfile | None = None, **settings: Any) -> str:
    """The CLI call that trains exactly what the form shows (from the chosen preset, when there is one)."""
    try:
        require(profile, Action.TRAIN)
        return forms.cli_command(forms.config_from_settings(settings), preset or None)
    except (ConfigError, AccessError) as err:
        return warn(err)
