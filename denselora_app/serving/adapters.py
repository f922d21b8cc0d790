"""Which adapter a user means (a run, a run's checkpoint, an adapter folder, a Hub adapter id), and whether the
device has room for it.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import torch
from peft import PeftConfig

from denselora_app import denselora  # noqa: F401  (registers DenseLoRA with PEFT, so its adapters load)
from denselora_app.config import ConfigError, StudioError
from denselora_app.hub import access
from denselora_app.rules import hub_id, on_disk
from denselora_app.runs import (
    ADAPTER_CONFIG,
    AdapterPlace,
    Run,
    RunError,
    adapter_place,
    is_run_folder,
    list_runs,
    resolve_run,
    run_holding,
    runs_dir,
    runs_folder_form,
    typed_folder,
)

log = logging.getLogger(__name__)


MEMORY_HEADROOM = 1.2  # weights plus room for activations and the KV cache while generating
_GB = 1024**3


class ChatError(StudioError, RuntimeError):
    """An adapter or base model that cannot be chatted with; the message says why and what to do instead."""


@dataclass(frozen=True)
class AdapterRef:
    """An adapter resolved to where its weights are and which base model it belongs to."""

    label: str  # what the UI shows: the run id (with '@ checkpoint-N'), the folder, or the Hub id
    location: str  # the adapter folder, or a Hub adapter id
    base_model: str  # the model spec to load it onto
    method: str  # the PEFT method, lower case: 'denselora', 'lora', ...
    run_dir: str | None = None  # the run it belongs to, if any
    checkpoint: int | None = None
    trust_remote_code: bool = False
    quantization: str = "none"  # how its base was loaded in training ('none', '4bit', '8bit')

    @property
    def run(self) -> Run | None:
        return Run(Path(self.run_dir)) if self.run_dir else None


def available_adapters(root: Path | None = None) -> list[AdapterRef]:
    """Every adapter the runs folder holds, newest run first: each run's final adapter, then its checkpoints."""
    refs = []
    for run in list_runs(root):
        options: list[int | None] = [None] if run.has_adapter() else []
        for checkpoint in options + list(reversed(run.checkpoints())):
            try:
                refs.append(_run_ref(run, checkpoint))
            except ChatError as err:  # one broken run must not hide the others
                log.warning("Skipping %s: %s", run.id, err)
    return refs


def resolve_adapter(ref: str, checkpoint: int | None = None, root: Path | None = None, *,
                    outside_root: bool = False) -> AdapterRef:
    """What ``ref`` names: a run (runs.resolve_run: its id or its folder; one outside the runs folder ``root`` only
    with ``outside_root``, as the CLI allows), a run's adapter or checkpoint folder, any adapter folder, or a
    Hugging Face Hub adapter id. ``checkpoint`` picks a run's checkpoint instead of its final adapter."""
    ref = str(ref).strip()
    if not ref:
        raise ChatError("No adapter given: choose a run, an adapter folder, or a Hub adapter id.")
    try:
        run = resolve_run(ref, root, outside_root=outside_root)
    except RunError as error:
        refusal = error
    else:
        return _run_ref(run, checkpoint)
    path = typed_folder(ref)  # None for text no folder can have (a NUL, ~nosuchuser): then only a Hub id is left
    if path is not None and on_disk(str(path)):
        place = adapter_place(path)
        run = _run_of_folder(place, root, outside_root)
        if run is None and is_run_folder(path):  # a run the resolver refused (outside the runs folder, here)
            raise ChatError(str(refusal))
        if run is None:
            if checkpoint is not None:
                raise ChatError(f"--checkpoint only applies to runs, and {ref!r} is not a run.")
            return _folder_ref(path)
        if place.checkpoint is not None:
            if checkpoint is not None and checkpoint != place.checkpoint:
                raise ChatError(f"{ref!r} is checkpoint {place.checkpoint}, not checkpoint {checkpoint}.")
            checkpoint = place.checkpoint
        return _run_ref(run, checkpoint)
    # runs/<id> has the shape of a Hub id too; it names a run, so the run's refusal is the answer.
    if hub_id(ref, namespaced=True) and runs_folder_form(ref, root) is None:
        if checkpoint is not None:
            raise ChatError(f"--checkpoint only applies to runs, and {ref!r} is not a run.")
        return _hub_ref(ref, root)
    raise ChatError(f"{refusal}. Chat and evaluation also take an adapter folder or a Hub adapter id (user/name).")


def _run_of_folder(place: AdapterPlace | None, root: Path | None, outside_root: bool) -> Run | None:
    """The run an adapter folder sits in, when resolve_run accepts that run; else None: the folder is an adapter on
    its own."""
    if place is None:
        return None
    try:
        return resolve_run(str(place.run_folder), root, outside_root=outside_root)
    except RunError:
        return None


def _known_runs(root: Path | None) -> str:
    runs = list_runs(root)
    where = root or runs_dir()
    if not runs:
        return f"There are no runs in {where}."
    names = ", ".join(r.id for r in runs[:8]) + (", ..." if len(runs) > 8 else "")
    return f"Runs in {where}: {names}."


def _read_adapter_config(folder: Path) -> dict[str, Any]:
    path = folder / ADAPTER_CONFIG
    if not path.is_file():
        hint = (" It holds a base model (config.json), not an adapter." if (folder / "config.json").exists()
                else " Choose the folder an adapter was saved in (it has adapter_config.json and the weights).")
        raise ChatError(f"The folder {str(folder)!r} has no {ADAPTER_CONFIG}, so it is not a PEFT adapter.{hint}")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise ChatError(f"{path} cannot be read: {err}") from None
    if not isinstance(config, dict) or not config.get("peft_type"):
        raise ChatError(f"{path} does not name a PEFT method (no 'peft_type'); it is not a PEFT adapter config.")
    return config


def _run_ref(run: Run, checkpoint: int | None) -> AdapterRef:
    try:
        cfg = run.config()
    except ConfigError as err:
        raise ChatError(f"Run {run.id} has an unreadable config.yaml: {err}") from None
    steps = run.checkpoints()
    if checkpoint is None:
        folder, label = run.adapter_dir, run.id
        if not run.has_adapter():
            state = run.status().state
            hint = (f"chat with one of its checkpoints instead: {', '.join(map(str, steps))}" if steps
                    else "it has no checkpoints yet either")
            raise ChatError(f"Run {run.id} has no final adapter yet (state: {state}); {hint}.")
    else:
        if checkpoint not in steps:
            have = f"its checkpoints are: {', '.join(map(str, steps))}" if steps else "it has no checkpoints"
            raise ChatError(f"Run {run.id} has no checkpoint {checkpoint}; {have}.")
        folder, label = run.checkpoint_dir(checkpoint), f"{run.id} @ checkpoint-{checkpoint}"
    adapter_config = _read_adapter_config(folder)
    # The run's own model spec, not the adapter's base_model_name_or_path: that is often a machine-specific cache
    # folder (the embedded default is trained from its converted copy).
    return AdapterRef(label=label, location=str(folder), base_model=cfg.model,
                      method=str(adapter_config["peft_type"]).lower(), run_dir=str(run.path),
                      checkpoint=checkpoint, trust_remote_code=cfg.trust_remote_code, quantization=cfg.quantization)


def _folder_ref(folder: Path) -> AdapterRef:
    if not folder.is_dir():
        raise ChatError(f"{str(folder)!r} is a file: give the folder that contains {ADAPTER_CONFIG}.")
    config = _read_adapter_config(folder)
    base = config.get("base_model_name_or_path")
    if not base:
        raise ChatError(f"{folder / ADAPTER_CONFIG} does not say which base model it belongs to "
                        "(no 'base_model_name_or_path').")
    return AdapterRef(label=folder.name, location=str(folder.resolve()), base_model=str(base),
                      method=str(config["peft_type"]).lower())


def _hub_ref(repo_id: str, root: Path | None) -> AdapterRef:
    try:  # resolve_adapter checked the id (rules.hub_id)
        config = PeftConfig.from_pretrained(repo_id)
    except Exception as err:  # offline, missing, private, not an adapter: all mean "cannot use this id"
        raise ChatError(f"No run or adapter folder named {repo_id!r}, and it cannot be used as a Hugging Face Hub "
                        f"adapter id: {err}. {_known_runs(root)}") from None
    if not config.base_model_name_or_path:
        raise ChatError(f"The Hub adapter {repo_id!r} does not say which base model it belongs to.")
    return AdapterRef(label=repo_id, location=repo_id, base_model=config.base_model_name_or_path,
                      method=str(getattr(config.peft_type, "value", config.peft_type)).lower())


def training_notice(device: torch.device, root: Path | None = None) -> str | None:
    """A sentence saying a run is training on ``device`` right now, or None when it is free. It names the run only
    when every caller may see it: on a Space every visitor reads this notice."""
    busy = run_holding(str(device), root)
    if busy is None:
        return None
    run = f"Run {busy.id}" if access.seen_by_anyone(busy) else "A run"
    return (f"{run} is training on {device}: chat shares the device with it, so replies are slower "
            "and both need memory.")


def memory_problem(device: torch.device, needed_bytes: int) -> str | None:
    """Why ``needed_bytes`` will not fit on ``device`` now (free accelerator memory, or available RAM), or None."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        where = f"{device}"
    else:
        free, where = psutil.virtual_memory().available, "this machine's RAM"
    if free >= needed_bytes:
        return None
    return (f"only {free / _GB:.1f} GB is free in {where}, and the base model needs about "
            f"{needed_bytes / _GB:.1f} GB")
