"""Training throughput in real tokens/s with padded, length-grouped and packed (padding-free) batches.

The data is an instruction-like dataset this script makes up (offline, seeded) with the length spread of real
instruction data: row lengths are log-normal (median 180 tokens), clipped to 20..1000, so most rows are short and a
few are long. A prompt of 20-60% of each row is masked out of the loss, as the studio does by default; tokens follow
a Zipf law, so the loss falls in the first steps like a language model's. The batches are the studio's own:

* padded: rows in random order, each batch padded to its longest row (``DataCollatorForSeq2Seq``, as
  ``denselora_app.engine.train.collator_for`` builds it with packing off);
* length-grouped: the same padding, with rows ordered by transformers' ``get_length_grouped_indices`` (what
  ``collator_for`` falls back to when a model cannot pack);
* packed: the rows of each batch joined into one sequence whose positions restart at every row
  (``DataCollatorWithFlattening``, what ``collator_for`` returns with packing on).

Each batching runs with three ways of training one LLaMA-shaped model (random weights, built from a config, shared by
every arm): DenseLoRA r and LoRA r on the paper's five projections, trained with AdamW, and the frozen base, which
does the same forward and backward pass with no adapter (the gradient is taken with respect to the input
embeddings, so the backward pass runs through every layer) and no optimizer step. Throughput counts real tokens
only (the rows' own tokens, never padding), per second of training step; the arms are interleaved step by step, in
a rotating order, so load from other work on the machine falls on every arm alike. Every arm trains on batches
taken at evenly spaced places of its own epoch order, so each sees the dataset's whole length spread.

Padded and packed arms of one kind start from the same adapter and see the same batches in the same order, so their
loss curves must agree up to float rounding: that is the second check.

    python benchmarks/packing.py                   # CPU: small model, fp32, one thread, about 3 minutes
    python benchmarks/packing.py --device cuda     # GPU: a ~1B-parameter LLaMA shape in bf16, larger batches
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
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
from tokenizers import Tokenizer, models
from torch import nn
from tqdm import tqdm
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from transformers.trainer_pt_utils import get_length_grouped_indices

import denselora_app.denselora  # noqa: F401  (registers DenseLoRA with PEFT)
from denselora_app.config import RunConfig
from denselora_app.denselora import DenseLoraConfig
from denselora_app.engine.data import padding_per_step
from denselora_app.engine.train import collator_for

log = logging.getLogger("benchmarks.packing")

DEVICE_DEFAULTS: dict[str, dict[str, Any]] = {
    "cpu": dict(model="cpu-small", dtype="float32", rows=2000, batch=4, steps=16, warmup=2, threads=1),
    "cuda": dict(model="llama-1b", dtype="bfloat16", rows=4000, batch=16, steps=10, warmup=2, threads=0),
}

KINDS = [("denselora", "DenseLoRA"), ("lora", "LoRA"), ("base", "frozen base")]
MODES = [("padded", "padded"), ("grouped", "length-grouped"), ("packed", "packed")]
TARGET_SPEEDUP = 1.5
CLOCKS = {"cpu": "the process's CPU time (one thread, so other work on the machine does not count)",
          "wall": "wall-clock time"}
# Padded and packed steps do the same arithmetic in another order: in fp32 their losses agree to ~1e-6, in bf16 to
# about its precision. A larger gap would mean the rows see each other or the labels shift at the row boundaries.
LOSS_TOLERANCE = {"float32": 1e-3, "bfloat16": 2e-2, "float16": 1e-2}


@dataclass
class Arm:
    """One kind of training (DenseLoRA, LoRA, frozen base) with one batching, and what was measured."""

    kind: str
    mode: str
    label: str
    step: Callable[[dict[str, torch.Tensor]], float]  # one training step on a collated batch; returns the loss
    batches: list[list[int]]  # the rows of each step, warm-up first
    times: list[float] = field(default_factory=list)  # seconds per timed step, on the clock of the run (see clock)
    wall_times: list[float] = field(default_factory=list)
    real_tokens: list[int] = field(default_factory=list)
    processed_tokens: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=sorted(DEVICE_DEFAULTS), default="cpu")
    parser.add_argument("--model", choices=sorted(MODEL_SHAPES), help="Model shape (default: cpu-small on CPU, "
                        "llama-1b on CUDA).")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], help="Base weights (default: fp32 on CPU, bf16 "
                        "on CUDA).")
    parser.add_argument("--rank", type=int, default=16, help="Rank r of both adapters (lora_alpha = 2r).")
    parser.add_argument("--rows", type=int, help="Rows in the made-up dataset.")
    parser.add_argument("--min-len", type=int, default=20, help="Shortest row in tokens.")
    parser.add_argument("--max-len", type=int, default=1000, help="Longest row in tokens (the cutoff).")
    parser.add_argument("--median-len", type=float, default=180.0, help="Median row length in tokens.")
    parser.add_argument("--sigma", type=float, default=0.8, help="Spread of the log-normal row lengths.")
    parser.add_argument("--batch", type=int, help="Rows per training step (per forward pass; no accumulation).")
    parser.add_argument("--steps", type=int, help="Timed training steps per arm.")
    parser.add_argument("--warmup", type=int, help="Untimed training steps per arm first.")
    parser.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate of the adapters.")
    parser.add_argument("--threads", type=int, help="CPU threads for torch (0: torch's default; default 1 on CPU, "
                        "which makes the step time the process's CPU time, see clock()).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).parent / "results",
                        help="Where packing_<device>.json and .md are written.")
    args = parser.parse_args(argv)
    for name, value in DEVICE_DEFAULTS[args.device].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


# ---- the data -------------------------------------------------------------------------------------------------------


def make_dataset(args: argparse.Namespace, vocab: int) -> list[dict[str, list[int]]]:
    """Rows like tokenized instruction data: long-tailed lengths, a masked prompt, Zipf-distributed tokens."""
    rng = np.random.default_rng(args.seed)
    lengths = np.clip(np.round(rng.lognormal(np.log(args.median_len), args.sigma, args.rows)),
                      args.min_len, args.max_len).astype(int)
    ranks = np.arange(1, vocab - 2)
    probabilities = 1.0 / ranks
    probabilities /= probabilities.sum()
    rows = []
    for length in lengths:
        ids = (rng.choice(len(ranks), size=length, p=probabilities) + 3).tolist()  # 0-2: pad and specials
        prompt = int(length * rng.uniform(0.2, 0.6))
        rows.append({"input_ids": ids, "attention_mask": [1] * length,
                     "labels": [-100] * prompt + ids[prompt:]})
    return rows


def pad_tokenizer() -> PreTrainedTokenizerFast:
    """A tokenizer that only pads (id 0), for the studio's padded collator; the rows are made up as token ids."""
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<pad>": 0, "<unk>": 1}, "<unk>")),
                                   pad_token="<pad>", unk_token="<unk>")


def epoch_batches(lengths: list[int], mode: str, batch: int, seed: int) -> list[list[int]]:
    """The batches of one epoch in the order the Trainer's sampler gives them for ``mode``."""
    generator = torch.Generator().manual_seed(seed)
    if mode == "grouped":
        order = get_length_grouped_indices(lengths, batch, generator=generator)
    else:
        order = torch.randperm(len(lengths), generator=generator).tolist()
    return [order[i:i + batch] for i in range(0, len(order) - batch + 1, batch)]


def spread(batches: list[list[int]], count: int) -> list[list[int]]:
    """``count`` batches at evenly spaced places of the epoch, in epoch order."""
    picks = np.unique(np.round(np.linspace(0, len(batches) - 1, count)).astype(int))
    return [batches[i] for i in picks]


# ---- the arms -------------------------------------------------------------------------------------------------------


def build_base_model(args: argparse.Namespace, device: torch.device) -> LlamaForCausalLM:
    config = LlamaConfig(**MODEL_SHAPES[args.model], max_position_embeddings=max(args.max_len, 64),
                         tie_word_embeddings=False, use_cache=False)
    torch.manual_seed(args.seed)
    with device:
        model = LlamaForCausalLM._from_config(config, dtype=getattr(torch, args.dtype))
    model.requires_grad_(False)
    return model


def frozen_step(base: LlamaForCausalLM) -> Callable[[dict[str, torch.Tensor]], float]:
    def step(batch: dict[str, torch.Tensor]) -> float:
        inputs = {k: v for k, v in batch.items() if k != "input_ids"}
        embeds = base.get_input_embeddings()(batch["input_ids"]).detach().requires_grad_()
        loss = base(inputs_embeds=embeds, **inputs).loss
        loss.backward()
        return loss.item()

    return step


def adapter_step(model: nn.Module, optimizer: torch.optim.Optimizer) -> Callable[[dict[str, torch.Tensor]], float]:
    def step(batch: dict[str, torch.Tensor]) -> float:
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return step


def build_arms(base: LlamaForCausalLM, args: argparse.Namespace, lengths: list[int]) -> list[Arm]:
    picked = {mode: spread(epoch_batches(lengths, mode, args.batch, args.seed), args.warmup + args.steps)
              for mode, _ in MODES}
    picked["packed"] = picked["padded"]  # the same batches in the same order: the loss curves are comparable
    arms = []
    for kind, kind_label in KINDS:
        for mode, mode_label in MODES:
            label = f"{kind_label} r{args.rank}" if kind != "base" else kind_label
            if kind == "base":
                step = frozen_step(base)
            else:
                config_class = DenseLoraConfig if kind == "denselora" else LoraConfig
                config = config_class(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0,
                                      target_modules=TARGET_MODULES)
                torch.manual_seed(args.seed)  # the same adapter initialisation for every batching
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # PEFT warns that a model it wraps has been wrapped before
                    model = get_peft_model(sharing_copy(base), config)
                model.train()
                optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
                step = adapter_step(model, optimizer)
            arms.append(Arm(kind, mode, f"{label}, {mode_label}", step, picked[mode]))
    base.train()
    return arms


def collators(base: LlamaForCausalLM) -> dict[str, Callable]:
    """The studio's collators, from the function training uses (which also checks that this model can pack)."""
    tokenizer = pad_tokenizer()
    padded, _ = collator_for(RunConfig(packing=False), tokenizer, base)
    packed, sampling = collator_for(RunConfig(packing=True), tokenizer, base)
    if sampling != "random":
        raise RuntimeError("collator_for refused to pack this model; see the log line above")
    return {"padded": padded, "grouped": padded, "packed": packed}


def clock(device: torch.device) -> str:
    """What a step's time is measured on. With one CPU thread: the process's CPU time, which other work on a shared
    machine does not inflate (the process is simply not running while it waits), and which equals the wall time on
    an idle machine. Otherwise the wall time (CUDA synchronised before and after)."""
    return "cpu" if device.type == "cpu" and torch.get_num_threads() == 1 else "wall"


def train_arms(arms: list[Arm], rows: list[dict], collate: dict[str, Callable], args: argparse.Namespace,
               device: torch.device) -> None:
    total = args.warmup + args.steps
    with tqdm(total=total * len(arms), desc="training steps") as progress:
        for index in range(total):
            for arm in rotated(arms, index):
                features = [rows[i] for i in arm.batches[index]]
                batch = {k: v.to(device) for k, v in collate[arm.mode](features).items()}
                synchronize(device)
                start, start_cpu = time.perf_counter(), time.process_time()
                loss = arm.step(batch)
                synchronize(device)
                elapsed, elapsed_cpu = time.perf_counter() - start, time.process_time() - start_cpu
                arm.losses.append(loss)
                if index >= args.warmup:
                    arm.times.append(elapsed_cpu if clock(device) == "cpu" else elapsed)
                    arm.wall_times.append(elapsed)
                    arm.real_tokens.append(sum(len(f["input_ids"]) for f in features))
                    arm.processed_tokens.append(batch["input_ids"].numel())
                progress.update()


# ---- results --------------------------------------------------------------------------------------------------------


def summarise(arm: Arm) -> dict[str, Any]:
    seconds = sum(arm.times)
    return {
        "label": arm.label,
        "real_tokens_per_s": sum(arm.real_tokens) / seconds,
        "processed_tokens_per_s": sum(arm.processed_tokens) / seconds,
        "padding_share": 1 - sum(arm.real_tokens) / sum(arm.processed_tokens),
        "step_time_ms_median": 1000 * statistics.median(arm.times),
        "real_tokens_per_step_mean": statistics.mean(arm.real_tokens),
        "steps_timed": len(arm.times),
        "wall_real_tokens_per_s": sum(arm.real_tokens) / sum(arm.wall_times),
        "losses": arm.losses,
    }


def training_flops(config: LlamaConfig, lengths: list[int], packed: bool) -> float:
    """Multiply-adds x 2 of a forward and backward pass (3x the forward) over one batch of rows of ``lengths``.

    Linear layers cost the same per token either way; attention scores cost the sequence length per token, and
    sdpa and eager attention compute every score of a packed sequence (the other rows' scores are masked, not
    skipped), so a packed token pays for the whole joined batch where a padded one pays for its padded row.
    """
    d, inter = config.hidden_size, config.intermediate_size
    kv = config.num_key_value_heads * (d // config.num_attention_heads)
    per_token = config.num_hidden_layers * 2 * (2 * d * d + 2 * d * kv + 3 * d * inter) + 2 * d * config.vocab_size
    if packed:
        tokens, width = sum(lengths), sum(lengths)
    else:
        tokens, width = len(lengths) * max(lengths), max(lengths)
    return 3 * tokens * (per_token + config.num_hidden_layers * 4 * width * d)


def loss_check(results: dict[str, Any], kind: str, dtype: str) -> dict[str, Any]:
    padded, packed = results["arms"][f"{kind}/padded"]["losses"], results["arms"][f"{kind}/packed"]["losses"]
    differences = [abs(a - b) / abs(a) for a, b in zip(padded, packed)]
    return {"max_relative_difference": max(differences), "tolerance": LOSS_TOLERANCE[dtype],
            "loss_spread_between_steps": statistics.pstdev(padded)}


def check_targets(results: dict[str, Any], dtype: str) -> list[dict[str, Any]]:
    targets = []
    for kind, kind_label in KINDS:
        ratio = results["ratios"][kind]["packed/padded"]
        targets.append(dict(target=f"{kind_label}: packed real tokens/s >= {TARGET_SPEEDUP}x padded",
                            measured=f"{ratio:.2f}x", met=bool(ratio >= TARGET_SPEEDUP)))
    for kind, kind_label in KINDS:
        check = results["loss_curves"][kind]
        targets.append(dict(
            target=f"{kind_label}: packed loss curve = padded (relative difference <= {check['tolerance']:g})",
            measured=f"{check['max_relative_difference']:.1e}",
            met=bool(check["max_relative_difference"] <= check["tolerance"])))
    return targets


def render_markdown(results: dict[str, Any]) -> str:
    s, data = results["settings"], results["data"]
    rows = []
    for kind, _ in KINDS:
        for mode, _ in MODES:
            arm = results["arms"][f"{kind}/{mode}"]
            ratio = results["ratios"][kind][f"{mode}/padded"]
            paired = results["ratios"][kind]["packed/padded, median of paired steps"] if mode == "packed" else None
            rows.append([arm["label"], f"{arm['real_tokens_per_s']:,.0f}",
                         f"{ratio:.2f}x" + (f" ({paired:.2f}x)" if paired else ""),
                         f"{arm['processed_tokens_per_s']:,.0f}", f"{100 * arm['padding_share']:.0f}%",
                         f"{arm['step_time_ms_median']:,.0f}"])
    table = markdown_table(["arm", "real tokens/s", "vs padded (median of paired steps)",
                            "processed tokens/s (with padding)",
                            "padding share", "step ms, median"], rows)
    curve_header, columns = ["step"], []
    for kind, kind_label in KINDS:
        for mode in ("padded", "packed"):
            curve_header.append(f"{kind_label}, {mode}")
            columns.append(results["arms"][f"{kind}/{mode}"]["losses"])
    curves = markdown_table(curve_header, [[str(step + 1), *(f"{column[step]:.4f}" for column in columns)]
                                           for step in range(len(columns[0]))])
    target_rows = [[t["target"], t["measured"], "met" if t["met"] else "**missed**"] for t in results["targets"]]
    return "\n\n".join([
        f"Command: `{results['command']}`",
        f"Machine: {machine_line(results['machine'])}",
        f"Model: {s['model']} ({s['dtype']}, {results['base_parameters']:,} parameters), rank {s['rank']}, "
        f"batch {s['batch']} rows per step, {s['steps']} timed steps per arm after {s['warmup']} warm-up, "
        f"interleaved; step time: {CLOCKS[results['clock']]}. Data: {s['rows']} made-up rows, "
        f"{data['min']}-{data['max']} tokens (median "
        f"{data['median']:.0f}, mean {data['mean']:.0f}, p95 {data['p95']:.0f}); the data report's estimate for "
        f"this batch size: {data['padding_per_step']['real_tokens_per_step']:,.0f} real tokens per step, "
        f"{data['padding_per_step']['padded_tokens_per_step']:,.0f} with padding "
        f"({100 * data['padding_per_step']['padding_fraction']:.0f}% padding).",
        table,
        f"Arithmetic: over the timed batches, a padded step does {results['flops_padded_over_packed']:.2f}x the "
        "work of a packed one (linear layers per token; attention per token over the padded row, or over the whole "
        "joined batch when packed, since sdpa and eager attention compute the masked scores too): the speed-up "
        "packing can reach here if every operation ran as fast per unit of work in both layouts.",
        "Loss per step, padded against packed (same adapter initialisation, same batches, same order; the first "
        f"{s['warmup']} untimed):",
        curves,
        markdown_table(["target", "measured", "status"], target_rows),
    ])


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    machine = machine_description(device)
    log.info("Building the %s model (%s) on %s", args.model, args.dtype, device)
    base = build_base_model(args, device)
    rows = make_dataset(args, base.config.vocab_size)
    lengths = [len(r["input_ids"]) for r in rows]
    collate = collators(base)
    arms = build_arms(base, args, lengths)
    train_arms(arms, rows, collate, args, device)
    if hasattr(os, "getloadavg"):
        machine["load_average_1m_at_end"] = round(os.getloadavg()[0], 2)
    values = np.asarray(lengths)
    results: dict[str, Any] = {
        "machine": machine,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "clock": clock(device),
        "base_parameters": sum(p.numel() for p in base.parameters()),
        "data": {"min": int(values.min()), "max": int(values.max()), "mean": float(values.mean()),
                 "median": float(np.median(values)), "p95": float(np.percentile(values, 95)),
                 "padding_per_step": padding_per_step(lengths, args.batch)},
        "arms": {f"{arm.kind}/{arm.mode}": summarise(arm) for arm in arms},
    }
    results["ratios"] = {
        kind: {f"{mode}/padded": results["arms"][f"{kind}/{mode}"]["real_tokens_per_s"]
               / results["arms"][f"{kind}/padded"]["real_tokens_per_s"] for mode, _ in MODES}
        for kind, _ in KINDS
    }
    # Padded and packed arms train on the same batches, so each step pairs up: the median of the per-step speed-ups
    # is robust to a load spike from other work that hits a few steps.
    by_key = {f"{arm.kind}/{arm.mode}": arm for arm in arms}
    for kind, _ in KINDS:
        padded, packed = by_key[f"{kind}/padded"].times, by_key[f"{kind}/packed"].times
        results["ratios"][kind]["packed/padded, median of paired steps"] = statistics.median(
            a / b for a, b in zip(padded, packed))
    timed = by_key["base/padded"].batches[args.warmup:]  # the packed arms train on these same batches
    results["flops_padded_over_packed"] = (
        sum(training_flops(base.config, [lengths[i] for i in batch], packed=False) for batch in timed)
        / sum(training_flops(base.config, [lengths[i] for i in batch], packed=True) for batch in timed))
    results["loss_curves"] = {kind: loss_check(results, kind, args.dtype) for kind, _ in KINDS}
    results["targets"] = check_targets(results, args.dtype)
    return results


def main(argv: Optional[list[str]] = None) -> None:
    main_for(__file__, "packing", parse_args, run, render_markdown, argv)


if __name__ == "__main__":
    main()
