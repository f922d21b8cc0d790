"""Accuracy of DenseLoRA against LoRA on the embedded 30-layer SmolLM2-135M-Instruct, through the studio itself.

Each trial is an ordinary studio run (``launch`` + ``worker.execute``: the Trainer, the data pipeline and the
defaults a user gets) followed by the studio's own evaluation (``evaluate.evaluate`` in generate mode: the question
and its labelled options in the prompt, greedy decoding, the answer extracted by pattern, as in the paper's
commonsense protocol). Training replies name the right option's text ("the correct answer is melon"); the paper's
replies name its label ("the correct answer is answer3"), which ``--reply label`` trains instead: on this 135M model
no arm, LoRA r16 included, learnt to pick a label within the CPU setting's 200 steps, while LoRA r16 naming the
option reached 73% in 120 steps (docs/benchmarks.md). The evaluation reads a label by pattern, else the one
option a reply names as whole words.

The task needs generalisation, not recall. Five families of four-option questions are made from templates:
the largest of four numbers, a two-digit sum, the next number of an arithmetic sequence, the odd word out of four,
and which word belongs to a named category. Training questions use one half of every category's words and their
own random numbers; validation and test questions use the other half of the words, and no test or validation
question appears in training. Before training the model answers "answer4" to nearly everything (near chance).

Arms: DenseLoRA r16, LoRA r16, and LoRA at the rank whose trainable parameter count is closest to DenseLoRA r16's
(on SmolLM2's five projections that is r1), all on q/k/v/up/down with alpha = 2r. ``--arms denselora-shared4`` adds
DenseLoRA r16 with its shared encoders and decoders at 4x the learning rate (``shared_lr_scale: 4``, the change
convergence.py found most effective on the 4-layer model). Each arm's learning rate is chosen by the validation
accuracy of a sweep with the first seed (every arm's sweep runs before any arm's other seeds, and goes on past its
listed rates while its best is at an end); the chosen rate then runs with every seed and is scored on the test
questions.

A finished trial is written to ``--trials-dir`` as one JSON file and skipped when the benchmark runs again with
the same settings, so the full table can be built over several sittings (about 5 s per step of 8 ~110-token rows
on these 2 cores: a trial with its scoring takes about 20 minutes, the CPU setting's 15 trials, and any that
extend a sweep, about 5 hours).

    python benchmarks/accuracy_smollm2.py                # CPU setting (resumable)
    python benchmarks/accuracy_smollm2.py --mode gpu     # more rows, steps and test questions, on one GPU
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import random
import shutil
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from benchlib import TARGET_MODULES, keep_trial, kept_trial, machine_description, machine_line, main_for, markdown_table

from denselora_app.config import EMBEDDED_MODEL, RunConfig
from denselora_app.engine.methods import MEASURED_ACCURACY
from denselora_app.serving.evaluate import Question, choice_prompt

log = logging.getLogger("benchmarks.accuracy_smollm2")
RESULTS = Path(__file__).resolve().parent / "results"

# Settings of each mode; every key can be overridden by the flag of the same name (--steps etc.).
PRESETS: dict[str, dict[str, Any]] = {
    "smoke": dict(device="cpu", train_rows=40, val_per_family=1, test_per_family=1, steps=2, batch=4, seeds=1,
                  sweep=1, extend=0, warmup=1),
    "cpu": dict(device="cpu", train_rows=1200, val_per_family=10, test_per_family=30, steps=200, batch=8, seeds=3,
                sweep=3, extend=2, warmup=10),
    "gpu": dict(device="cuda", train_rows=4000, val_per_family=20, test_per_family=100, steps=600, batch=16, seeds=3,
                sweep=4, extend=2, warmup=30),
}
# Learning rates to sweep per method, most promising first (a sweep of n uses the first n; ``extend`` more rates
# beyond the best, on the same 1-3-10 grid, while the best is at an end). DenseLoRA's shared matrices see every
# layer's gradient and its M are r x r, so its rates sit higher than LoRA's.
RATES: dict[str, list[float]] = {
    "denselora": [3e-3, 1e-3, 1e-2, 3e-4],
    "denselora-shared4": [3e-3, 1e-3, 1e-2, 3e-4],  # the shared E and D at 4x the rate (convergence.py)
    "denselora-identity": [3e-3, 1e-3, 1e-2, 3e-4],  # activation identity: exactly a LoRA, exports exactly
    "denselora-export": [],  # no sweep of its own: the GELU arm's chosen rate, its seeds retrained and exported
    "lora": [3e-4, 1e-4, 1e-3, 3e-5],
    "lora-matched": [1e-3, 3e-4, 3e-3, 1e-4],
}

# The three arms; denselora-shared4 (a DenseLoRA training option) runs when asked for with --arms.
DEFAULT_ARMS = ["denselora", "lora", "lora-matched"]

CATEGORIES: dict[str, list[str]] = {
    "animal": "dog cat horse lion tiger rabbit sheep goat wolf bear mouse camel zebra monkey eagle shark whale frog "
              "snake duck".split(),
    "fruit": "apple banana cherry grape lemon mango orange peach pear plum melon kiwi apricot lime papaya fig "
             "coconut pineapple".split(),
    "colour": "red blue green yellow purple black white brown pink grey violet gold".split(),
    "tool": "hammer saw drill wrench screwdriver chisel shovel rake axe pliers".split(),
    "vehicle": "car bus truck train bicycle boat plane tractor scooter van taxi ship".split(),
    "body part": "arm leg hand foot head nose ear eye knee elbow shoulder finger".split(),
    "instrument": "piano guitar violin drum flute trumpet harp cello saxophone clarinet".split(),
    "country": "France Spain Italy Germany Brazil Japan China India Egypt Kenya Peru Canada".split(),
}


# ---- the task ---------------------------------------------------------------------------------------------------


Item = tuple[str, list[str], int]  # question, four options, index of the right one


def _shuffled(rng: random.Random, right: Any, others: Sequence[Any]) -> tuple[list[str], int]:
    options = [right, *others]
    rng.shuffle(options)
    return [str(o) for o in options], options.index(right)


def largest(rng: random.Random, words: dict[str, list[str]]) -> Item:
    numbers = rng.sample(range(10, 1000), 4)
    return "Which of these numbers is the largest?", [str(n) for n in numbers], numbers.index(max(numbers))


def two_digit_sum(rng: random.Random, words: dict[str, list[str]]) -> Item:
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    options, answer = _shuffled(rng, a + b, rng.sample([a + b + 1, a + b - 1, a + b + 10, a + b - 10], 3))
    return f"What is {a} + {b}?", options, answer


def next_in_sequence(rng: random.Random, words: dict[str, list[str]]) -> Item:
    start, step = rng.randint(1, 60), rng.randint(2, 12)
    shown = ", ".join(str(start + i * step) for i in range(4))
    following = start + 4 * step
    options, answer = _shuffled(rng, following, [following + 1, following - 1, following + step])
    return f"Which number comes next: {shown}, ...?", options, answer


def odd_one_out(rng: random.Random, words: dict[str, list[str]]) -> Item:
    same, other = rng.sample(sorted(words), 2)
    options, answer = _shuffled(rng, rng.choice(words[other]), rng.sample(words[same], 3))
    return "Which word does not belong with the others?", options, answer


def category_member(rng: random.Random, words: dict[str, list[str]]) -> Item:
    category = rng.choice(sorted(words))
    others = [rng.choice(words[c]) for c in rng.sample([c for c in sorted(words) if c != category], 3)]
    options, answer = _shuffled(rng, rng.choice(words[category]), others)
    article = "an" if category[0] in "aeiou" else "a"
    return f"Which of these is {article} {category}?", options, answer


FAMILIES: dict[str, Callable[[random.Random, dict[str, list[str]]], Item]] = {
    "largest": largest, "sum": two_digit_sum, "sequence": next_in_sequence, "odd-one-out": odd_one_out,
    "category": category_member,
}


def split_words(seed: int) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """Each category's words in two halves: one for training questions, one for validation and test questions."""
    rng = random.Random(seed)
    train, held_out = {}, {}
    for category, words in CATEGORIES.items():
        shuffled = rng.sample(words, len(words))
        half = len(shuffled) // 2
        train[category], held_out[category] = sorted(shuffled[:half]), sorted(shuffled[half:])
    return train, held_out


REPLIES = ("option", "label")  # what a training reply names: the right option's text, or its label (the paper's)


def reply(options: list[str], answer: int, names: str) -> str:
    """The training target in the paper's wording, naming the option's text or its label ("answer2").

    The evaluation reads either: a label by pattern, else the one option the reply names as whole words. On this
    135M model label replies stay at chance for every arm within the CPU setting's 200 steps (LoRA r16 included:
    docs/benchmarks.md), so the CPU setting names the option's text.
    """
    return f"the correct answer is {options[answer] if names == 'option' else f'answer{answer + 1}'}"


def make_task(folder: Path, train_rows: int, val_per_family: int, test_per_family: int, seed: int = 0,
              replies: str = "option") -> dict:
    """Write train.jsonl (messages whose replies name the option's text or its label: ``reply``), val.jsonl and
    test.jsonl (the studio's multiple-choice format, plus each question's family) to ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    train_words, held_out_words = split_words(seed)
    rng = random.Random(seed + 1)
    seen: set[tuple[str, tuple[str, ...]]] = set()

    def fresh(family: str, words: dict[str, list[str]]) -> Item:
        while True:  # numbers and word draws repeat now and then; no question is asked twice
            question, options, answer = FAMILIES[family](rng, words)
            key = (question, tuple(sorted(options)))
            if key not in seen:
                seen.add(key)
                return question, options, answer

    held = {name: [(f, fresh(f, held_out_words)) for f in FAMILIES for _ in range(count)]
            for name, count in (("val", val_per_family), ("test", test_per_family))}
    families = list(FAMILIES)
    train = [fresh(families[n % len(families)], train_words) for n in range(train_rows)]
    rng.shuffle(train)
    with open(folder / "train.jsonl", "w", encoding="utf-8") as fh:
        for question, options, answer in train:
            prompt = choice_prompt(Question(question, tuple(options), answer, "answer", ""))
            target = reply(options, answer, replies)
            fh.write(json.dumps({"messages": [{"role": "user", "content": prompt},
                                              {"role": "assistant", "content": target}]}) + "\n")
    for name, items in held.items():
        with open(folder / f"{name}.jsonl", "w", encoding="utf-8") as fh:
            for family, (question, options, answer) in items:
                fh.write(json.dumps({"question": question, "choices": options, "answer": answer,
                                     "family": family}) + "\n")
    return {"train": len(train), **{name: len(items) for name, items in held.items()}}


# ---- trials -------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Arm:
    name: str  # a key of RATES
    method: str
    r: int
    settings: tuple[tuple[str, Any], ...] = ()  # other RunConfig values of this arm
    export: bool = False  # score the adapter's fitted LoRA export (export/fit.py), calibrated on the training rows

    @property
    def label(self) -> str:
        settings = "".join(f", {key} {value:g}" if isinstance(value, float) else f", {key} {value}"
                           for key, value in self.settings)
        exported = ", fitted LoRA export" if self.export else ""
        return f"{'DenseLoRA' if self.method == 'denselora' else 'LoRA'} r{self.r}{settings}{exported}"

    def config(self, args: argparse.Namespace, data: Path, lr: float, seed: int) -> RunConfig:
        return RunConfig(
            **dict(self.settings),
            model=args.model, data=str(data), data_format="messages", method=self.method, r=self.r,
            alpha=2.0 * self.r, dropout=0.0, target_modules=list(TARGET_MODULES), learning_rate=lr,
            max_steps=args.steps, batch_size=args.batch, grad_accum=1, warmup_steps=args.warmup,
            lr_scheduler="linear", cutoff_len=256, seed=seed, save_steps=max(args.steps, 1), save_total_limit=1,
            logging_steps=1, device=args.device, dtype="auto", run_name=f"{self.name}-lr{lr:g}-seed{seed}",
        )


def settings_key(args: argparse.Namespace) -> str:
    """What a stored trial must have been run with to be reused."""
    keys = ("model", "train_rows", "val_per_family", "test_per_family", "steps", "batch", "warmup", "data_seed",
            "reply")
    text = json.dumps({k: str(getattr(args, k)) for k in keys}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def matched_lora_rank(model: str, target: int) -> int:
    """The LoRA rank whose trainable parameter count is closest to ``target``."""
    from denselora_app.engine import models
    from denselora_app.engine.methods import count_parameters

    config = models.load_config(model)
    counts = {r: count_parameters(config, RunConfig(model=model, method="lora", r=r,
                                                    target_modules=list(TARGET_MODULES))).trainable
              for r in (1, 2, 4, 8)}
    return min(counts, key=lambda r: abs(counts[r] - target))


def _scores(result: Any, questions: Path) -> dict[str, Any]:
    """Accuracy overall and per family of one evaluate() result (items are in the file's order)."""
    families = [json.loads(line)["family"] for line in questions.read_text().splitlines()]
    per_family: dict[str, list[bool]] = {}
    for family, item in zip(families, result.items, strict=True):
        per_family.setdefault(family, []).append(item.correct)
    return {"accuracy": result.accuracy, "unanswered": result.unanswered,
            "per_family": {f: sum(v) / len(v) for f, v in per_family.items()}}


def run_trial(args: argparse.Namespace, arm: Arm, lr: float, seed: int, data: Path, engine: Any,
              with_base: bool = False) -> dict[str, Any]:
    """Train one adapter through the studio and score it on the validation and test questions (and the base model
    on the test questions, ``with_base``); the trial's record."""
    from denselora_app.engine.launch import launch
    from denselora_app.engine.worker import execute
    from denselora_app.serving.evaluate import evaluate

    root = args.work_dir / "runs"
    run = launch(arm.config(args, data / "train.jsonl", lr, seed), background=False, share_device=True, root=root)
    started = time.time()
    state = execute(run)
    trained = time.time() - started
    if state != "completed":  # stopped by a signal: a shorter trial must never enter the table
        raise SystemExit(f"Trial {run.config().run_name} ended {state} at step {run.status().step}: not kept. "
                         "Run the benchmark again to redo it.")
    facts = run.facts()
    losses = [row["loss"] for row in run.metrics() if "loss" in row and "eval_loss" not in row]
    tenth = max(len(losses) // 10, 1)
    record: dict[str, Any] = {
        "arm": arm.name, "method": arm.method, "r": arm.r, "lr": lr, "seed": seed, "state": str(state),
        "trainable": facts.trainable_parameters, "total": facts.total_parameters, "steps": len(losses),
        "final_loss": statistics.fmean(losses[-tenth:]),
        # Flattened: the last tenth's mean loss against the tenth before it.
        "previous_loss": statistics.fmean(losses[-2 * tenth:-tenth]) if len(losses) >= 2 * tenth else None,
        "train_seconds": trained,
    }
    started = time.time()
    for split in ("val", "test"):
        questions = data / f"{split}.jsonl"
        table = evaluate(str(run.adapter_dir), questions, engine=engine, save=False,
                         with_base=with_base and split == "test")
        record[split] = _scores(table.results[-1], questions)
        if len(table.results) > 1:
            record["base"] = _scores(table.results[0], questions)
    record["eval_seconds"] = time.time() - started
    if arm.export:  # the adapter's scores stay as "adapter_test"; the arm's "test" is its export's
        record["adapter_test"], record["test"], record["export"] = record["test"], *export_scores(run, data, engine)
    shutil.rmtree(data.parent / "exports" / run.id, ignore_errors=True)
    shutil.rmtree(run.path)  # the record is what is kept; adapters of every trial would fill the disk
    return record


def export_scores(run: Any, data: Path, engine: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """The test scores of the run's fitted LoRA export (calibrated on the training rows, default rank) and its
    export_report.json's headline."""
    from denselora_app.export import EXPORT_REPORT, export_run
    from denselora_app.serving.evaluate import evaluate

    folder = export_run(run, "lora", data.parent / "exports" / run.id, calibration=str(data / "train.jsonl")).folder
    questions = data / "test.jsonl"
    table = evaluate(str(folder), questions, engine=engine, save=False)
    report = json.loads((folder / EXPORT_REPORT).read_text())
    return _scores(table.results[-1], questions), {"rank": report["rank"], "relative_error": report["relative_error"],
                                                   **report["end_to_end"]}


# ---- the benchmark ------------------------------------------------------------------------------------------------


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--model", default=EMBEDDED_MODEL, help="the base model (default: the embedded SmolLM2)")
    for key, value in PRESETS["cpu"].items():
        parser.add_argument(f"--{key.replace('_', '-')}", type=type(value), default=None)
    parser.add_argument("--data-seed", type=int, default=0)
    parser.add_argument("--reply", choices=REPLIES, default="option",
                        help="what a training reply names: the right option's text, or its label as in the paper")
    parser.add_argument("--arms", nargs="+", default=DEFAULT_ARMS, choices=list(RATES))
    parser.add_argument("--rates", nargs="+", type=float, help="sweep these rates for every arm instead")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--trials-dir", type=Path, help="where finished trials are kept (default: per mode, under "
                                                        "benchmarks/results/)")
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/denselora-accuracy"),
                        help="run folders and the task's files while trials run")
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    parser.add_argument("--write-headline", type=Path, nargs="?", const=MEASURED_ACCURACY, metavar="PATH",
                        help="also write the table's headline, which the Train tab shows next to Method (default "
                             "path: the one the app reads)")
    args = parser.parse_args(argv)
    for key, value in PRESETS[args.mode].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    suffix = "" if args.reply == "option" else f"_{args.reply}"
    args.trials_dir = args.trials_dir or RESULTS / f"accuracy_smollm2_{args.mode}{suffix}_trials"
    return args


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from denselora_app.serving.chat import ChatEngine

    if args.threads:
        torch.set_num_threads(args.threads)
    data = args.work_dir / "task"
    sizes = make_task(data, args.train_rows, args.val_per_family, args.test_per_family, args.data_seed,
                      args.reply)
    key = settings_key(args)
    args.trials_dir.mkdir(parents=True, exist_ok=True)
    engine = ChatEngine(device=args.device, runs_root=args.work_dir / "runs")
    denselora = Arm("denselora", "denselora", 16)
    arms = {"denselora": denselora, "lora": Arm("lora", "lora", 16),
            "denselora-shared4": Arm("denselora-shared4", "denselora", 16, (("shared_lr_scale", 4.0),)),
            "denselora-identity": Arm("denselora-identity", "denselora", 16, (("activation", "identity"),)),
            "denselora-export": Arm("denselora-export", "denselora", 16, export=True)}
    if "lora-matched" in args.arms:
        arms["lora-matched"] = Arm("lora-matched", "lora", matched_lora_rank(args.model, _trainable(args.model,
                                                                                                  denselora)))
    started = time.time()
    trials: dict[str, dict[str, Any]] = {}  # every trial of the table, sweeps included, by name

    def trial(arm: Arm, lr: float, seed: int) -> dict[str, Any]:
        name = f"{arm.name}-r{arm.r}-lr{lr:g}-seed{seed}"
        record = stored(args, name, key)
        if record is None:
            log.info("Trial %s", name)
            record = run_trial(args, arm, lr, seed, data, engine, with_base=stored(args, "base", key) is None)
            if "base" in record:
                store(args, "base", key, record.pop("base"))
            store(args, name, key, record)
        trials[name] = record
        return record

    if "denselora-export" in args.arms and "denselora" not in args.arms:
        raise SystemExit("--arms denselora-export retrains the denselora arm's seeds: list denselora too.")
    rates = {name: args.rates or RATES[name][: args.sweep] for name in args.arms if name != "denselora-export"}
    sweeps = sweep_rates(rates, lambda name, lr: trial(arms[name], lr, args.data_seed), args.extend)
    if "denselora-export" in args.arms:  # the GELU arm's chosen rate, every seed, exported
        sweeps["denselora-export"] = [trial(arms["denselora-export"], best_trial(sweeps["denselora"])["lr"],
                                            args.data_seed)]
    results: dict[str, Any] = {}
    for name, sweep in sweeps.items():
        arm = arms[name]
        best = best_trial(sweep)
        seeds = [best] + [trial(arm, best["lr"], args.data_seed + s) for s in range(1, args.seeds)]
        accuracies = [t["test"]["accuracy"] for t in seeds]
        results[name] = {
            "label": arm.label, "method": arm.method, "r": arm.r, "trainable": best["trainable"], "lr": best["lr"],
            "sweep": [{k: t[k] for k in ("lr", "final_loss")} | {"val": t["val"]["accuracy"]} for t in sweep
                      if not arm.export],
            "seeds": seeds, "mean": statistics.fmean(accuracies),
            "std": statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0,
        }
        if arm.export:  # the same seeds' own adapters, and how faithful their exports were
            results[name]["adapter_mean"] = statistics.fmean(t["adapter_test"]["accuracy"] for t in seeds)
            results[name]["exports"] = [t["export"] for t in seeds]
    if args.write_headline:
        write_headline(args.write_headline, args.model, sizes, stored(args, "base", key), arms, results)
    return {"mode": args.mode, "settings": {k: getattr(args, k) for k in PRESETS["cpu"]} | {"model": args.model},
            "task": sizes, "families": list(FAMILIES), "base": stored(args, "base", key), "arms": results,
            "seconds_this_sitting": time.time() - started,
            "trial_seconds": sum(t["train_seconds"] + t["eval_seconds"] for t in trials.values()),
            "machine": machine_description(torch.device(args.device))}


def sweep_rates(rates: dict[str, list[float]], trial: Callable[[str, float], dict[str, Any]],
                extend: int) -> dict[str, list[dict[str, Any]]]:
    """Each arm's sweep with the first seed: its listed rates, then, while the best rate on validation is the
    highest or the lowest the arm tried, the next rate beyond it (at most ``extend`` more), so no arm's chosen rate
    is one its sweep could not see past. Every arm's sweep runs before any arm's other seeds, the arms taking turns
    at each round: a table built over several sittings shows every arm early."""
    sweeps: dict[str, list[dict[str, Any]]] = {name: [] for name in rates}
    for n in range(max(len(r) for r in rates.values())):
        for name, listed in rates.items():
            if n < len(listed):
                sweeps[name].append(trial(name, listed[n]))
    for _ in range(extend):
        for name, sweep in sweeps.items():
            tried = sorted(t["lr"] for t in sweep)
            best = best_trial(sweep)["lr"]
            if len(tried) > 1 and best in (tried[0], tried[-1]):
                sweep.append(trial(name, grid_neighbour(best, up=best == tried[-1])))
    return sweeps


def best_trial(sweep: list[dict[str, Any]]) -> dict[str, Any]:
    """The sweep's choice: the best validation accuracy, ties to the lower final train loss."""
    return max(sweep, key=lambda t: (t["val"]["accuracy"], -t["final_loss"]))


def grid_neighbour(lr: float, up: bool) -> float:
    """The next rate above or below ``lr`` on the 1-3-10 grid the sweeps use: 3e-3 -> 1e-2 up, 1e-3 down."""
    exponent = math.floor(math.log10(lr) + 1e-9)
    mantissa = 3 if lr / 10**exponent > 2 else 1
    if up:
        mantissa, exponent = (3, exponent) if mantissa == 1 else (1, exponent + 1)
    else:
        mantissa, exponent = (1, exponent) if mantissa == 3 else (3, exponent - 1)
    return float(f"{mantissa}e{exponent}")


def write_headline(path: Path, model: str, sizes: dict[str, int], base: dict[str, Any], arms: dict[str, Arm],
                   results: dict[str, Any]) -> None:
    """The table in a few numbers, for the Train tab (methods.measured_accuracy reads it)."""
    name = "the embedded SmolLM2-135M-Instruct (30 layers)" if model == EMBEDDED_MODEL else model
    headline = {
        "model": name,
        "task": f"{sizes['test']:,} held-out multiple-choice questions after training on {sizes['train']:,}",
        "seeds": min(len(r["seeds"]) for r in results.values()),
        "base": base["accuracy"],
        "arms": [{"label": f"{arms[n].label} ({r['trainable']:,} parameters)", "mean": r["mean"], "std": r["std"]}
                 for n, r in results.items()],
        "measured": time.strftime("%Y-%m-%d"),
    }
    path.write_text(json.dumps(headline, indent=1) + "\n", encoding="utf-8")


def _trainable(model: str, arm: Arm) -> int:
    from denselora_app.engine import models
    from denselora_app.engine.methods import count_parameters

    config = models.load_config(model)
    return count_parameters(config, RunConfig(model=model, method=arm.method, r=arm.r,
                                              target_modules=list(TARGET_MODULES))).trainable


def stored(args: argparse.Namespace, name: str, key: str) -> Any:
    return kept_trial(args.trials_dir / f"{name}.json", key)


def store(args: argparse.Namespace, name: str, key: str, result: Any) -> Any:
    return keep_trial(args.trials_dir / f"{name}.json", key, result)


def render_markdown(results: dict[str, Any]) -> str:
    s = results["settings"]
    lines = [
        f"Command: `{results['command']}`",
        f"Machine: {machine_line(results['machine'])}",
        f"Model: {s['model']}; task: {results['task']['train']} training questions, {results['task']['val']} "
        f"validation and {results['task']['test']} test questions ({', '.join(results['families'])}); "
        f"{s['steps']} steps of batch {s['batch']}, warmup {s['warmup']}, linear decay; training and scoring "
        f"time {results['trial_seconds'] / 3600:.1f} h in all, sweeps included.",
        "",
        f"Base model (no adapter): {results['base']['accuracy']:.1%} on the test questions.",
        "",
    ]
    rows = []
    for name, arm in results["arms"].items():
        seeds = ", ".join(f"{t['test']['accuracy']:.1%}" for t in arm["seeds"])
        losses = ", ".join(f"{t['final_loss']:.3f}"
                           + (f" ({t['previous_loss']:.3f})" if t["previous_loss"] is not None else "")
                           for t in arm["seeds"])
        rows.append([arm["label"], f"{arm['trainable']:,}", f"{arm['lr']:g}",
                     f"{arm['mean']:.1%} ± {arm['std']:.1%}", seeds, losses])
    lines.append(markdown_table(["arm", "trainable", "chosen lr", "test accuracy (mean ± std)", "per seed",
                                 "final train loss per seed (mean of the last tenth of the steps; the tenth before)"],
                                rows))
    for arm in results["arms"].values():
        if "adapter_mean" in arm:
            fits = "; ".join(f"rank {e['rank']}, held-out error {e['relative_error']:.1%}, identical greedy answers "
                             f"{e['greedy_identical_share']:.0%}" for e in arm["exports"])
            lines += ["", f"{arm['label']}: {arm['mean']:.1%} on the test questions, where the same seeds' own GELU "
                          f"adapters scored {arm['adapter_mean']:.1%} (per seed: {fits})."]
    lines += ["", "Learning-rate sweep (first seed; validation accuracy, final train loss):", ""]
    rows = [[arm["label"], f"{t['lr']:g}", f"{t['val']:.1%}", f"{t['final_loss']:.3f}"]
            for name, arm in results["arms"].items() for t in sorted(arm["sweep"], key=lambda t: t["lr"])]
    lines.append(markdown_table(["arm", "lr", "validation accuracy", "final train loss"], rows))
    lines += ["", "Test accuracy per question family (mean over seeds):", ""]
    families = results["families"]
    rows = [[arm["label"]] + [f"{statistics.fmean(t['test']['per_family'].get(f, 0.0) for t in arm['seeds']):.0%}"
                      for f in families] for name, arm in results["arms"].items()]
    rows.append(["base"] + [f"{results['base']['per_family'].get(f, 0.0):.0%}" for f in families])
    lines.append(markdown_table(["arm", *families], rows))
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> None:
    main_for(__file__, "accuracy_smollm2", parse_args, run, render_markdown, argv, variant="mode")


if __name__ == "__main__":
    main()
