"""Stages dpo and kto from the browser on a tiny model: the Stage choice shows its settings, the preview shows the
pairs side by side, Start trains, and the live view draws the rewards and preference charts as the run goes."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from conftest import launch_app, stop_workers
from playwright.sync_api import expect
from test_browser import CHROMIUM, SLOW, browser, set_number, textbox  # noqa: F401  (browser is a fixture)

from denselora_app.config import RunConfig

expect.set_options(timeout=SLOW)
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium (apt-get install chromium)")]

PROMPTS = ["the quick brown fox", "what is the capital of a country?", "the lazy dog", "answer: yes or no",
           "a fox jumps", "the dog", "over the fox", "what is the dog?"]


def test_each_preference_stage_trains_from_the_train_tab_with_its_charts_live(browser, tmp_path: Path,  # noqa: F811
                                                                             app_model_dir):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": p, "chosen": "yes the dog", "rejected": "no fox"}) + "\n"
                             for p in PROMPTS))
    app = launch_app(tmp_path / "app")
    try:
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(SLOW)
        page.goto(app.url)
        page.locator("#advanced button").first.click()  # mounts the advanced fields before they are typed into
        textbox(page, "cfg-model").fill(str(app_model_dir))
        page.locator("#check-model").click()
        expect(page.locator("#model-info")).to_contain_text("LlamaForCausalLM")
        expect(page.locator("#cfg-beta")).to_be_hidden()  # sft: no preference settings

        page.locator("#cfg-stage label", has_text="Preference pairs (DPO)").click()
        expect(page.locator("#cfg-beta")).to_be_visible()
        expect(page.locator("#cfg-dpo_loss")).to_be_visible()
        expect(page.locator("#cfg-data_format")).to_be_hidden()  # dpo detects its pair layout
        expect(textbox(page, "cfg-data")).to_have_value("sample:ahoy_pairs")  # the stage's own sample
        expect(page.locator("#detected-format")).to_contain_text("58 pairs usable")
        textbox(page, "cfg-data").fill(str(pairs))
        textbox(page, "cfg-data").press("Enter")
        expect(page.locator("#detected-format")).to_contain_text("8 pairs usable")
        expect(page.locator("#data-rows")).to_contain_text("no fox<|im_end|>")  # chosen and rejected side by side
        set_number(page, "cfg-cutoff_len", "64")
        set_number(page, "cfg-batch_size", "4")
        set_number(page, "cfg-logging_steps", "1")

        previous = None
        for stage, steps in (("dpo", "12"), ("kto", "12")):
            if stage == "kto":
                page.locator("#cfg-stage label", has_text="Good and bad answers (KTO)").click()
                expect(page.locator("#cfg-dpo_loss")).to_be_hidden()
                expect(page.locator("#detected-format")).to_contain_text("16 completions usable")
            set_number(page, "cfg-max_steps", steps)
            expect(page.locator("#cfg-max_steps input[type=number]").first).to_have_value(steps)
            page.locator("#start").click()
            expect(page.locator("#start-message")).to_contain_text("Started run")
            if previous:
                expect(page.locator("#start-message code").first).not_to_have_text(previous)
            run_id = previous = page.locator("#start-message code").first.inner_text()
            assert RunConfig.from_yaml(app.runs / run_id / "config.yaml").stage == stage
            # The rewards of chosen and rejected answers and their margin, and the preference accuracy, drawn live.
            page.wait_for_function(
                "() => document.querySelectorAll('#rewards-plot g.mark-symbol path').length >= 6")
            if stage == "dpo":
                page.wait_for_function(
                    "() => document.querySelectorAll('#accuracy-plot g.mark-symbol path').length >= 2")
            expect(page.locator("#run-log textarea")).to_have_value(re.compile(rf"step \d+/{steps} \| loss \d"))
            expect(page.locator("#run-header")).to_contain_text("completed")
    finally:
        app.stop()
        stop_workers(app.runs)
