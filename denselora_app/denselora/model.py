"""The DenseLoRA tuner: finds the target modules, owns the shared encoders/decoders, injects layers. It only injects."""

from __future__ import annotations

from typing import Any, Sequence

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from torch import nn

from .config import DEFAULT_TARGET_MODULES, DenseLoraConfig
from .layer import NOT_MERGEABLE, DenseLoraLayer, Linear, feature_sizes

# Tuner-level containers, laid out [adapter_name][module_type] so PEFT's load-time lookup finds them.
SHARED_CONTAINERS = ("denselora_encoder", "denselora_decoder")


class DenseLoraModel(BaseTuner):
    """Injects DenseLoRA into a transformers model; use it through ``peft.get_peft_model``.

    Example::

        import denselora_app.denselora  # registers "denselora" with PEFT
        from peft import get_peft_model
        model = get_peft_model(base_model, DenseLoraConfig(r=16, lora_alpha=32))
    """

    prefix: str = "denselora_"
    tuner_layer_cls = DenseLoraLayer
    target_module_mapping: dict[str, list[str]] = {}
    uses_shared_state: bool = True

    # ---- injection -------------------------------------------------------------------------------------------

    def _prepare_adapter_config(self, peft_config: DenseLoraConfig, model_config: dict) -> DenseLoraConfig:
        if peft_config.target_modules is None:
            peft_config.target_modules = list(DEFAULT_TARGET_MODULES)
        if isinstance(peft_config.target_modules, list):
            names = [name for name, _ in self.model.named_modules()]
            missing = [t for t in peft_config.target_modules if not any(_matches(n, t) for n in names)]
            if missing:
                linear = sorted({n.rsplit(".", 1)[-1] for n, m in self.model.named_modules() if _is_target_type(m)})
                raise ValueError(
                    f"DenseLoRA target module(s) {missing} not found in this model. "
                    f"Its Linear layers are named: {linear}. Set target_modules to some of those."
                )
        return peft_config

    def _create_and_replace(
        self,
        config: DenseLoraConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **optional_kwargs: Any,
    ) -> None:
        base_layer = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        try:
            in_features, out_features = feature_sizes(base_layer)
        except ValueError as err:
            raise ValueError(f"Cannot adapt module '{current_key}': {err} Remove it from target_modules.") from None
        module_type = self._module_type(adapter_name, target_name, in_features, out_features)
        encoder, decoder = self._shared_pair(adapter_name, module_type, in_features, out_features, config, base_layer)
        layer_kwargs = dict(
            encoder=encoder,
            decoder=decoder,
            module_type=module_type,
            r=config.r,
            lora_alpha=config.lora_alpha,
            lora_dropout=config.lora_dropout,
            dropout_placement=config.dropout_placement,
            activation=config.activation,
            init_weights=config.init_weights,
            init_scale=config.init_scale,
        )
        if isinstance(target, DenseLoraLayer):
            target.update_layer(adapter_name, **layer_kwargs)
            return
        new_module = Linear(target, adapter_name, **layer_kwargs)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)  # an added adapter is not trainable until it is activated
        self._replace_module(parent, target_name, new_module, target)

    def _containers(self) -> tuple[nn.ModuleDict, nn.ModuleDict]:
        # Created lazily: add_adapter/load_adapter inject without calling _pre_injection_hook.
        if "denselora_encoder" not in self._modules:
            self.denselora_encoder = nn.ModuleDict()
            self.denselora_decoder = nn.ModuleDict()
        return self.denselora_encoder, self.denselora_decoder

    def _module_type(self, adapter_name: str, name: str, in_features: int, out_features: int) -> str:
        """Key of the shared pair for a module: its name suffix, plus its shape when that suffix has two shapes."""
        encoders, decoders = self._containers()
        for candidate in (name, f"{name}_{in_features}x{out_features}"):
            if adapter_name not in encoders or candidate not in encoders[adapter_name]:
                return candidate
            known = (encoders[adapter_name][candidate].in_features, decoders[adapter_name][candidate].out_features)
            if known == (in_features, out_features):
                return candidate
        raise AssertionError("unreachable: the shape-qualified key always matches its own shape")

    def _shared_pair(
        self,
        adapter_name: str,
        module_type: str,
        in_features: int,
        out_features: int,
        config: DenseLoraConfig,
        base_layer: nn.Module,
    ) -> tuple[nn.Linear, nn.Linear]:
        encoders, decoders = self._containers()
        if adapter_name not in encoders:
            encoders[adapter_name] = nn.ModuleDict()
            decoders[adapter_name] = nn.ModuleDict()
        if module_type not in encoders[adapter_name]:
            weight = base_layer.weight
            dtype = weight.dtype if weight.dtype.is_floating_point else torch.float32
            kwargs = dict(bias=False, device=weight.device, dtype=dtype)
            encoder = nn.Linear(in_features, config.r, **kwargs)
            decoder = nn.Linear(config.r, out_features, **kwargs)
            nn.init.kaiming_uniform_(encoder.weight, a=5**0.5)
            with torch.no_grad():
                encoder.weight.mul_(config.init_scale)
            if config.init_weights:
                nn.init.zeros_(decoder.weight)  # zero decoder: a fresh adapter is an exact no-op
            else:
                nn.init.kaiming_uniform_(decoder.weight, a=5**0.5)
            trainable = adapter_name in self.active_adapters and not config.inference_mode
            encoder.requires_grad_(trainable)
            decoder.requires_grad_(trainable)
            encoders[adapter_name][module_type] = encoder
            decoders[adapter_name][module_type] = decoder
        return encoders[adapter_name][module_type], decoders[adapter_name][module_type]

    def _shared_modules(self, adapter_name: str) -> list[nn.Linear]:
        if "denselora_encoder" not in self._modules or adapter_name not in self.denselora_encoder:
            return []
        return [*self.denselora_encoder[adapter_name].values(), *self.denselora_decoder[adapter_name].values()]

    # ---- trainability and dtype: keep the shared pairs in step with the per-layer weights --------------------

    def _set_shared_requires_grad(self, adapter_names: Sequence[str], requires_grad: bool) -> None:
        for adapter_name in adapter_names:
            for module in self._shared_modules(adapter_name):
                module.requires_grad_(requires_grad)

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        super().set_adapter(adapter_name, inference_mode=inference_mode)
        active = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        all_names = list(self.denselora_encoder) if "denselora_encoder" in self._modules else []
        self._set_shared_requires_grad([n for n in all_names if n not in active], False)
        self._set_shared_requires_grad(active, not inference_mode)

    def set_requires_grad(self, adapter_names: str | Sequence[str], requires_grad: bool = True) -> None:
        super().set_requires_grad(adapter_names, requires_grad=requires_grad)
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        self._set_shared_requires_grad(names, requires_grad)

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        super()._cast_adapter_dtype(adapter_name, autocast_adapter_dtype=autocast_adapter_dtype)
        if not autocast_adapter_dtype:
            return
        for module in self._shared_modules(adapter_name):
            if module.weight.dtype in (torch.float16, torch.bfloat16):
                module.float()  # in place, so every layer's reference still points at the same weights

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        if "denselora_encoder" in self._modules and adapter_name in self.denselora_encoder:
            del self.denselora_encoder[adapter_name]
            del self.denselora_decoder[adapter_name]

    # ---- merging is impossible for a nonlinear update ----------------------------------------------------------

    def _check_merge_allowed(self) -> None:
        raise ValueError(NOT_MERGEABLE)

    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        raise ValueError(NOT_MERGEABLE)

    # ---- save/load: shared weights are stored once, without the adapter name in their keys --------------------

    @classmethod
    def _remove_adapter_name_from_key(cls, key: str, adapter_name: str) -> str:
        for container in SHARED_CONTAINERS:
            marker = f"{container}.{adapter_name}."
            if marker in key:
                return key.replace(marker, f"{container}.", 1)
        return super()._remove_adapter_name_from_key(key, adapter_name)


def _matches(module_name: str, target: str) -> bool:
    return module_name == target or module_name.endswith("." + target)


def _is_target_type(module: nn.Module) -> bool:
    try:
        feature_sizes(module)
    except ValueError:
        return False
    return True
