"""One home for each rule: allowed values, path-or-Hub-id, and the copies the standalone method package keeps."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest
import torch

from denselora_app import config, rules
from denselora_app import denselora as method
from denselora_app.engine import models, sources
from denselora_app.engine.formats import detect_format
from denselora_app.engine.sources import load_rows


def test_the_standalone_method_package_agrees_with_the_studio():
    """denselora/ ships inside published adapters and imports nothing from the studio, so it keeps copies."""
    assert set(method.ACTIVATIONS) == set(rules.ACTIVATIONS)
    assert method.DROPOUT_PLACEMENTS == rules.DROPOUT_PLACEMENTS
    assert method.DEFAULT_TARGET_MODULES == list(rules.PAPER_TARGETS) == config.PAPER_TARGETS


# One row in each layout rules.DATA_FORMATS lists.
LAYOUT_ROWS = {
    "alpaca": {"instruction": "Name the lens.", "input": "", "output": "Cloudglass."},
    "messages": {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]},
    "sharegpt": {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
    "prompt_completion": {"prompt": "Hi", "completion": "Hello"},
    "text": {"text": "A plain document."},
}


def test_every_list_of_allowed_values_comes_from_rules():
    choices = {f.name: f.metadata.get("choices") for f in dataclasses.fields(config.RunConfig)}
    assert choices["method"] == rules.METHODS
    assert choices["activation"] == rules.ACTIVATIONS
    assert choices["dropout_placement"] == rules.DROPOUT_PLACEMENTS
    assert choices["lr_scheduler"] == rules.SCHEDULERS
    assert choices["data_format"] == ("auto", *rules.DATA_FORMATS)
    assert choices["dtype"] == ("auto", *rules.DTYPES)
    assert choices["quantization"] == rules.QUANTIZATIONS
    assert all(rules.DEVICE_PATTERN.match(kind) for kind in rules.DEVICE_KINDS)


def test_every_listed_value_is_one_the_engine_handles(tmp_path, tokenizer):
    """A value added to a list in rules.py works everywhere the list is offered (tests/test_layout.py keeps other
    modules from spelling out lists of their own)."""
    assert {str(models.resolve_dtype(name, torch.device("cpu"))).removeprefix("torch.") for name in rules.DTYPES} \
        == set(rules.DTYPES)
    for layout, row in LAYOUT_ROWS.items():
        path = tmp_path / f"{layout}.jsonl"
        path.write_text(json.dumps(row) + "\n", encoding="utf-8")
        assert detect_format(load_rows(str(path))[0]) == layout
    assert set(LAYOUT_ROWS) == set(rules.DATA_FORMATS)
    for suffix in rules.DATA_FILE_TYPES:  # every listed file type is read, not refused as unsupported
        with pytest.raises(sources.DataError, match="file not found"):
            sources.read_source(str(tmp_path / f"missing{suffix}"))


@pytest.mark.parametrize(("name", "hub"), [
    ("HuggingFaceTB/SmolLM2-135M-Instruct", True),
    ("teknium/OpenHermes-2.5", True),  # ".5" is part of the name, not an extension
    ("Qwen/Qwen2.5-7B-Instruct", True),
    ("gpt2", True),
    ("data.jsonl", False),
    ("owner/notes.xlsx", False),
    ("model.gguf", False),
    ("./model", False),
    ("../runs/x", False),
    ("~/models/llama", False),
    ("/abs/path", False),
    ("a/b/c", False),
    ("C:\\models\\llama", False),
    ("bad id with spaces", False),
])
def test_path_or_hub_id_is_one_rule(name, hub):
    assert (rules.hub_id(name) == name) is hub
    if not hub and rules.looks_like_path(name):
        with pytest.raises(models.ModelLoadError, match="No such file or folder"):
            models.load_config(name)
        with pytest.raises(sources.DataError, match="file not found"):
            sources.read_source(name)


def test_an_existing_folder_is_never_a_hub_id(tmp_path, monkeypatch):
    (tmp_path / "owner" / "model").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert rules.hub_id("owner/model") is None


def test_the_rules_module_does_not_import_torch():
    code = "import sys, denselora_app.rules, denselora_app.config, denselora_app.runs; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == "False", result.stderr
