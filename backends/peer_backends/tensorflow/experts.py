"""The expert stage (SPEC §3.9-§3.11) on TensorFlow's own kernels (implementation "tensorflow"):
each token's h*k selected experts, down projection, bias, activation, GLU gate, router weights
and up projection, over token chunks with a backward that recomputes the gathered rows."""

import math

import tensorflow as tf

from .core import read

# A gathered chunk of expert rows (tokens, heads, topk, d) holds at most this many elements.
CHUNK_ELEMENTS = 2**22


def activation(name, z):
    """The activation ``name`` of peer_ref.functions (SPEC §3.10) on z."""
    if name == "gelu":
        return 0.5 * z * (1.0 + tf.math.erf(z / math.sqrt(2.0)))
    if name == "gelu_tanh":
        return 0.5 * z * (1.0 + tf.tanh(math.sqrt(2.0 / math.pi) * (z + 0.044715 * z**3)))
    if name == "relu":
        return tf.nn.relu(z)
    if name == "silu":
        return z * tf.sigmoid(z)
    return z


def _expert_chunk(cfg, x, weights, down_rows, up_rows, bias_rows=None, gate_rows=None):
    """y = sum_{h,k} weights * act(x . down + bias) [* (x . gate)] * up for one chunk of tokens."""
    pre = tf.einsum("td,thkd->thk", x, down_rows)
    if bias_rows is not None:
        pre = pre + bias_rows
    hidden = activation(cfg.activation, pre)
    if gate_rows is not None:  # GLU experts (SPEC §3.10): times the linear gate
        hidden = hidden * tf.einsum("td,thkd->thk", x, gate_rows)
    return tf.einsum("thk,thko->to", weights * hidden, up_rows)


def expert_stage(cfg, p, xf, indices, weights, low=None):
    """The expert stage of implementation "tensorflow": y (T, d_out) for p the parameters in the
    compute dtype, xf (T, d_model), indices and weights (T, heads, topk) and ``low`` the mixed
    mode's dtype name or None (SPEC §10.3)."""
    return chunked_experts(
        cfg, xf, weights, indices, p["experts.down"], p["experts.up"], p.get("experts.bias"), p.get("experts.gate"), low
    )


def chunked_experts(cfg, x, weights, indices, down, up, bias, gate, low=None):
    """The expert MLP over token chunks, so gathered rows never exceed CHUNK_ELEMENTS.

    The custom gradient recomputes each chunk's gathers instead of letting autodiff
    keep all of them, and scatter-adds the row gradients into dense tables. With ``low``
    the gathered rows of down, up and gate (not bias) are rounded to it as they are read;
    their gradients treat the rounding as the identity (SPEC §10.3).
    """
    width = cfg.heads * cfg.topk * max(cfg.d_model, cfg.d_out)
    tokens = tf.shape(x)[0]
    chunk = tf.maximum(tf.minimum(max(1, CHUNK_ELEMENTS // width), tokens), 1)
    # At least one (padding) chunk: XLA compiles the loop body even when it would never run.
    n_chunks = tf.maximum((tokens + chunk - 1) // chunk, 1)
    pad = n_chunks * chunk - tokens

    def chunked(t):
        return tf.reshape(
            tf.pad(t, [[0, pad]] + [[0, 0]] * (t.shape.rank - 1)), tf.concat([[n_chunks, chunk], tf.shape(t)[1:]], 0)
        )

    idx = chunked(indices)  # padding tokens read expert 0 with weight 0
    # The optional tables present, by name: experts.bias and experts.gate.
    optional_names = [name for name, table in (("bias", bias), ("gate", gate)) if table is not None]

    @tf.custom_gradient
    def run(xs, ws, down, up, *optional):
        names = ["down", "up", *optional_names]

        def rows(i):
            """The chunk's gathered rows of [down, up, *optional], as the computation reads them."""
            return [
                tf.gather(table, idx[i]) if name == "bias" else read(tf.gather(table, idx[i]), low)
                for name, table in zip(names, (down, up, *optional))
            ]

        def chunk_output(x_c, w_c, gathered):
            named = {f"{name}_rows": value for name, value in zip(optional_names, gathered[2:])}
            return _expert_chunk(cfg, x_c, w_c, gathered[0], gathered[1], **named)

        def forward_body(i, ys):
            y = chunk_output(xs[i], ws[i], rows(i))
            return i + 1, tf.tensor_scatter_nd_update(ys, [[i]], y[None])

        # Preallocated outputs rather than a TensorArray: zero chunks must work too.
        ys = tf.zeros(tf.concat([tf.shape(xs)[:2], [cfg.d_out]], 0), xs.dtype)
        _, ys = tf.while_loop(lambda i, _: i < n_chunks, forward_body, (0, ys))

        def grad(dys):
            def backward_body(i, dxs, dws, d_tables):
                inputs = [xs[i], ws[i], *rows(i)]
                with tf.GradientTape() as tape:
                    tape.watch(inputs)
                    y = chunk_output(inputs[0], inputs[1], inputs[2:])
                g = tape.gradient(y, inputs, output_gradients=dys[i])
                flat = tf.reshape(idx[i], (-1, 1))
                # Each table's row gradients, scatter-added into its dense (n_experts, ...) gradient.
                d_tables = [
                    tf.tensor_scatter_nd_add(d, flat, tf.reshape(g_rows, (-1,) + tuple(d.shape[1:])))
                    for d, g_rows in zip(d_tables, g[2:])
                ]
                dxs = tf.tensor_scatter_nd_update(dxs, [[i]], g[0][None])
                dws = tf.tensor_scatter_nd_update(dws, [[i]], g[1][None])
                return i + 1, dxs, dws, d_tables

            state = (0, tf.zeros_like(xs), tf.zeros_like(ws), [tf.zeros_like(t) for t in (down, up, *optional)])
            _, dxs, dws, d_tables = tf.while_loop(lambda i, *_: i < n_chunks, backward_body, state)
            return (dxs, dws, *d_tables)

        return ys, grad

    tables = [table for table in (bias, gate) if table is not None]
    ys = run(chunked(x), chunked(weights), down, up, *tables)
    return tf.reshape(ys, (-1, cfg.d_out))[:tokens]


# Row-sparse table gradients (SPEC §7.1): ``peer.forward`` with sparse=True finds the rows the valid
# tokens selected (``selected_rows``), gathers them from each expert table (``take_rows``) and runs
# the expert stage on those with the selections renumbered; the tables' gradients are then
# tf.gather's, IndexedSlices at the rows.


def selected_rows(indices, mask, n_experts):
    """``(rows, local)`` for the selections ``indices`` (T, heads, topk) and ``mask`` (T,) or None
    (SPEC §7.1): rows (U,) int64, the experts selected by valid tokens, sorted and unique; local
    (T, heads, topk), each selection's position in rows, and U (``take_rows``' zero row) for
    the selections of masked tokens. A count per expert (``tf.math.bincount``, N integers, not
    N x d) and its running sum rank them: no sort (on CPU, 262144 selections of 128**2 experts:
    4 ms, against 78 ms for tf.unique of the sorted selections)."""
    valid = indices if mask is None else tf.boolean_mask(indices, mask)
    counts = tf.math.bincount(tf.cast(tf.reshape(valid, [-1]), tf.int32), minlength=n_experts, maxlength=n_experts)
    present = counts > 0
    rows = tf.where(present)[:, 0]
    rank = tf.cumsum(tf.cast(present, tf.int64)) - 1
    local = tf.where(tf.gather(present, indices), tf.gather(rank, indices), tf.size(rows, out_type=tf.int64))
    return rows, local


def take_rows(table, rows):
    """``table[rows]`` and one zero row after them (for the selections of masked tokens): (N, ...)
    and (U,) int64 rows to (U + 1, ...), in ``table``'s dtype. The gradient with respect to
    ``table`` is ``tf.gather``'s, an IndexedSlices at ``rows`` (SPEC §7.1)."""
    block = tf.gather(table, rows)
    return tf.concat([block, tf.zeros(tf.concat([[1], tf.shape(table)[1:]], 0), table.dtype)], 0)
