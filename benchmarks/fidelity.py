"""Accuracy of DenseLoRA against LoRA on a task this script makes up, small enough for 2 CPU cores.

The paper (Mu et al., ACL 2025) claims that DenseLoRA matches or beats LoRA on commonsense reasoning with far fewer
trainable parameters. This is a small-scale, fully offline check of that claim:

1. A synthetic knowledge base: made-up people, each with a city, a pet, a colour and a job drawn at random.
2. A small LLaMA-shaped model with its own word-level tokenizer is pretrained (full fine-tune, from random weights)
   on plain statements of every fact ("Zorbin lives in Lima ."). It never sees a question.
3. Adapters are trained on multiple-choice questions in the paper's commonsense prompt format ("... Answer format:
   answer1/answer2/answer3/answer4" -> "the correct answer is answer3") about one part of the people, and evaluated
   on questions about the others: their facts are known only from pretraining, so an adapter has to teach the
   model to answer from its own knowledge in this format, not memorise answers. The answer is extracted by pattern
   from greedy generation, as in the paper's evaluation.

Arms: DenseLoRA r8 and r16, LoRA r8 and r16, and LoRA at the rank whose parameter count is closest to DenseLoRA
r16's; each trained with several seeds, on the same five projections, with the same steps and learning rate.

    python benchmarks/fidelity.py          # CPU: about 15 minutes on 2 cores
    python benchmarks/fidelity.py --gpu    # a larger model and more steps on one GPU
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
from peft import LoraConfig, get_peft_model
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from torch import nn
from tqdm import tqdm
from transformers import LlamaConfig, LlamaForCausalLM

import denselora_app.denselora  # noqa: F401  (registers DenseLoRA with PEFT)
from denselora_app.denselora import DenseLoraConfig
from benchlib import command_line, machine_description, machine_line, markdown_table, setup_logging, write_results

log = logging.getLogger("benchmarks.fidelity")

# Settings of the two modes; every one can be overridden by the flag of the same name.
PRESETS: dict[str, dict[str, Any]] = {
    "cpu": dict(device="cpu", people=240, test_people=80, hidden=128, layers=4, heads=4, kv_heads=2,
                intermediate=344, pretrain_steps=1500, pretrain_batch=64, pretrain_lr=2e-3, adapter_steps=300,
                adapter_batch=32, adapter_lr=3e-3, seeds=3),
    "gpu": dict(device="cuda", people=1000, test_people=250, hidden=512, layers=8, heads=8, kv_heads=4,
                intermediate=1376, pretrain_steps=4000, pretrain_batch=256, pretrain_lr=1e-3, adapter_steps=600,
                adapter_batch=64, adapter_lr=2e-3, seeds=3),
}

TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]

# relation -> (values, statement templates for pretraining, the question asked about it)
RELATIONS: dict[str, tuple[list[str], list[str], str]] = {
    "city": (
        ["Paris", "Rome", "Oslo", "Lima", "Cairo", "Delhi", "Tokyo", "Quito", "Dakar", "Hanoi"],
        ["{person} lives in {value} .", "The home town of {person} is {value} ."],
        "Where does {person} live ?",
    ),
    "pet": (
        ["cat", "dog", "owl", "horse", "rabbit", "parrot", "turtle", "goat", "snake", "ferret"],
        ["{person} keeps a {value} .", "The pet of {person} is a {value} ."],
        "Which animal does {person} keep ?",
    ),
    "colour": (
        ["red", "blue", "green", "yellow", "purple", "orange", "black", "white", "grey", "pink"],
        ["{person} likes the colour {value} .", "The favourite colour of {person} is {value} ."],
        "Which colour does {person} like ?",
    ),
    "job": (
        ["baker", "pilot", "farmer", "nurse", "painter", "lawyer", "sailor", "teacher", "miner", "chef"],
        ["{person} works as a {value} .", "The job of {person} is {value} ."],
        "What is the job of {person} ?",
    ),
}

OPTIONS = 4
PROMPT = (
    "### Instruction : Please choose the correct answer to the question : {question} "
    "Answer1 : {0} Answer2 : {1} Answer3 : {2} Answer4 : {3} "
    "Answer format : answer1/answer2/answer3/answer4 ### Response :"
)
RESPONSE = "the correct answer is answer{index}"
ANSWER_PATTERN = re.compile(r"answer([1-4])")
SPECIAL_TOKENS = ["[pad]", "[unk]", "[eos]"]
SYLLABLES = ["ka", "lo", "mi", "ren", "to", "va", "zu", "bel", "dor", "fi", "gan", "hu", "jo", "ne", "pa", "qui",
             "ros", "sa", "tem", "ul", "wen", "xa", "yor", "zen"]


@dataclass
class Question:
    person: str
    relation: str
    prompt: str
    answer: int  # 1-based, as in "answer3"

    @property
    def response(self) -> str:
        return RESPONSE.format(index=self.answer)


@dataclass
class KnowledgeBase:
    facts: dict[str, dict[str, str]]  # person -> relation -> value
    train_people: list[str]
    test_people: list[str]

    def statements(self) -> list[str]:
        return [
            template.format(person=person, value=value)
            for person, attributes in self.facts.items()
            for relation, value in attributes.items()
            for template in RELATIONS[relation][1]
        ]

    def questions(self, people: list[str], rng: random.Random) -> list[Question]:
        out = []
        for person in people:
            for relation, (values, _, question) in RELATIONS.items():
                truth = self.facts[person][relation]
                options = rng.sample([v for v in values if v != truth], OPTIONS - 1)
                answer = rng.randrange(OPTIONS)
                options.insert(answer, truth)
                prompt = PROMPT.format(*options, question=question.format(person=person))
                out.append(Question(person, relation, prompt, answer + 1))
        return out


def make_knowledge_base(people: int, test_people: int, seed: int) -> KnowledgeBase:
    """``people`` made-up names (two or three syllables), each with a random value for every relation."""
    rng = random.Random(seed)
    names: set[str] = set()
    while len(names) < people:
        names.add("".join(rng.choice(SYLLABLES) for _ in range(rng.choice((2, 3)))).capitalize())
    ordered = sorted(names)
    rng.shuffle(ordered)
    facts = {name: {relation: rng.choice(values) for relation, (values, _, _) in RELATIONS.items()}
             for name in ordered}
    return KnowledgeBase(facts, train_people=ordered[test_people:], test_people=ordered[:test_people])


def build_tokenizer(texts: list[str]) -> Tokenizer:
    """A word-level tokenizer over exactly the words of ``texts``: every name and value is one token."""
    tokenizer = Tokenizer(models.WordLevel(unk_token="[unk]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=SPECIAL_TOKENS, show_progress=False))
    return tokenizer


class Batcher:
    """Token ids of (prompt, completion) pairs; the loss is taken on the completion and the end-of-text token."""

    def __init__(self, tokenizer: Tokenizer, prompts: list[str], completions: list[str]) -> None:
        self.pad = tokenizer.token_to_id("[pad]")
        eos = tokenizer.token_to_id("[eos]")
        self.examples = []
        for prompt, completion in zip(prompts, completions):
            prompt_ids = tokenizer.encode(prompt).ids if prompt else []
            completion_ids = tokenizer.encode(completion).ids + [eos]
            self.examples.append((prompt_ids + completion_ids, len(prompt_ids)))

    def batches(self, batch_size: int, generator: random.Random) -> Iterator[dict[str, torch.Tensor]]:
        """Endless random batches, right-padded, prompt and padding masked out of the labels."""
        while True:
            order = list(range(len(self.examples)))
            generator.shuffle(order)
            for start in range(0, len(order) - batch_size + 1, batch_size):
                yield self.collate([self.examples[i] for i in order[start:start + batch_size]])

    def collate(self, examples: list[tuple[list[int], int]]) -> dict[str, torch.Tensor]:
        width = max(len(ids) for ids, _ in examples)
        input_ids = torch.full((len(examples), width), self.pad)
        labels = torch.full((len(examples), width), -100)
        attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
        for row, (ids, prompt_len) in enumerate(examples):
            input_ids[row, :len(ids)] = torch.tensor(ids)
            labels[row, prompt_len:len(ids)] = torch.tensor(ids[prompt_len:])
            attention_mask[row, :len(ids)] = 1
        return dict(input_ids=input_ids, labels=labels, attention_mask=attention_mask)


def train(model: nn.Module, batcher: Batcher, steps: int, batch_size: int, lr: float, seed: int,
          device: torch.device, desc: str) -> float:
    """AdamW with linear warm-up (first 10%) and linear decay; returns the mean loss of the last 10% of steps."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min((step + 1) / warmup, max(0.0, (steps - step) / max(1, steps - warmup)))
    )
    model.train()
    losses = []
    batches = batcher.batches(batch_size, random.Random(seed))
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
    by_length: dict[int, list[int]] = {}
    encoded = [tokenizer.encode(p).ids for p in prompts]
    for i, ids in enumerate(encoded):
        by_length.setdefault(len(ids), []).append(i)
    out: list[str] = [""] * len(prompts)
    eos, pad = tokenizer.token_to_id("[eos]"), tokenizer.token_to_id("[pad]")
    for length, indices in by_length.items():
        input_ids = torch.tensor([encoded[i] for i in indices], device=device)
        generated = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                   max_new_tokens=new_tokens, do_sample=False, eos_token_id=eos, pad_token_id=pad)
        for i, row in zip(indices, generated[:, length:].tolist()):
            out[i] = tokenizer.decode([t for t in row if t not in (eos, pad)])
    return out


def extract_answer(text: str) -> Optional[int]:
    match = ANSWER_PATTERN.search(text)
    return int(match.group(1)) if match else None


def accuracy(model: nn.Module, tokenizer: Tokenizer, questions: list[Question], device: torch.device) -> float:
    texts = generate(model, tokenizer, [q.prompt for q in questions], new_tokens=8, device=device)
    return sum(extract_answer(t) == q.answer for t, q in zip(texts, questions)) / len(questions)


def fact_recall(model: nn.Module, tokenizer: Tokenizer, kb: KnowledgeBase, device: torch.device) -> float:
    """Share of facts the pretrained model completes correctly from the first statement template's prefix."""
    prompts, truths = [], []
    for person, attributes in kb.facts.items():
        for relation, value in attributes.items():
            prefix = RELATIONS[relation][1][0].format(person=person, value="{value}").split("{value}")[0]
            prompts.append(prefix.strip())
            truths.append(value)
    texts = generate(model, tokenizer, prompts, new_tokens=1, device=device)
    return sum(t.strip() == v for t, v in zip(texts, truths)) / len(truths)


def build_model(args: argparse.Namespace, vocab_size: int, device: torch.device) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        max_position_embeddings=128, tie_word_embeddings=False, pad_token_id=0,
    )
    torch.manual_seed(args.data_seed)
    with device:
        return LlamaForCausalLM(config)


def adapter_config(method: str, rank: int) -> DenseLoraConfig | LoraConfig:
    cls = DenseLoraConfig if method == "denselora" else LoraConfig
    return cls(r=rank, lora_alpha=2 * rank, target_modules=TARGET_MODULES)


def trainable_params(base: nn.Module, method: str, rank: int) -> int:
    peft_model = get_peft_model(copy.deepcopy(base), adapter_config(method, rank))
    return sum(p.numel() for p in peft_model.parameters() if p.requires_grad)


def matched_lora_rank(base: nn.Module, target: int) -> int:
    """The LoRA rank whose trainable parameter count is closest to ``target`` (LoRA's count is linear in r)."""
    per_rank = trainable_params(base, "lora", 1)
    return max(1, round(target / per_rank))


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpu", action="store_true", help="The larger GPU mode (default: the CPU mode).")
    overridable = PRESETS["cpu"]
    for name, value in overridable.items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), help=f"CPU mode: {value}; GPU mode: "
                            f"{PRESETS['gpu'][name]}.")
    parser.add_argument("--ranks", type=int, nargs="+", default=[8, 16], help="Ranks of DenseLoRA and LoRA.")
    parser.add_argument("--data-seed", type=int, default=0, help="Seed of the knowledge base and the pretraining.")
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).parent / "results",
                        help="Where fidelity_<mode>.json and .md are written.")
    args = parser.parse_args(argv)
    args.mode = "gpu" if args.gpu else "cpu"
    for name, value in PRESETS[args.mode].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    machine = machine_description(device)
    started = time.perf_counter()
    kb = make_knowledge_base(args.people, args.test_people, args.data_seed)
    rng = random.Random(args.data_seed)
    train_questions = kb.questions(kb.train_people, rng)
    test_questions = kb.questions(kb.test_people, rng)
    statements = kb.statements()
    tokenizer = build_tokenizer(statements + [q.prompt + " " + q.response for q in train_questions + test_questions])
    log.info("%d people (%d held out), %d statements, %d/%d questions, vocabulary %d", args.people,
             args.test_people, len(statements), len(train_questions), len(test_questions), tokenizer.get_vocab_size())

    base = build_model(args, tokenizer.get_vocab_size(), device)
    pretrain_loss = train(base, Batcher(tokenizer, [""] * len(statements), statements), args.pretrain_steps,
                          args.pretrain_batch, args.pretrain_lr, args.data_seed, device, "pretraining")
    base.requires_grad_(False)
    recall = fact_recall(base, tokenizer, kb, device)
    no_adapter = accuracy(base, tokenizer, test_questions, device)
    log.info("Pretrained: final loss %.3f, fact recall %.1f%%, held-out accuracy without adapter %.1f%%",
             pretrain_loss, 100 * recall, 100 * no_adapter)

    arms = [(f"DenseLoRA r{r}", "denselora", r) for r in args.ranks] + [(f"LoRA r{r}", "lora", r) for r in args.ranks]
    reference_rank = max(args.ranks)
    matched = matched_lora_rank(base, trainable_params(base, "denselora", reference_rank))
    arms.append((f"LoRA r{matched} (matches DenseLoRA r{reference_rank}'s parameters)", "lora", matched))

    qa_batcher = Batcher(tokenizer, [q.prompt for q in train_questions], [q.response for q in train_questions])
    results_by_arm: dict[str, Any] = {}
    for label, method, rank in tqdm(arms, desc="arms"):
        runs = []
        for seed in range(args.seeds):
            torch.manual_seed(seed)
            model = get_peft_model(copy.deepcopy(base), adapter_config(method, rank))
            loss = train(model, qa_batcher, args.adapter_steps, args.adapter_batch, args.adapter_lr, seed, device,
                         f"{label} seed {seed}")
            runs.append(dict(seed=seed, final_loss=loss, accuracy=accuracy(model, tokenizer, test_questions, device),
                             train_accuracy=accuracy(model, tokenizer, train_questions[:len(test_questions)], device)))
            log.info("%s seed %d: loss %.3f, held-out accuracy %.1f%%", label, seed, loss, 100 * runs[-1]["accuracy"])
        accuracies = [r["accuracy"] for r in runs]
        results_by_arm[label] = dict(
            method=method, rank=rank, trainable_params=trainable_params(base, method, rank),
            accuracy_mean=statistics.mean(accuracies),
            accuracy_std=statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0,
            accuracy_min=min(accuracies), accuracy_max=max(accuracies), runs=runs,
        )
    return {
        "command": command_line(),
        "machine": machine,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "task": dict(people=args.people, held_out_people=args.test_people, relations=list(RELATIONS),
                     options=OPTIONS, train_questions=len(train_questions), test_questions=len(test_questions),
                     chance_accuracy=1 / OPTIONS, vocabulary=tokenizer.get_vocab_size()),
        "pretraining": dict(final_loss=pretrain_loss, fact_recall=recall, accuracy_without_adapter=no_adapter,
                            total_params=sum(p.numel() for p in base.parameters())),
        "arms": results_by_arm,
        "wall_time_s": time.perf_counter() - started,
    }


def render_markdown(results: dict[str, Any]) -> str:
    pre = results["pretraining"]
    rows = [["pretrained base, no adapter", "0", f"{100 * pre['accuracy_without_adapter']:.1f}", "-", "-"]]
    for label, arm in results["arms"].items():
        per_seed = ", ".join(f"{100 * r['accuracy']:.1f}" for r in arm["runs"])
        rows.append([label, f"{arm['trainable_params']:,}",
                     f"{100 * arm['accuracy_mean']:.1f} ± {100 * arm['accuracy_std']:.1f}",
                     f"{100 * arm['accuracy_min']:.1f}-{100 * arm['accuracy_max']:.1f}", per_seed])
    task, s = results["task"], results["settings"]
    return "\n\n".join([
        f"Command: `{results['command']}`",
        f"Machine: {machine_line(results['machine'])}; wall time {results['wall_time_s'] / 60:.1f} min",
        f"Task: {task['test_questions']} held-out {task['options']}-way questions about {task['held_out_people']} "
        f"people whose facts the model saw only in pretraining (chance {100 * task['chance_accuracy']:.0f}%); "
        f"adapters trained on {task['train_questions']} questions about the other people, {s['adapter_steps']} steps "
        f"of batch {s['adapter_batch']} at lr {s['adapter_lr']}. Base: {pre['total_params']:,} parameters "
        f"({s['layers']} layers, hidden {s['hidden']}), pretrained {s['pretrain_steps']} steps; fact recall "
        f"{100 * pre['fact_recall']:.1f}%.",
        markdown_table(["arm", "trainable params", "held-out accuracy %, mean ± std", "min-max", "per seed"], rows),
    ])


def main(argv: Optional[list[str]] = None) -> None:
    setup_logging()
    args = parse_args(argv)
    results = run(args)
    markdown = render_markdown(results)
    stem = f"fidelity_{args.mode}"
    write_results(results, markdown, args.out_dir / f"{stem}.json", args.out_dir / f"{stem}.md")
    print(markdown)


if __name__ == "__main__":
    main()
