"""The command line: ``python -m denselora_app <command>`` (also installed as ``denselora``).

    train CONFIG.yaml [--set key=value ...] [--background]   train (foreground with a progress bar by default)
    runs                                                      list runs with state, method, rank, trainable %, loss
    stop RUN                                                  graceful stop: checkpoint + adapter, state 'stopped'
    resume RUN [--background]                                 continue a stopped or failed run from its checkpoint
    chat RUN_OR_ADAPTER --prompt TEXT [--compare] [...]       stream a reply (--compare: the base's, then the adapter's)
    eval RUN_OR_ADAPTER... [--data FILE] [--mode M] [...]     accuracy, loss and perplexity: base vs adapter
    publish RUN --repo-id USER/NAME [--private] [--dry-run OUT_DIR] [--message MSG] [--base-model HUB_ID]
            [--space USER/NAME [--space-dir DIR]]             upload the adapter (and a demo Space) to the Hub

``train`` also runs under ``torchrun --nproc_per_node N -m denselora_app train ...`` and ``accelerate launch``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from .config import ConfigError, RunConfig
from .runs import (
    Run,
    RunError,
    check_resumable,
    create_run,
    get_run,
    list_runs,
    request_stop,
    resume,
    start_worker,
)

log = logging.getLogger("denselora_app")


def _distributed() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _setup_logging(log_file: Path | None = None) -> None:
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file is not None:
        handlers.append(logging.FileHandler(log_file, encoding="utf-8"))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        handlers=handlers, force=True)


def cmd_train(args: argparse.Namespace) -> int:
    cfg = RunConfig.from_yaml(args.config).with_overrides(args.set or [])
    if args.background:
        run = create_run(cfg)
        start_worker(run)
        print(f"Started run {run.id} in the background.\n  folder: {run.path}\n  follow: tail -f {run.log_path}")
        return 0
    return _foreground(_create_run_on_all_ranks(cfg), resume=False)


def _create_run_on_all_ranks(cfg: RunConfig) -> Run:
    """Rank 0 creates the run folder; under torchrun the other ranks are told which one."""
    if not _distributed():
        return create_run(cfg)
    import torch.distributed as dist

    from .train import process_state

    state = process_state(cfg.device)
    holder = [str(create_run(cfg).path) if state.is_main_process else None]
    dist.broadcast_object_list(holder, src=0)
    return Run(Path(holder[0]))


def _foreground(run: Run, resume: bool) -> int:
    from .worker import execute

    _setup_logging(run.log_path)
    log.info("Run %s: %s", run.id, run.path)
    try:
        state = execute(run, resume=resume, show_progress=True)
    except KeyboardInterrupt:
        print(f"\nInterrupted. Resume with: python -m denselora_app resume {run.id}", file=sys.stderr)
        return 130
    except Exception:  # noqa: BLE001  (execute logged the traceback and recorded the failure)
        status = run.status()
        print(f"\nRun {run.id} failed: {status.get('error')}\nFix: {status.get('fix')}", file=sys.stderr)
        return 1
    print(f"\nRun {run.id} {state}. Your adapter is in {run.adapter_dir}")
    return 0


def cmd_runs(args: argparse.Namespace) -> int:
    runs = list_runs()
    if not runs:
        print("No runs yet. Start one with: python -m denselora_app train presets/quickstart-cpu.yaml")
        return 0
    header = f"{'RUN':40} {'STATE':10} {'METHOD':9} {'R':>4} {'TRAIN%':>8} {'STEP':>11} {'LOSS':>8} {'VAL':>8}"
    print(header)
    for run in runs:
        print(_run_line(run))
    return 0


def _run_line(run: Run) -> str:
    status, cfg = run.status(), run.config()
    metrics = run.metrics()
    losses = [m["loss"] for m in metrics if "loss" in m]
    evals = [m["eval_loss"] for m in metrics if "eval_loss" in m]
    trainable, total = status.get("trainable_parameters"), status.get("total_parameters")
    percent = f"{100 * trainable / total:.4f}" if trainable and total else "-"
    step = f"{status.get('step', 0)}/{status.get('max_steps', '?')}"
    loss = f"{losses[-1]:.4f}" if losses else "-"
    val = f"{evals[-1]:.4f}" if evals else "-"
    return f"{run.id:40} {status.get('state', '?'):10} {cfg.method:9} {cfg.r:>4} {percent:>8} {step:>11} {loss:>8} {val:>8}"


def cmd_stop(args: argparse.Namespace) -> int:
    run = get_run(args.run)
    request_stop(run)
    print(f"Asked run {run.id} to stop: it will save a checkpoint and its adapter after the current step.")
    return 0


def cmd_resume(args: argparse.Namespace) -> int:
    run = get_run(args.run)
    if args.background:
        resume(run)
        print(f"Resuming run {run.id} in the background. Follow: tail -f {run.log_path}")
        return 0
    check_resumable(run)
    return _foreground(run, resume=True)


def cmd_publish(args: argparse.Namespace) -> int:
    from .publish import PublishError, build_model_repo, build_space_repo, publish_model, publish_space

    if args.space_dir and not args.space:
        print("error: --space-dir needs --space USER/NAME, the Space's repository id.", file=sys.stderr)
        return 2
    if args.dry_run and args.space and not args.space_dir:
        print("error: --dry-run uploads nothing: add --space-dir DIR to export the Space too.", file=sys.stderr)
        return 2
    try:
        if args.dry_run:
            folder = build_model_repo(args.run, args.repo_id, args.dry_run, base_model=args.base_model)
            print(f"Wrote the repository {folder.repo_id} to {folder.path} (nothing uploaded):")
            print("".join(f"  {name}\n" for name in folder.files), end="")
        else:
            result = publish_model(args.run, args.repo_id, private=args.private, commit_message=args.message,
                                   base_model=args.base_model)
            print(result.message)
        if args.space_dir:
            # Carry the adapter when the Space could not download it: not uploaded yet, or private.
            space = build_space_repo(args.run, args.space, args.space_dir, adapter_repo_id=args.repo_id,
                                     bundle_adapter=bool(args.dry_run) or args.private, base_model=args.base_model)
            print(f"Wrote the Space {space.repo_id} to {space.path}. Try it: cd {space.path} && python app.py")
        elif args.space:
            # A private adapter repository is unreadable from the Space without a secret: the Space carries it.
            result = publish_space(args.run, args.space, adapter_repo_id=args.repo_id, bundle_adapter=args.private,
                                   private=args.private, commit_message=args.message, base_model=args.base_model)
            print(f"{result.message} (the Space builds and starts in a few minutes)")
    except PublishError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


def _user_error(err: Exception) -> int:
    print(f"error: {err}", file=sys.stderr)
    return 2


def _print_growing(text: str, shown: str) -> str:
    """Print what ``text`` adds to what was shown already; returns the new shown text."""
    print(text[len(shown):], end="", flush=True)
    return text


def cmd_chat(args: argparse.Namespace) -> int:
    from .chat import ChatEngine, ChatError, GenerationSettings

    _setup_logging()
    try:
        settings = GenerationSettings(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                      top_p=args.top_p, seed=args.seed, system_prompt=args.system)
        engine = ChatEngine(device=args.device)
        loaded = engine.select(args.adapter, args.checkpoint)
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
    except ChatError as err:
        return _user_error(err)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .chat import ChatEngine, ChatError, resolve_adapter
    from .evaluate import EVAL_FILE, EvalError, evaluate

    _setup_logging()
    try:
        refs = [resolve_adapter(ref, args.checkpoint) for ref in args.adapter]
        table = evaluate(refs, args.data, loss_data=args.loss_data, mode=args.mode, limit=args.limit,
                         strict=args.strict, engine=ChatEngine(device=args.device),
                         progress=lambda fraction, what: print(f"\r{what[:70]:70} {fraction:4.0%}", end="",
                                                               file=sys.stderr, flush=True))
    except (ChatError, EvalError) as err:
        return _user_error(err)
    finally:
        print(file=sys.stderr)  # end the progress line
    last = table.results[-1]
    unit = "examples" if table.mode == "loss" else "questions"
    held_out = f"; loss on {last.loss_dataset}" if last.loss_dataset not in (None, table.dataset) else ""
    print(f"{table.dataset}: {last.total} {unit}, mode {table.mode}{held_out}")
    print(table.to_text())
    for path in sorted({ref.run.path / EVAL_FILE for ref in refs if ref.run is not None}):
        print(f"Saved to {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="denselora", description="DenseLoRA Studio: fine-tune LLMs with DenseLoRA.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train from a YAML config (see presets/)")
    p.add_argument("config", type=Path)
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key (repeatable)")
    p.add_argument("--background", action="store_true", help="start a worker process and return")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("runs", help="list runs")
    p.set_defaults(func=cmd_runs)

    p = sub.add_parser("stop", help="stop a run gracefully (saves a checkpoint and the adapter)")
    p.add_argument("run")
    p.set_defaults(func=cmd_stop)

    p = sub.add_parser("resume", help="resume a stopped or failed run from its last checkpoint")
    p.add_argument("run")
    p.add_argument("--background", action="store_true")
    p.set_defaults(func=cmd_resume)

    p = sub.add_parser("publish", help="upload a run's adapter with a model card to the Hugging Face Hub",
                       description="Uses the token in HF_TOKEN, else your `hf auth login`.")
    p.add_argument("run")
    p.add_argument("--repo-id", required=True, metavar="USER/NAME", help="the model repository (created if missing)")
    p.add_argument("--private", action="store_true", help="create the repositories as private")
    p.add_argument("--dry-run", type=Path, metavar="OUT_DIR", help="write the repository to OUT_DIR, upload nothing")
    p.add_argument("--message", help="commit message")
    p.add_argument("--base-model", metavar="HUB_ID", help="the base model's Hub id, for runs on a local model folder")
    p.add_argument("--space", metavar="USER/NAME", help="also deploy a Gradio chat demo Space for the adapter")
    p.add_argument("--space-dir", type=Path, metavar="DIR", help="write the demo Space to DIR instead of uploading it")
    p.set_defaults(func=cmd_publish)

    p = sub.add_parser("chat", help="chat with an adapter (a run, an adapter folder or a Hub adapter id)")
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
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("eval", help="accuracy, loss and perplexity of adapters and their base model")
    p.add_argument("adapter", metavar="RUN_OR_ADAPTER", nargs="+")
    p.add_argument("--data", metavar="FILE", help="a multiple-choice .jsonl, or held-out data scored by loss "
                                                  "(default: the shipped multiple-choice set on the sample facts)")
    p.add_argument("--loss-data", metavar="FILE", help="held-out data (any training format) for loss and perplexity, "
                                                       "next to a multiple-choice --data")
    p.add_argument("--mode", choices=("generate", "loglik"), default="generate",
                   help="generate: greedy reply, answer label extracted; loglik: score each choice, no generation")
    p.add_argument("--limit", type=int, metavar="N", help="evaluate the first N questions only")
    p.add_argument("--checkpoint", type=int, metavar="N", help="a run's checkpoint-N instead of its final adapter")
    p.add_argument("--strict", action="store_true",
                   help="count a reply without an answer label as wrong, even when it names a choice")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_eval)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, RunError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
