"""The Chat, Evaluate and Publish tabs' event functions, called as gradio calls them, on a tiny model and a run
made by hand; the Hub is faked at huggingface_hub's boundary (test_publish.FakeHub)."""

from __future__ import annotations

import json
import tempfile
import zipfile
from pathlib import Path

import gradio as gr
import pytest
import torch
from conftest import APP_DATA_ROWS, tiny_tokenizer
from gradio.helpers import special_args
from peft import get_peft_model
from test_chat import readable_tiny_llama
from test_publish import ALICE, SECRET, FakeHub

from denselora_app.config import RunConfig
from denselora_app.denselora import DenseLoraConfig
from denselora_app.hub import account, publish
from denselora_app.runs import create_run
from denselora_app.serving import evaluate as evaluation
from denselora_app.serving.chat import GenerationSettings
from denselora_app.ui import chat_tab, evaluate_tab, publish_tab

PROMPT = "what is the capital of a country?"
GREEDY = dict(system_prompt="", temperature=0.0, top_p=1.0, max_new_tokens=12, seed=0)


# ---- a run with an adapter of a tiny model, as the Train tab leaves it (shared with test_browser_chat.py) ---------


def save_readable_model(folder: Path) -> Path:
    """A tiny model folder whose replies are whole words that stream one by one (see test_chat.readable_tiny_llama)."""
    readable_tiny_llama().save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def make_chat_run(runs_root: Path, model_dir: Path, name: str = "tiny-chat") -> str:
    """A completed DenseLoRA run of ``model_dir``: config.yaml, a random (not no-op) adapter, a few metrics."""
    run = create_run(RunConfig(model=str(model_dir), data="unused.jsonl", run_name=name, device="cpu", r=4,
                               target_modules=["q_proj", "v_proj"]), runs_root)
    torch.manual_seed(0)
    model = readable_tiny_llama()
    adapter = DenseLoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_weights=False,
                              task_type="CAUSAL_LM")
    get_peft_model(model, adapter).save_pretrained(run.adapter_dir)
    for step in range(1, 5):
        run.append_metrics({"step": step, "loss": 3.0 - 0.2 * step})
    run.update_status(state="completed")
    return run.id


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread


@pytest.fixture(scope="module")
def runs_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("chat-ui")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DENSELORA_RUNS", str(root / "runs"))
        patch.setattr(chat_tab, "_engine", None)  # a fresh app-wide engine for this module, dropped after it
        make_chat_run(root / "runs", save_readable_model(root / "model"))
        yield root / "runs"


@pytest.fixture(scope="module")
def run_id(runs_root) -> str:
    (run_dir,) = (p for p in runs_root.iterdir() if (p / "config.yaml").exists())
    return run_dir.name


@pytest.fixture(scope="module")
def adapter(runs_root, run_id) -> str:
    """The adapter as the Chat tab's list offers it."""
    choices = dict(chat_tab.adapter_choices())
    assert list(choices) == [run_id]
    return choices[run_id]


def last_text(chat: list[dict]) -> str:
    return chat[-1]["content"]


# ---- chat ----------------------------------------------------------------------------------------------------------


def test_replies_stream_and_compare_shows_the_plain_base_beside_the_adapter(adapter, run_id):
    status = chat_tab.load_adapter(adapter)
    assert run_id in status and "denselora" in status and "trainable" in status and "float32 on cpu" in status

    updates = list(chat_tab.send(PROMPT, [], [], adapter, False, **GREEDY))
    assert updates[0][0] == ""  # the message box empties as soon as the message is taken
    replies = [last_text(u[1]) for u in updates if not isinstance(u[1], dict)]  # dict: gr.skip()
    assert len(set(replies)) >= 4, replies  # several increments, each extending the last
    assert all(later.startswith(earlier) for earlier, later in zip(replies, replies[1:]))
    history = updates[-1][1]
    assert [m["role"] for m in history] == ["user", "assistant"] and history[0]["content"] == PROMPT
    assert "12 tokens" in updates[-1][3]

    # The base column (adapter off) appears, starting from the conversation so far.
    base_column = chat_tab.toggle_compare(True, history)
    assert base_column.visible and [m["content"][0]["text"] for m in base_column.value] == [PROMPT, replies[-1]]

    pairs = list(chat_tab.send(PROMPT, [], [], adapter, True, **GREEDY))
    base_chat, chat = pairs[-1][2], pairs[-1][1]
    assert [m["role"] for m in base_chat] == [m["role"] for m in chat] == ["user", "assistant"]
    base_text, adapter_text = last_text(base_chat), last_text(chat)
    assert base_text and adapter_text and base_text != adapter_text
    assert adapter_text == last_text(history)  # greedy: the same answer as without compare
    greedy = GenerationSettings(max_new_tokens=GREEDY["max_new_tokens"], temperature=0.0, seed=0)
    assert base_text == list(chat_tab.engine().stream_reply(PROMPT, settings=greedy, use_adapter=False))[-1]
    # Both columns grow: first the base (the adapter's still empty), then the adapter.
    growing = [(last_text(p[2]), last_text(p[1])) for p in pairs[1:-1]]
    assert len({b for b, a in growing if not a}) >= 3 and len({a for _, a in growing if a}) >= 3


def test_stop_ends_the_answer_and_keeps_what_was_said(adapter):
    stream = chat_tab.send(PROMPT, [], [], adapter, False, **{**GREEDY, "max_new_tokens": 400})
    next(stream), next(stream)  # the message is taken, the first words arrive
    chat_tab.stop_chat()
    *_, (_, chat, _, status) = stream
    assert "stopped" in status and last_text(chat) and int(status.split("Last answer: ")[1].split()[0]) < 100


def test_chat_problems_are_shown_as_messages(adapter):
    (update,) = list(chat_tab.send("hello", [], [], "no-such-run", False, **GREEDY))
    assert update[3].startswith("⚠️ 'no-such-run' is not a run") and "or a Hub adapter id" in update[3]
    assert update[0] == update[1] == gr.skip()  # the message stays in its box, the history as it was
    (update,) = list(chat_tab.send("hello", [], [], adapter, False, **{**GREEDY, "top_p": 0.0}))
    assert "top_p must be in (0, 1]" in update[3]
    (update,) = list(chat_tab.send("  ", [], [], adapter, False, **GREEDY))
    assert "Type a message" in update[3]
    assert chat_tab.load_adapter("").startswith("⚠️")
    chat_tab.stop_chat()  # nothing is generating: a no-op


# ---- evaluate ------------------------------------------------------------------------------------------------------


def test_evaluate_tab_tables_base_and_run_and_saves_eval_json(adapter, run_id, runs_root, tmp_path):
    assert evaluate_tab.MODES == evaluation.MODES
    loss_file = tmp_path / "held_out.jsonl"
    loss_file.write_text("".join(json.dumps(row) + "\n" for row in APP_DATA_ROWS[:3]))
    message, results, details = evaluate_tab.run_evaluation([adapter], None, str(loss_file), "loglik", 3)
    assert "studio_facts_mc.jsonl" in message and "eval.json" in message
    assert list(results.columns) == evaluate_tab.RESULT_COLUMNS
    assert [m.split(":")[0] for m in results["model"]] == ["base", run_id]
    assert all(a.endswith("%") for a in results["accuracy"]) and results["trainable %"].iloc[0] == "-"
    assert all(float(x) > 0 for x in results["loss"]) and all(float(x) > 1 for x in results["perplexity"])
    assert len(details) == 6 and list(details["model"].drop_duplicates()) == list(results["model"])
    saved = json.loads((runs_root / run_id / "eval.json").read_text())
    assert saved["results"][0]["mode"] == "loglik" and saved["base"][0]["total"] == 3

    assert "Choose at least one" in evaluate_tab.run_evaluation([], None, None, "loglik", 3)[0]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "q?", "choices": ["a", "b"], "answer": 5}) + "\n")
    message, results, _ = evaluate_tab.run_evaluation([adapter], str(bad), None, "generate", None)
    assert message.startswith("⚠️") and "out of range" in message and results is None
    assert "limit must be at least 1" in evaluate_tab.run_evaluation([adapter], None, None, "loglik", 0)[0]


# ---- publish -------------------------------------------------------------------------------------------------------


@pytest.fixture
def exports(tmp_path, monkeypatch) -> Path:
    """The temp dir, where the zips to download go."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    return tmp_path


def test_publish_build_previews_the_card_and_zips_exactly_the_repository(run_id, runs_root, exports):
    assert publish_tab.publishable_runs() == [run_id]
    message, card, files, curve, download = publish_tab.build_model(run_id, "alice/tiny-chat", "")
    folder = runs_root / run_id / "publish" / "model"
    assert str(folder) in message
    assert "DenseLoRA" in card and "```yaml" in card and "library_name: peft" in card
    assert "](loss_curve.png)" not in card and curve.size[0] > 100  # the curve is shown beside the card
    listed = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    assert all(f"`{name}`" in files for name in listed) and "adapter_model.safetensors" in listed
    assert download.visible
    assert (exports / "denselora-studio-exports" / "model-alice--tiny-chat.zip").is_file()
    with zipfile.ZipFile(download.value["path"]) as archive:
        assert sorted(archive.namelist()) == listed

    message, card, *_, download = publish_tab.build_model(run_id, "not a repo id", "")
    assert message.startswith("⚠️") and "not a valid Hugging Face repository id" in message
    assert card == "" and download.visible is False
    message, space_download = publish_tab.build_space(run_id, "alice/tiny-chat-space", "", False, "")
    assert "carries the adapter" in message and "`app.py`" in message
    with zipfile.ZipFile(space_download.value["path"]) as archive:
        assert "adapter/adapter_model.safetensors" in archive.namelist()


def test_publishing_errors_are_messages_and_the_token_never_shows(run_id, exports, monkeypatch):
    # gradio fills the OAuth token and profile itself (None when signed out): they are no inputs of the endpoint.
    inputs = [run_id, "alice/x", False, "", "", "denselora", ""]  # ..., base model, publish as, calibration
    special_args(publish_tab.push_model, inputs)
    assert inputs[5:7] == [None, None] and inputs[7:] == ["denselora", ""]

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(account, "get_token", lambda: None)
    message = publish_tab.push_model(run_id, "alice/x", False, "", "", None)
    assert message.startswith("⚠️") and "No Hugging Face token" in message

    monkeypatch.setenv("HF_TOKEN", SECRET)
    hubs: list[FakeHub] = []
    for module in (account, publish):  # who the token belongs to; the upload
        monkeypatch.setattr(module, "HfApi", lambda: hubs.append(FakeHub()) or hubs[-1])
    message = publish_tab.push_model(run_id, "alice/tiny-chat", True, "First", "", None)
    assert message.startswith("✅") and "https://huggingface.co/alice/tiny-chat" in message
    assert hubs[-1].calls[1][1]["private"] is True and hubs[-1].calls[2][1]["commit_message"] == "First"
    # A Space downloads its base model from the Hub: a run on a local model needs its Hub id.
    assert "local model" in publish_tab.push_space(run_id, "alice/chat", "alice/tiny-chat", False, False, "", "",
                                                   None)
    message = publish_tab.push_space(run_id, "alice/chat", "alice/tiny-chat", False, False, "", "owner/base", None)
    assert message.startswith("✅") and "spaces/alice/chat" in message

    leaky = FakeHub(upload_error=RuntimeError(f"upload failed for token {SECRET}"))
    for module in (account, publish):  # who the token belongs to; the upload
        monkeypatch.setattr(module, "HfApi", lambda: leaky)
    message = publish_tab.push_model(run_id, "alice/tiny-chat", False, "", "", None)
    assert message.startswith("⚠️") and "hf_***" in message

    # On a Space only the signed-in owner's own sign-in counts, never the Space's HF_TOKEN.
    monkeypatch.setenv("SPACE_ID", "alice/denselora-studio")
    assert "Sign in with the Hugging Face button" in publish_tab.push_model(run_id, "alice/x", False, "", "", None)
    visitor = gr.OAuthToken(token="hf_visitor_token", scope="write-repos", expires_at=0)
    alice = gr.OAuthProfile({"preferred_username": "alice", "name": "Alice", "profile": "", "picture": ""})
    hub = FakeHub(whoami=ALICE)
    for module in (account, publish):  # who the token belongs to; the upload
        monkeypatch.setattr(module, "HfApi", lambda: hub)
    message = publish_tab.push_model(run_id, "alice/tiny-chat", False, "", "", visitor, alice)
    assert message.startswith("✅") and "hf_visitor_token" not in message
    assert {call[1]["token"] for call in hub.calls} == {"hf_visitor_token"}

    everything = [publish_tab.build_model(run_id, "alice/tiny-chat", ""), publish_tab.publishable_runs()]
    assert SECRET not in repr(everything)
