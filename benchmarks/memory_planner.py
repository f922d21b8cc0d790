"""The memory planner against measurement: peak resident memory of real training steps on the CPU.

Each shape trains in a fresh Python process, through the code path of a run (``models.load_model`` with the run's
quantization, gradient checkpointing as ``train.py`` sets it up, DenseLoRA through PEFT, the Hugging Face Trainer
with AdamW, a padded batch), for a few optimizer steps. The process reads its resident memory (VmRSS) after the
imports and the data are ready and before the model is created, loads the model, resets the peak (writing 5 to
``/proc/self/clear_refs`` resets VmHWM) so that loading's own transient peak is left out, trains, and reads the peak
(VmHWM). The measured training memory is that peak minus the RSS read before the model was created; the planner's
estimate compared with it is ``MemoryPlan.resident_training``: its total without the per-process allowance (the
imports the measurement subtracts), plus the pages of a quantized model's file that stay resident.

    python benchmarks/memory_planner.py --parallel 2    # every shape, ~5 minutes on 2 cores
    python benchmarks/memory_planner.py --quick --threads 1    # the four shapes tests/test_memory.py checks
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

log = logging.getLogger("benchmarks.memory_planner")
MB = 1024**2


@dataclass
class Shape:
    """A LLaMA-shaped model and the run settings that matter for memory."""

    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    batch: int
    cutoff: int
    checkpointing: bool = False
    quantization: str = "none"
    r: int = 16
    dropout: float = 0.05
    steps: int = 4
    model: str = ""  # a model spec to train instead of a random model of this shape (its dimensions must match)

    def model_config(self) -> Any:
        from transformers import LlamaConfig

        if self.model:
            from denselora_app.engine.models import load_config

            return load_config(self.model)
        return LlamaConfig(vocab_size=self.vocab, hidden_size=self.hidden, intermediate_size=self.intermediate,
                           num_hidden_layers=self.layers, num_attention_heads=self.heads,
                           num_key_value_heads=self.kv_heads, max_position_embeddings=max(self.cutoff, 64),
                           tie_word_embeddings=False)

    def run_config(self, model: str = "model") -> Any:
        from denselora_app.config import RunConfig

        return RunConfig(model=model, method="denselora", r=self.r, dropout=self.dropout, batch_size=self.batch,
                         grad_accum=1, cutoff_len=self.cutoff, gradient_checkpointing=self.checkpointing,
                         quantization=self.quantization, device="cpu", dtype="float32", max_steps=self.steps,
                         warmup_steps=0)

    def label(self) -> str:
        extras = [x for x in (self.quantization if self.quantization != "none" else "",
                              "checkpointing" if self.checkpointing else "") if x]
        model = ("SmolLM2-135M (embedded)" if self.model
                 else f"h{self.hidden} x{self.layers}L, vocab {self.vocab // 1000}k")
        return f"{model}, {self.batch}x{self.cutoff}" + (f", {', '.join(extras)}" if extras else "")


# Small enough for the test (each trains in a few seconds), large enough that training memory is 100+ MB.
QUICK_SHAPES = [
    Shape("small", 256, 688, 4, 8, 2, 8192, 4, 128, steps=3),
    Shape("small-ckpt", 256, 688, 4, 8, 2, 8192, 4, 128, checkpointing=True, steps=3),
    Shape("wide-short", 512, 1376, 2, 8, 4, 4096, 8, 64, steps=3),
    Shape("small-4bit", 256, 688, 4, 8, 2, 4096, 2, 128, quantization="4bit", steps=3),
]
SHAPES = QUICK_SHAPES + [
    Shape("medium", 512, 1376, 4, 8, 2, 16384, 4, 256),
    Shape("medium-ckpt", 512, 1376, 4, 8, 2, 16384, 4, 256, checkpointing=True),
    Shape("large", 768, 2048, 6, 12, 4, 16384, 8, 256, steps=2),
    Shape("large-ckpt", 768, 2048, 6, 12, 4, 16384, 8, 256, checkpointing=True, steps=2),
    Shape("deep-4bit-ckpt", 384, 1024, 6, 6, 2, 8192, 4, 128, quantization="4bit", checkpointing=True, steps=3),
    Shape("small-4bit-ckpt", 256, 688, 4, 8, 2, 4096, 4, 128, quantization="4bit", checkpointing=True, steps=3),
    Shape("small-8bit", 256, 688, 4, 8, 2, 4096, 2, 128, quantization="8bit", steps=2),
    # The embedded default model (LLaMA-shaped, 30 layers, tied embeddings), as the quickstart trains it and more.
    Shape("smollm2", 576, 1536, 30, 9, 3, 49152, 8, 128, steps=3, model="embedded:SmolLM2-135M-Instruct"),
    Shape("smollm2-ckpt", 576, 1536, 30, 9, 3, 49152, 8, 128, checkpointing=True, steps=3,
          model="embedded:SmolLM2-135M-Instruct"),
    Shape("smollm2-4bit-ckpt", 576, 1536, 30, 9, 3, 49152, 4, 128, quantization="4bit", checkpointing=True, steps=3,
          model="embedded:SmolLM2-135M-Instruct"),
]


# ---------------------------------------------------------------------------------------------------------------
# In the fresh process


def _status() -> dict[str, int]:
    text = Path("/proc/self/status").read_text()
    return {key: int(value) * 1024 for key, value in re.findall(r"^(VmRSS|VmHWM):\s+(\d+) kB", text, re.M)}


def child(spec: dict[str, Any]) -> dict[str, Any]:
    """Train one shape in this (fresh) process and return what was measured."""
    import gc

    import torch
    from peft import get_peft_model
    from transformers import Trainer, TrainingArguments

    from denselora_app.engine import models
    from denselora_app.engine.methods import build_peft_config

    shape = Shape(**spec["shape"])
    cfg = shape.run_config(spec["model_dir"])
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    generator = torch.Generator().manual_seed(0)
    rows = []
    for i in range(shape.batch * shape.steps):
        length = shape.cutoff - (7 if i % shape.batch == shape.batch - 1 else 0)  # one padded row a batch
        ids = torch.randint(0, shape.vocab, (shape.cutoff,), generator=generator).tolist()
        mask = [1] * length + [0] * (shape.cutoff - length)
        rows.append({"input_ids": ids, "attention_mask": mask,
                     "labels": ids[:length] + [-100] * (shape.cutoff - length)})

    def collate(batch: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        return {key: torch.tensor([row[key] for row in batch]) for key in batch[0]}

    gc.collect()
    before = _status()["VmRSS"]
    model = models.load_model(cfg.model, device="cpu", dtype=cfg.dtype, quantization=cfg.quantization)
    if cfg.checkpointing:  # as train.py does
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    peft_model = get_peft_model(model, build_peft_config(cfg))
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(output_dir=out, per_device_train_batch_size=cfg.batch_size,
                                 gradient_accumulation_steps=1, learning_rate=1e-4, max_steps=cfg.max_steps,
                                 warmup_steps=0, save_strategy="no", logging_steps=1000, use_cpu=True,
                                 remove_unused_columns=False, dataloader_num_workers=0, disable_tqdm=True,
                                 report_to="none", seed=0)
        trainer = Trainer(model=peft_model, args=args, train_dataset=rows, data_collator=collate)
        loaded = _status()["VmRSS"]
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        started = time.perf_counter()
        trainer.train()
        elapsed = time.perf_counter() - started
        peak = _status()["VmHWM"]
    return {"rss_before_model": before, "rss_after_load": loaded, "peak": peak, "measured": peak - before,
            "seconds_per_step": elapsed / cfg.max_steps}


# ---------------------------------------------------------------------------------------------------------------
# In the parent


def save_model(shape: Shape, folder: Path) -> Path:
    """A randomly initialised model of ``shape`` saved in float32 (loading it is what a run does)."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(shape.model_config()).save_pretrained(folder)
    return folder


def estimate(shape: Shape) -> Any:
    """The planner's plan for ``shape`` on the CPU (free memory not read)."""
    from denselora_app.engine.memory import plan_memory
    from denselora_app.engine.methods import count_parameters

    model_config = shape.model_config()
    cfg = shape.run_config()
    return plan_memory(model_config, cfg, count_parameters(model_config, cfg), "cpu", free=None)


def measure(shape: Shape, workdir: Path, threads: int = 0, timeout: float = 600) -> dict[str, Any]:
    """Train ``shape`` in a fresh process (with ``threads`` torch threads; 0: torch's default); what it measured,
    with the planner's estimate next to it."""
    if shape.model:
        from denselora_app.engine.models import ensure_local

        model_dir = Path(ensure_local(shape.model))  # the embedded GGUF is converted once (~20 s), then cached
    else:
        model_dir = save_model(shape, workdir / shape.name)
    spec = json.dumps({"shape": asdict(shape), "model_dir": str(model_dir), "threads": threads})
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "TRANSFORMERS_VERBOSITY": "error"}
    done = subprocess.run([sys.executable, __file__, "--child", spec], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, env=env)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"{shape.name}: the measuring process failed ({done.returncode}):\n{done.stderr[-3000:]}")
    result = json.loads(lines[-1])
    plan = estimate(shape)
    result.update(shape=shape.name, label=shape.label(), estimate=plan.resident_training,
                  error_percent=round(100 * (plan.resident_training - result["measured"]) / result["measured"], 1),
                  plan={"weights": plan.weights, "adapter": plan.adapter, "activations": plan.activations,
                        "allowance": plan.overhead - plan.process, "reclaimable": plan.reclaimable,
                        "activation_parts": plan.parts})
    return result


def measure_all(shapes: Sequence[Shape], parallel: int = 1, threads: int = 0) -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(max_workers=parallel) as pool:
        return list(pool.map(lambda s: measure(s, Path(tmp), threads), shapes))


def table(results: Sequence[dict[str, Any]]) -> str:
    from benchlib import markdown_table

    rows = [[r["label"], f"{r['estimate'] / MB:,.0f} MiB", f"{r['measured'] / MB:,.0f} MiB",
             f"{r['error_percent']:+.1f}%"] for r in results]
    return markdown_table(["shape (DenseLoRA r16, float32, Trainer + AdamW)", "estimate", "measured: peak RSS - RSS "
                           "before the model", "error"], rows)


def main(argv: Optional[list[str]] = None) -> list[dict[str, Any]]:
    from benchlib import command_line, machine_description, machine_line, setup_logging, write_results

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="Only the four small shapes the tests check.")
    parser.add_argument("--only", nargs="*", help="Shape names to run.")
    parser.add_argument("--parallel", type=int, default=1, help="Shapes measured at once (each in its own process).")
    parser.add_argument("--threads", type=int, default=0, help="torch threads in each measuring process (0: torch's "
                        "default, one per core); 1 is much faster on a CPU shared with other work.")
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))), flush=True)
        return []
    setup_logging()
    import torch

    shapes = QUICK_SHAPES if args.quick else SHAPES
    if args.only:
        shapes = [s for s in SHAPES if s.name in args.only]
    machine = machine_description(torch.device("cpu"))
    started = time.time()
    results = measure_all(shapes, parallel=args.parallel, threads=args.threads)
    markdown = "\n\n".join([
        "## Memory planner against measurement, CPU",
        f"Command: `{command_line(__file__, argv)}`",
        f"Machine: {machine_line(machine)}; wall time {time.time() - started:.0f} s.",
        table(results),
    ])
    print(markdown)
    write_results({"command": command_line(__file__, argv), "machine": machine, "results": results}, markdown,
                  args.out_dir / "memory_planner_cpu.json", args.out_dir / "memory_planner_cpu.md")
    return results


if __name__ == "__main__":
    main()
