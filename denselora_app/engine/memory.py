"""The memory planner: how much memory a training run needs, and whether it fits on its device.

    plan = plan_memory(model_config, cfg, counts, "cuda:0", free_memory("cuda:0"))  # the configuration only
    plan.fits, plan.summary(), plan.suggestions()

A plan has four parts, in bytes (GB below means 2**30 bytes):

* **weights**, the frozen base. Unquantized: every parameter at the dtype's bytes. 4-bit (NF4 with double
  quantization): the Linear layers bitsandbytes quantizes (all but the output embedding) at half a byte a weight,
  plus an 8-bit scale per block of 64 weights and a float32 scale per 256 blocks; the rest (embeddings, norms,
  lm_head) at the dtype's bytes. 8-bit (LLM.int8): a byte a weight plus a float32 scale per output row.
* **adapter**: each trainable parameter in float32 with its gradient and AdamW's two moments (16 bytes).
* **activations**: what autograd keeps for the backward pass, at the step's peak. Per token and decoder layer of a
  LLaMA-style model (``a`` bytes of the compute dtype, ``h`` hidden, ``I`` intermediate size, ``r`` rank):

  - both RMSNorms keep their input in float32: 2 x 4h;
  - attention keeps q, k, v and its output, 4 x h x a (under a padding mask transformers repeats the grouped k/v
    heads to every head), its log-sum-exp, and the additive mask (one row of ``cutoff_len`` values);
  - the gated MLP keeps gate, act(gate) and up: 3 x I x a;
  - each adapted Linear keeps its input and one r-wide tensor (DenseLoRA's ``_DenseAdd`` saves only ``x`` and
    ``E x``; LoRA saves ``x`` and ``A x``). With dropout that input is the adapter's own dropped copy plus the
    dropout mask (a float noise tensor on the CPU, bytes on a GPU); without dropout and in float32 it is the
    layer's tensor itself, kept once by the modules that read it (q/k/v, gate/up); in 16 bits each adapter keeps
    its own copy (PEFT casts the input to the adapter's float32, autocast casts it back);
  - an 8-bit Linear also keeps its input (bitsandbytes' LLM.int8 matmul saves it);
  - with gradient checkpointing a layer keeps only its input (h x a), and one layer at a time is recomputed.

  On top, at the start of the backward pass: the loss keeps the float32 log-softmax over the vocabulary, and its
  gradient and the logits' gradient join it (12 bytes a logit); or, whichever is larger, one layer's backward pass
  (about 2 x I + 2 x h values in flight, plus the recomputed layer with checkpointing). A 4/8-bit layer is
  dequantized whole for each matmul: one such weight in the compute dtype.
* **overhead**, what measurement says the above misses. The process: the training worker's Python, torch and
  transformers before any weight (about 0.6 GB; on CUDA, the CUDA context instead). On the CPU, glibc's allocator:
  tensors under its mmap threshold (at most 32 MiB) come from its heap, which keeps freed memory and fragments, so
  from the first steps on the resident peak exceeds the live tensors by about 0.3 of the layer tensors the heap
  serves in a step (one layer's tensors per layer, checkpointing or not), plus about 52 MiB (the kernels' code, the
  Trainer's state). On a GPU, an allowance of 10% of the activations for the caching allocator, until the GPU check
  (benchmarks/gpu_8b.py) measures it.

On the CPU a quantized base also leaves its original weights resident: transformers keeps the model file mapped and
the pages read to quantize stay in memory, though the kernel may take them back (``reclaimable``, not part of the
total that must fit; ``resident_training`` includes it, for comparison with a measured resident peak).

The activation formula follows transformers' ``modeling_llama.py`` and ``layer._DenseAdd``; it was checked tensor by
tensor with ``torch.autograd.graph.saved_tensors_hooks`` and against the live tensor bytes of a training step, and
the whole plan against the peak resident memory of real training steps on the CPU (``benchmarks/memory_planner.py``;
the table is in docs/benchmarks.md).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from denselora_app.config import MAX_COUNT, RunConfig

log = logging.getLogger(__name__)

GB = 1024**3
MiB = 1024**2

NF4_BYTES_PER_WEIGHT = 0.5 + 1 / 64 + 4 / (64 * 256)  # 4 bits, an 8-bit absmax per 64, a float32 one per 256 x 64
INT8_BYTES_PER_WEIGHT = 1.0  # plus a float32 scale per output row
ADAMW_BYTES_PER_PARAMETER = 16  # float32 weight, gradient and AdamW's two moments
LOSS_BYTES_PER_LOGIT = 12  # float32 log-softmax, its gradient and the logits' gradient, alive together

# Measured, not derived (see the module docstring).
PROCESS_BYTES = {"cpu": 600 * MiB, "mps": 600 * MiB, "cuda": 750 * MiB}
CPU_FIXED_BYTES = 52 * MiB  # code pages of the kernels a step runs, the Trainer's state, the heap's floor
CPU_HEAP_RETAINED = 0.3  # of the layer tensors glibc's heap serves in a step, kept beyond the live tensors
GLIBC_MMAP_THRESHOLD_MAX = 32 * MiB  # larger allocations are always mmap'ed, and unmapped when freed
ACCELERATOR_SLACK = 0.10  # of the activations, for a GPU's caching allocator (to be measured)

# Adapted modules that read one tensor: without dropout, in float32, they keep it once between them.
_SHARED_INPUTS = ({"q_proj", "k_proj", "v_proj"}, {"gate_proj", "up_proj"}, {"query", "key", "value"}, {"w1", "w3"})
# The input of each kind of Linear in a LLaMA-style layer, for the tensors an 8-bit Linear keeps.
_LINEAR_INPUTS = (("q_proj", "attention input"), ("k_proj", "attention input"), ("v_proj", "attention input"),
                  ("o_proj", "attention output"), ("gate_proj", "MLP input"), ("up_proj", "MLP input"),
                  ("down_proj", "MLP product"))


# ---------------------------------------------------------------------------------------------------------------
# The model, from its configuration


@dataclass(frozen=True)
class ModelShape:
    """What a plan needs to know about a model: read from its configuration and its architecture on ``meta``."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    vocab: int
    parameters: int  # every parameter, tied ones once
    quantizable: int  # weights of the Linear layers bitsandbytes quantizes (all but the output embedding)
    quantizable_rows: int  # their output features, summed (8-bit keeps a float32 scale per row)
    linear_sizes: tuple[int, ...]  # the weights of each of them
    inputs: tuple[tuple[str, int], ...]  # Linear name suffix (in the decoder layers) -> its input features

    def input_width(self, name: str) -> int | None:
        return dict(self.inputs).get(name)


_shapes: dict[str, ModelShape] = {}


def model_shape(model_config: Any) -> ModelShape:
    """The shape of a transformers config; its architecture is built once on the meta device, then remembered."""
    key = f"{type(model_config).__name__}:{model_config.to_json_string(use_diff=False)}"
    if key not in _shapes:
        _shapes[key] = _measure_shape(model_config)
    return _shapes[key]


def _measure_shape(model_config: Any) -> ModelShape:
    from denselora_app.engine.models import linear_layers, meta_model  # torch and transformers, on first use

    model = meta_model(model_config)  # ~0.03 s (~1 s the first time in a process)
    linears = list(linear_layers(model).items())
    inputs: dict[str, int] = {}
    for name, module in linears:
        inputs.setdefault(name.rsplit(".", 1)[-1],
                          module.in_features if isinstance(module, nn.Linear) else module.weight.shape[0])
    text = model_config.get_text_config(decoder=True) if hasattr(model_config, "get_text_config") else model_config
    hidden = _first(text, "hidden_size", "n_embd", "d_model")
    return ModelShape(
        layers=_first(text, "num_hidden_layers", "n_layer", "num_layers"),
        hidden=hidden,
        intermediate=_first(text, "intermediate_size", "n_inner", "ffn_dim") or 4 * hidden,
        heads=_first(text, "num_attention_heads", "n_head") or 1,
        vocab=_first(text, "vocab_size"),
        parameters=sum(p.numel() for p in model.parameters()),
        quantizable=sum(m.weight.numel() for _, m in linears),
        quantizable_rows=sum(m.weight.shape[0 if isinstance(m, nn.Linear) else 1] for _, m in linears),
        linear_sizes=tuple(m.weight.numel() for _, m in linears),
        inputs=tuple(inputs.items()),
    )


def _first(config: Any, *names: str) -> int:
    return next((int(getattr(config, n)) for n in names if getattr(config, n, None)), 0)


def compute_bytes(cfg: RunConfig, device: str) -> int:
    """Bytes of the run's resolved dtype (models.resolve_dtype): float32 on the CPU and MPS, 16-bit on CUDA."""
    if cfg.dtype != "auto":
        return 4 if cfg.dtype == "float32" else 2
    return 2 if torch.device(device).type == "cuda" else 4


# ---------------------------------------------------------------------------------------------------------------
# The parts


def weight_bytes(shape: ModelShape, quantization: str, dtype_bytes: int) -> int:
    """The frozen base model's weights."""
    rest = (shape.parameters - shape.quantizable) * dtype_bytes
    if quantization == "4bit":
        return int(shape.quantizable * NF4_BYTES_PER_WEIGHT) + rest
    if quantization == "8bit":
        return int(shape.quantizable * INT8_BYTES_PER_WEIGHT) + shape.quantizable_rows * 4 + rest
    return shape.parameters * dtype_bytes


SHARDING_GPUS = (2, 4, 8)  # the launches the planner suggests fsdp on, one GPU per process

# Sequences one row of a stage's data trains on, in one forward pass: a preference pair is its chosen and its rejected
# answer, batched together (TRL's DPOTrainer); a kto completion comes with a mismatched one for the KL estimate,
# also in the same pass (TRL's KTOTrainer). The reference log-probabilities cost no weights (the adapter is disabled
# for them) and almost no activations: that forward runs under no_grad before the policy's and keeps a few numbers.
SEQUENCES_PER_ROW: dict[str, int] = {"sft": 1, "dpo": 2, "kto": 2}

# A kind of tensor kept per token: (bytes per token of one such tensor, how many of them).
_Tensors = list[tuple[float, float]]


def _layer_tensors(shape: ModelShape, cfg: RunConfig, device: str) -> _Tensors:
    """The tensors one decoder layer keeps for its backward pass, per token (see the module docstring)."""
    a = compute_bytes(cfg, device)
    h, inter, r = shape.hidden, shape.intermediate, cfg.r
    adapter = a if a < 4 else 4  # float32 adapters, or autocast's 16-bit dtype when the Trainer runs in bf16/fp16
    dropout = cfg.dropout > 0
    noise = (adapter if torch.device(device).type == "cpu" else 1) if dropout else 0
    sequence = cfg.cutoff_len * cfg.batch_size if getattr(cfg, "packing", False) else cfg.cutoff_len
    kept: _Tensors = [(4 * h, 2), (h * a, 4), (shape.heads * 4, 1), (sequence * a, 1), (inter * a, 3)]
    shared: dict[str, int] = {}  # inputs kept once, by what reads them
    for name in cfg.target_modules:
        width = shape.input_width(name)
        if width is None:
            continue
        kept.append((r * adapter, 1))
        if dropout or a != 4:  # its own copy of the input: dropped, or cast to float32 and back by autocast
            kept += [(width * adapter, 1), (width * noise, 1)]
        else:
            shared[next((",".join(sorted(g)) for g in _SHARED_INPUTS if name in g), name)] = width * a
    if cfg.quantization == "8bit":
        for name, tensor in _LINEAR_INPUTS:
            width = shape.input_width(name)
            group = next((",".join(sorted(g)) for g in _SHARED_INPUTS if name in g), name)
            if width is not None and group not in shared:
                shared[tensor] = width * a
    kept += [(width, 1) for width in shared.values()]
    return kept


def activation_parts(shape: ModelShape, cfg: RunConfig, device: str) -> dict[str, int]:
    """Activation memory at the step's peak, by part: ``kept`` (what the layers keep for the backward pass: all
    their tensors, or with checkpointing their inputs), ``peak`` (what joins them at the peak: the loss's tensors,
    or one layer's backward pass, with its recomputed tensors under checkpointing), ``dequantized`` (one 4/8-bit
    weight in the compute dtype). Not part of the sum, for the CPU's allocator: ``heap_churn``, the bytes of the
    layers' tensors small enough for glibc's heap that a step allocates (one layer's tensors per layer)."""
    a = compute_bytes(cfg, device)
    tokens = cfg.batch_size * cfg.cutoff_len * SEQUENCES_PER_ROW.get(cfg.stage, 1)
    h, inter = shape.hidden, shape.intermediate
    layer = _layer_tensors(shape, cfg, device)
    loss: _Tensors = [(4 * h, 1), (h * a, 1), (shape.vocab * 4, LOSS_BYTES_PER_LOGIT / 4)]
    backward: _Tensors = [(inter * a, 2), (h * a, 2)]
    if cfg.checkpointing:
        kept: _Tensors = [(h * a, shape.layers)]
        phases = [loss, layer + backward]  # the loss, then each layer recomputed and differentiated in turn
    else:
        kept = [(width, count * shape.layers) for width, count in layer]
        phases = [loss, backward]
    peak = max(phases, key=_sum)
    dequantized = max(shape.linear_sizes, default=0) * a if cfg.quantized else 0
    return {"kept": int(_sum(kept) * tokens), "peak": int(_sum(peak) * tokens), "dequantized": int(dequantized),
            "heap_churn": int(shape.layers * _sum(layer, tokens, small=True))}


def _sum(tensors: _Tensors, tokens: int = 1, small: bool = False) -> float:
    """Bytes of ``tensors`` for ``tokens`` tokens; with ``small``, only of those under glibc's mmap threshold."""
    return sum(width * count * tokens for width, count in tensors
               if not small or 0 < width * tokens < GLIBC_MMAP_THRESHOLD_MAX)


def checkpoint_bytes(model_config: Any) -> int:
    """Bytes a weight takes in the model's files (its config's dtype; float32 when it does not say)."""
    dtype = str(getattr(model_config, "dtype", None) or "float32").removeprefix("torch.")
    return 2 if dtype in ("bfloat16", "float16") else 4


def overhead_bytes(device: str, parts: dict[str, int], activations: int) -> tuple[int, int]:
    """(the process's own memory before it creates the model, the allowance on top) for a run on ``device``.

    On the CPU the allowance is what glibc's heap keeps beyond the live tensors, CPU_HEAP_RETAINED of the layer
    tensors it serves in a step (``heap_churn``), and a fixed part (the kernels' code, the Trainer's state)."""
    kind = torch.device(device).type
    process = PROCESS_BYTES.get(kind, PROCESS_BYTES["cpu"])
    if kind != "cpu":
        return process, int(ACCELERATOR_SLACK * activations)
    return process, int(CPU_FIXED_BYTES + CPU_HEAP_RETAINED * parts["heap_churn"])


def reclaimable_bytes(shape: ModelShape, cfg: RunConfig, device: str, file_bytes: int) -> int:
    """Resident memory the kernel may take back: on the CPU, a quantized base's original weights. transformers keeps
    the model file mapped (the unquantized weights are views into it), so the pages read to quantize the Linear
    layers stay resident, though nothing reads them again."""
    if torch.device(device).type != "cpu" or not cfg.quantized:
        return 0
    return shape.quantizable * file_bytes


# ---------------------------------------------------------------------------------------------------------------
# Free memory


def free_memory(device: str) -> int | None:
    """Bytes free on ``device`` now: CUDA's own count (``torch.cuda.mem_get_info``), the RAM available on the CPU
    (psutil), and on Apple's MPS, whose memory is the machine's, the lesser of what is left of Metal's recommended
    working set and the RAM available. None when the device cannot say."""
    import psutil

    kind = torch.device(device).type
    try:
        if kind == "cuda":
            return int(torch.cuda.mem_get_info(torch.device(device))[0])
        available = int(psutil.virtual_memory().available)
        if kind == "mps":
            return int(min(torch.mps.recommended_max_memory() - torch.mps.driver_allocated_memory(), available))
        return available
    except Exception as err:  # noqa: BLE001 (a device that cannot say: the plan still gives the total)
        log.warning("Cannot read the free memory of %s: %s", device, err)
        return None


# ---------------------------------------------------------------------------------------------------------------
# The plan


@dataclass
class Suggestion:
    """A change to the run's settings, and the total memory the run would then need."""

    settings: dict[str, Any]  # RunConfig field -> value
    total: int  # bytes
    note: str = ""  # what else the change brings, e.g. checkpointing that comes on with quantization

    def text(self) -> str:
        """``key=value`` pairs as ``--set`` takes them, e.g. 'quantization=4bit, gradient_checkpointing=true'."""
        words = {True: "true", False: "false"}
        return ", ".join(f"{key}={words.get(value, value) if isinstance(value, bool) else value}"
                         for key, value in self.settings.items())

    def line(self) -> str:
        notes = [self.note] if self.note else []
        if "grad_accum" in self.settings:
            notes.append("the same effective batch")
        if "cutoff_len" in self.settings:
            notes.append("longer rows are truncated")
        return f"{self.text()} ({_gb(self.total)}{''.join(f'; {n}' for n in notes)})"


@dataclass
class MemoryPlan:
    """The memory a run needs on its device, by part, against the device's free memory."""

    device: str
    weights: int
    adapter: int
    activations: int
    overhead: int  # process + allocator
    process: int  # of the overhead: what the training process holds before it creates the model
    free: int | None
    reclaimable: int = 0  # resident on top of the total, but the kernel's to take back (reclaimable_bytes)
    parts: dict[str, int] = field(default_factory=dict)  # of the activations (activation_parts)
    cfg: RunConfig | None = field(default=None, repr=False)
    shape: ModelShape | None = field(default=None, repr=False)
    trainable: int = 0
    file_bytes: int = 4  # bytes a weight takes in the model's files
    processes: int = 1  # training processes of the launch (torchrun, accelerate): with fsdp each holds a share

    @property
    def total(self) -> int:
        """Per process."""
        return self.weights + self.adapter + self.activations + self.overhead

    @property
    def training(self) -> int:
        """The total without the process's own memory: what creating the model and training add to a process."""
        return self.total - self.process

    @property
    def resident_training(self) -> int:
        """What creating the model and training add to a process's resident memory (VmRSS), reclaimable pages
        included: the figure to compare with a measured peak."""
        return self.training + self.reclaimable

    @property
    def on_device(self) -> int:
        """What the device must hold: one process's total on a GPU of its own, every process's on a shared CPU."""
        return self.total * (self.processes if torch.device(self.device).type == "cpu" else 1)

    @property
    def fits(self) -> bool:
        return self.free is None or self.on_device <= self.free

    def summary(self) -> str:
        """One line: the total, the free memory and whether it fits, and the parts."""
        if self.free is None:
            where = f"free memory of {self.device} unknown"
        else:
            where = f"{_gb(self.free)} free on {self.device}: {'fits' if self.fits else 'does not fit'}"
        each = ""
        if self.processes > 1:
            shared = f", {_gb(self.on_device)} in all" if self.on_device != self.total else ""
            each = f" per process ({self.processes} processes{', fsdp' if self.sharded else ''}{shared})"
        return (f"Estimated training memory: {_gb(self.total)}{each} ({where}) - weights {_gb(self.weights)}, "
                f"adapter + optimizer {_gb(self.adapter)}, activations {_gb(self.activations)}, overhead "
                f"{_gb(self.overhead)}")

    @property
    def sharded(self) -> bool:
        return self.cfg is not None and self.cfg.fsdp and self.processes > 1

    @property
    def total_text(self) -> str:
        """The total for people ('21.3 GB')."""
        return _gb(self.total)

    def for_method(self, method: str, trainable: int) -> MemoryPlan:
        """The plan of this run with another adapter method, which trains ``trainable`` parameters."""
        return _plan(self.shape, dataclasses.replace(self.cfg, method=method), trainable, self.device, self.free,
                     self.file_bytes, self.processes)

    def replan(self, **settings: Any) -> MemoryPlan:
        """The plan of this run with some settings changed, on the same device with the same free memory."""
        return _plan(self.shape, dataclasses.replace(self.cfg, **settings), self.trainable, self.device, self.free,
                     self.file_bytes, self.processes)

    def suggestions(self) -> list[Suggestion]:
        """When the run does not fit: the changes that would make it fit, most effective (lowest total) first,
        only among changes not already in effect: 4-bit quantization, gradient checkpointing, a smaller batch with
        more gradient accumulation (the same effective batch), a shorter cutoff. Each alone when one is enough;
        otherwise one combination, the most effective changes first (with the largest batch and cutoff that then
        fit); if even every change together is not enough, that combination with its total."""
        if self.fits or self.cfg is None:
            return []
        alone = [s for s in (self._quantize(), self._checkpoint(), self._batch({}), self._cutoff({}), self._shard())
                 if s]
        fitting = sorted((s for s in alone if s.total <= self.free), key=lambda s: s.total)
        if fitting or not alone:
            return fitting
        settings: dict[str, Any] = {}
        for change in sorted(alone, key=lambda s: s.total):
            settings.update(change.settings)
            if self.replan(**settings).fits:
                break
        # Alone, batch and cutoff went as low as they go; with the other changes, give back what fits.
        if "batch_size" in settings:
            others = {k: v for k, v in settings.items() if k not in ("batch_size", "grad_accum")}
            settings = self._batch(others).settings
        if "cutoff_len" in settings:
            settings = self._cutoff({k: v for k, v in settings.items() if k != "cutoff_len"}).settings
        return [Suggestion(settings, self.replan(**settings).total)]

    def _quantize(self) -> Suggestion | None:
        if self.cfg.quantization == "4bit" or torch.device(self.device).type not in ("cuda", "cpu"):
            return None  # bitsandbytes runs on NVIDIA GPUs and the CPU
        note = "gradient checkpointing comes on with it" if self.cfg.gradient_checkpointing is None else ""
        return Suggestion({"quantization": "4bit"}, self.replan(quantization="4bit").total, note)

    def _shard(self) -> Suggestion | None:
        """fsdp on the fewest GPUs (2, 4 or 8, one process each) that hold the run, else on 8."""
        if self.cfg.fsdp or torch.device(self.device).type != "cuda":
            return None
        plans = [(gpus, _plan(self.shape, dataclasses.replace(self.cfg, fsdp=True), self.trainable, self.device,
                              self.free, self.file_bytes, gpus)) for gpus in SHARDING_GPUS]
        gpus, plan = next(((g, p) for g, p in plans if p.fits), plans[-1])
        return Suggestion({"fsdp": True}, plan.total, f"on {gpus} GPUs: torchrun --nproc_per_node {gpus}")

    def _checkpoint(self) -> Suggestion | None:
        if self.cfg.checkpointing:
            return None
        return Suggestion({"gradient_checkpointing": True}, self.replan(gradient_checkpointing=True).total)

    def _batch(self, other: dict[str, Any]) -> Suggestion | None:
        """The largest batch below the current one that fits (with ``other`` changes), with grad_accum raised to
        keep the effective batch; batch 1 (or the smallest allowed) if none fits."""
        effective = self.cfg.batch_size * self.cfg.grad_accum
        candidates = [b for b in range(self.cfg.batch_size - 1, 0, -1)
                      if effective % b == 0 and effective // b <= MAX_COUNT]
        return self._largest_fitting(other, [{"batch_size": b, "grad_accum": effective // b} for b in candidates])

    def _cutoff(self, other: dict[str, Any]) -> Suggestion | None:
        """The longest cutoff below the current one, in steps of 64, that fits (with ``other`` changes)."""
        candidates = range((self.cfg.cutoff_len - 1) // 64 * 64, 63, -64)
        return self._largest_fitting(other, [{"cutoff_len": c} for c in candidates])

    def _largest_fitting(self, other: dict[str, Any], candidates: list[dict[str, Any]]) -> Suggestion | None:
        """The first of ``candidates`` (largest first) that fits, else the last. Memory only grows with the batch
        and the cutoff, so a bisection finds it in a few plans, however many candidates there are."""
        if not candidates:
            return None
        low, high = 0, len(candidates) - 1  # the answer lies in [low, high]; high is the fallback
        while low < high:
            middle = (low + high) // 2
            if self.replan(**other, **candidates[middle]).fits:
                high = middle
            else:
                low = middle + 1
        return Suggestion({**other, **candidates[low]}, self.replan(**other, **candidates[low]).total)

    def advice(self, bullets: bool = False) -> str:
        """What to change when the run does not fit (suggestions), in a sentence or, with ``bullets``, a Markdown
        list; "" when it fits."""
        if self.fits:
            return ""
        changes = self.suggestions()
        if changes and changes[0].total <= (self.free or 0):
            if bullets:
                return "To make it fit, change one of (most effective first):\n" + "\n".join(
                    f"- {c.line()}" for c in changes)
            intro = "To make it fit, change one of (most effective first): " if len(changes) > 1 else "To make it fit: "
            return intro + "; ".join(c.line() for c in changes) + "."
        if changes:
            return (f"Even with {changes[0].line()} it would need more than is free: choose a smaller model or a "
                    "device with more memory, or free some.")
        return "Choose a smaller model or a device with more memory, or free some."

    def refusal(self) -> str:
        """The paragraph a launch that does not fit is refused with: the total, the free memory, the changes."""
        return (f"this run needs about {_gb(self.total)} ({self.breakdown()}), but {self.device} has "
                f"{_gb(self.free)} free. {self.advice()}")

    def breakdown(self) -> str:
        return (f"weights {_gb(self.weights)}, adapter + optimizer {_gb(self.adapter)}, activations "
                f"{_gb(self.activations)}, overhead {_gb(self.overhead)}")


def _gb(value: int | None) -> str:
    """Bytes for people: '21.3 GB', '0.67 GB', '41 MB' (GB and MB of 2**30 and 2**20 bytes)."""
    if value is None:
        return "? GB"
    if value >= GB:
        return f"{value / GB:.1f} GB"
    return f"{value / GB:.2f} GB" if value >= GB / 10 else f"{value / MiB:.0f} MB"


def sharded_weight_bytes(shape: ModelShape, cfg: RunConfig, device: str, processes: int) -> int:
    """One process's frozen weights with fsdp over ``processes``: its 1/N share, plus one decoder layer gathered
    whole while it computes (FSDP2 gathers a layer's shards for its forward and backward, then frees them)."""
    weights = weight_bytes(shape, cfg.quantization, compute_bytes(cfg, device))
    return -(-weights // processes) + -(-weights // max(shape.layers, 1))


def _plan(shape: ModelShape, cfg: RunConfig, trainable: int, device: str, free: int | None, file_bytes: int,
          processes: int = 1) -> MemoryPlan:
    shards = processes if cfg.fsdp else 1
    if shards > 1:
        weights = sharded_weight_bytes(shape, cfg, device, shards)
    else:
        weights = weight_bytes(shape, cfg.quantization, compute_bytes(cfg, device))
    parts = activation_parts(shape, cfg, device)  # activations stay per process: each computes its own rows
    activations = parts["kept"] + parts["peak"] + parts["dequantized"]
    process, allowance = overhead_bytes(device, parts, activations)
    return MemoryPlan(device=device, weights=weights, adapter=-(-trainable * ADAMW_BYTES_PER_PARAMETER // shards),
                      activations=activations, overhead=process + allowance, process=process, free=free, parts=parts,
                      reclaimable=reclaimable_bytes(shape, cfg, device, file_bytes), cfg=cfg, shape=shape,
                      trainable=trainable, file_bytes=file_bytes, processes=processes)


def plan_memory(model_config: Any, cfg: RunConfig, counts: Any, device: str, free: int | None,
                processes: int | None = None) -> MemoryPlan:
    """The memory plan of training ``cfg`` on ``device``, the resolved device ('cpu', 'cuda:0', 'mps').

    ``counts`` is the run's methods.ParameterCount (check_adapter, count_parameters). ``free``: the bytes free on
    the device (``free_memory(device)`` reads them now); None leaves it unknown (the plan then fits). ``processes``:
    the launch's training processes, by default the launcher's (sharding.world_size)."""
    from denselora_app.engine.sharding import world_size

    return _plan(model_shape(model_config), cfg, counts.trainable, device, free, checkpoint_bytes(model_config),
                 world_size() if processes is None else processes)
