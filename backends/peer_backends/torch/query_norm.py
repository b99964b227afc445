"""Query batch norm (SPEC §3.3): statistics over the valid tokens, running statistics updated in
training, branch-free in the token count."""

import torch

from .core import transformed


def query_norm(cfg, params, state, q, valid, training):
    """Batch norm of the queries (SPEC §3.3); valid is None when every token is valid."""
    if cfg.query_norm == "none":
        return q, {}
    running_mean = state["query_norm.mean"].to(q.dtype)
    running_var = state["query_norm.var"].to(q.dtype)
    if not training:
        return _normalise(cfg, params, q, running_mean, running_var), dict(state)
    m = cfg.bn_momentum
    if valid is None and q.shape[0] > 1 and not transformed():
        # Every token counts: PyTorch's fused batch norm, one pass each way, whose running update
        # (momentum, Bessel-corrected variance) is SPEC §3.3's for two or more tokens.
        new_mean, new_var = running_mean.clone(), running_var.clone()
        normed = torch.native_batch_norm(
            q, params["query_norm.scale"], params["query_norm.offset"], new_mean, new_var, True, m, cfg.bn_eps
        )[0]
        return normed, {"query_norm.mean": new_mean, "query_norm.var": new_var}
    # Branch-free in the token count (and under torch.func, whose vmap cannot batch the fused
    # kernel's in-place running update). Masked tokens are left out of the statistics by selection.
    if valid is None:
        valid = torch.ones(q.shape[0], dtype=torch.bool, device=q.device)
    n_valid = valid.sum().to(q.dtype)
    count = n_valid.clamp(min=1)
    batch_mean = torch.where(valid[:, None], q, 0).sum(0) / count
    centred = torch.where(valid[:, None], q - batch_mean, 0)
    batch_var = (centred * centred).sum(0) / count
    # A training call without valid tokens normalises with running statistics, state unchanged.
    has_tokens = n_valid > 0
    mean = torch.where(has_tokens, batch_mean, running_mean)
    var = torch.where(has_tokens, batch_var, running_var)
    unbiased = batch_var.detach() * (n_valid / (n_valid - 1).clamp(min=1))
    new_state = {
        "query_norm.mean": torch.where(has_tokens, (1 - m) * running_mean + m * batch_mean.detach(), running_mean),
        "query_norm.var": torch.where(has_tokens, (1 - m) * running_var + m * unbiased, running_var),
    }
    return _normalise(cfg, params, q, mean, var), new_state


def _normalise(cfg, params, q, mean, var):
    normed = (q - mean) * torch.rsqrt(var + cfg.bn_eps)
    return normed * params["query_norm.scale"] + params["query_norm.offset"]
