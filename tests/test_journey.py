"""The journey after a run: the Chat, Evaluate and Publish tabs open on the newest run's final adapter, and the Train
tab offers "Chat with this adapter" once the watched run has ended with one (tests/test_browser.py clicks it)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import gradio as gr
import psutil
import pytest
import torch
from safetensors.torch import save_file

from denselora_app.config import RunConfig
from denselora_app.runs import Run, create_run, mark_checkpoint_complete
from denselora_app.ui import app as app_module
from denselora_app.ui import chat_tab, evaluate_tab, publish_tab, train_tab


def fake_run(root: Path, name: str, state: str, created_at: float, adapter: bool = True,
             checkpoint: int | None = None) -> Run:
    """A run folder as the worker leaves it, with adapters that are whole (runs.adapter_complete: a config and
    safetensors weights of its rank) but tiny: they are recognised, never loaded."""
    run = create_run(RunConfig(data="unused.jsonl", run_name=name, device="cpu"), root)
    folders = ([run.adapter_dir] if adapter else []) + (
        [run.checkpoints_dir / f"checkpoint-{checkpoint}"] if checkpoint else [])
    for folder in folders:
        folder.mkdir(parents=True)
        (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "DENSELORA", "r": 4}))
        save_file({"base_model.model.q_proj.lora_A.weight": torch.zeros(4, 8)}, folder / "adapter_model.safetensors")
    if checkpoint:  # as the Trainer writes it, then the engine's completeness marker
        (run.checkpoints_dir / f"checkpoint-{checkpoint}" / "trainer_state.json").write_text("{}")
        mark_checkpoint_complete(run.checkpoints_dir / f"checkpoint-{checkpoint}")
    # A training run needs a live training process: this one.
    pid = dict(pid=os.getpid(), pid_started=psutil.Process().create_time()) if state == "running" else {}
    run.update_status(state=state, created_at=created_at, **pid)
    return run


KEPT = "(the box keeps its value)"


def chosen(update: gr.Dropdown):
    """The value an update sets; an update made without one leaves the box as it is (only what the event function
    passed to the constructor goes to the page)."""
    return update.constructor_args.get("value", KEPT)


@pytest.fixture
def runs(tmp_path, monkeypatch) -> dict[str, Run]:
    """Oldest to newest: two finished runs, a failed one, and one still training (a checkpoint, no final adapter)."""
    root = tmp_path / "runs"
    monkeypatch.setenv("DENSELORA_RUNS", str(root))
    monkeypatch.setattr(chat_tab, "_engine", None)  # a fresh engine (no model: nothing here loads one)
    return {
        "old": fake_run(root, "old", "completed", 1.0),
        "stopped": fake_run(root, "stopped", "stopped", 2.0),
        "failed": fake_run(root, "failed", "failed", 3.0, adapter=False, checkpoint=2),
        "training": fake_run(root, "training", "running", 4.0, adapter=False, checkpoint=4),
    }


# ---- the newest adapter is preselected -----------------------------------------------------------------------------


def test_chat_opens_on_the_newest_final_adapter_without_loading_it(runs):
    newest = str(runs["stopped"].adapter_dir)
    dropdown, _, status = chat_tab.refresh_adapters(None)
    locations = [location for _, location in dropdown.choices]
    assert locations[0].startswith(str(runs["training"].path))  # the training run's checkpoint is listed first...
    assert chosen(dropdown) == newest  # ...but the newest *final* adapter is chosen
    assert runs["stopped"].id in status and "first message" in status and "Load" in status
    assert chat_tab._engine is not None and chat_tab._engine.selected is None  # nothing was loaded

    # A choice that still exists, or something typed (a Hub id, a folder), is kept, and the status is left alone.
    old = str(runs["old"].adapter_dir)
    for value in (old, "someone/some-adapter"):
        dropdown, _, status = chat_tab.refresh_adapters(value)
        assert chosen(dropdown) == KEPT and status == gr.skip()
    # An adapter whose run was deleted is replaced by the newest.
    dropdown, _, status = chat_tab.refresh_adapters(str(runs["old"].path.parent / "gone" / "adapter"))
    assert chosen(dropdown) == newest and runs["stopped"].id in status


def test_chat_with_no_adapter_anywhere_asks_to_choose(tmp_path, monkeypatch):
    monkeypatch.setenv("DENSELORA_RUNS", str(tmp_path / "runs"))
    monkeypatch.setattr(chat_tab, "_engine", None)
    dropdown, _, status = chat_tab.refresh_adapters(None)
    assert dropdown.choices == [] and chosen(dropdown) is None and status == chat_tab.CHOOSE


def test_evaluate_opens_on_the_newest_final_adapter_and_keeps_a_choice(runs):
    newest = [str(runs["stopped"].adapter_dir)]
    assert chosen(evaluate_tab.refresh_adapters([])) == chosen(evaluate_tab.refresh_adapters(None)) == newest
    picked = [str(runs["old"].adapter_dir), str(runs["failed"].checkpoints_dir / "checkpoint-2")]
    assert chosen(evaluate_tab.refresh_adapters(picked)) == picked
    assert chosen(evaluate_tab.refresh_adapters(["/gone/adapter"])) == newest


def test_publish_opens_on_the_newest_run_with_a_final_adapter_and_keeps_a_choice(runs):
    assert publish_tab.publishable_runs() == [runs["stopped"].id, runs["old"].id]
    assert chosen(publish_tab.refresh_runs(None)) == runs["stopped"].id
    assert chosen(publish_tab.refresh_runs(runs["old"].id)) == runs["old"].id
    assert chosen(publish_tab.refresh_runs("20200101-000000-deleted")) == runs["stopped"].id


# ---- "Chat with this adapter" --------------------------------------------------------------------------------------


def test_chat_offer_only_for_an_ended_run_with_its_final_adapter(runs):
    offered = {name: train_tab.chat_offer(run.id).visible for name, run in runs.items()}
    assert offered == {"old": True, "stopped": True, "failed": False, "training": False}
    assert train_tab.chat_offer(None).visible is False
    assert train_tab.chat_offer("20200101-000000-no-such-run").visible is False
    no_adapter = fake_run(runs["old"].path.parent, "odd", "completed", 5.0, adapter=False)
    assert train_tab.chat_offer(no_adapter.id).visible is False
    resumed = fake_run(runs["old"].path.parent, "resumed", "running", 6.0)  # the adapter of its earlier stop
    assert train_tab.chat_offer(resumed.id).visible is False, "not while it trains again"


def test_chat_with_this_adapter_opens_the_chat_tab_with_the_run_chosen(runs):
    tabs, dropdown, _, status = app_module.open_in_chat(runs["old"].id)
    assert tabs.selected == "chat"
    assert chosen(dropdown) == str(runs["old"].adapter_dir)
    assert str(runs["old"].adapter_dir) in [location for _, location in dropdown.choices]
    assert runs["old"].id in status and "first message" in status
    _, dropdown, _, status = app_module.open_in_chat(runs["training"].id)
    assert chosen(dropdown) == KEPT and status.startswith("⚠️") and "no final adapter" in status
