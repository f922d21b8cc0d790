"""Stage dpo: the setting, preference pairs detected and checked before Start (dropped by reason, with file and line),
the memory plan of a pair, training through the worker with Stop and resume, the Runs table, and pairwise
preference accuracy in evaluation."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch
from conftest import tiny_run_config, tiny_tokenizer, wait_until
from huggingface_hub import ModelCard
from transformers import LlamaConfig

from denselora_app import cli, rules
from denselora_app.config import SAMPLE_PAIRS, ConfigError, RunConfig, field_help
from denselora_app.engine import preferences
from denselora_app.engine.launch import LaunchError, launch, resume_run
from denselora_app.engine.memory import plan_memory
from denselora_app.engine.methods import count_parameters
from denselora_app.engine.sources import SAMPLE_PAIRS_HELDOUT, DataError, data_source, read_source
from denselora_app.engine.worker import execute
from denselora_app.hub.publish import build_model_repo
from denselora_app.runs import RunState, request_stop
from denselora_app.serving.evaluate import evaluate
from denselora_app.serving.preference_eval import pairwise_scores
from denselora_app.ui import run_view

PROMPTS = ["the quick brown fox", "what is the capital of a country?", "the lazy dog", "answer: yes or no",
           "a fox jumps", "the dog", "over the fox", "what is the dog?"]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


@pytest.fixture
def pairs_file(tmp_path) -> Path:
    return write_jsonl(tmp_path / "pairs.jsonl",
                       [{"prompt": p, "chosen": "yes the dog", "rejected": "no fox"} for p in PROMPTS])


# ---- the setting -------------------------------------------------------------------------------------------------


def test_the_stage_is_a_setting_with_trls_names_and_refuses_what_is_not_offered():
    assert RunConfig().stage == "sft"
    cfg = RunConfig().with_overrides(["stage=dpo", "beta=0.2", "dpo_loss=ipo"])
    assert (cfg.stage, cfg.beta, cfg.dpo_loss) == ("dpo", 0.2, "ipo")
    assert cfg.stage in rules.STAGES and "dpo" in field_help("stage")
    for name in ("orpo", "simpo"):
        with pytest.raises(ConfigError, match=rf"stage {name} is not offered: .*trl\.experimental"):
            RunConfig(stage=name)
    with pytest.raises(ConfigError, match="dpo_loss must be one of"):
        RunConfig(stage="dpo", dpo_loss="nope")
    with pytest.raises(ConfigError, match="data_format alpaca is a layout of sft data"):
        RunConfig(stage="dpo", data_format="alpaca")


# ---- the data ------------------------------------------------------------------------------------------------------


def test_every_pair_layout_renders_to_the_same_text(tmp_path):
    tok = tiny_tokenizer()
    user, good, bad = "what is the dog?", "the lazy dog", "a fox"
    layouts = {
        "prompt_chosen_rejected": [{"prompt": user, "chosen": good, "rejected": bad},
                                   {"prompt": [{"role": "user", "content": user}],
                                    "chosen": [{"role": "assistant", "content": good}],
                                    "rejected": [{"role": "assistant", "content": bad}]}],
        "conversations_chosen_rejected": [{"conversations": [{"from": "human", "value": user}],
                                           "chosen": {"from": "gpt", "value": good},
                                           "rejected": {"from": "gpt", "value": bad}}],
        "chosen_rejected": [{"chosen": [{"role": "user", "content": user}, {"role": "assistant", "content": good}],
                             "rejected": [{"role": "user", "content": user}, {"role": "assistant", "content": bad}]}],
    }
    expected = preferences.Pair("<|im_start|>user\nwhat is the dog?<|im_end|>\n<|im_start|>assistant\n",
                                "the lazy dog<|im_end|>", "a fox<|im_end|>")
    for layout, rows in layouts.items():
        src = read_source(str(write_jsonl(tmp_path / f"{layout}.jsonl", rows)))
        assert preferences.pair_layout(src) == layout
        assert [preferences.render_pair(tok, row, layout) for row in rows] == [expected] * len(rows)


def test_bad_pairs_are_dropped_by_reason_with_file_and_line(tmp_path):
    rows = [{"prompt": "the dog", "chosen": "yes", "rejected": "no"},
            {"prompt": "the dog", "chosen": "yes", "rejected": "yes"},
            {"prompt": "the dog", "chosen": "  ", "rejected": "no"},
            {"prompt": "the dog", "chosen": "yes", "rejected": ""},
            {"prompt": "the dog", "chosen": "the lazy dog " * 20, "rejected": "no"}]
    path = write_jsonl(tmp_path / "mixed.jsonl", rows)
    report = preferences.check_pairs(str(path), tiny_tokenizer(), cutoff_len=48)
    assert report.rows_used == 1 and report.format == "prompt_chosen_rejected"
    assert report.dropped == {"chosen equals rejected": 1, "empty chosen": 1, "empty rejected": 1,
                              "longer than cutoff_len": 1}
    assert [p.split(":")[0] for p in report.problems] == [f"mixed.jsonl line {n}" for n in (2, 3, 4, 5)]
    assert "raise cutoff_len" in report.problems[-1]


def test_data_of_one_stage_is_refused_for_the_other_saying_which_it_serves(tmp_path, pairs_file):
    sft = write_jsonl(tmp_path / "sft.jsonl", [{"instruction": "the dog", "output": "yes"}])
    with pytest.raises(DataError, match=r"sft\.jsonl: stage dpo needs preference pairs.*look like alpaca rows, "
                                        r"which serve stage sft"):
        preferences.check_pairs(str(sft), tiny_tokenizer())
    from denselora_app.engine.data import check_data

    with pytest.raises(DataError, match="the rows are preference pairs .* they serve stage dpo"):
        check_data(str(pairs_file), tiny_tokenizer())


def test_bad_preference_data_is_refused_before_start_with_file_and_line(tmp_path, app_model_dir, runs_root):
    path = write_jsonl(tmp_path / "same.jsonl", [{"prompt": p, "chosen": "yes", "rejected": "yes"} for p in PROMPTS])
    with pytest.raises(LaunchError, match=r"(?s)no usable pairs out of 8 rows .*chosen equals rejected: 8.*same\.jsonl "
                                          r"line 1: chosen and rejected are the same answer"):
        launch(tiny_run_config(app_model_dir, path, stage="dpo"), background=False)
    assert not runs_root.exists() or not any(runs_root.iterdir())


def test_the_shipped_pairs_are_usable_and_held_out_prompts_are_unseen():
    tok = tiny_tokenizer()
    train = preferences.prepare_pairs(data_source(SAMPLE_PAIRS), tok, cutoff_len=128)
    held_out = preferences.prepare_pairs(str(SAMPLE_PAIRS_HELDOUT), tok, cutoff_len=128)
    assert not train.report.dropped and not held_out.report.dropped and len(held_out.train) >= 20
    assert not set(train.train["prompt"]) & set(held_out.train["prompt"])


# ---- the memory plan -----------------------------------------------------------------------------------------------


def test_the_memory_plan_counts_both_sequences_of_a_pair():
    model_config = LlamaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                               num_attention_heads=16, num_key_value_heads=4)
    plans = {}
    for stage in ("sft", "dpo"):
        cfg = RunConfig(model="model", stage=stage, batch_size=2, cutoff_len=256)
        plans[stage] = plan_memory(model_config, cfg, count_parameters(model_config, cfg), "cuda:0", free=None)
    assert plans["dpo"].activations == 2 * plans["sft"].activations
    assert plans["dpo"].weights == plans["sft"].weights  # the reference is the base, with the adapter disabled


# ---- training, Stop and resume, the Runs table, evaluation -------------------------------------------------------


@pytest.mark.slow
def test_dpo_trains_through_the_worker_stops_and_resumes(app_model_dir, pairs_file, runs_root, one_thread, tmp_path):
    cfg = tiny_run_config(app_model_dir, pairs_file, stage="dpo", max_steps=24, save_steps=2, batch_size=4,
                          run_name="dpo")
    run = launch(cfg, background=False)
    worker = threading.Thread(target=execute, args=(run,))
    worker.start()
    wait_until(lambda: any(r.get("step", 0) >= 2 for r in run.metrics()), timeout=120, interval=0.02,
               what="two DPO steps")
    request_stop(run)
    worker.join(timeout=120)
    stopped = run.status()
    assert stopped.state == RunState.STOPPED and 2 <= stopped.step < 24 and run.last_checkpoint() is not None
    first = run.metrics()
    assert first[0]["loss"] == pytest.approx(0.6931, abs=1e-3)  # log 2: the fresh adapter is the reference
    assert {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"} <= first[-1].keys()

    resume_run(run, background=False)
    assert execute(run, resume=True) == RunState.COMPLETED
    steps = [r["step"] for r in run.metrics() if "loss" in r]
    assert steps == list(range(1, 25)), "the resumed run continues the step count without gaps or repeats"
    rows = run.metrics()
    assert rows[-1]["rewards/margins"] > 0 and rows[-1]["loss"] < 0.6
    assert run.has_adapter() and json.loads((run.path / "summary.json").read_text())["stage"] == "dpo"
    assert run_view.table_row(run.facts())[run_view.TABLE_COLUMNS.index("Stage")] == "dpo"

    # Pairwise accuracy on the pairs: the adapter prefers the chosen answer on every one; the base is scored too.
    table = evaluate([run.id], data=pairs_file)
    assert table.mode == "pairwise" and [r.model for r in table.results][0] == "base"
    base, adapter = table.results
    assert adapter.accuracy == 1.0 and adapter.total == len(PROMPTS) and base.accuracy is not None
    saved = run.evaluation()
    assert saved["results"][0]["mode"] == "pairwise" and saved["base"][0]["accuracy"] == base.accuracy

    # The model card says how it was trained, and on what.
    folder = build_model_repo(run.id, "alice/tiny-dpo", tmp_path / "repo", root=runs_root)
    card = ModelCard.load(folder.path / "README.md")
    assert "dpo" in card.data.to_dict()["tags"] and "| `stage` | dpo |" in card.text
    assert "by Direct Preference Optimization (TRL's DPOTrainer" in card.text and "| pairwise |" in card.text


def test_pairwise_accuracy_counts_chosen_above_rejected_and_ties_as_wrong(tmp_path):
    path = write_jsonl(tmp_path / "held.jsonl", [{"prompt": p, "chosen": "yes", "rejected": "no"} for p in PROMPTS[:3]])
    sums = iter([(-1.0, -2.0), (-3.0, -1.0), (-2.0, -2.0)])  # right, wrong, a tie

    def score(examples):
        out = []
        for _ in range(len(examples) // 2):
            chosen, rejected = next(sums)
            out += [torch.tensor([chosen]), torch.tensor([rejected])]
        return out

    scores = pairwise_scores(score, tiny_tokenizer(), str(path), cutoff_len=64, limit=None, batch_size=2,
                             report=lambda *_: None)
    assert scores == {"total": 3, "accuracy": 1 / 3, "correct": 1}


def test_the_cli_lists_the_stage_of_each_run(app_model_dir, pairs_file, runs_root, capsys):
    launch(tiny_run_config(app_model_dir, pairs_file, stage="dpo", run_name="pairs"), background=False)
    assert cli.main(["runs"]) == 0
    out = capsys.readouterr().out
    assert "STAGE" in out.splitlines()[0] and " dpo " in out.splitlines()[1]


# ---- the Train tab -------------------------------------------------------------------------------------------------


def test_the_stage_choice_shows_its_own_settings_and_sample():
    from denselora_app.config import SAMPLE_DATA
    from denselora_app.ui.train_form import stage_changed

    dpo_row, dpo_loss, data_format, packing, train_on_inputs, data = stage_changed("dpo", SAMPLE_DATA)
    assert dpo_row["visible"] and dpo_loss["visible"] and not data_format["visible"] and not packing["visible"]
    assert data_format["value"] == "auto" and packing["value"] is False and data == SAMPLE_PAIRS
    dpo_row, dpo_loss, data_format, _, train_on_inputs, data = stage_changed("sft", SAMPLE_PAIRS)
    assert not dpo_row["visible"] and data_format["visible"] and train_on_inputs["visible"] and data == SAMPLE_DATA
    dpo_row, dpo_loss, *_, data = stage_changed("kto", SAMPLE_PAIRS)
    assert dpo_row["visible"] and not dpo_loss["visible"] and data is not SAMPLE_DATA
    assert stage_changed("dpo", "my/own-pairs")[-1] != SAMPLE_PAIRS  # a user's own data is left as it is


def test_the_data_preview_shows_pairs_side_by_side_and_what_is_dropped(app_model_dir, tmp_path):
    from denselora_app.ui.data_preview import CHOSEN, REJECTED, preview_data

    path = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "the dog", "chosen": "yes", "rejected": "no"},
                                                  {"prompt": "the fox", "chosen": "yes", "rejected": "yes"}])
    preview = preview_data(model=str(app_model_dir), trust_remote_code=False, data=str(path), data_format="auto",
                           cutoff_len=64, train_on_inputs=False, stage="dpo")
    assert "pairs.jsonl line 2: chosen and rejected are the same answer" in preview.message.value
    assert "prompt_chosen_rejected" in preview.detected and "1 pairs usable" in preview.detected
    assert list(preview.rows.columns)[1:] == [CHOSEN, REJECTED]
    assert preview.rows.iloc[0].tolist()[1:] == ["yes<|im_end|>", "no<|im_end|>"]
    assert ("yes<|im_end|>", CHOSEN) in preview.examples and ("no<|im_end|>", REJECTED) in preview.examples


def test_a_dpo_runs_charts_show_its_rewards_and_preference_accuracy():
    from denselora_app.ui import run_view

    rows = [{"step": s, "loss": 0.69 - 0.1 * s, "rewards/chosen": 0.1 * s, "rewards/rejected": -0.1 * s,
             "rewards/margins": 0.2 * s, "rewards/accuracies": min(1.0, 0.5 + 0.25 * s)} for s in (1, 2, 3)]
    shown = run_view.run_charts(rows)
    assert sorted(set(shown.rewards["series"])) == ["chosen", "margin", "rejected"]
    assert shown.rewards[shown.rewards.series == "margin"]["reward"].tolist() == pytest.approx([0.2, 0.4, 0.6])
    assert shown.preference_accuracy["rewards/accuracies"].tolist() == [0.75, 1.0, 1.0]
    sft = run_view.run_charts([{"step": 1, "loss": 2.0}])
    assert sft.rewards is None and sft.preference_accuracy is None


# ---- stage kto ----------------------------------------------------------------------------------------------------


def test_kto_takes_labelled_completions_or_pairs_unpaired_and_mixes_them(tmp_path, pairs_file):
    tok = tiny_tokenizer()
    rows = [{"prompt": p, "completion": "yes the dog", "label": n % 2 == 0} for n, p in enumerate(PROMPTS)]
    rows += [{"prompt": "the fox", "completion": "no", "label": "maybe"}]
    labelled = write_jsonl(tmp_path / "labelled.jsonl", rows)
    prepared = preferences.prepare_pairs(str(labelled), tok, cutoff_len=64, stage="kto")
    assert prepared.report.format == "prompt_completion_label" and prepared.report.rows_used == len(PROMPTS)
    assert prepared.report.dropped == {"bad label": 1} and "labelled.jsonl line 9" in prepared.report.problems[0]
    unpaired = preferences.prepare_pairs(str(pairs_file), tok, cutoff_len=64, stage="kto", seed=1)
    labels = unpaired.train["label"]
    assert sorted(labels) == [False] * len(PROMPTS) + [True] * len(PROMPTS)
    assert labels != sorted(labels) and labels != sorted(labels, reverse=True), "shuffled: KTO reads them in order"
    assert set(unpaired.train["completion"]) == {"yes the dog<|im_end|>", "no fox<|im_end|>"}
    with pytest.raises(DataError, match="they serve stage kto, not sft"):
        from denselora_app.engine.data import check_data

        check_data(str(labelled), tok)
    with pytest.raises(DataError, match="stage dpo needs preference pairs.*labelled completions, which serve stage "
                                        "kto"):
        preferences.check_pairs(str(labelled), tok)
    with pytest.raises(ConfigError, match="stage kto needs batch_size of at least 2"):
        RunConfig(stage="kto", batch_size=1)


@pytest.mark.slow
def test_kto_trains_through_the_worker_on_pairs(app_model_dir, pairs_file, runs_root, one_thread):
    cfg = tiny_run_config(app_model_dir, pairs_file, stage="kto", max_steps=8, batch_size=4, run_name="kto")
    run = launch(cfg, background=False)
    assert execute(run) == RunState.COMPLETED and run.has_adapter()
    rows = [r for r in run.metrics() if "loss" in r]
    assert [r["step"] for r in rows] == list(range(1, 9)) and rows[0]["loss"] == pytest.approx(0.5, abs=1e-3)
    assert rows[-1]["loss"] < rows[0]["loss"] and "kl" in rows[-1]
    assert run_view.table_row(run.facts())[run_view.TABLE_COLUMNS.index("Stage")] == "kto"


# ---- from an sft run to preferences --------------------------------------------------------------------------------


def _summed_logps(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """Each sequence's summed log-probability of its completion tokens, computed here without TRL."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
    picked = logits.log_softmax(-1).gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    return (picked * batch["completion_mask"][:, 1:]).sum(-1)


@pytest.mark.slow
def test_dpo_from_an_sft_run_uses_the_sft_adapter_as_its_reference(app_model_dir, app_data_file, pairs_file,
                                                                    runs_root, one_thread):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from denselora_app.engine.train import make_trainer, prepare, process_state, training_arguments
    from denselora_app.runs import resolve_run

    sft = launch(tiny_run_config(app_model_dir, app_data_file, run_name="sft"), background=False)
    assert execute(sft) == RunState.COMPLETED
    with pytest.raises(LaunchError, match=r"^init_adapter '.*sft': its adapter was trained with other settings; set "
                                          r"r=4"):
        launch(tiny_run_config(app_model_dir, pairs_file, stage="dpo", r=8, init_adapter=sft.id), background=False)
    with pytest.raises(LaunchError, match="^init_adapter 'no-such-run': "):
        launch(tiny_run_config(app_model_dir, pairs_file, stage="dpo", init_adapter="no-such-run"), background=False)

    cfg = tiny_run_config(app_model_dir, pairs_file, stage="dpo", batch_size=4, init_adapter=str(sft.path),
                          run_name="from-sft")
    run = launch(cfg, background=False)
    assert run.config().init_adapter == sft.id, "the run folder records the run it started from"
    setup = prepare(run, run.config(), process_state("cpu"))
    trainer = make_trainer(setup, training_arguments(run.config(), setup, output_dir=run.checkpoints_dir,
                                                     show_progress=False), [], show_progress=False)
    batch = next(iter(trainer.get_train_dataloader()))
    reference = torch.cat(trainer.compute_ref_log_probs(trainer.model, batch))

    base = AutoModelForCausalLM.from_pretrained(app_model_dir).eval()
    assert not torch.allclose(reference, _summed_logps(base, batch), atol=1e-3), "not the bare base"
    sft_model = PeftModel.from_pretrained(base, resolve_run(sft.id).adapter_dir).eval()
    torch.testing.assert_close(reference, _summed_logps(sft_model, batch), atol=1e-4, rtol=1e-5)

    assert execute(run) == RunState.COMPLETED
    assert not (run.adapter_dir / "ref").exists(), "the frozen reference is not part of the trained adapter"
    first = run.metrics()[0]
    assert first["rewards/chosen"] == pytest.approx(0.0, abs=1e-5), "the policy starts as its reference"
