"""The training recipe, top to bottom: data -> base model -> adapter -> Hugging Face Trainer -> adapter on disk.

Runs the same in the background worker, in the foreground CLI and under ``torchrun``/``accelerate launch`` (the
Trainer brings DDP, FSDP and DeepSpeed). Everything a user watches is written to the run folder by ``RunCallback``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import resource
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from accelerate import PartialState
from peft import PeftModel, get_peft_model
from tqdm.auto import tqdm
from transformers import (
    DataCollatorForSeq2Seq,
    DataCollatorWithFlattening,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    set_seed,
)
from transformers.trainer_callback import PrinterCallback, ProgressCallback
from transformers.trainer_utils import has_length

from denselora_app import terminal
from denselora_app.config import RunConfig
from denselora_app.engine import sharding, trackers
from denselora_app.engine.data import PreparationStopped, PreparedData, prepare_data
from denselora_app.engine.methods import build_peft_config
from denselora_app.engine.models import load_model, load_tokenizer, resolve_device
from denselora_app.engine.preferences import PreparedPairs, prepare_pairs
from denselora_app.engine.sources import data_source
from denselora_app.runs import (
    ADAPTER_CONFIG,
    Run,
    RunState,
    checkpoint_step,
    mark_checkpoint_complete,
    metrics_line,
)

log = logging.getLogger(__name__)


# What each stage's trainer logs besides the loss, kept in metrics.jsonl under TRL's names (the live charts read them).
STAGE_METRICS: dict[str, tuple[str, ...]] = {
    "dpo": tuple(f"{prefix}{name}" for prefix in ("", "eval_") for name in (
        "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
        "logps/rejected")),
    "kto": tuple(f"{prefix}{name}" for prefix in ("", "eval_") for name in (
        "rewards/chosen", "rewards/rejected", "rewards/margins", "kl", "logps/chosen", "logps/rejected")),
}

STOPPED_UNTRAINED = "Stopped before the first training step: nothing was trained, so there is no checkpoint or adapter."


@dataclass
class Outcome:
    state: RunState  # COMPLETED or STOPPED
    note: str | None = None  # what the user should know about how it ended


def process_state(device: str) -> PartialState:
    """This process's place in a (possibly distributed) run; the first call fixes it for the Trainer too.

    accelerate only sets up CPU-only multi-process training (gloo) when told the run is on the CPU.
    """
    return PartialState(cpu=resolve_device(device).type == "cpu")


def train(run: Run, resume: bool = False, show_progress: bool = False) -> Outcome:
    """Train ``run`` to the end or to a stop request."""
    cfg = run.config()
    state = process_state(cfg.device)
    set_seed(cfg.seed)
    checkpoint = run.last_checkpoint() if resume else None
    if checkpoint is not None and _finished(checkpoint):
        return _finish_from(run, checkpoint, state)

    try:
        setup = prepare(run, cfg, state)
    except PreparationStopped:
        return Outcome(RunState.STOPPED, note=None if checkpoint else STOPPED_UNTRAINED)
    if resume and state.is_main_process:
        run.truncate_metrics(after_step=checkpoint_step(checkpoint) if checkpoint else 0)
    args = training_arguments(cfg, setup, output_dir=run.checkpoints_dir, show_progress=show_progress)
    callback = RunCallback(run, trainable=setup.trainable, total=setup.base_parameters, echo=not show_progress,
                           metrics=STAGE_METRICS.get(cfg.stage, ()))
    reporting = trackers.callbacks(run, cfg.report_to) if state.is_main_process else []
    trainer = make_trainer(setup, args, [callback, CheckpointMarker(), *reporting], show_progress=show_progress)
    if _stop_requested(run):  # asked to stop while the model was loading
        return Outcome(RunState.STOPPED, note=None if checkpoint else STOPPED_UNTRAINED)
    with trackers.offline_defaults(run, cfg.report_to):
        trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    if state.is_main_process and state.num_processes > 1:
        log.info(sharding.describe(setup.model, state.num_processes))
    _check_ranks_agree(setup.model)
    stopped = _stop_requested(run)
    if setup.data.eval is not None and not stopped and not cfg.eval_steps:
        trainer.evaluate()  # the final validation loss, logged through RunCallback

    # On every rank: with fsdp each one hands in its shard of the adapter; only the main process writes.
    setup.model.save_pretrained(run.adapter_dir, is_main_process=state.is_main_process,
                                selected_adapters=["default"])  # not the frozen reference of a run started from one
    if state.is_main_process:
        setup.tokenizer.save_pretrained(run.adapter_dir)  # chat template travels with the adapter
        run.write_summary()
        log.info("Adapter saved to %s", run.adapter_dir)
    state.wait_for_everyone()
    return Outcome(RunState.STOPPED if stopped else RunState.COMPLETED)


def _prepared_data(run: Run, cfg: RunConfig, state: PartialState, tokenizer,
                   rows: int | None) -> PreparedData | PreparedPairs:
    if cfg.stage != "sft":
        return prepare_pairs(data_source(cfg.data), tokenizer, cutoff_len=cfg.cutoff_len, val_size=cfg.val_size,
                             seed=cfg.seed, limit=rows, stage=cfg.stage)
    return prepare_data(
        data_source(cfg.data),
        tokenizer,
        fmt=cfg.data_format,
        cutoff_len=cfg.cutoff_len,
        train_on_inputs=cfg.train_on_inputs,
        val_size=cfg.val_size,
        seed=cfg.seed,
        batch_size=cfg.batch_size,
        grad_accum=cfg.grad_accum,
        limit=rows,
        should_stop=run.stop_requested if state.is_main_process else None,
    )


@dataclass
class Setup:
    """What a run trains: its tokenizer and data, the base model with a fresh adapter, and how batches are made."""

    tokenizer: Any
    data: PreparedData | PreparedPairs
    model: torch.nn.Module  # the PEFT model
    device: str
    base_parameters: int
    trainable: int
    collator: Callable | None  # None: the stage's trainer batches its own rows (TRL's preference collator)
    sampling: str  # the Trainer's train_sampling_strategy
    shared_lr_scale: float = 1.0  # DenseLoRA's shared E and D train at this multiple of the rate (LoRA: 1)
    stage: str = "sft"
    started_from: str | None = None  # the adapter folder of the run it started from (init_adapter)


def prepare(run: Run, cfg: RunConfig, state: PartialState, rows: int | None = None) -> Setup:
    """Data -> base model -> adapter, as ``cfg`` says; ``rows`` reads only the data's first rows. Raises
    PreparationStopped when a stop is asked for before the model loads."""
    tokenizer = load_tokenizer(cfg.model, trust_remote_code=cfg.trust_remote_code)
    try:
        data = _prepared_data(run, cfg, state, tokenizer, rows)
    except PreparationStopped:
        data = None
    # Every rank asks rank 0 here (only rank 0 cuts its preparation short), so all stop or none does.
    if _stop_requested(run):
        raise PreparationStopped
    assert data is not None  # rank 0 cuts its preparation short only for a request, which stays until the end
    if state.is_main_process:
        run.write_data_report(data.report.to_dict())

    # accelerate names a CPU process's device "cpu:<rank>"; every CPU process uses the one CPU device
    device = cfg.device if cfg.device != "auto" else "cpu" if state.device.type == "cpu" else str(state.device)
    model = load_model(cfg.model, device=device, dtype=cfg.dtype, trust_remote_code=cfg.trust_remote_code,
                       quantization=cfg.quantization)
    base_parameters = model.num_parameters()  # counts a 4-bit weight's packed values as the parameters they hold
    if cfg.quantized:
        log.info("Base model loaded in %s: %.2f GB of weights", cfg.quantization,
                 model.get_memory_footprint() / 1024**3)
    if cfg.checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()  # the frozen embeddings must pass gradients on to the adapters
    started_from = _started_from(cfg)
    peft_model = (PeftModel.from_pretrained(model, started_from, is_trainable=True) if started_from
                  else get_peft_model(model, build_peft_config(cfg)))
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    log.info("%s r=%d: %s trainable parameters (%.4f%% of %s)", cfg.method, cfg.r, f"{trainable:,}",
             100 * trainable / base_parameters, f"{base_parameters:,}")
    collator, sampling = collator_for(cfg, tokenizer, peft_model) if cfg.stage == "sft" else (None, "random")
    return Setup(tokenizer=tokenizer, data=data, model=peft_model, device=device, base_parameters=base_parameters,
                 trainable=trainable, collator=collator, sampling=sampling,
                 shared_lr_scale=cfg.shared_lr_scale if cfg.method == "denselora" else 1.0, stage=cfg.stage,
                 started_from=started_from)


def _started_from(cfg: RunConfig) -> str | None:
    """The adapter folder a dpo or kto run starts from (init_adapter), checked again: it may have changed."""
    if not cfg.init_adapter:
        return None
    from denselora_app.engine.stages import start_run

    return str(start_run(cfg).adapter_dir)


def training_arguments(cfg: RunConfig, setup: Setup, *, output_dir: Path | str, show_progress: bool,
                       **overrides: Any) -> TrainingArguments:
    """The Trainer's arguments for ``cfg``; ``overrides`` replace any of them (the learning-rate finder's trials)."""
    has_eval = setup.data.eval is not None
    weights_dtype = setup.model.dtype
    values: dict[str, Any] = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.learning_rate,
        num_train_epochs=cfg.num_epochs,
        max_steps=cfg.max_steps,
        warmup_steps=cfg.warmup_steps,
        lr_scheduler_type=cfg.lr_scheduler,
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        logging_steps=cfg.logging_steps,
        eval_strategy="steps" if has_eval and cfg.eval_steps else "no",
        eval_steps=cfg.eval_steps or None,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit,
        seed=cfg.seed,
        data_seed=cfg.seed,
        train_sampling_strategy=setup.sampling,
        bf16=weights_dtype == torch.bfloat16,
        fp16=weights_dtype == torch.float16,
        use_cpu=torch.device(setup.device).type == "cpu",
        include_num_input_tokens_seen="non_padding",
        remove_unused_columns=False,
        ddp_find_unused_parameters=False,
        dataloader_num_workers=0,
        disable_tqdm=not show_progress,
        report_to="none",  # report_to's trackers get their callbacks from engine/trackers.py, writing in the run folder
        **sharding.fsdp_arguments(cfg),
    )
    if cfg.stage != "sft":
        from denselora_app.engine.stages import stage_arguments  # TRL is imported only for its stages

        return stage_arguments(cfg, {**values, **overrides})
    return TrainingArguments(**{**values, **overrides})


def make_trainer(setup: Setup, args: TrainingArguments, callbacks: list[TrainerCallback],
                 show_progress: bool) -> Trainer:
    if setup.stage != "sft":
        from denselora_app.engine.stages import stage_trainer

        trainer = stage_trainer(setup, args, callbacks)
    else:
        trainer = StudioTrainer(
            model=setup.model,
            args=args,
            train_dataset=setup.data.train,
            eval_dataset=setup.data.eval,
            data_collator=setup.collator,
            callbacks=callbacks,
        )
    trainer.shared_lr_scale = setup.shared_lr_scale
    if show_progress:
        trainer.remove_callback(ProgressCallback)
        trainer.add_callback(TerminalProgress)
    else:  # the callbacks log a readable line instead of the Trainer's raw dictionaries
        trainer.remove_callback(PrinterCallback)
    return trainer


class TerminalProgress(ProgressCallback):
    """The Trainer's progress bars, drawn on the terminal: in the CLI ``sys.stderr`` is the log file (terminal.py)."""

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.training_bar = tqdm(total=state.max_steps, dynamic_ncols=True, file=terminal.stderr())
        self.current_step = 0

    def on_prediction_step(self, args, state, control, eval_dataloader=None, **kwargs):
        if state.is_world_process_zero and self.prediction_bar is None and has_length(eval_dataloader):
            self.prediction_bar = tqdm(total=len(eval_dataloader), leave=self.training_bar is None,
                                       dynamic_ncols=True, file=terminal.stderr())
        super().on_prediction_step(args, state, control, eval_dataloader=eval_dataloader, **kwargs)


def collator_for(cfg, tokenizer, model: torch.nn.Module) -> tuple[Callable, str]:
    """How a run batches its rows: the data collator, and the Trainer's ``train_sampling_strategy``.

    * ``packing`` off: rows in random order, each batch padded to its longest row (the padding is masked out).
    * ``packing`` on: padding-free batches. A batch's rows are joined into one sequence whose position ids restart at
      0 for every row; transformers turns those into a causal mask per row, so no row attends to another. The label
      of each row's first token becomes -100, so the last token of a row is never trained to predict the next row.
      The loss is the same as with padded batches, without the compute spent on padding.
    * ``packing`` on, but the model does not keep joined rows apart (``packing_problem``): padded batches of rows of
      similar length (transformers' ``LengthGroupedSampler``: shuffled, then sorted by length within groups of up
      to 50 optimizer steps), with one log line saying so.
    """
    padded = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
    if not cfg.packing:
        return padded, "random"
    problem = packing_problem(model)
    if problem is None:
        log.info("Packing: the rows of each batch are joined into one sequence with positions restarting at every "
                 "row; no padding")
        return DataCollatorWithFlattening(return_position_ids=True, separator_id=-100), "random"
    log.warning("Packing is not possible here: %s. Batching rows of similar length instead (less padding, not none).",
                problem)
    return padded, "group_by_length"


def packing_problem(model: torch.nn.Module) -> str | None:
    """Why ``model`` cannot train on padding-free batches, or None when it can.

    Asked of the model itself, in three forward passes over ten tokens: a 4-token row joined after a 6-token row,
    with positions restarting at 0 and no attention mask, must come out as it does alone. transformers builds the
    per-row mask from restarting positions for sdpa, eager, flex and flash attention in the models that pass their
    position ids to the mask (LLaMA, Qwen2, Mistral, Gemma, Phi, GPT-2, GPT-NeoX, ...); models that do not (Bloom
    and MPT, with ALiBi) let the second row attend to the first. "Comes out as alone" is judged against the same
    tokens joined as one plain sequence: the packed row must be at least ten times closer, whatever the dtype.
    """
    embeddings = model.get_input_embeddings()
    device = embeddings.weight.device
    generator = torch.Generator().manual_seed(0)  # its own generator: the run's random stream stays as it was
    first, second = (torch.randint(0, embeddings.num_embeddings, (1, n), generator=generator).to(device)
                     for n in (6, 4))
    joined = torch.cat([first, second], dim=1)
    positions = torch.cat([torch.arange(6), torch.arange(4)]).unsqueeze(0).to(device)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # under a PEFT wrapper
    attention = getattr(getattr(base, "config", None), "_attn_implementation", None) or "its"
    name = f"{type(base).__name__} with {attention} attention"
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            alone = model(input_ids=second, use_cache=False).logits.float()
            packed = model(input_ids=joined, position_ids=positions, use_cache=False).logits[:, 6:].float()
            plain = model(input_ids=joined, use_cache=False).logits[:, 6:].float()
    except Exception as err:  # noqa: BLE001 (whatever stops the model from taking position ids rules packing out)
        return f"{name} does not run on restarting position ids ({type(err).__name__}: {err})"
    finally:
        model.train(was_training)
    packed_error = (packed - alone).abs().max().item()
    if packed_error > 0.1 * (plain - alone).abs().max().item():
        return f"{name} lets a row attend to the rows joined before it"
    return None


class SharedRate:
    """Mixed into a Trainer class (the studio's, TRL's): DenseLoRA's shared E and D at ``shared_lr_scale`` times
    the learning rate."""

    shared_lr_scale: float = 1.0

    def create_optimizer(self, model=None) -> torch.optim.Optimizer:
        optimizer = super().create_optimizer(model)
        if self.shared_lr_scale != 1.0:
            scale_shared_rate(optimizer, self.model if model is None else model, self.shared_lr_scale)
        return optimizer


class StudioTrainer(SharedRate, sharding.ShardsOnCpu, Trainer):
    """The Trainer, counting the real tokens of padding-free batches for the live tokens/s.

    With ``include_num_input_tokens_seen="non_padding"`` transformers counts a batch's attention mask; a
    padding-free batch has none (it must not: a mask turns the per-row masking off), and transformers then falls
    back to comparing the ids with the pad id (which is often the eos token, so real tokens go uncounted) or to
    counting every token with a warning at every step. Every token of such a batch is real, so all are counted.
    """

    def _track_num_input_tokens(self, inputs):
        if (self.args.include_num_input_tokens_seen == "non_padding" and "attention_mask" not in inputs
                and "position_ids" in inputs and "input_ids" in inputs):
            tokens = torch.as_tensor(inputs["input_ids"].numel(), device=self.args.device, dtype=torch.int64)
            self.state.num_input_tokens_seen += self.accelerator.gather(tokens).sum().item()
            return
        super()._track_num_input_tokens(inputs)


SHARED_WEIGHTS = ("denselora_encoder.", "denselora_decoder.")  # DenseLoRA's shared E and D, by parameter name


def scale_shared_rate(optimizer: torch.optim.Optimizer, model: torch.nn.Module, scale: float) -> None:
    """Move DenseLoRA's shared encoders and decoders into parameter groups of their own at ``scale`` times their
    group's rate (before the scheduler is made, which then schedules every group alike)."""
    shared = {id(p) for name, p in model.named_parameters() if any(s in name for s in SHARED_WEIGHTS)}
    for group in list(optimizer.param_groups):
        mine = [p for p in group["params"] if id(p) in shared]
        if mine:
            group["params"] = [p for p in group["params"] if id(p) not in shared]
            optimizer.add_param_group({**{k: v for k, v in group.items() if k != "params"}, "params": mine,
                                       "lr": group["lr"] * scale})
    optimizer.param_groups[:] = [g for g in optimizer.param_groups if g["params"]]


def _finished(checkpoint: Path) -> bool:
    """Whether a checkpoint is already at the run's last step (resuming it must not train past max_steps)."""
    trainer_state = json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8"))
    max_steps = trainer_state.get("max_steps") or 0
    return max_steps > 0 and trainer_state.get("global_step", 0) >= max_steps


def _finish_from(run: Run, checkpoint: Path, state: PartialState) -> Outcome:
    """Complete a run whose last checkpoint is its final step: its adapter is that checkpoint's."""
    if state.is_main_process:
        run.adapter_dir.mkdir(exist_ok=True)
        for weights in checkpoint.glob("adapter_*"):
            shutil.copy2(weights, run.adapter_dir / weights.name)
        cfg = run.config()
        load_tokenizer(cfg.model, trust_remote_code=cfg.trust_remote_code).save_pretrained(run.adapter_dir)
        run.write_summary()
        log.info("%s is already at the last step: nothing left to train; its adapter is in %s", checkpoint.name,
                 run.adapter_dir)
    state.wait_for_everyone()
    return Outcome(RunState.COMPLETED, note=f"Resumed at {checkpoint.name}, which had already reached the last step: "
                                            "nothing was left to train, and the adapter is that checkpoint's.")


def _stop_requested(run: Run) -> bool:
    """The same answer on every rank (rank 0 decides), so no rank waits forever for the others."""
    flag = torch.tensor([int(run.stop_requested())])
    if dist.is_available() and dist.is_initialized():
        if dist.get_backend() == "nccl":
            flag = flag.cuda()
        dist.broadcast(flag, src=0)
    return bool(flag.item())


def _check_ranks_agree(model: torch.nn.Module) -> None:
    """Under DDP every rank must end with the same adapter; the shared encoders/decoders make this worth checking
    (with fsdp, the gathered one)."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    digest = hashlib.sha256()
    for _, param in sorted(((n, p) for n, p in model.named_parameters() if p.requires_grad), key=lambda x: x[0]):
        digest.update(sharding.full(param).detach().float().cpu().numpy().tobytes())
    digests: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(digests, digest.hexdigest())
    if len(set(digests)) != 1:
        raise RuntimeError(f"Adapter weights differ across ranks after training: {digests}")
    log.info("Adapter weights identical on all %d ranks (sha256 %s)", len(digests), digests[0][:16])


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1024**3
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # Linux reports kilobytes


class RunCallback(TrainerCallback):
    """Writes the run's metrics and status as training goes, and turns a stop request into a graceful stop.

    With ``echo``, each logged row is also logged as one readable line (the worker's train.log, the app's log pane).
    """

    def __init__(self, run: Run, trainable: int, total: int, echo: bool = False, metrics: tuple[str, ...] = ()) -> None:
        self.run = run
        self.trainable = trainable
        self.total = total
        self.echo = echo
        self.metrics = metrics  # a stage's own logged values (TRL's names), kept as they are logged

    def on_train_begin(self, args, state, control, **kwargs):
        self.session_start = time.time()
        self.session_first_step = state.global_step
        self.elapsed_before = (self.run.raw_status().elapsed_seconds or 0.0) if state.global_step else 0.0
        self.last_time, self.last_tokens = time.time(), state.num_input_tokens_seen
        if state.is_world_process_zero:
            self.run.update_status(state=RunState.RUNNING, step=state.global_step, max_steps=state.max_steps,
                                   trainable_parameters=self.trainable, total_parameters=self.total)

    def on_step_end(self, args, state, control, **kwargs):
        if _stop_requested(self.run):
            control.should_training_stop = True
            control.should_save = True  # a checkpoint at the stop step, so resume continues from here

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        if "loss" not in logs and "eval_loss" not in logs:
            return  # the Trainer's end-of-training totals
        now = time.time()
        elapsed = self.elapsed_before + now - self.session_start
        done = max(state.global_step - self.session_first_step, 1)
        remaining = (now - self.session_start) / done * max(state.max_steps - state.global_step, 0)
        row: dict[str, Any] = {"step": state.global_step, "epoch": round(state.epoch or 0.0, 4)}
        for key in ("loss", "eval_loss", "learning_rate", "grad_norm", *self.metrics):
            if key in logs:
                row[key] = float(logs[key])
        if "loss" in logs:
            tokens = state.num_input_tokens_seen - self.last_tokens
            row["tokens_per_second"] = tokens / max(now - self.last_time, 1e-9)
            self.last_time, self.last_tokens = now, state.num_input_tokens_seen
        row.update(
            elapsed_seconds=round(elapsed, 2),
            remaining_seconds=round(remaining, 2),
            peak_memory_gb=round(peak_memory_gb(args.device), 3),
            time=now,
        )
        self.run.append_metrics(row)
        if self.echo:
            log.info("%s", metrics_line(row, state.max_steps))
        self.run.update_status(step=state.global_step, max_steps=state.max_steps, elapsed_seconds=elapsed,
                               remaining_seconds=remaining)


class CheckpointMarker(TrainerCallback):
    """Marks each checkpoint complete once the Trainer has written all of it (on_save comes after the save)."""

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if (folder / ADAPTER_CONFIG).is_file():
                mark_checkpoint_complete(folder)

