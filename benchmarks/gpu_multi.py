"""Training over several processes: DDP against FSDP (and FSDP with a 4-bit base, on CUDA), through the studio's own
launch path, with the memory planner's per-process estimate beside each measurement.

1. Builds a LLaMA-shaped model from its configuration with random weights (nothing is downloaded; ``gpu_8b.py``'s
   model, tokenizer and data builders), saved to ``--work-dir`` and reused by later runs.
2. Runs each arm as a user would: ``torchrun --nproc_per_node N -m denselora_app train CONFIG`` with the arm's
   settings (``fsdp: false`` is DDP), a few optimizer steps of DenseLoRA r16 on the paper's five projections.
3. Records per arm: the peak resident memory of each training process (CPU: the highest VmHWM of each worker,
   polled while it runs) or the peak GPU memory rank 0 logged (``peak_memory_gb`` in metrics.jsonl), tokens/s per
   process, the losses, and the planner's per-process total for the same run; then, from the planner alone, the
   largest LLaMA shape each arm fits on 2, 4 and 8 GPUs of ``--gpu-memory`` GB.

    python benchmarks/gpu_multi.py --device cpu --shape llama-1b --processes 2     # 2 CPU processes, ~10 GB RAM
    python benchmarks/gpu_multi.py --device cuda --shape llama3-8b --processes 8   # a multi-GPU machine
    python benchmarks/gpu_multi.py --device cuda --shape tiny --processes 1        # one GPU: the smoke test

Results go to ``benchmarks/results/gpu_multi_<device>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from benchlib import MODEL_SHAPES, machine_description, machine_line, main_for, markdown_table  # noqa: E402
from gpu_8b import SHAPES, build_tokenizer, make_data, make_model, model_ready  # noqa: E402

log = logging.getLogger("benchmarks.gpu_multi")
GB = 1024**3
ALL_SHAPES = {**SHAPES, "llama-1b": {**MODEL_SHAPES["llama-1b"], "tie_word_embeddings": False}}
# The shapes the planner is asked about for "the largest that fits", smallest first.
PLANNED_SHAPES = ("llama-1b", "llama3-8b")
GPU_COUNTS = (2, 4, 8)


def arms(device: str) -> list[tuple[str, dict[str, Any]]]:
    found = [("ddp", {"fsdp": False}), ("fsdp", {"fsdp": True})]
    if device == "cuda":
        found.append(("fsdp-4bit", {"fsdp": True, "quantization": "4bit"}))
    return found


def config_for(args: argparse.Namespace, model_dir: Path, data: Path, label: str, settings: dict[str, Any]):
    from denselora_app.config import PAPER_TARGETS, RunConfig

    return RunConfig(model=str(model_dir), data=str(data), data_format="text", r=16, alpha=32,
                     target_modules=list(PAPER_TARGETS), batch_size=args.batch, grad_accum=1, cutoff_len=args.cutoff,
                     max_steps=args.steps, warmup_steps=0, learning_rate=1e-4, logging_steps=1, save_steps=10_000,
                     gradient_checkpointing=True, device=args.device,
                     dtype="bfloat16" if args.device == "cuda" else "float32", run_name=f"multi-{label}", **settings)


def plan_for(model_config: Any, cfg: Any, processes: int, device: str, free: Optional[int]) -> Any:
    from denselora_app.engine.memory import plan_memory
    from denselora_app.engine.methods import check_adapter

    return plan_memory(model_config, cfg, check_adapter(model_config, cfg), device, free, processes=processes)


def run_arm(args: argparse.Namespace, label: str, settings: dict[str, Any], model_dir: Path, data: Path
            ) -> dict[str, Any]:
    from transformers import AutoConfig

    from denselora_app.runs import list_runs

    cfg = config_for(args, model_dir, data, label, settings)
    config_file = args.work_dir / f"{label}.yaml"
    cfg.to_yaml(config_file)
    runs = args.work_dir / "runs"
    before = {run.id for run in list_runs(runs)}
    device = "cuda:0" if args.device == "cuda" else "cpu"
    plan = plan_for(AutoConfig.from_pretrained(model_dir), cfg, args.processes, device, None)
    torchrun = Path(sys.executable).parent / "torchrun"
    env = {**os.environ, "DENSELORA_RUNS": str(runs), "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2)
                                                                                 // args.processes))}
    started = time.perf_counter()
    launcher = subprocess.Popen([str(torchrun), "--nproc_per_node", str(args.processes), "-m", "denselora_app",
                                 "train", str(config_file), "--ignore-memory-plan"], cwd=REPO, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peaks: dict[int, int] = {}  # the whole run, loading included
    training: dict[int, int] = {}  # from the first optimizer step on: what the planner estimates
    kinds: dict[int, dict[str, int]] = {}  # the last reading of anonymous against file-backed pages, while training
    readings: dict[int, list[int]] = {}  # every reading while training: its median is the steady state
    parent, run = psutil.Process(launcher.pid), None
    while launcher.poll() is None:
        run = run or next((r for r in list_runs(runs) if r.id not in before), None)
        stepping = run is not None and run.raw_status().step >= 1
        for child in parent.children(recursive=True):
            try:
                rss = child.memory_info().rss
            except psutil.Error:
                continue
            peaks[child.pid] = max(peaks.get(child.pid, 0), rss)
            if stepping:
                training[child.pid] = max(training.get(child.pid, 0), rss)
                readings.setdefault(child.pid, []).append(rss)
                kinds[child.pid] = _rss_kinds(child.pid) or kinds.get(child.pid, {})
        time.sleep(0.1)
    output = launcher.stdout.read() if launcher.stdout else ""
    result: dict[str, Any] = {"arm": label, "settings": settings, "returncode": launcher.returncode,
                              "seconds": round(time.perf_counter() - started, 1),
                              "planner_per_process": plan.total + plan.reclaimable, "planner": plan.summary()}
    if launcher.returncode != 0:
        result["error"] = output[-3000:]
        return result
    (run,) = [run for run in list_runs(runs) if run.id not in before]
    rows = [row for row in run.metrics() if "loss" in row]
    workers = sorted(peaks.values(), reverse=True)[: args.processes]  # the training processes hold the most
    stepping = sorted(training.values(), reverse=True)[: args.processes]
    result.update(run=str(run.path), losses=[round(row["loss"], 4) for row in rows],
                  tokens_per_second_per_process=round(rows[-1].get("tokens_per_second", 0) / args.processes, 1),
                  sharding_line=next((line for line in run.log_path.read_text().splitlines()
                                      if "The model trained" in line), None))
    if args.device == "cuda":
        result["peak_per_gpu"] = int(max(row.get("peak_memory_gb", 0) for row in rows) * GB)
        measured = result["peak_per_gpu"]
    else:
        result["peak_rss_per_process"] = workers
        result["training_rss_per_process"] = stepping
        result["training_rss_median"] = [int(statistics.median(readings[pid])) for pid in
                                         sorted(training, key=training.get, reverse=True)[: args.processes]]
        result["training_rss_kinds"] = [kinds[pid] for pid in sorted(training, key=training.get, reverse=True)
                                        [: args.processes] if pid in kinds]
        measured = max(result["training_rss_median"] or workers)
    result["planner_error_percent"] = round(100 * (result["planner_per_process"] - measured) / measured, 1)
    return result


def _rss_kinds(pid: int) -> dict[str, int]:
    """RssAnon (the process's own memory) and RssFile (mapped files, e.g. safetensors weights) in bytes."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return {}
    return {key: int(value) * 1024 for key, value in re.findall(r"^(RssAnon|RssFile):\s+(\d+) kB", text, re.M)}


def largest_fitting(args: argparse.Namespace) -> list[dict[str, Any]]:
    """From the planner alone: for each arm and GPU count, the largest shape of PLANNED_SHAPES that fits."""
    from transformers import LlamaConfig

    table = []
    for label, settings in arms("cuda"):
        for gpus in GPU_COUNTS:
            fitting = None
            for shape in PLANNED_SHAPES:
                cfg = config_for(argparse.Namespace(**{**vars(args), "device": "cuda"}), Path("/nonexistent"),
                                 Path("/nonexistent"), label, settings)
                plan = plan_for(LlamaConfig(**ALL_SHAPES[shape]), cfg, gpus, "cuda:0", int(args.gpu_memory * GB))
                if plan.fits:
                    fitting = f"{shape} ({plan.total / GB:.1f} GB per GPU)"
            table.append({"arm": label, "gpus": gpus, "largest": fitting or "none of " + ", ".join(PLANNED_SHAPES)})
    return table


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    args.work_dir.mkdir(parents=True, exist_ok=True)
    model_dir = args.work_dir / f"model-{args.shape}"
    if not model_ready(model_dir, args.shape):
        SHAPES.setdefault(args.shape, ALL_SHAPES[args.shape])
        make_model(args.shape, model_dir, "cuda" if args.device == "cuda" else "cpu",
                   "bfloat16" if args.device == "cuda" else "float32")
    data = args.work_dir / f"data-{args.cutoff}.jsonl"
    if not data.exists():
        make_data(data, build_tokenizer(), args.cutoff, rows=args.batch * args.processes * args.steps * 2)
    results = [run_arm(args, label, settings, model_dir, data) for label, settings in arms(args.device)
               if not args.arms or label in args.arms]
    machine = machine_description(torch.device("cuda" if args.device == "cuda" else "cpu"))
    return {"date": time.strftime("%Y-%m-%d"), "machine": machine, "shape": args.shape, "processes": args.processes,
            "batch": args.batch, "cutoff": args.cutoff, "steps": args.steps, "arms": results,
            "largest_fitting": largest_fitting(args), "gpu_memory_gb": args.gpu_memory}


def render(results: dict[str, Any]) -> str:
    measured = "peak GPU memory (rank 0)" if results["machine"].get("gpu") else "peak RSS per process"

    def peak(arm: dict[str, Any], key: str) -> str:
        if "error" in arm:
            return "failed"
        values = arm.get(key) or [arm.get("peak_per_gpu", 0)]
        return ", ".join(f"{value / GB:.2f} GB" for value in values)

    rows = [[arm["arm"], peak(arm, "peak_rss_per_process"), peak(arm, "training_rss_per_process"),
             peak(arm, "training_rss_median"),
             f"{arm['planner_per_process'] / GB:.2f} GB",
             f"{arm.get('planner_error_percent', '-')}%", arm.get("tokens_per_second_per_process", "-"),
             arm["seconds"]] for arm in results["arms"]]
    fits = [[row["arm"], row["gpus"], row["largest"]] for row in results["largest_fitting"]]
    return "\n\n".join([
        f"{results['shape']}, {results['processes']} processes, batch {results['batch']} x {results['cutoff']} "
        f"tokens, {results['steps']} steps; {machine_line(results['machine'])}",
        markdown_table(["arm", f"{measured}, loading included", "peak while training (from step 1)",
                        "median while training", "planner per process", "planner error (vs median)",
                        "tokens/s per process", "seconds"], rows),
        f"Largest shape that fits, by the planner ({results['gpu_memory_gb']} GB GPUs):",
        markdown_table(["arm", "GPUs", "largest"], fits),
    ])


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--shape", choices=sorted(ALL_SHAPES), default="llama-1b")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--cutoff", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--arms", nargs="+", choices=("ddp", "fsdp", "fsdp-4bit"), help="only these (default: all)")
    parser.add_argument("--gpu-memory", type=float, default=80.0, help="GB per GPU, for the planner's table")
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/denselora-gpu-multi"))
    parser.add_argument("--out-dir", type=Path, default=REPO / "benchmarks" / "results")
    return parser.parse_args(argv)


if __name__ == "__main__":
    main_for(__file__, "gpu_multi", parse_args, run, render, None)
