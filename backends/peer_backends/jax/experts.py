"""The expert stage (SPEC §3.9-§3.11) on XLA's own kernels (implementation "xla"): each token's
h*k selected experts, down projection, bias, activation, GLU gate, router weights and up
projection, with a hand-written backward that recomputes the gathered rows rather than keep them."""

import functools

import jax
import jax.numpy as jnp
from jax import lax

from .core import HIGHEST, read

# Gathered expert rows per chunk of tokens (tokens * heads * topk): bounds each
# (chunk, heads, topk, d) gather at 32 MiB for d = 256 in float32. On CPU, 8192 rows
# ran about 1.7x slower per step and 65536 no faster (d_model=256, h=8, k=16, 2048 tokens).
ROWS_PER_CHUNK = 32768

ACTIVATIONS = {
    "gelu": lambda z: jax.nn.gelu(z, approximate=False),
    "gelu_tanh": lambda z: jax.nn.gelu(z, approximate=True),
    "relu": jax.nn.relu,  # its derivative at 0 is 0, as SPEC §7 requires
    "silu": jax.nn.silu,
    "identity": lambda z: z,
}


def expert_stage(cfg, p, xf, indices, weights, low=None):
    """The expert stage of implementation "xla" (``peer.expert_stage_for``): y (T, d_out) for p the
    parameters in the compute dtype, xf (T, d_model), indices and weights (T, heads, topk) and
    ``low`` the mixed mode's dtype name or None (SPEC §10.3)."""
    chunk = max(1, ROWS_PER_CHUNK // (cfg.heads * cfg.topk))
    return chunked_experts(
        cfg.activation,
        chunk,
        low,
        xf,
        indices,
        weights,
        p["experts.down"],
        p["experts.up"],
        p["experts.bias"] if cfg.expert_bias else None,
        p["experts.gate"] if cfg.expert_glu else None,
    )


def activation(name, z):
    """The activation ``name`` of peer_ref.functions (SPEC §3.10) on z."""
    return ACTIVATIONS[name](z)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def chunked_experts(activation, chunk, low, x, indices, weights, down, up, bias, gate):
    """y[t] = sum_{h,k} weights * act(x[t] . down[i] + bias[i]) * up[i], i = indices[t, h, k],
    with act(...) times the linear gate x[t] . gate[i] when ``gate`` is given (SPEC §3.10).

    Tokens are processed in chunks so gathered rows never exceed (chunk, heads, topk, d);
    the custom backward recomputes each chunk's gathers instead of letting autodiff keep
    every chunk's, and scatter-adds the row gradients into (n_experts, d) accumulators.
    With ``low`` (the mixed mode's dtype name) the gathered rows of down, gate and up are
    rounded to it as they are read; their gradients treat the rounding as the identity (SPEC §10.3).
    """
    return _experts_forward(activation, chunk, low, x, indices, weights, down, up, bias, gate)


def _experts_saving_inputs(activation, chunk, low, x, indices, weights, down, up, bias, gate):
    # Residuals are the inputs themselves: no gathered rows are kept for the backward.
    y = _experts_forward(activation, chunk, low, x, indices, weights, down, up, bias, gate)
    return y, (x, indices, weights, down, up, bias, gate)


def _experts_recomputing(activation, chunk, low, residuals, dy):
    dx, d_weights, d_down, d_up, d_bias, d_gate = _experts_backward(activation, chunk, low, *residuals, dy)
    return dx, None, d_weights, d_down, d_up, d_bias, d_gate


chunked_experts.defvjp(_experts_saving_inputs, _experts_recomputing)


def _chunked(chunk, arrays):
    """Pad the token axis to a multiple of ``chunk`` and split it: (n_chunks, chunk, ...)."""
    tokens = arrays[0].shape[0]
    padded = -(-tokens // chunk) * chunk
    return [
        jnp.pad(a, [(0, padded - tokens)] + [(0, 0)] * (a.ndim - 1)).reshape((-1, chunk) + a.shape[1:]) for a in arrays
    ]


# Dots of gathered rows with a token's vector are written rows-first ("thkd,td->thk"): XLA's CPU
# dot then reads the gathered (heads*topk, d) block as it lies; written vector-first it copied
# every gathered block into (d, heads*topk) order first (1.35x the time of the expert forward).


def _experts_forward(activation, chunk, low, x, indices, weights, down, up, bias, gate):
    act = ACTIVATIONS[activation]

    def one_chunk(args):
        x_c, idx_c, w_c = args
        pre = jnp.einsum("thkd,td->thk", read(down[idx_c], low), x_c, precision=HIGHEST)
        if bias is not None:
            pre = pre + bias[idx_c]
        hidden = act(pre)
        if gate is not None:
            hidden = hidden * jnp.einsum("thkd,td->thk", read(gate[idx_c], low), x_c, precision=HIGHEST)
        return jnp.einsum("thk,thko->to", w_c * hidden, read(up[idx_c], low), precision=HIGHEST)

    tokens = x.shape[0]
    if tokens <= chunk:
        return one_chunk((x, indices, weights))
    # Padded tokens have weight 0 and x 0, so they add exactly nothing anywhere.
    y = lax.map(one_chunk, tuple(_chunked(chunk, [x, indices, weights])))
    return y.reshape(-1, up.shape[1])[:tokens]


def _experts_backward(activation, chunk, low, x, indices, weights, down, up, bias, gate, dy):
    act = ACTIVATIONS[activation]

    def one_chunk(acc, args):
        d_down, d_up, d_bias, d_gate = acc
        x_c, idx_c, w_c, dy_c = args
        down_rows, up_rows = read(down[idx_c], low), read(up[idx_c], low)
        pre = jnp.einsum("thkd,td->thk", down_rows, x_c, precision=HIGHEST)
        if bias is not None:
            pre = pre + bias[idx_c]
        activated, act_vjp = jax.vjp(act, pre)
        d_coef = jnp.einsum("thko,to->thk", up_rows, dy_c, precision=HIGHEST)
        d_hidden = d_coef * w_c
        rows = idx_c.reshape(-1)
        if gate is None:
            hidden = activated
            (d_pre,) = act_vjp(d_hidden)
            dx_c = jnp.einsum("thk,thkd->td", d_pre, down_rows, precision=HIGHEST)
        else:
            gate_rows = read(gate[idx_c], low)
            gate_values = jnp.einsum("thkd,td->thk", gate_rows, x_c, precision=HIGHEST)
            hidden = activated * gate_values
            (d_pre,) = act_vjp(d_hidden * gate_values)
            d_gate_values = d_hidden * activated
            dx_c = jnp.einsum("thk,thkd->td", d_pre, down_rows, precision=HIGHEST) + jnp.einsum(
                "thk,thkd->td", d_gate_values, gate_rows, precision=HIGHEST
            )
            d_gate = d_gate.at[rows].add(
                (d_gate_values[..., None] * x_c[:, None, None, :]).reshape(rows.shape[0], gate.shape[1])
            )
        # Explicit widths (not -1): a chunk may hold zero tokens.
        d_down = d_down.at[rows].add((d_pre[..., None] * x_c[:, None, None, :]).reshape(rows.shape[0], down.shape[1]))
        d_up = d_up.at[rows].add(
            ((w_c * hidden)[..., None] * dy_c[:, None, None, :]).reshape(rows.shape[0], up.shape[1])
        )
        if bias is not None:
            d_bias = d_bias.at[rows].add(d_pre.reshape(-1))
        return (d_down, d_up, d_bias, d_gate), (dx_c, d_coef * hidden)

    def zeros(a):
        return None if a is None else jnp.zeros_like(a)

    acc = (jnp.zeros_like(down), jnp.zeros_like(up), zeros(bias), zeros(gate))
    tokens = x.shape[0]
    if tokens <= chunk:
        (d_down, d_up, d_bias, d_gate), (dx, d_weights) = one_chunk(acc, (x, indices, weights, dy))
    else:
        (d_down, d_up, d_bias, d_gate), (dx, d_weights) = lax.scan(
            one_chunk, acc, tuple(_chunked(chunk, [x, indices, weights, dy]))
        )
        dx = dx.reshape(-1, x.shape[1])[:tokens]
        d_weights = d_weights.reshape((-1,) + weights.shape[1:])[:tokens]
    return dx, d_weights, d_down, d_up, d_bias, d_gate


# ---------------------------------------------------------------------------- row-sparse gradients
#
# SPEC §7.1. A vjp with sparse=True finds, once, the rows the valid tokens selected
# (``selected_rows``), gathers them from each expert table into a small table (``take_rows``) and
# runs the expert stage on it with the selections renumbered; ``peer.forward`` adds a zero offset to
# each small table, and the gradient with respect to that offset is the table's row-sparse gradient
# (``peer_backends.jax.sparse.RowSparse``). Shapes are static: the rows come padded to a capacity.


def selected_rows(indices, valid, n_experts: int, size: int):
    """``(rows, count, local)``: the rows a call selected (SPEC §7.1) and its selections renumbered into them.

    Args:
      indices: (T, heads, topk) integer, the selected experts.
      valid: (T,) bool, the valid tokens (SPEC §5).
      n_experts: N, the tables' row count (static).
      size: C, the static length of ``rows`` (``peer_backends.jax.sparse.capacity``).

    Returns:
      rows: (size,) ``indices``' dtype, the experts selected by valid tokens, sorted and unique
        (``peer_ref.gradient_rows``), then padded with ``n_experts``;
      count: () int32, U, how many of ``rows`` are real;
      local: (T, heads, topk) ``indices``' dtype, each selection's position in ``rows`` (a masked
        token's points at some row of the small table: its contributions are zero).

    A presence map over the N experts (N int32, not N x d) and its running count give each
    selected expert its rank: O(N + T * heads * topk), no sort (on a 2-core CPU, 262144 selections
    of N = 128**2 experts: 2 ms, against 0.9 s for ``jnp.unique(..., return_inverse=True)``).
    """
    selected = jnp.where(valid[:, None, None], indices, jnp.asarray(n_experts, indices.dtype)).reshape(-1)
    # Entry n_experts collects the masked selections and is never listed.
    present = jnp.zeros(n_experts + 1, jnp.int32).at[selected].set(1)
    rank = jnp.cumsum(present[:n_experts]) - 1
    count = rank[-1] + 1 if n_experts else jnp.int32(0)
    target = jnp.where(selected < n_experts, rank[jnp.minimum(selected, n_experts - 1)], size)
    rows = jnp.full((size,), n_experts, indices.dtype).at[target].set(selected, mode="drop")
    local = jnp.clip(rank[jnp.minimum(indices, n_experts - 1)], 0, max(size - 1, 0))
    return rows, count.astype(jnp.int32), local.astype(indices.dtype)


def take_rows(table, rows):
    """``table[rows]``: (N, ...) and sorted (C,) rows to (C, ...), in ``table``'s dtype, with zeros
    for the padding rows (``rows`` >= N). JAX has no sparse cotangents, so the row-sparse gradient
    (SPEC §7.1) is taken with respect to this small table (plus ``peer.forward``'s zero offset), not
    ``table``: no (N, ...) cotangent is formed."""
    return table.at[rows].get(mode="fill", fill_value=0, indices_are_sorted=True)
