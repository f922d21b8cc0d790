"""``Run``: one run folder, read and written through its methods (the only code that opens its files).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import os
import shlex
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from denselora_app.config import ConfigError, RunConfig
from denselora_app.runs.files import (
    ADAPTER_DIR,
    CHECKPOINT_PREFIX,
    CHECKPOINTS_DIR,
    CONFIG_FILE,
    DATA_REPORT_FILE,
    EVAL_FILE,
    JOB_FILE,
    LOG_FILE,
    LR_SEARCH_FILE,
    METRICS_FILE,
    PUBLIC_FILE,
    STATUS_FILE,
    STOP_FILE,
    SUMMARY_FILE,
    TRACKERS_DIR,
    adapter_complete,
    checkpoint_complete,
    checkpoint_step,
    finite_number,
    read_json,
    runs_dir,
    safe_name,
    write_json_atomic,
)
from denselora_app.runs.logs import FailureKind, classify_failure, own_log_lines
from denselora_app.runs.records import JobRecord, LrSearch, RunFacts
from denselora_app.runs.status import WRITABLE_FIELDS, RunKind, RunState, Status, process_alive, process_start_time

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Run:
    path: Path

    @property
    def id(self) -> str:
        return self.path.name

    @property
    def cli_name(self) -> str:
        """How a command line names this run: its id for a run in the runs folder, else its folder's path; quoted
        for a shell when it has spaces or other special characters."""
        inside = self.path.absolute().parent.resolve() == runs_dir()
        return shlex.quote(self.id if inside else str(self.path.absolute()))

    # ---- files
    @property
    def adapter_dir(self) -> Path:
        return self.path / ADAPTER_DIR

    @property
    def checkpoints_dir(self) -> Path:
        return self.path / CHECKPOINTS_DIR

    @property
    def trackers_dir(self) -> Path:
        """Where the experiment trackers of ``report_to`` write inside the run folder (one subfolder each)."""
        return self.path / TRACKERS_DIR

    @property
    def log_path(self) -> Path:
        return self.path / LOG_FILE

    def has_adapter(self) -> bool:
        """Whether training saved a whole final adapter (files.adapter_complete: the one rule)."""
        return adapter_complete(self.adapter_dir)

    @property
    def kind(self) -> RunKind:
        return RunKind.LR_SEARCH if (self.path / LR_SEARCH_FILE).exists() else RunKind.TRAINING

    def lr_search(self) -> LrSearch | None:
        """A learning-rate search's plan and results (None for a training run)."""
        if self.kind is not RunKind.LR_SEARCH:
            return None
        return LrSearch.from_json(read_json(self.path / LR_SEARCH_FILE))

    def write_lr_search(self, search: LrSearch) -> None:
        write_json_atomic(self.path / LR_SEARCH_FILE, search.to_json())

    def config(self) -> RunConfig:
        return RunConfig.from_yaml(self.path / CONFIG_FILE)

    # ---- status
    def raw_status(self) -> Status:
        """status.json as written (no liveness check); DAMAGED when it is missing or not a status."""
        path = self.path / STATUS_FILE
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return Status(RunState.DAMAGED, problem="status.json is missing")
        except (OSError, UnicodeDecodeError) as err:
            return Status(RunState.DAMAGED, problem=f"status.json cannot be read ({err})")
        try:
            return Status.from_json(json.loads(text))
        except json.JSONDecodeError as err:
            return Status(RunState.DAMAGED, problem=f"status.json is not valid JSON ({err.msg})")

    def status(self) -> Status:
        """The status as a reader should see it: a training process that died is a failure (explained from its
        log), a run whose start never happened is one too. Never writes."""
        status = self.raw_status()
        if (self.path / JOB_FILE).exists():  # no local process to check: jobs.sync writes what the job reports
            if self.job() is None and status.state is not RunState.DAMAGED:
                return dataclasses.replace(status, state=RunState.DAMAGED, problem="job.json is not a job record")
            return status
        if status.state is RunState.RUNNING or (status.state is RunState.QUEUED and status.pid):
            if not process_alive(status.pid, status.pid_started):
                failure = classify_failure(self.log_tail(200))
                if self.kind is RunKind.LR_SEARCH and failure.kind is FailureKind.KILLED:  # a search is never resumed
                    failure = failure._replace(fix="Start the search again (its finished trials are in "
                                                   "lr_search.json).")
                return dataclasses.replace(status, state=RunState.FAILED, **failure.status_fields())
        elif status.state is RunState.QUEUED and not process_alive(status.launcher_pid, status.launcher_started):
            return dataclasses.replace(
                status, state=RunState.FAILED, error_kind=FailureKind.NEVER_STARTED.value,
                error="The run was created, but its training process never started (what was starting it ended "
                      "first). Nothing was trained.",
                fix=f"Delete it (python -m denselora_app delete {self.cli_name}) and start a new run.",
            )
        if status.active and self.stop_requested():
            return dataclasses.replace(status, stopping=True)
        return status

    def update_status(self, **changes: Any) -> Status:
        """Merge ``changes`` into status.json (the training process and the launcher are its only writers)."""
        unknown = set(changes) - WRITABLE_FIELDS
        if unknown:
            raise ValueError(f"Not status fields: {', '.join(sorted(unknown))}")
        current = read_json(self.path / STATUS_FILE)
        values = {**(current if isinstance(current, dict) else {}), **changes}
        if isinstance(values.get("state"), RunState):
            values["state"] = values["state"].value
        write_json_atomic(self.path / STATUS_FILE, values)
        return Status.from_json(values)

    # ---- on Hugging Face Jobs
    def job(self) -> JobRecord | None:
        """The Jobs job this run trains in, or None (a run on this machine, or a damaged job.json)."""
        return JobRecord.from_json(read_json(self.path / JOB_FILE))

    def record_job(self, record: JobRecord) -> None:
        write_json_atomic(self.path / JOB_FILE, record.to_json())

    # ---- metrics and logs
    def metrics(self) -> list[dict[str, Any]]:
        """The logged rows, oldest first; a line that is not a JSON object with a step is skipped."""
        rows = []
        try:
            with open(self.path / METRICS_FILE, encoding="utf-8", errors="replace") as fh:
                for line in fh:
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError:
                        continue  # a line being appended right now, or a damaged one
                    if isinstance(row, dict) and isinstance(row.get("step"), int):
                        rows.append(row)
        except OSError:
            pass
        return rows

    def append_metrics(self, row: dict[str, Any]) -> None:
        # One write() of one line with O_APPEND is atomic for readers of whole lines.
        with open(self.path / METRICS_FILE, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(row) + "\n")

    def truncate_metrics(self, after_step: int) -> None:
        """Drop lines logged after a checkpoint, before resuming from it, so the curve continues without repeats."""
        self.replace_metrics([r for r in self.metrics() if r["step"] <= after_step])

    def replace_metrics(self, rows: list[dict[str, Any]]) -> None:
        """Write metrics.jsonl anew with ``rows`` (atomically)."""
        tmp = self.path / f".{METRICS_FILE}.tmp"
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        os.replace(tmp, self.path / METRICS_FILE)

    def write_data_report(self, report: dict[str, Any]) -> None:
        write_json_atomic(self.path / DATA_REPORT_FILE, report)

    def write_summary(self) -> None:
        """summary.json: the run's facts, for tools outside the studio (written whenever training ends)."""
        write_json_atomic(self.path / SUMMARY_FILE, self.facts().to_json())

    def data_report(self) -> dict[str, Any]:
        report = read_json(self.path / DATA_REPORT_FILE, default={})
        return report if isinstance(report, dict) else {}

    @property
    def evaluation_path(self) -> Path:
        return self.path / EVAL_FILE

    def evaluation(self) -> dict[str, list[dict[str, Any]]]:
        """eval.json: ``{"results": [...], "base": [...]}``, empty lists when there is none or it is damaged."""
        saved = read_json(self.evaluation_path, default={})
        saved = saved if isinstance(saved, dict) else {}
        return {key: [r for r in saved.get(key, []) if isinstance(r, dict)] if isinstance(saved.get(key), list)
                else [] for key in ("results", "base")}

    def write_evaluation(self, results: dict[str, list[dict[str, Any]]]) -> None:
        """Write eval.json (atomically): serving/evaluate.py merges new results into ``evaluation()`` first."""
        write_json_atomic(self.evaluation_path, results)

    def replace_log(self, lines: list[str]) -> None:
        """Write train.log anew with ``lines`` (atomically): a Jobs run's log is the job's."""
        tmp = self.path / f".{LOG_FILE}.tmp"
        tmp.write_text("".join(line.rstrip("\n") + "\n" for line in lines), encoding="utf-8")
        os.replace(tmp, self.log_path)

    def log_tail(self, lines: int = 40) -> str:
        """The last ``lines`` lines of train.log, everything the training process printed."""
        try:
            with open(self.log_path, "rb") as fh:
                fh.seek(0, os.SEEK_END)
                fh.seek(max(0, fh.tell() - 400 * lines))
                text = fh.read().decode("utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def own_log_tail(self, lines: int = 30) -> str:
        """The run's own lines of train.log (the studio's messages, warnings and errors from anywhere, tracebacks),
        without libraries' informational chatter and progress bars: what the app's log pane shows."""
        return "\n".join(own_log_lines(self.log_tail(lines * 20))[-lines:])

    # ---- checkpoints and stopping
    def checkpoints(self) -> list[int]:
        """Steps of the complete checkpoints, oldest first."""
        try:
            folders = list(self.checkpoints_dir.iterdir())
        except OSError:
            return []
        return sorted(step for p in folders if (step := checkpoint_step(p)) is not None and checkpoint_complete(p))

    def checkpoint_dir(self, step: int) -> Path:
        return self.checkpoints_dir / f"{CHECKPOINT_PREFIX}{step}"

    def last_checkpoint(self) -> Path | None:
        steps = self.checkpoints()
        return self.checkpoint_dir(steps[-1]) if steps else None

    def remove_partial_checkpoints(self) -> list[str]:
        """Delete checkpoint folders that are not complete (left by a kill); the training process calls this."""
        removed = []
        complete = set(self.checkpoints())
        for folder in self.checkpoints_dir.glob(f"{CHECKPOINT_PREFIX}*"):
            if folder.is_dir() and checkpoint_step(folder) not in complete:
                shutil.rmtree(folder, ignore_errors=True)
                removed.append(folder.name)
        return removed

    def stop_requested(self) -> bool:
        return (self.path / STOP_FILE).exists()

    def ask_to_stop(self) -> None:
        """Write the stop request the training loop polls for after every step (tiny: a signal handler calls it)."""
        (self.path / STOP_FILE).touch()

    def clear_stop_request(self) -> None:
        """Forget an earlier stop request: when training ends, and before a resume reads 'queued' (so a stop asked
        from then on is honoured)."""
        (self.path / STOP_FILE).unlink(missing_ok=True)

    # ---- who may see it on a Space (hub/access.py decides what the mark allows)
    def is_public(self) -> bool:
        return (self.path / PUBLIC_FILE).is_file()

    def set_public(self, public: bool) -> None:
        """Mark the run public on a Space (visitors may see it and chat with its final adapter), or take it back."""
        marker = self.path / PUBLIC_FILE
        if public:
            marker.touch()
        else:
            marker.unlink(missing_ok=True)

    # ---- everything at once
    def facts(self) -> RunFacts:
        status = self.status()
        problem = status.problem
        cfg = None
        try:
            cfg = self.config()
        except ConfigError as err:
            problem = problem or f"config.yaml cannot be used: {err}"
        metrics = self.metrics()
        train = [m["loss"] for m in metrics if finite_number(m.get("loss"))]
        search = self.lr_search()
        if search is not None:  # what a search produced is its chosen trial, not the last step it ran
            problem = problem or search.problem
            chosen = search.chosen_trial
            train = [chosen.final_loss] if chosen and chosen.final_loss is not None else []
        evals = [m["eval_loss"] for m in metrics if finite_number(m.get("eval_loss"))]
        elapsed = metrics[-1].get("elapsed_seconds") if metrics else None
        return RunFacts(
            run_id=self.id,
            status=status,
            config=cfg,
            problem=problem,
            final_train_loss=train[-1] if train else None,
            final_eval_loss=evals[-1] if evals else None,
            trainable_parameters=status.trainable_parameters,
            total_parameters=status.total_parameters,
            steps=status.step or (metrics[-1]["step"] if metrics else 0),
            checkpoints=self.checkpoints(),
            has_adapter=self.has_adapter(),
            duration_seconds=status.elapsed_seconds if status.elapsed_seconds is not None
            else (elapsed if finite_number(elapsed) else None),
            kind=self.kind,
            job=self.job(),
        )


def create_run(cfg: RunConfig, root: Path | None = None, device: str | None = None,
               search: LrSearch | None = None) -> Run:
    """A new run folder in state 'queued', recorded as being started by this process (on ``device``); with
    ``search``, a learning-rate search with that plan."""
    root = root or runs_dir()
    root.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    name = safe_name(cfg.run_name) if cfg.run_name else f"{cfg.method}-r{cfg.r}"
    name = f"lr-search-{name}" if search is not None else name
    run_id, n = f"{stamp}-{name}", 1
    while (root / run_id).exists():
        n += 1
        run_id = f"{stamp}-{name}-{n}"
    path = root / run_id
    path.mkdir()
    cfg.to_yaml(path / CONFIG_FILE)
    run = Run(path)
    if search is not None:  # before status.json: a run that has a status is already of its kind
        run.write_lr_search(search)
    run.update_status(state=RunState.QUEUED, created_at=time.time(), run_id=run_id, device=device,
                      launcher_pid=os.getpid(), launcher_started=process_start_time(os.getpid()))
    return run
