"""Starting runs: the one launch function, its pre-flight checks, the device rule, and runs that can never be
stranded. Bad input is refused before anything exists, in one paragraph, with exit status 2 and no traceback."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import torch
from conftest import tiny_run_config

from denselora_app import cli
from denselora_app.engine.launch import LaunchError, launch, resume_run, run_device
from denselora_app.engine.worker import execute
from denselora_app.runs import create_run, list_runs, request_stop, resolve_run, run_holding
from denselora_app.ui import run_view

REPO = Path(__file__).parent.parent


def run_folders(root: Path) -> list[Path]:
    return [p for p in root.iterdir() if p.is_dir()] if root.exists() else []


def hold_device(root: Path, model_dir: Path, data: Path, device: str = "cpu", **status) -> object:
    """A run that trains on ``device`` as far as any reader can tell: its training process is this test process."""
    run = create_run(tiny_run_config(model_dir, data, run_name="holder"), root, device=device)
    me = psutil.Process()
    run.update_status(state="running", pid=me.pid, pid_started=me.create_time(), step=3, max_steps=40, **status)
    return run


# ---- bad input, refused before anything exists -------------------------------------------------------------------


def _bad_inputs(tmp: Path) -> list[tuple[str, list[str], str]]:
    """(what, extra CLI arguments, a phrase the message must contain) for every kind of bad input."""
    files = {
        "folder.yaml": None,  # a folder with a config-like name
        "latin1.yaml": "model: caf\xe9\n".encode("latin-1"),
        "broken.yaml": b"model: [unclosed\n",
        "list.yaml": b"- model\n- data\n",
        "empty.jsonl": b"",
        "random.jsonl": bytes(range(256)) * 40,
        "latin1.jsonl": json.dumps({"text": "caf\xe9"}, ensure_ascii=False).encode("latin-1") + b"\n",
        "long-line.jsonl": b"x" * 1_000_000 + b"\n",
        "columns.jsonl": b'{"question": "a?", "reply": "b"}\n' * 3,
        "sheet.xlsx": b"PK\x03\x04",
        "two.jsonl": b'{"text": "the quick brown fox"}\n' * 2,
    }
    for name, content in files.items():
        if content is None:
            (tmp / name).mkdir()
        else:
            (tmp / name).write_bytes(content)
    no_config = tmp / "no-config"
    no_config.mkdir()
    (no_config / "weights.bin").write_bytes(b"")
    adapter = tmp / "an-adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    cfg = str(tmp / "run.yaml")

    def with_config(path: str) -> list[str]:
        return ["train", path]

    def setting(value: str) -> list[str]:
        return ["train", cfg, "--set", value]

    return [
        ("config is a folder", with_config(str(tmp / "folder.yaml")), "is a folder, not a configuration file"),
        ("config is not UTF-8", with_config(str(tmp / "latin1.yaml")), "is not UTF-8 text"),
        ("config is not YAML", with_config(str(tmp / "broken.yaml")), "is not valid YAML"),
        ("config is a list", with_config(str(tmp / "list.yaml")), "is a mapping of keys to values"),
        ("config file missing", with_config(str(tmp / "missing.yaml")), "Configuration file not found"),
        ("unknown key", setting("lerning_rate=1e-3"), "Did you mean 'learning_rate'"),
        ("a word for a number", setting("r=zero"), "r must be a whole number"),
        ("negative validation", setting("val_size=-1"), "val_size must be at least 0"),
        ("unknown device name", setting("device=tpu"), "device must be one of"),
        ("data is a folder", setting(f"data={tmp}"), "is a folder - give a data file"),
        ("empty data file", setting(f"data={tmp / 'empty.jsonl'}"), "is empty"),
        ("random bytes", setting(f"data={tmp / 'random.jsonl'}"), "is not UTF-8 text"),
        ("data not UTF-8", setting(f"data={tmp / 'latin1.jsonl'}"), "save it as UTF-8"),
        ("a 1 MB line", setting(f"data={tmp / 'long-line.jsonl'}"), "no usable rows"),
        ("unknown columns", setting(f"data={tmp / 'columns.jsonl'}"), "cannot tell the layout"),
        ("missing data file", setting(f"data={tmp / 'nope.jsonl'}"), "file not found"),
        ("unsupported file type", setting(f"data={tmp / 'sheet.xlsx'}"), "unsupported file type '.xlsx'"),
        ("validation takes every row", setting(f"data={tmp / 'two.jsonl'}") + ["--set", "val_size=2"],
         "at least one must stay for training"),
        ("model path missing", setting(f"model={tmp / 'no-model'}"), "No such file or folder"),
        ("model folder without config", setting(f"model={no_config}"), "has no config.json"),
        ("an adapter as the model", setting(f"model={adapter}"), "holds a PEFT adapter"),
        ("rank wider than the model", setting("r=100000"), "r=100000 is wider than the narrowest adapted layer"),
        ("unknown target module", setting("target_modules=[q_proj, attn_out]"), "attn_out: LlamaForCausalLM has no"),
        ("CUDA on a CPU machine", setting("device=cuda"), "CUDA is not available on this machine"),
        ("a CUDA device number", setting("device=cuda:3"), "CUDA is not available on this machine"),
    ]


def test_every_bad_input_is_refused_in_one_paragraph_and_creates_nothing(tmp_path, app_model_dir, app_data_file,
                                                                          runs_root,
                                                                          capsys):
    tiny_run_config(app_model_dir, app_data_file).to_yaml(tmp_path / "run.yaml")
    cases = _bad_inputs(tmp_path)
    assert len(cases) >= 20
    for what, args, phrase in cases:
        for background in ([], ["--background"]) if args[0] == "train" else ([],):
            code = cli.main(args + background)
            out, err = capsys.readouterr()
            assert code == 2, (what, background, out, err)
            assert err.startswith("error: ") and phrase in err, (what, err)
            assert "Traceback" not in out + err, (what, err)
            assert run_folders(runs_root) == [], f"{what}: a refused launch must leave no run folder"


@pytest.mark.slow
def test_a_refusal_in_a_fresh_process_is_quiet(tmp_path, app_model_dir, app_data_file, runs_root):
    """The terminal shows one paragraph: no traceback, no library warnings; --debug adds the traceback."""
    config_path = tmp_path / "run.yaml"
    tiny_run_config(app_model_dir, tmp_path).to_yaml(config_path)
    env = {**os.environ, "DENSELORA_RUNS": str(runs_root)}
    quiet = subprocess.run([sys.executable, "-m", "denselora_app", "train", str(config_path)], capture_output=True,
                           text=True, env=env, cwd=REPO, timeout=300)
    assert quiet.returncode == 2
    assert quiet.stderr.strip().splitlines() == [f"error: Data: {tmp_path} is a folder - give a data file "
                                                 "(.jsonl, .json, .csv, .parquet, .txt)"]
    debug = subprocess.run([sys.executable, "-m", "denselora_app", "train", str(config_path), "--debug"],
                           capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert debug.returncode == 2 and "Traceback" in debug.stderr and "is a folder" in debug.stderr
    assert run_folders(runs_root) == []


@pytest.mark.slow
def test_a_failure_during_training_keeps_its_traceback_in_train_log_only(tmp_path, app_model_dir, app_data_file,
                                                                         runs_root):
    """Weights that cannot be read pass the pre-flight (it reads no weights) and fail when training loads them."""
    broken = tmp_path / "broken-model"
    shutil.copytree(app_model_dir, broken)
    (broken / "model.safetensors").write_bytes(b"not weights")
    tiny_run_config(broken, app_data_file).to_yaml(tmp_path / "run.yaml")
    result = subprocess.run([sys.executable, "-m", "denselora_app", "train", str(tmp_path / "run.yaml")],
                            capture_output=True, text=True, cwd=REPO, timeout=300,
                            env={**os.environ, "DENSELORA_RUNS": str(runs_root)})
    (run,) = list_runs(runs_root)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"Run {run.id} failed: The base model could not be loaded." in result.stderr
    assert f"The full error is in {run.log_path} (or run again with --debug)." in result.stderr
    assert "Traceback" in run.log_path.read_text()
    status = run.status()
    assert status.state == "failed" and status.error_kind == "model load error"


# ---- the device rule ---------------------------------------------------------------------------------------------


def test_devices_are_compared_after_resolution(monkeypatch):
    assert run_device("auto") == run_device("cpu") == run_device(" CPU ") == "cpu"  # this machine has no GPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert run_device("auto") == run_device("cuda") == run_device("cuda:0") == "cuda:0"
    assert run_device("cuda:1") == "cuda:1"
    with pytest.raises(LaunchError, match="this machine has 2 CUDA device"):
        run_device("cuda:2")


@pytest.mark.parametrize("requested", ["auto", "cpu"])
def test_a_second_run_on_a_busy_device_is_refused_naming_the_holder(requested, app_model_dir, app_data_file, runs_root):
    holder = hold_device(runs_root, app_model_dir, app_data_file)
    with pytest.raises(LaunchError, match=rf"cpu is in use by run {holder.id} \(running, step 3/40\).*--share-device"):
        launch(tiny_run_config(app_model_dir, app_data_file, device=requested), background=False)
    assert [r.id for r in list_runs(runs_root)] == [holder.id]
    shared = launch(tiny_run_config(app_model_dir, app_data_file, device=requested), background=False,
                    share_device=True)
    assert shared.status().device == "cpu"


def test_foreground_cli_training_respects_the_device_rule(tmp_path, app_model_dir, app_data_file, runs_root, capsys):
    holder = hold_device(runs_root, app_model_dir, app_data_file)
    tiny_run_config(app_model_dir, app_data_file, device="auto").to_yaml(tmp_path / "run.yaml")
    assert cli.main(["train", str(tmp_path / "run.yaml")]) == 2
    assert f"in use by run {holder.id}" in capsys.readouterr().err
    assert [r.id for r in list_runs(runs_root)] == [holder.id]


def test_a_foreground_run_holds_its_device_while_it_trains(app_model_dir, app_data_file, runs_root, monkeypatch):
    """The training process itself is recorded as the device holder, as a background worker is."""
    run = launch(tiny_run_config(app_model_dir, app_data_file), background=False)
    seen = {}

    def check_busy(*args, **kwargs):
        with pytest.raises(LaunchError, match=f"in use by run {run.id}"):
            launch(tiny_run_config(app_model_dir, app_data_file), background=False)
        seen["status"] = resolve_run(run.id).status()
        raise KeyboardInterrupt  # stop here: what matters is what others saw meanwhile

    from denselora_app.engine import train

    monkeypatch.setattr(train, "StudioTrainer", check_busy)
    with pytest.raises(KeyboardInterrupt):
        execute(run)
    assert seen["status"].state == "running" and seen["status"].pid == os.getpid()


# ---- no run is ever stranded -------------------------------------------------------------------------------------


def test_a_run_whose_start_never_happened_has_a_way_out(tmp_path, app_model_dir, app_data_file, runs_root, capsys):
    """The launcher died between creating the folder and starting the worker: the run is reported as never started,
    holds no device, cannot be stopped or resumed, and can be deleted."""
    holder = hold_device(runs_root, app_model_dir, app_data_file)
    stranded = create_run(tiny_run_config(app_model_dir, app_data_file, run_name="stranded"), runs_root, device="cpu")
    stranded.update_status(launcher_pid=2**22 + 11, launcher_started=1.0)  # a process that no longer exists
    status = stranded.status()
    assert status.state == "failed" and status.error_kind == "never started" and "delete" in status.fix
    assert json.loads((stranded.path / "status.json").read_text())["state"] == "queued", "reading never writes"
    assert run_holding("cpu", runs_root, exclude=holder) is None

    from denselora_app.ui.train_tab import restore_run

    assert restore_run() == holder.id, "a reloaded page watches the run that trains, not the newest stuck one"

    assert cli.main(["runs"]) == 0
    assert "never started: delete it" in capsys.readouterr().out
    assert cli.main(["stop", stranded.id]) == 2
    assert "is not training" in capsys.readouterr().err
    assert cli.main(["resume", stranded.id]) == 2
    assert "no complete checkpoint" in capsys.readouterr().err
    assert cli.main(["delete", stranded.id]) == 2  # not a terminal: asks for --yes instead of deleting
    assert "add --yes" in capsys.readouterr().err and stranded.path.exists()
    assert cli.main(["delete", stranded.id, "--yes"]) == 0
    assert not stranded.path.exists()


def test_a_running_run_cannot_be_deleted(app_model_dir, app_data_file, runs_root, capsys):
    holder = hold_device(runs_root, app_model_dir, app_data_file)
    assert cli.main(["delete", holder.id, "--yes"]) == 2
    assert "is still running: stop it first" in capsys.readouterr().err and holder.path.exists()


def test_stop_before_the_first_step_says_nothing_was_trained(app_model_dir, app_data_file, runs_root, capsys):
    run = launch(tiny_run_config(app_model_dir, app_data_file), background=False)
    message = request_stop(run)
    assert "before its first training step" in message and "nothing was trained" in message
    # Until the training process has ended, everything that shows the run says the stop was heard.
    assert run.status().stopping and run.facts().label == "stopping"
    assert run_view.table_row(run.facts())[1] == "stopping" and "state: **stopping**" in run_view.header_markdown(
        run.facts())
    assert "Stopping: it ends before its first step" in run_view.progress_html(run.status())
    cli.main(["runs"])
    assert f"{run.id} stopping" in " ".join(capsys.readouterr().out.split())
    assert execute(run) == "stopped"
    status = run.status()
    assert status.state == "stopped" and "nothing was trained" in status.note and not status.stopping
    assert run_view.table_row(run.facts())[1] == "stopped"
    assert not run.has_adapter() and run.checkpoints() == []
    assert cli.main(["resume", run.id]) == 2
    assert "no complete checkpoint" in capsys.readouterr().err


def test_a_run_asked_to_stop_mid_training_says_what_it_is_finishing(app_model_dir, app_data_file, runs_root,
                                                                     capsys):
    run = hold_device(runs_root, app_model_dir, app_data_file, elapsed_seconds=12.0, remaining_seconds=140.0)
    assert "ETA" in run_view.progress_html(run.status()) and not run.status().stopping
    assert "saves a checkpoint and its adapter after the current step" in request_stop(run)
    shown = run_view.progress_html(run.status())
    assert "Stopping: the step under way finishes, then a checkpoint and the adapter are saved" in shown
    assert "ETA" not in shown and run.status().state == "running"  # still holds its device until it has ended
    assert cli.main(["delete", run.id, "--yes"]) == 2
    assert "is stopping: it ends once the step under way" in capsys.readouterr().err and run.path.exists()


def test_resume_from_a_checkpoint_at_max_steps_trains_no_further(app_model_dir, app_data_file, runs_root):
    run = launch(tiny_run_config(app_model_dir, app_data_file, max_steps=4, save_steps=2), background=False)
    assert execute(run) == "completed" and run.checkpoints() == [2, 4]
    # As if it had been stopped (or killed) right after the last checkpoint, before saving the adapter.
    run.update_status(state="stopped")
    for name in os.listdir(run.adapter_dir):
        os.remove(run.adapter_dir / name)
    rows = len(run.metrics())
    resume_run(run, background=False)
    assert execute(run, resume=True) == "completed"
    status = run.status()
    assert status.step == 4 and "nothing was left to train" in status.note
    assert max(m["step"] for m in run.metrics()) == 4 and len(run.metrics()) == rows
    assert run.has_adapter()


def test_the_app_starts_runs_through_the_same_launch(tmp_path, app_model_dir, app_data_file, runs_root):
    """No second pre-flight in the UI: the Train tab shows launch's own refusal and creates nothing."""
    from denselora_app.ui import train_tab

    settings = tiny_run_config(app_model_dir, tmp_path).to_dict()
    message, run_id, _ = train_tab.start_training(**settings)
    assert "Not started. Data:" in message and "is a folder" in message
    assert run_folders(runs_root) == []
    holder = hold_device(runs_root, app_model_dir, app_data_file)
    message, _, _ = train_tab.start_training(**tiny_run_config(app_model_dir, app_data_file).to_dict())
    assert f"in use by run {holder.id}" in message


# ---- Stop before training, and failures that cannot be recorded ----------------------------------------------------


def test_stop_during_data_preparation_ends_the_run_before_the_model_loads(app_model_dir, tmp_path, runs_root,
                                                                          monkeypatch):
    """A large dataset is still being tokenized when Stop is pressed: the run ends stopped within a few hundred rows,
    without tokenizing the rest or loading the model."""
    data = tmp_path / "many.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"Say {i}.", "output": f"{i}"}) + "\n" for i in range(5000)))
    run = launch(tiny_run_config(app_model_dir, data), background=False)
    from denselora_app.engine import data as data_module
    from denselora_app.engine import train

    encoded = []
    real_encode = data_module._encode

    def encode_then_stop(*args, **kwargs):
        encoded.append(1)
        if len(encoded) == 300:
            request_stop(run)  # what Stop in the app or `stop RUN` does
        return real_encode(*args, **kwargs)

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded after Stop")

    monkeypatch.setattr(data_module, "_encode", encode_then_stop)
    monkeypatch.setattr(train, "load_model", no_model)
    assert execute(run) == "stopped"
    assert len(encoded) < 300 + 256 + 1, "tokenizing went on after the stop request"
    status = run.status()
    assert status.state == "stopped" and "nothing was trained" in status.note
    assert not run.has_adapter() and not run.stop_requested()


def test_a_failure_on_a_full_disk_still_says_why(app_model_dir, app_data_file, tmp_path, runs_root, monkeypatch,
                                                 capsys):
    """The disk fills up mid-run, so not even the failure can be written to the run status: the terminal still
    names the reason and the fix, and the listing shows the run as failed for that reason, not as running."""
    from denselora_app.engine import train
    from denselora_app.runs import Run

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    real_update = Run.update_status

    def update_unless_failed(self, **changes):
        if changes.get("state") == "failed":
            disk_full()
        return real_update(self, **changes)

    monkeypatch.setattr(train, "StudioTrainer", disk_full)
    monkeypatch.setattr(Run, "update_status", update_unless_failed)
    tiny_run_config(app_model_dir, app_data_file, run_name="full").to_yaml(tmp_path / "run.yaml")
    assert cli.main(["train", str(tmp_path / "run.yaml")]) == 1
    err = capsys.readouterr().err
    assert "failed: The disk is full." in err and "Free space on the disk" in err and "None" not in err
    run = list_runs()[0]
    assert run.raw_status().state == "running"  # what the full disk left behind
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    monkeypatch.setattr(Run, "update_status", real_update)
    run.update_status(pid=ended.pid, pid_started=None)  # the training process is gone, as after the real failure
    status = run.status()
    assert status.state == "failed" and status.error_kind == "disk full" and "Free space" in status.fix
