"""What the benchmark scripts share: the machine description, Markdown tables, writing the results, and the small
helpers for timing arms of one model against each other."""

from __future__ import annotations

import copy
import json
import logging
import os
import platform
import shlex
import sys
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, TypeVar

import peft
import torch
import transformers

log = logging.getLogger("benchmarks")
T = TypeVar("T")

# LLaMA-shaped models built from a config with random weights (nothing is downloaded), by name, for every script.
MODEL_SHAPES: dict[str, dict[str, int]] = {
    "tiny": dict(vocab_size=256, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2),
    # SmolLM2-135M's width, heads and MLP (the embedded model the CPU quickstart trains) in 2 layers, with a small
    # vocabulary: attention takes the same share of a layer's work as in that model.
    "cpu-small": dict(vocab_size=2048, hidden_size=576, intermediate_size=1536, num_hidden_layers=2,
                      num_attention_heads=9, num_key_value_heads=3),
    "small": dict(vocab_size=8192, hidden_size=1024, intermediate_size=2816, num_hidden_layers=4,
                  num_attention_heads=16, num_key_value_heads=4),
    "llama-1b": dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                     num_attention_heads=32, num_key_value_heads=4),
    "llama3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8),
}
# The paper's five target projections, for every adapter the scripts compare.
TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    # transformers' notices (generation settings and the like) would drown the progress bars.
    logging.getLogger("transformers").setLevel(logging.ERROR)


def command_line(script: str, argv: Optional[Sequence[str]]) -> str:
    """The command that runs ``script`` with ``argv`` (None: this process's arguments), relative to the working
    directory (the repository root, normally)."""
    return shlex.join(["python", os.path.relpath(script), *(sys.argv[1:] if argv is None else argv)])


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_description(device: torch.device) -> dict[str, Any]:
    """CPU, cores, library versions, the GPU if one is used, and the load average (other work sharing the CPUs)."""
    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "logical_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "gpu": None,
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    if hasattr(os, "getloadavg"):
        info["load_average_1m_at_start"] = round(os.getloadavg()[0], 2)
    return info


def machine_line(machine: dict[str, Any]) -> str:
    parts = [f"{machine['cpu']} ({machine['logical_cores']} logical cores, {machine['torch_threads']} torch threads)"]
    if machine.get("gpu"):
        parts.append(f"{machine['gpu']} (CUDA {machine['cuda']})")
    parts.append(f"torch {machine['torch']}, transformers {machine['transformers']}, peft {machine['peft']}")
    if "load_average_1m_at_start" in machine:
        load = f"load average {machine['load_average_1m_at_start']}"
        if "load_average_1m_at_end" in machine:
            load += f" at start, {machine['load_average_1m_at_end']} at end"
        parts.append(load)
    return "; ".join(parts)


def kept_trial(path: Path, key: str) -> Any:
    """The result a resumable benchmark kept in ``path`` for a trial run with settings ``key``; None if it has not
    run. A trial kept under other settings (more steps, another task size) belongs to another table and is never run
    over: the benchmark stops before training and asks for a trials folder of this setting's own."""
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    if record.get("settings") != key:
        raise SystemExit(f"{path} holds this trial run with other settings ({record.get('settings')}, not {key}); "
                         "it stays as it is. Pass --trials-dir with a folder of this setting's own.")
    return record["result"]


def keep_trial(path: Path, key: str, result: Any) -> Any:
    """Keep a finished trial's result for later sittings (read back by kept_trial)."""
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps({"settings": key, "result": result}, indent=1, default=str))
    partial.replace(path)  # a trial interrupted while writing is run again, never half-read
    return result


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def write_results(results: dict[str, Any], markdown: str, json_path: Path, markdown_path: Path) -> None:
    json_path.parent.mkdir(parents=True, exist_ok=True)
    markdown_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(results, indent=2) + "\n")
    markdown_path.write_text(markdown + "\n")
    log.info("Wrote %s and %s", json_path, markdown_path)


def sharing_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model`` whose modules are new but whose parameters and buffers are the very same tensors."""
    shared = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return copy.deepcopy(model, memo=shared)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rotated(arms: list[T], shift: int) -> list[T]:
    """``arms`` starting at ``shift``: each repeat runs them in another order, so load from other work on the
    machine falls on every arm alike."""
    shift %= len(arms)
    return arms[shift:] + arms[:shift]


def main_for(script: str, stem: str, parse_args: Callable, run: Callable, render_markdown: Callable,
             argv: Optional[Sequence[str]], variant: str = "device") -> None:
    """A benchmark's main: parse, run, write ``<stem>_<args.variant>.json`` and ``.md`` to --out-dir, print the
    table."""
    setup_logging()
    args = parse_args(argv)
    results = {"command": command_line(script, argv), **run(args)}
    markdown = render_markdown(results)
    name = f"{stem}_{getattr(args, variant)}"
    write_results(results, markdown, args.out_dir / f"{name}.json", args.out_dir / f"{name}.md")
    print(markdown)
