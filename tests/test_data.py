"""The data pipeline: reading every input kind, layout detection, rendering, loss masks, the report, the split."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import datasets
import pandas as pd
import pytest
from conftest import tiny_tokenizer

from denselora_app import rules
from denselora_app.engine import data as D
from denselora_app.engine.data import encode_example, prepare_data, render_preview
from denselora_app.engine.formats import detect_format
from denselora_app.engine.sources import SAMPLE_DATA, SAMPLE_PROBES, DataError, RowError, load_rows
from denselora_app.hub import connection

EOS = "<|im_end|>"
NO_INPUT_PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
    "\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)
INPUT_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request."
    "\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)


@pytest.fixture
def plain_tokenizer():
    return tiny_tokenizer(chat_template=False)


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def ids_of(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def assert_trains_only(example: dict, start: int, end: int) -> None:
    """Token by token: labels equal input_ids on [start, end) and are -100 everywhere else."""
    assert len(example["labels"]) == len(example["input_ids"]) == len(example["attention_mask"])
    for i, (token, label) in enumerate(zip(example["input_ids"], example["labels"])):
        assert label == (token if start <= i < end else -100), f"token {i}"


def trained_text(tokenizer, example: dict) -> str:
    return tokenizer.decode([t for t, label in zip(example["input_ids"], example["labels"]) if label != -100])


def chat(*turns: str) -> list[dict]:
    roles = ["user", "assistant"]
    return [{"role": roles[i % 2], "content": text} for i, text in enumerate(turns)]


# ---------------------------------------------------------------------------------------------------------------
# Layout detection


@pytest.mark.parametrize(
    "row, expected",
    [
        ({"instruction": "a", "input": "", "output": "b"}, "alpaca"),
        ({"instruction": "a", "output": "b"}, "alpaca"),
        ({"messages": chat("a", "b")}, "messages"),
        ({"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]}, "sharegpt"),
        ({"prompt": "a", "completion": "b"}, "prompt_completion"),
        ({"text": "a"}, "text"),
        ({"messages": chat("a", "b"), "text": "a"}, "messages"),  # the more specific layout wins a tie
    ],
)
def test_detect_format(row, expected):
    assert detect_format([row]) == expected


def test_detect_format_follows_the_majority_of_rows():
    rows = [{"text": "a"}] * 3 + [{"instruction": "a", "output": "b"}]
    assert detect_format(rows) == "text"


def test_unknown_columns_name_the_columns_and_the_layouts(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "qa.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(DataError) as err:
        prepare_data(str(path), tokenizer)
    message = str(err.value)
    assert "qa.jsonl" in message and "'question'" in message and "'answer'" in message
    for layout in rules.DATA_FORMATS:
        assert layout in message


# ---------------------------------------------------------------------------------------------------------------
# Rendering and loss masks


@pytest.mark.parametrize("with_input", [False, True])
def test_alpaca_without_chat_template_uses_the_paper_prompt(plain_tokenizer, with_input):
    row = {"instruction": "what is the capital?", "input": "the fox" if with_input else "", "output": "yes no"}
    prompt = (INPUT_PROMPT if with_input else NO_INPUT_PROMPT).format(**row)
    example = encode_example(plain_tokenizer, row, "alpaca", cutoff_len=512, train_on_inputs=False)
    assert example["input_ids"] == ids_of(plain_tokenizer, prompt + "yes no" + EOS)
    assert example["input_ids"][-1] == plain_tokenizer.eos_token_id
    assert_trains_only(example, len(ids_of(plain_tokenizer, prompt)), len(example["input_ids"]))
    assert trained_text(plain_tokenizer, example) == "yes no" + EOS


def test_alpaca_with_chat_template_masks_everything_but_the_answer(tokenizer):
    row = {"instruction": "what is the capital?", "input": "the fox", "output": "yes"}
    messages = chat("what is the capital?\n\nthe fox", "yes")
    example = encode_example(tokenizer, row, "alpaca", cutoff_len=512, train_on_inputs=False)
    assert example["input_ids"] == ids_of(tokenizer, tokenizer.apply_chat_template(messages, tokenize=False))
    prompt = tokenizer.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    start = len(ids_of(tokenizer, prompt))
    # the answer and its closing <|im_end|> are trained; the template's trailing newline is not
    assert_trains_only(example, start, start + len(ids_of(tokenizer, "yes" + EOS)))
    assert trained_text(tokenizer, example) == "yes" + EOS


def test_multi_turn_chat_trains_every_assistant_turn(tokenizer):
    system = {"role": "system", "content": "be brief"}
    row = {"messages": [system, *chat("what is the fox?", "brown", "and the dog?", "lazy")]}
    example = encode_example(tokenizer, row, "messages", cutoff_len=512, train_on_inputs=False)
    pieces = D._pieces(tokenizer, example)
    assert pieces == [
        ("<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nwhat is the fox?<|im_end|>\n"
         "<|im_start|>assistant\n", False),
        ("brown<|im_end|>", True),
        ("\n<|im_start|>user\nand the dog?<|im_end|>\n<|im_start|>assistant\n", False),
        ("lazy<|im_end|>", True),
        ("\n", False),
    ]
    assert [label for label in example["labels"] if label != -100] == ids_of(tokenizer, "brown" + EOS + "lazy" + EOS)


def test_multi_turn_chat_without_template_uses_alpaca_blocks(plain_tokenizer):
    row = {"messages": chat("what is the fox?", "brown", "and the dog?", "lazy")}
    example = encode_example(plain_tokenizer, row, "messages", cutoff_len=512, train_on_inputs=False)
    assert D._pieces(plain_tokenizer, example) == [
        (NO_INPUT_PROMPT.format(instruction="what is the fox?"), False),
        ("brown" + EOS, True),
        ("\n\n### Instruction:\nand the dog?\n\n### Response:\n", False),
        ("lazy" + EOS, True),
    ]


def test_sharegpt_roles_are_mapped(tokenizer):
    row = {"conversations": [{"from": "system", "value": "be brief"}, {"from": "human", "value": "the fox?"},
                             {"from": "gpt", "value": "quick"}]}
    example = encode_example(tokenizer, row, "sharegpt", cutoff_len=512, train_on_inputs=False)
    expected = [{"role": "system", "content": "be brief"}, *chat("the fox?", "quick")]
    assert example["input_ids"] == ids_of(tokenizer, tokenizer.apply_chat_template(expected, tokenize=False))
    assert trained_text(tokenizer, example) == "quick" + EOS


def test_prompt_completion(tokenizer, plain_tokenizer):
    row = {"prompt": "the capital?", "completion": "yes"}
    with_template = encode_example(tokenizer, row, "prompt_completion", cutoff_len=512, train_on_inputs=False)
    assert with_template["input_ids"] == ids_of(
        tokenizer, tokenizer.apply_chat_template(chat("the capital?", "yes"), tokenize=False)
    )
    assert trained_text(tokenizer, with_template) == "yes" + EOS
    plain = encode_example(plain_tokenizer, row, "prompt_completion", cutoff_len=512, train_on_inputs=False)
    prompt = NO_INPUT_PROMPT.format(instruction="the capital?")
    assert plain["input_ids"] == ids_of(plain_tokenizer, prompt + "yes" + EOS)
    assert_trains_only(plain, len(ids_of(plain_tokenizer, prompt)), len(plain["input_ids"]))


def test_text_rows_train_the_whole_text(tokenizer):
    example = encode_example(tokenizer, {"text": "the quick brown fox"}, "text", cutoff_len=512, train_on_inputs=False)
    assert example["input_ids"] == ids_of(tokenizer, "the quick brown fox" + EOS)
    assert example["labels"] == example["input_ids"]


@pytest.mark.parametrize("tok", [tiny_tokenizer(), tiny_tokenizer(chat_template=False)], ids=["template", "plain"])
def test_train_on_inputs_trains_every_token(tok):
    row = {"instruction": "what is the capital?", "output": "yes"}
    masked = encode_example(tok, row, "alpaca", cutoff_len=512, train_on_inputs=False)
    example = encode_example(tok, row, "alpaca", cutoff_len=512, train_on_inputs=True)
    assert example["input_ids"] == masked["input_ids"]
    assert example["labels"] == example["input_ids"]
    assert -100 in masked["labels"]


def test_template_that_is_not_prefix_stable_falls_back_to_the_answer_text():
    # This template marks the final turn, so rendering a prefix does not reproduce the start of the whole chat.
    tok = tiny_tokenizer()
    tok.chat_template = (
        "{% for message in messages %}<|im_start|>{{ message['role'] }}{% if loop.last %} last{% endif %}\n"
        "{{ message['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    row = {"messages": chat("what is the fox?", "brown", "and the dog?", "lazy")}
    example = encode_example(tok, row, "messages", cutoff_len=512, train_on_inputs=False)
    assert example["input_ids"] == ids_of(tok, tok.apply_chat_template(row["messages"], tokenize=False))
    assert [piece for piece, trained in D._pieces(tok, example) if trained] == ["brown" + EOS, "lazy" + EOS]


def test_token_merged_across_the_prompt_answer_boundary_is_trained():
    # No separator after the role: "assistant" + "he lazy dog" tokenizes as ... "an", "the", ... so the prompt's
    # own tokens are not a prefix of the whole chat's tokens.
    tok = tiny_tokenizer()
    tok.chat_template = (
        "{% for message in messages %}{{ message['role'] }}{{ message['content'] }}<|im_end|>{% endfor %}"
        "{% if add_generation_prompt %}assistant{% endif %}"
    )
    messages = chat("what is the capital?", "he lazy dog")
    prompt_ids = ids_of(tok, tok.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True))
    example = encode_example(tok, {"messages": messages}, "messages", cutoff_len=512, train_on_inputs=False)
    assert example["input_ids"][: len(prompt_ids)] != prompt_ids  # the case under test
    assert D._pieces(tok, example) == [
        ("userwhat is the capital?<|im_end|>assistan", False), ("the lazy dog<|im_end|>", True)
    ]


def test_truncation_keeps_the_first_cutoff_tokens(tokenizer):
    row = {"instruction": "what is the capital?", "output": "the quick brown fox jumps over the lazy dog"}
    full = encode_example(tokenizer, row, "alpaca", cutoff_len=512, train_on_inputs=False)
    prompt_len = next(i for i, label in enumerate(full["labels"]) if label != -100)
    cut = encode_example(tokenizer, row, "alpaca", cutoff_len=prompt_len + 3, train_on_inputs=False)
    assert cut["input_ids"] == full["input_ids"][: prompt_len + 3]
    assert cut["labels"] == full["labels"][: prompt_len + 3]
    assert sum(label != -100 for label in cut["labels"]) == 3


def test_answer_truncated_away_is_dropped_and_reported(tmp_path, tokenizer):
    long_prompt = "the quick brown fox jumps over the lazy dog " * 20
    path = write_jsonl(tmp_path / "d.jsonl", [
        {"instruction": "what is the capital?", "output": "yes"},
        {"instruction": long_prompt, "output": "yes"},
        {"instruction": "what is the fox?", "output": "the quick brown fox jumps over the lazy dog " * 5},
    ])
    with pytest.raises(RowError) as err:
        encode_example(tokenizer, {"instruction": long_prompt, "output": "yes"}, "alpaca", cutoff_len=40,
                       train_on_inputs=False)
    assert err.value.reason == "answer truncated away"
    report = prepare_data(str(path), tokenizer, cutoff_len=40).report
    assert report.rows_used == 2 and report.dropped == {"answer truncated away": 1}
    assert report.truncated == 1  # the long answer, cut but kept
    assert report.token_lengths["max"] == 40
    assert report.problems[0].startswith("d.jsonl line 2: the answer starts after the cutoff of 40 tokens")
    assert "raise cutoff_len" in report.problems[0]


# ---------------------------------------------------------------------------------------------------------------
# Input files


def test_jsonl_with_every_format_in_its_own_file(tmp_path, tokenizer):
    cases = {
        "alpaca": [{"instruction": "a?", "input": "", "output": "b"},
                   {"instruction": "a?", "input": "c", "output": "b"}],
        "messages": [{"messages": chat("a?", "b", "c?", "d")}],
        "sharegpt": [{"conversations": [{"from": "human", "value": "a?"}, {"from": "gpt", "value": "b"}]}],
        "prompt_completion": [{"prompt": "a?", "completion": "b"}],
        "text": [{"text": "the lazy dog"}],
    }
    for fmt, rows in cases.items():
        prepared = prepare_data(str(write_jsonl(tmp_path / f"{fmt}.jsonl", rows)), tokenizer)
        assert prepared.report.format == fmt
        assert prepared.report.rows_used == len(rows) == prepared.train.num_rows
        assert prepared.eval is None


def test_prepared_dataset_columns(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "a?", "output": "b"}])
    train = prepare_data(str(path), tokenizer).train
    assert set(train.column_names) == {"input_ids", "attention_mask", "labels"}
    example = train[0]
    assert example == encode_example(tokenizer, {"instruction": "a?", "output": "b"}, "alpaca", cutoff_len=512,
                                     train_on_inputs=False)


def test_txt_one_example_per_line(tmp_path, tokenizer):
    path = tmp_path / "notes.txt"
    path.write_text("the quick brown fox\nthe lazy dog\n   \n", encoding="utf-8")
    rows, problems = load_rows(str(path))
    assert rows == [{"text": "the quick brown fox"}, {"text": "the lazy dog"}] and problems == []
    report = prepare_data(str(path), tokenizer).report
    assert (report.format, report.rows_used) == ("text", 2)


def test_txt_blank_lines_separate_paragraphs(tmp_path):
    path = tmp_path / "story.txt"
    path.write_text("the quick\nbrown fox\n\n\nthe lazy\r\ndog\n", encoding="utf-8")
    rows, _ = load_rows(str(path))
    assert rows == [{"text": "the quick\nbrown fox"}, {"text": "the lazy\ndog"}]


def test_csv(tmp_path, tokenizer):
    path = tmp_path / "d.csv"
    pd.DataFrame({"instruction": ["a, with comma?", "b?"], "input": ["", "x"], "output": ['say "yes"', "2"]}).to_csv(
        path, index=False
    )
    rows, _ = load_rows(str(path))
    assert rows[0] == {"instruction": "a, with comma?", "input": "", "output": 'say "yes"'}
    assert rows[1]["output"] == "2"  # numbers stay text
    prepared = prepare_data(str(path), tokenizer)
    assert (prepared.report.format, prepared.report.rows_used) == ("alpaca", 2)
    assert trained_text(tokenizer, prepared.train[0]) == 'say "yes"' + EOS


def test_csv_with_chat_column_as_json_text(tmp_path, tokenizer):
    path = tmp_path / "chat.csv"
    pd.DataFrame({"messages": [json.dumps(chat("a?", "b"))]}).to_csv(path, index=False)
    prepared = prepare_data(str(path), tokenizer)
    assert trained_text(tokenizer, prepared.train[0]) == "b" + EOS


def test_parquet_with_nested_chats(tmp_path, tokenizer):
    path = tmp_path / "d.parquet"
    pd.DataFrame({"messages": [chat("a?", "b"), chat("c?", "d", "e?", "f")]}).to_parquet(path)
    prepared = prepare_data(str(path), tokenizer)
    assert (prepared.report.format, prepared.report.rows_used) == ("messages", 2)
    assert trained_text(tokenizer, prepared.train[1]) == "d" + EOS + "f" + EOS


@pytest.mark.parametrize("wrap", [lambda rows: rows, lambda rows: {"data": rows}, lambda rows: {"train": rows}])
def test_json_list_or_wrapped(tmp_path, tokenizer, wrap):
    path = tmp_path / "d.json"
    path.write_text(json.dumps(wrap([{"prompt": "a?", "completion": "b"}] * 3)), encoding="utf-8")
    report = prepare_data(str(path), tokenizer).report
    assert (report.format, report.rows_used) == ("prompt_completion", 3)


def test_json_lines_and_json_array_are_read_whatever_the_extension(tmp_path):
    rows = [{"text": "the fox"}, {"text": "the dog"}]
    (tmp_path / "lines.json").write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    (tmp_path / "array.jsonl").write_text(json.dumps(rows, indent=2), encoding="utf-8")
    assert load_rows(str(tmp_path / "lines.json")) == (rows, [])
    assert load_rows(str(tmp_path / "array.jsonl")) == (rows, [])


def test_explicit_format_overrides_detection(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a?", "completion": "b", "text": "the lazy dog"}])
    assert prepare_data(str(path), tokenizer).report.format == "prompt_completion"
    forced = prepare_data(str(path), tokenizer, fmt="text")
    assert forced.report.format == "text"
    assert forced.train[0]["input_ids"] == ids_of(tokenizer, "the lazy dog" + EOS)
    with pytest.raises(DataError, match=r"format 'alpaca' needs the columns \['instruction', 'output'\]"):
        prepare_data(str(path), tokenizer, fmt="alpaca")
    with pytest.raises(DataError, match="unknown format 'chatml'"):
        prepare_data(str(path), tokenizer, fmt="chatml")


# ---------------------------------------------------------------------------------------------------------------
# Bad input: every problem is a DataError or a report line that names the place and the fix


def test_bad_json_line_is_reported_with_its_line_number(tmp_path, tokenizer):
    path = tmp_path / "data.jsonl"
    good = json.dumps({"instruction": "a?", "output": "b"})
    path.write_text("\n".join([good] * 6 + ['{"instruction": "a?" "output": "b"}', good, "[1, 2]"]) + "\n")
    rows, problems = load_rows(str(path))
    assert len(rows) == 7
    assert problems[0] == (
        "bad JSON",
        "data.jsonl line 7: not valid JSON (Expecting ',' delimiter: column 22) - fix the line or remove it",
    )
    assert problems[1][0] == "not an object" and problems[1][1].startswith("data.jsonl line 9:")
    report = prepare_data(str(path), tokenizer).report
    assert report.rows_read == 9 and report.rows_used == 7
    assert report.dropped == {"bad JSON": 1, "not an object": 1}
    assert report.problems[0] == problems[0][1]


ALPACA_ROW = {"instruction": "a?", "output": "b"}
CHAT_ROW = {"messages": chat("a?", "b")}


@pytest.mark.parametrize(
    "good, row, reason, text",
    [
        (ALPACA_ROW, {"instruction": "a?"}, "missing field", "no 'output' field - add it or remove the row"),
        (ALPACA_ROW, {"instruction": "a?", "output": "  "}, "empty answer", "the answer ('output') is empty"),
        (ALPACA_ROW, {"instruction": "", "output": "b"}, "missing field", "'instruction' is empty"),
        (ALPACA_ROW, {"instruction": "a?", "output": ["b"]}, "bad field", "'output' is a list, not text"),
        (CHAT_ROW, {"messages": chat("a?")}, "no assistant turn", "has no assistant turn"),
        (CHAT_ROW, {"messages": chat("a?", "")}, "empty answer", "an assistant turn is empty"),
        (CHAT_ROW, {"messages": [{"role": "robot", "content": "a"}]}, "bad turn", "turn 1 has role 'robot'"),
        (CHAT_ROW, {"messages": [{"role": "user"}]}, "missing field", "turn 1 has no content"),
        (CHAT_ROW, {"messages": []}, "missing field", "'messages' is not a non-empty list"),
        ({"prompt": "a?", "completion": "b"}, {"prompt": "a?", "completion": ""}, "empty answer",
         "the answer ('completion') is empty"),
        ({"text": "a"}, {"text": ""}, "empty text", "the 'text' is empty"),
    ],
)
def test_row_problems_are_dropped_with_reason_and_fix(tmp_path, tokenizer, good, row, reason, text):
    path = write_jsonl(tmp_path / "data.jsonl", [good, row])
    report = prepare_data(str(path), tokenizer).report
    assert report.rows_used == 1
    assert report.dropped == {reason: 1}
    assert report.problems[0].startswith("data.jsonl line 2: ") and text in report.problems[0]
    assert report.rows_read == report.rows_used + sum(report.dropped.values())


def test_no_usable_rows_refuses_with_the_reasons(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "data.jsonl", [{"instruction": "a?", "output": ""}, {"instruction": "b?"}])
    with pytest.raises(DataError) as err:
        prepare_data(str(path), tokenizer)
    message = str(err.value)
    assert "no usable rows out of 2" in message
    assert "empty answer: 1" in message and "missing field: 1" in message
    assert "data.jsonl line 1:" in message


def test_only_bad_json_refuses(tmp_path, tokenizer):
    path = tmp_path / "data.jsonl"
    path.write_text("{oops\n", encoding="utf-8")
    with pytest.raises(DataError, match="bad JSON: 1"):
        prepare_data(str(path), tokenizer)


@pytest.mark.parametrize("name, content", [("e.jsonl", ""), ("e.json", "  \n"), ("e.csv", ""), ("e.txt", "\n\n")])
def test_empty_file(tmp_path, tokenizer, name, content):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=f"{name} is empty"):
        prepare_data(str(path), tokenizer)


def test_missing_file_is_not_taken_for_a_hub_dataset(tmp_path, tokenizer, monkeypatch):
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail("must not go to the Hub"))
    for source in (str(tmp_path / "nope.jsonl"), "nope.csv", "./folder/data", "my_notes.xlsx"):
        with pytest.raises(DataError, match="file not found"):
            prepare_data(source, tokenizer)


def test_unparsable_csv_names_the_file(tmp_path, tokenizer):
    path = tmp_path / "broken.csv"
    path.write_text('instruction,output\n"a?,b\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"broken.csv could not be read as CSV \(.*EOF inside string"):
        prepare_data(str(path), tokenizer)
    path.write_text("instruction,output\na?,b\nc?,d,e,f\n", encoding="utf-8")
    with pytest.raises(DataError, match="broken.csv could not be read as CSV.*Expected 2 fields in line 3"):
        prepare_data(str(path), tokenizer)


def test_unreadable_parquet_and_json_name_the_file(tmp_path, tokenizer):
    (tmp_path / "bad.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match="bad.parquet could not be read as Parquet"):
        prepare_data(str(tmp_path / "bad.parquet"), tokenizer)
    (tmp_path / "bad.json").write_text('[{"text": "a"},\n {"text": }]', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad.json is not valid JSON \(Expecting value at line 2, column 11\)"):
        prepare_data(str(tmp_path / "bad.json"), tokenizer)
    (tmp_path / "scalar.json").write_text("42", encoding="utf-8")
    with pytest.raises(DataError, match="scalar.json: expected a list of objects"):
        prepare_data(str(tmp_path / "scalar.json"), tokenizer)


def test_unsupported_file_type_and_folder(tmp_path, tokenizer):
    (tmp_path / "d.xlsx").write_bytes(b"PK")
    with pytest.raises(DataError, match="unsupported file type '.xlsx'"):
        prepare_data(str(tmp_path / "d.xlsx"), tokenizer)
    with pytest.raises(DataError, match="is a folder"):
        prepare_data(str(tmp_path), tokenizer)


def test_hub_dataset_with_the_connection_dropping_says_to_upload_a_file(tokenizer, monkeypatch):
    # The Hub answered the probe, then went away.
    monkeypatch.setattr(connection, "hub_unreachable_reason", lambda: None)
    calls = []

    def offline(name, split, **kwargs):
        calls.append((name, split))
        raise ConnectionError("Couldn't reach 'owner/set' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match="network is unreachable - upload a data file instead"):
        prepare_data("owner/set:validation", tokenizer)
    with pytest.raises(DataError, match="unreachable"):
        prepare_data("teknium/OpenHermes-2.5", tokenizer)  # the ".5" is part of the name, not a file extension
    assert calls == [("owner/set", "validation"), ("teknium/OpenHermes-2.5", "train")]


def test_an_unreachable_hub_is_named_at_once_without_waiting_for_datasets(tokenizer, monkeypatch, tmp_path):
    monkeypatch.setattr(connection, "hub_unreachable_reason", lambda: "https://huggingface.co did not answer")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail("must not wait for the Hub"))
    with pytest.raises(DataError, match=r"unreachable \(https://huggingface.co did not answer\) and the dataset is "
                                        r"not in the local Hugging Face cache - upload a data file instead"):
        prepare_data("owner/set", tokenizer)


def test_an_unreachable_hub_uses_the_cached_copy_of_a_dataset(tokenizer, monkeypatch, tmp_path):
    cache = tmp_path / "hub-cache"
    snapshot = cache / "datasets--owner--set" / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    (cache / "datasets--owner--set" / "refs").mkdir()
    (cache / "datasets--owner--set" / "refs" / "main").write_text("0123abcd")
    (snapshot / "train.jsonl").write_text(json.dumps({"instruction": "a?", "input": "", "output": "b"}) + "\n")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(connection, "hub_unreachable_reason", lambda: "offline mode is on")
    report = prepare_data("owner/set", tokenizer).report
    assert (report.source, report.format, report.rows_used) == ("owner/set", "alpaca", 1)


def test_hub_dataset_rows_are_used(tokenizer, monkeypatch):
    monkeypatch.setattr(connection, "hub_unreachable_reason", lambda: None)
    rows = [{"instruction": "a?", "input": "", "output": "b"}] * 4
    monkeypatch.setattr(datasets, "load_dataset", lambda name, split, **kwargs: datasets.Dataset.from_list(rows))
    report = prepare_data("tatsu-lab/alpaca", tokenizer).report
    assert (report.source, report.format, report.rows_used) == ("tatsu-lab/alpaca", "alpaca", 4)


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".txt"])
def test_the_input_file_is_left_byte_identical(tmp_path, tokenizer, suffix):
    path = tmp_path / f"data{suffix}"
    if suffix == ".jsonl":
        path.write_bytes(b'\xef\xbb\xbf{"text": "the fox"}\r\n{broken\r\n{"text": "the dog"}')
    elif suffix == ".csv":
        path.write_bytes(b"text\r\nthe fox\r\n\"the, dog\"")
    else:
        path.write_bytes(b"the fox\n\nthe dog  \n")
    before, mtime = path.read_bytes(), path.stat().st_mtime_ns
    prepare_data(str(path), tokenizer, val_size=1)
    render_preview(str(path), tokenizer)
    assert path.read_bytes() == before and path.stat().st_mtime_ns == mtime
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]


# ---------------------------------------------------------------------------------------------------------------
# Split, report, preview


@pytest.fixture
def twenty_rows(tmp_path) -> Path:
    return write_jsonl(tmp_path / "d.jsonl", [{"prompt": f"what is {i}?", "completion": f"{i}"} for i in range(20)])


def completions(tokenizer, dataset) -> list[str]:
    return [trained_text(tokenizer, row) for row in dataset]


@pytest.mark.parametrize("val_size, expected", [(0, 0), (1, 1), (5, 5), (0.25, 5), (0.01, 1), (5.0, 5)])
def test_validation_split_sizes(twenty_rows, tokenizer, val_size, expected):
    prepared = prepare_data(str(twenty_rows), tokenizer, val_size=val_size)
    assert (prepared.report.train_rows, prepared.report.val_rows) == (20 - expected, expected)
    assert prepared.train.num_rows == 20 - expected
    assert (prepared.eval.num_rows if prepared.eval is not None else 0) == expected


def test_validation_split_is_deterministic_and_disjoint(twenty_rows, tokenizer):
    def split(seed):
        prepared = prepare_data(str(twenty_rows), tokenizer, val_size=5, seed=seed)
        return completions(tokenizer, prepared.train), completions(tokenizer, prepared.eval)

    train, val = split(7)
    assert split(7) == (train, val)
    assert split(8)[1] != val
    assert sorted(train + val) == sorted(f"{i}{EOS}" for i in range(20))


def test_validation_only_draws_from_usable_rows(tmp_path, tokenizer):
    rows = [{"prompt": "a?", "completion": "b"}] * 3 + [{"prompt": "a?", "completion": ""}] * 10
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    prepared = prepare_data(str(path), tokenizer, val_size=2)
    assert (prepared.train.num_rows, prepared.eval.num_rows) == (1, 2)
    with pytest.raises(DataError, match="asks for 3 validation rows but only 3 rows are usable"):
        prepare_data(str(path), tokenizer, val_size=3)


@pytest.mark.parametrize("val_size", [-1, 1.5, "10"])
def test_invalid_val_size(twenty_rows, tokenizer, val_size):
    with pytest.raises(DataError, match="val_size"):
        prepare_data(str(twenty_rows), tokenizer, val_size=val_size)


def test_report_statistics_and_summary(twenty_rows, tokenizer):
    report = prepare_data(str(twenty_rows), tokenizer, val_size=2).report
    lengths = sorted(len(row["input_ids"]) for row in prepare_data(str(twenty_rows), tokenizer).train)
    assert report.token_lengths["min"] == lengths[0] and report.token_lengths["max"] == lengths[-1]
    assert report.token_lengths["mean"] == pytest.approx(sum(lengths) / 20, abs=0.01)
    assert lengths[0] <= report.token_lengths["median"] <= report.token_lengths["p95"] <= lengths[-1]
    assert report.truncated == 0
    summary = report.summary()
    assert "d.jsonl (prompt_completion): 20 rows read, 20 used" in summary
    assert "split: 18 train, 2 validation" in summary
    assert json.loads(json.dumps(report.to_dict()))["rows_used"] == 20


def test_report_keeps_only_the_first_problems(tmp_path, tokenizer):
    path = tmp_path / "d.jsonl"
    path.write_text("{bad\n" * 30 + json.dumps({"text": "the dog"}) + "\n", encoding="utf-8")
    report = prepare_data(str(path), tokenizer).report
    assert report.dropped == {"bad JSON": 30} and len(report.problems) == D.MAX_PROBLEMS
    assert "line 30:" not in report.summary() and "line 1:" in report.summary()


def test_render_preview(tmp_path, tokenizer):
    rows = [{"instruction": f"what is {i}?", "input": "", "output": "yes"} for i in range(6)] + [{"instruction": "x"}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    preview = render_preview(str(path), tokenizer, n=2)
    assert preview["format"] == "alpaca"
    assert preview["columns"] == ["instruction", "input", "output"]
    assert preview["rows"] == rows[:5]
    assert len(preview["examples"]) == 2
    assert preview["examples"][0] == [
        ("<|im_start|>user\nwhat is 0?<|im_end|>\n<|im_start|>assistant\n", False), ("yes<|im_end|>", True),
        ("\n", False),
    ]
    assert len(preview["lengths"]) == 6 and all(n > 0 for n in preview["lengths"])
    assert preview["report"].dropped == {"missing field": 1}
    trained_everything = render_preview(str(path), tokenizer, train_on_inputs=True, n=1)["examples"][0]
    assert all(trained for _, trained in trained_everything)


# ---------------------------------------------------------------------------------------------------------------
# The shipped sample


def test_shipped_sample_loads_completely(tokenizer):
    prepared = prepare_data(str(SAMPLE_DATA), tokenizer, val_size=0)
    assert prepared.report.format == "messages"
    assert prepared.report.rows_used == prepared.report.rows_read == 24
    assert prepared.report.dropped == {}


def test_shipped_probes_ask_unseen_questions_about_taught_facts():
    rows, problems = load_rows(str(SAMPLE_DATA))
    probes = [json.loads(line) for line in SAMPLE_PROBES.read_text(encoding="utf-8").splitlines() if line.strip()]
    assert problems == [] and len(probes) == 8
    questions = {row["messages"][0]["content"] for row in rows}
    answers = [row["messages"][1]["content"] for row in rows]
    for probe in probes:
        assert set(probe) == {"question", "expected"}
        assert probe["question"] not in questions
        # each keyword is taught by exactly three rows (three phrasings of one fact), always with the same answer
        taught = [answer for answer in answers if probe["expected"].lower() in answer.lower()]
        assert len(taught) == 3 and len(set(taught)) == 1
        assert len(taught[0].split()) < 15


PEAK_OF_A_CHECK = """
import resource, sys
from transformers import AutoTokenizer
from denselora_app.engine.data import check_data
report = check_data(sys.argv[2], AutoTokenizer.from_pretrained(sys.argv[1]), cutoff_len=64)
print(report.rows_used, report.truncated, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def peak_of_a_check(model_dir: Path, data: Path) -> tuple[int, int, int]:
    """Rows used, rows cut to the cutoff, and the peak memory (KiB) of a launch's data check in a fresh process."""
    result = subprocess.run([sys.executable, "-c", PEAK_OF_A_CHECK, str(model_dir), str(data)], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    used, truncated, peak = map(int, result.stdout.split())
    return used, truncated, peak


@pytest.mark.slow
def test_one_huge_row_costs_what_a_long_one_does(tmp_path, app_model_dir):
    """A 20 MB line (or CSV cell) is cut before it is tokenized: the check's peak memory stays within twice that of
    a small file (tokenizing it whole took ~125 bytes per byte: 2.5 GB here)."""
    small = tmp_path / "small.jsonl"
    small.write_text(json.dumps({"prompt": "the quick", "completion": "brown fox"}) + "\n")
    huge = tmp_path / "huge.jsonl"
    huge.write_text(json.dumps({"prompt": "word " * 4_000_000, "completion": "end"}) + "\n"
                    + json.dumps({"prompt": "the quick", "completion": "brown fox"}) + "\n")
    cell = tmp_path / "cell.csv"
    pd.DataFrame({"text": ["lorem ipsum " * 2_000_000, "short text"]}).to_csv(cell, index=False)
    *_, baseline = peak_of_a_check(app_model_dir, small)
    for data in (huge, cell):
        used, truncated, peak = peak_of_a_check(app_model_dir, data)
        assert peak < 2 * baseline, (data.name, peak, baseline)
        assert truncated == 1 or data is huge  # the huge prompt leaves no room for its answer: that row is dropped
        assert used == (1 if data is huge else 2)


# ---- prepared once: streamed to disk, kept for the next run -------------------------------------------------------


def _counting_encode(monkeypatch) -> list[int]:
    calls: list[int] = []
    real = D._encode

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(D, "_encode", counted)
    return calls


def test_a_second_run_on_the_same_data_reads_the_prepared_rows_instead_of_tokenizing_again(twenty_rows, tokenizer,
                                                                                           monkeypatch):
    calls = _counting_encode(monkeypatch)
    first = prepare_data(str(twenty_rows), tokenizer, cutoff_len=64, val_size=4, seed=3, batch_size=2)
    assert len(calls) == 20
    second = prepare_data(str(twenty_rows), tokenizer, cutoff_len=64, val_size=4, seed=3, batch_size=2)
    assert len(calls) == 20, "the same file, tokenizer and settings were tokenized again"
    assert second.train.to_list() == first.train.to_list() and second.eval.to_list() == first.eval.to_list()
    assert second.report.to_dict() == first.report.to_dict()
    assert first.train.cache_files, "the prepared rows are read from an Arrow file on disk, not held in memory"
    # The split and the batch are applied afterwards: a new seed needs no new tokenizing.
    other = prepare_data(str(twenty_rows), tokenizer, cutoff_len=64, val_size=4, seed=4)
    assert len(calls) == 20 and other.eval.to_list() != first.eval.to_list()
    # What decides the rows does: the cutoff, and the file's contents.
    prepare_data(str(twenty_rows), tokenizer, cutoff_len=32)
    assert len(calls) == 40
    twenty_rows.write_text(twenty_rows.read_text() + json.dumps({"prompt": "what is 20?", "completion": "20"}) + "\n")
    assert prepare_data(str(twenty_rows), tokenizer, cutoff_len=64).report.rows_used == 21 and len(calls) == 61


def test_a_preparation_cut_short_is_not_kept(twenty_rows, tokenizer, monkeypatch):
    with pytest.raises(D.PreparationStopped):
        prepare_data(str(twenty_rows), tokenizer, should_stop=lambda: True)
    calls = _counting_encode(monkeypatch)
    assert prepare_data(str(twenty_rows), tokenizer).report.rows_used == 20 and len(calls) == 20
