"""A rank-K LoRA fitted to a nonlinear (GELU, SiLU) DenseLoRA adapter on calibration data, and how faithful any
export is, measured on held-out calibration rows.

No linear map reproduces ``act(D · M_l · act(E · x))``, but one can be fitted where it matters, on the inputs each
layer sees: with ``X`` those inputs and ``Y`` the adapter's update, the least-squares map is
``W = Yᵀ X (Xᵀ X)⁻¹``, and its best rank-K part in the error that counts (``‖X (W - Ŵ)ᵀ‖``) is the truncated SVD of
``C^(-½) Xᵀ Y`` with ``C = Xᵀ X`` (reduced-rank regression): ``A = U_Kᵀ C^(-½)``, ``B = V_K Σ_K``. Every fourth row is
held out; on those rows the per-layer error of the update, the end-to-end logit difference and the share of identical
greedy answers are measured, the fitted factors standing in for the adapter exactly where PEFT's LoRA would
(``base(x) + x Aᵀ Bᵀ``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from denselora_app.export.source import PEFT_PREFIX, DenseLayer, ExportError, ExportSource, LoraFactor

log = logging.getLogger(__name__)

HELD_OUT_EVERY = 4  # every 4th usable calibration row is held out for the measurements
MIN_ROWS = 8
MAX_ROWS = 256  # rows read from the calibration data
GREEDY_TOKENS = 24  # tokens generated per held-out row to compare greedy answers
RANK_MULTIPLES = (1, 2, 4, 8, 16)  # fitted ranks tried, as multiples of the adapter's r
RANK_TOLERANCE = 1.1  # the default rank: the smallest whose held-out error is within 10% of the best one tried
_RIDGE = 1e-6  # relative to the inputs' mean variance: keeps C invertible when some directions are never seen


@dataclass(frozen=True)
class Example:
    ids: list[int]
    prompt_len: int  # where the answer starts (the prompt is what greedy decoding continues)


@dataclass
class _Moments:
    xx: torch.Tensor  # Xᵀ X (in x in), float64
    xy: torch.Tensor  # Xᵀ Y (in x out), float64
    tokens: int = 0


def calibration_examples(source: ExportSource, calibration: str) -> list[Example]:
    """The calibration rows tokenized as the run trained (its format, cutoff and chat template)."""
    from denselora_app.engine.data import IGNORE_INDEX, encode_example
    from denselora_app.engine.formats import resolve_format
    from denselora_app.engine.models import load_tokenizer
    from denselora_app.engine.sources import RowError, read_source

    cfg = source.cfg
    tokenizer = load_tokenizer(cfg.model)
    src = read_source(calibration, limit=MAX_ROWS)
    fmt = resolve_format(src, cfg.data_format)
    examples = []
    for row in src.rows:
        try:
            encoded = encode_example(tokenizer, row, fmt, cutoff_len=cfg.cutoff_len, train_on_inputs=False)
        except RowError:
            continue
        ids, labels = encoded["input_ids"], encoded["labels"]
        start = next((i for i, label in enumerate(labels) if label != IGNORE_INDEX), len(ids))
        examples.append(Example(ids, start if 0 < start < len(ids) else max(1, len(ids) // 2)))
    if len(examples) < MIN_ROWS:
        raise ExportError(f"{calibration} has {len(examples)} usable rows for calibration; at least {MIN_ROWS} are "
                          "needed (a quarter is held out to measure the export). Give more rows, in the run's format.")
    return examples


def _adapted_model(source: ExportSource) -> tuple[nn.Module, dict[str, nn.Module]]:
    """The base (unquantized, float32, CPU) with the run's DenseLoRA adapter, and its adapted layers by path."""
    import denselora_app.denselora  # noqa: F401  (registers DenseLoRA with PEFT)
    from peft import PeftModel

    from denselora_app.denselora.layer import DenseLoraLayer
    from denselora_app.engine.models import load_model

    base = load_model(source.cfg.model, device="cpu", dtype="float32")
    model = PeftModel.from_pretrained(base, str(source.run.adapter_dir)).eval()
    layers = {name.removeprefix(PEFT_PREFIX): module for name, module in model.named_modules()
              if isinstance(module, DenseLoraLayer)}
    return model, layers


def _update(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The adapter's update for input x, by the layer's own code (what it adds to the base's output)."""
    name = module.active_adapters[0]
    zeros = x.new_zeros(*x.shape[:-1], module.out_features)
    return module.add_update(zeros, x, name)


@contextmanager
def _hooks(layers: dict[str, nn.Module], hook: Callable[[str, nn.Module, torch.Tensor, torch.Tensor], object]
           ) -> Iterator[None]:
    handles = [module.register_forward_hook(lambda m, args, out, path=path: hook(path, m, args[0], out))
               for path, module in layers.items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _forward(model: nn.Module, examples: list[Example]) -> Iterator[torch.Tensor]:
    for example in examples:  # one row at a time: no padding among the inputs the layers see
        yield model(input_ids=torch.tensor([example.ids])).logits[0].float()


def _solve(moments: _Moments, k_max: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A (k_max x in) and B (out x k_max) of the reduced-rank regression; their first K rows/columns are the best
    rank-K fit."""
    xx, xy = moments.xx / moments.tokens, moments.xy / moments.tokens
    ridge = _RIDGE * float(xx.diagonal().mean().clamp_min(1e-30))
    eigenvalues, vectors = torch.linalg.eigh(xx + ridge * torch.eye(xx.shape[0], dtype=xx.dtype))
    inv_sqrt = (vectors * eigenvalues.clamp_min(ridge).rsqrt()) @ vectors.T
    u, sigma, vh = torch.linalg.svd(inv_sqrt @ xy, full_matrices=False)
    k = min(k_max, sigma.numel())
    return u[:, :k].T @ inv_sqrt, vh[:k].T * sigma[:k]


def _candidates(layers: list[DenseLayer], rank: int | None) -> list[int]:
    limit = min(min(layer.encoder.shape[1], layer.decoder.shape[0]) for layer in layers)
    if rank is not None and rank > limit:
        raise ExportError(f"--rank {rank} is larger than the narrowest adapted layer ({limit}); use at most {limit}.")
    r = layers[0].encoder.shape[0]
    ranks = {min(r * m, limit) for m in RANK_MULTIPLES} | ({rank} if rank else set())
    return sorted(ranks)


def calibrated_factors(source: ExportSource, layers: list[DenseLayer], calibration: str, *, rank: int | None,
                       exact: bool, progress: Callable[[str], None] | None = None) -> tuple[list[LoraFactor], dict]:
    """The export's LoRA factors (exact for an identity adapter, fitted otherwise) and the measurements for
    export_report.json."""
    from denselora_app.export.lora import identity_factors

    say = progress or (lambda text: log.info("%s", text))
    examples = calibration_examples(source, calibration)
    held = examples[HELD_OUT_EVERY - 1::HELD_OUT_EVERY]
    fit = [e for i, e in enumerate(examples) if i % HELD_OUT_EVERY != HELD_OUT_EVERY - 1]
    say(f"Loading the base model and the adapter ({len(fit)} calibration rows to fit, {len(held)} held out)")
    model, modules = _adapted_model(source)
    missing = sorted({layer.path for layer in layers} - set(modules))
    if missing:
        raise ExportError(f"The adapter did not load onto {missing[0]}: is {source.cfg.model} its base model?")
    with torch.no_grad():
        if exact:
            exact_factors = identity_factors(layers)
            ranks = [exact_factors[0].lora_a.shape[0]]
            solutions = {f.path: (f.lora_a.double(), f.lora_b.double()) for f in exact_factors}
        else:
            ranks = _candidates(layers, rank)
            say(f"Collecting each layer's inputs and updates on {len(fit)} rows")
            solutions = _fit(model, modules, fit, ranks[-1])
        curve, per_layer = _held_out_errors(model, modules, held, solutions, ranks)
        chosen = ranks[0] if exact else (rank or _default_rank(curve))
        factors = [LoraFactor(path, a[:chosen].float(), b[:, :chosen].float()) for path, (a, b) in solutions.items()]
        say(f"Measuring the rank-{chosen} export end to end on {len(held)} held-out rows")
        end_to_end = _end_to_end(model, modules, held, factors)
    report = {
        "measured": True,
        "calibration": {"source": calibration, "rows_fit": len(fit), "rows_held_out": len(held),
                        "tokens_fit": sum(len(e.ids) for e in fit), "tokens_held_out": sum(len(e.ids) for e in held),
                        "held_out": f"every {HELD_OUT_EVERY}th usable row"},
        "rank_rule": ("the adapter's own rank: the export is exact" if exact else "as asked (--rank)" if rank else
                      f"the smallest rank tried whose held-out error is within {RANK_TOLERANCE - 1:.0%} of the best"),
        "curve": [{"rank": k, "relative_error": curve[k]} for k in ranks],
        "relative_error": curve[chosen],
        "layers": [{"module": path, "relative_error": errors[chosen]} for path, errors in per_layer.items()],
        "end_to_end": end_to_end,
    }
    return factors, report


def _fit(model: nn.Module, modules: dict[str, nn.Module], rows: list[Example], k_max: int
         ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    moments: dict[str, _Moments] = {}

    def collect(path: str, module: nn.Module, x: torch.Tensor, _out: torch.Tensor) -> None:
        x2 = x.reshape(-1, x.shape[-1]).double()
        y2 = _update(module, x).reshape(x2.shape[0], -1).double()
        if path not in moments:
            moments[path] = _Moments(torch.zeros(x2.shape[1], x2.shape[1], dtype=torch.float64),
                                     torch.zeros(x2.shape[1], y2.shape[1], dtype=torch.float64))
        m = moments[path]
        m.xx += x2.T @ x2
        m.xy += x2.T @ y2
        m.tokens += x2.shape[0]

    with _hooks(modules, collect):
        for _ in _forward(model, rows):
            pass
    return {path: _solve(m, k_max) for path, m in moments.items()}


def _held_out_errors(model: nn.Module, modules: dict[str, nn.Module], rows: list[Example],
                     solutions: dict[str, tuple[torch.Tensor, torch.Tensor]], ranks: list[int]
                     ) -> tuple[dict[int, float], dict[str, dict[int, float]]]:
    """Relative error ‖Y - X Aᵀ Bᵀ‖ / ‖Y‖ of each rank, all layers together and per layer."""
    squared = {path: dict.fromkeys(ranks, 0.0) for path in solutions}
    norms = dict.fromkeys(solutions, 0.0)

    def measure(path: str, module: nn.Module, x: torch.Tensor, _out: torch.Tensor) -> None:
        x2 = x.reshape(-1, x.shape[-1]).double()
        y2 = _update(module, x).reshape(x2.shape[0], -1).double()
        a, b = solutions[path]
        projected = x2 @ a.T
        norms[path] += float((y2 ** 2).sum())
        for k in ranks:
            squared[path][k] += float(((y2 - projected[:, :k] @ b[:, :k].T) ** 2).sum())

    with _hooks(modules, measure):
        for _ in _forward(model, rows):
            pass
    total = sum(norms.values()) or 1.0
    curve = {k: math.sqrt(sum(s[k] for s in squared.values()) / total) for k in ranks}
    per_layer = {path: {k: math.sqrt(s[k] / (norms[path] or 1.0)) for k in ranks} for path, s in squared.items()}
    return curve, per_layer


def _default_rank(curve: dict[int, float]) -> int:
    best = min(curve.values())
    return min(k for k, error in curve.items() if error <= best * RANK_TOLERANCE)


def _end_to_end(model: nn.Module, modules: dict[str, nn.Module], rows: list[Example], factors: list[LoraFactor]
                ) -> dict[str, float | int]:
    """Logits and greedy answers of the export (factors in place of the adapter) against the adapter's own."""
    by_path = {f.path: f for f in factors}

    def as_lora(path: str, module: nn.Module, x: torch.Tensor, _out: torch.Tensor) -> torch.Tensor:
        factor = by_path[path]
        lora = (x.float() @ factor.lora_a.T) @ factor.lora_b.T
        return module.base_layer(x) + lora.to(x.dtype)

    adapter_logits = list(_forward(model, rows))
    adapter_answers = [_greedy(model, e) for e in rows]
    with _hooks(modules, as_lora):
        export_logits = list(_forward(model, rows))
        export_answers = [_greedy(model, e) for e in rows]
    diffs = torch.cat([(a - b).abs().flatten() for a, b in zip(adapter_logits, export_logits)])
    same = sum(a == b for a, b in zip(adapter_answers, export_answers))
    return {"max_logit_diff": float(diffs.max()), "mean_logit_diff": float(diffs.mean()),
            "greedy_identical_share": same / len(rows), "greedy_rows": len(rows), "greedy_tokens": GREEDY_TOKENS}


def _greedy(model: nn.Module, example: Example) -> list[int]:
    prompt = torch.tensor([example.ids[:example.prompt_len]])
    output = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=GREEDY_TOKENS,
                            do_sample=False, pad_token_id=model.config.eos_token_id)
    return output[0, prompt.shape[1]:].tolist()
