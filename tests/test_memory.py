"""The memory planner: its estimates against real training steps, its formula against live tensors, and a launch
that would not fit refused before any weight loads, saying what would make it fit."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, Qwen2Config

from denselora_app.config import RunConfig
from denselora_app.engine import memory, models
from denselora_app.engine.launch import LaunchError, launch
from denselora_app.engine.memory import GB, plan_memory
from denselora_app.engine.methods import count_parameters

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import memory_planner  # noqa: E402


def _plan(model_config, **settings) -> memory.MemoryPlan:
    cfg = RunConfig(model="model", **settings)
    return plan_memory(model_config, cfg, count_parameters(model_config, cfg), "cpu", free=None)


@pytest.mark.slow
def test_estimates_are_within_a_quarter_of_the_measured_peak():
    """Four shapes (plain, checkpointing, wide and short, 4-bit), each trained for a few steps with the Trainer in
    its own process: the planner's training memory against peak RSS minus the RSS before the model was created."""
    results = memory_planner.measure_all(memory_planner.QUICK_SHAPES, parallel=2, threads=1)
    assert len(results) >= 4
    report = "\n" + memory_planner.table(results)
    for result in results:
        assert result["measured"] > 50 * 2**20, report  # large enough that the comparison means something
        assert abs(result["error_percent"]) <= 25, report


@pytest.mark.parametrize("checkpointing", [False, True])
def test_activations_match_the_live_tensors_of_a_training_step(checkpointing, one_thread):
    """The formula against the bytes of every tensor a forward and backward pass create while they live (not the
    allocator's view): within 10%."""
    from peft import get_peft_model
    from speed_memory import LiveTensorBytes
    from transformers import LlamaForCausalLM

    from denselora_app.engine.methods import build_peft_config

    shape = memory_planner.Shape("t", 128, 344, 3, 4, 2, 2048, 2, 64, checkpointing=checkpointing)
    cfg = shape.run_config()
    torch.manual_seed(0)
    model = LlamaForCausalLM(shape.model_config()).requires_grad_(False)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    peft_model = get_peft_model(model, build_peft_config(cfg)).train()
    ids = torch.randint(0, shape.vocab, (shape.batch, shape.cutoff))
    mask = torch.ones_like(ids)
    mask[-1, -5:] = 0  # a padded row, as the planner assumes
    with LiveTensorBytes() as live:
        peft_model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss.backward()
    planned = memory_planner.estimate(shape).activations
    assert abs(planned - live.peak) <= 0.1 * live.peak, (planned, live.peak)


def test_quantized_weights_are_counted_as_bitsandbytes_stores_them():
    model_config = memory_planner.QUICK_SHAPES[0].model_config()
    full, nf4, int8 = (_plan(model_config, quantization=q, dtype="float32").weights for q in ("none", "4bit", "8bit"))
    shape = memory.model_shape(model_config)
    assert full == shape.parameters * 4
    unquantized = (shape.parameters - shape.quantizable) * 4  # embeddings, norms and lm_head stay float32
    assert nf4 == pytest.approx(unquantized + shape.quantizable * (0.5 + 1 / 64 + 4 / 16384), abs=1)
    assert int8 == unquantized + shape.quantizable + 4 * shape.quantizable_rows
    assert nf4 < int8 < full


def test_suggestions_are_only_changes_not_in_effect_and_most_effective_first():
    model_config = LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=16,
                               num_attention_heads=16, num_key_value_heads=4, tie_word_embeddings=False)
    settings = dict(batch_size=8, grad_accum=2, cutoff_len=1024)
    plan = _plan(model_config, **settings)
    tight = plan.replan()
    tight.free = int(plan.total * 0.35)
    options = tight.suggestions()
    assert {list(o.settings)[0] for o in options} == {"quantization", "gradient_checkpointing", "batch_size",
                                                       "cutoff_len"}
    assert [o.total for o in options] == sorted(o.total for o in options)
    assert all(o.total <= tight.free for o in options)
    batch = options[2].settings
    assert batch["batch_size"] * batch["grad_accum"] == 16 and batch["batch_size"] < 8  # the same effective batch

    # Already 4-bit with checkpointing: neither is suggested again.
    done = _plan(model_config, quantization="4bit", gradient_checkpointing=True, **settings)
    done.free = int(done.total * 0.9)
    kinds = {key for option in done.suggestions() for key in option.settings}
    assert kinds and not kinds & {"quantization", "gradient_checkpointing"}

    # Nothing alone is enough: one combination, which fits.
    tiny = plan.replan()
    tiny.free = int(plan.total * 0.12)
    (combined,) = tiny.suggestions()
    assert len(combined.settings) >= 2 and combined.total <= tiny.free


@pytest.mark.parametrize("settings", [dict(cutoff_len=2**20), dict(batch_size=2**20),
                                      dict(batch_size=2**20, cutoff_len=2**20)])
def test_the_largest_settings_are_planned_and_advised_in_bounded_time(settings):
    """Suggestions bisect (memory grows with batch and cutoff), so the largest allowed values cost a few plans: the
    cutoff of a million tokens took 150 s when every candidate was planned."""
    import time

    model_config = LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=16,
                               num_attention_heads=16, num_key_value_heads=4, tie_word_embeddings=False)
    started = time.monotonic()
    plan = _plan(model_config, **settings)
    plan.free = 8 * GB
    advice = plan.advice()
    assert time.monotonic() - started < 5
    assert not plan.fits and advice
    for option in plan.suggestions():  # each suggestion is the largest that fits: one step larger does not
        if "cutoff_len" in option.settings and len(option.settings) == 1:
            assert option.total <= plan.free
            assert not plan.replan(cutoff_len=option.settings["cutoff_len"] + 64).fits


def test_a_plan_that_fits_has_no_suggestions_and_one_summary_line():
    plan = _plan(memory_planner.QUICK_SHAPES[0].model_config())
    plan.free = plan.total + GB
    assert plan.fits and plan.suggestions() == []
    line = plan.summary()
    assert line.startswith("Estimated training memory: ") and "\n" not in line and "fits" in line


def test_a_run_that_does_not_fit_is_refused_before_any_weight_loads(tmp_path, monkeypatch):
    model_config = LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=16,
                               num_attention_heads=16, num_key_value_heads=4, tie_word_embeddings=False)
    folder = tmp_path / "model"
    model_config.save_pretrained(folder)  # config.json only: there are no weights to load
    cfg = RunConfig(model=str(folder), batch_size=8, grad_accum=2, cutoff_len=1024, device="cpu")

    def must_not_load(*args, **kwargs):
        pytest.fail("the launch loaded a model or a tokenizer before refusing")

    for name in ("load_model", "load_tokenizer"):
        monkeypatch.setattr(models, name, must_not_load)
    free = 12 * GB
    monkeypatch.setattr(memory, "free_memory", lambda device: free)

    with pytest.raises(LaunchError) as refused:
        launch(cfg, background=False, root=tmp_path / "runs")
    assert refused.value.what == "memory"
    message = str(refused.value)
    plan = plan_memory(model_config, cfg, count_parameters(model_config, cfg), "cpu", free=free)
    assert not plan.fits
    assert message.startswith("Memory: this run needs about ")
    assert f"about {memory._gb(plan.total)}" in message and "but cpu has 12.0 GB free" in message
    options = plan.suggestions()
    assert len(options) >= 3
    positions = [message.index(option.line()) for option in options]
    assert positions == sorted(positions)  # in the order of the suggestions, most effective first
    assert "quantization=4bit" in message and "gradient_checkpointing=true" in message
    assert "\n" not in message
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())
    assert message.endswith("start anyway with --ignore-memory-plan.")

    # The override: the plan is still made, the launch goes on to the next check (here: the tokenizer).
    with pytest.raises(pytest.fail.Exception, match="loaded a model or a tokenizer"):
        launch(cfg, background=False, root=tmp_path / "runs", ignore_memory=True)


# The published shapes of the models the one-GPU presets name (nothing is downloaded in tests).
PRESET_MODELS = {
    "meta-llama/Meta-Llama-3-8B-Instruct": LlamaConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, rope_theta=500000.0, max_position_embeddings=8192, tie_word_embeddings=False),
    "Qwen/Qwen2.5-7B-Instruct": Qwen2Config(
        vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
        num_key_value_heads=4, max_position_embeddings=32768, tie_word_embeddings=False),
}


@pytest.mark.parametrize("preset",
                         ["llama3-8b-denselora-12gb", "llama3-8b-denselora-24gb", "qwen2.5-7b-denselora-16gb",
                          "llama3-8b-dpo-24gb"])
def test_the_one_gpu_presets_state_the_planners_estimate_and_fit_their_card(preset):
    path = Path(__file__).resolve().parent.parent / "presets" / f"{preset}.yaml"
    cfg = RunConfig.from_yaml(path)
    card = int(re.search(r"(\d+)gb$", preset)[1]) * GB
    model_config = PRESET_MODELS[cfg.model]
    plan = plan_memory(model_config, cfg, count_parameters(model_config, cfg), "cuda:0", free=card)
    stated = re.search(r"Memory planner \(\d{4}-\d\d-\d\d\): about ([\d.]+) GB", path.read_text())
    assert stated and stated[1] == f"{plan.total / GB:.1f}", "update the preset's comment to the planner's figure"
    assert plan.fits and plan.total < 0.9 * card, "a preset leaves room for what else the card holds"
