"""Pallas kernels of the expert stage (SPEC §3.10-§3.11) and its backward: ``implementation="pallas"``.

``pallas_experts`` computes the same function as ``experts.chunked_experts`` (the "xla" path), with no
(tokens, heads * topk, width) tensor in memory, forward or backward:

    pre[t, j]  = x[t] . down[i] + bias[i]          i = indices[t, j], j over heads * topk
    gate[t, j] = x[t] . gate_table[i]              (GLU experts only)
    y[t]       = sum_j weights[t, j] * act(pre[t, j]) * gate[t, j] * up[i]

Three kernels, each one launch per call, are shared by the forward and the backward:

- ``_row_dots``: per token, the selected rows of one or more (N, width) tables dotted with a
  (T, width) array: the pre-activations and gate values (x with down, gate), and in the backward
  the router-coefficient gradient (dy with up).
- ``_row_sums``: per token, the selected rows of tables summed with (T, heads * topk)
  coefficients: y (up rows times the router-weighted activations), and dx (down and gate rows
  times the pre-activation and gate gradients).
- ``_segment_rows``: the table gradients d_down, d_gate, d_up, d_bias. The selections are sorted
  by expert outside the kernel (a stable jnp.argsort and the segment offsets by searchsorted);
  one program per expert row sums its segment's coefficient * x (or dy) rows in the sorted
  order: deterministic, no atomics, and a row never selected is written as zero.

Between the kernels, XLA applies the activation, its derivative and the GLU/router products to
the (T, heads * topk) pre-activations that the forward saves for the backward: 1/width of the
row traffic, and it keeps exact GELU (the Triton lowering rules of jax 0.10,
jax/_src/pallas/triton/lowering.py, have none for erf) and the activations' derivatives identical
to the "xla" path's (``jax.vjp`` of the same functions).

Mixed mode (SPEC §10.3, ``low`` a dtype name): the kernels read the tables from copies rounded
to ``low`` (half the row bytes) and widen each row to the compute dtype as it is loaded; all
dots and sums run in the compute dtype (float32), and the table gradients, float32, are the
gradients with respect to the rounded rows (straight-through).

The kernels keep to what Pallas's Triton lowering compiles: one program per token (or expert
row, times a block of columns), loops as ``lax.fori_loop`` (static trip counts over the
selections, dynamic over an expert's segment), rows read with ``pl.ds`` at scalar indices read
from an index ref, blocks in powers of two with masked tails (so any width works), and the
Triton compiler parameters select that lowering. On a default backend other than "gpu" they run
in Pallas's interpreter (``interpret=True``): for testing on CPU, and slow. Pallas is imported
only when this path runs.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from .core import native_dtype
from .experts import ACTIVATIONS

# Columns per program of _row_sums and _segment_rows (a power of two): wider outputs take a
# second grid axis, so a program's accumulator stays within registers for any width.
_BLOCK_COLUMNS = 512
# Triton launch parameters: the kernels stream rows (no tl.dot), so few warps suffice.
_NUM_WARPS = 4


def _pallas():
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    return pl, plgpu


def interpreted() -> bool:
    """Whether the kernels run in Pallas's interpreter: on every default backend but "gpu"."""
    return jax.default_backend() != "gpu"


def _zero():
    # Every index in a kernel is int32, under jax_enable_x64 too (the interpreter's dynamic
    # slices need one index type; Triton addresses with int32).
    return jnp.int32(0)


def _load(view, mask):
    """A masked row read, zero where masked; ``other`` in the ref's own dtype, as Triton's
    load needs."""
    _, plgpu = _pallas()
    return plgpu.load(view, mask=mask, other=jnp.zeros((), view.dtype))


def _pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _call(kernel, out_shape, grid, *args):
    pl, plgpu = _pallas()
    interpret = interpreted()
    return pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=grid,
        interpret=interpret,
        compiler_params=None if interpret else plgpu.CompilerParams(num_warps=_NUM_WARPS, num_stages=1),
    )(*args)


def _row_dots(x, idx, tables):
    """[(T, S) array of x[t] . table[idx[t, s]] for each table]; x (T, D), tables (N, D) of any
    float dtype, widened to x's dtype as read."""
    pl, plgpu = _pallas()
    tokens, width = x.shape
    slots = idx.shape[1]
    width_p, slots_p = _pow2(width), _pow2(slots)
    n_tables = len(tables)

    def kernel(x_ref, idx_ref, *refs):
        table_refs, out_refs = refs[:n_tables], refs[n_tables:]
        t = pl.program_id(0)
        columns = lax.broadcasted_iota(jnp.int32, (width_p,), 0)
        positions = lax.broadcasted_iota(jnp.int32, (slots_p,), 0)
        x_row = _load(x_ref.at[t, pl.ds(_zero(), width_p)], mask=columns < width)

        def one_selection(s, accs):
            i = idx_ref[t, s]
            return tuple(
                jnp.where(
                    positions == s,
                    jnp.sum(x_row * _load(table.at[i, pl.ds(_zero(), width_p)], mask=columns < width).astype(x.dtype)),
                    acc,
                )
                for table, acc in zip(table_refs, accs)
            )

        zeros = tuple(jnp.zeros((slots_p,), x.dtype) for _ in tables)
        accs = lax.fori_loop(_zero(), jnp.int32(slots), one_selection, zeros)
        for out, acc in zip(out_refs, accs):
            plgpu.store(out.at[t, pl.ds(_zero(), slots_p)], acc, mask=positions < slots)

    out_shape = [jax.ShapeDtypeStruct((tokens, slots), x.dtype)] * n_tables
    return _call(kernel, out_shape, (tokens,), x, idx, *tables)


def _row_sums(coefs, idx, tables):
    """(T, W): sum over pairs and s of coef[t, s] * table[idx[t, s]]; coefs (T, S) in the
    compute dtype, tables (N, W) of any float dtype, widened as read."""
    pl, plgpu = _pallas()
    tokens, slots = idx.shape
    width = tables[0].shape[1]
    block = min(_pow2(width), _BLOCK_COLUMNS)
    dtype = coefs[0].dtype
    n_tables = len(tables)

    def kernel(idx_ref, *refs):
        coef_refs, table_refs, out = refs[:n_tables], refs[n_tables : 2 * n_tables], refs[2 * n_tables]
        t, c = pl.program_id(0), pl.program_id(1)
        columns = c * block + lax.broadcasted_iota(jnp.int32, (block,), 0)

        def one_selection(s, acc):
            i = idx_ref[t, s]
            for coef, table in zip(coef_refs, table_refs):
                row = _load(table.at[i, pl.ds(c * block, block)], mask=columns < width)
                acc = acc + coef[t, s] * row.astype(dtype)
            return acc

        acc = lax.fori_loop(_zero(), jnp.int32(slots), one_selection, jnp.zeros((block,), dtype))
        plgpu.store(out.at[t, pl.ds(c * block, block)], acc, mask=columns < width)

    out_shape = jax.ShapeDtypeStruct((tokens, width), dtype)
    return _call(kernel, out_shape, (tokens, -(-width // block)), idx, *coefs, *tables)


def _sorted_selections(idx, n_experts):
    """(order, offsets): the flat selection positions sorted by expert (stable, so ties keep
    token order), and each expert's segment [offsets[n], offsets[n + 1]) in that order."""
    flat = idx.reshape(-1)
    order = jnp.argsort(flat, stable=True).astype(jnp.int32)
    offsets = jnp.searchsorted(flat[order], jnp.arange(n_experts + 1, dtype=flat.dtype), side="left")
    return order, offsets.astype(jnp.int32)


def _segment_rows(pairs, order, offsets, sources, slots):
    """[(N, W_k) per pair]: for pair (coef (T * S,), k), row n sums coef[p] * sources[k][p // slots]
    over the selections p of expert n, in the sorted order (deterministic; zero for a row never
    selected). A source None stands for a (T, 1) column of ones (the bias gradient: a plain sum).
    One launch for every table gradient; its column blocks span the widest source."""
    pl, plgpu = _pallas()
    n_experts = offsets.shape[0] - 1
    widths = [1 if src is None else src.shape[1] for src in sources]
    block = min(_pow2(max(widths)), _BLOCK_COLUMNS)
    dtype = pairs[0][0].dtype
    arrays = [src for src in sources if src is not None]
    slot_of = {}  # source position -> its ref's position among the kernel's source refs
    for k, src in enumerate(sources):
        if src is not None:
            slot_of[k] = len(slot_of)

    def kernel(order_ref, offsets_ref, *refs):
        source_refs = refs[: len(arrays)]
        coef_refs = refs[len(arrays) : len(arrays) + len(pairs)]
        out_refs = refs[len(arrays) + len(pairs) :]
        n, c = pl.program_id(0), pl.program_id(1)
        columns = c * block + lax.broadcasted_iota(jnp.int32, (block,), 0)

        def one_selection(p, accs):
            q = order_ref[p]
            rows = [
                jnp.ones((block,), dtype)
                if src is None
                else _load(
                    source_refs[slot_of[k]].at[lax.div(q, jnp.int32(slots)), pl.ds(c * block, block)],
                    mask=columns < widths[k],
                )
                for k, src in enumerate(sources)
            ]
            return tuple(acc + coef[q] * rows[k] for coef, (_, k), acc in zip(coef_refs, pairs, accs))

        zeros = tuple(jnp.zeros((block,), dtype) for _ in pairs)
        accs = lax.fori_loop(offsets_ref[n], offsets_ref[n + 1], one_selection, zeros)
        for out, (_, k), acc in zip(out_refs, pairs, accs):
            plgpu.store(out.at[n, pl.ds(c * block, block)], acc, mask=columns < widths[k])

    out_shape = [jax.ShapeDtypeStruct((n_experts, widths[k]), dtype) for _, k in pairs]
    grid = (n_experts, -(-max(widths) // block))
    return _call(kernel, out_shape, grid, order, offsets, *arrays, *(coef for coef, _ in pairs))


# ---------------------------------------------------------------------------- the expert stage


def _read_copy(table, low):
    """The table as the kernels read it: itself, or rounded to ``low`` in the mixed mode."""
    return table if table is None or low is None else table.astype(native_dtype(low))


def expert_stage(cfg, p, xf, indices, weights, low=None):
    """The expert stage of implementation "pallas" (``peer.expert_stage_for``), with the role's
    arguments: see ``experts.expert_stage``."""
    return pallas_experts(
        cfg.activation,
        low,
        xf,
        indices,
        weights,
        p["experts.down"],
        p["experts.up"],
        p["experts.bias"] if cfg.expert_bias else None,
        p["experts.gate"] if cfg.expert_glu else None,
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def pallas_experts(activation, low, x, indices, weights, down, up, bias, gate):
    """The expert stage with Pallas kernels (SPEC §3.10-§3.11); ``experts.chunked_experts``'s function.

    activation: a name of ``peer_ref.config.ACTIVATIONS``; low: the mixed mode's dtype name or
    None (SPEC §10.3). x (T, d_model) and weights (T, heads, topk) in the compute dtype
    (float32 or float64), indices (T, heads, topk) integer in [0, N); down (N, d_model),
    up (N, d_out), bias (N,) or None, gate (N, d_model) or None, in the compute dtype.
    Returns y (T, d_out) in the compute dtype.
    """
    return _forward(activation, low, x, indices, weights, down, up, bias, gate)[0]


def _forward(activation, low, x, indices, weights, down, up, bias, gate):
    tokens = x.shape[0]
    # Explicit widths (not -1): there may be zero tokens.
    idx = indices.reshape(tokens, indices.shape[1] * indices.shape[2]).astype(jnp.int32)
    w = weights.reshape(idx.shape)
    down_r, up_r, gate_r = _read_copy(down, low), _read_copy(up, low), _read_copy(gate, low)
    if tokens == 0:  # no kernel launch on an empty grid
        empty = jnp.zeros(idx.shape, x.dtype)
        return jnp.zeros((0, up.shape[1]), x.dtype), (x, idx, weights, empty, empty, down_r, up_r, bias, gate_r)
    dots = _row_dots(x, idx, [down_r] if gate is None else [down_r, gate_r])
    pre = dots[0] if bias is None else dots[0] + bias[idx]
    gate_values = dots[1] if gate is not None else jnp.ones_like(pre)
    hidden = ACTIVATIONS[activation](pre) * gate_values
    y = _row_sums([w * hidden], idx, [up_r])
    return y, (x, idx, weights, pre, gate_values, down_r, up_r, bias, gate_r)


def _backward(activation, low, residuals, dy):
    x, idx, weights, pre, gate_values, down_r, up_r, bias, gate_r = residuals
    tokens, slots = idx.shape
    n_experts = down_r.shape[0]
    if tokens == 0:  # no kernel launch on an empty grid

        def zeros(a):
            return None if a is None else jnp.zeros(a.shape, x.dtype)

        return jnp.zeros_like(x), None, jnp.zeros_like(weights), zeros(down_r), zeros(up_r), zeros(bias), zeros(gate_r)
    w = weights.reshape(idx.shape)
    (d_coef,) = _row_dots(dy, idx, [up_r])
    activated, act_vjp = jax.vjp(ACTIVATIONS[activation], pre)
    d_weights = (d_coef * activated * gate_values).reshape(weights.shape)
    d_hidden = d_coef * w
    (d_pre,) = act_vjp(d_hidden * gate_values)
    order, offsets = _sorted_selections(idx, n_experts)
    # Table gradients, one segmented launch: sources x, dy and (bias) ones.
    pairs = [(d_pre.reshape(-1), 0), ((w * activated * gate_values).reshape(-1), 1)]
    if gate_r is None:
        dx = _row_sums([d_pre], idx, [down_r])
    else:
        d_gate_values = d_hidden * activated
        dx = _row_sums([d_pre, d_gate_values], idx, [down_r, gate_r])
        pairs.append((d_gate_values.reshape(-1), 0))
    if bias is not None:
        pairs.append((d_pre.reshape(-1), 2))
    grads = _segment_rows(pairs, order, offsets, [x, dy, None], slots)
    d_down, d_up = grads[:2]
    d_gate = grads[2] if gate_r is not None else None
    d_bias = grads[-1].reshape(n_experts) if bias is not None else None
    return dx, None, d_weights, d_down, d_up, d_bias, d_gate


def _forward_saving(activation, low, x, indices, weights, down, up, bias, gate):
    return _forward(activation, low, x, indices, weights, down, up, bias, gate)


pallas_experts.defvjp(_forward_saving, _backward)
