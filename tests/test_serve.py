"""`serve` as a client sees it: a live server process driven by the official `openai` client.

One server per module (a run's adapter, a second adapter folder, and their base), on a tiny random model.
"""

from __future__ import annotations

import http.client
import json
import re
import shlex
import subprocess
import threading
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import openai
import pytest
import torch
from peft import PeftModel
from serve_support import API_KEY, make_workspace, start_serve

from denselora_app.engine import models
from denselora_app.runs import resolve_run
from denselora_app.serving.prompts import build_messages, render_prompt

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

PROMPTS = ["what is the capital of a country?", "the quick brown fox", "answer: yes or no", "the lazy dog",
           "what is the dog?", "a fox jumps", "over the lazy fox", "is the capital a dog?"]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    runs, run_id, other = make_workspace(root)
    server = start_serve(runs, run_id, str(other), "--name", "served-run", "--name", "other",
                         "--api-key", API_KEY)
    yield SimpleNamespace(server=server, url=server.url, run_id=run_id, base=str(root / "model"),
                          adapter=resolve_run(run_id, runs).adapter_dir)
    server.stop()


@pytest.fixture(scope="module")
def client(served) -> openai.OpenAI:
    return openai.OpenAI(base_url=served.url, api_key=API_KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def reference(served):
    """The run's adapter on its own copy of the base, in this process: what `generate` answers one at a time."""
    tokenizer = models.load_tokenizer(served.base)
    model = PeftModel.from_pretrained(models.load_model(served.base, device="cpu"), str(served.adapter)).eval()

    def prompt_ids(text: str) -> list[int]:
        rendered, special = render_prompt(tokenizer, build_messages(text))
        return tokenizer(rendered, add_special_tokens=special)["input_ids"]

    def answer(text: str, tokens: int, adapter: bool = True) -> str:
        ids = torch.tensor([prompt_ids(text)])
        with torch.no_grad(), (model.disable_adapter() if not adapter else torch.no_grad()):
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
        return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)

    return SimpleNamespace(tokenizer=tokenizer, model=model, prompt_ids=prompt_ids, answer=answer)


def chat(client, model: str, text: str, **kwargs):
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": text}], **kwargs)


def test_models_lists_the_adapters_and_their_base(client, served):
    assert {m.id for m in client.models.list()} == {"served-run", "other", served.base}


def test_chat_answers_as_generate_does_with_usage(client, served, reference):
    reply = chat(client, "served-run", PROMPTS[0], max_tokens=12, temperature=0)
    assert reply.choices[0].message.content == reference.answer(PROMPTS[0], 12)
    assert reply.choices[0].finish_reason == "length" and reply.model == "served-run"
    assert reply.usage.prompt_tokens == len(reference.prompt_ids(PROMPTS[0])) and reply.usage.completion_tokens == 12
    base = chat(client, served.base, PROMPTS[0], max_completion_tokens=12, temperature=0)
    assert base.choices[0].message.content == reference.answer(PROMPTS[0], 12, adapter=False)
    assert base.choices[0].message.content != reply.choices[0].message.content


def test_streamed_chat_is_the_plain_answer_in_pieces(client):
    plain = chat(client, "other", PROMPTS[1], max_tokens=10, temperature=0).choices[0].message.content
    chunks = list(chat(client, "other", PROMPTS[1], max_tokens=10, temperature=0, stream=True,
                       stream_options={"include_usage": True}))
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert "".join(pieces) == plain and len([p for p in pieces if p]) >= 3
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert not chunks[-1].choices and chunks[-1].usage.completion_tokens == 10


def test_stop_sequences_and_several_choices(client):
    words = chat(client, "served-run", PROMPTS[2], max_tokens=8, temperature=0).choices[0].message.content
    stop = words[len(words) // 2:len(words) // 2 + 2]
    assert len(stop) == 2 and words.index(stop) > 0
    cut = chat(client, "served-run", PROMPTS[2], max_tokens=8, temperature=0, stop=[stop]).choices[0]
    assert cut.finish_reason == "stop" and cut.message.content == words[:words.index(stop)]
    streamed = chat(client, "served-run", PROMPTS[2], max_tokens=8, temperature=0, stop=stop, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == cut.message.content

    sampled = chat(client, "served-run", PROMPTS[2], max_tokens=8, temperature=1.0, seed=5, n=3)
    assert sorted(c.index for c in sampled.choices) == [0, 1, 2]
    again = chat(client, "served-run", PROMPTS[2], max_tokens=8, temperature=1.0, seed=5, n=3)
    assert [c.message.content for c in again.choices] == [c.message.content for c in sampled.choices]


def test_completions_echo_the_prompt_with_its_logprobs(client, reference):
    ids = reference.prompt_ids(PROMPTS[3])
    with torch.no_grad():
        logits = reference.model(input_ids=torch.tensor([ids])).logits[0].log_softmax(-1)
    expected = logits[:-1].gather(-1, torch.tensor(ids[1:]).unsqueeze(-1)).squeeze(-1).tolist()
    # As lm-evaluation-harness asks for a log-likelihood: token ids, echo, one alternative, one token.
    result = client.completions.create(model="served-run", prompt=ids, max_tokens=1, temperature=0, echo=True,
                                       logprobs=1).choices[0]
    assert result.logprobs.token_logprobs[0] is None and len(result.logprobs.token_logprobs) == len(ids) + 1
    assert result.logprobs.token_logprobs[1:len(ids)] == pytest.approx(expected, abs=1e-4)
    greedy = [lp == max(top.values()) for lp, top in zip(result.logprobs.token_logprobs[1:len(ids)],
                                                         result.logprobs.top_logprobs[1:len(ids)])]
    assert greedy == [int(logits[n].argmax()) == ids[n + 1] for n in range(len(ids) - 1)]
    assert result.text.startswith(reference.tokenizer.decode(ids))
    text = client.completions.create(model="served-run", prompt=[PROMPTS[3], PROMPTS[4]], max_tokens=4,
                                     temperature=0)
    assert [c.index for c in text.choices] == [0, 1] and all(c.text for c in text.choices)


def test_errors_have_openai_shape_and_status(client, served):
    with pytest.raises(openai.NotFoundError) as missing:
        chat(client, "no-such-model", "hi")
    assert missing.value.status_code == 404 and missing.value.body["code"] == "model_not_found"
    assert "served-run" in missing.value.body["message"]
    with pytest.raises(openai.BadRequestError) as bad:
        chat(client, "served-run", "hi", temperature=5)
    assert bad.value.body["param"] == "temperature" and bad.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as long:
        chat(client, "served-run", "the dog " * 1200)
    assert long.value.body["code"] == "context_length_exceeded" and "2048" in long.value.body["message"]
    wrong = openai.OpenAI(base_url=served.url, api_key="not-the-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as refused:
        wrong.models.list()
    assert refused.value.status_code == 401 and refused.value.body["code"] == "invalid_api_key"
    # A body over the limit (4 MB by default) is refused from its declared length, before it is read.
    connection = http.client.HTTPConnection(served.url.split("//")[1].split("/")[0], timeout=30)
    connection.putrequest("POST", "/v1/chat/completions")
    connection.putheader("Authorization", f"Bearer {API_KEY}")
    connection.putheader("Content-Length", str(5 * 1024 * 1024))
    connection.endheaders()
    big = connection.getresponse()
    assert big.status == 413 and json.load(big)["error"]["code"] == "request_too_large"
    connection.close()


def test_concurrent_clients_get_their_one_at_a_time_answers(client, served):
    """8 clients at once, on the two adapters and the base: each answer is the one it gets alone (greedy, and
    sampled with a seed), whatever it was batched with."""
    cases = [("served-run", "other", served.base)[n % 3] for n in range(len(PROMPTS))]
    settings = [dict(temperature=0) if n % 2 else dict(temperature=1.0, seed=n) for n in range(len(PROMPTS))]
    alone = [chat(client, model, text, max_tokens=16, **s).choices[0].message.content
             for model, text, s in zip(cases, PROMPTS, settings)]
    together: dict[int, str] = {}
    start = threading.Barrier(len(PROMPTS))

    def ask(n: int) -> None:
        start.wait()
        together[n] = chat(client, cases[n], PROMPTS[n], max_tokens=16, **settings[n]).choices[0].message.content

    threads = [threading.Thread(target=ask, args=(n,)) for n in range(len(PROMPTS))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [together[n] for n in range(len(PROMPTS))] == alone
    assert len(set(alone)) == len(alone)


def test_a_client_that_disconnects_mid_stream_frees_its_row(client, served):
    def requests_in_flight() -> int:
        with urllib.request.urlopen(served.url.removesuffix("/v1") + "/health", timeout=5) as response:
            return json.load(response)["requests"]

    stream = chat(client, "served-run", PROMPTS[0], max_tokens=1900, temperature=0, stream=True)
    for n, _ in zip(range(3), stream):
        pass
    assert requests_in_flight() == 1
    stream.close()
    closed = time.monotonic()
    while requests_in_flight() and time.monotonic() - closed < 5:
        time.sleep(0.05)
    assert requests_in_flight() == 0, "the row still decodes after its client went away"


def test_the_readmes_commands_work_as_shown(served, capsys):
    """The README's "Use your adapter from code" snippet and curl line, against this server (its URL, key, and the
    run's served name put in)."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme.split("## Use your adapter from code", 1)[1].split("\n## ", 1)[0]

    def shown(text: str) -> str:
        return (text.replace("http://127.0.0.1:8000/v1", served.url).replace("sk-local", API_KEY)
                .replace("RUN_ID", "served-run"))

    snippet = shown(re.search(r"```python\n(.*?)```", section, re.S)[1])
    exec(compile(snippet, "README.md", "exec"), {})
    reply, streamed = capsys.readouterr().out.split("\n", 1)  # the reply's line, then the streamed text
    assert reply.strip() and streamed.strip()
    curl = next(line for line in section.splitlines() if line.startswith("curl "))
    listed = subprocess.run(shlex.split(shown(curl)), capture_output=True, text=True, timeout=30, check=True)
    assert "served-run" in {m["id"] for m in json.loads(listed.stdout)["data"]}
