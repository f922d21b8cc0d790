"""The training worker: ``python -m denselora_app.worker RUN_DIR [--resume]``.

Started by ``runs.start_worker`` in its own session with stdout/stderr in the run's train.log. It owns the run's
status from 'running' to a final state, keeps a heartbeat, and turns SIGTERM into a graceful stop.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
import traceback
from pathlib import Path

from .runs import STOP_FILE, Run, classify_failure

log = logging.getLogger(__name__)
HEARTBEAT_SECONDS = 5.0


def execute(run: Run, resume: bool = False, show_progress: bool = False) -> str:
    """Train the run and record how it ended in status.json (on the main process). Returns the final state."""
    from .train import process_state, train  # heavy imports, only once a run really starts

    main = process_state(run.config().device).is_main_process
    if main:
        run.update_status(state="running", pid=os.getpid(), started_at=time.time(), heartbeat=time.time(),
                          error=None, error_kind=None, fix=None, finished_at=None)
        _start_heartbeat(run)
    try:
        outcome = train(run, resume=resume, show_progress=show_progress)
    except BaseException as exc:  # noqa: BLE001  (every failure must end up explained in status.json)
        text = traceback.format_exc()
        log.error("Training failed:\n%s", text)
        if main:
            failure = (
                {"kind": "interrupted", "summary": "Interrupted with Ctrl-C.", "fix": "Resume from the last checkpoint."}
                if isinstance(exc, KeyboardInterrupt) else classify_failure(text)
            )
            run.update_status(state="failed", finished_at=time.time(), error=failure["summary"],
                              error_kind=failure["kind"], fix=failure["fix"])
        raise
    if main:
        run.update_status(state=outcome, finished_at=time.time())
        (run.path / STOP_FILE).unlink(missing_ok=True)
        log.info("Run %s %s.", run.id, outcome)
    return outcome


def _start_heartbeat(run: Run) -> None:
    def beat() -> None:
        while run.raw_status().get("state") == "running":
            run.update_status(heartbeat=time.time())
            time.sleep(HEARTBEAT_SECONDS)

    threading.Thread(target=beat, name="heartbeat", daemon=True).start()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    run = Run(args.run_dir.resolve())
    # A signal handler may only do something tiny: the training loop polls for this file after every step.
    signal.signal(signal.SIGTERM, lambda *_: (run.path / STOP_FILE).touch())
    try:
        execute(run, resume=args.resume)
    except BaseException:  # noqa: BLE001  (already logged and recorded by execute)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
