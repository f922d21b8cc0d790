"""Training stages beyond supervised fine-tuning, through TRL: stage ``dpo`` (Direct Preference Optimization, TRL's
``DPOTrainer``) on preference pairs and stage ``kto`` (Kahneman-Tversky Optimization, ``KTOTrainer``) on answers
labelled desirable or not (engine/preferences.py prepares both).

``train.train`` runs every stage the same way (the run folder, ``RunCallback``'s metrics and status, Stop, resume
from a checkpoint, the adapter and summary.json); this module supplies what differs: the arguments (TRL's config
class, with the stage's settings under TRL's names) and the trainer, and checks the run a dpo or kto run starts from
(``init_adapter``). The reference model is the base for a fresh adapter, or the adapter the run started from.
"""

from __future__ import annotations

import logging
from typing import Any

from transformers import TrainerCallback
from trl import DPOConfig, DPOTrainer, KTOConfig, KTOTrainer

from denselora_app.config import RunConfig, StudioError
from denselora_app.engine.sharding import ShardsOnCpu
from denselora_app.engine.train import Setup, SharedRate
from denselora_app.runs import Run, RunError, resolve_run

log = logging.getLogger(__name__)

REFERENCE_ADAPTER = "ref"  # the name TRL gives the frozen copy of a PEFT model's adapter it uses as the reference


class StudioDPOTrainer(SharedRate, ShardsOnCpu, DPOTrainer):
    """TRL's DPOTrainer with DenseLoRA's shared-weight learning rate (and fsdp on CPU processes too)."""


class StudioKTOTrainer(SharedRate, ShardsOnCpu, KTOTrainer):
    """TRL's KTOTrainer with DenseLoRA's shared-weight learning rate (and fsdp on CPU processes too)."""


TRAINERS: dict[str, type] = {"dpo": StudioDPOTrainer, "kto": StudioKTOTrainer}


class StartError(StudioError):
    """The run named by init_adapter cannot be started from (the message says why and what to do)."""


# The settings an adapter fixes: a run that starts from it must have the same, or it would train another adapter.
ADAPTER_SETTINGS = ("model", "method", "r", "alpha", "target_modules", "activation")


def start_run(cfg: RunConfig) -> Run:
    """The finished run whose adapter ``cfg.init_adapter`` names, checked to fit ``cfg``; StartError if not."""
    try:
        start = resolve_run(cfg.init_adapter)
    except RunError as err:
        raise StartError(f"init_adapter {cfg.init_adapter!r}: {err}") from None
    if not start.has_adapter():
        raise StartError(f"init_adapter {start.id!r}: the run has no final adapter (state: {start.status().state}). "
                         "Give a run that completed or was stopped after its first step.")
    theirs = start.config()
    different = [name for name in ADAPTER_SETTINGS if getattr(theirs, name) != getattr(cfg, name)]
    if different:
        wanted = ", ".join(f"{name}={getattr(theirs, name)!r}" for name in different)
        raise StartError(f"init_adapter {start.id!r}: its adapter was trained with other settings; set {wanted} as "
                         "it was, or start from a fresh adapter (empty init_adapter).")
    return start


def stage_arguments(cfg: RunConfig, values: dict[str, Any]) -> DPOConfig | KTOConfig:
    """The run's Trainer arguments (``values``, as for sft) with the stage's own under TRL's names."""
    common = dict(
        beta=cfg.beta,
        max_length=cfg.cutoff_len,  # preferences.py drops what does not fit, so nothing is cut
        gradient_checkpointing=cfg.checkpointing,  # TRL's default is on; train.prepare already set it up
        gradient_checkpointing_kwargs={"use_reentrant": False},
    )
    if cfg.stage == "kto":
        # KTO's KL estimate pairs each completion with its batch neighbours' prompts, so it reads the completions in
        # the order preferences.py shuffled them into.
        return KTOConfig(**{**values, "train_sampling_strategy": "sequential"}, **common)
    return DPOConfig(**values, loss_type=[cfg.dpo_loss], **common)


def stage_trainer(setup: Setup, args: DPOConfig | KTOConfig,
                  callbacks: list[TrainerCallback]) -> DPOTrainer | KTOTrainer:
    """TRL's trainer for the run's stage, on the PEFT model ``train.prepare`` built."""
    trainer = TRAINERS[setup.stage](model=setup.model, args=args, train_dataset=setup.data.train,
                                    eval_dataset=setup.data.eval, processing_class=setup.tokenizer,
                                    callbacks=callbacks)
    # Given a PEFT model, TRL copies its adapter into a frozen "ref" adapter for the reference log-probabilities:
    # started from a finished run (init_adapter), that copy of its adapter is the reference. A fresh adapter
    # changes nothing yet (DenseLoRA's D and LoRA's B start at zero), so the copy would equal the base: it is
    # removed, and TRL then takes the reference with the adapter disabled (the same numbers, less memory, and no
    # second adapter in the checkpoints).
    if REFERENCE_ADAPTER in setup.model.peft_config and not setup.started_from:
        setup.model.delete_adapter(REFERENCE_ADAPTER)
        setup.model.set_adapter("default")
    trainer.shared_lr_scale = setup.shared_lr_scale
    return trainer
