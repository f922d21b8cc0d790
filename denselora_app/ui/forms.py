"""The Train tab's settings as a RunConfig and back: presets on disk and the equivalent CLI command.

Every RunConfig field has exactly one control, named like the field, so the form's values *are* a RunConfig's
``to_dict()`` and loading a preset can fill every control.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
from pathlib import Path
from typing import Any

import yaml

from denselora_app.config import ConfigError, RunConfig
from denselora_app.runs import runs_dir, safe_name

FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(RunConfig))
DEFAULT_PRESET = "quickstart-cpu.yaml"  # the preset that trains in minutes on a laptop CPU: the app's starting point


def config_from_settings(settings: dict[str, Any]) -> RunConfig:
    """The RunConfig the controls describe; ConfigError (a user-facing message) when a value is wrong."""
    missing = [name for name in FIELDS if name not in settings]
    if missing:
        raise ConfigError(f"Missing settings: {', '.join(missing)}.")
    return RunConfig.from_dict({name: settings[name] for name in FIELDS})


# ---- presets ------------------------------------------------------------------------------------------------------


SHIPPED_PRESETS = Path("presets")  # the presets the studio ships (next to the CLI's `train presets/x.yaml`)


def presets_dir() -> Path:
    """Where the user's own presets are saved: $DENSELORA_PRESETS, else presets/ in the runs folder (so on a Space
    they live, and are kept, wherever its runs are). The shipped presets are never written."""
    override = os.environ.get("DENSELORA_PRESETS")
    return Path(override) if override else runs_dir() / "presets"


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("*.yaml")) if folder.is_dir() else []


def list_presets() -> list[str]:
    """Every preset, by file name: the shipped ones and the user's own."""
    return sorted({*_names(SHIPPED_PRESETS), *_names(presets_dir())})


def preset_path(name: str) -> Path:
    # Only names that are listed: a preset name from the browser must never reach outside the folders. A shipped
    # name is always the shipped preset (saving refuses to shadow one).
    for folder in (SHIPPED_PRESETS, presets_dir()):
        if name in _names(folder):
            return folder / name
    raise ConfigError(f"No preset named '{name}' in {SHIPPED_PRESETS} or {presets_dir()}.")


def load_preset(name: str) -> RunConfig:
    return RunConfig.from_yaml(preset_path(name))


def initial_config() -> tuple[RunConfig, str | None]:
    """The settings the app opens with: the CPU quick-start preset when it is there, else RunConfig defaults."""
    if DEFAULT_PRESET in list_presets():
        try:
            return load_preset(DEFAULT_PRESET), DEFAULT_PRESET
        except ConfigError:
            pass  # a broken preset file must not stop the app from starting; the defaults still work
    return RunConfig(), None


def save_preset(cfg: RunConfig, name: str) -> Path:
    """Write ``cfg`` to the user's presets folder as <safe name>.yaml (overwriting a user preset of that name) and
    return the path; a name that would shadow a shipped preset is refused."""
    if not name.strip():
        raise ConfigError("Give the preset a name first.")
    file = f"{safe_name(name.removesuffix('.yaml'))}.yaml"
    if file in _names(SHIPPED_PRESETS):
        raise ConfigError(f"'{file}' is a preset shipped with the studio, which is never overwritten: save yours "
                          "under another name.")
    folder = presets_dir()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / file
    cfg.to_yaml(path)
    return path


# ---- the equivalent command ---------------------------------------------------------------------------------------


def _yaml_scalar(value: Any) -> str:
    """A value as `--set key=value` expects it (parsed back as YAML): 8, 0.0003, true, [q_proj, v_proj], text."""
    text = yaml.safe_dump(value, default_flow_style=True, width=1_000_000).strip()
    return text.removesuffix("...").strip()  # PyYAML ends a lone scalar with a document-end marker


def _display_path(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path.resolve())


def cli_command(cfg: RunConfig, preset: str | None) -> str:
    """Markdown showing the CLI call that trains exactly ``cfg``.

    From a preset: the preset plus ``--set`` for each key that differs. Without one: the full config to save,
    then the call.
    """
    if preset:
        base = load_preset(preset)
        changes = [
            f"--set {shlex.quote(f'{name}={_yaml_scalar(value)}')}"
            for name, value in cfg.to_dict().items()
            if value != getattr(base, name)
        ]
        command = " \\\n    ".join([f"python -m denselora_app train {shlex.quote(_display_path(preset_path(preset)))}",
                                     *changes])
        return f"```bash\n{command}\n```"
    return (
        f"Save this as `my-run.yaml`:\n\n```yaml\n{cfg.to_yaml()}```\n\nthen run:\n\n"
        "```bash\npython -m denselora_app train my-run.yaml\n```"
    )
