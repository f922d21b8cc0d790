"""Publishing to the Hub (at the huggingface_hub boundary, no network), the model card, the exported demo Space."""

from __future__ import annotations

import ast
import inspect
import json
import logging
import os
import re
import subprocess
import sys
import time
import urllib.request
import zipfile
from importlib.metadata import version
from pathlib import Path
from types import SimpleNamespace

import httpx2
import pytest
from conftest import free_port, tiny_llama, tiny_tokenizer
from huggingface_hub import HfApi, ModelCard, SpaceCard
from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled
from peft import get_peft_model

from denselora_app.config import EMBEDDED_MODEL, RunConfig
from denselora_app.denselora import DenseLoraConfig
from denselora_app.hub import account
from denselora_app.hub.account import PublishError
from denselora_app.hub.cards import evaluation_table
from denselora_app.hub.publish import (
    build_model_repo,
    build_space_repo,
    publish_model,
    publish_space,
    push_folder,
    zip_folder,
)
from denselora_app.runs import create_run, write_json_atomic

REPO = Path(__file__).resolve().parent.parent
SMOL = "HuggingFaceTB/SmolLM2-135M-Instruct"
SECRET = "hf_secretTOKENvalue0123456789"
WRITE_TOKEN = {"auth": {"type": "access_token", "accessToken": {"displayName": "publish", "role": "write"}}}
ALICE = {"name": "alice", "orgs": [{"name": "acme", "roleInOrg": "write"}, {"name": "readers", "roleInOrg": "read"}],
         **WRITE_TOKEN}


# ---- a finished run, made by hand: an adapter for the tiny model, metrics, a summary ---------------------------


def _make_run(root: Path, name: str, model: str, data: str, adapter_from: Path | None = None) -> str:
    cfg = RunConfig(model=model, data=data, r=4, alpha=8, target_modules=["q_proj", "v_proj"], max_steps=6,
                    run_name=name)
    run = create_run(cfg, root)
    if adapter_from is None:
        base = tiny_llama(hidden_size=64, intermediate_size=128, num_hidden_layers=2)
        # init_weights=False: a random (not no-op) adapter, so "adapter on" and "adapter off" really differ.
        adapter = DenseLoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_weights=False,
                                  task_type="CAUSAL_LM")
        get_peft_model(base, adapter).save_pretrained(run.adapter_dir)
        tiny_tokenizer().save_pretrained(run.adapter_dir)
    else:
        run.adapter_dir.mkdir()
        for path in adapter_from.iterdir():
            (run.adapter_dir / path.name).write_bytes(path.read_bytes())
    for step in range(1, 7):
        run.append_metrics({"step": step, "loss": 3.0 - 0.3 * step, **({"eval_loss": 2.2} if step % 3 == 0 else {})})
    write_json_atomic(run.path / "summary.json", {"trainable_parameters": 2816, "total_parameters": 104000,
                                                  "trainable_percent": 2.7077, "steps": 6})
    run.update_status(state="completed", trainable_parameters=2816, total_parameters=104000)
    return run.id


@pytest.fixture(scope="module")
def runs_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="module")
def local_run(runs_root, app_model_dir) -> str:
    """A run on a local model folder (the tiny model), trained on a local file."""
    return _make_run(runs_root, "local", str(app_model_dir), "/data/facts.jsonl")


@pytest.fixture(scope="module")
def embedded_run(runs_root, local_run) -> str:
    """A run on the embedded default, on a Hub dataset, with evaluation results."""
    run_id = _make_run(runs_root, "embedded", EMBEDDED_MODEL, "tatsu-lab/alpaca:train",
                       adapter_from=runs_root / local_run / "adapter")
    write_json_atomic(runs_root / run_id / "eval.json", {
        "results": [{"dataset": "boolq", "mode": "generate", "accuracy": 0.625, "loss": 1.25, "perplexity": 3.49,
                     "samples": [{"prompt": "q", "correct": 1}]}],
        "base": [{"dataset": "boolq", "mode": "generate", "accuracy": 0.5}],
    })
    return run_id


class FakeHub:
    """Stands in for HfApi: records calls (checked against HfApi's real signatures) and answers like the Hub."""

    def __init__(self, whoami: dict | Exception = ALICE, create_error: Exception | None = None,
                 upload_error: Exception | None = None) -> None:
        self.calls: list[tuple[str, dict]] = []
        self.answer, self.create_error, self.upload_error = whoami, create_error, upload_error

    def _record(self, name: str, /, *args, **kwargs) -> None:  # positional: HfApi.run_job takes a `name`
        bound = inspect.signature(getattr(HfApi, name)).bind(None, *args, **kwargs)  # fails on a wrong keyword
        self.calls.append((name, {k: v for k, v in bound.arguments.items() if k != "self"}))

    def whoami(self, *args, **kwargs):
        self._record("whoami", *args, **kwargs)
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer

    def create_repo(self, *args, **kwargs):
        self._record("create_repo", *args, **kwargs)
        if self.create_error:
            raise self.create_error
        return f"https://huggingface.co/{args[0]}"

    def upload_folder(self, *args, **kwargs):
        self._record("upload_folder", *args, **kwargs)
        folder = Path(kwargs["folder_path"])
        self.calls[-1][1]["files"] = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
        if self.upload_error:
            raise self.upload_error
        return SimpleNamespace(commit_url=f"https://huggingface.co/{kwargs['repo_id']}/commit/abc123")

    def names(self) -> list[str]:
        return [name for name, _ in self.calls]


def http_error(status: int) -> HfHubHTTPError:
    request = httpx2.Request("POST", "https://huggingface.co/api/repos/create")
    return HfHubHTTPError(f"{status} Client Error", response=httpx2.Response(status, request=request))


# ---- the model repository and its card ---------------------------------------------------------------------------

# The adapter, its tokenizer, the loss curve, the card, and the DenseLoRA method it needs (PEFT does not ship it).
MODEL_REPO_FILES = ["README.md", "adapter_config.json", "adapter_model.safetensors", "chat_template.jinja",
                    "denselora/__init__.py", "denselora/config.py", "denselora/layer.py", "denselora/model.py",
                    "loss_curve.png", "tokenizer.json", "tokenizer_config.json"]


def test_model_repo_card_metadata_and_zip(embedded_run, local_run, runs_root, tmp_path):
    folder = build_model_repo(embedded_run, "alice/smol-denselora", tmp_path / "out", root=runs_root)
    assert folder.files == MODEL_REPO_FILES
    card = ModelCard.load(folder.path / "README.md")
    meta = card.data.to_dict()
    assert meta["base_model"] == SMOL and meta["license"] == "apache-2.0"
    assert meta["library_name"] == "peft" and meta["pipeline_tag"] == "text-generation"
    assert "denselora" in meta["tags"] and "peft" in meta["tags"] and "lora" not in meta["tags"]
    assert meta["datasets"] == ["tatsu-lab/alpaca"]
    text = card.text
    assert "2505.23808" in text and "M_{l,t}" in text and "](loss_curve.png)" in text
    assert "| `r` | 4 |" in text and "| `target_modules` | q_proj, v_proj |" in text
    assert "2,816 (2.7077% of the base model's 104,000)" in text
    assert "| adapter | boolq | generate | 0.625 | 1.25 | 3.49 |" in text
    assert "| base | boolq | generate | 0.5 |" in text
    assert (folder.path / "loss_curve.png").read_bytes().startswith(b"\x89PNG")
    # The adapter names its base model on the Hub, not the training machine's path.
    assert json.loads((folder.path / "adapter_config.json").read_text())["base_model_name_or_path"] == SMOL
    with zipfile.ZipFile(zip_folder(folder)) as archive:
        assert sorted(archive.namelist()) == folder.files

    local = build_model_repo(local_run, "alice/tiny-denselora", tmp_path / "local", root=runs_root)
    meta = ModelCard.load(local.path / "README.md").data.to_dict()
    assert "base_model" not in meta and "license" not in meta and "datasets" not in meta
    text = (local.path / "README.md").read_text()
    assert "## Evaluation" not in text and "/data/" not in text and str(runs_root) not in text
    with pytest.raises(PublishError, match="not an empty folder"):
        build_model_repo(local_run, "alice/tiny-denselora", tmp_path / "local", root=runs_root)


def test_evaluation_table_tolerates_other_shapes():
    grouped = evaluation_table({"adapter": {"dataset": "piqa", "accuracy": 0.7},
                                "base": {"dataset": "piqa", "accuracy": 0.6}})
    assert "| adapter | piqa | 0.7 |" in grouped and "| base | piqa | 0.6 |" in grouped
    flat = evaluation_table([{"model": "base", "dataset": "x|y", "loss": 2.0, "exact_match": 0.25, "notes": None}])
    assert "| base | x\\|y | 2 | 0.25 |" in flat
    # What evaluate.py writes: paths and bookkeeping stay out of the card.
    saved = {"results": [{"model": "run-1", "base_model": "/home/me/m", "dataset": "/home/me/boolq.jsonl",
                          "dataset_sha": "ab12", "mode": "loglik", "total": 40, "accuracy": 0.55, "correct": 22,
                          "unanswered": None, "loss": None, "perplexity": None, "created_at": 1.7e9}],
             "base": [{"model": "base", "dataset": "/home/me/boolq.jsonl", "mode": "loglik", "accuracy": 0.5,
                       "total": 40, "correct": 20}]}
    table = evaluation_table(saved)
    assert table.splitlines()[0] == "| model | dataset | mode | accuracy | total | correct |"
    assert "| adapter | boolq.jsonl | loglik | 0.55 | 40 | 22 |" in table and "| base | boolq.jsonl |" in table
    assert "/home/me" not in table
    for nothing in (None, "text", {"created": "today", "n": 3}, [], {"results": []}):
        assert evaluation_table(nothing) == ""


@pytest.mark.slow
def test_the_card_snippet_loads_the_exported_adapter_in_a_fresh_process(local_run, runs_root, app_model_dir, tmp_path):
    folder = build_model_repo(local_run, "alice/tiny-denselora", tmp_path / "export", root=runs_root)
    snippet = re.search(r"```python\n(.*?)```", (folder.path / "README.md").read_text(), re.S)[1]
    snippet = re.sub(r"(?m)^base_model_id = .*$", f"base_model_id = {str(app_model_dir)!r}", snippet)
    snippet = re.sub(r"(?m)^adapter_dir = snapshot_download\(\"alice/tiny-denselora\"\)$",
                     f"adapter_dir = {str(folder.path)!r}", snippet)
    snippet += "print('generated', output.shape, type(model).__name__, model.peft_config['default'].peft_type.value)\n"
    # The repository carries the method: loading needs PEFT, not DenseLoRA Studio.
    snippet += "assert 'denselora_app' not in sys.modules, 'the snippet used the installed studio'\n"
    result = subprocess.run([sys.executable, "-c", snippet], capture_output=True, text=True, timeout=180,
                            cwd=tmp_path, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "generated torch.Size([1," in result.stdout and "PeftModelForCausalLM DENSELORA" in result.stdout


# ---- publishing, at the huggingface_hub boundary -----------------------------------------------------------------


def test_publish_makes_exactly_these_hub_calls_and_never_writes_the_token(local_run, runs_root, monkeypatch, caplog):
    monkeypatch.setenv("HF_TOKEN", SECRET)
    caplog.set_level(logging.DEBUG)
    hub = FakeHub()
    result = publish_model(local_run, "alice/tiny-denselora", private=True, commit_message="First adapter",
                           root=runs_root, api=hub)
    folder = runs_root / local_run / "publish" / "model"
    files = MODEL_REPO_FILES
    assert hub.calls == [
        ("whoami", {"token": SECRET}),
        ("create_repo", {"repo_id": "alice/tiny-denselora", "token": SECRET, "private": True, "repo_type": "model",
                         "exist_ok": True}),
        ("upload_folder", {"repo_id": "alice/tiny-denselora", "folder_path": str(folder), "repo_type": "model",
                           "commit_message": "First adapter", "token": SECRET, "files": files}),
    ]
    assert result.url == "https://huggingface.co/alice/tiny-denselora" and result.files == files
    assert result.user == "alice" and result.commit_url.endswith("/commit/abc123")
    uploaded = ModelCard.load(folder / "README.md").data
    assert "denselora" in uploaded.tags and uploaded.library_name == "peft"
    assert uploaded.pipeline_tag == "text-generation"

    space_hub = FakeHub()
    space = publish_space(local_run, "acme/tiny-chat", adapter_repo_id="alice/tiny-denselora", base_model=SMOL,
                          root=runs_root, api=space_hub)
    assert space_hub.calls[1] == ("create_repo", {"repo_id": "acme/tiny-chat", "token": SECRET, "private": False,
                                                  "repo_type": "space", "exist_ok": True, "space_sdk": "gradio"})
    upload = space_hub.calls[2][1]
    assert upload["repo_type"] == "space" and upload["files"] == space.files
    assert {"README.md", "app.py", "prompts.py", "requirements.txt", "denselora_space.json", "denselora/__init__.py",
            "denselora/layer.py", "denselora/model.py", "denselora/config.py"} <= set(space.files)
    assert not any(name.startswith("adapter/") for name in space.files)  # loaded from the adapter repository
    assert space.url == "https://huggingface.co/spaces/acme/tiny-chat"
    meta = SpaceCard.load(space.folder / "README.md").data.to_dict()
    assert meta["sdk"] == "gradio" and meta["app_file"] == "app.py" and meta["sdk_version"] == version("gradio")
    assert meta["models"] == [SMOL, "alice/tiny-denselora"] and meta["title"] == "tiny-chat"
    assert {"emoji", "colorFrom", "colorTo"} <= meta.keys()

    leaks = [p for p in (runs_root / local_run).rglob("*") if p.is_file() and SECRET.encode() in p.read_bytes()]
    assert leaks == [] and SECRET not in caplog.text
    assert SECRET not in result.message + space.message


def test_publish_errors_are_explained(local_run, runs_root, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(account, "get_token", lambda: None)
    with pytest.raises(PublishError, match="No Hugging Face token"):
        publish_model(local_run, "alice/x", root=runs_root, api=FakeHub())

    monkeypatch.setenv("HF_TOKEN", SECRET)
    monkeypatch.setenv("SPACE_ID", "owner/denselora-studio")  # on a Space, the owner's HF_TOKEN is never used
    with pytest.raises(PublishError, match="Sign in with the Hugging Face button"):
        publish_model(local_run, "owner/x", root=runs_root, api=FakeHub())
    assert account.resolve_token("hf_oauth_visitor") == "hf_oauth_visitor"
    monkeypatch.delenv("SPACE_ID")

    cases = [
        ({**ALICE, "auth": {"accessToken": {"role": "read"}}}, "alice/x", "read-only"),
        ({**ALICE, "auth": {"accessToken": {"role": "fineGrained", "fineGrained": {
            "global": ["discussion.write"], "scoped": [{"entity": {"name": "acme"}, "permissions": ["repo.write"]}]}}}},
         "alice/x", "fine-grained Hugging Face token has no write access to repositories of 'alice'"),
        (ALICE, "bob/x", "belongs to 'bob', which is neither your account \\(alice\\) nor one of your organizations"),
        (ALICE, "readers/x", "only the 'read' role in the organization 'readers'"),
        (httpx2.ConnectError("[Errno -3] Temporary failure in name resolution"), "alice/x",
         "Could not reach the Hugging Face Hub"),
        (OfflineModeIsEnabled("offline"), "alice/x", "HF_HUB_OFFLINE"),
        (http_error(401), "alice/x", "rejected your token"),
    ]
    for answer, repo_id, message in cases:
        hub = FakeHub(whoami=answer)
        with pytest.raises(PublishError, match=message) as caught:
            publish_model(local_run, repo_id, root=runs_root, api=hub)
        assert hub.names() == ["whoami"] and SECRET not in str(caught.value)

    with pytest.raises(PublishError, match="not allowed to create acme/x"):
        publish_model(local_run, "acme/x", root=runs_root, api=FakeHub(create_error=http_error(403)))
    # A fine-grained token with write access to the org's repositories passes the check.
    scoped = {**ALICE, "auth": {"accessToken": {"role": "fineGrained", "fineGrained": {
        "scoped": [{"entity": {"name": "acme"}, "permissions": ["repo.content.read", "repo.write"]}]}}}}
    assert publish_model(local_run, "acme/x", root=runs_root, api=FakeHub(whoami=scoped)).user == "alice"
    with pytest.raises(PublishError, match="local model"):  # a Space downloads its base model from the Hub
        publish_space(local_run, "alice/chat", root=runs_root, api=FakeHub())


def test_a_failed_upload_keeps_local_files_and_can_be_retried(local_run, runs_root, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", SECRET)
    folder = build_model_repo(local_run, "alice/tiny-denselora", root=runs_root)
    adapter = sorted(p.name for p in (runs_root / local_run / "adapter").iterdir())
    with pytest.raises(PublishError, match="Could not reach the Hugging Face Hub.*Nothing was deleted"):
        push_folder(folder, api=FakeHub(upload_error=httpx2.WriteTimeout("timed out")))
    with pytest.raises(PublishError, match="refused to upload to alice/tiny-denselora.*Nothing was deleted"):
        push_folder(folder, api=FakeHub(upload_error=http_error(500)))
    assert sorted(p.relative_to(folder.path).as_posix() for p in folder.path.rglob("*") if p.is_file()) == folder.files
    assert sorted(p.name for p in (runs_root / local_run / "adapter").iterdir()) == adapter
    hub = FakeHub()
    assert push_folder(folder, api=hub).files == folder.files and hub.calls[-1][1]["files"] == folder.files


@pytest.mark.parametrize("run_id", ["../x", "a/../../b", "..", "/etc", "x/../../../etc/passwd"])
def test_run_ids_that_leave_the_runs_folder_are_refused(run_id, runs_root, tmp_path):
    hub = FakeHub()
    for call in (lambda: build_model_repo(run_id, "alice/x", tmp_path / "out", root=runs_root),
                 lambda: build_space_repo(run_id, "alice/x", tmp_path / "out", root=runs_root),
                 lambda: publish_model(run_id, "alice/x", token=SECRET, root=runs_root, api=hub)):
        with pytest.raises(PublishError, match="is not a run: here only the runs in the runs folder"):
            call()
    assert hub.calls == [] and not (tmp_path / "out").exists()


def cli(*args: str, runs: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "DENSELORA_RUNS": str(runs), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "denselora_app", "publish", *args], capture_output=True, text=True,
                          env=env, timeout=120, cwd=REPO)


def test_cli_publish_dry_run_and_refusals(local_run, runs_root, tmp_path):
    out = tmp_path / "repo"
    result = cli(local_run, "--repo-id", "alice/tiny-denselora", "--dry-run", str(out), "--base-model", SMOL,
                 "--space", "alice/tiny-chat", "--space-dir", str(tmp_path / "space"), runs=runs_root)
    assert result.returncode == 0, result.stderr
    assert "nothing uploaded" in result.stdout and "  adapter_model.safetensors" in result.stdout
    assert ModelCard.load(out / "README.md").data.base_model == SMOL
    settings = json.loads((tmp_path / "space" / "denselora_space.json").read_text())
    assert settings == {"adapter": "adapter", "base_model": SMOL, "title": "tiny-chat"}  # not uploaded: carried

    bad = cli("../x", "--repo-id", "alice/x", "--dry-run", str(tmp_path / "evil"), runs=runs_root)
    assert bad.returncode == 2 and "'../x' is not a run: there is no folder" in bad.stderr \
        and "Traceback" not in bad.stderr
    assert not (tmp_path / "evil").exists()


# ---- the demo Space ------------------------------------------------------------------------------------------------


def test_the_denselora_package_carried_into_spaces_is_self_contained():
    for path in (REPO / "denselora_app" / "denselora").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0:
                assert not node.module.startswith("denselora_app"), f"{path.name} imports {node.module}"
            elif isinstance(node, ast.Import):
                assert not any(a.name.startswith("denselora_app") for a in node.names), path.name


@pytest.mark.slow
def test_the_exported_space_serves_a_streaming_chat_with_a_base_comparison(local_run, runs_root, app_model_dir,
                                                                           tmp_path):
    from gradio_client import Client

    space = build_space_repo(local_run, "alice/tiny-chat", tmp_path / "space", adapter_repo_id="alice/tiny-denselora",
                             base_model=SMOL, root=runs_root)
    port = free_port()
    env = {**os.environ, "DENSELORA_ADAPTER": str(runs_root / local_run / "adapter"),
           "DENSELORA_BASE_MODEL": str(app_model_dir), "GRADIO_SERVER_PORT": str(port), "HF_HUB_OFFLINE": "1",
           "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONUNBUFFERED": "1"}
    log_path = tmp_path / "space.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen([sys.executable, "app.py"], cwd=space.path, env=env, stdout=log,
                                   stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 150
        while True:
            assert process.poll() is None, f"app.py exited:\n{log_path.read_text()}"
            assert time.monotonic() < deadline, f"app.py did not start:\n{log_path.read_text()}"
            try:
                with urllib.request.urlopen(url, timeout=5):
                    break
            except OSError:
                time.sleep(0.3)
        client = Client(url, verbose=False)
        answer = client.predict("what is the capital of a country?", True, 8, 0.0, api_name="/chat")
        text = answer if isinstance(answer, str) else json.dumps(answer)
        assert "**With the adapter**" in text and "**Base model (adapter off)**" in text
        plain = client.predict("the quick brown fox", False, 8, 0.0, api_name="/chat")
        assert "Base model" not in str(plain)
        assert isinstance(client.predict("the quick brown fox", False, 8, 0.0, "answer: yes no", api_name="/chat"), str)
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
