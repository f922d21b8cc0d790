"""The command line: ``python -m denselora_app <command>`` (also installed as ``denselora``).

    train CONFIG.yaml [--set key=value ...] [--background]   train (foreground with a progress bar by default)
    runs                                                      list runs with state, method, rank, trainable %, loss
    stop RUN                                                  graceful stop: checkpoint + adapter, state 'stopped'
    resume RUN [--background]                                 continue a stopped or failed run from its checkpoint

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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, RunError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
