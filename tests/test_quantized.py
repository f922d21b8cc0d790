"""DenseLoRA over 4-bit and 8-bit bases (bitsandbytes, on the CPU): the same update as on the dequantized model,
training from the CLI, save and reload in a fresh process, resume, chat and the model card."""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch
from conftest import save_tiny_model, tiny_run_config
from numerics import assert_close_for, causal_lm_terms, tolerance_for
from peft import get_peft_model

from denselora_app import cli
from denselora_app.denselora import DenseLoraConfig
from denselora_app.denselora.layer import dense_update
from denselora_app.engine.launch import launch, resume_run
from denselora_app.engine.models import load_model
from denselora_app.engine.worker import execute
from denselora_app.hub.publish import build_model_repo
from denselora_app.runs import list_runs
from denselora_app.serving.chat import ChatEngine, GenerationSettings

REPO = Path(__file__).parent.parent
pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore::UserWarning")]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tiny LLaMA whose layers are wide enough for bitsandbytes' 64-value quantization blocks."""
    return save_tiny_model(tmp_path_factory.mktemp("quantized-model"), hidden_size=128, intermediate_size=256)


def adapter_config() -> DenseLoraConfig:
    return DenseLoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_weights=False,
                           task_type="CAUSAL_LM")


def dequantized(model_dir: Path, quantized: torch.nn.Module) -> torch.nn.Module:
    """The full-precision model with every quantized weight replaced by what the quantized layer multiplies by."""
    reference = load_model(str(model_dir), device="cpu")
    layers = dict(quantized.named_modules())
    for name, module in reference.named_modules():
        source = layers.get(name)
        if isinstance(source, bnb.nn.Linear4bit):
            module.weight.data = bnb.functional.dequantize_4bit(source.weight.data, source.weight.quant_state).float()
        elif isinstance(source, bnb.nn.Linear8bitLt):
            module.weight.data = source.weight.data.float() * source.weight.SCB.float().unsqueeze(1) / 127
    return reference


@pytest.mark.parametrize("quantization", ["4bit", "8bit"])
def test_the_update_on_a_quantized_base_is_the_dequantized_models(model_dir, quantization):
    quantized = load_model(str(model_dir), device="cpu", quantization=quantization)
    reference = dequantized(model_dir, quantized)
    torch.manual_seed(0)
    q_peft = get_peft_model(quantized, adapter_config())
    r_peft = get_peft_model(reference, adapter_config())
    r_peft.load_state_dict({k: v for k, v in q_peft.state_dict().items() if "denselora_" in k}, strict=False)
    ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(1))

    # Layer by layer: the adapter adds exactly its update, computed from the layer input in the adapter's dtype.
    layer = q_peft.base_model.model.model.layers[0].self_attn.q_proj
    x = torch.randn(2, 5, 128)
    encoder, decoder = layer.shared["default"]
    expected = dense_update(x, encoder.weight, layer.denselora_M["default"].weight, decoder.weight, "gelu",
                            layer.scaling["default"])
    base = layer.base_layer(x)
    # E x, then M and D, in float32; subtracting the base output back leaves its rounding, so it sets the scale too.
    assert_close_for(layer(x) - base, expected, terms=128 + 2 * 4, scale=max(expected.abs().max(), base.abs().max()))

    # The whole model: as close to the dequantized reference as the quantized matmul itself is.
    with torch.no_grad():
        q_logits, r_logits = q_peft(ids).logits, r_peft(ids).logits
        with q_peft.disable_adapter(), r_peft.disable_adapter():
            q_base, r_base = q_peft(ids).logits, r_peft(ids).logits
    base_gap = (q_base - r_base).abs().max()
    # Beyond the quantization gap, what float32 rounding along the model allows (the model is 2 layers of 128).
    rounding = tolerance_for(r_logits, terms=causal_lm_terms(reference.config, ids.shape[1]))["atol"]
    assert (q_logits - q_base).abs().max() > 10 * base_gap, "the adapter must change the output measurably"
    assert (q_logits - r_logits).abs().max() <= 2 * base_gap + rounding
    torch.testing.assert_close(q_logits - q_base, r_logits - r_base, atol=4 * base_gap + 2 * rounding, rtol=0.05)


tiny_run = functools.partial(tiny_run_config, quantization="4bit")


@pytest.mark.slow
def test_a_4bit_run_trains_saves_reloads_in_a_fresh_process_and_resumes(model_dir, app_data_file, runs_root,
                                                                        caplog):
    run = launch(tiny_run(model_dir, app_data_file), background=False)
    assert run.config().checkpointing, "gradient checkpointing is on by default for a quantized run"
    with caplog.at_level("INFO", logger="denselora_app"):
        assert execute(run) == "completed" and run.checkpoints() == [2, 4]
    assert "Base model loaded in 4bit" in caplog.text
    losses = [m["loss"] for m in run.metrics() if "loss" in m]
    assert len(losses) == 4 and all(loss == loss for loss in losses)

    code = f"""
import sys, torch, warnings
warnings.filterwarnings("ignore")
sys.path.insert(0, {str(Path(__file__).parent)!r})
import denselora_app.denselora
from numerics import causal_lm_terms, tolerance_for
import bitsandbytes as bnb
from peft import PeftModel
from denselora_app.engine.models import load_model
base = load_model({str(model_dir)!r}, device="cpu", quantization="4bit")
assert isinstance(base.model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)
model = PeftModel.from_pretrained(base, {str(run.adapter_dir)!r})
ids = torch.tensor([[1, 2, 3, 4]])
with torch.no_grad():
    on = model(ids).logits
    with model.disable_adapter():
        off = model(ids).logits
rounding = tolerance_for(off, terms=causal_lm_terms(model.config, ids.shape[1]))["atol"]  # float32 along the model
print("changed" if (on - off).abs().max() > rounding else "unchanged")
"""
    fresh = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert fresh.returncode == 0 and fresh.stdout.strip() == "changed", fresh.stderr[-2000:]

    # Resume: as if it had stopped at step 2, it continues on a 4-bit base to step 4 with one unbroken curve.
    run.update_status(state="stopped", step=2)
    shutil.rmtree(run.checkpoint_dir(4))
    resume_run(run, background=False)
    assert execute(run, resume=True) == "completed"
    assert [m["step"] for m in run.metrics() if "loss" in m] == [1, 2, 3, 4]
    assert run.status().step == 4


@pytest.mark.slow
def test_8bit_and_4bit_from_the_cli(model_dir, app_data_file, runs_root, tmp_path):
    config = tmp_path / "run.yaml"
    tiny_run(model_dir, app_data_file, max_steps=2).to_yaml(config)
    for quantization in ("8bit", "4bit"):
        result = subprocess.run([sys.executable, "-m", "denselora_app", "train", str(config), "--set",
                                 f"quantization={quantization}"], capture_output=True, text=True, cwd=REPO,
                                timeout=300, env={**os.environ, "DENSELORA_RUNS": str(runs_root)})
        assert result.returncode == 0, result.stderr[-2000:]
        assert "Your adapter is in" in result.stdout
    assert sorted(r.config().quantization for r in list_runs(runs_root)) == ["4bit", "8bit"]


@pytest.mark.slow
def test_chat_and_the_card_of_a_quantized_run(model_dir, app_data_file, runs_root, tmp_path, capsys, monkeypatch):
    run = launch(tiny_run(model_dir, app_data_file, max_steps=2), background=False)
    assert execute(run) == "completed"
    engine = ChatEngine(device="cpu", runs_root=runs_root)
    loaded = engine.select(run.id)
    assert loaded.dtype == "4bit (float32 compute)"
    assert isinstance(engine._base.model.model.layers[0].self_attn.o_proj, bnb.nn.Linear4bit)  # not adapted
    settings = GenerationSettings(max_new_tokens=4, temperature=0, seed=0)
    assert "".join(engine.stream_reply("the quick", settings=settings))
    # Switchable: the same adapter on an unquantized base.
    full = ChatEngine(device="cpu", runs_root=runs_root, quantization="none").select(run.id)
    assert full.dtype == "float32"
    assert cli.main(["chat", run.id, "--prompt", "the quick", "--max-new-tokens", "3", "--temperature", "0",
                     "--quantization", "8bit"]) == 0
    capsys.readouterr()

    from denselora_app.ui import chat_tab

    monkeypatch.setattr(chat_tab, "_engine", None)
    assert "4bit (float32 compute) on cpu" in chat_tab.load_adapter(str(run.adapter_dir))
    assert "8bit (float32 compute) on cpu" in chat_tab.set_base_precision("8bit", str(run.adapter_dir))
    assert "4bit (float32 compute) on cpu" in chat_tab.set_base_precision("as trained", str(run.adapter_dir))
    monkeypatch.setattr(chat_tab, "_engine", None)
    assert "Base models will load in 8-bit." in chat_tab.set_base_precision("8bit", None)

    card = (build_model_repo(run.id, "alice/q", tmp_path / "repo").path / "README.md").read_text()
    assert "| `quantization` | 4bit |" in card and "loaded in 4-bit NF4 with double quantization" in card
    assert 'BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4"' in card
