"""RunConfig: one typed configuration, YAML in and out, wrong input refused with a message that names it."""

from __future__ import annotations

from pathlib import Path

import pytest

from denselora_app.config import ConfigError, RunConfig
from denselora_app.methods import build_peft_config

PRESETS = sorted((Path(__file__).parent.parent / "presets").glob("*.yaml"))


def test_yaml_round_trip(tmp_path):
    cfg = RunConfig(r=8, learning_rate=1e-3, target_modules=["q_proj", "v_proj"], run_name="x")
    cfg.to_yaml(tmp_path / "c.yaml")
    assert RunConfig.from_yaml(tmp_path / "c.yaml") == cfg


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.name)
def test_every_preset_loads(preset):
    cfg = RunConfig.from_yaml(preset)
    assert cfg.method in ("denselora", "lora")


def test_paper_preset_has_the_papers_settings():
    cfg = RunConfig.from_yaml(Path(__file__).parent.parent / "presets" / "paper-llama3-8b-commonsense.yaml")
    assert (cfg.r, cfg.alpha, cfg.learning_rate, cfg.batch_size, cfg.grad_accum) == (16, 32, 3e-4, 4, 4)
    assert (cfg.num_epochs, cfg.cutoff_len, cfg.warmup_steps, cfg.dropout) == (2, 256, 100, 0.05)
    assert cfg.target_modules == ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]
    assert (cfg.val_size, cfg.eval_steps, cfg.save_steps, cfg.train_on_inputs) == (120, 80, 80, True)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("learning_rat: 0.1", "Unknown key 'learning_rat'. Did you mean 'learning_rate'?"),
        ("r: sixteen", "r must be a whole number, got 'sixteen'"),
        ("r: 0", "r must be at least 1"),
        ("dropout: 1.5", "dropout must be less than 1"),
        ("method: qlora", "method must be one of denselora, lora"),
        ("gradient_checkpointing: maybe", "gradient_checkpointing must be true, false or null"),
        ("target_modules: []", "target_modules is empty"),
        ("[1, 2]", "is a mapping of keys to values"),
        ("r: [", "not valid YAML"),
    ],
)
def test_bad_yaml_is_refused_with_a_clear_message(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("?", r"\?")) as err:
        RunConfig.from_yaml(path)
    assert str(path) in str(err.value)


def test_overrides_parse_values_like_yaml():
    cfg = RunConfig().with_overrides(
        ["max_steps=20", "learning_rate=3e-3", "target_modules=q_proj,v_proj", "gradient_checkpointing=true"]
    )
    assert (cfg.max_steps, cfg.learning_rate, cfg.gradient_checkpointing) == (20, 3e-3, True)
    assert cfg.target_modules == ["q_proj", "v_proj"]
    with pytest.raises(ConfigError, match="expects key=value"):
        RunConfig().with_overrides(["max_steps"])
    with pytest.raises(ConfigError, match="Unknown key 'steps'"):
        RunConfig().with_overrides(["steps=3"])


def test_both_methods_come_from_the_same_config():
    cfg = RunConfig(r=8, alpha=16, dropout=0.1, target_modules=["q_proj"])
    dense, lora = build_peft_config(cfg), build_peft_config(cfg, "lora")
    assert dense.peft_type == "DENSELORA" and lora.peft_type == "LORA"
    for peft_config in (dense, lora):
        assert (peft_config.r, peft_config.lora_alpha, peft_config.lora_dropout) == (8, 16, 0.1)
        assert list(peft_config.target_modules) == ["q_proj"]
