"""The batched decoder on a tiny model: a row's answer does not depend on what it is batched with."""

from __future__ import annotations

import threading
from contextlib import nullcontext

import pytest
import torch
from conftest import tiny_llama
from peft import get_peft_model

from denselora_app.denselora import DenseLoraConfig
from denselora_app.serving.generation import Decoder, Finish, GenerationError, QueueFull, Request

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    base = tiny_llama(max_position_embeddings=256)
    with torch.no_grad():  # sharp attention: at init it is nearly uniform, and positions would hardly matter
        for layer in base.model.layers:
            layer.self_attn.q_proj.weight.mul_(30)
            layer.self_attn.k_proj.weight.mul_(30)
    config = DenseLoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_weights=False)
    return get_peft_model(base, config, adapter_name="tuned").eval()


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randint(3, 320, (length,), generator=generator).tolist() for length in (3, 17, 9, 30, 5, 12, 24, 7)]


def generated(model, prompt: list[int], adapter: str | None, tokens: int = 12) -> list[int]:
    ids = torch.tensor([prompt])
    with torch.no_grad(), (model.disable_adapter() if adapter is None else nullcontext()):
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens,
                             do_sample=False, pad_token_id=0, eos_token_id=None)
    return out[0, len(prompt):].tolist()


def test_rows_prefilled_together_answer_as_generate_alone(model, prompts):
    """Eight prompts of different lengths, left-padded into one prefill (the lock held while they are submitted,
    so the worker takes them in one step), base and adapter rows in the same steps."""
    lock = threading.Lock()
    decoder = Decoder(lock, lambda: model)
    adapters = ["tuned" if n % 2 else None for n in range(len(prompts))]
    with lock:
        handles = [decoder.submit(Request(p, a, 12)) for p, a in zip(prompts, adapters)]
    answers = [[t.id for t in handle] for handle in handles]
    assert answers == [generated(model, p, a) for p, a in zip(prompts, adapters)]
    assert all(handle.finish is Finish.LENGTH for handle in handles)
    assert answers[1] != generated(model, prompts[1], None)  # the adapter changes the answer


def test_rows_joining_a_running_batch_answer_as_alone(model, prompts):
    """Rows arrive while others decode (joining the cache with left padding) and leave when done."""
    decoder = Decoder(threading.Lock(), lambda: model)
    lengths = [4, 20, 9, 15]
    first = decoder.submit(Request(prompts[0], "tuned", lengths[0]))
    tokens = iter(first)
    taken = [next(tokens).id]  # the first row is decoding before the others come
    handles = [decoder.submit(Request(p, "tuned", n)) for p, n in zip(prompts[1:4], lengths[1:])]
    answers = [taken + [t.id for t in tokens]] + [[t.id for t in handle] for handle in handles]
    assert answers == [generated(model, p, "tuned", n) for p, n in zip(prompts[:4], lengths)]


def test_sampling_follows_the_request_seed_not_the_batch(model, prompts):
    decoder = Decoder(threading.Lock(), lambda: model)

    def sample(batch: list[list[int]]) -> list[int]:
        handles = [decoder.submit(Request(p, "tuned", 10, temperature=1.0, top_p=0.9, seed=7)) for p in batch]
        return [[t.id for t in h] for h in handles][0]

    assert sample(prompts[:1]) == sample(prompts[:6]) == sample([prompts[0], prompts[3]])


def test_end_tokens_cancel_scoring_and_the_queue_bound(model, prompts):
    decoder = Decoder(threading.Lock(), lambda: model, max_queue=2)
    answer = generated(model, prompts[0], "tuned", 12)
    end = next(n for n in range(1, 12) if answer[n] not in answer[:n])  # a token that first appears there
    stop = decoder.submit(Request(prompts[0], "tuned", 12, eos_ids=(answer[end],)))
    tokens = list(stop)
    assert [t.id for t in tokens] == answer[:end + 1] and tokens[-1].end and stop.finish is Finish.STOP

    scored = decoder.submit(Request(prompts[1], None, 0, prompt_logprobs=2))
    assert list(scored) == [] and scored.finish is Finish.LENGTH
    with torch.no_grad(), model.disable_adapter():
        logits = model(input_ids=torch.tensor([prompts[1]])).logits[0].log_softmax(-1)
    expected = logits[:-1].gather(-1, torch.tensor(prompts[1][1:]).unsqueeze(-1)).squeeze(-1)
    assert scored.prompt_logprobs[0].logprob is None
    assert [p.logprob for p in scored.prompt_logprobs[1:]] == pytest.approx(expected.tolist(), abs=1e-5)
    assert scored.prompt_logprobs[1].top[0][0] == int(logits[0].argmax())

    lock = threading.Lock()
    full = Decoder(lock, lambda: model, max_queue=2)
    with lock:
        waiting = [full.submit(Request(p, None, 50)) for p in prompts[:2]]
        with pytest.raises(QueueFull, match="--max-queue"):
            full.submit(Request(prompts[2], None, 5))
        waiting[0].close()
    assert list(waiting[0]) == [] and waiting[0].finish is Finish.CANCELLED
    assert len(list(waiting[1])) == 50
    assert full.load == 0


def test_unloading_ends_requests_with_a_reason(model, prompts):
    lock = threading.Lock()
    decoder = Decoder(lock, lambda: model)
    with lock:
        handle = decoder.submit(Request(prompts[0], None, 50))
        decoder.reset("The model was unloaded.")
    with pytest.raises(GenerationError, match="unloaded"):
        list(handle)


@pytest.mark.slow
def test_memory_stays_flat_over_a_thousand_requests(model, prompts):
    """Rows leave the batch, their cache and their handles go: after a warm-up, 1,000 more requests (8 at a time,
    some cancelled mid-way) leave the process's memory where it was."""
    import gc

    import psutil

    decoder = Decoder(threading.Lock(), lambda: model)

    def rounds(count: int) -> None:
        for n in range(count // 8):
            handles = [decoder.submit(Request(p, "tuned" if k % 2 else None, 6)) for k, p in enumerate(prompts)]
            handles[n % 8].close()
            for handle in handles:
                list(handle)

    rounds(200)
    gc.collect()
    before = psutil.Process().memory_info().rss
    rounds(1000)
    gc.collect()
    grown = psutil.Process().memory_info().rss - before
    assert decoder.load == 0 and not decoder._batches
    assert grown < 16 * 1024**2, f"memory grew by {grown / 1024**2:.1f} MB over 1,000 requests"
