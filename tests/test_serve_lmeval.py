"""lm-evaluation-harness's `local-completions` model scores a multiple-choice task against a served adapter and
gets the accuracy of the studio's own `loglik` evaluation (offline: a local task folder and a local json file)."""

from __future__ import annotations

import json

import pytest
from serve_support import API_KEY, make_workspace, start_serve

from denselora_app.engine import models
from denselora_app.serving.evaluate import evaluate
from denselora_app.serving.prompts import build_messages, render_prompt

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

WORDS = ["yes", "no", "the", "what", "is", "a"]  # one token each for the tiny tokenizer
QUESTIONS = [f"what is the {w}?" for w in ("capital", "fox", "dog", "answer", "country", "lazy dog", "quick fox",
                                            "brown dog", "yes", "no", "capital of a dog", "lazy fox")]


def test_lm_eval_on_a_served_adapter_matches_the_studios_loglik(tmp_path, monkeypatch):
    pytest.importorskip("tenacity", reason="lm-eval's API models need lm-eval[api] (tenacity)")
    # What importing lm_eval (and scikit-learn, which its metrics import) sets, undone at the end.
    monkeypatch.setenv("HF_XET_HIGH_PERFORMANCE", "1")
    monkeypatch.setenv("KMP_DUPLICATE_LIB_OK", "True")
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    runs, run_id, _ = make_workspace(tmp_path)
    tokenizer = models.load_tokenizer(str(tmp_path / "model"))
    # Choices of one token each: lm-eval's `acc` sums a choice's logprobs, the studio averages them; for choices
    # of equal length both pick the same one.
    assert all(len(tokenizer(w, add_special_tokens=False)["input_ids"]) == 1 for w in WORDS)
    rows = [{"question": q, "choices": [WORDS[(n + k) % len(WORDS)] for k in range(4)], "answer": n % 4}
            for n, q in enumerate(QUESTIONS)]
    studio_data = tmp_path / "mc.jsonl"
    studio_data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    # The task sees the prompt exactly as the studio renders it (the chat template), and the choice right after it.
    harness_data = tmp_path / "mc.json"
    harness_data.write_text(json.dumps([{**row, "prompt": render_prompt(tokenizer, build_messages(row["question"]))[0]}
                                        for row in rows]))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "studio_mc.yaml").write_text(f"""task: studio_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {harness_data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{prompt}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
target_delimiter: ""
metric_list:
  - metric: acc
""")
    for name, value in {"OPENAI_API_KEY": API_KEY, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
                        "HF_DATASETS_CACHE": str(tmp_path / "datasets-cache")}.items():
        monkeypatch.setenv(name, value)

    studio = evaluate(run_id, studio_data, mode="loglik", with_base=False, save=False, root=runs)
    expected = studio.results[-1].accuracy

    server = start_serve(runs, run_id, "--api-key", API_KEY)
    try:
        results = simple_evaluate(
            model="local-completions",
            model_args={"model": run_id, "base_url": f"{server.url}/completions", "tokenizer_backend": "huggingface",
                        "tokenizer": str(tmp_path / "model"), "num_concurrent": 4, "max_retries": 1,
                        "tokenized_requests": True},
            tasks=["studio_mc"], task_manager=TaskManager(include_path=str(tasks)), batch_size=4)
    finally:
        server.stop()
    accuracy = results["results"]["studio_mc"]["acc,none"]
    assert accuracy == pytest.approx(expected)
    assert 0 < expected < 1  # the adapter gets some right and some wrong: the comparison means something
