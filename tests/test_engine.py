"""The training engine on a tiny model: loss falls, stop/resume, a killed worker, DDP on 2 CPU processes, the CLI."""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import tiny_llama, tiny_run_config
from numerics import assert_close_for
from peft import PeftModel

from denselora_app.config import RunConfig
from denselora_app.engine.launch import resume_run, start_worker
from denselora_app.engine.worker import execute
from denselora_app.runs import FailureKind, classify_failure, create_run, list_runs, request_stop

REPO = Path(__file__).parent.parent


# Long enough to stop, kill and resume mid-run.
tiny_config = functools.partial(tiny_run_config, max_steps=30, batch_size=4, lr_scheduler="constant", save_steps=5,
                                run_name="tiny")


def wait_for(predicate, timeout: float = 120.0, what: str = "condition"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def test_loss_falls_and_the_run_folder_is_complete(app_model_dir, app_data_file, runs_root):
    run = create_run(tiny_config(app_model_dir, app_data_file, val_size=2))
    assert execute(run) == "completed"
    status = run.status()
    assert status.state == "completed" and status.step == 30
    metrics = run.metrics()
    losses = [m["loss"] for m in metrics if "loss" in m]
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5  # nats
    assert [m["step"] for m in metrics if "loss" in m] == list(range(1, 31))
    first = next(m for m in metrics if "loss" in m)
    for key in ("learning_rate", "grad_norm", "tokens_per_second", "elapsed_seconds", "remaining_seconds",
                "peak_memory_gb", "epoch"):
        assert key in first, key
    assert any("eval_loss" in m for m in metrics)  # val_size given, eval_steps 0: evaluated at the end
    assert (run.adapter_dir / "adapter_model.safetensors").exists()
    facts = run.facts()
    assert facts.trainable_parameters > 0 and facts.final_eval_loss is not None
    assert json.loads((run.path / "summary.json").read_text())["final_eval_loss"] == facts.final_eval_loss
    report = run.data_report()
    assert report["rows_used"] == 8 and report["val_rows"] == 2
    assert RunConfig.from_yaml(run.path / "config.yaml") == run.config()


@pytest.mark.slow
def test_stop_then_resume_continues_the_step_count(app_model_dir, app_data_file, runs_root):
    run = create_run(tiny_config(app_model_dir, app_data_file, max_steps=100000, save_steps=1000))
    start_worker(run)
    wait_for(lambda: run.raw_status().step >= 3, what="training to start")
    request_stop(run)
    wait_for(lambda: run.status().state == "stopped", what="the graceful stop")
    stopped_at = run.raw_status().step
    checkpoint = run.last_checkpoint()
    assert checkpoint is not None and checkpoint.name == f"checkpoint-{stopped_at}"
    assert (run.adapter_dir / "adapter_model.safetensors").exists()

    resume_run(run)
    wait_for(lambda: run.raw_status().step >= stopped_at + 3, what="the resumed run")
    request_stop(run)
    wait_for(lambda: run.status().state == "stopped", what="the second stop")
    steps = [m["step"] for m in run.metrics() if "loss" in m]
    assert steps == list(range(1, steps[-1] + 1)), "steps must continue without gaps or repeats"
    assert steps[-1] > stopped_at
    # The worker's log (the app's log pane) reads as one line per logged step, not raw dictionaries.
    log = run.log_path.read_text()
    assert f"step {stopped_at}/100000 | loss " in log and "{'loss'" not in log


@pytest.mark.slow
def test_a_killed_worker_is_reported_failed_and_its_checkpoints_load(app_model_dir, app_data_file, runs_root):
    run = create_run(tiny_config(app_model_dir, app_data_file, max_steps=100000, save_steps=2))
    pid = start_worker(run)
    wait_for(run.last_checkpoint, what="a checkpoint")
    os.kill(pid, signal.SIGKILL)
    status = wait_for(lambda: (s := run.status()).state == "failed" and s, what="failure detection")
    assert status.error_kind == "killed" and "killed" in status.error and status.fix
    model = PeftModel.from_pretrained(tiny_llama(hidden_size=64, intermediate_size=128, num_hidden_layers=2),
                                      run.last_checkpoint())
    assert model(torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, 320)


@pytest.mark.slow
def test_bad_data_fails_with_a_classified_reason(app_model_dir, tmp_path, runs_root):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json\n")
    run = create_run(tiny_config(app_model_dir, bad))
    start_worker(run)
    status = wait_for(lambda: (s := run.status()).state == "failed" and s, what="the failure")
    assert status.error_kind == "data error"
    assert "bad.jsonl" in status.error and status.fix


@pytest.mark.slow
def test_sigterm_while_the_data_is_prepared_stops_the_worker_at_once(app_model_dir, tmp_path, runs_root):
    """A container stopping (SIGTERM) while a big dataset is being tokenized: the worker ends within seconds,
    stopped, instead of tokenizing on until it is killed."""
    data = tmp_path / "big.jsonl"
    with data.open("w") as fh:
        for i in range(400_000):
            fh.write(json.dumps({"instruction": f"Repeat {i}.", "output": f"{i} {i}"}) + "\n")
    run = create_run(tiny_config(app_model_dir, data))
    pid = start_worker(run)
    wait_for(lambda: run.raw_status().state == "running", what="the worker to start preparing")
    time.sleep(2)  # well inside the tokenizing of 400,000 rows
    os.kill(pid, signal.SIGTERM)
    status = wait_for(lambda: (s := run.status()).state == "stopped" and s, timeout=30, what="the stop")
    assert "nothing was trained" in status.note
    assert "data report" not in run.log_path.read_text(), "the preparation ran to its end"


def test_failure_classification():
    oom = classify_failure("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB")
    assert oom.kind is FailureKind.OUT_OF_MEMORY and "batch_size" in oom.fix
    full = classify_failure("OSError: [Errno 28] No space left on device")
    assert full.kind is FailureKind.DISK_FULL and "Free space" in full.fix
    assert classify_failure("denselora_app.engine.sources.DataError: x.jsonl line 3: bad").kind is FailureKind.DATA
    assert classify_failure("Some log line\nRuntimeError: boom").kind is FailureKind.OTHER
    assert classify_failure("").kind is FailureKind.KILLED


def cli(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "denselora_app", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=timeout, cwd=REPO)


@pytest.mark.slow
def test_cli_train_runs_stop_resume(app_model_dir, app_data_file, runs_root, tmp_path):
    config = tmp_path / "c.yaml"
    tiny_config(app_model_dir, app_data_file).to_yaml(config)
    result = cli("train", str(config), "--set", "max_steps=6", "--set", "run_name=cli-demo", "--set", "r=2")
    assert result.returncode == 0, result.stderr
    assert "Your adapter is in" in result.stdout
    (run,) = list_runs(runs_root)
    assert run.config().r == 2 and run.status().state == "completed"
    listing = cli("runs")
    assert run.id in listing.stdout and "completed" in listing.stdout and "denselora" in listing.stdout
    assert cli("stop", run.id).returncode == 2  # not training: a clear error, not a traceback
    assert "is not training" in cli("stop", run.id).stderr
    assert "already completed" in cli("resume", run.id).stderr
    assert "'../etc' is not a run" in cli("stop", "../etc").stderr
    bad = cli("train", str(config), "--set", "r=zero")
    assert bad.returncode == 2 and "r must be a whole number" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.slow
def test_torchrun_two_cpu_processes_train_one_identical_adapter(app_model_dir, app_data_file, runs_root, tmp_path):
    config = tmp_path / "c.yaml"
    tiny_config(app_model_dir, app_data_file, max_steps=4, batch_size=2).to_yaml(config)
    torchrun = Path(sys.executable).parent / "torchrun"
    result = subprocess.run(
        [str(torchrun), "--nproc_per_node", "2", "-m", "denselora_app", "train", str(config)],
        capture_output=True, text=True, timeout=300, cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    runs = list_runs(runs_root)
    assert len(runs) == 1, "both ranks must write to one run folder"
    run = runs[0]
    assert run.status().state == "completed"
    assert (run.adapter_dir / "adapter_model.safetensors").exists()
    assert "Adapter weights identical on all 2 ranks" in run.log_path.read_text()


@pytest.mark.parametrize(("method", "scale", "shared_rate"), [("denselora", 4.0, 4e-3), ("denselora", 1.0, 1e-3),
                                                              ("lora", 4.0, None)])
def test_shared_matrices_train_at_their_own_rate(tmp_path, method, scale, shared_rate):
    from peft import get_peft_model
    from transformers import TrainingArguments

    from denselora_app.engine.methods import build_peft_config
    from denselora_app.engine.train import StudioTrainer

    cfg = RunConfig(method=method, r=4, target_modules=["q_proj", "v_proj"], shared_lr_scale=scale)
    assert RunConfig.from_dict(cfg.to_dict()).shared_lr_scale == scale  # saved in config.yaml, read back
    model = get_peft_model(tiny_llama(), build_peft_config(cfg))
    args = TrainingArguments(output_dir=str(tmp_path), learning_rate=1e-3, lr_scheduler_type="linear", max_steps=10,
                             warmup_steps=2, use_cpu=True, report_to="none")
    trainer = StudioTrainer(model=model, args=args)
    trainer.shared_lr_scale = scale if method == "denselora" else 1.0  # as train.prepare sets it
    trainer.create_optimizer_and_scheduler(num_training_steps=10)
    rate = {id(p): group["initial_lr"] for group in trainer.optimizer.param_groups for p in group["params"]}
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert set(rate) == {id(p) for p in trainable.values()}  # every trainable weight, once
    for name, p in trainable.items():
        shared = "denselora_encoder" in name or "denselora_decoder" in name
        # the base rate times the scale: one float64 rounding
        assert_close_for(rate[id(p)], shared_rate if shared else 1e-3, terms=1, dtype=torch.float64, msg=name)
    for _ in range(3):  # the schedule keeps the ratio
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
    rates = sorted({group["lr"] for group in trainer.optimizer.param_groups})
    assert len(rates) == (2 if shared_rate and scale != 1.0 else 1)
    # each group's rate times the schedule's factor, and the scale here: float64 roundings
    assert_close_for(rates[-1], rates[0] * (scale if len(rates) == 2 else 1.0), terms=3, dtype=torch.float64)
