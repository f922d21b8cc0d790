"""Shared fixtures: tiny randomly initialised models built from configs (no downloads), and a guard that fails any
test leaving a trace in the process (environment, working directory, logging, torch's global settings)."""

from __future__ import annotations

import logging
import os
import sys
import warnings

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import denselora_app.denselora  # noqa: F401  (registers DenseLoRA with PEFT)
from denselora_app.config import RunConfig

# Set by pytest itself, or by libraries for themselves on first use (tokenizers after a fork, gradio on import,
# torch.compile for its workers, scikit-learn on import, which datasets' streaming and lm-eval pull in): not a test's
# doing, and the same for every test after it.
_LIBRARY_VARIABLES = ("PYTEST_CURRENT_TEST", "TOKENIZERS_PARALLELISM", "HF_HUB_DISABLE_TELEMETRY", "_TORCHINDUCTOR_",
                      "TORCHINDUCTOR_", "KMP_DUPLICATE_LIB_OK", "KMP_INIT_AT_FORK")


def _process_state() -> dict[str, object]:
    """What one test could change for every test after it."""
    root = logging.getLogger()
    return {
        "environment": {k: v for k, v in os.environ.items() if not k.startswith(_LIBRARY_VARIABLES)},
        "working directory": os.getcwd(),
        "root logger": (list(root.handlers), root.level),
        "warnings.showwarning": warnings.showwarning,
        "sys.stderr": sys.stderr,
        "torch threads": torch.get_num_threads(),
        "torch default dtype": torch.get_default_dtype(),
        "torch grad mode": torch.is_grad_enabled(),
    }


@pytest.fixture(autouse=True)
def leaves_no_trace():
    """Each test restores what it changes (monkeypatch and fixtures do): the suite passes in any order."""
    before = _process_state()
    yield
    after = _process_state()
    changed = [what for what in before if before[what] != after[what]]
    if "environment" in changed:
        env_before, env_after = before["environment"], after["environment"]
        keys = sorted(k for k in env_before.keys() | env_after.keys() if env_before.get(k) != env_after.get(k))
        changed[changed.index("environment")] = f"environment ({', '.join(keys)})"
    assert not changed, f"the test left changed: {'; '.join(changed)}"


def tiny_llama_config(**overrides) -> LlamaConfig:
    values = dict(
        vocab_size=320,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,  # grouped-query attention: k/v are narrower than q
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    values.update(overrides)
    return LlamaConfig(**values)


def tiny_llama(seed: int = 0, dtype: torch.dtype = torch.float32, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config(**overrides)).to(dtype).eval()


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one thread: on a busy machine, waking a second one for each small op (GELU in
    particular, ~2 ms a call) dominates."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def model() -> LlamaForCausalLM:
    return tiny_llama()


@pytest.fixture
def input_ids() -> torch.Tensor:
    return torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(1))


CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_tokenizer(chat_template: bool = True):
    """A byte-level BPE tokenizer trained in milliseconds, with ChatML special tokens (vocabulary < 320)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=310,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = ["the quick brown fox jumps over the lazy dog", "what is the capital of a country?", "answer: yes no"]
    tok.train_from_iterator(corpus * 10, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token=None
    )
    if chat_template:
        fast.chat_template = CHATML_TEMPLATE
    return fast


@pytest.fixture
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="session", autouse=True)
def embedded_cache_root(tmp_path_factory):
    """The DENSELORA_CACHE of the whole test session (restored at its end): the embedded default is converted at most
    once, and the studio's log file and caches never land in the user's own cache folder."""
    root = tmp_path_factory.mktemp("denselora-cache")
    saved = os.environ.get("DENSELORA_CACHE")
    os.environ["DENSELORA_CACHE"] = str(root)
    yield root
    if saved is None:
        del os.environ["DENSELORA_CACHE"]
    else:
        os.environ["DENSELORA_CACHE"] = saved


@pytest.fixture
def embedded_model_dir(embedded_cache_root):
    """The embedded default's converted folder (a Path), in the session's cache. Converting takes ~20 s, once."""
    from pathlib import Path

    from denselora_app.engine.models import EMBEDDED_DEFAULT, ensure_local

    return Path(ensure_local(EMBEDDED_DEFAULT))


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes seconds or more (a fresh process that trains, the embedded "
                                       "model, a browser); make test-fast (-m 'not slow') leaves it out")


# ---- the app in its own process (tests/test_app.py, tests/test_browser.py) --------------------------------------

import json  # noqa: E402  (this section's imports stay with it)
import shutil  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
import urllib.request  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

_REPO = Path(__file__).resolve().parent.parent

# Rows made of words the tiny tokenizer knows, in the `messages` layout.
APP_DATA_ROWS = [
    {"messages": [{"role": "user", "content": f"what is the capital of {c}?"},
                  {"role": "assistant", "content": "the quick brown fox"}]}
    for c in ("a", "the", "a country", "the dog", "a fox", "the lazy dog", "no", "yes")
]


def save_tiny_model(folder: Path, **shape) -> Path:
    """A tiny LLaMA model folder (config.json + safetensors + tokenizer with a chat template), as training reads it."""
    tiny_llama(**{"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, **shape}).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def app_model_dir(tmp_path_factory):
    """The tiny model folder the app, engine and launch tests train (read only: one for the whole session)."""
    return save_tiny_model(tmp_path_factory.mktemp("app-tiny-model"))


def tiny_run_config(model_dir: Path, data: Path | str, **overrides) -> RunConfig:
    """A run that trains in seconds on the CPU: the tiny model, rank 4, batch 2, four steps, a checkpoint every two.
    The one config builder of the tests; ``overrides`` set any other field."""
    values = dict(model=str(model_dir), data=str(data), r=4, alpha=8, dropout=0.0, learning_rate=3e-2, max_steps=4,
                  batch_size=2, grad_accum=1, warmup_steps=0, save_steps=2, cutoff_len=64, device="cpu")
    return RunConfig(**{**values, **overrides})


@pytest.fixture
def runs_root(tmp_path, monkeypatch) -> Path:
    """An empty runs folder of the test's own, where every command and the app look ($DENSELORA_RUNS)."""
    root = tmp_path / "runs"
    monkeypatch.setenv("DENSELORA_RUNS", str(root))
    return root


@pytest.fixture(scope="session")
def app_data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("app-data") / "facts.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in APP_DATA_ROWS))
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class AppProcess:
    """`python app.py` running on its own port, with its runs and presets in a test folder."""

    url: str
    workdir: Path
    process: subprocess.Popen
    seconds_to_first_page: float

    @property
    def runs(self) -> Path:
        return self.workdir / "runs"

    @property
    def presets(self) -> Path:
        return self.workdir / "presets"

    @property
    def upload_folder(self) -> Path:
        """gradio's temporary copies of uploads (GRADIO_TEMP_DIR), kept inside the test folder."""
        return self.workdir / "gradio"

    @property
    def log(self) -> str:
        return (self.workdir / "app.log").read_text(errors="replace")

    def stop(self) -> None:
        end_process(self.process, grace=30)


def end_process(process: subprocess.Popen, grace: float) -> None:
    """Ask ``process`` to end (SIGTERM), and kill it if it has not within ``grace`` seconds."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def launch_app(workdir: Path, timeout: float = 180.0) -> AppProcess:
    """Start app.py as `make run` does, on a free port (GRADIO_SERVER_PORT), and wait until it serves its page."""
    workdir.mkdir(parents=True, exist_ok=True)
    if not (workdir / "presets").exists():
        shutil.copytree(_REPO / "presets", workdir / "presets")
    port = free_port()
    env = {**os.environ, "GRADIO_SERVER_PORT": str(port), "DENSELORA_RUNS": str(workdir / "runs"),
           "DENSELORA_PRESETS": str(workdir / "presets"), "GRADIO_ANALYTICS_ENABLED": "False",
           "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "GRADIO_TEMP_DIR": str(workdir / "gradio")}
    url = f"http://127.0.0.1:{port}/"
    started = time.monotonic()
    with open(workdir / "app.log", "ab") as log:
        process = subprocess.Popen([sys.executable, "app.py"], cwd=_REPO, env=env, stdout=log,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    while time.monotonic() - started < timeout:
        if process.poll() is not None:
            raise AssertionError(f"app.py exited with {process.returncode}:\n{(workdir / 'app.log').read_text()}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return AppProcess(url, workdir, process, time.monotonic() - started)
        except OSError:
            pass
        time.sleep(0.1)
    process.kill()
    raise AssertionError(f"app.py did not serve {url} within {timeout} s:\n{(workdir / 'app.log').read_text()}")


def stop_workers(runs: Path, timeout: float = 60.0) -> None:
    """End every training worker still running under `runs` (they outlive the app by design)."""
    import psutil

    pids = []
    for status_file in runs.glob("*/status.json"):
        status = json.loads(status_file.read_text() or "{}")
        if status.get("state") in ("queued", "running") and status.get("pid"):
            pids.append(int(status["pid"]))
    alive = []
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)  # the worker's graceful stop
            alive.append(psutil.Process(pid))
        except (ProcessLookupError, psutil.NoSuchProcess):
            pass
    _, still = psutil.wait_procs(alive, timeout=timeout)
    for proc in still:
        proc.kill()


def wait_until(predicate, timeout: float = 180.0, interval: float = 0.5, what: str = "condition"):
    """Poll `predicate` until it returns something truthy (returned), or fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


@pytest.fixture
def restore_logging():
    """A job's entry point (jobs.py) configures the root logger for its own process; undo it after a test."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
