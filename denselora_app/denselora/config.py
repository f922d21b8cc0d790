"""Configuration of a DenseLoRA adapter, in the shape of PEFT's own tuner configs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

from peft.config import PeftConfig
from peft.utils import PeftType

from .layer import ACTIVATIONS, DROPOUT_PLACEMENTS

# The paper adapts these five projections of every decoder layer.
DEFAULT_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]


@dataclass
class DenseLoraConfig(PeftConfig):
    """Configuration for DenseLoRA (Mu et al., ACL 2025, arXiv 2505.23808).

    Per adapted module type t: one encoder ``E_t`` (in -> r) and one decoder ``D_t`` (r -> out) shared by every
    layer, plus one dense ``M_{l,t}`` (r -> r) per layer l. The update is
    ``scaling * act(D_t(M_{l,t}(act(E_t(dropout(x))))))`` with ``scaling = lora_alpha / r`` (with
    ``dropout_placement='all'``, dropout also follows each activation while training).
    """

    r: int = field(default=16, metadata={"help": "Rank: width of the shared encoders/decoders and of each M (r x r)."})
    lora_alpha: float = field(default=32, metadata={"help": "Scaling numerator: the update is scaled by alpha / r."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout probability, in [0, 1); see dropout_placement."})
    dropout_placement: str = field(
        default="input",
        metadata={"help": "Where lora_dropout applies: 'input' (the adapter's input only, like LoRA) or 'all' (also "
                          "after the encoder's activation and after the output activation, as the authors' released "
                          f"code does). One of {list(DROPOUT_PLACEMENTS)}."},
    )
    activation: str = field(
        default="gelu",
        metadata={"help": f"Nonlinearity after the encoder and the decoder, one of {sorted(ACTIVATIONS)}."},
    )
    target_modules: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={
            "help": "Module name suffixes to adapt (e.g. ['q_proj', 'v_proj']) or a regex on full names. "
            f"Default: {DEFAULT_TARGET_MODULES}."
        },
    )
    exclude_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Module names or a regex to leave unadapted."}
    )
    layers_to_transform: Optional[Union[list[int], int]] = field(
        default=None, metadata={"help": "Only adapt these layer indices (all layers when unset)."}
    )
    layers_pattern: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Name of the layer list, used with layers_to_transform (e.g. 'layers')."}
    )
    init_scale: float = field(
        default=1.0,
        metadata={"help": "Multiplier on the Kaiming-uniform initial E and M (1: the paper's, PyTorch's nn.Linear "
                          "default). D starts at zero whatever the scale, so a fresh adapter is still a no-op."},
    )
    init_weights: bool = field(
        default=True,
        metadata={"help": "Kaiming-uniform E and M, zero D: a fresh adapter is an exact no-op. False: random D too."},
    )
    modules_to_save: Optional[list[str]] = field(
        default=None, metadata={"help": "Other modules to train fully and save with the adapter."}
    )
    bias: str = field(default="none", metadata={"help": "Only 'none' is supported: base biases stay frozen."})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType.DENSELORA
        if isinstance(self.target_modules, (list, tuple, set)):
            self.target_modules = sorted(set(self.target_modules))
        if isinstance(self.exclude_modules, (list, tuple, set)):
            self.exclude_modules = sorted(set(self.exclude_modules))
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r < 1:
            raise ValueError(f"DenseLoRA rank r must be a positive integer, got r={self.r!r}.")
        if not self.lora_alpha > 0:
            raise ValueError(f"DenseLoRA lora_alpha must be positive, got lora_alpha={self.lora_alpha!r}.")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"DenseLoRA lora_dropout must be in [0, 1), got lora_dropout={self.lora_dropout!r}.")
        if not self.init_scale > 0:
            raise ValueError(f"DenseLoRA init_scale must be positive, got init_scale={self.init_scale!r}.")
        if self.dropout_placement not in DROPOUT_PLACEMENTS:
            raise ValueError(f"DenseLoRA dropout_placement must be one of {list(DROPOUT_PLACEMENTS)}, got "
                             f"dropout_placement={self.dropout_placement!r}.")
        if self.activation not in ACTIVATIONS:
            raise ValueError(
                f"DenseLoRA activation must be one of {sorted(ACTIVATIONS)}, got activation={self.activation!r}."
            )
        if self.bias != "none":
            raise ValueError(f"DenseLoRA supports only bias='none', got bias={self.bias!r}.")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("layers_pattern is only used together with layers_to_transform; set both or neither.")
