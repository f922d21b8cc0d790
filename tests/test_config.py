"""RunConfig: one typed configuration, YAML in and out, wrong input refused with a message that names it."""

from __future__ import annotations

from pathlib import Path

import pytest

from denselora_app.config import ConfigError, RunConfig
from denselora_app.engine.methods import build_peft_config

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


@pytest.mark.parametrize(
    ("assignment", "message"),
    [
        ("learning_rate=inf", "learning_rate must be a finite number (> 0), got inf."),
        ("learning_rate=nan", "learning_rate must be a finite number (> 0), got nan."),
        ("alpha=nan", "alpha must be a finite number (> 0), got nan."),
        ("alpha=inf", "alpha must be a finite number (> 0), got inf."),
        ("num_epochs=inf", "num_epochs must be a finite number (> 0), got inf."),
        ("dropout=nan", "dropout must be a finite number (>= 0 and < 1), got nan."),
        ("cutoff_len=1000000000000", "cutoff_len must be at most 1,048,576, got 1,000,000,000,000."),
        ("batch_size=1000000000000", "batch_size must be at most 1,048,576"),
        ("max_steps=10000000000000", "max_steps must be at most 1,000,000,000"),
        ("seed=99999999999", "seed must be at most 4,294,967,295"),
    ],
)
def test_numbers_that_mean_nothing_are_refused_by_field(assignment, message):
    """Before any model is read or run folder made: nan passes every range check, inf trains an adapter of nan."""
    with pytest.raises(ConfigError) as err:
        RunConfig().with_overrides([assignment])
    assert str(err.value).startswith(message)


def test_an_alias_bomb_is_refused_at_once_without_expanding(tmp_path):
    import time
    import tracemalloc

    lines = ["a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 10)]  # 9**10 items expanded
    path = tmp_path / "bomb.yaml"
    path.write_text("\n".join(lines) + "\nrun_name: *a9\n")
    tracemalloc.start()
    started = time.monotonic()
    try:
        with pytest.raises(ConfigError, match=r"line 2 uses the YAML alias \*a0; a run configuration takes no "):
            RunConfig.from_yaml(path)
        elapsed, (_, peak) = time.monotonic() - started, tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert elapsed < 1.0 and peak < 200 * 2**20
    with pytest.raises(ConfigError, match=r"--set run_name: line 1 uses the YAML alias \*x"):
        RunConfig().with_overrides(["run_name=[&x a, *x]"])


def test_a_huge_value_is_quoted_by_a_short_prefix():
    nested = [[["x" * 1000] * 1000] * 1000] * 1000  # would print 10**12 characters
    with pytest.raises(ConfigError) as err:
        RunConfig(r=nested)
    assert len(str(err.value)) < 300 and str(err.value).startswith("r must be a whole number, got [[[")


def test_a_key_given_twice_is_refused_with_both_lines(tmp_path):
    path = tmp_path / "twice.yaml"
    path.write_text("r: 8\nmax_steps: 3\nr: 16\n")
    with pytest.raises(ConfigError, match="the key 'r' is given twice \\(lines 1 and 3\\); keep one."):
        RunConfig.from_yaml(path)


def test_an_oversized_config_file_is_refused_before_it_is_read(tmp_path):
    path = tmp_path / "huge.yaml"
    path.write_text("run_name: x\n" + "#" * (2 * 2**20))
    with pytest.raises(ConfigError, match="a run configuration is a few hundred"):
        RunConfig.from_yaml(path)


def test_an_overlong_text_value_is_refused_by_a_short_message():
    with pytest.raises(ConfigError, match=r"^--set run_name= is 5,000 characters long; no setting takes more than "):
        RunConfig().with_overrides(["run_name=" + "x" * 5000])
    with pytest.raises(ConfigError) as err:
        RunConfig(model="m" * 100_000)
    assert str(err.value).startswith("model is 100,000 characters long (at most 4,096)") and len(str(err.value)) < 200
