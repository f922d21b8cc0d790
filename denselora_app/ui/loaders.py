"""The engine's slow loaders, imported lazily and cached for the app; and storing uploaded data files.

Reading the embedded GGUF model's config or tokenizer takes ~10 s each, and the Train tab needs them on every rank
change or data preview, so they are loaded once per model spec. The engine modules (torch, transformers, datasets)
are imported inside these functions: the app must serve its first page before any of them is loaded.
"""

from __future__ import annotations

import hashlib
import shutil
from functools import lru_cache
from pathlib import Path
from typing import Any

from denselora_app.config import RunConfig
from denselora_app.hub.access import Caller, identify, uploads_dir
from denselora_app.rules import DATA_FILE_TYPES
from denselora_app.runs import safe_name

UPLOAD_TYPES = DATA_FILE_TYPES  # what data.py reads; checked before copying


def _stamp(spec: str) -> float | None:
    """Changes when a local model folder or file changes, so a re-saved model is not served from the cache."""
    path = Path(spec).expanduser()
    try:
        return (path / "config.json").stat().st_mtime if path.is_dir() else path.stat().st_mtime
    except OSError:
        return None


@lru_cache(maxsize=8)
def _config(spec: str, trust_remote_code: bool, stamp: float | None) -> Any:
    from denselora_app.engine import models

    return models.load_config(spec, trust_remote_code=trust_remote_code)


@lru_cache(maxsize=4)
def _tokenizer(spec: str, trust_remote_code: bool, stamp: float | None) -> Any:
    from denselora_app.engine import models

    return models.load_tokenizer(spec, trust_remote_code=trust_remote_code)


@lru_cache(maxsize=8)
def _info(spec: str, trust_remote_code: bool, stamp: float | None) -> Any:
    from denselora_app.engine import models

    return models.describe_model(spec, trust_remote_code=trust_remote_code)


def model_config(spec: str, trust_remote_code: bool = False) -> Any:
    """transformers config of a model spec (models.load_config), cached."""
    return _config(spec.strip(), trust_remote_code, _stamp(spec.strip()))


def tokenizer(spec: str, trust_remote_code: bool = False) -> Any:
    """The tokenizer of a model spec (models.load_tokenizer), cached."""
    return _tokenizer(spec.strip(), trust_remote_code, _stamp(spec.strip()))


def model_info(spec: str, trust_remote_code: bool = False) -> Any:
    """models.describe_model(spec), cached."""
    return _info(spec.strip(), trust_remote_code, _stamp(spec.strip()))


def model_errors() -> tuple[type[Exception], ...]:
    """The exceptions whose message tells a user what is wrong with a model spec, device or dtype."""
    from denselora_app.engine.models import ModelLoadError

    return ModelLoadError, ValueError


def data_source(cfg: RunConfig) -> str:
    """The data path or Hub name the training will read (the sample name mapped to its file)."""
    from denselora_app.engine.sources import data_source as source_of

    return source_of(cfg.data)


def store_upload(temp_path: str, who: Caller | None = None) -> Path:
    """Copy an uploaded file (gradio's temporary copy) to the caller's uploads folder (access.uploads_dir:
    runs/uploads/, on a Space runs/uploads/<user>/; ``who`` None: the local user's), so run configs point at a
    stable path.

    The stored name is the upload's name made safe (no folders, no '..') plus a short hash of the content, so the
    same file uploaded twice is stored once and two different files with one name never overwrite each other.
    """
    source = Path(temp_path)
    suffix = source.suffix.lower()
    if suffix not in UPLOAD_TYPES:
        from denselora_app.engine.sources import DataError

        raise DataError(f"{source.name}: unsupported file type '{source.suffix}' - upload one of "
                        f"{', '.join(UPLOAD_TYPES)}")
    digest = hashlib.sha256()
    with open(source, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    folder = uploads_dir(who if who is not None else identify(None))
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{safe_name(source.stem)}-{digest.hexdigest()[:8]}{suffix}"
    if not target.exists():
        partial = target.with_name(f".{target.name}.partial")
        shutil.copyfile(source, partial)
        partial.replace(target)  # a run reading the folder never sees half a file
    return target
