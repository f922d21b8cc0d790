"""Evaluate adapters against their base model: multiple-choice accuracy, and loss / perplexity on held-out data.

Data is either

* a multiple-choice set: one JSON object per line, ``{"question": str, "choices": [str, ...], "answer": ...}`` where
  ``answer`` is a 0-based index, the text of a choice, or a label such as ``"answer2"`` (1-based, like the labels
  the model is asked for); an optional ``"style"`` picks the label format (``answer``, ``option``, ``solution``,
  ``ending``, ``letter`` or ``boolean``), otherwise it follows the answer's label, or ``boolean`` for true/false
  choices, or ``answer``. The set shipped with the app is :data:`SAMPLE_MC`.
* any file engine/sources.py reads (alpaca, messages, ...): held-out data, scored by loss (as ``data``, or as
  ``loss_data`` next to a multiple-choice set, to get both in one table).

Multiple choice follows the LLM-Adapters commonsense protocol in ``generate`` mode: the question and its labelled
options in the prompt, greedy decoding, the first label found in the reply (``answer1``..``answer5``,
``option1``/``option2``, ``solution1``/``solution2``, ``ending1``..``ending4``, ``true``/``false``, or a letter
A-E) is the model's choice, and a reply with no label counts as wrong. Unless ``strict``, a reply with no label that
names exactly one choice's text counts as that choice (fine-tuned chat adapters answer in prose). ``loglik`` mode
generates nothing: each choice is scored by its mean token log-probability after the question, the best one wins.

Loss is the mean negative log-likelihood per answer token over the whole held-out set, with the rendering and label
masking of training (engine/data.py); perplexity is exp(loss).

Results go to each run's ``eval.json``: ``{"results": [...], "base": [...]}``, one entry per (dataset, mode,
checkpoint) for the adapter and per (dataset, mode, base model) for the base, newest replacing older.
"""

from __future__ import annotations

import hashlib
import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from denselora_app.config import StudioError
from denselora_app.engine.data import IGNORE_INDEX, common_prefix_len, prepare_data
from denselora_app.engine.formats import PAIR_COLUMNS
from denselora_app.engine.sources import SAMPLES_DIR, DataError, read_source
from denselora_app.runs import Run
from denselora_app.serving.adapters import AdapterRef, ChatError, resolve_adapter
from denselora_app.serving.chat import ChatEngine, GenerationSettings
from denselora_app.serving.prompts import build_messages, render_prompt

SAMPLE_MC: Path = SAMPLES_DIR / "studio_facts_mc.jsonl"
MODES = ("generate", "loglik")
STYLES: dict[str, int] = {"answer": 5, "option": 2, "solution": 2, "ending": 4, "letter": 5, "boolean": 2}
LETTERS = "ABCDE"
GENERATE_TOKENS = 32  # long enough for a label and a short sentence, as in the protocol
_LABEL = re.compile(r"^(answer|option|solution|ending)\s*(\d+)$", re.I)

Progress = Callable[[float, str], Any]  # gr.Progress fits: progress(fraction, description)


class EvalError(StudioError, ValueError):
    """Evaluation data or settings that cannot be used; the message names the file and line."""


# ---- data --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Question:
    question: str
    choices: tuple[str, ...]
    answer: int  # index into choices
    style: str  # a key of STYLES
    where: str  # "file.jsonl line 3", for messages

    def labels(self) -> list[str]:
        """What the model is asked to reply with, per choice."""
        if self.style == "boolean":
            return [c.lower() for c in self.choices]
        if self.style == "letter":
            return list(LETTERS[: len(self.choices)])
        return [f"{self.style}{i}" for i in range(1, len(self.choices) + 1)]


@dataclass(frozen=True)
class EvalData:
    name: str  # the file name (or Hub dataset), the key results are saved under
    sha: str  # of the file's bytes, so a changed file is not mistaken for the old one; "" for a Hub dataset
    source: str
    questions: list[Question] | None  # None: training-format data, scored by loss only
    limit: int | None = None  # the first N questions or examples
    pairs: bool = False  # preference pairs, scored by pairwise accuracy (serving/preference_eval.py)

    @property
    def kind(self) -> str:
        return "choices" if self.questions is not None else "pairs" if self.pairs else "loss"


def load_eval_data(source: str | Path | None = None, limit: int | None = None) -> EvalData:
    """Read and validate an evaluation set (default: the shipped multiple-choice set); ``limit`` keeps the first N."""
    if limit is not None and limit < 1:
        raise EvalError(f"limit must be at least 1, got {limit}.")
    source = str(source or SAMPLE_MC)
    try:
        src = read_source(source)
    except DataError as err:
        raise EvalError(str(err)) from None
    path = Path(source).expanduser()
    sha = hashlib.sha256(path.read_bytes()).hexdigest()[:12] if path.is_file() else ""
    if not any("choices" in row for row in src.rows):
        pairs = any(all(c in row for c in PAIR_COLUMNS) for row in src.rows)
        return EvalData(src.name, sha, source, None, limit, pairs=pairs)
    if src.problems:
        raise EvalError(src.problems[0][1])
    questions = [parse_question(row, f"{src.name} {where}") for row, where in zip(src.rows, src.where)]
    return EvalData(src.name, sha, source, questions[:limit], limit)


def parse_question(row: dict[str, Any], where: str) -> Question:
    """One multiple-choice row, validated; EvalError names ``where`` and what to fix."""
    question = row.get("question")
    if not isinstance(question, str) or not question.strip():
        raise EvalError(f"{where}: 'question' must be non-empty text.")
    choices = row.get("choices")
    if (not isinstance(choices, list) or len(choices) < 2
            or not all(isinstance(c, str) and c.strip() for c in choices)):
        raise EvalError(f"{where}: 'choices' must be a list of at least two non-empty texts.")
    if len({c.strip().casefold() for c in choices}) < len(choices):
        raise EvalError(f"{where}: two choices are the same text; make every choice different.")
    answer, label_style = _answer_index(row.get("answer"), choices, where)
    is_boolean = sorted(c.strip().casefold() for c in choices) == ["false", "true"]
    style = row.get("style") or label_style or ("boolean" if is_boolean else "answer")
    if style not in STYLES:
        raise EvalError(f"{where}: unknown style {style!r}; use one of {', '.join(STYLES)}.")
    if style == "boolean" and not is_boolean:
        raise EvalError(f"{where}: style 'boolean' needs the choices 'true' and 'false'.")
    if len(choices) > STYLES[style]:
        raise EvalError(f"{where}: {len(choices)} choices, but the '{style}' answer format allows at most "
                        f"{STYLES[style]}.")
    return Question(question.strip(), tuple(c.strip() for c in choices), answer, style, where)


def _answer_index(answer: Any, choices: list[str], where: str) -> tuple[int, str | None]:
    """The index the label names, and the style its form implies (None when it does not imply one)."""
    usage = "a 0-based index, the text of a choice, or a label such as 'answer2'"
    if isinstance(answer, int) and not isinstance(answer, bool):
        if 0 <= answer < len(choices):
            return answer, None
        raise EvalError(f"{where}: answer {answer} is out of range for {len(choices)} choices (0-based index: "
                        f"0 to {len(choices) - 1}).")
    if not isinstance(answer, str) or not answer.strip():
        raise EvalError(f"{where}: 'answer' is missing or empty; give {usage}.")
    text = answer.strip()
    for i, choice in enumerate(choices):
        if choice.strip().casefold() == text.casefold():
            return i, None
    if match := _LABEL.match(text):
        index, style = int(match[2]) - 1, match[1].lower()
    elif len(text) == 1 and text.upper() in LETTERS:
        index, style = LETTERS.index(text.upper()), "letter"
    else:
        raise EvalError(f"{where}: answer {text!r} is neither a choice nor a label; give {usage}.")
    if not 0 <= index < len(choices):
        raise EvalError(f"{where}: answer {text!r} names choice {index + 1}, but there are only {len(choices)}.")
    return index, style


# ---- multiple choice: prompts, answers, scores ---------------------------------------------------------------------


def choice_prompt(q: Question) -> str:
    """The question with its labelled options and the answer format, for ``generate`` mode."""
    labels = q.labels()
    if q.style == "boolean":
        return f"Answer the question below with true or false.\n\nQuestion: {q.question}\n\nAnswer format: true/false"
    noun = "answer" if q.style == "letter" else q.style
    options = "\n".join(
        f"{label}. {choice}" if q.style == "letter" else f"{label.capitalize()}: {choice}"
        for label, choice in zip(labels, q.choices)
    )
    return (f"Choose the correct {noun} for the question below and reply with its label.\n\n"
            f"Question: {q.question}\n\n{options}\n\nAnswer format: {'/'.join(labels)}")


def extract_choice(reply: str, q: Question, *, strict: bool = False) -> int | None:
    """The choice a generated reply names, or None when it names none (counted wrong). The first label wins."""
    n = len(q.choices)
    if q.style == "boolean":
        match = re.search(r"\b(true|false)\b", reply, re.I)
        index = q.labels().index(match[1].lower()) if match else None
    elif q.style == "letter":
        letters = LETTERS[:n]
        # Upper case only, and only after "answer" or alone at the start: "A" is also an English word.
        match = (re.search(rf"(?i:\banswer)(?:\s+is)?\s*[:\-]?\s*\(?([{letters}])\b", reply)
                 or re.match(rf"\s*\(?([{letters}])\)?\s*(?:[.:)]|$)", reply))
        index = letters.index(match[1]) if match else None
    else:
        match = re.search(rf"\b{q.style}\s*([1-{n}])(?!\d)", reply, re.I)
        index = int(match[1]) - 1 if match else None
    if index is None and not strict:
        # Whole words only: "145" names neither 14 nor 45.
        named = [i for i, choice in enumerate(q.choices)
                 if re.search(rf"(?<!\w){re.escape(choice.strip())}(?!\w)", reply, re.I)]
        index = named[0] if len(named) == 1 else None
    return index


def pick_choice(token_logprobs: Sequence[Sequence[float]]) -> int:
    """The choice with the highest mean log-probability per token (length-normalised); a choice with no tokens
    never wins."""
    means = [sum(lp) / len(lp) if len(lp) else -math.inf for lp in token_logprobs]
    return max(range(len(means)), key=means.__getitem__)


# ---- scoring one model ------------------------------------------------------------------------------------------


@dataclass
class ItemResult:
    question: str
    expected: str
    predicted: str | None  # the chosen choice's text, None when the reply named none
    correct: bool
    output: str  # the generated reply, or the per-choice mean log-probabilities


@dataclass
class EvalResult:
    model: str  # "base" or the adapter's label
    base_model: str
    dataset: str
    dataset_sha: str
    mode: str  # generate | loglik | loss
    total: int  # questions evaluated (examples, for held-out data alone)
    accuracy: float | None
    correct: int | None
    unanswered: int | None  # generate mode: replies naming no choice
    loss: float | None
    perplexity: float | None
    answer_tokens: int  # the loss is their mean
    loss_dataset: str | None  # the held-out data the loss is on
    loss_dataset_sha: str | None
    trainable_percent: float | None  # None for the base
    checkpoint: int | None = None
    limit: int | None = None
    strict: bool = False
    created_at: float = field(default_factory=time.time)
    items: list[ItemResult] = field(default_factory=list)  # per question, for the UI; not saved

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        del data["items"]
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> EvalResult:
        known = {f.name for f in fields(cls)} - {"items"}
        return cls(**{k: v for k, v in data.items() if k in known})


def _score(engine: ChatEngine, questions: list[Question] | None, held_out: EvalData | None, *, use_adapter: bool,
           mode: str, strict: bool, cutoff_len: int, batch_size: int, progress: Progress | None,
           label: str) -> dict[str, Any]:
    """The metrics of the engine's model (adapter on or off), as EvalResult fields."""
    def report(done: int, total: int, what: str) -> None:
        if progress is not None:
            progress(done / max(total, 1), f"{label}: {what} {done}/{total}")

    scores: dict[str, Any] = {"accuracy": None, "correct": None, "unanswered": None, "loss": None,
                              "perplexity": None, "answer_tokens": 0}
    if questions is not None:
        scores.update(_choices(engine, questions, use_adapter=use_adapter, mode=mode, strict=strict, report=report))
    if held_out is not None and held_out.kind == "pairs":
        from denselora_app.serving.preference_eval import pairwise_scores

        with engine.using(use_adapter) as model:
            scores.update(pairwise_scores(lambda examples: _label_logprobs(model, examples), engine.tokenizer,
                                          held_out.source, cutoff_len=cutoff_len, limit=held_out.limit,
                                          batch_size=batch_size, report=report))
        return scores
    if held_out is not None:
        try:
            prepared = prepare_data(held_out.source, engine.tokenizer, cutoff_len=cutoff_len, val_size=0)
        except DataError as err:
            raise EvalError(str(err)) from None
        examples = prepared.train.to_list()[: held_out.limit]
        nll, tokens = 0.0, 0
        with engine.using(use_adapter) as model:
            for start in range(0, len(examples), batch_size):
                for logprobs in _label_logprobs(model, examples[start:start + batch_size]):
                    nll -= float(logprobs.sum())
                    tokens += logprobs.numel()
                report(min(start + batch_size, len(examples)), len(examples), "loss")
        loss = nll / tokens
        scores.update(loss=loss, perplexity=math.exp(loss) if loss < 700 else math.inf, answer_tokens=tokens)
        if questions is None:
            scores["total"] = len(examples)
    return scores


def _choices(engine: ChatEngine, questions: list[Question], *, use_adapter: bool, mode: str, strict: bool,
             report: Callable[[int, int, str], None]) -> dict[str, Any]:
    items = []
    greedy = GenerationSettings(max_new_tokens=GENERATE_TOKENS, temperature=0.0, seed=0)
    replies: list[str] = []  # generate mode: the current batch's replies, decoded together
    for n, q in enumerate(questions, start=1):
        if mode == "generate":
            if not replies:
                batch = questions[n - 1:n - 1 + engine.decoder.max_batch]
                replies = engine.complete_many([build_messages(choice_prompt(b)) for b in batch], greedy,
                                               use_adapter=use_adapter)
            output = replies.pop(0)
            chosen = extract_choice(output, q, strict=strict)
        else:
            with engine.using(use_adapter) as model:
                logprobs = choice_logprobs(model, engine.tokenizer, q)
            chosen = pick_choice([lp.tolist() for lp in logprobs])
            output = ", ".join(f"{choice}: {lp.mean().item():.3f}" for choice, lp in zip(q.choices, logprobs))
        items.append(ItemResult(q.question, q.choices[q.answer], None if chosen is None else q.choices[chosen],
                                chosen == q.answer, output))
        report(n, len(questions), "question")
    correct = sum(item.correct for item in items)
    return {"total": len(items), "accuracy": correct / len(items), "correct": correct, "items": items,
            "unanswered": sum(item.predicted is None for item in items) if mode == "generate" else None}


def choice_logprobs(model: torch.nn.Module, tokenizer: Any, q: Question) -> list[torch.Tensor]:
    """Per choice, the log-probability of each of its tokens after the question's prompt (``loglik`` mode)."""
    return _label_logprobs(model, _choice_examples(tokenizer, q))


def _choice_examples(tokenizer: Any, q: Question) -> list[dict[str, list[int]]]:
    """Per choice, the question prompt followed by the choice, with only the choice's tokens labelled."""
    try:
        prompt, add_special_tokens = render_prompt(tokenizer, build_messages(q.question))
    except ChatError as err:
        raise EvalError(f"{q.where}: {err}") from None
    prompt_ids = tokenizer(prompt, add_special_tokens=add_special_tokens)["input_ids"]
    examples = []
    for choice in q.choices:
        ids = tokenizer(prompt + choice, add_special_tokens=add_special_tokens)["input_ids"]
        # Where the prompt's tokens stop matching is where the choice starts (a token may merge across the seam).
        start = common_prefix_len(prompt_ids, ids)
        examples.append({"input_ids": ids, "labels": [IGNORE_INDEX] * start + ids[start:]})
    return examples


@torch.no_grad()
def _label_logprobs(model: torch.nn.Module, examples: list[dict[str, list[int]]]) -> list[torch.Tensor]:
    """Per example, the log-probability of each labelled token given the tokens before it (one padded batch)."""
    width = max(len(e["input_ids"]) for e in examples)
    device = next(model.parameters()).device

    def pad(key: str, value: int) -> torch.Tensor:
        return torch.tensor([e[key] + [value] * (width - len(e[key])) for e in examples], device=device)

    ids, labels = pad("input_ids", 0), pad("labels", IGNORE_INDEX)
    mask = torch.tensor([[1] * len(e["input_ids"]) + [0] * (width - len(e["input_ids"])) for e in examples],
                        device=device)
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
    targets = labels[:, 1:]  # position t predicts token t + 1
    picked = logits.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)
    return [row[target != IGNORE_INDEX].cpu() for row, target in zip(picked, targets)]


# ---- comparing models, saving results ----------------------------------------------------------------------------


@dataclass
class EvalTable:
    dataset: str
    mode: str
    results: list[EvalResult]  # the base first, then each adapter (a base per distinct base model)

    def rows(self) -> list[dict[str, Any]]:
        """One plain dict per model, for a table widget."""
        return [{"model": r.model if r.trainable_percent is not None else f"base: {r.base_model}",
                 "accuracy": r.accuracy, "loss": r.loss, "perplexity": r.perplexity,
                 "trainable %": r.trainable_percent} for r in self.results]

    def to_text(self) -> str:
        columns = (("accuracy", "ACCURACY", 9, ".1%"), ("loss", "LOSS", 9, ".4f"), ("perplexity", "PPL", 10, ".2f"),
                   ("trainable %", "TRAIN%", 8, ".4f"))
        lines = [f"{'MODEL':44}" + "".join(f" {title:>{width}}" for _, title, width, _ in columns)]
        for row in self.rows():
            name = row["model"] if len(row["model"]) <= 44 else row["model"][:14] + "..." + row["model"][-27:]
            cells = (f"{'-' if row[key] is None else format(row[key], spec):>{width}}"
                     for key, _, width, spec in columns)
            lines.append(f"{name:44} " + " ".join(cells))
        return "\n".join(lines)


def save_result(run: Run, adapter: EvalResult, base: EvalResult | None) -> None:
    """Merge the results into the run's eval.json (atomically), replacing older ones with the same key."""
    saved = run.evaluation()
    merged = dict(saved)
    for key, result, identity in (("results", adapter, ("dataset", "mode", "checkpoint")),
                                  ("base", base, ("dataset", "mode", "base_model"))):
        if result is None:
            continue
        new = result.to_json()
        merged[key] = [r for r in saved[key] if any(r.get(k) != new[k] for k in identity)] + [new]
    run.write_evaluation(merged)


def evaluate(
    refs: str | AdapterRef | Sequence[str | AdapterRef],
    data: str | Path | None = None,
    *,
    loss_data: str | Path | None = None,
    mode: str = "generate",
    limit: int | None = None,
    strict: bool = False,
    engine: ChatEngine | None = None,
    reuse_base: bool = True,
    with_base: bool = True,
    save: bool = True,
    cutoff_len: int = 512,
    batch_size: int = 4,
    progress: Progress | None = None,
    root: Path | None = None,
) -> EvalTable:
    """Evaluate each adapter and its base on ``data`` (default: the shipped multiple-choice set), and on the held-out
    ``loss_data`` for loss and perplexity when given; ``limit`` keeps the first N questions and examples.

    A base model is loaded once per distinct base and its result computed once (or taken from a run's eval.json
    when ``reuse_base`` and the same data, mode and limit were scored before); ``with_base=False`` scores the
    adapters only (benchmarks that score many adapters of one base). Results of adapters that belong to
    runs are saved to the run's eval.json when ``save``.
    """
    if mode not in MODES:
        raise EvalError(f"Unknown mode {mode!r}: use {' or '.join(MODES)}.")
    dataset = load_eval_data(data, limit)
    held_out = dataset if dataset.kind in ("loss", "pairs") else None
    if loss_data is not None:
        if held_out is not None:
            raise EvalError(f"{dataset.name} is held-out data already: give loss data once.")
        held_out = load_eval_data(loss_data, limit)
        if held_out.kind != "loss":
            raise EvalError(f"{held_out.name} is a multiple-choice set; loss data is a file in a training format "
                            "(alpaca, messages, ...).")
    mode = mode if dataset.kind == "choices" else "pairwise" if dataset.kind == "pairs" else "loss"
    strict = strict and mode == "generate"  # only generated replies are read for a label
    engine = engine or ChatEngine(runs_root=root)
    refs = [refs] if isinstance(refs, (str, AdapterRef)) else list(refs)
    adapters = [r if isinstance(r, AdapterRef) else resolve_adapter(r, root=root) for r in refs]
    bases: dict[str, EvalResult] = {}
    results: list[EvalResult] = []
    for ref in adapters:
        loaded = engine.select(ref)
        common = dict(base_model=ref.base_model, dataset=dataset.name, dataset_sha=dataset.sha, mode=mode,
                      loss_dataset=held_out and held_out.name, loss_dataset_sha=held_out and held_out.sha,
                      limit=limit, strict=strict)
        options = dict(mode=mode, strict=strict, cutoff_len=cutoff_len, batch_size=batch_size, progress=progress)
        if with_base and ref.base_model not in bases:
            cached = _cached_base(ref, common) if reuse_base else None
            bases[ref.base_model] = cached or EvalResult(
                model="base", trainable_percent=None, **common,
                **_score(engine, dataset.questions, held_out, use_adapter=False, label="base", **options))
            results.append(bases[ref.base_model])
        adapter = EvalResult(
            model=ref.label, trainable_percent=loaded.trainable_percent, checkpoint=ref.checkpoint, **common,
            **_score(engine, dataset.questions, held_out, use_adapter=True, label=ref.label, **options))
        results.append(adapter)
        if save and ref.run is not None:
            save_result(ref.run, adapter, bases.get(ref.base_model))
    return EvalTable(dataset.name, mode, results)


def _cached_base(ref: AdapterRef, common: dict[str, Any]) -> EvalResult | None:
    if ref.run is None:
        return None
    for saved in reversed(ref.run.evaluation()["base"]):
        if all(saved.get(k) == v for k, v in common.items()):
            return EvalResult.from_json(saved)
    return None


def gpu_steps(adapters: int, data: str | Path | None = None, *, loss_data: str | Path | None = None,
              mode: str = "generate", limit: int | None = None) -> int:
    """At most how many forward passes evaluating ``adapters`` adapters makes, to size a GPU lent per call
    (ZeroGPU): per model scored (each adapter, and at most as many bases), GENERATE_TOKENS per question in generate
    mode, one per question in loglik mode and one per held-out example. Data that cannot be read counts nothing:
    the evaluation itself then says what is wrong with it."""
    def examples(source: str | Path) -> int:
        try:
            rows = len(read_source(str(source)).rows)
        except DataError:
            return 0
        return min(rows, limit) if limit else rows

    try:
        dataset = load_eval_data(data, limit)
    except EvalError:
        return 0
    if dataset.questions is None:
        per_model = examples(dataset.source)
    else:
        per_model = len(dataset.questions) * (GENERATE_TOKENS if mode == "generate" else 1)
    if loss_data is not None:
        per_model += examples(loss_data)
    return 2 * adapters * per_model
