"""One home for each rule: allowed values, path-or-Hub-id, and the copies the standalone method package keeps."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

from denselora_app import config, data, models, rules
from denselora_app import denselora as method
from denselora_app.ui import loaders


def test_the_standalone_method_package_agrees_with_the_studio():
    """denselora/ ships inside published adapters and imports nothing from the studio, so it keeps copies."""
    assert set(method.ACTIVATIONS) == set(rules.ACTIVATIONS)
    assert method.DROPOUT_PLACEMENTS == rules.DROPOUT_PLACEMENTS
    assert method.DEFAULT_TARGET_MODULES == list(rules.PAPER_TARGETS) == config.PAPER_TARGETS


def test_every_list_of_allowed_values_comes_from_rules():
    choices = {f.name: f.metadata.get("choices") for f in dataclasses.fields(config.RunConfig)}
    assert choices["method"] == rules.METHODS
    assert choices["activation"] == rules.ACTIVATIONS
    assert choices["dropout_placement"] == rules.DROPOUT_PLACEMENTS
    assert choices["lr_scheduler"] == rules.SCHEDULERS
    assert choices["data_format"] == ("auto", *rules.DATA_FORMATS)
    assert choices["dtype"] == ("auto", *rules.DTYPES)
    assert choices["quantization"] == rules.QUANTIZATIONS
    assert set(data._REQUIRED_COLUMNS) == set(rules.DATA_FORMATS) and data.FORMATS is rules.DATA_FORMATS
    assert loaders.UPLOAD_TYPES is rules.DATA_FILE_TYPES is data.FILE_TYPES
    assert set(models._DTYPES) == set(rules.DTYPES)
    assert all(rules.DEVICE_PATTERN.match(kind) for kind in rules.DEVICE_KINDS)


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
        with pytest.raises(data.DataError, match="file not found"):
            data.read_source(name)


def test_an_existing_folder_is_never_a_hub_id(tmp_path, monkeypatch):
    (tmp_path / "owner" / "model").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert rules.hub_id("owner/model") is None


def test_the_rules_module_does_not_import_torch():
    code = "import sys, denselora_app.rules, denselora_app.config, denselora_app.runs; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == "False", result.stderr
