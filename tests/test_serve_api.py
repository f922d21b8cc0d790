"""The OpenAI API in this process (no server): request checks and error shapes, bounds, keys, the app's /v1."""

from __future__ import annotations

import time

import pytest
import torch
from conftest import save_tiny_model
from fastapi.testclient import TestClient
from peft import get_peft_model

from denselora_app.denselora import DenseLoraConfig
from denselora_app.engine import models
from denselora_app.serving.adapters import ChatError
from denselora_app.serving.api import Limits, create_app, engine_catalog
from denselora_app.serving.chat import ChatEngine, GenerationSettings
from denselora_app.serving.server import Server, ServeError, ServeOptions, fixed_key, space_owner_key

pytestmark = pytest.mark.usefixtures("one_thread")

CONTEXT = 64  # the tiny model's max_position_embeddings


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("api")
    save_tiny_model(root / "model")
    torch.manual_seed(0)
    config = DenseLoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_weights=False)
    get_peft_model(models.load_model(str(root / "model"), device="cpu"), config).save_pretrained(root / "adapter")
    return root / "adapter"


@pytest.fixture(scope="module")
def engine(adapter_dir) -> ChatEngine:
    engine = ChatEngine(device="cpu")
    engine.select(str(adapter_dir))
    return engine


@pytest.fixture
def api(engine):
    with TestClient(create_app(engine, engine_catalog(engine, {engine.adapter_name(None): "tuned"}),
                               limits=Limits(max_body_bytes=20_000))) as client:
        yield client


def ask(api, path: str = "/chat/completions", **body):
    body = {"model": "tuned", "messages": [{"role": "user", "content": "hi"}], **body}
    if path == "/completions":
        body.pop("messages")
        body.setdefault("prompt", "the quick")
    return api.post(path, json=body)


@pytest.mark.parametrize("field, value, param", [
    ("temperature", 3, "temperature"), ("top_p", 0, "top_p"), ("n", 9, "n"), ("max_tokens", 0, "max_tokens"),
    ("stop", ["a", "b", "c", "d", "e"], "stop"), ("messages", [], "messages"), ("top_logprobs", 21, "top_logprobs"),
    ("messages", [{"role": "robot", "content": "hi"}], "messages.0.role"),
])
def test_a_bad_parameter_is_a_400_naming_it(api, field, value, param):
    response = ask(api, **{field: value})
    error = response.json()["error"]
    assert response.status_code == 400 and error["param"] == param and error["type"] == "invalid_request_error"
    assert param in error["message"]


def test_errors_keep_openai_shape(api):
    missing = ask(api, model="nope")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"
    assert "tuned" in missing.json()["error"]["message"]
    assert api.get("/nowhere").json()["error"]["type"] == "not_found_error"
    garbled = api.post("/chat/completions", content=b"{not json", headers={"Content-Type": "application/json"})
    assert garbled.status_code == 400 and "error" in garbled.json()
    big = api.post("/completions", content=b"x" * 30_000, headers={"Content-Type": "application/json"})
    assert big.status_code == 413 and big.json()["error"]["code"] == "request_too_large"
    chunked = api.post("/completions", content=iter([b"x" * 15_000] * 2), headers={"Content-Type": "application/json"})
    assert chunked.status_code == 413 and chunked.json()["error"]["code"] == "request_too_large"
    tokens = ask(api, "/completions", prompt=[1, 2, 10**6])
    assert tokens.status_code == 400 and "vocabulary" in tokens.json()["error"]["message"]


def test_the_context_bounds_every_request(api, engine):
    prompt = len(engine.encode([{"role": "user", "content": "hi"}]))
    capped = ask(api, max_tokens=10_000, temperature=0).json()
    assert capped["usage"]["completion_tokens"] <= CONTEXT - prompt
    assert capped["usage"]["prompt_tokens"] == prompt
    unbounded = ask(api, temperature=0).json()  # no max_tokens: what the context leaves
    assert unbounded["usage"]["total_tokens"] <= CONTEXT
    long = ask(api, messages=[{"role": "user", "content": "the quick brown fox " * 20}])
    assert long.status_code == 400 and long.json()["error"]["code"] == "context_length_exceeded"
    assert f"context is {CONTEXT} tokens" in long.json()["error"]["message"]
    scored = ask(api, "/completions", prompt=list(range(5, 5 + CONTEXT)), max_tokens=0, echo=True, logprobs=0)
    assert scored.status_code == 200 and len(scored.json()["choices"][0]["logprobs"]["token_logprobs"]) == CONTEXT


def test_a_full_queue_answers_503(api, engine):
    engine.decoder.max_queue, saved = 0, engine.decoder.max_queue
    try:
        response = ask(api)
    finally:
        engine.decoder.max_queue = saved
    assert response.status_code == 503 and response.json()["error"]["code"] == "queue_full"
    assert "--max-queue" in response.json()["error"]["message"]


def test_keys_locally_and_on_a_space(monkeypatch):
    assert fixed_key("s3cret")("s3cret") and not fixed_key("s3cret")("s3cre")
    monkeypatch.setenv("SPACE_ID", "acme/studio")
    accounts = {"hf_alice": {"name": "alice", "orgs": [{"name": "acme", "roleInOrg": "write"}]},
                "hf_reader": {"name": "rita", "orgs": [{"name": "acme", "roleInOrg": "read"}]},
                "hf_owner": {"name": "acme", "orgs": []}, "hf_bob": {"name": "bob", "orgs": []}}
    calls = []

    def whoami(token: str) -> dict:
        calls.append(token)
        if token not in accounts:
            raise PermissionError("401 Unauthorized")
        return accounts[token]

    check = space_owner_key(whoami)
    assert [check(t) for t in ("hf_alice", "hf_owner", "hf_reader", "hf_bob", "hf_forged")] == \
        [True, True, False, False, False]
    assert check("hf_alice") and calls.count("hf_alice") == 1  # cached


def test_serve_refuses_an_open_address_and_mixed_bases(tmp_path, adapter_dir):
    problem = ServeOptions(host="0.0.0.0").problem()
    assert "--api-key" in problem and "--no-api-key" in problem
    assert ServeOptions(host="0.0.0.0", api_key="k").problem() is None
    assert ServeOptions(host="0.0.0.0", open_without_key=True).problem() is None
    other = tmp_path / "other-base"
    save_tiny_model(other / "model", hidden_size=32)
    get_peft_model(models.load_model(str(other / "model"), device="cpu"),
                   DenseLoraConfig(r=4, target_modules=["q_proj"])).save_pretrained(other / "adapter")
    with pytest.raises(ServeError, match="different base models"):
        Server.load([str(adapter_dir), str(other / "adapter")], ServeOptions())
    with pytest.raises(ServeError, match="--name was given 1 times for 2"):
        Server.load([str(adapter_dir), str(adapter_dir)], ServeOptions(names=("a",)))


def test_the_apps_v1_is_the_chat_tabs_engine_and_on_a_space_the_owners(monkeypatch, engine):
    import gradio as gr

    from denselora_app.ui import chat_tab, openai_api

    monkeypatch.setattr(chat_tab, "_engine", engine)  # the model the Chat tab loaded
    monkeypatch.setenv("SPACE_ID", "alice/studio")
    with gr.Blocks() as demo:  # the Chat tab alone: the app's /v1 depends on nothing else
        chat_tab.build(demo)
    app = gr.routes.App.create_app(demo)
    openai_api.mount(app, whoami=lambda token: {"hf_alice": {"name": "alice"}}.get(token) or {"name": "eve"})
    with TestClient(app) as client:
        assert client.get("/v1/models").status_code == 401
        assert client.get("/v1/models", headers={"Authorization": "Bearer hf_eve"}).status_code == 401
        owner = {"Authorization": "Bearer hf_alice"}
        served = [m["id"] for m in client.get("/v1/models", headers=owner).json()["data"]]
        label = engine.selected.adapter.label
        assert served == [engine.base_model, label]
        reply = client.post("/v1/chat/completions", headers=owner, json={
            "model": label, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, "temperature": 0})
    greedy = GenerationSettings(max_new_tokens=8, temperature=0.0)
    assert reply.json()["choices"][0]["message"]["content"] == list(engine.stream_reply("hi", settings=greedy))[-1]
    panel = openai_api.code_panel("https://alice-studio.hf.space", served)
    assert "https://alice-studio.hf.space/v1" in panel and f'"model": "{label}"' in panel and "$HF_TOKEN" in panel


def test_a_chat_longer_than_the_context_drops_its_oldest_turns_and_says_so(engine):
    history = [{"role": role, "content": "the quick brown fox jumps"} for role in ("user", "assistant") * 4]
    settings = GenerationSettings(max_new_tokens=8, temperature=0.0, system_prompt="be brief")
    reply = list(engine.stream_reply("the lazy dog", history, settings))[-1]
    assert reply is not None and "oldest" in engine.last_stats.notice and f"{CONTEXT} tokens" in engine.last_stats.notice
    ids, budget, _ = engine.fit([{"role": "system", "content": "be brief"}, *history[-1:],
                                 {"role": "user", "content": "the lazy dog"}], 8)
    assert len(ids) + budget <= CONTEXT
    short = list(engine.stream_reply("the lazy dog", settings=settings))
    assert short and engine.last_stats.notice is None
    with pytest.raises(ChatError, match=f"context is {CONTEXT} tokens"):
        list(engine.stream_reply("the quick brown fox " * 30, settings=settings))


def test_the_serve_command_refuses_an_open_address_without_a_key(adapter_dir, capsys, monkeypatch):
    from denselora_app.cli import main

    monkeypatch.delenv("DENSELORA_API_KEY", raising=False)
    assert main(["serve", str(adapter_dir), "--host", "0.0.0.0"]) == 2
    err = capsys.readouterr().err
    assert "--api-key" in err and "--no-api-key" in err and "Traceback" not in err


def test_a_message_far_beyond_the_context_is_refused_before_it_is_tokenized(engine, monkeypatch):
    """5 MB of text from a visitor costs a comparison, not seconds of tokenizing and gigabytes of memory; a long
    history is cut by its characters first, and only then tokenized."""
    encoded = []
    real = type(engine).encode
    monkeypatch.setattr(type(engine), "encode", lambda self, messages: encoded.append(messages) or real(self, messages))
    huge = "word " * 1_000_000
    started = time.perf_counter()
    with pytest.raises(ChatError, match=r"5,000,000 characters long, more than the model's context"):
        engine.fit([{"role": "user", "content": huge}], 16)
    assert time.perf_counter() - started < 1 and encoded == []
    history = [{"role": "user", "content": huge[: 64 * CONTEXT]}, {"role": "assistant", "content": "ok"},
               {"role": "user", "content": "and now?"}]
    ids, _, notice = engine.fit(history, 16)
    assert "oldest 1 message" in notice
    assert encoded and all(sum(len(turn["content"]) for turn in messages) <= 64 * CONTEXT for messages in encoded)


def test_the_api_refuses_a_prompt_far_beyond_the_context_before_tokenizing_it(api, engine, monkeypatch):
    encoded = []
    real = type(engine).encode
    monkeypatch.setattr(type(engine), "encode", lambda self, messages: encoded.append(1) or real(self, messages))
    huge = "word " * 1000  # 5,000 characters: more than 64 a token for the tiny model's context
    for answer in (ask(api, messages=[{"role": "user", "content": huge}], max_tokens=4),
                   ask(api, "/completions", prompt=huge, max_tokens=4)):
        assert answer.status_code == 400 and answer.json()["error"]["code"] == "context_length_exceeded"
        assert "5,000 characters, more than the model's context" in answer.json()["error"]["message"]
    assert encoded == []
