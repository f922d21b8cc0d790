"""The DenseLoRA method: exact maths, sharing, PEFT integration (save/load, adapters, dtypes), errors."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from conftest import tiny_llama, tiny_llama_config
from numerics import assert_close_for, causal_lm_terms, tolerance_for
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from denselora_app.denselora import DEFAULT_TARGET_MODULES, DenseLoraConfig, DenseLoraLayer


def expected_trainable(config: LlamaConfig, r: int, targets=DEFAULT_TARGET_MODULES) -> int:
    """The paper's count: r*(in+out) per module type, plus r*r per adapted (layer, type)."""
    head_dim = config.hidden_size // config.num_attention_heads
    kv = config.num_key_value_heads * head_dim
    shapes = {
        "q_proj": (config.hidden_size, config.hidden_size),
        "k_proj": (config.hidden_size, kv),
        "v_proj": (config.hidden_size, kv),
        "o_proj": (config.hidden_size, config.hidden_size),
        "gate_proj": (config.hidden_size, config.intermediate_size),
        "up_proj": (config.hidden_size, config.intermediate_size),
        "down_proj": (config.intermediate_size, config.hidden_size),
    }
    shared = sum(r * sum(shapes[t]) for t in targets)
    return shared + config.num_hidden_layers * len(targets) * r * r


def trainable_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def train_steps(model: torch.nn.Module, input_ids: torch.Tensor, steps: int = 3, lr: float = 1e-2) -> None:
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        loss = model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


def test_parameter_count_matches_formula_with_grouped_query_attention(model):
    peft_model = get_peft_model(model, DenseLoraConfig(r=4, lora_alpha=8))
    assert trainable_count(peft_model) == expected_trainable(model.config, 4)
    # only adapter weights train
    names = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert names and all("denselora_" in n for n in names)


def test_llama3_8b_shape_on_meta_device_has_925696_trainable_parameters():
    config = LlamaConfig(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
    )
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    total = sum(p.numel() for p in model.parameters())
    peft_model = get_peft_model(model, DenseLoraConfig(r=16, lora_alpha=32))
    trainable = trainable_count(peft_model)
    assert trainable == 925_696 == expected_trainable(config, 16)
    assert round(100 * trainable / total, 4) == pytest.approx(0.0115, abs=1e-4)


def test_other_targets_get_their_own_shared_pair(model):
    targets = ["o_proj", "gate_proj", "k_proj"]
    peft_model = get_peft_model(model, DenseLoraConfig(r=2, target_modules=targets))
    tuner = peft_model.base_model
    assert sorted(tuner.denselora_encoder["default"]) == sorted(targets)
    # k_proj is narrower than q_proj under grouped-query attention: its decoder is too
    assert tuner.denselora_decoder["default"]["k_proj"].out_features == 16
    assert trainable_count(peft_model) == expected_trainable(model.config, 2, targets)


def test_fresh_adapter_is_an_exact_no_op(model, input_ids):
    reference = model(input_ids).logits
    peft_model = get_peft_model(model, DenseLoraConfig(r=8, lora_alpha=16, lora_dropout=0.1))
    assert torch.equal(peft_model(input_ids).logits, reference)


def test_forward_matches_the_formula(model):
    peft_model = get_peft_model(model, DenseLoraConfig(r=4, lora_alpha=12, init_weights=False, activation="silu"))
    layer = peft_model.base_model.model.model.layers[1].self_attn.v_proj
    tuner = peft_model.base_model
    x = torch.randn(3, 32)
    E = tuner.denselora_encoder["default"]["v_proj"].weight
    D = tuner.denselora_decoder["default"]["v_proj"].weight
    M = layer.denselora_M["default"].weight
    act = torch.nn.functional.silu
    expected = layer.base_layer(x) + (12 / 4) * act((act(x @ E.T) @ M.T) @ D.T)
    assert_close_for(layer(x), expected, terms=32 + 4 + 4)  # E x, then M and D


def test_encoder_and_decoder_objects_are_shared_by_every_layer(model):
    peft_model = get_peft_model(model, DenseLoraConfig(r=4))
    tuner = peft_model.base_model
    layers = [m for m in peft_model.modules() if isinstance(m, DenseLoraLayer)]
    assert len(layers) == 3 * 5
    for layer in layers:
        module_type = layer.module_type["default"]
        encoder, decoder = layer.shared["default"]
        assert encoder is tuner.denselora_encoder["default"][module_type]
        assert decoder is tuner.denselora_decoder["default"][module_type]
    assert len({id(layer.denselora_M["default"]) for layer in layers}) == len(layers)


def test_gradients_reach_encoder_decoder_and_every_dense_matrix(model, input_ids):
    peft_model = get_peft_model(model, DenseLoraConfig(r=4, lora_alpha=8))
    train_steps(peft_model, input_ids, steps=1)  # D starts at zero, so one step first lets gradient reach E and M
    peft_model.train()
    peft_model(input_ids=input_ids, labels=input_ids).loss.backward()
    trainable = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
    assert any("denselora_encoder" in n for n in trainable) and any("denselora_decoder" in n for n in trainable)
    assert sum("denselora_M" in n for n in trainable) == 15
    for name, param in trainable.items():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_save_stores_shared_weights_once_and_records_peft_type(model, tmp_path):
    peft_model = get_peft_model(model, DenseLoraConfig(r=4))
    peft_model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    encoders = [k for k in tensors if "denselora_encoder" in k]
    decoders = [k for k in tensors if "denselora_decoder" in k]
    assert len(encoders) == len(decoders) == 5
    assert sum("denselora_M" in k for k in tensors) == 15
    assert len(tensors) == 25
    assert all(".default." not in k for k in tensors)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "DENSELORA"


@pytest.mark.slow
def test_round_trip_in_a_fresh_process_gives_identical_logits(model, input_ids, tmp_path):
    peft_model = get_peft_model(model, DenseLoraConfig(r=4, lora_alpha=8))
    train_steps(peft_model, input_ids)
    peft_model.save_pretrained(tmp_path / "adapter")
    with torch.no_grad():  # the inference path on both sides: the same arithmetic, so any difference is the file's
        expected = peft_model(input_ids).logits
    torch.save({"ids": input_ids, "logits": expected}, tmp_path / "expected.pt")
    script = textwrap.dedent(
        f"""
        import sys, warnings, torch
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        import denselora_app.denselora
        from peft import PeftModel
        from conftest import tiny_llama
        saved = torch.load({str(tmp_path / "expected.pt")!r})
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)
            model = PeftModel.from_pretrained(tiny_llama(), {str(tmp_path / "adapter")!r}, adapter_name="other")
        with torch.no_grad():
            logits = model(saved["ids"]).logits
        assert torch.equal(logits, saved["logits"]), (logits - saved["logits"]).abs().max()
        print("identical")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "identical" in result.stdout


def test_trained_adapter_changes_output_and_disable_gives_base_exactly(model, input_ids):
    reference = model(input_ids).logits.clone()
    peft_model = get_peft_model(model, DenseLoraConfig(r=4, lora_alpha=8))
    train_steps(peft_model, input_ids)
    adapted = peft_model(input_ids).logits
    rounding = tolerance_for(reference, terms=causal_lm_terms(model.config, input_ids.shape[1]))
    assert not torch.allclose(adapted, reference, **rounding)  # changed beyond any rounding
    with peft_model.disable_adapter():
        assert torch.equal(peft_model(input_ids).logits, reference)
    assert torch.equal(peft_model(input_ids).logits, adapted)


def test_two_adapters_switch_and_delete(model, input_ids, tmp_path):
    reference = model(input_ids).logits.clone()
    peft_model = get_peft_model(model, DenseLoraConfig(r=4))
    train_steps(peft_model, input_ids)
    first = peft_model(input_ids).logits
    peft_model.add_adapter("second", DenseLoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    # the added adapter is frozen until activated, the first one still trains
    assert not any(p.requires_grad for n, p in peft_model.named_parameters() if ".second." in n)
    peft_model.set_adapter("second")
    assert not any(p.requires_grad for n, p in peft_model.named_parameters() if ".default." in n)
    assert trainable_count(peft_model) == 2 * (32 + 32) + 2 * (32 + 16) + 3 * 2 * 4
    assert torch.equal(peft_model(input_ids).logits, reference)  # fresh "second" is a no-op
    train_steps(peft_model, input_ids)
    second = peft_model(input_ids).logits
    rounding = tolerance_for(first, terms=causal_lm_terms(model.config, input_ids.shape[1]))
    assert not torch.allclose(second, first, **rounding)
    peft_model.set_adapter("default")
    assert torch.equal(peft_model(input_ids).logits, first)
    peft_model.save_pretrained(tmp_path)  # each adapter in its own folder, shared weights once each
    assert len(load_file(tmp_path / "second" / "adapter_model.safetensors")) == 4 + 6
    peft_model.delete_adapter("second")
    assert "second" not in peft_model.base_model.denselora_encoder
    assert torch.equal(peft_model(input_ids).logits, first)


def test_merge_is_refused_with_an_explanation_and_unload_returns_the_base(model, input_ids):
    reference = model(input_ids).logits.clone()
    peft_model = get_peft_model(model, DenseLoraConfig(r=4))
    train_steps(peft_model, input_ids)
    for call in (peft_model.merge_and_unload, peft_model.merge_adapter):
        with pytest.raises(ValueError, match="cannot be merged.*nonlinear.*unload"):
            call()
    base = peft_model.unload()
    assert not any(isinstance(m, DenseLoraLayer) for m in base.modules())
    assert torch.equal(base(input_ids).logits, reference)


def test_bf16_base_keeps_a_float32_adapter(input_ids):
    model = tiny_llama(dtype=torch.bfloat16)
    reference = model(input_ids).logits
    peft_model = get_peft_model(model, DenseLoraConfig(r=4))
    adapter = {n: p.dtype for n, p in peft_model.named_parameters() if "denselora_" in n}
    assert set(adapter.values()) == {torch.float32}
    assert peft_model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight.dtype == torch.bfloat16
    assert torch.equal(peft_model(input_ids).logits, reference)
    train_steps(peft_model, input_ids, steps=1)
    assert peft_model(input_ids).logits.dtype == torch.bfloat16


def test_gpt2_conv1d_targets_work():
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=100, n_positions=32)).eval()
    ids = torch.randint(0, 100, (1, 8))
    reference = model(ids).logits
    peft_model = get_peft_model(model, DenseLoraConfig(r=4, target_modules=["c_attn", "c_fc"]))
    assert torch.equal(peft_model(ids).logits, reference)
    assert trainable_count(peft_model) == 4 * (32 + 96) + 4 * (32 + 128) + 2 * 2 * 16


@pytest.mark.parametrize("placement", ["input", "all"])
def test_dropout_applies_where_the_placement_says_while_training(model, placement):
    peft_model = get_peft_model(model, DenseLoraConfig(r=4, lora_alpha=8, init_weights=False, lora_dropout=0.5,
                                                       dropout_placement=placement))
    layer = peft_model.base_model.model.model.layers[0].self_attn.q_proj
    tuner = peft_model.base_model
    E = tuner.denselora_encoder["default"]["q_proj"].weight
    D = tuner.denselora_decoder["default"]["q_proj"].weight
    M = layer.denselora_M["default"].weight
    x = torch.randn(5, 32, requires_grad=True)
    act = torch.nn.functional.gelu

    def formula(drop):
        hidden = act(drop(x) @ E.T)
        if placement == "all":
            hidden = drop(hidden)
        update = act((hidden @ M.T) @ D.T)
        return layer.base_layer(x) + 2.0 * (drop(update) if placement == "all" else update)

    peft_model.train()
    torch.manual_seed(3)
    actual = layer(x)
    torch.manual_seed(3)  # the same masks, drawn in the same order
    expected = formula(torch.nn.Dropout(0.5))
    forward_terms = 32 + 4 + 4  # E x, then M and D; a gradient runs that back (D: 32, M and E: 4) and sums 5 tokens
    assert_close_for(actual, expected, terms=forward_terms)
    grad = torch.randn_like(actual)
    actual_grads = torch.autograd.grad(actual, (x, E, M, D), grad)
    expected_grads = torch.autograd.grad(expected, (x, E, M, D), grad)
    for name, got, want in zip("xEMD", actual_grads, expected_grads):
        assert_close_for(got, want, terms=2 * forward_terms + 5, msg=name)
    peft_model.eval()  # no dropout at inference, wherever it is placed
    assert_close_for(layer(x), formula(torch.nn.Identity()), terms=forward_terms)


def test_dropout_placement_is_saved_with_the_adapter_and_comes_from_the_run_config(model, tmp_path):
    from denselora_app.config import RunConfig
    from denselora_app.engine.methods import build_peft_config

    cfg = RunConfig(r=4, dropout=0.1, dropout_placement="all", target_modules=["q_proj", "v_proj"])
    peft_model = get_peft_model(model, build_peft_config(cfg))
    peft_model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["dropout_placement"] == "all"
    reloaded = PeftModel.from_pretrained(tiny_llama(), tmp_path, is_trainable=True)
    assert reloaded.base_model.model.model.layers[1].self_attn.v_proj.dropout_placement["default"] == "all"
    # Adapters saved before the option existed read as they were trained: dropout on the input only.
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    del config["dropout_placement"]
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    older = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert older.base_model.model.model.layers[1].self_attn.v_proj.dropout_placement["default"] == "input"


def test_init_scale_multiplies_the_initial_encoder_and_dense_matrices_and_keeps_a_no_op(input_ids, tmp_path):
    from denselora_app.config import RunConfig
    from denselora_app.engine.methods import build_peft_config

    def fresh(scale):
        torch.manual_seed(0)
        cfg = RunConfig(r=4, init_scale=scale, target_modules=["q_proj", "v_proj"])
        return get_peft_model(tiny_llama(), build_peft_config(cfg))

    plain, scaled = fresh(1.0), fresh(4.0)
    weights = dict(plain.named_parameters())
    for name, param in scaled.named_parameters():
        if "denselora_encoder" in name or "denselora_M" in name:
            assert torch.equal(param, 4.0 * weights[name])  # the same draws, times a power of two: exact
        elif "denselora_decoder" in name:
            assert not param.any()  # D starts at zero
    with torch.no_grad():  # D = 0: the update is exactly zero, whatever E and M
        assert torch.equal(scaled(input_ids=input_ids).logits, tiny_llama()(input_ids=input_ids).logits)
    scaled.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["init_scale"] == 4.0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(r=0), "rank r must be a positive integer, got r=0"),
        (dict(init_scale=0), "init_scale must be positive"),
        (dict(dropout_placement="hidden"), "dropout_placement must be one of"),
        (dict(lora_alpha=0), "lora_alpha must be positive, got lora_alpha=0"),
        (dict(lora_alpha=-2.0), "lora_alpha must be positive"),
        (dict(lora_dropout=1.0), "lora_dropout must be in"),
        (dict(activation="relu6"), "activation must be one of"),
    ],
)
def test_bad_config_values_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DenseLoraConfig(**kwargs)


def test_unknown_target_name_is_named_with_the_available_ones(model):
    with pytest.raises(ValueError, match=r"\['qproj'\] not found.*'q_proj'"):
        get_peft_model(model, DenseLoraConfig(target_modules=["q_proj", "qproj"]))


def test_non_linear_target_is_refused_by_name(model):
    with pytest.raises(ValueError, match="embed_tokens.*only adapt torch.nn.Linear.*Embedding"):
        get_peft_model(model, DenseLoraConfig(target_modules=["embed_tokens"]))


def test_default_targets_missing_from_model_give_a_clear_error():
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=4, vocab_size=100, n_positions=32))
    with pytest.raises(ValueError, match="not found in this model.*c_attn"):
        get_peft_model(model, DenseLoraConfig())


def test_layers_to_transform_limits_the_dense_matrices():
    model = tiny_llama()
    config = DenseLoraConfig(r=4, layers_to_transform=[0, 2], layers_pattern="layers")
    peft_model = get_peft_model(model, config)
    assert sum(isinstance(m, DenseLoraLayer) for m in peft_model.modules()) == 10
    assert trainable_count(peft_model) == expected_trainable(tiny_llama_config(num_hidden_layers=2), 4)


def test_loading_warns_about_nothing(model, tmp_path):
    peft_model = get_peft_model(model, DenseLoraConfig(r=4))
    peft_model.save_pretrained(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path, adapter_name="renamed", is_trainable=True)
    assert not [w for w in caught if "key" in str(w.message).lower()], [str(w.message) for w in caught]
    assert trainable_count(loaded) == expected_trainable(model.config, 4)
