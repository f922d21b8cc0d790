"""What an export starts from: a finished run's DenseLoRA adapter, read from its file as per-layer factors, and the
base model's folder. No base weights are loaded here: the factors are small, and the merge streams the base.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from denselora_app.config import RunConfig, StudioError
from denselora_app.rules import hub_id
from denselora_app.runs import ADAPTER_CONFIG, Run, RunState, adapter_weights

log = logging.getLogger(__name__)

# How PEFT names a tuner layer's weights in a saved adapter: "base_model.model." + the module's path in the model.
PEFT_PREFIX = "base_model.model."
_DENSE_SUFFIX = ".denselora_M.weight"
_SHARED_KEY = "base_model.denselora_{part}.{module_type}.weight"  # the tuner's shared encoders and decoders


class ExportError(StudioError, ValueError):
    """A run that cannot be exported as asked; the message says why and what to do instead."""


@dataclass(frozen=True)
class DenseLayer:
    """One adapted Linear of a DenseLoRA adapter: its update is ``scaling * act(D @ M @ act(E @ x))``."""

    path: str  # the module's path in the causal LM, e.g. "model.layers.0.self_attn.q_proj"
    encoder: torch.Tensor  # E (r x in), shared by every layer of its module type
    dense: torch.Tensor  # M (r x r), this layer's own
    decoder: torch.Tensor  # D (out x r), shared
    scaling: float  # lora_alpha / r
    activation: str


@dataclass(frozen=True)
class LoraFactor:
    """A LoRA update ``B @ A`` for one Linear, with any scaling folded into B (the export writes lora_alpha = r)."""

    path: str
    lora_a: torch.Tensor  # A (rank x in)
    lora_b: torch.Tensor  # B (out x rank)

    def delta(self) -> torch.Tensor:
        """The weight update (out x in), in float32."""
        return self.lora_b.float() @ self.lora_a.float()


@dataclass(frozen=True)
class ExportSource:
    """A run ready to export: its config, its adapter's config, and what the exports call its base."""

    run: Run
    cfg: RunConfig
    adapter_config: dict
    base_name: str  # base_model_name_or_path of an exported adapter: the Hub id, else the model as the run names it


def export_source(run: Run) -> ExportSource:
    """The run, refused (saying why) while it trains or when it has no whole DenseLoRA adapter."""
    status = run.status()
    if status.state is RunState.DAMAGED:
        raise ExportError(f"Run {run.id} is damaged ({status.problem}); it cannot be exported.")
    if status.active:
        raise ExportError(f"Run {run.id} is still {status.state}: wait for it to finish (or stop it), then export.")
    if not run.has_adapter():
        raise ExportError(f"Run {run.id} has no whole adapter to export (in {run.adapter_dir}); it is saved when "
                          "training completes or is stopped.")
    cfg = run.config()
    adapter_config = json.loads((run.adapter_dir / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    if adapter_config.get("peft_type") != "DENSELORA":
        raise ExportError(f"Run {run.id} trained a {adapter_config.get('peft_type')} adapter, not DenseLoRA: PEFT, "
                          "vLLM and llama.cpp's tools load and merge LoRA adapters already. Export converts DenseLoRA "
                          "adapters.")
    if adapter_config.get("modules_to_save"):
        raise ExportError(f"Run {run.id} also trained whole modules ({adapter_config['modules_to_save']}), which a "
                          "LoRA adapter cannot carry; train without modules_to_save to export.")
    # What an exported adapter names as its base: a Hub model by its id; else the local folder this machine loads
    # (for the embedded model, its converted weights, which the run trained on). Publishing names the Hub id.
    base_name = cfg.model if hub_id(cfg.model) else str(base_folder(cfg.model))
    return ExportSource(run, cfg, adapter_config, base_name)


def dense_layers(source: ExportSource, shapes: dict[str, tuple[int, int]]) -> list[DenseLayer]:
    """Every adapted layer of the run's adapter, in the file's order. ``shapes`` gives (in, out) of each Linear by
    path (the base's linear layers): the tuner keys a module type by its name, plus its shape where one name has two
    shapes (denselora/model.py, ``_module_type``), and the shape picks between those keys here."""
    config = source.adapter_config
    scaling = float(config["lora_alpha"]) / int(config["r"])
    weights = adapter_weights(source.run.adapter_dir)
    layers = []
    with safe_open(str(weights), framework="pt") as file:
        keys = set(file.keys())
        for key in sorted(k for k in keys if k.endswith(_DENSE_SUFFIX)):
            path = key.removeprefix(PEFT_PREFIX).removesuffix(_DENSE_SUFFIX)
            if path not in shapes:
                raise ExportError(f"The adapter of run {source.run.id} adapts {path}, which the base model "
                                  f"{source.cfg.model} has no Linear layer named: is it the model the run trained on?")
            in_features, out_features = shapes[path]
            name = path.rsplit(".", 1)[-1]
            for module_type in (name, f"{name}_{in_features}x{out_features}"):
                encoder_key = _SHARED_KEY.format(part="encoder", module_type=module_type)
                decoder_key = _SHARED_KEY.format(part="decoder", module_type=module_type)
                if encoder_key not in keys or decoder_key not in keys:
                    continue
                encoder, decoder = file.get_tensor(encoder_key), file.get_tensor(decoder_key)
                if encoder.shape[1] == in_features and decoder.shape[0] == out_features:
                    break
            else:
                raise ExportError(f"The adapter of run {source.run.id} has no encoder and decoder of {in_features} -> "
                                  f"{out_features} for {path}: the file does not fit its base model.")
            layers.append(DenseLayer(path, encoder.float(), file.get_tensor(key).float(), decoder.float(), scaling,
                                     config["activation"]))
    if not layers:
        raise ExportError(f"The adapter of run {source.run.id} holds no DenseLoRA layers ({weights.name}).")
    return layers


def layer_shapes(spec: str) -> dict[str, tuple[int, int]]:
    """(in, out) of every Linear the base model ``spec`` has, by path, from its config alone (the meta device)."""
    from denselora_app.denselora.layer import feature_sizes
    from denselora_app.engine.models import linear_layers, load_config, meta_model

    model = meta_model(load_config(spec))
    return {path: feature_sizes(module) for path, module in linear_layers(model).items()}


def base_folder(spec: str) -> Path:
    """A local folder with the base model's config, tokenizer and safetensors weights (the embedded GGUF's converted
    folder; a Hub model from the local cache or downloaded)."""
    from huggingface_hub import snapshot_download

    from denselora_app.engine.models import ensure_local

    location = Path(ensure_local(spec))
    if not location.is_dir():
        location = Path(snapshot_download(str(location), allow_patterns=["*.json", "*.safetensors", "*.txt",
                                                                         "*.model", "*.jinja"]))
    if not any(location.glob("*.safetensors")):
        raise ExportError(f"The base model {spec} has no safetensors weights in {location}: the merge reads "
                          "safetensors shards. Re-save it with save_pretrained, then train or export from that folder.")
    return location
