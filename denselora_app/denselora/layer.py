"""The DenseLoRA layer: wraps one frozen Linear and adds the dense low-rank update. It only computes.

The shared encoder E_t and decoder D_t live on the tuner (``DenseLoraModel``), stored once; each layer keeps a
plain reference to them (not a registered submodule), so the state dict and the saved file hold them once.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from transformers.pytorch_utils import Conv1D

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": nn.functional.gelu,
    "silu": nn.functional.silu,
    "identity": lambda t: t,
}

# Where dropout applies: the adapter's input only, or also after each activation (the authors' released code).
DROPOUT_PLACEMENTS: tuple[str, ...] = ("input", "all")

# d act(u) / du applied to an incoming gradient: (grad, u) -> grad * act'(u), the kernels autograd itself uses.
ACTIVATION_GRADS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "gelu": lambda grad, u: torch.ops.aten.gelu_backward(grad, u, approximate="none"),
    "silu": torch.ops.aten.silu_backward,
    "identity": lambda grad, u: grad,
}

NOT_MERGEABLE = (
    "DenseLoRA adapters cannot be merged into the base weights: the update act(D(M(act(E(x))))) is nonlinear in x, "
    "so no weight matrix W0 + dW reproduces it. Keep the adapter as it is (save_pretrained / PeftModel.from_pretrained"
    "), or call unload() to get the base model back without the adapter."
)


class DenseLoraLayer(BaseTunerLayer):
    # Per-adapter trainable weights owned by this layer; E_t and D_t are owned by the tuner.
    adapter_layer_names = ("denselora_M",)
    other_param_names = ("r", "scaling", "activation", "module_type", "denselora_dropout", "dropout_placement")

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        self.base_layer = base_layer
        self.r: dict[str, int] = {}
        self.scaling: dict[str, float] = {}
        self.activation: dict[str, str] = {}
        self.module_type: dict[str, str] = {}
        self.denselora_dropout = nn.ModuleDict({})
        self.dropout_placement: dict[str, str] = {}
        self.denselora_M = nn.ModuleDict({})
        # adapter name -> (encoder, decoder); a plain dict on purpose, see the module docstring.
        self.shared: dict[str, tuple[nn.Linear, nn.Linear]] = {}
        # adapter name -> (what it was computed from, D @ M): inference multiplies by one matrix instead of two.
        self._folded: dict[str, tuple[tuple, torch.Tensor]] = {}
        self._disable_adapters = False
        self.merged_adapters = []
        self.kwargs = kwargs
        self.in_features, self.out_features = feature_sizes(base_layer)

    def update_layer(
        self,
        adapter_name: str,
        encoder: nn.Linear,
        decoder: nn.Linear,
        module_type: str,
        r: int,
        lora_alpha: float,
        lora_dropout: float,
        activation: str,
        init_weights: bool,
        dropout_placement: str = "input",
        init_scale: float = 1.0,
    ) -> None:
        self.r[adapter_name] = r
        self.scaling[adapter_name] = lora_alpha / r
        self.activation[adapter_name] = activation
        self.module_type[adapter_name] = module_type
        self.denselora_dropout[adapter_name] = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.dropout_placement[adapter_name] = dropout_placement
        dense = nn.Linear(r, r, bias=False)
        nn.init.kaiming_uniform_(dense.weight, a=math.sqrt(5))
        with torch.no_grad():
            dense.weight.mul_(init_scale)
        self.denselora_M[adapter_name] = dense
        self.shared[adapter_name] = (encoder, decoder)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters)

    def delete_adapter(self, adapter_name: str) -> None:
        self.shared.pop(adapter_name, None)
        self._folded.pop(adapter_name, None)
        super().delete_adapter(adapter_name)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        raise ValueError(NOT_MERGEABLE)

    def unmerge(self) -> None:
        # Nothing is ever merged (merge refuses), so there is nothing to undo.
        return None


class Linear(nn.Module, DenseLoraLayer):
    """DenseLoRA on a ``torch.nn.Linear`` (or transformers' ``Conv1D``) base layer."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, **update_kwargs: Any) -> None:
        super().__init__()
        DenseLoraLayer.__init__(self, base_layer)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, **update_kwargs)

    def add_update(self, result: torch.Tensor, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        """``result`` plus the adapter's update for input ``x``; the update is computed in the adapter's dtype (or
        autocast's) and added in ``result``'s."""
        encoder, decoder = self.shared[adapter_name]
        dropout = self.denselora_dropout[adapter_name]
        x = dropout(self._cast_input_dtype(x, encoder.weight.dtype))
        weights = (encoder.weight, self.denselora_M[adapter_name].weight, decoder.weight)
        activation, scaling = self.activation[adapter_name], self.scaling[adapter_name]
        if dropout.training and isinstance(dropout, nn.Dropout) and self.dropout_placement[adapter_name] == "all":
            # Plain autograd: the fused backward recomputes the hidden values, which would draw new dropout masks.
            act = ACTIVATIONS[activation]
            hidden = dropout(act(nn.functional.linear(x, weights[0])))
            update = dropout(act(nn.functional.linear(nn.functional.linear(hidden, weights[1]), weights[2])))
            return torch.add(result, update.to(result.dtype), alpha=scaling)
        if torch.is_grad_enabled() and any(t.requires_grad for t in (result, x, *weights)):
            return add_dense_update(result, x, *weights, activation, scaling)
        if torch.compiler.is_compiling():
            # Under torch.compile the cache's version checks would break the graph and recompile for every layer's
            # shapes; the compiler fuses the plain formula instead.
            return torch.add(result, dense_update(x, *weights, activation, 1.0).to(result.dtype), alpha=scaling)
        act = ACTIVATIONS[activation]
        update = act(nn.functional.linear(act(nn.functional.linear(x, weights[0])), self.folded_decoder(adapter_name)))
        # Scaling inside the add: one pass over the output-wide tensor instead of two.
        return torch.add(result, update.to(result.dtype), alpha=scaling)

    def folded_decoder(self, adapter_name: str) -> torch.Tensor:
        """``D @ M`` (out x r), so that inference computes ``D(M h)`` with one small matmul instead of two (the same
        value up to float rounding). Recomputed whenever D or M changes: in place (an optimizer step, loading
        weights: the tensors' version counters move) or for good (moved to another device or dtype)."""
        decoder, dense = self.shared[adapter_name][1].weight, self.denselora_M[adapter_name].weight
        key = (decoder._version, dense._version, decoder.data_ptr(), dense.data_ptr(), decoder.dtype)
        cached = self._folded.get(adapter_name)
        if cached is None or cached[0] != key:
            with torch.no_grad():
                cached = (key, decoder @ dense)
            self._folded[adapter_name] = cached
        return cached[1]

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters:
            return result
        for adapter_name in self.active_adapters:
            if adapter_name in self.denselora_M:
                result = self.add_update(result, x, adapter_name)
        return result

    def __repr__(self) -> str:
        return "denselora." + super().__repr__()


def dense_update(
    x: torch.Tensor,
    encoder_weight: torch.Tensor,
    dense_weight: torch.Tensor,
    decoder_weight: torch.Tensor,
    activation: str,
    scaling: float,
) -> torch.Tensor:
    """The DenseLoRA update ``scaling * act(D(M(act(E(x)))))``, written as the plain formula (the reference)."""
    act = ACTIVATIONS[activation]
    hidden = act(nn.functional.linear(x, encoder_weight))
    return act(nn.functional.linear(nn.functional.linear(hidden, dense_weight), decoder_weight)) * scaling


def add_dense_update(
    result: torch.Tensor,
    x: torch.Tensor,
    encoder_weight: torch.Tensor,
    dense_weight: torch.Tensor,
    decoder_weight: torch.Tensor,
    activation: str,
    scaling: float,
) -> torch.Tensor:
    """``result + dense_update(x, ...)`` for training: a backward pass that stores only what LoRA stores (see
    ``_DenseAdd``), and the scaling applied where it costs least.

    Under autocast the update's inputs are cast to autocast's dtype first, as autocast itself would for these
    matmuls, so the custom backward sees one dtype throughout; autograd casts the weights' gradients back to their
    own dtype.
    """
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        x, encoder_weight, dense_weight, decoder_weight = (
            t.to(dtype) if t.is_floating_point() and t.dtype != torch.float64 else t
            for t in (x, encoder_weight, dense_weight, decoder_weight)
        )
    return _DenseAdd.apply(result, x, encoder_weight, dense_weight, decoder_weight, activation, scaling)


class _DenseAdd(torch.autograd.Function):
    """``result + dense_update(x, ...)`` with a hand-written backward that stores what LoRA stores.

    Plain autograd would keep ``D(M(h))`` (one value per output feature and token) for the outer activation's
    backward, and two more rank-r tensors: more memory than LoRA, which keeps its input and one rank-r tensor. Here
    only the input ``x`` and ``E x`` are stored; the backward rebuilds ``h = act(E x)``, ``M h`` and ``D(M h)`` at the
    cost of two r-wide matmuls, small next to the layer's own. The scaling is folded into the add going forward and
    into r-wide tensors going back, so no output-wide tensor is multiplied by it. Gradients are autograd's up to
    float rounding order.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        result: torch.Tensor,
        x: torch.Tensor,
        encoder_weight: torch.Tensor,
        dense_weight: torch.Tensor,
        decoder_weight: torch.Tensor,
        activation: str,
        scaling: float,
    ) -> torch.Tensor:
        encoded = nn.functional.linear(x, encoder_weight)
        ctx.save_for_backward(x, encoded, encoder_weight, dense_weight, decoder_weight)
        ctx.activation, ctx.scaling = activation, scaling
        act = ACTIVATIONS[activation]
        update = act(nn.functional.linear(nn.functional.linear(act(encoded), dense_weight), decoder_weight))
        return torch.add(result, update.to(result.dtype), alpha=scaling)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, encoded, encoder_weight, dense_weight, decoder_weight = ctx.saved_tensors
        act, act_grad = ACTIVATIONS[ctx.activation], ACTIVATION_GRADS[ctx.activation]
        need_result, need_x, need_encoder, need_dense, need_decoder = ctx.needs_input_grad[:5]
        hidden = act(encoded)
        mixed = nn.functional.linear(hidden, dense_weight)
        grad_decoded = act_grad(grad.to(encoded.dtype), nn.functional.linear(mixed, decoder_weight))
        grad_decoder = _weight_grad(grad_decoded, mixed).mul_(ctx.scaling) if need_decoder else None
        grad_mixed = (grad_decoded @ decoder_weight).mul_(ctx.scaling)
        grad_dense = _weight_grad(grad_mixed, hidden) if need_dense else None
        grad_encoded = act_grad(grad_mixed @ dense_weight, encoded)
        grad_encoder = _weight_grad(grad_encoded, x) if need_encoder else None
        grad_x = grad_encoded @ encoder_weight if need_x else None
        return grad if need_result else None, grad_x, grad_encoder, grad_dense, grad_decoder, None, None


def _weight_grad(grad_out: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    """Gradient of ``linear(inputs, W)`` with respect to W, summed over every leading (batch, token) dimension."""
    return grad_out.reshape(-1, grad_out.shape[-1]).T @ inputs.reshape(-1, inputs.shape[-1])


def feature_sizes(base_layer: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a supported target; ValueError for anything else."""
    if isinstance(base_layer, nn.Linear):
        return base_layer.in_features, base_layer.out_features
    if isinstance(base_layer, Conv1D):
        # Conv1D stores its weight as (in, out); the adapter only reads x, so no transpose is needed.
        in_features, out_features = base_layer.weight.shape
        return in_features, out_features
    raise ValueError(
        f"DenseLoRA can only adapt torch.nn.Linear (or transformers Conv1D) modules, got {type(base_layer).__name__}."
    )
