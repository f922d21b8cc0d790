"""Training over several processes: how many the launcher started, what ``fsdp: true`` asks of the Trainer (PyTorch
FSDP2 through accelerate, never a hand-rolled collective), and the combinations refused before a run exists.

Without ``fsdp`` a torchrun/accelerate launch is DDP: every process holds the whole frozen base. With it, the
Trainer shards each decoder layer (the model's ``_no_split_modules``) and then the root model; DenseLoRA's shared
encoders and decoders live on the tuner, outside every layer, so they land in the root group and stay shared (each
layer keeps only a reference to them, not a submodule).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch.distributed.tensor import DTensor

from denselora_app.config import RunConfig


def world_size() -> int:
    """The number of training processes the launcher started (torchrun and accelerate set WORLD_SIZE); 1 alone."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def fsdp_problem(cfg: RunConfig, device_type: str) -> str | None:
    """Why ``cfg`` cannot train sharded on ``device_type`` ('cpu', 'cuda', ...), or None."""
    if not cfg.fsdp:
        return None
    if cfg.quantization == "8bit":
        return ("an 8bit base cannot be sharded (bitsandbytes' int8 weights are not FSDP-shardable): use quantization "
                "4bit with fsdp, or fsdp without quantization")
    if cfg.quantization == "4bit" and device_type != "cuda":
        return ("a 4bit base under fsdp needs CUDA: bitsandbytes' 4-bit weights are sharded only on GPUs. On this "
                f"{device_type} machine, train with fsdp and no quantization, or without fsdp")
    if device_type == "mps":
        return "fsdp needs CUDA GPUs (NCCL) or CPU processes (gloo); MPS has no collective backend"
    return None


def fsdp_arguments(cfg: RunConfig) -> dict[str, Any]:
    """The Trainer's arguments for ``cfg.fsdp`` (none without it). The adapter is saved unsharded (one complete
    PEFT adapter), so it chats, evaluates and publishes like any other."""
    if not cfg.fsdp:
        return {}
    return {"fsdp": True, "fsdp_config": {"version": 2, "reshard_after_forward": True,
                                          "cpu_offload": cfg.fsdp_offload, "state_dict_type": "FULL_STATE_DICT",
                                          "cpu_ram_efficient_loading": True}}


class ShardsOnCpu:
    """Mixed into a Trainer class: FSDP2 over CPU processes (gloo) too. accelerate attaches its FSDP plugin only to
    GPU process groups and otherwise falls back to DDP without a word; torch's ``fully_shard`` itself works on the
    CPU, so the plugin is attached here, after the Trainer made its Accelerator."""

    def create_accelerator_and_postprocess(self) -> None:
        from accelerate import PartialState
        from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

        super().create_accelerator_and_postprocess()
        state = self.accelerator.state
        if self.args.fsdp_plugin_args is not None and state.distributed_type == DistributedType.MULTI_CPU:
            # Both states: AcceleratorState copies PartialState's type whenever an Accelerator is made again.
            state.distributed_type = PartialState().distributed_type = DistributedType.FSDP
            state.fsdp_plugin = FullyShardedDataParallelPlugin(**self.args.fsdp_plugin_args)
            self.is_fsdp_enabled = True


def full(param: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a parameter (a sharded one is gathered: every rank must call this, in the same order)."""
    return param.full_tensor() if isinstance(param, DTensor) else param


def describe(model: torch.nn.Module, processes: int) -> str:
    """One log line on how the weights were held: sharded (FSDP2) or whole in every process."""
    if any(isinstance(param, DTensor) for param in model.parameters()):
        return f"The model trained sharded over {processes} processes (FSDP2): each held about 1/{processes} of it."
    return f"The model trained whole in each of {processes} process{'es' if processes > 1 else ''}."


def resume_problem(checkpoint: Path, cfg: RunConfig, processes: int) -> str | None:
    """Why a sharded run cannot resume from ``checkpoint`` with ``processes`` processes, or None. The Trainer saves
    one random-number state per process (rng_state_<rank>.pth), and a sharded optimizer state is only known to load
    back under the world size that wrote it."""
    if not cfg.fsdp:
        return None
    saved = len(list(checkpoint.glob("rng_state_*.pth"))) or (1 if (checkpoint / "rng_state.pth").exists() else 0)
    if saved in (0, processes):
        return None
    return (f"{checkpoint.name} was saved by {saved} training process{'es' if saved > 1 else ''} with fsdp, and "
            f"this resume has {processes}: resume it with the same number (torchrun --nproc_per_node {saved} -m "
            "denselora_app resume RUN_ID)")
