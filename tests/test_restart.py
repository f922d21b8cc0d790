"""A restart while a run trains (a Space restart sends SIGTERM to the container's processes, then SIGKILL): the run
ends resumable from its last checkpoint, and the app's Runs tab resumes it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from test_engine import REPO, wait_for

from denselora_app.config import RunConfig
from denselora_app.engine.launch import launch
from denselora_app.runs import Run, check_resumable, checkpoint_step, list_runs, request_stop
from denselora_app.ui import run_view, runs_tab


def endless(model_dir: Path, data: Path, save_steps: int) -> RunConfig:
    """A run that only a stop or a signal ends."""
    return RunConfig(model=str(model_dir), data=str(data), r=4, alpha=8, dropout=0.0, learning_rate=3e-2,
                     max_steps=100000, batch_size=2, grad_accum=1, warmup_steps=0, save_steps=save_steps,
                     cutoff_len=64, device="cpu", run_name="restart")


def start_endless(model_dir: Path, data: Path, save_steps: int) -> Run:
    """An endless run training in its own worker process, as the app starts it."""
    return launch(endless(model_dir, data, save_steps))


@pytest.mark.slow
def test_a_worker_killed_mid_training_is_resumed_from_its_checkpoint_in_the_runs_tab(app_model_dir, app_data_file,
                                                                                    runs_root):
    run = start_endless(app_model_dir, app_data_file, save_steps=3)
    wait_for(run.last_checkpoint, what="a checkpoint")
    os.kill(run.raw_status().pid, signal.SIGKILL)  # what follows SIGTERM when the grace time is over
    status = wait_for(lambda: (s := run.status()).state == "failed" and s, what="the failure to be seen")
    assert status.error_kind == "killed" and "restart" in status.error
    assert status.fix.startswith("Resume from the last checkpoint") and "Runs tab" in status.fix
    outcome = run_view.outcome_markdown(run, run.facts())
    assert "Training failed** (killed)" in outcome and "**Fix:** Resume" in outcome
    checkpoint = check_resumable(run)
    resumed_from = checkpoint_step(checkpoint)
    run.ask_to_stop()  # a stop the killed worker never answered: the resumed run must not obey it

    assert runs_tab.resume(run.id) == (f"Resumed run `{run.id}` from {checkpoint.name}: it trains in the "
                                       "background (Refresh to follow it).")
    assert "is already" in runs_tab.resume(run.id)  # one resume at a time
    wait_for(lambda: run.raw_status().step >= resumed_from + 2, what="the resumed run to train on")
    request_stop(run)
    wait_for(lambda: run.status().state == "stopped", what="the graceful stop")
    steps = [m["step"] for m in run.metrics() if "loss" in m]
    assert steps == list(range(1, steps[-1] + 1)) and steps[-1] >= resumed_from + 2  # on from the checkpoint
    assert "Resume" in run_view.outcome_markdown(run, run.facts())


@pytest.mark.slow
def test_sigterm_alone_stops_with_a_checkpoint_at_the_step_reached(app_model_dir, app_data_file, runs_root):
    run = start_endless(app_model_dir, app_data_file, save_steps=1000)
    wait_for(lambda: run.raw_status().step >= 3, what="training to start")
    os.kill(run.raw_status().pid, signal.SIGTERM)  # no STOP file: only the signal, as a container stop sends it
    wait_for(lambda: run.status().state == "stopped", what="the graceful stop")
    step = run.raw_status().step
    assert check_resumable(run).name == f"checkpoint-{step}" and run.has_adapter()


def test_the_runs_tab_says_why_a_run_cannot_be_resumed(app_model_dir, app_data_file, runs_root):
    assert runs_tab.resume(None).startswith("⚠️ Open a run first")
    assert "'nope' is not a run: there is no run of that id" in runs_tab.resume("nope")


@pytest.mark.slow
def test_stop_right_after_start_ends_stopped_not_killed(app_model_dir, app_data_file, runs_root):
    """A Stop click while the worker is still starting up (before its SIGTERM handler exists) must not kill it."""
    run = start_endless(app_model_dir, app_data_file, save_steps=1000)
    assert "still preparing" in request_stop(run)
    status = wait_for(lambda: not (s := run.status()).active and s, what="the run to end")
    assert status.state == "stopped" and "nothing was trained" in status.note


@pytest.mark.slow
def test_sigterm_stops_a_foreground_cli_run_gracefully(app_model_dir, app_data_file, runs_root, tmp_path):
    """`python -m denselora_app train` in a container that is stopped (or a Jobs cancel) keeps what it trained."""
    config = tmp_path / "endless.yaml"
    endless(app_model_dir, app_data_file, save_steps=1000).to_yaml(config)
    proc = subprocess.Popen([sys.executable, "-m", "denselora_app", "train", str(config)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        run = wait_for(lambda: (found := list_runs(runs_root)) and found[0], what="the run folder")
        wait_for(lambda: run.raw_status().step >= 3, what="training to start")
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0, err[-2000:]
    assert f"Run {run.id} stopped. Your adapter is in" in out
    status = run.status()
    assert status.state == "stopped" and check_resumable(run).name == f"checkpoint-{status.step}"
