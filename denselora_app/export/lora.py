"""A standard PEFT LoRA adapter folder from LoRA factors, and the exact factors of an identity-activation adapter.

With ``activation: identity`` the DenseLoRA update ``scaling * D @ M_l @ E @ x`` is a rank-r LoRA per layer:
``A_l = E`` and ``B_l = scaling * D @ M_l``. The folder is what ``get_peft_model(..., LoraConfig(...))`` saves:
``adapter_config.json`` (peft_type LORA) and the weights under PEFT's own key names, nothing else, so plain PEFT,
transformers' ``load_adapter`` and vLLM-style LoRA loaders read it without this project.
"""

from __future__ import annotations

from pathlib import Path

from peft import LoraConfig
from safetensors.torch import save_file

from denselora_app.export.source import PEFT_PREFIX, DenseLayer, ExportError, ExportSource, LoraFactor
from denselora_app.rules import EXACT_EXPORT_ACTIVATION
from denselora_app.runs import ADAPTER_WEIGHTS

# The LoRA settings carried over from the DenseLoRA config: which modules of which layers are adapted.
_TARGETING = ("layers_to_transform", "layers_pattern", "exclude_modules")


def identity_factors(layers: list[DenseLayer]) -> list[LoraFactor]:
    """The exact LoRA of an identity-activation adapter: A = E, B = scaling * D @ M (rank r)."""
    wrong = [layer.path for layer in layers if layer.activation != EXACT_EXPORT_ACTIVATION]
    if wrong:
        raise ExportError(f"Only an adapter with activation {EXACT_EXPORT_ACTIVATION} is exactly a LoRA; {wrong[0]} "
                          f"uses {layers[0].activation}.")
    return [LoraFactor(layer.path, layer.encoder.clone(), (layer.decoder @ layer.dense) * layer.scaling)
            for layer in layers]


def write_lora(factors: list[LoraFactor], target: Path, source: ExportSource) -> list[str]:
    """Write the LoRA adapter folder into ``target`` (existing, empty); returns the files written."""
    ranks = {factor.lora_a.shape[0] for factor in factors}
    if len(ranks) != 1:
        raise ExportError(f"The LoRA factors have different ranks {sorted(ranks)}; one rank is needed.")
    rank = ranks.pop()
    dense = source.adapter_config
    config = LoraConfig(
        r=rank,
        lora_alpha=rank,  # scaling 1: the adapter's own scaling is folded into B
        lora_dropout=0.0,
        bias="none",
        task_type=dense.get("task_type") or "CAUSAL_LM",
        target_modules=sorted({factor.path.rsplit(".", 1)[-1] for factor in factors}),
        base_model_name_or_path=source.base_name,
        **{key: dense[key] for key in _TARGETING if dense.get(key) is not None},
    )
    config.save_pretrained(str(target))
    tensors = {}
    for factor in factors:
        tensors[f"{PEFT_PREFIX}{factor.path}.lora_A.weight"] = factor.lora_a.float().contiguous()
        tensors[f"{PEFT_PREFIX}{factor.path}.lora_B.weight"] = factor.lora_b.float().contiguous()
    save_file(tensors, str(target / ADAPTER_WEIGHTS[0]), metadata={"format": "pt"})
    return sorted(p.name for p in target.iterdir())
