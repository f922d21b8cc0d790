"""Accuracy of DenseLoRA against LoRA on a task this script makes up, small enough for 2 CPU cores.

The paper (Mu et al., ACL 2025) reports that DenseLoRA matches or beats LoRA on commonsense reasoning with far
fewer trainable parameters. This is a small-scale, fully offline check of that claim:

1. A synthetic knowledge base: made-up people, each with a city, a pet, a colour and a job drawn at random.
2. A small LLaMA-shaped model with its own word-level tokenizer is pretrained (full fine-tune, from random weights)
   on documents that state every fact, as a sentence ("Zorbin lives in Lima .") and as a plain question and answer
   ("Q : Where does Zorbin live ? A : Lima ."), packed into rows like ordinary language-model pretraining. The
   corpus also holds unanswered multiple-choice questions, so that every word of the task has been seen in running
   text, as it would have been by a real pretrained model; it never holds an answer in the task's format.
3. Adapters are trained on questions in the paper's commonsense prompt format ("Please choose the correct answer to
   the question : Where does Zorbin live ? Answer format : Oslo/Lima/Rome/Cairo" -> "the correct answer is Lima")
   about one part of the people, and evaluated on questions about other people: their facts are known only from
   pretraining, so an adapter has to teach the model to answer in this format from its own knowledge, not memorise
   answers. Without an adapter the model scores near 0 (it continues the text instead of answering). The answer is
   extracted by pattern (the first of the question's options named in the greedy generation), as in the paper.

Arms: DenseLoRA r8 and r16, LoRA r8 and r16, and LoRA at the rank whose parameter count is closest to DenseLoRA
r16's; each with several seeds, on the same five projections, with the same steps and batch. Methods and ranks
want different learning rates, so each arm gets its own, chosen by a small sweep with the first seed on
validation people who are in neither the training nor the test questions.

    python benchmarks/fidelity.py          # CPU mode: about 16 minutes on 2 cores
    python benchmarks/fidelity.py --gpu    # GPU mode: a larger model, more people and steps, on one GPU
"""

from __future__ import annotations

import argparse
import copy
import logging
import random
import re
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
from benchlib import TARGET_MODULES, machine_description, machine_line, main_for, markdown_table
from peft import LoraConfig, get_peft_model
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from torch import nn
from tqdm import tqdm
from transformers import LlamaConfig, LlamaForCausalLM

import denselora_app.denselora  # noqa: F401  (registers DenseLoRA with PEFT)
from denselora_app.denselora import DenseLoraConfig

log = logging.getLogger("benchmarks.fidelity")

# Settings of the two modes; each can be overridden by the flag of the same name (--adapter-steps etc.).
PRESETS: dict[str, dict[str, Any]] = {
    "cpu": dict(device="cpu", threads=1, people=200, val_people=30, test_people=50, hidden=128, layers=4, heads=4,
                kv_heads=2, intermediate=344, pretrain_steps=1600, pretrain_batch=32, pretrain_length=48,
                pretrain_lr=3e-3, adapter_steps=800, adapter_batch=8, seeds=3),
    "gpu": dict(device="cuda", threads=0, people=600, val_people=60, test_people=120, hidden=384, layers=6, heads=6,
                kv_heads=2, intermediate=1024, pretrain_steps=2500, pretrain_batch=64, pretrain_length=64,
                pretrain_lr=1.5e-3, adapter_steps=600, adapter_batch=16, seeds=3),
}


# relation -> (values, the statement of a fact, the question asked about it)
RELATIONS: dict[str, tuple[list[str], str, str]] = {
    "city": (
        ["Paris", "Rome", "Oslo", "Lima", "Cairo", "Delhi", "Tokyo", "Quito", "Dakar", "Hanoi"],
        "{person} lives in {value} .",
        "Where does {person} live ?",
    ),
    "pet": (
        ["cat", "dog", "owl", "horse", "rabbit", "parrot", "turtle", "goat", "snake", "ferret"],
        "{person} keeps a {value} .",
        "Which animal does {person} keep ?",
    ),
    "colour": (
        ["red", "blue", "green", "yellow", "purple", "orange", "black", "white", "grey", "pink"],
        "{person} likes the colour {value} .",
        "Which colour does {person} like ?",
    ),
    "job": (
        ["baker", "pilot", "farmer", "nurse", "painter", "lawyer", "sailor", "teacher", "miner", "chef"],
        "{person} works as a {value} .",
        "What is the job of {person} ?",
    ),
}

OPTIONS = 4
DIALOGUE = "Q : {question} A : {answer} ."
QUESTION = "Please choose the correct answer to the question : {question} Answer format : {options}"
PROMPT = "### Instruction : {text} ### Response :"
RESPONSE = "the correct answer is {answer}"
SPECIAL_TOKENS = ["[pad]", "[unk]", "[eos]"]
SYLLABLES = ["ka", "lo", "mi", "ren", "to", "va", "zu", "bel", "dor", "fi", "gan", "hu", "jo", "ne", "pa", "qui",
             "ros", "sa", "tem", "ul", "wen", "xa", "yor", "zen"]
NEW_TOKENS = 8  # generated per question; the response is 5 words


@dataclass
class Question:
    text: str
    options: list[str]
    answer: str

    @property
    def prompt(self) -> str:
        return PROMPT.format(text=self.text)

    @property
    def response(self) -> str:
        return RESPONSE.format(answer=self.answer)


@dataclass
class KnowledgeBase:
    facts: dict[str, dict[str, str]]  # person -> relation -> value
    train_people: list[str]
    val_people: list[str]
    test_people: list[str]

    def statements(self) -> list[str]:
        return [
            RELATIONS[relation][1].format(person=person, value=value)
            for person, attributes in self.facts.items()
            for relation, value in attributes.items()
        ]

    def dialogues(self) -> list[str]:
        """Every fact as a plain question and its short answer, the way a pretraining corpus has them."""
        return [
            DIALOGUE.format(question=RELATIONS[relation][2].format(person=person), answer=value)
            for person, attributes in self.facts.items()
            for relation, value in attributes.items()
        ]

    def question(self, person: str, relation: str, rng: random.Random) -> Question:
        """A question about one fact, with random distractors and a random position for the right answer."""
        values, _, question = RELATIONS[relation]
        answer = self.facts[person][relation]
        options = rng.sample([v for v in values if v != answer], OPTIONS - 1)
        options.insert(rng.randrange(OPTIONS), answer)
        text = QUESTION.format(question=question.format(person=person), options="/".join(options))
        return Question(text, options, answer)

    def questions(self, people: list[str], rng: random.Random) -> list[Question]:
        return [self.question(person, relation, rng) for person in people for relation in RELATIONS]


def make_knowledge_base(people: int, val_people: int, test_people: int, seed: int) -> KnowledgeBase:
    """``people`` made-up names (two or three syllables), each with a random value for every relation."""
    rng = random.Random(seed)
    names: set[str] = set()
    while len(names) < people:
        names.add("".join(rng.choice(SYLLABLES) for _ in range(rng.choice((2, 3)))).capitalize())
    ordered = sorted(names)
    rng.shuffle(ordered)
    facts = {name: {relation: rng.choice(values) for relation, (values, _, _) in RELATIONS.items()}
             for name in ordered}
    held_out = val_people + test_people
    return KnowledgeBase(facts, ordered[held_out:], ordered[:val_people], ordered[val_people:held_out])


def build_tokenizer(kb: KnowledgeBase) -> Tokenizer:
    """A word-level tokenizer over exactly the task's words: every name and every value is one token."""
    questions = kb.questions(list(kb.facts), random.Random(0))
    texts = kb.statements() + kb.dialogues() + [q.prompt + " " + q.response for q in questions]
    tokenizer = Tokenizer(models.WordLevel(unk_token="[unk]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=SPECIAL_TOKENS, show_progress=False))
    return tokenizer


def collate(examples: list[tuple[list[int], int]], pad: int) -> dict[str, torch.Tensor]:
    """Right-padded ``(ids, prompt_len)`` examples; the loss is taken after the prompt, never on padding."""
    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), width), pad)
    labels = torch.full((len(examples), width), -100)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, (ids, prompt_len) in enumerate(examples):
        input_ids[row, :len(ids)] = torch.tensor(ids)
        labels[row, prompt_len:len(ids)] = torch.tensor(ids[prompt_len:])
        attention_mask[row, :len(ids)] = 1
    return dict(input_ids=input_ids, labels=labels, attention_mask=attention_mask)


def pretraining_batches(tokenizer: Tokenizer, kb: KnowledgeBase, batch_size: int, length: int,
                        rng: random.Random) -> Iterator[dict[str, torch.Tensor]]:
    """Endless pretraining batches of documents, each ended by [eos], shuffled and packed into rows of up to
    ``length`` tokens (facts are learnt at every position and after any context, as in ordinary pretraining).

    Each pass holds every statement and dialogue, and unanswered questions (their text without the response) about
    a quarter of the people: a real pretrained model has seen every word of the prompt and response, and [eos], in
    running text, and these do that without ever showing an answer.
    """
    pad, eos = tokenizer.token_to_id("[pad]"), tokenizer.token_to_id("[eos]")
    facts = [tokenizer.encode(s).ids + [eos] for s in kb.statements() + kb.dialogues()]
    rows: list[tuple[list[int], int]] = []
    row: list[int] = []
    while True:
        people = rng.sample(list(kb.facts), len(kb.facts) // 4)
        questions = [kb.question(person, rng.choice(list(RELATIONS)), rng).text for person in people]
        documents = facts + [tokenizer.encode(q).ids + [eos] for q in questions]
        for document in rng.sample(documents, len(documents)):
            if len(row) + len(document) > length:
                rows.append((row, 0))
                row = []
                if len(rows) == batch_size:
                    yield collate(rows, pad)
                    rows = []
            row = row + document


def question_batches(tokenizer: Tokenizer, kb: KnowledgeBase, batch_size: int,
                     rng: random.Random) -> Iterator[dict[str, torch.Tensor]]:
    """Endless batches of fresh questions about the training people (new distractors and answer positions every
    time), with the loss on the response and the end-of-text token only."""
    pad, eos = tokenizer.token_to_id("[pad]"), tokenizer.token_to_id("[eos]")
    while True:
        examples = []
        for _ in range(batch_size):
            question = kb.question(rng.choice(kb.train_people), rng.choice(list(RELATIONS)), rng)
            prompt = tokenizer.encode(question.prompt).ids
            examples.append((prompt + tokenizer.encode(question.response).ids + [eos], len(prompt)))
        yield collate(examples, pad)


def train(model: nn.Module, batches: Iterator[dict[str, torch.Tensor]], steps: int, lr: float,
          device: torch.device, desc: str, groups: Optional[list[dict[str, Any]]] = None,
          warmup_fraction: float = 0.1, losses: Optional[list[float]] = None) -> float:
    """AdamW with linear warm-up (first ``warmup_fraction`` of the steps) and linear decay; returns the mean loss of
    the last 10% of steps. ``groups``: optimizer parameter groups (their own "lr" scales with the schedule);
    ``losses``: a list that receives every step's loss."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(groups or params, lr=lr, weight_decay=0.0)
    warmup = max(1, int(steps * warmup_fraction))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min((step + 1) / warmup, max(0.0, (steps - step) / max(1, steps - warmup)))
    )
    model.train()
    losses = [] if losses is None else losses
    for _ in tqdm(range(steps), desc=desc, leave=False):
        batch = {k: v.to(device) for k, v in next(batches).items()}
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    model.eval()
    tail = losses[-max(1, steps // 10):]
    return sum(tail) / len(tail)


@torch.no_grad()
def generate(model: nn.Module, tokenizer: Tokenizer, prompts: list[str], new_tokens: int,
             device: torch.device) -> list[str]:
    """Greedy continuations of ``prompts``, decoded; prompts of equal length are generated together, unpadded."""
    encoded = [tokenizer.encode(p).ids for p in prompts]
    by_length: dict[int, list[int]] = {}
    for i, ids in enumerate(encoded):
        by_length.setdefault(len(ids), []).append(i)
    eos, pad = tokenizer.token_to_id("[eos]"), tokenizer.token_to_id("[pad]")
    out = [""] * len(prompts)
    for length, indices in by_length.items():
        input_ids = torch.tensor([encoded[i] for i in indices], device=device)
        generated = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                   max_new_tokens=new_tokens, do_sample=False, eos_token_id=eos, pad_token_id=pad)
        for i, row in zip(indices, generated[:, length:].tolist()):
            out[i] = tokenizer.decode([t for t in row if t not in (eos, pad)])
    return out


def extract_answer(text: str, options: list[str]) -> Optional[str]:
    """The first of the question's options named in ``text``, the way the paper reads answers from generations."""
    match = re.search(r"\b(" + "|".join(map(re.escape, options)) + r")\b", text)
    return match.group(1) if match else None


def accuracy(model: nn.Module, tokenizer: Tokenizer, questions: list[Question], device: torch.device) -> float:
    texts = generate(model, tokenizer, [q.prompt for q in questions], NEW_TOKENS, device)
    return sum(extract_answer(t, q.options) == q.answer for t, q in zip(texts, questions)) / len(questions)


def fact_recall(model: nn.Module, tokenizer: Tokenizer, kb: KnowledgeBase, device: torch.device) -> float:
    """Share of facts the pretrained model completes correctly after the first template's prefix ("X lives in")."""
    prompts, truths = [], []
    for person, attributes in kb.facts.items():
        for relation, value in attributes.items():
            prompts.append(RELATIONS[relation][1].split("{value}")[0].format(person=person).strip())
            truths.append(value)
    texts = generate(model, tokenizer, prompts, 1, device)
    return sum(t.strip() == v for t, v in zip(texts, truths)) / len(truths)


def build_model(args: argparse.Namespace, vocab_size: int, device: torch.device) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        max_position_embeddings=128, tie_word_embeddings=False,
    )
    torch.manual_seed(args.data_seed)
    with device:
        return LlamaForCausalLM(config)


def adapter_config(method: str, rank: int) -> DenseLoraConfig | LoraConfig:
    cls = DenseLoraConfig if method == "denselora" else LoraConfig
    return cls(r=rank, lora_alpha=2 * rank, target_modules=TARGET_MODULES)


def with_adapter(base: nn.Module, method: str, rank: int, seed: int) -> nn.Module:
    """A fresh adapter (initialised from ``seed``) on a copy of ``base``."""
    torch.manual_seed(seed)
    return get_peft_model(copy.deepcopy(base), adapter_config(method, rank))


def trainable_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def matched_lora_rank(base: nn.Module, target: int) -> int:
    """The LoRA rank whose trainable parameter count is closest to ``target`` (LoRA's count is linear in r)."""
    return max(1, round(target / trainable_params(with_adapter(base, "lora", 1, seed=0))))


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpu", action="store_true", help="The GPU mode (default: the CPU mode).")
    for name, value in PRESETS["cpu"].items():
        help_text = f"CPU mode: {value}; GPU mode: {PRESETS['gpu'][name]}."
        if name == "threads":
            help_text = "CPU threads for torch (0: torch's default). " + help_text
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), help=help_text)
    parser.add_argument("--ranks", type=int, nargs="+", default=[8, 16], help="Ranks of DenseLoRA and LoRA.")
    parser.add_argument("--lrs", type=float, nargs="+", default=[1.5e-3, 3e-3, 6e-3],
                        help="Learning rates swept for each arm, on the validation people.")
    parser.add_argument("--data-seed", type=int, default=0, help="Seed of the knowledge base and the pretraining.")
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).parent / "results",
                        help="Where fidelity_<mode>.json and .md are written.")
    args = parser.parse_args(argv)
    args.mode = "gpu" if args.gpu else "cpu"
    for name, value in PRESETS[args.mode].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


def pretrain(args: argparse.Namespace, kb: KnowledgeBase, tokenizer: Tokenizer,
             device: torch.device) -> tuple[LlamaForCausalLM, dict[str, Any]]:
    model = build_model(args, tokenizer.get_vocab_size(), device)
    batches = pretraining_batches(tokenizer, kb, args.pretrain_batch, args.pretrain_length,
                                  random.Random(args.data_seed))
    loss = train(model, batches, args.pretrain_steps, args.pretrain_lr, device, "pretraining")
    model.requires_grad_(False)
    stats = dict(final_loss=loss, fact_recall=fact_recall(model, tokenizer, kb, device),
                 total_params=sum(p.numel() for p in model.parameters()))
    log.info("Pretrained: final loss %.3f, fact recall %.1f%%", loss, 100 * stats["fact_recall"])
    return model, stats


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    machine = machine_description(device)
    started = time.perf_counter()
    kb = make_knowledge_base(args.people, args.val_people, args.test_people, args.data_seed)
    tokenizer = build_tokenizer(kb)
    rng = random.Random(args.data_seed)
    val_questions, test_questions = kb.questions(kb.val_people, rng), kb.questions(kb.test_people, rng)
    log.info("%d people (%d train, %d validation, %d test), vocabulary %d", args.people, len(kb.train_people),
             len(kb.val_people), len(kb.test_people), tokenizer.get_vocab_size())
    base, pretraining = pretrain(args, kb, tokenizer, device)
    pretraining["accuracy_without_adapter"] = accuracy(base, tokenizer, test_questions, device)

    def fit(method: str, rank: int, lr: float, seed: int) -> tuple[nn.Module, float]:
        model = with_adapter(base, method, rank, seed)
        batches = question_batches(tokenizer, kb, args.adapter_batch, random.Random(seed))
        return model, train(model, batches, args.adapter_steps, lr, device, f"{method} r{rank} lr {lr:g} seed {seed}")

    top_rank = max(args.ranks)
    dense_top = trainable_params(with_adapter(base, "denselora", top_rank, seed=0))
    matched = matched_lora_rank(base, dense_top)
    arms = [(f"DenseLoRA r{r}", "denselora", r) for r in args.ranks] + [(f"LoRA r{r}", "lora", r) for r in args.ranks]
    arms.append((f"LoRA r{matched} (params of DenseLoRA r{top_rank})", "lora", matched))
    sweep: list[dict[str, Any]] = []
    results_by_arm: dict[str, Any] = {}
    for label, method, rank in tqdm(arms, desc="arms"):
        # Each arm gets the learning rate that does best on the validation people with the first seed; that run
        # is its seed 0, and the other seeds train with the same rate.
        candidates = []
        for lr in args.lrs:
            model, loss = fit(method, rank, lr, seed=0)
            val = accuracy(model, tokenizer, val_questions, device)
            test = accuracy(model, tokenizer, test_questions, device)
            candidates.append((val, lr, dict(seed=0, final_loss=loss, accuracy=test)))
            sweep.append(dict(arm=label, lr=lr, val_accuracy=val, final_loss=loss))
            log.info("sweep %s lr %g: validation accuracy %.1f%%", label, lr, 100 * val)
        _, lr, first = max(candidates, key=lambda c: c[0])
        runs = [first]
        for seed in range(1, args.seeds):
            model, loss = fit(method, rank, lr, seed)
            runs.append(dict(seed=seed, final_loss=loss, accuracy=accuracy(model, tokenizer, test_questions, device)))
            log.info("%s seed %d: test accuracy %.1f%%", label, seed, 100 * runs[-1]["accuracy"])
        accuracies = [r["accuracy"] for r in runs]
        results_by_arm[label] = dict(
            method=method, rank=rank, lr=lr, trainable_params=trainable_params(with_adapter(base, method, rank, 0)),
            accuracy_mean=statistics.mean(accuracies),
            accuracy_std=statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0,
            accuracy_min=min(accuracies), accuracy_max=max(accuracies), runs=runs,
        )
    return {
        "machine": machine,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "task": dict(people=len(kb.facts), train_people=len(kb.train_people), val_people=len(kb.val_people),
                     test_people=len(kb.test_people), relations=list(RELATIONS), options=OPTIONS,
                     val_questions=len(val_questions), test_questions=len(test_questions),
                     chance_accuracy=1 / OPTIONS, vocabulary=tokenizer.get_vocab_size(),
                     example=dict(prompt=test_questions[0].prompt, response=test_questions[0].response)),
        "pretraining": pretraining,
        "lr_sweep": sweep,
        "arms": results_by_arm,
        "wall_time_s": time.perf_counter() - started,
    }


def render_markdown(results: dict[str, Any]) -> str:
    pre, task, s = results["pretraining"], results["task"], results["settings"]
    rows = [["pretrained base, no adapter", "0", "-", f"{100 * pre['accuracy_without_adapter']:.1f}", "-", "-", "-"]]
    for label, arm in results["arms"].items():
        rows.append([
            label, f"{arm['trainable_params']:,}", f"{arm['lr']:g}",
            f"{100 * arm['accuracy_mean']:.1f} ± {100 * arm['accuracy_std']:.1f}",
            f"{100 * arm['accuracy_min']:.1f}-{100 * arm['accuracy_max']:.1f}",
            ", ".join(f"{100 * r['accuracy']:.1f}" for r in arm["runs"]),
            ", ".join(f"{r['final_loss']:.3f}" for r in arm["runs"]),
        ])
    sweep_rows = [[e["arm"], f"{e['lr']:g}", f"{100 * e['val_accuracy']:.1f}", f"{e['final_loss']:.3f}"]
                  for e in results["lr_sweep"]]
    return "\n\n".join([
        f"Command: `{results['command']}`",
        f"Machine: {machine_line(results['machine'])}; wall time {results['wall_time_s'] / 60:.1f} min.",
        f"Task: {task['test_questions']} test questions ({task['options']} options, chance "
        f"{100 * task['chance_accuracy']:.0f}%) about {task['test_people']} people whose facts the model saw only in "
        f"pretraining; adapters trained on fresh questions about {task['train_people']} other people, "
        f"{s['adapter_steps']} steps of batch {s['adapter_batch']}. Example: `{task['example']['prompt']}` -> "
        f"`{task['example']['response']}`.",
        f"Base model: {pre['total_params']:,} parameters ({s['layers']} layers, hidden {s['hidden']}), pretrained "
        f"{s['pretrain_steps']} steps on the facts (statements and plain questions with answers); fact recall "
        f"{100 * pre['fact_recall']:.1f}%.",
        markdown_table(["arm", "trainable params", "lr", "test accuracy %, mean ± std", "min-max", "per seed",
                        "final train loss per seed"], rows),
        f"Learning-rate sweep per arm ({task['val_questions']} validation questions, seed 0):",
        markdown_table(["arm", "lr", "validation accuracy %", "final train loss"], sweep_rows),
    ])


def main(argv: Optional[list[str]] = None) -> None:
    main_for(__file__, "fidelity", parse_args, run, render_markdown, argv, variant="mode")


if __name__ == "__main__":
    main()
