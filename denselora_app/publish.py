"""Publish a run's adapter to the Hugging Face Hub, and deploy a chat demo for it on Spaces.

    build_model_repo(run, repo_id)       the model repository's exact content, in a folder: review it, zip it,
                                         upload it by hand, or push it (what ``publish --dry-run OUT_DIR`` writes)
    build_space_repo(run, space_id)      the demo Space's exact content: app.py, the DenseLoRA package, README.md
    push_folder(folder)                  create the repository (exist_ok) and upload the folder in one commit
    publish_model / publish_space        build + push: what the CLI and the app's Publish tab call

Every failure a user can fix is a PublishError whose message says what to do. The token lives only in memory:
it is never written to a file, logged, or put into a message.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import sys
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from fnmatch import fnmatch
from importlib.metadata import version
from pathlib import Path
from typing import Any

import jinja2
from huggingface_hub import HfApi, ModelCard, ModelCardData, SpaceCard, SpaceCardData, get_token
from huggingface_hub import constants as hub_constants
from huggingface_hub.errors import HfHubHTTPError, HFValidationError
from huggingface_hub.utils import validate_repo_id

from .config import EMBEDDED_HUB_ID, EMBEDDED_MODEL, SAMPLE_DATA, RunConfig, StudioError
from .rules import hub_id as hub_id_of
from .hosting import on_space
from .runs import Run, RunError, RunState, finite_number, read_json, resolve_run

try:  # huggingface_hub 2.x speaks HTTP through httpx2, 1.x through httpx
    from httpx2 import TransportError
except ImportError:  # pragma: no cover - depends on the installed huggingface_hub
    from httpx import TransportError

log = logging.getLogger(__name__)

PACKAGE_DIR = Path(__file__).resolve().parent
DENSELORA_PACKAGE = PACKAGE_DIR / "denselora"
SPACE_TEMPLATE = PACKAGE_DIR / "space_template"
SPACE_SETTINGS = "denselora_space.json"  # read by the Space's app.py
# Copied as they are into the Space: the app, and its copy of the studio's prompt renderer.
SPACE_FILES = ("app.py", "prompts.py")

PAPER_URL = "https://arxiv.org/abs/2505.23808"

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
TOKENIZER_PATTERNS = ("tokenizer*", "special_tokens_map.json", "added_tokens.json", "chat_template.*", "vocab.*",
                      "merges.txt", "*.model")
LOSS_CURVE = "loss_curve.png"
STAGING = "publish"  # <run>/publish/{model,space}: what the last publish built, kept for review and retries

# Config keys that describe where and how the run was bookkept rather than the adapter; left out of the card.
_CARD_SKIPS = {"run_name", "device", "logging_steps", "save_steps", "save_total_limit", "trust_remote_code"}
_HUB_CACHE_FOLDER = re.compile(r"^models--([^/]+?)--([^/]+)$")  # huggingface_hub's cache layout


class PublishError(StudioError, RuntimeError):
    """Publishing cannot go on; the message says why and what to do, and never contains the token."""


@dataclass(frozen=True)
class RepoFolder:
    """A local folder holding exactly what goes into one Hub repository."""

    path: Path
    repo_id: str
    repo_type: str  # "model" or "space"
    files: list[str]  # relative paths, sorted


@dataclass(frozen=True)
class HubAccount:
    """Who a token belongs to, and the organizations where that user can create repositories."""

    name: str
    orgs: tuple[str, ...]

    @property
    def namespaces(self) -> tuple[str, ...]:
        return (self.name, *self.orgs)


@dataclass(frozen=True)
class PublishResult:
    repo_id: str
    repo_type: str
    url: str
    commit_url: str | None
    folder: Path  # the uploaded folder, kept: a failed or later push can use it again
    files: list[str]
    user: str

    @property
    def message(self) -> str:
        return f"Uploaded {len(self.files)} files to {self.url}"


# ---- tokens and accounts ---------------------------------------------------------------------------------------


def resolve_token(token: str | None = None) -> str:
    """The token to publish with: the one passed in (e.g. the Space's OAuth token), else HF_TOKEN, else the login.

    Running as a Hugging Face Space (SPACE_ID is set), only a token passed in counts: HF_TOKEN there is the Space
    owner's secret, and a visitor must never publish with it.
    """
    if on_space():
        if token and token.strip():
            return token.strip()
        raise PublishError("Sign in with the Hugging Face button first: on a Space, publishing uses your own "
                           "account (with write access), never the Space's token.")
    for source in (lambda: token, lambda: os.environ.get("HF_TOKEN"), get_token):  # lazily: the login is last
        candidate = source()
        if candidate and candidate.strip():
            return candidate.strip()
    raise PublishError(
        "No Hugging Face token. Sign in with the Hugging Face button, set the HF_TOKEN environment variable, or run "
        "`hf auth login`; create a token with write access at https://huggingface.co/settings/tokens."
    )


def hub_account(token: str | None = None, api: HfApi | None = None) -> HubAccount:
    """Who the token (see resolve_token) belongs to: e.g. to offer their namespaces for the repository id."""
    token = resolve_token(token)
    with _hub_errors("look up the account of", "your token", token):
        return _account((api or HfApi()).whoami(token=token))[0]


def check_write_access(repo_id: str, token: str, api: HfApi | None = None) -> HubAccount:
    """The account behind ``token``, after checking that it may create and write ``repo_id``."""
    _check_repo_id(repo_id)
    with _hub_errors("check your account's access to", repo_id, token):
        info = (api or HfApi()).whoami(token=token)
    account, read_only_orgs = _account(info)
    namespace = repo_id.split("/")[0]
    if namespace in read_only_orgs:
        raise PublishError(
            f"You have only the 'read' role in the organization '{namespace}', so you cannot publish {repo_id} "
            f"there. Ask an admin of {namespace} for write access, or publish under {account.name}/."
        )
    if namespace not in account.namespaces:
        raise PublishError(
            f"{repo_id} belongs to '{namespace}', which is neither your account ({account.name}) nor one of your "
            f"organizations ({', '.join(account.orgs) or 'none'}). Choose a repository id such as "
            f"{account.name}/{repo_id.split('/')[1]}."
        )
    _check_token_can_write(info, namespace)
    return account


def _account(info: dict[str, Any]) -> tuple[HubAccount, set[str]]:
    orgs = [org for org in info.get("orgs") or [] if isinstance(org, dict) and org.get("name")]
    read_only = {org["name"] for org in orgs if org.get("roleInOrg") == "read"}
    writable = tuple(org["name"] for org in orgs if org["name"] not in read_only)
    return HubAccount(name=str(info.get("name", "")), orgs=writable), read_only


def _check_token_can_write(info: dict[str, Any], namespace: str) -> None:
    """Refuse tokens whose role or fine-grained permissions cannot write repositories in ``namespace``.

    whoami-v2 describes an access token as auth.accessToken.role: "read", "write" or "fineGrained" (then with
    fineGrained.global and fineGrained.scoped[{entity: {name}, permissions}]). Other shapes (OAuth tokens) are
    left to the Hub, which answers 403, explained by _hub_errors, when they cannot write.
    """
    access = ((info.get("auth") or {}).get("accessToken")) or {}
    role = access.get("role")
    create_token = "Create one with write access at https://huggingface.co/settings/tokens and use it instead."
    if role == "read":
        raise PublishError(f"Your Hugging Face token is read-only: it cannot create or upload repositories. "
                           f"{create_token}")
    if role == "fineGrained":
        grants = access.get("fineGrained") or {}
        allowed = "repo.write" in (grants.get("global") or []) or any(
            (scope.get("entity") or {}).get("name") == namespace and "repo.write" in (scope.get("permissions") or [])
            for scope in grants.get("scoped") or []
        )
        if not allowed:
            raise PublishError(
                f"Your fine-grained Hugging Face token has no write access to repositories of '{namespace}'. Edit "
                "its permissions (\"Write access to contents/settings of all repos\" under that user or "
                f"organization) at https://huggingface.co/settings/tokens, or use a token with the 'write' role."
            )


def _check_repo_id(repo_id: str) -> None:
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise PublishError(f"'{repo_id}' is not a valid Hugging Face repository id: {error}") from None
    if repo_id.count("/") != 1:
        raise PublishError(f"Give the repository id as NAMESPACE/NAME (your user name or an organization), "
                           f"not '{repo_id}'.")


def _redact(text: str, token: str | None) -> str:
    return text.replace(token, "hf_***") if token else text


@contextmanager
def _hub_errors(action: str, repo_id: str, token: str, folder: Path | None = None) -> Iterator[None]:
    """Turn what huggingface_hub raises into a PublishError that says what to do (and that local files are kept)."""
    kept = (f" Nothing was deleted: the files are in {folder}; publish again to retry, or upload that folder by hand."
            if folder else "")
    try:
        yield
    except PublishError:
        raise
    except HfHubHTTPError as error:
        status = error.response.status_code if error.response is not None else None
        if status == 401:
            message = ("The Hugging Face Hub rejected your token (invalid or expired). Sign in again or set a valid "
                       "HF_TOKEN.")
        elif status in (403, 404):  # the Hub answers 404 for repositories a token may not see
            message = (f"Your token is not allowed to {action} {repo_id}: it needs write access to "
                       f"'{repo_id.split('/')[0]}'. Use a token with the 'write' role, or another repository id.")
        else:
            message = f"The Hugging Face Hub refused to {action} {repo_id}: {_redact(str(error), token)}"
        raise PublishError(message + kept) from error
    except (TransportError, ConnectionError, TimeoutError) as error:  # ConnectionError covers HF_HUB_OFFLINE
        raise PublishError(
            f"Could not reach the Hugging Face Hub to {action} {repo_id} ({type(error).__name__}). Check your "
            f"internet connection (and that HF_HUB_OFFLINE is not set), then try again.{kept}"
        ) from error
    except Exception as error:  # noqa: BLE001  (hf_xet and friends raise their own types; all are explained here)
        raise PublishError(f"Could not {action} {repo_id}: {_redact(str(error), token)}.{kept}") from error


# ---- what the run was trained on ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class BaseModel:
    hub_id: str | None  # None: a local folder or file we cannot name on the Hub
    license: str | None
    label: str  # how the card names it when there is no Hub id


def base_model_of(cfg: RunConfig, override: str | None = None) -> BaseModel:
    """The base model's Hub id (and license when known) for the card and the Space; ``override`` wins."""
    if override:
        _check_model_id(override)
        return BaseModel(override, _known_license(override), override)
    if cfg.model == EMBEDDED_MODEL:
        return BaseModel(EMBEDDED_HUB_ID, _known_license(EMBEDDED_HUB_ID), EMBEDDED_HUB_ID)
    path = Path(cfg.model).expanduser()
    # A model loaded from huggingface_hub's cache (models--org--name/snapshots/<sha>) still has a Hub id.
    for part in path.parts:
        if match := _HUB_CACHE_FOLDER.match(part):
            hub_id = f"{match[1]}/{match[2]}"
            return BaseModel(hub_id, _known_license(hub_id), hub_id)
    if hub_id_of(cfg.model):
        return BaseModel(cfg.model, _known_license(cfg.model), cfg.model)
    return BaseModel(None, None, path.name or cfg.model)  # only the name: a local path says too much about a machine


def _known_license(hub_id: str) -> str | None:
    return "apache-2.0" if hub_id.startswith("HuggingFaceTB/SmolLM2-") else None


def _check_model_id(hub_id: str) -> None:
    if not hub_id_of(hub_id):
        raise PublishError(f"'{hub_id}' is not a Hugging Face model id (NAMESPACE/NAME) for the base model.")


def hub_dataset_of(cfg: RunConfig) -> str | None:
    """The Hub dataset the run trained on (``name`` of ``name:split``), or None for a file or the sample."""
    if cfg.data == SAMPLE_DATA:
        return None
    name = cfg.data.partition(":")[0]
    if not hub_id_of(name):
        return None
    return name


def _data_label(cfg: RunConfig) -> str:
    if cfg.data == SAMPLE_DATA:
        return "DenseLoRA Studio's sample data (studio_facts)"
    return hub_dataset_of(cfg) or Path(cfg.data).name


# ---- building the model repository ------------------------------------------------------------------------------


def _publishable(run: Run | str, root: Path | None) -> Run:
    """The run to publish, refused (saying why) until it has ended with its adapter. A reference (text, as the app's
    run picker sends it) names a run in the runs folder ``root`` only (runs.resolve_run); the CLI, which also takes a
    run folder elsewhere, resolves it itself and passes the Run."""
    if isinstance(run, str):
        try:
            run = resolve_run(run, root)
        except RunError as error:
            raise PublishError(str(error)) from None
    status = run.status()
    if status.state is RunState.DAMAGED:
        raise PublishError(f"Run {run.id} is damaged ({status.problem}); it cannot be published.")
    if status.active:
        raise PublishError(f"Run {run.id} is still {status.state}: wait for it to finish (or stop it), then publish.")
    missing = [name for name in ADAPTER_FILES if not (run.adapter_dir / name).is_file()]
    if missing:
        raise PublishError(f"Run {run.id} has no adapter to publish ({', '.join(missing)} missing in "
                           f"{run.adapter_dir}); it is saved when training completes or is stopped.")
    return run


def _target(run: Run, out_dir: Path | str | None, kind: str) -> Path:
    """An empty folder to build in: ``out_dir`` (new or empty), else the run's own staging folder, rebuilt."""
    if out_dir is None:
        target = run.path / STAGING / kind
        shutil.rmtree(target, ignore_errors=True)  # generated by the previous build; nothing else lives there
    else:
        target = Path(out_dir).expanduser().resolve()
        if target.exists() and (not target.is_dir() or any(target.iterdir())):
            raise PublishError(f"{target} already exists and is not an empty folder: choose a new or empty folder, "
                               "so nothing there is overwritten or uploaded by mistake.")
    target.mkdir(parents=True, exist_ok=True)
    return target


def _listing(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def _carry_method_package(target: Path) -> None:
    """Copy the DenseLoRA method into ``target/denselora``: PEFT does not ship it, and DenseLoRA Studio is not needed
    to load an adapter or run a Space that carries it."""
    shutil.copytree(DENSELORA_PACKAGE, target / "denselora", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))


def _copy_adapter(run: Run, target: Path, base: BaseModel) -> bool:
    """Copy the PEFT adapter and any tokenizer files; returns whether a tokenizer came along."""
    for name in ADAPTER_FILES:
        shutil.copy2(run.adapter_dir / name, target / name)
    # The saved path of the base model is a path on the training machine: name the Hub model instead (or nothing).
    adapter_config = json.loads((target / "adapter_config.json").read_text(encoding="utf-8"))
    adapter_config["base_model_name_or_path"] = base.hub_id
    (target / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2) + "\n", encoding="utf-8")
    tokenizer = False
    for path in sorted(run.adapter_dir.iterdir()):
        if path.is_file() and any(fnmatch(path.name, pattern) for pattern in TOKENIZER_PATTERNS):
            shutil.copy2(path, target / path.name)
            tokenizer = True
    return tokenizer


def build_model_repo(
    run: Run | str,
    repo_id: str,
    out_dir: Path | str | None = None,
    *,
    base_model: str | None = None,
    root: Path | None = None,
) -> RepoFolder:
    """Write the model repository for ``run`` (see _publishable): adapter, tokenizer files, loss_curve.png and a
    model card.

    ``out_dir`` must be new or empty; without it the run's ``publish/model`` folder is (re)built.
    ``base_model`` names the base model's Hub id when the run trained on a local folder.
    """
    run = _publishable(run, root)
    _check_repo_id(repo_id)
    cfg = run.config()
    base = base_model_of(cfg, base_model)
    target = _target(run, out_dir, "model")
    has_tokenizer = _copy_adapter(run, target, base)
    if cfg.method == "denselora":
        _carry_method_package(target)
    has_curve = draw_loss_curve(run.metrics(), target / LOSS_CURVE)
    card = model_card(run, repo_id, base, has_tokenizer=has_tokenizer, loss_curve=LOSS_CURVE if has_curve else None)
    card.save(target / "README.md")
    log.info("Built the model repository of run %s for %s in %s", run.id, repo_id, target)
    return RepoFolder(target, repo_id, "model", _listing(target))


def draw_loss_curve(metrics: list[dict[str, Any]], path: Path) -> bool:
    """Train and validation loss against step, as a PNG; False (and no file) when there is nothing to draw."""
    series = {
        label: [(m["step"], m[key]) for m in metrics if "step" in m and finite_number(m.get(key))]
        for label, key in (("train loss", "loss"), ("validation loss", "eval_loss"))
    }
    if not any(series.values()):
        return False
    from matplotlib.figure import Figure  # no pyplot: no global state, safe in the app's worker threads
    from matplotlib.ticker import MaxNLocator

    figure = Figure(figsize=(7, 3.6), dpi=110)
    axes = figure.add_subplot()
    for (label, points), color in zip(series.items(), ("#2563eb", "#f97316")):
        if points:
            steps, losses = zip(*points)
            axes.plot(steps, losses, label=label, color=color, marker="o" if len(points) < 20 else None)
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.savefig(path, format="png", bbox_inches="tight")
    return True


# ---- the model card ----------------------------------------------------------------------------------------------

_CARD_TEMPLATE = """---
{{ card_data }}
---

# {{ title }}

{% if denselora %}A [DenseLoRA]({{ paper_url }}) adapter{% else %}A LoRA adapter{% endif %} for {{ base_text }}, \
trained with DenseLoRA Studio on {{ data_label }}.
{% if embedded %}
It was trained on the 4-bit (Q4_1) GGUF copy of {{ base_text }} that DenseLoRA Studio ships for offline use, \
dequantized to float32; it loads on the original weights, which differ slightly from the quantized ones.
{% endif %}
{% if denselora %}
## What DenseLoRA is

DenseLoRA (Mu et al., ACL 2025, [arXiv:2505.23808]({{ paper_url }})) adapts a frozen model with far fewer \
parameters than LoRA. Instead of a pair of low-rank matrices per adapted layer, each module type t (for example \
`q_proj`) gets one encoder E_t (d_in -> r) and one decoder D_t (r -> d_out) shared by all layers, and every layer l \
gets only a small dense r x r matrix M_(l,t). A frozen linear layer W0 becomes

$$h = W_0 x + \\frac{\\alpha}{r}\\,\\sigma\\left(D_t\\, M_{l,t}\\, \\sigma(E_t\\, x)\\right)$$

with sigma = `{{ activation }}`, r = {{ r }} and alpha = {{ alpha }}. Only E_t, D_t and M_(l,t) are trained.
{% endif %}
## Use it

```bash
{{ install }}
```

```python
{% if denselora %}import sys

{% endif %}import torch
from huggingface_hub import snapshot_download
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

base_model_id = "{{ base_model_id }}"{% if not base_hub_id %}  # the base model this adapter was trained on{% endif %}
adapter_dir = snapshot_download("{{ adapter_id }}")
{% if denselora %}
# DenseLoRA is not built into PEFT: this repository carries the method as the package `denselora`, and importing
# it registers DenseLoRA (peft_type "DENSELORA") with PEFT. With DenseLoRA Studio installed,
# `import denselora_app.denselora` does the same.
sys.path.insert(0, adapter_dir)
import denselora  # noqa: E402,F401
{% endif %}
tokenizer = AutoTokenizer.from_pretrained({{ "adapter_dir" if has_tokenizer else "base_model_id" }})
{% if quantization_config %}# The base as it was trained: {{ quantization_text }} (needs `pip install bitsandbytes`; leave out
# quantization_config to load it unquantized).
from transformers import BitsAndBytesConfig

model = AutoModelForCausalLM.from_pretrained(base_model_id, dtype="auto", device_map="auto",
                                             quantization_config=BitsAndBytesConfig({{ quantization_config }}))
{% else %}model = AutoModelForCausalLM.from_pretrained(base_model_id, dtype="auto")
{% endif %}model = PeftModel.from_pretrained(model, adapter_dir).eval()

{% if chat %}messages = [{"role": "user", "content": "Hello! What can you help me with?"}]
inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
{% else %}inputs = tokenizer("Hello! What can you help me with?", return_tensors="pt")
{% endif %}with torch.no_grad():
    output = model.generate(**inputs, max_new_tokens=64, do_sample=False)
print(tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
```

## Training

{{ parameters }}
{% if quantization_text %}
Training quantization: the frozen base was loaded {{ quantization_text }}; the adapter itself was trained in full \
precision (float32).
{% endif %}
| Setting | Value |
|---|---|
{% for key, value in settings %}| `{{ key }}` | {{ value }} |
{% endfor %}
{% if loss_curve %}
![Train and validation loss]({{ loss_curve }})
{% endif %}{% if evaluation %}
## Evaluation

{{ evaluation }}
{% endif %}
## Citation

```bibtex
@inproceedings{mu2025denselora,
  title = {DenseLoRA: Dense Low-Rank Adaptation of Large Language Models},
  author = {Mu, Lin and others},
  booktitle = {Proceedings of the 63rd Annual Meeting of the Association for Computational Linguistics (ACL 2025)},
  year = {2025},
  eprint = {2505.23808},
  archivePrefix = {arXiv}
}
```
"""


def model_card(run: Run, repo_id: str, base: BaseModel, *, has_tokenizer: bool, loss_curve: str | None) -> ModelCard:
    """The model card: Hub metadata, what DenseLoRA is, a loading snippet, the training setup and results."""
    cfg = run.config()
    denselora = cfg.method == "denselora"
    versions = _versions()
    data = ModelCardData(
        base_model=base.hub_id,
        library_name="peft",
        license=base.license,
        datasets=[dataset] if (dataset := hub_dataset_of(cfg)) else None,
        pipeline_tag="text-generation",
        tags=["denselora", "peft"] if denselora else ["lora", "peft"],
    )
    return ModelCard.from_template(
        data,
        template_str=_CARD_TEMPLATE,
        title=repo_id.split("/")[1],
        paper_url=PAPER_URL,
        denselora=denselora,
        embedded=cfg.model == EMBEDDED_MODEL,
        base_text=f"[{base.hub_id}](https://huggingface.co/{base.hub_id})" if base.hub_id else f"`{base.label}`",
        base_hub_id=base.hub_id,
        base_model_id=base.hub_id or base.label,
        adapter_id=repo_id,
        data_label=_data_label(cfg),
        activation=cfg.activation,
        r=cfg.r,
        alpha=f"{cfg.alpha:g}",
        install=(f'pip install torch "transformers>={versions["transformers"]}" "peft=={versions["peft"]}" '
                 "huggingface_hub") if denselora else "pip install torch transformers peft huggingface_hub",
        has_tokenizer=has_tokenizer,
        chat=has_tokenizer and _has_chat_template(run.adapter_dir),
        parameters=_parameters_line(run),
        settings=_settings_rows(cfg, base),
        loss_curve=loss_curve,
        evaluation=evaluation_table(run.evaluation()),
        **_QUANTIZATION_CARD.get(cfg.quantization, {}),
    )


# How the card describes and reloads a quantized base (bitsandbytes settings as models.quantization_config uses).
_QUANTIZATION_CARD = {
    "4bit": {"quantization_text": "in 4-bit NF4 with double quantization (bitsandbytes)",
             "quantization_config": 'load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True'},
    "8bit": {"quantization_text": "in 8-bit (LLM.int8, bitsandbytes)", "quantization_config": "load_in_8bit=True"},
}


def _has_chat_template(folder: Path) -> bool:
    if any(folder.glob("chat_template.*")):
        return True
    return bool((read_json(folder / "tokenizer_config.json", default={}) or {}).get("chat_template"))


def _parameters_line(run: Run) -> str:
    facts = run.facts()
    if facts.trainable_percent is None:
        return ""
    line = (f"**Trainable parameters:** {facts.trainable_parameters:,} ({facts.trainable_percent:.4f}% of the base "
            f"model's {facts.total_parameters:,}).")
    if facts.steps:
        line += f" Trained for {facts.steps} steps."
    return line


def _settings_rows(cfg: RunConfig, base: BaseModel) -> list[tuple[str, str]]:
    rows = []
    for key, value in cfg.to_dict().items():
        if key in _CARD_SKIPS:
            continue
        if key == "model":
            value = base.hub_id or base.label
        elif key == "data":
            value = _data_label(cfg)
        elif isinstance(value, list):
            value = ", ".join(value)
        rows.append((key, _cell(value)))
    rows.append(("effective batch size", str(cfg.effective_batch_size)))
    return rows


def _cell(value: Any) -> str:
    if isinstance(value, float):
        value = f"{value:.4g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


# What the card shows of a result, in this order; the rest of eval.json (paths, hashes, times) stays out of it.
_EVAL_COLUMNS = ("model", "dataset", "mode", "accuracy", "loss", "perplexity", "exact_match", "f1", "score", "total",
                 "correct", "unanswered", "checkpoint")
_METRIC_KEYS = {"accuracy", "loss", "perplexity", "exact_match", "f1", "score"}
_MAX_EVAL_ROWS = 50


def evaluation_table(data: Any) -> str:
    """A Markdown table of a run's eval.json, whatever its exact shape; "" when there is nothing to show.

    Accepts a list of result rows, ``{"results": [...], "base": [...]}`` (what evaluate.py writes), or results
    grouped under other keys. A row is a mapping with a metric (accuracy, loss, ...), or a dataset and a number;
    rows under "results" are the adapter's, rows under another key are labelled with it. Anything else is searched
    for rows, and what holds none is ignored.
    """
    rows = list(_result_rows(data, None))[:_MAX_EVAL_ROWS]
    columns = [c for c in _EVAL_COLUMNS if any(_scalar(r.get(c)) and r.get(c) is not None for r in rows)]
    if not rows or columns == ["model"]:
        return ""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = [row.get(c) if _scalar(row.get(c)) and row.get(c) is not None else "" for c in columns]
        if "dataset" in columns and isinstance(row.get("dataset"), str):
            cells[columns.index("dataset")] = _dataset_name(row["dataset"])
        lines.append("| " + " | ".join(_cell(cell) for cell in cells) + " |")
    return "\n".join(lines)


def _result_rows(data: Any, label: str | None) -> Iterator[dict[str, Any]]:
    if isinstance(data, list):
        for item in data:
            yield from _result_rows(item, label)
    elif isinstance(data, dict):
        if _METRIC_KEYS & data.keys() or ("dataset" in data and any(finite_number(v) for v in data.values())):
            yield {**data, "model": label or data.get("model") or "adapter"}
        else:
            for key, value in data.items():
                yield from _result_rows(value, label or ("adapter" if key == "results" else key))


def _scalar(value: Any) -> bool:
    return value is None or isinstance(value, (str, int, float, bool))


def _dataset_name(dataset: str) -> str:
    """A Hub dataset as it is; a file by its name only (its folder is a detail of the training machine)."""
    return dataset if hub_id_of(dataset) else Path(dataset).name


# ---- building the demo Space -------------------------------------------------------------------------------------


def build_space_repo(
    run: Run | str,
    space_id: str,
    out_dir: Path | str | None = None,
    *,
    adapter_repo_id: str | None = None,
    bundle_adapter: bool = False,
    base_model: str | None = None,
    root: Path | None = None,
) -> RepoFolder:
    """Write a Gradio chat Space for the run's adapter: app.py and its prompts.py, the DenseLoRA package,
    requirements and README.

    The Space loads the adapter from ``adapter_repo_id`` on the Hub, or carries it in ``adapter/`` when there is
    no repository id or ``bundle_adapter`` is set (for a private adapter repository the Space could not read, or
    an adapter not uploaded yet).
    """
    run = _publishable(run, root)
    _check_repo_id(space_id)
    if adapter_repo_id:
        _check_repo_id(adapter_repo_id)
    cfg = run.config()
    base = base_model_of(cfg, base_model)
    target = _target(run, out_dir, "space")
    for name in SPACE_FILES:
        shutil.copy2(SPACE_TEMPLATE / name, target / name)
    _carry_method_package(target)
    bundle_adapter = bundle_adapter or adapter_repo_id is None
    if bundle_adapter:
        (target / "adapter").mkdir()
        _copy_adapter(run, target / "adapter", base)
    title = space_id.split("/")[1]
    settings = {"adapter": "adapter" if bundle_adapter else adapter_repo_id, "base_model": base.hub_id, "title": title}
    (target / SPACE_SETTINGS).write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")
    (target / "requirements.txt").write_text(_render(SPACE_TEMPLATE / "requirements.txt.jinja", **_versions()),
                                             encoding="utf-8")
    card_data = SpaceCardData(
        title=title,
        sdk="gradio",
        sdk_version=version("gradio"),
        python_version=f"{sys.version_info.major}.{sys.version_info.minor}",
        app_file="app.py",
        models=[m for m in (base.hub_id, adapter_repo_id) if m] or None,
        tags=["denselora", "peft", "chat"],
        emoji="💬",
        colorFrom="indigo",
        colorTo="purple",
        pinned=False,
        short_description=f"Chat with the DenseLoRA adapter {title}"[:60],
    )
    card = SpaceCard.from_template(card_data, template_path=str(SPACE_TEMPLATE / "README.md.jinja"), title=title,
                                   adapter=adapter_repo_id, bundled=bundle_adapter, base_model=base.hub_id,
                                   base_label=base.label)
    card.save(target / "README.md")
    if base.hub_id is None:
        log.warning("The Space for run %s names no base model: set DENSELORA_BASE_MODEL when running it.", run.id)
    log.info("Built the demo Space of run %s for %s in %s", run.id, space_id, target)
    return RepoFolder(target, space_id, "space", _listing(target))


def _render(template: Path, **values: Any) -> str:
    return jinja2.Template(template.read_text(encoding="utf-8"), keep_trailing_newline=True).render(**values)


def _versions() -> dict[str, str]:
    """Version bounds for the Space, from what trained the adapter here."""
    transformers = version("transformers").split(".")
    return {
        "transformers": ".".join(transformers[:2]),
        # The DenseLoRA package plugs into PEFT's tuner internals: pin the release it was written against.
        "peft": version("peft"),
        "gradio": version("gradio"),
    }


# ---- export and upload -------------------------------------------------------------------------------------------


def zip_folder(folder: RepoFolder | Path, zip_path: Path | None = None) -> Path:
    """Zip a built repository folder (for download); by default next to it, as ``<folder>.zip``."""
    path = folder.path if isinstance(folder, RepoFolder) else Path(folder)
    zip_path = zip_path or path.with_name(f"{path.name}.zip")
    with zipfile.ZipFile(zip_path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name in _listing(path):
            archive.write(path / name, name)
    return zip_path


def push_folder(
    folder: RepoFolder,
    *,
    private: bool = False,
    commit_message: str | None = None,
    token: str | None = None,
    api: HfApi | None = None,
) -> PublishResult:
    """Create ``folder.repo_id`` if needed and upload the folder as one commit. Local files are never removed.

    ``private`` applies when the repository is created; the Hub keeps an existing repository's visibility.
    """
    token = resolve_token(token)
    api = api or HfApi()
    account = check_write_access(folder.repo_id, token, api)
    space = folder.repo_type == "space"
    with _hub_errors("create", folder.repo_id, token, folder.path):
        api.create_repo(folder.repo_id, token=token, private=private, repo_type=folder.repo_type, exist_ok=True,
                        **({"space_sdk": "gradio"} if space else {}))
    message = commit_message or ("Publish the DenseLoRA demo Space" if space else "Publish the DenseLoRA adapter")
    with _hub_errors("upload to", folder.repo_id, token, folder.path):
        commit = api.upload_folder(repo_id=folder.repo_id, folder_path=str(folder.path), repo_type=folder.repo_type,
                                   commit_message=message, token=token)
    url = f"{hub_constants.ENDPOINT}/{'spaces/' if space else ''}{folder.repo_id}"
    log.info("Published %s to %s", folder.path, url)
    return PublishResult(folder.repo_id, folder.repo_type, url, getattr(commit, "commit_url", None), folder.path,
                         folder.files, account.name)


def publish_model(
    run: Run | str,
    repo_id: str,
    *,
    private: bool = False,
    commit_message: str | None = None,
    token: str | None = None,
    base_model: str | None = None,
    root: Path | None = None,
    api: HfApi | None = None,
) -> PublishResult:
    """Build the run's model repository (in ``<run>/publish/model``) and push it to ``repo_id``."""
    folder = build_model_repo(run, repo_id, base_model=base_model, root=root)
    return push_folder(folder, private=private, commit_message=commit_message, token=token, api=api)


def publish_space(
    run: Run | str,
    space_id: str,
    *,
    adapter_repo_id: str | None = None,
    bundle_adapter: bool = False,
    private: bool = False,
    commit_message: str | None = None,
    token: str | None = None,
    base_model: str | None = None,
    root: Path | None = None,
    api: HfApi | None = None,
) -> PublishResult:
    """Build the demo Space (in ``<run>/publish/space``) and push it to ``space_id`` as a Gradio Space."""
    run = _publishable(run, root)
    if base_model_of(run.config(), base_model).hub_id is None:
        raise PublishError("The Space must load the base model from the Hub, but this run trained on a local model: "
                           "give the base model's Hub id (base_model / --base-model).")
    folder = build_space_repo(run, space_id, adapter_repo_id=adapter_repo_id, bundle_adapter=bundle_adapter,
                              base_model=base_model, root=root)
    return push_folder(folder, private=private, commit_message=commit_message, token=token, api=api)
