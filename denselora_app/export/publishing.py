"""``publish RUN --as lora|merged|gguf``: export the run into a folder, then hand that folder to hub/publish as a
model repository (hub/ sits below the export and never imports it: the front ends come here, and this module calls
down into the hub).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

from denselora_app.export.build import export_run
from denselora_app.hub.publish import STAGING, RepoFolder, exported_repo, push_folder
from denselora_app.rules import GGUF_TYPES
from denselora_app.runs import Run


def build_export_repo(
    run: Run,
    kind: str,
    repo_id: str,
    out_dir: Path | str | None = None,
    *,
    calibration: str | None = None,
    rank: int | None = None,
    gguf_type: str = GGUF_TYPES[0],
    base_model: str | None = None,
    progress: Callable[[str], None] | None = None,
) -> RepoFolder:
    """Export ``run`` as ``kind`` into ``out_dir`` (new or empty; without it the run's ``publish/model-<kind>`` folder
    is rebuilt) and make it the model repository ``repo_id``, its card stating how it was made and its fidelity."""
    if out_dir is None:
        out_dir = run.path / STAGING / f"model-{kind}"
        shutil.rmtree(out_dir, ignore_errors=True)  # what the previous build left; nothing else lives there
    result = export_run(run, kind, out_dir, calibration=calibration, rank=rank, gguf_type=gguf_type,
                        progress=progress)
    return exported_repo(run, repo_id, result.folder, result.facts, base_model=base_model)


def publish_export(
    run: Run,
    kind: str,
    repo_id: str,
    *,
    dry_run: Path | str | None = None,
    private: bool = False,
    commit_message: str | None = None,
    base_model: str | None = None,
    token: str | None = None,
    **export_options,
) -> str:
    """Build the export's repository (into ``dry_run`` when given, uploading nothing; else into the run's staging
    folder, then pushed to ``repo_id``); returns what was done, for the user."""
    folder = build_export_repo(run, kind, repo_id, dry_run, base_model=base_model, **export_options)
    if dry_run is not None:
        listing = "".join(f"\n  {name}" for name in folder.files)
        return f"Wrote the repository {folder.repo_id} to {folder.path} (nothing uploaded):{listing}"
    message = commit_message or f"Publish the {kind} export of a DenseLoRA adapter"
    return push_folder(folder, private=private, commit_message=message, token=token).message
