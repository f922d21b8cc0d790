"""Base model resolution and loading: local folders, the Hub while offline, trust_remote_code, devices and dtypes,
and (one slow test) the embedded SmolLM2 GGUF converted once into a safetensors cache."""

from __future__ import annotations

import json
import logging
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx2
import pytest
import torch
from conftest import CHATML_TEMPLATE, tiny_llama, tiny_tokenizer
from huggingface_hub.errors import RepositoryNotFoundError
from numerics import assert_close_for
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig

from denselora_app import rules
from denselora_app.hub import connection
from denselora_app.engine import models
from denselora_app.engine.models import (
    EMBEDDED_DEFAULT,
    ModelLoadError,
    describe_model,
    ensure_local,
    load_config,
    load_model,
    load_tokenizer,
    resolve_device,
    resolve_dtype,
)

LLAMA_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama().save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture
def ids() -> torch.Tensor:
    return torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(3))


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


# ---- local folders ---------------------------------------------------------------------------------------------


def test_local_folder_round_trip(tiny_dir, ids):
    reference = tiny_llama()
    model = load_model(str(tiny_dir), device="cpu")
    assert not model.training
    assert model.device.type == "cpu" and model.dtype == torch.float32
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=0, atol=0)

    assert ensure_local(str(tiny_dir)) == str(tiny_dir)
    assert load_config(str(tiny_dir)).num_hidden_layers == 3
    tokenizer = load_tokenizer(str(tiny_dir))
    expected = tiny_tokenizer()
    assert tokenizer("the quick brown fox").input_ids == expected("the quick brown fox").input_ids
    assert tokenizer.chat_template == CHATML_TEMPLATE
    assert tokenizer.pad_token == "<|endoftext|>"  # a pad token the tokenizer has is kept


def test_load_model_in_bfloat16(tiny_dir, ids):
    model = load_model(str(tiny_dir), device="cpu", dtype="bfloat16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    with torch.no_grad():
        expected = tiny_llama()(ids).logits
        # bfloat16 sums in float32 here and rounds each op's output: ~15 roundings a layer, then the norm and lm_head.
        stages = 15 * model.config.num_hidden_layers + 2
        assert_close_for(model(ids).logits, expected, terms=stages)


def test_pad_token_falls_back_to_eos(tmp_path):
    tok = tiny_tokenizer()
    tok.pad_token = None
    tiny_llama().save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded = load_tokenizer(str(tmp_path))
    assert loaded.pad_token == loaded.eos_token == "<|im_end|>"


def test_pickle_only_folder_loads_with_weights_only(tmp_path, ids, caplog):
    reference = tiny_llama()
    reference.config.save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    torch.save(reference.state_dict(), tmp_path / "pytorch_model.bin")
    with caplog.at_level(logging.WARNING, logger="denselora_app.engine.models"):
        model = load_model(str(tmp_path), device="cpu")
    assert "weights_only=True" in caplog.text
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=0, atol=0)


# ---- describing a model ----------------------------------------------------------------------------------------


def test_describe_model_needs_no_weights(tmp_path, monkeypatch):
    reference = tiny_llama()
    reference.config.save_pretrained(tmp_path)  # config and tokenizer only: no weights file at all
    tiny_tokenizer().save_pretrained(tmp_path)
    built_on = []
    real_from_config = models.AutoModelForCausalLM.from_config
    monkeypatch.setattr(
        models.AutoModelForCausalLM,
        "from_config",
        lambda *a, **k: built_on.append(torch.empty(0).device) or real_from_config(*a, **k),
    )

    info = describe_model(str(tmp_path))

    assert built_on == [torch.device("meta")]
    assert info.spec == str(tmp_path)
    assert info.architecture == "LlamaForCausalLM" and info.model_type == "llama"
    assert info.num_parameters == sum(p.numel() for p in reference.parameters())
    assert (info.num_layers, info.hidden_size, info.max_position_embeddings) == (3, 32, 64)
    assert info.linear_names == LLAMA_LINEARS  # lm_head is not among them
    assert info.has_chat_template and info.chat_template == CHATML_TEMPLATE
    millions = f"{info.num_parameters / 1e6:.1f}M"
    assert info.summary() == f"LlamaForCausalLM · {millions} parameters · 3 layers · chat template: yes"


def test_describe_model_without_chat_template_and_with_conv1d_layers(tmp_path):
    # GPT-2 builds its projections from transformers' Conv1D, which DenseLoRA adapts like nn.Linear.
    config = GPT2Config(vocab_size=320, n_positions=64, n_embd=32, n_layer=2, n_head=4)
    GPT2LMHeadModel(config).save_pretrained(tmp_path)
    tiny_tokenizer(chat_template=False).save_pretrained(tmp_path)
    info = describe_model(str(tmp_path))
    assert info.linear_names == ["c_attn", "c_proj", "c_fc"]
    assert (info.num_layers, info.hidden_size, info.max_position_embeddings) == (2, 32, 64)
    assert not info.has_chat_template and info.chat_template is None
    assert info.summary().endswith("2 layers · chat template: no")


# ---- bad specs -------------------------------------------------------------------------------------------------


def test_missing_folder(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelLoadError, match="No such file or folder") as error:
        load_model(str(missing))
    assert str(missing) in str(error.value) and EMBEDDED_DEFAULT in str(error.value)


def test_folder_without_config_json(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ModelLoadError, match="no config.json") as error:
        load_config(str(tmp_path))
    assert "notes.txt" in str(error.value)

    (tmp_path / "adapter_config.json").write_text("{}")
    with pytest.raises(ModelLoadError, match="PEFT adapter"):
        describe_model(str(tmp_path))


def test_folder_without_weights(tmp_path):
    tiny_llama().config.save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match="no weights"):
        load_model(str(tmp_path), device="cpu")


@pytest.mark.parametrize(
    "spec, message",
    [
        ("", "No model was given"),
        ("embedded:GPT-5", "only one is 'embedded:SmolLM2-135M-Instruct'"),
        ("./not/here.gguf", "No such file or folder"),
        ("bad id with spaces", "neither an existing local folder nor a valid Hugging Face Hub model id"),
    ],
)
def test_bad_specs_say_what_is_wrong(spec, message):
    with pytest.raises(ModelLoadError, match=message):
        ensure_local(spec)


def test_a_file_that_is_not_a_model(tmp_path):
    config = tmp_path / "config.json"
    config.write_text("{}")
    with pytest.raises(ModelLoadError, match="give the folder that contains config.json") as error:
        load_model(str(config))
    assert str(tmp_path) in str(error.value)


# ---- the Hugging Face Hub --------------------------------------------------------------------------------------


@pytest.mark.parametrize("load", [ensure_local, load_config, load_tokenizer, load_model, describe_model])
def test_hub_id_while_offline_is_refused_quickly(offline, load):
    started = time.perf_counter()
    with pytest.raises(ModelLoadError, match="Hugging Face Hub is unreachable") as error:
        load("denselora-tests/not-a-cached-model")
    assert time.perf_counter() - started < 5
    message = str(error.value)
    assert EMBEDDED_DEFAULT in message and "local model folder" in message and "HF_HUB_OFFLINE" in message


class _Session:
    """Stands in for huggingface_hub's HTTP session: answers, or fails like a network without the Hub."""

    def __init__(self, error: Exception | None):
        self.error = error

    def head(self, url, timeout):
        if self.error:
            raise self.error
        return httpx2.Response(200, request=httpx2.Request("HEAD", url))


def test_hub_unreachable_without_offline_mode(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(connection.hub_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(connection, "get_session", lambda: _Session(httpx2.ConnectError("Name or service not known")))
    with pytest.raises(ModelLoadError, match="Hub is unreachable.*Name or service not known") as error:
        ensure_local("denselora-tests/not-a-cached-model")
    assert EMBEDDED_DEFAULT in str(error.value)


def test_hub_unreachable_uses_the_local_hub_cache(offline, monkeypatch, tiny_dir):
    monkeypatch.setattr(connection, "snapshot_download", lambda repo_id, repo_type, local_files_only: str(tiny_dir))
    assert ensure_local("org/cached-model") == str(tiny_dir)


def test_unknown_hub_model(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(connection, "hub_unreachable_reason", lambda: None)

    def not_found(repo_id, filename, **kwargs):
        response = httpx2.Response(404, request=httpx2.Request("HEAD", f"https://huggingface.co/{repo_id}"))
        raise RepositoryNotFoundError("404", response=response)

    monkeypatch.setattr(models, "hf_hub_download", not_found)
    with pytest.raises(ModelLoadError, match="There is no model 'org/typo' on the Hugging Face Hub"):
        load_config("org/typo")


# ---- trust_remote_code -----------------------------------------------------------------------------------------


def _remote_code_folder(folder, marker, model_type):
    """A model folder whose config.json points (auto_map) at code that leaves `marker` behind when it runs."""
    folder.mkdir()
    (folder / "configuration_custom.py").write_text(
        "import pathlib\n"
        "from transformers import PretrainedConfig\n"
        f"pathlib.Path({str(marker)!r}).write_text('ran')\n"
        "class CustomConfig(PretrainedConfig):\n"
        "    model_type = 'denselora_custom'\n"
    )
    config = tiny_llama().config.to_dict() | {
        "model_type": model_type,
        "auto_map": {"AutoConfig": "configuration_custom.CustomConfig"},
    }
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture
def modules_cache(tmp_path, monkeypatch):
    """Keeps transformers' copies of remote code (and its sys.path entry) inside the test."""
    import transformers.dynamic_module_utils as dynamic

    monkeypatch.setattr(dynamic, "HF_MODULES_CACHE", str(tmp_path / "modules"))
    monkeypatch.setattr(sys, "path", list(sys.path))


def test_remote_code_is_not_run_by_default(tmp_path, modules_cache):
    marker = tmp_path / "code-ran"
    folder = _remote_code_folder(tmp_path / "custom", marker, model_type="denselora_custom")
    with pytest.raises(ModelLoadError, match="trust_remote_code=True"):
        load_config(str(folder))
    assert not marker.exists()

    config = load_config(str(folder), trust_remote_code=True)
    assert marker.exists() and type(config).__name__ == "CustomConfig"


def test_remote_code_next_to_a_known_architecture_is_ignored(tmp_path, modules_cache):
    marker = tmp_path / "code-ran"
    folder = _remote_code_folder(tmp_path / "custom", marker, model_type="llama")
    assert isinstance(load_config(str(folder)), LlamaConfig)
    assert not marker.exists()


# ---- devices and dtypes ----------------------------------------------------------------------------------------


@pytest.fixture
def no_accelerator(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)


@pytest.fixture
def two_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)


def test_device_resolution_without_accelerator(no_accelerator):
    assert resolve_device() == resolve_device("auto") == resolve_device(" CPU ") == torch.device("cpu")
    for device in ("cuda", "cuda:0", "mps"):
        with pytest.raises(ValueError, match="not available on this machine"):
            resolve_device(device)


def test_device_resolution_with_gpus(two_gpus):
    assert resolve_device("auto") == resolve_device("cuda") == torch.device("cuda", 0)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ValueError, match="2 CUDA device"):
        resolve_device("cuda:2")


def test_device_resolution_prefers_mps_over_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert resolve_device("auto") == resolve_device("mps") == torch.device("mps")


@pytest.mark.parametrize("device", ["gpu", "cuda:x", "tpu", "", "cuda:-1"])
def test_bad_device_strings(device):
    with pytest.raises(ValueError, match="'auto', 'cpu', 'cuda', 'cuda:N'.*'mps'"):
        resolve_device(device)


def test_dtype_resolution(monkeypatch):
    cpu, mps, gpu = torch.device("cpu"), torch.device("mps"), torch.device("cuda", 0)
    assert resolve_dtype("auto", cpu) == torch.float32
    assert resolve_dtype("auto", mps) == torch.float32  # float16 without loss scaling overflows in training
    monkeypatch.setattr(models, "_cuda_has_native_bf16", lambda device: True)
    assert resolve_dtype("auto", gpu) == torch.bfloat16
    monkeypatch.setattr(models, "_cuda_has_native_bf16", lambda device: False)
    assert resolve_dtype("auto", gpu) == torch.float16
    assert resolve_dtype("bfloat16", cpu) == torch.bfloat16
    assert resolve_dtype("Float16", gpu) == torch.float16
    assert resolve_dtype("float32", gpu) == torch.float32


@pytest.mark.parametrize("dtype", ["fp8", "float64", "int8", ""])
def test_bad_dtype_strings(dtype):
    with pytest.raises(ValueError, match="'auto', 'float32', 'bfloat16' or 'float16'"):
        resolve_dtype(dtype, torch.device("cpu"))


def test_bad_device_fails_before_any_loading(tiny_dir, monkeypatch):
    monkeypatch.setattr(models, "ensure_local", lambda spec: pytest.fail("loaded before checking the device"))
    with pytest.raises(ValueError):
        load_model(str(tiny_dir), device="gpu")


# ---- the embedded default --------------------------------------------------------------------------------------


def test_embedded_gguf_is_found():
    path = models.embedded_gguf_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 50_000_000


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("DENSELORA_CACHE", str(tmp_path))
    assert rules.cache_dir() == tmp_path
    monkeypatch.delenv("DENSELORA_CACHE")
    assert rules.cache_dir() == Path.home() / ".cache" / "denselora-studio"


@pytest.mark.slow
def test_embedded_config_is_read_without_converting(monkeypatch, tmp_path):
    monkeypatch.setenv("DENSELORA_CACHE", str(tmp_path))
    monkeypatch.setattr(models, "_dequantize_gguf", lambda gguf: pytest.fail("dequantized just to read the config"))
    config = load_config(EMBEDDED_DEFAULT)
    assert config.model_type == "llama"
    assert (config.num_hidden_layers, config.hidden_size, config.vocab_size) == (30, 576, 49152)
    assert config.tie_word_embeddings
    assert not (tmp_path / "models").exists()


@pytest.fixture
def fake_gguf(tmp_path, monkeypatch):
    """A .gguf path whose conversion is faked (a tiny model, 0.3 s), recording each conversion."""
    monkeypatch.setenv("DENSELORA_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "tiny.Q4_0.gguf"
    gguf.write_bytes(b"GGUF")
    conversions = []

    def dequantize(path):
        conversions.append(path)
        time.sleep(0.3)  # long enough for a concurrent caller to arrive mid-conversion
        return tiny_llama(), tiny_tokenizer()

    monkeypatch.setattr(models, "_dequantize_gguf", dequantize)
    return gguf, conversions


def test_gguf_is_converted_once_under_concurrent_first_use(fake_gguf, ids):
    gguf, conversions = fake_gguf
    target = models._gguf_cache_folder(gguf)
    leftover = target.parent / f".{target.name}.dead.partial"  # from a process killed mid-conversion
    leftover.mkdir(parents=True)

    with ThreadPoolExecutor(3) as pool:
        folders = set(pool.map(lambda _: ensure_local(str(gguf)), range(3)))

    assert folders == {str(target)} and len(conversions) == 1
    assert not leftover.exists() and not list(target.parent.glob("*.partial"))
    assert json.loads((target / "denselora_source.json").read_text())["gguf"] == str(gguf.resolve())
    with torch.no_grad():  # the converted folder holds the dequantized weights as they were: the same logits
        torch.testing.assert_close(load_model(str(gguf), device="cpu")(ids).logits, tiny_llama()(ids).logits,
                                   rtol=0, atol=0)

    gguf.write_bytes(b"GGUF, version 2")  # a changed file is converted again, into a new folder
    assert ensure_local(str(gguf)) != str(target) and len(conversions) == 2


def test_failed_conversion_leaves_no_folder_behind(fake_gguf, monkeypatch):
    gguf, _ = fake_gguf

    def disk_full(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(type(tiny_tokenizer()), "save_pretrained", disk_full)
    with pytest.raises(ModelLoadError, match="No space left on device.*DENSELORA_CACHE"):
        ensure_local(str(gguf))
    target = models._gguf_cache_folder(gguf)
    assert not target.exists() and not list(target.parent.glob("*.partial"))


@pytest.mark.slow
def test_embedded_default_is_converted_once_and_reloads_identically(embedded_cache_root, monkeypatch, tmp_path):
    monkeypatch.setenv("DENSELORA_CACHE", str(embedded_cache_root))
    converted = []
    real_dequantize = models._dequantize_gguf

    def dequantize(gguf):
        converted.append(real_dequantize(gguf))
        return converted[-1]

    monkeypatch.setattr(models, "_dequantize_gguf", dequantize)

    folder = Path(ensure_local(EMBEDDED_DEFAULT))
    gguf = models.embedded_gguf_path()
    if converted:
        fresh, fresh_tokenizer = converted[0]
    else:  # an earlier test of this session converted it already
        fresh, fresh_tokenizer = real_dequantize(gguf)

    # The cache: safetensors weights, the tokenizer with its ChatML template, no GGUF quantization left behind.
    assert folder.parent == embedded_cache_root / "models"
    assert (folder / "model.safetensors").is_file() and not list(folder.glob("*.bin"))
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    assert (folder / "tokenizer.json").is_file()
    assert not list(folder.parent.glob("*.partial"))  # the temporary folder was renamed into place

    # Reused: neither converted again nor slow.
    started = time.perf_counter()
    assert ensure_local(EMBEDDED_DEFAULT) == str(folder)
    model = load_model(EMBEDDED_DEFAULT, device="cpu")
    tokenizer = load_tokenizer(EMBEDDED_DEFAULT)
    assert time.perf_counter() - started < 10
    assert len(converted) <= 1

    assert tokenizer.eos_token == tokenizer.pad_token == "<|im_end|>"
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], tokenize=False, add_generation_prompt=True
    )
    assert prompt.endswith("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    assert ids.tolist() == fresh_tokenizer(prompt, return_tensors="pt").input_ids.tolist()

    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, fresh(ids).logits, rtol=0, atol=0)
        answer = model.generate(ids, max_new_tokens=12, do_sample=False)[0, ids.shape[1]:]
    assert "Paris" in tokenizer.decode(answer)  # real, working weights

    # The freshly converted model is an ordinary model: it saves, and nothing marks it as quantized.
    assert getattr(fresh, "hf_quantizer", None) is None and not fresh.is_quantized
    fresh.save_pretrained(tmp_path / "saved")
    assert (tmp_path / "saved" / "model.safetensors").is_file()

    info = describe_model(EMBEDDED_DEFAULT)
    assert info.summary() == "LlamaForCausalLM · 134.5M parameters · 30 layers · chat template: yes"
    assert info.linear_names == LLAMA_LINEARS and info.max_position_embeddings == 8192
