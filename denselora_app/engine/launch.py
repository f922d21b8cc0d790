"""Starting and resuming runs: the one way every front end (the CLI in the foreground and in the background, the
app, and any later one) starts training.

    launch(cfg)            check everything that can be checked before training, then create the run folder and
                           start its worker (or, with background=False, hand the run back to train in this process);
                           with ``search``, the run is a learning-rate search (lr_finder.py) instead; with
                           ``jobs``, it trains on Hugging Face Jobs (hub/jobs.py), checked against the flavor's GPU
    resume_run(run)        the same checks for a stopped or failed run, then continue it from its last checkpoint
    stop_run(run)          stop it: a graceful stop here, or cancel its job on Hugging Face Jobs

The checks read the model's configuration (no weights: the model is built on the meta device), the adapter's
targets and rank against it, the memory the run needs against the device's free memory (``memory.py``), the first
rows of the data through the model's tokenizer, and the device, which only one run may hold at a time. A launch
that is refused creates nothing and raises LaunchError, whose message is one paragraph saying what is wrong and how
to fix it.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from filelock import FileLock

from denselora_app.config import ConfigError, RunConfig, StudioError
from denselora_app.hub.hosting import on_zerogpu
from denselora_app.runs import (
    LrSearch,
    Run,
    RunState,
    check_resumable,
    checkpoint_step,
    create_run,
    process_start_time,
    request_stop,
    run_holding,
    runs_dir,
)
from denselora_app.runs.status import spawned_workers

if TYPE_CHECKING:  # imported where used: launching imports torch and transformers only when it checks a run
    from denselora_app.engine.data import DataReport
    from denselora_app.engine.memory import MemoryPlan
    from denselora_app.engine.methods import ParameterCount
    from denselora_app.hub.jobs import JobsTarget

log = logging.getLogger(__name__)


class LaunchError(StudioError):
    """A run that must not start: ``what`` names the part at fault (configuration, model, adapter, data, device,
    runs folder), the message says what is wrong and how to fix it."""

    def __init__(self, what: str, message: str) -> None:
        named = message.lower().startswith(f"{what.lower()} ")  # "Device 'cuda': ..." needs no "Device:" before it
        super().__init__(message if named else f"{what[:1].upper()}{what[1:]}: {message}")
        self.what = what


@dataclass
class Preflight:
    """What the checks found: the device the run will hold, its parameter counts, its memory plan and the data's
    first rows."""

    device: str
    parameters: ParameterCount
    data: DataReport  # of the rows checked
    memory: MemoryPlan | None = None  # for the device above


ZEROGPU_TRAINING = (
    "this Space runs on ZeroGPU, which lends a GPU only to short calls the app makes for chat and evaluation (a few "
    "minutes at most). A training run is a process of its own that runs until it is done, so it would get no GPU "
    "here. To train, give the Space GPU hardware (Settings -> Hardware; or duplicate the Space and choose GPU "
    "hardware for the copy), or train on Hugging Face Jobs: python -m denselora_app train CONFIG --on-jobs FLAVOR "
    "(README: Training on Hugging Face Jobs)."
)


def run_device(device: str) -> str:
    """The device a setting means on this machine ('auto' -> 'cuda:0', 'mps' or 'cpu'; 'cuda' -> 'cuda:N'): the
    one name runs are compared by, so two settings that mean one device can never train on it together."""
    from denselora_app.engine.models import resolve_device

    try:
        return str(resolve_device(device))
    except ValueError as err:
        raise LaunchError("device", str(err)) from None


def preflight(
    cfg: RunConfig,
    *,
    load_config: Callable[[str, bool], Any] | None = None,
    load_tokenizer: Callable[[str, bool], Any] | None = None,
    ignore_memory: bool = False,
    flavor: str | None = None,
) -> Preflight:
    """Every check that can be made before a run exists; LaunchError on the first problem. ``ignore_memory``
    starts a run the memory planner says will not fit (the plan is still made and logged). With ``flavor`` the run
    is to train on Hugging Face Jobs: the device and memory checked are that flavor's GPU (jobs.remote_device).

    ``load_config`` / ``load_tokenizer`` (spec, trust_remote_code) default to the models module's loaders; the
    app passes its cached ones, so a launch right after a preview reads nothing twice.
    """
    from denselora_app.engine import models, sharding, trackers
    from denselora_app.engine.data import check_data
    from denselora_app.engine.memory import free_memory, plan_memory
    from denselora_app.engine.methods import AdapterError, check_adapter
    from denselora_app.engine.sources import DataError, data_source

    remote_free: int | None = None  # the memory of a Jobs flavor's GPU
    if flavor is not None:
        from denselora_app.hub.jobs import JobsError, remote_device

        try:
            remote = remote_device(cfg, flavor)
            device, remote_free = remote.device, remote.memory_bytes
        except JobsError as err:
            raise LaunchError("Hugging Face Jobs", str(err)) from None
    else:
        if on_zerogpu():
            raise LaunchError("hardware", ZEROGPU_TRAINING)
        device = run_device(cfg.device)
        try:
            models.resolve_dtype(cfg.dtype, models.resolve_device(device))
        except ValueError as err:
            raise LaunchError("dtype", str(err)) from None
        if (problem := sharding.fsdp_problem(cfg, models.resolve_device(device).type)) is not None:
            raise LaunchError("fsdp", problem)
        try:
            trackers.check_installed(cfg.report_to)
        except ConfigError as err:
            raise LaunchError("report_to", str(err)) from None
    load_config = load_config or (lambda spec, trust: models.load_config(spec, trust_remote_code=trust))
    load_tokenizer = load_tokenizer or (lambda spec, trust: models.load_tokenizer(spec, trust_remote_code=trust))
    try:
        model_config = load_config(cfg.model, cfg.trust_remote_code)
        parameters = check_adapter(model_config, cfg)
    except models.ModelLoadError as err:
        raise LaunchError("model", str(err)) from None
    except AdapterError as err:
        raise LaunchError("adapter", str(err)) from None
    except Exception as err:  # noqa: BLE001  (an architecture transformers cannot build from its config)
        raise LaunchError("model", f"{cfg.model!r} cannot be built from its configuration ({type(err).__name__}: "
                                   f"{err}). Choose a causal language model that transformers supports.") from None
    if cfg.init_adapter and flavor is not None:
        raise LaunchError("init_adapter", f"init_adapter {cfg.init_adapter!r}: a run on Hugging Face Jobs cannot start "
                                          "from a run on this machine (the job sees only the Hub); train it here, or "
                                          "leave init_adapter empty.")
    if cfg.init_adapter:
        from denselora_app.engine.stages import StartError, start_run

        try:
            start_run(cfg)
        except StartError as err:
            raise LaunchError("init_adapter", str(err)) from None
    free = remote_free if flavor is not None else free_memory(device)
    memory = plan_memory(model_config, cfg, parameters, device, free)
    if not memory.fits:
        if not ignore_memory:
            where = f"On Hugging Face Jobs' {flavor} (its GPU's memory), " if flavor else ""
            raise LaunchError("memory", f"{where}{memory.refusal()} If you know it fits, start anyway with "
                                        "--ignore-memory-plan.")
        log.warning("Starting although the memory plan does not fit: %s", memory.summary())
    try:
        tokenizer = load_tokenizer(cfg.model, cfg.trust_remote_code)
    except models.ModelLoadError as err:
        raise LaunchError("model", str(err)) from None
    try:
        if cfg.stage != "sft":
            from denselora_app.engine.preferences import check_pairs

            report = check_pairs(data_source(cfg.data), tokenizer, cutoff_len=cfg.cutoff_len, val_size=cfg.val_size,
                                 stage=cfg.stage)
        else:
            report = check_data(data_source(cfg.data), tokenizer, fmt=cfg.data_format, cutoff_len=cfg.cutoff_len,
                                train_on_inputs=cfg.train_on_inputs, val_size=cfg.val_size)
    except DataError as err:
        raise LaunchError("data", str(err)) from None
    return Preflight(device=device, parameters=parameters, data=report, memory=memory)


def _device_lock(root: Path) -> FileLock:
    """Held while a launch checks the device and records its claim, so two launches cannot both find it free."""
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise LaunchError("runs folder", f"cannot create {root}: {err.strerror or err}. Set DENSELORA_RUNS to a "
                                         "writable folder.") from None
    return FileLock(str(root / ".launch.lock"))


def _claim(device: str, root: Path, share_device: bool, exclude: Run | None = None) -> None:
    if share_device:
        return
    holder = run_holding(device, root, exclude=exclude)
    if holder is not None:
        status = holder.status()
        progress = f", step {status.step}/{status.max_steps}" if status.max_steps else ""
        raise LaunchError(
            "device",
            f"{device} is in use by run {holder.id} ({status.state}{progress}); two trainings on one device fight "
            f"for its memory. Wait for that run to finish, stop it (python -m denselora_app stop {holder.cli_name}), "
            "or, if you know both fit, start anyway with --share-device.",
        )


def launch(
    cfg: RunConfig,
    *,
    background: bool = True,
    share_device: bool = False,
    root: Path | None = None,
    checked: Preflight | None = None,
    search: LrSearch | None = None,
    jobs: JobsTarget | None = None,
    token: str | None = None,
    **checks: Any,
) -> Run:
    """Check ``cfg`` (unless ``checked`` holds this config's preflight), claim its device, create its run folder
    and, with ``background``, start its worker. Without ``background`` the caller trains the returned run itself
    (``worker.execute``). Raises LaunchError, having created nothing, when the run must not start.

    With ``jobs`` (a jobs.JobsTarget) the run trains on Hugging Face Jobs instead: checked against the flavor's GPU,
    submitted with ``token`` (hub.account.resolve_token decides which), and no device here is claimed."""
    if jobs is not None:
        from denselora_app.hub.jobs import submit

        checked = checked or preflight(cfg, flavor=jobs.flavor, **checks)
        run = submit(cfg, jobs, token=token, root=root)
        log.info("Run %s on Hugging Face Jobs (%s): %s", run.id, jobs.flavor, checked.parameters.summary(cfg.method))
        return run
    checked = checked or preflight(cfg, **checks)
    if cfg.init_adapter:  # the run folder records the run it started from by its id, however it was named
        from denselora_app.engine.stages import start_run

        cfg = dataclasses.replace(cfg, init_adapter=start_run(cfg).id)
    root = root or runs_dir()
    try:
        with _device_lock(root):
            _claim(checked.device, root, share_device)
            run = create_run(cfg, root, device=checked.device, search=search)
    except OSError as err:
        raise LaunchError("runs folder", f"cannot write in {root}: {err.strerror or err}. Set DENSELORA_RUNS to a "
                                         "writable folder.") from None
    log.info("Run %s on %s: %s", run.id, checked.device, checked.parameters.summary(cfg.method))
    if background:
        start_worker(run)
    return run


def resume_run(run: Run, *, background: bool = True, share_device: bool = False, **checks: Any) -> Run:
    """Continue a stopped or failed run from its last complete checkpoint, after the same checks as a launch
    (its data or model may have changed since). Raises RunError or LaunchError, changing nothing, when it cannot."""
    from denselora_app.engine import sharding

    checkpoint = check_resumable(run)
    cfg = run.config()
    if (problem := sharding.resume_problem(checkpoint, cfg, sharding.world_size())) is not None:
        raise LaunchError("fsdp", problem)
    checked = preflight(cfg, **checks)
    root = run.path.parent
    with _device_lock(root):
        _claim(checked.device, root, share_device, exclude=run)
        checkpoint = check_resumable(run)  # another process may have resumed it meanwhile
        run.clear_stop_request()  # a killed run's unanswered one
        # The step is the checkpoint's until the worker trains on: the steps after it are trained again.
        run.update_status(state=RunState.QUEUED, step=checkpoint_step(checkpoint), device=checked.device,
                          launcher_pid=os.getpid(),
                          launcher_started=process_start_time(os.getpid()), pid=None, pid_started=None,
                          error=None, error_kind=None, fix=None, note=None, finished_at=None)
    if background:
        start_worker(run, resume=True)
    return run


def stop_run(run: Run, *, token: str | None = None) -> str:
    """Stop a run: its worker stops gracefully (runs.request_stop), or its job on Hugging Face Jobs is cancelled
    (with ``token``). Returns what the user should expect; RunError or JobsError when it cannot."""
    if run.job() is not None:
        from denselora_app.hub.jobs import cancel

        return cancel(run, token)
    return request_stop(run)


def start_worker(run: Run, resume: bool = False) -> int:
    """Launch ``python -m denselora_app.engine.worker`` for this run in its own session; returns its pid.

    Called once the run and its device have been checked (launch, resume_run).
    """
    cmd = [sys.executable, "-m", "denselora_app.engine.worker", str(run.path)] + (["--resume"] if resume else [])
    with open(run.log_path, "ab") as log_file:
        proc = subprocess.Popen(
            cmd,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # survives the app and its process group; never writes to a pipe
            cwd=os.getcwd(),
        )
    run.update_status(state=RunState.QUEUED, pid=proc.pid, pid_started=process_start_time(proc.pid),
                      error=None, error_kind=None, fix=None, note=None, finished_at=None)
    spawned_workers.append(proc)
    return proc.pid
