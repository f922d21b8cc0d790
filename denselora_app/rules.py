"""The studio's shared rules, each decided here once and nowhere else (no torch import: the CLI and the app's first
page read them cheaply):

* the allowed values of every choice a user makes (methods, activations, data formats and file types, dtypes,
  Hugging Face Jobs flavors with their GPUs, ...);
* whether a name is a local path or a Hugging Face Hub id (models, datasets, adapters);
* what to do when the Hub does not answer (use the local Hugging Face cache, or say why not, at once);
* where the studio keeps its cache (converted models, its own log file).

The standalone ``denselora/`` package that published adapters carry keeps its own copies of the activations and
the default target modules (it must import nothing from the studio); tests/test_rules.py asserts the copies agree.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import NamedTuple

from huggingface_hub import JobHardware
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

log = logging.getLogger(__name__)

# ---- allowed values ------------------------------------------------------------------------------------------------

METHODS: tuple[str, ...] = ("denselora", "lora")
ACTIVATIONS: tuple[str, ...] = ("gelu", "silu", "identity")
DROPOUT_PLACEMENTS: tuple[str, ...] = ("input", "all")  # DenseLoRA: input only, or also after each activation
SCHEDULERS: tuple[str, ...] = ("linear", "cosine", "constant", "constant_with_warmup")
DATA_FORMATS: tuple[str, ...] = ("alpaca", "messages", "sharegpt", "prompt_completion", "text")  # row layouts
DATA_FILE_TYPES: tuple[str, ...] = (".jsonl", ".json", ".csv", ".parquet", ".txt")  # what engine/sources.py reads
# Training stages: supervised fine-tuning; Direct Preference Optimization on preference pairs (TRL's DPOTrainer);
# Kahneman-Tversky Optimization on answers labelled desirable or not (TRL's KTOTrainer).
STAGES: tuple[str, ...] = ("sft", "dpo", "kto")
# TRL's DPO loss types (DPOConfig.loss_type) that need nothing beyond a pair and beta.
DPO_LOSSES: tuple[str, ...] = ("sigmoid", "ipo", "hinge", "robust", "exo_pair", "nca_pair", "bco_pair", "sppo_hard",
                               "aot", "aot_unpaired", "apo_zero", "apo_down", "discopop", "sigmoid_norm")
# Stages other tools offer that the studio refuses by name, with the reason.
REFUSED_STAGES: dict[str, str] = {
    "orpo": "TRL 1.16 keeps ORPO under trl.experimental, and no test here shows it training a DenseLoRA adapter "
            "correctly; use stage dpo",
    "simpo": "TRL 1.16 keeps SimPO (CPOTrainer) under trl.experimental, and no test here shows it training a "
             "DenseLoRA adapter correctly; use stage dpo (dpo_loss sigmoid_norm is the closest length-normalised loss)",
    "cpo": "TRL 1.16 keeps CPO under trl.experimental, and no test here shows it training a DenseLoRA adapter "
           "correctly; use stage dpo",
}
# Settings other tools take that the studio refuses by name, with the reason and what to use instead.
REFUSED_SETTINGS: dict[str, str] = {
    "deepspeed": "DeepSpeed ZeRO-3 partitions every parameter, and no test here shows it keeping DenseLoRA's encoders "
                 "and decoders shared across layers; shard with fsdp: true instead (PyTorch FSDP2), which keeps them "
                 "in one group",
}
# Experiment trackers a run may also report to, through the Trainer's own integrations (engine/trackers.py).
TRACKERS: tuple[str, ...] = ("tensorboard", "wandb", "mlflow", "trackio")
DTYPES: tuple[str, ...] = ("float32", "bfloat16", "float16")  # besides "auto"
QUANTIZATIONS: tuple[str, ...] = ("none", "4bit", "8bit")  # of the frozen base, with bitsandbytes
DEVICE_KINDS: tuple[str, ...] = ("auto", "cpu", "cuda", "mps")  # and "cuda:N"
DEVICE_PATTERN = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
# The paper adapts these five projections of every decoder layer.
PAPER_TARGETS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "up_proj", "down_proj")
# What a run's adapter can be exported as (export/): a standard LoRA adapter, a merged model folder, a GGUF file;
# and how publish uploads it (denselora: the adapter itself).
EXPORT_FORMATS: tuple[str, ...] = ("lora", "merged", "gguf")
PUBLISH_FORMS: tuple[str, ...] = ("denselora", *EXPORT_FORMATS)
GGUF_TYPES: tuple[str, ...] = ("f16", "bf16", "q8_0", "f32")  # the GGUF export's weight types
EXACT_EXPORT_ACTIVATION = "identity"  # the activation whose adapter is exactly a LoRA (export/lora.py)
# The learning-rate finder's defaults (lr_finder.py): per method, log-spaced rates from a decade below to a decade
# above the rates measured to train the embedded model well (DenseLoRA learned the sample facts at 1e-3 and 3e-3,
# LoRA at 3e-4 and 1e-3); 5 trials of 15 steps take about as long as the CPU quickstart trains.
LR_SEARCH_RANGES: dict[str, tuple[float, float]] = {"denselora": (3e-4, 3e-2), "lora": (3e-5, 3e-3)}
LR_SEARCH_COUNT = 5
LR_SEARCH_STEPS = 15
# What the finder's choice means for a long run, shown with every result (docs/benchmarks.md, 30-layer benchmark:
# DenseLoRA r16 did best at 1e-2 where the finder chose 3e-3, and worse at 3e-2; LoRA r16 at 1e-3 beat its 3e-4).
LR_SEARCH_LONG_RUNS = ("Short trials favour a rate that is safe from the first step: on the embedded model's "
                       "benchmark, 200-step runs of both DenseLoRA and LoRA did best on validation at 3x the rate "
                       "chosen this way, and worse at 10x (docs/benchmarks.md). For a run of hundreds of steps, try "
                       "3x too.")


class JobsGpu(NamedTuple):
    """The GPUs of a Hugging Face Jobs flavor: their model, how many, and each one's memory (GB, as the Hub lists
    them)."""

    model: str
    count: int
    memory_gb: int


# The GPU flavors Hugging Face Jobs offers, by huggingface_hub's JobHardware names. A run is planned against one
# GPU's memory: on a flavor with several, each GPU trains a data-parallel copy of the whole run.
JOBS_GPU_FLAVORS: dict[str, JobsGpu] = {
    JobHardware.T4_SMALL.value: JobsGpu("T4", 1, 16),
    JobHardware.T4_MEDIUM.value: JobsGpu("T4", 1, 16),
    JobHardware.L4X1.value: JobsGpu("L4", 1, 24),
    JobHardware.L4X4.value: JobsGpu("L4", 4, 24),
    JobHardware.A10G_SMALL.value: JobsGpu("A10G", 1, 24),
    JobHardware.A10G_LARGE.value: JobsGpu("A10G", 1, 24),
    JobHardware.A10G_LARGEX2.value: JobsGpu("A10G", 2, 24),
    JobHardware.A10G_LARGEX4.value: JobsGpu("A10G", 4, 24),
    JobHardware.L40SX1.value: JobsGpu("L40S", 1, 48),
    JobHardware.L40SX4.value: JobsGpu("L40S", 4, 48),
    JobHardware.L40SX8.value: JobsGpu("L40S", 8, 48),
    JobHardware.A100_LARGE.value: JobsGpu("A100", 1, 80),
    JobHardware.A100X4.value: JobsGpu("A100", 4, 80),
    JobHardware.A100X8.value: JobsGpu("A100", 8, 80),
    JobHardware.RTX_PRO_6000.value: JobsGpu("RTX PRO 6000", 1, 96),
    JobHardware.RTX_PRO_6000X2.value: JobsGpu("RTX PRO 6000", 2, 96),
    JobHardware.RTX_PRO_6000X4.value: JobsGpu("RTX PRO 6000", 4, 96),
    JobHardware.RTX_PRO_6000X8.value: JobsGpu("RTX PRO 6000", 8, 96),
    JobHardware.H200.value: JobsGpu("H200", 1, 141),
    JobHardware.H200X2.value: JobsGpu("H200", 2, 141),
    JobHardware.H200X4.value: JobsGpu("H200", 4, 141),
    JobHardware.H200X8.value: JobsGpu("H200", 8, 141),
}
JOBS_DEFAULT_FLAVOR = JobHardware.L4X1.value  # 24 GB with bfloat16, among the cheapest GPUs
# The longest a job may run before Jobs ends it (Jobs' own default is 30 minutes: too short to train). A signed-in
# Space visitor's token must outlive it, or the job cannot upload its results at the end.
JOBS_DEFAULT_TIMEOUT = "4h"

# ---- where things are ------------------------------------------------------------------------------------------------


def cache_dir() -> Path:
    """Root of DenseLoRA Studio's cache: ``$DENSELORA_CACHE`` if set, else ``~/.cache/denselora-studio``."""
    configured = os.environ.get("DENSELORA_CACHE")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "denselora-studio"


# ---- path or Hub id ------------------------------------------------------------------------------------------------

# A file extension starts with a letter: "notes.xlsx" is a (missing) file, "owner/Model-2.5" a Hub id.
_EXTENSION = re.compile(r"\.[A-Za-z][A-Za-z0-9]{0,7}$")
_WINDOWS_DRIVE = re.compile(r"^[A-Za-z]:[\\/]")


def looks_like_path(name: str) -> bool:
    """True when ``name`` is written as a path (whether or not it exists): it starts like one (/ . ~ \\ or a
    drive letter), has more than one '/', or ends with a file extension. Such a name is never sent to the Hub."""
    name = str(name).strip()
    return bool(
        name.startswith(("/", ".", "~", "\\"))
        or "\\" in name
        or _WINDOWS_DRIVE.match(name)
        or name.count("/") > 1
        or _EXTENSION.search(name)
    )


def on_disk(name: str) -> bool:
    """Whether ``name`` (as typed, ``~`` expanded) is an existing file or folder here. Text that no path can be (a
    NUL, ``~nosuchuser``, a name too long for the system) is not, rather than an error."""
    try:
        return Path(str(name)).expanduser().exists()
    except (OSError, ValueError, RuntimeError):
        return False


def hub_id_problem(name: str, namespaced: bool = False) -> str | None:
    """Why ``name`` is not a Hugging Face Hub repository id (None when it is one): the one place that checks ids,
    for models, datasets, adapters and the repositories the studio publishes to. ``namespaced`` also requires an
    owner (``owner/name``), as every repository made since the Hub's early models has."""
    name = str(name).strip()
    if not name:
        return "it is empty"
    if namespaced and name.count("/") != 1:
        return "write it as NAMESPACE/NAME (a user name or an organization, then the name)"
    try:
        validate_repo_id(name)
    except HFValidationError as error:  # it quotes the name: shortened, and a control character shown escaped
        shown = repr(name[:60]) + ("..." if len(name) > 60 else "")
        return str(error).replace(f"'{name}'", shown).replace(name, shown)
    return None


def hub_id(name: str, namespaced: bool = False) -> str | None:
    """``name`` as a Hugging Face Hub repository id, or None when it names a local file or folder (existing or
    written as a path) or is not a valid id (``hub_id_problem`` says why)."""
    name = str(name).strip()
    if looks_like_path(name) or on_disk(name) or hub_id_problem(name, namespaced):
        return None
    return name


# ---- the Hub when it does not answer ---------------------------------------------------------------------------------









