"""The adapter methods a run can use (DenseLoRA and PEFT's LoRA baseline), built from one RunConfig.

Also the numbers users want before starting: trainable parameters for both methods (counted on the ``meta``
device, so no weights are allocated). The memory a run needs is planned in ``memory.py``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peft import LoraConfig, PeftConfig, get_peft_model
from torch import nn
from transformers import PretrainedConfig

from denselora_app import denselora  # noqa: F401  (registers DenseLoRA with PEFT)
from denselora_app.config import METHODS, PAPER_TARGETS, RunConfig, StudioError
from denselora_app.denselora import DenseLoraConfig
from denselora_app.engine.models import linear_layers, linear_names, meta_model


def build_peft_config(cfg: RunConfig, method: str | None = None) -> PeftConfig:
    """The PEFT config of ``cfg``'s method (or of ``method``, to compare the two on the same settings)."""
    method = method or cfg.method
    common = dict(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=list(cfg.target_modules),
        task_type="CAUSAL_LM",
    )
    if method == "denselora":
        return DenseLoraConfig(activation=cfg.activation, dropout_placement=cfg.dropout_placement,
                               init_scale=cfg.init_scale, **common)
    if method == "lora":
        return LoraConfig(**common)
    raise ValueError(f"Unknown method '{method}': use 'denselora' or 'lora'.")


@dataclass
class ParameterCount:
    total: int  # base model parameters
    method: str  # the run's method
    by_method: dict[str, int]  # trainable parameters of every method at the run's rank and targets

    @property
    def trainable(self) -> int:
        return self.by_method[self.method]

    @property
    def lora_trainable(self) -> int:
        return self.by_method["lora"]

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.total

    @property
    def lora_percent(self) -> float:
        return 100.0 * self.lora_trainable / self.total

    def summary(self, method: str = "denselora") -> str:
        line = f"Trainable parameters: {self.trainable:,} ({self.percent:.4f}% of the model)"
        if method == "denselora":
            line += f" - LoRA at this rank: {self.lora_trainable:,} ({self.lora_percent:.4f}%)"
        return line


class AdapterError(StudioError, ValueError):
    """The adapter does not fit the model (target modules it lacks, a rank wider than its layers); says what would."""


def check_adapter(model_config: PretrainedConfig, cfg: RunConfig) -> ParameterCount:
    """Check that ``cfg``'s target modules exist in the model and that its rank fits their widths, then count
    parameters. Raises AdapterError naming the problem and the values that would work."""
    model = meta_model(model_config)
    linear = linear_layers(model)
    available = linear_names(model)
    chosen: dict[str, nn.Module] = {}
    missing = []
    for target in cfg.target_modules:  # PEFT's rule: a target names a module or the end of its dotted name
        matches = {n: m for n, m in linear.items() if n == target or n.endswith(f".{target}")}
        chosen.update(matches)
        if not matches:
            missing.append(target)
    if missing:
        raise AdapterError(
            f"target_modules {', '.join(missing)}: {type(model).__name__} has no such Linear layer. Its layers are "
            f"{', '.join(available)}; choose among those"
            + (f" (the paper's choice: {', '.join(t for t in PAPER_TARGETS if t in available)})."
               if any(t in available for t in PAPER_TARGETS) else ".")
        )
    name, module = min(chosen.items(), key=lambda item: min(item[1].weight.shape))
    narrowest = min(module.weight.shape)
    if cfg.r > narrowest:
        raise AdapterError(
            f"r={cfg.r} is wider than the narrowest adapted layer ({name.rsplit('.', 1)[-1]}: "
            f"{' x '.join(map(str, module.weight.shape))}), so the extra rank adds parameters and memory but no "
            f"capacity. Use r <= {narrowest}; 8 to 64 is usual."
        )
    return count_parameters(model_config, cfg, model=model)


def count_parameters(model_config: PretrainedConfig, cfg: RunConfig, model: nn.Module | None = None) -> ParameterCount:
    """Exact counts from the model's architecture, built on the meta device (no memory, ~0.1 s; ~1 s for an 8B
    model). ``model``: that architecture already built on meta, used for ``cfg``'s method (PEFT changes it)."""
    counts = {}
    for method in dict.fromkeys((cfg.method, *METHODS)):  # the others too: the Train tab compares them
        model = model or meta_model(model_config)
        total = sum(p.numel() for p in model.parameters())
        peft_model = get_peft_model(model, build_peft_config(cfg, method))
        counts[method] = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
        model = None
    return ParameterCount(total=total, method=cfg.method, by_method=counts)


# ---- what the choice of method means, measured ---------------------------------------------------------------------

MEASURED_ACCURACY = Path(__file__).with_name("measured_accuracy.json")  # written by benchmarks/accuracy_smollm2.py
BENCHMARKS_DOC = "docs/benchmarks.md"
_LABELS = {"denselora": "DenseLoRA", "lora": "LoRA"}


def measured_accuracy() -> dict[str, Any] | None:
    """The headline of the accuracy benchmark on the embedded 30-layer model (each arm's mean and std over its
    seeds), as benchmarks/accuracy_smollm2.py writes it once its table is complete; None before that."""
    try:
        return json.loads(MEASURED_ACCURACY.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def method_comparison(counts: ParameterCount, memory: dict[str, str] | None = None, rank: int | None = None,
                      docs: str = BENCHMARKS_DOC) -> str:
    """What choosing DenseLoRA or LoRA means for this run: each one's trainable parameters (and planned training
    memory, when known) at this rank, and the measured accuracy of both on the embedded model, with where the
    measurements are described."""
    at = f" r{rank}" if rank else ""
    parts = []
    for method in METHODS:
        share = 100.0 * counts.by_method[method] / counts.total
        planned = f", about {memory[method]} to train" if memory and method in memory else ""
        parts.append(f"**{_LABELS[method]}{at}**: {counts.by_method[method]:,} trainable ({share:.3g}%){planned}")
    lines = [" · ".join(parts)]
    measured = measured_accuracy()
    if measured:
        arms = " · ".join(f"{arm['label']} **{100 * arm['mean']:.1f}%** ± {100 * arm['std']:.1f}"
                          for arm in measured["arms"])
        lines.append(f"Test accuracy on {measured['model']}, {measured['task']} (mean ± std over {measured['seeds']} "
                     f"seeds, each method at the learning rate that did best on validation; the base model scores "
                     f"{100 * measured['base']:.1f}%): {arms}.")
    lines.append(f"How these were measured: {docs}.")
    return "\n\n".join(lines)
