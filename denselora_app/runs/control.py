"""Acting on a run: deleting it, asking it to stop, finding which run holds a device, checking it can resume.
"""

from __future__ import annotations

import logging
import os
import shlex
import shutil
from pathlib import Path

from denselora_app.runs.files import ADAPTER_DIR, CONFIG_FILE, RESULT_FILES, RUN_FILES, STATUS_FILE, RunError
from denselora_app.runs.reference import is_run_folder, list_runs
from denselora_app.runs.run import Run
from denselora_app.runs.status import RunKind, RunState, Status

log = logging.getLogger(__name__)


def check_deletable(run: Run) -> None:
    """Raise RunError, saying what to do, unless ``run.path`` is a run folder of its own that is not training;
    damaged and never-started runs may go."""
    if run.path.is_symlink():
        # Deleting through the link would delete its target, wherever that is; rmtree refuses links anyway.
        target = run.path.resolve()
        raise RunError(f"{run.path} is a symbolic link to {target}, not a run folder of its own: nothing was "
                       f"deleted. Remove the link alone with: rm {shlex.quote(str(run.path))} (its target stays), "
                       f"or delete the run itself: python -m denselora_app delete {shlex.quote(str(target))}")
    if not is_run_folder(run.path):
        raise RunError(f"{run.path} holds no run files ({' or '.join(RUN_FILES)}), so it is not a run folder: "
                       "nothing was deleted.")
    status = run.status()
    if status.stopping:
        raise RunError(f"Run {run.id} is stopping: it ends once the step under way and its checkpoint are done. "
                       "Delete it then.")
    if status.active:
        raise RunError(f"Run {run.id} is still {status.state}: stop it first (python -m denselora_app stop "
                       f"{run.id}), then delete it.")


def delete_run(run: Run) -> None:
    """Delete the run folder (check_deletable first). Links inside it are removed, never followed: rmtree does not
    leave the folder."""
    check_deletable(run)
    try:
        shutil.rmtree(run.path)
    except OSError as err:
        raise RunError(f"Could not delete {run.path}: {err.strerror or err}.") from None


def run_holding(device: str, root: Path | None = None, exclude: Run | None = None) -> Run | None:
    """The run that is training (or starting) on ``device`` (a resolved name: 'cpu', 'cuda:0', 'mps'), if any."""
    for run in list_runs(root):
        if exclude is not None and run.path == exclude.path:
            continue
        status = run.status()
        if status.active and status.device == device:
            return run
    return None


def request_stop(run: Run) -> str:
    """Graceful stop: the worker finishes its step, saves a checkpoint and the adapter, and ends as 'stopped'.

    Returns what the user should expect, which depends on whether training has begun."""
    status = run.status()
    if not status.active:
        what_now = {RunState.DAMAGED: f"It is damaged ({status.problem}): delete it.",
                    RunState.COMPLETED: "It has finished."}.get(status.state, "You can resume it, or delete it.")
        raise RunError(f"Run {run.id} is not training (state: {status.state}); nothing to stop. {what_now}")
    # The file alone is the request: a signal could reach a worker still starting up, before it can handle one.
    run.ask_to_stop()
    if run.kind is RunKind.LR_SEARCH:
        return (f"Asked the learning-rate search {run.id} to stop after the current step: the trials finished so "
                "far are kept, and the best rate is chosen from them.")
    if status.state is RunState.RUNNING and status.max_steps:  # the Trainer has begun: a step is under way
        return (f"Asked run {run.id} to stop: it saves a checkpoint and its adapter after the current step "
                f"(resume later with: python -m denselora_app resume {run.cli_name}).")
    return (f"Asked run {run.id} to stop. It was still preparing (loading the data and the model), so it ends "
            "before its first training step, without a checkpoint or adapter: nothing was trained.")


def check_resumable(run: Run) -> Path:
    """The checkpoint a resume continues from; RunError saying why when there is none to continue."""
    facts = run.facts()
    if facts.problem:
        raise RunError(f"Run {run.id} is damaged ({facts.problem}); it cannot be resumed. Delete it.")
    state = facts.state
    if state.active:
        raise RunError(f"Run {run.id} is already {state}.")
    if run.kind is RunKind.LR_SEARCH:
        raise RunError(f"Run {run.id} is a learning-rate search, which is not resumed: start a new search.")
    if state is RunState.COMPLETED:
        raise RunError(f"Run {run.id} already completed; start a new run to train more.")
    checkpoint = run.last_checkpoint()
    if checkpoint is None:
        raise RunError(f"Run {run.id} has no complete checkpoint to resume from; start a new run instead "
                       f"(and delete this one: python -m denselora_app delete {run.cli_name}).")
    return checkpoint


def take_results(run: Run, results: Run) -> Status:
    """Move what a training elsewhere produced (``results``: a copy of its run folder, e.g. downloaded from a Jobs
    results repository) into ``run``: its final adapter and its files (RESULT_FILES) except the configuration and
    status, which ``run`` keeps. Returns the status the results recorded. RunError when there is no adapter."""
    if not results.has_adapter():
        raise RunError(f"The results of run {run.id} hold no whole adapter ({ADAPTER_DIR}/ with its config and "
                       "weights).")
    for name in RESULT_FILES:
        if name not in (CONFIG_FILE, STATUS_FILE) and (results.path / name).is_file():
            os.replace(results.path / name, run.path / name)
    shutil.rmtree(run.adapter_dir, ignore_errors=True)
    os.replace(results.adapter_dir, run.adapter_dir)
    return results.raw_status()
