"""The demo Space renders prompts exactly as the studio's Chat does (its own copy: the Space has no denselora_app)."""

from __future__ import annotations

import ast
import importlib.util
import sys
from pathlib import Path
from types import ModuleType, SimpleNamespace

import pytest
from conftest import tiny_tokenizer
from tokenizers import processors

from denselora_app.engine.data import IGNORE_INDEX, encode_example
from denselora_app.serving.adapters import ChatError
from denselora_app.serving.chat import ChatEngine
from denselora_app.serving.prompts import build_messages

TEMPLATE = Path(__file__).resolve().parent.parent / "denselora_app" / "hub" / "space_template"


def load_space_prompts() -> ModuleType:
    """The Space's prompts.py, imported from the template folder alone (without its app.py, gradio or a model)."""
    spec = importlib.util.spec_from_file_location("space_prompts", TEMPLATE / "prompts.py")
    module = importlib.util.module_from_spec(spec)
    written = sys.dont_write_bytecode
    sys.dont_write_bytecode = True  # no __pycache__ in the template folder, which publish copies from
    try:
        spec.loader.exec_module(module)
    finally:
        sys.dont_write_bytecode = written
    return module


space = load_space_prompts()


def with_bos(tokenizer):
    """The tokenizer, adding a bos token when asked for special tokens: shows who asks for them and who does not."""
    tokenizer.bos_token = "<|endoftext|>"
    bos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<|endoftext|> $A", pair="<|endoftext|> $A $B", special_tokens=[("<|endoftext|>", bos)])
    return tokenizer


TOKENIZERS = {
    "chat template": lambda: tiny_tokenizer(),
    "chat template, bos": lambda: with_bos(tiny_tokenizer()),
    "no template (Alpaca)": lambda: tiny_tokenizer(chat_template=False),
    "no template (Alpaca), bos": lambda: with_bos(tiny_tokenizer(chat_template=False)),
}


def parts(text: str) -> list[dict[str, str]]:
    return [{"type": "text", "text": text}]  # how Gradio 6 gives a message's content


# (message, history, system prompt)
CONVERSATIONS = {
    "one turn": ("what is the capital of a country?", [], ""),
    "system prompt": ("what is the capital of a country?", [], "answer: yes no"),
    "blank system prompt": ("the quick brown fox?", [], "  \n"),
    "multi-turn": ("and the lazy dog?", [{"role": "user", "content": "the quick brown fox?"},
                                         {"role": "assistant", "content": "jumps over"}], ""),
    "multi-turn, system prompt, content parts": (
        "answer: yes or no?", [{"role": "user", "content": parts("what is the capital?")},
                               {"role": "assistant", "content": parts("a country")},
                               {"role": "user", "content": "the fox?"},
                               {"role": "assistant", "content": "the quick brown fox"}], "the lazy dog"),
    "system turn in the history too": ("no?", [{"role": "system", "content": "yes"},
                                               {"role": "user", "content": "what?"},
                                               {"role": "assistant", "content": "answer"}], "the capital"),
}


def studio_ids(tokenizer, message: str, history: list, system_prompt: str) -> list[int]:
    """What the studio's Chat generates from: ChatEngine.encode, the one encoder behind every reply."""
    engine = SimpleNamespace(_require=lambda: SimpleNamespace(tokenizer=tokenizer))
    return ChatEngine.encode(engine, build_messages(message, history, system_prompt))


def space_ids(tokenizer, message: str, history: list, system_prompt: str) -> list[int]:
    """What the Space's app.py generates from."""
    return space.prompt_ids(tokenizer, space.build_messages(message, history, system_prompt))


@pytest.mark.parametrize("conversation", CONVERSATIONS, ids=str)
@pytest.mark.parametrize("kind", TOKENIZERS, ids=str)
def test_the_space_and_the_studio_prompt_with_the_same_tokens(kind, conversation):
    tokenizer = TOKENIZERS[kind]()
    message, history, system_prompt = CONVERSATIONS[conversation]
    ids = studio_ids(tokenizer, message, history, system_prompt)
    assert space_ids(tokenizer, message, history, system_prompt) == ids
    # The rules both follow: a template and its generation prompt (it writes its own special tokens), or the
    # Alpaca prompt up to "### Response:", its header replaced by the system messages, and the tokenizer's bos.
    text = tokenizer.decode(ids)
    alpaca = "Alpaca" in kind
    if alpaca:
        has_system = any(m["role"] == "system" for m in build_messages(message, history, system_prompt))
        assert text.endswith("### Response:\n")
        assert ("Below is an instruction that describes a task." in text) != has_system
    else:
        assert text.endswith("<|im_start|>assistant\n")
    assert text.startswith("<|endoftext|>") == (alpaca and kind.endswith("bos"))


@pytest.mark.parametrize("conversation", CONVERSATIONS, ids=str)
@pytest.mark.parametrize("kind", TOKENIZERS, ids=str)
def test_the_space_prompt_is_what_training_put_before_the_answer(kind, conversation):
    tokenizer = TOKENIZERS[kind]()
    message, history, system_prompt = CONVERSATIONS[conversation]
    prompt = space_ids(tokenizer, message, history, system_prompt)
    row = {"messages": space.build_messages(message, history, system_prompt)
           + [{"role": "assistant", "content": "yes"}]}
    trained = encode_example(tokenizer, row, "messages", cutoff_len=512, train_on_inputs=False)
    assert trained["input_ids"][:len(prompt)] == prompt
    assert trained["labels"][len(prompt) - 1] == IGNORE_INDEX and trained["labels"][len(prompt)] != IGNORE_INDEX


def test_both_refuse_the_same_history():
    history = [{"role": "tool", "content": "x"}]
    with pytest.raises(ChatError, match="History message 1 has role 'tool'") as studio:
        build_messages("hi", history)
    with pytest.raises(space.PromptError) as copy:
        space.build_messages("hi", history)
    assert str(copy.value) == str(studio.value)


def test_the_space_renderer_stands_alone_and_the_app_uses_it():
    """prompts.py needs only the tokenizer (no torch, gradio or studio), and app.py builds every prompt with it."""
    imported = set()
    for node in ast.walk(ast.parse((TEMPLATE / "prompts.py").read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module.split(".")[0])
    assert imported <= {"__future__", "collections", "typing", "jinja2"}, imported
    app = ast.parse((TEMPLATE / "app.py").read_text(encoding="utf-8"))
    from_prompts = {alias.name for node in ast.walk(app) if isinstance(node, ast.ImportFrom)
                    and node.module == "prompts" for alias in node.names}
    assert {"build_messages", "prompt_ids"} <= from_prompts
    called = {node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", None)
              for node in ast.walk(app) if isinstance(node, ast.Call)}
    assert "apply_chat_template" not in called  # no second renderer in the app
