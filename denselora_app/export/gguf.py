"""The merged model as one GGUF file (f16, bf16 or q8_0) with its tokenizer and chat template, plus an Ollama
Modelfile: what llama.cpp, Ollama and LM Studio load.

Written with the ``gguf`` package the way llama.cpp's own converter writes these families (the embedded model's
GGUF, made by that converter, is the reference for the metadata): llama-architecture models (LLaMA, Mistral,
SmolLM) and Qwen2, with byte-level BPE tokenizers. The tensors are streamed: the header is written from the shards'
shapes, then each shard is merged, converted and appended, so the file never sits in memory whole.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

import gguf
import numpy as np
import torch
from safetensors import safe_open

from denselora_app.export.merged import merged_tensors, shards
from denselora_app.export.source import ExportError, ExportSource, LoraFactor

log = logging.getLogger(__name__)

# transformers model_type -> GGUF architecture; the llama family's q/k weights are permuted for llama.cpp's RoPE.
_ARCHITECTURES = {"llama": gguf.MODEL_ARCH.LLAMA, "mistral": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2}
_PERMUTED = gguf.MODEL_ARCH.LLAMA
_TYPES = {"f16": (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
          "bf16": (gguf.GGMLQuantizationType.BF16, gguf.LlamaFileType.MOSTLY_BF16),
          "q8_0": (gguf.GGMLQuantizationType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
          "f32": (gguf.GGMLQuantizationType.F32, gguf.LlamaFileType.ALL_F32)}
MODELFILE = "Modelfile"
_CONVERT_INSTEAD = ("export --to merged and convert that folder with llama.cpp's convert_hf_to_gguf.py, which knows "
                    "more families")


def _config(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text(encoding="utf-8"))


def check_gguf_model(folder: Path) -> None:
    """Refuse, naming the model family or tokenizer, what this writer cannot write faithfully."""
    config = _config(folder)
    model_type = config.get("model_type")
    if model_type not in _ARCHITECTURES:
        raise ExportError(f"The GGUF export writes the llama family ({', '.join(_ARCHITECTURES)}; SmolLM is llama), "
                          f"and this base is {model_type!r}: {_CONVERT_INSTEAD}.")
    rope = config.get("rope_scaling") or config.get("rope_parameters") or {}
    if rope.get("rope_type", "default") != "default":
        raise ExportError(f"This base scales RoPE ({rope.get('rope_type')}), which the GGUF export does not write: "
                          f"{_CONVERT_INSTEAD}.")
    _pre_tokenizer(folder, model_type)


def _tokenizer_json(folder: Path) -> dict:
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise ExportError(f"The GGUF export needs the base's tokenizer.json (a fast tokenizer) in {folder}: "
                          f"{_CONVERT_INSTEAD}.")
    return json.loads(path.read_text(encoding="utf-8"))


def _pre_tokenizer(folder: Path, model_type: str) -> str:
    """llama.cpp's name for how text is split before BPE (tokenizer.ggml.pre)."""
    data = _tokenizer_json(folder)
    if data.get("model", {}).get("type") != "BPE":
        raise ExportError(f"The base's tokenizer is {data.get('model', {}).get('type')}, not byte-level BPE; the GGUF "
                          f"export writes BPE tokenizers only: {_CONVERT_INSTEAD}.")
    if model_type == "qwen2":
        return "qwen2"
    if "<|begin_of_text|>" in data["model"].get("vocab", {}):
        return "llama-bpe"
    kinds = [(s.get("type"), s.get("individual_digits")) for s in _pre_steps(data)]
    if kinds == [("ByteLevel", None)]:  # GPT-2's split; also the embedded model's tokenizer as converted from GGUF
        return "gpt-2"
    if kinds == [("Digits", True), ("ByteLevel", None)]:
        return "smollm"
    raise ExportError(f"The base's pre-tokenizer ({[k for k, _ in kinds]}) is not one the GGUF export knows: "
                      f"{_CONVERT_INSTEAD}.")


def _pre_steps(data: dict) -> list[dict]:
    """The steps of a tokenizer.json's pre-tokenizer (one, or those of a Sequence)."""
    pre = data.get("pre_tokenizer") or {}
    return pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]


def _permute(weights: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's layout of q/k rows for its RoPE (convert_hf_to_gguf's LlamaModel.permute)."""
    return (weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:]).swapaxes(1, 2)
            .reshape(weights.shape))


def _tensor_type(shape: tuple[int, ...], wanted: gguf.GGMLQuantizationType) -> gguf.GGMLQuantizationType:
    if len(shape) == 1:
        return gguf.GGMLQuantizationType.F32  # norms stay float32, as llama.cpp's converter keeps them
    if wanted is gguf.GGMLQuantizationType.Q8_0 and shape[-1] % gguf.GGML_QUANT_SIZES[wanted][0]:
        return gguf.GGMLQuantizationType.F16  # rows that do not split into whole blocks
    return wanted


def _encode(array: np.ndarray, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
    if qtype is gguf.GGMLQuantizationType.F32:
        return array.astype(np.float32)
    if qtype is gguf.GGMLQuantizationType.F16:
        return array.astype(np.float16)
    return gguf.quants.quantize(array.astype(np.float32), qtype)


def _nbytes(shape: tuple[int, ...], qtype: gguf.GGMLQuantizationType) -> int:
    return int(np.prod(gguf.quant_shape_to_byte_shape(shape, qtype)))


def write_gguf(folder: Path, factors: list[LoraFactor], target: Path, source: ExportSource, gguf_type: str,
               progress: Callable[[str], None] | None = None) -> list[str]:
    """Write ``<name>.<type>.gguf`` and a Modelfile into ``target`` (existing, empty); returns the files written."""
    check_gguf_model(folder)
    config = _config(folder)
    arch = _ARCHITECTURES[config["model_type"]]
    wanted, file_type = _TYPES[gguf_type]
    blocks = int(config["num_hidden_layers"])
    heads, kv_heads = int(config["num_attention_heads"]), int(config.get("num_key_value_heads") or
                                                              config["num_attention_heads"])
    names = gguf.get_tensor_name_map(arch, blocks)
    path = target / f"{source.run.id}.{gguf_type}.gguf"
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[arch])
    _write_metadata(writer, config, source, file_type, folder)
    plan = []  # (hf name, gguf name, type) in file order
    for shard in shards(folder):
        with safe_open(str(shard.path), framework="pt") as file:
            for name in shard.names:
                gguf_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
                if gguf_name is None:
                    raise ExportError(f"The GGUF export does not know where {name} goes: {_CONVERT_INSTEAD}.")
                shape = tuple(file.get_slice(name).get_shape())
                qtype = _tensor_type(shape, wanted)
                writer.add_tensor_info(gguf_name, shape, np.dtype(np.float32), _nbytes(shape, qtype), raw_dtype=qtype)
                plan.append((name, qtype))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    types = dict(plan)
    for shard, tensors in merged_tensors(folder, factors):
        for name in shard.names:
            tensor = tensors.pop(name).float()
            if arch is _PERMUTED and name.endswith("q_proj.weight"):
                tensor = _permute(tensor, heads)
            elif arch is _PERMUTED and name.endswith("k_proj.weight"):
                tensor = _permute(tensor, kv_heads)
            writer.write_tensor_data(_encode(tensor.numpy(), types[name]))
        if progress:
            progress(shard.path.name)
    writer.close()
    (target / MODELFILE).write_text(_modelfile(path.name, _tokenizer_folder(source, folder)), encoding="utf-8")
    log.info("Wrote %s (%s)", path, gguf_type)
    return sorted(p.name for p in target.iterdir())


def _write_metadata(writer: gguf.GGUFWriter, config: dict, source: ExportSource, file_type: gguf.LlamaFileType,
                    folder: Path) -> None:
    hidden, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
    rope = config.get("rope_parameters") or {}
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(source.run.id)
    writer.add_context_length(int(config["max_position_embeddings"]))
    writer.add_embedding_length(hidden)
    writer.add_block_count(int(config["num_hidden_layers"]))
    writer.add_feed_forward_length(int(config["intermediate_size"]))
    writer.add_head_count(heads)
    writer.add_head_count_kv(int(config.get("num_key_value_heads") or heads))
    writer.add_rope_freq_base(float(rope.get("rope_theta", config.get("rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(float(config["rms_norm_eps"]))
    writer.add_rope_dimension_count(int(config.get("head_dim") or hidden // heads))
    writer.add_vocab_size(int(config["vocab_size"]))
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    tokenizer = _tokenizer_folder(source, folder)
    _write_tokenizer(writer, tokenizer, config)


def _tokenizer_folder(source: ExportSource, folder: Path) -> Path:
    """The tokenizer the run trained with when it saved one, else the base's."""
    adapter = source.run.adapter_dir
    return adapter if (adapter / "tokenizer.json").is_file() else folder


def _write_tokenizer(writer: gguf.GGUFWriter, folder: Path, config: dict) -> None:
    data = _tokenizer_json(folder)
    vocab: dict[str, int] = dict(data["model"]["vocab"])
    added = {t["content"]: t for t in data.get("added_tokens", [])}
    vocab.update({content: t["id"] for content, t in added.items()})
    size = max(int(config["vocab_size"]), max(vocab.values()) + 1)
    tokens, types = [f"[PAD{i}]" for i in range(size)], [gguf.TokenType.UNUSED] * size
    for token, index in vocab.items():
        tokens[index] = token
        special = added.get(token, {}).get("special")
        types[index] = (gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED if token in added
                        else gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer(folder, config["model_type"]))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_add_space_prefix(any(step.get("add_prefix_space") for step in _pre_steps(data)))
    special = gguf.SpecialVocab(folder, load_merges=True, n_vocab=size)
    if "bos" not in special.add_special_token:  # as llama.cpp's converter: BPE tokenizers add no BOS unless told
        writer.add_add_bos_token(False)
    special.add_to_gguf(writer, quiet=True)


def _modelfile(gguf_name: str, folder: Path) -> str:
    """Ollama reads the chat template from the GGUF's metadata; the Modelfile names the file and its stop token."""
    special = gguf.SpecialVocab(folder, load_merges=False)
    data = _tokenizer_json(folder)
    by_id = {t["id"]: t["content"] for t in data.get("added_tokens", [])}
    eos = by_id.get(special.special_token_ids.get("eos", -1))
    lines = [f"FROM ./{gguf_name}"]
    if eos:
        lines.append(f'PARAMETER stop "{eos}"')
    return "\n".join(lines) + "\n"
