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

NOT_MERGEABLE = (
    "DenseLoRA adapters cannot be merged into the base weights: the update act(D(M(act(E(x))))) is nonlinear in x, "
    "so no weight matrix W0 + dW reproduces it. Keep the adapter as it is (save_pretrained / PeftModel.from_pretrained"
    "), or call unload() to get the base model back without the adapter."
)


class DenseLoraLayer(BaseTunerLayer):
    # Per-adapter trainable weights owned by this layer; E_t and D_t are owned by the tuner.
    adapter_layer_names = ("denselora_M",)
    other_param_names = ("r", "scaling", "activation", "module_type", "denselora_dropout")

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        self.base_layer = base_layer
        self.r: dict[str, int] = {}
        self.scaling: dict[str, float] = {}
        self.activation: dict[str, str] = {}
        self.module_type: dict[str, str] = {}
        self.denselora_dropout = nn.ModuleDict({})
        self.denselora_M = nn.ModuleDict({})
        # adapter name -> (encoder, decoder); a plain dict on purpose, see the module docstring.
        self.shared: dict[str, tuple[nn.Linear, nn.Linear]] = {}
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
    ) -> None:
        self.r[adapter_name] = r
        self.scaling[adapter_name] = lora_alpha / r
        self.activation[adapter_name] = activation
        self.module_type[adapter_name] = module_type
        self.denselora_dropout[adapter_name] = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        dense = nn.Linear(r, r, bias=False)
        nn.init.kaiming_uniform_(dense.weight, a=math.sqrt(5))
        self.denselora_M[adapter_name] = dense
        self.shared[adapter_name] = (encoder, decoder)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters)

    def delete_adapter(self, adapter_name: str) -> None:
        self.shared.pop(adapter_name, None)
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

    def delta(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        """The adapter's additive update for input ``x``, in the adapter's dtype."""
        encoder, decoder = self.shared[adapter_name]
        act = ACTIVATIONS[self.activation[adapter_name]]
        x = self._cast_input_dtype(x, encoder.weight.dtype)
        hidden = act(encoder(self.denselora_dropout[adapter_name](x)))
        return act(decoder(self.denselora_M[adapter_name](hidden))) * self.scaling[adapter_name]

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters:
            return result
        result_dtype = result.dtype
        for adapter_name in self.active_adapters:
            if adapter_name in self.denselora_M:
                result = result + self.delta(x, adapter_name).to(result_dtype)
        return result

    def __repr__(self) -> str:
        return "denselora." + super().__repr__()


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
