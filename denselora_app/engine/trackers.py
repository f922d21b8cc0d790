"""The experiment trackers a run also reports to (``report_to``): whether each is installed, and the Trainer callbacks
that feed them, writing inside the run folder and working offline by default. The run folder's metrics.jsonl is
written either way (train.RunCallback); a tracker only gets a copy.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from transformers import TrainerCallback

from denselora_app.config import ConfigError
from denselora_app.runs import Run

log = logging.getLogger(__name__)

# tracker -> (the module that must import, the pip package that provides it)
PACKAGES: dict[str, tuple[str, str]] = {
    "tensorboard": ("tensorboard", "tensorboard"),
    "wandb": ("wandb", "wandb"),
    "mlflow": ("mlflow", "mlflow"),
    "trackio": ("trackio", "trackio"),
}
PROJECT = "denselora-studio"  # the W&B project and MLflow experiment a run reports under, unless set otherwise


def check_installed(trackers: Sequence[str]) -> None:
    """ConfigError naming every tracker of ``report_to`` whose package is missing here, with the install line:
    asked before a run exists, so a missing package never fails a run at its first step."""
    missing = [name for name in trackers if importlib.util.find_spec(PACKAGES[name][0]) is None]
    if missing:
        packages = " ".join(PACKAGES[name][1] for name in missing)
        raise ConfigError(f"report_to names {', '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} not "
                          f"installed here: pip install {packages} (or remove {'it' if len(missing) == 1 else 'them'} "
                          "from report_to).")


@contextmanager
def offline_defaults(run: Run, trackers: Sequence[str]) -> Iterator[None]:
    """While the run trains: W&B offline and MLflow to a file store, both inside the run folder, unless the user's
    environment already says where they go (WANDB_MODE or WANDB_API_KEY; MLFLOW_TRACKING_URI). Restored after, so
    a foreground run leaves the caller's environment as it was."""
    defaults: dict[str, str] = {}
    if "wandb" in trackers:
        if not (os.environ.get("WANDB_MODE") or os.environ.get("WANDB_API_KEY")):
            defaults["WANDB_MODE"] = "offline"
        defaults |= {"WANDB_DIR": str(run.trackers_dir), "WANDB_PROJECT": PROJECT}
    if "mlflow" in trackers:  # the file store needs no database; MLflow 3 asks for an explicit opt-in to it
        defaults |= {"MLFLOW_TRACKING_URI": (run.trackers_dir / "mlruns").as_uri(), "MLFLOW_ALLOW_FILE_STORE": "true",
                     "MLFLOW_EXPERIMENT_NAME": PROJECT}
    added = {key: value for key, value in defaults.items() if key not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


def callbacks(run: Run, trackers: Sequence[str]) -> list[TrainerCallback]:
    """The Trainer's own integration callback for each tracker; TensorBoard writes to the run folder's
    trackers/tensorboard."""
    from transformers.integrations import INTEGRATION_TO_CALLBACK

    made: list[TrainerCallback] = []
    for name in trackers:
        if name == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            folder = run.trackers_dir / "tensorboard"
            made.append(INTEGRATION_TO_CALLBACK[name](tb_writer=SummaryWriter(log_dir=str(folder))))
            log.info("TensorBoard logs go to %s (tensorboard --logdir %s)", folder, folder)
        else:
            made.append(INTEGRATION_TO_CALLBACK[name]())
    return made
