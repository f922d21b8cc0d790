"""Chat on a tiny model: streaming, stop, compare from one copy of the base, adapter switching, errors, the CLI."""

from __future__ import annotations

import json
import os
from pathlib import Path

import psutil
import pytest
import torch
from conftest import tiny_llama, tiny_tokenizer
from peft import LoraConfig, PeftModel, get_peft_model

from denselora_app.cli import main
from denselora_app.config import RunConfig
from denselora_app.denselora import DenseLoraConfig
from denselora_app.engine import models
from denselora_app.runs import create_run, mark_checkpoint_complete
from denselora_app.serving import adapters
from denselora_app.serving.adapters import ChatError
from denselora_app.serving.chat import ChatEngine, GenerationSettings
from denselora_app.serving.prompts import build_messages, render_prompt

PROMPT = "what is the capital of a country?"
GREEDY = GenerationSettings(max_new_tokens=24, temperature=0.0, seed=0)

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread


def readable_tiny_llama():
    """A random tiny model that can only emit whole-word tokens (no byte pieces, no end token): its replies stream
    word by word and always run to max_new_tokens, unless stopped."""
    model = tiny_llama(max_position_embeddings=512)
    tokenizer = tiny_tokenizer()
    with torch.no_grad():
        for token_id in range(model.config.vocab_size):
            text = tokenizer.decode([token_id]) if token_id < len(tokenizer) else ""
            if not (text.strip() and all(ch.isalpha() or ch == " " for ch in text)):
                model.lm_head.weight[token_id] = 0.0  # logit 0, below the best word token's
    return model


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """A tiny base model folder, adapters of it (two DenseLoRA, one LoRA), and a run with a checkpoint."""
    root = tmp_path_factory.mktemp("chat")
    model_dir = root / "model"
    readable_tiny_llama().save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    # Non-zero initial weights stand in for training: each adapter changes the model's answers.
    configs = {
        "dense_a": DenseLoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_weights=False),
        "dense_b": DenseLoraConfig(r=4, lora_alpha=16, target_modules=["v_proj", "up_proj"], init_weights=False),
        "lora": LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    }
    for name, config in configs.items():
        torch.manual_seed(len(name))
        get_peft_model(models.load_model(str(model_dir), device="cpu"), config).save_pretrained(root / name)
    cfg = RunConfig(model=str(model_dir), data="unused.jsonl", run_name="tiny", device="cpu", r=4)
    run = create_run(cfg, root / "runs")
    for folder in (run.adapter_dir, run.checkpoints_dir / "checkpoint-5"):
        get_peft_model(models.load_model(str(model_dir), device="cpu"), configs["dense_a"]).save_pretrained(folder)
    (run.checkpoints_dir / "checkpoint-5" / "trainer_state.json").write_text("{}")
    mark_checkpoint_complete(run.checkpoints_dir / "checkpoint-5")
    run.update_status(state="completed")
    return root


@pytest.fixture(scope="module")
def engine(workspace) -> ChatEngine:
    return ChatEngine(device="cpu", runs_root=workspace / "runs")


def test_replies_stream_in_increments_and_stop_ends_them(workspace, engine):
    engine.select(str(workspace / "dense_a"))
    texts = list(engine.stream_reply(PROMPT, settings=GREEDY))
    assert len(set(texts)) >= 3, texts
    assert all(later.startswith(earlier) for earlier, later in zip(texts, texts[1:]))
    assert engine.last_stats.tokens == GREEDY.max_new_tokens and not engine.last_stats.stopped

    stream = engine.stream_reply(PROMPT, settings=GenerationSettings(max_new_tokens=400, temperature=0.0))
    first = next(stream)
    engine.stop()
    rest = list(stream)
    assert engine.last_stats.stopped and engine.last_stats.tokens < 100, engine.last_stats
    assert (rest[-1] if rest else first).startswith(first)


def test_compare_base_column_is_the_plain_base_model(workspace, engine):
    engine.select(str(workspace / "dense_a"))
    pairs = list(engine.stream_compare(PROMPT, settings=GREEDY))
    base_text, adapter_text = pairs[-1]
    # The base answers completely before the adapter starts.
    started = next(i for i, (_, a) in enumerate(pairs) if a)
    assert all(b == base_text for b, _ in pairs[started:]) and not any(a for _, a in pairs[:started])

    fresh = models.load_model(str(workspace / "model"), device="cpu")  # a separate copy, never given an adapter
    tokenizer = engine.tokenizer
    text, add_special_tokens = render_prompt(tokenizer, build_messages(PROMPT))
    ids = tokenizer(text, add_special_tokens=add_special_tokens, return_tensors="pt").input_ids
    out = fresh.generate(ids, max_new_tokens=GREEDY.max_new_tokens, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id)
    assert base_text == tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert adapter_text and adapter_text != base_text

    sampled = GenerationSettings(max_new_tokens=12, temperature=1.0, seed=7)
    assert list(engine.stream_compare(PROMPT, settings=sampled))[-1][0] == \
        list(engine.stream_reply(PROMPT, settings=sampled, use_adapter=False))[-1]  # same seed, same settings


def test_switching_adapters_reuses_the_base(workspace, monkeypatch):
    loads, adapter_loads = [], []
    load_model, load_adapter = models.load_model, PeftModel.load_adapter
    monkeypatch.setattr(models, "load_model", lambda *a, **k: loads.append(a) or load_model(*a, **k))
    monkeypatch.setattr(PeftModel, "load_adapter",
                        lambda self, *a, **k: adapter_loads.append(a) or load_adapter(self, *a, **k))
    engine = ChatEngine(device="cpu", runs_root=workspace / "runs")
    replies = {}
    for name in ("dense_a", "dense_b", "dense_a", "lora", "dense_b"):
        selected = engine.select(str(workspace / name))
        assert selected.adapter.method == ("lora" if name == "lora" else "denselora")
        assert 0 < selected.trainable_percent < 100
        reply = list(engine.stream_reply(PROMPT, settings=GREEDY))[-1]
        assert replies.setdefault(name, reply) == reply
    assert len(loads) == 1
    # dense_a's second turn comes from the cache; LoRA cannot share a PeftModel with DenseLoRA, so switching
    # method takes the adapters out of the same base model and loads the new one.
    assert [Path(a[0]).name for a in adapter_loads] == ["dense_a", "dense_b", "lora", "dense_b"]
    assert len(set(replies.values())) == 3


def test_runs_checkpoints_and_folders_resolve(workspace):
    root = workspace / "runs"
    (run_dir,) = root.iterdir()
    by_id = adapters.resolve_adapter(run_dir.name, root=root)
    assert by_id.base_model == str(workspace / "model") and by_id.run_dir == str(run_dir)
    assert adapters.resolve_adapter(str(run_dir / "adapter"), root=root) == by_id
    checkpoint = adapters.resolve_adapter(str(run_dir / "checkpoints" / "checkpoint-5"), root=root)
    assert checkpoint == adapters.resolve_adapter(run_dir.name, checkpoint=5, root=root)
    assert checkpoint.checkpoint == 5 and checkpoint.label.endswith("checkpoint-5")
    assert [ref.label for ref in adapters.available_adapters(root)] == [by_id.label, checkpoint.label]


def test_errors_are_clear(workspace, tmp_path):
    root = workspace / "runs"
    (run_dir,) = root.iterdir()
    with pytest.raises(ChatError, match=f"'no-such-run' is not a run: there is no run of that id in {root}.*"
                                        "also take an adapter folder or a Hub adapter id"):
        adapters.resolve_adapter("no-such-run", root=root)
    with pytest.raises(ChatError, match="no adapter_config.json.*base model"):
        adapters.resolve_adapter(str(workspace / "model"), root=root)
    with pytest.raises(ChatError, match="no checkpoint 7; its checkpoints are: 5"):
        adapters.resolve_adapter(run_dir.name, checkpoint=7, root=root)
    orphan = tmp_path / "orphan"
    orphan.mkdir()
    config = json.loads((workspace / "dense_a" / "adapter_config.json").read_text())
    (orphan / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "/gone/model"}))
    with pytest.raises(ChatError, match="base model of orphan .*/gone/model.* cannot be loaded"):
        ChatEngine(device="cpu", runs_root=root).select(str(orphan))
    with pytest.raises(ChatError, match="temperature"):
        GenerationSettings(temperature=-1)


def test_a_run_training_on_the_same_device_is_announced(workspace, tmp_path, monkeypatch):
    root = tmp_path / "runs"
    busy = create_run(RunConfig(model=str(workspace / "model"), data="x.jsonl", run_name="busy", device="cpu"), root)
    busy.update_status(state="running", pid=os.getpid(), pid_started=psutil.Process().create_time(),
                       device="cpu")
    engine = ChatEngine(device="cpu", runs_root=root)
    selected = engine.select(str(workspace / "dense_a"))
    assert busy.id in selected.notice and busy.id in engine.training_notice()

    # On a Space every visitor reads the notice: it names the run only once the owner made it public.
    monkeypatch.setenv("SPACE_ID", "alice/denselora-studio")
    assert engine.training_notice().startswith("A run is training on cpu") and busy.id not in engine.training_notice()
    busy.set_public(True)
    assert engine.training_notice().startswith(f"Run {busy.id} is training on cpu")
    monkeypatch.delenv("SPACE_ID")

    class Starved:
        available = 1024
    monkeypatch.setattr(adapters.psutil, "virtual_memory", lambda: Starved())
    with pytest.raises(ChatError, match=f"{busy.id} is training on cpu.*only 0.0 GB is free"):
        ChatEngine(device="cpu", runs_root=root).select(str(workspace / "dense_a"))


def test_cli_chat(workspace, monkeypatch, capsys):
    monkeypatch.setenv("DENSELORA_RUNS", str(workspace / "runs"))
    (run_dir,) = (workspace / "runs").iterdir()
    args = ["chat", run_dir.name, "--prompt", PROMPT, "--max-new-tokens", "8", "--temperature", "0"]
    assert main(args) == 0
    reply = capsys.readouterr().out.strip()
    assert reply

    assert main(args + ["--compare", "--checkpoint", "5", "--system", "be brief"]) == 0
    out = capsys.readouterr().out
    base, _, adapter = out.partition("\nadapter:\n")
    assert base.startswith("base:\n") and base.strip() != "base:" and adapter.strip()

    assert main(["chat", run_dir.name, "--prompt", "hi", "--checkpoint", "9"]) == 2
    err = capsys.readouterr().err
    assert "error: Run" in err and "its checkpoints are: 5" in err and "Traceback" not in err


@pytest.mark.slow
def test_compiled_decoding_answers_as_the_standard_one(workspace, engine):
    """torch.compile with a static cache (compiled once, when the adapter is selected) gives the same greedy answer;
    the status says the decoding is compiled."""
    greedy = GenerationSettings(max_new_tokens=6, temperature=0, seed=0)
    engine.select(str(workspace / "dense_a"))
    expected = list(engine.stream_reply("the quick brown fox", settings=greedy))[-1]
    compiled = ChatEngine(device="cpu", runs_root=workspace / "runs", compile_decoding=True)
    loaded = compiled.select(str(workspace / "dense_a"))
    assert loaded.compiled and compiled.compile_failure is None
    assert list(compiled.stream_reply("the quick brown fox", settings=greedy))[-1] == expected


def test_compiled_decoding_that_fails_falls_back_and_says_why(workspace, monkeypatch):
    from peft import PeftModel

    standard = PeftModel.generate

    def no_compiler(self, *args, **kwargs):
        if kwargs.get("cache_implementation") == "static":
            raise RuntimeError("no C++ compiler found")
        return standard(self, *args, **kwargs)

    monkeypatch.setattr(PeftModel, "generate", no_compiler)
    engine = ChatEngine(device="cpu", runs_root=workspace / "runs", compile_decoding=True)
    loaded = engine.select(str(workspace / "dense_a"))
    assert not loaded.compiled and "Compiled decoding is off: RuntimeError: no C++ compiler found" in loaded.notice
    settings = GenerationSettings(max_new_tokens=3, temperature=0, seed=0)
    assert list(engine.stream_reply("the quick", settings=settings))[-1]  # answers the standard way
