"""The training fast path of DenseLoRA (a fused add, a hand-written backward) gives the reference formula's outputs and
gradients."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_llama
from numerics import assert_close_for, causal_lm_terms
from peft import get_peft_model

from denselora_app.denselora import DenseLoraConfig
from denselora_app.denselora import layer as layer_module
from denselora_app.denselora.layer import add_dense_update, dense_update


def random_update_inputs(dtype: torch.dtype, tokens: tuple[int, ...] = (2, 5), d_in: int = 12, r: int = 4,
                         d_out: int = 10, seed: int = 0):
    """x, E, M, D with a layer's scale: unit inputs, weights of standard deviation 1/sqrt(fan-in), so that every
    pre-activation is of order 1 as in a model. (Unit weights give pre-activations of +-20, where GELU's float32
    value and slope are only accurate relative to the pre-activation, not to the values compared.)"""
    generator = torch.Generator().manual_seed(seed)
    shapes = [(*tokens, d_in), (r, d_in), (r, r), (d_out, r)]
    fan_in = [1, d_in, r, r]
    return [(torch.randn(*shape, generator=generator, dtype=dtype) / math.sqrt(fan)).requires_grad_()
            for shape, fan in zip(shapes, fan_in)]


def update_terms(tokens: int, d_in: int, r: int, d_out: int) -> tuple[int, int]:
    """The terms summed along the update (E: d_in, M: r, D: r) and along its gradients (that chain, back through D:
    d_out, M and E: r each, and a weight gradient's sum over the tokens)."""
    forward = d_in + 2 * r
    return forward, forward + d_out + 2 * r + tokens


def fast_update(x, encoder, dense, decoder, activation: str, scaling: float) -> torch.Tensor:
    """The fast path added to a zero base output (in autocast's dtype under autocast, as a base layer's would be):
    exactly the update."""
    dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x.dtype
    base = torch.zeros(*x.shape[:-1], decoder.shape[0], dtype=dtype)
    return add_dense_update(base, x, encoder, dense, decoder, activation, scaling)


def outputs_and_grads(update, tensors: list[torch.Tensor], activation: str, scaling: float = 1.5):
    for t in tensors:
        t.grad = None
    out = update(*tensors, activation, scaling)
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.dtype)  # same in any dtype
    (out * upstream).sum().backward()
    return [out.detach(), *(t.grad for t in tensors)]


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("activation", ["gelu", "silu", "identity"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fast_path_equals_the_formula_in_value_and_gradient(activation, dtype, seed):
    """Against the formula's autograd in float64 on the same (upcast) inputs: the fast path's own rounding is all
    that may differ, however another CPU orders its sums."""
    tensors = random_update_inputs(dtype, seed=seed)
    reference = [t.detach().double().requires_grad_() for t in tensors]
    expected = outputs_and_grads(dense_update, reference, activation)
    actual = outputs_and_grads(fast_update, tensors, activation)
    output_terms, gradient_terms = update_terms(tokens=10, d_in=12, r=4, d_out=10)
    for name, got, want in zip(["output", "x", "E", "M", "D"], actual, expected):
        assert got.dtype == dtype
        assert_close_for(got, want, terms=output_terms if name == "output" else gradient_terms, msg=name)


def test_fast_path_passes_autograds_own_gradient_check():
    tensors = random_update_inputs(torch.float64, tokens=(3,), d_in=5, r=3, d_out=4)
    base = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)  # the gradient passes through to the base too
    for activation in ("gelu", "silu"):
        assert torch.autograd.gradcheck(lambda *t: add_dense_update(*t, activation, 0.7), [base, *tensors])


def test_fast_path_computes_only_the_gradients_asked_for():
    x, encoder, dense, decoder = random_update_inputs(torch.float32)
    x.requires_grad_(False)
    dense.requires_grad_(False)
    fast_update(x, encoder, dense, decoder, "gelu", 2.0).sum().backward()
    assert x.grad is None and dense.grad is None
    assert encoder.grad is not None and decoder.grad is not None


def test_fast_path_under_bf16_autocast_is_as_accurate_as_the_formula():
    tensors = random_update_inputs(torch.float32, tokens=(4, 6), d_in=32, r=8, d_out=24)
    exact = outputs_and_grads(dense_update, [t.detach().double().requires_grad_() for t in tensors], "gelu")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = outputs_and_grads(dense_update, tensors, "gelu")
        fast = outputs_and_grads(fast_update, tensors, "gelu")
    assert fast[0].dtype == plain[0].dtype == torch.bfloat16
    for got, want in zip(fast[1:], plain[1:]):
        assert got.dtype == want.dtype == torch.float32  # the weights' gradients come back in their own dtype
    # bf16 rounds differently along the two paths; neither may be much further from the float64 truth.
    for name, got, want, truth in zip(["output", "x", "E", "M", "D"], fast, plain, exact):
        fast_error = (got.double() - truth).norm() / truth.norm()
        plain_error = (want.double() - truth).norm() / truth.norm()
        assert fast_error < 2 * plain_error + 1e-3, f"{name}: {fast_error:.2e} vs autocast's {plain_error:.2e}"


def test_fast_path_stores_what_a_lora_update_stores():
    """Why the fast path exists: plain autograd also keeps a (tokens x out) tensor and two more rank-r ones."""
    x, encoder, dense, decoder = random_update_inputs(torch.float32, tokens=(8,), d_in=12, r=2, d_out=50)
    weights = {w.untyped_storage().data_ptr() for w in (encoder, dense, decoder)}

    def saved_activations(update) -> list[tuple[int, ...]]:
        shapes = []

        def pack(t: torch.Tensor) -> torch.Tensor:
            if t.untyped_storage().data_ptr() not in weights:
                shapes.append(tuple(t.shape))
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            update()
        return sorted(shapes)

    plain = saved_activations(lambda: dense_update(x, encoder, dense, decoder, "gelu", 1.0))
    fast = saved_activations(lambda: fast_update(x, encoder, dense, decoder, "gelu", 1.0))
    # a LoRA update of the same rank and shapes: B(A(x)) * scaling
    lora = saved_activations(lambda: torch.nn.functional.linear(torch.nn.functional.linear(x, encoder), decoder) * 1.0)
    assert (8, 50) in plain and len(plain) > len(fast)
    assert fast == lora == [(8, 2), (8, 12)]


def model_loss_and_grads(peft_model: torch.nn.Module, input_ids: torch.Tensor) -> list[torch.Tensor]:
    peft_model.zero_grad(set_to_none=True)
    loss = peft_model(input_ids=input_ids, labels=input_ids).loss
    loss.backward()
    return [loss.detach(), *(p.grad for p in peft_model.parameters() if p.requires_grad)]


@pytest.mark.parametrize("gradient_checkpointing", [False, True])
def test_whole_model_training_step_matches_the_formula(input_ids, monkeypatch, gradient_checkpointing):
    model = tiny_llama()
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    peft_model = get_peft_model(model, DenseLoraConfig(r=4, lora_alpha=8, init_weights=False))
    peft_model.train()
    actual = model_loss_and_grads(peft_model, input_ids)
    monkeypatch.setattr(layer_module, "add_dense_update",  # the plain formula instead
                        lambda result, *update: result + dense_update(*update).to(result.dtype))
    expected = model_loss_and_grads(peft_model, input_ids)
    assert len(actual) == len(expected) > 1 + 15
    # Both float32, differing only in the adapters' rounding as it travels through the model: the loss sums the chain
    # to the logits and the mean over the batch's 20 tokens, a gradient that chain back and its sum over the tokens.
    tokens = input_ids.numel()
    for index, (got, want) in enumerate(zip(actual, expected)):
        terms = causal_lm_terms(model.config, input_ids.shape[1], backward=index > 0) + tokens
        assert_close_for(got, want, terms=terms, msg="loss" if index == 0 else f"gradient {index}")


def test_inference_folds_d_and_m_into_one_matrix_and_refolds_when_they_change(model):
    """Without gradients the layer multiplies by D @ M (one matmul fewer per token); it must give the formula's
    output, follow weights changed in place (an optimizer step, a load), and never reach the saved state."""
    peft_model = get_peft_model(model, DenseLoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"],
                                                       init_weights=False))
    layer = peft_model.base_model.model.model.layers[0].self_attn.q_proj
    x = torch.randn(2, 3, layer.in_features)
    encoder, decoder = layer.shared["default"]
    terms = layer.in_features + 2 * layer.r["default"]  # E x, then M and D (or D @ M, r terms, then r)

    def expected() -> torch.Tensor:
        return layer.base_layer(x) + dense_update(x, encoder.weight, layer.denselora_M["default"].weight,
                                                  decoder.weight, "gelu", layer.scaling["default"])

    with torch.no_grad():
        assert_close_for(layer(x), expected(), terms=terms)
        folded = layer.folded_decoder("default")
        assert layer.folded_decoder("default") is folded, "computed once, not per call"
        layer.denselora_M["default"].weight.mul_(-2.0)  # in place, as an optimizer step or load_state_dict does
        assert_close_for(layer(x), expected(), terms=terms)
        assert layer.folded_decoder("default") is not folded
    assert not any("folded" in key for key in peft_model.state_dict())


def test_under_torch_compile_the_layer_uses_the_plain_formula_not_the_cache(model, monkeypatch):
    """The folded-decoder cache checks tensor versions, which torch.compile cannot trace without breaking the graph
    (measured: a recompile per layer shape until its limit); while compiling, the formula is used instead."""
    peft_model = get_peft_model(model, DenseLoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"],
                                                       init_weights=False))
    layer = peft_model.base_model.model.model.layers[0].self_attn.q_proj
    x = torch.randn(1, 2, layer.in_features)
    with torch.no_grad():
        eager = layer(x)
        layer._folded.clear()
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
        traced = layer(x)
    assert layer._folded == {}
    assert_close_for(traced, eager, terms=layer.in_features + 2 * layer.r["default"])
