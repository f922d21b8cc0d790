"""Evaluation: answer extraction, row validation, log-likelihood scoring, loss/perplexity, eval.json, the CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import tiny_llama, tiny_llama_config, tiny_tokenizer
from numerics import assert_close_for, causal_lm_terms
from peft import get_peft_model

from denselora_app.cli import main
from denselora_app.config import RunConfig
from denselora_app.denselora import DenseLoraConfig
from denselora_app.engine import models
from denselora_app.engine.data import prepare_data
from denselora_app.runs import Run, create_run
from denselora_app.serving import evaluate as evaluation
from denselora_app.serving.chat import ChatEngine
from denselora_app.serving.evaluate import (
    SAMPLE_MC,
    EvalError,
    Question,
    choice_logprobs,
    evaluate,
    extract_choice,
    load_eval_data,
    parse_question,
    pick_choice,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread


def question(style: str, n: int = 4, answer: int = 1) -> Question:
    choices = ("true", "false") if style == "boolean" else tuple(f"choice {c}" for c in "wxyzv"[:n])
    return Question("q?", choices, answer, style, "test line 1")


@pytest.mark.parametrize("style, n, reply, expected", [
    ("answer", 4, "The correct answer is answer2.", 1),
    ("answer", 4, "Answer3", 2),
    ("answer", 4, "answer 1 because ... not answer4", 0),  # the first label wins
    ("answer", 4, "answer5", None),  # there is no fifth choice
    ("answer", 5, "answer5", 4),
    ("answer", 4, "answer12", None),
    ("option", 2, "option2", 1),
    ("option", 2, "answer1", None),  # another style's label is not an answer
    ("solution", 2, "I pick Solution1.", 0),
    ("ending", 4, "ending4 fits best", 3),
    ("boolean", 2, "False, it is not.", 1),
    ("boolean", 2, "It is TRUE", 0),
    ("letter", 4, "B) choice x", 1),
    ("letter", 4, "The answer is (C).", 2),
    ("letter", 4, "D", 3),
    ("letter", 4, "A copper heron, I think", None),  # the word "A" is not the letter A
    ("letter", 4, "E", None),
    ("answer", 4, "I do not know.", None),
    ("answer", 4, "", None),
    ("answer", 4, "\ufffd\x00\x1b[0m ###", None),
])
def test_answer_patterns(style, n, reply, expected):
    assert extract_choice(reply, question(style, n), strict=True) == expected


def test_a_reply_naming_one_choice_counts_unless_strict():
    q = question("answer")
    assert extract_choice("It is Choice Y, clearly.", q) == 2
    assert extract_choice("It is Choice Y, clearly.", q, strict=True) is None
    assert extract_choice("choice x or choice y", q) is None  # two named: ambiguous, wrong
    assert extract_choice("answer1, though choice y sounds right", q) == 0  # a label beats a named choice
    numbers = Question("Which is the largest?", ("45", "145", "14", "450"), 1, "answer", "x")
    assert extract_choice("the correct answer is 145", numbers) == 1  # not also 45 or 14
    assert extract_choice("the correct answer is 450.", numbers) == 3


def test_answer_forms_and_styles():
    row = {"question": "Pick one", "choices": ["red", "green", "blue"]}
    assert parse_question({**row, "answer": 2}, "x").answer == 2
    assert parse_question({**row, "answer": " Green "}, "x").answer == 1
    assert parse_question({**row, "answer": "answer3"}, "x").answer == 2
    by_letter = parse_question({**row, "answer": "B"}, "x")
    assert (by_letter.answer, by_letter.style) == (1, "letter")
    assert parse_question({**row, "choices": ["red", "blue"], "answer": "option2"}, "x").style == "option"
    boolean = parse_question({"question": "Is it?", "choices": ["True", "False"], "answer": "false"}, "x")
    assert (boolean.style, boolean.answer, boolean.labels()) == ("boolean", 1, ["true", "false"])
    assert evaluation.choice_prompt(by_letter).endswith("A. red\nB. green\nC. blue\n\nAnswer format: A/B/C")


@pytest.mark.parametrize("row, message", [
    ({"choices": ["a", "b"], "answer": 0}, "'question' must be non-empty text"),
    ({"question": "q", "choices": ["a"], "answer": 0}, "at least two"),
    ({"question": "q", "choices": ["a", "A"], "answer": 0}, "the same text"),
    ({"question": "q", "choices": ["a", "b"], "answer": 2}, "out of range.*0 to 1"),
    ({"question": "q", "choices": ["a", "b"], "answer": True}, "missing or empty"),
    ({"question": "q", "choices": ["a", "b"], "answer": "answer3"}, "choice 3, but there are only 2"),
    ({"question": "q", "choices": ["a", "b"], "answer": "maybe"}, "neither a choice nor a label"),
    ({"question": "q", "choices": ["a", "b", "c"], "answer": "option1"}, "'option' answer format allows at most 2"),
    ({"question": "q", "choices": ["a", "b"], "answer": 0, "style": "essay"}, "unknown style"),
])
def test_bad_rows_are_refused_with_their_line(row, message):
    with pytest.raises(EvalError, match=f"^mc.jsonl line 4: .*{message}"):
        parse_question(row, "mc.jsonl line 4")


def test_files_are_validated_line_by_line(tmp_path):
    good = {"question": "q", "choices": ["a", "b"], "answer": 0}
    path = tmp_path / "mc.jsonl"
    path.write_text(json.dumps(good) + "\n\n" + json.dumps({**good, "answer": 5}) + "\n")
    with pytest.raises(EvalError, match="mc.jsonl line 3: answer 5 is out of range"):
        load_eval_data(path)
    path.write_text(json.dumps(good) + "\n{oops\n")
    with pytest.raises(EvalError, match="mc.jsonl line 2: not valid JSON"):
        load_eval_data(path)
    with pytest.raises(EvalError, match="file not found"):
        load_eval_data(tmp_path / "missing.jsonl")
    shipped = load_eval_data(None, limit=5)
    assert shipped.name == SAMPLE_MC.name and len(shipped.questions) == 5 and shipped.kind == "choices"
    assert all(len(q.choices) == 4 for q in load_eval_data().questions)


def test_pick_choice_normalises_by_length():
    assert pick_choice([[-1.0, -1.0], [-0.2, -0.4, -0.3], [-5.0]]) == 1
    assert pick_choice([[-0.5] * 10, [-1.0]]) == 0  # a sum would prefer the short choice
    assert pick_choice([[], [-9.0]]) == 1  # a choice with no tokens never wins


class OneTokenLM(torch.nn.Module):
    """A language model whose answer we control: it always predicts the same tokens, whatever the input."""

    def __init__(self, favoured: list[int], vocab_size: int = 320) -> None:
        super().__init__()
        self.scores = torch.nn.Parameter(torch.zeros(vocab_size))
        with torch.no_grad():
            self.scores[favoured] = 20.0

    def forward(self, input_ids, attention_mask=None):
        return SimpleNamespace(logits=self.scores.expand(*input_ids.shape, -1))


def test_loglik_picks_the_choice_the_model_predicts():
    tokenizer = tiny_tokenizer()
    choices = ("dog", "yes", "fox")
    ids = [tokenizer(c, add_special_tokens=False).input_ids for c in choices]
    assert not set(ids[1]) & (set(ids[0]) | set(ids[2]))
    q = Question("is it?", choices, 1, "answer", "test line 1")
    logprobs = choice_logprobs(OneTokenLM(ids[1]), tokenizer, q)
    assert [len(lp) for lp in logprobs] == [len(i) for i in ids]  # exactly each choice's tokens are scored
    assert pick_choice([lp.tolist() for lp in logprobs]) == 1
    assert logprobs[1].mean() > -0.01 and logprobs[0].mean() < -10


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """A tiny base model, a run with a (random, non-zero) DenseLoRA adapter, and a small messages file."""
    root = tmp_path_factory.mktemp("evaluate")
    tiny_llama(max_position_embeddings=512).save_pretrained(root / "model")
    tiny_tokenizer().save_pretrained(root / "model")
    run = create_run(RunConfig(model=str(root / "model"), data="unused.jsonl", run_name="tiny", device="cpu"),
                     root / "runs")
    torch.manual_seed(0)
    config = DenseLoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "up_proj"], init_weights=False)
    get_peft_model(models.load_model(str(root / "model"), device="cpu"), config).save_pretrained(run.adapter_dir)
    run.update_status(state="completed")
    rows = [{"messages": [{"role": "user", "content": f"what is the capital of {c}?"},
                          {"role": "assistant", "content": "the quick brown fox"}]} for c in ("a", "the dog", "no")]
    (root / "held_out.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


@pytest.fixture(scope="module")
def engine(workspace) -> ChatEngine:
    return ChatEngine(device="cpu", runs_root=workspace / "runs")


def test_results_are_saved_merged_and_the_base_reused(workspace, engine, monkeypatch):
    (run_dir,) = (workspace / "runs").iterdir()
    runs, held_out = workspace / "runs", workspace / "held_out.jsonl"
    table = evaluate(run_dir.name, loss_data=held_out, mode="loglik", limit=3, engine=engine, root=runs)
    base, adapter = table.results
    assert (base.model, adapter.model, table.mode) == ("base", run_dir.name, "loglik")
    for result in (base, adapter):
        assert result.total == 3 and len(result.items) == 3 and 0 <= result.accuracy <= 1
        assert_close_for(result.perplexity, math.exp(result.loss), terms=1, dtype=torch.float64)  # one exp
        assert result.answer_tokens > 3
    assert base.loss != adapter.loss and base.trainable_percent is None and 0 < adapter.trainable_percent < 100
    assert [row["model"] for row in table.rows()] == [f"base: {workspace / 'model'}", run_dir.name]
    assert run_dir.name in table.to_text()

    scored = []
    score = evaluation._score
    monkeypatch.setattr(evaluation, "_score", lambda *a, **k: scored.append(k["label"]) or score(*a, **k))
    generated = evaluate(run_dir.name, mode="generate", limit=3, engine=engine, root=runs)
    assert generated.results[1].unanswered is not None and len(generated.results[1].items[0].output) > 0
    assert generated.results[1].loss is None  # no held-out data this time
    again = evaluate(run_dir.name, loss_data=held_out, mode="loglik", limit=3, engine=engine, root=runs)
    assert scored == ["base", run_dir.name, run_dir.name]  # the base's loglik result came from eval.json
    assert again.results[0].created_at == base.created_at
    # Recomputed in float32: each row's chain to its log-probabilities, and the sum over the answer tokens.
    longest = max(len(e["input_ids"]) for e in prepare_data(str(held_out), engine.tokenizer).train)
    terms = causal_lm_terms(tiny_llama_config(), longest) + adapter.answer_tokens
    assert_close_for(again.results[1].loss, adapter.loss, terms=terms, dtype=torch.float32)

    saved = Run(run_dir).evaluation()
    assert sorted(r["mode"] for r in saved["results"]) == ["generate", "loglik"]  # the newer loglik replaced one
    assert max(r["created_at"] for r in saved["results"] if r["mode"] == "loglik") == again.results[1].created_at
    assert sorted(r["mode"] for r in saved["base"]) == ["generate", "loglik"]
    assert "items" not in saved["results"][0]


def test_loss_on_a_data_file_is_the_training_loss(workspace, engine):
    (run_dir,) = (workspace / "runs").iterdir()
    table = evaluate(str(run_dir / "adapter"), workspace / "held_out.jsonl", limit=1, engine=engine, save=False)
    base, _ = table.results
    assert table.mode == "loss" and base.accuracy is None and base.total == 1 and base.loss_dataset == "held_out.jsonl"
    # One example: the model's own loss (a mean over the answer tokens) is the same number.
    tokenizer = engine.tokenizer
    example = prepare_data(str(workspace / "held_out.jsonl"), tokenizer).train[0]
    fresh = models.load_model(str(workspace / "model"), device="cpu")
    with torch.no_grad():
        expected = fresh(input_ids=torch.tensor([example["input_ids"]]),
                         labels=torch.tensor([example["labels"]])).loss.item()
    # Float32 both ways: the chain to the log-probabilities and the mean over the answer tokens. The perplexity's
    # relative error is the loss's absolute error.
    terms = causal_lm_terms(fresh.config, len(example["input_ids"])) + len(example["input_ids"])
    assert_close_for(base.loss, expected, terms=terms, dtype=torch.float32)
    assert_close_for(base.perplexity, math.exp(expected), terms=terms, dtype=torch.float32,
                     scale=math.exp(expected) * abs(expected))


def test_cli_eval(workspace, monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("DENSELORA_RUNS", str(workspace / "runs"))
    (run_dir,) = (workspace / "runs").iterdir()
    held_out = workspace / "held_out.jsonl"
    assert main(["eval", run_dir.name, "--limit", "2", "--mode", "loglik", "--loss-data", str(held_out)]) == 0
    out = capsys.readouterr().out
    assert "studio_facts_mc.jsonl: 2 questions, mode loglik; loss on held_out.jsonl" in out
    assert "ACCURACY" in out and "base: " in out and run_dir.name in out
    assert f"Saved to {run_dir / 'eval.json'}" in out

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "q", "choices": ["a", "b"], "answer": 0}) + "\n"
                   + json.dumps({"question": "q", "choices": "a, b", "answer": 0}) + "\n")
    for args, message in ((["--data", str(bad)], "bad.jsonl line 2: 'choices' must be a list"),
                          (["--loss-data", str(SAMPLE_MC)], "is a multiple-choice set; loss data is"),
                          (["--limit", "0"], "limit must be at least 1"),
                          (["--checkpoint", "3"], "has no checkpoint 3; it has no checkpoints")):
        assert main(["eval", run_dir.name, *args]) == 2
        err = capsys.readouterr().err
        assert "error: " in err and message in err and "Traceback" not in err
