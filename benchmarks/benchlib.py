"""What both benchmark scripts share: the machine description, Markdown tables, and writing the results."""

from __future__ import annotations

import json
import logging
import os
import platform
import shlex
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

import peft
import torch
import transformers

log = logging.getLogger("benchmarks")


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
