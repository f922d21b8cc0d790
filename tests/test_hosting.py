"""Where the studio runs (hosting.py): ZeroGPU, with chat and evaluation generating inside a faked ``spaces.GPU``
call sized to the request, and training refused; whether runs outlive a restart, decided from the mount table; the
Space's front matter (OAuth scopes and expiry) and the gradio pin."""

from __future__ import annotations

import functools
import importlib
import inspect
import pickle
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path

import gradio as gr
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.version import Version
from test_chat_ui import GREEDY, PROMPT, make_chat_run, save_readable_model

from denselora_app.config import RunConfig
from denselora_app.engine.launch import LaunchError, launch
from denselora_app.hub import hosting
from denselora_app.serving.chat import ChatEngine
from denselora_app.serving.evaluate import GENERATE_TOKENS, gpu_steps
from denselora_app.ui import chat_tab, evaluate_tab, train_tab

REPO = Path(__file__).parent.parent

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread


# ---- ZeroGPU, with a fake of the `spaces` package ------------------------------------------------------------------


@dataclass
class GpuCall:
    task: str
    args: tuple
    seconds: int


@dataclass
class FakeSpaces:
    """What the studio uses of ``spaces``: ``GPU(task, duration=callable)``. Like the real one, it asks ``duration``
    with the call's arguments, and passes arguments and each result (each yielded value of a generator) through
    pickle, as they cross to and from the GPU process; ``inside`` is True while a decorated call runs."""

    calls: list[GpuCall] = field(default_factory=list)
    inside: bool = False

    def module(self) -> types.ModuleType:
        module = types.ModuleType("spaces")
        module.GPU = self.GPU
        return module

    def GPU(self, task, *, duration):  # noqa: N802  (the real name)
        def begin(args, kwargs):
            self.calls.append(GpuCall(task.__name__, args, duration(*args, **kwargs)))
            self.inside = True
            return pickle.loads(pickle.dumps((args, kwargs)))

        if inspect.isgeneratorfunction(task):
            @functools.wraps(task)
            def generator(*args, **kwargs):
                args, kwargs = begin(args, kwargs)
                try:
                    for value in task(*args, **kwargs):
                        self.inside = False
                        yield pickle.loads(pickle.dumps(value))
                        self.inside = True
                finally:
                    self.inside = False
            return generator

        @functools.wraps(task)
        def regular(*args, **kwargs):
            args, kwargs = begin(args, kwargs)
            try:
                return pickle.loads(pickle.dumps(task(*args, **kwargs)))
            finally:
                self.inside = False
        return regular


def _reload_tabs() -> None:
    """The tabs wrap their GPU work when imported, as the app does before it launches."""
    importlib.reload(chat_tab)
    importlib.reload(evaluate_tab)


@pytest.fixture
def zerogpu(monkeypatch):
    fake = FakeSpaces()
    monkeypatch.setenv("SPACES_ZERO_GPU", "true")
    monkeypatch.setitem(sys.modules, "spaces", fake.module())
    _reload_tabs()
    yield fake
    monkeypatch.undo()
    _reload_tabs()


@pytest.fixture
def chat_run(tmp_path, monkeypatch) -> str:
    monkeypatch.setenv("DENSELORA_RUNS", str(tmp_path / "runs"))
    make_chat_run(tmp_path / "runs", save_readable_model(tmp_path / "model"))
    (adapter,) = (location for _, location in chat_tab.adapter_choices())
    return adapter


@pytest.mark.parametrize("value, zero", [("true", True), ("True", True), ("1", True), ("t", True), ("", False),
                                         ("false", False), ("0", False), ("yes", False)])
def test_zerogpu_is_read_as_the_spaces_package_reads_it(monkeypatch, value, zero):
    monkeypatch.setenv("SPACES_ZERO_GPU", value)
    assert hosting.on_zerogpu() is zero


def test_gpu_time_is_sized_to_the_work_with_a_floor_and_a_cap():
    assert hosting.gpu_seconds(0) == hosting.GPU_LOAD_SECONDS  # loading the model, whatever the request
    assert hosting.gpu_seconds(300) == hosting.GPU_LOAD_SECONDS + 300 // hosting.GPU_STEPS_PER_SECOND
    assert hosting.gpu_seconds(300) < hosting.gpu_seconds(3000) < hosting.GPU_MAX_SECONDS
    assert hosting.gpu_seconds(hosting.GPU_MAX_STEPS) == hosting.GPU_MAX_SECONDS == hosting.gpu_seconds(10**9)
    assert gpu_steps(3, None, mode="generate", limit=5) == 2 * 3 * 5 * GENERATE_TOKENS  # adapters and their bases
    assert gpu_steps(1, None, mode="loglik", limit=5) == 2 * 5
    assert gpu_steps(1, "no/such/file.jsonl") == 0  # the evaluation itself says what is wrong


def test_off_zerogpu_nothing_is_wrapped_and_spaces_is_never_imported(monkeypatch):
    monkeypatch.delenv("SPACES_ZERO_GPU", raising=False)
    task = lambda: None  # noqa: E731
    assert hosting.on_gpu(task, steps=lambda: 0) is task
    _reload_tabs()
    assert chat_tab._answer.__module__ == chat_tab.__name__ and inspect.isgeneratorfunction(chat_tab._answer)
    assert "spaces" not in sys.modules


def test_on_zerogpu_chat_and_evaluation_generate_inside_a_gpu_call_sized_to_the_request(zerogpu, chat_run,
                                                                                        monkeypatch):
    adapter = chat_run
    seen: list[tuple[str, bool]] = []
    # Loading the model, and every answer handed to the decoder (chat and evaluation): in the GPU call's process,
    # whose own decoder thread then decodes it (a forked process starts its own).
    for name in ("_load_base", "submit"):
        original = getattr(ChatEngine, name)

        def spy(self, *args, original=original, name=name, **kwargs):
            seen.append((name, zerogpu.inside))
            return original(self, *args, **kwargs)
        monkeypatch.setattr(ChatEngine, name, spy)

    updates = list(chat_tab.send(PROMPT, [], [], adapter, False, **GREEDY))
    assert "12 tokens" in updates[-1][3] and updates[-1][1][-1]["content"]
    assert [(c.task, c.seconds) for c in zerogpu.calls] == [("_answer", hosting.gpu_seconds(12))]
    pairs = list(chat_tab.send(PROMPT, [], [], adapter, True, **{**GREEDY, "max_new_tokens": 40}))
    assert pairs[-1][2][-1]["content"] and pairs[-1][1][-1]["content"]  # the base's answer and the adapter's
    assert zerogpu.calls[-1].seconds == hosting.gpu_seconds(2 * 40)  # two answers
    assert ("_load_base", True) in seen and {inside for name, inside in seen if name == "submit"} == {True}

    # Problems come back as messages: an exception would reach the page only as "ZeroGPU worker error".
    (update,) = list(chat_tab.send("hello", [], [], "no-such-run", False, **GREEDY))
    assert update[3].startswith("⚠️") and "no-such-run" in update[3]

    # The engine's settings travel with each call: a GPU process holds a copy of the engine made when it forked.
    chat_tab.set_base_precision("none", adapter)
    assert (zerogpu.calls[-1].task, zerogpu.calls[-1].args[1:], zerogpu.calls[-1].seconds) == \
        ("_load", ("none", False), hosting.gpu_seconds(0))

    seen.clear()
    message, results, details = evaluate_tab.run_evaluation([adapter], None, None, "generate", 2)
    assert "Evaluated 1 adapter" in message and len(results) == 2 and len(details) == 4
    assert zerogpu.calls[-1].task == "_evaluate"
    assert zerogpu.calls[-1].seconds == hosting.gpu_seconds(2 * 2 * GENERATE_TOKENS)
    assert seen and {inside for _, inside in seen} == {True}
    message, results, _ = evaluate_tab.run_evaluation([adapter], None, None, "generate", 0)
    assert "limit must be at least 1" in message and results is None

    calls = len(zerogpu.calls)
    monkeypatch.setattr(evaluate_tab, "GPU_MAX_STEPS", 2 * 2 * GENERATE_TOKENS - 1)
    message, results, _ = evaluate_tab.run_evaluation([adapter], None, None, "generate", 2)
    assert "more than one ZeroGPU call can do" in message and "Limit" in message and results is None
    assert len(zerogpu.calls) == calls  # refused before asking for a GPU


def test_on_zerogpu_stop_ends_only_the_callers_answer_by_closing_its_gpu_stream(zerogpu, chat_run):
    """No Event reaches the GPU process: Stop closes the caller's stream, which ends the GPU call there."""
    def session(name):
        return types.SimpleNamespace(session_hash=name)

    long = {**GREEDY, "max_new_tokens": 200}
    answer = chat_tab.send(PROMPT, [], [], chat_run, False, **long, request=session("alice"))
    next(answer), next(answer)  # the adapter is selected and the first words are out
    chat_tab.stop_chat(session("bob"))  # another visitor's Stop
    assert "tokens" in list(answer)[-1][3]  # alice's answer went on to its end
    answer = chat_tab.send(PROMPT, [], [], chat_run, False, **long, request=session("alice"))
    next(answer), next(answer)
    chat_tab.stop_chat(session("alice"))
    assert list(answer) == [(gr.skip(), gr.skip(), gr.skip(), "Stopped.")]  # closed at once
    assert not zerogpu.inside and "alice" not in chat_tab._stops


def test_on_zerogpu_training_is_refused_naming_the_two_ways_that_work(monkeypatch, tmp_path, app_model_dir,
                                                                     app_data_file):
    monkeypatch.setenv("DENSELORA_RUNS", str(tmp_path / "runs"))
    monkeypatch.setenv("SPACES_ZERO_GPU", "true")
    cfg = RunConfig(model=str(app_model_dir), data=str(app_data_file), r=4, max_steps=2, device="cpu")
    with pytest.raises(LaunchError) as refused:
        launch(cfg)
    message = str(refused.value)
    assert message.startswith("Hardware: this Space runs on ZeroGPU") and "no GPU" in message
    assert "Settings -> Hardware" in message and "train CONFIG --on-jobs FLAVOR" in message
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())  # nothing created
    shown, run_id, _ = train_tab.start_training(**cfg.to_dict())
    assert shown.startswith("⚠️ Not started. Hardware: this Space runs on ZeroGPU") and run_id == gr.skip()


# ---- runs across restarts ------------------------------------------------------------------------------------------

SPACE_MOUNTS = """\
overlay / overlay rw,relatime,lowerdir=/l,upperdir=/u,workdir=/w 0 0
proc /proc proc rw,nosuid,nodev,noexec,relatime 0 0
tmpfs /dev tmpfs rw,nosuid,size=65536k,mode=755 0 0
/dev/nvme0n1p1 /etc/hosts ext4 rw,relatime 0 0
tmpfs /tmp tmpfs rw,nosuid,nodev 0 0
hf-mount /data fuse.hf-mount rw,nosuid,nodev,relatime,user_id=1000,group_id=1000 0 0
/dev/sdb /mnt/my\\040disk ext4 rw,relatime 0 0
"""


@pytest.mark.parametrize("path, point, kept", [
    ("/home/user/app/runs", "/", False),  # the container's own layer: reset by a restart
    ("/tmp/runs", "/tmp", False),  # memory
    ("/data/runs", "/data", True),  # a Storage Bucket mounted as a volume
    ("/data", "/data", True),
    ("/database/runs", "/", False),  # a name that starts like a mount point is not under it
    ("/mnt/my disk/runs", "/mnt/my disk", True),  # the mount table escapes spaces
])
def test_runs_are_persistent_only_on_a_mounted_volume(path, point, kept):
    assert hosting.filesystem_of(Path(path), SPACE_MOUNTS)[0] == point
    assert hosting.persistent(Path(path), SPACE_MOUNTS) is kept


def test_the_real_mount_table_names_a_mount_holding_the_folder(tmp_path):
    point, fstype = hosting.filesystem_of(tmp_path / "not-yet")
    assert tmp_path.resolve().is_relative_to(point) and fstype


def test_a_space_without_a_volume_says_runs_are_lost_and_how_to_keep_them(monkeypatch, tmp_path):
    table = tmp_path / "mounts"
    table.write_text(SPACE_MOUNTS)
    monkeypatch.setattr(hosting, "MOUNT_TABLE", table)
    monkeypatch.setenv("DENSELORA_RUNS", "/home/user/app/runs")
    monkeypatch.delenv("SPACE_ID", raising=False)
    assert hosting.runs_persistent() and hosting.storage_notice() is None  # off a Space: the local disk

    monkeypatch.setenv("SPACE_ID", "someone/denselora-studio")
    notice = hosting.storage_notice()
    assert "Runs are lost when this Space restarts" in notice and "/home/user/app/runs" in notice
    assert "Storage Bucket" in notice and "DENSELORA_RUNS" in notice and "set_space_volumes" in notice

    # The page shows it (built outside Space mode: a Space's sign-in needs its OAuth app, see tests/test_app.py).
    from denselora_app.ui import app as ui_app

    monkeypatch.delenv("SPACE_ID")
    monkeypatch.setattr(hosting, "on_space", lambda: True)

    shown = [b.value for b in ui_app.build_app().blocks.values() if getattr(b, "elem_id", None) == "storage-notice"]
    assert len(shown) == 1 and "Runs are lost" in shown[0]

    monkeypatch.setenv("DENSELORA_RUNS", "/data/runs")
    assert hosting.runs_persistent() and hosting.storage_notice() is None
    assert not [b for b in ui_app.build_app().blocks.values() if getattr(b, "elem_id", None) == "storage-notice"]


# ---- the Space's configuration -------------------------------------------------------------------------------------


def test_the_space_front_matter_asks_for_what_the_studio_does():
    text = (REPO / "README.md").read_text(encoding="utf-8")
    assert text.startswith("---\n")
    meta = yaml.safe_load(text.split("---\n")[1])
    assert meta["sdk"] == "gradio" and meta["app_file"] == "app.py"
    assert meta["hf_oauth"] is True
    assert {"write-repos", "manage-repos", "jobs"} <= set(meta["hf_oauth_scopes"])  # publishing, and Jobs
    assert 480 < meta["hf_oauth_expiration_minutes"] <= 43200  # longer than the Hub's default; at most its maximum
    assert Version(meta["sdk_version"]) >= Version("6.6")


def test_gradio_is_pinned_past_the_oauth_open_redirect_advisory():
    (line,) = [line.split("#")[0].strip() for line in (REPO / "requirements.txt").read_text().splitlines()
               if line.startswith("gradio")]
    pin = Requirement(line)
    assert "oauth" in pin.extras
    assert not pin.specifier.contains("6.5.9") and pin.specifier.contains("6.6.0")
    assert pin.specifier.contains(gr.__version__)

