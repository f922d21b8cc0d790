"""Pairwise preference accuracy on held-out pairs: how often a model gives the chosen answer a higher summed
log-probability than the rejected one, after the same prompt, for the adapter and for its base.

The pairs are read and rendered as stage dpo trains on them (engine/preferences.py: the same layouts, template and
closing token), so the score is of what training optimised. ``serving/evaluate.py`` hands held-out data with
``chosen`` and ``rejected`` columns here; the result is an ``EvalResult`` in mode ``pairwise``, saved to eval.json
like any other.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from denselora_app.engine.data import IGNORE_INDEX, common_prefix_len
from denselora_app.engine.preferences import Pair, prepare_pairs
from denselora_app.engine.sources import DataError
from denselora_app.serving.evaluate import EvalError

def pair_examples(tokenizer: Any, pair: Pair) -> list[dict[str, list[int]]]:
    """The chosen and the rejected sequence, with only each answer's tokens labelled (as TRL's DPO sums them)."""
    prompt_ids = tokenizer(pair.prompt)["input_ids"]
    examples = []
    for answer in (pair.chosen, pair.rejected):
        ids = tokenizer(pair.prompt + answer)["input_ids"]
        start = common_prefix_len(prompt_ids, ids)  # a token may merge across the seam
        examples.append({"input_ids": ids, "labels": [IGNORE_INDEX] * start + ids[start:]})
    return examples


def read_pairs(source: str, tokenizer: Any, *, cutoff_len: int, limit: int | None) -> list[Pair]:
    """The usable pairs of ``source`` (the first ``limit``), rendered for ``tokenizer``."""
    try:
        prepared = prepare_pairs(source, tokenizer, cutoff_len=cutoff_len, val_size=0)
    except DataError as err:
        raise EvalError(str(err)) from None
    return [Pair(**row) for row in prepared.train.to_list()][:limit]


def pairwise_scores(score: Callable[[list[dict[str, list[int]]]], list[Any]], tokenizer: Any, source: str, *,
                    cutoff_len: int, limit: int | None, batch_size: int,
                    report: Callable[[int, int, str], None]) -> dict[str, Any]:
    """``accuracy``, ``correct`` and ``total`` of one model on the pairs; ``score`` gives each example's labelled
    tokens' log-probabilities (one padded batch). A tie (equal sums) counts as wrong."""
    pairs = read_pairs(source, tokenizer, cutoff_len=cutoff_len, limit=limit)
    per_batch = max(batch_size // 2, 1)  # two sequences a pair
    correct = 0
    for start in range(0, len(pairs), per_batch):
        batch = pairs[start:start + per_batch]
        logprobs = score([example for pair in batch for example in pair_examples(tokenizer, pair)])
        for chosen, rejected in zip(logprobs[::2], logprobs[1::2]):
            correct += float(chosen.sum()) > float(rejected.sum())
        report(min(start + per_batch, len(pairs)), len(pairs), "pair")
    return {"total": len(pairs), "accuracy": correct / len(pairs), "correct": correct}
