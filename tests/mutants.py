"""Deliberately broken backends: each differs from the reference by one realistic bug.

The meta-tests run the conformance suite against every mutant and require it to fail,
which proves the suite can catch that bug. Each mutant is the reference with one function
replaced for the duration of its own calls, so the oracle the suite compares against is
untouched. Use one as ``--peer-backend mutants:NAME`` with this folder on sys.path.
"""

from __future__ import annotations

import contextlib
import dataclasses
import types
from unittest import mock

import numpy as np

import peer_ref
import peer_ref.backward_pass as ref_backward
import peer_ref.forward_pass as ref_forward
import peer_ref.routing as ref_routing
from peer_backends import numpy as numpy_backend


def _mutant(name: str, patches=(), *, init=None, before=None):
    """A backend like "numpy" but with ``patches`` ((object, attribute, replacement)) active in every call."""

    @contextlib.contextmanager
    def patched():
        with contextlib.ExitStack() as stack:
            for target, attribute, replacement in patches:
                stack.enter_context(mock.patch.object(target, attribute, replacement))
            yield

    def apply(cfg, params, state, x, training=False, mask=None, routing=None, *, jit=None, **kwargs):
        if before:
            params, state, x = before(cfg, params, state, x)
        with patched():
            return numpy_backend.apply(cfg, params, state, x, training, mask, routing, jit=jit, **kwargs)

    def vjp(cfg, params, state, x, dy, training=False, mask=None, routing=None, *, jit=None, **kwargs):
        if before:
            params, state, x = before(cfg, params, state, x)
        with patched():
            return numpy_backend.vjp(cfg, params, state, x, dy, training, mask, routing, jit=jit, **kwargs)

    return types.SimpleNamespace(
        name=f"mutant-{name}",
        version="0",
        capabilities=numpy_backend.capabilities,
        init=init or numpy_backend.init,
        apply=apply,
        vjp=vjp,
        from_numpy=numpy_backend.from_numpy,
        to_numpy=numpy_backend.to_numpy,
        layer=numpy_backend.layer,
    )


def _query_norm(
    normalise_unbiased=False, running_biased=False, momentum_flipped=False, ignore_mask=False, freeze_running=False
):
    """The reference's query batch norm with one convention changed."""

    def query_norm(cfg, params, state, q, valid, training):
        if cfg.query_norm == "none" or not training:
            return ORIGINAL_QUERY_NORM(cfg, params, state, q, valid, training)
        if ignore_mask:
            valid = np.ones_like(valid)
        n = int(valid.sum())
        if n == 0:
            return ORIGINAL_QUERY_NORM(cfg, params, state, q, valid, training)
        mean = q[valid].mean(axis=0)
        biased = ((q[valid] - mean) ** 2).mean(axis=0)
        unbiased = biased * n / max(n - 1, 1)
        var = unbiased if normalise_unbiased else biased
        m = 1 - cfg.bn_momentum if momentum_flipped else cfg.bn_momentum
        running = biased if running_biased else unbiased
        new_state = (
            dict(state)
            if freeze_running
            else {
                "query_norm.mean": (1 - m) * state["query_norm.mean"] + m * mean,
                "query_norm.var": (1 - m) * state["query_norm.var"] + m * running,
            }
        )
        inv_std = 1.0 / np.sqrt(var + cfg.bn_eps)
        normed = (q - mean) * inv_std
        out = normed * params["query_norm.scale"] + params["query_norm.offset"]
        return out, new_state, (normed, inv_std, True, n)

    return query_norm


ORIGINAL_QUERY_NORM = ref_forward.query_norm


def _tie_to_higher_index(values, index, k):
    order = np.lexsort((-index, -values), axis=-1)[..., :k]
    return np.take_along_axis(values, order, axis=-1), order


def _no_softmax(name, scores):
    return peer_ref.functions.score_weights("none" if name == "softmax" else name, scores)


def _gelu_tanh_for_gelu(name, z):
    return peer_ref.functions.activation("gelu_tanh" if name == "gelu" else name, z)


def _activated_gate(cfg, params, xf, indices):
    """Puts the activation on the gate branch too, act(u.x + b) * act(g.x), instead of a linear gate."""
    gate = ORIGINAL_EXPERT_GATE(cfg, params, xf, indices)
    return None if gate is None else peer_ref.functions.activation(cfg.activation, gate)


ORIGINAL_EXPERT_GATE = ref_forward.expert_gate


def _bn_stats_without_gradient(cfg, params, grads, tape, d_out):
    return ORIGINAL_QUERY_NORM_VJP(cfg, params, grads, tape._replace(batch_stats=False), d_out)


ORIGINAL_QUERY_NORM_VJP = ref_backward._query_norm_vjp


def _keys_get_no_gradient(cfg, keys, d_keys, d_scores, q_half):
    return ORIGINAL_SUB_KEY_VJP(cfg, keys, np.zeros_like(d_keys), d_scores, q_half)


ORIGINAL_SUB_KEY_VJP = ref_backward._sub_key_vjp


def _per_head_keys_init(cfg, seed=0, dtype=None):
    """Ignores shared_keys=True: draws one key set per head."""
    params, state = numpy_backend.init(dataclasses.replace(cfg, shared_keys=False), seed=seed, dtype=dtype)
    return params, state


def _cast_x_to_params(cfg, params, state, x):
    """Silently casts x to the parameters' dtype instead of refusing a mismatch."""
    return params, state, np.asarray(x).astype(params["query.kernel"].dtype)


def _zero_masked_by_multiplying(y, valid):
    return y * valid[:, None]


bn_variance_swapped = _mutant(
    "bn-variance-swapped", [(ref_forward, "query_norm", _query_norm(normalise_unbiased=True, running_biased=True))]
)
running_stats_frozen = _mutant("running-stats-frozen", [(ref_forward, "query_norm", _query_norm(freeze_running=True))])
momentum_flipped = _mutant("momentum-flipped", [(ref_forward, "query_norm", _query_norm(momentum_flipped=True))])
mask_ignored_in_statistics = _mutant("mask-ignored", [(ref_forward, "query_norm", _query_norm(ignore_mask=True))])
tie_order_reversed = _mutant("tie-order-reversed", [(ref_routing, "topk_lower_index", _tie_to_higher_index)])
softmax_missing = _mutant("softmax-missing", [(ref_forward, "score_weights", _no_softmax)])
gate_activated = _mutant("gate-activated", [(ref_forward, "expert_gate", _activated_gate)])
gelu_approximated = _mutant("gelu-approximated", [(ref_forward, "activation", _gelu_tanh_for_gelu)])
bn_gradient_detached = _mutant("bn-gradient-detached", [(ref_backward, "_query_norm_vjp", _bn_stats_without_gradient)])
key_gradient_missing = _mutant("key-gradient-missing", [(ref_backward, "_sub_key_vjp", _keys_get_no_gradient)])
per_head_keys = _mutant("per-head-keys", init=_per_head_keys_init)
silent_cast = _mutant("silent-cast", before=_cast_x_to_params)


masked_output_multiplied = _mutant(
    "masked-output-multiplied", [(ref_forward, "zero_masked", _zero_masked_by_multiplying)]
)


_original_gradient_rows = ref_backward.gradient_rows


def _rows_of_every_token(indices, valid):
    """Lists the experts of masked tokens too (they are routed, SPEC §5, but touch no row, §7.1)."""
    return _original_gradient_rows(indices, np.ones_like(valid))


def _dense_tables(grads, rows):
    """Offers sparse=True but returns the expert tables' gradients dense."""
    return grads


sparse_rows_of_masked_tokens = _mutant(
    "sparse-rows-of-masked-tokens", [(ref_backward, "gradient_rows", _rows_of_every_token)]
)
sparse_tables_dense = _mutant("sparse-tables-dense", [(ref_backward, "sparsify", _dense_tables)])


def _restricted(mutant, **declared):
    """``mutant`` in an implementation that declares the option its bug breaks unsupported
    (``options``, see peer_backends.options): the suite must report that option as not supported,
    not blame the bug on it."""
    return types.SimpleNamespace(
        **{**vars(mutant), "name": mutant.name.replace("mutant-", "restricted-"), "options": declared}
    )


gate_activated_without_glu = _restricted(gate_activated, expert_glu=(False,))
softmax_missing_without_softmax = _restricted(softmax_missing, score=("sigmoid", "none"))
bn_variance_swapped_without_batch_norm = _restricted(bn_variance_swapped, query_norm=("none",))
per_head_keys_without_shared_keys = _restricted(per_head_keys, shared_keys=(False,))
masked_output_multiplied_without_mask = _restricted(masked_output_multiplied, mask=(False,))
