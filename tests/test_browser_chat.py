"""The Chat tab in a real browser (Playwright driving Debian's headless Chromium), on a tiny model: pick a run's
adapter, turn on the comparison with the base model, send a message and watch both answers stream in; then the
same conversation through the API, as gradio_client drives it. The screenshot goes to the test's tmp folder (the
README's comes from scripts/screenshots.py, on the real model).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from conftest import launch_app
from gradio_client import Client
from playwright.sync_api import expect, sync_playwright
from test_chat_ui import PROMPT, make_chat_run, save_readable_model

CHROMIUM = Path("/usr/bin/chromium")
SLOW = 120_000  # ms: the machine is small and shared; the first load imports torch and loads the model
ANSWER = re.compile(r"\w{3,}")  # some streamed text (the tiny model's words), not an empty bubble

expect.set_options(timeout=SLOW)
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium (apt-get install chromium)")]


def test_chat_compares_an_adapter_with_its_base_in_the_browser(tmp_path):
    workdir = tmp_path / "app"
    run_id = make_chat_run(workdir / "runs", save_readable_model(tmp_path / "model"))
    app = launch_app(workdir)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=str(CHROMIUM), args=[
                "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"])
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(SLOW)
            page.goto(app.url)

            # Opening the tab lists the runs' adapters, with the newest run's chosen but not loaded yet; picking
            # one loads it and says what it is.
            page.locator("#tab-chat-button").click()
            expect(page.locator("#chat-adapter input").first).to_have_value(run_id)
            expect(page.locator("#chat-status")).to_contain_text(f"Selected {run_id}")
            page.locator("#chat-adapter input").first.click()
            page.get_by_role("option", name=run_id).click()
            status = page.locator("#chat-status")
            expect(status).to_contain_text(run_id)
            expect(status).to_contain_text("trainable")
            expect(status).to_contain_text("float32 on cpu")

            for setting, value in (("chat-max-new-tokens", "24"), ("chat-temperature", "0")):  # greedy: words
                field = page.locator(f"#{setting} input[type=number]").first
                field.fill(value)
                field.press("Enter")
            page.locator("#chat-compare input[type=checkbox]").check()
            expect(page.locator("#chat-base")).to_be_visible()

            page.locator("#chat-message textarea").fill(PROMPT)
            page.locator("#chat-send").click()
            base_answer = page.locator('#chat-base [data-testid="bot"]').last
            adapter_answer = page.locator('#chat-adapter-reply [data-testid="bot"]').last
            expect(adapter_answer).to_have_text(ANSWER)
            expect(base_answer).to_have_text(ANSWER)
            expect(status).to_contain_text("Last answer: 24 tokens")
            for column in ("#chat-base", "#chat-adapter-reply"):
                expect(page.locator(f'{column} [data-testid="user"]').last).to_have_text(PROMPT)
            assert base_answer.inner_text().strip() != adapter_answer.inner_text().strip()

            page.locator("#tab-chat-button").scroll_into_view_if_needed()
            page.screenshot(path=str(tmp_path / "chat-compare.png"))  # for looking at a failure
            browser.close()

        client = Client(app.url, verbose=False)
        adapter = str(workdir / "runs" / run_id / "adapter")
        _, chat, base_chat, status = client.predict(PROMPT, [], [], adapter, True, "", 0.0, 1.0, 8, 0,
                                                    api_name="/chat")
        assert [m["role"] for m in chat] == [m["role"] for m in base_chat] == ["user", "assistant"]
        assert chat[1]["content"][0]["text"] and base_chat[1]["content"][0]["text"]
        assert "Last answer: 8 tokens" in status
    finally:
        app.stop()
