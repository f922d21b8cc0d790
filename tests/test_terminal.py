"""The terminal shows the studio's own messages only: other libraries' records, warnings and prints go to the log."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest

from denselora_app import terminal
from denselora_app.terminal import Terminal

REPO = Path(__file__).resolve().parent.parent

# A library the studio never heard of, imported while a command runs (here: with transformers, as kernels comes with
# bitsandbytes): it warns at import, gives its logger a terminal handler of its own (as transformers does), prints to
# stderr, and warns again each time a model's config or tokenizer is read, which every launch does.
NOISY_LIBRARY = '''
import logging, sys, warnings
log = logging.getLogger("noisylib")
log.addHandler(logging.StreamHandler())
log.propagate = False
log.warning("NOISY: imported")
warnings.warn("NOISY: a warning at import")
print("NOISY: printed to stderr", file=sys.stderr)

import transformers
for cls in (transformers.AutoConfig, transformers.AutoTokenizer):
    original = cls.from_pretrained.__func__
    def from_pretrained(cls, *args, _original=original, **kwargs):
        logging.getLogger("noisylib.launch").warning("NOISY: during a launch")
        return _original(cls, *args, **kwargs)
    cls.from_pretrained = classmethod(from_pretrained)
'''
# sitecustomize runs before the CLI: it imports the library only once transformers is imported (inside the command).
SITECUSTOMIZE = '''
import builtins
_import = builtins.__import__
def _hooked(name, globals=None, *args, **kwargs):
    module = _import(name, globals, *args, **kwargs)
    importer = (globals or {}).get("__name__") or ""
    if name.partition(".")[0] == "transformers" and not importer.startswith("transformers"):
        builtins.__import__ = _import  # once
        import noisylib  # noqa: F401
    return module
builtins.__import__ = _hooked
'''


@pytest.fixture
def noisy_site(tmp_path: Path) -> Path:
    folder = tmp_path / "site"
    folder.mkdir()
    (folder / "noisylib.py").write_text(textwrap.dedent(NOISY_LIBRARY))
    (folder / "sitecustomize.py").write_text(textwrap.dedent(SITECUSTOMIZE))
    return folder


def _refused_train(tmp_path: Path, app_model_dir: Path, site: Path, offline: str | None, *extra: str):
    empty = tmp_path / "empty-data"
    empty.mkdir(exist_ok=True)
    config = tmp_path / "run.yaml"
    config.write_text(f"model: {app_model_dir}\ndata: {empty}\nmax_steps: 2\n")
    env = {key: value for key, value in os.environ.items() if key != "HF_HUB_OFFLINE"}
    env.update(DENSELORA_RUNS=str(tmp_path / "runs"), DENSELORA_CACHE=str(tmp_path / "cache"),
               PYTHONPATH=os.pathsep.join([str(site), str(REPO)]))
    if offline is not None:
        env["HF_HUB_OFFLINE"] = offline
    return subprocess.run([sys.executable, "-m", "denselora_app", "train", str(config), *extra], capture_output=True,
                          text=True, env=env, cwd=tmp_path, timeout=300)


@pytest.mark.parametrize("offline", [None, "0", "1"])
@pytest.mark.slow
def test_a_refused_launch_prints_one_error_line_whatever_the_libraries_say(tmp_path, app_model_dir, noisy_site,
                                                                           offline):
    result = _refused_train(tmp_path, app_model_dir, noisy_site, offline)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: Data: ") and "is a folder" in lines[0], result.stderr
    log = (tmp_path / "cache" / "logs" / "denselora.log").read_text()
    for noise in ("NOISY: imported", "NOISY: a warning at import", "NOISY: printed to stderr",
                  "NOISY: during a launch"):
        assert noise in log  # kept for whoever needs it, not lost
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


@pytest.mark.slow
def test_debug_shows_the_libraries_and_the_traceback(tmp_path, app_model_dir, noisy_site):
    result = _refused_train(tmp_path, app_model_dir, noisy_site, "1", "--debug")
    assert result.returncode == 2
    for shown in ("NOISY: imported", "NOISY: a warning at import", "NOISY: during a launch", "Traceback",
                  "error: Data: "):
        assert shown in result.stderr


def test_own_messages_reach_the_terminal_and_everything_else_the_log(tmp_path, capsys):
    before = logging.getLogger("preexisting.library")
    before.addHandler(logging.StreamHandler(sys.stderr))  # as a library imported before the command did
    before.propagate = False
    log_file = tmp_path / "studio.log"
    stderr_before, showwarning_before = sys.stderr, warnings.showwarning
    try:
        with Terminal(log_file=log_file) as term:
            logging.getLogger("denselora_app.something").info("the studio speaks")
            before.warning("a library imported earlier")
            late = logging.getLogger("late.library")
            late.addHandler(logging.StreamHandler())  # made while the command runs: sys.stderr is the log now
            late.propagate = False
            late.warning("a library imported later")
            logging.getLogger("plain.library").warning("a library without a handler")
            warnings.warn("a Python warning")
            print("a library's print", file=sys.stderr)
            print("the studio's own line", file=terminal.stderr())
            assert term.log_file == log_file
        err = capsys.readouterr().err
        assert "the studio speaks" in err and "the studio's own line" in err
        assert "library" not in err and "Python warning" not in err
        text = log_file.read_text()
        for message in ("the studio speaks", "a library imported earlier", "a library imported later",
                        "a library without a handler", "a Python warning", "a library's print"):
            assert message in text
        # Everything is as it was: the earlier library keeps its handler, stderr and warnings are back.
        assert len(before.handlers) == 1 and before.propagate is False
        assert sys.stderr is stderr_before and terminal.stderr() is sys.stderr
        assert warnings.showwarning is showwarning_before
    finally:
        before.handlers.clear()
        before.propagate = True
        logging.getLogger("late.library").handlers.clear()


def test_a_foreground_run_logs_into_its_train_log(tmp_path, capsys):
    with Terminal(log_file=tmp_path / "studio.log"):
        logging.getLogger("some.library").warning("before the run")
        terminal.log_to(tmp_path / "train.log")
        logging.getLogger("some.library").warning("during the run")
        print("a progress bar's line", file=sys.stderr)
    assert "before the run" in (tmp_path / "studio.log").read_text()
    run_log = (tmp_path / "train.log").read_text()
    assert "during the run" in run_log and "a progress bar's line" in run_log and "before the run" not in run_log
    assert capsys.readouterr().err == ""


def test_an_unwritable_cache_does_not_stop_a_command(tmp_path, capsys):
    blocked = tmp_path / "file-not-folder"
    blocked.write_text("")
    with Terminal(log_file=blocked / "logs" / "denselora.log") as term:
        logging.getLogger("denselora_app").info("still speaking")
        assert term.log_file != blocked / "logs" / "denselora.log" and term.log_file.exists()
    assert "still speaking" in capsys.readouterr().err
