"""The learning-rate finder on a tiny model: trials recorded, the chosen rate, divergence, Stop, the CLI and the app."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_run_config, wait_until
from numerics import assert_close_for

from denselora_app import rules
from denselora_app.config import ConfigError, RunConfig
from denselora_app.engine.launch import launch, resume_run
from denselora_app.engine.lr_finder import SCORE_STEPS, choose_rate, plan_search
from denselora_app.engine.worker import execute
from denselora_app.runs import LrTrial, RunError, RunKind, format_rate, list_runs, request_stop, resolve_run
from denselora_app.serving import adapters

REPO = Path(__file__).parent.parent
STEPS = 6
RATES = [1e-3, 1e-2, 3e-2, 1e30]  # 1e30 turns the weights (and the loss) into inf/nan at once


def tiny_config(model_dir: Path, data: Path, **overrides) -> RunConfig:
    """The search's own rates and steps (none set here), on the tiny model."""
    return tiny_run_config(model_dir, data, **{"batch_size": 4, "run_name": "tiny", **overrides})


@pytest.fixture(scope="module")
def runs_root(tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        root = tmp_path_factory.mktemp("lr-runs")
        patch.setenv("DENSELORA_RUNS", str(root))
        yield root


@pytest.fixture(scope="module")
def searched(app_model_dir, app_data_file, runs_root):
    """A finished search, run in this process as the foreground CLI runs it."""
    cfg = tiny_config(app_model_dir, app_data_file)
    run = launch(cfg, background=False, search=plan_search(cfg, rates=RATES, steps=STEPS))
    assert execute(run) == "completed"
    return run


def test_trials_run_from_the_same_start_and_are_recorded(searched):
    run = searched
    assert run.kind is RunKind.LR_SEARCH and "lr-search" in run.id
    search = run.lr_search()
    assert search.rates == RATES and search.steps == STEPS and [t.lr for t in search.trials] == RATES
    status = run.status()
    assert status.state == "completed" and status.max_steps == len(RATES) * STEPS and status.trainable_parameters
    rows = run.metrics()
    for index, trial in enumerate(search.trials, start=1):
        mine = [r for r in rows if r["trial"] == index]
        assert {r["lr"] for r in mine} == {trial.lr}
        assert [r["trial_step"] for r in mine] == list(range(1, len(trial.losses) + 1))
        assert [r.get("loss") for r in mine] == trial.losses  # the live curve is the recorded trial
    assert len({t.losses[0] for t in search.trials}) == 1, "every trial starts from the same adapter and batch"
    # A search trains no adapter and keeps no checkpoint, so nothing offers it as one.
    assert not run.has_adapter() and not run.checkpoints() and not run.checkpoints_dir.exists()
    assert run.id not in {Path(ref.run_dir).name for ref in adapters.available_adapters() if ref.run_dir}
    from denselora_app.ui import publish_tab

    assert run.id not in publish_tab.publishable_runs()


def test_the_chosen_rate_has_the_lowest_recorded_loss_and_a_diverging_rate_is_never_chosen(searched):
    search = searched.lr_search()
    diverged = [t for t in search.trials if t.diverged]
    assert [t.lr for t in diverged] == [1e30]
    assert "not a number" in diverged[0].reason and len(diverged[0].losses) < STEPS  # it stopped early
    finished = [t for t in search.trials if not t.diverged]
    assert all(len(t.losses) == STEPS for t in finished)
    for trial in finished:
        assert_close_for(trial.final_loss, sum(trial.losses[-SCORE_STEPS:]) / SCORE_STEPS, terms=SCORE_STEPS,
                         dtype=torch.float64)  # a mean of the recorded losses
    lowest = min(finished, key=lambda t: t.final_loss)
    assert search.chosen == lowest.lr and search.chosen_trial is not None
    assert searched.facts().final_train_loss == lowest.final_loss
    assert format_rate(lowest.lr) in searched.status().note


def test_the_rule_excludes_diverged_trials_and_prefers_the_lower_rate_on_a_tie():
    trials = [LrTrial(1e-3, [3.0, 2.0], 2.0), LrTrial(1e-2, [3.0, 1.0], 1.0, diverged=True, reason="x"),
              LrTrial(3e-3, [3.0, 2.0], 2.0), LrTrial(1e-1, [3.0, None], None)]
    assert choose_rate(trials).lr == 1e-3
    assert choose_rate([trials[1], trials[3]]) is None


def test_the_plan_defaults_per_method_and_refuses_bad_ranges(app_model_dir, app_data_file):
    assert set(rules.LR_SEARCH_RANGES) == set(rules.METHODS)
    for method in rules.METHODS:
        plan = plan_search(tiny_config(app_model_dir, app_data_file, method=method))
        low, high = rules.LR_SEARCH_RANGES[method]
        assert len(plan.rates) == rules.LR_SEARCH_COUNT and plan.rates[0] == low and plan.rates[-1] == high
        assert plan.rates == sorted(plan.rates) and plan.steps == rules.LR_SEARCH_STEPS
    cfg = tiny_config(app_model_dir, app_data_file)
    for bad in (dict(low=1e-2, high=1e-3), dict(count=1), dict(steps=1), dict(rates=[1e-3], count=3),
                dict(rates=[1e-3, -1.0]), dict(rates=[1e-3, 1e-3])):
        with pytest.raises(ConfigError):
            plan_search(cfg, **bad)


@pytest.mark.slow
def test_stop_ends_the_search_and_keeps_the_finished_trials(app_model_dir, app_data_file, runs_root):
    cfg = tiny_config(app_model_dir, app_data_file, run_name="stopped")
    steps = 30
    run = launch(cfg, search=plan_search(cfg, rates=[1e-2, 3e-2, 1e-1, 3e-1], steps=steps))  # a background worker
    wait_until(lambda: any(r["trial"] == 2 for r in run.metrics()), what="the second trial to start")
    assert "trials finished so far are kept" in request_stop(run)
    status = wait_until(lambda: (s := run.status()).state == "stopped" and s, what="the stop")
    search = run.lr_search()
    finished = len(search.trials)
    assert finished >= 1 and all(len(t.losses) == steps for t in search.trials)
    assert search.chosen == min(search.trials, key=lambda t: t.final_loss).lr  # the best of the finished trials
    cut = [r for r in run.metrics() if r["trial"] == finished + 1]
    assert 0 < len(cut) < steps and not any(r["trial"] > finished + 1 for r in run.metrics())
    assert "cut short" in status.note and f"Best learning rate: {format_rate(search.chosen)}" in status.note
    assert not run.has_adapter() and not run.checkpoints()
    with pytest.raises(RunError, match="learning-rate search"):
        resume_run(run)


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "denselora_app", *args], capture_output=True, text=True,
                          env=os.environ.copy(), timeout=300, cwd=REPO)


@pytest.mark.slow
def test_cli_find_lr_prints_the_trials_the_choice_and_the_command(app_model_dir, app_data_file, runs_root,
                                                                   tmp_path):
    config = tmp_path / "c.yaml"
    tiny_config(app_model_dir, app_data_file, run_name="cli").to_yaml(config)
    before = set(list_runs())
    result = cli("find-lr", str(config), "--rates", "1e-2,3e-2,1e30", "--steps", "4", "--set", "r=2")
    assert result.returncode == 0, result.stderr
    (run,) = set(list_runs()) - before
    search = run.lr_search()
    chosen = format_rate(search.chosen)
    out = result.stdout
    assert "RATE" in out and "DIVERGED" in out and "yes: the loss is not a number" in out
    assert f"{chosen:>10}" in out and "<- chosen" in out
    assert f"Chosen learning rate: {chosen}" in out
    assert f"python -m denselora_app train {config} --set r=2 --set learning_rate={chosen}" in out
    assert " ".join(rules.LR_SEARCH_LONG_RUNS.split()) in " ".join(out.split())  # what the choice means for long runs
    assert f"(learning-rate search: best rate {chosen})" in cli("runs").stdout

    bad = cli("find-lr", str(config), "--min", "1e-2", "--max", "1e-3")
    assert bad.returncode == 2 and "0 < min < max" in bad.stderr and "Traceback" not in bad.stderr
    assert set(list_runs()) - before == {run}, "a refused search creates no run"


@pytest.mark.slow
def test_the_app_finds_shows_and_applies_a_rate(app_model_dir, app_data_file, runs_root, monkeypatch):
    from denselora_app.ui import build_app, runs_tab, train_tab

    monkeypatch.setattr(rules, "LR_SEARCH_STEPS", 5)  # the default rates and count, shorter trials
    settings = tiny_config(app_model_dir, app_data_file, run_name="app").to_dict()
    message, run_id, timer, cleared = train_tab.find_learning_rate(**settings)
    assert message.startswith("Started learning-rate search"), message
    assert timer.active and cleared is None
    run = resolve_run(run_id)
    wait_until(lambda: not run.status().active, timeout=180, what="the search to end")
    assert run.status().state == "completed", run.log_path.read_text()[-3000:]
    search = run.lr_search()
    assert len(search.trials) == rules.LR_SEARCH_COUNT and search.chosen is not None

    shown = train_tab.live_status(run_id)
    header, loss_plot, outcome, trials_plot = shown.header, shown.loss_plot, shown.outcome, shown.trials_plot
    chosen_row, chosen_plot = shown.chosen_row, shown.chosen_plot
    assert "Learning-rate search" in header and not loss_plot.visible
    assert f"Best learning rate: {format_rate(search.chosen)}" in outcome and rules.LR_SEARCH_LONG_RUNS in outcome
    points = trials_plot.value["data"]
    assert trials_plot.visible and {p[2] for p in points} == {f"lr {format_rate(t.lr)}" for t in search.trials}
    assert set(trials_plot.color_map) == {p[2] for p in points}  # one color per rate
    for trial in search.trials:
        # The recorded losses, as the plot's payload writes them: pandas' to_json keeps 10 decimals.
        assert [p[1] for p in points if p[2] == f"lr {format_rate(trial.lr)}"] == pytest.approx(trial.losses, abs=1e-10)
    assert chosen_row.visible and list(chosen_plot["loss"]) == search.chosen_trial.losses

    value, note = train_tab.use_found_rate(run_id)
    assert value == search.chosen and format_rate(search.chosen) in note
    # "Use this rate" writes into the form's learning-rate field, and "Find learning rate" reads the whole form.
    demo = build_app()
    fns = {fn.api_name: fn for fn in demo.fns.values()}
    assert [getattr(c, "elem_id", None) for c in fns["use_rate"].outputs][0] == "cfg-learning_rate"
    assert {getattr(c, "elem_id", None) for c in fns["find_lr"].inputs} >= {"cfg-learning_rate", "cfg-method"}

    table, *_ = runs_tab.runs_table()
    row = table[table["Run"] == run_id].iloc[0]
    assert row["Method"] == "denselora · lr search" and row["Train loss"] == f"{search.chosen_trial.final_loss:.4f}"


def test_a_killed_search_says_to_start_it_again_not_to_resume(app_model_dir, app_data_file, runs_root):
    cfg = tiny_config(app_model_dir, app_data_file, run_name="killed-search")
    run = launch(cfg, background=False, search=plan_search(cfg, rates=RATES[:2], steps=STEPS))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    run.update_status(state="running", pid=dead.pid, pid_started=None)
    status = run.status()
    assert status.state == "failed" and status.error_kind == "killed"
    assert status.fix.startswith("Start the search again") and "resume" not in status.fix.lower()
