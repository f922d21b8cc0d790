"""The command line: ``python -m denselora_app <command>`` (also installed as ``denselora``).

    train CONFIG.yaml [--set key=value ...] [--background] [--share-device]
                                                  train (foreground with a progress bar by default)
    train CONFIG.yaml --on-jobs FLAVOR [--jobs-source REPO_OR_URL] [--jobs-repo NAMESPACE/NAME] [--jobs-timeout 4h]
                                                  train on Hugging Face Jobs instead (`runs` follows it, `stop`
                                                  cancels it)
    find-lr CONFIG.yaml [--set key=value ...] [--rates a,b,c | --min A --max B --count N] [--steps N]
            [--background]                        short trials at a spread of learning rates; prints the best
    runs                                          list runs with state, method, rank, trainable %, loss
    stop RUN                                      graceful stop: checkpoint + adapter, state 'stopped' (a run on
                                                  Hugging Face Jobs: its job is cancelled)
    resume RUN [--background] [--share-device]    continue a stopped or failed run from its last checkpoint
    delete RUN [--yes]                            delete a run that is not training (asks first)
    chat RUN_OR_ADAPTER --prompt TEXT [--compare] [...]   stream a reply (--compare: the base's, then the adapter's)
    eval (or evaluate) RUN_OR_ADAPTER... [--data FILE] [--mode M] [...]
                                                  accuracy, loss and perplexity: base vs adapter
    serve RUN_OR_ADAPTER... [--host H] [--port P] [--api-key KEY] [--name NAME ...] [--max-queue N]
                                                  an OpenAI-compatible API (/v1) for the adapters and their base
    publish RUN --repo-id USER/NAME [--private] [--dry-run OUT_DIR] [--message MSG] [--base-model HUB_ID]
            [--space USER/NAME [--space-dir DIR]] [--as lora|merged|gguf]   upload the adapter (and a demo
                                                  Space), or an export of it (see export), to the Hub
    export RUN --to lora|merged|gguf --out DIR [--calibration DATA] [--rank K] [--gguf-type T]   load it anywhere

RUN is a run id (as ``runs`` lists it), ``runs/<id>``, or the path of a run folder, also one outside the runs
folder (runs.resolve_run decides, the same for every command). A run's adapter/ or checkpoints/checkpoint-N folder,
any adapter folder and a Hub adapter id (USER/NAME) are adapters too.

Every command takes ``--debug``, which also prints the Python traceback of an error; without it an expected
problem (a bad config value, missing data, a busy device, ...) is one paragraph saying what to do, with exit
status 2. ``train`` also runs under ``torchrun --nproc_per_node N -m denselora_app train ...`` and
``accelerate launch``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any

from denselora_app import terminal
from denselora_app.config import QUANTIZATIONS, RunConfig, StudioError
from denselora_app.rules import (
    EXPORT_FORMATS,
    GGUF_TYPES,
    JOBS_DEFAULT_TIMEOUT,
    LR_SEARCH_COUNT,
    LR_SEARCH_LONG_RUNS,
    LR_SEARCH_RANGES,
    LR_SEARCH_STEPS,
    PUBLISH_FORMS,
)
from denselora_app.runs import (
    FailureKind,
    Run,
    RunKind,
    check_deletable,
    delete_run,
    format_rate,
    list_runs,
    resolve_run,
    runs_dir,
)

log = logging.getLogger("denselora_app")


class UserError(StudioError):
    """An expected problem that was already explained to the user; main() exits with ``code``."""

    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(message)
        self.code = code


def _distributed() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _launch(cfg: RunConfig, args: argparse.Namespace, background: bool, search: Any = None) -> Run:
    from denselora_app.engine.launch import launch

    return launch(cfg, background=background, share_device=args.share_device, ignore_memory=args.ignore_memory_plan,
                  search=search)


def cmd_train(args: argparse.Namespace) -> int:
    cfg = RunConfig.from_yaml(args.config).with_overrides(args.set or [])
    if args.on_jobs:
        return _train_on_jobs(cfg, args)
    if args.background:
        run = _launch(cfg, args, background=True)
        print(f"Started run {run.id} in the background.\n  folder: {run.path}\n  follow: tail -f {run.log_path}\n"
              f"  stop:   python -m denselora_app stop {run.cli_name}")
        return 0
    if not _distributed():
        return _foreground(_launch(cfg, args, background=False), args)
    return _foreground(_launch_on_all_ranks(cfg, args), args)


def _train_on_jobs(cfg: RunConfig, args: argparse.Namespace) -> int:
    """Submit the run to Hugging Face Jobs with the token of HF_TOKEN or the login; say how to follow it."""
    from denselora_app.engine.launch import launch
    from denselora_app.hub.jobs import JobsTarget

    target = JobsTarget(flavor=args.on_jobs, source=args.jobs_source, repo_id=args.jobs_repo,
                        timeout=args.jobs_timeout)
    run = launch(cfg, jobs=target, ignore_memory=args.ignore_memory_plan)
    job = run.job()
    print(f"Submitted run {run.id} to Hugging Face Jobs ({job.flavor}).\n  job:     {job.url}\n"
          f"  results: https://huggingface.co/{job.repo_id} (private)\n"
          f"  follow:  python -m denselora_app runs   (reads the job's state, metrics and log into {run.path})\n"
          f"  stop:    python -m denselora_app stop {run.cli_name}   (cancels the job)")
    return 0


def _launch_on_all_ranks(cfg: RunConfig, args: argparse.Namespace) -> Run:
    """Rank 0 checks and creates the run folder; under torchrun the other ranks are told which one, or why not."""
    import torch.distributed as dist

    from denselora_app.engine.launch import LaunchError, run_device
    from denselora_app.engine.train import process_state

    run_device(cfg.device)  # a device this machine lacks is refused before the process group needs it
    state = process_state(cfg.device)
    holder: list[str | None] = [None]
    if state.is_main_process:
        try:
            holder[0] = "run:" + str(_launch(cfg, args, background=False).path)
        except LaunchError as err:
            holder[0] = "error:" + str(err)
    dist.broadcast_object_list(holder, src=0)
    kind, _, value = str(holder[0]).partition(":")
    if kind == "error":
        raise UserError(value if state.is_main_process else f"rank 0 refused the run: {value}")
    folder = Path(value)
    seen: list[bool | None] = [None] * dist.get_world_size()
    dist.all_gather_object(seen, folder.is_dir())  # every rank answers, so all stop together or none does
    if blind := [rank for rank, sees in enumerate(seen) if not sees]:
        raise UserError(f"Rank{'s' if len(blind) > 1 else ''} {', '.join(map(str, blind))} cannot see the run "
                        f"folder {folder} that rank 0 created: on several machines the runs folder must be on storage "
                        "every node sees. Set DENSELORA_RUNS to a shared folder (the same path on every node).")
    return Run(folder)


def _foreground(run: Run, args: argparse.Namespace, resume: bool = False) -> int:
    from denselora_app.engine.worker import RunFailed, execute

    terminal.log_to(run.log_path)
    log.info("Run %s: %s", run.id, run.path)
    try:
        # A progress bar for a terminal; elsewhere (a log, a Hugging Face job) a readable line per logged step.
        state = execute(run, resume=resume, show_progress=terminal.stderr().isatty())
    except KeyboardInterrupt:
        again = ("Start a new search to try again." if run.kind is RunKind.LR_SEARCH
                 else f"Resume with: python -m denselora_app resume {run.cli_name}")
        print(f"\nInterrupted. {again}", file=terminal.stderr())
        return 130
    except RunFailed as failed:  # execute logged the traceback to train.log
        print(f"\nRun {run.id} failed: {failed.failure.summary}\nFix: {failed.failure.fix}\n"
              f"The full error is in {run.log_path}"
              + ("." if args.debug else " (or run again with --debug)."), file=terminal.stderr())
        return 1
    status = run.status()
    if status.note:
        print(f"\n{status.note}")
    if run.kind is RunKind.LR_SEARCH:
        print(_search_report(run, args))
        return 0
    if run.has_adapter():
        print(f"\nRun {run.id} {state}. Your adapter is in {run.adapter_dir}")
    else:
        print(f"\nRun {run.id} {state}; it saved no adapter.")
    return 0


def cmd_find_lr(args: argparse.Namespace) -> int:
    from denselora_app.engine.lr_finder import plan_search

    if _distributed():
        raise UserError("find-lr runs in one process: start it without torchrun or accelerate launch.")
    cfg = RunConfig.from_yaml(args.config).with_overrides(args.set or [])
    plan = plan_search(cfg, rates=_rates(args.rates), low=args.min, high=args.max, count=args.count,
                       steps=args.steps)
    run = _launch(cfg, args, background=args.background, search=plan)
    if args.background:
        print(f"Started learning-rate search {run.id} in the background: {len(plan.rates)} trials of {plan.steps} "
              f"steps.\n  folder: {run.path}\n  follow: tail -f {run.log_path}\n"
              f"  stop:   python -m denselora_app stop {run.cli_name}\n  result: python -m denselora_app runs")
        return 0
    return _foreground(run, args)


def _rates(text: str | None) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UserError(f"--rates takes numbers separated by commas, e.g. 1e-4,3e-4,1e-3; got {text!r}.") from None


def _search_report(run: Run, args: argparse.Namespace) -> str:
    """The trials' table, the chosen rate and the command that trains with it."""
    search = run.lr_search()
    lines = ["", f"{'RATE':>10} {'LOSS':>9}  DIVERGED"]
    for trial in search.trials:
        loss = f"{trial.final_loss:.4f}" if trial.final_loss is not None else "-"
        diverged = f"yes: {trial.reason}" if trial.diverged else "no"
        mark = "  <- chosen" if trial.lr == search.chosen else ""
        lines.append(f"{format_rate(trial.lr):>10} {loss:>9}  {diverged}{mark}")
    if search.chosen is None:
        lines.append("\nNo rate was chosen.")
        return "\n".join(lines)
    sets = "".join(f" --set {assignment}" for assignment in args.set or []
                   if assignment.partition("=")[0].strip() != "learning_rate")
    lines += [f"\nChosen learning rate: {format_rate(search.chosen)} ({search.rule}).", "Train with it:",
              f"  python -m denselora_app train {args.config}{sets} --set learning_rate={format_rate(search.chosen)}",
              "", LR_SEARCH_LONG_RUNS]
    return "\n".join(lines)


def cmd_runs(args: argparse.Namespace) -> int:
    runs = list_runs()
    if not runs:
        print("No runs yet. Start one with: python -m denselora_app train presets/quickstart-cpu.yaml")
        return 0
    from denselora_app.hub.jobs import refresh

    for run in runs:  # runs on Hugging Face Jobs: what their jobs say now
        if problem := refresh(run, every=0):
            print(f"warning: {problem}", file=terminal.stderr())
    print(f"{'RUN':40} {'STATE':10} {'STAGE':5} {'METHOD':9} {'R':>4} {'TRAIN%':>8} {'STEP':>11} {'LOSS':>8} {'VAL':>8}")
    for run in runs:
        print(_run_line(run))
    return 0


def _run_line(run: Run) -> str:
    facts = run.facts()
    if facts.problem:
        return f"{run.id:40} {'damaged':10} {facts.problem}"
    cfg, status = facts.config, facts.status
    percent = f"{facts.trainable_percent:.4f}" if facts.trainable_percent else "-"
    step = f"{facts.steps}/{status.max_steps or '?'}"
    loss = f"{facts.final_train_loss:.4f}" if facts.final_train_loss is not None else "-"
    val = f"{facts.final_eval_loss:.4f}" if facts.final_eval_loss is not None else "-"
    line = f"{run.id:40} {facts.label:10} {cfg.stage:5} {cfg.method:9} {cfg.r:>4} {percent:>8} {step:>11} {loss:>8} {val:>8}"
    if status.error_kind == FailureKind.NEVER_STARTED:
        line += "  (never started: delete it)"
    if facts.job is not None:
        line += f"  (on Jobs: {facts.job.flavor}, {facts.job.url})"
    if facts.kind is RunKind.LR_SEARCH:
        chosen = run.lr_search().chosen
        line += f"  (learning-rate search{f': best rate {format_rate(chosen)}' if chosen is not None else ''})"
    return line


def cmd_stop(args: argparse.Namespace) -> int:
    from denselora_app.engine.launch import stop_run

    print(stop_run(_run(args.run)))
    return 0


def cmd_resume(args: argparse.Namespace) -> int:
    from denselora_app.engine.launch import resume_run

    run = _run(args.run)
    resume_run(run, background=args.background, share_device=args.share_device, ignore_memory=args.ignore_memory_plan)
    if args.background:
        print(f"Resuming run {run.id} in the background. Follow: tail -f {run.log_path}")
        return 0
    return _foreground(run, args, resume=True)


def cmd_delete(args: argparse.Namespace) -> int:
    run = _run(args.run)
    check_deletable(run)  # before asking: a run that trains, or a link to one, cannot go
    facts = run.facts()
    if not args.yes:
        # A run elsewhere on the disk (copied, or another studio's) is said to be so: its path is in the question.
        outside = "" if run.path.parent == runs_dir() else f" at {run.path}, outside the runs folder {runs_dir()},"
        if not sys.stdin.isatty():
            raise UserError(f"Deleting run {run.id}{outside} cannot be undone: add --yes to confirm.")
        what = "its adapter, " if facts.has_adapter else ""
        answer = input(f"Delete run {run.id} ({facts.state}){outside} with {what}{len(facts.checkpoints)} "
                       "checkpoint(s) and its logs? [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            print("Nothing deleted.")
            return 1
    delete_run(run)
    print(f"Deleted run {run.id}.")
    return 0


def _run(ref: str) -> Run:
    # The local user's command line: a run folder anywhere on their disk may be named, not only one in the runs folder.
    return resolve_run(ref, outside_root=True)


def cmd_publish(args: argparse.Namespace) -> int:
    from denselora_app.export.publishing import publish_export
    from denselora_app.hub.publish import build_model_repo, build_space_repo, publish_model, publish_space

    if args.space_dir and not args.space:
        raise UserError("--space-dir needs --space USER/NAME, the Space's repository id.")
    if args.dry_run and args.space and not args.space_dir:
        raise UserError("--dry-run uploads nothing: add --space-dir DIR to export the Space too.")
    run = _run(args.run)
    if args.form != PUBLISH_FORMS[0]:  # an export of the adapter (export/publishing.py builds and uploads it)
        if args.space:
            raise UserError(f"--space serves the DenseLoRA adapter itself: leave it out with --as {args.form}.")
        print(publish_export(run, args.form, args.repo_id, dry_run=args.dry_run, private=args.private,
                             commit_message=args.message, base_model=args.base_model, calibration=args.calibration,
                             rank=args.rank, gguf_type=args.gguf_type))
        return 0
    if args.dry_run:
        folder = build_model_repo(run, args.repo_id, args.dry_run, base_model=args.base_model)
        print(f"Wrote the repository {folder.repo_id} to {folder.path} (nothing uploaded):")
        print("".join(f"  {name}\n" for name in folder.files), end="")
    else:
        result = publish_model(run, args.repo_id, private=args.private, commit_message=args.message,
                               base_model=args.base_model)
        print(result.message)
    if args.space_dir:
        # Carry the adapter when the Space could not download it: not uploaded yet, or private.
        space = build_space_repo(run, args.space, args.space_dir, adapter_repo_id=args.repo_id,
                                 bundle_adapter=bool(args.dry_run) or args.private, base_model=args.base_model)
        print(f"Wrote the Space {space.repo_id} to {space.path}. Try it: cd {space.path} && python app.py")
    elif args.space:
        # A private adapter repository is unreadable from the Space without a secret: the Space carries it.
        result = publish_space(run, args.space, adapter_repo_id=args.repo_id, bundle_adapter=args.private,
                               private=args.private, commit_message=args.message, base_model=args.base_model)
        print(f"{result.message} (the Space builds and starts in a few minutes)")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from denselora_app.export import export_run

    print(export_run(_run(args.run), args.to, args.out, calibration=args.calibration, rank=args.rank,
                     gguf_type=args.gguf_type).message)
    return 0


def _export_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--calibration", metavar="DATA", help="rows to fit a GELU/SiLU adapter on; measures any export")
    p.add_argument("--rank", type=int, metavar="K", help="rank of a fitted export (default: chosen on held-out rows)")
    p.add_argument("--gguf-type", choices=GGUF_TYPES, default=GGUF_TYPES[0], help="the GGUF file's weight type")


def _print_growing(text: str, shown: str) -> str:
    """Print what ``text`` adds to what was shown already; returns the new shown text."""
    print(text[len(shown):], end="", flush=True)
    return text


def cmd_chat(args: argparse.Namespace) -> int:
    from denselora_app.serving.adapters import resolve_adapter
    from denselora_app.serving.chat import ChatEngine, GenerationSettings

    settings = GenerationSettings(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                  top_p=args.top_p, seed=args.seed, system_prompt=args.system)
    engine = ChatEngine(device=args.device, quantization=args.quantization, compile_decoding=args.compile)
    loaded = engine.select(resolve_adapter(args.adapter, args.checkpoint, outside_root=True))
    if loaded.notice:
        log.warning(loaded.notice)
    if not args.compare:
        shown = ""
        for text in engine.stream_reply(args.prompt, settings=settings):
            shown = _print_growing(text, shown)
        print()
        return 0
    # The base answers first, then the adapter: adapter text appearing means the base's answer is complete.
    print("base:")
    base_shown = adapter_shown = ""
    for base_text, adapter_text in engine.stream_compare(args.prompt, settings=settings):
        base_shown = _print_growing(base_text, base_shown)
        if adapter_text and not adapter_shown:
            print("\n\nadapter:")
        adapter_shown = _print_growing(adapter_text, adapter_shown)
    print("" if adapter_shown else "\n\nadapter:")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from denselora_app.serving.api import Limits
    from denselora_app.serving.server import Server, ServeOptions

    options = ServeOptions(host=args.host, port=args.port, api_key=args.api_key or os.environ.get("DENSELORA_API_KEY"),
                           open_without_key=args.no_api_key, names=tuple(args.name or ()), device=args.device,
                           quantization=args.quantization,
                           **({"max_queue": args.max_queue} if args.max_queue is not None else {}),
                           limits=Limits(max_body_bytes=args.max_body_mb * 1024 * 1024, timeout=args.timeout,
                                         max_tokens=args.max_tokens))
    server = Server.load(args.adapter, options)
    models = [m.name for m in server.catalog()]
    print(f"Serving {', '.join(models)} at http://{args.host}:{args.port}/v1 (Ctrl-C stops)", flush=True)
    server.run()
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from denselora_app.serving.adapters import resolve_adapter
    from denselora_app.serving.chat import ChatEngine
    from denselora_app.serving.evaluate import evaluate

    try:
        refs = [resolve_adapter(ref, args.checkpoint, outside_root=True) for ref in args.adapter]
        table = evaluate(refs, args.data, loss_data=args.loss_data, mode=args.mode, limit=args.limit,
                         strict=args.strict, engine=ChatEngine(device=args.device, quantization=args.quantization,
                                                               compile_decoding=args.compile),
                         progress=lambda fraction, what: print(f"\r{what[:70]:70} {fraction:4.0%}", end="",
                                                               file=terminal.stderr(), flush=True))
    finally:
        print(file=terminal.stderr())  # end the progress line
    last = table.results[-1]
    unit = "examples" if table.mode == "loss" else "questions"
    held_out = f"; loss on {last.loss_dataset}" if last.loss_dataset not in (None, table.dataset) else ""
    print(f"{table.dataset}: {last.total} {unit}, mode {table.mode}{held_out}")
    print(table.to_text())
    for path in sorted({ref.run.evaluation_path for ref in refs if ref.run is not None}):
        print(f"Saved to {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="also print the Python traceback of an error")
    parser = argparse.ArgumentParser(prog="denselora", description="DenseLoRA Studio: fine-tune LLMs with DenseLoRA.")
    sub = parser.add_subparsers(dest="command", required=True)
    share_device = dict(action="store_true", help="train even if another run holds the same device (both then "
                                                  "compete for its memory and time)")

    base_quantization = dict(choices=QUANTIZATIONS, help="load the base model in 4bit or 8bit, or unquantized (none); "
                                                         "default: as the adapter was trained")

    ignore_memory = dict(action="store_true", help="start even when the memory planner says the run will not fit "
                                                   "(its estimates run up to ~20%% either way)")

    compile_decoding = dict(action="store_true", help="decode through torch.compile with a static cache: a slow "
                                                      "first compile, faster tokens after it")

    def command(name: str, **kwargs) -> argparse.ArgumentParser:
        return sub.add_parser(name, parents=[common], **kwargs)

    p = command("train", help="train from a YAML config (see presets/)")
    p.add_argument("config", type=Path)
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key (repeatable)")
    p.add_argument("--background", action="store_true", help="start a worker process and return")
    p.add_argument("--share-device", **share_device)
    p.add_argument("--ignore-memory-plan", **ignore_memory)
    p.add_argument("--on-jobs", metavar="FLAVOR", help="train on Hugging Face Jobs on this GPU flavor (e.g. l4x1, "
                                                        "a100-large); uses HF_TOKEN or your `hf auth login`")
    p.add_argument("--jobs-source", metavar="REPO_OR_URL", help="where the job installs DenseLoRA Studio from: a Hub "
                                                                "repository holding it (OWNER/SPACE) or a git URL")
    p.add_argument("--jobs-repo", metavar="NAMESPACE/NAME", help="the private repository the job uploads the run to "
                                                                 "(default: YOUR_NAME/RUN_ID)")
    p.add_argument("--jobs-timeout", metavar="DURATION", default=JOBS_DEFAULT_TIMEOUT,
                   help=f"the job's time limit, e.g. 90m or 6h (default: {JOBS_DEFAULT_TIMEOUT}); Jobs ends it there")
    p.set_defaults(func=cmd_train)

    p = command("find-lr", help="find a learning rate: short trials at a spread of rates, on a slice of the data",
                description="Each trial trains the config's adapter from the same start for --steps steps at one "
                            "rate; the rate with the lowest loss at the end (diverged trials excluded) is chosen. "
                            f"Default rates: {LR_SEARCH_COUNT} log-spaced, "
                            + ", ".join(f"{low:g}..{high:g} for {method}"
                                        for method, (low, high) in LR_SEARCH_RANGES.items()) + ".")
    p.add_argument("config", type=Path)
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key (repeatable)")
    p.add_argument("--rates", metavar="A,B,C", help="the rates to try, e.g. 1e-4,3e-4,1e-3")
    p.add_argument("--min", type=float, metavar="RATE", help="the lowest rate of a log-spaced range")
    p.add_argument("--max", type=float, metavar="RATE", help="the highest rate of a log-spaced range")
    p.add_argument("--count", type=int, metavar="N", help="how many rates in the range")
    p.add_argument("--steps", type=int, metavar="N", help=f"optimizer steps per trial (default {LR_SEARCH_STEPS})")
    p.add_argument("--background", action="store_true", help="start a worker process and return")
    p.add_argument("--share-device", **share_device)
    p.add_argument("--ignore-memory-plan", **ignore_memory)
    p.set_defaults(func=cmd_find_lr)

    p = command("runs", help="list runs")
    p.set_defaults(func=cmd_runs)

    p = command("stop", help="stop a run gracefully (saves a checkpoint and the adapter)")
    p.add_argument("run")
    p.set_defaults(func=cmd_stop)

    p = command("resume", help="resume a stopped or failed run from its last checkpoint")
    p.add_argument("run")
    p.add_argument("--background", action="store_true", help="start a worker process and return")
    p.add_argument("--share-device", **share_device)
    p.add_argument("--ignore-memory-plan", **ignore_memory)
    p.set_defaults(func=cmd_resume)

    p = command("delete", help="delete a run that is not training, with its checkpoints and adapter")
    p.add_argument("run")
    p.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    p.set_defaults(func=cmd_delete)

    p = command("publish", help="upload a run's adapter with a model card to the Hugging Face Hub",
                       description="Uses the token in HF_TOKEN, else your `hf auth login`.")
    p.add_argument("run")
    p.add_argument("--repo-id", required=True, metavar="USER/NAME", help="the model repository (created if missing)")
    p.add_argument("--private", action="store_true", help="create the repositories as private")
    p.add_argument("--dry-run", type=Path, metavar="OUT_DIR", help="write the repository to OUT_DIR, upload nothing")
    p.add_argument("--message", help="commit message")
    p.add_argument("--base-model", metavar="HUB_ID", help="the base model's Hub id, for runs on a local model folder")
    p.add_argument("--space", metavar="USER/NAME", help="also deploy a Gradio chat demo Space for the adapter")
    p.add_argument("--space-dir", type=Path, metavar="DIR", help="write the demo Space to DIR instead of uploading it")
    p.add_argument("--as", dest="form", choices=PUBLISH_FORMS, default=PUBLISH_FORMS[0], help="or an export of it")
    _export_options(p)
    p.set_defaults(func=cmd_publish)

    p = command("export", help="export a run's adapter as a standard LoRA adapter, a merged model or a GGUF file")
    p.add_argument("run")
    p.add_argument("--to", required=True, choices=EXPORT_FORMATS)
    p.add_argument("--out", required=True, type=Path, metavar="DIR", help="a new or empty folder to write")
    _export_options(p)
    p.set_defaults(func=cmd_export)

    p = command("chat", help="chat with an adapter (a run, an adapter folder or a Hub adapter id)")
    p.add_argument("adapter", metavar="RUN_OR_ADAPTER")
    p.add_argument("--prompt", required=True, help="the user message")
    p.add_argument("--compare", action="store_true", help="also answer with the base model (adapter disabled)")
    p.add_argument("--checkpoint", type=int, metavar="N", help="a run's checkpoint-N instead of its final adapter")
    p.add_argument("--system", default="", metavar="TEXT", help="a system prompt")
    p.add_argument("--max-new-tokens", type=int, default=256, metavar="N")
    p.add_argument("--temperature", type=float, default=0.7, metavar="T", help="0 decodes greedily")
    p.add_argument("--top-p", type=float, default=0.9, metavar="P")
    p.add_argument("--seed", type=int, metavar="S", help="sampling seed (default: a random one)")
    p.add_argument("--device", default="auto")
    p.add_argument("--quantization", **base_quantization)
    p.add_argument("--compile", **compile_decoding)
    p.set_defaults(func=cmd_chat)

    p = command("serve", help="serve adapters and their base model through an OpenAI-compatible API at /v1")
    p.add_argument("adapter", metavar="RUN_OR_ADAPTER", nargs="+", help="runs or adapters, all of one base model")
    p.add_argument("--host", default="127.0.0.1", help="the address to listen on (default: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", metavar="KEY", help="the key clients must send (default: $DENSELORA_API_KEY; "
                                                    "required off localhost)")
    p.add_argument("--no-api-key", action="store_true", help="serve a non-local --host without a key")
    p.add_argument("--name", action="append", metavar="NAME",
                   help="the model name of each adapter, in order (default: the run id or adapter label)")
    p.add_argument("--max-queue", type=int, metavar="N",
                   help="requests waiting or decoding at once; more get 503 (default: 64)")
    p.add_argument("--max-tokens", type=int, metavar="N", help="cap every request's max_tokens (default: the "
                                                               "model's context caps it)")
    p.add_argument("--timeout", type=float, default=600.0, metavar="SECONDS", help="longest time a request may take")
    p.add_argument("--max-body-mb", type=int, default=4, metavar="MB", help="largest request body")
    p.add_argument("--device", default="auto")
    p.add_argument("--quantization", **base_quantization)
    p.set_defaults(func=cmd_serve)

    p = command("eval", aliases=["evaluate"], help="accuracy, loss and perplexity of adapters and their base model")
    p.add_argument("adapter", metavar="RUN_OR_ADAPTER", nargs="+")
    p.add_argument("--data", metavar="FILE", help="multiple choice, held-out data (loss) or held-out preference "
                                                  "pairs (pairwise accuracy); default: the shipped multiple choice")
    p.add_argument("--loss-data", metavar="FILE", help="held-out data (any training format) for loss and perplexity, "
                                                       "next to a multiple-choice --data")
    p.add_argument("--mode", choices=("generate", "loglik"), default="generate",
                   help="generate: greedy reply, answer label extracted; loglik: score each choice, no generation")
    p.add_argument("--limit", type=int, metavar="N", help="evaluate the first N questions only")
    p.add_argument("--checkpoint", type=int, metavar="N", help="a run's checkpoint-N instead of its final adapter")
    p.add_argument("--strict", action="store_true",
                   help="count a reply without an answer label as wrong, even when it names a choice")
    p.add_argument("--device", default="auto")
    p.add_argument("--quantization", **base_quantization)
    p.add_argument("--compile", **compile_decoding)
    p.set_defaults(func=cmd_eval)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with terminal.Terminal(debug=args.debug) as term:
        try:
            return args.func(args)
        except StudioError as err:
            log.info("Refused: %s", err, exc_info=True, extra={terminal.TRACEBACK: True})
            print(f"error: {err}", file=term.stream)
            return getattr(err, "code", 2)
        except KeyboardInterrupt:
            print("\nInterrupted.", file=term.stream)
            return 130
        except BrokenPipeError:
            # The reader went away (runs | head): nothing to report. Point stdout at nothing, or Python complains
            # when it flushes at exit.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 141  # 128 + SIGPIPE: how shell tools end when their reader leaves
        except Exception as err:  # noqa: BLE001  (a bug: say so in one line; the log and --debug show where)
            log.error("Unexpected error:", exc_info=True, extra={terminal.TRACEBACK: True})
            where = "." if args.debug else f"; the traceback is in {term.log_file} (--debug shows it here)."
            print(f"error: unexpected {type(err).__name__}: {err}\nThis is a bug in DenseLoRA Studio{where}",
                  file=term.stream)
            return 1
