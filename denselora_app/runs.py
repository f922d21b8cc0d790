"""Runs on disk: one folder per run, a worker process per training, and the state a reader can trust.

    runs/<run-id>/
        config.yaml      the resolved RunConfig
        status.json      state (queued|running|completed|failed|stopped), pid, times, heartbeat, error
        metrics.jsonl    one JSON line per logged step (loss, eval_loss, learning_rate, grad_norm, tokens/s, ...)
        data_report.json what the data pipeline read, used and dropped
        train.log        everything the worker printed
        checkpoints/     resume points (Trainer checkpoints)
        adapter/         the final adapter (PEFT format)
        summary.json     trainable parameters, final losses, duration

Status and metrics are written atomically (write a temp file, then rename), so readers never see half a file.
The worker runs in its own session with its output in train.log, so the app can die or reload without
stopping (or blocking) training; any process can find it again from status.json.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from .config import RunConfig

log = logging.getLogger(__name__)

ACTIVE_STATES = ("queued", "running")
FINAL_STATES = ("completed", "failed", "stopped")
STOP_FILE = "STOP"
RUN_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_status_lock = threading.Lock()  # the worker's heartbeat thread and its training loop both update status.json


class RunError(RuntimeError):
    """A run cannot be created, found, started or stopped; the message says why and what to do."""


def runs_dir() -> Path:
    """Where runs live: $DENSELORA_RUNS, else ./runs."""
    return Path(os.environ.get("DENSELORA_RUNS", "runs")).resolve()


def write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str), encoding="utf-8")
    os.replace(tmp, path)


def read_json(path: Path, default: Any = None) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return default


def _now() -> float:
    return time.time()


@dataclass(frozen=True)
class Run:
    path: Path

    @property
    def id(self) -> str:
        return self.path.name

    # ---- files
    @property
    def adapter_dir(self) -> Path:
        return self.path / "adapter"

    @property
    def checkpoints_dir(self) -> Path:
        return self.path / "checkpoints"

    @property
    def log_path(self) -> Path:
        return self.path / "train.log"

    def config(self) -> RunConfig:
        return RunConfig.from_yaml(self.path / "config.yaml")

    def raw_status(self) -> dict[str, Any]:
        return read_json(self.path / "status.json", default={"state": "unknown"})

    def status(self) -> dict[str, Any]:
        """The status, with a dead worker detected and recorded as a failure."""
        status = self.raw_status()
        if status.get("state") in ACTIVE_STATES and status.get("pid") and not _alive(status):
            failure = classify_failure(self.log_tail(200))
            status = self.update_status(
                state="failed",
                finished_at=_now(),
                error=failure["summary"],
                error_kind=failure["kind"],
                fix=failure["fix"],
            )
        return status

    def update_status(self, **changes: Any) -> dict[str, Any]:
        with _status_lock:
            status = {**self.raw_status(), **changes}
            write_json_atomic(self.path / "status.json", status)
        return status

    def metrics(self) -> list[dict[str, Any]]:
        rows = []
        try:
            with open(self.path / "metrics.jsonl", encoding="utf-8") as fh:
                for line in fh:
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError:
                        continue  # a line being appended right now
        except FileNotFoundError:
            pass
        return rows

    def append_metrics(self, row: dict[str, Any]) -> None:
        # One write() of one line with O_APPEND is atomic for readers of whole lines.
        with open(self.path / "metrics.jsonl", "a", encoding="utf-8") as fh:
            fh.write(json.dumps(row) + "\n")

    def truncate_metrics(self, after_step: int) -> None:
        """Drop lines logged after a checkpoint, before resuming from it, so the curve continues without repeats."""
        rows = [r for r in self.metrics() if r.get("step", 0) <= after_step]
        tmp = self.path / ".metrics.jsonl.tmp"
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        os.replace(tmp, self.path / "metrics.jsonl")

    def summary(self) -> dict[str, Any]:
        return read_json(self.path / "summary.json", default={})

    def data_report(self) -> dict[str, Any]:
        return read_json(self.path / "data_report.json", default={})

    def log_tail(self, lines: int = 40) -> str:
        try:
            with open(self.log_path, "rb") as fh:
                fh.seek(0, os.SEEK_END)
                fh.seek(max(0, fh.tell() - 200 * lines))
                text = fh.read().decode("utf-8", errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def last_checkpoint(self) -> Path | None:
        """The newest complete checkpoint (one with trainer_state.json, which the Trainer writes last)."""
        done = [p for p in self.checkpoints_dir.glob("checkpoint-*") if (p / "trainer_state.json").exists()]
        return max(done, key=lambda p: int(p.name.split("-")[-1]), default=None)

    def stop_requested(self) -> bool:
        return (self.path / STOP_FILE).exists()


# ---- creating, finding, listing ---------------------------------------------------------------------------------


def create_run(cfg: RunConfig, root: Path | None = None) -> Run:
    root = root or runs_dir()
    root.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    name = safe_name(cfg.run_name) if cfg.run_name else f"{cfg.method}-r{cfg.r}"
    run_id, n = f"{stamp}-{name}", 1
    while (root / run_id).exists():
        n += 1
        run_id = f"{stamp}-{name}-{n}"
    path = root / run_id
    path.mkdir()
    cfg.to_yaml(path / "config.yaml")
    run = Run(path)
    run.update_status(state="queued", created_at=_now(), run_id=run_id)
    return run


def safe_name(text: str) -> str:
    """A run name that can only ever be one folder name: no separators, no '..', no leading dot."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", text.strip()).strip("-.")
    return name[:64] or "run"


def get_run(run_id: str, root: Path | None = None) -> Run:
    root = (root or runs_dir()).resolve()
    if not RUN_ID_PATTERN.match(run_id) or ".." in run_id:
        raise RunError(f"'{run_id}' is not a valid run id (letters, digits, '.', '_' and '-' only).")
    path = root / run_id
    if not (path / "config.yaml").exists():
        raise RunError(f"No run '{run_id}' in {root}. List runs with: python -m denselora_app runs")
    return Run(path)


def list_runs(root: Path | None = None) -> list[Run]:
    root = root or runs_dir()
    if not root.exists():
        return []
    runs = [Run(p) for p in root.iterdir() if (p / "config.yaml").exists()]
    return sorted(runs, key=lambda r: r.raw_status().get("created_at", 0), reverse=True)


def delete_run(run: Run) -> None:
    import shutil

    if run.status().get("state") in ACTIVE_STATES:
        raise RunError(f"Run {run.id} is still training: stop it before deleting it.")
    shutil.rmtree(run.path)


# ---- the worker process ----------------------------------------------------------------------------------------


def start_worker(run: Run, resume: bool = False) -> int:
    """Launch ``python -m denselora_app.worker`` for this run in its own session; returns its pid.

    Refuses when another run is training on the same device: two trainings would fight for the same memory.
    """
    busy = [
        r for r in list_runs(run.path.parent)
        if r.id != run.id and r.raw_status().get("pid")  # a run that never got a worker holds no device
        and r.status().get("state") in ACTIVE_STATES
        and r.raw_status().get("device_request", "auto") == run.config().device
    ]
    if busy:
        raise RunError(
            f"Run {busy[0].id} is already training on this device. Wait for it to finish or stop it first."
        )
    (run.path / STOP_FILE).unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "denselora_app.worker", str(run.path)] + (["--resume"] if resume else [])
    with open(run.log_path, "ab") as log_file:
        proc = subprocess.Popen(
            cmd,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # survives the app and its process group; never writes to a pipe
            cwd=os.getcwd(),
        )
    started = psutil.Process(proc.pid).create_time()
    run.update_status(
        state="queued", pid=proc.pid, pid_started=started, device_request=run.config().device,
        error=None, error_kind=None, fix=None, finished_at=None,
    )
    _reap_later(proc)
    return proc.pid


_children: list[subprocess.Popen] = []


def _reap_later(proc: subprocess.Popen) -> None:
    # Keep the handle so finished workers are reaped (no zombies that would look alive).
    _children.append(proc)
    for child in list(_children):
        if child.poll() is not None:
            _children.remove(child)


def _alive(status: dict[str, Any]) -> bool:
    for child in list(_children):
        child.poll()
    try:
        proc = psutil.Process(int(status["pid"]))
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        # A recycled pid belongs to a process started at another time.
        started = status.get("pid_started")
        return started is None or abs(proc.create_time() - float(started)) < 1.0
    except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError):
        return False


def request_stop(run: Run) -> None:
    """Graceful stop: the worker finishes its step, saves a checkpoint and the adapter, and ends as 'stopped'."""
    status = run.status()
    if status.get("state") not in ACTIVE_STATES:
        raise RunError(f"Run {run.id} is not training (state: {status.get('state')}).")
    (run.path / STOP_FILE).touch()
    if status.get("pid") and _alive(status):
        try:
            os.kill(int(status["pid"]), signal.SIGTERM)  # the worker turns SIGTERM into the same graceful stop
        except ProcessLookupError:
            pass


def resume(run: Run) -> int:
    """Continue a stopped or failed run from its last checkpoint in a new worker."""
    check_resumable(run)
    return start_worker(run, resume=True)


def check_resumable(run: Run) -> None:
    state = run.status().get("state")
    if state in ACTIVE_STATES:
        raise RunError(f"Run {run.id} is already {state}.")
    if state == "completed":
        raise RunError(f"Run {run.id} already completed; start a new run to train more.")
    if run.last_checkpoint() is None:
        raise RunError(f"Run {run.id} has no checkpoint to resume from; start it again instead.")


# ---- failures, explained -----------------------------------------------------------------------------------------

_FAILURES = [
    ("out of memory", re.compile(r"out of memory|OutOfMemoryError|MemoryError|Cannot allocate memory", re.I),
     "Ran out of memory.",
     "Lower batch_size (raise grad_accum to keep the effective batch), lower cutoff_len, turn on "
     "gradient_checkpointing, or pick a smaller model."),
    ("data error", re.compile(r"DataError"),
     "The training data could not be used.",
     "Check the data report: fix or remove the rows it names, or choose the right data format."),
    ("model load error", re.compile(r"ModelLoadError|OSError: .*(config\.json|does not appear to have)", re.I),
     "The base model could not be loaded.",
     "Check the model name or folder; offline, use the embedded default or a local folder."),
    ("configuration error", re.compile(r"ConfigError"),
     "The run configuration is invalid.",
     "Fix the value named in the message and start again."),
]


def classify_failure(log_text: str) -> dict[str, str]:
    """Kind, one-line summary and suggested fix for a failed run, from what it logged."""
    error_lines = [line for line in log_text.splitlines() if re.search(r"Error|Exception|Killed", line)]
    detail = error_lines[-1].strip() if error_lines else ""
    for kind, pattern, summary, fix in _FAILURES:
        if pattern.search(log_text):
            return {"kind": kind, "summary": f"{summary} {detail}".strip(), "fix": fix}
    if not detail:
        return {
            "kind": "killed",
            "summary": "The training process ended without reporting an error: it was killed (by a signal, "
                       "or by the system when memory ran out).",
            "fix": "Resume from the last checkpoint. If it happens again, reduce memory use (batch_size, "
                   "cutoff_len, gradient_checkpointing).",
        }
    return {"kind": "other", "summary": detail, "fix": "Read the end of train.log for the full error."}
