"""RunConfig: the one typed configuration a run is made from, in the app, the CLI and presets (YAML in, YAML out)."""

from __future__ import annotations

import dataclasses
import difflib
import math
import reprlib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from denselora_app import rules

EMBEDDED_MODEL = "embedded:SmolLM2-135M-Instruct"
EMBEDDED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # what the embedded GGUF was quantized from
SAMPLE_DATA = "sample:studio_facts"
SAMPLE_PAIRS = "sample:ahoy_pairs"  # the dpo and kto sample: answers that greet with "Ahoy!" preferred
PAPER_TARGETS = list(rules.PAPER_TARGETS)

# The choices of the fields below, as the Train tab lists them (rules.py holds the values).
METHODS = rules.METHODS
ACTIVATIONS = rules.ACTIVATIONS
DROPOUT_PLACEMENTS = rules.DROPOUT_PLACEMENTS
SCHEDULERS = rules.SCHEDULERS
DATA_FORMATS = ("auto", *rules.DATA_FORMATS)
DTYPES = ("auto", *rules.DTYPES)
QUANTIZATIONS = rules.QUANTIZATIONS
STAGES = rules.STAGES
TRACKERS = rules.TRACKERS
DPO_LOSSES = rules.DPO_LOSSES


# Upper bounds of the counts: far beyond any real run, so that a typo (or a hostile value) is refused by name here
# instead of sizing a memory plan, a tokenizer call or a loop.
MAX_TOKENS = 2**20  # cutoff_len: a million tokens per row
MAX_COUNT = 2**20  # rank, batch size, gradient accumulation, checkpoints kept
MAX_STEPS = 10**9
MAX_TEXT = 4096  # characters of a text field (a model, a data source, a run name)
MAX_CONFIG_BYTES = 1024 * 1024  # a run configuration is a few hundred bytes


class StudioError(Exception):
    """A problem the user can fix (bad input, a busy device, a missing file); the message says what and how.
    Front ends show the message alone, never a traceback."""


class ConfigError(StudioError, ValueError):
    """A configuration value or key is wrong; the message names it and says what is accepted."""


def _field(default: Any, help: str, **checks: Any) -> Any:
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **checks})
    return field(default=default, metadata={"help": help, **checks})


@dataclass
class RunConfig:
    # --- what to train
    model: str = _field(EMBEDDED_MODEL, "Base model: 'embedded:SmolLM2-135M-Instruct', a Hub id, a folder or a .gguf file.")
    data: str = _field(SAMPLE_DATA, "Training data: a .jsonl/.json/.csv/.parquet/.txt file, a Hub dataset, or the sample.")
    data_format: str = _field("auto", "Row layout; 'auto' detects it from the columns.", choices=DATA_FORMATS)
    train_on_inputs: bool = _field(False, "Also train on prompt tokens (the paper's setting); default trains answers only.")
    val_size: float = _field(0.0, "Validation rows: a count (>= 1), a fraction (< 1), or 0 for none.", min=0)
    cutoff_len: int = _field(512, "Longest example in tokens; longer ones are truncated.", min=8, max=MAX_TOKENS)
    # --- the training stage
    stage: str = _field(
        "sft", "What the run learns from: 'sft' (supervised fine-tuning: prompts and the answers to imitate), 'dpo' "
               "(Direct Preference Optimization, TRL's DPOTrainer: pairs of a prompt, a chosen and a rejected answer; "
               "the model learns to prefer the chosen one relative to the base model) or 'kto' (Kahneman-Tversky "
               "Optimization, TRL's KTOTrainer: answers labelled desirable or not, or preference pairs).",
        choices=STAGES)
    beta: float = _field(
        0.1, "DPO and KTO: how far the adapter may move from the reference model (TRL's beta); higher keeps it "
             "closer. Ignored by sft.", min_exclusive=0)
    dpo_loss: str = _field(
        "sigmoid", "DPO: TRL's loss_type (sigmoid: the DPO paper's; ipo, hinge, robust, ...). Ignored by sft.",
        choices=DPO_LOSSES)
    init_adapter: str = _field(
        "", "DPO and KTO: start from the adapter of this finished run (its id, e.g. an sft run) instead of a fresh "
            "one; the reference model is then that adapter, not the bare base. Empty: a fresh adapter.")
    # --- the adapter
    method: str = _field("denselora", "Adapter method: 'denselora' or 'lora' (PEFT's LoRA, the baseline).", choices=METHODS)
    r: int = _field(16, "Rank.", min=1, max=MAX_COUNT)
    alpha: float = _field(32.0, "Scaling numerator: updates are scaled by alpha / r.", min_exclusive=0)
    dropout: float = _field(0.05, "Dropout probability on the adapter input (see dropout_placement).", min=0,
                            max_exclusive=1)
    dropout_placement: str = _field(
        "input", "DenseLoRA: where dropout applies: 'input' (the adapter's input, like LoRA) or 'all' (also after "
                 "each activation, as the authors' released code does).", choices=DROPOUT_PLACEMENTS)
    target_modules: list[str] = _field(PAPER_TARGETS, "Linear layer names to adapt (name suffixes, e.g. q_proj).")
    activation: str = _field("gelu", "DenseLoRA nonlinearity: gelu (the paper's), silu, or identity: exact export to "
                                     "LoRA / merge / GGUF (export --to; gelu and silu need calibration data and are "
                                     "fitted, with a measured error).", choices=ACTIVATIONS)
    init_scale: float = _field(
        1.0, "DenseLoRA: multiplier on the initial E and M (1: the paper's Kaiming-uniform); D starts at zero, so a "
             "fresh adapter is a no-op at any scale. Ignored by LoRA.", min_exclusive=0)
    shared_lr_scale: float = _field(
        1.0, "DenseLoRA: the learning rate of the shared encoders and decoders, as a multiple of learning_rate (each "
             "layer's M keeps learning_rate). Ignored by LoRA.", min_exclusive=0)
    # --- optimisation
    learning_rate: float = _field(3e-4, "Peak learning rate.", min_exclusive=0)
    num_epochs: float = _field(2.0, "Passes over the training rows (ignored when max_steps > 0).", min_exclusive=0)
    max_steps: int = _field(-1, "Optimizer steps to run; -1 uses num_epochs.", min=-1, max=MAX_STEPS)
    batch_size: int = _field(4, "Rows per device per forward pass.", min=1, max=MAX_COUNT)
    grad_accum: int = _field(4, "Forward passes per optimizer step (effective batch = batch_size x grad_accum).", min=1,
                             max=MAX_COUNT)
    warmup_steps: int = _field(100, "Linear learning-rate warmup, in optimizer steps.", min=0, max=MAX_STEPS)
    lr_scheduler: str = _field("linear", "Learning-rate schedule after warmup.", choices=SCHEDULERS)
    weight_decay: float = _field(0.0, "AdamW weight decay.", min=0)
    max_grad_norm: float = _field(1.0, "Gradient clipping norm; 0 disables clipping.", min=0)
    seed: int = _field(42, "Random seed for initialisation, shuffling and the validation split.", min=0,
                       max=2**32 - 1)  # numpy's seeds are 32-bit
    gradient_checkpointing: bool | None = _field(
        None, "Recompute activations in the backward pass: less memory, ~30% slower. Unset (null): on for quantized "
              "runs, off otherwise.")
    packing: bool = _field(False, "Padding-free batches: each batch's rows are joined into one sequence whose "
                                  "positions restart at every row, so no compute goes to padding and the loss is "
                                  "the same. Models that cannot keep joined rows apart batch rows of similar "
                                  "length instead.")
    # --- bookkeeping
    logging_steps: int = _field(1, "Optimizer steps between metric lines (loss, lr, grad norm, tokens/s).", min=1,
                                max=MAX_STEPS)
    eval_steps: int = _field(0, "Steps between validation passes; 0 evaluates only at the end (needs val_size).", min=0,
                             max=MAX_STEPS)
    save_steps: int = _field(50, "Steps between checkpoints (resume points).", min=1, max=MAX_STEPS)
    save_total_limit: int = _field(3, "Checkpoints kept on disk (oldest removed first).", min=1, max=MAX_COUNT)
    run_name: str = _field("", "A name for the run folder; empty picks one from the method, rank and time.")
    # --- where it runs
    device: str = _field("auto", "'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'.", pattern=rules.DEVICE_PATTERN)
    dtype: str = _field("auto", "Base model weights: auto (bf16/fp16 on GPU, fp32 on CPU) or a dtype.", choices=DTYPES)
    quantization: str = _field(
        "none", "Load the frozen base in 4bit (NF4, double quantization; bitsandbytes) or 8bit (LLM.int8) to fit a "
                "large model on one GPU; the adapter trains in full precision. 'none' keeps the dtype above.",
        choices=QUANTIZATIONS)
    trust_remote_code: bool = _field(False, "Run model code shipped with a Hub model. Only for models you trust.")
    fsdp: bool = _field(
        False, "Shard the frozen base and the adapter over the processes of a torchrun or accelerate launch (PyTorch "
               "FSDP2, through accelerate): each process holds about 1/N of the weights, so a model too large for "
               "one GPU trains on several. Each decoder layer is one shard group; DenseLoRA's shared encoders and "
               "decoders stay in the root group, so they stay shared.")
    fsdp_offload: bool = _field(
        False, "With fsdp: keep the sharded parameters in CPU memory between uses (slower; for a model that does "
               "not fit the GPUs even sharded).")
    report_to: list[str] = _field(
        [], "Experiment trackers that also get the metrics (the run folder's metrics.jsonl is written either way): "
            "tensorboard (event files in the run folder's trackers/tensorboard), wandb (offline into the run folder "
            "unless WANDB_MODE or WANDB_API_KEY is set), mlflow (a file store in the run folder unless "
            "MLFLOW_TRACKING_URI is set), trackio (local). Empty or none: no tracker.", choices=TRACKERS)

    def __post_init__(self) -> None:
        if isinstance(self.stage, str) and self.stage.strip().lower() in rules.REFUSED_STAGES:
            name = self.stage.strip().lower()
            raise ConfigError(f"stage {name} is not offered: {rules.REFUSED_STAGES[name]}.")
        for f in dataclasses.fields(self):
            setattr(self, f.name, _check(f, getattr(self, f.name)))
        if not self.target_modules:
            raise ConfigError("target_modules is empty: name at least one Linear layer to adapt, e.g. [q_proj, v_proj].")
        if self.stage == "kto" and self.batch_size < 2:
            raise ConfigError("stage kto needs batch_size of at least 2: its KL estimate pairs each answer with the "
                              "other prompts of its batch (use grad_accum for a larger effective batch).")
        if self.init_adapter and self.stage == "sft":
            raise ConfigError("init_adapter is for dpo and kto (the sft run's adapter becomes the reference); to "
                              "train an sft run further, resume it.")
        if self.stage != "sft" and self.packing:
            raise ConfigError(f"packing is for sft; TRL's {self.stage} trainer pads its batches: set packing to false.")
        if self.stage != "sft" and self.data_format != "auto":
            raise ConfigError(f"data_format {self.data_format} is a layout of sft data; a {self.stage} run detects "
                              "its preference-pair layout itself: set data_format to auto.")

    # --- YAML in, YAML out
    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> RunConfig:
        if not isinstance(values, dict):
            raise ConfigError(f"A run configuration is a mapping of keys to values, got {type(values).__name__}.")
        known = {f.name for f in dataclasses.fields(cls)}
        for key in values:
            if key in rules.REFUSED_SETTINGS:
                raise ConfigError(f"{key} is not supported: {rules.REFUSED_SETTINGS[key]}.")
            if key not in known:
                hint = difflib.get_close_matches(str(key), known, n=1)
                raise ConfigError(f"Unknown key {quote(key)}." + (f" Did you mean '{hint[0]}'?" if hint else "")
                                  + f" Known keys: {', '.join(sorted(known))}.")
        return cls(**values)

    @classmethod
    def from_yaml(cls, path: str | Path) -> RunConfig:
        path = Path(path)
        try:
            size = path.stat().st_size if path.is_file() else 0
            if size > MAX_CONFIG_BYTES:
                raise ConfigError(f"{path} is {size:,} bytes; a run configuration is a few hundred "
                                  f"(at most {MAX_CONFIG_BYTES:,}). Give the YAML file of a run's settings.")
            values = load_yaml(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"Configuration file not found: {path}. Give a .yaml file, e.g. "
                              "presets/quickstart-cpu.yaml.") from None
        except IsADirectoryError:
            raise ConfigError(f"{path} is a folder, not a configuration file: give a .yaml file such as "
                              f"{path / 'config.yaml'} or presets/quickstart-cpu.yaml.") from None
        except UnicodeDecodeError as err:
            raise ConfigError(f"{path} is not UTF-8 text ({err.reason} at byte {err.start}): save it as UTF-8 "
                              "YAML.") from None
        except OSError as err:
            raise ConfigError(f"Cannot read {path}: {err.strerror or err}.") from None
        except _Refused as err:
            raise ConfigError(f"{path}: {err}") from None
        except yaml.YAMLError as err:
            raise ConfigError(f"{path} is not valid YAML: {err}") from None
        try:
            return cls.from_dict(values or {})
        except ConfigError as err:
            raise ConfigError(f"{path}: {err}") from None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self, path: str | Path | None = None) -> str:
        text = yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)
        if path is not None:
            Path(path).write_text(text, encoding="utf-8")
        return text

    def with_overrides(self, assignments: list[str]) -> RunConfig:
        """Apply CLI-style ``key=value`` strings; values are parsed as YAML (so 8, 3e-4, true, [q_proj] work)."""
        values = self.to_dict()
        for assignment in assignments:
            key, sep, raw = assignment.partition("=")
            if not sep or not key.strip():
                raise ConfigError(f"--set expects key=value, got '{assignment}'.")
            if len(raw) > MAX_TEXT:
                raise ConfigError(f"--set {key.strip()}= is {len(raw):,} characters long; no setting takes more "
                                  f"than {MAX_TEXT:,}.")
            try:
                values[key.strip()] = load_yaml(raw) if raw.strip() else ""
            except _Refused as err:
                raise ConfigError(f"--set {key.strip()}: {err}") from None
            except yaml.YAMLError:
                values[key.strip()] = raw
        return RunConfig.from_dict(values)

    @property
    def effective_batch_size(self) -> int:
        return self.batch_size * self.grad_accum

    @property
    def quantized(self) -> bool:
        return self.quantization != "none"

    @property
    def checkpointing(self) -> bool:
        """Whether training recomputes activations: as set, else on for quantized runs."""
        return self.quantized if self.gradient_checkpointing is None else self.gradient_checkpointing


class _Refused(yaml.YAMLError):
    """YAML that parses but is refused in a run configuration (an alias, a key given twice)."""


class _ConfigLoader(yaml.SafeLoader):
    """PyYAML's safe loader without aliases (a few lines of anchors and aliases expand to gigabytes, and no setting
    needs them) and without repeated keys (which the plain loader resolves silently: the last one wins)."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise _Refused(f"line {event.start_mark.line + 1} uses the YAML alias *{event.anchor}; a run "
                           "configuration takes no anchors or aliases: write the value itself.")
        return super().compose_node(parent, index)

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, typing.Hashable):
                continue  # the safe constructor refuses it below, with its own message
            line = key_node.start_mark.line + 1
            if key in seen:
                raise _Refused(f"the key {quote(key)} is given twice (lines {seen[key]} and {line}); keep one.")
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def load_yaml(text: str) -> Any:
    """YAML as run configurations are read (files, ``--set`` values): safe types, no aliases, no repeated keys."""
    return yaml.load(text, Loader=_ConfigLoader)  # noqa: S506 (a SafeLoader subclass)


_QUOTE = reprlib.Repr()  # (keyword arguments only from Python 3.12)
_QUOTE.maxlevel, _QUOTE.maxdict, _QUOTE.maxlist, _QUOTE.maxtuple, _QUOTE.maxstring, _QUOTE.maxother = 2, 4, 4, 4, 60, 60


def quote(value: Any) -> str:
    """A value as a message shows it: a short prefix, however large or deeply nested it is."""
    return _QUOTE.repr(value)


def _range(meta: dict[str, Any]) -> str:
    parts = ([f">= {meta['min']}"] if "min" in meta else []) + \
            ([f"> {meta['min_exclusive']}"] if "min_exclusive" in meta else []) + \
            ([f"< {meta['max_exclusive']}"] if "max_exclusive" in meta else []) + \
            ([f"<= {meta['max']:,}"] if "max" in meta else [])
    return " and ".join(parts)


def _check(f: dataclasses.Field, value: Any) -> Any:
    """Coerce harmless forms (int for a float, str for a one-item list) and reject wrong types and ranges."""
    expected = typing.get_type_hints(RunConfig)[f.name]
    name, meta = f.name, f.metadata
    if expected == bool | None:
        if value is not None and not isinstance(value, bool):
            raise ConfigError(f"{name} must be true, false or null (automatic), got {quote(value)}.")
    elif expected is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{name} must be true or false, got {quote(value)}.")
    elif expected is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            else:
                raise ConfigError(f"{name} must be a whole number, got {quote(value)}.")
    elif expected is float:
        if isinstance(value, str):  # YAML 1.1 reads 3e-4 (no dot) as text
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{name} must be a number, got {quote(value)}.")
        value = float(value)
        if not math.isfinite(value):  # nan passes every comparison below, inf trains an adapter of inf/nan
            bounds = _range(meta)
            where = f" ({bounds})" if bounds else ""
            raise ConfigError(f"{name} must be a finite number{where}, got {value}.")
    elif expected is str:
        if not isinstance(value, str):
            raise ConfigError(f"{name} must be text, got {quote(value)}.")
        if len(value) > MAX_TEXT:
            raise ConfigError(f"{name} is {len(value):,} characters long (at most {MAX_TEXT:,}): {quote(value)}.")
        value = value.strip()
    elif typing.get_origin(expected) is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{name} must be a list of names, got {quote(value)}.")
        value = list(dict.fromkeys(value))
        if "choices" in meta:  # each name is one of the choices; "none" alone means the empty list
            value = [] if value == ["none"] else value
            if unknown := [v for v in value if v not in meta["choices"]]:
                raise ConfigError(f"{name} takes names from {', '.join(meta['choices'])} (or none); got "
                                  f"{quote(unknown[0])}.")
            return value
    if "pattern" in meta and not meta["pattern"].match(value.lower()):
        raise ConfigError(f"{name} must be one of 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'; got {quote(value)}.")
    if "choices" in meta and value not in meta["choices"]:
        raise ConfigError(f"{name} must be one of {', '.join(meta['choices'])}; got {quote(value)}.")
    if "min" in meta and value < meta["min"]:
        raise ConfigError(f"{name} must be at least {meta['min']}, got {quote(value)}.")
    if "min_exclusive" in meta and value <= meta["min_exclusive"]:
        raise ConfigError(f"{name} must be greater than {meta['min_exclusive']}, got {quote(value)}.")
    if "max_exclusive" in meta and value >= meta["max_exclusive"]:
        raise ConfigError(f"{name} must be less than {meta['max_exclusive']}, got {quote(value)}.")
    if "max" in meta and value > meta["max"]:
        raise ConfigError(f"{name} must be at most {meta['max']:,}, got {value:,}.")
    return value


def field_help(name: str) -> str:
    """The help text of a RunConfig field, for CLI and UI labels."""
    return next(f.metadata["help"] for f in dataclasses.fields(RunConfig) if f.name == name)
