"""The package's plan holds: folders along the data flow, imports only downward, small modules, one home per rule.

docs/architecture.md draws the same layers; a change that breaks one of these rules changes that page too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from denselora_app import rules

PACKAGE = Path(__file__).resolve().parents[1] / "denselora_app"
MAX_LINES = 600
MAX_TOP_MODULES = 10

# Lowest first: a part may import its own layer and the ones before it, never one after it.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("denselora",),  # the method: knows nothing of the studio
    ("rules", "config"),  # allowed values and shared decisions; the run configuration
    ("runs",),  # the run-folder contract
    ("terminal",),  # what the terminal and the log files show
    ("hub",),  # talking to the Hugging Face Hub: accounts, Jobs, publishing, Spaces and their visitors
    ("engine",),  # data, models, methods, memory, training, launch
    ("serving",),  # adapters in use: chat, evaluation
    ("export",),  # the adapter as a standard LoRA, a merged model, a GGUF file
    ("ui", "cli", "__main__"),  # the front ends
)
LAYER_OF = {part: n for n, parts in enumerate(LAYERS) for part in parts}


def modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "space_template" not in p.parts)


def part_of(module: str) -> str:
    """The top-level part of ``denselora_app.x.y`` (x), or '' for the package itself."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, *, top_level_only: bool = False) -> set[str]:
    """The studio modules ``path`` imports (``from denselora_app.x import y`` counts as x.y when y is a module)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    nodes = tree.body if top_level_only else ast.walk(tree)
    found = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("denselora_app"):
            for alias in node.names:
                candidate = f"{node.module}.{alias.name}"
                is_module = (PACKAGE.parent / Path(*candidate.split("."))).with_suffix(".py").exists() or (
                    PACKAGE.parent / Path(*candidate.split(".")) / "__init__.py").exists()
                found.add(candidate if is_module else node.module)
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("denselora_app")}
    return found


def test_the_folders_follow_the_data_flow():
    packages = {p.parent.name for p in PACKAGE.glob("*/__init__.py")}
    assert {"denselora", "runs", "engine", "serving", "hub", "ui"} <= packages
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(top) <= MAX_TOP_MODULES, top
    assert set(LAYER_OF) >= packages | {p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__"}


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_module_is_too_long_to_read(path):
    assert len(path.read_text(encoding="utf-8").splitlines()) <= MAX_LINES


def test_imports_only_run_downward():
    upward = []
    for path in modules():
        here = part_of(module_name(path))
        for target in imports(path):
            there = part_of(target)
            if here and there and LAYER_OF[there] > LAYER_OF[here]:
                upward.append(f"{module_name(path)} -> {target}")
    assert not upward


def test_the_method_package_imports_nothing_of_the_studio():
    """denselora/ is shipped inside published adapters, where the studio is not installed."""
    for path in (PACKAGE / "denselora").glob("*.py"):
        assert not imports(path), path


def test_no_import_cycle():
    graph = {module_name(p): {t for t in imports(p, top_level_only=True) if t != module_name(p)} for p in modules()}
    done: set[str] = set()

    def visit(module: str, path: tuple[str, ...]) -> None:
        if module in path:
            pytest.fail("import cycle: " + " -> ".join(path[path.index(module):] + (module,)))
        if module in done or module not in graph:
            return
        for target in graph[module]:
            visit(target, path + (module,))
        done.add(module)

    for module in graph:
        visit(module, ())


@pytest.mark.parametrize(("text", "home"), [
    ("validate_repo_id", "rules.py"),  # is this a Hub id: rules.hub_id / hub_id_problem
    ("adapter_model.safetensors", "runs/files.py"),  # has this folder a whole adapter: runs.adapter_complete
    ("status.json", "runs/"),  # the run folder's files: only the runs package names them
    ("metrics.jsonl", "runs/"),
    ("data_report.json", "runs/"),
    ("summary.json", "runs/"),
])
def test_each_rule_has_one_home(text, home):
    needles = (text,) if text == "validate_repo_id" else (f'"{text}', f"'{text}")

    def spells(path: Path) -> bool:
        lines = path.read_text(encoding="utf-8").splitlines()
        return any(n in line for line in lines if not line.lstrip().startswith("#") for n in needles)

    elsewhere = [str(p.relative_to(PACKAGE)) for p in modules()
                 if not str(p.relative_to(PACKAGE)).startswith(home) and spells(p)]
    assert not elsewhere


def test_allowed_values_are_listed_only_in_rules():
    """A tuple or list literal that spells out one of rules' lists elsewhere would drift from it."""
    lists = {values for name, values in vars(rules).items() if name.isupper() and isinstance(values, tuple)
             and len(values) > 1 and all(isinstance(v, str) for v in values)}
    copies = []
    for path in modules():
        if path.name == "rules.py" or "denselora" in path.parts:  # the method package keeps checked copies
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.Tuple, ast.List)) and all(isinstance(e, ast.Constant) for e in node.elts):
                values = tuple(e.value for e in node.elts)
                if values in lists or (values[:1] == ("auto",) and values[1:] in lists):
                    copies.append(f"{path.relative_to(PACKAGE)}:{node.lineno}")
    assert not copies
