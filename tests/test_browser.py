"""The app in a real browser (Playwright driving Debian's headless Chromium), end to end on a tiny model.

One journey, as a person would make it: open the app, point the model at a local folder, see a malformed upload
explained next to the upload, upload a dataset and read its preview and report, move the rank and watch the
parameter line change, start a run and watch its loss chart grow, restart the app while the worker trains and find
the run again, stop it, reload the page and find it stopped, then overlay it with a LoRA baseline in the Runs tab
and delete it. On the way, "Chat with this adapter" takes the stopped run to the Chat tab.
Screenshots go to the test's tmp folder (the README's come from scripts/screenshots.py, on the real model).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import APP_DATA_ROWS, AppProcess, launch_app, stop_workers
from playwright.sync_api import Page, expect, sync_playwright

from denselora_app.config import RunConfig

CHROMIUM = Path("/usr/bin/chromium")
FIRST_PAGE_SECONDS = 10.0
SLOW = 180_000  # ms: the machine is small and shared; loading a model or starting a worker takes a while

expect.set_options(timeout=SLOW)
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium (apt-get install chromium)")]


@pytest.fixture
def browser():
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        yield browser
        browser.close()


def textbox(page: Page, elem_id: str):
    return page.locator(f"#{elem_id} textarea, #{elem_id} input").first


def line_points(page: Page, elem_id: str) -> int:
    """Points drawn in a gr.LinePlot: its hover layer has one (invisible) symbol per data point."""
    return page.locator(f"#{elem_id} g.mark-symbol path").count()


def set_number(page: Page, elem_id: str, value: str) -> None:
    field = page.locator(f"#{elem_id} input[type=number]").first
    field.fill(value)
    field.press("Enter")


def shoot(page: Page, path: Path, at: str | None = None) -> None:
    """The whole page, or the window scrolled to the element ``at``, into ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if at:  # its section's heading just above it stays in the picture
        page.evaluate(f"document.querySelector('{at}').scrollIntoView({{block: 'start'}}); window.scrollBy(0, -70)")
    page.wait_for_timeout(500)  # let charts finish their transition
    page.screenshot(path=str(path), full_page=at is None)


def lora_baseline(app: AppProcess, model_dir: Path, data: str, tmp_path: Path) -> str:
    """Train LoRA with the CLI (`python -m denselora_app train`) into the app's runs folder; returns the run id."""
    config = tmp_path / "lora.yaml"
    RunConfig(model=str(model_dir), data=data, method="lora", r=8, max_steps=30, batch_size=2, grad_accum=1,
              cutoff_len=64, val_size=2, eval_steps=5, learning_rate=3e-3, warmup_steps=5,
              lr_scheduler="constant_with_warmup", device="cpu", run_name="lora-baseline").to_yaml(config)
    result = subprocess.run([sys.executable, "-m", "denselora_app", "train", str(config)], capture_output=True,
                            text=True, timeout=600, env={**os.environ, "DENSELORA_RUNS": str(app.runs)})
    assert result.returncode == 0, result.stderr[-3000:]
    return next(p.name for p in app.runs.glob("*-lora-baseline"))


# The Train tab at a laptop's window: what a user decides first, and Start, without scrolling; the rest in Advanced.
WINDOW = {"width": 1280, "height": 800}
ABOVE_THE_FOLD = ("cfg-model", "cfg-data", "cfg-method", "cfg-r", "cfg-learning_rate", "find-lr", "cfg-max_steps",
                  "cfg-batch_size", "start")
ADVANCED = ("cfg-init_scale", "cfg-shared_lr_scale", "cfg-dropout_placement", "cfg-activation", "cfg-lr_scheduler",
            "cfg-warmup_steps", "cfg-cutoff_len", "cfg-packing", "cfg-quantization", "cfg-dtype", "cfg-device",
            "cfg-save_steps", "cfg-seed", "cfg-target_modules")


def inside(box: dict, area: dict) -> bool:
    return (box["x"] >= area["x"] and box["y"] >= area["y"] and box["x"] + box["width"] <= area["x"] + area["width"]
            and box["y"] + box["height"] <= area["y"] + area["height"])


def overlap(a: dict, b: dict) -> bool:
    return (a["x"] < b["x"] + b["width"] and b["x"] < a["x"] + a["width"] and a["y"] < b["y"] + b["height"]
            and b["y"] < a["y"] + a["height"])


def test_the_train_tab_shows_its_first_choices_and_start_in_a_1280x800_window(browser, tmp_path):
    app = launch_app(tmp_path / "app")
    try:
        page = browser.new_page(viewport=WINDOW)
        page.set_default_timeout(SLOW)
        page.goto(app.url)
        # The opening settings counted and previewed (the default model's first use converts it): the page as a
        # newcomer first reads it.
        expect(page.locator("#data-report textarea")).to_have_value(re.compile("rows read"))
        expect(page.locator("#parameter-line")).to_contain_text("LoRA at this rank")
        page.wait_for_timeout(500)  # the histogram's transition
        page.screenshot(path=str(tmp_path / "train-tab-1280x800.png"))

        window = {"x": 0, "y": 0, **WINDOW}
        assert page.evaluate("window.scrollY") == 0
        bar = page.locator("#action-bar").bounding_box()
        assert inside(bar, window)
        for elem_id in ABOVE_THE_FOLD:
            box = page.locator(f"#{elem_id}").bounding_box()
            assert box and inside(box, window), f"#{elem_id} is not in the window: {box}"
            if elem_id != "start":  # in the window, and not under the action bar that Start is in
                assert box["y"] + box["height"] <= bar["y"], f"#{elem_id} is under the action bar: {box}, {bar}"

        # The upload's label has its own line, above the drop zone's icon.
        label = page.locator('#upload label[data-testid="block-label"]').bounding_box()
        icon = page.locator('#upload [data-testid="upload-icon"]').bounding_box()
        assert label and icon and icon["height"] > 0 and not overlap(label, icon), (label, icon)

        # Everything else waits in Advanced, closed, each field with its help text once opened.
        for elem_id in ADVANCED:
            expect(page.locator(f"#{elem_id}")).to_be_hidden()
        page.locator("#advanced button").first.click()
        for elem_id in ADVANCED:
            expect(page.locator(f"#{elem_id}")).to_be_visible()
        expect(page.locator("#cfg-init_scale")).to_contain_text("Kaiming-uniform")

        # Start stays in view while the form is scrolled, and the field scrolled to is not under it.
        page.locator("#cfg-seed input").first.focus()
        assert page.evaluate("window.scrollY") > 0
        assert inside(page.locator("#start").bounding_box(), window)
        seed = page.locator("#cfg-seed input").first.bounding_box()
        assert seed["y"] + seed["height"] <= page.locator("#action-bar").bounding_box()["y"]
    finally:
        app.stop()


def test_the_first_page_is_served_within_10_seconds_of_launch(tmp_path):
    app = launch_app(tmp_path / "app")
    app.stop()
    assert app.seconds_to_first_page < FIRST_PAGE_SECONDS, f"first page after {app.seconds_to_first_page:.1f} s"
    assert not app.runs.exists() or not any(app.runs.iterdir()), "starting the app creates no run"


def test_the_train_and_runs_tabs_end_to_end(browser, tmp_path, app_model_dir):
    good = tmp_path / "facts.jsonl"
    good.write_text("".join(json.dumps(row) + "\n" for row in APP_DATA_ROWS))
    broken = tmp_path / "broken.jsonl"
    broken.write_text("{this is not json\n[1, 2]\n")

    shots = tmp_path / "screenshots"  # for looking at a failure; not the README's
    app = launch_app(tmp_path / "app")
    try:
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(SLOW)
        page.goto(app.url)

        # Opens ready for a CPU-only first run: the embedded default model and the sample data.
        expect(textbox(page, "cfg-model")).to_have_value("embedded:SmolLM2-135M-Instruct")
        expect(textbox(page, "cfg-data")).to_have_value("sample:studio_facts")
        # Advanced settings open now: gradio mounts their fields on first open, and a value typed into a field in
        # the instant it mounts can be lost; a person never types that fast, a test does.
        page.locator("#advanced button").first.click()

        # The model: a local folder, checked.
        textbox(page, "cfg-model").fill(str(app_model_dir))
        page.locator("#check-model").click()
        expect(page.locator("#model-info")).to_contain_text("LlamaForCausalLM")
        expect(page.locator("#model-info")).to_contain_text("chat template: yes")

        # A malformed upload is explained right next to the upload, before any training.
        page.locator("#upload input[type=file]").set_input_files(str(broken))
        message = page.locator("#data-message")
        expect(message).to_contain_text("no usable rows")
        expect(message).to_contain_text("not valid JSON")
        shoot(page, shots / "data-error.png", at="#upload")

        # The data: preview rows, format, highlighted examples, length histogram and report.
        page.locator("#upload input[type=file]").set_input_files(str(good))
        expect(page.locator("#data-report textarea")).to_have_value(re.compile(r"8 rows read, 8 used"))
        expect(page.locator("#data-message")).to_be_hidden()
        expect(page.locator("#detected-format")).to_contain_text("messages")
        expect(page.locator("#data-rows")).to_contain_text("capital of the dog")
        expect(page.locator("#data-examples")).to_contain_text("the quick brown fox")
        expect(page.locator("#length-histogram g.mark-rect path").first).to_be_attached()
        expect(textbox(page, "cfg-data")).to_have_value(re.compile(r"/uploads/facts-[0-9a-f]{8}\.jsonl$"))
        stored_data = textbox(page, "cfg-data").input_value()

        # The rank moves the parameter line.
        line = page.locator("#parameter-line")
        expect(line).to_contain_text("LoRA at this rank")
        before = line.inner_text()
        set_number(page, "cfg-r", "8")
        expect(line).not_to_have_text(before)
        expect(line).to_contain_text("Trainable parameters")

        # Settings for a run that is still going when we look: many steps, small batches, validation every 5.
        set_number(page, "cfg-max_steps", "100000")
        set_number(page, "cfg-batch_size", "2")
        set_number(page, "cfg-cutoff_len", "64")
        set_number(page, "cfg-val_size", "2")
        set_number(page, "cfg-eval_steps", "5")
        set_number(page, "cfg-save_steps", "1000")
        for elem_id, value in (("cfg-max_steps", "100000"), ("cfg-eval_steps", "5"), ("cfg-save_steps", "1000")):
            expect(page.locator(f"#{elem_id} input[type=number]").first).to_have_value(value)
        shoot(page, shots / "train-tab.png")

        page.locator("#start").click()
        expect(page.locator("#start-message")).to_contain_text("Started run")
        run_id = page.locator("#start-message code").first.inner_text()
        started = RunConfig.from_yaml(app.runs / run_id / "config.yaml")
        assert (started.r, started.max_steps, started.eval_steps, started.save_steps) == (8, 100000, 5, 1000)
        expect(page.locator("#run-header")).to_contain_text("running")
        page.wait_for_function("() => document.querySelectorAll('#loss-plot g.mark-symbol path').length >= 4")
        expect(page.locator("#chat-with-run")).to_be_hidden()  # no adapter to chat with while it trains
        seen = line_points(page, "loss-plot")
        page.wait_for_function(
            f"() => document.querySelectorAll('#loss-plot g.mark-symbol path').length > {seen}")
        expect(page.locator("#run-progress")).to_contain_text(re.compile(r"step \d+/100000"))
        # Validation every 5 steps: its line joins the train loss once it has two points.
        page.wait_for_function("""() => (document.querySelector(
            '#loss-plot g.mark-line path[aria-label*="series: validation"]')?.getAttribute('d') || '').includes('L')""")
        expect(page.locator("#run-log textarea")).to_have_value(re.compile(r"step \d+/100000 \| loss \d"))
        shoot(page, shots / "live-run.png", at="#start")

        # Restart the app while the worker trains: the new app finds the run, with its history.
        app.stop()
        app = launch_app(tmp_path / "app")
        page.goto(app.url)
        expect(page.locator("#run-header")).to_contain_text(run_id)
        expect(page.locator("#run-header")).to_contain_text("running")
        page.wait_for_function("() => document.querySelectorAll('#loss-plot g.mark-symbol path').length >= 4")

        # Stop: graceful, the adapter is saved and the app says where.
        page.locator("#stop").click()
        expect(page.locator("#start-message")).to_contain_text("saves a checkpoint and its adapter")
        expect(page.locator("#run-header")).to_contain_text("stopped")
        expect(page.locator("#run-outcome")).to_contain_text("Your adapter is in")
        expect(page.locator("#run-outcome")).to_contain_text(str(app.runs / run_id / "adapter"))
        expect(page.locator("#chat-with-run")).to_be_visible()

        # Reload: the stopped run is still there.
        page.reload()
        expect(page.locator("#run-header")).to_contain_text(run_id)
        expect(page.locator("#run-header")).to_contain_text("stopped")
        page.wait_for_function("() => document.querySelectorAll('#loss-plot g.mark-symbol path').length >= 4")

        # "Chat with this adapter": the Chat tab opens with the run's adapter chosen, to be loaded on the first message.
        page.locator("#chat-with-run").click()
        expect(page.locator("#chat-adapter")).to_be_visible()
        expect(page.locator("#chat-adapter input").first).to_have_value(run_id)
        expect(page.locator("#chat-status")).to_contain_text(f"Selected {run_id}")
        expect(page.locator("#chat-status")).to_contain_text("first message")
        expect(page.locator("#start")).to_be_hidden()  # the Train tab is no longer shown

        # A LoRA baseline on the same settings, trained with the CLI as a user would, to compare with.
        baseline = lora_baseline(app, app_model_dir, stored_data, tmp_path)

        # The Runs tab: the table, one run opened, the two loss curves overlaid, then a run deleted with confirmation.
        page.locator("#tab-runs-button").click()
        table = page.locator("#runs-table")
        expect(table).to_contain_text(baseline)
        expect(table).to_contain_text("stopped")
        expect(table).to_contain_text("completed")
        table.get_by_role("gridcell", name=run_id).first.click()
        expect(page.locator("#run-details")).to_contain_text("Your adapter is in")
        for chosen in (run_id, baseline):
            page.locator("#compare-runs input").first.click()
            page.get_by_role("option", name=chosen).click()
        page.keyboard.press("Escape")
        expect(page.locator("#compare-plot")).to_contain_text("train · denselora r=8")
        expect(page.locator("#compare-plot")).to_contain_text("train · lora r=8")  # both runs in one chart
        page.wait_for_function("() => document.querySelectorAll('#compare-plot g.mark-symbol path').length >= 40")
        page.wait_for_function("() => document.querySelectorAll('#open-loss-plot g.mark-symbol path').length >= 4")
        shoot(page, shots / "runs-tab.png")

        page.locator("#delete-run").click()
        expect(page.locator("#delete-message")).to_contain_text("cannot be undone")
        page.locator("#confirm-delete").click()
        expect(page.locator("#delete-message")).to_contain_text("Deleted")
        expect(table).not_to_contain_text(run_id)
        assert not (app.runs / run_id).exists()
    finally:
        app.stop()
        stop_workers(app.runs)
