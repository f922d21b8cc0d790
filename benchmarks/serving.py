"""Serving throughput: the batched decoder under 1, 4, 8 and 16 concurrent clients, base and adapter; evaluation's
``generate`` mode batched against one question at a time; and transformers' own continuous batching for comparison.

Everything goes through the studio's engine (``ChatEngine``: one base, a DenseLoRA adapter on it, the decoder of
serving/generation.py), as ``serve``, the app's /v1 and the Chat tab use it; HTTP is left out, so the numbers are the
generation core's (the OpenAI layer adds a JSON encode per token). Each client is a thread that sends its requests
one after another (a chat prompt from the shipped sample questions, ``--new-tokens`` greedy tokens, no end token
honoured so that every request decodes the same number of tokens); total tokens/s is all clients' tokens over the
wall time, and latency is per request.

The adapter is a random DenseLoRA r16 adapter on q/k/v/up/down (``init_weights=False``): its cost does not depend on
what it learnt. Evaluation compares ``ChatEngine.complete`` per question with ``complete_many`` on the shipped
multiple-choice set: time, and how many greedy replies are identical.

    python benchmarks/serving.py                      # embedded SmolLM2-135M on the CPU (about 5 minutes, 2 cores)
    python benchmarks/serving.py --device cuda --model Qwen/Qwen2.5-1.5B-Instruct   # a GPU, a local or cached model
    python benchmarks/serving.py --model tiny --clients 1 2 --requests 2 --new-tokens 4   # a smoke run, seconds
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Optional

import torch
from benchlib import machine_description, machine_line, main_for, markdown_table
from peft import get_peft_model

from denselora_app.config import EMBEDDED_MODEL
from denselora_app.denselora import DenseLoraConfig
from denselora_app.engine import models
from denselora_app.serving.chat import ChatEngine, GenerationSettings
from denselora_app.serving.evaluate import SAMPLE_MC, choice_prompt, load_eval_data
from denselora_app.serving.generation import Request
from denselora_app.serving.prompts import build_messages

log = logging.getLogger("benchmarks.serving")
TARGETS = {"8 clients / 1 client tokens/s": 4.0, "adapter / base tokens/s (8 clients)": 0.9,
           "eval generate: batched speed-up": 4.0, "eval generate: identical answers": 0.99}


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--model", default=EMBEDDED_MODEL, help="the base model ('tiny': a random tiny LLaMA)")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--requests", type=int, default=2, help="requests per client")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--eval-questions", type=int, default=32, help="multiple-choice questions for the eval part")
    parser.add_argument("--no-transformers-cb", action="store_true", help="skip transformers' continuous batching")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    args.variant = args.device
    return args


def _adapter(base: str, folder: Path) -> Path:
    torch.manual_seed(0)
    config = DenseLoraConfig(r=16, lora_alpha=32, init_weights=False,
                             target_modules=["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"])
    get_peft_model(models.load_model(base, device="cpu"), config).save_pretrained(folder)
    return folder


def _tiny(folder: Path) -> str:
    from transformers import LlamaConfig, LlamaForCausalLM

    from denselora_app.engine.models import load_tokenizer

    config = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    LlamaForCausalLM(config).save_pretrained(folder)
    load_tokenizer(models.ensure_local(EMBEDDED_MODEL)).save_pretrained(folder)
    return str(folder)


def _clients(engine: ChatEngine, prompts: list[list[int]], adapter: str | None, clients: int, requests: int,
             tokens: int) -> dict[str, Any]:
    latencies: list[float] = []
    counted = [0]
    lock = threading.Lock()
    start = threading.Barrier(clients + 1)

    def client(n: int) -> None:
        start.wait()
        for k in range(requests):
            began = time.perf_counter()
            handle = engine.submit(Request(prompts[(n * requests + k) % len(prompts)], adapter, tokens))
            got = sum(1 for _ in handle)
            with lock:
                latencies.append(time.perf_counter() - began)
                counted[0] += got

    threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
    for thread in threads:
        thread.start()
    start.wait()
    began = time.perf_counter()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - began
    ordered = sorted(latencies)
    return {"clients": clients, "tokens": counted[0], "seconds": round(wall, 3),
            "tokens_per_second": round(counted[0] / wall, 2),
            "latency_p50": round(statistics.median(ordered), 3),
            "latency_p95": round(ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))], 3)}


def _transformers_cb(engine: ChatEngine, prompts: list[list[int]], tokens: int, batch: int) -> dict[str, Any]:
    """transformers' continuous batching (``generate_batch``) on the same PeftModel, for the same prompts."""
    from transformers import GenerationConfig

    config = GenerationConfig(max_new_tokens=tokens, do_sample=False, eos_token_id=None,
                              pad_token_id=engine.tokenizer.pad_token_id)
    with engine.using(True) as model:
        try:
            began = time.perf_counter()
            outputs = model.generate_batch(inputs=prompts[:batch], generation_config=config)
            wall = time.perf_counter() - began
        except Exception as err:  # noqa: BLE001  (recorded: whether it works with a PEFT model here)
            return {"works": False, "error": f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"}
    generated = sum(len(out.generated_tokens) for out in outputs.values())
    return {"works": True, "clients": batch, "tokens": generated, "seconds": round(wall, 3),
            "tokens_per_second": round(generated / wall, 2)}


def _evaluation(engine: ChatEngine, questions: int, tokens: int) -> dict[str, Any]:
    asked = [build_messages(choice_prompt(q)) for q in load_eval_data(SAMPLE_MC, questions).questions]
    greedy = GenerationSettings(max_new_tokens=tokens, temperature=0.0, seed=0)
    began = time.perf_counter()
    alone = [engine.complete(m, greedy) for m in asked]
    one_at_a_time = time.perf_counter() - began
    began = time.perf_counter()
    together = engine.complete_many(asked, greedy)
    batched = time.perf_counter() - began
    same = sum(a == b for a, b in zip(alone, together))
    # Where the time goes: the prompts alone (one new token each) the same two ways, and the lengths involved.
    first = GenerationSettings(max_new_tokens=1, temperature=0.0, seed=0)
    began = time.perf_counter()
    for m in asked:
        engine.complete(m, first)
    prefill_alone = time.perf_counter() - began
    began = time.perf_counter()
    engine.complete_many(asked, first)
    prefill_batched = time.perf_counter() - began
    prompt_tokens = [len(engine.encode(m)) for m in asked]
    reply_tokens = [len(engine.tokenizer(reply, add_special_tokens=False)["input_ids"]) for reply in alone]
    return {"questions": len(asked), "one_at_a_time_seconds": round(one_at_a_time, 2),
            "batched_seconds": round(batched, 2), "speedup": round(one_at_a_time / batched, 2),
            "identical": same, "identical_share": round(same / len(asked), 4),
            "prefill_one_at_a_time_seconds": round(prefill_alone, 2),
            "prefill_batched_seconds": round(prefill_batched, 2),
            "prompt_tokens_mean": round(sum(prompt_tokens) / len(prompt_tokens), 1),
            "reply_tokens_mean": round(sum(reply_tokens) / len(reply_tokens), 1)}


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    machine = machine_description(device)
    with tempfile.TemporaryDirectory() as scratch:
        base = _tiny(Path(scratch) / "tiny") if args.model == "tiny" else args.model
        adapter = _adapter(base, Path(scratch) / "adapter")
        engine = ChatEngine(device=args.device)
        engine.select(str(adapter))
        engine.decoder.max_batch = max(args.clients)
        name = engine.adapter_name(None)
        prompts = [engine.encode(build_messages(q.question))
                   for q in load_eval_data(SAMPLE_MC, max(args.clients) * args.requests).questions]
        _clients(engine, prompts, name, 1, 1, 4)  # warm-up: first-call allocations and lazy imports
        rows = []
        for adapter_name, label in ((None, "base"), (name, "adapter")):
            for clients in args.clients:
                result = {"model": label, **_clients(engine, prompts, adapter_name, clients, args.requests,
                                                     args.new_tokens)}
                log.info("%s", result)
                rows.append(result)
        cb = None if args.no_transformers_cb else _transformers_cb(engine, prompts, args.new_tokens,
                                                                   min(8, max(args.clients)))
        log.info("transformers continuous batching: %s", cb)
        evaluation = _evaluation(engine, args.eval_questions, args.new_tokens)
        log.info("evaluation: %s", evaluation)
    machine["load_average_1m_at_end"] = round(os.getloadavg()[0], 2)
    return {"machine": machine, "model": args.model, "new_tokens": args.new_tokens, "requests": args.requests,
            "throughput": rows, "transformers_continuous_batching": cb, "evaluation": evaluation,
            "measured": _measured(rows, evaluation)}


def _measured(rows: list[dict[str, Any]], evaluation: dict[str, Any]) -> dict[str, float | None]:
    def speed(model: str, clients: int) -> float | None:
        return next((r["tokens_per_second"] for r in rows if r["model"] == model and r["clients"] == clients), None)

    one, eight = speed("adapter", 1), speed("adapter", 8)
    base8 = speed("base", 8)
    return {"8 clients / 1 client tokens/s": round(eight / one, 2) if one and eight else None,
            "adapter / base tokens/s (8 clients)": round(eight / base8, 2) if eight and base8 else None,
            "eval generate: batched speed-up": evaluation["speedup"],
            "eval generate: identical answers": evaluation["identical_share"]}


def render_markdown(results: dict[str, Any]) -> str:
    rows = [[r["model"], r["clients"], r["tokens"], r["seconds"], r["tokens_per_second"], r["latency_p50"],
             r["latency_p95"]] for r in results["throughput"]]
    lines = [f"Serving: `{results['command']}`", "", machine_line(results["machine"]), "",
             markdown_table(["model", "clients", "tokens", "s", "tokens/s", "latency p50 s", "latency p95 s"], rows)]
    cb = results["transformers_continuous_batching"]
    if cb is not None:
        lines += ["", "transformers' continuous batching (`generate_batch`) on the same adapter: "
                  + (f"{cb['tokens_per_second']} tokens/s for {cb['clients']} prompts" if cb["works"]
                     else f"failed: {cb['error']}")]
    e = results["evaluation"]
    lines += ["", f"Evaluation, generate mode, {e['questions']} questions: one at a time {e['one_at_a_time_seconds']} s, "
              f"batched {e['batched_seconds']} s ({e['speedup']}x); identical greedy replies {e['identical']}/"
              f"{e['questions']}. The prompts alone (one new token each): one at a time "
              f"{e['prefill_one_at_a_time_seconds']} s, batched {e['prefill_batched_seconds']} s; prompts "
              f"{e['prompt_tokens_mean']} tokens and replies {e['reply_tokens_mean']} tokens on average.", "",
              markdown_table(["target", "wanted", "measured", "met"],
                             [[k, f">= {v}", results["measured"][k],
                               "yes" if (results["measured"][k] or 0) >= v else "no"] for k, v in TARGETS.items()])]
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> None:
    main_for(__file__, "serving", parse_args, run, render_markdown, argv, variant="variant")


if __name__ == "__main__":
    main()
