"""The Gradio app through its API (gradio_client), on a tiny model: the Train tab's flow from model check to a
stopped run, the Runs tab, presets and the CLI command; plus the app's small pure helpers."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import launch_app, stop_workers, wait_until
from gradio_client import Client, handle_file

import gradio as gr

from denselora_app import config as C
from denselora_app.config import ConfigError, RunConfig, field_help
from denselora_app.runs import create_run
from denselora_app.ui import build_app, charts, forms, loaders, train_form
from denselora_app.ui.data_preview import DataPreview
from denselora_app.ui.live_view import NO_RUN, LiveView, live_status

# ---- helpers without a server --------------------------------------------------------------------------------------


def test_loss_frame_is_long_form_with_train_and_validation_series():
    rows = [{"step": 1, "loss": 2.0, "learning_rate": 1e-3}, {"step": 2, "loss": 1.5, "grad_norm": float("nan")},
            {"step": 2, "eval_loss": 1.7}]
    frame = charts.loss_frame(rows)
    assert frame.to_dict("records") == [{"step": 1, "loss": 2.0, "series": "train"},
                                        {"step": 2, "loss": 1.5, "series": "train"},
                                        {"step": 2, "loss": 1.7, "series": "validation"}]
    assert charts.metric_frame(rows, "grad_norm").empty  # NaN is no point
    only_train = charts.loss_frame(rows[:2])  # the validation series is there before its first point
    assert list(only_train["series"]) == ["train", "train", "validation"] and only_train["loss"].isna().sum() == 1
    assert charts.shown(only_train, "loss") is only_train
    nothing = charts.loss_frame([])
    assert list(nothing.dtypes.astype(str)) == ["int64", "float64", "str"] and charts.shown(nothing, "loss") is None
    overlay = charts.overlay_frame({"a": rows, "b": rows[:1]})
    assert sorted(set(overlay["series"])) == ["train · a", "train · b", "validation · a", "validation · b"]


def test_length_histogram_spans_the_cutoff_and_counts_truncated_rows():
    frame = charts.length_histogram([3, 10, 64, 64, 40], cutoff=64, bins=4)
    fits = frame[frame["fit"] == charts.FITS]
    assert list(fits["tokens"]) == ["0-16", "17-33", "34-50", "51-64"]
    assert list(fits["rows"]) == [2, 0, 1, 0]
    assert frame[frame["fit"] == charts.TRUNCATED]["rows"].tolist() == [2]


def test_cli_command_reproduces_the_form(tmp_path, monkeypatch):
    monkeypatch.setenv("DENSELORA_PRESETS", str(tmp_path))
    base = RunConfig(max_steps=60, run_name="quick")
    base.to_yaml(tmp_path / "quick.yaml")
    cfg = RunConfig.from_dict({**base.to_dict(), "r": 8, "target_modules": ["q_proj", "v_proj"],
                               "learning_rate": 1e-3, "model": "/tmp/my model", "run_name": ""})
    text = forms.cli_command(cfg, "quick.yaml")
    assert "python -m denselora_app train" in text and "quick.yaml" in text
    sets = [line.split("--set ", 1)[1].rstrip(" \\") for line in text.splitlines() if "--set" in line]
    assignments = [shlex.split(s)[0] for s in sets]
    assert sorted(a.split("=")[0] for a in assignments) == ["learning_rate", "model", "r", "run_name",
                                                            "target_modules"]
    assert base.with_overrides(assignments) == cfg  # the command trains exactly what the form shows
    full = forms.cli_command(cfg, None)
    assert RunConfig.from_dict(yaml.safe_load(full.split("```yaml\n")[1].split("```")[0])) == cfg


def test_presets_are_listed_loaded_and_saved_under_safe_names(tmp_path, monkeypatch):
    monkeypatch.setenv("DENSELORA_PRESETS", str(tmp_path))
    path = forms.save_preset(RunConfig(r=4), "../../My preset!")
    assert path == tmp_path / "My-preset.yaml" and "My-preset.yaml" in forms.list_presets()  # beside the shipped
    assert forms.load_preset("My-preset.yaml").r == 4
    with pytest.raises(ConfigError, match="No preset"):
        forms.load_preset("../My-preset.yaml")
    with pytest.raises(ConfigError, match="name"):
        forms.save_preset(RunConfig(), "  ")


def test_uploads_are_stored_once_under_a_safe_name(tmp_path, monkeypatch):
    monkeypatch.setenv("DENSELORA_RUNS", str(tmp_path / "runs"))
    upload = tmp_path / "gradio-tmp" / "..my data (1).JSONL"
    upload.parent.mkdir()
    upload.write_text('{"text": "hello"}\n')
    stored = loaders.store_upload(str(upload))
    assert stored.parent == tmp_path / "runs" / "uploads"
    assert stored.name.startswith("my-data-1-") and stored.suffix == ".jsonl"
    assert loaders.store_upload(str(upload)) == stored
    bad = tmp_path / "notes.exe"
    bad.write_text("x")
    from denselora_app.engine.sources import DataError

    with pytest.raises(DataError, match="unsupported file type"):
        loaders.store_upload(str(bad))


# ---- the Train tab as built (no server) ----------------------------------------------------------------------------

# What a user decides first, in that order, outside the Advanced accordion; every other RunConfig field is inside it.
ESSENTIALS = ("model", "data", "method", "r", "learning_rate", "max_steps", "num_epochs", "batch_size")
# The format is chosen beside the data preview, and so are the stage and its settings (the stage picks the layouts).
OUTSIDE_ADVANCED = {*ESSENTIALS, "data_format", "stage", "beta", "dpo_loss", "init_adapter"}


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> gr.Blocks:
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setenv("DENSELORA_RUNS", str(tmp_path_factory.mktemp("built-app") / "runs"))
    try:
        yield build_app()
    finally:
        monkeypatch.undo()


def tree_order(root: gr.Blocks) -> list[tuple[gr.blocks.Block, list[gr.blocks.Block]]]:
    """Every block under ``root`` in page order, each with its ancestors (innermost first)."""
    found: list[tuple[gr.blocks.Block, list[gr.blocks.Block]]] = []

    def walk(block: gr.blocks.Block, ancestors: list[gr.blocks.Block]) -> None:
        found.append((block, ancestors))
        for child in getattr(block, "children", []):
            walk(child, [block, *ancestors])

    walk(root, [])
    return found


def api_outputs(demo: gr.Blocks, api_name: str) -> list[gr.blocks.Block]:
    return next(fn for fn in demo.fns.values() if fn.api_name == api_name).outputs


def test_the_train_tab_asks_in_the_order_a_user_decides_and_keeps_the_rest_in_advanced(demo):
    blocks = tree_order(demo)
    order = [block.elem_id for block, _ in blocks if block.elem_id]
    wanted = [f"cfg-{name}" for name in ESSENTIALS[:5]] + ["find-lr"] + [f"cfg-{n}" for n in ESSENTIALS[5:]] + [
        "advanced", "start", "run-header"]
    assert [elem_id for elem_id in order if elem_id in wanted] == wanted
    (advanced, _), = [(b, a) for b, a in blocks if b.elem_id == "advanced"]
    assert isinstance(advanced, gr.Accordion) and advanced.open is False
    inside = {block.elem_id for block, ancestors in blocks if advanced in ancestors and block.elem_id}
    assert inside == {f"cfg-{name}" for name in forms.FIELDS if name not in OUTSIDE_ADVANCED}
    for block, ancestors in blocks:
        if block.elem_id in inside:  # each advanced field says what it does, in the RunConfig's own words
            assert block.info.startswith(field_help(block.elem_id.removeprefix("cfg-"))), block.elem_id


def test_the_live_view_and_the_preview_are_named_outputs(demo):
    live = dict(zip(LiveView._fields, api_outputs(demo, "status"), strict=True))
    assert {field: getattr(live[field], "elem_id", None) for field in LiveView._fields} == {
        "header": "run-header", "progress": "run-progress", "run_box": None, "loss_plot": "loss-plot",
        "lr_plot": "lr-plot", "grad_plot": "grad-plot", "speed_plot": "speed-plot", "outcome": "run-outcome",
        "log": "run-log", "timer": None, "trials_plot": "trials-plot", "chosen_row": None, "chosen_plot": "chosen-plot",
        "preference_row": None, "rewards_plot": "rewards-plot", "accuracy_plot": "accuracy-plot"}
    assert isinstance(live["run_box"], gr.Column) and isinstance(live["timer"], gr.Timer)
    assert isinstance(live["chosen_row"], gr.Row)
    nothing = live_status(None)
    assert isinstance(nothing, LiveView) and nothing.header == NO_RUN and nothing.timer.active is False

    shown = {"message": "data-message", "detected": "detected-format", "box": None, "rows": "data-rows",
             "examples": "data-examples", "histogram": "length-histogram", "report": "data-report"}
    for api_name, before in (("preview_data", 0), ("upload_data", 2), ("load_preset", len(forms.FIELDS) + 1)):
        outputs = api_outputs(demo, api_name)
        assert len(outputs) == before + len(DataPreview._fields), api_name
        preview = dict(zip(DataPreview._fields, outputs[before:], strict=True))
        assert {field: getattr(preview[field], "elem_id", None) for field in DataPreview._fields} == shown
        assert isinstance(preview["box"], gr.Column)
    assert [c.elem_id for c in api_outputs(demo, "load_preset")[:len(forms.FIELDS)]] == [
        f"cfg-{name}" for name in forms.FIELDS]


def test_choices_are_label_value_pairs_and_targets_are_the_forms_until_a_model_is_checked(demo):
    components = {block.elem_id: block for block, _ in tree_order(demo) if block.elem_id}
    assert [value for _, value in train_form.QUANTIZATION_CHOICES] == list(C.QUANTIZATIONS)
    assert components["cfg-quantization"].choices == train_form.QUANTIZATION_CHOICES
    assert [value for _, value in train_form.METHOD_CHOICES] == list(C.METHODS)
    opening, _ = forms.initial_config()
    assert [value for _, value in components["cfg-target_modules"].choices] == opening.target_modules
    # A preset's targets join the offered ones (the model's, once checked), each once.
    assert train_form.merge_targets(["q_proj", "k_proj"], ["v_proj", "q_proj"]) == ["q_proj", "k_proj", "v_proj"]


@pytest.mark.slow
def test_building_the_app_imports_no_model_code(tmp_path):
    """The first page must be served within seconds: torch, transformers and datasets load only when needed."""
    code = ("import sys; from denselora_app.ui import build_app; build_app(); "
            "print(sorted(m for m in ('torch', 'transformers', 'datasets', 'peft') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "DENSELORA_RUNS": str(tmp_path / "runs")})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"


# ---- the API of a running app --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    server = launch_app(tmp_path_factory.mktemp("app-api"))
    yield server
    server.stop()
    stop_workers(server.runs)


@pytest.fixture(scope="module")
def client(app):
    return Client(app.url, verbose=False)


def plot_points(plot: dict | None) -> list[list]:
    """The points a plot output draws (rows without a missing value), whether it came as a value or an update."""
    if isinstance(plot, dict) and plot.get("__type__") == "update":
        plot = plot.get("value")
    return [row for row in (plot or {}).get("data") or [] if None not in row]


def tiny_settings(model_dir: Path, **overrides) -> dict:
    """Form values that train the tiny model on the CPU, one logged step at a time, until stopped."""
    values = dict(model=str(model_dir), r=4, alpha=8, dropout=0.0, learning_rate=1e-2, max_steps=100000,
                  batch_size=2, grad_accum=1, warmup_steps=0, lr_scheduler="constant", cutoff_len=64,
                  save_steps=1000, logging_steps=1, device="cpu", run_name="api-test",
                  target_modules=["q_proj", "v_proj"])
    values.update(overrides)
    return values


def test_model_check_parameter_line_and_data_preview(client, app, app_model_dir, tmp_path):
    info, targets = client.predict(model=str(app_model_dir), api_name="/check_model")
    assert "LlamaForCausalLM" in info and "chat template: yes" in info
    assert "q_proj" in [c[0] if isinstance(c, list) else c for c in targets["choices"]]
    missing, _ = client.predict(model=str(tmp_path / "nowhere"), api_name="/check_model")
    assert missing.startswith("⚠️") and "No such file or folder" in missing and "Traceback" not in missing

    lines = {r: client.predict(**tiny_settings(app_model_dir, r=r), api_name="/parameter_line")[0] for r in (4, 8)}
    assert lines[4].startswith("Trainable parameters:") and "LoRA at this rank" in lines[4]
    assert lines[4] != lines[8]
    _, memory, comparison = client.predict(**tiny_settings(app_model_dir), api_name="/parameter_line")
    assert memory.startswith("Estimated training memory")
    # Next to Method: both methods at this rank, their planned memory, and where the measurements are described.
    assert "**DenseLoRA r4**" in comparison and "**LoRA r4**" in comparison and comparison.count("to train") == 2
    assert "docs/benchmarks.md" in comparison
    bad_target = client.predict(**tiny_settings(app_model_dir, target_modules=[]), api_name="/parameter_line")[0]
    assert bad_target.startswith("⚠️") and "target_modules" in bad_target

    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": "what is a fox?"},
                                                     {"role": "assistant", "content": "the quick brown fox"}]})
                            + "\n" for _ in range(6)) + "{broken\n")
    _, stored, message, detected, rows, examples, histogram, report = client.predict(  # (layouts are skipped)
        handle_file(str(data)), model=str(app_model_dir), cutoff_len=64, api_name="/upload_data")
    assert Path(stored).parent == app.runs / "uploads"
    assert "messages" in detected and len(rows["data"]) == 5
    assert any(piece["class_or_confidence"] == "trained" for piece in examples)
    assert sum(row[1] for row in plot_points(histogram)) == 6
    assert "6 used" in report and "bad JSON: 1" in report
    assert "1 of 7 rows will be dropped" in message["value"] and "line 7" in message["value"]

    broken = tmp_path / "broken.jsonl"
    broken.write_text("{not json\n")
    _, _, error, *_ = client.predict(handle_file(str(broken)), model=str(app_model_dir), api_name="/upload_data")
    assert error["visible"] and "no usable rows" in error["value"] and "not valid JSON" in error["value"]

    forced = client.predict(model=str(app_model_dir), data=stored, data_format="alpaca", api_name="/preview_data")
    assert forced[0]["visible"] and "instruction" in forced[0]["value"]


@pytest.fixture
def workers_stopped_after(app):
    """A test failing halfway must not leave its worker training into the next test, which would find that run."""
    yield
    stop_workers(app.runs)


@pytest.mark.slow
def test_start_watch_refuse_stop_and_the_runs_tab(client, app, app_model_dir, app_data_file, workers_stopped_after):
    refused, _ = client.predict(**tiny_settings(app_model_dir, data=str(app_data_file), batch_size=0),
                                api_name="/start")
    assert refused.startswith("⚠️ Not started") and "batch_size must be at least 1" in refused
    no_data, _ = client.predict(**tiny_settings(app_model_dir, data=str(app_data_file), val_size=50),
                                api_name="/start")
    assert no_data.startswith("⚠️ Not started. Data:") and "val_size" in no_data
    assert not list(app.runs.glob("*/config.yaml")), "a refused start creates no run"

    message, _ = client.predict(**tiny_settings(app_model_dir, data=str(app_data_file), val_size=2),
                                    api_name="/start")
    assert message.startswith("Started run"), message
    run_id = message.split("`")[1]

    def status() -> tuple:
        return client.predict(api_name="/status")

    first = wait_until(lambda: (s := status()) and len(plot_points(s[2])) >= 3 and s, timeout=240,
                       what="three logged steps")
    assert "state: **running**" in first[0] and "step" in first[1]
    later = wait_until(lambda: (s := status()) and len(plot_points(s[2])) > len(plot_points(first[2])) and s,
                       timeout=120, what="the loss chart to gain points")
    assert {row[2] for row in plot_points(later[2])} == {"train"}
    assert plot_points(later[3]) and plot_points(later[4]) and plot_points(later[5])  # lr, grad norm, tokens/s
    assert re.search(r"step \d+/\d+ \| loss \d", later[7]), later[7][-2000:]  # the log tail, readable

    second, _ = client.predict(**tiny_settings(app_model_dir, data=str(app_data_file)), api_name="/start")
    assert second.startswith("⚠️ Not started") and f"cpu is in use by run {run_id}" in second
    assert [p.parent.name for p in app.runs.glob("*/config.yaml")] == [run_id], "the refused run is removed"
    still_training = client.predict(run_id, api_name="/delete_run")
    assert "is still running: stop it first" in still_training

    assert "saves a checkpoint and its adapter after the current step" in client.predict(api_name="/stop")
    final = wait_until(lambda: (s := status()) and "state: **stopped**" in s[0] and s, timeout=180,
                       what="the stopped state")
    assert "Your adapter is in" in final[6] and str(app.runs / run_id / "adapter") in final[6]
    assert (app.runs / run_id / "adapter" / "adapter_model.safetensors").exists()
    assert "not training" in client.predict(api_name="/stop")

    reloaded = Client(app.url, verbose=False)  # a new session, as a reloaded page is
    reloaded.predict(api_name="/restore_run")
    assert run_id in reloaded.predict(api_name="/status")[0]
    table, _, _ = client.predict(api_name="/list_runs")
    assert table["data"][0][:5] == [run_id, "stopped", "sft", "denselora", 4]
    details, loss, _, config_yaml, report = client.predict(run_id, api_name="/open_run")
    assert run_id in details and "Your adapter is in" in details and plot_points(loss)
    assert RunConfig.from_dict(yaml.safe_load(config_yaml)).r == 4 and "rows_used: 8" in report
    overlay = client.predict([run_id], api_name="/compare_runs")
    assert {row[2] for row in plot_points(overlay)} == {f"train · denselora r=4 · {run_id[9:]}"}

    assert "Deleted" in client.predict(run_id, api_name="/delete_run")
    assert not (app.runs / run_id).exists()
    assert f"{run_id!r} is not a run: there is no run of that id" in client.predict(run_id, api_name="/delete_run")


@pytest.mark.slow
def test_presets_and_the_command(client, app, app_model_dir):
    values = client.predict("quickstart-cpu.yaml", [], api_name="/load_preset")
    assert "Loaded preset `quickstart-cpu.yaml`." in values
    assert "sample:studio_facts" in values and "studio_facts.jsonl (messages): 24 rows read" in values[-1]
    command = client.predict("quickstart-cpu.yaml", r=8, api_name="/show_command")
    assert "presets/quickstart-cpu.yaml" in command or "quickstart-cpu.yaml" in command
    assert "--set r=8" in command
    message, _ = client.predict("my tiny run", **tiny_settings(app_model_dir), api_name="/save_preset")
    assert "my-tiny-run.yaml" in message
    saved = RunConfig.from_yaml(app.presets / "my-tiny-run.yaml")
    assert saved.model == str(app_model_dir) and saved.r == 4
    assert "--set" not in client.predict("my-tiny-run.yaml", **tiny_settings(app_model_dir),
                                         api_name="/show_command")


@pytest.mark.slow
def test_a_failed_run_shows_its_reason_and_fix(client, app, app_model_dir, app_data_file):

    run = create_run(RunConfig(model=str(app_model_dir), data=str(app_data_file), run_name="crashed"), root=app.runs)
    run.update_status(state="running", pid=2**22 + 7, step=3, max_steps=10)  # a worker that died without a word
    fresh = Client(app.url, verbose=False)  # a page loaded afterwards
    fresh.predict(api_name="/restore_run")
    status = fresh.predict(api_name="/status")
    header, outcome = status[0], status[6]
    assert run.id in header and "failed" in header
    assert "Training failed** (killed)" in outcome and "**Fix:** Resume from the last checkpoint" in outcome
    assert "Training failed" in client.predict(run.id, api_name="/open_run")[0]
    assert "Deleted" in client.predict(run.id, api_name="/delete_run")
