"""The training worker: ``python -m denselora_app.engine.worker RUN_DIR [--resume]``.

Started by ``launch.start_worker`` in its own session with stdout/stderr in the run's
train.log. It owns the run's status from 'running' to a final state and turns SIGTERM into a graceful stop.
The foreground CLI calls ``execute`` in its own process instead; SIGTERM stops it gracefully too.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from pathlib import Path

from denselora_app.runs import (
    LOG_FORMAT,
    Failure,
    FailureKind,
    Run,
    RunKind,
    RunState,
    classify_failure,
    process_start_time,
)
from denselora_app.terminal import TRACEBACK

log = logging.getLogger(__name__)


class RunFailed(Exception):
    """Training raised: ``failure`` says why and what to do (also in the run status, when it could be written)."""

    def __init__(self, failure: Failure) -> None:
        super().__init__(failure.summary)
        self.failure = failure


@contextlib.contextmanager
def sigterm_stops(run: Run) -> Iterator[None]:
    """While training, SIGTERM (a container or Space stopping, a Jobs cancel, ``kill``) becomes a graceful stop:
    a checkpoint and the adapter at the step reached. Outside the main thread, where no handler can be set, nothing
    changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, lambda *_: run.ask_to_stop())
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def execute(run: Run, resume: bool = False, show_progress: bool = False) -> RunState:
    """Train the run (or, for a learning-rate search, run its trials) and record how it ended in the run status (on the
    main process). Returns the final state; raises RunFailed (or KeyboardInterrupt) when training does not end. The
    worker and the foreground CLI both train through this."""
    with sigterm_stops(run):
        return _execute(run, resume, show_progress)


def _execute(run: Run, resume: bool, show_progress: bool) -> RunState:
    from denselora_app.engine.train import process_state, train

    main = process_state(run.config().device).is_main_process
    if main:
        run.update_status(state=RunState.RUNNING, pid=os.getpid(), pid_started=process_start_time(os.getpid()),
                          started_at=time.time(), error=None, error_kind=None, fix=None, note=None,
                          finished_at=None)
        for name in run.remove_partial_checkpoints():
            log.warning("Removed %s: it was not completely written (the training process was killed while saving).",
                        name)
    try:
        if run.kind is RunKind.LR_SEARCH:
            from denselora_app.engine.lr_finder import search

            outcome = search(run, show_progress=show_progress)
        else:
            outcome = train(run, resume=resume, show_progress=show_progress)
    except BaseException as exc:  # noqa: BLE001  (every failure must end up explained in the run status)
        log.error("Training failed:\n%s", traceback.format_exc(), extra={TRACEBACK: True})
        if isinstance(exc, KeyboardInterrupt):
            failure = Failure(FailureKind.INTERRUPTED, "Interrupted with Ctrl-C.", "Resume from the last checkpoint.")
        else:
            failure = classify_failure(traceback.format_exc())
        if main:
            try:
                run.update_status(state=RunState.FAILED, finished_at=time.time(), **failure.status_fields())
            except OSError as err:  # a full disk: the reason still reaches the caller; readers see a dead process
                log.error("Could not record the failure in the run status: %s", err)
        if isinstance(exc, KeyboardInterrupt):
            raise
        raise RunFailed(failure) from exc
    if main:
        run.update_status(state=outcome.state, finished_at=time.time(), note=outcome.note)
        run.clear_stop_request()
        log.info("Run %s %s.%s", run.id, outcome.state, f" {outcome.note}" if outcome.note else "")
    return outcome.state


def quiet_libraries() -> None:
    """Keep train.log the run's own: no progress bars from datasets or the Hub client, and Python warnings
    (libraries' deprecation notices) as log records that the app's log pane leaves out."""
    import datasets
    from huggingface_hub.utils import disable_progress_bars

    datasets.disable_progress_bars()
    disable_progress_bars()
    logging.captureWarnings(True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stdout, format=LOG_FORMAT)
    quiet_libraries()
    run = Run(args.run_dir.resolve())
    try:
        execute(run, resume=args.resume)
    except BaseException:  # noqa: BLE001  (already logged and recorded by execute)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
