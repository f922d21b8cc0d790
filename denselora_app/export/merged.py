"""A merged model folder: the base's safetensors shards with ``W + B @ A`` in every adapted Linear, streamed.

One shard is read, merged and written at a time, in the base's own dtype and file layout (the same shard names and
index), so the export needs the memory of one shard plus the small LoRA factors, never the whole model. The config,
generation config, tokenizer and chat template come along: ``AutoModelForCausalLM.from_pretrained`` alone loads it.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from denselora_app.export.source import ExportError, LoraFactor
from denselora_app.hub.publish import TOKENIZER_PATTERNS

log = logging.getLogger(__name__)

_INDEX = "model.safetensors.index.json"
_SINGLE = "model.safetensors"
# Besides the weights: what from_pretrained and a chat front end read from a model folder.
MODEL_FILES = ("config.json", "generation_config.json")


@dataclass(frozen=True)
class Shard:
    """One safetensors file of the base and the weight names it holds, in its order."""

    path: Path
    names: list[str]


def shards(folder: Path) -> list[Shard]:
    """The base's weight files in order: those its index lists, or its single model.safetensors."""
    index = folder / _INDEX
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        files = list(dict.fromkeys(weight_map.values()))
    elif (folder / _SINGLE).is_file():
        files = [_SINGLE]
    else:
        raise ExportError(f"{folder} has neither {_SINGLE} nor {_INDEX}: the merge reads a transformers model folder "
                          "saved with safetensors (save_pretrained).")
    found = []
    for name in files:
        with safe_open(str(folder / name), framework="pt") as file:
            found.append(Shard(folder / name, list(file.keys())))
    return found


def merged_tensors(folder: Path, factors: list[LoraFactor]) -> Iterator[tuple[Shard, dict[str, torch.Tensor]]]:
    """Each shard's tensors with the updates added (in float32, stored back in the weight's dtype), one shard at a
    time. ExportError when an adapted layer's weight is in no shard."""
    deltas = {f"{factor.path}.weight": factor for factor in factors}
    all_shards = shards(folder)
    missing = sorted(set(deltas) - {name for shard in all_shards for name in shard.names})
    if missing:
        raise ExportError(f"The base model in {folder} has no weight {missing[0]} (and {len(missing) - 1} more) for "
                          "the adapter's layers: is it the model the run trained on?")
    for shard in all_shards:
        tensors = {}
        with safe_open(str(shard.path), framework="pt") as file:
            for name in shard.names:
                tensor = file.get_tensor(name)
                if name in deltas:
                    tensor = (tensor.float() + deltas[name].delta()).to(tensor.dtype)
                tensors[name] = tensor
        yield shard, tensors


def copy_model_files(folder: Path, target: Path, tokenizer_folder: Path | None) -> None:
    """Config, generation config and tokenizer files; the tokenizer the run trained with when it saved one."""
    for name in MODEL_FILES:
        if (folder / name).is_file():
            shutil.copy2(folder / name, target / name)
    config_path = target / "config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    if config.pop("quantization_config", None) is not None:  # the merge writes plain weights
        config_path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    source = tokenizer_folder if tokenizer_folder and _tokenizer_files(tokenizer_folder) else folder
    for path in _tokenizer_files(source):
        shutil.copy2(path, target / path.name)


def _tokenizer_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and any(fnmatch(p.name, pattern) for pattern in TOKENIZER_PATTERNS))


def write_merged(folder: Path, factors: list[LoraFactor], target: Path, *, tokenizer_folder: Path | None = None,
                 progress: Callable[[str], None] | None = None) -> list[str]:
    """Write the merged model of ``folder`` (the base) and ``factors`` into ``target`` (existing, empty); returns the
    files written."""
    for shard, tensors in merged_tensors(folder, factors):
        save_file(tensors, str(target / shard.path.name), metadata={"format": "pt"})
        if progress:
            progress(shard.path.name)
        del tensors
    if (folder / _INDEX).is_file():
        shutil.copy2(folder / _INDEX, target / _INDEX)
    copy_model_files(folder, target, tokenizer_folder)
    log.info("Merged %d layers into %s", len(factors), target)
    return sorted(p.name for p in target.iterdir())
