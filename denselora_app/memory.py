"""The memory planner: how much memory a training run needs, and whether it fits on its device.

    plan = plan_memory(model_config, cfg, counts, "cuda:0")    # no weights are loaded: ~0.1 s
    plan.fits, plan.summary(), plan.suggestions()

The plan has four parts, in bytes:

* **weights**: the frozen base. Unquantized, every parameter at the dtype's bytes. 4-bit (NF4 with double
  quantization): the Linear layers of the decoder at half a byte a weight plus one 8-bit scale per block of 64
  weights and one float32 scale per 256 blocks; everything bitsandbytes leaves alone (embeddings, norms, lm_head) at
  the dtype's bytes. 8-bit (LLM.int8): one byte a weight plus a float32 scale per output row.
* **adapter**: every trainable parameter in float32 with its gradient and AdamW's two moments (16 bytes).
* **activations**: what autograd keeps between the forward and the backward pass, at the peak. Per token and
  decoder layer of a LLaMA-style model (``a`` = bytes of the compute dtype, ``h`` hidden, ``I`` intermediate):
  both RMSNorms keep their input in float32 (2 x 4h); attention keeps q, k, v and its output (4h x a: with a padding
  mask transformers repeats the grouped k/v heads to full width) and the additive mask (one row of ``cutoff``
  values); the gated MLP keeps gate, act(gate) and up (3I x a); each adapted Linear keeps its own input (DenseLoRA's
  ``_DenseAdd`` saves only ``x`` and ``E x``, as LoRA saves ``x`` and ``A x``): with dropout a dropped copy of it
  plus the dropout mask, without dropout the layer's input itself, once for the modules that share it; an 8-bit
  Linear also keeps its input. With gradient checkpointing a layer keeps only its input (h x a) and one layer at a
  time is recomputed in the backward pass. On top, the loss: the float32 log-softmax over the vocabulary is kept, and
  at the start of the backward pass it, its gradient and the gradient of the logits are alive together (12 bytes a
  logit); and the backward pass of one layer needs a few layer-wide gradients at once.
* **overhead**: what measurement says the above misses. The process itself (on the CPU the training worker's Python,
  torch and transformers: about half a GB before any weight), the CUDA context and the caching allocator's slack on
  a GPU, and the allocator's slack on the CPU (freed blocks it keeps).

The activation formula was derived from what transformers' LLaMA layer and DenseLoRA's custom autograd save, checked
with ``torch.autograd.graph.saved_tensors_hooks``, and calibrated against the peak resident memory of real training
steps on the CPU (``benchmarks/memory_planner.py``; the table is in docs/benchmarks.md).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import torch
from torch import nn

from .config import RunConfig

log = logging.getLogger(__name__)

GB = 1024**3
MB = 1024**2

# bitsandbytes NF4 with double quantization: 4 bits a weight, an 8-bit absmax per block of 64 weights, and a float32
# absmax per 256 of those blocks.
NF4_BYTES_PER_WEIGHT = 0.5 + 1 / 64 + 4 / (64 * 256)
INT8_BYTES_PER_WEIGHT = 1.0  # plus one float32 scale per output row
ADAMW_BYTES_PER_PARAMETER = 16  # float32 weight, gradient and two moments
LOSS_BYTES_PER_LOGIT = 12  # float32 log-softmax kept + its gradient + the logits' gradient, at the backward's start

# Allowances measured rather than derived (see the module docstring and docs/benchmarks.md).
CPU_PROCESS_BYTES = 600 * MB  # a training worker's RSS before the model loads (imports, datasets, the Trainer)
CUDA_CONTEXT_BYTES = 700 * MB  # the CUDA context, cuBLAS workspace and bitsandbytes' kernels, per process
ALLOCATOR_SLACK = 0.05  # fraction of the training memory held but unused by the allocator
FIXED_SLACK_BYTES = 24 * MB  # lazily created state of the first step (the Trainer, kernels' scratch buffers)

# Adapted modules that read the same input tensor (without dropout they keep it once between them).
_SHARED_INPUTS = (
    {"q_proj", "k_proj", "v_proj"},
    {"gate_proj", "up_proj"},
    {"query", "key", "value"},
    {"w1", "w3"},
)
# The Linear layers of a LLaMA-style layer by what they read: the normed residual (attention), the attention output,
# the normed residual (MLP), the gated product.
_ATTENTION_OUTPUT = {"o_proj", "out_proj", "dense", "c_proj"}
_MLP_PRODUCT = {"down_proj", "w2", "fc2", "dense_4h_to_h"}


@dataclass(frozen=True)
class ModelShape:
    """What the plan needs to know about a model, read from its configuration and its architecture on ``meta``."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    parameters: int  # every parameter, tied ones once
    quantizable: int  # weights of the Linear layers bitsandbytes quantizes (all but the output embedding)
    quantizable_rows: int  # their output features, summed (8-bit keeps a float32 scale per row)
    largest_linear: int  # weights of the largest of them (a 4/8-bit layer is dequantized whole for each matmul)
    inputs: tuple[tuple[str, int], ...]  # Linear name suffix in a decoder layer -> its input features

    def input_width(self, name: str) -> int | None:
        return dict(self.inputs).get(name)


def _text_config(model_config: Any) -> Any:
    getter = getattr(model_config, "get_text_config", None)
    return getter(decoder=True) if getter else model_config


def _first(config: Any, *names: str, default: Any = None) -> Any:
    for name in names:
        value = getattr(config, name, None)
        if value:
            return value
    return default


@lru_cache(maxsize=16)
def _shape_from_json(config_json: str, model_type: str) -> ModelShape:
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    import json

    values = json.loads(config_json)
    values.pop("model_type", None)
    model_config = AutoConfig.for_model(model_type, **values)
    with torch.device("meta"):  # the architecture without memory
        model = AutoModelForCausalLM.from_config(model_config)
    output = model.get_output_embeddings()
    linears = [(name, module) for name, module in model.named_modules()
               if isinstance(module, (nn.Linear, Conv1D)) and module is not output]
    inputs: dict[str, int] = {}
    for name, module in linears:
        suffix = name.rsplit(".", 1)[-1]
        in_features = module.in_features if isinstance(module, nn.Linear) else module.weight.shape[0]
        inputs.setdefault(suffix, in_features)
    sizes = [m.weight.numel() for _, m in linears]
    rows = [m.out_features if isinstance(m, nn.Linear) else m.weight.shape[1] for _, m in linears]
    text = _text_config(model_config)
    hidden = _first(text, "hidden_size", "n_embd", "d_model", default=0)
    heads = _first(text, "num_attention_heads", "n_head", default=1)
    return ModelShape(
        layers=_first(text, "num_hidden_layers", "n_layer", "num_layers", default=0),
        hidden=hidden,
        intermediate=_first(text, "intermediate_size", "n_inner", "ffn_dim", default=4 * hidden),
        heads=heads,
        kv_heads=_first(text, "num_key_value_heads", default=heads),
        head_dim=_first(text, "head_dim", default=hidden // max(heads, 1)),
        vocab=_first(text, "vocab_size", default=0),
        parameters=sum(p.numel() for p in model.parameters()),
        quantizable=sum(sizes),
        quantizable_rows=sum(rows),
        largest_linear=max(sizes, default=0),
        inputs=tuple(inputs.items()),
    )


def model_shape(model_config: Any) -> ModelShape:
    """The shape of a transformers config (its architecture built once on the meta device, then cached)."""
    return _shape_from_json(model_config.to_json_string(use_diff=False), model_config.model_type)


def dtype_bytes(cfg: RunConfig, device: str) -> int:
    """Bytes of the run's resolved dtype on ``device``: float32 on the CPU and MPS unless set; bf16/fp16 on CUDA."""
    if cfg.dtype != "auto":
        return 4 if cfg.dtype == "float32" else 2
    return 2 if torch.device(device).type == "cuda" else 4


# ---------------------------------------------------------------------------------------------------------------
# The parts


def weight_bytes(shape: ModelShape, quantization: str, dtype: int) -> int:
    """The frozen base model's weights."""
    if quantization == "4bit":
        return int(shape.quantizable * NF4_BYTES_PER_WEIGHT + (shape.parameters - shape.quantizable) * dtype)
    if quantization == "8bit":
        return int(shape.quantizable * INT8_BYTES_PER_WEIGHT + shape.quantizable_rows * 4
                   + (shape.parameters - shape.quantizable) * dtype)
    return shape.parameters * dtype


def _groups(targets: list[str], shape: ModelShape) -> dict[str, tuple[int, list[str]]]:
    """Adapted modules present in the model, grouped by the tensor they read: group -> (width, modules)."""
    groups: dict[str, tuple[int, list[str]]] = {}
    for name in targets:
        width = shape.input_width(name)
        if width is None:
            continue
        key = next((",".join(sorted(g)) for g in _SHARED_INPUTS if name in g), name)
        groups.setdefault(key, (width, []))[1].append(name)
    return groups


def activation_bytes(shape: ModelShape, cfg: RunConfig, device: str) -> dict[str, int]:
    """Activation memory at the peak of a training step, by part: ``layers`` (all layers' kept tensors, or with
    checkpointing their inputs), ``recompute`` (one layer recomputed in the backward pass, checkpointing only),
    ``loss`` (logits and their gradients) and ``backward`` (one layer's gradients in flight)."""
    a = dtype_bytes(cfg, device)
    tokens = cfg.batch_size * cfg.cutoff_len
    h, inter, r = shape.hidden, shape.intermediate, cfg.r
    # The adapter computes in float32 (PEFT keeps adapter weights in float32), or in autocast's 16-bit dtype when
    # the Trainer runs in bf16/fp16 (it does when the weights are 16-bit).
    c = a if a < 4 else 4
    on_cpu = torch.device(device).type == "cpu"
    dropout = cfg.dropout > 0
    mask = (c if on_cpu else 1) if dropout else 0  # CPU dropout multiplies by a float noise tensor, CUDA keeps bools
    sequence = cfg.cutoff_len * cfg.batch_size if getattr(cfg, "packing", False) else cfg.cutoff_len

    # The frozen LLaMA-style layer, per token.
    per_layer = (
        2 * 4 * h  # both RMSNorms keep their input in float32
        + 4 * h * a  # q, k, v (k and v repeated to all heads under a padding mask) and the attention output
        + shape.heads * 4  # the attention's log-sum-exp
        + sequence * a  # the additive attention mask, one row per token
        + 3 * inter * a  # gate, act(gate) and up
    )
    # What each adapted module keeps: its input (a dropped copy, or the shared input itself) and its r-wide tensor.
    unique_inputs: dict[str, int] = {}
    for key, (width, names) in _groups(list(cfg.target_modules), shape).items():
        per_layer += len(names) * r * c
        if dropout or c != a:
            per_layer += len(names) * width * (c + mask)
        else:
            unique_inputs[key] = width * a
    if cfg.quantization == "8bit":  # LLM.int8's matmul keeps its input: the four inputs of a layer's Linears
        for key, width in (("attention", h), ("o_proj", shape.heads * shape.head_dim), ("mlp", h),
                           ("down_proj", inter)):
            match = next((k for k in unique_inputs if key in k or (key == "attention" and "q_proj" in k)
                          or (key == "mlp" and "up_proj" in k)), None)
            unique_inputs[match or key] = width * a
    per_layer += sum(unique_inputs.values())

    loss = 4 * h + h * a + shape.vocab * LOSS_BYTES_PER_LOGIT  # the final norm, and the loss over the vocabulary
    backward = (4 * inter + 4 * h) * a  # one layer's gradients in flight (MLP-wide ones dominate)
    dequantized = shape.largest_linear * a if cfg.quantized else 0  # one 4/8-bit weight dequantized for a matmul
    if cfg.checkpointing:
        parts = {"layers": shape.layers * h * a * tokens, "recompute": per_layer * tokens}
        peak_extra = max(loss, backward) * tokens
    else:
        parts = {"layers": shape.layers * per_layer * tokens, "recompute": 0}
        peak_extra = max(loss, backward) * tokens
    parts["loss"] = peak_extra
    parts["dequantized"] = dequantized
    return {k: int(v) for k, v in parts.items()}


def overhead_bytes(device: str, training: int) -> int:
    """What a run needs besides weights, adapter and activations, from measurement: the process and the allocator."""
    kind = torch.device(device).type
    process = CUDA_CONTEXT_BYTES if kind == "cuda" else CPU_PROCESS_BYTES
    return int(process + FIXED_SLACK_BYTES + ALLOCATOR_SLACK * training)


# ---------------------------------------------------------------------------------------------------------------
# Free memory


def free_memory(device: str) -> int | None:
    """Bytes free on ``device`` now: CUDA's own count, the RAM available on the CPU, and for Apple's MPS (memory
    shared with the CPU) the lesser of Metal's recommended working set left and the RAM available. None if unknown."""
    import psutil

    kind = torch.device(device).type
    try:
        if kind == "cuda":
            free, _ = torch.cuda.mem_get_info(torch.device(device))
            return int(free)
        available = int(psutil.virtual_memory().available)
        if kind == "mps":
            left = torch.mps.recommended_max_memory() - torch.mps.driver_allocated_memory()
            return int(min(left, available))
        return available
    except Exception as err:  # noqa: BLE001 (a device that cannot say: the plan still gives the total)
        log.warning("Cannot read the free memory of %s: %s", device, err)
        return None


# ---------------------------------------------------------------------------------------------------------------
# The plan


@dataclass
class Suggestion:
    """One change to the run's settings, and the total memory it would give."""

    settings: dict[str, Any]  # RunConfig field -> new value
    text: str  # e.g. "quantization 4bit"
    total: int  # bytes

    def line(self) -> str:
        return f"{self.text} ({_gb(self.total)})"


@dataclass
class MemoryPlan:
    device: str
    weights: int
    adapter: int
    activations: int
    overhead: int
    free: int | None
    parts: dict[str, int] = field(default_factory=dict)  # the activations, by part
    cfg: RunConfig | None = field(default=None, repr=False)
    shape: ModelShape | None = field(default=None, repr=False)
    trainable: int = 0

    @property
    def training(self) -> int:
        """Memory of the training itself (what a process that has not loaded a model yet adds at the peak)."""
        return self.total - self.process

    @property
    def process(self) -> int:
        kind = torch.device(self.device).type
        return CUDA_CONTEXT_BYTES if kind == "cuda" else CPU_PROCESS_BYTES

    @property
    def total(self) -> int:
        return self.weights + self.adapter + self.activations + self.overhead

    @property
    def fits(self) -> bool:
        return self.free is None or self.total <= self.free

    def summary(self) -> str:
        free = f"{_gb(self.free)} free on {self.device}" if self.free is not None else f"free memory of {self.device} unknown"
        verdict = "fits" if self.fits else "does not fit"
        return (f"Training memory: {_gb(self.total)} ({verdict}; {free}) - weights {_gb(self.weights)}, adapter + "
                f"optimizer {_gb(self.adapter)}, activations {_gb(self.activations)}, overhead {_gb(self.overhead)}")

    def with_settings(self, **changes: Any) -> MemoryPlan:
        """The plan of the same run with some settings changed (same device and free memory)."""
        return _plan(self.shape, dataclasses.replace(self.cfg, **changes), self.trainable, self.device, self.free)

    def suggestions(self) -> list[Suggestion]:
        """When the run does not fit: changes that would make it fit, most effective first (lowest total), each
        alone; if no single change is enough, the changes together (or as many as there are)."""
        if self.fits or self.cfg is None:
            return []
        cfg = self.cfg
        options: list[Suggestion] = []
        if cfg.quantization != "4bit" and torch.device(self.device).type in ("cuda", "cpu"):
            text = "quantization 4bit"
            if cfg.gradient_checkpointing is None and not cfg.checkpointing:
                text += " (turns gradient checkpointing on)"
            options.append(self._option({"quantization": "4bit"}, text))
        if not cfg.checkpointing:
            options.append(self._option({"gradient_checkpointing": True}, "gradient_checkpointing true"))
        if cfg.batch_size > 1:
            options.append(self._smaller_batch(cfg, self))
        if cfg.cutoff_len > 64:
            options.append(self._shorter_cutoff(cfg, self))
        fitting = sorted((o for o in options if o.total <= self.free), key=lambda o: o.total)
        if fitting:
            return fitting
        # Together: the most effective first, each applied on top of the ones before.
        settings: dict[str, Any] = {}
        texts: list[str] = []
        plan: MemoryPlan = self
        for option in sorted(options, key=lambda o: o.total):
            settings.update(option.settings)
            texts.append(option.text)
            plan = self.with_settings(**settings)
            if plan.fits:
                break
        if plan.cfg.batch_size > 1 or plan.cfg.cutoff_len > 64:  # re-fit batch and cutoff after the others
            for refit in (self._smaller_batch, self._shorter_cutoff):
                better = refit(plan.cfg, plan)
                settings.update(better.settings)
                plan = self.with_settings(**settings)
                if plan.fits:
                    break
            texts = [_describe(settings, cfg)]
        return [Suggestion(settings, " + ".join(texts) if len(texts) > 1 else texts[0], plan.total)]

    def _option(self, settings: dict[str, Any], text: str) -> Suggestion:
        return Suggestion(settings, text, self.with_settings(**settings).total)

    def _smaller_batch(self, cfg: RunConfig, base: MemoryPlan) -> Suggestion:
        """The largest batch below the current one that fits, with grad_accum raised to keep the effective batch."""
        effective = cfg.batch_size * cfg.grad_accum
        candidates = [b for b in range(cfg.batch_size - 1, 0, -1) if effective % b == 0] or [1]
        chosen = candidates[-1]
        for b in candidates:
            if base.with_settings(batch_size=b, grad_accum=effective // b).fits:
                chosen = b
                break
        settings = {"batch_size": chosen, "grad_accum": max(effective // chosen, 1)}
        text = (f"batch_size {chosen} with grad_accum {settings['grad_accum']} (the same effective batch of "
                f"{effective})")
        return Suggestion(settings, text, base.with_settings(**settings).total)

    def _shorter_cutoff(self, cfg: RunConfig, base: MemoryPlan) -> Suggestion:
        """The longest cutoff (a multiple of 64, at least 64) below the current one that fits."""
        chosen = 64
        for cutoff in range((cfg.cutoff_len - 1) // 64 * 64, 63, -64):
            if base.with_settings(cutoff_len=cutoff).fits:
                chosen = cutoff
                break
        settings = {"cutoff_len": chosen}
        return Suggestion(settings, f"cutoff_len {chosen} (longer rows are truncated)",
                          base.with_settings(**settings).total)

    def refusal(self) -> str:
        """The paragraph a launch that does not fit is refused with."""
        needs = f"this run needs about {_gb(self.total)} ({self.breakdown()}), but {self.device} has {_gb(self.free)} free"
        options = self.suggestions()
        if options:
            fix = "To make it fit: " + "; ".join(o.line() for o in options) + "."
            if not options[0].total <= (self.free or 0):
                fix = ("Even with every change it needs about " + _gb(options[0].total) + " (" + options[0].text
                       + "): choose a smaller model or a device with more memory.")
        else:
            fix = "Choose a smaller model or a device with more memory."
        return f"{needs}. {fix} (Estimated by the memory planner; --share-device does not skip this check.)"

    def breakdown(self) -> str:
        return (f"weights {_gb(self.weights)}, adapter and optimizer {_gb(self.adapter)}, activations "
                f"{_gb(self.activations)}, overhead {_gb(self.overhead)}")


def _describe(settings: dict[str, Any], cfg: RunConfig) -> str:
    parts = []
    for key, value in settings.items():
        if key == "grad_accum":
            continue
        if key == "batch_size":
            parts.append(f"batch_size {value} with grad_accum {settings['grad_accum']}")
        elif key == "gradient_checkpointing":
            parts.append("gradient_checkpointing true")
        else:
            parts.append(f"{key} {value}")
    return " + ".join(parts)


def _gb(value: int | None) -> str:
    if value is None:
        return "? GB"
    return f"{value / GB:.1f} GB" if value >= 0.1 * GB else f"{value / GB:.2f} GB"


def _plan(shape: ModelShape, cfg: RunConfig, trainable: int, device: str, free: int | None) -> MemoryPlan:
    a = dtype_bytes(cfg, device)
    weights = weight_bytes(shape, cfg.quantization, a)
    adapter = trainable * ADAMW_BYTES_PER_PARAMETER
    parts = activation_bytes(shape, cfg, device)
    activations = sum(parts.values())
    overhead = overhead_bytes(device, weights + adapter + activations)
    return MemoryPlan(device=device, weights=weights, adapter=adapter, activations=activations, overhead=overhead,
                      free=free, parts=parts, cfg=cfg, shape=shape, trainable=trainable)


def plan_memory(model_config: Any, cfg: RunConfig, counts: Any, device: str, free: int | None | bool = True) -> MemoryPlan:
    """The memory plan of training ``cfg`` on ``device`` ('cpu', 'cuda:0', 'mps': the resolved device).

    ``counts`` is the methods.ParameterCount of the run (check_adapter / count_parameters). ``free``: True reads the
    device's free memory now; a number uses that; None leaves it unknown (``fits`` is then True)."""
    shape = model_shape(model_config)
    available = free_memory(device) if free is True else (None if free is False else free)
    return _plan(shape, cfg, counts.trainable, device, available)
