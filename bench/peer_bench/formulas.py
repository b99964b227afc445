"""Analytic FLOP and byte counts, and the width of the equal-FLOP dense FFN.

FLOPs count a multiply-add as 2. Per token, forward, for the layer of SPEC §3 (n_keys = sqrt(N)):

    query       2 * d_model * heads * d_key        x @ query.kernel
    sub_keys    2 * heads * n_keys * d_key         each head's two half-queries against n_keys sub-keys
    candidates  heads * topk**2                    the k*k candidate sums of stage 2
    down        2 * heads * topk * d_model         x . experts.down[i] for the h*k selected experts
    gate        2 * heads * topk * d_model         x . experts.gate[i], GLU experts only (0 otherwise)
    up          2 * heads * topk * d_out           the weighted sum of the selected experts.up rows

So a GLU expert (SPEC §3.10) costs 2 * (2 * d_model + d_out) FLOPs per selection, against
2 * (d_model + d_out) for the paper's single-neuron expert: 1.5x the expert stage at d_out = d_model.

Batch norm, biases, activation, softmax and top-k selection are O(heads * (d_key + topk)) per token
and left out. forward+backward is counted as 3 x forward (the usual convention: the backward of a
matmul costs twice its forward); PEER's true backward is cheaper than that because routing has no
gradient and only selected sub-key scores receive one, so the count is an upper bound there.

The dense FFN is y = gelu(x @ W1 + b1) @ W2 + b2, 2 * width * (d_model + d_out) FLOPs per token;
its width is PEER's forward FLOPs per token divided by 2 * (d_model + d_out), rounded.
"""

from __future__ import annotations

import math

from .presets import DTYPE_BYTES, BenchCase

FLOP_TERMS = ("query", "sub_keys", "candidates", "down", "gate", "up")


def peer_flops_per_token(
    d_model: int, n_experts: int, heads: int, topk: int, d_key: int, d_out: int | None = None, expert_glu: bool = False
) -> dict[str, int]:
    """Forward FLOPs per token, by term (see the module docstring), plus their "total"."""
    d_out = d_model if d_out is None else d_out
    n_keys = math.isqrt(n_experts)
    terms = {
        "query": 2 * d_model * heads * d_key,
        "sub_keys": 2 * heads * n_keys * d_key,
        "candidates": heads * topk * topk,
        "down": 2 * heads * topk * d_model,
        "gate": 2 * heads * topk * d_model if expert_glu else 0,
        "up": 2 * heads * topk * d_out,
    }
    terms["total"] = sum(terms[t] for t in FLOP_TERMS)
    return terms


def mode_factor(mode: str) -> int:
    """FLOPs of `mode` as a multiple of the forward FLOPs."""
    factors = {"forward": 1, "forward_backward": 3}
    if mode not in factors:
        raise ValueError(f"mode={mode!r}, but expected one of {sorted(factors)}")
    return factors[mode]


def dense_width(flops_per_token: int, d_model: int, d_out: int | None = None) -> int:
    """Hidden width of the dense FFN whose forward FLOPs per token match `flops_per_token`."""
    d_out = d_model if d_out is None else d_out
    return max(1, round(flops_per_token / (2 * (d_model + d_out))))


def dense_flops_per_token(width: int, d_model: int, d_out: int | None = None) -> int:
    d_out = d_model if d_out is None else d_out
    return 2 * width * (d_model + d_out)


def expert_stage_bytes(
    tokens: int, heads: int, topk: int, d_model: int, d_out: int | None, itemsize: int, expert_glu: bool = False
) -> int:
    """Bytes the expert stage must move if no row is reused from cache: the gathered rows of
    experts.down, experts.gate (GLU experts) and experts.up (tokens*heads*topk of each), plus
    reading x and writing y."""
    d_out = d_model if d_out is None else d_out
    row = d_model * (2 if expert_glu else 1) + d_out
    return (tokens * heads * topk * row + tokens * (d_model + d_out)) * itemsize


def case_counts(case: BenchCase) -> dict[str, int]:
    """Every derived count of a case, for the JSON report."""
    per_token = peer_flops_per_token(
        case.d_model, case.n_experts, case.heads, case.topk, case.d_key, expert_glu=case.expert_glu
    )
    width = dense_width(per_token["total"], case.d_model)
    return {
        "peer_flops_per_token": per_token,
        "peer_flops_forward": per_token["total"] * case.tokens,
        "dense_width": width,
        "dense_flops_forward": dense_flops_per_token(width, case.d_model) * case.tokens,
        "expert_stage_bytes": expert_stage_bytes(
            case.tokens, case.heads, case.topk, case.d_model, None, DTYPE_BYTES[case.dtype], case.expert_glu
        ),
    }


def transformer_flops_per_token(
    d_model: int, n_layers: int, seq: int, vocab: int, ffn_flops: list[int]
) -> dict[str, int]:
    """Forward FLOPs per token of a decoder-only transformer, by term, plus their "total".

    ``ffn_flops`` holds each block's feed-forward FLOPs per token (``dense_flops_per_token`` or
    ``peer_flops_per_token(...)["total"]``), one entry per block. Terms, per the convention of
    Kaplan et al. 2020 (arXiv 2001.08361, Table 1) with a multiply-add counted as 2:

        attention_proj  2 * 4 * d_model**2 per block     q, k, v and output projections
        attention       2 * 2 * seq * d_model per block  q.k logits and the weighted sum of v
                                                         (the full seq x seq; causal masking
                                                         halves the work actually needed)
        ffn             sum(ffn_flops)
        unembed         2 * d_model * vocab              the output logits

    Embedding lookups, layer norms, softmax and residual additions are left out. Training
    FLOPs are ``mode_factor("forward_backward") * total`` per token.
    """
    if len(ffn_flops) != n_layers:
        raise ValueError(f"len(ffn_flops)={len(ffn_flops)}, but expected n_layers={n_layers}")
    terms = {
        "attention_proj": 8 * d_model * d_model * n_layers,
        "attention": 4 * seq * d_model * n_layers,
        "ffn": int(sum(ffn_flops)),
        "unembed": 2 * d_model * vocab,
    }
    terms["total"] = sum(terms.values())
    return terms
