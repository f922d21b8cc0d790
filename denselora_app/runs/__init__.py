"""Runs on disk: one folder per run, a worker process per training, and the state a reader can trust.

    runs/<run-id>/
        config.yaml      the resolved RunConfig
        status.json      a Status: state, the training process, the device it holds, progress, how it ended
        metrics.jsonl    one JSON object per logged step (loss, eval_loss, learning_rate, grad_norm, tokens/s, ...)
        data_report.json what the data pipeline read, used and dropped
        train.log        everything the training process printed
        checkpoints/     resume points (Trainer checkpoints); one counts only once its completeness marker is written
        adapter/         the final adapter (PEFT format)
        summary.json     RunFacts at the end of training, for tools outside the studio
        eval.json        evaluation results (written by serving/evaluate.py)
        lr_search.json   only in a learning-rate search (engine/lr_finder.py): the rates, its finished trials,
                         the chosen rate; such a run trains no adapter and keeps no checkpoints
        PUBLIC           present when the owner made the run public on a Space (visitors see it, chat with it)
        job.json         a JobRecord, for a run that trains on Hugging Face Jobs (hub/jobs.py keeps the rest in step)
        trackers/        what the experiment trackers of report_to write locally (tensorboard/, wandb/, mlruns/)

This package is the only reader and writer of that folder: everything else asks a ``Run`` for its ``status()``,
``facts()``, ``checkpoints()`` or ``evaluation()``, and no other module spells a file name in it. What a user types to
name a run (its id, ``runs/<id>``, a folder's path) becomes a ``Run`` only through ``resolve_run``, for every command
and the app alike. Reading is tolerant and never writes: a damaged file makes that one run 'damaged' (with the reason)
and nothing else; a read-only runs folder can be listed. Status and metrics are written atomically (write a temp file,
then rename), so readers never see half a file. The worker runs in its own session with its output in train.log, so the
app can die or reload without stopping (or blocking) training.

Its parts: ``files`` (the layout: every name above, the runs folder, safe JSON), ``status`` (``Status``, ``RunState``,
whether a process is alive), ``logs`` (the log's format, the metrics line, why a run failed), ``records`` (a
learning-rate search, a Jobs job, a run's facts), ``run`` (``Run``, ``create_run``), ``reference`` (``resolve_run``,
``list_runs``), ``control`` (stop, delete, resume checks, results from elsewhere). Import from the package:
"""

from denselora_app.runs.control import (
    check_deletable,
    check_resumable,
    delete_run,
    request_stop,
    run_holding,
    take_results,
)
from denselora_app.runs.files import (
    ADAPTER_CONFIG,
    ADAPTER_DIR,
    ADAPTER_WEIGHTS,
    CHECKPOINT_MARKER,
    RESULT_FILES,
    RunError,
    adapter_complete,
    adapter_problem,
    adapter_weights,
    checkpoint_step,
    finite_number,
    mark_checkpoint_complete,
    read_json,
    runs_dir,
    safe_name,
    write_json_atomic,
)
from denselora_app.runs.logs import (
    LOG_FORMAT,
    Failure,
    FailureKind,
    classify_failure,
    metrics_line,
    own_log_lines,
    parse_metrics_line,
)
from denselora_app.runs.records import JobRecord, LrSearch, LrTrial, RunFacts, format_rate
from denselora_app.runs.reference import (
    AdapterPlace,
    adapter_place,
    is_run_folder,
    list_runs,
    resolve_run,
    runs_folder_form,
    typed_folder,
)
from denselora_app.runs.run import Run, create_run
from denselora_app.runs.status import FINAL_STATES, RunKind, RunState, Status, process_start_time
