"""Packing (padding-free batches): the same losses as padded batches, the fallback, the token count, the report."""

from __future__ import annotations

import itertools
import json
import logging
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_llama, tiny_tokenizer
from numerics import assert_close_for, causal_lm_terms, tolerance_for
from peft import get_peft_model
from transformers import (
    AutoConfig,
    BloomConfig,
    BloomForCausalLM,
    DataCollatorForSeq2Seq,
    DataCollatorWithFlattening,
    TrainingArguments,
)

from denselora_app.config import RunConfig
from denselora_app.engine.data import DataReport, padding_per_step, prepare_data
from denselora_app.engine.methods import build_peft_config
from denselora_app.engine.train import StudioTrainer, collator_for, packing_problem
from denselora_app.engine.worker import execute
from denselora_app.runs import create_run

LENGTHS = (5, 17, 9, 30, 2, 12)


def rows(lengths=LENGTHS, seed: int = 0) -> list[dict]:
    """Rows of random tokens; even rows train their answer (last two thirds), odd rows every token (label at 0 too)."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for n, length in enumerate(lengths):
        ids = torch.randint(3, 300, (length,), generator=generator).tolist()
        labels = list(ids) if n % 2 else [-100 if i < length // 3 else t for i, t in enumerate(ids)]
        out.append({"input_ids": ids, "attention_mask": [1] * length, "labels": labels})
    return out


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-position next-token loss, 0 where nothing is trained (the models' own shift), in float32 or better."""
    targets = F.pad(labels, (0, 1), value=-100)[..., 1:]
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=-100, reduction="none")


def row_losses_padded(model, batch) -> torch.Tensor:
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return token_losses(out.logits, batch["labels"]).sum(-1)


def row_losses_packed(model, batch) -> torch.Tensor:
    out = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"])
    losses = token_losses(out.logits, batch["labels"])[0]
    row = (batch["position_ids"][0] == 0).cumsum(0) - 1  # the row each token belongs to
    return torch.zeros(int(row.max()) + 1, dtype=losses.dtype).index_add(0, row, losses)


def packing_config(packing: bool = True) -> RunConfig:
    return RunConfig(packing=packing, device="cpu")


def packing_model(attention: str = "sdpa"):
    """The tiny LLaMA in float64, its weights 10x the default initialisation's. With the default ones attention is
    nearly uniform, and rows that saw each other differ by a few parts in 10^5, no more than float32 rounding along
    the model may; here they differ by percents (next test), and float64 keeps the comparison sharp on any CPU."""
    return tiny_llama(dtype=torch.float64, attn_implementation=attention, initializer_range=0.2)


def rounding(config, attention: str, *, backward: bool = False) -> dict:
    """What the float64 comparisons of row losses (or, ``backward``, of gradients) allow for rounding: the whole chain
    to a row's loss in float64 and, for a gradient, back and over every token; but eager attention computes its
    softmax in float32 (transformers' choice), 2 * longest terms a layer, which then dominates."""
    longest = max(LENGTHS)
    if attention == "eager":
        return dict(terms=config.num_hidden_layers * 2 * longest * (2 if backward else 1), dtype=torch.float32)
    return dict(terms=causal_lm_terms(config, longest, backward=backward) + (sum(LENGTHS) if backward else longest))


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_batches_give_every_row_the_loss_and_gradient_of_a_padded_batch(attention):
    tokenizer = tiny_tokenizer()
    model = get_peft_model(packing_model(attention), build_peft_config(RunConfig(r=4, dropout=0.0)))
    model.config.use_cache = False  # as the Trainer sets it
    features = rows()
    packed_collator, sampling = collator_for(packing_config(), tokenizer, model)
    assert isinstance(packed_collator, DataCollatorWithFlattening) and sampling == "random"
    padded_collator, sampling = collator_for(packing_config(False), tokenizer, model)
    assert isinstance(padded_collator, DataCollatorForSeq2Seq) and sampling == "random"
    packed, padded = packed_collator(features), padded_collator(features)
    assert "attention_mask" not in packed and packed["input_ids"].shape == (1, sum(LENGTHS))

    model.train()
    grads = []
    for losses_of, batch in ((row_losses_padded, padded), (row_losses_packed, packed)):
        model.zero_grad()
        losses = losses_of(model, batch)
        losses.sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
        if losses_of is row_losses_padded:
            padded_losses = losses.detach()
        else:
            packed_losses = losses.detach()
    assert packed_losses.shape == (len(LENGTHS),) and packed_losses.dtype == torch.float64
    assert_close_for(packed_losses, padded_losses, **rounding(model.config, attention))
    for name in grads[0]:
        assert_close_for(grads[1][name], grads[0][name], **rounding(model.config, attention, backward=True), msg=name)
    # The model's own mean loss agrees too (the Trainer's loss), computed in float32 from the logits on: the
    # log-softmax and the mean over every token (and eager attention's softmax).
    with torch.no_grad():
        loss_terms = model.config.vocab_size + sum(LENGTHS)
        if attention == "eager":
            loss_terms += rounding(model.config, attention)["terms"]
        assert_close_for(model(**packed).loss, model(**padded).loss, terms=loss_terms, dtype=torch.float32)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_without_restarting_positions_rows_would_see_each_other(attention):
    """The check above is not vacuous: the same joined rows without position ids give other losses."""
    model = packing_model(attention)
    packed = DataCollatorWithFlattening(return_position_ids=True)(rows())
    plain = {"input_ids": packed["input_ids"], "labels": packed["labels"],
             "position_ids": torch.arange(sum(LENGTHS)).unsqueeze(0)}  # one long row
    with torch.no_grad():
        separate = row_losses_packed(model, packed)
        seen = token_losses(model(input_ids=plain["input_ids"]).logits, plain["labels"])[0]
    row = (packed["position_ids"][0] == 0).cumsum(0) - 1
    joined = torch.zeros(len(LENGTHS), dtype=seen.dtype).index_add(0, row, seen)
    tolerance = rounding(model.config, attention)
    assert_close_for(joined[0], separate[0], **tolerance, scale=separate.abs().max())  # row 0 sees nothing before it
    # Each of the others does, far beyond the tolerance above.
    assert (joined[1:] - separate[1:]).abs().min() > 10 * tolerance_for(separate, **tolerance)["atol"]


def test_a_model_that_cannot_pack_falls_back_to_length_grouped_batches(caplog):
    assert packing_problem(tiny_llama()) is None
    torch.manual_seed(0)
    bloom = BloomForCausalLM(BloomConfig(vocab_size=320, hidden_size=32, n_layer=2, n_head=4)).eval()
    problem = packing_problem(bloom)
    assert problem is not None and "BloomForCausalLM" in problem and "attend to the rows joined before it" in problem
    assert not bloom.training  # the probe leaves the model's mode as it was
    with caplog.at_level(logging.INFO, logger="denselora_app.engine.train"):
        collator, sampling = collator_for(packing_config(), tiny_tokenizer(), bloom)
    assert isinstance(collator, DataCollatorForSeq2Seq) and sampling == "group_by_length"
    lines = [r.getMessage() for r in caplog.records if r.name == "denselora_app.engine.train"]
    assert len(lines) == 1 and lines[0].startswith("Packing is not possible here: BloomForCausalLM")
    assert "Batching rows of similar length instead" in lines[0]


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.mark.parametrize("mode", ["padded", "packed", "length-grouped"])
def test_tokens_seen_are_the_real_tokens_in_every_mode(mode, tmp_path, one_thread):
    """What the live tokens/s counts: every real token once, no padding, and no warning at every step."""
    tokenizer = tiny_tokenizer()
    model = get_peft_model(tiny_llama(), build_peft_config(RunConfig(r=4, dropout=0.0)))
    collator, sampling = collator_for(packing_config(mode == "packed"), tokenizer, model)
    if mode == "length-grouped":
        sampling = "group_by_length"
    import datasets

    train = datasets.Dataset.from_list(rows(LENGTHS * 2))
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, num_train_epochs=1,
                             train_sampling_strategy=sampling, include_num_input_tokens_seen="non_padding",
                             remove_unused_columns=False, use_cpu=True, save_strategy="no", report_to="none",
                             disable_tqdm=True, logging_steps=1, seed=0)
    trainer = StudioTrainer(model=model, args=args, train_dataset=train, data_collator=collator)
    records = _Records()
    transformers_log = logging.getLogger("transformers")
    transformers_log.addHandler(records)
    try:
        trainer.train()
    finally:
        transformers_log.removeHandler(records)
    assert trainer.state.num_input_tokens_seen == 2 * sum(LENGTHS)
    assert not [m for m in records.messages if "tokens" in m], records.messages


def test_padding_per_step_is_the_exact_expectation_over_random_batches():
    lengths = [3, 10, 5, 7, 1, 7, 2]
    for batch_size in (1, 2, 3, 7):
        batches = list(itertools.combinations(lengths, batch_size))
        expected_longest = sum(max(b) for b in batches) / len(batches)
        figures = padding_per_step(lengths, batch_size, grad_accum=3)
        float64 = dict(terms=len(batches), dtype=torch.float64)  # sums of at most len(batches) terms
        assert_close_for(figures["real_tokens_per_step"], 3 * batch_size * sum(lengths) / len(lengths), **float64)
        assert_close_for(figures["padded_tokens_per_step"], 3 * batch_size * expected_longest, **float64)
        assert_close_for(figures["padding_fraction"],
                         1 - figures["real_tokens_per_step"] / figures["padded_tokens_per_step"], **float64)
    assert padding_per_step(lengths, 1)["padding_fraction"] == 0  # one row per batch: nothing to pad
    assert padding_per_step([8, 8, 8], 2)["padding_fraction"] == 0
    assert padding_per_step(lengths, 50) == padding_per_step(lengths, len(lengths))  # one batch of every row
    # Fast and stable for a large dataset: the longest of k rows drawn from lengths 1..n is k (n + 1) / (k + 1).
    big = padding_per_step(list(range(1, 100_001)), 8, 4)
    expected = 4 * 8 * 8 * 100_001 / 9
    # A float64 sum of 10^5 log-counts, up to log C(99999, 7) = 72: exp makes their rounding relative error.
    assert_close_for(big["padded_tokens_per_step"], expected, terms=100_000, dtype=torch.float64,
                     scale=expected * math.log(math.comb(99_999, 7)))


def test_the_data_report_gives_the_tokens_per_step_and_the_padding(tmp_path, tokenizer):
    path = tmp_path / "d.jsonl"
    answers = ["yes", "the quick brown fox jumps over the lazy dog " * 4, "no", "the lazy dog", "a fox " * 9, "no"]
    path.write_text("".join(json.dumps({"prompt": "what is the capital of a country?", "completion": a}) + "\n"
                            for a in answers))
    report = prepare_data(str(path), tokenizer, batch_size=2, grad_accum=3).report
    lengths = [len(e["input_ids"]) for e in prepare_data(str(path), tokenizer).train]
    figures = padding_per_step(lengths, 2, 3)
    assert (report.batch_size, report.grad_accum) == (2, 3)
    assert report.tokens_per_step == pytest.approx(figures["real_tokens_per_step"], abs=0.05)
    assert report.padded_tokens_per_step == pytest.approx(figures["padded_tokens_per_step"], abs=0.05)
    assert 0.2 < report.padding_fraction < 0.8
    line = next(line for line in report.summary().splitlines() if line.startswith("per optimizer step"))
    assert line.startswith("per optimizer step (2 x 3 rows): ")
    assert f"{100 * report.padding_fraction:.0f}% of them padding, which packing removes" in line
    # Without a batch size (a preview, a pre-flight check) the figures are absent, and older reports still load.
    plain = prepare_data(str(path), tokenizer).report
    assert plain.tokens_per_step == 0 and "per optimizer step" not in plain.summary()
    old = {k: v for k, v in report.to_dict().items()
           if k not in ("batch_size", "grad_accum", "tokens_per_step", "padded_tokens_per_step", "padding_fraction")}
    assert DataReport(**old).tokens_per_step == 0


# ---- end to end: a run with packing trains the same losses as one without ----------------------------------------


def test_a_packed_run_follows_the_padded_runs_loss_curve(app_model_dir, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("DENSELORA_RUNS", str(tmp_path / "runs"))
    data = tmp_path / "train.jsonl"
    words = "the quick brown fox jumps over the lazy dog".split()
    data.write_text("".join(
        json.dumps({"messages": [{"role": "user", "content": f"what is the capital of {words[i % 9]}?"},
                                 {"role": "assistant", "content": " ".join(words[: 1 + (i * 5) % 9] * (1 + i % 3))}]})
        + "\n" for i in range(16)))
    curves = {}
    for packing in (False, True):
        cfg = RunConfig(model=str(app_model_dir), data=str(data), r=4, alpha=8, dropout=0.0, learning_rate=1e-2,
                        max_steps=4, batch_size=4, grad_accum=2, warmup_steps=0, lr_scheduler="constant",
                        save_steps=100, cutoff_len=64, device="cpu", packing=packing, run_name=f"packing-{packing}")
        run = create_run(cfg)
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="denselora_app.engine.train"):
            assert execute(run) == "completed"
        metrics = [m for m in run.metrics() if "loss" in m]
        assert all(m["tokens_per_second"] > 0 for m in metrics)
        curves[packing] = [m["loss"] for m in metrics]
        report = run.data_report()
        assert report["batch_size"] == 4 and report["grad_accum"] == 2
        assert report["tokens_per_step"] > 0 and report["padded_tokens_per_step"] > report["tokens_per_step"]
        if packing:
            assert "Packing: the rows of each batch are joined into one sequence" in caplog.text
        else:
            assert "Packing" not in caplog.text
    assert len(curves[True]) == 4
    # Float32 both ways; step s's loss carries the rounding of s steps, each a forward and backward pass over rows of
    # up to cutoff_len tokens and the sums over the step's batch_size * grad_accum rows.
    config = AutoConfig.from_pretrained(app_model_dir)
    per_step = causal_lm_terms(config, cfg.cutoff_len, backward=True) + cfg.batch_size * cfg.grad_accum * cfg.cutoff_len
    assert_close_for(curves[True], curves[False], terms=cfg.max_steps * per_step, dtype=torch.float32)
