"""One run reference: every command that takes a run finds it through runs.resolve_run (a run id, runs/<id>, the
path of a run folder, also one outside the runs folder on the command line), refuses anything else with one line,
and the app reaches only the runs in the runs folder."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from test_publish import _make_run

from denselora_app import cli
from denselora_app.engine import launch
from denselora_app.runs import Run, RunError, process_start_time, resolve_run
from denselora_app.serving import adapters
from denselora_app.serving.adapters import ChatError

pytestmark = pytest.mark.usefixtures("one_thread")

FORMS = ("id", "runs/<id>", "absolute path", "outside the runs folder")
ONLY_INSIDE = "here only the runs in the runs folder"


@pytest.fixture(scope="module")
def finished(tmp_path_factory, app_model_dir) -> Path:
    """A completed run with a real adapter of the tiny model, copied wherever a test needs one."""
    root = tmp_path_factory.mktemp("finished")
    return root / _make_run(root, "done", str(app_model_dir), "data.jsonl")


@pytest.fixture
def studio(tmp_path, monkeypatch) -> Path:
    """The runs folder: <tmp>/runs, with <tmp> the current directory (so runs/<id> is a relative path too)."""
    root = tmp_path / "runs"
    root.mkdir()
    monkeypatch.setenv("DENSELORA_RUNS", str(root))
    monkeypatch.setenv("DENSELORA_CACHE", str(tmp_path / "cache"))  # the CLI's own log file
    monkeypatch.chdir(tmp_path)
    return root


def place(finished: Path, studio: Path, form: str) -> tuple[str, Path]:
    """A copy of the finished run where ``form`` finds it, and the reference of that form."""
    outside = form == "outside the runs folder"
    folder = (studio.parent / "elsewhere" if outside else studio) / finished.name
    shutil.copytree(finished, folder)
    ref = {"id": folder.name, "runs/<id>": f"runs/{folder.name}"}.get(form, str(folder))
    return ref, folder


def refusal(capsys, argv: list[str]) -> str:
    """The one error line of a refused command (exit status 2)."""
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


# ---- the resolver ------------------------------------------------------------------------------------------------


def test_every_form_names_the_run_and_anything_else_is_refused_saying_so(finished, studio, monkeypatch):
    _, inside = place(finished, studio, "id")
    _, outside = place(finished, studio, "outside the runs folder")
    monkeypatch.setenv("HOME", str(studio.parent))
    for ref in (inside.name, f"runs/{inside.name}", f"./runs/{inside.name}/", str(inside), f"  {inside}  "):
        assert resolve_run(ref).path == inside == resolve_run(ref, outside_root=True).path
    for ref in (str(outside), f"elsewhere/{outside.name}", f"runs/../elsewhere/{outside.name}",
                f"~/elsewhere/{outside.name}"):
        assert resolve_run(ref, outside_root=True).path == outside
        with pytest.raises(RunError, match=f"is not a run: {ONLY_INSIDE} {studio} can be used"):
            resolve_run(ref)

    # runs/<id> names a run of the runs folder from any directory (the docs write it so).
    monkeypatch.chdir(outside.parent)
    assert resolve_run(f"runs/{inside.name}").path == inside

    (studio / "not-a-run").mkdir()
    (studio.parent / "file.txt").write_text("x")
    cases = {
        "not-a-run": f"the folder {studio / 'not-a-run'} holds no run files (config.yaml or status.json)",
        "runs/not-a-run": "holds no run files",
        "nope": f"there is no run of that id in {studio}. ",
        "runs/nope": f"there is no run of that id in {studio}",
        "": "nothing was given",
    }
    for ref, why in cases.items():
        with pytest.raises(RunError, match="is not a run") as refused:
            resolve_run(ref)
        assert why in str(refused.value), (ref, refused.value)
    monkeypatch.chdir(studio.parent)
    outside_cases = {
        "nope": f"there is no run of that id in {studio}, and no folder {studio.parent / 'nope'}",
        str(studio.parent / "missing"): f"there is no folder {studio.parent / 'missing'}",
        "file.txt": f"{studio.parent / 'file.txt'} is a file, not a run folder",
        str(studio.parent): f"the folder {studio.parent} holds no run files",
        "a\x00b": "it cannot be a path on this system",
        "x" * 300: "it cannot be looked up",
    }
    for ref, why in outside_cases.items():
        with pytest.raises(RunError) as refused:
            resolve_run(ref, outside_root=True)
        message = str(refused.value)
        assert why in message and "\n" not in message, (ref, message)
        # What was typed (a short prefix of it), what a run reference is, and how to list the runs.
        assert message.startswith(repr(ref[:80])) and "x" * 81 not in message
        assert "run id or by the path of its folder" in message and "python -m denselora_app runs" in message


# ---- every command, every form -----------------------------------------------------------------------------------


@pytest.mark.parametrize("form", FORMS)
def test_publish_stop_resume_delete_take_every_form(form, finished, studio, capsys, monkeypatch):
    ref, folder = place(finished, studio, form)
    out = studio.parent / "published"
    assert cli.main(["publish", ref, "--repo-id", "alice/tiny", "--dry-run", str(out)]) == 0, capsys.readouterr()
    assert (out / "adapter_model.safetensors").is_file() and "nothing uploaded" in capsys.readouterr().out

    Run(folder).update_status(state="running", pid=os.getpid(), pid_started=process_start_time(os.getpid()),
                              max_steps=6)  # this process stands in for its worker
    assert cli.main(["stop", ref]) == 0
    assert f"Asked run {folder.name} to stop" in capsys.readouterr().out and (folder / "STOP").is_file()

    resumed = []
    monkeypatch.setattr(launch, "resume_run", lambda run, **_: resumed.append(run.path))
    assert cli.main(["resume", ref, "--background"]) == 0 and resumed == [folder]

    Run(folder).update_status(state="stopped")
    assert cli.main(["delete", ref, "--yes"]) == 0
    assert f"Deleted run {folder.name}." in capsys.readouterr().out
    assert not folder.exists() and folder.parent.is_dir()


@pytest.mark.parametrize("form", FORMS)
def test_chat_and_eval_resolve_every_form_to_the_run(form, finished, studio):
    ref, folder = place(finished, studio, form)
    assert adapters.resolve_adapter(ref, outside_root=True).run.path == folder
    assert adapters.resolve_adapter(f"{folder}/adapter", outside_root=True).run.path == folder
    assert cli.build_parser().parse_args(["evaluate", ref]).func is cli.cmd_eval  # the alias of eval


def test_chat_and_evaluate_a_run_outside_the_runs_folder(finished, studio, capsys):
    ref, folder = place(finished, studio, "outside the runs folder")
    assert cli.main(["chat", ref, "--prompt", "hi", "--max-new-tokens", "2", "--temperature", "0",
                     "--device", "cpu"]) == 0, capsys.readouterr().err
    capsys.readouterr()
    assert cli.main(["evaluate", ref, "--limit", "1", "--mode", "loglik", "--device", "cpu"]) == 0
    assert f"Saved to {folder / 'eval.json'}" in capsys.readouterr().out
    assert Run(folder).evaluation()["results"]


COMMANDS = {
    "chat": ["chat", "{ref}", "--prompt", "hi"],
    "eval": ["eval", "{ref}"],
    "evaluate": ["evaluate", "{ref}"],
    "serve": ["serve", "{ref}", "--port", "1"],
    "publish": ["publish", "{ref}", "--repo-id", "alice/x", "--dry-run", "{out}"],
    "stop": ["stop", "{ref}"],
    "resume": ["resume", "{ref}"],
    "delete": ["delete", "{ref}", "--yes"],
}


@pytest.mark.parametrize("command", COMMANDS)
def test_a_folder_that_is_not_a_run_and_a_missing_path_are_refused_in_one_line(command, studio, capsys):
    plain = studio.parent / "plain"
    (plain / "notes").mkdir(parents=True)
    out = studio.parent / "out"

    def argv(ref: Path) -> list[str]:
        return [part.format(ref=ref, out=out) for part in COMMANDS[command]]

    line = refusal(capsys, argv(plain))
    # chat, eval and serve also take an adapter folder: theirs says it is not one.
    expected = "is not a PEFT adapter" if command in ("chat", "eval", "evaluate", "serve") else \
        f"error: {str(plain)!r} is not a run: the folder {plain} holds no run files"
    assert expected in line, line
    missing = studio.parent / "missing"
    assert f"error: {str(missing)!r} is not a run: there is no folder {missing}" in refusal(capsys, argv(missing))
    assert (plain / "notes").is_dir() and not out.exists()


def test_a_hub_shaped_run_reference_is_a_run_and_a_hub_id_still_goes_to_the_hub(finished, studio, monkeypatch):
    ref, folder = place(finished, studio, "runs/<id>")
    hub = []
    monkeypatch.setattr(adapters, "_hub_ref", lambda repo_id, root: hub.append(repo_id))
    assert adapters.resolve_adapter(ref).run.path == folder
    with pytest.raises(ChatError, match="'runs/nope' is not a run: there is no run of that id.*Hub adapter id"):
        adapters.resolve_adapter("runs/nope", outside_root=True)
    adapters.resolve_adapter("alice/tiny-adapter", outside_root=True)
    assert hub == ["alice/tiny-adapter"]


# ---- deleting ------------------------------------------------------------------------------------------------------


def test_delete_asks_before_removing_a_run_outside_the_runs_folder(finished, studio, capsys, monkeypatch):
    ref, folder = place(finished, studio, "outside the runs folder")
    monkeypatch.setattr(sys, "stdin", SimpleNamespace(isatty=lambda: False))
    line = refusal(capsys, ["delete", ref])
    assert f"at {folder}, outside the runs folder {studio}," in line and "add --yes" in line
    asked = []
    monkeypatch.setattr(sys, "stdin", SimpleNamespace(isatty=lambda: True))
    monkeypatch.setattr("builtins.input", lambda question: asked.append(question) or "n")
    assert cli.main(["delete", ref]) == 1 and folder.is_dir()
    assert f"outside the runs folder {studio}" in asked[0] and asked[0].endswith("[y/N] ")
    inside_ref, inside = place(finished, studio, "id")
    assert cli.main(["delete", inside_ref]) == 1 and "outside" not in asked[1]


def test_delete_never_follows_a_link_out_of_the_run(finished, studio, capsys):
    _, target = place(finished, studio, "outside the runs folder")
    link = studio / "20990101-000000-linked"
    link.symlink_to(target, target_is_directory=True)
    line = refusal(capsys, ["delete", link.name, "--yes"])
    assert f"{link} is a symbolic link to {target}" in line and f"rm {link}" in line
    assert link.is_symlink() and (target / "config.yaml").is_file()

    # A link inside a run folder goes with the folder; what it points to stays.
    keep = studio.parent / "keep"
    keep.mkdir()
    (keep / "precious.txt").write_text("still here")
    ref, folder = place(finished, studio, "id")
    (folder / "adapter" / "linked").symlink_to(keep, target_is_directory=True)
    (folder / "linked-file").symlink_to(keep / "precious.txt")
    assert cli.main(["delete", ref, "--yes"]) == 0
    assert not folder.exists() and (keep / "precious.txt").read_text() == "still here"


# ---- the app: the runs folder only ---------------------------------------------------------------------------------


def test_the_app_reaches_only_the_runs_in_the_runs_folder(finished, studio):
    from denselora_app.ui import publish_tab, runs_tab, train_tab

    _, inside = place(finished, studio, "id")
    _, outside = place(finished, studio, "outside the runs folder")
    for ref in (inside.name, f"runs/{inside.name}", str(inside)):
        assert f"Folder: `{inside}`" in runs_tab.open_run(ref)[0]
    for ref in (str(outside), f"elsewhere/{outside.name}", f"runs/../elsewhere/{outside.name}", "/etc", "../.."):
        assert ONLY_INSIDE in runs_tab.open_run(ref)[0]
        assert ONLY_INSIDE in runs_tab.confirm_delete(ref)[1]
        assert ONLY_INSIDE in runs_tab.resume(ref)
        assert ONLY_INSIDE in runs_tab.set_public(ref, True)
        assert ONLY_INSIDE in train_tab.stop_training(ref)
        assert ONLY_INSIDE in train_tab.live_status(ref)[0]
        assert ONLY_INSIDE in publish_tab.build_model(ref, "alice/x", "")[0]
    with pytest.raises(ChatError, match=ONLY_INSIDE):
        adapters.resolve_adapter(str(outside))
    assert sorted(p.name for p in outside.iterdir()) == sorted(p.name for p in finished.iterdir())
