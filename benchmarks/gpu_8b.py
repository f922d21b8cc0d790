"""GPU check of the memory planner: DenseLoRA r16 on a LLaMA-3-8B-shaped model, 4-bit and bf16, on one CUDA GPU.

1. Builds a LLaMA-3-8B-shaped model from its configuration (hidden 4096, intermediate 14336, 32 layers, 32 heads,
   8 key/value heads, vocabulary 128,256, rope theta 500,000) with random bf16 weights created directly on the GPU,
   and saves it with a tokenizer built in code to ``--work-dir`` (16 GB; reused by later runs). Nothing is
   downloaded: the model, the tokenizer and the data are made here.
2. Trains it through the code path of the CLI (``launch(cfg, background=False)`` and ``worker.execute``, which
   runs ``train.py``): DenseLoRA r16 on the paper's five projections, batch 4 x 512 tokens (one row in four a little
   shorter, so batches are padded as usual), gradient checkpointing, a few optimizer steps; first with a 4-bit base
   (NF4, double quantization), then with the bf16 base unquantized. Each stage runs in its own process, as a run
   does, so its CUDA context and peak counters are its own.
3. Writes, per stage, the peak memory (``torch.cuda.max_memory_allocated`` and ``max_memory_reserved`` after the
   model has loaded, so loading's own transient peak is left out, and the device's used memory at the end, which
   includes the CUDA context), the step time, and the memory planner's estimate for the same run, to
   ``benchmarks/results/gpu_8b.json`` and ``.md``. A stage that fails is recorded with its error and the others still
   run; the results are written after every stage.

    python benchmarks/gpu_8b.py              # one CUDA GPU: ~4-6 minutes on an H200, 16 GB of disk in --work-dir
    python benchmarks/gpu_8b.py --dry-run    # the same code on the CPU with a tiny model, in seconds (the test)

In ``--dry-run`` the stages run in this process (imports dominate the time otherwise), in float32, and the peak is
the resident memory's (VmHWM after a reset) minus the RSS before the model loaded.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Optional

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may be downloaded: fail fast instead of waiting on a network
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

log = logging.getLogger("benchmarks.gpu_8b")
GB = 1024**3

SHAPES: dict[str, dict[str, Any]] = {
    "llama3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0, rms_norm_eps=1e-5,
                      max_position_embeddings=8192, tie_word_embeddings=False),
    "tiny": dict(vocab_size=320, hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, rope_theta=500000.0, max_position_embeddings=128, tie_word_embeddings=False),
}
STAGES = (("4bit", "4bit"), ("bf16", "none"))  # (label, quantization); --dry-run trains both in float32
SETTINGS = {
    "gpu": dict(shape="llama3-8b", device="cuda", dtype="bfloat16", batch=4, cutoff=512, steps=6),
    "dry-run": dict(shape="tiny", device="cpu", dtype="float32", batch=2, cutoff=32, steps=2),
}
MODEL_READY = "gpu_8b_model_complete"  # written last into the model folder: a half-written one is never reused


# ---------------------------------------------------------------------------------------------------------------
# The model, the tokenizer and the data, made here


def build_tokenizer() -> Any:
    """A byte-level BPE tokenizer trained in milliseconds (vocabulary 310, under any model's), with ChatML tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=310, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog", "what is the capital of a country?"] * 10,
                            trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")


def make_model(shape: str, folder: Path, device: str, dtype: str) -> None:
    """A randomly initialised model of ``shape``, created on ``device`` in ``dtype``, saved with its tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**SHAPES[shape])
    tokenizer = build_tokenizer()
    if len(tokenizer) > config.vocab_size:
        raise SystemExit(f"The tokenizer's {len(tokenizer)} tokens do not fit the model's vocabulary of "
                         f"{config.vocab_size}.")
    started = time.perf_counter()
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM._from_config(config, dtype=getattr(torch, dtype))
    log.info("Created %s (%.2fB parameters) on %s in %.1f s", shape, model.num_parameters() / 1e9, device,
             time.perf_counter() - started)
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial, max_shard_size="5GB")
    tokenizer.save_pretrained(partial)
    (partial / MODEL_READY).write_text(json.dumps({"shape": shape, "dtype": dtype}) + "\n")
    shutil.rmtree(folder, ignore_errors=True)
    partial.rename(folder)
    log.info("Saved to %s in %.1f s in all", folder, time.perf_counter() - started)


def model_ready(folder: Path, shape: str) -> bool:
    try:
        return json.loads((folder / MODEL_READY).read_text())["shape"] == shape
    except (OSError, ValueError, KeyError):
        return False


def make_data(path: Path, tokenizer: Any, cutoff: int, rows: int) -> None:
    """Text rows longer than ``cutoff`` tokens (truncated to it in training), one in four ~10% shorter (padding)."""
    import random

    words = "the quick brown fox jumps over the lazy dog what is capital of a country answer yes no".split()
    generator = random.Random(0)
    with path.open("w", encoding="utf-8") as out:
        for i in range(rows):
            text = " ".join(generator.choice(words) for _ in range(cutoff))
            while len(tokenizer(text)["input_ids"]) <= cutoff:
                text += " " + text
            if i % 4 == 3:
                text = tokenizer.decode(tokenizer(text)["input_ids"][: int(cutoff * 0.9)])
            out.write(json.dumps({"text": text}) + "\n")


# ---------------------------------------------------------------------------------------------------------------
# One stage: one run through launch + worker.execute, measured


def _rss() -> dict[str, int]:
    text = Path("/proc/self/status").read_text()
    return {k: int(v) * 1024 for k, v in re.findall(r"^(VmRSS|VmHWM):\s+(\d+) kB", text, re.M)}


def run_stage(label: str, quantization: str, model_dir: Path, data: Path, work_dir: Path, settings: dict[str, Any],
              rank: int = 16) -> dict[str, Any]:
    """Train one stage through the CLI's code path and return what was measured, with the planner's estimate."""
    import torch

    from denselora_app.config import PAPER_TARGETS, RunConfig
    from denselora_app.engine import train as train_module
    from denselora_app.engine.launch import launch, preflight
    from denselora_app.engine.worker import execute

    cfg = RunConfig(model=str(model_dir), data=str(data), data_format="text", method="denselora", r=rank,
                    alpha=2 * rank, target_modules=list(PAPER_TARGETS), batch_size=settings["batch"], grad_accum=1,
                    cutoff_len=settings["cutoff"], max_steps=settings["steps"], warmup_steps=0, learning_rate=1e-4,
                    logging_steps=1, save_steps=10_000, gradient_checkpointing=True, quantization=quantization,
                    device=settings["device"], dtype=settings["dtype"], run_name=f"gpu8b-{label}")
    cuda = cfg.device.startswith("cuda")
    result: dict[str, Any] = {"stage": label, "quantization": quantization, "dtype": cfg.dtype,
                              "batch": cfg.batch_size, "cutoff_len": cfg.cutoff_len, "checkpointing": True,
                              "steps": cfg.max_steps}
    checked = preflight(cfg)  # the planner's plan comes with it; a run it refuses raises LaunchError here
    plan = checked.memory
    if cuda:  # preflight read the free memory, so this process's CUDA context exists now
        free, total = torch.cuda.mem_get_info()
        result.update(gpu=torch.cuda.get_device_name(), cuda=torch.version.cuda, device_used_at_start=total - free)
    result["planner"] = {"total": plan.total, "training": plan.training, "weights": plan.weights,
                         "adapter": plan.adapter, "activations": plan.activations, "overhead": plan.overhead,
                         "process": plan.process, "activation_parts": plan.parts, "free_at_start": plan.free,
                         "fits": plan.fits, "summary": plan.summary()}
    marks: dict[str, Any] = {}
    original = train_module.load_model

    def load_and_mark(*args: Any, **kwargs: Any) -> Any:
        """train.py's load_model, with the peak reset once the weights are in: loading's transient is left out."""
        marks["before_load"] = torch.cuda.memory_allocated() if cuda else _rss()["VmRSS"]
        started = time.perf_counter()
        model = original(*args, **kwargs)
        marks["load_seconds"] = round(time.perf_counter() - started, 2)
        if cuda:
            torch.cuda.synchronize()
            marks["loading_peak_allocated"] = torch.cuda.max_memory_allocated()
            marks["after_load"] = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        else:
            marks["after_load"] = _rss()["VmRSS"]
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        return model

    train_module.load_model = load_and_mark
    try:
        run = launch(cfg, background=False, checked=checked, root=work_dir / "runs")
        result["run"] = str(run.path)
        started = time.perf_counter()
        state = execute(run, show_progress=False)
        result["seconds"] = round(time.perf_counter() - started, 1)
    finally:
        train_module.load_model = original
    result["state"] = str(state)
    if cuda:
        free, total = torch.cuda.mem_get_info()
        result.update(peak_allocated=torch.cuda.max_memory_allocated(), peak_reserved=torch.cuda.max_memory_reserved(),
                      device_used_at_end=total - free, device_total=total)
    else:
        result.update(peak_allocated=_rss()["VmHWM"] - marks["before_load"], peak_reserved=None,
                      device_used_at_end=None)
    result.update(marks)
    rows = [row for row in run.metrics() if "loss" in row]
    times = [row["time"] for row in rows]
    steps = [b - a for a, b in zip(times, times[1:])]
    result["step_seconds"] = round(statistics.median(steps), 3) if steps else None
    result["losses"] = [round(row["loss"], 4) for row in rows]
    # The planner against the measurement: live tensors against weights + adapter + activations; the allocator's
    # reservation against the training estimate (with its allowance); the device's use against the total.
    tensors = plan.weights + plan.adapter + plan.activations
    result["error_allocated_percent"] = _error(tensors, result["peak_allocated"])
    result["error_reserved_percent"] = _error(plan.training, result["peak_reserved"])
    result["error_device_percent"] = _error(plan.total, result["device_used_at_end"])
    return result


def _error(estimate: int, measured: Optional[int]) -> Optional[float]:
    return round(100 * (estimate - measured) / measured, 1) if measured else None


# ---------------------------------------------------------------------------------------------------------------
# The check: model, data, stages, results


def _gb(value: Optional[int]) -> str:
    if value is None:
        return "-"
    return f"{value / GB:.2f} GB" if abs(value) >= GB / 10 else f"{value / 2**20:.1f} MiB"


def _pct(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:+.1f}%"


def markdown(results: dict[str, Any]) -> str:
    from benchlib import machine_line, markdown_table

    s = results["settings"]
    title = ("LLaMA-3-8B shape" if results["mode"] == "gpu" else "dry run on the CPU with a tiny model (numbers "
             "not meaningful)")
    lines = [
        f"## Memory planner on a GPU: {title}, DenseLoRA r{results['rank']} ({results['date']})",
        f"Command: `{results['command']}`",
        f"Machine: {machine_line(results['machine'])}",
        f"Model: {s['shape']} with random weights, batch {s['batch']} x {s['cutoff']} tokens, gradient "
        f"checkpointing, {s['steps']} optimizer steps per stage.",
    ]
    rows = []
    for label, _ in STAGES:
        stage = results["stages"].get(label)
        if stage is None:
            rows.append([label, "not run"] + ["-"] * 9)
        elif "error" in stage:
            rows.append([label, f"failed: {stage['error'].splitlines()[-1][:160]}"] + ["-"] * 9)
        else:
            p = stage["planner"]
            rows.append([label, f"{stage['quantization']}, {stage['dtype']}", _gb(stage["peak_allocated"]),
                         _gb(p["weights"] + p["adapter"] + p["activations"]), _pct(stage["error_allocated_percent"]),
                         _gb(stage["peak_reserved"]), _gb(p["training"]), _pct(stage["error_reserved_percent"]),
                         _gb(stage["device_used_at_end"]), _gb(p["total"]),
                         "-" if stage["step_seconds"] is None else f"{stage['step_seconds']:.2f}"])
    lines.append(markdown_table(
        ["stage", "base", "peak allocated", "planner: weights + adapter + activations", "error", "peak reserved",
         "planner: training (with allocator allowance)", "error", "device used at end", "planner: total", "s/step"],
        rows))
    notes = []
    for label, stage in results["stages"].items():
        if "error" in stage:
            continue
        loading = (f", peak {_gb(stage['loading_peak_allocated'])} while loading"
                   if "loading_peak_allocated" in stage else "")
        start = (f"device used at the start {_gb(stage['device_used_at_start'])} (the CUDA context and anything else "
                 "on the GPU); " if "device_used_at_start" in stage else "")
        losses = f"loss {stage['losses'][0]} -> {stage['losses'][-1]}" if stage.get("losses") else "no loss logged"
        notes.append(f"- {label}: {start}model loaded in {stage.get('load_seconds', '?')} s{loading}; {losses}; "
                     f"planner: {stage['planner']['summary']}")
    if notes:
        lines.append("\n".join(notes))
    if results.get("model_error"):
        lines.append(f"Model creation failed: {results['model_error']}")
    return "\n\n".join(lines)


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="The same code on the CPU with a tiny model.")
    parser.add_argument("--work-dir", type=Path, help="Where the model, data and runs go (default: a folder under "
                        "the system's temporary directory; the 8B model, 16 GB, is reused from there).")
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--steps", type=int, help="Optimizer steps per stage (default 6; 2 in --dry-run).")
    parser.add_argument("--stages", nargs="*", choices=[label for label, _ in STAGES], help="Stages to run.")
    parser.add_argument("--stage-timeout", type=int, default=240, help="Seconds a stage (or the model creation) may "
                        "take before it is stopped and recorded as failed.")
    parser.add_argument("--stage", help=argparse.SUPPRESS)  # internal: run one stage in this process
    parser.add_argument("--make-model", help=argparse.SUPPRESS)  # internal: create the model in this process
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def _child(args: argparse.Namespace) -> int:
    spec = json.loads(args.spec)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.make_model:
        make_model(spec["shape"], Path(args.make_model), spec["device"], spec["dtype"])
        return 0
    result = run_stage(args.stage, dict(STAGES)[args.stage], Path(spec["model_dir"]), Path(spec["data"]),
                       Path(spec["work_dir"]), spec["settings"])
    Path(spec["result"]).write_text(json.dumps(result, indent=2) + "\n")
    return 0


def _in_child(argv: list[str], timeout: int) -> None:
    """Run this script with ``argv`` in a fresh process; RuntimeError with the end of its output if it fails."""
    try:
        done = subprocess.run([sys.executable, __file__, *argv], cwd=REPO, timeout=timeout, capture_output=True,
                              text=True)
    except subprocess.TimeoutExpired as err:
        tail = ((err.stderr or b"").decode(errors="replace") if isinstance(err.stderr, bytes) else err.stderr or "")
        raise RuntimeError(f"stopped after {timeout} s (--stage-timeout)\n{tail[-2000:]}") from None
    sys.stderr.write(done.stderr[-4000:])
    if done.returncode != 0:
        raise RuntimeError(f"exit status {done.returncode}\n{done.stderr[-3000:]}")


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.stage or args.make_model:
        raise SystemExit(_child(args))
    from benchlib import command_line, machine_description, setup_logging, write_results

    setup_logging()
    import torch

    mode = "dry-run" if args.dry_run else "gpu"
    settings = dict(SETTINGS[mode])
    if args.steps:
        settings["steps"] = args.steps
    if mode == "gpu":
        if not torch.cuda.is_available():
            raise SystemExit("No CUDA GPU is visible here: this check needs one (run it with --dry-run to try the same "
                             "code on the CPU).")
        if importlib_missing("bitsandbytes"):
            raise SystemExit("The 4-bit stage needs bitsandbytes: pip install bitsandbytes (make install does).")
    default_dir = "gpu_8b" if mode == "gpu" else f"gpu_8b_dry_{os.getpid()}"
    work_dir = args.work_dir or Path(tempfile.gettempdir()) / default_dir
    work_dir.mkdir(parents=True, exist_ok=True)
    suffix = "" if mode == "gpu" else "_dry_run"
    json_path, md_path = args.out_dir / f"gpu_8b{suffix}.json", args.out_dir / f"gpu_8b{suffix}.md"
    # This process never touches the GPU (each stage reads its name): a CUDA context here would hold memory the
    # stages' measurements of the device's use would include.
    results: dict[str, Any] = {
        "command": command_line(__file__, argv), "date": time.strftime("%Y-%m-%d"), "mode": mode,
        "machine": machine_description(torch.device("cpu")), "settings": settings, "rank": 16, "stages": {},
    }

    def save() -> None:
        write_results(results, markdown(results), json_path, md_path)

    model_dir = work_dir / f"model-{settings['shape']}"
    try:
        if not model_ready(model_dir, settings["shape"]):
            config = SHAPES[settings["shape"]]
            needed = 2.2 * (config["vocab_size"] * config["hidden_size"] * 2 + config["num_hidden_layers"] * (
                4 * config["hidden_size"] ** 2 + 3 * config["hidden_size"] * config["intermediate_size"]))
            if shutil.disk_usage(work_dir).free < needed:
                raise RuntimeError(f"{work_dir} has {shutil.disk_usage(work_dir).free / GB:.1f} GB free; the model "
                                   f"needs about {needed / GB:.1f} GB. Choose another --work-dir.")
            spec = json.dumps({"shape": settings["shape"], "device": settings["device"], "dtype": "bfloat16"
                               if mode == "gpu" else "float32"})
            if mode == "gpu":
                _in_child(["--make-model", str(model_dir), "--spec", spec], args.stage_timeout)
            else:
                make_model(settings["shape"], model_dir, settings["device"], json.loads(spec)["dtype"])
        else:
            log.info("Reusing the model in %s", model_dir)
        data = work_dir / "data.jsonl"
        from denselora_app.engine.models import load_tokenizer

        make_data(data, load_tokenizer(str(model_dir)), settings["cutoff"],
                  rows=settings["batch"] * settings["steps"] * 2)
    except Exception as err:  # noqa: BLE001 (recorded, and the results written, before giving up)
        results["model_error"] = f"{type(err).__name__}: {err}"
        save()
        raise SystemExit(f"Could not prepare the model and data: {err}") from None

    failed = []
    for label, quantization in STAGES:
        if args.stages and label not in args.stages:
            continue
        log.info("Stage %s: training %s steps", label, settings["steps"])
        result_file = work_dir / f"stage-{label}.json"
        result_file.unlink(missing_ok=True)
        try:
            if mode == "gpu":
                spec = {"model_dir": str(model_dir), "data": str(data), "work_dir": str(work_dir),
                        "settings": settings, "result": str(result_file)}
                _in_child(["--stage", label, "--spec", json.dumps(spec)], args.stage_timeout)
                results["stages"][label] = json.loads(result_file.read_text())
            else:
                results["stages"][label] = run_stage(label, quantization, model_dir, data, work_dir, settings)
            if results["stages"][label].get("gpu"):
                results["machine"].update(gpu=results["stages"][label]["gpu"], cuda=results["stages"][label]["cuda"])
        except Exception as err:  # noqa: BLE001 (one failed stage must not lose the others)
            log.error("Stage %s failed: %s", label, err)
            failed.append(label)
            results["stages"][label] = {"stage": label, "quantization": quantization,
                                        "error": f"{type(err).__name__}: {err}".strip(),
                                        "traceback": traceback.format_exc()[-3000:]}
        save()
    if hasattr(os, "getloadavg"):
        results["machine"]["load_average_1m_at_end"] = round(os.getloadavg()[0], 2)
    save()
    print(markdown(results))
    if failed:
        raise SystemExit(f"Stage(s) failed: {', '.join(failed)} (see {md_path})")
    return results


def importlib_missing(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is None


if __name__ == "__main__":
    main()
