"""Training step time, peak memory, adapter size and generation speed: DenseLoRA against LoRA and the frozen base.

Every arm runs in this one process on the same base model (the frozen weights are shared, not copied), with the
same batch and sequence length. The arms are interleaved and repeated, and medians are reported, so that load from
other work on the machine falls on every arm alike. The arms:

* frozen base: the base model doing the same forward and backward pass with no adapter (the gradient is taken
  with respect to the input embeddings, so the backward pass runs through every layer) and no optimizer: the floor
  any adapter can reach;
* LoRA at rank r (PEFT's own), and DenseLoRA at rank r, on the same five projections, trained with AdamW.

Generation (greedy decoding with the KV cache) is timed for the same arms and for LoRA merged into a copy of the base
weights (what LoRA users chat with; DenseLoRA's nonlinear update cannot be merged), and each adapter's cost per
generated token is reported against the base model's. With ``--compile``, the base and DenseLoRA also generate
through ``torch.compile`` with a static KV cache (transformers' compiled decoding, what the Chat tab's "Compiled
decoding" uses); the compile itself is timed apart. On a GPU, training's model FLOPs utilisation (MFU) is reported:
the usual training count of 6 x (non-embedding parameters) + 12 x layers x hidden x sequence FLOPs per token,
over the step time and the GPU's peak dense bf16 rate (known GPUs, or ``--peak-tflops``).

Peak memory of a training step is ``static + transient``: static is the arm's resident tensors when the step starts
(the base weights, the adapter and AdamW's state); transient is the highest amount of memory the step allocates on
top (saved activations, gradients, temporaries). On CUDA the transient part comes from the caching allocator
(``torch.cuda.max_memory_allocated`` minus the allocation at the start of the step). On CPU, where torch keeps no
such statistics, every tensor storage an operator creates during the step is counted while it is alive (a
``TorchDispatchMode`` sees each operator, including those of the backward pass and the optimizer); buffers a kernel
uses internally and never returns are not seen.

    python benchmarks/speed_memory.py --device cpu     # small LLaMA-shaped model, fp32, under 5 minutes on 2 cores
    python benchmarks/speed_memory.py --device cuda    # LLaMA-3-8B-shaped model, random bf16 weights, one GPU
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import statistics
import tempfile
import time
import warnings
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from benchlib import (
    MODEL_SHAPES,
    TARGET_MODULES,
    machine_description,
    machine_line,
    main_for,
    markdown_table,
    rotated,
    sharing_copy,
    synchronize,
)
from peft import LoraConfig, get_peft_model
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from tqdm import tqdm
from transformers import CompileConfig, LlamaConfig, LlamaForCausalLM

import denselora_app.denselora  # noqa: F401  (registers DenseLoRA with PEFT)
from denselora_app.denselora import DenseLoraConfig

log = logging.getLogger("benchmarks.speed_memory")

# Defaults per device: the CPU run finishes in a few minutes on 2 cores, the CUDA run in a few on one GPU.
DEVICE_DEFAULTS: dict[str, dict[str, Any]] = {
    "cpu": dict(model="small", dtype="float32", batch=4, seq=128, steps=3, warmup=2, repeats=10,
                gen_batch=4, prompt_len=64, new_tokens=32, gen_repeats=5),
    "cuda": dict(model="llama3-8b", dtype="bfloat16", batch=4, seq=512, steps=5, warmup=3, repeats=5,
                 gen_batch=4, prompt_len=128, new_tokens=64, gen_repeats=3),
}

# The metrics compared as ratios DenseLoRA / LoRA and DenseLoRA / frozen base, in the order of the table's columns.
RATIO_METRICS = ["trainable_params", "adapter_file_bytes", "step_time_ms", "peak_memory_bytes", "generate_tokens_per_s"]


@dataclass
class Arm:
    """One way of training the same base model, with what was measured about it."""

    key: str
    label: str
    model: nn.Module
    step: Callable[[], None]
    optimizer: Optional[torch.optim.Optimizer] = None
    step_times: list[float] = field(default_factory=list)
    generate_rates: list[float] = field(default_factory=list)
    results: dict[str, Any] = field(default_factory=dict)


class LiveTensorBytes(TorchDispatchMode):
    """Counts the bytes of the tensor storages operators create while the mode is on, for as long as they live.

    An operator output that shares storage with one of its inputs (a view, an in-place result) is not new memory.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._tracked: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204 (torch's signature)
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                self._track(tensor.untyped_storage(), inputs)
        return out

    def _track(self, storage: torch.UntypedStorage, inputs: set[int]) -> None:
        key, size = storage.data_ptr(), storage.nbytes()
        if size == 0 or key in inputs or key in self._tracked:
            return
        self._tracked.add(key)
        self.live += size
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._release, key, size)

    def _release(self, key: int, size: int) -> None:
        self._tracked.discard(key)
        self.live -= size


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=sorted(DEVICE_DEFAULTS), default="cpu")
    parser.add_argument("--model", choices=sorted(MODEL_SHAPES), help="Model shape (default: small on CPU, "
                        "llama3-8b on CUDA).")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], help="Base weights (default: fp32 on CPU, bf16 "
                        "on CUDA). Adapters stay fp32, PEFT's default.")
    parser.add_argument("--rank", type=int, default=16, help="Rank r of both adapters (lora_alpha = 2r).")
    parser.add_argument("--batch", type=int, help="Training batch size.")
    parser.add_argument("--seq", type=int, help="Training sequence length.")
    parser.add_argument("--steps", type=int, help="Timed training steps per arm in each repeat.")
    parser.add_argument("--warmup", type=int, help="Untimed training steps per arm before the first repeat.")
    parser.add_argument("--repeats", type=int, help="Rounds over the arms, each in a rotated order.")
    parser.add_argument("--gen-batch", type=int, help="Prompts generated from at once.")
    parser.add_argument("--prompt-len", type=int, help="Prompt length in tokens for generation.")
    parser.add_argument("--new-tokens", type=int, help="Tokens generated per prompt (greedy, always this many).")
    parser.add_argument("--gen-repeats", type=int, help="Timed generation rounds over the arms.")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: torch's default, one per "
                        "core). On a CPU shared with other work, 1 avoids threads waiting on each other.")
    parser.add_argument("--compile", action="store_true", help="Also time compiled decoding (static cache) for the "
                        "base and DenseLoRA.")
    parser.add_argument("--peak-tflops", type=float, help="The GPU's peak dense bf16 TFLOPS, for MFU (default: "
                        "known for H100/H200/A100/L4/RTX 4090).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).parent / "results",
                        help="Where speed_memory_<device>.json and .md are written.")
    args = parser.parse_args(argv)
    for name, value in DEVICE_DEFAULTS[args.device].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


def build_base_model(args: argparse.Namespace, device: torch.device) -> LlamaForCausalLM:
    """A LLaMA-shaped model with random weights, created directly on ``device`` in the benchmark's dtype."""
    shape = MODEL_SHAPES[args.model]
    config = LlamaConfig(**shape, max_position_embeddings=max(args.seq, args.prompt_len + args.new_tokens),
                         tie_word_embeddings=False)
    torch.manual_seed(args.seed)
    with device:
        model = LlamaForCausalLM._from_config(config, dtype=getattr(torch, args.dtype))
    model.requires_grad_(False)
    return model


def build_arms(base: LlamaForCausalLM, args: argparse.Namespace, input_ids: torch.Tensor) -> list[Arm]:
    """The frozen base, LoRA r and DenseLoRA r, each with its own training step on ``input_ids``."""

    def frozen_step() -> None:
        embeds = base.get_input_embeddings()(input_ids).detach().requires_grad_()
        base(inputs_embeds=embeds, labels=input_ids).loss.backward()

    arms = [Arm("base", "frozen base", base, frozen_step)]
    for key, label, config_class in [("lora", "LoRA", LoraConfig), ("denselora", "DenseLoRA", DenseLoraConfig)]:
        config = config_class(r=args.rank, lora_alpha=2 * args.rank, target_modules=TARGET_MODULES)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PEFT warns that a model it wraps has been wrapped before: the copy
            model = get_peft_model(sharing_copy(base), config)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        arms.append(Arm(key, f"{label} r{args.rank}", model, adapter_step(model, optimizer, input_ids), optimizer))
    for arm in arms:
        arm.model.train()
    return arms


def adapter_step(model: nn.Module, optimizer: torch.optim.Optimizer, input_ids: torch.Tensor) -> Callable[[], None]:
    def step() -> None:
        model(input_ids=input_ids, labels=input_ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def time_training(arms: list[Arm], args: argparse.Namespace, device: torch.device) -> None:
    for arm in tqdm(arms, desc="warm-up", leave=False):
        for _ in range(args.warmup):
            arm.step()
    with tqdm(total=args.repeats * len(arms), desc="training steps") as progress:
        for repeat in range(args.repeats):
            for arm in rotated(arms, repeat):
                for _ in range(args.steps):
                    synchronize(device)
                    start = time.perf_counter()
                    arm.step()
                    synchronize(device)
                    arm.step_times.append(time.perf_counter() - start)
                progress.update()


def resident_bytes(arm: Arm) -> int:
    """Bytes of the tensors the arm keeps between steps: weights, buffers, optimizer state (each storage once)."""
    tensors = [*arm.model.parameters(), *arm.model.buffers()]
    if arm.optimizer is not None:
        tensors += [v for state in arm.optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


def measure_memory(arm: Arm, device: torch.device) -> None:
    """Static + transient bytes of one (untimed) training step, see the module docstring."""
    synchronize(device)
    static = resident_bytes(arm)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        arm.step()
        synchronize(device)
        transient = torch.cuda.max_memory_allocated(device) - start
    else:
        with LiveTensorBytes() as counter:
            arm.step()
        transient = counter.peak
    arm.results.update(static_memory_bytes=static, transient_memory_bytes=transient,
                       peak_memory_bytes=static + transient)


def merged_lora(lora: Arm) -> Arm:
    """LoRA merged into a copy of the base weights: generation only (it is not trained)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = copy.deepcopy(lora.model).merge_and_unload()
    return Arm("lora_merged", f"{lora.label} merged", model, step=lambda: None)


def compiled(arm: Arm) -> Arm:
    """The same model, generating through torch.compile with a static cache (generation only)."""
    config = CompileConfig()
    config._compile_all_devices = True  # transformers compiles only on accelerators unless told otherwise
    base = arm.model.get_base_model() if hasattr(arm.model, "get_base_model") else arm.model
    base.generation_config.compile_config = config
    return Arm(f"{arm.key}_compiled", f"{arm.label}, compiled", arm.model, step=lambda: None)


def time_generation(arms: list[Arm], args: argparse.Namespace, device: torch.device) -> None:
    vocab = arms[0].model.config.vocab_size
    prompts = torch.randint(0, vocab, (args.gen_batch, args.prompt_len), generator=torch.Generator().manual_seed(1))
    prompts = prompts.to(device)
    mask = torch.ones_like(prompts)

    def generate(arm: Arm, new_tokens: int) -> None:
        static = {"cache_implementation": "static"} if arm.key.endswith("_compiled") else {}
        arm.model.generate(input_ids=prompts, attention_mask=mask, max_new_tokens=new_tokens,
                           min_new_tokens=new_tokens, do_sample=False, pad_token_id=0, **static)

    for arm in arms:
        arm.model.eval()
    with torch.no_grad():
        for arm in arms:
            started = time.perf_counter()
            # Compiled arms warm up at the timed length: the static cache's size is part of the compiled graph.
            generate(arm, args.new_tokens if arm.key.endswith("_compiled") else 2)
            if arm.key.endswith("_compiled"):
                arm.results["compile_seconds"] = time.perf_counter() - started
        with tqdm(total=args.gen_repeats * len(arms), desc="generation") as progress:
            for repeat in range(args.gen_repeats):
                for arm in rotated(arms, repeat):
                    synchronize(device)
                    start = time.perf_counter()
                    generate(arm, args.new_tokens)
                    synchronize(device)
                    arm.generate_rates.append(args.gen_batch * args.new_tokens / (time.perf_counter() - start))
                    progress.update()


def adapter_file_bytes(arm: Arm) -> Optional[int]:
    if arm.key == "base":
        return None
    with tempfile.TemporaryDirectory() as tmp:
        arm.model.save_pretrained(tmp)
        return (Path(tmp) / "adapter_model.safetensors").stat().st_size


def quartiles(values: list[float]) -> tuple[float, float]:
    if len(values) < 2:
        return values[0], values[0]
    q1, _, q3 = statistics.quantiles(values, n=4)
    return q1, q3


def generation_row(arm: Arm, base: Arm, gen_batch: int) -> dict[str, Any]:
    """Tokens/s, and the milliseconds each generated token costs beyond the base model's (per sequence)."""
    rate, base_rate = statistics.median(arm.generate_rates), statistics.median(base.generate_rates)
    return dict(label=arm.label, tokens_per_s=rate, ratio_to_base=rate / base_rate,
                ms_per_token_over_base=1000 * gen_batch * (1 / rate - 1 / base_rate), rates=arm.generate_rates,
                compile_seconds=arm.results.get("compile_seconds"))


# Peak dense bf16 TFLOPS of common GPUs (vendor figures, without sparsity), for MFU.
PEAK_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0, "L40S": 362.1, "L4": 121.0, "RTX 4090": 165.2,
               "A10G": 70.0}


def peak_tflops(args: argparse.Namespace, device: torch.device) -> Optional[float]:
    if args.peak_tflops or device.type != "cuda":
        return args.peak_tflops
    name = torch.cuda.get_device_name(device)
    return next((value for key, value in PEAK_TFLOPS.items() if key in name), None)


def training_mfu(model: nn.Module, args: argparse.Namespace, step_ms: float, peak: Optional[float]) -> Optional[float]:
    """Model FLOPs per second of a training step over the device's peak (the usual 6N + attention count)."""
    if not peak:
        return None
    config = model.config
    embeddings = config.vocab_size * config.hidden_size * 2  # input and output embeddings (untied)
    parameters = sum(p.numel() for p in model.parameters()) - embeddings
    per_token = 6 * parameters + 12 * config.num_hidden_layers * config.hidden_size * args.seq
    return per_token * args.batch * args.seq / (step_ms / 1000) / (peak * 1e12)


def summarise(arm: Arm) -> None:
    q1, q3 = quartiles(arm.step_times)
    arm.results.update(
        label=arm.label,
        trainable_params=sum(p.numel() for p in arm.model.parameters() if p.requires_grad),
        adapter_file_bytes=adapter_file_bytes(arm),
        step_time_ms=1000 * statistics.median(arm.step_times),
        step_time_ms_quartiles=[1000 * q1, 1000 * q3],
        step_times_measured=len(arm.step_times),
        generate_tokens_per_s=statistics.median(arm.generate_rates),
        generate_tokens_per_s_all=arm.generate_rates,
    )


def ratios(numerator: dict[str, Any], denominator: dict[str, Any]) -> dict[str, Optional[float]]:
    out: dict[str, Optional[float]] = {}
    for metric in RATIO_METRICS:
        a, b = numerator.get(metric), denominator.get(metric)
        out[metric] = a / b if a is not None and b else None
    return out


def check_targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    to_lora, to_base = results["ratios"]["denselora/lora"], results["ratios"]["denselora/base"]
    targets = [
        ("DenseLoRA step time <= 1.00x LoRA's", to_lora["step_time_ms"], lambda v: v <= 1.0),
        ("DenseLoRA peak training memory <= LoRA's", to_lora["peak_memory_bytes"], lambda v: v <= 1.0),
        ("DenseLoRA step time <= 1.05x the frozen-base floor", to_base["step_time_ms"], lambda v: v <= 1.05),
        ("DenseLoRA generation >= 0.95x the base model's tokens/s", to_base["generate_tokens_per_s"],
         lambda v: v >= 0.95),
    ]
    return [dict(target=name, ratio=value, met=bool(test(value))) for name, value, test in targets]


def mib(n: Optional[float]) -> str:
    return "-" if n is None else f"{n / 2**20:,.1f} MiB"


def kib(n: Optional[float]) -> str:
    return "-" if n is None else f"{n / 2**10:,.1f} KiB"


def render_markdown(results: dict[str, Any]) -> str:
    arms = results["arms"]
    rows = []
    for key in ("base", "lora", "denselora"):
        arm = arms[key]
        q1, q3 = arm["step_time_ms_quartiles"]
        rows.append([
            arm["label"],
            f"{arm['trainable_params']:,}",
            kib(arm["adapter_file_bytes"]),
            f"{arm['step_time_ms']:,.1f} ({q1:,.1f}-{q3:,.1f})",
            f"{mib(arm['peak_memory_bytes'])} ({mib(arm['transient_memory_bytes'])})",
            f"{arm['generate_tokens_per_s']:,.1f}",
        ])
    for name, ratio in results["ratios"].items():
        rows.append([f"ratio {name}"] + ["-" if ratio[m] is None else f"{ratio[m]:.3f}x" for m in RATIO_METRICS])
    table = markdown_table(
        ["arm", "trainable params", "adapter file", "train step ms, median (quartiles)",
         "peak train memory (of which transient)", "generate tokens/s"],
        rows,
    )
    generation = markdown_table(
        ["generation", "tokens/s", "x base", "ms per token over the base", "compile s"],
        [[g["label"], f"{g['tokens_per_s']:,.1f}", f"{g['ratio_to_base']:.3f}x", f"{g['ms_per_token_over_base']:+.2f}",
          "-" if g.get("compile_seconds") is None else f"{g['compile_seconds']:.1f}"]
         for g in results["generation"].values()],
    )
    mfu = [f"{arm['label']} {arm['mfu']:.1%}" for arm in arms.values() if arm.get("mfu") is not None]
    target_rows = [[t["target"], f"{t['ratio']:.3f}x", "met" if t["met"] else "**missed**"] for t in results["targets"]]
    s = results["settings"]
    return "\n\n".join([
        f"Command: `{results['command']}`",
        f"Machine: {machine_line(results['machine'])}",
        f"Model: {s['model']} ({s['dtype']}), batch {s['batch']} x {s['seq']} tokens, rank {s['rank']}, "
        f"{s['repeats']} interleaved repeats x {s['steps']} timed steps per arm after {s['warmup']} warm-up; "
        f"generation: {s['gen_batch']} prompts x {s['prompt_len']} tokens + {s['new_tokens']} new tokens (greedy), "
        f"{s['gen_repeats']} interleaved repeats.",
        table,
        *([f"Training MFU: {', '.join(mfu)}."] if mfu else []),
        generation,
        markdown_table(["target", "measured", "status"], target_rows),
    ])


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    machine = machine_description(device)
    log.info("Building the %s model (%s) on %s", args.model, args.dtype, device)
    base = build_base_model(args, device)
    input_ids = torch.randint(0, base.config.vocab_size, (args.batch, args.seq),
                              generator=torch.Generator().manual_seed(args.seed)).to(device)
    arms = build_arms(base, args, input_ids)
    time_training(arms, args, device)
    for arm in arms:
        measure_memory(arm, device)
    generating = [*arms, merged_lora(next(arm for arm in arms if arm.key == "lora"))]
    if args.compile:
        generating += [compiled(arm) for arm in arms if arm.key in ("base", "denselora")]
    time_generation(generating, args, device)
    peak = peak_tflops(args, device)
    for arm in arms:
        summarise(arm)
        arm.results["mfu"] = training_mfu(base, args, arm.results["step_time_ms"], peak)
    if hasattr(os, "getloadavg"):
        machine["load_average_1m_at_end"] = round(os.getloadavg()[0], 2)
    results: dict[str, Any] = {
        "machine": machine,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "target_modules": TARGET_MODULES,
        "arms": {arm.key: arm.results for arm in arms},
    }
    results["generation"] = {arm.key: generation_row(arm, arms[0], args.gen_batch) for arm in generating}
    by_key = results["arms"]
    results["ratios"] = {
        "denselora/lora": ratios(by_key["denselora"], by_key["lora"]),
        "denselora/base": ratios(by_key["denselora"], by_key["base"]),
    }
    results["targets"] = check_targets(results)
    return results


def main(argv: Optional[list[str]] = None) -> None:
    main_for(__file__, "speed_memory", parse_args, run, render_markdown, argv)


if __name__ == "__main__":
    main()
