"""The CPU quickstart end to end on the embedded default model (a few minutes): train, then check what it learned."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel

from denselora_app.engine.models import EMBEDDED_DEFAULT, load_model, load_tokenizer
from denselora_app.engine.sources import SAMPLE_PROBES
from denselora_app.runs import Run, list_runs

REPO = Path(__file__).parent.parent



pytestmark = pytest.mark.slow  # the embedded model, trained and asked: minutes

def answers(model, tokenizer, questions: list[str]) -> list[str]:
    replies = []
    for question in questions:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                               add_generation_prompt=True)
        ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=24, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        replies.append(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
    return replies


@pytest.fixture(scope="session")
def quickstart_run(tmp_path_factory) -> Run:
    runs = tmp_path_factory.mktemp("quickstart-runs")
    result = subprocess.run(
        [sys.executable, "-m", "denselora_app", "train", "presets/quickstart-cpu.yaml"],
        capture_output=True, text=True, cwd=REPO, timeout=2400, env={**os.environ, "DENSELORA_RUNS": str(runs)},
    )
    assert result.returncode == 0, result.stderr[-4000:]
    (run,) = list_runs(runs)
    return run


def test_quickstart_trains_to_completion(quickstart_run):
    status = quickstart_run.status()
    assert status.state == "completed" and status.step == 60
    losses = [m["loss"] for m in quickstart_run.metrics() if "loss" in m]
    assert losses[-1] < 0.3 * losses[0]
    assert (quickstart_run.adapter_dir / "adapter_model.safetensors").exists()
    assert quickstart_run.data_report()["rows_used"] == 24


def test_quickstart_adapter_answers_the_sample_facts_the_base_gets_wrong(quickstart_run):
    probes = [json.loads(line) for line in SAMPLE_PROBES.read_text().splitlines() if line.strip()]
    questions = [p["question"] for p in probes]
    tokenizer = load_tokenizer(EMBEDDED_DEFAULT)
    base = load_model(EMBEDDED_DEFAULT, device="cpu")
    base_right = sum(p["expected"].lower() in a.lower() for p, a in zip(probes, answers(base, tokenizer, questions)))
    adapted = PeftModel.from_pretrained(base, quickstart_run.adapter_dir)
    replies = answers(adapted, tokenizer, questions)
    adapter_right = sum(p["expected"].lower() in a.lower() for p, a in zip(probes, replies))
    assert base_right <= 1
    assert adapter_right >= 6, list(zip(questions, replies))
