"""Formulas shared by training and the capacity planner; plain Python, no torch.

`clm.moe` drops tokens past `capacity`, `clm.metrics` reports MFU from `flops_per_token`, and
`clm.plan` sizes a slice with both on a machine that has no accelerator.
"""

from __future__ import annotations

import math
from fractions import Fraction


def capacity(num_tokens: int, top_k: int, num_experts: int, capacity_factor: float) -> int:
    """C = ceil(T * K / E * capacity_factor), exact for decimal factors, clamped to [1, T].

    An expert can receive at most T assignments (a token's top-k experts are distinct), so
    C > T would only add empty slots.
    """
    exact = Fraction(num_tokens * top_k, num_experts) * Fraction(str(float(capacity_factor)))
    return max(1, min(num_tokens, math.ceil(exact)))


def flops_per_token(
    active_params: int, embedding_params: int, tied: bool, layers: int, hidden: int, seq_len: int
) -> float:
    """Training FLOPs per token: 6 x active parameters (input embedding excluded: it is a
    lookup, unless tied to the output head) + attention.

    Attention scores and values cost 12 x layers x hidden x seq_len per token for forward and
    backward (PaLM appendix B; causal masking is not discounted, as is customary).
    """
    matmul_params = active_params - (0 if tied else embedding_params)
    return 6.0 * matmul_params + 12.0 * layers * hidden * seq_len
