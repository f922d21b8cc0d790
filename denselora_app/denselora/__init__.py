"""DenseLoRA as a PEFT method. Importing this package registers it with PEFT under the name ``denselora``.

    import denselora_app.denselora
    from peft import get_peft_model, PeftModel
    peft_model = get_peft_model(base_model, DenseLoraConfig(r=16, lora_alpha=32))
    peft_model.save_pretrained("adapter/")
    reloaded = PeftModel.from_pretrained(base_model, "adapter/")
"""

from __future__ import annotations

from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils import PeftType, register_peft_method


def _add_peft_type_member(name: str) -> None:
    """Add ``name`` to PEFT's closed ``PeftType`` enum, which ``register_peft_method`` requires."""
    if name in PeftType.__members__:
        return
    member = str.__new__(PeftType, name)
    member._name_ = name
    member._value_ = name
    member.__objclass__ = PeftType
    type.__setattr__(PeftType, name, member)
    PeftType._member_map_[name] = member
    PeftType._value2member_map_[name] = member
    PeftType._member_names_.append(name)


_add_peft_type_member("DENSELORA")

from .config import DEFAULT_TARGET_MODULES, DenseLoraConfig  # noqa: E402  (needs PeftType.DENSELORA)
from .layer import ACTIVATIONS, DROPOUT_PLACEMENTS, DenseLoraLayer, Linear  # noqa: E402
from .model import DenseLoraModel  # noqa: E402

if PeftType.DENSELORA not in PEFT_TYPE_TO_TUNER_MAPPING:  # importing twice (e.g. reloads) must not fail
    register_peft_method(name="denselora", config_cls=DenseLoraConfig, model_cls=DenseLoraModel, prefix="denselora_")

__all__ = [
    "ACTIVATIONS",
    "DEFAULT_TARGET_MODULES",
    "DROPOUT_PLACEMENTS",
    "DenseLoraConfig",
    "DenseLoraLayer",
    "DenseLoraModel",
    "Linear",
]
