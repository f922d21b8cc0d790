"""The run folder as a contract: a typed status, facts computed in one place, damaged and read-only folders that
break nothing else, and checkpoints that are complete or absent."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_run_config
from numerics import assert_close_for
from test_publish import _make_run

from denselora_app import cli, runs
from denselora_app.hub.publish import build_model_repo
from denselora_app.runs import (
    CHECKPOINT_MARKER,
    Run,
    RunState,
    Status,
    create_run,
    list_runs,
    mark_checkpoint_complete,
    own_log_lines,
    request_stop,
    resolve_run,
)
from denselora_app.serving.adapters import available_adapters, resolve_adapter, training_notice

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def good_run(runs_root, app_model_dir) -> Run:
    """A completed run with an adapter of a tiny model (see test_publish._make_run)."""
    return resolve_run(_make_run(runs_root, "good", str(app_model_dir), "data.jsonl"))


def damage(root: Path, name: str, **files: str | None) -> Run:
    """A run folder whose files are exactly ``files`` (None: left out), as a crash or a hand edit leaves them."""
    folder = root / f"20200101-000000-{name}"
    folder.mkdir(parents=True)
    defaults = {"config.yaml": "model: m\ndata: d.jsonl\n", "status.json": '{"state": "completed"}'}
    for file, text in {**defaults, **files}.items():
        if text is not None:
            (folder / file).write_text(text)
    return Run(folder)


DAMAGES = {
    "status-list": ({"status.json": "[]"}, "status.json holds a list, not an object"),
    "status-null-state": ({"status.json": '{"state": null}'}, "status.json has no valid state (found None)"),
    "status-unknown-state": ({"status.json": '{"state": "exploded"}'}, "found 'exploded'"),
    "status-not-json": ({"status.json": '{"state": "comp'}, "status.json is not valid JSON"),
    "status-missing": ({"status.json": None}, "status.json is missing"),
    "config-garbage": ({"config.yaml": "r: [unclosed"}, "config.yaml cannot be used"),
    "config-bad-value": ({"config.yaml": "r: -3\n"}, "r must be at least 1"),
    # An alias bomb: expanding it would take the listing's memory and time; it is refused without expanding.
    "config-alias-bomb": ({"config.yaml": "a0: &a0 [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]\n" for i in range(1, 10)) + "run_name: *a9\n"},
        "uses the YAML alias *a0"),
}


def test_a_damaged_run_is_listed_as_damaged_and_breaks_nothing_else(good_run, runs_root, tmp_path, capsys):
    damaged = {name: damage(runs_root, name, **files) for name, (files, _) in DAMAGES.items()}
    # A metrics line that is valid JSON but not a row, and one with a wrong type, in the good run itself.
    with open(good_run.path / "metrics.jsonl", "a") as fh:
        fh.write("42\n[1, 2]\n{\"loss\": 1.0}\n{\"step\": \"x\", \"loss\": 1.0}\n")
    (good_run.path / "eval.json").write_text('{"results": 3}')

    for name, (_, reason) in DAMAGES.items():
        facts = damaged[name].facts()
        assert facts.state is RunState.DAMAGED and reason in facts.problem, (name, facts.problem)
    good = good_run.facts()
    assert good.state == "completed" and good.steps == 6
    assert_close_for(good.final_train_loss, 1.2, terms=2, dtype=torch.float64)  # _make_run's 3.0 - 0.3 * 6
    assert good_run.evaluation() == {"results": [], "base": []}

    # The CLI listing, the Runs tab, chat, evaluation and publishing of the good run all still work.
    assert cli.main(["runs"]) == 0
    listing = capsys.readouterr().out
    assert good_run.id in listing and "completed" in listing
    for name, (_, reason) in DAMAGES.items():
        assert f"{damaged[name].id}" in listing and reason in listing
    from denselora_app.ui import runs_tab, train_tab

    table, opened, _ = runs_tab.runs_table()
    assert set(table["Run"]) == {good_run.id, *(r.id for r in damaged.values())}
    assert set(table[table["Run"] != good_run.id]["State"]) == {"damaged"}
    details = runs_tab.open_run(damaged["status-list"].id)[0]
    assert "damaged" in details and "status.json holds a list" in details and "delete it" in details
    garbage = damaged["config-garbage"].id
    assert train_tab.live_status(garbage)[0].startswith(f"**Run** `{garbage}` · state: **damaged**")
    assert [ref.label for ref in available_adapters()] == [good_run.id]
    assert resolve_adapter(good_run.id).base_model == good.config.model
    assert build_model_repo(good_run.id, "alice/tiny", tmp_path / "out").files
    assert training_notice(torch.device("cpu")) is None

    # A damaged run is refused where it cannot be used, with the reason, and it can be deleted.
    with pytest.raises(Exception, match="damaged"):
        build_model_repo(damaged["status-list"].id, "alice/x", tmp_path / "out2")
    assert cli.main(["resume", damaged["status-list"].id]) == 2
    assert "is damaged (status.json holds a list" in capsys.readouterr().err
    for run in damaged.values():
        assert cli.main(["delete", run.id, "--yes"]) == 0
    assert [r.id for r in list_runs()] == [good_run.id]


def test_status_fields_of_the_wrong_type_are_ignored_not_fatal():
    status = Status.from_json({"state": "running", "step": "7", "pid": 12.0, "error": 3, "max_steps": True})
    assert (status.state, status.step, status.pid, status.error, status.max_steps) == ("running", 0, 12, None, None)
    assert Status.from_json({"state": "stopped", "note": "x"}).to_json()["note"] == "x"
    assert "problem" not in Status(RunState.DAMAGED, problem="p").to_json()


def test_listing_never_writes_so_a_read_only_runs_folder_works(good_run, runs_root, monkeypatch, capsys):
    """A dead 'running' run in a folder nobody may write: listed as failed, and chat still finds the good run."""
    dead = create_run(good_run.config(), runs_root, device="cpu")
    dead.update_status(state="running", pid=2**22 + 13, pid_started=1.0, step=2, max_steps=6)
    before = {p: p.read_bytes() for p in runs_root.rglob("*") if p.is_file()}

    def read_only(*args, **kwargs):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(runs.run, "write_json_atomic", read_only)  # every write of the run folder's JSON
    monkeypatch.setattr(Path, "write_text", read_only)
    monkeypatch.setattr(Path, "touch", read_only)
    if os.geteuid() != 0:  # root ignores permissions; then the patches above stand in for them
        for path in [runs_root, *runs_root.rglob("*")]:
            path.chmod(0o555 if path.is_dir() else 0o444)
    try:
        status = dead.status()
        assert status.state == "failed" and status.error_kind == "killed"
        assert cli.main(["runs"]) == 0
        assert f"{dead.id}" in capsys.readouterr().out
        from denselora_app.ui import runs_tab

        table, _, _ = runs_tab.runs_table()
        assert dict(zip(table["Run"], table["State"]))[dead.id] == "failed"
        assert resolve_adapter(good_run.id).location == str(good_run.adapter_dir)
        assert [ref.label for ref in available_adapters()] == [good_run.id]
    finally:
        for path in [runs_root, *runs_root.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)
    assert {p: p.read_bytes() for p in runs_root.rglob("*") if p.is_file()} == before


# ---- checkpoints: complete or absent -----------------------------------------------------------------------------


def fake_checkpoint(run: Run, step: int, complete: bool = True) -> Path:
    folder = run.checkpoint_dir(step)
    folder.mkdir(parents=True)
    shutil.copy(run.adapter_dir / "adapter_config.json", folder)
    for name in ("adapter_model.safetensors", "optimizer.pt", "trainer_state.json"):
        (folder / name).write_text(f"{name} of step {step}")
    if complete:
        mark_checkpoint_complete(folder)
    return folder


def test_only_complete_checkpoints_count_and_partial_ones_are_removed(good_run):
    fake_checkpoint(good_run, 2)
    fake_checkpoint(good_run, 4, complete=False)  # killed while the Trainer wrote it
    rotated = fake_checkpoint(good_run, 6)
    (rotated / "adapter_model.safetensors").unlink()  # killed while the Trainer deleted it (rotation)
    resized = fake_checkpoint(good_run, 8)
    (resized / "optimizer.pt").write_text("cut short")
    (good_run.checkpoints_dir / "checkpoint-x").mkdir()

    assert good_run.checkpoints() == [2]
    assert good_run.last_checkpoint() == good_run.checkpoint_dir(2)
    assert [ref.checkpoint for ref in available_adapters()] == [None, 2]
    with pytest.raises(Exception, match="has no checkpoint 6; its checkpoints are: 2"):
        resolve_adapter(good_run.id, checkpoint=6)
    assert sorted(good_run.remove_partial_checkpoints()) == ["checkpoint-4", "checkpoint-6", "checkpoint-8",
                                                             "checkpoint-x"]
    assert sorted(p.name for p in good_run.checkpoints_dir.iterdir()) == ["checkpoint-2"]
    assert json.loads((good_run.checkpoint_dir(2) / CHECKPOINT_MARKER).read_text())["files"]["optimizer.pt"] > 0


def test_training_marks_each_checkpoint_complete(tmp_path, runs_root, app_model_dir):
    """A real run: every checkpoint the Trainer writes gets its marker, and the run's facts list them."""
    from denselora_app.engine.launch import launch
    from denselora_app.engine.worker import execute

    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "the quick", "completion": "brown fox"}) + "\n")
    run = launch(tiny_run_config(app_model_dir, data, batch_size=1), background=False)
    assert execute(run) == "completed"
    assert run.checkpoints() == [2, 4] == run.facts().checkpoints
    for step in (2, 4):
        assert (run.checkpoint_dir(step) / CHECKPOINT_MARKER).is_file()
    summary = json.loads((run.path / "summary.json").read_text())
    assert summary["checkpoints"] == [2, 4] and summary["steps"] == 4 and summary["trainable_parameters"] > 0


# ---- the log the app shows ---------------------------------------------------------------------------------------


def test_the_log_pane_shows_the_runs_own_lines():
    lines = [  # (a train.log line, whether the pane shows it)
        ("2026-11-28 10:00:00,001 INFO denselora_app.engine.train: denselora r=4: 1,024 trainable parameters", True),
        ("2026-11-28 10:00:00,002 INFO denselora_app.engine.data: data report", True),
        ("facts.jsonl (messages): 8 rows read, 8 used", True),  # the same record's next line
        ("2026-11-28 10:00:00,003 WARNING py.warnings: /x/modeling_utils.py:3312: FutureWarning: deprecated", False),
        ("  warnings.warn(", False),
        ("Map: 100%|██████████| 8/8 [00:00<00:00, 1000.00 examples/s]", False),
        ("2026-11-28 10:00:00,004 INFO httpx: HTTP Request: HEAD https://huggingface.co", False),
        ("2026-11-28 10:00:01,000 INFO denselora_app.engine.train: step 1/4 | loss 3.2000", True),
        ("2026-11-28 10:00:02,000 WARNING transformers.trainer: the tokenizer has no pad token", True),
        ("2026-11-28 10:00:03,000 ERROR denselora_app.engine.worker: Training failed:", True),
        ("Traceback (most recent call last):", True),
        ('  File "x.py", line 1, in <module>', True),
        ("RuntimeError: boom", True),
    ]
    assert own_log_lines("\n".join(line for line, _ in lines)) == [line for line, shown in lines if shown]


def test_without_outside_root_only_the_runs_folder_is_reached(runs_root, good_run):
    for ref in ("../etc", "/etc", str(runs_root.parent), f"{runs_root}/../x", f"{good_run.path}/../../x"):
        with pytest.raises(runs.RunError, match="is not a run: here only the runs in the runs folder"):
            resolve_run(ref)
    shutil.rmtree(good_run.path / "adapter")
    assert not good_run.facts().has_adapter and good_run.facts().state == "completed"


def test_a_run_folder_named_with_spaces_or_accents_is_listed_and_reached(good_run, runs_root, capsys):
    """A user may rename a run folder (or copy one in): any folder name is its id, and commands print it quoted."""
    renamed = good_run.path.rename(runs_root / "Recette crème brûlée v2")
    assert [run.path for run in list_runs(runs_root)] == [renamed]
    run = resolve_run("Recette crème brûlée v2")
    assert run.path == renamed and run.cli_name == "'Recette crème brûlée v2'"
    assert cli.main(["runs"]) == 0 and "Recette crème brûlée v2" in capsys.readouterr().out
    (runs_root / ".hidden-copy").mkdir()  # hidden folders are never runs
    shutil.copy(renamed / "status.json", runs_root / ".hidden-copy" / "status.json")
    assert [run.path for run in list_runs(runs_root)] == [renamed]


def test_stop_on_a_run_that_is_not_training_says_what_can_be_done(good_run, runs_root):
    with pytest.raises(runs.RunError, match=r"nothing to stop\. It has finished\.$"):
        request_stop(good_run)
    damaged = damage(runs_root, "broken", **{"status.json": "[]"})
    with pytest.raises(runs.RunError, match=r"nothing to stop\. It is damaged \(status.json holds a list, not an "
                                            r"object\): delete it\.$"):
        request_stop(damaged)
    good_run.update_status(state="stopped")
    with pytest.raises(runs.RunError, match=r"nothing to stop\. You can resume it, or delete it\.$"):
        request_stop(good_run)


def test_a_listing_cut_short_by_its_reader_ends_quietly(good_run, runs_root):
    """`runs | head -1`: the reader leaves after one line; the listing ends without an error or a traceback."""
    code = ("import sys\nfrom denselora_app.cli import main\nsys.exit(main(['runs']))")
    for n in range(30):
        shutil.copytree(good_run.path, runs_root / f"20200101-0000{n:02d}-copy")
    result = subprocess.run(f"{shlex.quote(sys.executable)} -c {shlex.quote(code)} | head -1", shell=True,
                            capture_output=True, text=True, timeout=120, env={**os.environ, "COLUMNS": "40"})
    assert result.stdout.count("\n") == 1
    assert "Error" not in result.stderr and "Traceback" not in result.stderr and "bug" not in result.stderr


@pytest.mark.parametrize("text", ["a\x00b", "~nosuchuser", "~nosuchuser/adapter", "x" * 5000, "/" + "y" * 300 + "/z",
                                  "x" * 5000 + ".jsonl"], ids=["NUL", "~user", "~user/path", "long name",
                                                               "long folder", "long file"])
def test_text_no_path_can_be_is_refused_with_a_message_everywhere_a_path_is_typed(text, runs_root):
    """What a visitor may type in any box of the app (or anyone on the command line): never an OSError or a
    RuntimeError from the system, always the studio's own message."""
    from denselora_app.config import StudioError
    from denselora_app.engine.models import load_config
    from denselora_app.engine.sources import read_source
    from denselora_app.hub import access
    from denselora_app.runs import resolve_run
    from denselora_app.serving.adapters import resolve_adapter

    assert access.run_of_adapter(text) is None
    for read in (resolve_adapter, load_config, read_source, resolve_run,
                 lambda t: resolve_run(t, outside_root=True)):
        with pytest.raises(StudioError) as refused:
            read(text)
        assert len(str(refused.value)) < 1500 and "\x00" not in str(refused.value)
