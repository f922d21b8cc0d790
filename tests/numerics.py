"""Tolerances for comparing floating-point results, derived from the arithmetic instead of tuned on one machine.

Float addition is not associative: another CPU (vector width, blocking), thread count or library version sums the same
terms in another order and rounds differently. A tolerance that merely fits the numbers one machine printed fails on
the next, and a default one (torch.testing's 1.3e-6 relative in float32) ignores how many terms were summed.

The rule (``tolerance_for``), for a result computed from ``terms`` rounded terms::

    rtol = SAFETY * sqrt(terms) * (eps(actual's dtype) + eps(expected's dtype))
    atol = rtol * scale          (scale: max |expected| over the whole tensor, unless given)

- A float sum of n terms is off by at most ~n * eps times the size of its terms (every rounding error the same way:
  the worst case) and typically by ~sqrt(n) * eps (independent errors add like a random walk). The worst case grows
  too fast to test with (n = 10^4 float32 terms gives 1e-3, the size of the bugs a test must catch), so the rule takes
  the typical size, times SAFETY = 4: with eps = 2 units of rounding that is ~8 standard deviations of the typical
  error, and still far below a real bug (a factor off by 0.1%, a sign, a transposed matrix) up to ~10^4 terms.
- ``terms`` counts every term summed along the computation: a chain of reductions of lengths n1, n2, ... (a forward
  and then a backward pass) counts n1 + n2 + ..., since the stages' independent relative errors add in quadrature.
  ``causal_lm_terms`` counts them for a whole decoder model. Where sums accumulate in a wider type (bfloat16 matmuls
  on the CPU sum in float32), what rounds is each op's output: count those rounded stages instead.
- Each side adds its own eps: two float32 computations can both be off, a float64 reference adds almost nothing.
- The scale is the size of the values compared, tensor-wide: an element that cancels to near zero still carries the
  rounding of the terms it summed. Pass ``scale`` when the terms are known to be larger than the results (a small
  difference of two large outputs, a logarithm of large counts).

Comparisons that are exact by construction (a copy, a reload of the same weights, a no-op adapter, integer token ids)
stay exact (``torch.equal``, ``==``): a tolerance there would only hide a change.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch

SAFETY = 4.0


def _as_tensor(value: Any) -> torch.Tensor:
    return value if isinstance(value, torch.Tensor) else torch.as_tensor(value, dtype=torch.float64)


def tolerance_for(expected: Any, *, terms: int, dtype: torch.dtype | None = None,
                  actual_dtype: torch.dtype | None = None, scale: float | None = None) -> dict[str, float]:
    """``{"atol": ..., "rtol": ...}`` for comparing a result with ``expected`` (see the module docstring), as
    torch.testing.assert_close and torch.allclose take them.

    ``dtype``: the precision both sides were computed in, where it is not ``expected``'s dtype (plain numbers, a
    float64 model whose softmax rounds in float32); ``actual_dtype``: the compared result's, where it differs from
    ``expected``'s (a float32 result against its float64 reference)."""
    if terms < 1:
        raise ValueError(f"terms must be at least 1, got {terms}")
    expected_dtype = dtype or (expected.dtype if isinstance(expected, torch.Tensor) else None)
    if expected_dtype is None:
        raise TypeError("pass dtype= (the precision the values were computed in) when comparing plain numbers")
    actual_dtype = dtype or actual_dtype or expected_dtype
    expected = _as_tensor(expected)
    if scale is None:
        scale = float(expected.detach().abs().max()) if expected.numel() else 0.0
    rtol = SAFETY * math.sqrt(terms) * (torch.finfo(actual_dtype).eps + torch.finfo(expected_dtype).eps)
    return {"atol": rtol * max(float(scale), torch.finfo(actual_dtype).tiny), "rtol": rtol}


def assert_close_for(actual: Any, expected: Any, *, terms: int, dtype: torch.dtype | None = None,
                     scale: float | None = None, msg: str | Callable[[str], str] | None = None) -> None:
    """``actual`` equals ``expected`` up to the rounding of ``terms`` summed terms (``tolerance_for``).

    Tensors compare in float64, so a float32 result can meet its float64 reference; their dtypes must agree unless
    ``expected`` is the more precise. Plain numbers (and lists of them) need ``dtype``, the precision both sides were
    computed in; so do tensors whose precision is not their dtype."""
    tensors = isinstance(actual, torch.Tensor) and isinstance(expected, torch.Tensor)
    if tensors:
        more_precise = torch.finfo(expected.dtype).eps < torch.finfo(actual.dtype).eps
        assert actual.dtype == expected.dtype or more_precise, f"dtype {actual.dtype} != {expected.dtype}"
    actual_dtype = actual.dtype if isinstance(actual, torch.Tensor) else None
    tolerance = tolerance_for(expected, terms=terms, dtype=dtype, actual_dtype=actual_dtype, scale=scale)
    note = f"(tolerance for {terms} terms: atol {tolerance['atol']:.2e}, rtol {tolerance['rtol']:.2e})"

    def message(generated: str) -> str:
        text = msg(generated) if callable(msg) else (f"{msg}: {generated}" if msg else generated)
        return f"{text}\n{note}"

    torch.testing.assert_close(_as_tensor(actual).double(), _as_tensor(expected).double(), **tolerance, msg=message)


def causal_lm_terms(config: Any, tokens: int, *, backward: bool = False) -> int:
    """The terms summed along a LLaMA-style decoder's forward pass for one logit, ``tokens`` long rows: per layer two
    RMSNorms, the q/k/v, o and gate/up projections (hidden_size terms each), the attention scores (head_dim), the
    softmax and the weighted sum (tokens each) and the down projection (intermediate_size); then the final norm and
    the lm_head (hidden_size each) and the log-softmax (vocab_size). ``backward``: a gradient runs that chain back as
    well (twice the terms). Sums over the batch (a mean loss, a weight gradient over every token) are the caller's
    to add."""
    hidden, layers = config.hidden_size, config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    per_layer = 2 * hidden + hidden + head_dim + 2 * tokens + hidden + hidden + config.intermediate_size
    forward = layers * per_layer + 2 * hidden + config.vocab_size
    return 2 * forward if backward else forward
