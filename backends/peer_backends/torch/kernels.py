"""Triton kernels of the expert stage and its backward: ``implementation="triton"``.

The expert stage (SPEC §3.10-§3.11) for T tokens, J = heads*topk selections each:

    pre[t, j]  = x[t] . down[e] + bias[e]                    e = indices[t, j]
    gated[t, j] = x[t] . gate[e]                             (GLU experts only)
    coef[t, j] = weights[t, j] * act(pre[t, j]) (* gated[t, j])
    y[t]       = sum_j coef[t, j] * up[e]

runs in one kernel, one program per token (per block of tokens in the interpreter): the J
selected rows of ``down`` (and ``gate``) are read block by block of d_model and dotted with x[t];
the J rows of ``up`` are read and summed into y[t]; no (T, J, d) tensor is ever formed. Only the
small (T, J) pre-activations and gate dots are kept for the backward, which is two kernels:

- per token: d_coef[t, j] = dy[t] . up[e], then d_weights, the gradients of pre and gated, and
  dx[t] = sum_j d_pre[t, j] * down[e] + d_gated[t, j] * gate[e];
- per run of equal experts in the selections sorted by expert (a stable sort; the runs' starts
  found on the device, without synchronising): the table gradients d_down[e] = sum d_pre * x[t],
  d_gate, d_up[e] = sum coef * dy[t] and d_bias[e] = sum d_pre, each a segmented reduction
  whose order is fixed: deterministic (bitwise equal from run to run), with no floating-point
  atomics. Rows of experts nobody selected are zero. With ``sparse=True`` (SPEC §7.1) the
  backend hands these kernels the call's selected rows as the tables
  (``experts.selected_tables``), so these gradients are those rows' only: O(T * J * d), not O(N * d).

Mixed precision (SPEC §10.3, ``low`` a 16-bit dtype): the tables are float32 parameters; the
kernels read their rows from a copy rounded to ``low``, and compute every dot and sum in
float32. The table gradients are float32, those with respect to the rounded rows
(straight-through), as in the "aten" path.

Arithmetic is in x's dtype (float32, or float64 for float64 inputs). The kernels run on CUDA
devices; on CPU they run in Triton's interpreter (``TRITON_INTERPRET=1`` in the environment
before triton is first imported), for testing: the interpreter runs every program in Python,
so there a program takes a block of tokens or runs. This module imports triton; the backend
imports it only when implementation "triton" runs (``peer.expert_stage_for``).

The entry points are ``expert_stage`` (the backend's expert-stage role) and ``triton_experts``,
the custom operator ``peer::triton_experts`` with its
backward ``peer::triton_experts_backward``: opaque to torch.compile, with fake (meta)
implementations, so compiled graphs call the kernels without breaking.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

# Activation codes of the kernels, for peer_ref.config's activation names.
ACTIVATION_CODES = {"identity": 0, "gelu": 1, "gelu_tanh": 2, "relu": 3, "silu": 4}

# Elements of the gathered tile a program reads at once. On a GPU a program takes one token (all
# its selections, a block of columns), or one run of equal experts (SEGMENT_BLOCK selections at a
# time); in Triton's interpreter, which runs every program in Python one after another, a program
# takes up to INTERPRETER_BLOCK tokens or runs, with tiles of up to INTERPRETER_TILE elements.
TILE_ELEMENTS = 4096
SEGMENT_BLOCK = 32
INTERPRETER_TILE = 1 << 16
INTERPRETER_BLOCK = 64

# Constants of the activations.
_INV_SQRT_2 = tl.constexpr(1.0 / math.sqrt(2.0))
_INV_SQRT_2PI = tl.constexpr(1.0 / math.sqrt(2.0 * math.pi))
_SQRT_2_OVER_PI = tl.constexpr(math.sqrt(2.0 / math.pi))
_GELU_TANH_C = tl.constexpr(0.044715)


# ---------------------------------------------------------------- kernels


@triton.jit
def _activation_and_grad(z, ACT: tl.constexpr):
    """(act(z), act'(z)) elementwise for the activation code ACT (peer_ref.functions).

    Constants are built in z's dtype: a bare float literal would be rounded to float32.
    """
    if ACT == 1:  # gelu, exact erf
        cdf = 0.5 * (1.0 + tl.math.erf(z * tl.full(z.shape, _INV_SQRT_2, z.dtype)))
        a = z * cdf
        da = cdf + z * tl.exp(-0.5 * z * z) * tl.full(z.shape, _INV_SQRT_2PI, z.dtype)
    elif ACT == 2:  # gelu_tanh, tanh from exp(-2|u|) <= 1: no overflow
        c = tl.full(z.shape, _GELU_TANH_C, z.dtype)
        s = tl.full(z.shape, _SQRT_2_OVER_PI, z.dtype)
        u = s * (z + c * z * z * z)
        e = tl.exp(-2.0 * tl.abs(u))
        t = tl.where(u < 0, -1.0, 1.0) * ((1.0 - e) / (1.0 + e))
        a = 0.5 * z * (1.0 + t)
        da = 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * s * (1.0 + 3.0 * c * z * z)
    elif ACT == 3:  # relu: NaN passes, relu'(0) = 0 (SPEC §7)
        a = tl.where(z < 0, 0.0, z)
        da = tl.where(z > 0, 1.0, 0.0)
    elif ACT == 4:  # silu, sigmoid from exp(-|z|) <= 1: no overflow
        e = tl.exp(-tl.abs(z))
        sig = tl.where(z < 0, e, 1.0) / (1.0 + e)
        a = z * sig
        da = sig * (1.0 + z * (1.0 - sig))
    else:  # identity
        a = z
        da = tl.full(z.shape, 1.0, z.dtype)
    return a.to(z.dtype), da.to(z.dtype)


@triton.jit
def _token_selections(idx_ptr, T, J, BLOCK_T: tl.constexpr, BLOCK_J: tl.constexpr):
    """The program's BLOCK_T tokens and their selections: (token offsets, token mask, (token,
    selection) mask, flat selection offsets, selected table rows as int64)."""
    offs_t = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    mask_t = offs_t < T
    offs_j = tl.arange(0, BLOCK_J)
    mask_tj = mask_t[:, None] & (offs_j < J)[None, :]
    sel = offs_t[:, None] * J + offs_j[None, :]
    rows = tl.load(idx_ptr + sel, mask=mask_tj, other=0).to(tl.int64)
    return offs_t, mask_t, mask_tj, sel, rows


@triton.jit
def _forward_kernel(
    x_ptr,
    idx_ptr,
    w_ptr,
    down_ptr,
    up_ptr,
    bias_ptr,
    gate_ptr,
    y_ptr,
    pre_ptr,
    gated_ptr,
    T,
    J,
    D_IN,
    D_OUT,
    ACT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_GATE: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """One program per BLOCK_T tokens: pre, gated (saved) and y of each."""
    offs_t, mask_t, mask_tj, sel, rows = _token_selections(idx_ptr, T, J, BLOCK_T, BLOCK_J)
    pre = tl.zeros([BLOCK_T, BLOCK_J], dtype=ACC)
    gated = tl.zeros([BLOCK_T, BLOCK_J], dtype=ACC)
    for start in range(0, D_IN, BLOCK_D):
        offs_d = start + tl.arange(0, BLOCK_D)
        mask_d = offs_d < D_IN
        tile_mask = mask_tj[:, :, None] & mask_d[None, None, :]
        xv = tl.load(
            x_ptr + offs_t[:, None] * D_IN + offs_d[None, :], mask=mask_t[:, None] & mask_d[None, :], other=0.0
        ).to(ACC)
        down = tl.load(down_ptr + rows[:, :, None] * D_IN + offs_d[None, None, :], mask=tile_mask, other=0.0).to(ACC)
        pre += tl.sum(down * xv[:, None, :], axis=2)
        if HAS_GATE:
            gate = tl.load(gate_ptr + rows[:, :, None] * D_IN + offs_d[None, None, :], mask=tile_mask, other=0.0).to(
                ACC
            )
            gated += tl.sum(gate * xv[:, None, :], axis=2)
    if HAS_BIAS:
        pre += tl.load(bias_ptr + rows, mask=mask_tj, other=0.0).to(ACC)
    hidden, _ = _activation_and_grad(pre, ACT)
    if HAS_GATE:
        hidden = hidden * gated
        tl.store(gated_ptr + sel, gated, mask=mask_tj)
    tl.store(pre_ptr + sel, pre, mask=mask_tj)
    coef = tl.load(w_ptr + sel, mask=mask_tj, other=0.0).to(ACC) * hidden
    coef = tl.where(mask_tj, coef, 0.0)
    for start in range(0, D_OUT, BLOCK_D):
        offs_d = start + tl.arange(0, BLOCK_D)
        mask_d = offs_d < D_OUT
        up = tl.load(
            up_ptr + rows[:, :, None] * D_OUT + offs_d[None, None, :],
            mask=mask_tj[:, :, None] & mask_d[None, None, :],
            other=0.0,
        ).to(ACC)
        tl.store(
            y_ptr + offs_t[:, None] * D_OUT + offs_d[None, :],
            tl.sum(up * coef[:, :, None], axis=1),
            mask=mask_t[:, None] & mask_d[None, :],
        )


@triton.jit
def _token_backward_kernel(
    dy_ptr,
    idx_ptr,
    w_ptr,
    down_ptr,
    up_ptr,
    gate_ptr,
    pre_ptr,
    gated_ptr,
    dx_ptr,
    dw_ptr,
    dpre_ptr,
    dgated_ptr,
    coef_ptr,
    T,
    J,
    D_IN,
    D_OUT,
    ACT: tl.constexpr,
    HAS_GATE: tl.constexpr,
    NEED_DX: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """One program per BLOCK_T tokens: d_weights, the (T, J) cotangents of pre and gated, coef, dx."""
    offs_t, mask_t, mask_tj, sel, rows = _token_selections(idx_ptr, T, J, BLOCK_T, BLOCK_J)
    d_coef = tl.zeros([BLOCK_T, BLOCK_J], dtype=ACC)
    for start in range(0, D_OUT, BLOCK_D):
        offs_d = start + tl.arange(0, BLOCK_D)
        mask_d = offs_d < D_OUT
        dyv = tl.load(
            dy_ptr + offs_t[:, None] * D_OUT + offs_d[None, :], mask=mask_t[:, None] & mask_d[None, :], other=0.0
        ).to(ACC)
        up = tl.load(
            up_ptr + rows[:, :, None] * D_OUT + offs_d[None, None, :],
            mask=mask_tj[:, :, None] & mask_d[None, None, :],
            other=0.0,
        ).to(ACC)
        d_coef += tl.sum(up * dyv[:, None, :], axis=2)
    w = tl.load(w_ptr + sel, mask=mask_tj, other=0.0).to(ACC)
    pre = tl.load(pre_ptr + sel, mask=mask_tj, other=0.0).to(ACC)
    a, da = _activation_and_grad(pre, ACT)
    d_hidden = d_coef * w
    if HAS_GATE:
        gated = tl.load(gated_ptr + sel, mask=mask_tj, other=0.0).to(ACC)
        hidden = a * gated
        d_gated = tl.where(mask_tj, d_hidden * a, 0.0)
        d_pre = d_hidden * gated
        tl.store(dgated_ptr + sel, d_gated, mask=mask_tj)
    else:
        hidden = a
        d_pre = d_hidden
    if ACT == 3:  # relu: the gradient passes where pre > 0 only
        d_pre = tl.where(pre > 0, d_pre, 0.0)
    else:
        d_pre = d_pre * da
    d_pre = tl.where(mask_tj, d_pre, 0.0)
    tl.store(dw_ptr + sel, d_coef * hidden, mask=mask_tj)
    tl.store(dpre_ptr + sel, d_pre, mask=mask_tj)
    tl.store(coef_ptr + sel, w * hidden, mask=mask_tj)
    if NEED_DX:
        for start in range(0, D_IN, BLOCK_D):
            offs_d = start + tl.arange(0, BLOCK_D)
            mask_d = offs_d < D_IN
            tile_mask = mask_tj[:, :, None] & mask_d[None, None, :]
            down = tl.load(down_ptr + rows[:, :, None] * D_IN + offs_d[None, None, :], mask=tile_mask, other=0.0).to(
                ACC
            )
            dx = tl.sum(down * d_pre[:, :, None], axis=1)
            if HAS_GATE:
                gate = tl.load(
                    gate_ptr + rows[:, :, None] * D_IN + offs_d[None, None, :], mask=tile_mask, other=0.0
                ).to(ACC)
                dx += tl.sum(gate * d_gated[:, :, None], axis=1)
            tl.store(dx_ptr + offs_t[:, None] * D_IN + offs_d[None, :], dx, mask=mask_t[:, None] & mask_d[None, :])


@triton.jit
def _segment_sums(
    out_ptr,
    e,
    mask_r,
    rows_ptr,
    sel_ptr,
    tok_ptr,
    pos_ptr,
    start,
    length,
    longest,
    D,
    ACC: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """out[e[r]] = sum over the sorted selections s of run r (start[r] + [0, length[r]), in order)
    of sel[pos[s]] * rows[tok[s]], for the BLOCK_R runs r of one program."""
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=ACC)
        for s0 in range(0, longest, BLOCK_S):
            offs_s = s0 + tl.arange(0, BLOCK_S)
            mask_rs = offs_s[None, :] < length[:, None]
            at = start[:, None] + offs_s[None, :]
            tok = tl.load(tok_ptr + at, mask=mask_rs, other=0)
            sel = tl.load(sel_ptr + tl.load(pos_ptr + at, mask=mask_rs, other=0), mask=mask_rs, other=0.0)
            vals = tl.load(
                rows_ptr + tok[:, :, None] * D + offs_d[None, None, :],
                mask=mask_rs[:, :, None] & mask_d[None, None, :],
                other=0.0,
            ).to(ACC)
            acc += tl.sum(vals * sel[:, :, None], axis=1)
        tl.store(out_ptr + e[:, None] * D + offs_d[None, :], acc, mask=mask_r[:, None] & mask_d[None, :])


@triton.jit
def _table_backward_kernel(
    starts_ptr,
    runs_ptr,
    experts_ptr,
    tok_ptr,
    pos_ptr,
    x_ptr,
    dy_ptr,
    dpre_ptr,
    dgated_ptr,
    coef_ptr,
    d_down_ptr,
    d_up_ptr,
    d_bias_ptr,
    d_gate_ptr,
    D_IN,
    D_OUT,
    HAS_BIAS: tl.constexpr,
    HAS_GATE: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """One program per BLOCK_R runs of equal experts in the sorted selections: their table rows."""
    offs_r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_r = offs_r < tl.load(runs_ptr)
    start = tl.load(starts_ptr + offs_r, mask=mask_r, other=0)
    length = tl.load(starts_ptr + offs_r + 1, mask=mask_r, other=0) - start
    longest = tl.max(length, axis=0)
    e = tl.load(experts_ptr + start, mask=mask_r, other=0)
    _segment_sums(
        d_down_ptr,
        e,
        mask_r,
        x_ptr,
        dpre_ptr,
        tok_ptr,
        pos_ptr,
        start,
        length,
        longest,
        D_IN,
        ACC,
        BLOCK_R,
        BLOCK_S,
        BLOCK_D,
    )
    _segment_sums(
        d_up_ptr,
        e,
        mask_r,
        dy_ptr,
        coef_ptr,
        tok_ptr,
        pos_ptr,
        start,
        length,
        longest,
        D_OUT,
        ACC,
        BLOCK_R,
        BLOCK_S,
        BLOCK_D,
    )
    if HAS_GATE:
        _segment_sums(
            d_gate_ptr,
            e,
            mask_r,
            x_ptr,
            dgated_ptr,
            tok_ptr,
            pos_ptr,
            start,
            length,
            longest,
            D_IN,
            ACC,
            BLOCK_R,
            BLOCK_S,
            BLOCK_D,
        )
    if HAS_BIAS:
        acc = tl.zeros([BLOCK_R, BLOCK_S], dtype=ACC)
        for s0 in range(0, longest, BLOCK_S):
            offs_s = s0 + tl.arange(0, BLOCK_S)
            mask_rs = offs_s[None, :] < length[:, None]
            at = start[:, None] + offs_s[None, :]
            acc += tl.load(dpre_ptr + tl.load(pos_ptr + at, mask=mask_rs, other=0), mask=mask_rs, other=0.0)
        tl.store(d_bias_ptr + e, tl.sum(acc, axis=1), mask=mask_r)


def _pow2(n):
    return max(1, 1 << (int(n) - 1).bit_length())


def _interpreted(device):
    return device.type != "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def _token_blocks(tokens, j, width, device):
    """(BLOCK_T, BLOCK_J, BLOCK_D) of the per-token kernels."""
    block_j = _pow2(j)
    if not _interpreted(device):
        return 1, block_j, max(16, TILE_ELEMENTS // block_j)
    block_t = min(_pow2(tokens), INTERPRETER_BLOCK)
    return block_t, block_j, min(_pow2(width), max(16, INTERPRETER_TILE // (block_t * block_j)))


def _run_blocks(runs, width, device):
    """(BLOCK_R, BLOCK_S, BLOCK_D) of the table-gradient kernel."""
    if not _interpreted(device):
        return 1, SEGMENT_BLOCK, max(16, TILE_ELEMENTS // SEGMENT_BLOCK)
    block_r, block_s = min(_pow2(runs), INTERPRETER_BLOCK), 16
    return block_r, block_s, min(_pow2(width), max(16, INTERPRETER_TILE // (block_r * block_s)))


def _cdiv(n, block):
    return -(-n // block)


def _acc_dtype(dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _rows(table, low):
    """The table the kernels read: itself, or its copy rounded to ``low`` (SPEC §10.3)."""
    return table.contiguous() if low is None else table.to(low).contiguous()


# ---------------------------------------------------------------- operators


def _forward(x, indices, weights, down, up, bias, gate, activation, low):
    tokens, j = indices.shape
    y = x.new_empty((tokens, up.shape[1]))
    pre = x.new_empty((tokens, j))
    gated = x.new_empty((tokens, j) if gate is not None else (0,))
    if tokens == 0:
        return y, pre, gated
    block_t, block_j, block_d = _token_blocks(tokens, j, max(x.shape[1], up.shape[1]), x.device)
    _forward_kernel[(_cdiv(tokens, block_t),)](
        x.contiguous(),
        indices.contiguous(),
        weights.contiguous(),
        _rows(down, low),
        _rows(up, low),
        bias if bias is not None else pre,
        _rows(gate, low) if gate is not None else pre,
        y,
        pre,
        gated if gate is not None else pre,
        tokens,
        j,
        x.shape[1],
        up.shape[1],
        ACT=ACTIVATION_CODES[activation],
        HAS_BIAS=bias is not None,
        HAS_GATE=gate is not None,
        ACC=_acc_dtype(x.dtype),
        BLOCK_T=block_t,
        BLOCK_J=block_j,
        BLOCK_D=block_d,
    )
    return y, pre, gated


@torch.library.custom_op("peer::triton_experts", mutates_args=())
def _experts_op(
    x: torch.Tensor,
    indices: torch.Tensor,
    weights: torch.Tensor,
    down: torch.Tensor,
    up: torch.Tensor,
    bias: torch.Tensor | None,
    gate: torch.Tensor | None,
    activation: str,
    low: torch.dtype | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y (T, d_out), pre (T, J), gated (T, J), empty without a gate) of the expert stage."""
    return _forward(x, indices, weights, down, up, bias, gate, activation, low)


@_experts_op.register_fake
def _(x, indices, weights, down, up, bias, gate, activation, low):
    tokens, j = indices.shape
    return (
        x.new_empty((tokens, up.shape[1])),
        x.new_empty((tokens, j)),
        x.new_empty((tokens, j) if gate is not None else (0,)),
    )


def _sorted_runs(indices, n_rows):
    """Selections sorted by expert (stable): (tokens, positions, experts, run starts (S + 2,), runs (1,)).

    run starts[r] is where the r-th run of equal experts begins (S at r = runs), runs the number of
    runs; all on the device, without synchronising.
    """
    flat = indices.reshape(-1)
    size = flat.numel()
    positions = torch.sort(flat, stable=True).indices
    experts = flat[positions]
    first = torch.ones_like(experts, dtype=torch.bool)
    first[1:] = experts[1:] != experts[:-1]
    run_of = torch.cumsum(first, 0) - 1
    # The first selection of each run writes its position; the others write to a spare last slot.
    starts = torch.full((size + 2,), size, dtype=torch.int64, device=flat.device)
    starts.scatter_(0, torch.where(first, run_of, size + 1), torch.arange(size, device=flat.device))
    return positions // indices.shape[1], positions, experts, starts, run_of[-1:] + 1


@torch.library.custom_op("peer::triton_experts_backward", mutates_args=())
def _experts_backward_op(
    dy: torch.Tensor,
    x: torch.Tensor,
    indices: torch.Tensor,
    weights: torch.Tensor,
    down: torch.Tensor,
    up: torch.Tensor,
    bias: torch.Tensor | None,
    gate: torch.Tensor | None,
    pre: torch.Tensor,
    gated: torch.Tensor,
    activation: str,
    low: torch.dtype | None,
    need_x: bool,
    need_tables: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (x, weights, down, up, bias, gate) of sum(y * dy); x's empty unless need_x, the
    tables' empty unless need_tables; bias's and gate's empty where the layer has none."""
    tokens, j = indices.shape
    acc = x.dtype
    dx = x.new_zeros(x.shape if need_x else (0,))
    d_weights = weights.new_zeros(indices.shape)

    def table(t):
        return down.new_zeros(t.shape if need_tables and t is not None else (0,))

    d_down, d_up, d_bias, d_gate = table(down), table(up), table(bias), table(gate)
    if tokens == 0:
        return dx, d_weights, d_down, d_up, d_bias, d_gate
    block_t, block_j, block_d = _token_blocks(tokens, j, max(x.shape[1], up.shape[1]), x.device)
    d_pre = x.new_empty((tokens, j), dtype=acc)
    d_gated = x.new_empty((tokens, j) if gate is not None else (0,), dtype=acc)
    coef = x.new_empty((tokens, j), dtype=acc)
    dy = dy.contiguous()
    x = x.contiguous()
    indices = indices.contiguous()
    _token_backward_kernel[(_cdiv(tokens, block_t),)](
        dy,
        indices,
        weights.contiguous(),
        _rows(down, low),
        _rows(up, low),
        _rows(gate, low) if gate is not None else pre,
        pre.contiguous(),
        gated.contiguous() if gate is not None else pre,
        dx if need_x else pre,
        d_weights,
        d_pre,
        d_gated if gate is not None else d_pre,
        coef,
        tokens,
        j,
        x.shape[1],
        up.shape[1],
        ACT=ACTIVATION_CODES[activation],
        HAS_GATE=gate is not None,
        NEED_DX=need_x,
        ACC=_acc_dtype(acc),
        BLOCK_T=block_t,
        BLOCK_J=block_j,
        BLOCK_D=block_d,
    )
    if need_tables:
        tok, positions, experts, starts, runs = _sorted_runs(indices, down.shape[0])
        most = min(tokens * j, down.shape[0])  # runs of equal experts, at most
        block_r, block_s, block_d = _run_blocks(most, max(x.shape[1], up.shape[1]), x.device)
        _table_backward_kernel[(_cdiv(most, block_r),)](
            starts,
            runs,
            experts,
            tok,
            positions,
            x,
            dy,
            d_pre,
            d_gated if gate is not None else d_pre,
            coef,
            d_down,
            d_up,
            d_bias if bias is not None else d_down,
            d_gate if gate is not None else d_down,
            x.shape[1],
            up.shape[1],
            HAS_BIAS=bias is not None,
            HAS_GATE=gate is not None,
            ACC=_acc_dtype(acc),
            BLOCK_R=block_r,
            BLOCK_S=block_s,
            BLOCK_D=block_d,
        )
    return dx, d_weights, d_down, d_up, d_bias, d_gate


@_experts_backward_op.register_fake
def _(dy, x, indices, weights, down, up, bias, gate, pre, gated, activation, low, need_x, need_tables):
    def table(t):
        return x.new_empty(t.shape if need_tables and t is not None else (0,), dtype=down.dtype)

    return (
        x.new_empty(x.shape if need_x else (0,)),
        weights.new_empty(indices.shape),
        table(down),
        table(up),
        table(bias),
        table(gate),
    )


def _experts_setup(ctx, inputs, output):
    x, indices, weights, down, up, bias, gate, activation, low = inputs
    _, pre, gated = output
    ctx.mark_non_differentiable(pre, gated)
    ctx.activation, ctx.low = activation, low
    ctx.has_bias, ctx.has_gate = bias is not None, gate is not None
    ctx.save_for_backward(x, indices, weights, down, up, bias, gate, pre, gated)


def _experts_backward(ctx, dy, _d_pre, _d_gated):
    x, indices, weights, down, up, bias, gate, pre, gated = ctx.saved_tensors
    need = ctx.needs_input_grad
    need_tables = need[3] or need[4] or need[5] or need[6]
    dx, d_weights, d_down, d_up, d_bias, d_gate = torch.ops.peer.triton_experts_backward(
        dy, x, indices, weights, down, up, bias, gate, pre, gated, ctx.activation, ctx.low, need[0], need_tables
    )

    def keep(g, needed):
        return g if needed else None

    return (
        keep(dx, need[0]),
        None,
        keep(d_weights, need[2]),
        keep(d_down, need[3]),
        keep(d_up, need[4]),
        keep(d_bias, need[5] and ctx.has_bias),
        keep(d_gate, need[6] and ctx.has_gate),
        None,
        None,
    )


_experts_op.register_autograd(_experts_backward, setup_context=_experts_setup)


def expert_stage(cfg, p, xf, flat, weights, low=None, groups=None):
    """The expert stage of the backend (``peer.ExpertStage``) in the Triton kernels: y (T, d_out)
    for p the parameters in the compute dtype, xf (T, d_model), flat (T, heads*topk) selections
    of the tables' rows, weights (T, heads*topk) and ``low`` the mixed mode's torch dtype or None
    (SPEC §10.3). ``groups`` (the "aten" stage's grouping of flat) is not read: the backward
    kernel sorts the selections itself."""
    del groups
    return triton_experts(
        xf,
        flat,
        weights,
        p["experts.down"],
        p["experts.up"],
        p["experts.bias"] if cfg.expert_bias else None,
        p["experts.gate"] if cfg.expert_glu else None,
        cfg.activation,
        low,
    )


def triton_experts(x, indices, weights, down, up, bias=None, gate=None, activation="gelu", low=None):
    """y (T, d_out) of the expert stage (SPEC §3.10-§3.11) in the Triton kernels.

    x (T, d_model) float32 or float64; indices (T, J) int64 rows of the tables; weights (T, J)
    router weights, x's dtype; down (N, d_model), up (N, d_out), bias (N,) or None, gate
    (N, d_model) or None (GLU experts): x's dtype; activation one of peer_ref's activation
    names; low None, or torch.bfloat16/torch.float16: table rows rounded to it as they are read
    (SPEC §10.3). Differentiable in x, weights and every table; under torch.compile an opaque
    custom operator (peer::triton_experts).
    """
    return torch.ops.peer.triton_experts(x, indices, weights, down, up, bias, gate, activation, low)[0]
