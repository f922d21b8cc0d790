"""The Train tab's live view of the watched run: its state, progress, charts, outcome and log, and the way to chat."""

from __future__ import annotations

from typing import Any, NamedTuple

import gradio as gr

from denselora_app.hub import access
from denselora_app.hub.access import AccessError, Action

# resolve_run without outside_root: the app reaches only the runs in the runs folder (a Space's visitors call it).
from denselora_app.runs import RunError, RunState, resolve_run
from denselora_app.ui import run_view
from denselora_app.ui.messages import warn
from denselora_app.ui.train_run import token_of

REFRESH_SECONDS = 2.0
NO_RUN = "No run yet: set things up above and press **Start training**."


class LiveView(NamedTuple):
    """The live view's outputs by name: the components in the layout, and the values ``live_status`` returns for
    them (the outputs list is built from the components, so the two can never disagree on an order)."""

    header: Any  # which run, its state, method and model
    progress: Any  # the progress bar with step, elapsed and ETA
    run_box: Any  # the column holding everything below; hidden until there is a run
    loss_plot: Any  # train and validation loss (hidden for a learning-rate search)
    lr_plot: Any
    grad_plot: Any
    speed_plot: Any  # tokens per second
    outcome: Any  # where the adapter is, or why the run failed and what to do
    log: Any  # the run's own log lines
    timer: Any  # ticks (and refreshes this view) while the run is active
    trials_plot: Any  # a learning-rate search: one loss curve per trial
    chosen_row: Any  # a search that chose a rate: its trial and "Use this rate"
    chosen_plot: Any  # the chosen rate's trial
    preference_row: Any  # a dpo run's charts, hidden for other stages
    rewards_plot: Any  # rewards of the chosen and rejected answers, and their margin
    accuracy_plot: Any  # preference accuracy (the share of pairs whose chosen reward is the higher)

    @classmethod
    def nothing(cls, header: str) -> LiveView:
        """No run to show: only ``header``, and the timer stopped."""
        return cls(header=header, progress="", run_box=gr.Column(visible=False), loss_plot=None, lr_plot=None,
                   grad_plot=None, speed_plot=None, outcome="", log="", timer=gr.Timer(active=False),
                   trials_plot=gr.LinePlot(visible=False), chosen_row=gr.Row(visible=False), chosen_plot=None,
                   preference_row=gr.Row(visible=False), rewards_plot=None, accuracy_plot=None)


def live_status(run_id: str | None, profile: gr.OAuthProfile | None = None,
                oauth_token: gr.OAuthToken | None = None) -> LiveView:
    """Everything the live view shows for one run (one the caller may see); the timer keeps ticking only while the
    run is active."""
    if not run_id:
        return LiveView.nothing(NO_RUN)
    try:
        who = access.identify(profile)
        run = access.visible_run(who, run_id)
    except (RunError, AccessError) as err:
        return LiveView.nothing(warn(err))
    problem = run_view.follow_job(run, who, token_of(oauth_token))  # a run on Hugging Face Jobs: what its job says
    facts = run.facts()
    shown = run_view.run_charts(run.metrics())
    search = run_view.search_charts(run)  # a learning-rate search: one curve per trial instead of the loss chart
    return LiveView(
        header=run_view.header_markdown(facts) + (f"\n\n{warn(problem)}" if problem else ""),
        progress=run_view.progress_html(facts.status, facts.job),
        run_box=gr.Column(visible=True),
        loss_plot=gr.LinePlot(shown.loss, visible=search is None),
        lr_plot=shown.learning_rate,
        grad_plot=shown.grad_norm,
        speed_plot=shown.tokens_per_second,
        outcome=run_view.outcome_markdown(run, facts, paths=who.owner),
        log=access.shown_to(who, run.own_log_tail(run_view.LOG_LINES)),
        timer=gr.Timer(active=facts.state.active),
        trials_plot=(gr.LinePlot(search.trials, color_map=search.colors, visible=True) if search
                     else gr.LinePlot(visible=False)),
        chosen_row=gr.Row(visible=search is not None and search.chosen is not None),
        chosen_plot=search.chosen if search else None,
        preference_row=gr.Row(visible=shown.rewards is not None),
        rewards_plot=shown.rewards,
        accuracy_plot=shown.preference_accuracy,
    )


def restore_run(profile: gr.OAuthProfile | None = None) -> str | None:
    """The run a freshly loaded page watches: of those the caller may see, the one training now, else the most
    recent."""
    runs = access.visible_runs(access.identify(profile))
    active = next((r for r in runs if r.status().active), None)
    chosen = active or (runs[0] if runs else None)
    return chosen.id if chosen else None


def chat_offer(run_id: str | None, profile: gr.OAuthProfile | None = None) -> Any:
    """The "Chat with this adapter" button: shown once the watched run has ended (completed or stopped: the worker
    saves the adapter before it says so) with its final adapter, and the caller may chat with it; hidden while it
    trains (a resumed run still has the adapter of its earlier stop), when it failed, or when there is no run."""
    try:
        run = resolve_run(run_id or "")
    except RunError:
        return gr.Button(visible=False)
    ended = run.status().state in (RunState.COMPLETED, RunState.STOPPED)
    shown = ended and run.has_adapter() and access.allowed(access.identify(profile), Action.CHAT, run)
    return gr.Button(visible=shown)
