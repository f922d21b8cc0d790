"""Regenerate the README's screenshots (docs/screenshots/*.png) from the real embedded model.

    python scripts/screenshots.py                             # trains into a temporary runs folder (~10 min, CPU)
    python scripts/screenshots.py --runs /tmp/screenshot-runs  # trains there what is missing; reuses it next time

It trains the CPU quickstart (presets/quickstart-cpu.yaml, the embedded SmolLM2-135M-Instruct) and, before it, the
same settings with LoRA as the baseline the Runs tab compares with; then starts the app on those runs (as `make run`
does, offline) and drives it in headless Chromium with Playwright:

    train-tab.png     the Train tab on its opening settings, with the data preview
    live-run.png      the live view of the finished quickstart: loss chart, outcome, "Chat with this adapter"
    chat-compare.png  that button's Chat tab: compare with base on, temperature 0, a sample-facts question that the
                      base model gets wrong and the adapter right (checked, not assumed: it fails if none is)
    data-error.png    a malformed upload explained next to the upload
    runs-tab.png      the Runs tab with the quickstart opened and overlaid with the LoRA baseline

Needs Debian's chromium (/usr/bin/chromium) and the test requirements (playwright, gradio_client).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
PRESET = REPO / "presets" / "quickstart-cpu.yaml"
PROBES = REPO / "denselora_app" / "samples" / "studio_facts_probes.jsonl"
CHROMIUM = "/usr/bin/chromium"
QUICKSTART, BASELINE = "quickstart", "quickstart-lora"
SLOW = 300_000  # ms: the first model load in the app, on a small machine
MAX_NEW_TOKENS = 48  # enough for a one-sentence answer; keeps the base model's column short


def fail(message: str) -> None:
    raise SystemExit(f"screenshots.py: {message}")


# ---- the runs ------------------------------------------------------------------------------------------------------


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def completed_runs(runs: Path) -> list[tuple[float, str, str]]:
    """(created_at, run name, run id) of the completed runs, oldest first. Read from the files, as anyone can."""
    import yaml

    found = []
    for folder in runs.glob("*/config.yaml"):
        status = read_json(folder.parent / "status.json")
        if status.get("state") == "completed" and (folder.parent / "adapter" / "adapter_config.json").is_file():
            name = (yaml.safe_load(folder.read_text()) or {}).get("run_name")
            found.append((float(status.get("created_at") or 0), name, folder.parent.name))
    return sorted(found)


def train(runs: Path, name: str, *overrides: str) -> None:
    """`python -m denselora_app train presets/quickstart-cpu.yaml [--set ...]` into ``runs``, its output shown."""
    command = [sys.executable, "-m", "denselora_app", "train", str(PRESET), "--set", f"run_name={name}", *overrides]
    print(f"Training {name} into {runs} (a few minutes on a CPU): {' '.join(command[1:])}", flush=True)
    result = subprocess.run(command, cwd=REPO, env={**os.environ, "DENSELORA_RUNS": str(runs), "HF_HUB_OFFLINE": "1"})
    if result.returncode != 0:
        fail(f"training {name} failed (exit {result.returncode}); see its train.log under {runs}")


def prepare_runs(runs: Path) -> str:
    """Train what ``runs`` lacks (the LoRA baseline first, so that the quickstart is the newest run, the one the
    Train tab's live view shows); returns the quickstart's run id."""
    names = {name for _, name, _ in completed_runs(runs)}
    if BASELINE not in names:
        if QUICKSTART in names:
            fail(f"{runs} has a quickstart run but no LoRA baseline: a baseline trained now would be the newest run, "
                 "and the Train tab would show it. Use an empty (or new) --runs folder.")
        train(runs, BASELINE, "--set", "method=lora")
    if QUICKSTART not in names:
        train(runs, QUICKSTART)
    done = completed_runs(runs)
    if done[-1][1] != QUICKSTART:
        fail(f"the newest completed run in {runs} is {done[-1][2]}, not the quickstart; use a new --runs folder.")
    return done[-1][2]


# ---- the app -------------------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_app(runs: Path, log_path: Path, timeout: float = 180.0) -> tuple[subprocess.Popen, str]:
    """`python app.py` on a free port, offline, on ``runs``; returns the process and its URL once it serves."""
    port = free_port()
    env = {**os.environ, "GRADIO_SERVER_PORT": str(port), "DENSELORA_RUNS": str(runs),
           "DENSELORA_PRESETS": str(REPO / "presets"), "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1",
           "PYTHONUNBUFFERED": "1"}
    url = f"http://127.0.0.1:{port}/"
    with open(log_path, "ab") as log:
        process = subprocess.Popen([sys.executable, "app.py"], cwd=REPO, env=env, stdout=log,
                                   stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            fail(f"app.py exited with {process.returncode}:\n{log_path.read_text(errors='replace')[-4000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return process, url
        except OSError:
            time.sleep(0.2)
    process.kill()
    fail(f"app.py did not serve {url} within {timeout:.0f} s:\n{log_path.read_text(errors='replace')[-4000:]}")
    raise AssertionError  # unreachable


def stop_app(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


# ---- the question for the chat picture -----------------------------------------------------------------------------


def message_text(message: dict[str, Any]) -> str:
    """A chat message's text, whether its content is a string or a list of parts."""
    content = message.get("content")
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content or [] if isinstance(part, dict))


def pick_probe(url: str, adapter: str) -> tuple[dict[str, str], str, str]:
    """The first sample-facts probe whose expected answer the adapter gives and the base model does not, both
    greedy, asked through the app's own chat endpoint; with the two answers."""
    from gradio_client import Client

    client = Client(url, verbose=False)
    probes = [json.loads(line) for line in PROBES.read_text(encoding="utf-8").splitlines() if line.strip()]
    tried = []
    for probe in probes:
        _, chat, base_chat, status = client.predict(probe["question"], [], [], adapter, True, "", 0.0, 1.0,
                                                    MAX_NEW_TOKENS, 0, api_name="/chat")
        if "⚠️" in status:
            fail(f"the chat endpoint refused: {status}")
        answer, base_answer = message_text(chat[-1]), message_text(base_chat[-1])
        expected = probe["expected"].lower()
        print(f"  {probe['question']!r}: adapter {answer!r}, base {base_answer!r}", flush=True)
        if expected in answer.lower() and expected not in base_answer.lower():
            return probe, answer, base_answer
        tried.append(f"- {probe['question']} (expected {probe['expected']!r}): adapter {answer!r}, base "
                     f"{base_answer!r}")
    fail("no probe is answered right by the adapter and wrong by the base model:\n" + "\n".join(tried))
    raise AssertionError  # unreachable


# ---- the pictures --------------------------------------------------------------------------------------------------


def box(page: Any, selector: str) -> dict[str, float]:
    """The element's box in page coordinates (Playwright's bounding_box is relative to the viewport)."""
    return page.evaluate(
        """(selector) => { const r = document.querySelector(selector).getBoundingClientRect();
                          return {x: r.x + window.scrollX, y: r.y + window.scrollY, width: r.width,
                                  height: r.height}; }""", selector)


def shoot_between(page: Any, path: Path, top: str | None, *bottoms: str, margin: float = 16.0) -> None:
    """The full page width, from the top of element ``top`` (None: of the page) to the lowest bottom of the
    elements ``bottoms``."""
    page.wait_for_timeout(800)  # let charts finish their transitions
    y = max(0.0, box(page, top)["y"] - margin) if top else 0.0
    end = max(b["y"] + b["height"] for b in (box(page, selector) for selector in bottoms)) + margin
    width = page.evaluate("document.documentElement.scrollWidth")
    page.screenshot(path=str(path), full_page=True, clip={"x": 0, "y": y, "width": width, "height": end - y})
    print(f"Wrote {path}", flush=True)


def shoot_view(page: Any, path: Path, at: str, above: int = 70) -> None:
    """The window, scrolled so that element ``at`` is at its top (with ``above`` pixels of what precedes it)."""
    page.evaluate(f"document.querySelector('{at}').scrollIntoView({{block: 'start'}}); window.scrollBy(0, -{above})")
    page.wait_for_timeout(800)
    page.screenshot(path=str(path))
    print(f"Wrote {path}", flush=True)


def take_screenshots(url: str, runs: Path, quickstart: str, baseline: str, out: Path, workdir: Path) -> None:
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=SLOW)
    adapter = str(runs / quickstart / "adapter")
    print("Choosing the chat question (the base model and the adapter answer each probe)...", flush=True)
    probe, answer, base_answer = pick_probe(url, adapter)
    print(f"Chat question: {probe['question']!r} (expected {probe['expected']!r})", flush=True)
    broken = workdir / "broken.jsonl"
    broken.write_text("{this is not json\n[1, 2]\n")

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(SLOW)
        page.goto(url)

        # The Train tab as it opens: the embedded model, the sample data previewed, the parameter count; below, the
        # live view of the newest run (the quickstart).
        expect(page.locator("#data-report textarea")).to_have_value(re.compile("rows read"))
        expect(page.locator("#data-examples")).to_be_visible()
        expect(page.locator("#length-histogram g.mark-rect path").first).to_be_attached()
        expect(page.locator("#parameter-line")).to_contain_text("LoRA at this rank")
        expect(page.locator("#memory-line")).to_contain_text("memory")
        shoot_between(page, out / "train-tab.png", None, "#memory-line")

        expect(page.locator("#run-header")).to_contain_text(quickstart)
        expect(page.locator("#run-header")).to_contain_text("completed")
        expect(page.locator("#run-outcome")).to_contain_text(adapter)
        expect(page.locator("#chat-with-run")).to_be_visible()
        page.wait_for_function("() => document.querySelectorAll('#loss-plot g.mark-symbol path').length >= 60")
        shoot_between(page, out / "live-run.png", "#start", "#run-outcome")

        # "Chat with this adapter", then the comparison with the base model on the chosen question, greedy.
        page.locator("#chat-with-run").click()
        expect(page.locator("#chat-adapter input").first).to_have_value(quickstart)
        for setting, value in (("chat-temperature", "0"), ("chat-max-new-tokens", str(MAX_NEW_TOKENS)),
                               ("chat-seed", "0")):
            field = page.locator(f"#{setting} input[type=number]").first
            field.fill(value)
            field.press("Enter")
        page.locator("#chat-compare input[type=checkbox]").check()
        expect(page.locator("#chat-base")).to_be_visible()
        page.locator("#chat-message textarea").fill(probe["question"])
        page.locator("#chat-send").click()
        expect(page.locator("#chat-status")).to_contain_text("Last answer")
        shown = page.locator('#chat-adapter-reply [data-testid="bot"]').last.inner_text()
        base_shown = page.locator('#chat-base [data-testid="bot"]').last.inner_text()
        expected = probe["expected"].lower()
        if expected not in shown.lower() or expected in base_shown.lower():
            fail(f"the page shows other answers than the API gave for {probe['question']!r}: adapter {shown!r} "
                 f"(API: {answer!r}), base {base_shown!r} (API: {base_answer!r})")
        shoot_view(page, out / "chat-compare.png", "#tab-chat-button", above=20)

        # A malformed upload, explained next to the upload.
        page.locator("#tab-train-button").click()
        page.locator("#upload input[type=file]").set_input_files(str(broken))
        expect(page.locator("#data-message")).to_contain_text("no usable rows")
        shoot_view(page, out / "data-error.png", "#upload")

        # The Runs tab: the quickstart opened, its loss overlaid with the LoRA baseline's.
        page.locator("#tab-runs-button").click()
        table = page.locator("#runs-table")
        expect(table).to_contain_text(baseline)
        table.get_by_role("gridcell", name=quickstart).first.click()
        expect(page.locator("#run-details")).to_contain_text("Your adapter is in")
        for chosen in (quickstart, baseline):
            page.locator("#compare-runs input").first.click()
            page.get_by_role("option", name=chosen).click()
        page.keyboard.press("Escape")
        expect(page.locator("#compare-plot")).to_contain_text("train · denselora r=16")
        expect(page.locator("#compare-plot")).to_contain_text("train · lora r=16")
        page.wait_for_function("() => document.querySelectorAll('#compare-plot g.mark-symbol path').length >= 120")
        page.wait_for_function("() => document.querySelectorAll('#open-loss-plot g.mark-symbol path').length >= 60")
        page.evaluate("window.scrollTo(0, 0)")
        shoot_between(page, out / "runs-tab.png", "#tab-runs-button", "#compare-plot", "#open-loss-plot",
                      "#open-lr-plot")
        browser.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=Path, help="runs folder to train into or reuse (default: a temporary one)")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "screenshots", help="where the PNGs go")
    args = parser.parse_args()
    if not Path(CHROMIUM).exists():
        fail(f"needs Debian's chromium at {CHROMIUM} (apt-get install chromium)")

    with tempfile.TemporaryDirectory(prefix="denselora-screenshots-") as tmp:
        workdir = Path(tmp)
        runs = (args.runs or workdir / "runs").resolve()
        runs.mkdir(parents=True, exist_ok=True)
        quickstart = prepare_runs(runs)
        baseline = next(run_id for _, name, run_id in reversed(completed_runs(runs)) if name == BASELINE)
        args.out.mkdir(parents=True, exist_ok=True)
        log_path = workdir / "app.log"
        process, url = launch_app(runs, log_path)
        try:
            take_screenshots(url, runs, quickstart, baseline, args.out.resolve(), workdir)
        except BaseException:
            print(f"--- the app's log ({log_path}), last lines:\n{log_path.read_text(errors='replace')[-4000:]}",
                  file=sys.stderr)
            raise
        finally:
            stop_app(process)


if __name__ == "__main__":
    main()
