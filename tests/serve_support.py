"""What the serve tests share: a tiny base with a run holding a random DenseLoRA adapter, and a live `serve`."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import torch
from conftest import end_process, free_port, tiny_tokenizer
from peft import get_peft_model

from denselora_app.config import RunConfig
from denselora_app.denselora import DenseLoraConfig
from denselora_app.engine import models
from denselora_app.runs import create_run

_REPO = Path(__file__).resolve().parent.parent
API_KEY = "test-key"
CONTEXT = 2048  # long enough for a reply that streams for seconds (the disconnect test)


def readable_model(max_position_embeddings: int = CONTEXT):
    """A random tiny model that emits only whole-word tokens (no byte pieces, no end token), so replies compare as
    text and run to max_tokens (as tests/test_chat.py's)."""
    from test_chat import readable_tiny_llama

    model = readable_tiny_llama()
    model.config.max_position_embeddings = max_position_embeddings
    with torch.no_grad():  # sharp attention (nearly uniform at init), so a wrong position or mask shows in answers
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(30)
            layer.self_attn.k_proj.weight.mul_(30)
    return model


def make_workspace(root: Path, context: int = CONTEXT) -> tuple[Path, str, Path]:
    """A base model folder, a completed run whose adapter is random DenseLoRA weights (standing in for training),
    and a second adapter folder; returns (runs folder, run id, other adapter folder)."""
    model_dir = root / "model"
    readable_model(context).save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    run = create_run(RunConfig(model=str(model_dir), data="unused.jsonl", run_name="served", device="cpu", r=4),
                     root / "runs")
    for seed, folder in ((1, run.adapter_dir), (2, root / "other")):
        torch.manual_seed(seed)
        config = DenseLoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_weights=False)
        get_peft_model(models.load_model(str(model_dir), device="cpu"), config).save_pretrained(folder)
    run.update_status(state="completed")
    return root / "runs", run.id, root / "other"


@dataclass
class Served:
    url: str  # the API's base URL, .../v1
    process: subprocess.Popen
    log: Path

    def stop(self) -> None:
        end_process(self.process, grace=20)


def start_serve(runs: Path, *args: str, timeout: float = 90.0) -> Served:
    """`python -m denselora_app serve ARGS` on a free port, once its /health answers."""
    port = free_port()
    log = runs.parent / f"serve-{port}.log"
    env = {**os.environ, "DENSELORA_RUNS": str(runs), "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
           "OMP_NUM_THREADS": "1"}  # tiny models decode fastest on one thread (conftest.one_thread)
    with open(log, "ab") as out:
        process = subprocess.Popen([sys.executable, "-m", "denselora_app", "serve", *args, "--port", str(port)],
                                   cwd=_REPO, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if process.poll() is not None:
            raise AssertionError(f"serve exited with {process.returncode}:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return Served(f"http://127.0.0.1:{port}/v1", process, log)
        except OSError:
            time.sleep(0.2)
    process.kill()
    raise AssertionError(f"serve did not answer within {timeout} s:\n{log.read_text()}")
