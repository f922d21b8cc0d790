"""``export RUN --to lora|merged|gguf``: check the run and the request, get the LoRA factors (exact for an
identity-activation adapter, fitted on calibration data otherwise), write the folder with its report and card.

Every refusal comes before anything is written: a refused export leaves no folder behind.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from denselora_app.config import EMBEDDED_MODEL
from denselora_app.export.source import (
    ExportError,
    ExportSource,
    LoraFactor,
    base_folder,
    dense_layers,
    export_source,
    layer_shapes,
)
from denselora_app.hub.cards import ExportFacts, base_model_of, export_card
from denselora_app.rules import EXACT_EXPORT_ACTIVATION, EXPORT_FORMATS, GGUF_TYPES
from denselora_app.runs import Run

log = logging.getLogger(__name__)

EXPORT_REPORT = "export_report.json"  # written into every export folder: what was made, how, and how faithful
CARD = "README.md"


@dataclass(frozen=True)
class ExportResult:
    kind: str  # one of rules.EXPORT_FORMATS
    folder: Path
    files: list[str]
    facts: ExportFacts

    @property
    def message(self) -> str:
        how = "exact" if self.facts.exact else f"fitted at rank {self.facts.rank}"
        lines = [f"Exported run {self.facts.run_id} as {self.kind} ({how}) to {self.folder}:",
                 *(f"  {name}" for name in self.files), *self.facts.notes]
        return "\n".join(lines)


def _empty_target(out_dir: Path | str) -> Path:
    target = Path(out_dir).expanduser().resolve()
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise ExportError(f"{target} already exists and is not an empty folder: choose a new or empty folder, so "
                          "nothing there is overwritten.")
    return target


def calibration_refusal(run_id: str, activation: str) -> str:
    return (f"Run {run_id}'s adapter uses activation {activation}: its update act(D·M·act(E·x)) is nonlinear in x, "
            "so no LoRA or merged weight reproduces it exactly. Give calibration data (--calibration FILE: rows in a "
            "training format, e.g. the run's own data) to fit a rank-K LoRA on what each layer sees and measure its "
            f"error (export_report.json); or train with activation: {EXACT_EXPORT_ACTIVATION}, which exports exactly.")


def export_run(
    run: Run,
    to: str,
    out_dir: Path | str,
    *,
    calibration: str | None = None,
    rank: int | None = None,
    gguf_type: str = GGUF_TYPES[0],
    progress: Callable[[str], None] | None = None,
) -> ExportResult:
    """Export ``run``'s adapter as ``to`` into ``out_dir`` (new or empty). ``calibration`` (a data file or Hub
    dataset) is required for a nonlinear adapter and measures any export's fidelity; ``rank`` is the fitted rank."""
    if to not in EXPORT_FORMATS:
        raise ExportError(f"Unknown export format {to!r}: use one of {', '.join(EXPORT_FORMATS)}.")
    if gguf_type not in GGUF_TYPES:
        raise ExportError(f"Unknown GGUF type {gguf_type!r}: use one of {', '.join(GGUF_TYPES)}.")
    source = export_source(run)
    target = _empty_target(out_dir)
    activation = source.adapter_config["activation"]
    exact = activation == EXACT_EXPORT_ACTIVATION
    if not exact and not calibration:
        raise ExportError(calibration_refusal(run.id, activation))
    if exact and rank not in (None, int(source.adapter_config["r"])):
        raise ExportError(f"--rank sets the rank of a fitted export; run {run.id}'s adapter (activation "
                          f"{activation}) exports exactly at its own rank {source.adapter_config['r']}.")
    if rank is not None and rank < 1:
        raise ExportError(f"--rank must be a positive number, got {rank}.")
    base = base_folder(source.cfg.model) if to != "lora" else None
    if to == "gguf":
        from denselora_app.export.gguf import check_gguf_model

        check_gguf_model(base)
    layers = dense_layers(source, layer_shapes(source.cfg.model))
    if calibration:
        from denselora_app.export.fit import calibrated_factors

        factors, report = calibrated_factors(source, layers, calibration, rank=rank, exact=exact, progress=progress)
    else:
        from denselora_app.export.lora import identity_factors

        factors, report = identity_factors(layers), {"exact": True, "measured": False}
    facts = _facts(source, to, exact, factors, report, gguf_type)
    target.mkdir(parents=True, exist_ok=True)
    try:
        _write(to, factors, target, source, base, gguf_type, progress)
        report = {"format": to, "run": run.id, "base_model": source.base_name, "activation": activation,
                  "exact": exact, "rank": facts.rank, "notes": facts.notes, **report}
        (target / EXPORT_REPORT).write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
        export_card(run, base_model_of(source.cfg), facts, title=run.id).save(target / CARD)
    except BaseException:
        shutil.rmtree(target, ignore_errors=True)  # a half-written export is worse than none
        raise
    files = sorted(p.relative_to(target).as_posix() for p in target.rglob("*") if p.is_file())
    log.info("Exported run %s as %s into %s", run.id, to, target)
    return ExportResult(to, target, files, facts)


def _write(to: str, factors: list[LoraFactor], target: Path, source: ExportSource, base: Path | None,
           gguf_type: str, progress: Callable[[str], None] | None) -> None:
    if to == "lora":
        from denselora_app.export.lora import write_lora

        write_lora(factors, target, source)
    elif to == "merged":
        from denselora_app.export.merged import write_merged

        write_merged(base, factors, target, tokenizer_folder=source.run.adapter_dir, progress=progress)
    else:
        from denselora_app.export.gguf import write_gguf

        write_gguf(base, factors, target, source, gguf_type, progress=progress)


def _facts(source: ExportSource, to: str, exact: bool, factors: list[LoraFactor], report: dict,
           gguf_type: str) -> ExportFacts:
    cfg = source.cfg
    notes = []
    if to != "lora" and cfg.quantization != "none":
        notes.append(f"The run trained on a {cfg.quantization}-quantized base; the update was merged into the "
                     "unquantized base weights, which differ slightly from the quantized ones it was trained on.")
    if cfg.model == EMBEDDED_MODEL:
        notes.append("The run trained on DenseLoRA Studio's embedded 4-bit (Q4_1) GGUF copy of the base, dequantized "
                     "to float32; " + ("the merged weights are that copy's." if to != "lora" else
                                       "on the original weights, which differ slightly, the adapter differs too."))
    end_to_end = report.get("end_to_end") or {}
    return ExportFacts(
        run_id=source.run.id,
        kind=to,
        exact=exact,
        rank=int(factors[0].lora_a.shape[0]),
        activation=source.adapter_config["activation"],
        layers=len(factors),
        gguf_type=gguf_type if to == "gguf" else None,
        relative_error=report.get("relative_error"),
        max_logit_diff=end_to_end.get("max_logit_diff"),
        mean_logit_diff=end_to_end.get("mean_logit_diff"),
        greedy_identical=end_to_end.get("greedy_identical_share"),
        calibration_rows=(report.get("calibration") or {}).get("rows_held_out"),
        notes=notes,
    )
