"""The Train tab's actions on a run: Start, Stop, Find learning rate and Use this rate, through the engine's launch."""

from __future__ import annotations

import logging
from typing import Any

import gradio as gr

from denselora_app import rules
from denselora_app.config import StudioError
from denselora_app.hub import access, jobs
from denselora_app.hub.access import Action

# resolve_run without outside_root: the app reaches only the runs in the runs folder (a Space's visitors call it).
from denselora_app.runs import format_rate, resolve_run
from denselora_app.ui import forms, loaders
from denselora_app.ui.messages import require, warn

log = logging.getLogger(__name__)

ON_THIS_MACHINE, ON_JOBS = "this machine", "jobs"  # where a run trains ("Train on")
TRAIN_ON_CHOICES = [("Train on this machine", ON_THIS_MACHINE), ("Train on Hugging Face Jobs", ON_JOBS)]


def token_of(oauth_token: gr.OAuthToken | None) -> str | None:
    """The signed-in user's Hugging Face token, if any."""
    return oauth_token.token if oauth_token is not None else None


def start_training(profile: gr.OAuthProfile | None = None, oauth_token: gr.OAuthToken | None = None, *,
                   train_on: str = ON_THIS_MACHINE, jobs_flavor: str = rules.JOBS_DEFAULT_FLAVOR,
                   jobs_source: str = "", jobs_repo: str = "", jobs_timeout: str = rules.JOBS_DEFAULT_TIMEOUT,
                   **settings: Any) -> tuple[str, str | None, Any]:
    """Start the run the form describes, through the engine's launch (the same checks as the CLI: model, adapter,
    data, device), on this machine or on Hugging Face Jobs (with the signed-in user's token, else HF_TOKEN or the
    login). Returns the message, the run id to watch (unchanged when refused) and the live-view timer."""
    from denselora_app.engine.launch import launch

    try:
        who = require(profile, Action.TRAIN)
        cfg = forms.config_from_settings(settings)
        access.check_config(who, cfg)
        target = jobs.JobsTarget(jobs_flavor, jobs_source.strip() or None, jobs_repo.strip() or None,
                                 jobs_timeout) if train_on == ON_JOBS else None
        run = launch(cfg, jobs=target, token=token_of(oauth_token), load_config=loaders.model_config,
                     load_tokenizer=loaders.tokenizer)
    except StudioError as err:  # ConfigError, AccessError, LaunchError, JobsError
        return warn(f"Not started. {err}"), gr.skip(), gr.skip()
    log.info("Started run %s", run.id)
    if (job := run.job()) is not None:
        return (f"Submitted run `{run.id}` to Hugging Face Jobs ({job.flavor}): [its job]({job.url}). It trains "
                f"there and uploads its results to `{job.repo_id}` (private); this page follows it."), run.id, \
            gr.Timer(active=True)
    return (f"Started run `{run.id}`. It trains in its own process: closing or reloading this page does not "
            "stop it."), run.id, gr.Timer(active=True)


def stop_training(run_id: str | None, profile: gr.OAuthProfile | None = None,
                  oauth_token: gr.OAuthToken | None = None) -> str:
    """Stop the watched run: a graceful stop here, or cancelling its job on Hugging Face Jobs."""
    from denselora_app.engine.launch import stop_run

    try:
        require(profile, Action.TRAIN)
        if not run_id:
            return warn("No run to stop.")
        return stop_run(resolve_run(run_id), token=token_of(oauth_token))
    except StudioError as err:  # RunError, AccessError, JobsError
        return warn(err)


def find_learning_rate(profile: gr.OAuthProfile | None = None, **settings: Any) -> tuple[str, str | None, Any, Any]:
    """Start a learning-rate search with the form's settings (the method's default spread of rates), on this
    machine, through the same launch as Start. Returns the message, the run id to watch, the live-view timer and
    a cleared trials chart (a chart keeps the series it was first drawn with; another search has other rates)."""
    from denselora_app.engine.launch import launch
    from denselora_app.engine.lr_finder import plan_search

    try:
        who = require(profile, Action.TRAIN)
        cfg = forms.config_from_settings(settings)
        access.check_config(who, cfg)
        plan = plan_search(cfg)
        run = launch(cfg, search=plan, load_config=loaders.model_config, load_tokenizer=loaders.tokenizer)
    except StudioError as err:  # ConfigError, AccessError, LaunchError
        return warn(f"Not started. {err}"), gr.skip(), gr.skip(), gr.skip()
    log.info("Started learning-rate search %s", run.id)
    rates = ", ".join(format_rate(rate) for rate in plan.rates)
    return (f"Started learning-rate search `{run.id}`: {len(plan.rates)} trials of {plan.steps} steps on this "
            f"machine, at {rates}. When it ends, **Use this rate** puts the best one in the form."), run.id, \
        gr.Timer(active=True), None


def use_found_rate(run_id: str | None, profile: gr.OAuthProfile | None = None) -> tuple[Any, str]:
    """"Use this rate": the watched search's chosen rate into the form's learning-rate field, and a message."""
    try:
        who = require(profile, Action.TRAIN)
        run = access.visible_run(who, run_id or "")
    except StudioError as err:  # RunError, AccessError
        return gr.skip(), warn(err)
    search = run.lr_search()
    if search is None or search.chosen is None:
        return gr.skip(), warn(f"Run `{run.id}` has no chosen learning rate.")
    return search.chosen, f"Learning rate set to {format_rate(search.chosen)}, found by `{run.id}`."
